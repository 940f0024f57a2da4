"""Linears whose epilogue cuBLASLt cannot do in 16-bit, as CUTLASS sm90 GEMMs with the
epilogue fused (csrc/gemm_gated.cu, csrc/gemm_glu.cu):

- the gated residual linear of DiT blocks, residual + gate * (x @ W^T + b): lyra::linear's
  CUDA path otherwise runs a cuBLASLt GEMM (+ bias) and then the csrc epilogue kernel for the
  gate and the residual;
- the GLU linear (diffusers' GEGLU), a * gelu(g) with [a, g] = x @ W^T + b: otherwise one
  cuBLASLt GEMM writes all 2N columns and the epilogue kernel reads them back; fused, cuBLASLt
  computes a = x @ W[:N]^T + b[:N] and the CUTLASS GEMM computes g's half with a * gelu(g) in
  its epilogue, so the (M, 2N) tensor and the extra pass disappear.

`config.gated_gemm` picks the path: "auto" times the fused GEMM (cooperative 128 x 256 tiles,
persistent or stream-K; ping-pong 128 x 128 tiles) and cuBLASLt + epilogue, each captured as a
CUDA graph and replayed, on the first call of each shape outside CUDA-graph capture (the
runner's warm-up call) and keeps the fastest for the process (a new M within 4x of a timed
one, same N and K, takes that one's winner untimed); "cutlass" takes the fused
persistent-tile GEMM wherever it can run; "cublaslt" never does. A shape first seen under
capture takes cuBLASLt + epilogue (the runner's warm-up always comes first). `choices()` lists
the decisions with their timings (bench rows carry them); each is also logged once.
"""
from __future__ import annotations

import logging
import threading
import warnings
from typing import Callable, Optional, Union

import torch
from torch import Tensor

from ._common import DTYPE_CODES, clean_up_failed_capture, ptr, row_vector_stride, side_stream, stream_handle

log = logging.getLogger("lyradynamo")

_lock = threading.Lock()
_choice: dict[tuple, dict] = {}  # shape key -> {"path": name, "<name>_us": time of each path}


def choices() -> dict[tuple, dict]:
    """("gated", device, dtype, M, N, K, batches, bias?), ("glu", device, dtype, M, N, K,
    bias?) or ("qkv", device, dtype, "L_1+L_2..", N, (K_i..), B, bias?) (ops/qkv_projection.py)
    -> the path taken and the timings it was based on."""
    with _lock:
        return dict(_choice)


def describe(key: tuple) -> str:
    """A choices() key as text: "gated M4096 N3072 K3072 batches 1 bias True"."""
    kind, _, _, m, n, k, *rest = key
    return f"{kind} M{m} N{n} K{k}" + (f" batches {rest[0]}" if kind == "gated" else "") + f" bias {rest[-1]}"


def _common_layout(C, x: Tensor, weight: Tensor, n: int, k: int, lda: int) -> Union[str, int]:
    """The weight's row stride when the CUTLASS kernels can take x, weight, n and k, else why not."""
    if not getattr(C, "gemm_gated_available", lambda: False)():
        return "the library was built without CUTLASS"
    if x.dtype not in (torch.float16, torch.bfloat16):
        return f"dtype {x.dtype}"
    if torch.cuda.get_device_capability(x.device)[0] != 9:
        return "not an SM90 GPU"
    ldb = _ldb(weight, k)
    if weight.stride(-1) != 1 or ldb < k:
        return "weight rows are not contiguous"
    if k % 8 or n % 8 or lda % 8 or ldb % 8:
        return f"K={k}, N={n}, lda={lda} or the weight's row stride {ldb} is not a multiple of 8"
    return ldb


def _aligned(*tensors: Optional[Tensor]) -> bool:
    return all(t is None or t.data_ptr() % 16 == 0 for t in tensors)


def _layout(C, x2: Tensor, weight: Tensor, bias: Optional[Tensor], gate: Tensor, x: Tensor, m: int,
            n: int, k: int, lda: int) -> Union[str, tuple[int, int, int]]:
    """(weight row stride, gate batch stride, samples) for the fused kernel, or why it cannot
    take this call."""
    ldb = _common_layout(C, x, weight, n, k, lda)
    if isinstance(ldb, str):
        return ldb
    gstride, batches = _batching(x, gate, m, n)
    if gstride is None:
        return f"gate shape {tuple(gate.shape)} is not one row of width {n} per sample of >= 8 rows"
    if not _aligned(x2, weight, bias, gate):
        return "an operand is not 16-byte aligned"
    return ldb, gstride, batches


def _ldb(weight: Tensor, k: int) -> int:
    """Row stride of the weight: > K for a column slice W[:, a:b] (split_cat's parts)."""
    return weight.stride(0) if weight.shape[0] > 1 else k


def _batching(x: Tensor, gate: Tensor, m: int, n: int) -> tuple[Optional[int], int]:
    """(gate's batch stride, number of samples) for the kernel's batched problem: sample b is
    rows [b M, (b + 1) M) of x and reads gate row b; (None, 0) when the gate is not like that."""
    gstride = row_vector_stride(gate, x.shape[0], n, x.dim())
    if gstride is None or gstride % 8:
        return None, 0
    if gstride == 0:
        return 0, 1
    batches = x.shape[0]
    if x.dim() < 3 or m % batches or m // batches < 8:  # a gate per row is no GEMM epilogue
        return None, 0
    return gstride, batches


