"""lyra::qlinear: lyra::linear with W8A8 weights and activations (config.quant fp8 / int8).

    xq, xs = quantize_rows(x * inv_smooth)                 per token (row) of x    # (M, K)
    y = (xq @ wq^T) * xs[m] * ws[n] (+ bias)                per-channel weight scales
    out = residual + gate * act(y)  (or GLU), as lyra::linear, in x's dtype

qweight (N, K) fp8 e4m3 / int8 and wscale (N,) float32 are derived from the model's weight
when the graph is prepared (quant/weights.py); the math of every step is
quant/numerics.py, which is also the CPU implementation. On CUDA: one quantize_rows pass,
then fp8: a cuBLASLt GEMM applying both scale vectors (+ bias) in its epilogue, followed by
the act/gate/residual epilogue kernel when there is one; int8 (or fp8 where cuBLASLt lacks
outer-vector scales): an int32/fp32 GEMM and one scaled epilogue kernel doing all the rest.
"""
from __future__ import annotations

import logging
from typing import Callable, Optional

import torch
from torch import Tensor

from ..quant import numerics
from ._common import DTYPE_CODES, csrc, ptr, record_fallback, stream_handle, unsupported_reason
from .gated_gemm import _aligned
from .linear import (_ACT_CODES, ACTIVATIONS, _out_dtype, epilogue_args, epilogue_cuda,
                     epilogue_reference, epilogue_unsupported)

log = logging.getLogger("lyradynamo")
_ACC_F32, _ACC_I32 = 0, 3
_outer_vec_ok: dict[tuple, bool] = {}


def qlinear_reference(x: Tensor, qweight: Tensor, wscale: Tensor, bias: Optional[Tensor], act: str,
                      glu: bool, gate: Optional[Tensor], residual: Optional[Tensor], kind: str,
                      inv_smooth: Optional[Tensor]) -> Tensor:
    xq, xs = numerics.quantize_rows(x, kind, inv_smooth)
    y = numerics.quantized_linear_reference(xq, xs, qweight, wscale, bias, x.dtype)
    return epilogue_reference(y, act, glu, gate, residual)


def _check(x: Tensor, qweight: Tensor, wscale: Tensor, act: str, glu: bool, kind: str) -> None:
    numerics.check_kind(kind)
    if act not in ACTIVATIONS:
        raise ValueError(f"lyra::qlinear: act={act!r} is not one of {ACTIVATIONS}")
    if qweight.dim() != 2 or qweight.dtype != numerics.QDTYPE[kind]:
        raise ValueError(f"lyra::qlinear: qweight must be a 2-D {numerics.QDTYPE[kind]} tensor, got "
                         f"{tuple(qweight.shape)} {qweight.dtype}")
    if tuple(wscale.shape) != (qweight.shape[0],) or wscale.dtype != torch.float32:
        raise ValueError(f"lyra::qlinear: wscale must be float32 ({qweight.shape[0]},), got "
                         f"{tuple(wscale.shape)} {wscale.dtype}")
    if glu and qweight.shape[0] % 2:
        raise ValueError(f"lyra::qlinear: glu needs an even number of weight rows, got {qweight.shape[0]}")


@torch.library.custom_op("lyra::qlinear", mutates_args=())
def qlinear(x: Tensor, qweight: Tensor, wscale: Tensor, bias: Optional[Tensor], act: str, glu: bool,
            gate: Optional[Tensor], residual: Optional[Tensor], kind: str,
            inv_smooth: Optional[Tensor]) -> Tensor:
    _check(x, qweight, wscale, act, glu, kind)
    return qlinear_reference(x, qweight, wscale, bias, act, glu, gate, residual, kind, inv_smooth)


@qlinear.register_fake
def _(x, qweight, wscale, bias, act, glu, gate, residual, kind, inv_smooth):
    _check(x, qweight, wscale, act, glu, kind)
    n = qweight.shape[0] // 2 if glu else qweight.shape[0]
    return x.new_empty((*x.shape[:-1], n), dtype=_out_dtype(x, gate, residual))


def outer_vec_supported(C, device: torch.device, dtype: torch.dtype) -> bool:
    """cuBLASLt FP8 with per-row x per-column scale vectors on this device and dtype (cached)."""
    key = (device.index, dtype)
    if key not in _outer_vec_ok:
        _outer_vec_ok[key] = bool(C.gemm_fp8_supported_outer_vec(device.index or 0, DTYPE_CODES[dtype]))
    return _outer_vec_ok[key]


