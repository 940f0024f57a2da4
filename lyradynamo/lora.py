"""LoRA hot-swap by in-place weight patching: no module changes, so no recompilation.

    from lyradynamo import lora
    lora.load_lora(pipe, "style.safetensors", scale=0.8, name="style")   # -> "style"
    lora.load_lora(pipe, kohya_state_dict, name="detail")
    lora.set_loras(pipe, {"style": 0.5, "detail": 1.0})   # names left out -> scale 0 (kept loaded)
    lora.unload_lora(pipe, "style")                        # None: all; restores every bit
    lora.list_loras(pipe)                                  # {"detail": 1.0}

Why patching and not peft injection: peft wraps every targeted Linear in a new module, which
changes the graph Dynamo traced, so a compiled model recompiles. The lyra backend lifts
parameters to graph inputs, so writing new values into the *same* Parameter objects is seen by
the compiled graph at once (and `param._version` moves, which re-derives quantised copies of
exactly the touched weights).

Numerics: every touched weight is recomputed from its original value, kept as a CPU backup taken
the first time a LoRA touches it:  W = (W_orig.float() + sum_i scale_i * delta_i).to(W.dtype),
delta_i = (B_i @ A_i) * alpha_i / r_i computed in fp32 on the parameter's device. So unloading
restores every bit, and the weights for a set of active LoRAs do not depend on the history
(A -> B -> A is bit-identical to A).

Backups live on the GPU while `config.lora_backup` allows (default auto: until a quarter of
the card's memory would be left), so a switch or an unload moves no weight over PCIe; the rest
are page-locked host copies. A backup of a quantised weight whose master lives on the host stays
on the host.

Backups outlive an unload: a weight that no LoRA touches any more gets its original bits back
and its backup is kept as a spare, valid while the parameter stays the same object at
the same address with the same `_version` (any in-place write by someone else invalidates
it). A swap (unload A, load B) then takes no new backup.
`release_backups(model_or_pipe)` frees the spares.

Formats: whatever diffusers reads (diffusers/peft keys, kohya `lora_unet_*`/`lora_te*_`, FLUX
kohya/xlabs/... formats) goes through the `lora_state_dict` classmethod of the pipeline class that
matches the model, then the same per-component normalisation and `LoraConfig` (rank/alpha
patterns) diffusers builds; the scaling of each layer is the one peft would give it.
"""
from __future__ import annotations

import dataclasses
import inspect
import logging
import math
import os
import time
import weakref
from typing import Any, Iterable

import torch

from . import config
from .quant.weights import master_weight

log = logging.getLogger("lyradynamo")

# Pipeline attributes LoRAs target, in the prefixes diffusers' LoRA state dicts use.
DENOISER_ATTRS = ("unet", "transformer")
TEXT_ENCODER_ATTRS = ("text_encoder", "text_encoder_2", "text_encoder_3")
KNOWN_PREFIXES = DENOISER_ATTRS + TEXT_ENCODER_ATTRS

# Denoiser class -> the diffusers pipeline class whose `lora_state_dict` converts its LoRAs.
_PIPELINE_FOR_MODEL = {
    "FluxTransformer2DModel": "FluxPipeline",
    "SD3Transformer2DModel": "StableDiffusion3Pipeline",
    "AuraFlowTransformer2DModel": "AuraFlowPipeline",
    "SanaTransformer2DModel": "SanaPipeline",
    "CogView4Transformer2DModel": "CogView4Pipeline",
    "HiDreamImageTransformer2DModel": "HiDreamImagePipeline",
    "QwenImageTransformer2DModel": "QwenImagePipeline",
    "WanTransformer3DModel": "WanPipeline",
    "LTXVideoTransformer3DModel": "LTXPipeline",
    "HunyuanVideoTransformer3DModel": "HunyuanVideoPipeline",
    "Lumina2Transformer2DModel": "Lumina2Pipeline",
}

_SHOW = 5  # how many offending keys an error message lists


