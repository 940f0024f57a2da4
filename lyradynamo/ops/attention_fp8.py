"""FP8 attention (config.quant = "fp8"): q, k, v in e4m3 with one scale each, cuDNN's fp8
SDPA, and the output left in e4m3 for the quantised out-projection that reads it.

    scales = lyra::attention_fp8_scales(q_parts, k_parts, v_parts, q_weights, k_weights)
    q8 = lyra::qkv_quant(parts, weights, norm, eps, cos, sin, scales, 0)   # k: 1, v: 2
    o8, o_scale = lyra::attention_fp8(q8, k8, v8, scales, scale, is_causal)

All tensors are (B, L, H, D) ("blhd", the projections' layout). `scales` holds 32 float32
(csrc/attention_fp8.cu has the layout): per tensor t, descale_t = max(bound_t / 448, 1e-12)
and inv_t = 1 / descale_t, where bound_t is the amax over the tensor's parts, or, for a q / k
that is an RMS-normalised head vector times w (then RoPE), sqrt(D) * max|w|: no pass over
the data. qkv_quant is lyra::qk_norm_rope (norm, RoPE and the cat of joint attention; only
the cat for a v) whose dtype-rounded result leaves as e4m3(x * inv_t). attention_fp8 runs
cuDNN's fp8 flash attention (P in e4m3 at scale 448) and writes O in e4m3 at v's scale
(|O| <= amax(v): O rows are convex combinations of v rows); o_scale (B, L) is that scale per
row, the per-token scale a lyra::qlinear_q reads.

The CUDA attention (ops/cudnn_attention.py) needs the cuDNN frontend (`pip install
nvidia-cudnn-frontend`, module `cudnn`) and an SM90+ GPU; `unavailable_reason` says why it cannot
run, and the rewrite (quant/attention.py) leaves attention in high precision then. The reference (CPU, and the
test oracle) is SDPA in float32 on the dequantised inputs, its output quantised as above.
"""
from __future__ import annotations

import math
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..quant import numerics
from . import cudnn_attention
from ._common import DTYPE_CODES, csrc, ptr, record_fallback, stream_handle, unsupported_reason
from .cudnn_attention import unavailable_reason  # noqa: F401  (the rewrite and the tests ask here)
from .rope import cuda_unsupported as _rope_unsupported
from .rope import fused_unsupported, launch_fused, launch_parts, new_joined, qk_norm_rope_reference


SCALES = 32  # float32 slots of the scales tensor
DESCALE = {"q": 0, "k": 4, "v": 8}
INV = 24  # inv_q, inv_k, inv_v at 24, 25, 26
SCALE_O = 20  # = inv_v: O leaves in v's scale
_QMAX = numerics.QMAX["fp8"]
E4M3 = torch.float8_e4m3fn


# ---- the scales ------------------------------------------------------------------------------


def scales_reference(q_parts: List[Tensor], k_parts: List[Tensor], v_parts: List[Tensor],
                     q_weights: List[Tensor], k_weights: List[Tensor]) -> Tensor:
    device = v_parts[0].device
    d = v_parts[0].shape[-1]
    bounds = []
    for parts, weights in ((q_parts, q_weights), (k_parts, k_weights), (v_parts, [])):
        if weights:
            wmax = torch.stack([w.detach().abs().amax().float() for w in weights]).amax()
            bounds.append(wmax * torch.full((), math.sqrt(d), dtype=torch.float32, device=device))
        else:
            bounds.append(torch.stack([p.detach().abs().float().flatten().max(0, keepdim=True)[0].squeeze(0)
                                       if p.numel() else torch.zeros((), device=device) for p in parts]).amax())
    bound = torch.stack(bounds)
    descale = numerics.scales_of_amax(bound, "fp8")
    inv = torch.reciprocal(descale)
    out = torch.zeros(SCALES, dtype=torch.float32, device=device)
    out[0:12:4] = descale
    out[12] = torch.reciprocal(torch.full((), _QMAX, device=device))
    out[16] = _QMAX
    out[SCALE_O] = inv[2]
    out[INV:INV + 3] = inv
    return out


def _check_scales_args(q_parts, k_parts, v_parts, q_weights, k_weights) -> None:
    for name, parts, weights in (("q", q_parts, q_weights), ("k", k_parts, k_weights), ("v", v_parts, [])):
        if bool(parts) == bool(weights):
            raise ValueError(f"lyra::attention_fp8_scales: {name} needs either parts or RMSNorm weights, "
                             f"got {len(parts)} parts and {len(weights)} weights")
        if any(p.dim() != 4 for p in parts):
            raise ValueError(f"lyra::attention_fp8_scales: {name} parts must be (B, L, H, D), got "
                             f"{[tuple(p.shape) for p in parts]}")


