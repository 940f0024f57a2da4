"""lyra::attention: scaled dot-product attention that takes the projections' own layout.

layout="bhld": q, k, v and the output are (B, H, L, D), as F.scaled_dot_product_attention.
layout="blhd": they are (B, L, H, D), the layout a linear projection produces after
`unflatten(-1, (H, D))`, so the pass removes the head transposes around the call.
On CUDA the call goes to torch's SDPA backends (cuDNN / flash / efficient), chosen by
`lyradynamo.config.attention_backend`, or to the `flash_attn` package when importable; long
float32 attentions (VAE decoders) to TF32 tensor-core GEMMs (attention_fp32.py,
`lyradynamo.config.fp32_attention`).
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import attention_fp32
from ._common import record_fallback, unsupported_reason

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
    from lyradynamo import config

    _check(q, k, v, layout)
    reason = unsupported_reason(q=q, k=k, v=v, attn_mask=attn_mask)
    if reason:
        record_fallback("attention", reason)
        return attention_reference(q, k, v, attn_mask, scale, is_causal, layout)
    if attention_fp32.wanted(q, k, v, attn_mask, is_causal, layout, config.fp32_attention):
        return attention_fp32.attention_tf32(q, k, v, scale, layout, config.fp32_attention)
    choice = config.attention_backend
    if choice in ("auto", "flash_attn") and attn_mask is None and q.dtype != torch.float32:
        out = _flash_attn(q, k, v, scale, is_causal, layout)
        if out is not None:
            return out
        if choice == "flash_attn":
            record_fallback("attention", "flash_attn package not importable; used torch SDPA")
    backends = _sdpa_backends(choice if choice != "flash_attn" else "auto")
    if backends is None:
        return attention_reference(q, k, v, attn_mask, scale, is_causal, layout)
    from torch.nn.attention import sdpa_kernel

    with sdpa_kernel(backends):
        return attention_reference(q, k, v, attn_mask, scale, is_causal, layout)


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


def _flash_attn(q, k, v, scale, is_causal, layout) -> Optional[Tensor]:
    flash_attn_func = _flash_attn_func()
    if flash_attn_func is None:
        return None
    if q.shape[-1] > 256 or q.shape[-1] % 8:
        return None
    qb, kb, vb = (t if layout == "blhd" else t.transpose(1, 2) for t in (q, k, v))
    out = flash_attn_func(qb, kb, vb, softmax_scale=scale, causal=is_causal)
    return out if layout == "blhd" else out.transpose(1, 2)
