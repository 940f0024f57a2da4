"""linear (+ activation | GLU) (+ per-sample gate) (+ residual)  ->  lyra::linear

Matches, each step optional, each intermediate used once:
    y = linear(x, W, b)
    y = gelu(y) | gelu(y, approximate="tanh") | silu(y)
      | a, g = y.chunk(2, dim=-1); y = a * act(g)        (GEGLU / SwiGLU)
    y = gate * y        gate broadcasts as one row per sample: (B|1, 1, .., N)
    y = residual + y    residual has y's shape
The gated residual of DiT blocks (`x + gate_msa.unsqueeze(1) * attn.to_out(h)`) is the
last two steps. Wan's blocks write it as a float32 island around 16-bit values,
`(x.float() + attn(h) * gate_f32).type_as(x)` (the ffn's with `ff(h).float()`): that matches
as gate + residual too, reading x itself and the gate cast to x's dtype (one (B, 1, N) cast):
the GEMM's epilogue then adds in float32 and rounds once, where eager rounds the linear's
output to 16 bits first.
"""
from __future__ import annotations

import dataclasses
import operator

import torch
import torch.fx as fx

from ..ops._common import unsupported_reason
from . import matcher as m
from .report import GraphReport


def _act_of(node: fx.Node) -> str | None:
    if m.is_fn(node, m.GELU):
        approx = m.arg(node, 1, "approximate", "none")
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(approx)
    if m.is_fn(node, m.SILU):
        return "silu"
    return None


def _glu(y: fx.Node):
    """y.chunk(2, dim=-1) -> a * act(g): returns (mul node, act, matched nodes) or None."""
    chunk = m.only_user(y)
    if not (m.is_method(chunk, "chunk") or m.is_fn(chunk, {torch.chunk})):
        return None
    if m.arg(chunk, 1, "chunks") != 2 or m.arg(chunk, 2, "dim", 0) not in (-1, m.val(y).dim() - 1):
        return None
    gets = {u.args[1]: u for u in chunk.users if u.target is operator.getitem}
    if len(chunk.users) != 2 or set(gets) != {0, 1}:
        return None
    act_node = m.only_user(gets[1])
    act = _act_of(act_node) if act_node is not None else None
    mul = m.only_user(act_node) if act else None
    if mul is None or not m.is_fn(mul, m.MUL) or m.other_operand(mul, act_node) is not gets[0]:
        return None
    if len(gets[0].users) != 1:
        return None
    return mul, act, [y, chunk, gets[0], gets[1], act_node, mul]


def _float_gated_residual(y: fx.Node):
    """The float32 island of Wan-style blocks after a 16-bit y:
        (r.float() + [y.float()] * gate).to(y.dtype)     gate float32, one row per sample
    -> (gate, r, the cast back, the island's nodes), or None."""
    yv = m.val(y)
    if not (isinstance(yv, torch.Tensor) and yv.dtype in m.HALF_DTYPES):
        return None
    nodes, p = [], y
    up = m.only_user(y)
    if m.cast_of(up) == (y, torch.float32):
        nodes, p = [up], up
    mul = m.only_user(p)
    if not m.is_fn(mul, m.MUL):
        return None
    gate = m.other_operand(mul, p)
    gv, mv = m.val(gate), m.val(mul)
    if not (isinstance(gate, fx.Node) and isinstance(gv, torch.Tensor) and gv.dtype is torch.float32
            and m.is_row_vector_for(gv, mv) and gv.dim() <= mv.dim()):
        return None
    add = m.only_user(mul)
    if not (m.is_fn(add, m.ADD) and not add.kwargs):
        return None
    r_up = m.other_operand(add, mul)
    r = m.upcast_source(r_up)
    if r is None or m.val(r).dtype != yv.dtype or not m.same_shape(m.val(r), m.val(add)):
        return None
    end = m.downcast_user(add, yv.dtype)
    if end is None:
        return None
    return gate, r, end, nodes + [mul, add, r_up, end]


def _narrow_gate(graph: fx.Graph, rw: m.Rewrite, fake_mode) -> m.Rewrite:
    """A float32 gate (a float32 island's) read as x's dtype: a (B|1, .., N) cast inserted
    before the island's end, so that lyra::linear's arguments are all of x's dtype."""
    x, gate = rw.args[0], rw.args[5]
    dtype = m.val(x).dtype
    if gate is None or m.val(gate).dtype == dtype:
        return rw
    value = m.fake_run(torch.Tensor.to, (gate, dtype), fake_mode)
    with graph.inserting_before(rw.root):
        cast = m.emit(graph, "to", (gate, dtype), {}, value, rw.root)
    return dataclasses.replace(rw, args=(*rw.args[:5], cast, *rw.args[6:]))


def match(node: fx.Node) -> m.Rewrite | str:
    x, w = m.arg(node, 0, "input"), m.arg(node, 1, "weight")
    b = m.arg(node, 2, "bias")
    xv, wv = m.val(x), m.val(w)
    if not isinstance(xv, torch.Tensor) or not isinstance(wv, torch.Tensor):
        return "input or weight is not a traced tensor"
    reason = unsupported_reason(x=xv, weight=wv, bias=m.val(b))
    if reason:
        return reason
    if wv.dim() != 2 or xv.dim() == 0:
        return f"weight must be 2-D and x at least 1-D (got {wv.dim()}-D, {xv.dim()}-D)"
    act, glu, gate, residual = "none", False, None, None
    matched, cur, parts = [node], node, ["linear"]
    glu_match = _glu(node)
    user = m.only_user(cur)
    if glu_match:
        cur, act, nodes = glu_match
        glu = True
        matched += nodes
        parts.append(f"glu_{act}")
    elif user is not None and _act_of(user):
        act = _act_of(user)
        cur = user
        matched.append(user)
        parts.append(act)
    island = _float_gated_residual(cur)
    if island is not None:
        gate, residual, cur, nodes = island
        matched += nodes
        parts += ["gate(float32 island)", "residual"]
    user = m.only_user(cur)
    if island is None and m.is_fn(user, m.MUL):
        g = m.other_operand(user, cur)
        if isinstance(g, fx.Node) and m.is_row_vector_for(m.val(g), m.val(cur)) \
                and m.val(g).dim() <= m.val(cur).dim():
            gate, cur = g, user
            matched.append(user)
            parts.append("gate")
    user = m.only_user(cur)
    if island is None and m.is_fn(user, m.ADD) and not user.kwargs:
        r = m.other_operand(user, cur)
        rv, cv = m.val(r), m.val(cur)
        if isinstance(r, fx.Node) and isinstance(rv, torch.Tensor) and m.same_shape(rv, cv):
            residual, cur = r, user
            matched.append(user)
            parts.append("residual")
    return m.Rewrite(cur, torch.ops.lyra.linear.default, (x, w, b, act, glu, gate, residual),
                     matched, "+".join(parts), same_value=m.is_contiguous(m.val(cur)))  # as lyra::linear


def run(graph: fx.Graph, fake_mode, report: GraphReport) -> None:
    for node in list(graph.nodes):
        if node.graph is not graph or not m.is_fn(node, m.LINEAR):
            continue
        rw = match(node)
        if isinstance(rw, str):
            report.skip(node, rw)
            continue
        m.apply(graph, _narrow_gate(graph, rw, fake_mode), fake_mode)
        report.hit("linear", rw.label)
