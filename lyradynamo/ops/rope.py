"""lyra::qk_norm_rope: per-head RMSNorm (q/k norm) + rotary embedding, with the sequence
concatenation of DiT joint attention folded in.

    parts[i]: (B, L_i, H, D)      x = cat([rms_norm_i(parts[i]) ...], dim=1)   # (B, L, H, D)
    out = (x.float() * cos + rotate_pairs(x).float() * sin).to(x.dtype)          # cos/sin (L, D)

rotate_pairs is diffusers' `apply_rotary_emb(use_real=True, use_real_unbind_dim=-1)`:
pair (x[2i], x[2i+1]) -> (-x[2i+1], x[2i]). norm="rms" follows diffusers' RMSNorm (fp32
statistics, normalised value rounded to x's dtype, then the weight); weights holds one weight
per part, or is empty for an RMSNorm without affine. On CUDA one kernel per part reads the
projection output through its strides and writes its slice of the concatenated output: the
norm, the rope, the fp32 temporaries and the cat copy of eager become one pass.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor

from ._common import DTYPE_CODES, csrc, ptr, record_fallback, stream_handle, unsupported_reason
from .adaln import adaln_reference

NORMS = ("none", "rms")
_MAX_HEAD_DIM = 256  # the kernel keeps a head vector in one warp's registers


def rope_reference(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """diffusers' apply_rotary_emb(x, (cos, sin), sequence_dim=1) for x (B, L, H, D)."""
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    x_real, x_imag = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
    rotated = torch.stack([-x_imag, x_real], dim=-1).flatten(3)
    return (x.float() * c + rotated.float() * s).to(x.dtype)


def qk_norm_rope_reference(parts: List[Tensor], weights: List[Tensor], norm: str, eps: float,
                           cos: Optional[Tensor], sin: Optional[Tensor]) -> Tensor:
    """The op's math; without cos / sin (lyra::qkv_quant of a v) only the norm and the cat."""
    normed = []
    for i, x in enumerate(parts):
        if norm == "rms":
            x = adaln_reference(x, weights[i] if weights else None, None, None, None, "rms", eps)
        normed.append(x)
    x = torch.cat(normed, dim=1) if len(normed) > 1 else normed[0]
    return x if cos is None else rope_reference(x, cos, sin)


def new_joined(parts: List[Tensor], dtype: Optional[torch.dtype] = None) -> Tensor:
    """An uninitialised (B, sum of the parts' L, H, D) tensor: the parts joined along L."""
    b, _, h, d = parts[0].shape
    return parts[0].new_empty((b, sum(p.shape[1] for p in parts), h, d), dtype=dtype)


def _check(parts: List[Tensor], weights: List[Tensor], norm: str) -> None:
    if norm not in NORMS:
        raise ValueError(f"lyra::qk_norm_rope: norm={norm!r} is not one of {NORMS}")
    if not parts:
        raise ValueError("lyra::qk_norm_rope: parts is empty")
    if any(p.dim() != 4 for p in parts):
        raise ValueError("lyra::qk_norm_rope: every part must be (B, L, H, D), got shapes "
                         f"{[tuple(p.shape) for p in parts]}")
    if weights and (norm != "rms" or len(weights) != len(parts)):
        raise ValueError("lyra::qk_norm_rope: weights must be empty or one per part (with norm='rms')")


@torch.library.custom_op("lyra::qk_norm_rope", mutates_args=())
def qk_norm_rope(parts: List[Tensor], weights: List[Tensor], norm: str, eps: float, cos: Tensor,
                 sin: Tensor) -> Tensor:
    _check(parts, weights, norm)
    return qk_norm_rope_reference(parts, weights, norm, eps, cos, sin)


@qk_norm_rope.register_fake
def _(parts, weights, norm, eps, cos, sin):
    _check(parts, weights, norm)
    dtype = parts[0].dtype
    if norm == "rms" and weights:
        dtype = torch.promote_types(dtype, weights[0].dtype)
    return new_joined(parts, dtype)


@qk_norm_rope.register_kernel("cuda")
def _(parts, weights, norm, eps, cos, sin):
    _check(parts, weights, norm)
    C = csrc()
    reason = "csrc not built" if C is None else cuda_unsupported(parts, weights, norm, cos, sin)
    if reason:
        record_fallback("qk_norm_rope", reason)
        return qk_norm_rope_reference(parts, weights, norm, eps, cos, sin)
    return launch_parts(C, parts, weights, norm, eps, cos, sin, new_joined(parts), 0)


