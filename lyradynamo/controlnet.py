"""ControlNet hot-swap: copy another ControlNet's weights into a compiled one, in place.

    cn = torch.compile(controlnet_canny, backend="lyra")
    pipe.controlnet = cn
    ...
    swap_controlnet(cn, controlnet_depth)                 # a module of the same architecture
    swap_controlnet(cn, "depth/diffusion_pytorch_model.safetensors")   # or a file / folder / state dict
    swap_controlnet(pipe.controlnet.nets[1], other)       # one element of a MultiControlNetModel
    swap_controlnet(pipe.unet, controlnet_xs_adapter)     # ControlNet-XS: the adapter's weights go
                                                          # into the UNetControlNetXSModel's ctrl parts

Why copying works: the lyra backend lifts parameters to graph inputs, so the compiled graph
(and its CUDA graphs, which keep the same addresses) reads whatever the same Parameter objects
hold; `copy_` bumps `param._version`, so quantised copies are re-derived. A ControlNet of another
architecture (other channels, blocks or conditioning) cannot be swapped in: compile it separately.
"""
from __future__ import annotations

import logging
import os
import re
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
    elif type(target).__name__ == "UNetControlNetXSModel" and _is_xs_adapter(new_controlnet):
        plans = [_xs_plan(target, new_controlnet)]
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


# ControlNet-XS: diffusers merges a ControlNetXSAdapter into the base UNet
# (UNetControlNetXSModel.from_unet); these are the names its parameters get there.
_XS_NAMES = [
    (r"^conv_in\.", "ctrl_conv_in."),
    (r"^time_embedding\.", "ctrl_time_embedding."),
    (r"^(controlnet_cond_embedding|control_to_base_for_conv_in)\.", r"\1."),
    (r"^down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.", r"down_blocks.\1.ctrl_\2."),
    (r"^down_blocks\.(\d+)\.(base_to_ctrl|ctrl_to_base)\.", r"down_blocks.\1.\2."),
    (r"^mid_block\.midblock\.", "mid_block.ctrl_midblock."),
    (r"^mid_block\.(base_to_ctrl|ctrl_to_base)\.", r"mid_block.\1."),
    (r"^up_connections\.(\d+)\.ctrl_to_base\.", r"up_blocks.\1.ctrl_to_base."),
]


def _is_xs_adapter(new) -> bool:
    """A ControlNetXSAdapter, or a state dict / file / folder holding one (its own key names)."""
    if isinstance(new, torch.nn.Module):
        return type(_unwrap(new)).__name__ == "ControlNetXSAdapter"
    if isinstance(new, dict):
        return any(k.startswith("up_connections.") for k in new)
    if isinstance(new, (str, os.PathLike)):
        path = os.fspath(new)
        cfg = os.path.join(path, "config.json")
        if os.path.isdir(path) and os.path.isfile(cfg):
            import json

            with open(cfg) as f:
                return json.load(f).get("_class_name") == "ControlNetXSAdapter"
        if os.path.isfile(path) and path.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(path, framework="pt") as f:
                return any(k.startswith("up_connections.") for k in f.keys())
    return False


def _xs_plan(target: torch.nn.Module, new) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(destination, source) pairs that put a ControlNet-XS adapter's weights where
    UNetControlNetXSModel.from_unet would: the base UNet's weights stay untouched."""
    src, what = _source_tensors(target, new, check_type=False)
    dst = dict(target.named_parameters())
    mapped, unmapped, bad = {}, [], []
    for k, t in src.items():
        for pattern, repl in _XS_NAMES:
            name, hit = re.subn(pattern, repl, k)
            if hit:
                break
        else:
            unmapped.append(k)
            continue
        if name not in dst or tuple(dst[name].shape) != tuple(t.shape):
            bad.append(f"{k} -> {name}: " + (f"{tuple(dst[name].shape)} here, {tuple(t.shape)} in the new one"
                                              if name in dst else "no such parameter here"))
        mapped[name] = t
    if unmapped or bad or not mapped:
        raise ControlNetMismatch(
            f"{what} does not fit the compiled UNetControlNetXSModel ({len(unmapped)} tensors with no place, "
            f"e.g. {unmapped[:5]}; {len(bad)} mismatches, e.g. {bad[:3]}). Weights can only be swapped "
            f"between ControlNet-XS adapters of the same architecture. Nothing was changed.")
    return [(dst[name], t) for name, t in mapped.items()]


def _source_tensors(target, new, check_type: bool = True) -> tuple[dict[str, torch.Tensor], str]:
    if isinstance(new, torch.nn.Module):
        new = _unwrap(new)
        if check_type and type(new) is not type(target):
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
