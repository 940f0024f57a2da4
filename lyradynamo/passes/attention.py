"""scaled_dot_product_attention (+ the head transposes around it) -> lyra::attention

    q = q_src.transpose(1, 2)   (or .permute(0, 2, 1, 3)); same for k and v
    o = F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p=0, is_causal, scale)
    o = o.transpose(1, 2)       (or .permute(0, 2, 1, 3))
becomes lyra::attention(q_src, k_src, v_src, ..., layout="blhd"), which reads and writes
the (B, L, H, D) layout of the projections: no transpose copies. If q, k and v are not all
such transposes, the op takes (B, H, L, D) as SDPA does (layout="bhld").
"""
from __future__ import annotations


import torch
import torch.fx as fx

from ..ops._common import unsupported_reason
from ..ops.attention import checked_mask
from . import matcher as m
from .report import GraphReport


def _head_swap_source(node) -> fx.Node | None:
    """If node = t.transpose(1, 2) / t.permute(0, 2, 1, 3) of a 4-D t, return t."""
    if m.is_method(node, "transpose") or m.is_fn(node, {torch.transpose}):
        dims = tuple(node.args[1:3])
        if sorted(d % 4 for d in dims if isinstance(d, int)) == [1, 2] and len(dims) == 2:
            src = node.args[0]
            return src if isinstance(m.val(src), torch.Tensor) and m.val(src).dim() == 4 else None
    if m.is_method(node, "permute") or m.is_fn(node, {torch.permute}):
        dims = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (tuple, list)) else node.args[1:]
        if tuple(dims) == (0, 2, 1, 3):
            return node.args[0]
    return None


def match(node: fx.Node) -> m.Rewrite | str:
    q, k, v = m.arg(node, 0, "query"), m.arg(node, 1, "key"), m.arg(node, 2, "value")
    mask = m.arg(node, 3, "attn_mask")
    dropout_p = m.arg(node, 4, "dropout_p", 0.0)
    is_causal = m.arg(node, 5, "is_causal", False)
    scale = m.arg(node, 6, "scale")
    gqa = m.arg(node, 7, "enable_gqa", False)
    if not m.is_const(dropout_p) or dropout_p != 0.0:
        return f"dropout_p={dropout_p} (only 0 is fused)"
    if gqa is not False:
        return "enable_gqa=True is not fused"
    if not (m.is_const(is_causal) and m.is_const(scale)):
        return "is_causal/scale are traced values, not constants"
    vals = [m.val(t) for t in (q, k, v)]
    if not all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in vals):
        return "q, k, v must be 4-D tensors"
    reason = unsupported_reason(q=vals[0], k=vals[1], v=vals[2], attn_mask=checked_mask(m.val(mask)))
    if reason:
        return reason
    scale = None if scale is None else float(scale)
    srcs = [_head_swap_source(t) for t in (q, k, v)]
    out_user = m.only_user(node)
    if all(s is not None for s in srcs):
        args = (*srcs, mask, scale, bool(is_causal), "blhd")
        if out_user is not None and _head_swap_source(out_user) is node:
            return m.Rewrite(out_user, torch.ops.lyra.attention.default, args,
                             [node, out_user, q, k, v], "attention(blhd)")
        return m.Rewrite(node, _BLHD_THEN_SWAP, args, [node, q, k, v], "attention(blhd)+transpose")
    return m.Rewrite(node, torch.ops.lyra.attention.default, (q, k, v, mask, scale, bool(is_causal), "bhld"),
                     [node], "attention(bhld)")


_BLHD_THEN_SWAP = object()  # marker: emit the op in blhd, then a transpose view back to bhld


def run(graph: fx.Graph, fake_mode, report: GraphReport) -> None:
    for node in list(graph.nodes):
        if node.graph is not graph or not m.is_fn(node, m.SDPA):
            continue
        rw = match(node)
        if isinstance(rw, str):
            report.skip(node, rw)
            continue
        if rw.target is _BLHD_THEN_SWAP:
            rw.target = torch.ops.lyra.attention.default
            new = m.apply(graph, rw, fake_mode)
            with graph.inserting_after(new):
                swap = graph.call_method("transpose", (new, 1, 2))
            new.replace_all_uses_with(swap, delete_user_cb=lambda u: u is not swap)
            swap.meta["example_value"] = m.fake_run(lambda t: t.transpose(1, 2), (new,), fake_mode)
        else:
            m.apply(graph, rw, fake_mode)
        report.hit("attention", rw.label)


def fuse_qkv_late(graph: fx.Graph, fake_mode, report: GraphReport) -> None:
    """After quantisation: a high-precision lyra::attention whose q and k are lyra::qk_norm_rope
    (same norm, eps and RoPE tables; read only there) and whose v is a cat along L of as many
    parts (or any v, left as is) gets them from one lyra::qk_norm_rope3: one pass per part over
    q, k and v instead of two kernels and a cat copy. (Late, so that FP8 attention, which
    quantises these same producers, sees them first.)"""
    qnr = torch.ops.lyra.qk_norm_rope.default
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not torch.ops.lyra.attention.default:
            continue
        q, k, v = node.args[:3]
        if not all(isinstance(t, fx.Node) and t.target is qnr and len(t.users) == 1 for t in (q, k)):
            continue
        (qp, qw, qn, qe, qc, qs), (kp, kw, kn, ke, kc, ks) = q.args, k.args
        if (qn, qe, qc, qs) != (kn, ke, kc, ks) or len(qp) != len(kp):
            continue
        vp = m.cat_inputs(v, 1) or []
        if len(vp) != len(qp):
            vp = []
        args = (list(qp), list(kp), vp, list(qw), list(kw), qn, qe, qc, qs)
        target = torch.ops.lyra.qk_norm_rope3.default
        value = m.fake_run(target, args, fake_mode)  # first: a failure leaves the graph as it was
        with graph.inserting_before(node):
            fused = graph.call_function(target, args)
        fused.meta["example_value"] = value
        outs = m.getitems(graph, fused, 3)
        node.args = (outs[0], outs[1], outs[2] if vp else v, *node.args[3:])
        for old in (q, k, *([v] if vp else [])):
            graph.erase_node(old)
        if not vp:
            graph.erase_node(outs[2])
        report.hit("rope", "q/k norm+rope" + (" + v cat" if vp else "") + " in one pass")
