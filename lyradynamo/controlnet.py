"""ControlNet hot-swap: copy another ControlNet's weights into a compiled one, in place.

    cn = torch.compile(controlnet_canny, backend="lyra")
    pipe.controlnet = cn
    ...
    swap_controlnet(cn, controlnet_depth)                 # a module of the same architecture
    swap_controlnet(cn, "depth/diffusion_pytorch_model.safetensors")   # or a file / folder / state dict
    swap_controlnet(pipe.controlnet.nets[1], other)       # one element of a MultiControlNetModel

Why copying works: the lyra backend lifts parameters to graph inputs, so the compiled graph
(and its CUDA graphs, which keep the same addresses) reads whatever the same Parameter objects
hold; `copy_` bumps `param._version`, so quantised copies are re-derived. A ControlNet of another
architecture (other channels, blocks or conditioning) cannot be swapped in: compile it separately.
"""
from __future__ import annotations

import logging
import os
import time

import torch

from .quant.weights import master_weight

log = logging.getLogger("lyradynamo")


class ControlNetMismatch(ValueError):
    """The new ControlNet's architecture differs from the compiled one's."""


def _unwrap(m):
    while isinstance(m, torch.nn.Module) and hasattr(m, "_orig_mod"):
        m = m._orig_mod
    return m


def _is_multi(m) -> bool:
    return type(m).__name__ in ("MultiControlNetModel", "FluxMultiControlNetModel", "SD3MultiControlNetModel") \
        or (hasattr(m, "nets") and isinstance(getattr(m, "nets"), torch.nn.ModuleList))


def swap_controlnet(compiled_or_model, new_controlnet) -> None:
    """Copy the weights of `new_controlnet` into `compiled_or_model` in place (cast to its dtype and device).

    `compiled_or_model`: a ControlNetModel / FluxControlNetModel / ... (torch.compile'd or not), or a
    MultiControlNetModel (then `new_controlnet` is a list/MultiControlNetModel of as many nets).
    `new_controlnet`: a module of the same architecture, its state dict, or a .safetensors file /
    diffusers folder holding it. Raises `ControlNetMismatch` (before changing anything) when the
    parameter names or shapes differ.
    """
    t0 = time.perf_counter()
    target = _unwrap(compiled_or_model)
    if _is_multi(target):
        news = list(_unwrap(new_controlnet).nets) if _is_multi(_unwrap(new_controlnet)) else list(new_controlnet)
        if len(news) != len(target.nets):
            raise ControlNetMismatch(f"the MultiControlNetModel holds {len(target.nets)} ControlNets, got {len(news)}")
        plans = [_plan(_unwrap(t), n) for t, n in zip(target.nets, news)]  # all checked before any copy
    else:
        plans = [_plan(target, new_controlnet)]
    n = 0
    with torch.no_grad():
        for pairs in plans:
            for dst, src in pairs:
                master_weight(dst).copy_(src, non_blocking=True)  # bumps _version: quantised copies re-made
                n += 1
    devs = {dst.device for pairs in plans for dst, _ in pairs if dst.device.type == "cuda"}
    for d in devs:
        torch.cuda.synchronize(d)
    log.info("lyradynamo.controlnet: swapped %d tensors into %s in %.1f ms", n, type(target).__name__,
             (time.perf_counter() - t0) * 1e3)


def _plan(target: torch.nn.Module, new) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(destination, source) pairs for every parameter and floating buffer, after all checks."""
    dst = dict(target.named_parameters())
    dst.update({k: b for k, b in target.named_buffers() if b.is_floating_point()})
    src, what = _source_tensors(target, new)
    missing = sorted(set(dst) - set(src))
    extra = sorted(k for k in set(src) - set(dst) if k not in dict(target.named_buffers()))
    shapes = [f"{k}: {tuple(dst[k].shape)} here, {tuple(src[k].shape)} in the new one"
              for k in dst if k in src and tuple(dst[k].shape) != tuple(src[k].shape)]
    if missing or extra or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} tensors missing, e.g. {missing[:5]}")
        if extra:
            parts.append(f"{len(extra)} unexpected tensors, e.g. {extra[:5]}")
        if shapes:
            parts.append(f"{len(shapes)} shapes differ, e.g. " + "; ".join(shapes[:5]))
        raise ControlNetMismatch(
            f"{what} does not have the architecture of the compiled {type(target).__name__} "
            f"({'; '.join(parts)}). Weights can only be swapped between ControlNets of the same "
            f"architecture: compile the other one separately (torch.compile(other, backend=\"lyra\")) "
            f"and pass it to the pipeline instead. Nothing was changed.")
    return [(t, src[k]) for k, t in dst.items()]


def _source_tensors(target, new) -> tuple[dict[str, torch.Tensor], str]:
    if isinstance(new, torch.nn.Module):
        new = _unwrap(new)
        if type(new) is not type(target):
            raise ControlNetMismatch(
                f"cannot swap a {type(new).__name__} into a compiled {type(target).__name__}: "
                "compile the other one separately (torch.compile(other, backend=\"lyra\")). Nothing was changed.")
        out = dict(new.named_parameters())
        out.update({k: b for k, b in new.named_buffers() if b.is_floating_point()})
        return out, f"the new {type(new).__name__}"
    if isinstance(new, dict):
        return dict(new), f"the state dict ({len(new)} tensors)"
    path = os.fspath(new)
    file = path
    if os.path.isdir(path):
        names = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
        if not names:
            raise FileNotFoundError(f"no .safetensors file in {path!r}")
        if len(names) > 1 and "diffusion_pytorch_model.safetensors" in names:
            names = ["diffusion_pytorch_model.safetensors"]
        if len(names) > 1:
            raise ValueError(f"{path!r} holds several .safetensors files ({names}); pass the file "
                             "(sharded checkpoints: load the model and pass it)")
        file = os.path.join(path, names[0])
    elif not os.path.isfile(path):
        raise FileNotFoundError(f"no such ControlNet file or folder: {path!r}")
    from safetensors.torch import load_file

    dev = next(target.parameters()).device
    # straight to the target's device: one host->device transfer, cast on the device by copy_
    return load_file(file, device=str(dev)), repr(file)
