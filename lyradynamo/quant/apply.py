"""Turn a graph's lyra::linear nodes into lyra::qlinear (config.quant = "fp8" | "int8").

    lyra::linear(x, W, b, act, glu, gate, residual)     W a model Parameter (graph input)
 -> lyra::qlinear(x, Wq, Ws, b, act, glu, gate, residual, kind, inv_smooth)
with Wq / Ws (and inv_smooth) buffers of the graph module, derived from W by weights.py.
Layers stay in high precision by name (config.quant_exclude, regexes on the module path such
as "transformer_blocks.0.attn.to_q.weight") or because their shape does not fit the quantised
GEMM; the report lists every layer with its decision. With config.quant_master = "host" the
high-precision copy of a weight used only by quantised linears leaves the GPU.
"""
from __future__ import annotations

import re

import torch
import torch.fx as fx

from .. import config
from ..ops.qlinear import shape_unsupported
from . import calibration, weights

_LINEAR = torch.ops.lyra.linear.default
_QLINEAR = torch.ops.lyra.qlinear.default


def module_path(node: fx.Node) -> str:
    """'transformer_blocks.0.attn.to_q.weight' for a placeholder Dynamo made from that Parameter."""
    source = getattr(node.meta.get("grapharg"), "source", None)
    name = getattr(source, "name", None)
    name = name() if callable(name) else name
    if not isinstance(name, str):
        return node.name
    keys = [k for k in re.findall(r"\['([^']*)'\]", name) if k not in ("_modules", "_parameters", "_buffers")]
    if keys and keys[0] == "self":
        keys = keys[1:]
    return ".".join(keys) or node.name


def _excluded(path: str):
    for pattern in config.quant_exclude:
        if re.search(pattern, path):
            return pattern
    return None


def quantize_graph(gm: fx.GraphModule, example_inputs: list, report) -> list:
    """Rewrite gm in place; returns the QuantWeight entries the graph reads (for refresh)."""
    kind = config.quant
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    real = {n: example_inputs[i] for i, n in enumerate(placeholders) if i < len(example_inputs)}
    quantized, kept, entries, buffers = [], {}, {}, {}
    for node in list(gm.graph.nodes):
        if not (node.op == "call_function" and node.target is _LINEAR):
            continue
        w_node = node.args[1]
        param = real.get(w_node) if isinstance(w_node, fx.Node) else None
        path = module_path(w_node) if isinstance(w_node, fx.Node) else str(w_node)
        reason = _reason(param, path, kind)
        if reason:
            kept[path] = reason
            continue
        entry = entries.get(param)
        if entry is None:
            entry = weights.quantize_weight(path, param, kind, calibration.smooth_of(param) if kind == "int8" else None)
            entries[param] = entry
            idx = len(buffers) // 3
            for tag, t in (("qw", entry.qweight), ("ws", entry.wscale), ("is", entry.inv_smooth)):
                attr = f"_lyra_{tag}{idx}"
                if t is not None:
                    gm.register_buffer(attr, t, persistent=False)
                buffers[(param, tag)] = attr if t is not None else None
        with gm.graph.inserting_before(node):
            qw = gm.graph.get_attr(buffers[(param, "qw")])
            ws = gm.graph.get_attr(buffers[(param, "ws")])
            inv = gm.graph.get_attr(buffers[(param, "is")]) if buffers[(param, "is")] else None
        for n, t in ((qw, entry.qweight), (ws, entry.wscale), (inv, entry.inv_smooth)):
            if n is not None:
                n.meta["example_value"] = _fake_like(node, t)
        x, _, bias, act, glu, gate, residual = node.args
        node.target = _QLINEAR
        node.args = (x, qw, ws, bias, act, glu, gate, residual, kind, inv)
        node.meta["lyra"] = node.meta.get("lyra", "linear").replace("linear", f"qlinear[{kind}]", 1)
        quantized.append(path)
    if config.quant_master == "host":
        for param, entry in entries.items():
            w_node = next(n for n, t in real.items() if t is param)
            if not w_node.users:  # only quantised linears read it: its GPU copy can go
                weights.offload_master(entry)
    gm.graph.lint()
    gm.recompile()
    report.quant = {"kind": kind, "quantized": quantized, "kept": kept,
                    "master": config.quant_master}
    return list(entries.values())


def _reason(param, path: str, kind: str):
    if not isinstance(param, torch.nn.Parameter) or param.dim() != 2:
        return "weight is not a model Parameter (computed in the graph)"
    if param.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"weight dtype {param.dtype}"
    pattern = _excluded(path)
    if pattern:
        return f"kept in high precision by config.quant_exclude pattern {pattern!r}"
    return shape_unsupported(param.shape[0], param.shape[1], kind)


def _fake_like(node: fx.Node, t: torch.Tensor):
    """A fake tensor for a new buffer, in the fake mode of the graph's traced values."""
    mode = getattr(node.meta.get("example_value"), "fake_mode", None)
    if mode is None:
        return None
    return mode.from_tensor(t, static_shapes=True)
