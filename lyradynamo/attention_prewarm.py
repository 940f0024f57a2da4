"""Attention prewarm: a compiled graph's attention kernels compiled in worker threads while
Dynamo finishes the compile.

cuDNN compiles some of its attention kernels at run time (NVRTC) the first time a process meets
a configuration: 0.3-1.1 s each on an H200 host with an empty CUDA JIT cache, one after another
inside the warm-up run of the first call (benchmarks/NOTES.md, sessions 26-27). The driver keeps
what was compiled in its JIT cache (`CUDA_CACHE_PATH`), so a later build of the same
configuration, in any thread or process, takes ~40-60 ms. torch keeps its built SDPA graphs per
thread (aten/src/ATen/native/cudnn/MHA.cpp), so a worker cannot build the main thread's graph; it
can fill the JIT cache while the main thread does other work.

- `start(gm, args, device)`: for each distinct lyra::attention call of gm at the sizes of args
  (its inputs re-derived on meta tensors from the traced values, evaluated with the values of
  the size symbols in args), one call in a worker
  thread on zeroed tensors of the same sizes, strides and dtype, on the workers' own stream
  (ops.attention.warm_sdpa runs only the calls that lyra::attention sends to torch SDPA). The
  backend starts it when it returns a graph: Dynamo then spends 1.5-2 s building guards (SDXL),
  time in which the main thread needs no cuDNN.
- `join(q, k, v, ...)`: lyra::attention's CUDA kernel, before it runs a call through SDPA: waits
  for that call's worker if one is pending, except for the first call a round meets (with a warm
  cache, waiting there would only put a worker's build in front of the main thread's own).
- `wait_all()`: before a CUDA graph records. Another thread's CUDA calls during a capture would
  invalidate it.

Not started for a new size of a compiled graph: cuDNN's graph builds run one at a time across
threads, and a new size's warm-up reaches its first attention call at once, so workers there
only moved the builds around (run B, session 27: SD1.5 768 after 512, 0.12 s faster with an
empty cache, 0.26 s slower with a warm one).

Best effort: a size that cannot be evaluated, or a worker that fails, only means that call's
kernels are compiled where they were before, in the main thread. `config.attention_prewarm`.
"""
from __future__ import annotations

import concurrent.futures
import logging
import operator
import threading
from typing import Any, Optional

import sympy
import torch
from torch import fx

from .ops._common import device_index
from .passes.matcher import val as _value

log = logging.getLogger("lyradynamo")

_MAX_WORKERS = 8
_lock = threading.Lock()
_pool: Optional[concurrent.futures.ThreadPoolExecutor] = None
_pending: dict[tuple, concurrent.futures.Future] = {}  # key -> its worker, until joined
_streams: dict[int, torch.cuda.Stream] = {}  # device index -> the workers' stream
_started: set[tuple] = set()  # every key a worker was started for (one per process)
_round = {"first_joined": False}  # whether the current round's first call has been joined
# workers started / that ran a call / that failed; joins that waited / did not wait; workers no
# call joined before wait_all (calls lyra::attention sends elsewhere, e.g. to its short-KV kernel,
# or a size it met under other strides)
stats = {"started": 0, "warmed": 0, "failed": 0, "waited": 0, "not_waited": 0, "unjoined": 0}


def _call_of(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale, is_causal: bool, layout: str) -> tuple:
    """An attention call as `calls` lists it: ((size, stride) of q, k and v), dtype, scale,
    is_causal, layout. Workers are keyed by it and the device index."""
    return (tuple((tuple(t.shape), t.stride()) for t in (q, k, v)), q.dtype, scale, bool(is_causal), layout)


def _bind(binding: dict, sym: Any, real: Any) -> None:
    """binding[s] = real where sym is a bare symbol s (a SymInt real, as Dynamo may pass a
    backend, by its hint)."""
    if isinstance(sym, torch.SymInt) and isinstance(sym.node.expr, sympy.Symbol):
        if isinstance(real, torch.SymInt):
            real = real.node.hint
        if isinstance(real, int):
            binding[sym.node.expr] = sympy.Integer(real)


