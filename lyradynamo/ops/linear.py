"""lyra::linear: y = residual + gate * act(x @ W^T + b), each part optional.

act: none | gelu | gelu_tanh | silu. With glu=True the GEMM output (.., 2N) is split in
halves (a, g) and the result is a * act(g): diffusers' GEGLU (gelu) and SwiGLU (silu).
The reference applies the same torch ops in the same order as diffusers does, so on the
CPU the rewritten graph is bit-identical to eager.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import gated_gemm
from ._common import (DTYPE_CODES, csrc, ptr, record_fallback, row_vector_stride,
                      stream_handle, unsupported_reason)

ACTIVATIONS = ("none", "gelu", "gelu_tanh", "silu")
log = logging.getLogger("lyradynamo")
_ACT_CODES = {"none": 0, "gelu": 1, "gelu_tanh": 2, "silu": 3}


def activate(y: Tensor, act: str) -> Tensor:
    if act == "none":
        return y
    if act == "gelu":
        return F.gelu(y)
    if act == "gelu_tanh":
        return F.gelu(y, approximate="tanh")
    if act == "silu":
        return F.silu(y)
    raise ValueError(f"lyra::linear: act={act!r} is not one of {ACTIVATIONS}")


def linear_reference(x: Tensor, weight: Tensor, bias: Optional[Tensor], act: str, glu: bool,
                     gate: Optional[Tensor], residual: Optional[Tensor]) -> Tensor:
    return epilogue_reference(F.linear(x, weight, bias), act, glu, gate, residual)


def epilogue_reference(y: Tensor, act: str, glu: bool, gate: Optional[Tensor],
                       residual: Optional[Tensor]) -> Tensor:
    """What follows the GEMM (+ bias): act or GLU, gate, residual, in diffusers' op order."""
    if glu:
        a, g = y.chunk(2, dim=-1)
        y = a * activate(g, act)
    else:
        y = activate(y, act)
    if gate is not None:
        y = gate * y
    if residual is not None:
        y = residual + y
    return y


def _check_args(x: Tensor, weight: Tensor, act: str, glu: bool) -> None:
    if act not in ACTIVATIONS:
        raise ValueError(f"lyra::linear: act={act!r} is not one of {ACTIVATIONS}")
    if weight.dim() != 2:
        raise ValueError(f"lyra::linear: weight must be 2-D (N, K), got shape {tuple(weight.shape)}")
    if glu and weight.shape[0] % 2:
        raise ValueError(f"lyra::linear: glu needs an even number of weight rows, got {weight.shape[0]}")


@torch.library.custom_op("lyra::linear", mutates_args=())
def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], act: str, glu: bool,
           gate: Optional[Tensor], residual: Optional[Tensor]) -> Tensor:
    _check_args(x, weight, act, glu)
    return linear_reference(x, weight, bias, act, glu, gate, residual)


@linear.register_fake
def _(x, weight, bias, act, glu, gate, residual):
    _check_args(x, weight, act, glu)
    n = weight.shape[0] // 2 if glu else weight.shape[0]
    return x.new_empty((*x.shape[:-1], n), dtype=_out_dtype(x, gate, residual))


def _out_dtype(x, gate, residual) -> torch.dtype:
    dtype = x.dtype
    for t in (gate, residual):
        if t is not None:
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


@linear.register_kernel("cuda")
def linear_cuda(x, weight, bias, act, glu, gate, residual):
    _check_args(x, weight, act, glu)
    C = csrc()
    reason = "csrc not built" if C is None else _cuda_unsupported(x, weight, bias, glu, gate, residual)
    if reason:
        record_fallback("linear", reason)
        return linear_reference(x, weight, bias, act, glu, gate, residual)
    k, n_y = x.shape[-1], weight.shape[0]
    n_out = n_y // 2 if glu else n_y
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1 or (x2.shape[0] > 1 and x2.stride(0) < k):
        x2 = x2.contiguous()
    m = x2.shape[0]
    out_shape = (*x.shape[:-1], n_out)
    code = DTYPE_CODES[x.dtype]
    if m == 0:  # an empty batch: nothing for the kernels to do (they reject M == 0)
        return x.new_empty(out_shape, dtype=_out_dtype(x, gate, residual))
    lda = x2.stride(0) if m > 1 else k
    ldb = weight.stride(0) if n_y > 1 else k  # > k: a column slice of a wider weight
    fused = _gemm_epilogue_fused(C, x, x2, weight, bias, act, glu, gate, residual, m, n_y, k, lda, ldb)
    if fused is not None:
        return fused.view(out_shape)

    def split() -> Tensor:  # the GEMM (+ bias), then the epilogue kernel
        y = torch.empty((m, n_y), dtype=x.dtype, device=x.device)
        stream = stream_handle(x)  # at call time: gated_gemm's auto captures this on another stream
        if ldb == k:
            C.gemm(ptr(x2), ptr(weight), ptr(bias), ptr(y), m, n_y, k, lda, n_y, code, stream)
        else:
            C.gemm_ex(ptr(x2), ptr(weight), ptr(bias), 0, 0, ptr(y), m, n_y, k, lda, ldb, n_y, code, 0, stream)
        return epilogue_cuda(C, y, x, act, glu, gate, residual)

    if gate is not None and residual is not None and act == "none" and not glu:
        return gated_gemm.run(C, x, x2, weight, bias, gate, residual, m, n_y, k, lda, split).view(out_shape)
    if glu and gate is None and residual is None:
        return gated_gemm.run_glu(C, x, x2, weight, bias, act, m, n_out, k, lda, split).view(out_shape)
    return split().view(out_shape)


