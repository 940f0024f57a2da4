"""lyra::adaln: LayerNorm / RMSNorm over the last dim, affine, then adaLN modulation.

    y = norm(x) [* weight] [+ bias] [* (mul_offset + mul)] [+ add]

`add` is the shift and `mul` the scale: for diffusers' `norm(x) * (1 + scale) + shift` the
adaln pass hands `scale` as mul and 1 as mul_offset, and the op forms `mul_offset + mul` itself
in mul's dtype, rounded once, exactly as eager's aten add does, so the result is unchanged and
the tiny (B, 1, D) `1 + scale` is no longer a kernel launch of its own. With mul_offset = 0
(the default) mul is the factor as given.
kind="rms" follows diffusers' RMSNorm: statistics in float32, normalised value cast back to
x's dtype before the affine weight.

out_dtype (default None: the promoted dtype of x and the tensors given) is for the float32
island of Wan-style blocks, `(norm(x.float()) * (1 + scale) + shift).type_as(x)`: the op then
computes on x.float(), with weight, bias, mul and add as given (float32 or 16-bit), and returns
the result cast to out_dtype. On CUDA the kernel reads 16-bit x, float32 (or x's dtype)
weight, bias, mul and add, and writes out_dtype = x's dtype in one pass, the three casts of the
eager island included.
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
                    add: Optional[Tensor], kind: str, eps: float, mul_offset: float = 0.0,
                    out_dtype: Optional[torch.dtype] = None) -> Tensor:
    if out_dtype is not None:  # the float32 island: computed on x.float(), cast at the end
        return adaln_reference(x.float(), weight, bias, mul, add, kind, eps, mul_offset).to(out_dtype)
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
        # eager's `1 + scale`: a Python scalar keeps mul's dtype, so this rounds where eager does
        y = y * (mul + mul_offset if mul_offset else mul)
    if add is not None:
        y = y + add
    return y


def _check(x: Tensor, kind: str, mul: Optional[Tensor], mul_offset: float, op: str = "adaln") -> None:
    """Arguments of lyra::adaln (and of lyra::adaln_quant, op="adaln_quant", whose `norm` is kind)."""
    if kind not in KINDS:
        raise ValueError(f"lyra::{op}: kind={kind!r} is not one of {KINDS}")
    if x.dim() < 1:
        raise ValueError(f"lyra::{op}: x must have at least one dim")
    if mul is None and mul_offset:
        raise ValueError(f"lyra::{op}: mul_offset={mul_offset} without mul (the offset is added to mul)")


@torch.library.custom_op("lyra::adaln", mutates_args=())
def adaln(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], mul: Optional[Tensor],
          add: Optional[Tensor], kind: str, eps: float, mul_offset: float = 0.0,
          out_dtype: Optional[torch.dtype] = None) -> Tensor:
    _check(x, kind, mul, mul_offset)
    return adaln_reference(x, weight, bias, mul, add, kind, eps, mul_offset, out_dtype)


@adaln.register_fake
def _(x, weight, bias, mul, add, kind, eps, mul_offset=0.0, out_dtype=None):
    _check(x, kind, mul, mul_offset)
    return x.new_empty(x.shape, dtype=out_dtype or _promoted(x, weight, bias, mul, add))


def _promoted(x, *tensors) -> torch.dtype:
    dtype = x.dtype
    for t in tensors:
        if t is not None:
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


@adaln.register_kernel("cuda")
def _(x, weight, bias, mul, add, kind, eps, mul_offset=0.0, out_dtype=None):
    _check(x, kind, mul, mul_offset)
    C = csrc()
    reason = "csrc not built" if C is None else _cuda_unsupported(x, weight, bias, mul, add, out_dtype)
    if reason:
        record_fallback("adaln", reason)
        return adaln_reference(x, weight, bias, mul, add, kind, eps, mul_offset, out_dtype)
    d = x.shape[-1]
    ldx = row_stride(x)
    xc = x if ldx is not None else x.contiguous()
    rows = xc.numel() // d if d else 0
    b0 = x.shape[0] if x.dim() > 1 else 1
    rows_per_batch = max(rows // max(b0, 1), 1)
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if rows:
        C.norm_modulate(ptr(xc), ptr(weight), ptr(bias), ptr(mul), ptr(add), ptr(y), rows, d,
                        rows_per_batch,
                        row_vector_stride(mul, b0, d, x.dim()) if mul is not None else 0,
                        row_vector_stride(add, b0, d, x.dim()) if add is not None else 0,
                        float(eps), kind == "rms", DTYPE_CODES[x.dtype], stream_handle(x),
                        mul_offset=float(mul_offset),
                        param_dtype=DTYPE_CODES[param_dtype(x, weight, bias, mul, add)],
                        x_row_stride=-1 if ldx is None else ldx)
    return y


def row_stride(x: Tensor) -> Optional[int]:
    """The row stride when x's rows (its last dim, unit stride) lie at one stride from each
    other: a contiguous x (d), or a column slice of a wider contiguous matrix (q, k of a fused
    q/k/v projection), which the kernel reads in place. None: x needs a contiguous copy."""
    d = x.shape[-1]
    if d > 1 and x.stride(-1) != 1:
        return None
    dims = [(n, s) for n, s in zip(x.shape[:-1], x.stride()[:-1]) if n > 1]  # size-1 dims: index 0
    if not dims:
        return d  # one row
    ld = expected = dims[-1][1]
    for n, s in reversed(dims):  # each dim steps over whole blocks of the rows after it
        if s != expected:
            return None
        expected = s * n
    return ld if ld >= d else None


def param_dtype(x: Tensor, *params: Optional[Tensor]) -> torch.dtype:
    """The one dtype of the given params (weight, bias, mul, add); x's when none is given."""
    dtypes = {t.dtype for t in params if t is not None}
    return dtypes.pop() if len(dtypes) == 1 else x.dtype


def _cuda_unsupported(x, weight, bias, mul, add, out_dtype=None) -> Optional[str]:
    reason = unsupported_reason(x=x, weight=weight, bias=bias, mul=mul, add=add)
    if reason:
        return reason
    d = x.shape[-1]
    params = (("weight", weight), ("bias", bias), ("mul", mul), ("add", add))
    pdt = param_dtype(x, weight, bias, mul, add)
    island = out_dtype is not None and pdt == torch.float32 and x.dtype != torch.float32
    for name, t in params:
        if t is not None and t.dtype != x.dtype and not island:
            return f"{name} dtype {t.dtype} differs from x dtype {x.dtype}"
        if t is not None and t.dtype != pdt:
            return f"{name} dtype {t.dtype} differs from the other parameters' {pdt}"
    out = out_dtype or _promoted(x, weight, bias, mul, add)
    if out != x.dtype:
        return f"output dtype {out} differs from x dtype {x.dtype} (the kernel writes x's dtype)"
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and (tuple(t.shape) != (d,) or not t.is_contiguous()):
            return f"{name} must be a contiguous ({d},) tensor"
    for name, t in (("mul", mul), ("add", add)):
        if t is None:
            continue
        if row_vector_stride(t, x.shape[0] if x.dim() > 1 else 1, d, x.dim()) is None:
            return f"{name} shape {tuple(t.shape)} is not a per-sample row vector of width {d}"
    return None
