"""q / k / v projections + q / k RMSNorm + RoPE (+ the cat of a joint attention's parts)
-> lyra::qkv_projection: each part's GEMM writes its rows of one q / k / v buffer, then the
norm and the RoPE run in place (or in the GEMM's epilogue: ops/qkv_projection.py), no cat.

Runs last (after shared_input, which made each part's q, k and v linears one
lyra::linear_group of three weights). It matches, for a lyra::attention:

    g_i = lyra::linear_group(x_i, [W_q, W_k, W_v], biases, "none")       per part i
    q_i = narrow(g_i, -1, 0, HD) as (B, L_i, H, D); k_i at HD; v_i at 2 HD
    q, k, v = lyra::qk_norm_rope3([q_i], [k_i], [v_i] or [], ...)   (v read as is when [])
    lyra::attention(q, k, v, ...)

and makes it

    p = lyra::qkv_projection([x_i], [W_q, W_k, W_v, ...], biases, q norms, k norms, H, eps, cos, sin)
    lyra::attention(p[..., :HD] as (B, L, H, D), p[..., HD:2HD] ..., p[..., 2HD:] ...)

For head dim 128 (FLUX's, and the only one the epilogue kernel is built for);
config.qkv_projection = False turns the rewrite off. Every condition it checks is about the
graph (users, shapes, offsets), never a model's names.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from .. import config
from ..ops.qkv_projection import HEAD_DIM
from . import matcher as m
from .report import GraphReport

_VIEWS = ("unflatten", "view", "reshape")


def _head_view(node) -> tuple[fx.Node, int, int] | None:
    """(g, column offset, width) if node is a (B, L, H, D) view of narrow(g, -1, offset, width)
    read only here, g a three-weight lyra::linear_group."""
    if not (m.is_method(node, *_VIEWS) and len(node.users) == 1):
        return None
    narrow = node.args[0]
    if not (m.is_fn(narrow, {torch.narrow}) and len(narrow.users) == 1 and narrow.args[1] in (-1, 2)):
        return None
    g, offset, width = narrow.args[0], narrow.args[2], narrow.args[3]
    out = m.val(node)
    if not (isinstance(out, torch.Tensor) and out.dim() == 4 and isinstance(offset, int) and isinstance(width, int)):
        return None
    if not (isinstance(g, fx.Node) and g.target is torch.ops.lyra.linear_group.default and len(g.args[1]) == 3
            and g.args[3] == "none"):
        return None
    return g, offset, width


def _part(qv, kv, vv) -> tuple[fx.Node, int] | str:
    """(the part's linear_group, H D) when q, k, v are its three column blocks in order."""
    views = [_head_view(t) for t in (qv, kv, vv)]
    if any(v is None for v in views):
        return "q, k or v is not a head view of one q / k / v linear_group read only here"
    (g, o0, w), (g1, o1, w1), (g2, o2, w2) = views
    if not (g is g1 is g2 and (o0, o1, o2) == (0, w, 2 * w) and w == w1 == w2 and len(g.users) == 3):
        return "q, k and v are not the three column blocks of one linear_group"
    return g, w


def match(attn: fx.Node):
    """(qk_norm_rope3 node, [(g_i, H D, (q_i, k_i, v_i) view nodes) per part], H, D) or why not."""
    q = attn.args[0]
    qnr3 = q.args[0] if isinstance(q, fx.Node) and q.target is operator.getitem else None
    if not (isinstance(qnr3, fx.Node) and qnr3.target is torch.ops.lyra.qk_norm_rope3.default):
        return "q is not from lyra::qk_norm_rope3"
    qp, kp, vp, qw, kw, norm, eps, cos, sin = qnr3.args
    if norm != "rms" or not qw or cos is None:
        return "not an RMSNorm with weights and RoPE"
    if any(u.target is not operator.getitem or u.args[1] not in (0, 1, 2) for u in qnr3.users):
        return "qk_norm_rope3 read other than through getitem"
    outs = {u.args[1]: u for u in qnr3.users}
    if outs.get(0) is not attn.args[0] or outs.get(1) is not attn.args[1] or any(
            len(u.users) != 1 for u in outs.values()):
        return "qk_norm_rope3's outputs are read elsewhere"
    if vp:
        if outs.get(2) is not attn.args[2]:
            return "v is not qk_norm_rope3's v"
        vs = list(vp)
    elif len(qp) == 1:
        vs = [attn.args[2]]
    else:
        return "a joint attention without its v parts"
    parts = []
    for q, k, v in zip(qp, kp, vs):
        part = _part(q, k, v)
        if isinstance(part, str):
            return part
        parts.append((*part, (q, k, v)))
    shape = m.val(qp[0]).shape
    heads, d = shape[2], shape[3]
    if not (isinstance(heads, int) and isinstance(d, int)) or d != HEAD_DIM:
        return f"head dim {d} (the fused epilogue is built for {HEAD_DIM})"
    if any(w != heads * d for _, w, _ in parts):
        return "projection width is not heads x head dim"
    biases = [g.args[2] for g, _, _ in parts]
    if any(bool(b) != bool(biases[0]) for b in biases):
        return "some parts have biases and others not"
    return qnr3, parts, heads, d


def run(graph: fx.Graph, fake_mode, report: GraphReport) -> None:
    if not config.qkv_projection:
        return
    for attn in list(graph.nodes):
        if attn.op != "call_function" or attn.target is not torch.ops.lyra.attention.default:
            continue
        found = match(attn)
        if isinstance(found, str):
            continue
        qnr3, parts, heads, d = found
        _rewrite(graph, fake_mode, attn, qnr3, parts, heads, d)
        report.hit("rope", f"q/k/v projections + q/k norm + rope into one buffer ({len(parts)} part(s))")


def _rewrite(graph, fake_mode, attn, qnr3, parts, heads, d) -> None:
    _, _, _, qw, kw, _, eps, cos, sin = qnr3.args
    xs = [g.args[0] for g, _, _ in parts]
    weights = [w for g, _, _ in parts for w in g.args[1]]
    biases = [b for g, _, _ in parts for b in (g.args[2] or [])]
    args = (xs, weights, biases, list(qw), list(kw), heads, eps, cos, sin)
    target = torch.ops.lyra.qkv_projection.default
    value = m.fake_run(target, args, fake_mode)  # first: a failure leaves the graph as it was
    width = heads * d
    with graph.inserting_before(attn):
        proj = graph.call_function(target, args)
        proj.meta["example_value"] = value
        views = []
        for i in range(3):
            block = graph.call_function(torch.narrow, (proj, -1, i * width, width))
            view = graph.call_method("unflatten", (block, -1, (heads, d)))
            block.meta["example_value"] = m.fake_run(torch.narrow, (proj, -1, i * width, width), fake_mode)
            view.meta["example_value"] = m.fake_run(lambda t: t.unflatten(-1, (heads, d)), (block,), fake_mode)
            views.append(view)
    attn.args = (*views, *attn.args[3:])
    m.erase_unused(graph, [qnr3, *qnr3.users, *(n for _, _, vs in parts for n in vs),
                           *(n.args[0] for _, _, vs in parts for n in vs), *(g for g, _, _ in parts)])