def _symbol_values(gm: fx.GraphModule, args: list) -> dict:
    """The values of gm's size symbols in this call: its placeholders' symbolic sizes, strides
    and int inputs, matched with args."""
    binding: dict = {}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node, arg in zip(placeholders, args):
        val = _value(node)
        if isinstance(val, torch.SymInt):
            _bind(binding, val, arg)
        elif isinstance(val, torch.Tensor) and isinstance(arg, torch.Tensor) and val.dim() == arg.dim():
            for s, r in zip(val.shape, arg.shape):
                _bind(binding, s, r)
            for s, r in zip(val.stride(), arg.stride()):
                _bind(binding, s, r)
    return binding


def _concrete(values, binding: dict) -> Optional[tuple]:
    out = []
    for s in values:
        if isinstance(s, torch.SymInt):
            s = s.node.expr.xreplace(binding)
            if not isinstance(s, sympy.Integer):
                return None
        out.append(int(s))
    return tuple(out)


# Ops that only view or re-lay out their input, by method name and by function: the passes
# rewrite a producer (e.g. shared_input joins q / k / v into one GEMM whose output q, k and v are
# column slices of) without recomputing the traced values of the views after it, whose strides
# are then stale. `_value_at` re-derives them from the producer's value, on meta tensors of the
# call's sizes (the same views on symbolic fake tensors took 2.8 s of SDXL's compile, H200 host).
_LAYOUT_METHODS = frozenset({"view", "reshape", "transpose", "permute", "unflatten", "flatten", "narrow",
                             "split", "chunk", "unbind", "select", "expand", "squeeze", "unsqueeze",
                             "contiguous", "__getitem__"})
_LAYOUT_FUNCTIONS = frozenset({operator.getitem, torch.narrow, torch.split, torch.chunk, torch.unbind,
                               torch.transpose, torch.permute, torch.reshape, torch.flatten, torch.unflatten,
                               torch.select, torch.squeeze, torch.unsqueeze})


