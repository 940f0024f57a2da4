#!/usr/bin/env python3
"""Per-call consistency of lyra against eager on the full-size models (GPU; issue 4, point 3).

    python benchmarks/consistency.py [--models sd15,sdxl,flux] [--out FILE.json]

For each model (random weights, seeded; SD at UNet batch 2, FLUX batch 1, native size): one call
of eager in the model's dtype (fp16 SD, bf16 FLUX), one of eager in fp32 with the same weights
(the model cast up in place, then back: bf16 / fp16 values are exact in fp32), and one of the
lyra-compiled model (its second call: a CUDA-graph replay). The criterion:

    ||lyra - eager_dtype|| <= 2 ||eager_dtype - eager_fp32||

Each row reports both norms relative to ||eager_fp32||, their ratio and whether it holds.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import lyradynamo  # noqa: E402
from lyradynamo import zoo  # noqa: E402

DTYPES = {"sd15": torch.float16, "sdxl": torch.float16, "flux": torch.bfloat16}
BATCH = {"sd15": 2, "sdxl": 2, "flux": 1}


def _cast(obj, dtype):
    if torch.is_tensor(obj):
        return obj.to(dtype) if obj.is_floating_point() else obj
    if isinstance(obj, dict):
        return {k: _cast(v, dtype) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cast(v, dtype) for v in obj)
    return obj


def _first(out):
    return (out[0] if isinstance(out, (tuple, list)) else out.sample).float()


def measure(name: str, tiny: bool = False, device: str = "cuda") -> dict:
    dt = DTYPES[name]
    t0 = time.perf_counter()
    model = zoo.build_denoiser(name, tiny=tiny, dtype=dt, device=device)
    inputs = zoo.denoiser_inputs(name, model, batch=BATCH[name])
    with torch.no_grad():
        eager = _first(model(**inputs))
        model.float()
        ref32 = _first(model(**_cast(inputs, torch.float32)))
        model.to(dt)
        torch._dynamo.reset()
        lyradynamo.reset_stats()
        compiled = torch.compile(model, backend="lyra")
        _first(compiled(**inputs))
        lyra = _first(compiled(**inputs))
    n32 = ref32.norm().item()
    eager_err = (eager - ref32).norm().item() / n32
    lyra_err = (lyra - eager).norm().item() / n32
    row = {
        "model": name, "dtype": str(dt).replace("torch.", ""), "batch": BATCH[name],
        "shape": list(eager.shape), "tiny": tiny,
        "gpu": torch.cuda.get_device_name() if device == "cuda" else device,
        "eager_vs_fp32": eager_err, "lyra_vs_eager": lyra_err,
        "lyra_vs_fp32": (lyra - ref32).norm().item() / n32,
        "ratio": lyra_err / eager_err if eager_err else float("inf"),
        "holds": lyra_err <= 2 * eager_err, "seconds": time.perf_counter() - t0,
        "fallbacks": {f"{k[0]}: {k[1]}": v for k, v in lyradynamo.ops.fallback_counts().items()},
    }
    del model, compiled
    if device == "cuda":
        torch.cuda.empty_cache()
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="sd15,sdxl,flux")
    p.add_argument("--out", default=None)
    p.add_argument("--tiny", action="store_true", help="the zoo's tiny configs (a smoke test)")
    p.add_argument("--device", default="cuda")
    args = p.parse_args()
    rows = []
    for name in args.models.split(","):
        try:
            rows.append(measure(name, args.tiny, args.device))
        except Exception as exc:  # noqa: BLE001 - one model failing keeps the others
            rows.append({"model": name, "error": repr(exc)[:300]})
        print(json.dumps(rows[-1]), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
