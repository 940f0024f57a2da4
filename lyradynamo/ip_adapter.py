"""IP-Adapter scale changes without recompiling.

    pipe.load_ip_adapter(...)                    # diffusers, BEFORE torch.compile(pipe.unet, backend="lyra")
    pipe.unet = torch.compile(pipe.unet, backend="lyra")
    lyradynamo.ip_adapter.set_scale(pipe, 0.6)   # instead of pipe.set_ip_adapter_scale(0.6)
    lyradynamo.ip_adapter.set_scale(pipe, {"up": {"block_0": [0.0, 1.0, 0.0]}})   # InstantStyle configs too

Why: diffusers' IP-Adapter attention processors keep the scale as a Python float in
`processor.scale` and branch on it (`if scale == 0: skip`), so Dynamo guards on its value and
`set_ip_adapter_scale` recompiles the model for every new scale. The IP branch is linear in its
value projection (out = scale * softmax(q k_ip^T) (x W_v_ip^T), `to_v_ip` has no bias), so the
same result comes from `processor.scale = 1.0` (the value the graph was traced with) and
`W_v_ip = scale * W_v_ip_orig`, written in place: parameters are graph inputs, nothing recompiles.
Scale 0 gives exactly the no-IP-Adapter output (the branch adds +0.0) but still runs the branch.

The original `to_v_ip` weights are kept as CPU backups (taken on the first call), so every scale is
computed from them: (W_orig.float() * scale).to(dtype). `restore(pipe)` puts back the original
weights and scale 1.0 (call it before diffusers' `unload_ip_adapter`, which changes the modules and
therefore does recompile, or falls back to a graph compiled earlier without the IP-Adapter).
"""
from __future__ import annotations

import logging
import types
import weakref

import torch

from .quant.weights import master_weight

log = logging.getLogger("lyradynamo")

# processor module -> {IP-Adapter index: CPU copy of its original to_v_ip weight}
_BACKUPS: "weakref.WeakKeyDictionary[torch.nn.Module, dict[int, torch.Tensor]]" = weakref.WeakKeyDictionary()


def _unwrap(m):
    while isinstance(m, torch.nn.Module) and hasattr(m, "_orig_mod"):
        m = m._orig_mod
    return m


def _denoiser(target):
    if isinstance(target, torch.nn.Module):
        return _unwrap(target)
    for attr in ("unet", "transformer"):
        m = getattr(target, attr, None)
        if isinstance(m, torch.nn.Module):
            return _unwrap(m)
    raise TypeError(f"{type(target).__name__}: expected a pipeline with a unet/transformer, or the model")


def _ip_processors(model) -> dict:
    procs = {n: p for n, p in getattr(model, "attn_processors", {}).items()
             if isinstance(getattr(p, "scale", None), list) and hasattr(p, "to_v_ip")}
    if not procs:
        raise ValueError(f"no IP-Adapter is loaded in this {type(model).__name__} (load it with diffusers' "
                         "load_ip_adapter before compiling)")
    return procs


def _resolve_scales(target, model, scale) -> dict[str, list[float]]:
    """Per-processor scale lists exactly as diffusers' set_ip_adapter_scale would set them."""
    procs = _ip_processors(model)
    saved = {n: list(p.scale) for n, p in procs.items()}
    try:
        if not isinstance(target, torch.nn.Module) and hasattr(type(target), "set_ip_adapter_scale"):
            shadow = types.SimpleNamespace(unet=model, transformer=model, unet_name="unet",
                                           transformer_name="transformer")
            type(target).set_ip_adapter_scale(shadow, scale)
        else:  # a bare model: plain float / list of floats (one per IP-Adapter) only
            scales = scale if isinstance(scale, list) else [scale]
            for p in procs.values():
                if len(scales) not in (1, len(p.scale)):
                    raise ValueError(f"{len(scales)} scales for {len(p.scale)} IP-Adapters")
                for i in range(len(p.scale)):
                    p.scale[i] = float(scales[0] if len(scales) == 1 else scales[i])
        out = {n: list(p.scale) for n, p in procs.items()}
    finally:
        for n, p in procs.items():
            p.scale[:] = saved[n]
    for n, s in out.items():
        if any(isinstance(v, (list, tuple)) for v in s):
            raise NotImplementedError(f"{n}: per-image (masked) scale lists are not supported by set_scale")
    return out


def set_scale(target, scale) -> None:
    """Set the IP-Adapter scale(s) of a (compiled) UNet/transformer without recompiling.

    `target`: a pipeline (any scale config its `set_ip_adapter_scale` accepts: a float, a list
    with one entry per IP-Adapter, InstantStyle block dicts) or the model (floats / lists).
    """
    model = _denoiser(target)
    scales = _resolve_scales(target, model, scale)
    procs = _ip_processors(model)
    n = 0
    with torch.no_grad():
        for name, proc in procs.items():
            for i, s in enumerate(scales[name]):
                w = master_weight(proc.to_v_ip[i].weight)
                backups = _BACKUPS.setdefault(proc, {})
                orig = backups.get(i)
                if orig is None:
                    orig = backups[i] = w.detach().to("cpu", copy=True)
                    if proc.scale[i] != 1.0:  # fold a scale set before compiling into the backup's meaning
                        log.warning("lyradynamo.ip_adapter: %s had scale %g; it becomes 1.0 (the weights carry "
                                    "the scale): a graph compiled with the old value recompiles once", name,
                                    proc.scale[i])
                proc.scale[i] = 1.0
                w.copy_((orig.to(w.device, torch.float32) * float(s)).to(w.dtype))  # bumps w._version
                n += 1
    log.info("lyradynamo.ip_adapter: scale set on %d IP value projections", n)


def restore(target) -> None:
    """Original `to_v_ip` weights back and scale 1.0 (diffusers' state right after load_ip_adapter)."""
    model = _denoiser(target)
    with torch.no_grad():
        for proc in _ip_processors(model).values():
            for i in range(len(proc.scale)):
                w = master_weight(proc.to_v_ip[i].weight)
                orig = _BACKUPS.get(proc, {}).pop(i, None)
                if orig is not None:
                    w.copy_(orig)
                proc.scale[i] = 1.0
