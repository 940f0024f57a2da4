"""FP8 attention rewrite (config.quant = "fp8", config.fp8_attention): attention whose output
only quantised linears read runs in fp8, its inputs quantised by the kernels that produce them.

    q = lyra::qk_norm_rope(q_parts, q_w, 'rms', eps, cos, sin)    (or any (B, L, H, D) q)
    k = lyra::qk_norm_rope(k_parts, k_w, 'rms', eps, cos, sin)    (or any k)
    v = cat(v_parts, dim=1)                                        (or any v)
    o = lyra::attention(q, k, v, None, scale, causal, 'blhd')
    o -> flatten / reshape to (B, L, H*D) -> split / slice along L -> contiguous -> lyra::qlinear
         (a cast to o's own dtype on the way, Wan's `.type_as(query)`, is dropped)
becomes
    scales = lyra::attention_fp8_scales(q, k and v parts, q_w, k_w)  (RMS-normed q / k: a bound
                                                                      from the weights, no pass)
    q8, k8, v8 = lyra::qkv_quant3(q_parts, k_parts, v_parts, q_w, k_w, 'rms', eps, cos, sin, scales)
                 (one pass; lyra::qkv_quant per tensor where the parts do not line up)
    o8, o_scale = lyra::attention_fp8(q8, k8, v8, scales, scale, causal)
    o8 -> the same view chain, mirrored on o_scale (B, L) -> lyra::qlinear_q(o8 view, o_scale view)

so one kernel normalises, rotates and quantises q and k and copies v (its cat) to e4m3, and the
out-projection's separate quantise pass is gone. With config.fp8_attention = "auto" attention
whose q and k are RMS-normalised (DiTs: FLUX, SD3) is rewritten, and other attention only where
it is long and wide (head dim >= 128 and >= 8192 queries and keys at the traced call: video DiTs
such as Wan): elsewhere (SDXL) the amax passes over q and k cost more than fp8 attention saves;
"on" rewrites those too. Anything else reading o (or a mask, a head
dim cuDNN does not take) leaves the attention as it is, with the reason in the report.
"""
from __future__ import annotations

import operator
from typing import Optional

import torch
import torch.fx as fx

from .. import config
from ..ops import attention_fp8 as ops
from ..passes import matcher as m
from ..shape_policy import contiguous_value

_ATTENTION = torch.ops.lyra.attention.default
_QK_NORM_ROPE = torch.ops.lyra.qk_norm_rope.default
_QLINEAR = torch.ops.lyra.qlinear.default
_QLINEAR_Q = torch.ops.lyra.qlinear_q.default
_SCALES = torch.ops.lyra.attention_fp8_scales.default
_QKV_QUANT = torch.ops.lyra.qkv_quant.default
_QKV_QUANT3 = torch.ops.lyra.qkv_quant3.default
_ATTENTION_FP8 = torch.ops.lyra.attention_fp8.default
_IDENTITY = object()  # a view that keeps dims 0, 1 (B, L): the row scales stay as they are
_NO_OP = object()  # a cast to the dtype o already has (Wan's `o.type_as(query)`): dropped


def quantise_attention(gm: fx.GraphModule) -> dict:
    """Rewrite every eligible lyra::attention of gm; returns {"fp8": n, "kept": {node: why}}
    (the dump's quant section)."""
    done, kept = 0, {}
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not _ATTENTION:
            continue
        why = _unsupported(node)
        chain = None
        if why is None:
            chain = _consumers(node)
            why = chain if isinstance(chain, str) else None
        if why is not None:
            kept[node.name] = why
            continue
        try:
            _rewrite(gm, node, chain)
        except Exception as exc:  # noqa: BLE001 - raised while planning: the graph is unchanged
            kept[node.name] = f"the rewrite failed ({str(exc)[:120]})"
            continue
        done += 1
    return {"fp8": done, "kept": kept}