class LoraError(ValueError):
    """A LoRA that cannot be applied; raised before any weight is modified."""


# ------------------------------------------------------------------------------------------
# State: kept outside the modules (a new attribute on a compiled module could change guards)
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Layer:
    """One LoRA factor pair on one Linear/Conv2d, on the parameter's device, in the file dtype."""

    module: str
    A: torch.Tensor  # (r, in) or (r, in, kh, kw)
    B: torch.Tensor  # (out, r) or (out, r, 1, 1)
    scaling: float  # alpha / r (alpha / sqrt(r) with rsLoRA), as peft computes it
    bias: torch.Tensor | None = None  # lora_B.bias (peft lora_bias=True)

    def delta(self, weight: torch.Tensor) -> torch.Tensor:
        """fp32 delta of the weight, same formula as peft's get_delta_weight."""
        A, B = self.A.float(), self.B.float()
        if A.dim() == 2:  # Linear
            d = B @ A
        elif weight.shape[2:4] == (1, 1):  # 1x1 conv
            d = (B.squeeze(3).squeeze(2) @ A.squeeze(3).squeeze(2)).unsqueeze(2).unsqueeze(3)
        else:  # kxk conv: lora_A carries the kernel, lora_B is 1x1
            d = torch.nn.functional.conv2d(A.transpose(0, 1), B).transpose(0, 1)
        return d * self.scaling

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.A, self.B, self.bias) if t is not None)


@dataclasses.dataclass
class _Adapter:
    layers: dict[str, _Layer]  # module name -> layer
    scale: float


@dataclasses.dataclass
class _State:
    """Per component module: loaded adapters (in load order) and original-weight backups."""

    adapters: dict[str, _Adapter] = dataclasses.field(default_factory=dict)
    backup: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)  # param name -> CPU copy
    # param name -> (backup, identity of the restored parameter): backups of weights no loaded
    # LoRA touches (restored on unload), reused by the next load while the identity still holds
    spare: dict[str, tuple] = dataclasses.field(default_factory=dict)


_STATES: "weakref.WeakKeyDictionary[torch.nn.Module, _State]" = weakref.WeakKeyDictionary()


def _state(module: torch.nn.Module) -> _State:
    st = _STATES.get(module)
    if st is None:
        st = _STATES[module] = _State()
    return st


# ------------------------------------------------------------------------------------------
# Targets: pipeline / bare model / torch.compile'd model -> (prefix, module) components
# ------------------------------------------------------------------------------------------


def _unwrap(m):
    """The module a torch.compile'd OptimizedModule wraps (the one whose parameters the graph reads)."""
    while hasattr(m, "_orig_mod") and isinstance(m, torch.nn.Module):
        m = m._orig_mod
    return m


def _is_pipeline(obj) -> bool:
    return not isinstance(obj, torch.nn.Module) and hasattr(obj, "components")


def _components(target) -> tuple[list[tuple[str, torch.nn.Module]], bool]:
    """([(prefix, module)], is_pipeline). Denoiser first."""
    if _is_pipeline(target):
        comps = []
        for attr in KNOWN_PREFIXES:
            m = getattr(target, attr, None)
            if isinstance(m, torch.nn.Module):
                comps.append((attr, _unwrap(m)))
        if not comps:
            raise LoraError(f"{type(target).__name__} has none of {KNOWN_PREFIXES}: nothing a LoRA can patch")
        return comps, True
    if not isinstance(target, torch.nn.Module):
        raise TypeError(f"expected a diffusers pipeline or a torch.nn.Module, got {type(target).__name__}")
    model = _unwrap(target)
    return [(_prefix_of(model), model)], False


def _prefix_of(model: torch.nn.Module) -> str:
    if _is_text_encoder(model):
        return "text_encoder"
    return "unet" if type(model).__name__.startswith("UNet") else "transformer"


def _is_text_encoder(model: torch.nn.Module) -> bool:
    try:
        import transformers

        return isinstance(model, transformers.PreTrainedModel)
    except ImportError:  # pragma: no cover
        return False


