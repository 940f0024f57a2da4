"""Host work inside a CUDA graph's graph: run it before the replay, not in the capture.

Some models compute small tensors on the host and copy them to the GPU inside their forward:
Chroma's `torch.tensor([0] * batch_size)` guidance embedding, CogView4's RoPE tables made from
`torch.arange` on the CPU. A CUDA graph cannot record such a copy (torch refuses a pageable
host-to-device copy during capture), and a replay would not redo the host arithmetic anyway;
before this module the whole graph then ran without CUDA graphs.

`split(gm)` cuts such a graph in two: `host` computes the host tensors and their copies to the
device (and device tensors made from Python values, `torch.as_tensor(n, device=...)`: a copy
as well; it runs eagerly on every call, a few small ops), `device` is the rest and takes those
copies as extra inputs, which the CUDA-graph runner refills into its static buffers like any
other input before each replay. The cut is made only where it is exact: every host tensor the
device part reads arrives through a copy to the device (`.to(device)`, `.cuda()`), and the host
part reads nothing computed on the device (only the graph's inputs and sizes). Otherwise the
graph is left as it was. A copy of a CPU *input* (a table the model keeps as a plain attribute:
Qwen-Image's RoPE tables) also runs in the host part, and is made again only when its source
changes. `fill_scalars` first turns a 0-d device tensor made from a number
(`torch.as_tensor(3, device=...)`; one made from a size is traced as a `scalar_tensor` while a
lyra frame is traced, size_scalars.py) into a fill kernel, which a capture records.
"""
from __future__ import annotations

import weakref
from typing import Optional

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

CALLS = ("call_function", "call_method", "call_module")


def _val(node: fx.Node):
    return node.meta.get("val", node.meta.get("example_value"))


def made_on_host(node: fx.Node) -> bool:
    """A node other than a graph input whose traced value is a CPU tensor."""
    v = _val(node)
    return node.op != "placeholder" and isinstance(v, torch.Tensor) and v.device.type == "cpu"


def launches_kernel(node: fx.Node) -> bool:
    """Whether a call may launch device work. Sizes, asserts (no tensor in the value) and views
    (every tensor of the value a view: split, chunk, view, unsqueeze, getitem of a tuple) launch
    nothing; a call without a traced value is assumed to launch."""
    if node.op not in CALLS:
        return False
    if "val" not in node.meta and "example_value" not in node.meta:
        return node.op != "call_function" or node.target is not torch.ops.aten._assert_scalar.default
    v = _val(node)
    items = v if isinstance(v, (tuple, list)) else (v,)
    return any(isinstance(i, torch.Tensor) and not i._is_view() for i in items)


def _on_host(node: fx.Node) -> bool:
    """A call computing a CPU tensor."""
    return node.op in CALLS and made_on_host(node)


def _is_tensor_free(node: fx.Node) -> bool:
    """A call whose value holds no tensor (a size, a Python number, a tuple of them)."""
    v = _val(node)
    items = v if isinstance(v, (tuple, list)) else (v,)
    return node.op in CALLS and v is not None and not any(isinstance(i, torch.Tensor) for i in items)


def _is_copy_to_device(node: fx.Node, src: fx.Node) -> bool:
    """node = src.to(<cuda device>[, dtype]), src.cuda() or torch.as_tensor(src, device=<cuda>):
    a copy of host tensor src to the GPU."""
    v = _val(node)
    if not (isinstance(v, torch.Tensor) and v.device.type == "cuda" and node.args and node.args[0] is src):
        return False
    if all(a is not src for a in [*node.args[1:], *node.kwargs.values()]):
        return (node.op == "call_method" and node.target in ("to", "cuda")
                or node.op == "call_function" and node.target is torch.as_tensor)
    return False


def fill_scalars(gm: fx.GraphModule) -> int:
    """Rewrite `torch.as_tensor(n, device=<cuda>)` / `torch.tensor(n, ...)` of one Python number
    or size n into `torch.full((), n, dtype, device)`: the same 0-d tensor, made by a fill kernel
    that a CUDA graph records (the copy of n from the host cannot be recorded). n is baked into
    the capture: a size is part of the runner's capture signature (the inputs' shapes, SymInt
    inputs), and a constant never changes. Returns how many were rewritten."""
    count = 0
    for n in gm.graph.nodes:
        v = _val(n)
        if not (_is_value_to_device(n) and v.dim() == 0 and len(n.args) == 1):
            continue
        value = n.args[0]
        scalar = _val(value) if isinstance(value, fx.Node) else value
        if isinstance(scalar, bool) or not isinstance(scalar, (int, float, torch.SymInt)):
            continue
        if isinstance(scalar, torch.SymInt) and free_unbacked_symbols(scalar):
            continue  # a value read from a tensor (`.item()`): not in the capture signature
        device = n.kwargs.get("device", v.device)  # as the graph names it (a constant, x.device)
        n.target, n.args, n.kwargs = torch.full, ((), value), {"dtype": v.dtype, "device": device}
        count += 1
    if count:
        gm.recompile()
    return count


class Split:
    """host(*args) -> the copies; device(*args, *copies) -> the graph's outputs."""

    def __init__(self, host: fx.GraphModule, device: fx.GraphModule, host_nodes: int, copies: int) -> None:
        self.host, self.device = host, device
        self.host_nodes, self.copies = host_nodes, copies