def _unsupported(node: fx.Node) -> Optional[str]:
    q, k, v, mask, _scale, _causal, layout = node.args
    if config.fp8_attention == "off":
        return "config.fp8_attention = 'off'"
    if layout != "blhd" or mask is not None:
        return "only blhd attention without a mask is quantised"
    qv = m.val(q)
    if not isinstance(qv, torch.Tensor) or not qv.is_floating_point():
        return "q is not a floating-point tensor"
    if getattr(qv, "fake_mode", None) is None:
        return "no fake values to check the rewrite with"
    d = qv.shape[-1]
    if not isinstance(d, int) or d % 16 or d > 256:
        return f"head dim {d} (cuDNN fp8 attention needs a multiple of 16, at most 256)"
    if config.fp8_attention == "auto":
        if not all(_rms_normed(n) for n in (q, k)) and not _long_and_wide(qv, m.val(k)):
            # SDXL (H100): the amax and quantise passes over q and k cost more than the fp8
            # attention saves at head dim 64 (0.752 -> 0.872 s/image)
            return (f"q / k are not RMS-normalised (their per-tensor amax would take a pass each), and "
                    f"the attention is not long and wide enough to pay for it (head dim >= "
                    f"{_WIDE_HEAD_DIM} and >= {_LONG_TOKENS} queries and keys at the traced call)")
        return ops.unavailable_reason(qv.device)
    return None


# auto, q / k not RMS-normalised: fp8 attention where the attention itself is long and wide.
# Its cost grows with L_q * L_k, the amax and quantise passes over q / k / v only with L. Wan 2.1
# 1.3B (head dim 128, 14 040 tokens; H200): 111.9 -> 102.4 ms a call. SDXL (head dim 64, 4096
# tokens at 1024; H100) lost, and SD1.5's only head dim >= 128 (160) is its 8x-downsampled level
# (64 tokens at 512): neither qualifies.
_WIDE_HEAD_DIM = 128
_LONG_TOKENS = 8192


def _long_and_wide(qv: torch.Tensor, kv) -> bool:
    """Head dim >= _WIDE_HEAD_DIM and both sequences >= _LONG_TOKENS at the traced call (one
    compilation serves every size: the first call's sizes decide; blhd layout)."""
    if not isinstance(kv, torch.Tensor) or kv.dim() != 4:
        return False
    lengths = [m.hint(qv.shape[1], allow_none=True), m.hint(kv.shape[1], allow_none=True)]
    return (qv.shape[-1] >= _WIDE_HEAD_DIM and None not in lengths and min(lengths) >= _LONG_TOKENS)


def _rms_normed(node) -> bool:
    """node = lyra::qk_norm_rope(parts, weights, 'rms', ...) read only here: its scale is a
    bound from the weights, no pass over the data."""
    return (isinstance(node, fx.Node) and node.op == "call_function" and node.target is _QK_NORM_ROPE
            and len(node.users) == 1 and node.args[2] == "rms" and bool(node.args[1]))


def would_rewrite(attn: fx.Node, quantised_reader) -> bool:
    """Whether quantise_attention will rewrite attn once the linears that quantised_reader(u, n)
    accepts are quantised (asked before the linears are rewritten: quant/input_pass.py)."""
    return _unsupported(attn) is None and not isinstance(_consumers(attn, quantised_reader), str)


def _fp8_qlinear_reader(u: fx.Node, n: fx.Node) -> bool:
    """u is an fp8 lyra::qlinear reading n as its (unsmoothed) input only."""
    return (u.op == "call_function" and u.target is _QLINEAR and u.args[0] is n
            and n not in u.args[1:] and u.args[8] == "fp8" and u.args[9] is None)


def _consumers(attn: fx.Node, quantised_reader=_fp8_qlinear_reader):
    """(chain nodes in graph order, qlinear leaves) from attn's output to the quantised linears
    reading it, or why not."""
    chain, leaves, stack = [], [], [attn]
    while stack:
        n = stack.pop()
        for u in n.users:
            if quantised_reader(u, n):
                leaves.append(u)
            elif _row_view(u, n) is not None:
                chain.append(u)
                stack.append(u)
            else:
                return f"its output is read by {u.format_node()[:80]}"
    if not leaves:
        return "no quantised linear reads its output"
    order = {n: i for i, n in enumerate(attn.graph.nodes)}
    return sorted(set(chain), key=order.get), leaves


