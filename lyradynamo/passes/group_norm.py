"""group_norm (+ silu) -> lyra::group_norm

    y = F.group_norm(x, groups, weight, bias, eps); [y = F.silu(y)]
The op keeps x's memory format (channels_last stays channels_last), read off the traced
strides.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from ..ops._common import unsupported_reason
from ..ops.group_norm import output_format
from . import matcher as m
from .report import GraphReport


def _channels_last(x: torch.Tensor) -> bool:
    if x.dim() != 4:
        return False
    n, c, h, w = (m.hint(s) for s in x.shape)
    stride = tuple(m.hint(s) for s in x.stride())
    return c > 1 and stride == (h * w * c, 1, w * c, c) and stride != (c * h * w, h * w, w, 1)


def match(node: fx.Node) -> m.Rewrite | str:
    x = m.arg(node, 0, "input")
    groups = m.arg(node, 1, "num_groups")
    weight, bias = m.arg(node, 2, "weight"), m.arg(node, 3, "bias")
    eps = m.arg(node, 4, "eps", 1e-5)
    if not (isinstance(groups, int) and isinstance(eps, float)):
        return "num_groups/eps are traced values, not constants"
    xv = m.val(x)
    if not isinstance(xv, torch.Tensor) or xv.dim() < 3:
        return "input must be (N, C, *spatial)"
    reason = unsupported_reason(x=xv, weight=m.val(weight), bias=m.val(bias))
    if reason:
        return reason
    act, root, matched, label = "none", node, [node], "group_norm"
    user = m.only_user(node)
    if m.is_fn(user, m.SILU) and not m.arg(user, 1, "inplace", False):
        act, root, label = "silu", user, "group_norm+silu"
        matched.append(user)
    args = (x, groups, weight, bias, eps, act, _channels_last(xv))
    return m.Rewrite(root, torch.ops.lyra.group_norm.default, args, matched, label,
                     same_value=same_value(xv, m.val(root), args[-1]))


def same_value(xv: torch.Tensor, rv, channels_last: bool) -> bool:
    """lyra::group_norm returns x's dtype in output_format's layout: root's value stands for
    it when root already is exactly that."""
    return (isinstance(rv, torch.Tensor) and rv.dtype == xv.dtype
            and m.is_contiguous(rv, output_format(xv, channels_last)))


def run(graph: fx.Graph, fake_mode, report: GraphReport) -> None:
    for node in list(graph.nodes):
        if node.graph is not graph or not m.is_fn(node, m.GROUP_NORM):
            continue
        rw = match(node)
        if isinstance(rw, str):
            report.skip(node, rw)
            continue
        m.apply(graph, rw, fake_mode)
        report.hit("group_norm", rw.label)
