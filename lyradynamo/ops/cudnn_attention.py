"""cuDNN's fp8 flash attention (SM90+) through the cuDNN frontend's graph API, for
lyra::attention_fp8 (ops/attention_fp8.py has the contract and the reference).

One cuDNN graph per (device, shapes, strides, scale, causal), built on the first call of that
signature (outside CUDA-graph capture: the runner warms up first) and cached; a handle per
device, set to the caller's stream before each execution. q, k, v and O are (B, L, H, D) e4m3
tensors described to cuDNN as (B, H, L, D) with their strides; the six scalar scales are
16-byte aligned slots of the scales tensor. `unavailable_reason` says why this cannot run.
"""
from __future__ import annotations

import ctypes
import glob
import logging
import math
import os
import threading
from typing import Optional

import torch

from ._common import device_index, stream_handle

log = logging.getLogger("lyradynamo")
E4M3 = torch.float8_e4m3fn

_lock = threading.Lock()
_frontend: dict = {}  # "module" / "reason", filled once
_graphs: dict = {}  # signature -> (graph, tensors, workspace bytes)
_handles: dict = {}  # device index -> cudnn handle


def _load_frontend():
    """The cuDNN frontend module, or None with the reason in _frontend['reason']."""
    if "module" in _frontend:
        return _frontend["module"]
    module, reason = None, None
    try:
        # The frontend resolves cuDNN's symbols from the process: load torch's libcudnn globally.
        for lib in glob.glob(os.path.join(os.path.dirname(torch.__file__), "..", "nvidia", "cudnn", "lib",
                                          "libcudnn.so*")):
            ctypes.CDLL(lib, mode=ctypes.RTLD_GLOBAL)
        import cudnn  # type: ignore[import-not-found]
        module = cudnn
        if module.backend_version() < 90100:
            module, reason = None, f"cuDNN {module.backend_version()} has no fp8 attention (9.1+ needed)"
    except ImportError as exc:
        reason = f"cuDNN frontend not importable ({exc}); pip install nvidia-cudnn-frontend"
    except Exception as exc:  # noqa: BLE001  (any load failure means: not available)
        reason = f"cuDNN frontend failed to load: {str(exc)[:160]}"
    _frontend.update(module=module, reason=reason)
    if reason:
        log.info("lyradynamo: fp8 attention unavailable: %s", reason)
    return module


def unavailable_reason(device: torch.device) -> Optional[str]:
    """Why lyra::attention_fp8 cannot run cuDNN on `device` (None: it can; CPU: the reference)."""
    if device.type == "cpu":
        return None
    if device.type != "cuda":
        return f"device {device.type}"
    if not torch.cuda.is_available():
        return "CUDA is not available"
    if torch.cuda.get_device_capability(device) < (9, 0):
        return "cuDNN fp8 attention needs an SM90+ GPU (Hopper, Blackwell)"
    if _load_frontend() is None:
        return _frontend["reason"]
    return None


def _handle(cudnn, device: torch.device):
    idx = device_index(device)
    if idx not in _handles:
        with torch.cuda.device(idx):
            _handles[idx] = cudnn.create_handle()
    return _handles[idx]


def _graph(cudnn, handle, q8, k8, v8, scale, is_causal):
    b, lq, h, d = q8.shape
    lk = k8.shape[1]
    key = (q8.device.index, b, lq, lk, h, d, q8.stride(), k8.stride(), v8.stride(), scale, is_causal)
    with _lock:
        hit = _graphs.get(key)
        if hit is not None:
            return hit
        e4m3, f32 = cudnn.data_type.FP8_E4M3, cudnn.data_type.FLOAT
        g = cudnn.pygraph(io_data_type=e4m3, intermediate_data_type=f32, compute_data_type=f32, handle=handle)

        def bhld(name, t):  # cuDNN's dims are (B, H, L, D); the strides say (B, L, H, D)
            return g.tensor(name=name, dim=[t.shape[0], t.shape[2], t.shape[1], t.shape[3]],
                            stride=[t.stride(0), t.stride(2), t.stride(1), t.stride(3)], data_type=e4m3)

        tq, tk, tv = bhld("q", q8), bhld("k", k8), bhld("v", v8)
        scalars = [g.tensor(name=n, dim=[1, 1, 1, 1], stride=[1, 1, 1, 1], data_type=f32)
                   for n in ("descale_q", "descale_k", "descale_v", "descale_s", "scale_s", "scale_o")]
        o, _, amax_s, amax_o = g.sdpa_fp8(
            q=tq, k=tk, v=tv, descale_q=scalars[0], descale_k=scalars[1], descale_v=scalars[2],
            descale_s=scalars[3], scale_s=scalars[4], scale_o=scalars[5], is_inference=True,
            attn_scale=(1.0 / math.sqrt(d)) if scale is None else float(scale), use_causal_mask=is_causal)
        o.set_output(True).set_dim([b, h, lq, d]).set_stride([lq * h * d, d, h * d, 1]).set_data_type(e4m3)
        for a in (amax_s, amax_o):  # cuDNN computes them; nothing reads them
            a.set_output(True).set_dim([1, 1, 1, 1]).set_stride([1, 1, 1, 1]).set_data_type(f32)
        g.validate()
        g.build_operation_graph()
        g.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
        g.check_support()
        g.build_plans()
        hit = (g, (tq, tk, tv, *scalars, o, amax_s, amax_o), g.get_workspace_size())
        _graphs[key] = hit
        return hit


def run(q8, k8, v8, scales, scale, is_causal):
    """cuDNN fp8 SDPA: O (B, L, H, D) in e4m3 at scales' scale_o (v's scale)."""
    cudnn = _load_frontend()
    handle = _handle(cudnn, q8.device)
    g, tensors, ws_bytes = _graph(cudnn, handle, q8, k8, v8, scale, is_causal)
    o8 = torch.empty(q8.shape, dtype=E4M3, device=q8.device)
    amax = torch.empty(8, dtype=torch.float32, device=q8.device)
    ws = torch.empty(max(ws_bytes, 1), dtype=torch.uint8, device=q8.device)
    s = [scales[i:i + 1].view(1, 1, 1, 1) for i in (0, 4, 8, 12, 16, 20)]
    values = (q8, k8, v8, *s, o8, amax[0:1].view(1, 1, 1, 1), amax[4:5].view(1, 1, 1, 1))
    cudnn.set_stream(handle, stream_handle(q8))
    g.execute(dict(zip(tensors, values)), ws, handle=handle)
    return o8
