#!/usr/bin/env python3
"""What a first call at a new input shape costs under lyra, and where it goes (GPU only).

    python benchmarks/new_shape_probe.py --model sdxl --sizes 1024x1024,768x768,512x512
        [--mode lyra] [--steady 5] [--batches 1,2,2] [--profile-top 30] [--out f.json]

Compiles the full-size model (random weights), then for each size in order: one first call
(for the first size: trace + rewrite + capture; for later sizes: only new CUDA-graph
captures, no compilation), then `--steady` timed calls. Per size it reports the first call,
the steady median, their difference, the runner's capture phases (input buffers, warm-up run,
recorded run + instantiation) and, with --profile-top, the functions that took the most time
in the first call at each new size (cProfile, cumulative and own time): the per-shape setup
work (GEMM plans and their autotuning, cuDNN plans, the Python runs of the graph).
--time-sdpa times each torch SDPA call of a new size's first call that is not being captured
(a device sync before and after it, so it is the call's own host + GPU time: a new attention
shape's cuDNN graph build shows up here), by shape, with the Python garbage collection time
that fell inside each (`gc_ms`). Every row lists the collections of its first call
(`gc_pauses`: generation, ms; those of 1 ms or more). --gc-freeze moves every object alive after
the compiling call into the permanent generation (`gc.freeze()`), so later full collections do
not walk the compiled graphs. --spy-slow-sdpa MS runs `py-spy dump --native` on this process
when a timed SDPA call has run for MS ms (a watchdog thread; torch releases the GIL inside the
op): the native stack of a slow call, in the row's `spy_dumps`.
"""
from __future__ import annotations

import argparse
import cProfile
import gc
import io
import json
import os
import pstats
import statistics
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import lyradynamo  # noqa: E402
from lyradynamo import attention_prewarm, zoo  # noqa: E402
from bench import backend_phases, cuda_jit_cache_bytes, dynamo_phases, dynamo_seconds, parse_lyra_config  # noqa: E402  (benchmarks/ is this script's folder)
from profile_gaps import QUANT  # noqa: E402


def _capture_phases() -> dict:
    total: dict = {}
    for r in lyradynamo.compiled_graphs():
        for k, v in r.summary.get("capture_phases_s", {}).items():
            total[k] = total.get(k, 0.0) + v
    return total


def _direct_capture_failures() -> int:
    return sum(len(r.summary.get("direct_capture_failures", ())) for r in lyradynamo.compiled_graphs())


def _tuning_counts() -> dict:
    """GEMM shapes timed / reused so far: cuBLASLt plans (csrc) and gated_gemm's decisions."""
    from lyradynamo.ops import _common, gated_gemm

    C = _common.csrc()
    timed, reused = C.gemm_tuning_counts() if C is not None and hasattr(C, "gemm_tuning_counts") else (0, 0)
    decisions = gated_gemm.choices().values()
    return {"gemm_timed": timed, "gemm_reused": reused,
            "gated_timed": sum("reused_from" not in d for d in decisions),
            "gated_reused": sum("reused_from" in d for d in decisions)}


def _timed(fn) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


class GcPauses:
    """Each garbage collection's generation and duration (ms), from gc.callbacks, and the
    running total, so a timed region can subtract what Python's collector took inside it."""

    def __init__(self):
        self.pauses, self.total_ms, self._t0 = [], 0.0, None
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
        elif self._t0 is not None:
            ms = (time.perf_counter() - self._t0) * 1e3
            self.total_ms += ms
            self.pauses.append((info["generation"], round(ms, 2)))
            self._t0 = None

    def take(self) -> list:
        pauses, self.pauses = [p for p in self.pauses if p[1] >= 1.0], []
        return pauses


GC = GcPauses()


