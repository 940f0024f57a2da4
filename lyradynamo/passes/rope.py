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

Wan's form (`match_split_pairs`) writes the same pairwise rotation into an empty_like(x) through
two strided setitems, reading cos at even and sin at odd positions of (1, L, 1, D) tables: it
becomes lyra::qk_norm_rope too, with (L, D) tables repeated pairwise from those positions (made
once per graph): x1*c - x2*s and x2*c + x1*s are the products and sums eager forms.

Qwen-Image's form (`match_complex`) multiplies x's pairs, read as complex numbers, by a complex
(L, D/2) table: `view_as_real(view_as_complex(x.float().reshape(..., -1, 2)) * f.unsqueeze(1))
.flatten(3).type_as(x)`. (a + ib)(c + is) = (ac - bs) + i(as + bc) is the same pairwise rotation
with cos = Re f and sin = Im f, each repeated pairwise into an (L, D) float32 table (made once
per graph). Its joint attention then concatenates the rotated text and image q (and k):
`cat([rope_txt, rope_img], dim=1)` of two such ops becomes one (`fold_cat`), with the
parts' tables concatenated once per graph, so the cat copy goes.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from . import matcher as m
from .adaln import out_dtype as adaln_out_dtype
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
    bias, mul, add, kind = node.args[2:6]  # (x, weight, bias, mul, add, kind, eps[, mul_offset, out_dtype])
    return kind == "rms" and bias is None and mul is None and add is None and adaln_out_dtype(node) is None


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


_EVEN = (Ellipsis, slice(0, None, 2))
_ODD = (Ellipsis, slice(1, None, 2))


def _pair_table(node, index):
    """t[..., 0::2] (index _EVEN) or t[..., 1::2] (_ODD) of a (1, L, 1, D) table -> t."""
    if not (m.is_fn(node, {operator.getitem}) and node.args[1] == index):
        return None
    t = m.val(node.args[0])
    if isinstance(t, torch.Tensor) and t.dim() == 4 and t.is_floating_point():
        return node.args[0]
    return None


def _halves(x1, x2):
    """x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1) -> x."""
    if not (m.is_fn(x1, {operator.getitem}) and m.is_fn(x2, {operator.getitem})):
        return None
    unbind = x1.args[0]
    if x2.args[0] is not unbind or (x1.args[1], x2.args[1]) != (0, 1):
        return None
    if not (m.is_method(unbind, "unbind") and tuple(unbind.args[1:]) in ((-1,), (4,)) and not unbind.kwargs):
        return None
    unflat = unbind.args[0]
    if not (m.is_method(unflat, "unflatten") and tuple(unflat.args[1:]) in ((-1, (-1, 2)), (3, (-1, 2)))):
        return None
    return unflat.args[0]


def _products(node, target):
    """node = a * b - c * d (target sub) or + (add) -> ((a, b), (c, d)), else None."""
    if not (m.is_fn(node, target) and len(node.args) == 2 and not node.kwargs):
        return None
    pairs = []
    for mul in node.args:
        if not (m.is_fn(mul, m.MUL) and len(mul.args) == 2):
            return None
        pairs.append(tuple(mul.args))
    return pairs


def _split_pair_terms(even, odd):
    """Wan's rotation: even = x1 * cos - x2 * sin, odd = x1 * sin + x2 * cos with
    cos = C[..., 0::2], sin = S[..., 1::2] -> (x, C, S, the views cos and sin, x1, x2), else None."""
    sub, add = _products(even, {operator.sub, torch.sub}), _products(odd, m.ADD)
    if sub is None or add is None:
        return None
    (a, cos), (b, sin) = sub
    if _pair_table(a, _EVEN) is not None:  # cos * x1
        a, cos = cos, a
    if _pair_table(b, _ODD) is not None:
        b, sin = sin, b
    tables = _pair_table(cos, _EVEN), _pair_table(sin, _ODD)
    x = _halves(a, b)
    if x is None or None in tables:
        return None
    if {frozenset(map(id, t)) for t in add} != {frozenset((id(a), id(sin))), frozenset((id(b), id(cos)))}:
        return None
    return x, tables[0], tables[1], cos, sin, a, b