def _pipeline_class(target, comps):
    """The diffusers pipeline class whose `lora_state_dict` knows this model's LoRA formats."""
    import diffusers

    if _is_pipeline(target) and hasattr(type(target), "lora_state_dict"):
        return type(target)
    denoiser = next((m for p, m in comps if p in DENOISER_ATTRS), None)
    if denoiser is None:  # a bare text encoder: SD1.5's reader knows lora_te_* and text_encoder.*
        return diffusers.StableDiffusionPipeline
    name = type(denoiser).__name__
    if name.startswith("UNet"):
        sdxl = getattr(getattr(denoiser, "config", None), "addition_embed_type", None) == "text_time"
        return diffusers.StableDiffusionXLPipeline if sdxl else diffusers.StableDiffusionPipeline
    cls = getattr(diffusers, _PIPELINE_FOR_MODEL.get(name, ""), None)
    if cls is None:
        log.warning("lyradynamo.lora: no known LoRA reader for %s; using StableDiffusion3Pipeline's "
                    "(diffusers/peft keys only)", name)
        cls = diffusers.StableDiffusion3Pipeline
    return cls


# ------------------------------------------------------------------------------------------
# Reading + normalising (diffusers' own conversion)
# ------------------------------------------------------------------------------------------


def _read(source, pipe_cls, comps) -> tuple[dict, dict | None, dict | None, str]:
    """(state_dict, network_alphas, metadata, description) through pipe_cls.lora_state_dict."""
    kwargs: dict[str, Any] = {"return_lora_metadata": True, "local_files_only": True}
    params = inspect.signature(pipe_cls.lora_state_dict).parameters
    if "return_alphas" in params:
        kwargs["return_alphas"] = True
    from diffusers.loaders.lora_pipeline import StableDiffusionXLLoraLoaderMixin

    if issubclass(pipe_cls, StableDiffusionXLLoraLoaderMixin):  # as its load_lora_weights does
        unet = next((m for p, m in comps if p == "unet"), None)
        if unet is not None:
            kwargs["unet_config"] = unet.config
    if isinstance(source, dict):
        what = f"state dict ({len(source)} keys)"
        if not source:
            raise LoraError("not a LoRA: the state dict is empty")
        bad = [k for k, v in source.items() if not isinstance(v, torch.Tensor) and not isinstance(v, (int, float))]
        if bad:
            raise LoraError(f"not a LoRA state dict: {len(bad)} values are not tensors, e.g. {bad[:_SHOW]}")
        arg = dict(source)  # diffusers pops keys from the dict it is given
    else:
        path = os.fspath(source)
        what = repr(path)
        if os.path.isfile(path):
            _check_safetensors(path)
            arg = os.path.dirname(os.path.abspath(path))
            kwargs["weight_name"] = os.path.basename(path)
        elif os.path.isdir(path):
            arg = path
        else:
            raise FileNotFoundError(f"lyradynamo.lora: no such LoRA file or folder: {path!r} (local paths only)")
    try:
        out = pipe_cls.lora_state_dict(arg, **kwargs)
    except LoraError:
        raise
    except Exception as exc:  # noqa: BLE001 - diffusers raises many types for unreadable input
        raise LoraError(f"cannot read LoRA {what} with {pipe_cls.__name__}.lora_state_dict: "
                        f"{type(exc).__name__}: {exc}"[:2000]) from exc
    if isinstance(out, dict):
        sd, alphas, md = out, None, None
    elif len(out) == 3:
        sd, alphas, md = out
    else:
        sd, md = out
        alphas = None
    if not isinstance(sd, dict) or not sd:
        raise LoraError(f"not a LoRA: {what} holds no tensors")
    lora_keys = [k for k in sd if "lora" in k]
    if not lora_keys:
        raise LoraError(f"not a LoRA: none of the {len(sd)} keys of {what} is a LoRA weight "
                        f"(no 'lora' in the names), e.g. {list(sd)[:_SHOW]}")
    other = [k for k in sd if "lora" not in k]
    if other:
        raise LoraError(f"{what}: {len(other)} keys are not LoRA weights (full weights or norms are not "
                        f"supported), e.g. {other[:_SHOW]}")
    return sd, alphas or None, md, what


