"""IP-Adapter scale changes and unloading without recompiling (SD1.5 / SDXL UNets, FLUX transformer).

    pipe.load_ip_adapter(...)                    # diffusers, BEFORE torch.compile(pipe.unet / pipe.transformer)
    pipe.unet = torch.compile(pipe.unet, backend="lyra")
    lyradynamo.ip_adapter.set_scale(pipe, 0.6)   # instead of pipe.set_ip_adapter_scale(0.6)
    lyradynamo.ip_adapter.set_scale(pipe, {"up": {"block_0": [0.0, 1.0, 0.0]}})   # InstantStyle configs too
    lyradynamo.ip_adapter.unload(pipe)           # instead of pipe.unload_ip_adapter(): no IP-Adapter effect
    lyradynamo.ip_adapter.set_scale(pipe, 0.8)   # ... and back on, still the same graph

Why: diffusers' IP-Adapter attention processors keep the scale as a Python float in
`processor.scale` (a list: one entry per loaded IP-Adapter) and use it as a constant (the UNet
processors branch on it, `if scale == 0: skip`; FLUX's multiplies by it), so Dynamo guards on its
value and `set_ip_adapter_scale` recompiles the model for every new scale. The IP branch is linear
in its value projection: out = scale * softmax(q k_ip^T) v_ip with v_ip = x W_v_ip^T (+ b_v_ip),
and since every softmax row sums to 1, scale * (P v_ip) = P (x (scale W)^T + scale b). So the same
result comes from `processor.scale = 1.0` (the value the graph was traced with) and
`W_v_ip = scale * W_orig`, `b_v_ip = scale * b_orig` (FLUX's `to_v_ip` has a bias, the UNets'
has none), written in place: parameters are graph inputs, nothing recompiles. Which processors
are IP-Adapter ones is read from their attributes (a list `scale` and a `to_v_ip` ModuleList:
diffusers' IPAdapterAttnProcessor* and FluxIPAdapterAttnProcessor), not from the model type.

Scale 0 (and `unload`) gives exactly the output of the model without the IP-Adapter: the value
projection is all zeros, so the branch adds P @ 0 = +0.0 to the attention output (x + 0.0 == x;
tests/test_ip_adapter.py: equal to the model compiled without an IP-Adapter, bit for bit, and to
eager diffusers after unload_ip_adapter within fp32 rounding). The branch is still computed, and
the model must still get image embeddings (any finite values, the same shapes as before: they no
longer change the output; without them diffusers' IP-Adapter code fails, and a new call signature
would recompile anyway).

The original `to_v_ip` weights (and biases) are kept as CPU backups (taken on the first call), so
every scale is computed from them: (W_orig.float() * scale).to(dtype). `restore(pipe)` puts back
the original weights and scale 1.0: call it before diffusers' `unload_ip_adapter` (which swaps the
attention processors and removes the image projection, so the model then recompiles) or before
saving the model.
"""
from __future__ import annotations

import logging
import types
import weakref

import torch

from .quant.weights import master_weight

log = logging.getLogger("lyradynamo")

# processor module -> {IP-Adapter index: CPU copies of its original to_v_ip weight (and bias)}
_BACKUPS: "weakref.WeakKeyDictionary[torch.nn.Module, dict[int, list[torch.Tensor]]]" = weakref.WeakKeyDictionary()


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


def _is_ip_processor(p) -> bool:
    """diffusers' IP-Adapter processors: a list `scale` (one entry per IP-Adapter) and the
    `to_k_ip` / `to_v_ip` projections as ModuleLists of the same length."""
    v = getattr(p, "to_v_ip", None)
    return (isinstance(getattr(p, "scale", None), list) and isinstance(v, torch.nn.ModuleList)
            and len(v) == len(p.scale))


def _ip_processors(model) -> dict:
    procs = {n: p for n, p in getattr(model, "attn_processors", {}).items() if _is_ip_processor(p)}
    if not procs:
        raise ValueError(f"no IP-Adapter is loaded in this {type(model).__name__} (load it with diffusers' "
                         "load_ip_adapter before compiling; supported: processors with a `scale` list and "
                         "`to_v_ip` ModuleList, i.e. diffusers' IPAdapterAttnProcessor* and FluxIPAdapterAttnProcessor)")
    return procs


def _value_tensors(proc, i: int) -> list[torch.Tensor]:
    """The tensors of IP-Adapter i's value projection that hold its values: weight (its
    high-precision master when quantised) and bias if any."""
    lin = proc.to_v_ip[i]
    out = [master_weight(lin.weight)]
    if getattr(lin, "bias", None) is not None:
        out.append(master_weight(lin.bias))
    return out