def match_split_pairs(empty: fx.Node):
    """Wan's apply_rotary_emb, anchored at its `out = torch.empty_like(x)`:
        x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
        out[..., 0::2] = x1 * C[..., 0::2] - x2 * S[..., 1::2]
        out[..., 1::2] = x1 * S[..., 1::2] + x2 * C[..., 0::2]
        out.type_as(x)
    -> (the type_as node, x, C, S, matched nodes), or None. It is the pairwise rotation of
    lyra::qk_norm_rope with the (L, D) tables cos[2i] = cos[2i+1] = C[2i] and
    sin[2i] = sin[2i+1] = S[2i + 1]."""
    if not (m.is_fn(empty, {torch.empty_like}) and len(empty.args) == 1 and not empty.kwargs):
        return None
    sets = {"even": [], "odd": []}  # (slices are unhashable before Python 3.12)
    for u in empty.users:
        if m.is_fn(u, {operator.setitem}) and u.args[0] is empty and u.args[1] in (_EVEN, _ODD):
            sets["even" if u.args[1] == _EVEN else "odd"].append(u)
    rest = [u for u in empty.users if not m.is_fn(u, {operator.setitem})]
    if [len(v) for v in sets.values()] != [1, 1] or len(rest) != 1 or len(empty.users) != 3:
        return None
    (even,), (odd,) = sets["even"], sets["odd"]
    terms = _split_pair_terms(even.args[2], odd.args[2])
    if terms is None:
        return None
    x, cos_t, sin_t, cos, sin, x1, x2 = terms
    xv, end = m.val(x), rest[0]
    if x is not empty.args[0] or not (isinstance(xv, torch.Tensor) and xv.dim() == 4):
        return None
    if m.cast_of(end) != (empty, xv.dtype) or m.val(end).dtype != xv.dtype:
        return None
    for t in (m.val(cos_t), m.val(sin_t)):  # (1, L, 1, D) against x (B, L, H, D)
        # Wan's table width is a sum of Min() terms that equals D without sympy knowing it: the
        # traced values are compared there; lyra::qk_norm_rope checks (L, D) on every call
        same_d = m.known_eq(t.shape[3], xv.shape[3]) or m.hint(t.shape[3], True) == m.hint(xv.shape[3], True)
        if not (m.known_eq(t.shape[0], 1) and m.known_eq(t.shape[2], 1) and m.known_eq(t.shape[1], xv.shape[1])
                and same_d):
            return None
    unbind = x1.args[0]
    halves = [x1, x2, unbind, unbind.args[0]]  # and the unflatten
    nodes = [end, even, odd, empty, even.args[2], odd.args[2], *even.args[2].args, *odd.args[2].args,
             cos, sin, *halves]
    return end, x, cos_t, sin_t, nodes


def _complex_table(node):
    """f.unsqueeze(1) of a 2-D complex table f -> f."""
    if not (m.is_method(node, "unsqueeze") and tuple(node.args[1:]) == (1,) and not node.kwargs):
        return None
    t = m.val(node.args[0])
    if isinstance(t, torch.Tensor) and t.dim() == 2 and t.is_complex():
        return node.args[0]
    return None