def _is_layout_op(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in _LAYOUT_METHODS
    if node.op == "call_function":
        return node.target in _LAYOUT_FUNCTIONS or getattr(node.target, "is_view", False)
    return False


def _at(value: Any, binding: dict) -> Any:
    """A traced value at the call's sizes: a meta tensor for a tensor, an int for a SymInt."""
    if isinstance(value, torch.Tensor):
        size, stride = _concrete(value.shape, binding), _concrete(value.stride(), binding)
        if size is None or stride is None:
            raise ValueError("a size or stride not given by the call's symbols")
        return torch.empty_strided(size, stride, dtype=value.dtype, device="meta")
    if isinstance(value, torch.SymInt):
        (n,) = _concrete([value], binding) or (None,)
        if n is None:
            raise ValueError(f"{value} not given by the call's symbols")
        return n
    if isinstance(value, (list, tuple)):
        return type(value)(_at(v, binding) for v in value)
    return value


def _value_at(node: Any, memo: dict, binding: dict) -> Any:
    """node's value at the call's sizes, re-derived through layout ops from the nearest other
    node's traced value."""
    if not isinstance(node, fx.Node):
        return node
    if node not in memo:
        if _is_layout_op(node):
            args = fx.node.map_aggregate(node.args, lambda a: _value_at(a, memo, binding))
            kwargs = fx.node.map_aggregate(node.kwargs, lambda a: _value_at(a, memo, binding))
            if node.op == "call_method":
                memo[node] = getattr(args[0], node.target)(*args[1:], **kwargs)
            else:
                memo[node] = node.target(*args, **kwargs)
        else:
            memo[node] = _at(_value(node), binding)
    return memo[node]


def calls(gm: fx.GraphModule, args: list) -> list[tuple]:
    """(sizes, strides) of q, k and v, dtype, scale, is_causal and layout of each distinct
    mask-free lyra::attention call of gm at the sizes of args."""
    target = getattr(getattr(torch.ops, "lyra", None), "attention", None)
    if target is None:
        return []
    binding, memo = None, {}
    found: dict[tuple, None] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is not target.default:
            continue
        q, k, v, mask, scale, is_causal, layout = (list(node.args) + [None] * 7)[:7]
        if mask is not None or isinstance(scale, fx.Node):
            continue
        if binding is None:
            binding = _symbol_values(gm, args)
        try:
            vals = [_value_at(n, memo, binding) for n in (q, k, v)]
        except Exception as exc:  # noqa: BLE001 - best effort: this call is not prewarmed
            log.debug("lyradynamo: attention prewarm: %s's inputs not evaluated (%r)", node.name, exc)
            continue
        if all(isinstance(t, torch.Tensor) for t in vals):
            found[_call_of(*vals, scale, is_causal, layout or "bhld")] = None
    return list(found)


def _warm(call: tuple, device: torch.device) -> bool:
    from .ops import attention as attention_ops

    spec, dtype, scale, is_causal, layout = call
    with _lock:  # one side stream per device: the workers' memory is cached for that stream alone
        stream = _streams.get(device.index)
        if stream is None:
            stream = _streams[device.index] = torch.cuda.Stream(device)
    with torch.cuda.device(device), torch.cuda.stream(stream):
        q, k, v = (torch.empty_strided(size, stride, dtype=dtype, device=device).zero_() for size, stride in spec)
        ran = attention_ops.warm_sdpa(q, k, v, scale, is_causal, layout)
        torch.cuda.current_stream(device).synchronize()
    return ran


def _done(fut: concurrent.futures.Future) -> None:
    exc = fut.exception()
    with _lock:
        if exc is not None:
            stats["failed"] += 1
            log.debug("lyradynamo: attention prewarm failed: %r", exc)
        elif fut.result():
            stats["warmed"] += 1


def start(gm: fx.GraphModule, args: list, device: torch.device) -> int:
    """Start a worker for each attention call of gm at these sizes that no worker ran yet;
    returns how many were started."""
    from . import config

    global _pool
    if not config.attention_prewarm or device.type != "cuda":
        return 0
    try:
        todo = calls(gm, args)
    except Exception as exc:  # noqa: BLE001 - best effort: the main thread compiles as before
        log.debug("lyradynamo: attention prewarm: sizes not evaluated (%r)", exc)
        return 0
    device = torch.device("cuda", device_index(device))
    n = 0
    with _lock:
        for call in todo:
            key = (call, device.index)
            if key in _started:
                continue
            if _pool is None:
                _pool = concurrent.futures.ThreadPoolExecutor(_MAX_WORKERS, thread_name_prefix="lyra-prewarm")
            _started.add(key)
            fut = _pool.submit(_warm, call, device)
            fut.add_done_callback(_done)
            _pending[key] = fut
            n += 1
        if n:
            _round["first_joined"] = False
            stats["started"] += n
    return n


def join(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale, is_causal: bool, layout: str) -> None:
    """Before lyra::attention runs this call through SDPA: wait for its worker (see the module
    docstring for the one call a round does not wait for)."""
    if not _pending:
        return
    with _lock:
        fut = _pending.pop((_call_of(q, k, v, scale, is_causal, layout), q.device.index), None)
        if fut is None:
            return
        first = not _round["first_joined"]
        _round["first_joined"] = True
        wait = not first and not fut.done()
        stats["waited" if wait else "not_waited"] += 1
    if wait:
        concurrent.futures.wait([fut])


def wait_all() -> None:
    """Wait for every pending worker (before a CUDA-graph capture records)."""
    if not _pending:
        return
    with _lock:
        futs = list(_pending.values())
        _pending.clear()
        stats["unjoined"] += len(futs)
    concurrent.futures.wait(futs)