@torch.library.custom_op("lyra::attention_fp8_scales", mutates_args=())
def attention_fp8_scales(q_parts: List[Tensor], k_parts: List[Tensor], v_parts: List[Tensor],
                         q_weights: List[Tensor], k_weights: List[Tensor]) -> Tensor:
    _check_scales_args(q_parts, k_parts, v_parts, q_weights, k_weights)
    return scales_reference(q_parts, k_parts, v_parts, q_weights, k_weights)


@attention_fp8_scales.register_fake
def _(q_parts, k_parts, v_parts, q_weights, k_weights):
    _check_scales_args(q_parts, k_parts, v_parts, q_weights, k_weights)
    return v_parts[0].new_empty((SCALES,), dtype=torch.float32)


@attention_fp8_scales.register_kernel("cuda")
def _(q_parts, k_parts, v_parts, q_weights, k_weights):
    _check_scales_args(q_parts, k_parts, v_parts, q_weights, k_weights)
    C = csrc()
    reason = "csrc not built" if C is None else _scales_unsupported(q_parts, k_parts, v_parts, q_weights, k_weights)
    if reason is None and getattr(C, "attention_fp8_scales", None) is None:
        reason = "this lyradynamo._C has no attention_fp8_scales"
    if reason:
        record_fallback("attention_fp8_scales", reason)
        return scales_reference(q_parts, k_parts, v_parts, q_weights, k_weights)
    x0 = v_parts[0]
    out = torch.zeros(SCALES, dtype=torch.float32, device=x0.device)
    parts = []
    for t, group in enumerate((q_parts, k_parts, v_parts)):
        for p in group:
            parts += [t, ptr(p), p.shape[0], p.shape[1], p.shape[2], p.stride(0), p.stride(1), p.stride(2)]
    weights = [x for t, group in enumerate((q_weights, k_weights)) for w in group for x in (t, ptr(w))]
    C.attention_fp8_scales(parts, weights, x0.shape[-1], ptr(out), DTYPE_CODES[x0.dtype], stream_handle(x0))
    return out


def _scales_unsupported(q_parts, k_parts, v_parts, q_weights, k_weights) -> Optional[str]:
    parts = [*q_parts, *k_parts, *v_parts]
    weights = [*q_weights, *k_weights]
    reason = unsupported_reason(**{f"part{i}": p for i, p in enumerate(parts)},
                                **{f"weight{i}": w for i, w in enumerate(weights)})
    if reason:
        return reason
    x0 = v_parts[0]
    if len(parts) > 6 or len(q_weights) > 2 or len(k_weights) > 2:
        return "more than 2 parts or weights per tensor"
    for p in parts:
        if p.dtype != x0.dtype or p.shape[-1] != x0.shape[-1] or p.stride(3) != 1:
            return "parts must share v's dtype and head dim, unit-stride along it"
    for w in weights:
        if w.dtype != x0.dtype or tuple(w.shape) != (x0.shape[-1],) or not w.is_contiguous():
            return f"RMSNorm weights must be contiguous ({x0.shape[-1]},) tensors of v's dtype"
    return None


# ---- quantised q / k / v ---------------------------------------------------------------------


def quantize_tensor(x: Tensor, inv: Tensor) -> Tensor:
    """e4m3(x.float() * inv), inv a float32 scalar tensor: the per-tensor form of quantize_rows."""
    return numerics.to_e4m3(x.float() * inv.float())


def qkv_quant_reference(parts: List[Tensor], weights: List[Tensor], norm: str, eps: float,
                        cos: Optional[Tensor], sin: Optional[Tensor], scales: Tensor, which: int) -> Tensor:
    y = qk_norm_rope_reference(parts, weights, norm, eps, cos, sin)
    return quantize_tensor(y, scales[INV + which])


