"""lyra::group_norm: GroupNorm (+ SiLU) on NCHW or channels_last activations.

With `pre_bias` ((C,) or (N, C)) it normalises x + pre_bias (broadcast over the spatial dims;
statistics included): a convolution's bias and a time-embedding add folded into the norm
(passes/conv_bias.py), so the activation is not read and written once per add. x + pre_bias
is formed in fp32 and not rounded to x's dtype: one rounding, of the result. A second
`pre_bias2` (same shapes) is added the same way, as x + (pre_bias + pre_bias2) with the sum in
fp32: a ResNet block's `conv1.bias` (C,) and its time embedding (N, C) reach the kernel
separately, so their (N, C) sum is not a kernel of its own.

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

from ._common import (DTYPE_CODES, csrc, fast_is_contiguous, ptr, record_fallback, row_vector_stride,
                      stream_handle, unsupported_reason)

ACTS = ("none", "silu")


def _format(channels_last: bool, ndim: int):
    if channels_last and ndim == 4:
        return torch.channels_last
    return torch.contiguous_format


def output_format(x: Tensor, channels_last: bool):
    """x's own format when it has one (NHWC wins only when x is NHWC and not also NCHW)."""
    if fast_is_contiguous(x):
        return torch.contiguous_format
    if x.dim() == 4 and fast_is_contiguous(x, torch.channels_last):
        return torch.channels_last
    return _format(channels_last, x.dim())


def _pre_bias_view(pre_bias: Tensor, x: Tensor) -> Tensor:
    """(C,) or (N or 1, C) -> (N or 1, C, 1, ...): broadcast over x's spatial dims."""
    rows = pre_bias.shape[0] if pre_bias.dim() == 2 else 1
    return pre_bias.reshape(rows, x.shape[1], *([1] * (x.dim() - 2)))


