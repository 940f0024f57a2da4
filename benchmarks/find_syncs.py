#!/usr/bin/env python3
"""Find the host-device synchronisations of a denoising loop (GPU only).

    python benchmarks/find_syncs.py --model flux --mode lyra [--steps 4]

Builds the full-size model, its VAE and scheduler as bench.py does, runs the loop once to warm
up (compile, capture), then again under torch.cuda.set_sync_debug_mode("warn"), recording each
synchronising call with its Python stack (the scheduler, the harness, the compiled model's
runner), counted by place.
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import torch  # noqa: E402

import denoise  # noqa: E402
import lyradynamo  # noqa: E402
from lyradynamo import zoo  # noqa: E402

QUANT = {"eager": None, "lyra": "none", "lyra-fp8": "fp8"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="flux")
    p.add_argument("--mode", default="lyra", choices=sorted(QUANT))
    p.add_argument("--steps", type=int, default=4)
    args = p.parse_args()
    dtype = zoo.default_dtype(args.model, "cuda")
    model = zoo.build_denoiser(args.model, tiny=False, dtype=dtype, device="cuda")
    vae = denoise.build_vae(args.model, tiny=False, dtype=dtype, device="cuda")
    scheduler = denoise.build_scheduler(args.model)
    h, w = zoo.default_size(args.model, tiny=False)
    loop = denoise.Workload(args.model, model, vae, scheduler, height=h, width=w, steps=args.steps)
    fn = model
    if QUANT[args.mode] is not None:
        lyradynamo.config.quant = QUANT[args.mode]
        fn = torch.compile(model, backend="lyra")
    with torch.no_grad():
        loop.denoise(fn)
        torch.cuda.synchronize()
        seen: dict = {}

        def record(message, category, filename, lineno, file=None, line=None):
            frames = [f for f in traceback.extract_stack()[:-1] if "warnings" not in f.filename]
            where = " <- ".join(f"{os.path.basename(f.filename)}:{f.lineno} {f.name}" for f in frames[-6:][::-1])
            key = (str(message)[:80], where)
            seen[key] = seen.get(key, 0) + 1

        old = warnings.showwarning
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("always")
                warnings.showwarning = record
                loop.denoise(fn)
                torch.cuda.set_sync_debug_mode("default")
        finally:
            torch.cuda.set_sync_debug_mode("default")
            warnings.showwarning = old
    print(f"== {args.model} {args.mode}: {sum(seen.values())} synchronising calls in one {args.steps}-step loop")
    for (msg, where), n in sorted(seen.items(), key=lambda kv: -kv[1]):
        print(f"  {n:4d} x {msg}\n         at {where}")

if __name__ == "__main__":
    main()