def match_complex(vc: fx.Node):
    """Qwen-Image's apply_rotary_emb_qwen(x, f, use_real=False), anchored at view_as_complex:
        xr = torch.view_as_complex(x.float().reshape(B, L, H, -1, 2))
        out = torch.view_as_real(xr * f.unsqueeze(1)).flatten(3).type_as(x)
    (no casts when x is float32) -> (the last node, x, f, matched nodes), or None."""
    if not (m.is_fn(vc, {torch.view_as_complex}) and len(vc.args) == 1 and not vc.kwargs):
        return None
    reshape = vc.args[0]
    if not (m.is_method(reshape, "reshape") and len(reshape.users) == 1):
        return None
    x = _strip_float(reshape.args[0])
    casts = [reshape.args[0]] if x is not reshape.args[0] else []
    xv, rv = m.val(x), m.val(reshape)
    if not (isinstance(xv, torch.Tensor) and xv.dim() == 4 and isinstance(rv, torch.Tensor) and rv.dim() == 5):
        return None
    if any(len(c.users) != 1 for c in casts) or not m.known_eq(rv.shape[4], 2) or \
            not all(m.known_eq(rv.shape[i], xv.shape[i]) for i in range(3)):
        return None
    mul = m.only_user(vc)
    if not (m.is_fn(mul, m.MUL) and len(mul.args) == 2 and not mul.kwargs):
        return None
    view = mul.args[1] if mul.args[0] is vc else mul.args[0]
    table = _complex_table(view)
    if table is None or len(view.users) != 1:
        return None
    tv = m.val(table)
    if not (m.known_eq(tv.shape[0], xv.shape[1]) and m.known_eq(2 * tv.shape[1], xv.shape[3])):
        return None
    real = m.only_user(mul)
    if not (m.is_fn(real, {torch.view_as_real}) and len(real.args) == 1):
        return None
    end = flat = m.only_user(real)
    if not (m.is_method(flat, "flatten") and tuple(flat.args[1:]) == (3,) and not flat.kwargs):
        return None
    # back to x's dtype (a no-op for a float32 x): part of the pattern, the op returns x's dtype
    cast = m.only_user(flat)
    if m.cast_of(cast) == (flat, xv.dtype) and m.val(cast).dtype == xv.dtype:
        end = cast
    elif xv.dtype != torch.float32:
        return None
    nodes = [end, flat, real, mul, view, vc, reshape, *casts]
    return end, x, table, list(dict.fromkeys(nodes))


def _derived_table(graph, table: fx.Node, steps: list, key, fake_mode, cache: dict) -> fx.Node:
    """A float32 table made from `table` by steps [(method name or function, extra args,
    kwargs)], once per graph (cached under key) right after the table itself (after the last
    placeholder when it is a graph input)."""
    if key in cache:
        return cache[key]
    where = table
    if table.op == "placeholder":
        where = [n for n in graph.nodes if n.op == "placeholder"][-1]
    out = table
    for target, extra, kwargs in steps + [("float", (), {})]:
        if target == "float" and m.val(out).dtype == torch.float32:
            break
        fn = getattr(torch.Tensor, target) if isinstance(target, str) else target
        with graph.inserting_after(where):
            out = m.emit(graph, target, (out, *extra), kwargs,
                         m.fake_run(lambda *a, fn=fn, kw=kwargs: fn(*a, **kw), (out, *extra), fake_mode), table)
        where = out
    cache[key] = out
    return out


def _pair_repeated_table(graph, table: fx.Node, index, fake_mode, cache: dict) -> fx.Node:
    """The (L, D) float32 table t[0, :, 0, index].repeat_interleave(2, -1) of a (1, L, 1, D)
    table (Wan's), made once per graph."""
    sel = (0, slice(None, None, None), 0, index[1])
    steps = [(operator.getitem, (sel,), {}), ("repeat_interleave", (2,), {"dim": -1})]
    return _derived_table(graph, table, steps, (table, index[1].start), fake_mode, cache)


def _complex_part_table(graph, table: fx.Node, part: int, fake_mode, cache: dict) -> fx.Node:
    """The (L, D) float32 table view_as_real(f)[..., part].repeat_interleave(2, -1) of a complex
    (L, D/2) table f (part 0: cos, 1: sin), made once per graph."""
    steps = [(torch.view_as_real, (), {}), (operator.getitem, ((Ellipsis, part),), {}),
             ("repeat_interleave", (2,), {"dim": -1})]
    return _derived_table(graph, table, steps, (table, "complex", part), fake_mode, cache)


_ROPE = {torch.ops.lyra.qk_norm_rope.default}


