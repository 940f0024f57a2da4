"""lyra::attention: scaled dot-product attention that takes the projections' own layout.

layout="bhld": q, k, v and the output are (B, H, L, D), as F.scaled_dot_product_attention.
layout="blhd": they are (B, L, H, D), the layout a linear projection produces after
`unflatten(-1, (H, D))`, so the pass removes the head transposes around the call.
On CUDA the call goes to torch's SDPA backends (cuDNN / flash / efficient), chosen by
`lyradynamo.config.attention_backend`, or to the `flash_attn` package when importable; long
float32 attentions (VAE decoders) to TF32 tensor-core GEMMs (attention_fp32.py,
`lyradynamo.config.fp32_attention`); 16-bit attention over at most 128 keys (cross-attention on
text tokens) of the sizes where it measured faster, to lyra's own kernel (attention_short_kv.py,
`lyradynamo.config.short_kv_attention`).
"""
from __future__ import annotations

import contextlib
import functools
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import attention_fp32, attention_short_kv
from ._common import csrc, record_fallback, unsupported_reason

LAYOUTS = ("bhld", "blhd")


def _to_bhld(t: Tensor, layout: str) -> Tensor:
    return t if layout == "bhld" else t.transpose(1, 2)


def _from_bhld(out: Tensor, layout: str) -> Tensor:
    """A (B, H, L, D) result in `layout`, contiguous in blhd (as the projections' layout is)."""
    return out if layout == "bhld" else out.transpose(1, 2).contiguous()


def attention_reference(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor],
                        scale: Optional[float], is_causal: bool, layout: str) -> Tensor:
    out = F.scaled_dot_product_attention(
        _to_bhld(q, layout), _to_bhld(k, layout), _to_bhld(v, layout),
        attn_mask=attn_mask, dropout_p=0.0, is_causal=is_causal, scale=scale)
    return _from_bhld(out, layout)


def checked_mask(attn_mask: Optional[Tensor]) -> Optional[Tensor]:
    """The mask as unsupported_reason should see it: a bool mask (True: attend, Qwen-Image's and
    Lumina2's padding masks) goes to torch SDPA as it is, so only a float mask's dtype is checked."""
    return None if attn_mask is not None and attn_mask.dtype == torch.bool else attn_mask


def _check(q: Tensor, k: Tensor, v: Tensor, layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"lyra::attention: layout={layout!r} is not one of {LAYOUTS}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"lyra::attention: {name} must be 4-D, got shape {tuple(t.shape)}")


@torch.library.custom_op("lyra::attention", mutates_args=())
def attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor], scale: Optional[float],
              is_causal: bool, layout: str) -> Tensor:
    _check(q, k, v, layout)
    return attention_reference(q, k, v, attn_mask, scale, is_causal, layout)


@attention.register_fake
def _(q, k, v, attn_mask, scale, is_causal, layout):
    _check(q, k, v, layout)
    # (B, H, Lq, Dv) or (B, Lq, H, Dv): q's first three dims in either layout
    return q.new_empty((q.shape[0], q.shape[1], q.shape[2], v.shape[3]))


def _sdpa_backends(choice: str):
    from torch.nn.attention import SDPBackend

    return {
        "auto": [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
                 SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH],
        "sdpa": None,
        "cudnn": [SDPBackend.CUDNN_ATTENTION],
        "flash": [SDPBackend.FLASH_ATTENTION],
        "math": [SDPBackend.MATH],
    }.get(choice)


@attention.register_kernel("cuda")
def _(q, k, v, attn_mask, scale, is_causal, layout):
    from lyradynamo import attention_prewarm, config

    _check(q, k, v, layout)
    reason = unsupported_reason(q=q, k=k, v=v, attn_mask=checked_mask(attn_mask))
    if reason:
        record_fallback("attention", reason)
        return attention_reference(q, k, v, attn_mask, scale, is_causal, layout)
    if attention_fp32.wanted(q, k, v, attn_mask, is_causal, layout, config.fp32_attention):
        return attention_fp32.attention_tf32(q, k, v, scale, layout, config.fp32_attention)
    choice = config.attention_backend
    if choice == "auto":
        out = _short_kv(q, k, v, attn_mask, scale, is_causal, layout, config.short_kv_attention)
        if out is not None:
            return out
    if _flash_attn_wanted(choice, q, attn_mask):
        return _flash_attn(q, k, v, scale, is_causal, layout)
    if choice == "flash_attn" and attn_mask is None and q.dtype != torch.float32:
        why = "package not importable" if _flash_attn_func() is None else f"head dim {q.shape[-1]}"
        record_fallback("attention", f"flash_attn: {why}; used torch SDPA")
    attention_prewarm.join(q, k, v, scale, is_causal, layout)
    backends = _sdpa_backends(choice if choice != "flash_attn" else "auto")
    if backends is None:
        return attention_reference(q, k, v, attn_mask, scale, is_causal, layout)
    from torch.nn.attention import sdpa_kernel

    try:
        with sdpa_kernel(backends):
            return attention_reference(q, k, v, attn_mask, scale, is_causal, layout)
    except RuntimeError as exc:
        # a backend forced by the config that cannot take this call (e.g. flash past head dim
        # 256, a VAE's 512): SDPA refuses on the host before launching anything; run it with
        # torch's own choice instead, counted as a fallback that names the shape
        if choice in ("auto", "sdpa") or "No available kernel" not in str(exc):
            raise
    record_fallback("attention", f"attention_backend={choice!r} cannot run {q.dtype} q {tuple(q.shape)}, "
                    f"k {tuple(k.shape)} ({layout}{', mask' if attn_mask is not None else ''}); "
                    "used torch SDPA's choice")
    return attention_reference(q, k, v, attn_mask, scale, is_causal, layout)