def launch_parts(C, parts: List[Tensor], weights: List[Tensor], norm: str, eps: float,
                 cos: Optional[Tensor], sin: Optional[Tensor], out: Tensor, out_inv_scale: int) -> Tensor:
    """One csrc qk_norm_rope launch per part, each writing its slice of out (B, L, H, D); with
    out_inv_scale (a float32 device pointer) out is e4m3 (lyra::qkv_quant)."""
    if out.numel() == 0:
        return out
    code, stream, offset = DTYPE_CODES[parts[0].dtype], stream_handle(parts[0]), 0
    b, _, h, d = parts[0].shape
    for i, x in enumerate(parts):
        n = x.shape[1]
        if n:
            y = out[:, offset:offset + n]
            # position of row l of this part = l + offset  (kernel: p = l - rope_l_offset)
            C.qk_norm_rope(ptr(x), ptr(weights[i]) if weights else 0, ptr(cos), ptr(sin), ptr(y),
                           b, n, h, d, x.stride(0), x.stride(1), x.stride(2), y.stride(0),
                           y.stride(1), y.stride(2), float(eps), norm == "rms", -offset,
                           0 if cos is None else cos.shape[0], code, out_inv_scale, stream)
        offset += n
    return out


def fused_unsupported(C, q_parts, k_parts, v_parts, q_weights, k_weights, cos, sin) -> Optional[str]:
    """Why csrc qkv_quant cannot take q, k (and v, possibly no parts) in one pass, or None."""
    if getattr(C, "qkv_quant", None) is None:
        return "this lyradynamo._C has no qkv_quant"
    if len(q_parts) != len(k_parts) or (v_parts and len(v_parts) != len(q_parts)):
        return "q, k, v have different numbers of parts"
    x0 = q_parts[0]
    es = x0.element_size()
    vec = 16 // es
    d, h = x0.shape[3], x0.shape[2]
    lanes = d // vec
    if d % vec or lanes > 32 or lanes & (lanes - 1) or (h * lanes + 31) // 32 * 32 > 1024:
        return f"H={h}, D={d}: not a power-of-two number of 16-byte vectors per head, or too many heads"
    for parts in zip(q_parts, k_parts, v_parts or k_parts):
        if any(p.shape != parts[0].shape or p.dtype != x0.dtype for p in parts):
            return "q, k, v parts differ in shape or dtype"
        for p in parts:
            if p.data_ptr() % 16 or any((st * es) % 16 for st in p.stride()[:3]):
                return "a part is not 16-byte aligned"
    for t in (*q_weights, *k_weights, cos, sin):
        if t is not None and t.data_ptr() % 16:
            return "a weight or the cos / sin table is not 16-byte aligned"
    return None


def launch_fused(C, q_parts, k_parts, v_parts, q_weights, k_weights, norm, eps, cos, sin, inv: int,
                 outs) -> None:
    """csrc qkv_quant per part into outs (q, k[, v]): e4m3 at inv (a device pointer to inv_q,
    inv_k, inv_v), or the dtype with inv = 0."""
    x0 = q_parts[0]
    code, stream, offset = DTYPE_CODES[x0.dtype], stream_handle(x0), 0
    rms = norm == "rms"
    for i, (q, k) in enumerate(zip(q_parts, k_parts)):
        b, n, h, d = q.shape
        if n:
            parts = (q, k, v_parts[i]) if v_parts else (q, k)
            src = [x for p in parts for x in (ptr(p), p.stride(0), p.stride(1), p.stride(2))]
            ys = [o[:, offset:offset + n] for o in outs[:len(parts)]]
            src += [0, 0, 0, 0] * (3 - len(parts))
            dst = [ptr(y) for y in ys] + [0] * (3 - len(parts)) + [ys[0].stride(0), ys[0].stride(1), ys[0].stride(2)]
            C.qkv_quant(src, dst, ptr(q_weights[i]) if rms else 0, ptr(k_weights[i]) if rms else 0,
                        ptr(cos), ptr(sin), inv, b, n, h, d, -offset,
                        0 if cos is None else cos.shape[0], float(eps), code, stream)
        offset += n


# ---- lyra::qk_norm_rope3: q and k normalised + rotated, v's cat copied, in one pass ------------


