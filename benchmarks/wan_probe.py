#!/usr/bin/env python3
"""A full-size model outside the zoo under lyra: Wan 2.1 T2V 1.3B, one transformer call (GPU only).

    python benchmarks/wan_probe.py [--frames 33] [--height 480] [--width 832] [--calls 5] [--keep-fp32]
                                   [--out f.json]

Random weights from the model's published config (no hub). One call as the Wan pipeline makes
it (batch 1: it runs the conditional and unconditional calls separately), in bf16. Reports
eager's and lyra's median call (CUDA events, after warm-up calls), lyra's first call (trace +
rewrite + capture), and each output's relative error against an fp32 eager reference (the 2x
rule of the zoo models). No pass knows Wan: whatever lyra gains here comes from pattern
matching alone. --keep-fp32 leaves the modules of the model's `_keep_in_fp32_modules` (RoPE
tables, modulation tables, norms) in float32, as `from_pretrained(torch_dtype=torch.bfloat16)`
does; the row also lists lyra's matches and any op that ran its PyTorch reference.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import lyradynamo  # noqa: E402
from lyradynamo.ops import _common  # noqa: E402
from lyradynamo.zoo.pipelines import _diffusers_model, keep_in_fp32  # noqa: E402

# Wan-AI/Wan2.1-T2V-1.3B-Diffusers, transformer/config.json
WAN_1_3B = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
                out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)


def _inputs(frames: int, height: int, width: int, dtype) -> dict:
    g = torch.Generator().manual_seed(0)
    latent_frames = (frames - 1) // 4 + 1  # Wan's VAE: 4x in time, 8x in space
    return dict(hidden_states=torch.randn(1, 16, latent_frames, height // 8, width // 8, generator=g).to("cuda", dtype),
                timestep=torch.tensor([500.0], device="cuda"),
                encoder_hidden_states=torch.randn(1, 512, 4096, generator=g).to("cuda", dtype),
                return_dict=False)


def _median_ms(fn, calls: int, warm: int = 2) -> float:
    for _ in range(warm):
        fn()
    times = []
    for _ in range(calls):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _err(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--frames", type=int, default=33)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--calls", type=int, default=5)
    p.add_argument("--keep-fp32", action="store_true")
    p.add_argument("--out", default="")
    args = p.parse_args()
    row = {"model": "wan2.1-t2v-1.3b", "card": torch.cuda.get_device_name(), "frames": args.frames,
           "height": args.height, "width": args.width, "dtype": "bf16", "keep_fp32": args.keep_fp32,
           "torch": torch.__version__}
    with torch.no_grad():
        ref = _diffusers_model("WanTransformer3DModel", WAN_1_3B, torch.float32, "cuda", 0)
        out32 = ref(**_inputs(args.frames, args.height, args.width, torch.float32))[0]
        del ref
        torch.cuda.empty_cache()
        model = _diffusers_model("WanTransformer3DModel", WAN_1_3B, torch.bfloat16, "cuda", 0)
        if args.keep_fp32:
            keep_in_fp32(model)
        inputs = _inputs(args.frames, args.height, args.width, torch.bfloat16)
        row["tokens"] = inputs["hidden_states"][0, 0].numel() // 4
        eager_out = model(**inputs)[0]
        row["eager_ms"] = _median_ms(lambda: model(**inputs), args.calls)
        row["eager_err_vs_fp32"] = _err(eager_out, out32)
        compiled = torch.compile(model, backend="lyra")
        _common.reset_fallback_counts()
        t = time.perf_counter()
        lyra_out = compiled(**inputs)[0]
        torch.cuda.synchronize()
        row["lyra_first_call_s"] = time.perf_counter() - t
        row["lyra_ms"] = _median_ms(lambda: compiled(**inputs), args.calls)
        row["lyra_err_vs_fp32"] = _err(lyra_out, out32)
        row["speedup"] = row["eager_ms"] / row["lyra_ms"]
        row["compilations"] = lyradynamo.compile_count()
        summary = lyradynamo.compiled_graphs()[0].summary
        row["coverage"] = {k: f"{c['before'] - c['left']}/{c['before']}" for k, c in summary["coverage"].items()}
        row["cuda_graphs_off"] = summary.get("cuda_graphs_off")
        row["matched"] = summary["matched"]
        row["fallbacks"] = {f"{op}: {why}": n for (op, why), n in _common.fallback_counts().items()}
    print(json.dumps(row))
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
