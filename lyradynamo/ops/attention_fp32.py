"""float32 attention on the TF32 tensor cores, for the long fp32 attentions of VAE decoders.

cuDNN and flash attention take 16-bit inputs only, so an fp32 attention (a VAE decoder run in
fp32, as SDXL's upcasts: its mid-block is one head of 512 channels over every latent pixel,
16384 tokens at 1024 px)
runs in torch's memory-efficient kernel on the CUDA cores: 14.1 ms of the 78 ms SDXL decode on
an H100 (benchmarks/NOTES.md, session 13). Here it is two batched GEMMs per chunk of queries with
an fp32 softmax between them, the GEMMs on the TF32 tensor cores:

  tf32x3  each fp32 operand x is split into hi = x with its low 13 mantissa bits cleared (exact
          in TF32) and lo = x - hi (exact in fp32), and a.b = hi_a.hi_b + hi_a.lo_b + lo_a.hi_b:
          the dropped lo_a.lo_b and lo's own TF32 rounding are ~2^-20 relative. Measured on an
          H100 at 4096 x 4096 tokens, head dim 512: 1.7e-5 relative to a float64 reference
          (torch's fp32 kernel: 7e-7; the tensor cores' fp32 accumulation over the long sums
          sets it), the SDXL decode's error against eager unchanged (1.9e-3 either way),
          the decoder's attention 14.1 -> ~7.5 ms at 1024 px. For S = q k^T the three
          products are one GEMM over the concatenated [hi_q, hi_q, lo_q] . [hi_k, lo_k, hi_k];
          for O = P v, P hi times [hi_v, lo_v] side by side plus P lo times hi_v.
  tf32    one TF32 GEMM each (inputs rounded to 10 mantissa bits, as torch's
          allow_tf32 matmuls and the convolutions' default): ~2.7 ms at 1024 px, errors of
          TF32's rounding (under 5e-3 relative in the GPU tests).
  sdpa    torch's SDPA as before (exact fp32 on the CUDA cores).

Queries go in chunks so that a chunk's score matrix stays under _CHUNK_ELEMENTS floats.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
from torch import Tensor

_CHUNK_ELEMENTS = 1 << 25  # 128 MiB of fp32 scores per chunk (x3 with the softmax and the split)
_MIN_MACS = 1 << 30  # smaller attentions stay on SDPA (not worth the extra launches)
_TF32_HI_MASK = -8192  # 0xFFFFE000: sign, exponent and the 10 mantissa bits TF32 keeps


def wanted(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor], is_causal: bool, layout: str,
           mode: str) -> bool:
    """Whether this attention call takes the TF32 path: fp32 CUDA tensors, no mask, not causal,
    a mode other than sdpa, and at least _MIN_MACS multiply-adds."""
    if mode == "sdpa" or q.dtype != torch.float32 or k.dtype != q.dtype or v.dtype != q.dtype:
        return False
    if attn_mask is not None or is_causal or not q.is_cuda:
        return False
    from .attention import _to_bhld

    b, h, lq, d = _to_bhld(q, layout).shape
    return b * h * lq * _to_bhld(k, layout).shape[2] * (d + v.shape[3]) >= _MIN_MACS


@contextlib.contextmanager
def _tf32_matmuls() -> Iterator[None]:
    """cuBLAS fp32 matmuls on the TF32 tensor cores inside, the caller's setting restored after
    (through the API torch offers: fp32_precision since 2.9; reading it back and writing the
    old value keeps a legacy allow_tf32 setting readable)."""
    m = torch.backends.cuda.matmul
    if hasattr(m, "fp32_precision"):
        prev = m.fp32_precision
        m.fp32_precision = "tf32"
        try:
            yield
        finally:
            m.fp32_precision = prev
    else:  # pragma: no cover - torch < 2.9
        prev = m.allow_tf32
        m.allow_tf32 = True
        try:
            yield
        finally:
            m.allow_tf32 = prev


def tf32_hi(x: Tensor) -> Tensor:
    """x with the 13 low mantissa bits cleared: exactly representable in TF32."""
    return (x.view(torch.int32) & _TF32_HI_MASK).view(torch.float32)


def attention_tf32(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float], layout: str, mode: str) -> Tensor:
    """softmax(q k^T * scale) v for fp32 q, k, v in `layout` ("bhld" or "blhd"); the output in
    the same layout, contiguous (as attention_reference). `mode` is "tf32x3" or "tf32"."""
    from .attention import _from_bhld, _to_bhld

    if mode not in ("tf32x3", "tf32"):
        raise ValueError(f"lyra::attention: fp32 mode {mode!r} is not tf32x3 or tf32")
    qb, kb, vb = (_to_bhld(t, layout) for t in (q, k, v))
    b, h, lq, d = qb.shape
    lk, dv = kb.shape[2], vb.shape[3]
    s = scale if scale is not None else d ** -0.5
    q3 = (qb * s).reshape(b * h, lq, d)  # the scale before the split: one rounding, in fp32
    k3, v3 = kb.reshape(b * h, lk, d), vb.reshape(b * h, lk, dv)
    out = torch.empty((b * h, lq, dv), dtype=q.dtype, device=q.device)
    exact = mode == "tf32x3"
    if exact:
        k_hi, v_hi = tf32_hi(k3), tf32_hi(v3)
        k_cat = torch.cat([k_hi, k3 - k_hi, k_hi], dim=-1)  # (bh, lk, 3d)
        v_cat = torch.cat([v_hi, v3 - v_hi], dim=-1)  # (bh, lk, 2dv)
    rows = max(1, _CHUNK_ELEMENTS // max(1, b * h * lk))
    with _tf32_matmuls():
        for start in range(0, lq, rows):
            qc = q3[:, start:start + rows]
            if exact:
                q_hi = tf32_hi(qc)
                scores = torch.bmm(torch.cat([q_hi, q_hi, qc - q_hi], dim=-1), k_cat.transpose(1, 2))
            else:
                scores = torch.bmm(qc, k3.transpose(1, 2))
            p = torch.softmax(scores, dim=-1)
            del scores
            if exact:
                p_hi = tf32_hi(p)
                p_lo = p.sub_(p_hi)
                o2 = torch.bmm(p_hi, v_cat)  # [p_hi v_hi, p_hi v_lo]
                oc = o2[..., :dv].add_(o2[..., dv:]).add_(torch.bmm(p_lo, v_hi))
                out[:, start:start + rows] = oc
            else:
                out[:, start:start + rows] = torch.bmm(p, v3)
    return _from_bhld(out.view(b, h, lq, dv), layout)