@qlinear.register_kernel("cuda")
def _(x, qweight, wscale, bias, act, glu, gate, residual, kind, inv_smooth):
    _check(x, qweight, wscale, act, glu, kind)
    C = csrc()
    reason = "csrc not built" if C is None else _cuda_unsupported(x, qweight, wscale, bias, glu, gate,
                                                                    residual, kind, inv_smooth)
    if reason:
        record_fallback("qlinear", reason)
        return qlinear_reference(x, qweight, wscale, bias, act, glu, gate, residual, kind, inv_smooth)
    xq, xs = quantize_cuda(C, x, kind, inv_smooth)
    return qgemm_cuda(C, xq, xs, x.dtype, qweight, wscale, bias, act, glu, gate, residual, kind)


def empty_quantized(x: Tensor, kind: str) -> tuple[Tensor, Tensor]:
    """Uninitialised (q, scale) for x per row: q of x's shape, scale float32 x.shape[:-1]."""
    return (x.new_empty(x.shape, dtype=numerics.QDTYPE[kind]),
            x.new_empty(x.shape[:-1], dtype=torch.float32))


def quantize_cuda(C, x: Tensor, kind: str, inv_smooth: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """(q, scale) of x per row with csrc quantize_rows: q x's shape, scale x.shape[:-1]."""
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1 or (x2.shape[0] > 1 and x2.stride(0) < k):
        x2 = x2.contiguous()
    m = x2.shape[0]
    xq, xs = empty_quantized(x, kind)
    if m:
        C.quantize_rows(ptr(x2), ptr(inv_smooth), ptr(xq), ptr(xs), m, k, x2.stride(0) if m > 1 else k,
                        DTYPE_CODES[x.dtype], numerics.KIND_CODES[kind], stream_handle(x))
    return xq, xs


def qgemm_cuda(C, xq: Tensor, xs: Tensor, out_dtype: torch.dtype, qweight: Tensor, wscale: Tensor,
               bias: Optional[Tensor], act: str, glu: bool, gate: Optional[Tensor],
               residual: Optional[Tensor], kind: str) -> Tensor:
    """The GEMM + epilogue of a quantised linear on a quantised activation (contiguous xq)."""
    k, n_y = xq.shape[-1], qweight.shape[0]
    n_out = n_y // 2 if glu else n_y
    out_shape = (*xq.shape[:-1], n_out)
    m = xq.numel() // max(k, 1)
    if m == 0:
        return torch.empty(out_shape, dtype=out_dtype, device=xq.device)
    code, stream = DTYPE_CODES[out_dtype], stream_handle(xq)
    if xs.data_ptr() % 16:  # a row slice of a scale vector (FP8 attention's output split along L)
        xs = xs.clone()
    if kind == "fp8" and outer_vec_supported(C, xq.device, out_dtype):
        if act == "gelu_tanh" and not glu and gate is None and residual is None:
            y = _fp8_gelu(C, xq, xs, qweight, wscale, bias, out_dtype, m, n_y, k)
            if y is not None:
                return y.view(out_shape)
        if act == "none" and not glu and (gate is not None or residual is not None):
            fused = _fp8_gated_residual(C, xq, xs, out_dtype, qweight, wscale, bias, gate, residual, m, n_y, k)
            if fused is not None:
                return fused.view(out_shape)
        y = torch.empty((m, n_y), dtype=out_dtype, device=xq.device)
        _gemm_fp8(C, xq, xs, qweight, wscale, bias, None, y, m, n_y, k, code, stream)
        return epilogue_cuda(C, y, xq, act, glu, gate, residual).view(out_shape)

    def unscaled() -> Tensor:  # int32 / fp32 sums, then one kernel for scales, bias and the rest
        s = stream_handle(xq)  # read per call: gated_gemm.dispatch times the paths on a side stream
        acc, acc_code = _unscaled_accumulators(C, xq, qweight, m, n_y, k, kind, s)
        rows_per_batch, gstride, res = epilogue_args(xq, m, n_out, gate, residual)
        out = torch.empty((m, n_out), dtype=out_dtype, device=xq.device)
        C.scaled_epilogue(ptr(acc), acc_code, ptr(xs), ptr(wscale), ptr(bias),
                          ptr(gate), ptr(res), ptr(out), m, n_out, _ACT_CODES[act], glu, rows_per_batch,
                          gstride, code, s)
        return out

    if kind == "int8":
        return _int8(C, xq, xs, qweight, wscale, bias, act, glu, gate, residual, out_dtype, m, n_y, k,
                     unscaled).view(out_shape)
    return unscaled().view(out_shape)


def _int8(C, xq, xs, qweight, wscale, bias, act, glu, gate, residual, out_dtype, m, n, k,
          unscaled: Callable[[], Tensor]) -> Tensor:
    """An int8 linear: cuBLASLt's int32 sums + the scaled epilogue kernel (`unscaled`), or one
    CUTLASS sm90 GEMM with the scales, bias and a residual in its epilogue
    (csrc/gemm_int8_scaled.cu: no int32 round trip through memory), any activation / GLU / gate
    then applied by the 16-bit epilogue kernel as in the fp8 path. config.gated_gemm chooses:
    auto times the paths on each shape's first call outside capture (gated_gemm.dispatch)."""
    from .. import config
    from . import gated_gemm

    mode = config.gated_gemm
    plain = act == "none" and not glu and gate is None
    res = None if residual is None or not plain else residual.reshape(m, n)
    if res is not None and not res.is_contiguous():
        res = res.contiguous()
    if mode == "cublaslt" or not _int8_evt_ok(C, xq, xs, qweight, wscale, bias, res, k):
        return unscaled()
    code = DTYPE_CODES[out_dtype]

    def cutlass(variant: int):
        def call() -> Tensor:
            out = torch.empty((m, n), dtype=out_dtype, device=xq.device)
            C.gemm_int8_scaled(ptr(xq), ptr(qweight), ptr(xs), ptr(wscale), ptr(bias), ptr(res), ptr(out),
                               m, n, k, k, k, code, variant, stream_handle(xq))
            return out if plain else epilogue_cuda(C, out, xq, act, glu, gate, residual)
        return call

    key = ("int8", xq.device.index, out_dtype, m, n, k, bias is not None, act, glu, gate is not None,
           residual is not None)
    return gated_gemm.dispatch(mode, key, {"cutlass": cutlass(0), "cutlass-pingpong": cutlass(2),
                                           "cublaslt": unscaled})


def _int8_evt_ok(C, xq, xs, qweight, wscale, bias, res, k) -> bool:
    """Whether csrc/gemm_int8_scaled.cu can run this call: a build with it and the CUTLASS
    headers, an SM90 GPU, 16-byte rows and pointers."""
    return _w8a8_evt_ok(C, "gemm_int8_scaled", xq, qweight, k) and _aligned(xq, xs, qweight, wscale, bias, res)


def _w8a8_evt_ok(C, entry: str, xq: Tensor, qweight: Tensor, k: int) -> bool:
    """What the CUTLASS W8A8 GEMMs (gemm_fp8_res, gemm_int8_scaled) share: a build with `entry`
    and the CUTLASS headers, an SM90 GPU, 16-byte rows of K and N multiple of 8."""
    if getattr(C, entry, None) is None or not C.gemm_gated_available():
        return False
    return torch.cuda.get_device_capability(xq.device)[0] == 9 and k % 16 == 0 and qweight.shape[0] % 8 == 0


def _unscaled_accumulators(C, xq, qweight, m, n, k, kind, stream) -> tuple[Tensor, int]:
    """(xq @ qweight^T as exact int32 sums (int8) or fp32 (fp8 without OUTER_VEC), its acc code):
    the scales, bias and epilogue are applied by the csrc epilogue kernel that follows."""
    if kind == "int8":
        acc = torch.empty((m, n), dtype=torch.int32, device=xq.device)
        C.gemm_int8(ptr(xq), ptr(qweight), ptr(acc), m, n, k, k, stream)
        return acc, _ACC_I32
    acc = torch.empty((m, n), dtype=torch.float32, device=xq.device)
    C.gemm_fp8_unscaled(ptr(xq), ptr(qweight), ptr(acc), m, n, k, k, stream)
    return acc, _ACC_F32


def _gemm_fp8(C, xq, xs, qweight, wscale, bias, residual, out, m, n, k, code, stream, gelu=False) -> None:
    """cuBLASLt fp8 GEMM with outer-vector scales (+ bias, + residual through C, or GELU(tanh)
    in its epilogue); Hopper's fast fp8 accumulation when config.quant_fast_accum (gemm_fp8_ex;
    plain gemm_fp8 in an older build)."""
    from .. import config

    if gelu:
        C.gemm_fp8_ex(ptr(xq), ptr(qweight), ptr(xs), ptr(wscale), ptr(bias), 0, ptr(out),
                      m, n, k, k, n, code, bool(config.quant_fast_accum), stream, 1)
    elif getattr(C, "gemm_fp8_ex", None) is not None:
        C.gemm_fp8_ex(ptr(xq), ptr(qweight), ptr(xs), ptr(wscale), ptr(bias), ptr(residual), ptr(out),
                      m, n, k, k, n, code, bool(config.quant_fast_accum), stream)
    elif residual is None:
        C.gemm_fp8(ptr(xq), ptr(qweight), ptr(xs), ptr(wscale), ptr(bias), ptr(out), m, n, k, k, n, code, stream)
    else:
        raise RuntimeError("this lyradynamo._C has no gemm_fp8_ex (rebuild the CUDA library)")


_FP8_FUSED_FAILED: dict[tuple, str] = {}  # (device, dtype) -> why cuBLASLt refused C + beta
_FP8_GELU_FAILED: dict[tuple, str] = {}  # (device, dtype) -> why cuBLASLt refused its GELU epilogue


def _fp8_gelu(C, xq, xs, qweight, wscale, bias, out_dtype, m, n, k) -> Optional[Tensor]:
    """GELU(tanh)(xq @ qweight^T * xs * wscale + bias) from one fp8 GEMM with cuBLASLt's GELU
    epilogue, (m, n) in out_dtype; None where cuBLASLt refuses it (logged once; the csrc
    epilogue kernel then applies the GELU). The GELU reads the fp32 sum, where the reference
    rounds it to out_dtype first: one rounding fewer, as lyra::linear's cuBLASLt GELU."""
    key = (xq.device.index, out_dtype)
    if key in _FP8_GELU_FAILED or getattr(C, "gemm_fp8_ex", None) is None:
        return None
    y = torch.empty((m, n), dtype=out_dtype, device=xq.device)
    try:
        _gemm_fp8(C, xq.reshape(m, k), xs.reshape(m), qweight, wscale, bias, None, y, m, n, k,
                  DTYPE_CODES[out_dtype], stream_handle(xq), gelu=True)
    except (RuntimeError, TypeError) as exc:  # no such algorithm / an older build without `epi`
        _FP8_GELU_FAILED[key] = str(exc)[:200]
        log.warning("lyradynamo: fp8 GEMM with a GELU epilogue unavailable (%s); the csrc epilogue "
                    "kernel applies the GELU after the GEMM instead", exc)
        return None
    return y


_MAX_GATE_SAMPLES = 16  # more samples with their own gate: one epilogue pass beats that many GEMMs


def _fp8_gated_residual(C, xq, xs, out_dtype, qweight, wscale, bias, gate, residual, m, n, k):
    """residual + gate * (xq @ qweight^T * xs * wscale + bias) inside the fp8 GEMM's epilogue.

    The gate is a per-sample row vector, so it folds into the per-column weight scale and the
    bias: wscale * gate[b], bias * gate[b], one GEMM per sample (a DiT runs batch 1 or 2), and
    the residual comes in through cuBLASLt's C with beta = 1. This replaces a separate pass
    over the output (read y and the residual, write the sum) per gated linear. None when
    cuBLASLt refuses it here (then the GEMM + csrc epilogue kernel run, logged once).
    """
    key = (xq.device.index, out_dtype)
    if key in _FP8_FUSED_FAILED:
        return None
    rows, gstride, res = epilogue_args(xq, m, n, gate, residual)
    out = torch.empty((m, n), dtype=out_dtype, device=xq.device)
    code, stream = DTYPE_CODES[out_dtype], stream_handle(xq)
    xq2, xs2 = xq.reshape(m, k), xs.reshape(m)
    try:
        if gate is None:
            return _fp8_residual(C, xq2, xs2, qweight, wscale, bias, res, out, m, n, k, code)
        rows = m if gstride == 0 else rows  # one gate for every sample: one GEMM
        samples = m // rows
        if samples > _MAX_GATE_SAMPLES:
            return None
        g = gate.as_strided((samples, n), (gstride, 1))
        # One kernel each (these run per gated linear and step): float32 wscale x the gate
        # promotes to float32 exactly as gate.float() would; bias * gate in the model dtype
        # computes the product in float32 and rounds it once, as (bias.float() * g).to() did.
        ws = wscale * g  # (samples, n) float32
        bs = None if bias is None else (bias.to(out_dtype) * g.to(out_dtype))
        for b in range(samples):
            r = slice(b * rows, (b + 1) * rows)
            xs_b = xs2[r] if xs2[r].data_ptr() % 16 == 0 else xs2[r].clone()  # scale vectors: 16-byte aligned
            _gemm_fp8(C, xq2[r], xs_b, qweight, ws[b], None if bs is None else bs[b],
                      None if res is None else res[r], out[r], rows, n, k, code, stream)
    except RuntimeError as exc:
        _FP8_FUSED_FAILED[key] = str(exc)[:200]
        log.warning("lyradynamo: fp8 GEMM with gate/residual in its epilogue unavailable (%s); the csrc "
                    "epilogue kernel runs after the GEMM instead", exc)
        return None
    return out


def _fp8_residual(C, xq, xs, qweight, wscale, bias, res, out, m, n, k, code) -> Tensor:
    """residual + (xq @ qweight^T * xs * wscale + bias) into out: cuBLASLt with the residual
    through C, or one CUTLASS sm90 GEMM with the residual in its TMA epilogue
    (csrc/gemm_fp8_res.cu: cuBLASLt's C cost 3.5-6.6 us more per SDXL call than no residual).
    config.gated_gemm chooses, as for the other fused-epilogue linears: auto times both on each
    shape's first call outside capture (gated_gemm.dispatch), cutlass / cublaslt force one.
    Each path takes the stream at call time: dispatch captures the candidates on a side stream."""
    from .. import config
    from . import gated_gemm

    def cublaslt() -> Tensor:
        _gemm_fp8(C, xq, xs, qweight, wscale, bias, res, out, m, n, k, code, stream_handle(xq))
        return out

    mode = config.gated_gemm
    if mode == "cublaslt" or res is None or not _fp8_res_ok(C, xq, xs, qweight, wscale, bias, res, out, k):
        return cublaslt()

    def cutlass(variant: int):
        def call() -> Tensor:
            C.gemm_fp8_res(ptr(xq), ptr(qweight), ptr(xs), ptr(wscale), ptr(bias), ptr(res), ptr(out),
                           m, n, k, k, k, code, variant, stream_handle(xq))
            return out
        return call

    key = ("fp8res", xq.device.index, out.dtype, m, n, k, bias is not None)
    return gated_gemm.dispatch(mode, key, {"cutlass": cutlass(0), "cutlass-pingpong": cutlass(2),
                                           "cublaslt": cublaslt})


def _fp8_res_ok(C, xq, xs, qweight, wscale, bias, res, out, k) -> bool:
    """Whether csrc/gemm_fp8_res.cu can run this call: a build with it and the CUTLASS headers,
    an SM90 GPU, fast fp8 accumulation on (the kernel's only mode), 16-byte rows and pointers,
    and a contiguous residual."""
    from .. import config

    if not config.quant_fast_accum or not _w8a8_evt_ok(C, "gemm_fp8_res", xq, qweight, k):
        return False
    if not res.is_contiguous() or res.shape != out.shape:
        return False
    return _aligned(xq, xs, qweight, wscale, bias, res, out)


def shape_unsupported(n: int, k: int, kind: str) -> Optional[str]:
    """Why a (N, K) weight cannot take the quantised GEMM (cuBLASLt alignment rules), or None."""
    if kind == "fp8" and k % 16:
        return f"K={k} is not a multiple of 16 (FP8 GEMM)"
    if kind == "int8" and k % 16:
        return f"K={k} is not a multiple of 16 (INT8 GEMM alignment)"
    if n % 8:
        return f"N={n} is not a multiple of 8 (16-byte output rows)"
    return None


def _cuda_unsupported(x, qweight, wscale, bias, glu, gate, residual, kind, inv_smooth) -> Optional[str]:
    reason = unsupported_reason(x=x)
    if reason:
        return reason
    if x.dtype == torch.float32:
        return "float32 activations (the quantised path is for fp16/bf16 models)"
    reason = _operands_unsupported(x.device, kind, qweight=qweight, wscale=wscale, inv_smooth=inv_smooth)
    if reason:
        return reason
    if x.dim() == 0:
        return "0-d input"
    return _epilogue_unsupported(x, qweight, glu, bias, gate, residual)


def _operands_unsupported(device, kind, **tensors) -> Optional[str]:
    """The GEMM operands (qweight among them): contiguous CUDA tensors on `device` (None =
    absent), and a weight shape the quantised GEMM takes."""
    for name, t in tensors.items():
        if t is not None and (not t.is_cuda or t.device != device or not t.is_contiguous()):
            return f"{name} must be a contiguous tensor on {device}"
    return shape_unsupported(tensors["qweight"].shape[0], tensors["qweight"].shape[1], kind)


def _epilogue_unsupported(like, qweight, glu, bias, gate, residual) -> Optional[str]:
    return epilogue_unsupported(like, qweight.shape[0] // 2 if glu else qweight.shape[0], bias, gate, residual)


# ---- lyra::qlinear_q: the same on an activation quantised by its producer -------------------


def qlinear_q_reference(xq: Tensor, xscale: Tensor, qweight: Tensor, wscale: Tensor, bias: Optional[Tensor],
                        act: str, glu: bool, gate: Optional[Tensor], residual: Optional[Tensor], kind: str,
                        out_dtype: torch.dtype) -> Tensor:
    y = numerics.quantized_linear_reference(xq, xscale, qweight, wscale, bias, out_dtype)
    return epilogue_reference(y, act, glu, gate, residual)


@torch.library.custom_op("lyra::qlinear_q", mutates_args=())
def qlinear_q(xq: Tensor, xscale: Tensor, qweight: Tensor, wscale: Tensor, bias: Optional[Tensor], act: str,
              glu: bool, gate: Optional[Tensor], residual: Optional[Tensor], kind: str,
              out_dtype: torch.dtype) -> Tensor:
    """lyra::qlinear whose x arrives quantised (xq, xscale) from lyra::quantize / adaln_quant:
    several linears reading one activation share one quantisation (or none, when the norm
    producing it quantises)."""
    _check(xq, qweight, wscale, act, glu, kind)
    return qlinear_q_reference(xq, xscale, qweight, wscale, bias, act, glu, gate, residual, kind, out_dtype)


@qlinear_q.register_fake
def _(xq, xscale, qweight, wscale, bias, act, glu, gate, residual, kind, out_dtype):
    _check(xq, qweight, wscale, act, glu, kind)
    n = qweight.shape[0] // 2 if glu else qweight.shape[0]
    dtype = out_dtype
    for t in (gate, residual):
        if t is not None:
            dtype = torch.promote_types(dtype, t.dtype)
    return xq.new_empty((*xq.shape[:-1], n), dtype=dtype)


@qlinear_q.register_kernel("cuda")
def qlinear_q_cuda(xq, xscale, qweight, wscale, bias, act, glu, gate, residual, kind, out_dtype):
    _check(xq, qweight, wscale, act, glu, kind)
    C = csrc()
    reason = "csrc not built" if C is None else _q_unsupported(xq, xscale, qweight, wscale, bias, glu, gate,
                                                                 residual, kind, out_dtype)
    if reason:
        record_fallback("qlinear_q", reason)
        return qlinear_q_reference(xq, xscale, qweight, wscale, bias, act, glu, gate, residual, kind, out_dtype)
    return qgemm_cuda(C, xq, xscale, out_dtype, qweight, wscale, bias, act, glu, gate, residual, kind)


def _q_unsupported(xq, xscale, qweight, wscale, bias, glu, gate, residual, kind, out_dtype) -> Optional[str]:
    if out_dtype not in (torch.float16, torch.bfloat16):
        return f"output dtype {out_dtype} (the quantised path is for fp16/bf16 models)"
    if xq.dim() == 0 or not (xq.is_contiguous() and xscale.is_contiguous()):
        return "quantised activation is 0-d or not contiguous"
    reason = _operands_unsupported(xq.device, kind, xq=xq, xscale=xscale, qweight=qweight, wscale=wscale)
    if reason:
        return reason
    like = torch.empty(xq.shape, dtype=out_dtype, device="meta")  # shape/dtype stand-in for x
    return _epilogue_unsupported(like, qweight, glu, bias, gate, residual)


# ---- lyra::qlinear_q_qout: a quantised linear whose output is quantised for its readers --------


def qlinear_q_qout_reference(xq: Tensor, xscale: Tensor, qweight: Tensor, wscale: Tensor,
                             bias: Optional[Tensor], act: str, glu: bool, kind: str,
                             out_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    y = qlinear_q_reference(xq, xscale, qweight, wscale, bias, act, glu, None, None, kind, out_dtype)
    return numerics.quantize_rows(y, kind)


@torch.library.custom_op("lyra::qlinear_q_qout", mutates_args=())
def qlinear_q_qout(xq: Tensor, xscale: Tensor, qweight: Tensor, wscale: Tensor, bias: Optional[Tensor],
                   act: str, glu: bool, kind: str, out_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """lyra::qlinear_q whose activated output (act / GLU, rounded to out_dtype) is handed to
    quantised linears only: it leaves quantised per row (q, scale), the quantisation done by
    the epilogue kernel that applies the activation (no separate pass over the output)."""
    _check(xq, qweight, wscale, act, glu, kind)
    return qlinear_q_qout_reference(xq, xscale, qweight, wscale, bias, act, glu, kind, out_dtype)


@qlinear_q_qout.register_fake
def _(xq, xscale, qweight, wscale, bias, act, glu, kind, out_dtype):
    _check(xq, qweight, wscale, act, glu, kind)
    n = qweight.shape[0] // 2 if glu else qweight.shape[0]
    return (xq.new_empty((*xq.shape[:-1], n), dtype=numerics.QDTYPE[kind]),
            xq.new_empty(xq.shape[:-1], dtype=torch.float32))


@qlinear_q_qout.register_kernel("cuda")
def _(xq, xscale, qweight, wscale, bias, act, glu, kind, out_dtype):
    _check(xq, qweight, wscale, act, glu, kind)
    C = csrc()
    reason = "csrc not built" if C is None else _q_unsupported(xq, xscale, qweight, wscale, bias, glu, None,
                                                                 None, kind, out_dtype)
    if reason is None and getattr(C, "linear_epilogue_quant", None) is None:
        reason = "this lyradynamo._C has no linear_epilogue_quant"
    if reason:
        record_fallback("qlinear_q_qout", reason)
        return qlinear_q_qout_reference(xq, xscale, qweight, wscale, bias, act, glu, kind, out_dtype)
    k, n_y = xq.shape[-1], qweight.shape[0]
    n_out = n_y // 2 if glu else n_y
    m = xq.numel() // max(k, 1)
    outer_vec = kind == "fp8" and outer_vec_supported(C, xq.device, out_dtype)
    if m and outer_vec and act == "gelu_tanh" and not glu:
        # GELU in the GEMM's epilogue; the pass after it only quantises (FLUX's MLP: the GELU
        # made the quantising epilogue kernel instruction-bound, 148 us at 4608 x 12288)
        y = _fp8_gelu(C, xq, xscale, qweight, wscale, bias, out_dtype, m, n_y, k)
        if y is not None:
            yq, ys = quantize_cuda(C, y, kind, None)
            return yq.view(*xq.shape[:-1], n_out), ys.view(xq.shape[:-1])
    q = xq.new_empty((*xq.shape[:-1], n_out), dtype=numerics.QDTYPE[kind])
    scale = xq.new_empty(xq.shape[:-1], dtype=torch.float32)
    if m == 0:
        return q, scale
    code, stream = DTYPE_CODES[out_dtype], stream_handle(xq)
    xs = xscale.reshape(m)
    if outer_vec:
        # GEMM with both scales and the bias in cuBLASLt's epilogue -> y (out_dtype); one more
        # pass applies act / GLU and quantises (was: act in place, then a quantise pass)
        y = torch.empty((m, n_y), dtype=out_dtype, device=xq.device)
        _gemm_fp8(C, xq, xs, qweight, wscale, bias, None, y, m, n_y, k, code, stream)
        acc, acc_code, a_s, b_s, b = y, code, None, None, None
    else:
        # int32 / fp32 accumulators: scales, bias, act and the quantisation in one pass
        acc, acc_code = _unscaled_accumulators(C, xq, qweight, m, n_y, k, kind, stream)
        a_s, b_s, b = xs, wscale, bias
    C.linear_epilogue_quant(ptr(acc), acc_code, ptr(a_s), ptr(b_s), ptr(b), 0, 0, 0, ptr(q), ptr(scale), m, n_out,
                            _ACT_CODES[act], glu, max(m, 1), 0, code, numerics.KIND_CODES[kind], stream)
    return q, scale
