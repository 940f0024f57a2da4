"""lyra::group_norm: GroupNorm (+ SiLU) on NCHW or channels_last activations.

The output keeps the input's memory format, decided on the real tensor at run time, so a
UNet kept in channels_last never pays a layout copy between its convolutions and norms (and
a layout rewritten after tracing cannot make the op copy). `channels_last` records the
layout seen when the graph was traced (for the dump); an input that is neither NCHW- nor
NHWC-contiguous is laid out that way.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ._common import DTYPE_CODES, csrc, ptr, record_fallback, stream_handle, unsupported_reason

ACTS = ("none", "silu")


def _format(channels_last: bool, ndim: int):
    if channels_last and ndim == 4:
        return torch.channels_last
    return torch.contiguous_format


def _output_format(x: Tensor, channels_last: bool):
    """x's own format when it has one (NHWC wins only when x is NHWC and not also NCHW)."""
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    if x.is_contiguous():
        return torch.contiguous_format
    return _format(channels_last, x.dim())


def group_norm_reference(x: Tensor, num_groups: int, weight: Optional[Tensor], bias: Optional[Tensor],
                         eps: float, act: str, channels_last: bool) -> Tensor:
    y = F.group_norm(x, num_groups, weight, bias, eps)
    if act == "silu":
        y = F.silu(y)
    return y.contiguous(memory_format=_output_format(x, channels_last))


def _check(x: Tensor, num_groups: int, act: str) -> None:
    if act not in ACTS:
        raise ValueError(f"lyra::group_norm: act={act!r} is not one of {ACTS}")
    if x.dim() < 2:
        raise ValueError(f"lyra::group_norm: x must be (N, C, ...), got shape {tuple(x.shape)}")
    if num_groups <= 0:
        raise ValueError(f"lyra::group_norm: num_groups must be positive, got {num_groups}")


@torch.library.custom_op("lyra::group_norm", mutates_args=())
def group_norm(x: Tensor, num_groups: int, weight: Optional[Tensor], bias: Optional[Tensor],
               eps: float, act: str, channels_last: bool) -> Tensor:
    _check(x, num_groups, act)
    return group_norm_reference(x, num_groups, weight, bias, eps, act, channels_last)


@group_norm.register_fake
def _(x, num_groups, weight, bias, eps, act, channels_last):
    _check(x, num_groups, act)
    return torch.empty(x.shape, dtype=x.dtype, device=x.device,
                       memory_format=_output_format(x, channels_last))


@group_norm.register_kernel("cuda")
def _(x, num_groups, weight, bias, eps, act, channels_last):
    _check(x, num_groups, act)
    C = csrc()
    reason = "csrc not built" if C is None else _cuda_unsupported(x, num_groups, weight, bias)
    if reason:
        record_fallback("group_norm", reason)
        return group_norm_reference(x, num_groups, weight, bias, eps, act, channels_last)
    n, c = x.shape[0], x.shape[1]
    hw = x.numel() // max(n * c, 1)
    fmt = _output_format(x, channels_last)
    x = x.contiguous(memory_format=fmt)  # no-op unless x had neither layout
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=fmt)
    if x.numel():
        C.group_norm(ptr(x), ptr(weight), ptr(bias), ptr(y), n, c, hw, num_groups, float(eps),
                     act == "silu", fmt is torch.channels_last, DTYPE_CODES[x.dtype], stream_handle(x))
    return y


def _cuda_unsupported(x, num_groups, weight, bias) -> Optional[str]:
    reason = unsupported_reason(x=x, weight=weight, bias=bias)
    if reason:
        return reason
    if x.shape[1] % num_groups:
        return f"channels {x.shape[1]} not divisible by num_groups {num_groups}"
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and (t.dtype != x.dtype or not t.is_contiguous()):
            return f"{name} must be contiguous with x's dtype {x.dtype}"
    return None