def run(C, x: Tensor, x2: Tensor, weight: Tensor, bias: Optional[Tensor], gate: Tensor,
        residual: Tensor, m: int, n: int, k: int, lda: int, split: Callable[[], Tensor]) -> Tensor:
    """out (m, n) through the fused kernel or `split()` (cuBLASLt + epilogue): per config, and
    `split()` wherever the kernel cannot take the call (_layout says why)."""
    from lyradynamo import config

    mode = config.gated_gemm
    layout = _layout(C, x2, weight, bias, gate, x, m, n, k, lda) if mode != "cublaslt" else "config"
    if isinstance(layout, str):
        return split()
    ldb, gstride, batches = layout
    res = residual.reshape(m, n)
    if not res.is_contiguous():
        res = res.contiguous()
    if res.data_ptr() % 16:
        res = res.clone()
    args = (ptr(x2), ptr(weight), ptr(bias), ptr(gate), ptr(res))

    def fused(variant: int) -> Callable[[], Tensor]:
        def call() -> Tensor:
            out = torch.empty((m, n), dtype=x.dtype, device=x.device)
            C.gemm_gated(*args, ptr(out), m // batches, batches, n, k, lda, ldb, gstride,
                         DTYPE_CODES[x.dtype], variant, stream_handle(x))
            return out
        return call

    key = ("gated", x.device.index, x.dtype, m, n, k, batches, bias is not None)
    return dispatch(mode, key, _paths(fused, split))


def run_glu(C, x: Tensor, x2: Tensor, weight: Tensor, bias: Optional[Tensor], act: str, m: int, n: int,
            k: int, lda: int, split: Callable[[], Tensor]) -> Tensor:
    """The GLU linear's out (m, n) = a * act(g), [a, g] = x2 @ weight^T + bias (weight (2n, k)):
    cuBLASLt for a, then gemm_glu for g with the product in its epilogue; `split()` (one GEMM
    + the epilogue kernel) per config or wherever the kernel cannot take the call."""
    from lyradynamo import config

    mode = config.gated_gemm
    ldb = "config" if mode == "cublaslt" else ("act " + act if act != "gelu" else
                                               _common_layout(C, x, weight, n, k, lda))
    if isinstance(ldb, str) or not _aligned(x2, weight, bias):
        return split()
    w_a, w_g = weight[:n], weight[n:]
    b_a, b_g = (None, None) if bias is None else (bias[:n], bias[n:])
    code = DTYPE_CODES[x.dtype]

    def fused(variant: int) -> Callable[[], Tensor]:
        def call() -> Tensor:
            out = torch.empty((m, n), dtype=x.dtype, device=x.device)
            stream = stream_handle(x)  # at call time: _decide captures the paths on a side stream
            if ldb == k:
                C.gemm(ptr(x2), ptr(w_a), ptr(b_a), ptr(out), m, n, k, lda, n, code, stream)
            else:
                C.gemm_ex(ptr(x2), ptr(w_a), ptr(b_a), 0, 0, ptr(out), m, n, k, lda, ldb, n, code, 0, stream)
            C.gemm_glu(ptr(x2), ptr(w_g), ptr(b_g), ptr(out), ptr(out), m, n, k, lda, ldb, 1, code, variant,
                       stream)
            return out
        return call

    key = ("glu", x.device.index, x.dtype, m, n, k, bias is not None)
    return dispatch(mode, key, _paths(fused, split))


def _paths(fused: Callable[[int], Callable[[], Tensor]], split: Callable[[], Tensor]) -> dict:
    """The fused kernel's three variants (csrc/sm90_evt_gemm.cuh) and the split path, by name."""
    return {"cutlass": fused(0), "cutlass-streamk": fused(1), "cutlass-pingpong": fused(2), "cublaslt": split}


def dispatch(mode: str, key: tuple, paths: dict[str, Callable[[], Tensor]]) -> Tensor:
    """Run the path config says, or (auto) the one timed fastest for this shape (`key`); the
    gated, GLU and q / k / v projection linears share it. `paths` maps path names to thunks and
    holds "cublaslt" (the path taken while a capture runs before any timing)."""
    if mode == "cutlass":  # the persistent-tile kernel
        return paths["cutlass"]()
    with _lock:
        decided = _choice.get(key) or _reuse_nearest(key)
    if decided is not None and "reused_from" in decided:
        try:
            return paths[decided["path"]]()
        except (RuntimeError, ValueError) as exc:  # refused at this M before launching: time here
            log.info("lyradynamo: %s: %s refused (%s); timing this shape", describe(key), decided["path"], exc)
            with _lock:
                _choice.pop(key, None)
            decided = None
    if decided is None:
        if torch.cuda.is_current_stream_capturing():
            return paths["cublaslt"]()
        decided = _decide(key, paths)
    return paths[decided["path"]]()


