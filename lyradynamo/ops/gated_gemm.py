"""The gated residual linear of DiT blocks, residual + gate * (x @ W^T + b), as one GEMM.

lyra::linear's CUDA path otherwise runs it as a cuBLASLt GEMM (+ bias) and then the csrc
epilogue kernel for the gate and the residual (cuBLASLt has no 16-bit epilogue for a
per-column gate with a bias). csrc/gemm_gated.cu does it in a CUTLASS sm90 GEMM's epilogue.

`config.gated_gemm` picks the path: "auto" times the fused GEMM (persistent and stream-K tile
schedulers) and cuBLASLt + epilogue on the first call of each shape outside CUDA-graph capture
(the runner's warm-up call) and keeps the fastest for the process; "cutlass" takes the fused
persistent-tile GEMM wherever it can run; "cublaslt" never does. A shape first seen under
capture takes cuBLASLt + epilogue (the runner's warm-up always comes first). `choices()` lists
the decisions with their timings (bench rows carry them); each is also logged once.
"""
from __future__ import annotations

import logging
import threading
from typing import Callable, Optional, Union

import torch
from torch import Tensor

from ._common import DTYPE_CODES, ptr, row_vector_stride, stream_handle

log = logging.getLogger("lyradynamo")

_lock = threading.Lock()
_choice: dict[tuple, dict] = {}  # shape key -> {"path": name, "<name>_us": time of each path}


def choices() -> dict[tuple, dict]:
    """(device, dtype, M, N, K, batches, bias?) -> the path taken and the timings it was based on."""
    with _lock:
        return dict(_choice)


def _layout(C, x2: Tensor, weight: Tensor, bias: Optional[Tensor], gate: Tensor, x: Tensor, m: int,
            n: int, k: int, lda: int) -> Union[str, tuple[int, int, int]]:
    """(weight row stride, gate batch stride, samples) for the fused kernel, or why it cannot
    take this call."""
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
    gstride, batches = _batching(x, gate, m, n)
    if gstride is None:
        return f"gate shape {tuple(gate.shape)} is not one row of width {n} per sample of >= 8 rows"
    for t in (x2, weight, bias, gate):
        if t is not None and t.data_ptr() % 16:
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

    paths = {"cutlass": fused(0), "cutlass-streamk": fused(1), "cublaslt": split}
    if mode == "cutlass":  # the persistent-tile kernel
        return paths["cutlass"]()
    key = (x.device.index, x.dtype, m, n, k, batches, bias is not None)
    with _lock:
        decided = _choice.get(key)
    if decided is None:
        if torch.cuda.is_current_stream_capturing():
            return split()
        decided = _decide(key, paths)
    return paths[decided["path"]]()


def _time_us(fn: Callable[[], Tensor], runs: int = 3) -> float:
    fn()  # warm-up (plans, workspaces)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(runs):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1000.0 / runs


def _decide(key: tuple, paths: dict[str, Callable[[], Tensor]]) -> dict:
    """Time each path on this call's operands (a warm-up + 3 runs each) and keep the fastest."""
    times = {}
    for name, fn in paths.items():
        try:
            times[name] = _time_us(fn)
        except (RuntimeError, ValueError) as exc:
            log.warning("lyradynamo: gated linear %s: %s failed (%s); not used there", key[2:], name, exc)
    best = min(times, key=times.get) if times else "cublaslt"
    decided = {"path": best, **{f"{name}_us": round(t, 1) for name, t in times.items()}}
    with _lock:
        _choice[key] = decided
    log.info("lyradynamo: gated linear %s: %s -> %s", key[2:],
             ", ".join(f"{name} {t:.1f} us" for name, t in times.items()), best)
    return decided
