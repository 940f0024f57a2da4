"""layer_norm / rms_norm (+ affine) (+ adaLN modulation) -> lyra::adaln

Norm forms (normalising the last dim):
    F.layer_norm(x, (D,), w, b, eps)        torch.rms_norm(x, (D,), w, eps)
    diffusers' hand-written RMSNorm:
        var = x.to(float32).pow(2).mean(-1, keepdim=True); y = x * torch.rsqrt(var + eps)
        [y = y.to(x.dtype)] [y = y * w] [y = y + b]
then, each optional and used once:
    y = y * mul     mul one row per sample (B|1, 1, .., D): the traced (1 + scale)
    y = y + add     add likewise: the shift
Every layer/rms norm becomes lyra::adaln, modulated or not. A float32 island, the norm of
x16.float() modulated in float32 and cast back to x16's dtype (Wan's blocks:
`(norm1(x.float()) * (1 + scale) + shift).type_as(x)`), becomes one lyra::adaln reading x16
with out_dtype = x16's dtype, the two casts included. A mul that is c + t with c a Python
number (diffusers' `1 + scale`, or a view `(1 + scale)[:, None, :]` only the norm reads) folds
into the op's mul_offset: lyra::adaln reads t and adds c itself, rounded as eager's add rounds,
and the aten add (a launch per block) goes once nothing else reads it.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from ..ops._common import unsupported_reason
from . import matcher as m
from .report import GraphReport


def _is_last_dim_shape(shape, x: torch.Tensor) -> bool:
    return (isinstance(shape, (tuple, list)) and len(shape) == 1
            and m.known_eq(shape[0], x.shape[-1]))


def _param_1d(node, d) -> bool:
    v = m.val(node)
    return isinstance(node, fx.Node) and isinstance(v, torch.Tensor) and v.dim() == 1 and m.known_eq(v.shape[0], d)


def _manual_rms(rsqrt: fx.Node):
    """Match diffusers' RMSNorm around its rsqrt. Returns (x, w, b, eps, last, nodes) or a reason."""
    add = rsqrt.args[0]
    if not (m.is_fn(add, m.ADD) and len(add.args) == 2 and isinstance(add.args[1], float)):
        return "rsqrt input is not mean + eps"
    mean, eps = add.args
    if not ((m.is_method(mean, "mean") or m.is_fn(mean, {torch.mean})) and m.arg(mean, 1, "dim") in (-1, [-1], (-1,))
            and mean.kwargs.get("keepdim", False)):
        return "not mean(-1, keepdim=True)"
    pw = mean.args[0]
    if not ((m.is_method(pw, "pow") or m.is_fn(pw, {operator.pow, torch.pow})) and pw.args[1] == 2):
        return "not pow(2)"
    src = pw.args[0]
    cast = None
    if m.is_method(src, "to", "float"):
        cast, src = src, src.args[0]
    xv = m.val(src)
    mul = m.only_user(rsqrt)
    if not (m.is_fn(mul, m.MUL) and m.other_operand(mul, rsqrt) is src):
        return "rsqrt result is not multiplied by the normalised input"
    nodes = [n for n in (cast, pw, mean, add, rsqrt, mul) if n is not None]
    cur = mul
    user = m.only_user(cur)
    if m.is_method(user, "to") and m.val(user).dtype == xv.dtype:
        cur = user
        nodes.append(user)
    if m.val(cur).dtype != xv.dtype:
        return f"normalised value stays {m.val(cur).dtype} while x is {xv.dtype} (fp32 weight on half input)"
    w = b = None
    user = m.only_user(cur)
    if m.is_fn(user, m.MUL) and _param_1d(m.other_operand(user, cur), xv.shape[-1]):
        w, cur = m.other_operand(user, cur), user
        nodes.append(user)
        user = m.only_user(cur)
        if m.is_fn(user, m.ADD) and _param_1d(m.other_operand(user, cur), xv.shape[-1]):
            b, cur = m.other_operand(user, cur), user
            nodes.append(user)
    if any(t is not None and m.val(t).dtype != xv.dtype for t in (w, b)):
        return "RMSNorm weight dtype differs from x dtype"
    return src, w, b, eps, cur, nodes


