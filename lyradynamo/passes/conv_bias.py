"""conv2d bias (+ per-channel adds, residual, output scale) folded into the op that follows.

A convolution with a bias runs on CUDA as cuDNN's convolution and then aten's in-place add of
the (1, C, 1, 1) bias: a broadcast add TensorIterator does not vectorise, one more pass over
the activation per convolution. For each y = conv2d(x, w, b), in this order:

  (a) y [+ t_1 ... + t_k] -> lyra::group_norm(., ...)
        t_i per channel: (C, 1, 1), (1, C, 1, 1) or (B, C, 1, 1) (a time embedding
        `temb[:, :, None, None]`); y and every add single-use, the last one the norm's input
      => lyra::group_norm(conv2d(x, w, None), ..., pre_bias=t_1' + ... + t_k', pre_bias2=b)
        t_i' = t_i.flatten(-3): (C,) or (B, C); the norm adds the two pre-biases in fp32 while
        it reads the activation for its statistics. With one t (a ResNet block's time
        embedding) no add is left in the graph; more t's are summed there (a few B*C elements)
  (b) y + r (or r + y) [/ c or * c]
        r y's shape, dtype and strides, c a Python number; y and the add single-use
      => lyra::bias_residual(conv2d(x, w, None), b', r', scale)
        when r is itself a single-use conv2d(x2, w2, b2) (a ResNet shortcut), its bias joins:
        r' = conv2d(x2, w2, None), b' = b + b2 (C elements); else r' = r, b' = b
  (c) any other y with a bias (any users)
      => lyra::bias_residual(conv2d(x, w, None), b, None, 1.0): the same bias add, vectorised

Float semantics: the bias sums are formed in the graph in the activation's dtype (C or B*C
elements); the ops add them to the activation in fp32 and round once, so results stay within
one rounding of eager's (which rounds after every add). Only patterns, never model names.
"""
from __future__ import annotations

import numbers
import operator
from typing import Any, Optional

import torch
import torch.fx as fx

from .. import fake_shortcuts
from ..ops._common import SUPPORTED_DTYPES
from . import group_norm as group_norm_pass
from . import matcher as m
from .report import GraphReport

_GN = torch.ops.lyra.group_norm.default
_BIAS_RESIDUAL = torch.ops.lyra.bias_residual.default


# ---- facts about nodes (no guards: sizes compared with known_eq, strides by hint) ---------

def _bias(conv: fx.Node) -> Any:
    return m.arg(conv, 2, "bias")


def _conv_out(conv: fx.Node) -> Optional[torch.Tensor]:
    """conv's traced output when the pass can handle it: a 4-D (N, C, H, W) float tensor."""
    y = m.val(conv)
    if not isinstance(y, torch.Tensor) or y.dim() != 4 or y.dtype not in SUPPORTED_DTYPES:
        return None
    return y


def _bias_ok(b: Any, y: torch.Tensor) -> bool:
    bv = m.val(b)
    return (isinstance(b, fx.Node) and isinstance(bv, torch.Tensor) and bv.dim() == 1
            and bv.dtype == y.dtype and m.known_eq(bv.shape[0], y.shape[1]))


def _strides(t: torch.Tensor) -> tuple:
    return tuple(m.hint(s) for s in t.stride())


def _per_channel(t: Any, y: torch.Tensor) -> bool:
    """t broadcasts against y (N, C, H, W) as (1 or N, C, 1, 1), with y's dtype."""
    tv = m.val(t)
    if not isinstance(t, fx.Node) or not isinstance(tv, torch.Tensor) or tv.dtype != y.dtype:
        return False
    if not y.dim() - 1 <= tv.dim() <= y.dim():
        return False
    shape = [1] * (y.dim() - tv.dim()) + list(tv.shape)
    return (m.known_eq(shape[1], y.shape[1]) and all(m.known_eq(s, 1) for s in shape[2:])
            and (m.known_eq(shape[0], 1) or m.known_eq(shape[0], y.shape[0])))


def _plain_binop(node: Any, targets: set) -> bool:
    return m.is_fn(node, targets) and len(node.args) == 2 and not node.kwargs


def _same_tensor_meta(a: torch.Tensor, b: torch.Tensor) -> bool:
    return m.same_shape(a, b) and a.dtype == b.dtype and _strides(a) == _strides(b)


# ---- matching ------------------------------------------------------------------------------

