"""lyra::bias_residual: out = (y + bias[c] + residual) * scale, for (N, C, *spatial) tensors.

What follows a convolution run without its bias (passes/conv_bias.py): the bias add that
aten does as a non-vectorised broadcast add, a ResNet block's residual add and its
output scale, in one vectorised pass. bias and residual are each optional. Math in fp32 in
eager's order ((y + bias) + residual) * scale, rounded once to y's dtype. The output has
y's layout (NCHW or channels_last, as the convolution returned it).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ._common import DTYPE_CODES, csrc, ptr, record_fallback, stream_handle, unsupported_reason


def bias_residual_reference(y: Tensor, bias: Optional[Tensor], residual: Optional[Tensor],
                            scale: float) -> Tensor:
    acc = y.float()
    if bias is not None:
        acc = acc + bias.float().reshape(1, -1, *([1] * (y.dim() - 2)))
    if residual is not None:
        acc = acc + residual.float()
    if scale != 1.0:
        acc = acc * scale
    out = torch.empty_like(y)  # y's strides (y is dense): what the fake and the kernel give
    return out.copy_(acc)


def _check(y: Tensor, bias: Optional[Tensor], residual: Optional[Tensor]) -> None:
    if y.dim() < 2:
        raise ValueError(f"lyra::bias_residual: y must be (N, C, ...), got shape {tuple(y.shape)}")
    if bias is not None and bias.dim() != 1:
        raise ValueError(f"lyra::bias_residual: bias must be (C,), got shape {tuple(bias.shape)}")
    if residual is not None and residual.dim() != y.dim():
        raise ValueError(f"lyra::bias_residual: residual must have y's shape {tuple(y.shape)}, "
                         f"got {tuple(residual.shape)}")


def _check_sizes(y: Tensor, bias: Optional[Tensor], residual: Optional[Tensor]) -> None:
    """Sizes of real inputs (not in the fake: comparing symbolic sizes would add guards)."""
    if bias is not None and bias.shape[0] != y.shape[1]:
        raise ValueError(f"lyra::bias_residual: bias must be ({y.shape[1]},), got {tuple(bias.shape)}")
    if residual is not None and residual.shape != y.shape:
        raise ValueError(f"lyra::bias_residual: residual must have y's shape {tuple(y.shape)}, "
                         f"got {tuple(residual.shape)}")


@torch.library.custom_op("lyra::bias_residual", mutates_args=())
def bias_residual(y: Tensor, bias: Optional[Tensor], residual: Optional[Tensor], scale: float) -> Tensor:
    _check(y, bias, residual)
    _check_sizes(y, bias, residual)
    return bias_residual_reference(y, bias, residual, scale)


@bias_residual.register_fake
def _(y, bias, residual, scale):
    _check(y, bias, residual)
    return torch.empty_like(y)


@bias_residual.register_kernel("cuda")
def _(y, bias, residual, scale):
    _check(y, bias, residual)
    _check_sizes(y, bias, residual)
    C = csrc()
    layout = _layout(y, residual)
    reason = "csrc not built" if C is None else _cuda_unsupported(y, bias, residual, layout)
    if reason:
        record_fallback("bias_residual", reason)
        return bias_residual_reference(y, bias, residual, scale)
    out = torch.empty_like(y)  # same strides as y, so the same element order
    if y.numel():
        n, c = y.shape[0], y.shape[1]
        C.bias_residual(ptr(y), ptr(bias), ptr(residual), ptr(out), n, c, y.numel() // (n * c),
                        layout == "nhwc", float(scale), DTYPE_CODES[y.dtype], stream_handle(y))
    return out


def _layout(y: Tensor, residual: Optional[Tensor]) -> Optional[str]:
    """'nchw' or 'nhwc' when y (and residual) are both laid out that way, else None.

    NCHW first: a tensor with C == 1 or H*W == 1 is both, and then either order is right."""
    same = (lambda fmt: residual is None or residual.is_contiguous(memory_format=fmt))
    if y.is_contiguous() and same(torch.contiguous_format):
        return "nchw"
    if y.dim() == 4 and y.is_contiguous(memory_format=torch.channels_last) and same(torch.channels_last):
        return "nhwc"
    return None


def _cuda_unsupported(y, bias, residual, layout) -> Optional[str]:
    reason = unsupported_reason(y=y, bias=bias, residual=residual)
    if reason:
        return reason
    if layout is None:
        return (f"y (strides {y.stride()}) and residual must both be NCHW- or both channels_last-"
                "contiguous")
    for name, t in (("bias", bias), ("residual", residual)):
        if t is not None and t.dtype != y.dtype:
            return f"{name} must have y's dtype {y.dtype}, got {t.dtype}"
    if bias is not None and not bias.is_contiguous():
        return "bias must be contiguous"
    return None
