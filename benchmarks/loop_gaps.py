#!/usr/bin/env python3
"""Where a denoising loop's time goes between the model's GPU work (GPU only).

    python benchmarks/loop_gaps.py --model sd15 --mode lyra [--steps 6] [--out f.json]

Builds the full-size model, its VAE and scheduler as bench.py does, runs the loop twice to warm
up (compile, capture), profiles one more loop (torch.profiler, CPU and CUDA activity), then runs
one without the profiler with CUDA events around each model call. Per step (one model call's
host start to the next one's) it reports the wall time, the GPU ops' summed durations (ops that
overlap count twice), the longest stretch of back-to-back GPU ops (the model call's replay under
lyra), the time the GPU had nothing to run, the host time of the model call, and, from the
events, the GPU time of each call and step (a call's includes the GPU waiting for the host to
launch its work: after a scheduler's host sync the queue is empty). For the idle stretches it
lists the host functions that ran meanwhile (profiler CPU events overlapping them, by total
overlap): what a faster host path must cut.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import torch  # noqa: E402

import denoise  # noqa: E402
import lyradynamo  # noqa: E402
from lyradynamo import zoo  # noqa: E402
from profile_gaps import QUANT, gpu_ops  # noqa: E402  (benchmarks/ is this script's folder)

MODES = {"eager": None, "inductor-cg": None, **QUANT}  # mode -> lyradynamo.config.quant (None: not lyra)


def _idle(ops: list, lo: float, hi: float) -> list:
    """Stretches of [lo, hi] with no GPU op running: [(start, end)]."""
    gaps, t = [], lo
    for s, e, _ in ops:
        if e <= lo or s >= hi:
            continue
        if s > t:
            gaps.append((t, s))
        t = max(t, e)
    if hi > t:
        gaps.append((t, hi))
    return gaps


def _event_timed_loop(loop, fn, device: str) -> tuple[list, list]:
    """One more loop without the profiler: GPU time of each model call (CUDA events around it:
    the replay plus its input copies and output clone) and of each whole step, in ms."""
    if device != "cuda":
        return [], []
    marks = []

    def timed(*a, **k):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        out = fn(*a, **k)
        e1.record()
        marks.append((e0, e1))
        return out

    loop.denoise(timed)
    torch.cuda.synchronize()
    calls = [a.elapsed_time(b) for a, b in marks]
    steps = [marks[i][0].elapsed_time(marks[i + 1][0]) for i in range(len(marks) - 1)]
    return calls, steps


def _busy_blocks(ops: list, lo: float, hi: float, join_us: float = 20.0) -> list:
    """Lengths (us) of the stretches of [lo, hi] where GPU ops follow each other with gaps
    under join_us: the longest one of a step is its model call's replay."""
    blocks, start, end = [], None, None
    for s, e, _ in ops:
        if e <= lo or s >= hi:
            continue
        if start is None or s - end > join_us:
            if start is not None:
                blocks.append(end - start)
            start, end = s, e
        else:
            end = max(end, e)
    if start is not None:
        blocks.append(end - start)
    return blocks


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="sd15")
    p.add_argument("--mode", default="lyra", choices=sorted(MODES))
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--out", default=None)
    p.add_argument("--skip-guard-eval", action="store_true",
                   help="after the warm-up loops, run under torch.compiler.set_stance(skip_guard_eval_unsafe=True) "
                        "(UNSAFE: what Dynamo's guards cost per step)")
    p.add_argument("--tiny", action="store_true", help="tiny configs on the CPU (a smoke test of this script)")
    args = p.parse_args()
    device = "cpu" if args.tiny else "cuda"
    dtype = zoo.default_dtype(args.model, device)
    model = zoo.build_denoiser(args.model, tiny=args.tiny, dtype=dtype, device=device)
    vae = denoise.build_vae(args.model, tiny=args.tiny, dtype=dtype, device=device)
    scheduler = denoise.build_scheduler(args.model)
    h, w = zoo.default_size(args.model, tiny=args.tiny)
    loop = denoise.Workload(args.model, model, vae, scheduler, height=h, width=w, steps=args.steps)
    fn = model
    if args.mode == "inductor-cg":
        fn = torch.compile(model, mode="reduce-overhead")
    elif MODES[args.mode] is not None:
        lyradynamo.config.quant = MODES[args.mode]
        fn = torch.compile(model, backend="lyra")

    def timed(*a, **k):
        with torch.profiler.record_function("model_call"):
            return fn(*a, **k)

    with torch.no_grad():
        loop.denoise(fn)
        loop.denoise(fn)
        if args.skip_guard_eval:
            torch.compiler.set_stance("default", skip_guard_eval_unsafe=True)
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        sync()
        acts = [torch.profiler.ProfilerActivity.CPU]
        if device == "cuda":
            acts.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=acts) as prof:
            loop.denoise(timed)
            sync()
        call_ms, step_ms = _event_timed_loop(loop, fn, device)
    events = list(prof.events())
    # host (start, end) of each model call, microseconds on the profiler's clock
    calls = sorted((ev.time_range.start, ev.time_range.end) for ev in events
                   if ev.name == "model_call" and ev.device_type == torch.autograd.DeviceType.CPU)
    ops = gpu_ops(prof)
    if not ops:  # --tiny on the CPU: the aten ops stand in for GPU ops
        ops = sorted((ev.time_range.start, ev.time_range.end, ev.name) for ev in events
                     if ev.name.startswith("aten::") and ev.cpu_parent is None)
    cpu = [ev for ev in events if ev.device_type == torch.autograd.DeviceType.CPU and ev.name != "model_call"]
    # A step runs from one model call's host start to the next one's (the last: to the last GPU op).
    rows, idle_by_host = [], collections.Counter()
    for i, (c0, c1) in enumerate(calls):
        s_end = calls[i + 1][0] if i + 1 < len(calls) else max(e for _, e, _ in ops)
        in_step = [(s, e, n) for s, e, n in ops if c0 <= s < s_end]
        if not in_step:
            continue
        busy = sum(e - s for s, e, _ in in_step)
        # idle from the host's call on (the guards and the runner run before the first GPU op of
        # the step), counting any earlier op still running then as busy
        gaps = _idle(ops, c0, s_end)
        for g0, g1 in gaps:
            for ev in cpu:
                lo, hi = max(g0, ev.time_range.start), min(g1, ev.time_range.end)
                if hi > lo:
                    idle_by_host[ev.name[:90]] += hi - lo
        blocks = _busy_blocks(in_step, in_step[0][0], s_end)
        rows.append({"step": i, "wall_ms": (s_end - c0) / 1e3, "gpu_busy_ms": busy / 1e3,  # overlapping ops count twice
                     "longest_busy_block_ms": max(blocks) / 1e3,
                     "gpu_idle_ms": sum(g1 - g0 for g0, g1 in gaps) / 1e3,
                     "call_host_ms": (c1 - c0) / 1e3, "gpu_ops": len(in_step)})
    steady = rows[1:-1] if len(rows) > 3 else rows
    med = {k: round(statistics.median(r[k] for r in steady), 3)
           for k in ("wall_ms", "gpu_busy_ms", "longest_busy_block_ms", "gpu_idle_ms", "call_host_ms")}
    if call_ms:
        med["no_profiler_call_gpu_ms"] = round(statistics.median(call_ms[1:-1] or call_ms), 3)
        med["no_profiler_step_gpu_ms"] = round(statistics.median(step_ms[1:-1] or step_ms), 3)
    print(f"== {args.model} {args.mode} {w}x{h}, {len(rows)} steps profiled; median of the middle steps: {med}")
    for r in rows:
        print("  " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items()))
    n = max(len(steady), 1)
    print(f"-- host functions running while the GPU was idle (ms per step, over {len(rows)} steps; nested "
          f"events overlap, so the rows do not add up)")
    top = idle_by_host.most_common(args.top)
    for name, us in top:
        print(f"  {us / 1e3 / len(rows):8.3f}  {name}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"model": args.model, "mode": args.mode, "size": f"{w}x{h}",
                       "gpu": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                       "median": med, "steps": rows, "n_middle": n,
                       "idle_host_ms_per_step": {k: v / 1e3 / len(rows) for k, v in top}}, f, indent=1)


if __name__ == "__main__":
    main()
