"""A small FX matcher: node predicates, shape facts without guards, and one rewrite helper.

Passes see the torch-level graph Dynamo hands a backend: calls of torch functions
(`torch._C._nn.linear`, `F.group_norm`), Tensor methods (`x.transpose(1, 2)`) and Python
operators (`a * b`). Nothing here knows a model.
"""
from __future__ import annotations

import dataclasses
import operator
from typing import Any, Callable, Iterable, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch.fx.experimental.symbolic_shapes import statically_known_true

from ..ops._common import fast_is_contiguous

Node = fx.Node

LINEAR = {torch._C._nn.linear, F.linear}
SDPA = {torch._C._nn.scaled_dot_product_attention, F.scaled_dot_product_attention}
GROUP_NORM = {F.group_norm, torch.group_norm}
LAYER_NORM = {F.layer_norm, torch.layer_norm}
RMS_NORM = {torch.rms_norm} | ({F.rms_norm} if hasattr(F, "rms_norm") else set())
GELU = {torch._C._nn.gelu, F.gelu}
SILU = {F.silu, torch._C._nn.silu}
MUL = {operator.mul, torch.mul}
ADD = {operator.add, torch.add}
RSQRT = {torch.rsqrt}
DROPOUT = {F.dropout}
CONV2D = {torch.conv2d, F.conv2d}
# what a rewritten node inherits from the node it stands for (the dump and error messages read them)
META_KEYS = ("stack_trace", "nn_module_stack", "source_fn_stack")


def is_fn(node: Any, targets: set) -> bool:
    return isinstance(node, Node) and node.op == "call_function" and node.target in targets


def is_method(node: Any, *names: str) -> bool:
    return isinstance(node, Node) and node.op == "call_method" and node.target in names


def arg(node: Node, index: int, name: str, default: Any = None) -> Any:
    """Argument by position or keyword (for methods, index counts self as 0)."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def val(node: Any) -> Any:
    """The traced (fake) value of a node, or the constant itself."""
    if isinstance(node, Node):
        return node.meta.get("example_value", node.meta.get("val"))
    return node


def only_user(node: Node) -> Optional[Node]:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def other_operand(binop: Node, this: Node) -> Any:
    """For a binary op node using `this`, the other operand (None if `this` is both)."""
    a, b = binop.args[0], binop.args[1]
    if a is this and b is not this:
        return b
    if b is this and a is not this:
        return a
    return None


HALF_DTYPES = (torch.float16, torch.bfloat16)
_CAST_METHODS = {"float": torch.float32, "half": torch.float16, "bfloat16": torch.bfloat16}


def cast_of(node: Any) -> Optional[tuple]:
    """(source, dtype) for a dtype cast node: x.float() / .half() / .bfloat16(), x.to(dtype),
    x.to(dtype=dtype), x.type(dtype) or x.type_as(y), with nothing else asked (no device, copy
    or memory format); else None."""
    if not (isinstance(node, Node) and node.op == "call_method" and node.args
            and isinstance(node.args[0], Node)):
        return None
    name, rest, kw = node.target, node.args[1:], node.kwargs
    if name in _CAST_METHODS and not rest and not kw:
        return node.args[0], _CAST_METHODS[name]
    if name in ("to", "type"):
        dtype = rest[0] if len(rest) == 1 and not kw else kw.get("dtype") if not rest and set(kw) == {"dtype"} else None
        return (node.args[0], dtype) if isinstance(dtype, torch.dtype) else None
    if name == "type_as" and len(rest) == 1 and not kw and isinstance(val(rest[0]), torch.Tensor):
        return node.args[0], val(rest[0]).dtype
    return None


def upcast_source(node: Any) -> Optional[Node]:
    """x for node = x cast from float16 / bfloat16 to float32 (an exact cast), else None."""
    cast = cast_of(node)
    if cast is None or cast[1] is not torch.float32:
        return None
    src = val(cast[0])
    return cast[0] if isinstance(src, torch.Tensor) and src.dtype in HALF_DTYPES else None


def downcast_user(node: Node, dtype: torch.dtype) -> Optional[Node]:
    """The only user of node when it casts node's float32 value to `dtype`, else None."""
    user = only_user(node)
    cast = cast_of(user)
    if cast is None or cast[0] is not node or cast[1] is not dtype:
        return None
    v = val(node)
    return user if isinstance(v, torch.Tensor) and v.dtype is torch.float32 else None


