#!/usr/bin/env python3
"""Swap speed: LoRA and ControlNet hot-swap on a lyra-compiled model, beside diffusers' own paths.

    python benchmarks/bench_swap.py --models sd15,sdxl,flux [--runs 5] [--rank 64] [--out FILE]
    python benchmarks/bench_swap.py --quick          # tiny models on the CPU (smoke test)

Each time is one swap, measured with perf_counter around the call and a device synchronize on both
sides ("until the next image can start"); the median of --runs is reported. Per model:

  lora-swap        (lyra) op=swap: unload_lora(previous) + load_lora(next .safetensors on local disk);
                   op=load: the first load (takes the backups of the touched weights);
                   op=set_loras: switch between two loaded LoRAs; op=unload: unload_lora
  controlnet-swap  (lyra, sd15/sdxl) swap_controlnet(compiled, folder with the other ControlNet's safetensors)
  diffusers-fuse   load_lora_weights(file) + fuse_lora() on the eager model
  diffusers-unload unfuse_lora() + unload_lora_weights()
  diffusers-hotswap enable_lora_hotswap(target_rank) + load_lora_weights(file, hotswap=True) on a compiled
                   model (--hotswap-backend, default lyra; inductor compiles for minutes at full size)

The LoRAs are random rank --rank factors on every attention and feed-forward linear, written to a
temporary directory first. `size` is the image size the model runs at after the swap (one
forward is run after the swaps to check that nothing recompiled). Rows go to a JSONL file like
benchmarks/bench.py's (its environment/row helpers are reused).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import re
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for _p in (ROOT, HERE):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import torch  # noqa: E402

import bench  # noqa: E402  (environment, JsonlWriter, now_iso, err_text, gpu_short)
import lyradynamo  # noqa: E402
from lyradynamo import lora, zoo  # noqa: E402
from lyradynamo.controlnet import swap_controlnet  # noqa: E402

MODES = ("lora-swap", "controlnet-swap", "diffusers-fuse", "diffusers-unload", "diffusers-hotswap")
CONTROLNET_MODELS = ("sd15", "sdxl")
PIPELINE_CLASS = {"sd15": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline", "flux": "FluxPipeline"}
# every attention projection and feed-forward linear (UNet transformer blocks, FLUX double/single blocks)
LORA_TARGETS = re.compile(
    r"(attn\d?\.(to_[qkv]|to_out\.0|add_[qkv]_proj|to_add_out)|ff(_context)?\.net\.(0\.proj|2)|proj_mlp"
    r"|single_transformer_blocks\.\d+\.proj_out)$")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=None, help="comma list of sd15,sdxl,flux (default all; --quick: sd15,flux)")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma list of {','.join(MODES)}")
    p.add_argument("--runs", type=int, default=None, help="timed swaps per row, median reported (default 5; --quick 3)")
    p.add_argument("--rank", type=int, default=None, help="LoRA rank (default 64; --quick 4)")
    p.add_argument("--quick", action="store_true", help="tiny zoo models on the CPU in fp32")
    p.add_argument("--device", default=None, help="cuda or cpu (default cuda when available; --quick: cpu)")
    p.add_argument("--dtype", default=None, help="fp16|bf16|fp32 (default fp16 for SD, bf16 for FLUX; fp32 on CPU)")
    p.add_argument("--hotswap-backend", default="lyra", help="torch.compile backend of the diffusers-hotswap peer")
    p.add_argument("--out", default=None, help="JSONL file rows are appended to "
                   "(default benchmarks/results/swap-<gpu>.jsonl; --quick: quick-swap-<gpu>.jsonl)")
    p.add_argument("--tmp", default=None, help="directory for the generated LoRA / ControlNet files")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.models = [m for m in (args.models or ("sd15,flux" if args.quick else "sd15,sdxl,flux")).split(",") if m]
    for m in args.models:
        if m not in PIPELINE_CLASS:
            raise SystemExit(f"unknown model {m!r}; known: {tuple(PIPELINE_CLASS)}")
    args.modes = [m for m in args.modes.split(",") if m]
    bad = [m for m in args.modes if m not in MODES]
    if bad:
        raise SystemExit(f"unknown mode(s) {bad}; known: {MODES}")
    args.device = args.device or ("cpu" if args.quick or not torch.cuda.is_available() else "cuda")
    args.runs = max(1, args.runs or (3 if args.quick else 5))
    args.rank = args.rank or (4 if args.quick else 64)
    return args


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------


def _sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device, runs, setup=None):
    """(median seconds, samples) of fn(i), synchronized before and after each call."""
    samples = []
    for i in range(runs):
        if setup is not None:
            setup(i)
        _sync(device)
        t0 = time.perf_counter()
        fn(i)
        _sync(device)
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples), samples


def make_lora_file(model, prefix, path, rank, seed):
    """A random diffusers-format LoRA (rank `rank`) on every attention/FF linear of `model`."""
    from safetensors.torch import save_file

    p0 = next(model.parameters())
    g = torch.Generator(p0.device).manual_seed(seed)
    sd, n = {}, 0
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and LORA_TARGETS.search(name):
            o, i = m.weight.shape
            a = torch.randn((rank, i), generator=g, device=p0.device, dtype=torch.float32) / i ** 0.5
            b = torch.randn((o, rank), generator=g, device=p0.device, dtype=torch.float32) * 0.01
            sd[f"{prefix}.{name}.lora_A.weight"] = a.to(p0.dtype).cpu()
            sd[f"{prefix}.{name}.lora_B.weight"] = b.to(p0.dtype).cpu()
            n += 1
    if not n:
        raise RuntimeError(f"no attention/FF linear found in {type(model).__name__}")
    save_file(sd, path)
    return path, n, os.path.getsize(path)


def shell_pipeline(name, denoiser):
    """A diffusers pipeline holding only the denoiser: enough for load_lora_weights / fuse_lora."""
    import diffusers

    cls = getattr(diffusers, PIPELINE_CLASS[name])
    attr = "transformer" if name == "flux" else "unet"
    pipe = cls.__new__(cls)
    diffusers.DiffusionPipeline.__init__(pipe)
    names = [k for k in cls._get_signature_keys(cls)[0]]
    pipe.register_modules(**{k: None for k in names if k != attr}, **{attr: denoiser})
    return pipe


class Rows:
    def __init__(self, args, env, writer):
        self.args, self.env, self.writer = args, env, writer

    def write(self, model, mode, size, dtype, seconds=None, samples=None, error=None, notes=None, **extra):
        w, h = size
        row = {"model": model, "mode": mode, "size": f"{w}x{h}", "seconds": seconds,
               "samples": [round(s, 6) for s in samples] if samples else None, "runs": self.args.runs,
               "dtype": bench.DTYPE_NAMES.get(dtype, str(dtype)), "tiny": bool(self.args.quick),
               "rank": self.args.rank, **extra}
        row.update(self.env)
        row["date"] = bench.now_iso()
        row["error"] = error
        row["notes"] = notes
        self.writer.write(row)
        shown = f"{seconds:.4f}s" if seconds is not None else f"ERROR {error}"
        print(f"[swap] {model:5s} {mode:17s} {extra.get('op', ''):9s} {w}x{h}  {shown}", file=sys.stderr, flush=True)
        return row


# ------------------------------------------------------------------------------------------
# per model
# ------------------------------------------------------------------------------------------


def run_model(args, name, rows, tmp):
    dev = args.device
    dtype = bench.DTYPES[args.dtype] if args.dtype else bench.dtype_for(argparse.Namespace(dtype=None, device=dev), name)
    tiny = bool(args.quick)
    prefix = "transformer" if name == "flux" else "unet"
    model = zoo.build_denoiser(name, tiny=tiny, dtype=dtype, device=dev, seed=args.seed)
    model.requires_grad_(False)
    size = zoo.default_size(name, tiny)
    inputs = zoo.denoiser_inputs(name, model, batch=1 if name == "flux" else 2)
    files = [make_lora_file(model, prefix, os.path.join(tmp, f"{name}-lora{i}.safetensors"), args.rank, args.seed + i)
             for i in range(2)]
    (fa, n_layers, nbytes), (fb, _, _) = files
    lora_note = f"rank {args.rank} on {n_layers} attention/FF linears, {nbytes / 2**20:.0f} MiB file"

    def forward(m):
        with torch.no_grad():
            m(**inputs)
        _sync(dev)

    if "lora-swap" in args.modes:
        lyradynamo.reset_stats()
        compiled = torch.compile(model, backend="lyra")
        forward(compiled)
        c0 = lyradynamo.compile_count()
        t0 = time.perf_counter()
        lora.load_lora(compiled, fa, name="a")
        _sync(dev)
        rows.write(name, "lora-swap", size, dtype, time.perf_counter() - t0, op="load",
                   notes=f"first load_lora from file (takes the backups of the touched weights); {lora_note}")
        current = ["a"]

        def swap(i):
            lora.unload_lora(compiled, current[0])
            nxt = "b" if current[0] == "a" else "a"
            lora.load_lora(compiled, fb if nxt == "b" else fa, name=nxt)
            current[0] = nxt

        med, s = timed(swap, dev, args.runs)
        rows.write(name, "lora-swap", size, dtype, med, s, op="swap",
                   notes=f"unload_lora(previous) + load_lora(next safetensors file); {lora_note}")
        other = "b" if current[0] == "a" else "a"
        lora.load_lora(compiled, fb if other == "b" else fa, scale=0.0, name=other)
        names = ["a", "b"]
        med, s = timed(lambda i: lora.set_loras(compiled, {names[i % 2]: 1.0}), dev, args.runs)
        rows.write(name, "lora-swap", size, dtype, med, s, op="set_loras",
                   notes=f"set_loras switch between two loaded LoRAs; {lora_note}")

        def setup_unload(i):
            if not lora.list_loras(compiled):
                lora.load_lora(compiled, fa, name="a")

        med, s = timed(lambda i: lora.unload_lora(compiled), dev, args.runs, setup=setup_unload)
        forward(compiled)
        new = lyradynamo.compile_count() - c0
        rows.write(name, "lora-swap", size, dtype, med, s, op="unload", compiles_after_swaps=new,
                   notes=f"unload_lora (all); {new} compilations during all lyra swaps; {lora_note}")
        del compiled
        torch._dynamo.reset()

    if name in CONTROLNET_MODELS and "controlnet-swap" in args.modes:
        controlnet_rows(args, name, rows, tmp, dtype, size)

    peers = [m for m in ("diffusers-fuse", "diffusers-unload") if m in args.modes]
    if peers:
        diffusers_fuse_rows(args, name, model, fa, fb, rows, dtype, size, lora_note, peers)
    if "diffusers-hotswap" in args.modes:
        hotswap_row(args, name, model, fa, fb, rows, dtype, size, lora_note, forward)
    del model
    bench.cleanup(dev.startswith("cuda"))


def controlnet_rows(args, name, rows, tmp, dtype, size):
    dev = args.device
    try:
        cn = zoo.build_controlnet(name, tiny=bool(args.quick), dtype=dtype, device=dev, seed=args.seed)
        other = zoo.build_controlnet(name, tiny=bool(args.quick), dtype=dtype, device="cpu", seed=args.seed + 1)
        folder = os.path.join(tmp, f"{name}-controlnet")
        other.save_pretrained(folder)  # diffusion_pytorch_model.safetensors
        mib = sum(p.numel() * p.element_size() for p in other.parameters()) / 2**20
        del other
        kw = zoo.controlnet_inputs(name, cn, batch=2)
        compiled = torch.compile(cn, backend="lyra")
        lyradynamo.reset_stats()
        with torch.no_grad():
            compiled(**kw)
        c0 = lyradynamo.compile_count()
        med, s = timed(lambda i: swap_controlnet(compiled, folder), dev, args.runs)
        with torch.no_grad():
            compiled(**kw)
        new = lyradynamo.compile_count() - c0
        rows.write(name, "controlnet-swap", size, dtype, med, s, op="swap", compiles_after_swaps=new,
                   notes=f"swap_controlnet from a diffusers folder (safetensors, {mib:.0f} MiB) into the compiled "
                         f"ControlNet; {new} compilations after the swaps")
        del compiled, cn
        torch._dynamo.reset()
    except Exception as exc:  # noqa: BLE001
        rows.write(name, "controlnet-swap", size, dtype, error=bench.err_text(exc), op="swap")


def diffusers_fuse_rows(args, name, model, fa, fb, rows, dtype, size, lora_note, modes):
    dev = args.device
    try:
        pipe = shell_pipeline(name, model)
        files = [fa, fb]

        def fuse(i):
            pipe.load_lora_weights(files[i % 2], adapter_name=f"x{i}")
            pipe.fuse_lora()

        def unload(i):
            pipe.unfuse_lora()
            pipe.unload_lora_weights()

        fuse_s, unload_s = [], []
        for i in range(args.runs):
            fuse_s += timed(lambda _: fuse(i), dev, 1)[1]
            unload_s += timed(lambda _: unload(i), dev, 1)[1]
        if "diffusers-fuse" in modes:
            rows.write(name, "diffusers-fuse", size, dtype, statistics.median(fuse_s), fuse_s, op="load",
                       notes=f"pipe.load_lora_weights(file) + fuse_lora() on the eager model "
                             f"(a compiled model recompiles: peft changes the modules); {lora_note}")
        if "diffusers-unload" in modes:
            rows.write(name, "diffusers-unload", size, dtype, statistics.median(unload_s), unload_s, op="unload",
                       notes=f"unfuse_lora() + unload_lora_weights() (restores the base weights); {lora_note}")
    except Exception as exc:  # noqa: BLE001
        for m in modes:
            rows.write(name, m, size, dtype, error=bench.err_text(exc), notes="peer skipped")


def hotswap_row(args, name, model, fa, fb, rows, dtype, size, lora_note, forward):
    dev = args.device
    pipe = None
    try:
        pipe = shell_pipeline(name, model)
        pipe.enable_lora_hotswap(target_rank=args.rank)
        pipe.load_lora_weights(fa, adapter_name="hot")
        attr = "transformer" if name == "flux" else "unet"
        compiled = torch.compile(getattr(pipe, attr), backend=args.hotswap_backend)
        setattr(pipe, attr, compiled)
        lyradynamo.reset_stats()
        torch._dynamo.utils.counters.clear()
        forward(compiled)
        files = [fb, fa]
        med, s = timed(lambda i: pipe.load_lora_weights(files[i % 2], adapter_name="hot", hotswap=True), dev, args.runs)
        forward(compiled)
        rows.write(name, "diffusers-hotswap", size, dtype, med, s, op="swap", hotswap_backend=args.hotswap_backend,
                   notes=f"enable_lora_hotswap(target_rank={args.rank}) + load_lora_weights(file, hotswap=True) on a "
                         f"torch.compile(backend={args.hotswap_backend!r}) model (unfused LoRA layers run every step); "
                         f"{lora_note}")
    except Exception as exc:  # noqa: BLE001
        rows.write(name, "diffusers-hotswap", size, dtype, error=bench.err_text(exc), notes="peer skipped",
                   hotswap_backend=args.hotswap_backend)
    finally:
        torch._dynamo.reset()
        if pipe is not None:
            with contextlib.suppress(Exception):  # leave the shared model without peft layers
                pipe.unload_lora_weights()


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.quick:
        torch.set_num_threads(1)
    env = bench.environment(args.device)
    short = bench.gpu_short(env["gpu"])
    out = args.out or os.path.join(HERE, "results", f"{'quick-' if args.quick else ''}swap-{short}.jsonl")
    writer = bench.JsonlWriter(out)
    rows = Rows(args, env, writer)
    print(f"[swap] models={','.join(args.models)} modes={','.join(args.modes)} runs={args.runs} rank={args.rank} "
          f"device={args.device} ({env['gpu']}) -> {out}", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        for name in args.models:
            try:
                run_model(args, name, rows, tmp)
            except Exception as exc:  # noqa: BLE001 - one model failing keeps the others' rows
                rows.write(name, "lora-swap", zoo.default_size(name, bool(args.quick)), None,
                           error=bench.err_text(exc), notes="model failed")
            torch._dynamo.reset()
            bench.cleanup(args.device.startswith("cuda"))
    print(f"\n[swap] {len(writer.rows)} rows -> {out}")
    for r in writer.rows:
        sec = f"{r['seconds']:.4f}" if r["seconds"] is not None else "-"
        print(f"{r['model']:5s}  {r['mode']:17s}  {r.get('op') or '':9s}  {r['size']:9s}  {sec:>8s}  "
              f"{(r['error'] or '')[:80]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
