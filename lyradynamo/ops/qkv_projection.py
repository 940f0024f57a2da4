"""lyra::qkv_projection: the q / k / v projections of a FLUX-style attention with the q / k
RMSNorm and RoPE, one GEMM per part, into one (B, L, 3 H D) buffer.

    part i: x_i (B, L_i, K_i), weights[3i:3i+3] = W_q, W_k, W_v (H D, K_i) [+ biases]
    q = rope(cat_i rms_norm(x_i W_q^T + b_q, q_norms[i]))    (B, L, H, D), L = sum L_i
    k = rope(cat_i rms_norm(x_i W_k^T + b_k, k_norms[i]))
    v = cat_i (x_i W_v^T + b_v)
    out = cat([q, k, v] flattened to H D, dim=-1)             (B, L, 3 H D)

Attention reads q, k and v as column slices of `out` (views). The parts are the text and
image tokens of a joint attention (FLUX's double blocks), or one part (its single blocks).

On CUDA each part's GEMM writes its rows of `out`, so v needs no cat copy; then either
- cublaslt: a cuBLASLt GEMM per part, then the norm and RoPE of q and k in place, one pass
  per part (csrc/qkv_quant.cu without v), or
- cutlass (Hopper, a build with the CUTLASS headers, head dim 128): one CUTLASS GEMM per part
  whose epilogue does the norm and the RoPE while the tile is in registers
  (csrc/gemm_qk_norm_rope.cu): no pass over q and k at all;
config.gated_gemm picks (auto: both timed as CUDA graphs on a shape's first call). The weights
of a part must be adjacent rows of one buffer (passes/shared_input.py makes them so); otherwise
the op runs lyra::linear_group + lyra::qk_norm_rope3 + a cat, logged as a fallback.

The reference is the eager op order (F.linear per weight, lyra::qk_norm_rope's reference), so on
the CPU the rewritten graph stays bit-identical to the graph it replaced.
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import gated_gemm
from ._common import DTYPE_CODES, csrc, ptr, record_fallback, stream_handle
from .linear_group import _joined_operands
from .rope import cuda_unsupported
from .rope import fused_unsupported as pass_unsupported
from .rope import launch_fused, qk_norm_rope_reference

HEAD_DIM = 128  # the only head size the fused epilogue is built for


def _parts(xs: List[Tensor], weights: List[Tensor], biases: List[Tensor]) -> list:
    """[(x, (W_q, W_k, W_v), (b_q, b_k, b_v) or Nones)] per part."""
    nb = [None] * 3
    return [(x, weights[3 * i:3 * i + 3], biases[3 * i:3 * i + 3] if biases else nb) for i, x in enumerate(xs)]


def _check(xs, weights, biases, q_norms, k_norms, heads) -> int:
    """The head dim; ValueError naming the rule the arguments break."""
    n = len(xs)
    if n == 0:
        raise ValueError("lyra::qkv_projection: xs is empty")
    if len(weights) != 3 * n or (biases and len(biases) != 3 * n):
        raise ValueError(f"lyra::qkv_projection: {len(weights)} weights and {len(biases)} biases for {n} "
                         "parts: need 3 weights (q, k, v) per part and 3 biases per part or none")
    if len(q_norms) != n or len(k_norms) != n:
        raise ValueError("lyra::qkv_projection: one q and one k RMSNorm weight per part")
    width = weights[0].shape[0]
    if heads <= 0 or width % heads:
        raise ValueError(f"lyra::qkv_projection: heads={heads} does not divide the projection width {width}")
    d = width // heads
    b = xs[0].shape[0]
    for x, ws, _ in _parts(xs, weights, biases):
        if x.dim() != 3 or x.shape[0] != b:
            raise ValueError(f"lyra::qkv_projection: every x must be (B, L_i, K) with one B, got {tuple(x.shape)}")
        if any(tuple(w.shape) != (width, x.shape[-1]) for w in ws):
            raise ValueError(f"lyra::qkv_projection: weights must be ({width}, {x.shape[-1]}), got "
                             f"{[tuple(w.shape) for w in ws]}")
    if any(tuple(w.shape) != (d,) for w in (*q_norms, *k_norms)):
        raise ValueError(f"lyra::qkv_projection: the norm weights must be ({d},)")
    return d


def qkv_projection_reference(xs, weights, biases, q_norms, k_norms, heads, eps, cos, sin) -> Tensor:
    qs, ks, vs = [], [], []
    for x, (wq, wk, wv), (bq, bk, bv) in _parts(xs, weights, biases):
        qs.append(F.linear(x, wq, bq).unflatten(-1, (heads, -1)))
        ks.append(F.linear(x, wk, bk).unflatten(-1, (heads, -1)))
        vs.append(F.linear(x, wv, bv))
    q = qk_norm_rope_reference(qs, list(q_norms), "rms", eps, cos, sin)
    k = qk_norm_rope_reference(ks, list(k_norms), "rms", eps, cos, sin)
    v = torch.cat(vs, dim=1) if len(vs) > 1 else vs[0]
    return torch.cat([q.flatten(2), k.flatten(2), v], dim=-1)


@torch.library.custom_op("lyra::qkv_projection", mutates_args=())
def qkv_projection(xs: List[Tensor], weights: List[Tensor], biases: List[Tensor], q_norms: List[Tensor],
                   k_norms: List[Tensor], heads: int, eps: float, cos: Tensor, sin: Tensor) -> Tensor:
    _check(xs, weights, biases, q_norms, k_norms, heads)
    return qkv_projection_reference(xs, weights, biases, q_norms, k_norms, heads, eps, cos, sin)


@qkv_projection.register_fake
def _(xs, weights, biases, q_norms, k_norms, heads, eps, cos, sin):
    _check(xs, weights, biases, q_norms, k_norms, heads)
    x0 = xs[0]
    return x0.new_empty((x0.shape[0], sum(x.shape[1] for x in xs), 3 * weights[0].shape[0]))


def _joint_unsupported(C, xs, weights, biases) -> Optional[str]:
    """Why the GEMMs cannot write into one joint buffer (both paths need it), or None. The q / k
    norm and RoPE operands are rope.cuda_unsupported's and the pass's (_pass_unsupported)."""
    if C is None:
        return "csrc not built"
    x0 = xs[0]
    if x0.dtype not in (torch.float16, torch.bfloat16):
        return f"dtype {x0.dtype}"
    for t in (*xs, *weights, *biases):
        if t.dtype != x0.dtype or not t.is_contiguous() or t.data_ptr() % 16:
            return "an operand is not a contiguous, 16-byte aligned tensor of x's dtype"
    if any(x.shape[-1] % 8 for x in xs):
        return "K is not a multiple of 8"
    return None


def _pass_unsupported(C, q_parts, k_parts, q_norms, k_norms, cos, sin) -> Optional[str]:
    """Why the q / k norm + RoPE (in place over the joint buffer's q / k columns, or in the
    epilogue: the same operands) cannot run, or None."""
    return (cuda_unsupported(q_parts, list(q_norms), "rms", cos, sin)
            or cuda_unsupported(k_parts, list(k_norms), "rms", cos, sin)
            or pass_unsupported(C, q_parts, k_parts, [], q_norms, k_norms, cos, sin))


def _epilogue_unsupported(C, x0: Tensor, d: int) -> Optional[str]:
    """Why csrc gemm_qk_norm_rope (the norm and RoPE in the GEMM's epilogue) cannot run, or None."""
    if getattr(C, "gemm_qk_norm_rope", None) is None or not C.gemm_gated_available():
        return "the library was built without the CUTLASS kernels"
    if torch.cuda.get_device_capability(x0.device)[0] != 9:
        return "not an SM90 GPU"
    if d != HEAD_DIM:
        return f"head dim {d} (the epilogue is built for {HEAD_DIM})"
    return None


@qkv_projection.register_kernel("cuda")
def _(xs, weights, biases, q_norms, k_norms, heads, eps, cos, sin):
    from lyradynamo import config

    d = _check(xs, weights, biases, q_norms, k_norms, heads)
    C = csrc()
    reason = _joint_unsupported(C, xs, weights, biases)
    joints = []  # per part: the q / k / v weights (and biases) as one matrix
    for _, ws, bs in [] if reason else _parts(xs, weights, biases):
        ops, reason = _joined_operands(list(ws), [b for b in bs if b is not None])
        if reason:
            break
        joints.append(ops)
    if reason:
        return _unfused(xs, weights, biases, q_norms, k_norms, heads, eps, cos, sin, reason)
    b, width = xs[0].shape[0], 3 * weights[0].shape[0]
    code = DTYPE_CODES[xs[0].dtype]
    lengths = [x.shape[1] for x in xs]
    out = xs[0].new_empty((b, sum(lengths), width))
    q, k = (out.narrow(-1, i * width // 3, width // 3).unflatten(-1, (heads, d)) for i in range(2))
    q_parts, k_parts = list(q.split(lengths, dim=1)), list(k.split(lengths, dim=1))
    reason = _pass_unsupported(C, q_parts, k_parts, q_norms, k_norms, cos, sin)
    if reason:
        return _unfused(xs, weights, biases, q_norms, k_norms, heads, eps, cos, sin, reason)

    def epilogue() -> Tensor:
        """One CUTLASS GEMM per part, the norm and RoPE in its epilogue."""
        stream, offset = stream_handle(out), 0  # the stream at call time (auto captures on a side one)
        for x, q_norm, k_norm, (w, bias, _) in zip(xs, q_norms, k_norms, joints):
            rows, kdim = x.shape[1], x.shape[2]
            if rows and b:
                C.gemm_qk_norm_rope(ptr(x), ptr(w), ptr(bias), ptr(out[:, offset]), ptr(q_norm), ptr(k_norm),
                                    ptr(cos), ptr(sin), rows, b, width, kdim, kdim, w.stride(0), out.stride(0),
                                    heads, d, offset, cos.shape[0], float(eps), code, stream)
            offset += rows
        return out

    def gemm_then_pass() -> Tensor:
        """cuBLASLt GEMMs into each part's rows, then the norm and RoPE in place, one pass per
        part (csrc qkv_quant, lyra::qk_norm_rope3's kernel, without v)."""
        stream, offset = stream_handle(out), 0
        for x, (w, bias, _) in zip(xs, joints):
            rows, kdim = x.shape[1], x.shape[2]
            for s in range(b if rows else 0):
                C.gemm(ptr(x[s]), ptr(w), ptr(bias), ptr(out[s, offset]), rows, width, kdim, kdim, width, code,
                       stream)
            offset += rows
        launch_fused(C, q_parts, k_parts, [], list(q_norms), list(k_norms), "rms", eps, cos, sin, 0, (q, k))
        return out

    why_not = _epilogue_unsupported(C, out, d)
    mode = "cublaslt" if why_not else config.gated_gemm
    if mode == "cublaslt":
        return gemm_then_pass()
    key = ("qkv", out.device.index, out.dtype, "+".join(map(str, lengths)), width,
           tuple(x.shape[2] for x in xs), b, bool(biases))
    return gated_gemm.dispatch(mode, key, {"cutlass": epilogue, "cublaslt": gemm_then_pass})


def _unfused(xs, weights, biases, q_norms, k_norms, heads, eps, cos, sin, reason: str) -> Tensor:
    """lyra::linear_group's GEMMs, lyra::qk_norm_rope3 and a cat: what passes/qkv_projection.py
    replaced, for calls the joint-buffer paths cannot take (logged as a fallback)."""
    record_fallback("qkv_projection", reason + "; GEMM per part + lyra::qk_norm_rope3")
    qs, ks, vs = [], [], []
    for x, ws, bs in _parts(xs, weights, biases):
        y = torch.ops.lyra.linear_group(x, list(ws), [b for b in bs if b is not None], "none")
        q, k, v = y.split(weights[0].shape[0], dim=-1)
        qs.append(q.unflatten(-1, (heads, -1)))
        ks.append(k.unflatten(-1, (heads, -1)))
        vs.append(v.unflatten(-1, (heads, -1)))
    q, k, v = torch.ops.lyra.qk_norm_rope3(qs, ks, vs, list(q_norms), list(k_norms), "rms", eps, cos, sin)
    return torch.cat([q.flatten(2), k.flatten(2), v.flatten(2)], dim=-1)
