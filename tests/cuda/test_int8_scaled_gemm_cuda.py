"""csrc/gemm_int8_scaled.cu (CUTLASS sm90, int8 operands, exact int32 sums) and its use by
lyra::qlinear_q(kind="int8"): out = a_scale[m] b_scale[n] (a @ w^T) + bias (+ residual) in one
GEMM, against a float64 reference of the same quantised operands (exact: the only rounding is
the final one) and against the cuBLASLt int32 + scaled-epilogue path, on fresh random inputs,
odd row counts, with and without bias and residual, both tile variants; activations / GLU / gate
after it; the auto choice, in-place output, CUDA-graph capture, and the errors for operands the
kernel cannot take."""
import logging

import pytest
import torch

import lyradynamo
from kernel_helpers import (CODE, capture_after_warmup, check_w8a8_decision, check_w8a8_refusals, need_cutlass,
                            norm_err, stream, w8a8_operands, w8a8_reference)
from lyradynamo.ops import gated_gemm
from lyradynamo.ops.qlinear import qlinear_q_reference

pytestmark = [pytest.mark.cuda, pytest.mark.usefixtures("no_fallback")]
lyra = torch.ops.lyra
DT = [torch.float16, torch.bfloat16]
SDXL_SHAPES = [(2048, 1280, 1280), (2048, 1280, 5120), (8192, 640, 640), (8192, 5120, 640)]


def _operands(m, n, k, dtype, bias):
    return w8a8_operands(m, n, k, dtype, bias, "int8")


def _kernel(C, xq, xs, wq, ws, b, r, out, variant):
    m, k = xq.shape
    n = wq.shape[0]
    C.gemm_int8_scaled(xq.data_ptr(), wq.data_ptr(), xs.data_ptr(), ws.data_ptr(),
                       0 if b is None else b.data_ptr(), 0 if r is None else r.data_ptr(), out.data_ptr(),
                       m, n, k, k, k, CODE[out.dtype], variant, stream())
    return out


@pytest.mark.parametrize("dtype", DT)
@pytest.mark.parametrize("m,n,k", SDXL_SHAPES + [(333, 136, 80), (3, 128, 32), (77, 2560, 2048)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("variant", [0, 2], ids=["cooperative", "pingpong"])
def test_kernel_against_reference(dtype, m, n, k, bias, residual, variant, seed_from_test_id):
    C = need_cutlass()
    xq, xs, wq, ws, b, r = _operands(m, n, k, dtype, bias)
    r = r if residual else None
    out = torch.full((m, n), float("nan"), device="cuda", dtype=dtype)
    _kernel(C, xq, xs, wq, ws, b, r, out, variant)
    torch.cuda.synchronize()
    ref = w8a8_reference(xq, xs, wq, ws, b, r)
    assert torch.isfinite(out).all()
    # exact int32 sums, fp32 scaling, one rounding to dtype: within dtype's half ulp (+ fp32's)
    eps = {torch.float16: 2 ** -11, torch.bfloat16: 2 ** -8}[dtype]
    assert ((out.double() - ref).abs() <= eps * ref.abs() + 1e-5 + 2e-6 * ref.abs().max()).all()


@pytest.mark.parametrize("variant", [0, 2], ids=["cooperative", "pingpong"])
def test_in_place_and_capture(variant, seed_from_test_id):
    """out may be the residual itself; the launch goes to the current stream (captured graphs
    replay it)."""
    C = need_cutlass()
    xq, xs, wq, ws, b, r = _operands(515, 640, 640, torch.float16, True)
    ref = w8a8_reference(xq, xs, wq, ws, b, r)
    r2 = r.clone()
    _kernel(C, xq, xs, wq, ws, b, r2, r2, variant)
    torch.cuda.synchronize()
    assert norm_err(r2, ref) < 1e-3
    graph, out = capture_after_warmup(lambda: _kernel(C, xq, xs, wq, ws, b, None, torch.empty_like(r), variant))
    out.zero_()
    graph.replay()
    torch.cuda.synchronize()
    assert norm_err(out, w8a8_reference(xq, xs, wq, ws, b, None)) < 1e-3


@pytest.mark.parametrize("mode", ["cutlass", "cublaslt", "auto"])
@pytest.mark.parametrize("epi", ["plain", "residual", "gelu_tanh", "geglu", "gate_residual"])
def test_qlinear_paths_agree(mode, epi, fresh_gemm_decisions, seed_from_test_id, caplog):
    """lyra::qlinear_q(kind="int8") through each path against its reference; auto records its
    timed choice, timed as CUDA-graph replays (no "captured nothing" warning)."""
    need_cutlass()
    m, n, k = 2048 + 5, 1280, 1280
    xq, xs, wq, ws, b, r = _operands(m, n, k, torch.float16, True)
    act = "gelu_tanh" if epi in ("gelu_tanh", "geglu") else "none"
    glu = epi == "geglu"
    n_out = n // 2 if glu else n
    gate = torch.randn(n_out, device="cuda", dtype=torch.float16) if epi == "gate_residual" else None
    res = r[:, :n_out].contiguous() if epi in ("residual", "gate_residual") else None
    args = (xq, xs, wq, ws, b, act, glu, gate, res, "int8", torch.float16)
    with lyradynamo.config.patch(gated_gemm=mode), caplog.at_level(logging.WARNING, logger="lyradynamo"):
        out = lyra.qlinear_q(*args)
    torch.cuda.synchronize()
    assert "captured nothing" not in caplog.text
    ref = qlinear_q_reference(*args)
    assert out.shape == ref.shape
    assert norm_err(out, ref) < 2e-3, norm_err(out, ref)
    if mode == "auto":
        key = ("int8", torch.cuda.current_device(), torch.float16, m, n, k, True, act, glu, gate is not None,
               res is not None)
        check_w8a8_decision(gated_gemm.choices()[key], m, n, k)


def test_bad_operands_are_refused(seed_from_test_id):
    C = need_cutlass()
    xq, xs, wq, ws, b, r = _operands(64, 128, 64, torch.float16, True)
    check_w8a8_refusals(C, "gemm_int8_scaled", xq, xs, wq, ws, b, r, torch.empty_like(r), null="out")
