"""Reference math of W8A8 quantisation: per-row scales, rounding, saturation, SmoothQuant.

This is the CPU implementation and the oracle of the CUDA kernels (csrc/quant.cu and the
fused producers in csrc/norm_modulate.cu, csrc/epilogue.cu): `quantize_rows` is bit-exact
with them. The scheme, for a row r of x (..., K):

    xs      = x.float() * inv_smooth                  (SmoothQuant, optional; fp32)
    amax_r  = max_k |xs[r, k]|                         (fp32, exact)
    scale_r = max(amax_r / QMAX, 1e-12)                (fp32, IEEE division)
    inv_r   = 1 / scale_r                              (fp32, IEEE reciprocal, once per row)
    v       = xs * inv_r                               (fp32 multiply: the kernels' per-element
                                                        division was most of their instructions)
    fp8 :  q = e4m3fn(clamp(v, -448, 448))            round to nearest even, saturating
    int8:  q = clamp(round_half_even(v), -127, 127)   symmetric

and a quantised linear computes out[m, n] = (sum_k qa[m, k] * qb[n, k]) * sa[m] * sb[n] + bias[n].
Kind codes shared with csrc: fp8 (e4m3) = 0, int8 = 1.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

QMAX = {"fp8": 448.0, "int8": 127.0}
QDTYPE = {"fp8": torch.float8_e4m3fn, "int8": torch.int8}
KIND_CODES = {"fp8": 0, "int8": 1}
SCALE_EPS = 1e-12  # floor of a row scale: an all-zero row quantises to zeros, not NaN
SMOOTH_MIN, SMOOTH_MAX = 1e-5, 1e5


def check_kind(kind) -> None:
    if kind not in QMAX:
        raise ValueError(f"quant kind must be one of {sorted(QMAX)}, got {kind!r}")


def _smoothed(x: Tensor, inv_smooth: Optional[Tensor]) -> Tensor:
    """x in fp32, times inv_smooth (K,) if given (one fp32 multiply, as the kernels do)."""
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor, got {x.dtype}")
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"x must have a non-empty last dim, got shape {tuple(x.shape)}")
    xs = x.float()
    if inv_smooth is not None:
        if tuple(inv_smooth.shape) != (x.shape[-1],):
            raise ValueError(f"inv_smooth must have shape ({x.shape[-1]},), got "
                             f"{tuple(inv_smooth.shape)}")
        xs = xs * inv_smooth.to(device=x.device, dtype=torch.float32)
    return xs


def _scales_of(xs: Tensor, kind: str) -> Tensor:
    return scales_of_amax(xs.abs().amax(dim=-1), kind)


def scales_of_amax(amax: Tensor, kind: str) -> Tensor:
    """max(amax / QMAX, 1e-12) in float32 with an IEEE division, as the kernels compute it."""
    # A tensor divisor (not a Python float): CUDA torch turns division by a CPU scalar
    # into a multiply by its reciprocal, which is not the kernels' IEEE division. full_like
    # is a fill kernel, so this stays safe under CUDA-graph capture (no host copy).
    qmax = torch.full_like(amax, QMAX[kind])
    return (amax / qmax).clamp_min(SCALE_EPS)


def row_scales(x: Tensor, kind: str, inv_smooth: Optional[Tensor] = None) -> Tensor:
    """float32 scales of shape x.shape[:-1]: max(amax(|x * inv_smooth|) / QMAX, 1e-12)."""
    check_kind(kind)
    return _scales_of(_smoothed(x, inv_smooth), kind)


def quantize_rows(x: Tensor, kind: str,
                  inv_smooth: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """(q, scale): q of QDTYPE[kind] with x's shape, scale float32 of shape x.shape[:-1]."""
    check_kind(kind)
    xs = _smoothed(x, inv_smooth)
    scale = _scales_of(xs, kind)
    v = xs * torch.reciprocal(scale)[..., None]
    if kind == "fp8":
        q = to_e4m3(v)
    else:
        q = torch.round(v).clamp(-QMAX["int8"], QMAX["int8"]).to(torch.int8)
    return q, scale


