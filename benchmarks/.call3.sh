python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH
timeout 150 python3 -m pytest -q -m cuda tests/cuda/test_host_prefix_cuda.py tests/cuda/test_not_capturable_cuda.py > $OUT/tests.log 2>&1; echo "tests rc $?"; tail -3 $OUT/tests.log
timeout 200 python3 benchmarks/dit_probe.py --model qwenimage --height 1024 --width 1024 --text-len 256 --no-ref --calls 10 --more-sizes 1328x1328:300,768x1344:180,1024x1024:77 --out $OUT/qwen_bf16.jsonl > $OUT/qwen_bf16.log 2>&1; echo "bf16 rc $?"; tail -c 1500 $OUT/qwen_bf16.jsonl
timeout 200 python3 benchmarks/dit_probe.py --model qwenimage --height 1024 --width 1024 --text-len 256 --no-ref --calls 10 --quant fp8 --more-sizes 1328x1328:300 --out $OUT/qwen_fp8.jsonl > $OUT/qwen_fp8.log 2>&1; echo "fp8 rc $?"; tail -c 2500 $OUT/qwen_fp8.jsonl
