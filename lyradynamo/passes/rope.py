"""Rotary embedding (+ the q/k RMSNorm and sequence concat before it) -> lyra::qk_norm_rope

Matches diffusers' `apply_rotary_emb(x, (cos, sin), use_real=True, use_real_unbind_dim=-1,
sequence_dim=1)` as traced:

    re, im = x.reshape(..., -1, 2).unbind(-1)
    rot = torch.stack([-im, re], dim=-1).flatten(3)
    out = (x.float() * cos[None, :, None, :] + rot.float() * sin[None, :, None, :]).to(x.dtype)

where x is (B, L, H, D) and cos/sin are (L, D) float32 tables (`.float()` / `.to()` are absent
when x is float32). When x = cat([rms_i(p_i) ...], dim=1) (joint text+image attention) or a
single rms(p), with rms a weight-only lyra::adaln RMSNorm, the norms and the cat fold into the
op: each part is normalised, rotated at its offset in the sequence and written into its slice
of the output.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from . import matcher as m
from .report import GraphReport

_ADALN = {torch.ops.lyra.adaln.default}
_CAT = {torch.cat, torch.concat}
_TABLE_INDEX = (None, slice(None, None, None), None, slice(None, None, None))


def _strip_float(node):
    """x.float() / x.to(torch.float32) -> x (the cast is part of the pattern)."""
    if m.is_method(node, "float") and len(node.args) == 1:
        return node.args[0]
    if m.is_method(node, "to") and len(node.args) == 2 and node.args[1] is torch.float32 and not node.kwargs:
        return node.args[0]
    return node


def _table(node):
    """cos[None, :, None, :] of a 2-D float32 table -> the table node."""
    if not (m.is_fn(node, {operator.getitem}) and node.args[1] == _TABLE_INDEX):
        return None
    t = m.val(node.args[0])
    if isinstance(t, torch.Tensor) and t.dim() == 2 and t.dtype == torch.float32:
        return node.args[0]
    return None


def _rotated_source(node):
    """flatten(stack([-im, re], -1), 3) with re, im = x.reshape(..., -1, 2).unbind(-1) -> x."""
    if not (m.is_method(node, "flatten") and tuple(node.args[1:]) == (3,)):
        return None
    stack = node.args[0]
    if not m.is_fn(stack, {torch.stack}) or m.arg(stack, 1, "dim") not in (-1, 4):
        return None
    pieces = stack.args[0]
    if not (isinstance(pieces, (list, tuple)) and len(pieces) == 2):
        return None
    neg, real = pieces
    if not m.is_fn(neg, {operator.neg, torch.neg}):
        return None
    imag = neg.args[0]
    if not (m.is_fn(real, {operator.getitem}) and m.is_fn(imag, {operator.getitem})):
        return None
    if real.args[0] is not imag.args[0] or real.args[1] != 0 or imag.args[1] != 1:
        return None
    unbind = real.args[0]
    if not (m.is_method(unbind, "unbind") and tuple(unbind.args[1:]) in ((-1,), (4,))):
        return None
    reshape = unbind.args[0]
    if not (m.is_method(reshape, "reshape") and reshape.args[-1] == 2):
        return None
    return reshape.args[0]


def _split_mul(mul, want_rotated: bool):
    """mul(a, b) -> (source x, table) where one operand is a table view."""
    if not m.is_fn(mul, m.MUL) or len(mul.args) != 2:
        return None
    for a, b in ((mul.args[0], mul.args[1]), (mul.args[1], mul.args[0])):
        table = _table(b)
        if table is None:
            continue
        src = _strip_float(a)
        if want_rotated:
            src = _rotated_source(src)
        if src is not None:
            return src, table
    return None


def _parts(x: fx.Node):
    """x -> (parts, weights, norm, eps, matched nodes) folding cat(dim=1) and weight-only RMSNorms."""
    parts, matched = [x], []
    if m.is_fn(x, _CAT) and len(x.users) == 2:
        dim = m.arg(x, 1, "dim", 0)
        tensors = x.args[0]
        if dim in (1, -3) and isinstance(tensors, (list, tuple)) and len(tensors) > 1:
            parts, matched = list(tensors), [x]
    norms = [p for p in parts if m.is_fn(p, _ADALN)]
    users = 1 if matched else 2  # the cat, or the rotation + the cast of the pattern itself
    if len(norms) == len(parts) and all(_plain_rms(p) and len(p.users) == users for p in norms):
        eps = {float(p.args[6]) for p in norms}
        weights = [p.args[1] for p in norms]
        if len(eps) == 1 and (all(w is not None for w in weights) or all(w is None for w in weights)):
            return ([p.args[0] for p in norms], [w for w in weights if w is not None], "rms",
                    eps.pop(), matched + norms)
    return parts, [], "none", 0.0, matched


def _plain_rms(node) -> bool:
    bias, mul, add, kind = node.args[2:6]  # (x, weight, bias, mul, add, kind, eps[, mul_offset])
    return kind == "rms" and bias is None and mul is None and add is None


def match(add: fx.Node) -> m.Rewrite | None:
    if len(add.args) != 2:
        return None
    for first, second in ((add.args[0], add.args[1]), (add.args[1], add.args[0])):
        plain, rotated = _split_mul(first, False), _split_mul(second, True)
        if plain and rotated and plain[0] is rotated[0]:
            break
    else:
        return None
    x, cos, sin = plain[0], plain[1], rotated[1]
    xv = m.val(x)
    if not (isinstance(xv, torch.Tensor) and xv.dim() == 4):
        return None
    root = add
    user = m.only_user(add)
    if m.is_method(user, "to") and len(user.args) == 2 and user.args[1] == xv.dtype and not user.kwargs:
        root = user
    elif xv.dtype != torch.float32:
        return None  # the result stays fp32: not the pattern (the op returns x's dtype)
    parts, weights, norm, eps, matched = _parts(x)
    label = "rope" + ("+rms_norm" if norm == "rms" else "") + (f"+cat{len(parts)}" if len(parts) > 1 else "")
    covered = [root, add, first, second, *matched]
    return m.Rewrite(root, torch.ops.lyra.qk_norm_rope.default, (parts, weights, norm, eps, cos, sin),
                     covered + _pattern_nodes(first, second), label)


def _pattern_nodes(*muls):
    """Every node between the muls and x (float casts, table views, the rotation chain)."""
    seen, stack = [], list(muls)
    while stack:
        n = stack.pop()
        if not isinstance(n, fx.Node) or n in seen or n.op != "call_function" and n.op != "call_method":
            continue
        if m.is_fn(n, _ADALN) or m.is_fn(n, _CAT):
            continue
        seen.append(n)
        if n.op == "call_method" and n.target in ("float", "to", "flatten", "unbind", "reshape"):
            stack.append(n.args[0])
        elif m.is_fn(n, {torch.stack}):
            stack.extend(n.args[0])
        elif m.is_fn(n, {operator.neg, torch.neg}):
            stack.append(n.args[0])
        elif m.is_fn(n, {operator.getitem}) and m.is_method(n.args[0], "unbind"):
            stack.append(n.args[0])
        elif m.is_fn(n, m.MUL):
            stack.extend(n.args)
    return seen


def run(graph: fx.Graph, fake_mode, report: GraphReport) -> None:
    for node in list(graph.nodes):
        if node.graph is not graph or not m.is_fn(node, m.ADD):
            continue
        rw = match(node)
        if rw is None:
            continue
        m.apply(graph, rw, fake_mode)
        report.hit("rope", rw.label)
