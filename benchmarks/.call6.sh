python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH
timeout 280 python3 -m pytest -q -m cuda tests/cuda/test_more_models_cuda.py tests/cuda/test_host_prefix_cuda.py tests/cuda/test_not_capturable_cuda.py tests/cuda/test_capture_failure_cuda.py > $OUT/tests.log 2>&1; echo "rc $?"; grep -v DEBUG $OUT/tests.log | grep -E "passed|failed|FAILED|^E " | tail -12
