"""Remove no-ops that sit between the ops the passes fuse.

  dropout(x, p, training=False)      -> x
  x / 1.0, x * 1.0                   -> x     (diffusers' rescale_output_factor = 1.0)
  x.to(dtype) / x.float() that changes neither dtype nor device -> x
  cat([x[:, :t], x[:, t:]], dim=1)   -> x     (adjacent slices covering x along the cat dim:
                                             FLUX's single blocks split their output into
                                             text | image and the next block concatenates
                                             them again, a 28 MB copy per block at 1024x1024)
All of them return x itself (or a value equal to it bit for bit), so results do not change.

It also computes an activation of one tensor once (`silu(t)` written in every DiT block, on the
same conditioning t: FLUX has 77): later copies read the first. Besides the launches this
saves, the linears behind them then read one input, and the shared_input pass can run them as
one GEMM (FLUX's per-block modulation linears).
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F

from . import matcher as m
from .report import GraphReport


_CAT = {torch.cat, torch.concat}
_FULL = slice(None, None, None)


def _slice_along(node, dim: int):
    """node = x[:, ..., start:stop] (a unit-step slice on `dim` only) -> (x, start, stop)."""
    if not (m.is_fn(node, {operator.getitem}) and len(node.args) == 2):
        return None
    x, idx = node.args
    if not (isinstance(idx, tuple) and len(idx) == dim + 1 and isinstance(idx[dim], slice)):
        return None
    if any(not (isinstance(i, slice) and (i.start, i.stop, i.step) == (None, None, None)) for i in idx[:dim]):
        return None
    if idx[dim].step not in (None, 1):
        return None
    return x, idx[dim].start, idx[dim].stop


def _cat_of_own_slices(node: fx.Node):
    """cat([x[.., a0:a1], x[.., a1:a2], ..., x[.., ak:]], dim) with a0 in (None, 0) -> x."""
    if not m.is_fn(node, _CAT):
        return None
    parts, dim = m.arg(node, 0, "tensors"), m.arg(node, 1, "dim", 0)
    out = m.val(node)
    if not (isinstance(parts, (list, tuple)) and len(parts) > 1 and isinstance(dim, int)
            and isinstance(out, torch.Tensor)):
        return None
    dim = dim % out.dim()
    slices = [_slice_along(p, dim) for p in parts]
    if any(s is None for s in slices) or len({id(s[0]) for s in slices}) != 1:
        return None
    x = slices[0][0]
    xv = m.val(x)
    if not (isinstance(xv, torch.Tensor) and xv.dim() == out.dim() and xv.dtype == out.dtype):
        return None
    if slices[0][1] not in (None, 0) or slices[-1][2] is not None:
        return None
    if any(prev[2] is None or prev[2] is not nxt[1] and prev[2] != nxt[1]
           for prev, nxt in zip(slices, slices[1:])):
        return None
    return x


def _identity_source(node: fx.Node):
    whole = _cat_of_own_slices(node)
    if whole is not None:
        return whole, "cat(slices of x)"
    if m.is_fn(node, m.DROPOUT):
        training = m.arg(node, 2, "training", True)
        if training is False:
            return node.args[0], "dropout(eval)"
    if node.op == "call_function" and node.target in (operator.truediv, operator.mul) and len(node.args) == 2:
        x, c = node.args
        if isinstance(x, fx.Node) and isinstance(c, (int, float)) and not isinstance(c, bool) and c == 1:
            out, src = m.val(node), m.val(x)
            if isinstance(src, torch.Tensor) and isinstance(out, torch.Tensor) and out.dtype == src.dtype:
                return x, "x*1 or x/1"
    if m.is_method(node, "to", "float", "half", "bfloat16", "type") and isinstance(node.args[0], fx.Node):
        out, src = m.val(node), m.val(node.args[0])
        if (isinstance(src, torch.Tensor) and isinstance(out, torch.Tensor) and out.dtype == src.dtype
                and out.device == src.device and not node.kwargs.get("copy", False)
                and not node.kwargs.get("memory_format")):
            return node.args[0], "to(same dtype)"
    return None, None


# Pure activations whose repeats on one input are computed once (out-of-place calls only).
_PURE_ACTIVATIONS = m.SILU | m.GELU | {torch.sigmoid, torch.tanh, F.relu, torch.relu}
_WITH_INPLACE = m.SILU | {F.relu}


def _activation_key(node: fx.Node):
    """(target, args, kwargs) of an out-of-place pure activation, or None (also when the
    arguments are not hashable)."""
    if node.op != "call_function" or node.target not in _PURE_ACTIVATIONS:
        return None
    if node.target in _WITH_INPLACE and m.arg(node, 1, "inplace", False):
        return None
    key = node.target, tuple(node.args), tuple(sorted(node.kwargs.items()))
    try:
        hash(key)
    except TypeError:
        return None
    return key


def run(graph: fx.Graph, fake_mode, report: GraphReport) -> None:
    first: dict = {}
    for node in list(graph.nodes):
        src, what = _identity_source(node)
        if src is None:
            key = _activation_key(node)
            if key is None:
                continue
            src = first.setdefault(key, node)
            if src is node:
                continue
            what = "activation computed once"
        node.replace_all_uses_with(src)
        graph.erase_node(node)
        report.canonicalized[what] += 1
