"""Keep channels_last activations channels_last.

    y = x.contiguous()      x 4-D, its traced strides channels_last (a NHWC permute viewed
                            back to NCHW, as in diffusers' Transformer2DModel output)
becomes y = x.contiguous(memory_format=torch.channels_last): a no-op instead of an NCHW copy
that the next convolution would transpose back and a residual add would mix layouts with.
Only when every user accepts any layout (convolutions, elementwise arithmetic, lyra ops);
a `.view()` user needs NCHW strides and keeps the copy.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from . import matcher as m
from .report import GraphReport

_LAYOUT_FREE_FNS = {torch.conv2d, torch.nn.functional.conv2d, operator.add, operator.mul, operator.sub,
                    operator.truediv, torch.add, torch.mul}


def _layout_free(user: fx.Node) -> bool:
    if user.op == "call_function":
        return user.target in _LAYOUT_FREE_FNS or str(getattr(user.target, "namespace", "")) == "lyra"
    return False


def _nhwc_strided(v) -> bool:
    return (isinstance(v, torch.Tensor) and v.dim() == 4 and v.is_contiguous(memory_format=torch.channels_last)
            and not v.is_contiguous())


def run(graph: fx.Graph, fake_mode, report: GraphReport) -> None:
    for node in list(graph.nodes):
        if not (m.is_method(node, "contiguous") and len(node.args) == 1 and not node.kwargs):
            continue
        if not _nhwc_strided(m.val(node.args[0])) or not all(_layout_free(u) for u in node.users):
            continue
        node.kwargs = {"memory_format": torch.channels_last}
        node.meta["example_value"] = m.fake_run(
            lambda t: t.contiguous(memory_format=torch.channels_last), (node.args[0],), fake_mode)
        report.hit("layout", "contiguous->channels_last")
