#!/usr/bin/env python3
"""Where a model call spends its GPU time: top CUDA kernels under torch.profiler.

    python benchmarks/profile_model.py --model sd15 --modes eager,lyra [--size 512x512] [--out f.json]
    python benchmarks/profile_model.py --model sdxl --modes lyra-fp8,lyra-fp8@fp8_attention=on

A lyra mode may carry lyradynamo.config options after "@" (KEY=VALUE, "@"-separated), set for
that mode only.

Builds the full-size model (random weights, the real config), runs one denoiser call per mode
(lyra without CUDA graphs so each kernel is visible; kernel times are the same) after a
warm-up, and prints the kernels by total time, grouped by name. The JSON keeps the table.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import torch  # noqa: E402

import lyradynamo  # noqa: E402
from lyradynamo import zoo  # noqa: E402
from bench import parse_lyra_config  # noqa: E402  (benchmarks/ is this script's folder)


def kernel_table(prof, top: int):
    totals = collections.defaultdict(lambda: [0.0, 0])
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            t = totals[ev.name[:110]]
            t[0] += ev.device_time_total if hasattr(ev, "device_time_total") else ev.cuda_time_total
            t[1] += 1
    total = sum(v[0] for v in totals.values())
    rows = sorted(totals.items(), key=lambda kv: -kv[1][0])[:top]
    return total, [{"kernel": k, "ms": v[0] / 1e3, "calls": v[1], "pct": 100 * v[0] / max(total, 1e-9)}
                   for k, v in rows]


def op_table(prof, top: int) -> str:
    """aten ops (not lyra:: ones) grouped by name and input shapes, by CUDA time."""
    avg = prof.key_averages(group_by_input_shape=True)
    rows = [e for e in avg if e.key.startswith("aten::") and getattr(e, "device_time_total", 0) > 0]
    rows.sort(key=lambda e: -e.device_time_total)
    return "\n".join(f"{e.device_time_total / 1e3:8.3f} ms {e.count:5d}  {e.key:28} {str(e.input_shapes)[:150]}"
                     for e in rows[:top])


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--modes", default="lyra")
    p.add_argument("--size", default=None)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--out", default=None)
    p.add_argument("--ops", type=int, default=0, help="also list the top N aten ops (with shapes)")
    args = p.parse_args(argv)
    dtype = zoo.default_dtype(args.model, "cuda")
    model = zoo.build_denoiser(args.model, tiny=False, dtype=dtype, device="cuda")
    if args.size:
        w, h = (int(v) for v in args.size.split("x"))
    else:
        h, w = zoo.default_size(args.model, tiny=False)
    batch = args.batch or (2 if args.model.startswith("sd") and args.model != "sd3" else 1)
    inputs = zoo.denoiser_inputs(args.model, model, batch=batch, height=h, width=w, dtype=dtype, device="cuda")
    result = {"model": args.model, "size": f"{w}x{h}", "batch": batch, "gpu": torch.cuda.get_device_name(),
              "modes": {}}
    for mode in args.modes.split(","):
        torch._dynamo.reset()
        mode, *options = mode.split("@")
        label = "@".join([mode, *options])
        saved = lyradynamo.config.snapshot()
        for k, v in parse_lyra_config(options).items():
            setattr(lyradynamo.config, k, v)
        if mode == "eager":
            fn = model
        elif mode.startswith("lyra"):
            # lyra, lyra-fp8, lyra-int8
            lyradynamo.config.cuda_graphs = False
            lyradynamo.config.quant = mode.split("-")[1] if "-" in mode else "none"
            fn = torch.compile(model, backend="lyra")
        else:
            fn = torch.compile(model, mode=None if mode == "inductor" else mode)
        with torch.no_grad():
            for _ in range(2):
                fn(**inputs)
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(**inputs)
            end.record()
            torch.cuda.synchronize()
            wall = start.elapsed_time(end)
            acts = [torch.profiler.ProfilerActivity.CUDA]
            if args.ops:
                acts.append(torch.profiler.ProfilerActivity.CPU)
            with torch.profiler.profile(activities=acts, record_shapes=args.ops > 0) as prof:
                fn(**inputs)
                torch.cuda.synchronize()
        total, rows = kernel_table(prof, args.top)
        result["modes"][label] = {"call_ms": wall, "kernel_ms": total / 1e3, "top": rows,
                                 "fallbacks": {f"{k[0]}: {k[1]}": v for k, v in
                                               lyradynamo.ops.fallback_counts().items()}}
        print(f"\n== {args.model} {w}x{h} batch {batch} {label}: call {wall:.2f} ms, kernels {total / 1e3:.2f} ms")
        for r in rows:
            print(f"{r['ms']:8.3f} ms {r['pct']:5.1f}% {r['calls']:5d}  {r['kernel']}")
        if args.ops:
            print(f"-- top {args.ops} aten ops by CUDA time, with input shapes")
            print(op_table(prof, args.ops))
        if result["modes"][label]["fallbacks"]:
            print("fallbacks:", result["modes"][label]["fallbacks"])
        for k, v in saved.items():
            setattr(lyradynamo.config, k, v)
        if mode.startswith("lyra-"):
            from lyradynamo import quant
            quant.restore(model)
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
