"""Demo: eager vs lyra on a random-weight pipeline, no downloads.

    python -m lyradynamo.demo                # CPU: tiny SD1.5 pipeline
    python -m lyradynamo.demo --model flux   # tiny FLUX pipeline
    python -m lyradynamo.demo --full         # on a GPU: the full-size config (random weights)

Prints whether the images match, how many times lyra compiled across two resolutions, and
the rewrite summary.
"""
from __future__ import annotations

import argparse
import time

import torch

import lyradynamo
from lyradynamo import zoo
from lyradynamo.dump import format_summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lyradynamo.demo")
    p.add_argument("--model", default="sd15", choices=zoo.PIPELINE_NAMES)
    p.add_argument("--full", action="store_true", help="full-size config (use on a GPU)")
    p.add_argument("--steps", type=int, default=None)
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dtype = zoo.default_dtype(args.model, device)
    tiny = not args.full
    steps = args.steps or (20 if args.full else 3)
    sizes = [zoo.default_size(args.model, tiny), (64, 96) if tiny else (768, 1024)]
    print(f"building {'full-size' if args.full else 'tiny'} {args.model} pipeline (random weights) on {device} {dtype}")
    pipe = zoo.build_pipeline(args.model, tiny=tiny, dtype=dtype, device=device)
    attr = "unet" if hasattr(pipe, "unet") else "transformer"

    def run(h, w):
        start = time.perf_counter()
        img = pipe(prompt="a photo of a cat", num_inference_steps=steps, height=h, width=w, output_type="np",
                   generator=torch.Generator().manual_seed(0)).images
        if cuda:
            torch.cuda.synchronize()
        return img, time.perf_counter() - start

    eager = [run(h, w) for h, w in sizes]
    setattr(pipe, attr, torch.compile(getattr(pipe, attr), backend="lyra"))
    lyra = [run(h, w) for h, w in sizes]
    lyra_again = [run(h, w) for h, w in sizes]
    for (h, w), (e, te), (l, tl), (_, tl2) in zip(sizes, eager, lyra, lyra_again):
        e64, l64 = torch.from_numpy(e).double(), torch.from_numpy(l).double()
        err = float((e64 - l64).norm() / e64.norm())
        mse = float(((e64 - l64) ** 2).mean())
        psnr = float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(1.0 / mse)).item()
        print(f"{w}x{h}: eager {te:.2f}s | lyra first call {tl:.2f}s, next {tl2:.2f}s | "
              f"image rel. error {err:.2e}, PSNR {psnr:.1f} dB")
    print(f"lyra compilations for {len(sizes)} resolutions: {lyradynamo.compile_count()}")
    for rec in lyradynamo.compiled_graphs():
        print(format_summary(rec.summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