def known_eq(a: Any, b: Any) -> bool:
    """a == b is known without adding a guard (ints or SymInts)."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    try:
        return bool(statically_known_true(a == b))
    except Exception:  # noqa: BLE001
        return False


def same_shape(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dim() == b.dim() and all(known_eq(x, y) for x, y in zip(a.shape, b.shape))


def is_row_vector_for(v: Any, out: torch.Tensor) -> bool:
    """v broadcasts against `out` as (B or 1, 1, ..., 1, N): one row per sample (a gate/shift)."""
    if not isinstance(v, torch.Tensor) or v.dim() == 0 or v.dim() > out.dim():
        return False
    shape = [1] * (out.dim() - v.dim()) + list(v.shape)
    if not known_eq(shape[-1], out.shape[-1]):
        return False
    if any(not known_eq(s, 1) for s in shape[1:-1]):
        return False
    return out.dim() == 1 or known_eq(shape[0], 1) or known_eq(shape[0], out.shape[0])


def hint(v: Any, allow_none: bool = False) -> Any:
    """A concrete example value for an int or SymInt (no guard). A size with none (an unbacked
    one: data-dependent, e.g. a slice at a computed offset) raises, or gives None with
    allow_none."""
    if isinstance(v, torch.SymInt):
        node = v.node
        h = getattr(node, "hint", None)
        return h if h is not None else node.shape_env.size_hint(node.expr, allow_none=allow_none)
    return v


def int_pair(v: Any) -> Optional[tuple]:
    """A conv argument (stride, padding, dilation: an int or a pair of ints) as a pair of ints;
    None for anything else ("same", SymInts, bools)."""
    if type(v) is int:
        return (v, v)
    if isinstance(v, (list, tuple)) and len(v) == 2 and all(type(e) is int for e in v):
        return tuple(v)
    return None


def is_const(x: Any) -> bool:
    return not isinstance(x, (Node, torch.Tensor))


@dataclasses.dataclass
class Rewrite:
    """One match: replace `root` (the last matched node) with target(*args)."""

    root: Node
    target: Callable
    args: tuple
    matched: list  # nodes the match covers (erased when unused afterwards)
    label: str  # what was fused, for the dump, e.g. "linear+gelu_tanh+gate+residual"
    # The new op returns what root returned: same shape, dtype and strides (a contiguous
    # result of the same elementwise tail). apply() then reuses root's fake value instead of
    # running the op's fake implementation: with symbolic sizes each such run costs ~2-3 ms
    # of fake-tensor dispatch (SDXL's linears and norms: ~2.5 s of its first call on the CPU).
    same_value: bool = False


# Tests set this: apply() then also runs the fake implementation where it reuses root's value
# and raises if the two differ in shape, dtype or strides.
CHECK_SAME_VALUE = False


def same_meta(a: Any, b: Any) -> bool:
    """Same dtype, device, sizes and strides, each size known equal without a guard (known_eq)."""
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
        return False
    if a.dtype != b.dtype or a.device != b.device or not same_shape(a, b):
        return False
    return all(known_eq(x, y) for x, y in zip(a.stride(), b.stride()))


def check_same_meta(got: Any, expected: Any, what: str) -> None:
    """AssertionError naming `what` and both tensors' dtype, sizes and strides unless same_meta."""
    if not same_meta(got, expected):
        raise AssertionError(f"{what}: {_meta_text(got)} where the op itself gives {_meta_text(expected)}")


def _meta_text(t: Any) -> str:
    if not isinstance(t, torch.Tensor):
        return repr(type(t))
    return f"{t.dtype} {list(t.shape)} strides {list(t.stride())}"


def is_contiguous(v: Any, memory_format=torch.contiguous_format) -> bool:
    """v is a tensor contiguous in memory_format. A fake tensor's contiguity is worked out when
    it is made: asking adds no guard (checked: the same guards with torch's guard-free
    `is_contiguous_for_memory_format_or_false`, which answers False more often and so left
    passes 1.5x slower). Asking torch costs ~0.7 ms on symbolic sizes (SymInt arithmetic; 0.7 s
    of SDXL's 1.9 s of passes on the CPU machine), so strides that are, term for term, the ones
    torch writes for the sizes answer True first (ops._common.fast_is_contiguous); anything else
    asks torch."""
    if not isinstance(v, torch.Tensor):
        return False
    answer = fast_is_contiguous(v, memory_format)
    if CHECK_SAME_VALUE:  # the tests: torch agrees, but where its channels_last flag is loose
        expected = v.is_contiguous(memory_format=memory_format)
        # torch 2.11 (the GPU machine's) answers channels_last on symbolic sizes by how the tensor
        # was made: False for a conv's, an add's or an empty(memory_format=)'s output, True for a
        # silu's or an empty_strided's, all with the same strides (2.13 answers True for each).
        # True from the strides as written holds at every size, so it may stand against that False.
        loose = memory_format == torch.channels_last and answer and not expected
        assert answer == expected or loose, (_meta_text(v), memory_format)
    return answer


