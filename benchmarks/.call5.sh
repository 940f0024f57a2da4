python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH
timeout 260 python3 -m pytest -q -m cuda tests/cuda/test_more_models_cuda.py tests/cuda/test_host_prefix_cuda.py > $OUT/more_models.log 2>&1; echo "more_models rc $?"; grep -v DEBUG $OUT/more_models.log | grep -E "passed|failed|FAILED|Error" | tail -8
timeout 230 python3 -m pytest -q -m cuda tests/cuda/test_models_cuda.py > $OUT/models.log 2>&1; echo "models rc $?"; grep -v DEBUG $OUT/models.log | grep -E "passed|failed|FAILED" | tail -8