class SdpaTimer:
    """While `on`, times each uncaptured torch SDPA call that lyra::attention makes (synchronised on
    both sides), listed by (q shape, k shape, q strides, scale). It replaces the `F` that
    lyradynamo/ops/attention.py calls through, not torch's function: Dynamo traces the model's
    own calls to torch's (a patched one would be traced, guarded on and recompiled), never
    lyra::attention's implementation."""

    def __init__(self):
        from lyradynamo.ops import attention as lyra_attention

        timer, real = self, lyra_attention.F

        class TimedF:
            def __getattr__(self, name):
                return getattr(real, name)

            @staticmethod
            def scaled_dot_product_attention(q, k, v, *a, **kw):
                if (not timer.on or torch.cuda.is_current_stream_capturing()
                        or threading.current_thread() is not threading.main_thread()):  # not prewarm workers
                    return real.scaled_dot_product_attention(q, k, v, *a, **kw)
                torch.cuda.synchronize()
                t0, gc0 = time.perf_counter(), GC.total_ms
                timer.started = t0
                out = real.scaled_dot_product_attention(q, k, v, *a, **kw)
                torch.cuda.synchronize()
                timer.started = None
                timer.calls.append({"q": list(q.shape), "k": list(k.shape), "q_stride": list(q.stride()),
                                    "scale": kw.get("scale"), "ms": round((time.perf_counter() - t0) * 1e3, 2),
                                    "gc_ms": round(GC.total_ms - gc0, 2)})
                return out

        self.on, self.calls, self.started, self.dumps = False, [], None, []
        lyra_attention.F = TimedF()

    def spy_when_slow(self, after_ms: float) -> None:
        """A daemon thread that dumps this process's native stacks (py-spy) once per timed call
        that runs longer than after_ms."""

        def watch():
            dumped = None
            while True:
                time.sleep(0.01)
                started = self.started
                if started is None or started == dumped or (time.perf_counter() - started) * 1e3 < after_ms:
                    continue
                dumped = started
                try:
                    res = subprocess.run(["py-spy", "dump", "--native", "--pid", str(os.getpid())],
                                         capture_output=True, text=True, timeout=60)
                    self.dumps.append(res.stdout + res.stderr)
                except (OSError, subprocess.SubprocessError) as exc:
                    self.dumps.append(f"py-spy failed: {exc}")

        threading.Thread(target=watch, daemon=True).start()

    def take(self) -> list:
        calls, self.calls = self.calls, []
        return calls

    def take_dumps(self) -> list:
        dumps, self.dumps = self.dumps, []
        return dumps


class WarmupNodeTimer:
    """While `on`, runs each CUDA-graph runner's warm-up run (the uncaptured run before a capture
    records) node by node with a device sync around every node, and sums the host + GPU time by
    op (the node's target): where a new size's per-shape setup goes (cuDNN plans, GEMM plans and
    timings, attention builds), op by op. The recorded run is left alone."""

    def __init__(self):
        from lyradynamo import runtime

        timer, real_capture = self, runtime.CudaGraphRunner._capture

        def capture(runner, args):
            if not timer.on:
                return real_capture(runner, args)
            gm = runner.gm
            runner.gm = lambda *a: timer.run(gm, a)
            try:
                return real_capture(runner, args)
            finally:
                runner.gm = gm

        self.on, self.by_op, self.slow_nodes = False, {}, []
        runtime.CudaGraphRunner._capture = capture

    def run(self, gm, args):
        import torch.fx as fx

        if torch.cuda.is_current_stream_capturing():
            return gm(*args)
        timer = self

        class Timed(fx.Interpreter):
            def run_node(self, n):
                if n.op in ("placeholder", "output", "get_attr"):
                    return super().run_node(n)
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                out = super().run_node(n)
                torch.cuda.synchronize()
                ms = (time.perf_counter() - t0) * 1e3
                name = getattr(n.target, "__name__", str(n.target)) if n.op != "call_module" else n.target
                tot = timer.by_op.setdefault(str(name), [0, 0.0, 0.0])
                tot[0] += 1
                tot[1] += ms
                tot[2] = max(tot[2], ms)
                if ms >= 2.0:
                    timer.slow_nodes.append((n.name, str(name), round(ms, 2)))
                return out

        return Timed(gm).run(*args)

    def take(self) -> dict:
        rows = sorted(self.by_op.items(), key=lambda kv: -kv[1][1])
        out = {"by_op": [[k, v[0], round(v[1], 2), round(v[2], 2)] for k, v in rows[:40]],
               "total_ms": round(sum(v[1] for v in self.by_op.values()), 2),
               "slow_nodes": self.slow_nodes[:80]}
        self.by_op, self.slow_nodes = {}, []
        return out