def _check_safetensors(path: str) -> None:
    try:
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            f.keys()
    except Exception as exc:  # noqa: BLE001
        raise LoraError(f"not a LoRA: {path!r} is not a safetensors file ({type(exc).__name__}: {exc})"[:1000]) from exc


def _split(sd: dict, comps, is_pipe: bool) -> tuple[dict[str, dict], list[str], list[str]]:
    """Keys per component prefix (prefix stripped), keys for components not given, unassigned keys."""
    present = {p for p, _ in comps}
    per: dict[str, dict] = {p: {} for p in present}
    absent, unknown = [], []
    own = comps[0][0]
    for k, v in sd.items():
        head, _, rest = k.partition(".")
        if head in present:
            per[head][rest] = v
        elif head in KNOWN_PREFIXES:
            absent.append(k)
        elif not is_pipe:  # a bare model's LoRA may have unprefixed keys
            per[own][k] = v
        else:
            unknown.append(k)
    return per, absent, unknown


def _component_alphas(alphas, prefix: str, bare_unprefixed: bool):
    if not alphas:
        return None
    out = {k.removeprefix(f"{prefix}."): v for k, v in alphas.items() if k.split(".")[0] == prefix}
    if bare_unprefixed:
        out.update({k: v for k, v in alphas.items() if k.split(".")[0] not in KNOWN_PREFIXES})
    return out or None


def _component_metadata(md, prefix: str):
    if md is None:
        return None
    return {k.removeprefix(f"{prefix}."): v for k, v in md.items() if k.startswith(f"{prefix}.")}


def _normalise_denoiser(sd, alphas, md):
    """What diffusers' ModelMixin.load_lora_adapter does before peft: peft keys + LoraConfig."""
    from diffusers.utils.peft_utils import _create_lora_config
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

    if any(".lokr_" in k for k in sd):
        raise LoraError("LoKr adapters are not supported by lyradynamo.lora (only LoRA)")
    if "lora_A" not in next(iter(sd)):
        sd = convert_unet_state_dict_to_peft(sd)
    if "lora_controlnet" in sd:
        raise LoraError("SAI Control-LoRAs are not supported by lyradynamo.lora")
    rank = {f"^{k}": v.shape[1] for k, v in sd.items() if "lora_B" in k and v.ndim > 1}
    if not rank:
        raise LoraError("not a LoRA: no lora_B/lora_up weight matrices")
    cfg = _create_lora_config(sd, alphas, md, rank)
    return sd, cfg


def _normalise_text_encoder(sd, alphas, md, text_encoder):
    """What diffusers' _load_lora_into_text_encoder does before transformers/peft."""
    from diffusers.utils.peft_utils import _create_lora_config
    from diffusers.utils.state_dict_utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft

    sd = convert_state_dict_to_peft(convert_state_dict_to_diffusers(sd))
    if not hasattr(text_encoder, "text_model"):
        sd = {k.removeprefix("text_model."): v for k, v in sd.items()}
    rank = {}
    for name, _ in text_encoder.named_modules():
        if name.endswith((".q_proj", ".k_proj", ".v_proj", ".out_proj", ".fc1", ".fc2")):
            if f"{name}.lora_B.weight" in sd:
                rank[f"{name}.lora_B.weight"] = sd[f"{name}.lora_B.weight"].shape[1]
    if not rank:
        raise LoraError("text-encoder LoRA: no lora_B weight on an attention/MLP projection "
                        "(diffusers cannot size it either)")
    cfg = _create_lora_config(sd, alphas, md, rank, is_unet=False)
    return sd, cfg