def warm_sdpa(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float], is_causal: bool, layout: str) -> bool:
    """Run one mask-free call through torch SDPA exactly as the CUDA kernel would (its backends,
    its layout), for attention_prewarm's worker threads: nothing counted, nothing logged. False,
    with nothing run, where the kernel would not send this call to torch SDPA."""
    from lyradynamo import config

    if unsupported_reason(q=q, k=k, v=v) or attention_fp32.wanted(q, k, v, None, is_causal, layout,
                                                                     config.fp32_attention):
        return False
    choice = config.attention_backend
    if choice == "auto" and _short_kv_wanted(q, k, v, None, is_causal, layout, config.short_kv_attention):
        return False
    if _flash_attn_wanted(choice, q, None):
        return False
    backends = _sdpa_backends(choice if choice != "flash_attn" else "auto")
    from torch.nn.attention import sdpa_kernel

    with sdpa_kernel(backends) if backends is not None else contextlib.nullcontext():
        attention_reference(q, k, v, None, scale, is_causal, layout)
    return True


# short_kv_attention = "auto": the kernel where it measured at least as fast as cuDNN. Session 19
# run F (benchmarks/results/h100-2026-11-27-s19-runF-short-kv-probe-v3.json; benchmarks/
# short_kv_probe.py): H100, fp16, 77 keys, k / v out of one grouped buffer, us per call in a CUDA
# graph of 50 calls:
#
#   shape      (B, Lq, H, D)       B*Lq*H   sdpa (cuDNN)   short_kv
#   sdxl-l1    (2, 4096, 10, 64)    81920      14.97        18.91    slower: cuDNN
#   sdxl-l2    (2, 1024, 20, 64)    40960      10.95        10.57
#   sd15-l1    (2, 4096,  8, 40)    65536      14.42        14.29
#   sd15-l2    (2, 1024,  8, 80)    16384       8.25         7.60
#   sd15-l3    (2,  256,  8, 160)    4096       8.79         6.33
#   sd15-mid   (2,   64,  8, 160)    1024       8.31         5.85
#
# Rule: at most AUTO_MAX_ROW_HEADS = 2^16 (query row, head) pairs per call, B * Lq * H: the
# kernel's grid is B * ceil(Lq / 64) * H blocks, each copying its head's K / V before its math,
# and its margin over cuDNN shrinks as that grid grows (1024 blocks at sd15-l1: even; 1280 at
# sdxl-l1: 26 % slower). Rows per (batch, head) alone cannot split the table (sdxl-l1 and sd15-l1
# both have 4096). Only 77 keys, batch 2 and fp16 were measured: other key counts (up to 128),
# batch sizes and bf16 follow the same rule unmeasured (short_kv_probe.py --keys / --dtype).
def _short_kv_wanted(q, k, v, attn_mask, is_causal, layout, setting: str) -> bool:
    """Whether this call goes to lyra's short-KV kernel: where `setting` and the rule above want
    it and the tensors suit it (attention_short_kv.unsupported). Otherwise the caller runs SDPA
    as before (not a fallback: the kernel is an option for some shapes, not the op's main path)."""
    if layout != "blhd" or k.shape[1] > attention_short_kv.MAX_KEYS:
        return False
    if not attention_short_kv.prefer(setting, q.shape[0], q.shape[1], q.shape[2]):
        return False
    return attention_short_kv.unsupported(q, k, v, attn_mask, is_causal, layout, csrc()) is None


def _short_kv(q, k, v, attn_mask, scale, is_causal, layout, setting: str) -> Optional[Tensor]:
    """The short-KV kernel's output for this call where _short_kv_wanted, else None."""
    if not _short_kv_wanted(q, k, v, attn_mask, is_causal, layout, setting):
        return None
    return attention_short_kv.run(csrc(), q, k, v, scale)


@functools.lru_cache(maxsize=None)
def _flash_attn_func():
    """The flash_attn package's entry point, or None; looked up once per process (a failed
    import is not cached by Python: retrying it on every call searched sys.path each time,
    ~0.1 ms per attention call, on the critical path of every warm-up and capture)."""
    try:
        from flash_attn import flash_attn_func  # type: ignore[import-not-found]
    except ImportError:
        return None
    return flash_attn_func


def _flash_attn_wanted(choice: str, q: Tensor, attn_mask) -> bool:
    """Whether this call goes to the flash_attn package (importable, a 16-bit call without mask,
    a head dim it takes)."""
    return (choice in ("auto", "flash_attn") and attn_mask is None and q.dtype != torch.float32
            and _flash_attn_func() is not None and q.shape[-1] <= 256 and q.shape[-1] % 8 == 0)


def _flash_attn(q, k, v, scale, is_causal, layout) -> Tensor:
    qb, kb, vb = (t if layout == "blhd" else t.transpose(1, 2) for t in (q, k, v))
    out = _flash_attn_func()(qb, kb, vb, softmax_scale=scale, causal=is_causal)
    return out if layout == "blhd" else out.transpose(1, 2)