def _f32(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.float()


def _pre_bias_sum(pre_bias: Optional[Tensor], pre_bias2: Optional[Tensor], x: Tensor) -> Optional[Tensor]:
    """pre_bias + pre_bias2 in fp32, broadcast-ready against x (None when both are None)."""
    views = [_pre_bias_view(t.float(), x) for t in (pre_bias, pre_bias2) if t is not None]
    if not views:
        return None
    return views[0] if len(views) == 1 else views[0] + views[1]


def group_norm_reference(x: Tensor, num_groups: int, weight: Optional[Tensor], bias: Optional[Tensor],
                         eps: float, act: str, channels_last: bool,
                         pre_bias: Optional[Tensor] = None, pre_bias2: Optional[Tensor] = None) -> Tensor:
    pre_bias = _pre_bias_sum(pre_bias, pre_bias2, x)
    if pre_bias is None:
        y = F.group_norm(x, num_groups, weight, bias, eps)
        if act == "silu":
            y = F.silu(y)
    else:  # fp32 throughout, one rounding at the end (what the kernel does)
        y = F.group_norm(x.float() + pre_bias, num_groups, _f32(weight),
                         _f32(bias), eps)
        if act == "silu":
            y = F.silu(y)
        y = y.to(x.dtype)
    return y.contiguous(memory_format=output_format(x, channels_last))


def _check(x: Tensor, num_groups: int, act: str, pre_bias: Optional[Tensor] = None,
           pre_bias2: Optional[Tensor] = None) -> None:
    if act not in ACTS:
        raise ValueError(f"lyra::group_norm: act={act!r} is not one of {ACTS}")
    if x.dim() < 2:
        raise ValueError(f"lyra::group_norm: x must be (N, C, ...), got shape {tuple(x.shape)}")
    if num_groups <= 0:
        raise ValueError(f"lyra::group_norm: num_groups must be positive, got {num_groups}")
    for name, t in (("pre_bias", pre_bias), ("pre_bias2", pre_bias2)):
        if t is not None and t.dim() not in (1, 2):
            raise ValueError(f"lyra::group_norm: {name} must be (C,) or (N, C), got shape {tuple(t.shape)}")


def _check_pre_bias_sizes(x: Tensor, pre_bias: Optional[Tensor], pre_bias2: Optional[Tensor] = None) -> None:
    """Sizes of a real pre_bias (not in the fake: comparing symbolic sizes would add guards)."""
    n, c = x.shape[0], x.shape[1]
    for name, t in (("pre_bias", pre_bias), ("pre_bias2", pre_bias2)):
        if t is not None and not (t.shape[-1] == c and (t.dim() == 1 or t.shape[0] in (1, n))):
            raise ValueError(f"lyra::group_norm: {name} must be (C,) or (N or 1, C) = ({c},) or ({n}, {c}), "
                             f"got shape {tuple(t.shape)}")


@torch.library.custom_op("lyra::group_norm", mutates_args=())
def group_norm(x: Tensor, num_groups: int, weight: Optional[Tensor], bias: Optional[Tensor],
               eps: float, act: str, channels_last: bool, pre_bias: Optional[Tensor] = None,
               pre_bias2: Optional[Tensor] = None) -> Tensor:
    _check(x, num_groups, act, pre_bias, pre_bias2)
    _check_pre_bias_sizes(x, pre_bias, pre_bias2)
    return group_norm_reference(x, num_groups, weight, bias, eps, act, channels_last, pre_bias, pre_bias2)


@group_norm.register_fake
def _(x, num_groups, weight, bias, eps, act, channels_last, pre_bias=None, pre_bias2=None):
    _check(x, num_groups, act, pre_bias, pre_bias2)
    return torch.empty(x.shape, dtype=x.dtype, device=x.device,
                       memory_format=output_format(x, channels_last))


@group_norm.register_kernel("cuda")
def _(x, num_groups, weight, bias, eps, act, channels_last, pre_bias=None, pre_bias2=None):
    _check(x, num_groups, act, pre_bias, pre_bias2)
    _check_pre_bias_sizes(x, pre_bias, pre_bias2)
    C = csrc()
    reason = "csrc not built" if C is None else _cuda_unsupported(x, num_groups, weight, bias, pre_bias, pre_bias2)
    if reason:
        record_fallback("group_norm", reason)
        return group_norm_reference(x, num_groups, weight, bias, eps, act, channels_last, pre_bias, pre_bias2)
    n, c = x.shape[0], x.shape[1]
    hw = x.numel() // max(n * c, 1)
    fmt = output_format(x, channels_last)
    x = x.contiguous(memory_format=fmt)  # no-op unless x had neither layout
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=fmt)
    if x.numel():
        # pre-bias rows: sample n's at pre_bias[n * stride]; stride 0 when one row serves all
        pbs = {"pre_bias": ptr(pre_bias), "pre_bias_bstride": _row_stride(pre_bias, n, c),
               "pre_bias2": ptr(pre_bias2), "pre_bias2_bstride": _row_stride(pre_bias2, n, c)}
        if fmt is torch.channels_last and _rows_path(C, x, y, n, c, hw, num_groups, weight, bias, eps, act, pbs):
            return y
        C.group_norm(ptr(x), ptr(weight), ptr(bias), ptr(y), n, c, hw, num_groups, float(eps),
                     act == "silu", fmt is torch.channels_last, DTYPE_CODES[x.dtype], stream_handle(x), **pbs)
    return y


ROWS_AUTO_NARROW_BYTES = 8 << 20  # auto: narrow or oddly sized groups take rows from this tensor size
ROWS_AUTO_ANY_BYTES = 40 << 20  # auto: every group under 128 bytes takes rows from this tensor size