def _top(prof: cProfile.Profile, key: str, n: int) -> str:
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats(key).print_stats(n)
    return buf.getvalue()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="sdxl")
    p.add_argument("--mode", default="lyra", choices=sorted(QUANT))
    p.add_argument("--sizes", default="1024x1024,768x768,512x512")
    p.add_argument("--steady", type=int, default=5)
    p.add_argument("--batches", default=None,
                   help="UNet / transformer batch per entry of --sizes, comma list (default: 2 for SD1.5 "
                        "and SDXL, else 1); e.g. --sizes 1024x1024,1024x1024 --batches 1,2: batch 2 after a "
                        "compile at batch 1 (new_compiles must stay 0)")
    p.add_argument("--profile-top", type=int, default=0, help="cProfile each new-size first call")
    p.add_argument("--lyra-config", action="append", default=[], metavar="KEY=VALUE",
                   help="a lyradynamo.config option (repeatable), as bench.py takes it")
    p.add_argument("--backend", default="lyra", choices=("lyra", "eager"),
                   help="eager: Dynamo's plain eager backend (static first trace): its tracing time alone")
    p.add_argument("--time-sdpa", action="store_true", help="time each SDPA call of a new size's first call")
    p.add_argument("--gc-freeze", action="store_true", help="gc.freeze() after the compiling call")
    p.add_argument("--time-sdpa-compile", action="store_true",
                   help="with --time-sdpa: time the compiling call's SDPA calls too (its cuDNN compiles)")
    p.add_argument("--spy-slow-sdpa", type=float, default=0, metavar="MS",
                   help="with --time-sdpa: py-spy dump --native of a timed SDPA call running MS ms")
    p.add_argument("--time-warmup-nodes", action="store_true",
                   help="each warm-up run (the compiling call's, and a new size's where one runs) node by "
                        "node, synced: time by op (count, ms, max ms)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    sdpa = SdpaTimer() if args.time_sdpa else None
    nodes = WarmupNodeTimer() if args.time_warmup_nodes else None
    if sdpa is not None and args.spy_slow_sdpa:
        sdpa.spy_when_slow(args.spy_slow_sdpa)
    overrides = {"quant": QUANT[args.mode], **parse_lyra_config(args.lyra_config)}
    dtype = zoo.default_dtype(args.model, "cuda")
    model = zoo.build_denoiser(args.model, tiny=False, dtype=dtype, device="cuda")
    sizes = args.sizes.split(",")
    batches = ([int(b) for b in args.batches.split(",")] if args.batches
               else [2 if args.model in ("sd15", "sdxl") else 1] * len(sizes))
    if len(batches) != len(sizes):
        p.error("--batches needs one batch per entry of --sizes")
    rows, texts = [], []
    with torch.no_grad(), lyradynamo.config.patch(**overrides):
        compiled = torch.compile(model, backend=args.backend)
        for i, (size, batch) in enumerate(zip(sizes, batches)):
            w, h = (int(s) for s in size.split("x"))
            inputs = zoo.denoiser_inputs(args.model, model, batch=batch, height=h, width=w)
            before, compiles0, tuned0 = _capture_phases(), lyradynamo.compile_count(), _tuning_counts()
            graphs0 = len(lyradynamo.compiled_graphs())
            prewarm0 = dict(attention_prewarm.stats)
            jit_cache = cuda_jit_cache_bytes()
            dynamo0 = dynamo_seconds()
            prof = cProfile.Profile() if (args.profile_top and i > 0) else None
            if prof is not None:
                prof.enable()
            if sdpa is not None:
                sdpa.on = i > 0 or args.time_sdpa_compile
            GC.take()
            if nodes is not None:
                nodes.on = True
            first = _timed(lambda: compiled(**inputs))
            if nodes is not None:
                nodes.on = False
            gc_pauses = GC.take()
            if sdpa is not None:
                sdpa.on = False
            if args.gc_freeze and i == 0:
                gc.freeze()
            if prof is not None:
                prof.disable()
            after, tuned = _capture_phases(), _tuning_counts()
            steady = statistics.median(_timed(lambda: compiled(**inputs)) for _ in range(args.steady))
            mode = args.mode if args.backend == "lyra" else "dynamo-eager"
            row = {"model": args.model, "mode": mode, "size": size, "batch": batch, "first_call_s": round(first, 4),
                   "steady_s": round(steady, 5), "extra_s": round(first - steady, 4),
                   "new_compiles": lyradynamo.compile_count() - compiles0,
                   "dynamo_phases_s": dynamo_phases(dynamo0), "backend_phases_s": backend_phases(graphs0),
                   "capture_phases_s": {k: round(after[k] - before.get(k, 0.0), 4) for k in after},
                   "tuning": {k: tuned[k] - tuned0[k] for k in tuned},
                   "direct_capture_failures": _direct_capture_failures(),
                   "attention_prewarm": {k: attention_prewarm.stats[k] - prewarm0[k] for k in prewarm0},
                   "cuda_jit_cache_bytes_before": jit_cache,
                   "profiled": prof is not None, "sdpa_calls": sdpa.take() if sdpa is not None else None,
                   "gc_pauses": gc_pauses, "gc_freeze": args.gc_freeze,
                   "spy_dumps": sdpa.take_dumps() if sdpa is not None else None,
                   "warmup_nodes": nodes.take() if nodes is not None else None,
                   "config": overrides, "gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
            rows.append(row)
            print("== " + json.dumps(row), flush=True)
            if prof is not None:
                texts.append(f"==== {size}: first call {first:.3f} s (cProfile on)\n"
                             + _top(prof, "cumulative", args.profile_top)
                             + _top(prof, "tottime", args.profile_top))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
        if texts:
            with open(os.path.splitext(args.out)[0] + "-profile.txt", "w") as f:
                f.write("\n".join(texts))


if __name__ == "__main__":
    main()