def _check_qkv(parts, weights, norm, cos, sin, scales, which) -> None:
    if norm not in ("none", "rms"):
        raise ValueError(f"lyra::qkv_quant: norm={norm!r} is not 'none' or 'rms'")
    if not parts or any(p.dim() != 4 for p in parts):
        raise ValueError(f"lyra::qkv_quant: parts must be (B, L, H, D), got {[tuple(p.shape) for p in parts]}")
    if weights and (norm != "rms" or len(weights) != len(parts)):
        raise ValueError("lyra::qkv_quant: weights must be empty or one per part (with norm='rms')")
    if (cos is None) != (sin is None):
        raise ValueError("lyra::qkv_quant: cos and sin come together")
    if which not in (0, 1, 2):
        raise ValueError(f"lyra::qkv_quant: which={which} is not 0 (q), 1 (k) or 2 (v)")
    if tuple(scales.shape) != (SCALES,) or scales.dtype != torch.float32:
        raise ValueError(f"lyra::qkv_quant: scales must be float32 ({SCALES},), got {tuple(scales.shape)}")


@torch.library.custom_op("lyra::qkv_quant", mutates_args=())
def qkv_quant(parts: List[Tensor], weights: List[Tensor], norm: str, eps: float, cos: Optional[Tensor],
              sin: Optional[Tensor], scales: Tensor, which: int) -> Tensor:
    _check_qkv(parts, weights, norm, cos, sin, scales, which)
    return qkv_quant_reference(parts, weights, norm, eps, cos, sin, scales, which)


@qkv_quant.register_fake
def _(parts, weights, norm, eps, cos, sin, scales, which):
    _check_qkv(parts, weights, norm, cos, sin, scales, which)
    return new_joined(parts, E4M3)


@qkv_quant.register_kernel("cuda")
def _(parts, weights, norm, eps, cos, sin, scales, which):
    _check_qkv(parts, weights, norm, cos, sin, scales, which)
    C = csrc()
    reason = "csrc not built" if C is None else _rope_unsupported(parts, weights, norm, cos, sin)
    if reason is None and (not scales.is_cuda or scales.device != parts[0].device):
        reason = f"scales must be on {parts[0].device}"
    if reason:
        record_fallback("qkv_quant", reason)
        return qkv_quant_reference(parts, weights, norm, eps, cos, sin, scales, which)
    return launch_parts(C, parts, weights, norm, eps, cos, sin, new_joined(parts, E4M3),
                        ptr(scales) + 4 * (INV + which))


def qkv_quant3_reference(q_parts, k_parts, v_parts, q_weights, k_weights, norm, eps, cos, sin, scales):
    return (qkv_quant_reference(q_parts, q_weights, norm, eps, cos, sin, scales, 0),
            qkv_quant_reference(k_parts, k_weights, norm, eps, cos, sin, scales, 1),
            qkv_quant_reference(v_parts, [], "none", 0.0, None, None, scales, 2))


@torch.library.custom_op("lyra::qkv_quant3", mutates_args=())
def qkv_quant3(q_parts: List[Tensor], k_parts: List[Tensor], v_parts: List[Tensor], q_weights: List[Tensor],
               k_weights: List[Tensor], norm: str, eps: float, cos: Optional[Tensor], sin: Optional[Tensor],
               scales: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """lyra::qkv_quant of q, k (same norm and RoPE) and v (copied) in one pass per part
    (csrc qkv_quant: a block per token, 16-byte accesses)."""
    _check_qkv(q_parts, q_weights, norm, cos, sin, scales, 0)
    _check_qkv(k_parts, k_weights, norm, cos, sin, scales, 1)
    _check_qkv(v_parts, [], "none", None, None, scales, 2)
    return qkv_quant3_reference(q_parts, k_parts, v_parts, q_weights, k_weights, norm, eps, cos, sin, scales)


@qkv_quant3.register_fake
def _(q_parts, k_parts, v_parts, q_weights, k_weights, norm, eps, cos, sin, scales):
    return tuple(new_joined(parts, E4M3) for parts in (q_parts, k_parts, v_parts))


@qkv_quant3.register_kernel("cuda")
def _(q_parts, k_parts, v_parts, q_weights, k_weights, norm, eps, cos, sin, scales):
    C = csrc()
    reason = "csrc not built" if C is None else None
    if reason is None:
        reason = (_rope_unsupported(q_parts, q_weights, norm, cos, sin)
                  or _rope_unsupported(k_parts, k_weights, norm, cos, sin)
                  or _rope_unsupported(v_parts, [], "none", None, None))
    if reason is None and (not scales.is_cuda or scales.device != q_parts[0].device):
        reason = f"scales must be on {q_parts[0].device}"
    if reason:
        record_fallback("qkv_quant3", reason)
        return qkv_quant3_reference(q_parts, k_parts, v_parts, q_weights, k_weights, norm, eps, cos, sin, scales)
    outs = [new_joined(parts, E4M3) for parts in (q_parts, k_parts, v_parts)]
    if fused_unsupported(C, q_parts, k_parts, v_parts, q_weights, k_weights, cos, sin) is None:
        launch_fused(C, q_parts, k_parts, v_parts, q_weights, k_weights, norm, eps, cos, sin,
                     ptr(scales) + 4 * INV, outs)
    else:  # three passes of the per-tensor kernel (qk_norm_rope's)
        for i, (parts, weights, nm, c, s_) in enumerate(((q_parts, q_weights, norm, cos, sin),
                                                          (k_parts, k_weights, norm, cos, sin),
                                                          (v_parts, [], "none", None, None))):
            launch_parts(C, parts, weights, nm, eps, c, s_, outs[i], ptr(scales) + 4 * (INV + i))
    return tuple(outs)


# ---- the attention ---------------------------------------------------------------------------


def attention_fp8_reference(q8: Tensor, k8: Tensor, v8: Tensor, scales: Tensor, scale: Optional[float],
                            is_causal: bool) -> tuple[Tensor, Tensor]:
    q, k, v = (t.float().transpose(1, 2) * scales[DESCALE[n]] for t, n in ((q8, "q"), (k8, "k"), (v8, "v")))
    o = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, scale=scale).transpose(1, 2)
    o8 = quantize_tensor(o, scales[SCALE_O]).contiguous()
    return o8, _row_scale(scales, q8)


