set -u
R=$OUT
OUT=/tmp/w/b SKIP_TESTS=1 SKIP_BENCH=1 SKIP_BUILD=1 BUNDLE=0 bash benchmarks/device_session.sh > $R/session.log 2>&1
export PYTHONPATH=/tmp/site:$PWD
export CUDA_CACHE_PATH=/tmp/cc5
i=0
for w in True False True False; do
  i=$((i+1))
  timeout 75 python benchmarks/bench.py --model sd15 --modes lyra --scenario sweep --sizes 512x512,768x768,640x640 --compile-vae --no-quality --runs 3 --lyra-config new_shape_warmup=$w --out $R/sd15-$i-warmup-$w.jsonl > $R/bench-$i.log 2>&1
done
for f in $R/*.jsonl; do echo $f; python -c "
import json
for l in open('$f'):
    r=json.loads(l); print(r.get('size'), r.get('seconds'), r.get('first_call_s'), r.get('new_compiles'))
"; done