REUSE_MAX_RATIO = 4  # as csrc/gemm.cu's kReuseMaxRatio


def _rows(m) -> tuple[int, int]:
    """(parts, rows) of a key's M: an int M is one part; a q / k / v projection key's
    "L_1+L_2.." (a joint attention's text and image tokens) has one part per length."""
    if isinstance(m, int):
        return 1, m
    lengths = [int(p) for p in str(m).split("+")]
    return len(lengths), sum(lengths)


def _reuse_nearest(key: tuple) -> Optional[dict]:
    """For a new shape that differs from a timed one only in M (a new image size), within
    REUSE_MAX_RATIO either way: that shape's winner (the nearest M's), recorded under key with
    "reused_from"; None where none is near (then the caller times). A q / k / v projection's M
    is its parts' lengths: the same number of parts, compared by their total. A reused decision
    is no source itself (no drift). Caller holds _lock. The timing of a new shape, 4 paths
    captured and replayed with host syncs, was a visible part of a new size's first call (NOTES,
    session 25: SD1.5 at 768 and 640 with no timing at all ran as fast as with it); a new size
    recorded directly (config.new_shape_warmup) cannot time at all, so untimed shapes would
    take the cuBLASLt path there."""
    parts, m = _rows(key[3])
    best = None
    for other, decided in _choice.items():
        # the same kind, device, dtype and everything after M
        if "reused_from" in decided or other[:3] + other[4:] != key[:3] + key[4:]:
            continue
        parts2, m2 = _rows(other[3])
        if parts2 != parts:
            continue
        ratio = max(m, m2) / min(m, m2)
        if ratio <= REUSE_MAX_RATIO and (best is None or ratio < best[0]):
            best = (ratio, other[3], decided["path"])
    if best is None:
        return None
    _choice[key] = decided = {"path": best[2], "reused_from": best[1]}
    log.info("lyradynamo: %s: %s, as timed at M %s", describe(key), best[2], best[1])
    return decided


def _time_us(run: Callable[[], object], reps: int = 1) -> float:
    """GPU time of one run() in microseconds (run enqueues `reps` calls)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    run()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1000.0 / reps


def _as_graph(fn: Callable[[], Tensor], reps: int) -> Optional[Callable[[], None]]:
    """`reps` calls of fn captured as one CUDA graph, as they run in the compiled model's
    replays (no launch latency between kernels), or None if fn cannot be captured. Captured
    with capture_begin / capture_end: torch.cuda.graph() would also collect garbage and empty
    the allocator's cache."""
    device = torch.device("cuda", torch.cuda.current_device())
    current = torch.cuda.current_stream(device)
    side = side_stream(device)
    graph = torch.cuda.CUDAGraph()
    pool = torch.cuda.graph_pool_handle()  # a pool of its own, as capture_begin() would make
    try:
        with torch.cuda.stream(side), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            graph.capture_begin(pool=pool)
            try:
                for _ in range(reps):
                    fn()
            finally:
                graph.capture_end()
    except RuntimeError as exc:
        log.info("lyradynamo: could not capture a candidate for timing (%s); timing it eagerly", exc)
        clean_up_failed_capture(device, pool)
        return None
    if any("empty" in str(w.message) for w in caught):  # its launches went to another stream
        log.warning("lyradynamo: a gated_gemm candidate captured nothing; timing it eagerly")
        return None
    current.wait_stream(side)
    graph.replay()  # the first replay uploads the graph
    return graph.replay


def _decide(key: tuple, paths: dict[str, Callable[[], Tensor]], rounds: int = 3, reps: int = 3) -> dict:
    """Time each path on this call's operands and keep the fastest. Every path is warmed up
    first (plans, workspaces), then captured as a CUDA graph of `reps` calls and timed by
    replays, `rounds` rounds that time each path in turn, the best round per path counting.
    (Eager timing favoured one-launch paths at small shapes: at M 512, K 12288 the split path,
    two launches, timed 80.1 against ping-pong 78.8 us, where graph replays give it 64.8; and
    one warm-up + one timing per path in a row timed the first path up to 1.6x slow.)"""
    times: dict[str, float] = {}
    runs: dict[str, Callable[[], object]] = {}
    for name, fn in paths.items():
        try:
            fn()
        except (RuntimeError, ValueError) as exc:
            log.warning("lyradynamo: %s linear %s: %s failed (%s); not used there", key[0], key[3:], name, exc)
            continue
        graph = _as_graph(fn, reps)
        runs[name] = graph if graph is not None else (lambda fn=fn: [fn() for _ in range(reps)])
    for _ in range(rounds):
        for name, run in runs.items():
            t = _time_us(run, reps)
            times[name] = min(times.get(name, t), t)
    runs.clear()  # the graphs and their memory go before the model runs on
    best = min(times, key=times.get) if times else "cublaslt"
    decided = {"path": best, **{f"{name}_us": round(t, 1) for name, t in times.items()}}
    with _lock:
        _choice[key] = decided
    log.info("lyradynamo: %s linear %s: %s -> %s", key[0], key[3:],
             ", ".join(f"{name} {t:.1f} us" for name, t in times.items()), best)
    return decided