def _row_scale(scales: Tensor, q8: Tensor) -> Tensor:
    return scales[DESCALE["v"]].expand(q8.shape[0], q8.shape[1]).contiguous()


def _check_attention(q8, k8, v8, scales) -> None:
    for name, t in (("q8", q8), ("k8", k8), ("v8", v8)):
        if t.dim() != 4 or t.dtype != E4M3:
            raise ValueError(f"lyra::attention_fp8: {name} must be a 4-D (B, L, H, D) float8_e4m3fn tensor, "
                             f"got {tuple(t.shape)} {t.dtype}")
    if k8.shape != v8.shape or q8.shape[0] != k8.shape[0] or q8.shape[2:] != k8.shape[2:]:
        raise ValueError(f"lyra::attention_fp8: shapes q {tuple(q8.shape)}, k {tuple(k8.shape)}, "
                         f"v {tuple(v8.shape)} do not match")
    if tuple(scales.shape) != (SCALES,) or scales.dtype != torch.float32:
        raise ValueError(f"lyra::attention_fp8: scales must be float32 ({SCALES},)")


@torch.library.custom_op("lyra::attention_fp8", mutates_args=())
def attention_fp8(q8: Tensor, k8: Tensor, v8: Tensor, scales: Tensor, scale: Optional[float],
                  is_causal: bool) -> tuple[Tensor, Tensor]:
    _check_attention(q8, k8, v8, scales)
    return attention_fp8_reference(q8, k8, v8, scales, scale, is_causal)


@attention_fp8.register_fake
def _(q8, k8, v8, scales, scale, is_causal):
    _check_attention(q8, k8, v8, scales)
    return q8.new_empty(q8.shape, dtype=E4M3), q8.new_empty(q8.shape[:2], dtype=torch.float32)


@attention_fp8.register_kernel("cuda")
def _(q8, k8, v8, scales, scale, is_causal):
    _check_attention(q8, k8, v8, scales)
    reason = cudnn_attention.unavailable_reason(q8.device)
    if reason is None and not all(t.device == q8.device for t in (k8, v8, scales)):
        reason = f"q8, k8, v8 and scales must all be on {q8.device}"
    if reason is None:
        reason = _shape_unsupported(q8, k8, v8)
    if reason is None:
        try:
            return cudnn_attention.run(q8, k8, v8, scales, scale, is_causal), _row_scale(scales, q8)
        except Exception as exc:  # cuDNN declined this graph: the reference keeps the contract
            reason = f"cuDNN fp8 SDPA failed: {str(exc)[:160]}"
    record_fallback("attention_fp8", reason)
    return attention_fp8_reference(q8, k8, v8, scales, scale, is_causal)


def _shape_unsupported(q8, k8, v8) -> Optional[str]:
    d = q8.shape[-1]
    if d % 16 or d > 256:
        return f"head dim {d} (cuDNN fp8 attention needs a multiple of 16, at most 256)"
    for name, t in (("q8", q8), ("k8", k8), ("v8", v8)):
        if t.stride(3) != 1 or t.data_ptr() % 16:
            return f"{name} must be unit-stride along D and 16-byte aligned"
    return None