def to_e4m3(v: Tensor) -> Tensor:
    """float32 -> e4m3fn, round to nearest even, saturating at +-448 (the clamp makes the
    conversion saturate: torch's float8 cast need not)."""
    return v.clamp(-QMAX["fp8"], QMAX["fp8"]).to(torch.float8_e4m3fn)


def dequantize_rows(q: Tensor, scale: Tensor) -> Tensor:
    """float32 q * scale[..., None]."""
    if tuple(scale.shape) != tuple(q.shape[:-1]):
        raise ValueError(f"scale shape {tuple(scale.shape)} is not q.shape[:-1] = "
                         f"{tuple(q.shape[:-1])}")
    return q.float() * scale.float()[..., None]


def quantized_linear_reference(xq: Tensor, xscale: Tensor, wq: Tensor, wscale: Tensor,
                               bias: Optional[Tensor], out_dtype: torch.dtype) -> Tensor:
    """out (..., N) = (xq @ wq^T) * xscale[..., None] * wscale (+ bias), cast to out_dtype.

    xq (..., K) and wq (N, K) share one quantised dtype. The accumulator is exact for int8
    (integer sums in float64, exact below 2**53) and float32 for fp8; it is rounded once to
    float32, then scaled in float32 in the order (acc * xscale) * wscale, + bias.
    """
    if xq.dtype != wq.dtype:
        raise ValueError(f"xq ({xq.dtype}) and wq ({wq.dtype}) must share a dtype")
    if xq.dtype not in (torch.int8, torch.float8_e4m3fn):
        raise ValueError(f"xq must be int8 or float8_e4m3fn, got {xq.dtype}")
    if wq.dim() != 2 or wq.shape[1] != xq.shape[-1]:
        raise ValueError(f"wq must be (N, {xq.shape[-1]}), got {tuple(wq.shape)}")
    n, k = wq.shape
    lead = xq.shape[:-1]
    if tuple(xscale.shape) != tuple(lead):
        raise ValueError(f"xscale shape {tuple(xscale.shape)} is not xq.shape[:-1] = {tuple(lead)}")
    if tuple(wscale.shape) != (n,):
        raise ValueError(f"wscale shape {tuple(wscale.shape)} is not ({n},)")
    a = xq.reshape(-1, k)
    if xq.dtype == torch.int8:
        acc = (a.double() @ wq.double().t()).float()
    else:
        acc = a.float() @ wq.float().t()
    out = acc * xscale.reshape(-1, 1).float() * wscale.float()[None, :]
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype).reshape(*lead, n)


def smooth_factors(act_absmax: Tensor, weight: Tensor, alpha: float = 0.5) -> Tensor:
    """SmoothQuant s_j = act_absmax_j**alpha / max_n |W[n, j]|**(1 - alpha), float32 (K,).

    Activations are divided by s (inv_smooth = 1 / s) and weight columns multiplied by s,
    which leaves x @ W^T unchanged. Channels whose activation or weight column is all zero
    get s = 1 (no information to balance); the result is clamped to [1e-5, 1e5].
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (N, K), got shape {tuple(weight.shape)}")
    k = weight.shape[1]
    if tuple(act_absmax.shape) != (k,):
        raise ValueError(f"act_absmax must have shape ({k},), got {tuple(act_absmax.shape)}")
    a = act_absmax.detach().double().abs()
    w = weight.detach().double().abs().amax(dim=0)
    dead = (a == 0) | (w == 0) | ~torch.isfinite(a) | ~torch.isfinite(w)
    s = a.clamp_min(1e-300).pow(alpha) / w.clamp_min(1e-300).pow(1.0 - alpha)
    s = torch.where(dead, torch.ones_like(s), s)
    return s.clamp(SMOOTH_MIN, SMOOTH_MAX).float()


def sqnr_db(ref: Tensor, test: Tensor) -> float:
    """Signal-to-quantisation-noise ratio 10 log10(sum ref^2 / sum (ref - test)^2) in dB."""
    ref64, test64 = ref.detach().double(), test.detach().double()
    noise = (ref64 - test64).pow(2).sum().item()
    signal = ref64.pow(2).sum().item()
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)
