"""GPU -> host copies of large weights, fast on the first call.

Offloading FLUX's ~22 GB of high-precision masters one `torch.empty(..., pin_memory=True)` per
weight took 20 s of a 49 s first call on the H100 (benchmarks/NOTES.md, session 4): page-locking
fresh memory runs at ~1 GB/s, and the caching host allocator rounds every block up to a power of
two. Here the destination is ordinary (pageable) memory and the bytes travel through two small
page-locked staging buffers, allocated once: the GPU fills one while the CPU (torch's parallel
copy, which also takes the page faults of the fresh destination on many threads) empties the other.
"""
from __future__ import annotations

import threading

import torch
from torch import Tensor

STAGE_BYTES = 64 << 20  # per staging buffer; two of them stay page-locked for the process

_lock = threading.Lock()
_stage: dict[torch.device, list[Tensor]] = {}


def to_host(t: Tensor, stage_bytes: int = STAGE_BYTES) -> Tensor:
    """A contiguous pageable CPU copy of `t` (same shape and dtype), complete when this returns."""
    host = torch.empty(t.shape, dtype=t.dtype)
    if not t.is_cuda or t.numel() == 0:
        host.copy_(t.detach())
        return host
    src = t.detach().contiguous().reshape(-1).view(torch.uint8)
    dst = host.reshape(-1).view(torch.uint8)
    n = src.numel()
    chunks = [(a, min(a + stage_bytes, n)) for a in range(0, n, stage_bytes)]
    with _lock:
        bufs = _stage.get(t.device)
        if bufs is None or bufs[0].numel() < stage_bytes:
            bufs = [torch.empty(stage_bytes, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
            _stage[t.device] = bufs
        stream = torch.cuda.current_stream(t.device)
        done = [torch.cuda.Event(), torch.cuda.Event()]

        def issue(i: int) -> None:  # GPU: chunk i -> staging buffer i % 2
            a, b = chunks[i]
            bufs[i % 2][: b - a].copy_(src[a:b], non_blocking=True)
            done[i % 2].record(stream)

        for i in range(min(2, len(chunks))):
            issue(i)
        for i, (a, b) in enumerate(chunks):
            done[i % 2].synchronize()
            dst[a:b].copy_(bufs[i % 2][: b - a])  # CPU: staging -> destination
            if i + 2 < len(chunks):
                issue(i + 2)  # only now is buffer i % 2 free again
    return host


def release() -> None:
    """Free the staging buffers (they are re-made on the next copy)."""
    with _lock:
        _stage.clear()
