#!/usr/bin/env python3
"""Why does a tiny model recompile under lyra? Runs the shape sequence of
tests/cuda/test_models_cuda.py with Dynamo's symbolic-shape log on and prints the
recompile reasons and every equality guard / replacement that pins a size symbol.

    python benchmarks/explain_recompiles.py --model sana [--device cuda]
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import lyradynamo  # noqa: E402
from lyradynamo import zoo  # noqa: E402

PINS = re.compile(r"set_replacement|specializ|eval Eq\(|Eq\(s\d+, \d+\)|guard added")


class Keep(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        msg = record.getMessage()
        if PINS.search(msg):
            self.lines.append(msg)


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="sana")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--max-lines", type=int, default=80)
    args = p.parse_args(argv)
    dtype = torch.float16 if args.model in ("sd15", "sdxl") else torch.bfloat16
    keep = Keep()
    torch._logging.set_logs(dynamic=logging.DEBUG, recompiles=True)
    logging.getLogger("torch.fx.experimental.symbolic_shapes").addHandler(keep)
    model = zoo.build_denoiser(args.model, dtype=dtype, device=args.device)
    compiled = torch.compile(model, backend="lyra")
    with torch.no_grad():
        for i, (b, h, w) in enumerate([(2, 64, 64), (1, 64, 96), (2, 64, 64), (4, 96, 64)]):
            compiled(**zoo.denoiser_inputs(args.model, model, batch=b, height=h, width=w, seed=i))
    print(f"== {args.model} on {args.device}: {lyradynamo.compile_count()} compilation(s)")
    for r in lyradynamo.compiled_graphs():
        print("   reason:", r.recompile_reason)
    print(f"== {len(keep.lines)} pinning log lines (first {args.max_lines}):")
    for line in keep.lines[: args.max_lines]:
        print("  ", line[:400])


if __name__ == "__main__":
    main()
