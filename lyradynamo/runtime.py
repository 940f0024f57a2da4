"""Run a rewritten graph: as is on the CPU, replayed as CUDA graphs on CUDA.

CUDA graphs (config.cuda_graphs): one capture per input signature (shapes, strides, dtypes
of the tensor inputs and the values of the SymInt inputs), all captures of all graphs
sharing one memory pool per device. A new shape costs one capture, never a compilation.
Parameters and buffers are read in place (their addresses are captured), so in-place
patches (LoRA fuse, ControlNet weight copy) are seen by the next replay; a parameter that
was *replaced* by a new tensor (`.data =`, torch.utils.swap_tensors) changes its address and
triggers a new capture. Other inputs are copied into the capture's static buffers; outputs are
cloned out of the pool so the caller may keep them across calls. A graph that launches no
kernel (only sizes and views), computes an output on the host, reads a host tensor inside a
device op or writes through a boolean mask runs op by op instead (`not_capturable`; the dump
names the reason). Host tensors the graph copies to the device (CogView4's RoPE tables from
`torch.arange` on the CPU, Qwen-Image's CPU tables) are copied before each replay
(host_prefix.py).

The address check (~700 tensors for a UNet: 40-100 us of host time) runs after the replay is
launched, while the GPU works, not before it: a capture holds a reference to the storage of
every parameter it reads, so a replay launched after a replacement reads the old, still
allocated weights, and the check then recaptures and replays again before any output is handed
out. A scheduler that syncs every step (SD's PNDM) has the host on the critical path, so this
is ~0.1 ms less GPU idle per step there.
"""
from __future__ import annotations

import logging
import operator
import threading
import time
import weakref
from typing import Any, Callable

import torch
import torch.fx as fx

from . import attention_prewarm, config, host_prefix
from .ops._common import clean_up_failed_capture, device_index, side_stream

log = logging.getLogger("lyradynamo")

# device index -> (pool handle, the live CUDA graphs captured into it)
_pools: dict[int, tuple[Any, weakref.WeakSet]] = {}
# torch's C++ check behind Inductor's CUDA graphs: tensors[i].data_ptr() == data_ptrs[i] for i in
# indices (all three Python lists); CUDA builds of torch only.
_data_ptrs_equal = getattr(torch._C, "_tensors_data_ptrs_at_indices_equal", None)
_pool_lock = threading.Lock()


def shared_pool(device: torch.device):
    """The pool every capture on `device` records into. A new handle once no graph captured into
    the current one is alive: torch's allocator keeps a pool whose graphs were all destroyed
    until its memory is freed, and a capture into it then fails its `use_count > 0` assert
    (session 29, run B: a tiny model recompiled after torch._dynamo.reset())."""
    idx = device_index(device)
    with _pool_lock:
        if idx not in _pools or not _pools[idx][1]:
            _pools[idx] = (torch.cuda.graph_pool_handle(), weakref.WeakSet())
        return _pools[idx][0]


def _pool_holds(device: torch.device, graph) -> None:
    """`graph` was captured into the device's shared pool and keeps it alive while it lives."""
    with _pool_lock:
        _pools[device_index(device)][1].add(graph)


def _after_failed_capture(device: torch.device) -> None:
    """Leave `device` usable after a capture raised (ops._common.clean_up_failed_capture); later
    captures record into a new pool."""
    with _pool_lock:
        old = _pools.pop(device_index(device), None)
    clean_up_failed_capture(device, old[0] if old else None)


def _static_input_indices(gm: fx.GraphModule, example_inputs: list) -> set[int]:
    """Inputs whose storage is model state (parameters, buffers): read in place, not copied."""
    names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    static = set()
    for i, t in enumerate(example_inputs):
        name = names[i] if i < len(names) else ""
        if isinstance(t, torch.nn.Parameter) or "_parameters_" in name or "_buffers_" in name:
            static.add(i)
    return static


def input_device(example_inputs: list) -> torch.device:
    """The graph's device: that of its first tensor input that is not a host scalar (float
    arguments arrive as CPU 0-d tensors, see shape_policy)."""
    for t in example_inputs:
        if isinstance(t, torch.Tensor) and not (t.device.type == "cpu" and t.dim() == 0):
            return t.device
    return torch.device("cpu")