def _scaling(cfg, module_name: str) -> float:
    """alpha / r for this module, resolved through the config's patterns as peft does."""
    from peft.utils.other import get_pattern_key

    r = cfg.rank_pattern.get(get_pattern_key(cfg.rank_pattern.keys(), module_name), cfg.r)
    alpha = cfg.alpha_pattern.get(get_pattern_key(cfg.alpha_pattern.keys(), module_name), cfg.lora_alpha)
    return alpha / math.sqrt(r) if getattr(cfg, "use_rslora", False) else alpha / r


def _build_layers(prefix, module, sd, cfg, errors: dict) -> dict[str, _Layer]:
    """Map peft keys to modules and check every shape; problems go into `errors`."""
    if getattr(cfg, "use_dora", False) or any("lora_magnitude_vector" in k for k in sd):
        errors["unsupported"].append(f"{prefix}: DoRA (lora_magnitude_vector) is not supported")
        return {}
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in sd.items():
        for tail in (".lora_A.weight", ".lora_B.weight", ".lora_B.bias"):
            if k.endswith(tail):
                groups.setdefault(k[: -len(tail)], {})[tail[1:]] = v
                break
        else:
            errors["unmatched"].append(f"{prefix}.{k}")
    modules = dict(module.named_modules())
    layers = {}
    for name, g in groups.items():
        full = f"{prefix}.{name}"
        mod = modules.get(name)
        if mod is None:
            errors["unmatched"].extend(f"{full}.{t}" for t in g)
            continue
        if "lora_A.weight" not in g or "lora_B.weight" not in g:
            errors["shape"].append(f"{full}: lora_A and lora_B must both be present (has {sorted(g)})")
            continue
        A, B, bias = g["lora_A.weight"], g["lora_B.weight"], g.get("lora_B.bias")
        W = getattr(mod, "weight", None)
        if not isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)) or not isinstance(W, torch.nn.Parameter):
            errors["unsupported"].append(f"{full}: {type(mod).__name__} (only Linear and Conv2d can be patched)")
            continue
        msg = _shape_problem(mod, A, B, bias)
        if msg:
            errors["shape"].append(f"{full}: {msg}")
            continue
        layers[name] = _Layer(name, A, B, _scaling(cfg, name), bias)
    return layers


def _shape_problem(mod, A, B, bias) -> str | None:
    W = mod.weight
    if isinstance(mod, torch.nn.Linear):
        ok = A.dim() == 2 and B.dim() == 2 and A.shape[0] == B.shape[1] and (B.shape[0], A.shape[1]) == tuple(W.shape)
        got = f"lora_B {tuple(B.shape)} @ lora_A {tuple(A.shape)}"
    else:
        ok = (A.dim() == 4 and B.dim() == 4 and A.shape[0] == B.shape[1] and tuple(B.shape[2:]) == (1, 1)
              and mod.groups == 1 and (B.shape[0], A.shape[1]) + tuple(A.shape[2:]) == tuple(W.shape))
        got = f"lora_B {tuple(B.shape)} * lora_A {tuple(A.shape)}" + ("" if mod.groups == 1 else f" (groups={mod.groups})")
    if not ok:
        return f"weight is {tuple(W.shape)} but the LoRA gives {got}"
    if bias is not None:
        if mod.bias is None:
            return "the LoRA has a bias (lora_B.bias) but the layer has none"
        if tuple(bias.shape) != tuple(mod.bias.shape):
            return f"bias is {tuple(mod.bias.shape)} but lora_B.bias is {tuple(bias.shape)}"
    return None


def _raise_errors(errors: dict, what: str) -> None:
    parts = []
    if errors["unmatched"]:
        u = errors["unmatched"]
        parts.append(f"{len(u)} keys match no module of the model, e.g. {u[:_SHOW]}")
    if errors["shape"]:
        s = errors["shape"]
        parts.append(f"{len(s)} layers do not fit the model: " + "; ".join(s[:_SHOW]))
    if errors["unsupported"]:
        s = errors["unsupported"]
        parts.append(f"{len(s)} unsupported: " + "; ".join(s[:_SHOW]))
    if parts:
        raise LoraError(f"LoRA {what} does not fit this model (nothing was changed): " + ". ".join(parts))