def _row_view(u: fx.Node, parent: fx.Node):
    """How a view u of parent (B, L, ...) maps to the (B, L) row scales: _IDENTITY (it keeps
    dims 0 and 1), (op, target, extra args) building the same view of the scales, or None."""
    if u.op not in ("call_function", "call_method") or u.args[:1] != (parent,):
        return None
    args = (*u.args, *u.kwargs.values()) if set(u.kwargs) <= {"dim"} else None
    if args is None:
        return None
    pv, uv = m.val(parent), m.val(u)
    cast = m.cast_of(u)
    if cast is not None and cast[0] is parent and isinstance(pv, torch.Tensor) and cast[1] == pv.dtype:
        return _NO_OP  # replayed on the e4m3 output it would convert it: the rewrite drops it
    if u.op == "call_function" and u.target is operator.getitem:
        idx = u.args[1]
        if isinstance(idx, int) and isinstance(pv, (tuple, list)):
            return ("call_function", operator.getitem, (idx,))
        if isinstance(idx, tuple) and all(isinstance(i, slice) for i in idx) and \
                all(i == slice(None) for i in idx[2:]):  # (Qwen-Image's o[:, :txt_len, :])
            return ("call_function", operator.getitem, (idx[:2],))
        return None
    name = u.target if u.op == "call_method" else getattr(u.target, "__name__", "")
    if name in ("split", "split_with_sizes") and len(args) == 3 and args[2] in (0, 1):
        return ("call_method", name, tuple(args[1:]))
    if name == "contiguous" and len(args) == 1:
        return ("call_method", "contiguous", ())
    if name in ("flatten", "reshape", "view") and isinstance(uv, torch.Tensor) and isinstance(pv, torch.Tensor):
        if uv.dim() >= 2 and pv.dim() >= 2 and m.known_eq(uv.shape[0], pv.shape[0]) \
                and m.known_eq(uv.shape[1], pv.shape[1]):
            return _IDENTITY
    return None


def _insert(graph: fx.Graph, where: fx.Node, target, args: tuple, value) -> fx.Node:
    with graph.inserting_before(where):
        new = graph.call_function(target, args)
    new.meta["example_value"] = value
    return new


def _operand(node: fx.Node, which: int):
    """(amax parts, RMSNorm weights, qkv_quant args) for q / k / v = node: a single-user
    RMSNorm'd qk_norm_rope is quantised in its place (weight bound), a single-user cat along L
    by parts, anything else as one part."""
    if which < 2 and _rms_normed(node):
        parts, weights, norm, eps, cos, sin = node.args
        return [], list(weights), (list(parts), list(weights), norm, eps, cos, sin)
    if node.op == "call_function" and node.target is _QK_NORM_ROPE and len(node.users) == 1:
        parts, weights, norm, eps, cos, sin = node.args
        return list(parts), [], (list(parts), list(weights), norm, eps, cos, sin)
    parts = m.cat_inputs(node, 1)
    if parts and len(parts) <= 2:
        return parts, [], (parts, [], "none", 0.0, None, None)
    return [node], [], ([node], [], "none", 0.0, None, None)


def _fake(mode, fn, *args, **kwargs):
    """fn on fake values: graph nodes stand for their example values."""
    def value(a):
        return m.val(a) if isinstance(a, fx.Node) else a

    with mode:
        return fn(*fx.node.map_aggregate(args, value), **fx.node.map_aggregate(kwargs, value))


def _call(node: fx.Node, first, *rest, **kwargs):
    """node's op (a method or a function) on `first` in place of its first argument."""
    if node.op == "call_method":
        return _method(first, node.target, *rest, **kwargs)
    return node.target(first, *rest, **kwargs)


def _method(t, name: str, *args, **kwargs):
    """t.name(*args, **kwargs) on a fake value; `.contiguous()` as shape_policy traced it (no
    guard on a size its answer depends on)."""
    if name == "contiguous" and not args and not kwargs:
        return contiguous_value(t)
    return getattr(t, name)(*args, **kwargs)


