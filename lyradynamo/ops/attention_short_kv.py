"""Attention over few keys (cross-attention on text tokens) in lyra's own kernel,
csrc/attention_short_kv.cu, its output in 16 bits or quantised per row:

    lyra::attention_quant(q, k, v, scale, kind, inv_smooth) -> (oq, o_scale)
        oq (B, Lq, H, D) of numerics.QDTYPE[kind], o_scale (B, Lq) float32
        = numerics.quantize_rows(lyra::attention(q, k, v, None, scale, False, "blhd").flatten(2),
                                 kind, inv_smooth), unflattened

q (B, Lq, H, D), k / v (B, Lk, H, D) in the projections' layout. One kernel computes every head
of a block of query rows and quantises whole rows, so the attention output is never written in
16 bits when only quantised linears read it (quant/attention.py rewrites those). lyra::attention
itself runs the kernel's 16-bit form for such shapes (`config.short_kv_attention`). Shapes the
kernel does not take (more than MAX_KEYS keys, other head dims, a mask) run cuDNN / flash and,
for attention_quant, the quantise pass, with the reason recorded as a fallback.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ..quant import numerics
from ._common import DTYPE_CODES, csrc, ptr, record_fallback, stream_handle

HEAD_DIMS = (40, 64, 80, 128, 160)
MAX_KEYS = 128
MAX_WIDTH = 3072  # H * D: a block's staged rows live in shared memory


def unsupported(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False,
                layout: str = "blhd", C=None) -> Optional[str]:
    """Why the kernel cannot run this attention (None when it can). Real tensors only."""
    if C is None or not hasattr(C, "attention_short_kv"):
        return "csrc not built with attention_short_kv"
    if layout != "blhd" or attn_mask is not None or is_causal:
        return "the kernel takes blhd attention without a mask, not causal"
    if q.dtype not in (torch.float16, torch.bfloat16) or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"dtypes {q.dtype} / {k.dtype} / {v.dtype} (the kernel takes one of float16, bfloat16)"
    if q.device.type != "cuda" or k.device != q.device or v.device != q.device:
        return "q, k and v must be on one CUDA device"
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        return "q, k, v must be 4-D with k and v of one shape"
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    if k.shape[0] != B or k.shape[2] != H or k.shape[3] != D:
        return f"k / v shape {tuple(k.shape)} against q {tuple(q.shape)} (same B, H, D needed)"
    if not 1 <= Lk <= MAX_KEYS:
        return f"{Lk} keys (the kernel takes 1..{MAX_KEYS})"
    if D not in HEAD_DIMS:
        return f"head dim {D} (the kernel has {HEAD_DIMS})"
    if H * D > MAX_WIDTH or B > 65535 or Lq < 1:
        return f"shape {tuple(q.shape)} (H * D <= {MAX_WIDTH}, 1 <= B <= 65535, Lq >= 1)"
    for name, t, align in (("q", q, 2), ("k", k, 8), ("v", v, 8)):  # elements (k / v: 16-byte copies)
        if t.stride(3) != 1 or (H > 1 and t.stride(2) != D) or t.data_ptr() % (2 * align) \
                or (t.shape[1] > 1 and (t.stride(1) % align or t.stride(1) < H * D)) \
                or (t.shape[0] > 1 and t.stride(0) % align):
            return (f"{name}'s strides {t.stride()} or address (heads D apart, D unit-stride, rows and "
                    f"address aligned to {align} elements)")
    return None


def _strides(t: Tensor) -> tuple[int, int]:
    """(batch, row) element strides as the kernel reads them (unused ones made harmless)."""
    width = t.shape[2] * t.shape[3]
    return (t.stride(0) if t.shape[0] > 1 else 0), (t.stride(1) if t.shape[1] > 1 else width)


def run(C, q: Tensor, k: Tensor, v: Tensor, scale: Optional[float], kind: Optional[str],
        inv_smooth: Optional[Tensor] = None):
    """The kernel on checked inputs: a (B, Lq, H, D) tensor of q's dtype (kind None), or
    (oq, o_scale) quantised per row."""
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    if kind is None:
        out, out_scale = q.new_empty((B, Lq, H, D)), None
    else:
        out = q.new_empty((B, Lq, H, D), dtype=numerics.QDTYPE[kind])
        out_scale = q.new_empty((B, Lq), dtype=torch.float32)
    sm_scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    C.attention_short_kv(ptr(q), ptr(k), ptr(v), ptr(out), ptr(out_scale), ptr(inv_smooth), B, Lq, Lk, H, D,
                         *_strides(q), *_strides(k), *_strides(v), sm_scale, DTYPE_CODES[q.dtype],
                         -1 if kind is None else numerics.KIND_CODES[kind], stream_handle(q))
    return out if kind is None else (out, out_scale)


def _smooth_unsupported(inv_smooth: Optional[Tensor], q: Tensor) -> Optional[str]:
    if inv_smooth is None:
        return None
    width = q.shape[2] * q.shape[3]
    if (inv_smooth.dtype != torch.float32 or inv_smooth.shape != (width,) or inv_smooth.device != q.device
            or inv_smooth.stride(0) != 1 or inv_smooth.data_ptr() % 16):
        return "inv_smooth must be a contiguous 16-byte aligned float32 (H * D,) tensor on q's device"
    return None


def attention_quant_reference(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float], kind: str,
                              inv_smooth: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    from .attention import attention_reference

    o = attention_reference(q, k, v, None, scale, False, "blhd")
    oq, o_scale = numerics.quantize_rows(o.flatten(2), kind, inv_smooth)
    return oq.view(o.shape), o_scale


def _check(q: Tensor, k: Tensor, v: Tensor, kind: str) -> None:
    numerics.check_kind(kind)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"lyra::attention_quant: {name} must be 4-D (B, L, H, D), got shape {tuple(t.shape)}")


@torch.library.custom_op("lyra::attention_quant", mutates_args=())
def attention_quant(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float], kind: str,
                    inv_smooth: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    _check(q, k, v, kind)
    return attention_quant_reference(q, k, v, scale, kind, inv_smooth)


@attention_quant.register_fake
def _(q, k, v, scale, kind, inv_smooth):
    _check(q, k, v, kind)
    shape = (q.shape[0], q.shape[1], q.shape[2], v.shape[3])
    return q.new_empty(shape, dtype=numerics.QDTYPE[kind]), q.new_empty(shape[:2], dtype=torch.float32)


@attention_quant.register_kernel("cuda")
def _(q, k, v, scale, kind, inv_smooth):
    _check(q, k, v, kind)
    C = csrc()
    reason = unsupported(q, k, v, C=C) or _smooth_unsupported(inv_smooth, q)
    if reason is None:
        return run(C, q, k, v, scale, kind, inv_smooth)
    record_fallback("attention_quant", f"{reason}; ran lyra::attention, then lyra::quantize")
    o = torch.ops.lyra.attention(q, k, v, None, scale, False, "blhd")
    oq, o_scale = torch.ops.lyra.quantize(o.flatten(2), kind, inv_smooth)
    return oq.view(o.shape), o_scale
