"""lyra::adaln: LayerNorm / RMSNorm over the last dim, affine, then adaLN modulation.

    y = norm(x) [* weight] [+ bias] [* mul] [+ add]

`mul` is the traced `(1 + scale)` tensor and `add` the shift, so the op reproduces diffusers'
`norm(x) * (1 + scale) + shift` exactly (the tiny (B, D) `1 + scale` stays an aten op).
kind="rms" follows diffusers' RMSNorm: statistics in float32, normalised value cast back to
x's dtype before the affine weight.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ._common import (DTYPE_CODES, csrc, ptr, record_fallback, row_vector_stride, stream_handle,
                      unsupported_reason)

KINDS = ("layer", "rms")


def adaln_reference(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], mul: Optional[Tensor],
                    add: Optional[Tensor], kind: str, eps: float) -> Tensor:
    d = x.shape[-1]
    if kind == "layer":
        y = F.layer_norm(x, (d,), weight, bias, eps)
    else:
        var = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
        y = (x * torch.rsqrt(var + eps)).to(x.dtype)
        if weight is not None:
            y = y * weight
        if bias is not None:
            y = y + bias
    if mul is not None:
        y = y * mul
    if add is not None:
        y = y + add
    return y


def _check(x: Tensor, kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"lyra::adaln: kind={kind!r} is not one of {KINDS}")
    if x.dim() < 1:
        raise ValueError("lyra::adaln: x must have at least one dim")


@torch.library.custom_op("lyra::adaln", mutates_args=())
def adaln(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], mul: Optional[Tensor],
          add: Optional[Tensor], kind: str, eps: float) -> Tensor:
    _check(x, kind)
    return adaln_reference(x, weight, bias, mul, add, kind, eps)


@adaln.register_fake
def _(x, weight, bias, mul, add, kind, eps):
    _check(x, kind)
    dtype = x.dtype
    for t in (weight, bias, mul, add):
        if t is not None:
            dtype = torch.promote_types(dtype, t.dtype)
    return x.new_empty(x.shape, dtype=dtype)


@adaln.register_kernel("cuda")
def _(x, weight, bias, mul, add, kind, eps):
    _check(x, kind)
    C = csrc()
    reason = "csrc not built" if C is None else _cuda_unsupported(x, weight, bias, mul, add)
    if reason:
        record_fallback("adaln", reason)
        return adaln_reference(x, weight, bias, mul, add, kind, eps)
    d = x.shape[-1]
    xc = x.contiguous()
    rows = xc.numel() // d if d else 0
    b0 = x.shape[0] if x.dim() > 1 else 1
    rows_per_batch = max(rows // max(b0, 1), 1)
    y = torch.empty_like(xc)
    if rows:
        C.norm_modulate(ptr(xc), ptr(weight), ptr(bias), ptr(mul), ptr(add), ptr(y), rows, d,
                        rows_per_batch,
                        row_vector_stride(mul, b0, d, x.dim()) if mul is not None else 0,
                        row_vector_stride(add, b0, d, x.dim()) if add is not None else 0,
                        float(eps), kind == "rms", DTYPE_CODES[x.dtype], stream_handle(x))
    return y


def _cuda_unsupported(x, weight, bias, mul, add) -> Optional[str]:
    reason = unsupported_reason(x=x, weight=weight, bias=bias, mul=mul, add=add)
    if reason:
        return reason
    d = x.shape[-1]
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and (t.dtype != x.dtype or tuple(t.shape) != (d,) or not t.is_contiguous()):
            return f"{name} must be a contiguous ({d},) tensor of x's dtype"
    for name, t in (("mul", mul), ("add", add)):
        if t is None:
            continue
        if t.dtype != x.dtype:
            return f"{name} dtype {t.dtype} differs from x dtype {x.dtype}"
        if row_vector_stride(t, x.shape[0] if x.dim() > 1 else 1, d, x.dim()) is None:
            return f"{name} shape {tuple(t.shape)} is not a per-sample row vector of width {d}"
    return None
