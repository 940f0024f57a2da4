"""Which quantised linears would need a pass of their own over their input (config.quant_input_pass).

A quantised linear reads its activation in fp8 / int8 with a scale per row (token). Where the
kernel producing that activation can write it so (a norm / adaLN, a GELU or GEGLU epilogue, fp8
attention), no extra pass runs. Some producers cannot: a row's scale needs the row's amax, and
these kernels write a row from blocks that never meet:

  - 16-bit attention (cuDNN, flash, lyra's short-KV kernel): one block per (rows, head);
  - GroupNorm: group_norm.cu runs one block (cluster) per group of channels (group_norm_rows.cu's
    apply pass reads whole rows and could quantise them, but has no quantised output today);
  - a GEMM whose epilogue is at most a bias, a residual or a gate: one block per (rows, column
    tile). (A GELU / GEGLU epilogue runs as a pass over the GEMM's output that can quantise.)

A linear reading such a producer (through views) quantises its input with a separate pass
(lyra::quantize_rows over the whole activation) when config.quant_input_pass = "allow". With
"avoid" it stays in high precision instead, and the report names the producer: on the H100 the
16-bit GEMM costs about what the pass plus the fp8 GEMM cost at SDXL's out-projection shapes, and
its output is closer to eager (NOTES, sessions 17 and 22). "auto" avoids with fp8 and allows with
int8 (no int8 attention writes quantised rows, so every out-projection would stay in 16-bit).

Anything else that is still quantised by a separate pass after the rewrites (a graph input, a
per-sample conditioning vector such as silu(temb)) is counted by producer in the report:
`separate_passes` below.
"""
from __future__ import annotations

import operator
from typing import Callable, Optional

import torch
import torch.fx as fx

from .. import config
from . import attention as quant_attention

_LINEAR = torch.ops.lyra.linear.default
_QLINEAR = torch.ops.lyra.qlinear.default
_QUANTIZE = torch.ops.lyra.quantize.default
_ATTENTION = torch.ops.lyra.attention.default
_GROUP_NORM = torch.ops.lyra.group_norm.default

# ops that only reshape or select rows / columns of their first argument: the data a linear reads
# through them is the producer's output as written
_SHAPE_METHODS = {"view", "reshape", "permute", "transpose", "flatten", "contiguous", "unsqueeze", "squeeze",
                  "split", "split_with_sizes", "chunk", "narrow", "unflatten"}
_SHAPE_FUNCTIONS = {torch.reshape, torch.permute, torch.transpose, torch.flatten, torch.squeeze, torch.unsqueeze,
                    torch.split, torch.chunk, torch.narrow, operator.getitem}


def policy(kind: str) -> str:
    """'avoid' or 'allow' for quant kind (config.quant_input_pass, its auto resolved)."""
    if config.quant_input_pass != "auto":
        return config.quant_input_pass
    return "avoid" if kind == "fp8" else "allow"


def producer(x) -> object:
    """The node whose output x is, looking through shape-only ops (views, splits, getitems)."""
    while isinstance(x, fx.Node) and x.op in ("call_method", "call_function") and x.args \
            and isinstance(x.args[0], fx.Node):
        shape_only = (x.target in _SHAPE_METHODS if x.op == "call_method"
                      else x.target in _SHAPE_FUNCTIONS or getattr(x.target, "__name__", None) in _SHAPE_METHODS)
        if not shape_only:
            break
        x = x.args[0]
    return x


def describe(node) -> str:
    """A producer's name in the report: 'lyra::group_norm', 'silu', 'lyra::linear[silu]' (a 16-bit
    linear with that activation), 'graph input'."""
    if not isinstance(node, fx.Node):
        return type(node).__name__
    if node.op == "placeholder":
        return "graph input"
    if node.op == "call_method":
        return f".{node.target}()"
    t = node.target
    if t is _LINEAR and node.args[3] != "none":  # its activation epilogue: silu(temb) in a UNet
        return f"lyra::linear[{node.args[3]}]"
    if isinstance(t, torch._ops.OpOverload):
        return f"{t.namespace}::{t._opname}"
    return getattr(t, "__name__", str(t))


def _cannot_quantise(src: fx.Node, quantised_reader: Callable) -> Optional[str]:
    """Why src's kernel cannot write its output quantised per row, or None (it can, or it is not
    one of the producers above)."""
    if src.op != "call_function":
        return None
    if src.target is _ATTENTION:
        if quant_attention.would_rewrite(src, quantised_reader):
            return None  # fp8 attention: its kernel writes the rows quantised
        return "16-bit attention (its kernel writes a row's heads from different blocks)"
    if src.target is _GROUP_NORM:
        return "GroupNorm (lyra's GroupNorm kernels write 16-bit rows)"
    if src.target is _LINEAR:
        _x, _w, _b, act, glu, gate, residual = src.args
        if gate is not None or residual is not None:
            return "a GEMM with a residual / gate epilogue (a row's columns come from different blocks)"
        if act == "none" and not glu:
            return "a GEMM without an activation epilogue (a row's columns come from different blocks)"
    return None


def unfused_linears(gm: fx.GraphModule, will_quantise: Callable, kind: str) -> dict:
    """{lyra::linear node: why its input would need a separate quantise pass} for the linears
    will_quantise(node) says are quantised, under policy 'avoid' (else {})."""
    if policy(kind) != "avoid":
        return {}

    def quantised_reader(u: fx.Node, n: fx.Node) -> bool:  # for the fp8-attention check
        return (u.op == "call_function" and u.target is _LINEAR and u.args[0] is n and n not in u.args[1:]
                and kind == "fp8" and will_quantise(u))

    out, why_of = {}, {}
    for node in gm.graph.nodes:
        if not (node.op == "call_function" and node.target is _LINEAR and will_quantise(node)):
            continue
        src = producer(node.args[0])
        if not isinstance(src, fx.Node):
            continue
        if src not in why_of:
            why_of[src] = _cannot_quantise(src, quantised_reader)
        if why_of[src]:
            out[node] = (f"its input comes from {why_of[src]}: config.quant_input_pass = 'avoid' keeps it "
                         f"in high precision ('allow' quantises the input with a separate pass)")
    return out


def separate_passes(gm: fx.GraphModule) -> dict:
    """{producer: count} of the activations still quantised by a pass of their own after the
    rewrites: lyra::quantize nodes and lyra::qlinear nodes (which quantise their x themselves)."""
    counts: dict = {}
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in (_QUANTIZE, _QLINEAR):
            name = describe(producer(node.args[0]))
            counts[name] = counts.get(name, 0) + 1
    return counts
