"""A linear over a feature concat -> one linear per part, summed through the residual:

    y = residual + gate * (cat([a, b], dim=-1) @ W^T + bias)          (FLUX single blocks:
                                                                       attention output | MLP)
 -> t = residual + gate * (a @ W[:, :Ka]^T)
    y = t        + gate * (b @ W[:, Ka:]^T + bias)
Same sum, without writing and re-reading the concatenated activation (M x (Ka + Kb)); on
CUDA each part is one cuBLASLt call whose epilogue adds the previous one (the weight slices
are views: no copy). Only for act "none" (the split needs linearity) and part widths that
keep 16-byte alignment.

With config.quant on, quant/apply.py turns each part's linear into a quantised one over its
weight slice narrow(W, 1, offset, width): each slice gets its own quantised copy with its
own per-output-channel scales over its K columns (quant/weights.py). The activation is then
quantised per part: each token row of `a` and of `b` gets its own scale, where the unsplit
linear had one scale over the row of the concat (and likewise for the weight rows). Each
scale is at most the concat's, so the grid is finer: the result differs from the unsplit
quantised linear in its rounding, not in its accuracy (tests/test_quant_split_cat.py
compares both against eager). A part too narrow for the quantised GEMM (K % 16) stays in
high precision on its own, named in the report; a linear that the quantised GEMM takes
whole is not split into parts it would not take (that would trade a quantised GEMM for the
concat's memory traffic).
"""
from __future__ import annotations

import torch
import torch.fx as fx

from .. import config
from ..ops.qlinear import shape_unsupported
from . import matcher as m
from .report import GraphReport

_LINEAR = torch.ops.lyra.linear.default
_CAT = {torch.cat, torch.concat}


def _parts(x: fx.Node):
    if not (m.is_fn(x, _CAT) and len(x.users) == 1):
        return None
    xv = m.val(x)
    dim = m.arg(x, 1, "dim", 0)
    if not isinstance(xv, torch.Tensor) or dim not in (-1, xv.dim() - 1):
        return None
    parts = list(x.args[0])
    widths = [m.val(p).shape[-1] if isinstance(m.val(p), torch.Tensor) else None for p in parts]
    if len(parts) < 2 or any(not isinstance(w, int) or w % 8 for w in widths):
        return None
    return parts, widths


def _loses_quantisation(w: fx.Node, widths: list) -> bool:
    """With config.quant on: W (N, K) fits the quantised GEMM but one of its slices would not."""
    wv = m.val(w)
    if config.quant == "none" or not isinstance(wv, torch.Tensor) or wv.dim() != 2:
        return False
    (n, k), kind = wv.shape, config.quant
    return not shape_unsupported(n, k, kind) and any(shape_unsupported(n, kp, kind) for kp in widths)


def run(graph: fx.Graph, fake_mode, report: GraphReport) -> None:
    for node in list(graph.nodes):
        if not (node.op == "call_function" and node.target is _LINEAR):
            continue
        x, w, bias, act, glu, gate, residual = node.args
        split = _parts(x) if act == "none" and not glu else None
        if split is None or _loses_quantisation(w, split[1]):
            continue
        parts, widths = split
        acc, offset = residual, 0
        with graph.inserting_before(node):
            for i, (part, width) in enumerate(zip(parts, widths)):
                w_i = graph.call_function(torch.narrow, (w, 1, offset, width))
                w_i.meta["example_value"] = m.fake_run(torch.narrow, (w, 1, offset, width), fake_mode)
                last = i == len(parts) - 1
                args = (part, w_i, bias if last else None, "none", False, gate, acc)
                new = graph.call_function(_LINEAR, args)
                new.meta["example_value"] = m.fake_run(_LINEAR, args, fake_mode)
                new.meta["lyra"] = "linear+split_cat"
                acc, offset = new, offset + width
        node.replace_all_uses_with(acc)
        graph.erase_node(node)
        if not x.users:
            graph.erase_node(x)
        report.hit("split_cat", f"linear over cat of {len(parts)}")
