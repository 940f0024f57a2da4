#!/usr/bin/env python3
"""Where the memsets in lyra's CUDA-graph replays come from, and what they cost (GPU only).

    python benchmarks/memset_probe.py [--dtype bf16] [--out probe.json]

For each GEMM shape of FLUX / SDXL and each cuBLASLt workspace limit (32 MiB, the default,
and 0), captures --reps back-to-back lyra GEMMs (C.gemm, bias, autotune as configured) in one
CUDA graph and reports the GPU time per GEMM (median replay / reps) and, from one profiled
replay, the memsets and kernels per GEMM. torch's own F.linear and cuDNN SDPA (FLUX and SDXL
attention shapes) are profiled the same way for comparison.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from kernels_bench import median_us, replayable  # noqa: E402
from lyradynamo import _C  # noqa: E402

CODE = {torch.float16: 1, torch.bfloat16: 2}
SHAPES = {  # name: (M, N, K)
    "flux img qkv": (4096, 9216, 3072),
    "flux img attn out": (4096, 3072, 3072),
    "flux img ff1": (4096, 12288, 3072),
    "flux img ff2": (4096, 3072, 12288),
    "flux txt qkv": (512, 9216, 3072),
    "flux single in": (4608, 21504, 3072),
    "flux single out": (4608, 3072, 15360),
    "sdxl l1 attn proj": (8192, 640, 640),
    "sdxl l1 geglu half": (8192, 2560, 640),
    "sdxl l2 ff out": (2048, 1280, 5120),
    "sdxl l2 kv cross": (154, 1280, 2048),
}


def measure(fn, reps: int) -> dict:
    """reps calls of fn as one CUDA graph: GPU time per call (median replay / reps) and, from
    one profiled replay, the memsets and kernels per call."""
    run, per = replayable(fn, 2, reps)
    us = median_us(run, per, 20)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    names = collections.Counter()
    ops = []
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA and ev.time_range.elapsed_us() > 0:
            names[ev.name[:80]] += 1
            ops.append((ev.time_range.start, ev.time_range.end))
    ops.sort()
    busy = sum(e - s for s, e in ops)
    wall = ops[-1][1] - ops[0][0] if ops else 0
    memsets = sum(n for k, n in names.items() if "memset" in k.lower())
    return {"us": us, "memsets_per_call": memsets / reps, "ops": dict(names),
            "busy_us_per_call": busy / reps, "wall_us_per_call": wall / reps}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", default="bf16", choices=("fp16", "bf16"))
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--autotune", type=int, default=8)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    dev = "cuda"
    _C.set_gemm_autotune(args.autotune)
    rows = []
    for name, (m, n, k) in SHAPES.items():
        x = torch.randn(m, k, device=dev, dtype=dtype)
        w = torch.randn(n, k, device=dev, dtype=dtype) / k ** 0.5
        bias = torch.randn(n, device=dev, dtype=dtype)
        outs = [torch.empty(m, n, device=dev, dtype=dtype) for _ in range(2)]
        ref = F.linear(x, w, bias)
        for ws in (32 << 20, 0):
            _C.set_gemm_workspace(ws)
            i = [0]

            def lyra_gemm():
                o = outs[i[0] % 2]
                i[0] += 1
                _C.gemm(x.data_ptr(), w.data_ptr(), bias.data_ptr(), o.data_ptr(), m, n, k, k, n,
                        CODE[dtype], torch.cuda.current_stream().cuda_stream)

            lyra_gemm()  # plan (+ autotune) outside capture
            torch.cuda.synchronize()
            err = ((outs[0].float() - ref.float()).norm() / ref.float().norm()).item()
            rows.append({"shape": name, "MNK": [m, n, k], "impl": f"lyra ws={ws >> 20}MiB", "rel_err": err,
                         **measure(lyra_gemm, args.reps)})
        _C.set_gemm_workspace(32 << 20)
        rows.append({"shape": name, "MNK": [m, n, k], "impl": "torch F.linear",
                     **measure(lambda: F.linear(x, w, bias), args.reps)})
        del x, w, bias, outs
    for name, (b, h, l, d) in {"flux sdpa": (1, 24, 4608, 128), "sdxl l1 sdpa": (2, 10, 4096, 64)}.items():
        q, kk, v = (torch.randn(b, h, l, d, device=dev, dtype=dtype) for _ in range(3))
        for backend in ("CUDNN_ATTENTION", "FLASH_ATTENTION"):
            be = getattr(torch.nn.attention.SDPBackend, backend)
            with torch.nn.attention.sdpa_kernel([be]):
                rows.append({"shape": name, "impl": f"sdpa {backend}",
                             **measure(lambda: F.scaled_dot_product_attention(q, kk, v), args.reps)})
    for r in rows:
        top = sorted(r["ops"].items(), key=lambda kv: -kv[1])[:3]
        print(f"{r['shape']:20s} {r['impl']:22s} {r['us']:8.1f} us  memsets/call {r['memsets_per_call']:.1f}  "
              f"busy {r['busy_us_per_call']:.1f} wall {r['wall_us_per_call']:.1f}  "
              f"err {r.get('rel_err', float('nan')):.1e}  {top}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(), "dtype": args.dtype, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