# ------------------------------------------------------------------------------------------
# Patching
# ------------------------------------------------------------------------------------------


def _params_of(layer: _Layer) -> list[str]:
    names = [f"{layer.module}.weight"]
    if layer.bias is not None:
        names.append(f"{layer.module}.bias")
    return names


def _refresh(module: torch.nn.Module, st: _State, param_names: Iterable[str], budget: "_GpuBudget") -> int:
    """Recompute each named parameter from its backup and the active adapters, in place.

    Backups are taken here the first time a parameter is touched; a parameter no loaded adapter
    touches any more is restored from its backup, which is then dropped."""
    params = dict(module.named_parameters())
    n = 0
    for pname in dict.fromkeys(param_names):
        # a quantised weight's values live in its master copy (maybe on the host): patch that
        # one; the delta is computed on the live Parameter's device (the GPU) and copied over
        live = params[pname]
        param = master_weight(live)
        mod_name, _, kind = pname.rpartition(".")
        touching = [(a, a.layers[mod_name]) for a in st.adapters.values() if mod_name in a.layers
                    and (kind == "weight" or a.layers[mod_name].bias is not None)]
        if pname not in st.backup:
            if not touching:
                continue
            spare = st.spare.pop(pname, None)
            st.backup[pname] = spare[0] if spare is not None and spare[1] == _identity(param) else _backup(param, budget)
        orig = st.backup[pname]
        active = [(a.scale, layer) for a, layer in touching if a.scale != 0.0]
        with torch.no_grad():
            if not active:
                param.copy_(orig, non_blocking=True)  # exact original bits (a host orig is pinned)
            else:
                new = orig.to(device=live.device, dtype=torch.float32, non_blocking=True, copy=True)
                for scale, layer in active:
                    if kind == "weight":
                        new.add_(layer.delta(live), alpha=scale)
                    else:
                        new.add_(layer.bias.float() * layer.scaling, alpha=scale)
                param.copy_(new)  # bumps param._version: derived (quantised) copies are re-made
        if not touching:
            st.spare[pname] = (st.backup.pop(pname), _identity(param))
        n += 1
    return n


def _identity(param: torch.Tensor) -> tuple:
    """What must not change for a spare backup to stay valid: the object, its storage address
    and its version counter (bumped by every in-place write, ours included: taken after ours)."""
    return id(param), param.data_ptr(), param._version


class _GpuBudget:
    """Bytes of GPU backups config.lora_backup still allows, per device, for one apply."""

    def __init__(self) -> None:
        self.left: dict[torch.device, float] = {}
        self.logged: set[torch.device] = set()  # devices whose overflow to the host was logged

    def take(self, param: torch.Tensor) -> bool:
        if config.lora_backup != "auto":
            return config.lora_backup == "gpu"
        nbytes = param.numel() * param.element_size()
        dev = param.device
        if dev not in self.left:
            free, total = torch.cuda.mem_get_info(dev)
            cached = torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev)
            self.left[dev] = free + cached - float(config.lora_backup_reserve) * total
        if self.left[dev] < nbytes:
            if dev not in self.logged:
                self.logged.add(dev)
                log.info("lyradynamo.lora: GPU backups would leave less than lora_backup_reserve=%g of %s "
                         "free; further backups go to host memory (each switch then copies those weights "
                         "host->device)", float(config.lora_backup_reserve), dev)
            return False
        self.left[dev] -= nbytes
        return True


def _backup(param: torch.Tensor, budget: _GpuBudget) -> torch.Tensor:
    if param.device.type == "cuda" and budget.take(param):
        return param.detach().clone()
    t = param.detach().to("cpu", copy=True)
    if param.device.type == "cuda":
        try:
            t = t.pin_memory()  # faster host->device restore on every swap
        except RuntimeError:
            pass
    return t