def make_runner(gm: fx.GraphModule, example_inputs: list, record, n_lifted: int = 0) -> Callable:  # noqa: ANN001
    """The callable for gm; its last n_lifted inputs are parameters / buffers lyra passes itself
    (params.py): model state, read in place like the parameters Dynamo passes."""
    device = input_device(example_inputs)
    if device.type == "cuda" and config.cuda_graphs:
        why = not_capturable(gm)
        if why is None:
            static = _static_input_indices(gm, example_inputs)
            static.update(range(len(example_inputs) - n_lifted, len(example_inputs)))
            filled = host_prefix.fill_scalars(gm)
            parts = host_prefix.split(gm)
            if parts is not None and not_capturable(parts.device, copies_ok=False) is None:
                record.host_prefix = {"host_nodes": parts.host_nodes, "copies": parts.copies, "filled": filled}
                log.info("lyradynamo: graph %d computes %d tensors on the host (%d copies to the "
                         "device): they run before each replay", record.index, parts.host_nodes, parts.copies)
                return host_prefix.HostThenDevice(parts.host, CudaGraphRunner(parts.device, static, device, record))
            if filled:
                record.host_prefix = {"host_nodes": 0, "copies": 0, "filled": filled}
            why = not_capturable(gm, copies_ok=False)
            if why is None:
                return CudaGraphRunner(gm, static, device, record)
        record.cuda_graphs_off = why
        log.info("lyradynamo: graph %d runs without CUDA graphs: %s", record.index, why)
    return gm.forward


def not_capturable(gm: fx.GraphModule, copies_ok: bool = True) -> str | None:
    """Why a CUDA graph of gm would be wrong or empty, or None. A replay re-launches the
    recorded kernels only: what the host computed while recording (a CPU tensor output, e.g.
    position ids made from a CPU tensor after a graph break) would come back as the recorded
    value on every later call. A graph with no operation (a graph break can leave one that only
    returns its inputs, or only splits them into views) would record nothing (torch warns of
    an empty graph)."""
    nodes = gm.graph.nodes
    if not any(n.op in host_prefix.CALLS for n in nodes):
        return "no operation to launch (the graph only returns its inputs)"
    if not any(host_prefix.launches_kernel(n) for n in nodes):
        return "no kernel to launch (the graph only computes sizes and views of its inputs)"
    host: list[str] = []
    for n in nodes:
        if n.op == "output":
            fx.node.map_arg(n.args, lambda a: host.append(a.name) if host_prefix.made_on_host(a) else None)
    if host:
        return (f"output(s) {', '.join(host[:3])} computed on the host, which a replay would return "
                f"as recorded")
    for n in nodes:
        why = _uncapturable_call(gm, n, copies_ok)
        if why:
            return why
    return None


_INDEX_WRITES = {operator.setitem, torch.Tensor.index_put_, torch.Tensor.index_put, torch.index_put}


def _tensor_of(gm: fx.GraphModule, a: fx.Node):
    """a's traced value, or for a constant the graph keeps as an attribute (Dynamo folds
    `torch.tensor([0, 0, ...])` into one) the tensor itself; None for anything else."""
    v = host_prefix._val(a)
    if v is None and a.op == "get_attr":
        try:
            v = operator.attrgetter(a.target)(gm)
        except AttributeError:
            return None
    return v if isinstance(v, torch.Tensor) else None


def _uncapturable_call(gm: fx.GraphModule, n: fx.Node, copies_ok: bool) -> str | None:
    """Why call n cannot be recorded, or None: a device op that reads a host tensor of 1+ dims
    (indexing a GPU table by CPU indices, a CPU value written into a GPU tensor: torch copies it
    inside the op; an explicit `.to(device)` copy only with copies_ok False, when host_prefix could
    not move it before the replay), or an indexed write through a boolean mask (a data-dependent
    count: a host sync). QwenImage21's token metadata does both after its graph breaks."""
    if n.op not in host_prefix.CALLS:
        return None
    tensors = {a: v for a in n.all_input_nodes if (v := _tensor_of(gm, a)) is not None}
    values = [*tensors.values(), host_prefix._val(n)]
    if not any(isinstance(v, torch.Tensor) and v.device.type != "cpu" for v in values):
        return None
    for a, v in tensors.items():
        if v.device.type == "cpu" and v.dim() > 0:
            if copies_ok and host_prefix._is_copy_to_device(n, a):
                continue
            return (f"{n.name} reads host tensor {a.name} on the device (a copy inside the op, which a "
                    f"capture cannot record)")
    if n.op == "call_function" and n.target in _INDEX_WRITES and len(n.args) > 1:
        value = n.args[2] if len(n.args) > 2 else None
        if isinstance(value, fx.Node) and value in tensors and tensors[value].device.type == "cpu":
            return f"{n.name} writes host tensor {value.name} into a device tensor (a copy inside the op)"
        index = n.args[1] if isinstance(n.args[1], (tuple, list)) else (n.args[1],)
        if any(isinstance(i, fx.Node) and i in tensors and tensors[i].dtype == torch.bool for i in index):
            return f"{n.name} writes through a boolean mask (a data-dependent count: a host sync)"
    return None


