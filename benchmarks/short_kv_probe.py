"""Time lyra's short-KV attention (csrc/attention_short_kv.cu, 16-bit output) against cuDNN, at
the cross-attention shapes of SD1.5 and SDXL (batch 2 = CFG, 77 text tokens), k / v read out of
one wider buffer as the grouped k / v projection leaves them. Each variant is captured 50 times
in one CUDA graph (as the models run it); the median of 7 replays per call is reported, in us:

    sdpa        lyra::attention with short_kv_attention = off (cuDNN via torch SDPA)
    short_kv    the kernel itself (ops.attention_short_kv.run), whatever the rule says
    auto        the path short_kv_attention = auto takes for the shape (the rule in ops/attention.py)

    python benchmarks/short_kv_probe.py --out short_kv.json [--dtype bf16] [--keys 120]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import lyradynamo  # noqa: F401, E402  (registers lyra::)
from kernels_bench import time_us  # noqa: E402
from lyradynamo.ops import attention_short_kv as skv  # noqa: E402
from lyradynamo.ops._common import csrc  # noqa: E402

SHAPES = {  # name: (B, Lq, Lk, H, D)
    "sdxl-l1": (2, 4096, 77, 10, 64), "sdxl-l2": (2, 1024, 77, 20, 64),
    "sd15-l1": (2, 4096, 77, 8, 40), "sd15-l2": (2, 1024, 77, 8, 80), "sd15-l3": (2, 256, 77, 8, 160),
    "sd15-mid": (2, 64, 77, 8, 160),
}


def _inputs(b, lq, lk, h, d, dtype):
    q = torch.randn(b, lq, h, d, device="cuda", dtype=dtype)
    kv = torch.randn(b, lk, 2, h * d, device="cuda", dtype=dtype)
    return q, kv[:, :, 0].unflatten(-1, (h, d)), kv[:, :, 1].unflatten(-1, (h, d))


def _time_us(fn) -> float:
    """Median us per call: 50 calls captured in one CUDA graph, 7 replays (kernels_bench.time_us)."""
    return time_us(fn, warmup=1, iters=7, graph_reps=50)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None)
    p.add_argument("--dtype", default="fp16", choices=("fp16", "bf16"))
    p.add_argument("--keys", type=int, default=None, help="key count for every shape (default: 77)")
    args = p.parse_args()
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    lyra = torch.ops.lyra
    C = csrc()
    rows = []
    for name, (b, lq, lk, h, d) in SHAPES.items():
        lk = args.keys or lk
        q, k, v = _inputs(b, lq, lk, h, d, dtype)
        why = skv.unsupported(q, k, v, C=C)
        if why:
            raise SystemExit(f"{name}: the kernel cannot run: {why}")

        def sdpa():
            with lyradynamo.config.patch(short_kv_attention="off"):
                return lyra.attention(q, k, v, None, None, False, "blhd")

        row = {"shape": name, "B": b, "Lq": lq, "Lk": lk, "H": h, "D": d, "dtype": args.dtype,
               "sdpa": round(_time_us(sdpa), 2), "short_kv": round(_time_us(lambda: skv.run(C, q, k, v, None)), 2),
               "auto": "short_kv" if skv.prefer("auto", b, lq, h) else "sdpa",
               "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
               "date": datetime.date.today().isoformat()}
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