def _apply(comps_states, changed: dict[int, set]) -> int:
    n = 0
    budget = _GpuBudget()
    for module, st in comps_states:
        names = changed.get(id(module))
        if names:
            n += _refresh(module, st, sorted(names), budget)
    return n


def _touched(adapter: _Adapter, module) -> set[str]:
    out: set[str] = set()
    for layer in adapter.layers.values():
        out.update(_params_of(layer))
    return out


# ------------------------------------------------------------------------------------------
# Public API
# ------------------------------------------------------------------------------------------


def load_lora(model_or_pipe, source, scale: float = 1.0, name: str | None = None) -> str:
    """Load a LoRA and fuse it into the weights in place (scaled by `scale`); returns its name.

    `model_or_pipe`: a diffusers pipeline (its unet/transformer and text encoders are patched),
    a bare model, or a torch.compile'd model. `source`: a .safetensors file, a folder holding
    one (diffusers' naming), or a state dict. Raises `LoraError` (a ValueError) before changing
    anything when keys match no module, shapes do not fit, the name is taken or the input is
    not a LoRA.
    """
    t0 = time.perf_counter()
    comps, is_pipe = _components(model_or_pipe)
    existing = _names(comps)
    if name is None:
        i = 0
        while f"lora_{i}" in existing:
            i += 1
        name = f"lora_{i}"
    elif name in existing:
        raise LoraError(f"a LoRA named {name!r} is already loaded (loaded: {list(existing)}); "
                        "unload it first or pick another name")
    scale = float(scale)
    pipe_cls = _pipeline_class(model_or_pipe, comps)
    sd, alphas, md, what = _read(source, pipe_cls, comps)
    per, absent, unknown = _split(sd, comps, is_pipe)
    errors: dict[str, list] = {"unmatched": list(unknown), "shape": [], "unsupported": []}
    if absent:
        heads = sorted({k.split(".")[0] for k in absent})
        log.warning("lyradynamo.lora: %s: %d keys for %s skipped (not part of the %s given)", what, len(absent),
                    heads, "pipeline" if is_pipe else "model")
    planned: dict[str, dict[str, _Layer]] = {}
    for prefix, module in comps:
        csd = per.get(prefix)
        if not csd:
            continue
        bare = not is_pipe and any(k.split(".")[0] not in KNOWN_PREFIXES for k in sd)
        calphas = _component_alphas(alphas, prefix, bare)
        cmd = _component_metadata(md, prefix)
        try:
            if prefix in TEXT_ENCODER_ATTRS or _is_text_encoder(module):
                psd, cfg = _normalise_text_encoder(csd, calphas, cmd, module)
            else:
                psd, cfg = _normalise_denoiser(csd, calphas, cmd)
        except LoraError:
            raise
        except Exception as exc:  # noqa: BLE001 - conversion of an odd file
            raise LoraError(f"cannot convert the {prefix} part of LoRA {what}: {type(exc).__name__}: {exc}"[:2000]) from exc
        planned[prefix] = _build_layers(prefix, module, psd, cfg, errors)
    _raise_errors(errors, what)
    n_layers = sum(len(v) for v in planned.values())
    if n_layers == 0:
        raise LoraError(f"LoRA {what} has no layer for the components given "
                        f"({[p for p, _ in comps]}); nothing was changed")
    # Factors to the parameters' devices (the model is still untouched).
    modules = dict(comps)
    for prefix, layers in planned.items():
        for layer in layers.values():
            dev = modules[prefix].get_submodule(layer.module).weight.device
            layer.A = layer.A.to(dev, non_blocking=True)
            layer.B = layer.B.to(dev, non_blocking=True)
            if layer.bias is not None:
                layer.bias = layer.bias.to(dev, non_blocking=True)
    # Register and patch; on failure undo the registration and restore what was written.
    comps_states, changed = [], {}
    for prefix, module in comps:
        if prefix not in planned or not planned[prefix]:
            continue
        st = _state(module)
        ad = _Adapter(planned[prefix], scale)
        st.adapters[name] = ad
        comps_states.append((module, st))
        changed[id(module)] = _touched(ad, module)
    try:
        n = _apply(comps_states, changed)
    except BaseException:
        for module, st in comps_states:
            st.adapters.pop(name, None)
        _apply(comps_states, changed)
        raise
    _sync(comps_states)
    dt = time.perf_counter() - t0
    log.info("lyradynamo.lora: loaded %r from %s: %d layers patched (%d tensors) in %s, scale %g, %.1f ms",
             name, what, n_layers, n, "+".join(planned), scale, dt * 1e3)
    return name


