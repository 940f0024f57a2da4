#!/usr/bin/env python3
"""A full-size DiT outside the zoo under lyra, one transformer call (GPU only): Wan 2.1 T2V 1.3B
or Qwen-Image (20B).

    python benchmarks/dit_probe.py [--model wan|qwenimage] [--frames 33] [--height 480] [--width 832]
                                   [--text-len 256] [--calls 5] [--keep-fp32] [--no-ref] [--quant fp8]
                                   [--lyra-config KEY=VALUE ...] [--more-sizes HxW[:L],...] [--out f.json]

Random weights from the model's published config (no hub), built on the GPU; tensors the model
keeps as plain attributes (Qwen-Image's RoPE tables) then go to the CPU, where from_pretrained
leaves them, so lyra meets the host copies a real pipeline has. One call as the
model's pipeline makes it (batch 1: Wan and Qwen-Image run the conditional and unconditional
calls separately; Qwen-Image's pipeline drops an all-ones text mask, so no mask), in bf16. Reports
eager's and lyra's median call (CUDA events, after warm-up calls), lyra's first call (trace +
rewrite + capture), and each output's relative error against an fp32 eager reference (the 2x
rule of the zoo models; --no-ref skips it). No pass knows these models: whatever lyra gains here
comes from pattern matching alone. (Sessions 34-35 ran this as benchmarks/wan_probe.py.)
--keep-fp32 leaves the modules of the model's `_keep_in_fp32_modules` (RoPE
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
from lyradynamo.zoo.pipelines import _diffusers_model, keep_in_fp32, plain_tensors_on_cpu  # noqa: E402

# Wan-AI/Wan2.1-T2V-1.3B-Diffusers, transformer/config.json
WAN_1_3B = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
                out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
# Qwen/Qwen-Image, transformer/config.json
QWEN_IMAGE = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
                  num_attention_heads=24, joint_attention_dim=3584, guidance_embeds=False, axes_dims_rope=(16, 56, 56))


def _wan_inputs(args, g, dtype) -> dict:
    latent_frames = (args.frames - 1) // 4 + 1  # Wan's VAE: 4x in time, 8x in space
    return dict(hidden_states=torch.randn(1, 16, latent_frames, args.height // 8, args.width // 8, generator=g),
                timestep=torch.tensor([500.0]), encoder_hidden_states=torch.randn(1, 512, 4096, generator=g))


def _qwenimage_inputs(args, g, dtype) -> dict:
    h, w = args.height // 16, args.width // 16  # VAE 8x, then 2x2 patches of 16 channels
    return dict(hidden_states=torch.randn(1, h * w, 64, generator=g), timestep=torch.tensor([0.5]),
                encoder_hidden_states=torch.randn(1, args.text_len, 3584, generator=g), img_shapes=[(1, h, w)])


MODELS = {"wan": ("WanTransformer3DModel", WAN_1_3B, _wan_inputs, "wan2.1-t2v-1.3b"),
          "qwenimage": ("QwenImageTransformer2DModel", QWEN_IMAGE, _qwenimage_inputs, "qwen-image-20b")}


def _inputs(args, dtype) -> dict:
    g = torch.Generator().manual_seed(0)
    raw = MODELS[args.model][2](args, g, dtype)
    out = {k: (v.to("cuda", dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() and k != "timestep"
               else v.to("cuda") if isinstance(v, torch.Tensor) else v) for k, v in raw.items()}
    return out | {"return_dict": False}


def _another_size(args, spec: str, model, compiled) -> dict:
    """One more size ("HxW" or "HxW:L"): lyra's first call there (a new capture, no compilation
    expected), its median call and eager's."""
    size, _, length = spec.partition(":")
    args = argparse.Namespace(**vars(args))
    args.height, args.width = (int(v) for v in size.split("x"))
    if length:
        args.text_len = int(length)
    inputs = _inputs(args, torch.bfloat16)
    torch.cuda.synchronize()
    t = time.perf_counter()
    compiled(**inputs)
    torch.cuda.synchronize()
    first = time.perf_counter() - t
    lyra_ms = _median_ms(lambda: compiled(**inputs), args.calls)
    eager_ms = _median_ms(lambda: model(**inputs), args.calls)
    return {"size": spec, "lyra_first_call_s": first, "lyra_ms": lyra_ms, "eager_ms": eager_ms,
            "speedup": eager_ms / lyra_ms, "first_call_vs_call": first * 1e3 / lyra_ms,
            "compilations": lyradynamo.compile_count()}


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


