#!/usr/bin/env bash
# One GPU-machine session, run from the repo root:
#   1. install carried wheels (.whl/*.whl -> /tmp/site)      PYTHONPATH=/tmp/site:$PWD
#   2. build the CUDA library (cmake + ninja, sm_90a)         SKIP_BUILD=1 skips
#   3. CUDA tests: pytest -m cuda tests/cuda                  SKIP_TESTS=1 skips
#   4. kernel bench (KERNEL_BENCH=1, if benchmarks/kernels_bench.py exists), then the model
#      benchmarks chosen by BENCH_* below                    SKIP_BENCH=1 skips the model ones
# Everything goes to $OUT (default ./device_out), flat, at most 7 files:
#   build.log cuda_tests.xml cuda_tests.log kernels.json bench.jsonl bench.log bench.md
#   (+ chart.png only while that keeps the total under 8; + _C*.so with KEEP_SO=1).
#
# Benchmark selection (env):
#   BENCH_MODELS    comma list, one bench.py process per model      (default sd15)
#   BENCH_MODES     --modes                                          (default eager,lyra)
#   BENCH_SIZES     --sizes; "native" = each model's own size        (default 512x512)
#   BENCH_STEPS     --steps                                          (default 20)
#   BENCH_SCENARIO  steady|sweep|cold                                (default steady)
#   BENCH_EXTRA     more bench.py arguments, e.g. "--runs 5 --warmup 2"
#   KERNEL_BENCH_ARGS  kernels_bench.py arguments, e.g. "--dtype bf16 --quant --fusion"
#   PROFILE_MODELS  comma list: top CUDA kernels of one call (profile_model.py) -> profile.log
#   PROFILE_MODES   modes to profile (default lyra); PROFILE_SIZE WxH; PROFILE_EXTRA e.g. "--ops 30"
#   SWAP_MODELS     comma list for benchmarks/bench_swap.py (LoRA / ControlNet swaps) -> swap.jsonl
#   CONSISTENCY_MODELS  comma list for benchmarks/consistency.py (lyra vs eager vs fp32 eager,
#                   full size, one call) -> consistency.json
#   TEST_ARGS       pytest arguments for the CUDA tests (default "-x")
#   TEST_PATHS      test files / folders to run (default tests/cuda)
#   BUNDLE=1        pack $OUT into $OUT.tgz at the end (one returned file per session)
#   SESSION_BUDGET_S  seconds from the start after which nothing new is started and running
#                   benchmarks are interrupted (rows kept)  (default 540: a run call has 600).
#                   It counts from this script's start: the build (~100-130 s on a fresh machine),
#                   the wheels and the environment report (~10-15 s) come out of it, and the bench
#                   keeps 20 s back; a lyra first call alone takes 17-35 s (SD1.5 to FLUX).
set -u
OUT=${OUT:-./device_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
T0=$(date +%s)
SESSION_BUDGET_S=${SESSION_BUDGET_S:-540}
DEADLINE=$((T0 + SESSION_BUDGET_S))
left() { echo $((DEADLINE - $(date +%s))); }

BENCH_MODELS=${BENCH_MODELS:-sd15}
BENCH_MODES=${BENCH_MODES:-eager,lyra}
BENCH_SIZES=${BENCH_SIZES:-512x512}
BENCH_STEPS=${BENCH_STEPS:-20}
BENCH_SCENARIO=${BENCH_SCENARIO:-steady}
BENCH_EXTRA=${BENCH_EXTRA:-}

S_WHEELS="none carried"; S_BUILD="skipped"; S_TESTS="skipped"; S_KERNELS="skipped"; S_BENCH="skipped"

echo "== device session $(date -u +%FT%TZ) in $PWD, budget ${SESSION_BUDGET_S}s"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "== nvidia-smi not available"

# ---- 1. wheels ---------------------------------------------------------------------------
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  t=$(date +%s)
  n=$(ls .whl/*.whl | wc -l)
  if python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl; then
    S_WHEELS="ok ($n wheels, $(( $(date +%s) - t ))s)"
  else
    S_WHEELS="FAILED ($n wheels)"
  fi
  echo "== wheels: $S_WHEELS"
fi
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
export PATH=/tmp/site/bin:$PATH
python3 - <<'EOF'
import sys, torch
print("== python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
      "gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else "NONE")
try:
    import diffusers
    print("== diffusers", diffusers.__version__)
except Exception as e:
    print("== diffusers NOT importable (carry its wheel in .whl/):", e)
EOF

# ---- 2. build ----------------------------------------------------------------------------
if [ "${SKIP_BUILD:-0}" != 1 ]; then
  extra=()
  CUTLASS_INC=/tmp/site/cutlass_library/source/include
  [ -d "$CUTLASS_INC" ] && extra+=("-DLYRA_CUTLASS_DIR=$CUTLASS_INC")
  if command -v ninja >/dev/null 2>&1; then gen=(-G Ninja); else gen=(); echo "== ninja not found: default generator"; fi
  t=$(date +%s)
  {
    cmake -S . -B build "${gen[@]}" -DLYRA_CUDA_ARCHS=90a -DLYRA_OUTPUT_DIR="$PWD/lyradynamo" \
      -DPython_EXECUTABLE="$(which python3)" ${extra[@]+"${extra[@]}"} &&
    cmake --build build -j "$(nproc)"
  } > "$OUT/build.log" 2>&1
  rc=$?
  if [ $rc = 0 ]; then S_BUILD="ok in $(( $(date +%s) - t ))s"; else S_BUILD="FAILED (rc $rc) after $(( $(date +%s) - t ))s"; tail -40 "$OUT/build.log"; fi
  echo "== build: $S_BUILD (log: build.log)"
  # KEEP_SO=1: bring the built module back ($OUT/_C*.so) so that later calls can carry it
  # (copy it into lyradynamo/, name it in `carry`) and use SKIP_BUILD=1.
  if [ "${KEEP_SO:-0}" = 1 ] && [ $rc = 0 ]; then cp lyradynamo/_C*.so "$OUT/" 2>/dev/null && echo "== kept $(cd "$OUT" && ls _C*.so)"; fi
fi

# ---- 3. CUDA tests -----------------------------------------------------------------------
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  t=$(date +%s)
  timeout -k 10 $(( $(left) > 60 ? $(left) - 30 : 30 )) \
    python3 -m pytest -m cuda ${TEST_PATHS:-tests/cuda} -q ${TEST_ARGS:--x} --junitxml="$OUT/cuda_tests.xml" 2>&1 | tee "$OUT/cuda_tests.log"
  rc=${PIPESTATUS[0]}
  S_TESTS="rc $rc in $(( $(date +%s) - t ))s: $(python3 - "$OUT/cuda_tests.xml" <<'EOF'
import sys, xml.etree.ElementTree as ET
try:
    r = ET.parse(sys.argv[1]).getroot()
    s = r if r.tag == "testsuite" else r.find("testsuite")
    g = lambda k: int(s.get(k, 0))
    print(f"{g('tests')} tests, {g('failures')} failed, {g('errors')} errors, {g('skipped')} skipped")
except Exception as e:
    print(f"no junit xml ({type(e).__name__})")
EOF
)"
  echo "== cuda tests: $S_TESTS"
fi

# ---- 4. benchmarks -----------------------------------------------------------------------
if [ "${KERNEL_BENCH:-0}" = 1 ]; then
  if [ -f benchmarks/kernels_bench.py ]; then
    t=$(date +%s)
    kt=${KERNEL_BENCH_TIMEOUT:-150}; [ "$kt" -gt "$(left)" ] && kt=$(left)
    if [ "$kt" -gt 10 ]; then
      timeout -s INT -k 10 "$kt" python3 benchmarks/kernels_bench.py --out "$OUT/kernels.json" ${KERNEL_BENCH_ARGS:-}
      S_KERNELS="rc $? in $(( $(date +%s) - t ))s"
    else
      S_KERNELS="skipped (no time left)"
    fi
  else
    S_KERNELS="benchmarks/kernels_bench.py does not exist"
  fi
  echo "== kernel bench: $S_KERNELS"
fi

# PROFILE_MODELS=sd15,flux: top CUDA kernels of one model call per PROFILE_MODES mode
if [ -n "${PROFILE_MODELS:-}" ]; then
  for m in ${PROFILE_MODELS//,/ }; do
    pt=$(( $(left) - 30 )); [ "$pt" -gt 240 ] && pt=240
    [ "$pt" -lt 30 ] && { echo "== profile $m: skipped, no time left"; continue; }
    timeout -s INT -k 10 "$pt" python3 benchmarks/profile_model.py --model "$m" \
      --modes "${PROFILE_MODES:-lyra}" ${PROFILE_SIZE:+--size $PROFILE_SIZE} ${PROFILE_EXTRA:-} 2>&1 \
      | grep -v Warning | tee -a "$OUT/profile.log" | tail -60
  done
fi

# CONSISTENCY_MODELS=sd15,sdxl,flux: per-call lyra vs eager vs fp32 eager on the full-size models
# (benchmarks/consistency.py) -> consistency.json
if [ -n "${CONSISTENCY_MODELS:-}" ]; then
  ct=$(( $(left) - 30 )); [ "$ct" -gt 300 ] && ct=300
  if [ "$ct" -gt 30 ]; then
    timeout -s INT -k 10 "$ct" python3 benchmarks/consistency.py --models "$CONSISTENCY_MODELS" \
      --out "$OUT/consistency.json" 2>&1 | grep -v -i warn | tail -10
  else
    echo "== consistency: skipped, no time left"
  fi
fi

# SWAP_MODELS=sd15,sdxl: LoRA / ControlNet swap timings (bench_swap.py) -> swap.jsonl
if [ -n "${SWAP_MODELS:-}" ]; then
  st=$(( $(left) - 30 )); [ "$st" -gt "${SWAP_TIMEOUT:-150}" ] && st=${SWAP_TIMEOUT:-150}
  if [ "$st" -gt 30 ]; then
    timeout -s INT -k 10 "$st" python3 benchmarks/bench_swap.py --models "$SWAP_MODELS" \
      --out "$OUT/swap.jsonl" ${SWAP_EXTRA:-} 2>&1 | grep -v Warning | tail -40
  else
    echo "== swap bench: skipped, no time left"
  fi
fi

if [ "${SKIP_BENCH:-0}" != 1 ]; then
  S_BENCH=""
  size_args=(--sizes "$BENCH_SIZES")
  [ -z "$BENCH_SIZES" ] || [ "$BENCH_SIZES" = native ] && size_args=()
  for m in ${BENCH_MODELS//,/ }; do
    budget=$(( $(left) - 20 ))
    if [ $budget -lt 30 ]; then S_BENCH="$S_BENCH $m:skipped(no time)"; echo "== bench $m: skipped, no time left"; continue; fi
    t=$(date +%s)
    echo "== bench $m (cap ${budget}s: interrupted if it runs longer)" | tee -a "$OUT/bench.log"
    # SIGINT: bench.py stops, keeps the rows written so far and prints its table.
    # shellcheck disable=SC2086
    timeout -s INT -k 20 "$budget" python3 benchmarks/bench.py --model "$m" --modes "$BENCH_MODES" \
      ${size_args[@]+"${size_args[@]}"} --steps "$BENCH_STEPS" --scenario "$BENCH_SCENARIO" \
      --out "$OUT/bench.jsonl" --progress plain $BENCH_EXTRA 2>&1 | tee -a "$OUT/bench.log"
    rc=${PIPESTATUS[0]}
    S_BENCH="$S_BENCH $m:rc$rc/$(( $(date +%s) - t ))s"
  done
  if [ -f "$OUT/bench.jsonl" ]; then
    png=()
    nfiles=$(find "$OUT" -type f | wc -l)
    [ ! -f "$OUT/bench.md" ] && nfiles=$((nfiles + 1))
    [ "$nfiles" -lt 7 ] && png=(--png "$OUT/chart.png")
    python3 benchmarks/report.py "$OUT/bench.jsonl" --out "$OUT/bench.md" ${png[@]+"${png[@]}"}
  fi
fi

# ---- summary -----------------------------------------------------------------------------
echo
echo "================ summary ($(( $(date +%s) - T0 ))s) ================"
echo "wheels:      $S_WHEELS"
echo "build:       $S_BUILD"
echo "cuda tests:  $S_TESTS"
echo "kernels:     $S_KERNELS"
echo "bench:       ${S_BENCH:-skipped}"
echo "lyra _C:     $(python3 -c 'import importlib.util as u; s=u.find_spec("lyradynamo._C"); print(s.origin if s else "not built/importable")' 2>&1 | tail -1)"
if [ -f "$OUT/bench.jsonl" ]; then
  python3 - "$OUT/bench.jsonl" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
bad = [r for r in rows if r.get("error")]
print(f"bench rows:  {len(rows)} ({len(bad)} with error)")
for r in rows:
    f = lambda k, fmt: "-" if r.get(k) is None else format(r[k], fmt)
    print(f"  {r['model']:5} {r['mode']:12} {r['size']:>9}  s/img {f('seconds', '.4f'):>8}  first {f('first_call_s', '.1f'):>6}"
          f"  compiles {r.get('compiles')!s:>4}  mem {f('peak_mem_gb', '.2f'):>6}  rel {f('rel_err', '.1e'):>8}"
          f"  psnr {f('psnr_db', '.1f'):>6}  {(r.get('error') or '')[:70]}")
EOF
fi
echo "files in $OUT:"; ls -la "$OUT"
# BUNDLE=1: pack $OUT into one file, $OUT.tgz (the run tool brings back at most 8 files; two or
# three sessions in one call, each with OUT=$OUT0/<name>, then come back whole). Unpack here with
# `tar -xzf <name>.tgz -C <dir>`.
if [ "${BUNDLE:-0}" = 1 ]; then
  rm -f "$OUT/cuda_tests.xml"  # the summary line above already holds its counts
  if tar -czf "$OUT.tgz" -C "$OUT" . ; then
    rm -rf "$OUT"
    echo "== bundled: $OUT.tgz ($(du -h "$OUT.tgz" | cut -f1))"
  else
    echo "== bundle FAILED: $OUT left as it is"
  fi
fi
