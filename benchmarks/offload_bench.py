#!/usr/bin/env python3
"""How fast can quantisation move high-precision masters off the GPU? (GPU only)

    python benchmarks/offload_bench.py [--gb 3] [--out FILE.json]

Copies --gb of bf16 FLUX-sized weights (3072 x 12288) to the host three ways, each into fresh
memory, and reports GB/s: `pinned_per_weight` (torch.empty(pin_memory=True) + copy_, what
quant.weights.offload_master did in sessions 2-3), `pageable_copy` (torch.empty + copy_, the
driver stages), `staged` (lyradynamo.quant.host_copy.to_host, what it does now).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from lyradynamo.quant import host_copy  # noqa: E402


def pinned_per_weight(w):
    h = torch.empty(w.shape, dtype=w.dtype, pin_memory=True)
    h.copy_(w)
    return h


def pageable_copy(w):
    h = torch.empty(w.shape, dtype=w.dtype)
    h.copy_(w)
    return h


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gb", type=float, default=3.0)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    shape = (3072, 12288)
    n = max(1, int(args.gb * 2**30 / (shape[0] * shape[1] * 2)))
    weights = [torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in range(n)]
    gb = n * weights[0].numel() * 2 / 1e9
    res = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "weights": n,
           "shape": list(shape), "gb": round(gb, 3), "threads": torch.get_num_threads()}
    for name, fn in (("pinned_per_weight", pinned_per_weight), ("pageable_copy", pageable_copy),
                     ("staged", host_copy.to_host)):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        hosts = [fn(w) for w in weights]
        torch.cuda.synchronize()
        s = time.perf_counter() - t0
        ok = all(torch.equal(h[:4, :4], w[:4, :4].cpu()) for h, w in zip(hosts[:2], weights[:2]))
        res[name] = {"s": round(s, 3), "gb_per_s": round(gb / s, 2), "exact_spot_check": ok}
        print(f"[offload] {name:18} {s:7.3f}s  {gb / s:6.2f} GB/s  ok={ok}", flush=True)
        del hosts
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
