#!/usr/bin/env python3
"""Where a CUDA-graph replay of a compiled model call leaves the GPU idle (GPU only).

    python benchmarks/profile_gaps.py --model flux --mode lyra [--calls 2] [--top 15] [--out f.json]
                                      [--lyra-config KEY=VALUE ...]

Compiles the full-size model (random weights) with lyra, replays a few calls, then profiles
`--calls` more with torch.profiler (CUDA activity: kernels, memsets and copies inside the graph
replays). Per call it reports the wall time from the first GPU op's start to the last one's end,
the sum of the GPU ops' durations, and the idle time between consecutive ops, largest gaps first,
grouped by the (previous op -> next op) pair of names.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import lyradynamo  # noqa: E402
from lyradynamo import zoo  # noqa: E402

QUANT = {"lyra": "none", "lyra-fp8": "fp8", "lyra-int8": "int8"}


def gpu_ops(prof) -> list:
    """(start_us, end_us, name) of every CUDA-side event, by start time."""
    ops = []
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA and ev.time_range.elapsed_us() > 0:
            ops.append((ev.time_range.start, ev.time_range.end, ev.name[:70]))
    return sorted(ops)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="flux")
    p.add_argument("--mode", default="lyra", choices=sorted(QUANT))
    p.add_argument("--calls", type=int, default=2)
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--out", default=None)
    p.add_argument("--lyra-config", action="append", default=[], metavar="KEY=VALUE",
                   help="a lyradynamo.config option (repeatable), as bench.py's")
    args = p.parse_args()
    from bench import parse_lyra_config

    options = parse_lyra_config(args.lyra_config)
    dtype = zoo.default_dtype(args.model, "cuda")
    model = zoo.build_denoiser(args.model, tiny=False, dtype=dtype, device="cuda")
    inputs = zoo.denoiser_inputs(args.model, model, batch=2 if args.model in ("sd15", "sdxl") else 1)
    with torch.no_grad(), lyradynamo.config.patch(quant=QUANT[args.mode], **options):
        compiled = torch.compile(model, backend="lyra")
        for _ in range(3):
            compiled(**inputs)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(args.calls):
                compiled(**inputs)
            torch.cuda.synchronize()
    ops = gpu_ops(prof)
    busy = sum(e - s for s, e, _ in ops)
    wall = ops[-1][1] - ops[0][0] if ops else 0.0
    gaps = collections.defaultdict(lambda: [0.0, 0])
    for (s0, e0, n0), (s1, _, n1) in zip(ops, ops[1:]):
        g = s1 - max(e0, s0)
        if g > 0:
            gaps[(n0, n1)][0] += g
            gaps[(n0, n1)][1] += 1
    idle = sum(v[0] for v in gaps.values())
    rows = sorted(gaps.items(), key=lambda kv: -kv[1][0])[: args.top]
    result = {
        "model": args.model, "mode": args.mode, "lyra_config": options, "gpu": torch.cuda.get_device_name(), "calls": args.calls,
        "ops_per_call": len(ops) / args.calls, "wall_ms_per_call": wall / 1e3 / args.calls,
        "busy_ms_per_call": busy / 1e3 / args.calls, "idle_ms_per_call": idle / 1e3 / args.calls,
        "top_gaps": [{"after": a, "before": b, "ms_per_call": v[0] / 1e3 / args.calls, "count": v[1]}
                     for (a, b), v in rows],
    }
    print(f"== {args.model} {args.mode}: {result['ops_per_call']:.0f} GPU ops/call, wall "
          f"{result['wall_ms_per_call']:.2f} ms, busy {result['busy_ms_per_call']:.2f}, idle "
          f"{result['idle_ms_per_call']:.2f} ms per call")
    for r in result["top_gaps"]:
        print(f"  {r['ms_per_call']:7.3f} ms {r['count']:5d}  {r['after'][:60]} -> {r['before'][:60]}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
