"""Attention over few keys (cross-attention on text tokens) in lyra's own kernel,
csrc/attention_short_kv.cu, 16-bit output:

    out = softmax(q k^T * scale) v       q (B, Lq, H, D), k / v (B, Lk, H, D), out (B, Lq, H, D)

in the projections' layout ("blhd"), fp16 / bf16, Lk <= MAX_KEYS, D in HEAD_DIMS, no mask, not
causal. One launch, one block per (64 query rows, head): no workspace and no memset (cuDNN's SDPA
adds a memset per call, a 2-4 us gap in a CUDA graph). It is a path of lyra::attention, not an op
of its own: ops/attention.py takes it where `prefer` says (config.short_kv_attention) and
`unsupported` finds nothing against the tensors; everything else runs torch SDPA as before.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ._common import DTYPE_CODES, ptr, stream_handle

HEAD_DIMS = (40, 64, 80, 128, 160)
MAX_KEYS = 128
MAX_WIDTH = 1 << 20  # H * D (the kernel takes < 2^24; wider rows than any model's)
# auto: at most this many (query row, head) pairs per call, B * Lq * H (ops/attention.py has the
# table it comes from)
AUTO_MAX_ROW_HEADS = 1 << 16


def prefer(setting: str, batch: int, rows: int, heads: int) -> bool:
    """Whether config.short_kv_attention = setting wants the kernel for a call of `batch` x `rows`
    queries x `heads` heads: "off" never; "auto" when batch * rows * heads <= AUTO_MAX_ROW_HEADS,
    which takes exactly the measured shapes where it was at least as fast as cuDNN (the table is
    in ops/attention.py, at _short_kv)."""
    return setting == "auto" and batch * rows * heads <= AUTO_MAX_ROW_HEADS


def unsupported(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False,
                layout: str = "blhd", C=None) -> Optional[str]:
    """Why the kernel cannot run this attention (None when it can). Real tensors only. The device
    is checked last, so that every other reason also shows on CPU tensors (the CPU tests)."""
    if C is None or not hasattr(C, "attention_short_kv"):
        return "csrc not built with attention_short_kv"
    if layout != "blhd":
        return f"layout {layout!r} (the kernel takes blhd: (B, L, H, D))"
    if attn_mask is not None:
        return "an attention mask (the kernel takes none)"
    if is_causal:
        return "causal attention (the kernel is not causal)"
    if q.dtype not in (torch.float16, torch.bfloat16) or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"dtypes {q.dtype} / {k.dtype} / {v.dtype} (the kernel takes one of float16, bfloat16 for all three)"
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
    if H * D > MAX_WIDTH or not 1 <= B <= 65535 or Lq < 1:
        return f"shape {tuple(q.shape)} (the kernel takes H * D <= {MAX_WIDTH}, 1 <= B <= 65535, Lq >= 1)"
    for name, t, align in (("q", q, 2), ("k", k, 8), ("v", v, 8)):  # elements (k / v: 16-byte copies)
        if (t.stride(3) != 1 or (H > 1 and t.stride(2) != D)
                or (t.shape[1] > 1 and (t.stride(1) % align or t.stride(1) < H * D))
                or (t.shape[0] > 1 and t.stride(0) % align)):
            return (f"{name}'s strides {t.stride()} (the kernel takes D unit-stride, heads D apart, row and "
                    f"batch strides multiples of {align} elements, rows at least H * D apart)")
        if t.data_ptr() % (2 * align):
            return f"{name}'s address is not {2 * align}-byte aligned"
    if q.device.type != "cuda" or k.device != q.device or v.device != q.device:
        return "q, k and v must be on one CUDA device"
    return None


def _strides(t: Tensor) -> tuple[int, int]:
    """(batch, row) element strides as the kernel reads them (unused ones made harmless)."""
    width = t.shape[2] * t.shape[3]
    return (t.stride(0) if t.shape[0] > 1 else 0), (t.stride(1) if t.shape[1] > 1 else width)


def run(C, q: Tensor, k: Tensor, v: Tensor, scale: Optional[float]) -> Tensor:
    """The kernel on inputs `unsupported` passed: a new contiguous (B, Lq, H, D) tensor of q's dtype."""
    B, Lq, H, D = q.shape
    out = q.new_empty((B, Lq, H, D))
    sm_scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    C.attention_short_kv(ptr(q), ptr(k), ptr(v), ptr(out), B, Lq, k.shape[1], H, D, *_strides(q), *_strides(k),
                         *_strides(v), sm_scale, DTYPE_CODES[q.dtype], stream_handle(q))
    return out


def reference(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float]) -> Tensor:
    """What the kernel computes: softmax(q k^T * scale) v in float32 (F.scaled_dot_product_attention
    on float32 copies), rounded once to q's dtype; blhd in and out. The kernel also rounds the
    softmax's numerators to the 16-bit type before P V, as flash kernels do: its error against the
    float32 result is within twice that rounding (tests/cuda/test_short_kv_attention_cuda.py)."""
    from .attention import attention_reference

    return attention_reference(q.float(), k.float(), v.float(), None, scale, False, "blhd").to(q.dtype)