class _Capture:
    __slots__ = ("graph", "buffers", "buffer_inputs", "host_inputs", "outputs", "param_ptrs", "param_storages")

    def __init__(self) -> None:
        self.graph = None
        # the static input buffers on the graph's device and their input indices: refilled by one
        # _foreach_copy_ per replay
        self.buffers: list = []
        self.buffer_inputs: list = []
        self.host_inputs: list = []  # (input index, its buffer) of host scalars (0-d CPU tensors)
        self.outputs: Any = None
        self.param_ptrs: list = []  # by input index: the address of a parameter / buffer, else None
        # the storages behind param_ptrs, kept alive while the capture exists: a replay launched
        # after a parameter was replaced reads its old storage, never freed memory
        self.param_storages: list = []


class CudaGraphRunner:
    """Callable replacing gm.forward: capture per signature, then replay."""

    def __init__(self, gm: fx.GraphModule, static_idx: set[int], device: torch.device, record) -> None:  # noqa: ANN001
        self.gm = gm
        self.static_idx = static_idx
        self.device = device
        self.record = record
        self.captures: dict[tuple, _Capture] = {}
        self.uncapturable: dict[tuple, str] = {}  # signature -> why capture failed
        self.captures_made = 0
        # Per-call work is on the critical path of every step (a scheduler that syncs, as
        # SD's PNDM does, leaves the GPU idle meanwhile): index lists are computed once, and
        # the signature looks at the non-static inputs only (parameters: ~700 in a UNet).
        self._varying: list[int] | None = None
        self._static: list[int] = sorted(static_idx)

    def _signature(self, args) -> tuple:
        if self._varying is None:
            self._varying = [i for i in range(len(args)) if i not in self.static_idx]
        sig = []
        for i in self._varying:
            a = args[i]
            if isinstance(a, torch.Tensor):
                if a.dim() == 0 and a.device.type == "cpu":
                    # a float argument of the forward (shape_policy): the graph .item()s it on
                    # the host, so the capture bakes its value in: one capture per value
                    sig.append((i, a.item()))
                else:
                    sig.append((i, a.shape, a.stride(), a.dtype, a.device))
            elif isinstance(a, (int, float, bool)):
                sig.append((i, a))
        return tuple(sig)

    def _param_ptrs(self, args) -> list:
        """Addresses of the static inputs (parameters, buffers) by input index, None elsewhere:
        their shapes are guarded by Dynamo, an address change means a replaced tensor."""
        ptrs: list = [None] * len(args)
        for i in self._static:
            ptrs[i] = args[i].data_ptr()
        return ptrs

    def _params_moved(self, cap: _Capture, args) -> bool:
        """Whether a parameter / buffer has another address than at cap's capture (~700 in a
        UNet, checked on every call: in C++ where torch has the check, ~3x faster)."""
        if _data_ptrs_equal is not None:
            return not _data_ptrs_equal(list(args), cap.param_ptrs, self._static)
        ptrs = cap.param_ptrs
        return any(args[i].data_ptr() != ptrs[i] for i in self._static)

    def __call__(self, *args):
        if not config.cuda_graphs or torch.cuda.is_current_stream_capturing():
            return self.gm(*args)
        key = self._signature(args)
        cap = self.captures.get(key)
        if cap is None:
            cap = self._capture_or_none(key, args)
            if cap is None:
                return self.gm(*args)
        self._replay(cap, args)
        # after the launch (see the module docstring): a replaced parameter was read from its old
        # storage, which cap keeps alive; recapture with the new one and replay again
        if self._params_moved(cap, args):
            stale = cap  # noqa: F841 - holds the old storages until the new replay is enqueued
            log.info("lyradynamo: a parameter was replaced (new address); recapturing")
            self.record.summary["recaptures_after_replacement"] = \
                self.record.summary.get("recaptures_after_replacement", 0) + 1
            cap = self._capture_or_none(key, args)
            if cap is None:
                return self.gm(*args)
            self._replay(cap, args)
        return _clone_out(cap.outputs)

    @staticmethod
    def _replay(cap: _Capture, args) -> None:
        if cap.buffers:
            torch._foreach_copy_(cap.buffers, [args[i] for i in cap.buffer_inputs], non_blocking=True)
        for i, buf in cap.host_inputs:
            buf.copy_(args[i])
        cap.graph.replay()

    def _capture_or_none(self, key: tuple, args):
        """A new capture for key (replacing any), or None where this signature cannot be captured
        (it then runs without CUDA graphs; the failure is in the summary and the log)."""
        cap = None
        if key not in self.uncapturable:
            try:
                cap = self._capture(args)
            except Exception as exc:  # noqa: BLE001 - e.g. a host sync or CPU copy inside the graph
                self.uncapturable[key] = repr(exc)[:300]
                self.record.summary.setdefault("cuda_graph_failures", []).append(self.uncapturable[key])
                log.warning("lyradynamo: CUDA graph capture failed for graph %d (%s); this shape runs "
                            "without CUDA graphs", self.record.index, exc)
                _after_failed_capture(self.device)
        self.captures[key] = cap
        return cap

    def _prepare(self, args) -> tuple[_Capture, list]:
        """A capture's host side: the parameters' addresses and storages, the static input
        buffers filled from args; returns it with the arguments to record the graph with."""
        cap = _Capture()
        cap.param_ptrs = self._param_ptrs(args)
        cap.param_storages = [args[i].untyped_storage() for i in self._static]
        static_args = list(args)
        for i, a in enumerate(args):
            if isinstance(a, torch.Tensor) and i not in self.static_idx:
                buf = torch.empty_strided(a.shape, a.stride(), dtype=a.dtype, device=a.device)
                buf.copy_(a)
                static_args[i] = buf
                if buf.device == self.device:
                    cap.buffers.append(buf)
                    cap.buffer_inputs.append(i)
                else:
                    cap.host_inputs.append((i, buf))
        return cap, static_args

    def _capture(self, args) -> _Capture:
        t0 = time.perf_counter()
        cap, static_args = self._prepare(args)
        stream = side_stream(self.device)
        t1 = time.perf_counter()
        summary = self.record.summary
        warmed = self.captures_made == 0 or config.new_shape_warmup
        if warmed:
            self._warm_up(stream, static_args)
        t2 = time.perf_counter()
        try:
            cap.outputs, cap.graph = self._record(stream, static_args)
        except Exception as exc:  # noqa: BLE001 - a direct capture met per-shape set-up it cannot record
            if warmed:
                raise
            log.info("lyradynamo: direct capture failed for graph %d (%s); warming up first",
                     self.record.index, str(exc)[:200])
            summary.setdefault("direct_capture_failures", []).append(repr(exc)[:300])
            _after_failed_capture(self.device)
            stream = side_stream(self.device)  # the failed capture's stream may still be capturing
            self._warm_up(stream, static_args)
            t2 = time.perf_counter()
            cap.outputs, cap.graph = self._record(stream, static_args)
        self.captures_made += 1
        t3 = time.perf_counter()
        summary["capture_s"] = summary.get("capture_s", 0.0) + t3 - t0
        # where a capture's time goes: input buffers, the warm-up run (lazy per-shape setup:
        # GEMM plans and their autotuning, cuDNN plans), the recorded run + instantiation
        phases = summary.setdefault("capture_phases_s", {"inputs": 0.0, "warmup": 0.0, "record": 0.0})
        for k, v in (("inputs", t1 - t0), ("warmup", t2 - t1), ("record", t3 - t2)):
            phases[k] = round(phases[k] + v, 4)
        log.info("lyradynamo: captured CUDA graph %d for graph %d", self.captures_made, self.record.index)
        return cap

    def _warm_up(self, stream, static_args) -> None:
        """One uncaptured run on the capture's side stream: lazy and per-shape set-up (cuBLAS
        handles, csrc workspaces, cuDNN plans, GEMM timings) stays out of the capture."""
        with torch.cuda.stream(stream):
            self.gm(*static_args)
        torch.cuda.current_stream(self.device).wait_stream(stream)

    def _record(self, stream, static_args) -> tuple:
        attention_prewarm.wait_all()  # no other thread's CUDA calls while the capture records
        caller = torch.cuda.current_stream(self.device)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=shared_pool(self.device), stream=stream):
                outputs = self.gm(*static_args)
            _pool_holds(self.device, graph)
        except BaseException:
            # where the capture's end fails, torch.cuda.graph leaves its stream the current one
            torch.cuda.set_stream(caller)
            raise
        return outputs, graph


def _clone_out(out):
    if isinstance(out, torch.Tensor):
        return out.clone()
    if isinstance(out, (list, tuple)):
        return type(out)(_clone_out(o) for o in out)
    return out
