python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH
timeout 170 python3 -m pytest -q -m cuda tests/cuda/test_attention_fp8_cuda.py > $OUT/tests.log 2>&1; echo "tests rc $?"; tail -3 $OUT/tests.log
for fa in auto on; do
timeout 170 python3 benchmarks/dit_probe.py --model wan --keep-fp32 --quant fp8 --lyra-config fp8_attention=$fa --calls 10 --out $OUT/wan.jsonl > $OUT/wan_$fa.log 2>&1; echo "$fa rc $?"
tail -1 $OUT/wan.jsonl | python3 -c "import json,sys; r=json.loads(sys.stdin.read()); print(r['eager_ms'], r['lyra_ms'], r['lyra_err_vs_fp32'], r['eager_err_vs_fp32'], r['quant_report']['attention'], r['lyra_first_call_s'])"
done