def match_cat(cat: fx.Node):
    """cat([qk_norm_rope(...), ...], dim=1) of ops with tables, each read only by the cat, with
    one norm and one output dtype -> (parts, weights, norm, eps, cos tables, sin tables,
    matched), else None."""
    if not (m.is_fn(cat, _CAT) and m.arg(cat, 1, "dim", 0) in (1, -3)):
        return None
    ropes = cat.args[0]
    if not (isinstance(ropes, (list, tuple)) and len(ropes) > 1 and len(set(ropes)) == len(ropes)):
        return None
    if not all(m.is_fn(r, _ROPE) and len(r.users) == 1 and r.args[4] is not None for r in ropes):
        return None
    norms = {(r.args[2], float(r.args[3]) if r.args[2] == "rms" else 0.0) for r in ropes}
    weighted = {bool(r.args[1]) for r in ropes}
    if len(norms) != 1 or len(weighted) != 1 or len({m.val(r).dtype for r in ropes}) != 1:
        return None
    ((norm, eps),) = norms
    parts = [p for r in ropes for p in r.args[0]]
    weights = [w for r in ropes for w in r.args[1]]
    return parts, weights, norm, eps, [r.args[4] for r in ropes], [r.args[5] for r in ropes], [cat, *ropes]


def _joined_table(graph, tables: list, fake_mode, cache: dict) -> fx.Node:
    """torch.cat(tables) along L, made once per graph right after the last of them."""
    key = ("cat", *tables)
    if key not in cache:
        order = {n: i for i, n in enumerate(graph.nodes)}
        args = (list(tables),)
        with graph.inserting_after(max(tables, key=order.__getitem__)):
            cache[key] = m.emit(graph, torch.cat, args, {}, m.fake_run(torch.cat, args, fake_mode), tables[0])
    return cache[key]


def fold_cat(graph: fx.Graph, fake_mode, report: GraphReport, tables: dict) -> None:
    for node in list(graph.nodes):
        if node.graph is not graph or not m.is_fn(node, _CAT):
            continue
        got = match_cat(node)
        if got is None:
            continue
        parts, weights, norm, eps, coss, sins, matched = got
        cos, sin = _joined_table(graph, coss, fake_mode, tables), _joined_table(graph, sins, fake_mode, tables)
        label = f"joined ropes ({len(coss)} -> 1, cat folded)"
        rw = m.Rewrite(node, torch.ops.lyra.qk_norm_rope.default, (parts, weights, norm, eps, cos, sin),
                       matched, label, same_value=m.is_contiguous(m.val(node)))
        m.apply(graph, rw, fake_mode)
        report.hit("rope", label)


def _rotate_with_tables(graph, fake_mode, report, end, x, nodes, cos, sin, form: str) -> None:
    """end (the rotation of x, matched as `nodes`) -> lyra::qk_norm_rope with the (L, D) tables
    cos / sin, x's weight-only RMSNorm folded in."""
    parts, weights, norm, eps, matched = _parts(x)
    label = f"rope({form})" + ("+rms_norm" if norm == "rms" else "")
    rw = m.Rewrite(end, torch.ops.lyra.qk_norm_rope.default, (parts, weights, norm, eps, cos, sin),
                   nodes + matched, label, same_value=m.is_contiguous(m.val(end)))
    m.apply(graph, rw, fake_mode)
    report.hit("rope", label)


def run(graph: fx.Graph, fake_mode, report: GraphReport) -> None:
    tables: dict = {}
    for node in list(graph.nodes):
        if node.graph is not graph:
            continue
        if m.is_fn(node, {torch.empty_like}):
            got = match_split_pairs(node)
            if got is not None:
                end, x, cos_t, sin_t, nodes = got
                cos = _pair_repeated_table(graph, cos_t, _EVEN, fake_mode, tables)
                sin = _pair_repeated_table(graph, sin_t, _ODD, fake_mode, tables)
                _rotate_with_tables(graph, fake_mode, report, end, x, nodes, cos, sin, "split pairs")
            continue
        if m.is_fn(node, {torch.view_as_complex}):
            got = match_complex(node)
            if got is not None:
                end, x, table, nodes = got
                cos = _complex_part_table(graph, table, 0, fake_mode, tables)
                sin = _complex_part_table(graph, table, 1, fake_mode, tables)
                _rotate_with_tables(graph, fake_mode, report, end, x, nodes, cos, sin, "complex")
            continue
        if not m.is_fn(node, m.ADD):
            continue
        rw = match(node)
        if rw is None:
            continue
        m.apply(graph, rw, fake_mode)
        report.hit("rope", rw.label)
    fold_cat(graph, fake_mode, report, tables)