def _match_group_norm(conv: fx.Node, y: torch.Tensor):
    """(a): (adds, vectors, norm) or None."""
    node, adds, vecs = conv, [], []
    while True:
        user = m.only_user(node)
        if user is None:
            return None
        if (user.op == "call_function" and user.target is _GN and user.args and user.args[0] is node
                and node not in user.args[1:] and len(user.args) == 7 and not user.kwargs):
            out = m.val(node)
            if node is not conv and not (isinstance(out, torch.Tensor) and _same_tensor_meta(out, y)):
                return None
            return adds, vecs, user
        if not _plain_binop(user, m.ADD):
            return None
        t = m.other_operand(user, node)
        if not _per_channel(t, y):
            return None
        adds.append(user)
        vecs.append(t)
        node = user


def _scale_of(node: fx.Node, add: fx.Node) -> Optional[float]:
    """The factor of `add / c` or `add * c` (c a Python number), else None."""
    if _plain_binop(node, {operator.truediv}) and node.args[0] is add:
        c = node.args[1]
        if isinstance(c, numbers.Real) and not isinstance(c, bool) and c != 0:
            return 1.0 / float(c)
    if _plain_binop(node, m.MUL):
        c = m.other_operand(node, add)
        if isinstance(c, numbers.Real) and not isinstance(c, bool):
            return float(c)
    return None


def _match_residual(conv: fx.Node, y: torch.Tensor):
    """(b): (add, residual, residual conv or None, scale node or None, scale) or None."""
    add = m.only_user(conv)
    if not _plain_binop(add, m.ADD):
        return None
    r = m.other_operand(add, conv)
    rv, out = m.val(r), m.val(add)
    if not (isinstance(r, fx.Node) and isinstance(rv, torch.Tensor) and isinstance(out, torch.Tensor)
            and _same_tensor_meta(rv, y) and _same_tensor_meta(out, y)):
        return None
    r_conv = None
    if (m.is_fn(r, m.CONV2D) and m.only_user(r) is add and _conv_out(r) is not None
            and _bias_ok(_bias(r), y)):
        r_conv = r
    scale_node, scale = None, 1.0
    nxt = m.only_user(add)
    if nxt is not None:
        s = _scale_of(nxt, add)
        sv = m.val(nxt)
        if s is not None and isinstance(sv, torch.Tensor) and _same_tensor_meta(sv, y):
            scale_node, scale = nxt, s
    return add, r, r_conv, scale_node, scale


# ---- rewriting -----------------------------------------------------------------------------

def _fake(target, args: tuple, kwargs: dict, fake_mode) -> Any:
    if fake_mode is None:
        return None
    fa, fk = fx.node.map_arg((args, kwargs), m.val)
    return fake_shortcuts.fake_value(target, fa, fk, fake_mode)  # a size-keeping conv: no full run


def _unbiased(conv: fx.Node) -> tuple[tuple, dict]:
    """conv's (args, kwargs) with bias=None."""
    args, kwargs = list(conv.args), dict(conv.kwargs)
    if len(args) > 2:
        args[2] = None
    else:
        kwargs["bias"] = None
    return tuple(args), kwargs


def _emit_unbiased(graph: fx.Graph, conv: fx.Node, value: Any) -> fx.Node:
    args, kwargs = _unbiased(conv)
    with graph.inserting_before(conv):
        return m.emit(graph, conv.target, args, kwargs, value, conv)


def _fake_unbiased(conv: fx.Node, fake_mode) -> Any:
    """The convolution's value without its bias. Run, not copied from the biased one: the
    layout torch picks for it can differ (an NCHW input after channels_last producers)."""
    args, kwargs = _unbiased(conv)
    return _fake(conv.target, args, kwargs, fake_mode)


def _validate(target, args: tuple, fake_mode) -> None:
    """Under the tests' check (matcher.CHECK_SAME_VALUE): run the new op's fake implementation
    on the arguments before any change. Otherwise apply() runs it where the rewrite does not
    reuse its root's value; where it does, no fake run is left (the arguments are the matched
    nodes' own, which the op takes by construction)."""
    if m.CHECK_SAME_VALUE:
        _fake(target, args, {}, fake_mode)