def _resolve_scales(target, model, scale) -> dict[str, list[float]]:
    """Per-processor scale lists exactly as diffusers' set_ip_adapter_scale would set them.

    The processors' scale lists are left as they were (same list objects, same values): diffusers'
    FLUX set_ip_adapter_scale assigns new lists, the UNet one writes into the old ones."""
    procs = _ip_processors(model)
    saved = {n: (p.scale, list(p.scale)) for n, p in procs.items()}
    try:
        if not isinstance(target, torch.nn.Module) and hasattr(type(target), "set_ip_adapter_scale"):
            shadow = types.SimpleNamespace(unet=model, transformer=model, unet_name="unet",
                                           transformer_name="transformer")
            type(target).set_ip_adapter_scale(shadow, scale)
        else:  # a bare model: plain float / list of floats (one per IP-Adapter) only
            scales = list(scale) if isinstance(scale, (list, tuple)) else [scale]
            if not scales or not all(isinstance(s, (int, float)) and not isinstance(s, bool) for s in scales):
                raise TypeError(f"a bare model takes a float or a list of floats (one per IP-Adapter), got "
                                f"{scale!r}; pass the pipeline for per-block configs")
            for p in procs.values():
                if len(scales) not in (1, len(p.scale)):
                    raise ValueError(f"{len(scales)} scales for {len(p.scale)} IP-Adapters")
                p.scale = [float(scales[0] if len(scales) == 1 else scales[i]) for i in range(len(p.scale))]
        out = {n: list(p.scale) for n, p in procs.items()}
    finally:
        for n, p in procs.items():
            obj, values = saved[n]
            obj[:] = values
            if p.scale is not obj:
                p.scale = obj
    for n, s in out.items():
        if len(s) != len(procs[n].to_v_ip) or any(isinstance(v, (list, tuple)) for v in s):
            raise NotImplementedError(f"{n}: per-image (masked) scale lists are not supported by set_scale")
    return out


def set_scale(target, scale) -> None:
    """Set the IP-Adapter scale(s) of a (compiled) UNet/transformer without recompiling.

    `target`: a pipeline (any scale config its `set_ip_adapter_scale` accepts: a float, a list
    with one entry per IP-Adapter, InstantStyle block dicts for SD/SDXL, per-layer lists for
    FLUX) or the model itself, compiled or not (a float, or a list of floats: one per IP-Adapter).
    """
    model = _denoiser(target)
    scales = _resolve_scales(target, model, scale)
    procs = _ip_processors(model)
    n = 0
    with torch.no_grad():
        for name, proc in procs.items():
            for i, s in enumerate(scales[name]):
                tensors = _value_tensors(proc, i)
                backups = _BACKUPS.setdefault(proc, {})
                orig = backups.get(i)
                if orig is None:
                    orig = backups[i] = [t.detach().to("cpu", copy=True) for t in tensors]
                    if proc.scale[i] != 1.0:  # fold a scale set before compiling into the backup's meaning
                        log.warning("lyradynamo.ip_adapter: %s had scale %g; it becomes 1.0 (the weights carry "
                                    "the scale): a graph compiled with the old value recompiles once", name,
                                    proc.scale[i])
                proc.scale[i] = 1.0
                for t, o in zip(tensors, orig):  # in place: bumps t._version, same storage
                    if float(s) == 0.0:
                        t.zero_()  # +0.0 everywhere (0.0 * negative weights would give -0.0)
                    else:
                        t.copy_((o.to(t.device, torch.float32) * float(s)).to(t.dtype))
                n += 1
    log.info("lyradynamo.ip_adapter: scale set on %d IP value projections", n)


def unload(target) -> None:
    """Turn every IP-Adapter of the (compiled) model off without recompiling.

    Equivalent to `set_scale(target, 0.0)`: the value projections become zeros, so the output is
    that of the model without the IP-Adapter (the branch adds exactly +0.0). The modules stay in
    place and the graph still runs the branch: keep passing image embeddings of the same shapes
    (their values no longer matter). `set_scale` turns it back on; `restore` and then diffusers'
    `unload_ip_adapter` remove it for good (one recompilation).
    """
    set_scale(_denoiser(target), 0.0)


def restore(target) -> None:
    """Original `to_v_ip` weights (and biases) back and scale 1.0 (diffusers' state right after
    load_ip_adapter)."""
    model = _denoiser(target)
    with torch.no_grad():
        for proc in _ip_processors(model).values():
            for i in range(len(proc.scale)):
                orig = _BACKUPS.get(proc, {}).pop(i, None)
                if orig is not None:
                    for t, o in zip(_value_tensors(proc, i), orig):
                        t.copy_(o)
                proc.scale[i] = 1.0
