"""lyra::linear_group / lyra::qlinear_q_group: linears that read one input, as one GEMM.

    y = cat([act(x @ W_i^T + b_i) for i], -1)          (.., sum N_i)

The q, k and v projections of self-attention (and any other linears with one input and the
same activation) become one GEMM over N = sum N_i: one launch, one read of x, and a wider
grid (the SDXL / SD1.5 projections: 1.13-1.5x, kernel bench of session 5). The readers get
column slices of y (views, no copies).

The GEMM needs the weights as one (sum N_i, K) matrix. passes/shared_input.py makes them
adjacent rows of one buffer when it compiles the graph (the Parameters are re-pointed into it,
so in-place patches such as LoRA land there; quantised copies are allocated jointly), and the
CUDA path checks it on every call it runs eagerly (with CUDA graphs: at each capture): weights
that are no longer adjacent (a Parameter replaced by a new tensor, `model.to(...)`) take one GEMM
per weight plus a cat, logged as a fallback, never wrong output.

The reference runs one linear per weight, the op order of the eager model, so on the CPU the
rewritten graph stays bit-identical to eager.
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ._common import csrc, record_fallback
from .linear import _check_args, activate, linear_cuda
from .qlinear import qlinear_q_cuda, qlinear_q_reference


def joined(parts: List[Tensor]) -> Optional[Tensor]:
    """The tensors `parts`, contiguous and adjacent in one storage in this order, as one tensor
    (their concatenation along dim 0, a view: no copy); None when they are not."""
    if not parts:
        return None
    t0 = parts[0]
    rest = tuple(t0.shape[1:])
    expected = t0.storage_offset()
    storage = t0.untyped_storage().data_ptr()
    for t in parts:
        if (t.dtype != t0.dtype or t.device != t0.device or tuple(t.shape[1:]) != rest
                or not t.is_contiguous() or t.untyped_storage().data_ptr() != storage
                or t.storage_offset() != expected):
            return None
        expected += t.numel()
    rows = sum(t.shape[0] for t in parts)
    return t0.as_strided((rows, *rest), t0.stride(), t0.storage_offset())


def _joined_operands(weights: List[Tensor], biases: List[Tensor], wscales: Optional[List[Tensor]] = None):
    """((W, b, s), None): the weights, biases (None when there are none) and weight scales (None
    when not given), each joined into one tensor; or (None, why not)."""
    w = joined(weights)
    if w is None:
        return None, "weights are not adjacent rows of one buffer (a Parameter was replaced?)"
    b = joined(biases) if biases else None
    if biases and b is None:
        return None, "biases are not adjacent in one buffer (a Parameter was replaced?)"
    sc = joined(wscales) if wscales is not None else None
    if wscales is not None and sc is None:
        return None, "weight scales are not adjacent in one buffer"
    return (w, b, sc), None


def _each_bias(biases: List[Tensor], n: int) -> list:
    """One bias (or None) per weight: the op takes all biases or none."""
    return biases or [None] * n


def _check_group(n_weights: int, biases: List) -> None:
    if n_weights == 0:
        raise ValueError("lyra::linear_group: needs at least one weight")
    if biases and len(biases) != n_weights:
        raise ValueError(f"lyra::linear_group: {len(biases)} biases for {n_weights} weights (all or none)")


def _width(weights: List[Tensor]):
    return sum(w.shape[0] for w in weights)


# ---- lyra::linear_group -------------------------------------------------------------------

def linear_group_reference(x: Tensor, weights: List[Tensor], biases: List[Tensor], act: str) -> Tensor:
    return torch.cat([activate(F.linear(x, w, b), act) for w, b in zip(weights, _each_bias(biases, len(weights)))],
                     dim=-1)


@torch.library.custom_op("lyra::linear_group", mutates_args=())
def linear_group(x: Tensor, weights: List[Tensor], biases: List[Tensor], act: str) -> Tensor:
    _check_group(len(weights), biases)
    for w in weights:
        _check_args(x, w, act, False)
    return linear_group_reference(x, weights, biases, act)


@linear_group.register_fake
def _(x, weights, biases, act):
    _check_group(len(weights), biases)
    for w in weights:
        _check_args(x, w, act, False)
    return x.new_empty((*x.shape[:-1], _width(weights)))


@linear_group.register_kernel("cuda")
def _(x, weights, biases, act):
    _check_group(len(weights), biases)
    ops, reason = (None, "csrc not built") if csrc() is None else _joined_operands(weights, biases)
    if reason:
        record_fallback("linear_group", reason + "; one GEMM per weight")
        return torch.cat([linear_cuda(x, w, b, act, False, None, None)
                          for w, b in zip(weights, _each_bias(biases, len(weights)))], dim=-1)
    w, b, _ = ops
    return linear_cuda(x, w, b, act, False, None, None)


# ---- lyra::qlinear_q_group ----------------------------------------------------------------

def qlinear_q_group_reference(xq: Tensor, xscale: Tensor, qweights: List[Tensor], wscales: List[Tensor],
                              biases: List[Tensor], act: str, kind: str, out_dtype: torch.dtype) -> Tensor:
    return torch.cat([qlinear_q_reference(xq, xscale, w, s, b, act, False, None, None, kind, out_dtype)
                      for w, s, b in zip(qweights, wscales, _each_bias(biases, len(qweights)))], dim=-1)


def _check_q_group(qweights, wscales, biases) -> None:
    _check_group(len(qweights), biases)
    if len(wscales) != len(qweights):
        raise ValueError(f"lyra::qlinear_q_group: {len(wscales)} weight scales for {len(qweights)} weights")


@torch.library.custom_op("lyra::qlinear_q_group", mutates_args=())
def qlinear_q_group(xq: Tensor, xscale: Tensor, qweights: List[Tensor], wscales: List[Tensor],
                    biases: List[Tensor], act: str, kind: str, out_dtype: torch.dtype) -> Tensor:
    """lyra::qlinear_q over several weights reading one quantised activation: one GEMM."""
    _check_q_group(qweights, wscales, biases)
    return qlinear_q_group_reference(xq, xscale, qweights, wscales, biases, act, kind, out_dtype)


@qlinear_q_group.register_fake
def _(xq, xscale, qweights, wscales, biases, act, kind, out_dtype):
    _check_q_group(qweights, wscales, biases)
    return xq.new_empty((*xq.shape[:-1], _width(qweights)), dtype=out_dtype)


@qlinear_q_group.register_kernel("cuda")
def _(xq, xscale, qweights, wscales, biases, act, kind, out_dtype):
    _check_q_group(qweights, wscales, biases)
    ops, reason = _joined_operands(qweights, biases, wscales)
    if reason:
        record_fallback("qlinear_q_group", reason + "; one GEMM per weight")
        return torch.cat([qlinear_q_cuda(xq, xscale, w, s, b, act, False, None, None, kind, out_dtype)
                          for w, s, b in zip(qweights, wscales, _each_bias(biases, len(qweights)))], dim=-1)
    w, b, sc = ops
    return qlinear_q_cuda(xq, xscale, w, sc, b, act, False, None, None, kind, out_dtype)