def _is_value_to_device(node: fx.Node) -> bool:
    """torch.as_tensor / torch.tensor of Python values (a size, a number) on the GPU: a host-to-
    device copy too (Qwen-Image's `torch.as_tensor(text_seq_len, device=...)`)."""
    v = _val(node)
    return (node.op == "call_function" and node.target in (torch.as_tensor, torch.tensor)
            and isinstance(v, torch.Tensor) and v.device.type == "cuda"
            and all(not isinstance(_val(a), torch.Tensor) for a in node.all_input_nodes))


def _is_input_copy(node: fx.Node) -> bool:
    """A copy to the GPU of a host tensor the graph takes as an input: a table the model keeps
    on the CPU as a plain attribute (Qwen-Image's RoPE tables, `self.pos_freqs.to(device)`),
    or a CPU tensor argument."""
    src = node.args[0] if node.args else None
    return (isinstance(src, fx.Node) and src.op == "placeholder" and isinstance(_val(src), torch.Tensor)
            and _val(src).device.type == "cpu" and _is_copy_to_device(node, src))


def _copy_unless_unchanged(copy):  # noqa: ANN001, ANN202
    """copy(src, ...) made to return its last result while src is the same tensor at the same
    version (a table kept as an attribute: copied once, not on every call); a new or modified
    tensor is copied again."""
    last: list = [None, -1, None]  # weak reference to src, its version, the copy

    def copy_unless_unchanged(src, *args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        ref, version, out = last
        if ref is not None and ref() is src and src._version == version:
            return out
        out = copy(src, *args, **kwargs)
        last[:] = [weakref.ref(src), src._version, out]
        return out

    return copy_unless_unchanged


def _memoise_input_copies(host: fx.GraphModule) -> None:
    for n in host.graph.nodes:
        if n.op in CALLS and _is_input_copy(n):
            fn = getattr(torch.Tensor, n.target) if n.op == "call_method" else n.target
            n.op, n.target = "call_function", _copy_unless_unchanged(fn)
    host.recompile()


def split(gm: fx.GraphModule) -> Optional[Split]:
    graph = gm.graph
    host = [n for n in graph.nodes if _on_host(n)]
    roots = [n for n in graph.nodes if _is_value_to_device(n) or _is_input_copy(n)]
    if not host and not roots:
        return None
    host_set = set(host)
    copies, others = list(roots), []  # what leaves the host: copies to the device; sizes
    for n in host:
        for user in n.users:
            if user in host_set:
                continue
            if user.op == "output":
                return None
            (copies if _is_copy_to_device(user, n) else others).append(user)
    copies = list(dict.fromkeys(copies))
    copy_set = set(copies)
    # what the host part needs besides host tensors: inputs, attributes, tensor-free calls
    # (sizes, the target device) on those; anything computed on the device: no split
    needed: set = set()
    stack = [a for n in host + copies for a in n.all_input_nodes]
    while stack:
        n = stack.pop()
        if n in host_set or n in needed:
            continue
        if n.op not in ("placeholder", "get_attr") and not _is_tensor_free(n):
            return None
        needed.add(n)
        stack.extend(n.all_input_nodes)
    if any(u not in needed for u in others):
        return None  # e.g. a host tensor's size read by the device part
    # sizes read off host tensors stay on the host side: nothing on the device may read them
    derived: set = set()
    for n in graph.nodes:
        if n in needed and any(a in host_set or a in derived for a in n.all_input_nodes):
            derived.add(n)
    if any(u not in host_set and u not in needed and u not in copy_set for n in derived for u in n.users):
        return None
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]

    host_graph = fx.Graph()
    env: dict = {}
    for n in graph.nodes:
        if n.op == "placeholder" or n in needed or n in host_set or n in copy_set:
            env[n] = host_graph.node_copy(n, lambda a: env[a])
    host_graph.output(tuple(env[c] for c in copies))

    device_graph = fx.Graph()
    env = {}
    for n in placeholders:
        env[n] = device_graph.node_copy(n)
    for i, c in enumerate(copies):
        p = device_graph.placeholder(f"_host_copy_{i}")
        p.meta.update(c.meta)
        env[c] = p
    for n in graph.nodes:
        if n.op == "placeholder" or n in host_set or n in copy_set or n in derived:
            continue
        env[n] = device_graph.node_copy(n, lambda a: env[a])
    for n in reversed(graph.nodes):  # sizes only the host part read: not on the device's path
        if n in needed and n.op != "placeholder" and n in env and not env[n].users:
            device_graph.erase_node(env[n])
    host_gm = fx.GraphModule(gm, host_graph)
    _memoise_input_copies(host_gm)
    return Split(host_gm, fx.GraphModule(gm, device_graph), len(host), len(copies))


class HostThenDevice:
    """Calls split.host, then `device_runner` (the device part's CUDA-graph runner) with the
    copies appended to the arguments."""

    def __init__(self, host: fx.GraphModule, device_runner) -> None:  # noqa: ANN001
        self.host = host
        self.device_runner = device_runner

    def __call__(self, *args):
        return self.device_runner(*args, *self.host(*args))