def _value_for(rw: Rewrite, fake_mode: Any) -> Any:
    """The new node's fake value: root's own (same_value) or the op's fake implementation's."""
    reused = rw.root.meta.get("example_value") if rw.same_value else None
    if not isinstance(reused, torch.Tensor):
        return fake_run(rw.target, rw.args, fake_mode)
    if CHECK_SAME_VALUE and fake_mode is not None:
        check_same_meta(reused, fake_run(rw.target, rw.args, fake_mode), f"{rw.label}: same_value reuses root's")
    return reused


def apply(graph: fx.Graph, rw: Rewrite, fake_mode: Any) -> Node:
    """Insert the new call after rw.root, move root's users to it, drop dead matched nodes."""
    value = _value_for(rw, fake_mode)  # first: a failure leaves the graph as it was
    with graph.inserting_after(rw.root):
        new = graph.call_function(rw.target, rw.args)
    new.meta.update({k: v for k, v in rw.root.meta.items() if k in META_KEYS})
    new.meta["example_value"] = value
    new.meta["lyra"] = rw.label
    rw.root.replace_all_uses_with(new)
    erase_unused(graph, rw.matched)
    return new


def emit(graph: fx.Graph, target: Callable | str, args: tuple, kwargs: dict, value: Any, like: Node) -> Node:
    """A new call (at the graph's current insertion point) with its traced value `value` and
    like's META_KEYS; a str target is a tensor method (`"to"`: args[0].to(*args[1:]))."""
    make = graph.call_method if isinstance(target, str) else graph.call_function
    node = make(target, args, kwargs)
    node.meta.update({k: v for k, v in like.meta.items() if k in META_KEYS})
    node.meta["example_value"] = value
    return node


def erase_unused(graph: fx.Graph, nodes: Iterable[Node]) -> None:
    """Erase the nodes of `nodes` that end up with no users: a node whose users are all erased
    here goes too. Repeats over the (small) set until nothing changes, instead of sorting it by
    graph position (an index of the whole graph per rewrite was O(nodes) each time: 0.8 s of
    SDXL's 5.7 s of passes on the CPU)."""
    pending = {n for n in nodes if n.graph is graph}
    changed = True
    while changed:
        changed = False
        for node in [n for n in pending if not n.users]:
            graph.erase_node(node)
            pending.discard(node)
            changed = True


def fake_run(target: Callable, args: tuple, fake_mode: Any, cache: bool = False) -> Any:
    """target(*args) on the nodes' fake values, by default without the fake-tensor dispatch
    cache: with symbolic sizes, building an entry costs more (~4 ms) than the call itself, and
    even a hit rebuilds the outputs' symbolic sizes (lyra::quantize on a (s0, s1, 640) input, CPU
    machine: 931 us a call with hits, 782 us without the cache)."""
    fake_args = fx.node.map_arg(args, val)
    if fake_mode is None:
        return None
    old = getattr(fake_mode, "cache_enabled", None)
    if not cache and old is not None:
        fake_mode.cache_enabled = False
    try:
        with fake_mode:
            return target(*fake_args)
    finally:
        if old is not None:
            fake_mode.cache_enabled = old


def getitems(graph: fx.Graph, node: Node, n: int) -> list:
    """node[0] .. node[n-1] (node returns a tuple), inserted right after it, their fake values
    taken from node's."""
    out = []
    with graph.inserting_after(node):
        for i in reversed(range(n)):
            out.insert(0, graph.call_function(operator.getitem, (node, i)))
    value = node.meta.get("example_value")
    for i, g in enumerate(out):
        g.meta["example_value"] = None if value is None else value[i]
    return out


def cat_inputs(node: Any, dim: int) -> Optional[list]:
    """The inputs of node = torch.cat(inputs, dim) when node is read by one user only, else None."""
    if not (isinstance(node, Node) and node.op == "call_function" and node.target is torch.cat
            and len(node.users) == 1 and not node.kwargs.keys() - {"dim"}):
        return None
    d = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    return list(node.args[0]) if d == dim else None