def prefer_rows(setting, n: int, c: int, hw: int, num_groups: int, element_size: int) -> bool:
    """Whether a channels_last group norm should run through group_norm_rows.cu under
    config.group_norm_rows = setting (True / False / "auto"). Groups of 128 bytes or more never
    do (group_norm.cu reads them in whole lines). "auto" follows session 14's kernel bench
    (H100, 38 shapes, benchmarks/NOTES.md): group_norm.cu's per-group blocks read a group's run
    of run = C / G * element_size bytes every C elements, in vectors as wide as the run allows.
    Runs under 16 bytes read at 0.2-0.7 TB/s, so rows (~2.6 TB/s) wins at every size; runs
    under 32 bytes or off a multiple of 16 (narrower vectors) read at 0.8-1.5 TB/s, so rows
    wins once the tensor is 8 MiB (its three launches cost ~10 us more); wider runs read at
    up to ~2.2 TB/s and rows wins only from ~40 MiB."""
    run = (c // num_groups) * element_size
    if run >= 128:
        return False
    if setting != "auto":
        return bool(setting)
    size = n * c * hw * element_size
    return (run < 16 or ((run < 32 or run % 16 != 0) and size >= ROWS_AUTO_NARROW_BYTES)
            or size >= ROWS_AUTO_ANY_BYTES)


def _row_stride(pre_bias: Optional[Tensor], n: int, c: int) -> int:
    return 0 if pre_bias is None else row_vector_stride(pre_bias, n, c, 2)


def _rows_path(C, x, y, n, c, hw, num_groups, weight, bias, eps, act, pbs: dict) -> bool:
    """config.group_norm_rows: a channels_last group narrower than a 128-byte line runs through
    csrc/group_norm_rows.cu (whole rows per block) when prefer_rows says so, the build has it
    and the shape fits; returns whether it ran (else group_norm.cu's per-group path runs)."""
    from lyradynamo import config

    if not prefer_rows(config.group_norm_rows, n, c, hw, num_groups, x.element_size()):
        return False
    if not hasattr(C, "group_norm_rows"):
        return False
    code = DTYPE_CODES[x.dtype]
    need = C.group_norm_rows_workspace(n, c, hw, num_groups, code, ptr(x), ptr(y), ptr(weight), ptr(bias), **pbs)
    if not need:
        return False
    ws = torch.empty(need, dtype=torch.float32, device=x.device)
    C.group_norm_rows(ptr(x), ptr(weight), ptr(bias), ptr(y), n, c, hw, num_groups, float(eps), act == "silu",
                      code, stream_handle(x), workspace=ptr(ws), workspace_floats=need, **pbs)
    return True


# Largest C / num_groups with a pre-bias on CUDA (csrc/group_norm.cu stages the group's pre-bias
# in shared memory: kGNMaxPreBiasCpg); wider groups run the reference, logged as a fallback.
MAX_PRE_BIAS_CPG = 12000


def _cuda_unsupported(x, num_groups, weight, bias, pre_bias=None, pre_bias2=None) -> Optional[str]:
    reason = unsupported_reason(x=x, weight=weight, bias=bias, pre_bias=pre_bias, pre_bias2=pre_bias2)
    if reason:
        return reason
    if x.shape[1] % num_groups:
        return f"channels {x.shape[1]} not divisible by num_groups {num_groups}"
    for name, t in (("weight", weight), ("bias", bias), ("pre_bias", pre_bias), ("pre_bias2", pre_bias2)):
        if t is not None and t.dtype != x.dtype:
            return f"{name} must have x's dtype {x.dtype}, got {t.dtype}"
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and not t.is_contiguous():
            return f"{name} must be contiguous"
    for name, t in (("pre_bias", pre_bias), ("pre_bias2", pre_bias2)):
        if t is not None and row_vector_stride(t, x.shape[0], x.shape[1], 2) is None:
            return f"{name} rows must have unit stride along C"
    if (pre_bias is not None or pre_bias2 is not None) and x.shape[1] // num_groups > MAX_PRE_BIAS_CPG:
        return f"a pre_bias needs channels per group <= {MAX_PRE_BIAS_CPG}, got {x.shape[1] // num_groups}"
    return None
