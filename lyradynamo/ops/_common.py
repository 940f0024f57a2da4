"""What every lyra:: op shares: the compiled library, support checks, fallback records.

The CUDA implementation of an op calls csrc (`lyradynamo._C`) when it is built and the inputs
are ones the kernel handles; otherwise it runs the op's PyTorch reference and records why,
so that the dump, the logs and the benchmarks can say which path ran. Nothing falls back
silently.
"""
from __future__ import annotations

import collections
import functools
import logging
import threading
from typing import Any

import sympy
import torch

log = logging.getLogger("lyradynamo")

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

_lock = threading.Lock()
_fallbacks: collections.Counter = collections.Counter()  # (op, reason) -> calls


@functools.lru_cache(maxsize=None)
def _load_csrc():
    try:
        from lyradynamo import _C  # type: ignore[attr-defined]
    except ImportError as exc:
        return None, f"csrc not built ({exc})"
    return _C, "built"


def csrc():
    """The compiled CUDA library, or None when it is not built (or disabled in config)."""
    from lyradynamo import config

    if not config.use_csrc:
        return None
    C = _load_csrc()[0]
    if C is not None:
        for name, (setter, convert) in _LIBRARY_SETTINGS.items():
            value = getattr(config, name)
            if value != _applied.get(name):
                converted = convert(value)
                set_value = getattr(C, setter, None)
                if set_value is not None:
                    set_value(converted)
                _applied[name] = value
    return C


def _gemm_workspace_bytes(mb) -> int:
    mb = int(mb)
    if not 0 <= mb <= 32:
        raise ValueError(f"lyradynamo.config.gemm_workspace_mb must be in 0..32, got {mb}")
    return mb << 20


# config option -> (the library's setter, the value it takes from the option's)
_LIBRARY_SETTINGS = {
    "gemm_autotune": ("set_gemm_autotune", lambda v: max(int(v), 0)),
    "gemm_workspace_mb": ("set_gemm_workspace", _gemm_workspace_bytes),
}
_applied: dict = {}  # config values last handed to the library


def csrc_status() -> str:
    """'built', 'disabled by config.use_csrc', or why the library is missing."""
    from lyradynamo import config

    if not config.use_csrc:
        return "disabled by config.use_csrc"
    return _load_csrc()[1]


def record_fallback(op: str, reason: str) -> None:
    """Count a call of `op`'s CUDA path that ran the reference instead; warn once per reason."""
    with _lock:
        first = (op, reason) not in _fallbacks
        _fallbacks[(op, reason)] += 1
    if first:
        log.warning("lyradynamo: lyra::%s ran its PyTorch reference on CUDA: %s", op, reason)


def fallback_counts() -> dict[tuple[str, str], int]:
    """{(op, reason): calls} since start or the last reset."""
    with _lock:
        return dict(_fallbacks)


def reset_fallback_counts() -> None:
    with _lock:
        _fallbacks.clear()


def unsupported_reason(**tensors: torch.Tensor | None) -> str | None:
    """Why these op inputs cannot be handled by a lyra kernel (None if they can).

    Checks dtype (fp32/fp16/bf16), device (cpu or cuda) and that all share one device.
    Works on real and fake tensors without adding shape guards.
    """
    devices = set()
    for name, t in tensors.items():
        if t is None:
            continue
        if t.dtype not in SUPPORTED_DTYPES:
            return f"{name} has dtype {t.dtype}; lyra kernels take float32, float16, bfloat16"
        if t.device.type not in ("cpu", "cuda"):
            return f"{name} is on device {t.device}; lyra kernels run on cpu and cuda"
        devices.add(t.device.type)
    if len(devices) > 1:
        return f"inputs are on several devices {sorted(devices)}"
    return None


def device_index(device: torch.device) -> int:
    """The CUDA device ordinal of `device` ("cuda" alone: the current device)."""
    return device.index if device.index is not None else torch.cuda.current_device()