def match(node: fx.Node) -> m.Rewrite | str:
    if m.is_fn(node, m.RSQRT):
        got = _manual_rms(node)
        if isinstance(got, str):
            return got
        x, w, b, eps, cur, nodes = got
        kind, label = "rms", "rms_norm(diffusers)"
    else:
        x = m.arg(node, 0, "input")
        xv = m.val(x)
        if not isinstance(xv, torch.Tensor):
            return "input is not a traced tensor"
        if not _is_last_dim_shape(m.arg(node, 1, "normalized_shape"), xv):
            return "normalized_shape is not the last dim alone"
        if m.is_fn(node, m.LAYER_NORM):
            kind, w, b, eps = "layer", m.arg(node, 2, "weight"), m.arg(node, 3, "bias"), m.arg(node, 4, "eps", 1e-5)
        else:
            kind, w, b, eps = "rms", m.arg(node, 2, "weight"), None, m.arg(node, 3, "eps")
            if eps is None:
                eps = torch.finfo(xv.dtype).eps
        if not isinstance(eps, (int, float)):
            return "eps is a traced value, not a constant"
        cur, nodes, label = node, [node], f"{kind}_norm"
    xv = m.val(x)
    reason = unsupported_reason(x=xv, weight=m.val(w), bias=m.val(b))
    if reason:
        return reason
    mul = add = None
    user = m.only_user(cur)
    if m.is_fn(user, m.MUL):
        other = m.other_operand(user, cur)
        if isinstance(other, fx.Node) and m.is_row_vector_for(m.val(other), m.val(cur)) and m.val(other).dim() >= 2:
            mul, cur = other, user
            nodes.append(user)
            label += "+scale"
    user = m.only_user(cur)
    if m.is_fn(user, m.ADD) and not user.kwargs:
        other = m.other_operand(user, cur)
        if isinstance(other, fx.Node) and m.is_row_vector_for(m.val(other), m.val(cur)) and m.val(other).dim() >= 2:
            add, cur = other, user
            nodes.append(user)
            label += "+shift"
    reason = unsupported_reason(x=xv, mul=m.val(mul), add=m.val(add))
    if reason:
        return reason
    args = (x, w, b, mul, add, kind, float(eps), 0.0)
    x16 = m.upcast_source(x)
    down = m.downcast_user(cur, m.val(x16).dtype) if x16 is not None else None
    if down is not None:  # the float32 island: read x16, write its dtype (out_dtype)
        args = (x16, w, b, mul, add, kind, float(eps), 0.0, m.val(x16).dtype)
        nodes += [x, down]
        cur, label = down, label + "(float32 island)"
    return m.Rewrite(cur, torch.ops.lyra.adaln.default, args, nodes, label,
                     same_value=m.is_contiguous(m.val(cur)))  # lyra::adaln returns a contiguous tensor


def out_dtype(node: fx.Node):
    """A lyra::adaln node's out_dtype: set (not None) for a float32 island."""
    return node.args[8] if len(node.args) > 8 else node.kwargs.get("out_dtype")


def _number_plus(node):
    """(t, c) for node = c + t, t + c, torch.add(t, c) or t.add(c) with c a Python number and the
    sum in t's dtype (so that the op's `mul + mul_offset` is eager's add), else None."""
    if not ((m.is_fn(node, m.ADD) or m.is_method(node, "add")) and len(node.args) == 2 and not node.kwargs):
        return None
    a, b = node.args
    t, c = (b, a) if isinstance(b, fx.Node) else (a, b)
    if type(c) not in (int, float) or not isinstance(t, fx.Node):  # bool, SymInt, SymFloat: no
        return None
    tv, sv = m.val(t), m.val(node)
    if not (isinstance(tv, torch.Tensor) and isinstance(sv, torch.Tensor) and tv.dtype == sv.dtype):
        return None
    return t, float(c)


def _constant_index(idx) -> bool:
    """idx (a getitem's) is basic indexing by constants: ints, slices of ints, None, Ellipsis."""
    items = idx if isinstance(idx, tuple) else (idx,)
    return all(i is None or i is Ellipsis or type(i) is int
               or (isinstance(i, slice) and all(v is None or type(v) is int for v in (i.start, i.stop, i.step)))
               for i in items)


def _fold_mul_offset(graph: fx.Graph, node: fx.Node, fake_mode):
    """lyra::adaln `node` whose mul is c + t (`_number_plus`), or a view (c + t)[idx] that only
    node reads, reads t (that view retargeted to t[idx]) with mul_offset c instead; the add is
    erased once nothing else reads it (norms sharing one `1 + scale` each fold it). Returns c,
    or None where mul is no such sum."""
    mul = node.args[3]
    # a view read by node alone, as its mul only, can be retargeted in place
    own_view = (m.is_fn(mul, {operator.getitem}) and _constant_index(mul.args[1]) and list(mul.users) == [node]
                and node.args.count(mul) == 1)
    view = mul if own_view else None
    total = mul if view is None else view.args[0]
    split = _number_plus(total)
    if split is None:
        return None
    t, c = split
    if view is not None:  # (c + t)[idx] -> t[idx]: the same elements, without the c
        value = m.fake_run(operator.getitem, (t, view.args[1]), fake_mode)  # first: a failure changes nothing
        view.args = (t, view.args[1])
        view.meta["example_value"] = value
        t = view
    node.args = (*node.args[:3], t, *node.args[4:7], c, *node.args[8:])
    m.erase_unused(graph, [total])
    return c


def run(graph: fx.Graph, fake_mode, report: GraphReport) -> None:
    for node in list(graph.nodes):
        if node.graph is not graph:
            continue
        if not (m.is_fn(node, m.LAYER_NORM) or m.is_fn(node, m.RMS_NORM) or m.is_fn(node, m.RSQRT)):
            continue
        rw = match(node)
        if isinstance(rw, str):
            report.skip(node, rw)
            continue
        new = m.apply(graph, rw, fake_mode)
        offset = _fold_mul_offset(graph, new, fake_mode)
        label = rw.label if offset is None else rw.label.replace("+scale", f"+({offset:g}+scale)", 1)
        new.meta["lyra"] = label
        report.hit("adaln", label)