_EX_FAILED: dict[tuple, str] = {}  # (device, dtype, epi, residual?) -> why cuBLASLt refused it


def _gemm_epilogue_fused(C, x, x2, weight, bias, act, glu, gate, residual, m, n, k, lda, ldb):
    """The whole linear in one cuBLASLt call when its epilogue can do the rest: gelu_tanh
    (+ bias), or + residual (through C). None: not this case, or cuBLASLt has no algorithm for
    it here (then the GEMM + csrc epilogue kernel run instead, and the log says so once).
    A gate is not fused here: cuBLASLt 13 on the H100 answers NOT_SUPPORTED for an alpha vector
    with a bias epilogue (measured); gated residual linears and GLU linears go to the CUTLASS
    kernels of gated_gemm.py where they run and measure faster, else GEMM + the csrc epilogue
    kernel."""
    if glu or gate is not None or getattr(C, "gemm_ex", None) is None:
        return None
    if act == "gelu_tanh" and residual is None:
        epi, res = 1, None
    elif act == "none" and residual is not None:
        epi, res = 0, _rows(residual, m, n)
    else:
        return None
    key = (x.device.index, x.dtype, epi, res is not None)
    if key in _EX_FAILED:
        return None
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    try:
        C.gemm_ex(ptr(x2), ptr(weight), ptr(bias), ptr(res), 0, ptr(y), m, n, k, lda, ldb, n,
                  DTYPE_CODES[x.dtype], epi, stream_handle(x))
    except RuntimeError as exc:
        _EX_FAILED[key] = str(exc)[:200]
        log.warning("lyradynamo: cuBLASLt epilogue %s unavailable (%s); lyra::linear uses its GEMM + "
                    "epilogue kernels there", key[2:], exc)
        return None
    return y


def epilogue_args(x: Tensor, m: int, n_out: int, gate: Optional[Tensor], residual: Optional[Tensor]):
    """(rows_per_batch, gate_bstride, residual as (m, n_out) contiguous) for the epilogue kernels."""
    gstride, rows_per_batch = 0, max(m, 1)
    if gate is not None:
        gstride = row_vector_stride(gate, x.shape[0], n_out, x.dim())
        rows_per_batch = max(m // max(x.shape[0], 1), 1) if x.dim() > 1 else 1
    return rows_per_batch, gstride or 0, None if residual is None else _rows(residual, m, n_out)


def _rows(t: Tensor, m: int, n: int) -> Tensor:
    """t as a contiguous (m, n) matrix (the kernels' residual layout)."""
    t = t.reshape(m, n)
    return t if t.is_contiguous() else t.contiguous()


def epilogue_cuda(C, y: Tensor, x: Tensor, act: str, glu: bool, gate: Optional[Tensor],
                  residual: Optional[Tensor]) -> Tensor:
    """act/GLU/gate/residual on the GEMM output y (m, n_y) of x's dtype: y itself when plain."""
    if act == "none" and not glu and gate is None and residual is None:
        return y
    m, n_y = y.shape
    n_out = n_y // 2 if glu else n_y
    rows_per_batch, gstride, res = epilogue_args(x, m, n_out, gate, residual)
    out = y if not glu else torch.empty((m, n_out), dtype=y.dtype, device=y.device)
    C.linear_epilogue(ptr(y), ptr(gate), ptr(res), ptr(out), m, n_out, _ACT_CODES[act], glu,
                      rows_per_batch, gstride, DTYPE_CODES[y.dtype], stream_handle(y))
    return out


def _cuda_unsupported(x, weight, bias, glu, gate, residual) -> Optional[str]:
    reason = unsupported_reason(x=x, weight=weight)
    if reason:
        return reason
    if weight.dtype != x.dtype:
        return f"weight dtype {weight.dtype} differs from x dtype {x.dtype}"
    if not weight.is_contiguous() and not _row_strided_ok(weight, csrc()):
        return "weight is not contiguous (nor a 16-byte aligned column slice of one)"
    if x.dim() == 0 or weight.shape[0] == 0:
        return "empty weight or 0-d input"
    return epilogue_unsupported(x, weight.shape[0] // 2 if glu else weight.shape[0], bias, gate, residual)


def _row_strided_ok(weight: Tensor, C) -> bool:
    """A column slice W[:, a:b] of a contiguous weight: gemm_ex reads it with row stride ldb."""
    es = weight.element_size()
    return (getattr(C, "gemm_ex", None) is not None and weight.stride(1) == 1
            and weight.stride(0) >= weight.shape[1] and (weight.stride(0) * es) % 16 == 0
            and weight.data_ptr() % 16 == 0)


def epilogue_unsupported(x, n_out: int, bias, gate, residual) -> Optional[str]:
    """Why bias / gate / residual cannot go through the csrc epilogues (None when they can)."""
    reason = unsupported_reason(bias=bias, gate=gate, residual=residual)
    if reason:
        return reason
    for name, t in (("bias", bias), ("gate", gate), ("residual", residual)):
        if t is not None and t.dtype != x.dtype:
            return f"{name} dtype {t.dtype} differs from x dtype {x.dtype}"
    if bias is not None and not bias.is_contiguous():
        return "bias is not contiguous"
    if gate is not None and row_vector_stride(gate, x.shape[0], n_out, x.dim()) is None:
        return f"gate shape {tuple(gate.shape)} is not a per-sample row vector of width {n_out}"
    if residual is not None and tuple(residual.shape) != (*x.shape[:-1], n_out):
        return f"residual shape {tuple(residual.shape)} is not the output shape"
    return None