def side_stream(device: torch.device) -> torch.cuda.Stream:
    """A new stream for one capture (the runtime's warm-up and record, gated_gemm's timing
    candidates), ordered after the work already queued on `device`'s current stream. A new one
    each time: a capture that failed may leave its stream unusable (session 28, run D)."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    return stream


def clean_up_failed_capture(device: torch.device, pool) -> None:
    """Leave `device` usable after a CUDA-graph capture raised: its queued work done, its
    generator out of capture mode, `pool` (the handle the capture recorded into) no longer being
    recorded to. Where cudaStreamEndCapture reports the capture invalidated (a host sync inside
    it, say), torch 2.11's capture_end raises before its epilogue:
    - the default CUDA generator stays in capture mode: every later random op on the device
      raises "Offset increment outside graph capture encountered unexpectedly". It gets a fresh
      state with the same seed and offset (clone_state: not capturing); graphs captured before
      keep their reference to the old one, and lyra's graphs draw no random numbers.
    - the caching allocator keeps the pool as "being recorded to": a later capture into it fails
      at its start ("beginAllocateToPool: already recording to mempool_id": session 29, run A,
      one failed capture left every later one in the process without CUDA graphs), and while it
      believes a capture runs it stops recycling blocks freed across streams. Its entry is ended
      here; the pinned-host allocator's has no Python binding, so callers record later captures
      into a new pool."""
    torch.cuda.synchronize(device)
    try:
        gen = torch.cuda.default_generators[device_index(device)]
        gen.graphsafe_set_state(gen.clone_state())
    except Exception as exc:  # noqa: BLE001 - older torch without graph-safe states: nothing to repair
        log.info("lyradynamo: could not reset the CUDA generator after a failed capture (%s)", exc)
    if pool is None:
        return
    try:
        torch._C._cuda_endAllocateToPool(device_index(device), pool)
    except Exception as exc:  # noqa: BLE001 - capture_end got past its allocator calls: nothing stale
        log.info("lyradynamo: no allocator entry to end after the failed capture (%s)", str(exc)[:120])


def stream_handle(t: torch.Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream


def ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def row_vector_stride(v: torch.Tensor, x_dim0: int, n: int, ndim: int) -> int | None:
    """Batch stride of a modulation/gate tensor read as v[b * stride + j], or None.

    Accepts shapes broadcastable as (B or 1, 1, ..., 1, n) against an output of rank `ndim`
    whose first dim is `x_dim0`, with unit stride along the last dim.
    """
    shape = list(v.shape)
    if not shape or shape[-1] != n or (n > 1 and v.stride(-1) != 1):
        return None
    if len(shape) > ndim:
        return None
    full = [1] * (ndim - len(shape)) + shape
    if any(s != 1 for s in full[1:-1]):
        return None
    if ndim == 1:
        return 0
    if full[0] == 1:
        return 0
    if full[0] != x_dim0 or len(shape) < ndim:
        return None
    return v.stride(0)


# ---- layouts on symbolic sizes, without symbolic reasoning ------------------------------------

def size_expr(v: Any) -> Any:
    """A size or stride as a sympy expression (a SymInt's own, an int's constant)."""
    return v.node.expr if isinstance(v, torch.SymInt) else sympy.Integer(v)


def layout_strides(c: Any, h: Any, w: Any, memory_format: torch.memory_format) -> tuple:
    """(N, C, H, W) strides in `memory_format` (contiguous or channels_last), multiplied in
    torch's own order (make_contiguous_strides_for, get_channels_last_strides_2d): sympy
    distributes a constant over a sum, so 320 * (h + 1) and (h + 1) * w * 320 differ as written.
    The same products serve sympy expressions and SymInts."""
    if memory_format == torch.contiguous_format:
        return ((w * h) * c, w * h, w, 1)
    return ((c * w) * h, 1, c * w, c)


def strides_as_written(t: torch.Tensor, memory_format=torch.contiguous_format) -> bool:
    """t's strides are, as sympy writes them (structural ==, no symbolic reasoning), those of a
    contiguous (any rank) or channels_last (4-D) tensor of its sizes: then t is that layout at
    every size. False says nothing (a size-1 dim's stride, another way of writing a product)."""
    sizes = [size_expr(d) for d in t.shape]
    strides = tuple(size_expr(d) for d in t.stride())
    if memory_format == torch.channels_last:
        return len(sizes) == 4 and strides == layout_strides(*sizes[1:], memory_format)
    if memory_format != torch.contiguous_format:
        return False
    expected, step = [], sympy.Integer(1)
    for d in reversed(sizes):  # make_contiguous_strides_for's order
        expected.append(step)
        step = step * d
    return strides == tuple(reversed(expected))


def fast_is_contiguous(t: torch.Tensor, memory_format=torch.contiguous_format) -> bool:
    """t.is_contiguous(memory_format), answered from the strides as written where t's sizes are
    symbolic and they match (torch's own answer costs ~0.7 ms there); torch's otherwise."""
    if any(isinstance(d, torch.SymInt) for d in t.shape) and strides_as_written(t, memory_format):
        return True
    return t.is_contiguous(memory_format=memory_format)
