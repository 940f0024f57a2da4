#!/usr/bin/env python3
"""The VAE decoder alone: time and top CUDA kernels of one decode per mode.

    python benchmarks/vae_probe.py --model sdxl --size 1024x1024 \\
        --modes eager,lyra,lyra-nchw,inductor [--out f.json]

Builds the model's full-size AutoencoderKL (random weights) in the dtype the pipeline decodes
in (SDXL: fp32, force_upcast), decodes one latent per mode: first call, then the median of
--runs timed decodes (CUDA events; lyra with its CUDA graphs), then one decode under
torch.profiler (lyra compiled again without CUDA graphs so that each kernel shows; inductor
without CUDA graphs), kernels grouped by name. Modes: eager, lyra, lyra-nchw (lyra with
config.channels_last off), lyra-attn-sdpa / lyra-attn-tf32 (lyra with config.fp32_attention
sdpa / tf32 instead of its default tf32x3), inductor, inductor-cg.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
for _p in (os.path.dirname(HERE), HERE):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import torch  # noqa: E402

import bench  # noqa: E402
import denoise  # noqa: E402
import lyradynamo  # noqa: E402
from profile_model import kernel_table  # noqa: E402

MODES = ("eager", "lyra", "lyra-nchw", "lyra-attn-sdpa", "lyra-attn-tf32", "inductor", "inductor-cg")


def decoder(mode: str, vae, *, graphs: bool = True):
    """(decode function, lyradynamo.config options in force while it compiles and runs): the
    bench's --compile-vae decoder of the mode (bench.make_decoder), with this probe's options
    (CUDA graphs off for the profile, lyra-nchw)."""
    opts = {}
    if mode.startswith("lyra"):
        opts = {"cuda_graphs": graphs}
        if mode == "lyra-nchw":
            opts["channels_last"] = False
        if mode.startswith("lyra-attn-"):
            opts["fp32_attention"] = mode[len("lyra-attn-"):]
        mode = "lyra"
    elif mode == "inductor-cg" and not graphs:
        mode = "inductor"
    return bench.make_decoder(mode, vae) or vae.decode, opts


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="sdxl")
    p.add_argument("--size", default="1024x1024")
    p.add_argument("--modes", default="eager,lyra,lyra-nchw,inductor")
    p.add_argument("--runs", type=int, default=7)
    p.add_argument("--top", type=int, default=20)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    dtype = {"flux": torch.bfloat16}.get(args.model, torch.float16)
    vae = denoise.build_vae(args.model, tiny=False, dtype=dtype, device="cuda")
    vdt = next(vae.parameters()).dtype
    w, h = (int(v) for v in args.size.split("x"))
    f = 2 ** (len(vae.config.block_out_channels) - 1)
    g = torch.Generator(device="cuda").manual_seed(0)
    z = torch.randn(1, vae.config.latent_channels, h // f, w // f, device="cuda", generator=g).to(vdt)
    result = {"model": args.model, "size": args.size, "dtype": str(vdt), "gpu": torch.cuda.get_device_name(),
              "modes": {}}
    ref = None
    for mode in args.modes.split(","):
        if mode not in MODES:
            raise SystemExit(f"unknown mode {mode!r}; known: {MODES}")
        torch._dynamo.reset()
        row = {}
        with torch.no_grad():
            fn, opts = decoder(mode, vae)
            with lyradynamo.config.patch(**opts):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                out = fn(z, return_dict=False)[0]
                torch.cuda.synchronize()
                row["first_call_s"] = round(time.perf_counter() - t0, 3)
                for _ in range(2):
                    fn(z, return_dict=False)
                times = []
                for _ in range(args.runs):
                    ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
                    ev[0].record()
                    out = fn(z, return_dict=False)[0]
                    ev[1].record()
                    ev[1].synchronize()
                    times.append(ev[0].elapsed_time(ev[1]))
                out = out.float().clone()
            row["ms"] = round(statistics.median(times), 3)
            row["samples_ms"] = [round(t, 3) for t in times]
            if ref is None:
                ref = out
            row["rel_err_vs_first_mode"] = float((out - ref).norm() / ref.norm())
            torch._dynamo.reset()
            fn, opts = decoder(mode, vae, graphs=False)
            with lyradynamo.config.patch(**opts):
                for _ in range(2):
                    fn(z, return_dict=False)
                torch.cuda.synchronize()
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                    fn(z, return_dict=False)
                    torch.cuda.synchronize()
        total, rows = kernel_table(prof, args.top)
        row["kernel_ms"] = round(total / 1e3, 3)
        row["top"] = rows
        result["modes"][mode] = row
        print(f"\n== {args.model} VAE decode {args.size} {vdt} {mode}: {row['ms']:.2f} ms (median of "
              f"{args.runs}), first call {row['first_call_s']:.1f} s, kernels {row['kernel_ms']:.2f} ms, "
              f"rel_err vs {args.modes.split(',')[0]} {row['rel_err_vs_first_mode']:.2e}", flush=True)
        for r in rows:
            print(f"{r['ms']:8.3f} ms {r['pct']:5.1f}% {r['calls']:5d}  {r['kernel']}")
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