def _rewrite_group_norm(graph, conv, b, adds, vecs, gn, fake_mode) -> str:
    # Every traced value first: a failure leaves the graph as it was.
    y_val = _fake_unbiased(conv, fake_mode)
    flat_vals = [_fake(torch.flatten, (t, -3), {}, fake_mode) for t in vecs]
    sum_vals, acc = [], None
    for f in flat_vals:
        acc = f if acc is None else _fake(operator.add, (acc, f), {}, fake_mode)
        sum_vals.append(acc)
    # the conv's bias rides as the second pre-bias (the only one when no t was added)
    b_val = m.val(b) if b is not None else None
    pre_vals = (acc, b_val) if acc is not None else (b_val, None)
    _validate(_GN, (y_val, *gn.args[1:], *pre_vals), fake_mode)

    y_new = _emit_unbiased(graph, conv, y_val)
    pre_bias = None
    with graph.inserting_before(gn):
        for t, f_val, s_val in zip(vecs, flat_vals, sum_vals):
            flat = m.emit(graph, torch.flatten, (t, -3), {}, f_val, gn)  # (B, C) or (C,): a view
            pre_bias = flat if pre_bias is None else m.emit(graph, operator.add, (pre_bias, flat), {}, s_val, gn)
    pre_biases = (pre_bias, b) if pre_bias is not None else (b, None)
    label = "conv" + ("+bias" if b is not None else "") + "+add" * len(adds) + "->group_norm"
    rw = m.Rewrite(gn, _GN, (y_new, *gn.args[1:], *pre_biases), [gn, *adds, conv], label,
                   same_value=group_norm_pass.same_value(y_val, m.val(gn), gn.args[6]))
    m.apply(graph, rw, fake_mode)
    return label


def _rewrite_residual(graph, conv, b, match, fake_mode) -> str:
    add, r, r_conv, scale_node, scale = match
    root = scale_node if scale_node is not None else add
    # Every traced value first: a failure leaves the graph as it was.
    y_val, bias_val, res_val = _fake_unbiased(conv, fake_mode), m.val(b), m.val(r)
    if r_conv is not None:
        b2 = _bias(r_conv)
        res_val = _fake_unbiased(r_conv, fake_mode)
        bias_val = _fake(operator.add, (b, b2), {}, fake_mode)
    _validate(_BIAS_RESIDUAL, (y_val, bias_val, res_val, scale), fake_mode)

    y_new = _emit_unbiased(graph, conv, y_val)
    bias, residual = b, r
    if r_conv is not None:
        residual = _emit_unbiased(graph, r_conv, res_val)
        with graph.inserting_before(root):
            bias = m.emit(graph, operator.add, (b, b2), {}, bias_val, root)  # (C,): both biases
    label = "conv+bias+residual" + ("(conv+bias)" if r_conv is not None else "")
    label += "+scale" if scale_node is not None else ""
    matched = [n for n in (conv, add, scale_node, r_conv) if n is not None]
    m.apply(graph, m.Rewrite(root, _BIAS_RESIDUAL, (y_new, bias, residual, scale), matched, label,
                             same_value=m.same_meta(m.val(root), y_val)), fake_mode)
    return label


def _rewrite_plain(graph, conv, b, fake_mode) -> str:
    y_val = _fake_unbiased(conv, fake_mode)
    _validate(_BIAS_RESIDUAL, (y_val, b, None, 1.0), fake_mode)
    y_new = _emit_unbiased(graph, conv, y_val)
    # root is the convolution itself, whose value y_new now holds: the new op gets its own
    m.apply(graph, m.Rewrite(conv, _BIAS_RESIDUAL, (y_new, b, None, 1.0), [conv], "conv+bias"), fake_mode)
    return "conv+bias"


def run(graph: fx.Graph, fake_mode, report: GraphReport) -> None:
    done: set = set()  # convolutions consumed (as a residual) by an earlier rewrite
    for conv in list(graph.nodes):
        if conv in done or not m.is_fn(conv, m.CONV2D) or not conv.users:
            continue
        y = _conv_out(conv)
        if y is None:
            continue
        b = _bias(conv)
        if b is not None and not _bias_ok(b, y):
            continue
        gn = _match_group_norm(conv, y)
        if gn is not None and (b is not None or gn[0]):
            label = _rewrite_group_norm(graph, conv, b, *gn, fake_mode)
        elif b is None:
            continue  # nothing to move: the adds stay as they are
        else:
            res = _match_residual(conv, y)
            if res is not None:
                if res[2] is not None:
                    done.add(res[2])
                label = _rewrite_residual(graph, conv, b, res, fake_mode)
            else:
                label = _rewrite_plain(graph, conv, b, fake_mode)
        report.hit("conv_bias", label)
