"""csrc/gemm_fp8_res.cu (CUTLASS sm90, fp8 e4m3 operands) and its use by lyra::qlinear_q: out =
a_scale[m] b_scale[n] (a @ w^T) + bias + residual in one GEMM, against a float64 reference of the
same quantised operands and against cuBLASLt's residual-through-C path on fresh random inputs,
odd row counts, with and without bias, both tile variants; the auto choice, in-place output,
CUDA-graph capture, and the errors for operands the kernel cannot take."""
import logging

import pytest
import torch

import lyradynamo
from kernel_helpers import (CODE, capture_after_warmup, check_w8a8_decision, check_w8a8_refusals, need_cutlass,
                            norm_err, stream, w8a8_operands, w8a8_reference)
from lyradynamo.ops import gated_gemm

pytestmark = [pytest.mark.cuda, pytest.mark.usefixtures("no_fallback")]
lyra = torch.ops.lyra
DT = [torch.float16, torch.bfloat16]
SDXL_SHAPES = [(2048, 1280, 1280), (2048, 1280, 5120), (8192, 640, 640)]  # to_out, ff2, level-1 to_out


def _operands(m, n, k, dtype, bias):
    return w8a8_operands(m, n, k, dtype, bias, "fp8")


def _kernel(C, xq, xs, wq, ws, b, r, out, variant):
    m, k = xq.shape
    n = wq.shape[0]
    C.gemm_fp8_res(xq.data_ptr(), wq.data_ptr(), xs.data_ptr(), ws.data_ptr(), 0 if b is None else b.data_ptr(),
                   r.data_ptr(), out.data_ptr(), m, n, k, k, k, CODE[out.dtype], variant, stream())
    return out


def _cublaslt(C, xq, xs, wq, ws, b, r, out):
    m, k = xq.shape
    n = wq.shape[0]
    C.gemm_fp8_ex(xq.data_ptr(), wq.data_ptr(), xs.data_ptr(), ws.data_ptr(), 0 if b is None else b.data_ptr(),
                  r.data_ptr(), out.data_ptr(), m, n, k, k, n, CODE[out.dtype], True, stream())
    return out


@pytest.mark.parametrize("dtype", DT)
@pytest.mark.parametrize("m,n,k", SDXL_SHAPES + [(333, 136, 80), (3, 128, 32), (77, 2560, 2048)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("variant", [0, 2], ids=["cooperative", "pingpong"])
def test_kernel_against_reference(dtype, m, n, k, bias, variant, seed_from_test_id):
    C = need_cutlass()
    ops = _operands(m, n, k, dtype, bias)
    out = torch.full((m, n), float("nan"), device="cuda", dtype=dtype)
    _kernel(C, *ops, out, variant)
    lt = _cublaslt(C, *ops, torch.empty_like(out))
    torch.cuda.synchronize()
    ref = w8a8_reference(*ops)
    assert torch.isfinite(out).all()
    # one rounding to dtype after fast fp8 accumulation, as cuBLASLt's path: at most twice as
    # far as it from the float64 sum
    assert norm_err(out, ref) <= 2 * norm_err(lt, ref) + 1e-4, (norm_err(out, ref), norm_err(lt, ref))


@pytest.mark.parametrize("variant", [0, 2], ids=["cooperative", "pingpong"])
def test_in_place_and_capture(variant, seed_from_test_id):
    """out may be the residual itself; the launch goes to the current stream (captured graphs
    replay it)."""
    C = need_cutlass()
    ops = _operands(515, 640, 640, torch.float16, True)
    ref = w8a8_reference(*ops)
    r = ops[5].clone()
    _kernel(C, *ops[:5], r, r, variant)
    torch.cuda.synchronize()
    assert norm_err(r, ref) < 2e-3
    graph, out = capture_after_warmup(lambda: _kernel(C, *ops, torch.empty_like(ops[5]), variant))
    out.zero_()
    graph.replay()
    torch.cuda.synchronize()
    assert norm_err(out, ref) < 2e-3


@pytest.mark.parametrize("mode", ["cutlass", "cublaslt", "auto"])
def test_qlinear_paths_agree(mode, fresh_gemm_decisions, seed_from_test_id, caplog):
    """lyra::qlinear_q with a residual through each path; auto records its timed choice, timed
    as CUDA-graph replays (each path launches on the stream current at its call: dispatch
    captures the candidates on a side stream, and a launch to the caller's stream captured
    nothing, so both were timed eagerly in session 16's first run)."""
    need_cutlass()
    m, n, k = 2048 + 5, 1280, 1280
    xq, xs, wq, ws, b, r = _operands(m, n, k, torch.float16, True)
    with lyradynamo.config.patch(gated_gemm=mode, quant_fast_accum=True), \
            caplog.at_level(logging.WARNING, logger="lyradynamo"):
        out = lyra.qlinear_q(xq, xs, wq, ws, b, "none", False, None, r, "fp8", torch.float16)
    torch.cuda.synchronize()
    assert "captured nothing" not in caplog.text
    assert norm_err(out, w8a8_reference(xq, xs, wq, ws, b, r)) < 2e-3
    if mode == "auto":
        key = ("fp8res", torch.cuda.current_device(), torch.float16, m, n, k, True)
        check_w8a8_decision(gated_gemm.choices()[key], m, n, k)


def test_bad_operands_are_refused(seed_from_test_id):
    C = need_cutlass()
    xq, xs, wq, ws, b, r = _operands(64, 128, 64, torch.float16, True)
    check_w8a8_refusals(C, "gemm_fp8_res", xq, xs, wq, ws, b, r, torch.empty_like(r), null="residual")