def qk_norm_rope3_reference(q_parts, k_parts, v_parts, q_weights, k_weights, norm, eps, cos, sin):
    v = (torch.cat(v_parts, dim=1) if len(v_parts) > 1 else v_parts[0].clone()) if v_parts else q_parts[0].new_empty(0)
    return (qk_norm_rope_reference(q_parts, q_weights, norm, eps, cos, sin),
            qk_norm_rope_reference(k_parts, k_weights, norm, eps, cos, sin), v)


@torch.library.custom_op("lyra::qk_norm_rope3", mutates_args=())
def qk_norm_rope3(q_parts: List[Tensor], k_parts: List[Tensor], v_parts: List[Tensor], q_weights: List[Tensor],
                  k_weights: List[Tensor], norm: str, eps: float, cos: Tensor,
                  sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """lyra::qk_norm_rope of q and of k (same norm, RoPE) and the cat of v's parts, one pass per
    part (csrc qkv_quant with dtype output). No v parts: v is an empty tensor."""
    _check(q_parts, q_weights, norm)
    _check(k_parts, k_weights, norm)
    return qk_norm_rope3_reference(q_parts, k_parts, v_parts, q_weights, k_weights, norm, eps, cos, sin)


def _outputs3(q_parts, k_parts, v_parts):
    return [new_joined(q_parts), new_joined(k_parts), new_joined(v_parts) if v_parts else q_parts[0].new_empty(0)]


@qk_norm_rope3.register_fake
def _(q_parts, k_parts, v_parts, q_weights, k_weights, norm, eps, cos, sin):
    _check(q_parts, q_weights, norm)
    _check(k_parts, k_weights, norm)
    return tuple(_outputs3(q_parts, k_parts, v_parts))


@qk_norm_rope3.register_kernel("cuda")
def _(q_parts, k_parts, v_parts, q_weights, k_weights, norm, eps, cos, sin):
    C = csrc()
    reason = "csrc not built" if C is None else (
        cuda_unsupported(q_parts, q_weights, norm, cos, sin) or cuda_unsupported(k_parts, k_weights, norm, cos, sin))
    if reason:
        record_fallback("qk_norm_rope3", reason)
        return qk_norm_rope3_reference(q_parts, k_parts, v_parts, q_weights, k_weights, norm, eps, cos, sin)
    outs = _outputs3(q_parts, k_parts, v_parts)
    if fused_unsupported(C, q_parts, k_parts, v_parts, q_weights, k_weights, cos, sin) is None:
        launch_fused(C, q_parts, k_parts, v_parts, q_weights, k_weights, norm, eps, cos, sin, 0, outs)
        return tuple(outs)
    # parts that do not line up: the per-tensor kernel for q and k, torch's cat for v
    launch_parts(C, q_parts, q_weights, norm, eps, cos, sin, outs[0], 0)
    launch_parts(C, k_parts, k_weights, norm, eps, cos, sin, outs[1], 0)
    if v_parts:
        torch.cat(v_parts, dim=1, out=outs[2])
    return tuple(outs)


def cuda_unsupported(parts, weights, norm, cos, sin) -> str | None:
    x0 = parts[0]
    reason = unsupported_reason(**{f"part{i}": p for i, p in enumerate(parts)}, cos=cos, sin=sin)
    if reason:
        return reason
    b, _, h, d = x0.shape
    if d % 2 or d > _MAX_HEAD_DIM:
        return f"head dim {d} is odd or above {_MAX_HEAD_DIM}"
    for i, p in enumerate(parts):
        if p.dtype != x0.dtype or p.shape[0] != b or p.shape[2] != h or p.shape[3] != d:
            return f"part {i} shape {tuple(p.shape)} / dtype {p.dtype} differs from part 0"
        if p.stride(3) != 1:
            return f"part {i} is not unit-stride along the head dim"
    if norm == "rms" and not weights:
        return "RMSNorm without a weight"
    for i, w in enumerate(weights):
        if w.dtype != x0.dtype or tuple(w.shape) != (d,) or not w.is_contiguous():
            return f"weight {i} must be a contiguous ({d},) tensor of the parts' dtype"
    if cos is None and sin is None:
        return None
    length = sum(p.shape[1] for p in parts)
    for name, t in (("cos", cos), ("sin", sin)):
        if t is None or t.dtype != torch.float32 or tuple(t.shape) != (length, d) or not t.is_contiguous():
            return f"{name} must be a contiguous float32 ({length}, {d}) table, got {tuple(t.shape)} {t.dtype}"
    return None
