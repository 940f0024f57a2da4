"""Remove no-ops that sit between the ops the passes fuse.

  dropout(x, p, training=False)      -> x
  x / 1.0, x * 1.0                   -> x     (diffusers' rescale_output_factor = 1.0)
  x.to(dtype) / x.float() that changes neither dtype nor device -> x
All three return x itself (or a value equal to it bit for bit), so results do not change.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from . import matcher as m
from .report import GraphReport


def _identity_source(node: fx.Node):
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


def run(graph: fx.Graph, fake_mode, report: GraphReport) -> None:
    for node in list(graph.nodes):
        src, what = _identity_source(node)
        if src is None:
            continue
        node.replace_all_uses_with(src)
        graph.erase_node(node)
        report.canonicalized[what] += 1
