"""Linears reading one input -> one GEMM (lyra::linear_group / lyra::qlinear_q_group).

Runs last (backend.py, after quantisation), over the lyra::linear and lyra::qlinear_q nodes
the other passes produced. Siblings are linears that read the same x (for qlinear_q: the same
quantised pair), each weight a model Parameter (or, quantised, a buffer of the graph), with the
same activation, no GLU / gate / residual, and a bias on all or none of them: the q, k and v
projections of self-attention, the k and v projections of cross-attention. Their readers get
`narrow` views of the joint output.

The joint GEMM needs the weights as adjacent rows of one buffer. High-precision weights: this
pass copies the siblings' Parameters into one buffer and points each Parameter's `.data` at its
rows (values, shapes, strides and identity unchanged; in-place patches such as LoRA then land in
the buffer). Quantised weights: quant/weights.py allocated the siblings' copies jointly. Biases
are joined like Parameters. A group that cannot be joined stays as separate linears, with the
reason in the dump (`shared_input`).

A Parameter given a new tensor later (`param.data = ...`, `model.to(...)`) is no longer
adjacent: the op notices at run time and runs one GEMM per weight (logged as a fallback).
Saving is unaffected: `state_dict()` and safetensors (>= 0.4) store non-overlapping views of
one buffer as separate tensors.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.fx as fx

from ..ops.linear_group import joined
from . import matcher as m
from .report import GraphReport

_LINEAR = torch.ops.lyra.linear.default
_QLINEAR_Q = torch.ops.lyra.qlinear_q.default
_LINEAR_GROUP = torch.ops.lyra.linear_group.default
_QLINEAR_Q_GROUP = torch.ops.lyra.qlinear_q_group.default


def _is(node, op: str) -> bool:
    return isinstance(node, fx.Node) and node.op == op


def _key(node: fx.Node) -> Optional[tuple]:
    """What siblings share, or None when `node` cannot join a group."""
    if node.op != "call_function":
        return None
    if node.target is _LINEAR:
        x, w, b, act, glu, gate, residual = node.args
        if glu or gate is not None or residual is not None or not _is(w, "placeholder"):
            return None
        if b is not None and not _is(b, "placeholder"):
            return None
        return (_LINEAR, x, act, b is None)
    if node.target is _QLINEAR_Q:
        xq, xs, qw, ws, b, act, glu, gate, residual, kind, out_dtype = node.args
        if glu or gate is not None or residual is not None or not (_is(qw, "get_attr") and _is(ws, "get_attr")):
            return None
        if b is not None and not _is(b, "placeholder"):
            return None
        return (_QLINEAR_Q, xq, xs, act, kind, out_dtype, b is None)
    return None


# Weight elements one joint GEMM may take (1 GiB in 16-bit). Joining copies the Parameters into
# one new buffer while the old ones are alive, so this bounds the extra memory of compiling
# (FLUX's 77 modulation linears, which read one silu(conditioning), hold 6.4 GB in bf16: 7
# GEMMs). Counted in elements from the output and input widths, so that the groups come out the
# same before quantisation (quant/apply.py allocates each group's quantised weights jointly)
# and after.
MAX_GROUP_ELEMENTS = 1 << 29


def _weight_elements(node: fx.Node) -> int:
    out, x = m.val(node), m.val(node.args[0])
    if not (isinstance(out, torch.Tensor) and isinstance(x, torch.Tensor)):
        return 0
    n, k = out.shape[-1], x.shape[-1]
    return n * k if isinstance(n, int) and isinstance(k, int) else 0


def cap_runs(nodes: list) -> list[list[fx.Node]]:
    """`nodes` (graph order) cut into consecutive runs of at most MAX_GROUP_ELEMENTS weights;
    the runs of >= 2 nodes."""
    runs, size = [[]], 0
    for n in nodes:
        e = _weight_elements(n)
        if runs[-1] and size + e > MAX_GROUP_ELEMENTS:
            runs.append([])
            size = 0
        runs[-1].append(n)
        size += e
    return [run for run in runs if len(run) >= 2]


def sibling_groups(graph: fx.Graph, target=None, capped: bool = True) -> list[list[fx.Node]]:
    """Groups (graph order, >= 2 nodes, at most MAX_GROUP_ELEMENTS weights each unless not
    `capped`) of linears that can share one GEMM; `target` limits them to lyra::linear or
    lyra::qlinear_q."""
    groups: dict = {}
    for node in graph.nodes:
        key = _key(node)
        if key is not None and (target is None or key[0] is target):
            groups.setdefault(key, []).append(node)
    out = []
    for nodes in groups.values():
        w_nodes = [n.args[1] if n.target is _LINEAR else n.args[2] for n in nodes]
        if len(nodes) >= 2 and len(set(w_nodes)) == len(w_nodes):  # a weight read twice: no
            out.extend(cap_runs(nodes) if capped else [nodes])
    return out


def _owns_storage(t: torch.Tensor) -> bool:
    return t.untyped_storage().nbytes() == t.numel() * t.element_size() and t.storage_offset() == 0


def _unjoinable(ts: list) -> Optional[str]:
    """Why the Parameters `ts` cannot become adjacent rows of one buffer (None: they are already,
    or _join can make them so)."""
    if any(t is None for t in ts):
        return "a weight or bias has no example value"
    if joined(ts) is not None:
        return None
    t0 = ts[0]
    for t in ts:
        if not isinstance(t, torch.nn.Parameter):
            return "a weight or bias is not a model Parameter"
        if t.dtype != t0.dtype or t.device != t0.device or tuple(t.shape[1:]) != tuple(t0.shape[1:]):
            return "the Parameters differ in dtype, device or row size"
        if not t.is_contiguous() or not _owns_storage(t):
            return "a Parameter is a view of other memory (joined in another group, or a placeholder)"
    return None


def _join(params: list) -> None:
    """Make `params` (which _unjoinable accepted) adjacent rows of one buffer, in this order."""
    if joined(params) is not None:
        return
    with torch.no_grad():
        buf = torch.cat([p.detach() for p in params], 0)
        off = 0
        for p in params:
            p.data = buf[off:off + p.shape[0]]
            off += p.shape[0]


def _group_reason(gm: fx.GraphModule, nodes: list, real: dict) -> Optional[str]:
    """Why `nodes` cannot run as one GEMM (None: they can; their Parameters are joined then)."""
    values = [m.val(n) for n in nodes]
    if not all(isinstance(v, torch.Tensor) for v in values):
        return "output is not a traced tensor"
    for v in values:
        width = v.shape[-1]
        if not isinstance(width, int) or (width * v.element_size()) % 16:
            return f"output width {width} leaves a column slice that is not 16-byte aligned"
        if v.dtype != values[0].dtype:
            return "outputs differ in dtype"
    quantised = nodes[0].target is _QLINEAR_Q
    to_join = {}  # what the group reads as Parameters: joined only once all of them can be
    if quantised:
        for idx in (2, 3):
            ts = [getattr(gm, n.args[idx].target, None) for n in nodes]
            if any(not isinstance(t, torch.Tensor) for t in ts) or joined(ts) is None:
                return "the quantised weights were not allocated jointly (made by an earlier graph)"
    else:
        to_join["weights"] = [real.get(n.args[1]) for n in nodes]
    b_idx = 4 if quantised else 2
    if nodes[0].args[b_idx] is not None:
        to_join["biases"] = [real.get(n.args[b_idx]) for n in nodes]
    for what, ts in to_join.items():
        reason = _unjoinable(ts)
        if reason:
            return f"{what}: {reason}"
    for ts in to_join.values():
        _join(ts)
    return None


def run(gm: fx.GraphModule, example_inputs: list, fake_mode, report: GraphReport) -> None:
    graph = gm.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    real = {n: example_inputs[i] for i, n in enumerate(placeholders) if i < len(example_inputs)}
    for nodes in sibling_groups(graph):
        names = [n.name for n in nodes]
        try:
            reason = _group_reason(gm, nodes, real)
            if reason is None:
                _rewrite(graph, nodes, fake_mode)
        except Exception as exc:  # noqa: BLE001 - the group stays as separate linears
            reason = f"rewrite failed: {exc!r}"[:300]
        op = "lyra::" + (_QLINEAR_Q_GROUP if nodes[0].target is _QLINEAR_Q else _LINEAR_GROUP)._opname
        report.shared_input.append({"nodes": names, "op": op, "fused": reason is None, "reason": reason})
        if reason is None:
            report.hit("shared_input", f"{len(nodes)} linears -> 1 GEMM"
                       + (" (quantised)" if nodes[0].target is _QLINEAR_Q else ""))


def _rewrite(graph: fx.Graph, nodes: list, fake_mode) -> None:
    if nodes[0].target is _LINEAR:
        x, _, b0, act = nodes[0].args[:4]
        target = _LINEAR_GROUP
        args = (x, [n.args[1] for n in nodes], [n.args[2] for n in nodes] if b0 is not None else [], act)
    else:
        xq, xs, _, _, b0, act = nodes[0].args[:6]
        kind, out_dtype = nodes[0].args[9:11]
        target = _QLINEAR_Q_GROUP
        args = (xq, xs, [n.args[2] for n in nodes], [n.args[3] for n in nodes],
                [n.args[4] for n in nodes] if b0 is not None else [], act, kind, out_dtype)
    value = m.fake_run(target, args, fake_mode)  # first: a failure leaves the graph as it was
    slices, off = [], 0
    for n in nodes:
        width = m.val(n).shape[-1]
        slices.append((off, width, m.fake_run(torch.narrow, (value, -1, off, width), fake_mode)))
        off += width
    for a in args[2:4] if target is _QLINEAR_Q_GROUP else ():
        for attr in a:  # get_attr nodes (no inputs) made just before each sibling: move up
            nodes[0].prepend(attr)
    with graph.inserting_before(nodes[0]):
        fused = graph.call_function(target, args)
        fused.meta["example_value"] = value
        fused.meta["lyra"] = "+".join(n.meta.get("lyra", "linear") for n in nodes)
        for n, (off, width, v) in zip(nodes, slices):
            view = graph.call_function(torch.narrow, (fused, -1, off, width))
            view.meta.update({k: n.meta[k] for k in ("stack_trace", "nn_module_stack") if k in n.meta})
            view.meta["example_value"] = v
            n.replace_all_uses_with(view)
    for n in nodes:
        graph.erase_node(n)