def unload_lora(model_or_pipe, name: str | None = None) -> None:
    """Remove one LoRA (`name`) or all (None); touched weights are recomputed, and weights no LoRA
    touches any more get their original bits back."""
    t0 = time.perf_counter()
    comps, _ = _components(model_or_pipe)
    existing = _names(comps)
    if name is not None and name not in existing:
        raise LoraError(f"no LoRA named {name!r} is loaded (loaded: {list(existing)})")
    comps_states, changed = [], {}
    for _prefix, module in comps:
        st = _STATES.get(module)
        if st is None:
            continue
        drop = list(st.adapters) if name is None else [n for n in st.adapters if n == name]
        if not drop:
            continue
        names: set[str] = set()
        for n in drop:
            names |= _touched(st.adapters.pop(n), module)
        comps_states.append((module, st))
        changed[id(module)] = names
    n = _apply(comps_states, changed)
    _sync(comps_states)
    log.info("lyradynamo.lora: unloaded %s: %d tensors restored/recomputed in %.1f ms",
             "all LoRAs" if name is None else repr(name), n, (time.perf_counter() - t0) * 1e3)


def set_loras(model_or_pipe, scales: dict[str, float]) -> None:
    """Set the scale of every loaded LoRA: names in `scales` get theirs, the others 0 (they stay
    loaded). Only weights whose combination changes are recomputed."""
    comps, _ = _components(model_or_pipe)
    existing = _names(comps)
    unknown = [n for n in scales if n not in existing]
    if unknown:
        raise LoraError(f"no LoRA named {unknown} is loaded (loaded: {list(existing)})")
    new = {n: float(scales.get(n, 0.0)) for n in existing}
    comps_states, changed = [], {}
    for _prefix, module in comps:
        st = _STATES.get(module)
        if st is None:
            continue
        names: set[str] = set()
        for n, ad in st.adapters.items():
            if ad.scale != new[n]:
                names |= _touched(ad, module)
        for n, ad in st.adapters.items():
            ad.scale = new[n]
        if names:
            comps_states.append((module, st))
            changed[id(module)] = names
    _apply(comps_states, changed)
    _sync(comps_states)


def release_backups(model_or_pipe) -> int:
    """Free the backups kept for weights that no loaded LoRA touches (see the module
    docstring); returns how many. The next load of a LoRA takes fresh backups."""
    comps, _ = _components(model_or_pipe)
    n = 0
    for _prefix, module in comps:
        st = _STATES.get(module)
        if st is not None:
            n += len(st.spare)
            st.spare.clear()
    return n


def list_loras(model_or_pipe) -> dict[str, float]:
    """{name: scale} of the loaded LoRAs, in load order."""
    comps, _ = _components(model_or_pipe)
    return _names(comps)


def _names(comps) -> dict[str, float]:
    out: dict[str, float] = {}
    for _prefix, module in comps:
        st = _STATES.get(module)
        if st is not None:
            for n, ad in st.adapters.items():
                out.setdefault(n, ad.scale)
    return out


def _sync(comps_states) -> None:
    """Wait for the patch on accelerators: the next image may start right after this returns."""
    devs = set()
    for module, _st in comps_states:
        p = next(module.parameters(), None)
        if p is not None and p.device.type == "cuda":
            devs.add(p.device)
    for d in devs:
        torch.cuda.synchronize(d)
