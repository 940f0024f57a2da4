"""Activation quantisation as its own step, or fused into the norm that produces it.

    lyra::quantize(x, kind, inv_smooth) -> (q, scale)          per row (token) of x
    lyra::adaln_quant(x, weight, bias, mul, add, norm, eps, kind, mul_offset=0) -> (q, scale)
        = quantize(lyra::adaln(x, weight, bias, mul, add, norm, eps, mul_offset)): on CUDA one
          kernel normalises, modulates, rounds to x's dtype and quantises each row; the
          high-precision activation is never written.
Both feed lyra::qlinear_q; quant/apply.py emits them when every reader of an activation is
a quantised linear. The math is quant/numerics.py.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..quant import numerics
from ._common import DTYPE_CODES, csrc, ptr, record_fallback, row_vector_stride, stream_handle, unsupported_reason
from .adaln import _check as _adaln_check
from .adaln import _cuda_unsupported as _adaln_unsupported
from .adaln import adaln_reference
from .qlinear import empty_quantized, quantize_cuda


@torch.library.custom_op("lyra::quantize", mutates_args=())
def quantize(x: Tensor, kind: str, inv_smooth: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    return numerics.quantize_rows(x, kind, inv_smooth)


@quantize.register_fake
def _(x, kind, inv_smooth):
    numerics.check_kind(kind)
    return empty_quantized(x, kind)


@quantize.register_kernel("cuda")
def _(x, kind, inv_smooth):
    numerics.check_kind(kind)
    C = csrc()
    reason = "csrc not built" if C is None else unsupported_reason(x=x, inv_smooth=inv_smooth)
    if reason or x.dim() == 0:
        record_fallback("quantize", reason or "0-d input")
        return numerics.quantize_rows(x, kind, inv_smooth)
    return quantize_cuda(C, x, kind, inv_smooth)


def adaln_quant_reference(x, weight, bias, mul, add, norm, eps, kind, mul_offset=0.0):
    return numerics.quantize_rows(adaln_reference(x, weight, bias, mul, add, norm, eps, mul_offset), kind)


@torch.library.custom_op("lyra::adaln_quant", mutates_args=())
def adaln_quant(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], mul: Optional[Tensor],
                add: Optional[Tensor], norm: str, eps: float, kind: str,
                mul_offset: float = 0.0) -> tuple[Tensor, Tensor]:
    _adaln_check(x, norm, mul, mul_offset, "adaln_quant")
    return adaln_quant_reference(x, weight, bias, mul, add, norm, eps, kind, mul_offset)


@adaln_quant.register_fake
def _(x, weight, bias, mul, add, norm, eps, kind, mul_offset=0.0):
    _adaln_check(x, norm, mul, mul_offset, "adaln_quant")
    numerics.check_kind(kind)
    return empty_quantized(x, kind)


@adaln_quant.register_kernel("cuda")
def _(x, weight, bias, mul, add, norm, eps, kind, mul_offset=0.0):
    _adaln_check(x, norm, mul, mul_offset, "adaln_quant")
    numerics.check_kind(kind)
    C = csrc()
    reason = "csrc not built" if C is None else _adaln_unsupported(x, weight, bias, mul, add)
    if reason:
        record_fallback("adaln_quant", reason)
        return adaln_quant_reference(x, weight, bias, mul, add, norm, eps, kind, mul_offset)
    d = x.shape[-1]
    xc = x.contiguous()
    rows = xc.numel() // d if d else 0
    b0 = x.shape[0] if x.dim() > 1 else 1
    q, s = empty_quantized(xc, kind)
    if rows:
        C.norm_modulate_quant(ptr(xc), ptr(weight), ptr(bias), ptr(mul), ptr(add), 0, ptr(q), ptr(s), rows, d,
                              max(rows // max(b0, 1), 1),
                              row_vector_stride(mul, b0, d, x.dim()) if mul is not None else 0,
                              row_vector_stride(add, b0, d, x.dim()) if add is not None else 0,
                              float(eps), norm == "rms", numerics.KIND_CODES[kind], DTYPE_CODES[x.dtype],
                              stream_handle(x), mul_offset=float(mul_offset))
    return q, s