def _plan(attn: fx.Node, chain, leaves, operands, fused: bool, mode) -> dict:
    """Every new node's fake value, computed before the graph changes: a failure here leaves the
    graph as it was (the rewrite below only inserts and rewires)."""
    q, k, v, _mask, scale, is_causal, _layout = attn.args
    plan = {"scales": _fake(mode, _SCALES, operands[0][0], operands[1][0], operands[2][0],
                            operands[0][1], operands[1][1])}
    if fused:
        (qp, qw, qn, qe, qc, qs), (kp, kw, *_), (vp, *_) = (op[2] for op in operands)
        plan["qkv"] = _fake(mode, _QKV_QUANT3, qp, kp, vp, qw, kw, qn, qe, qc, qs, plan["scales"])
    else:
        plan["qkv"] = tuple(_fake(mode, _QKV_QUANT, *op[2], plan["scales"], i) for i, op in enumerate(operands))
    plan["pair"] = _fake(mode, _ATTENTION_FP8, *plan["qkv"], plan["scales"], scale, is_causal)
    vals, svals = {attn: plan["pair"][0]}, {attn: plan["pair"][1]}
    hows = {u: _row_view(u, u.args[0]) for u in chain}  # asked before the rewrite rewires the chain
    for u in chain:  # graph order: parents first
        parent, how = u.args[0], hows[u]
        if how is _NO_OP:
            vals[u], svals[u] = vals[parent], svals[parent]
            continue
        vals[u] = _fake(mode, lambda *a, **kw: _call(u, *a, **kw), vals[parent], *u.args[1:], **u.kwargs)
        if how is _IDENTITY:
            svals[u] = svals[parent]
        else:
            op, target, extra = how
            svals[u] = _fake(mode, lambda t, *a: _method(t, target, *a) if op == "call_method" else target(t, *a),
                             svals[parent], *extra)
    out_dtype = m.val(attn).dtype
    plan["leaves"] = [_fake(mode, _QLINEAR_Q, vals[leaf.args[0]], svals[leaf.args[0]], *leaf.args[1:8], "fp8",
                            out_dtype) for leaf in leaves]
    plan.update(vals=vals, svals=svals, hows=hows, out_dtype=out_dtype)
    return plan


def _rewrite(gm: fx.GraphModule, attn: fx.Node, consumers) -> None:
    graph = gm.graph
    chain, leaves = consumers
    q, k, v, _mask, scale, is_causal, _layout = attn.args
    mode = getattr(m.val(q), "fake_mode", None)
    operands = [_operand(n, i) for i, n in enumerate((q, k, v))]
    (qp, qw, qn, qe, qc, qs), (kp, kw, kn, ke, kc, ks), (vp, vw, vn, _, vc, _) = (op[2] for op in operands)
    fused = (len(qp) == len(kp) == len(vp) and (qn, qe, qc, qs) == (kn, ke, kc, ks) and vn == "none"
             and not vw and vc is None)  # one pass over q, k and v
    plan = _plan(attn, chain, leaves, operands, fused, mode)
    scales = _insert(graph, attn, _SCALES, (operands[0][0], operands[1][0], operands[2][0],
                                            operands[0][1], operands[1][1]), plan["scales"])
    if fused:
        node = _insert(graph, attn, _QKV_QUANT3, (qp, kp, vp, qw, kw, qn, qe, qc, qs, scales), plan["qkv"])
        quantised = m.getitems(graph, node, 3)
    else:
        quantised = [_insert(graph, attn, _QKV_QUANT, (*op[2], scales, i), plan["qkv"][i])
                     for i, op in enumerate(operands)]
    pair = _insert(graph, attn, _ATTENTION_FP8, (*quantised, scales, scale, is_causal), plan["pair"])
    o8, o_scale = m.getitems(graph, pair, 2)
    attn.replace_all_uses_with(o8)
    row_scale = {o8: o_scale}
    for u in chain:
        parent, how = u.args[0], plan["hows"][u]
        if how is _NO_OP:
            row_scale[u] = row_scale[parent]
            u.replace_all_uses_with(parent)
            graph.erase_node(u)
            continue
        if how is _IDENTITY:
            row_scale[u] = row_scale[parent]
        else:
            op, target, extra = how
            with graph.inserting_after(u):
                row_scale[u] = graph.create_node(op, target, (row_scale[parent], *extra))
            row_scale[u].meta["example_value"] = plan["svals"][u]
        u.meta["example_value"] = plan["vals"][u]
    for leaf, value in zip(leaves, plan["leaves"]):
        x, qw_, ws, bias, act, glu, gate, residual, kind, _inv = leaf.args
        new = _insert(graph, leaf, _QLINEAR_Q, (x, row_scale[x], qw_, ws, bias, act, glu, gate, residual, kind,
                                                plan["out_dtype"]), value)
        new.meta.update({key: leaf.meta[key] for key in ("stack_trace", "nn_module_stack") if key in leaf.meta})
        new.meta["lyra"] = leaf.meta.get("lyra", "qlinear") + "+fp8 attention output"
        leaf.replace_all_uses_with(new)
        graph.erase_node(leaf)
    graph.erase_node(attn)
    for n in (q, k, v):  # the high-precision producers the quantising ones replaced
        if isinstance(n, fx.Node) and not n.users and n.op == "call_function":
            graph.erase_node(n)