def _counts(d: dict) -> dict:
    """d with every list replaced by its length (the quant report lists layer names)."""
    return {k: len(v) if isinstance(v, (list, tuple)) else _counts(v) if isinstance(v, dict) else v
            for k, v in d.items()}


def _err(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="wan", choices=sorted(MODELS))
    p.add_argument("--text-len", type=int, default=256, help="qwenimage: text tokens")
    p.add_argument("--no-ref", action="store_true", help="skip the fp32 reference (its memory, its time)")
    p.add_argument("--quant", default="none", choices=("none", "fp8", "int8"), help="lyradynamo.config.quant")
    p.add_argument("--lyra-config", action="append", default=[], metavar="KEY=VALUE",
                   help="more lyradynamo.config options for the compiled call (repeatable)")
    p.add_argument("--frames", type=int, default=33)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--calls", type=int, default=5)
    p.add_argument("--keep-fp32", action="store_true")
    p.add_argument("--more-sizes", default="", metavar="HxW[:L],...",
                   help="after the timed size, call lyra at these sizes (qwenimage: L = text tokens): each "
                        "one's first call, median call, eager's median, and the compilations so far")
    p.add_argument("--out", default="")
    args = p.parse_args()
    cls_name, config, _, name = MODELS[args.model]
    row = {"model": name, "card": torch.cuda.get_device_name(), "frames": args.frames,
           "height": args.height, "width": args.width, "dtype": "bf16", "keep_fp32": args.keep_fp32,
           "torch": torch.__version__, "quant": args.quant}
    options = lyradynamo.config.parse(args.lyra_config)
    if options:
        row["lyra_config"] = {k: str(v) for k, v in options.items()}
    if args.model == "qwenimage":
        del row["frames"]
        row["text_len"] = args.text_len
    out32 = None
    with torch.no_grad():
        if not args.no_ref:
            ref = _diffusers_model(cls_name, config, torch.float32, "cuda", 0)
            out32 = ref(**_inputs(args, torch.float32))[0]
            del ref
            torch.cuda.empty_cache()
        model = plain_tensors_on_cpu(_diffusers_model(cls_name, config, torch.bfloat16, "cuda", 0))
        if args.keep_fp32:
            keep_in_fp32(model)
        inputs = _inputs(args, torch.bfloat16)
        hs = inputs["hidden_states"]
        row["tokens"] = hs[0, 0].numel() // 4 if args.model == "wan" else hs.shape[1]
        eager_out = model(**inputs)[0]
        row["eager_ms"] = _median_ms(lambda: model(**inputs), args.calls)
        row["eager_err_vs_fp32"] = _err(eager_out, out32) if out32 is not None else None
        compiled = torch.compile(model, backend="lyra")
        _common.reset_fallback_counts()
        lyradynamo.config.quant = args.quant  # read by the backend at compile time
        for k, v in options.items():
            setattr(lyradynamo.config, k, v)
        t = time.perf_counter()
        lyra_out = compiled(**inputs)[0]
        torch.cuda.synchronize()
        row["lyra_first_call_s"] = time.perf_counter() - t
        row["lyra_ms"] = _median_ms(lambda: compiled(**inputs), args.calls)
        row["lyra_err_vs_fp32"] = _err(lyra_out, out32) if out32 is not None else None
        row["lyra_vs_eager_err"] = _err(lyra_out, eager_out)
        row["speedup"] = row["eager_ms"] / row["lyra_ms"]
        row["compilations"] = lyradynamo.compile_count()
        graphs = lyradynamo.compiled_graphs()
        row["graphs"] = len(graphs)
        summary = max(graphs, key=lambda r: r.summary["nodes"]).summary  # the blocks' graph
        row["coverage"] = {k: f"{c['before'] - c['left']}/{c['before']}" for k, c in summary["coverage"].items()}
        row["cuda_graphs_off"] = summary.get("cuda_graphs_off")
        row["matched"] = summary["matched"]
        if args.quant != "none":
            row["quant_report"] = _counts(summary.get("quant") or {})
        row["fallbacks"] = {f"{op}: {why}": n for (op, why), n in _common.fallback_counts().items()}
        row["host_prefix"] = [r.summary.get("host_prefix") for r in graphs]
        row["more_sizes"] = [_another_size(args, spec, model, compiled) for spec in args.more_sizes.split(",") if spec]
    print(json.dumps(row))
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
