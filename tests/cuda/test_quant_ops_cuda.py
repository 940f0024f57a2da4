"""lyra::quantize / adaln_quant / qlinear_q on CUDA: csrc kernels (no fallback) against the
reference: quantised bytes exact where the math is the same (quantize), the dequantised
product within fp32 rounding (qlinear_q)."""
import pytest
import torch

import lyradynamo  # noqa: F401
from lyradynamo.quant import numerics

pytestmark = [pytest.mark.cuda, pytest.mark.usefixtures("no_fallback")]  # no PyTorch-reference fallback
lyra = torch.ops.lyra
DT = [torch.float16, torch.bfloat16]


def _bytes(q):
    return q.view(torch.int8)


@pytest.mark.parametrize("dtype", DT)
@pytest.mark.parametrize("kind", ["fp8", "int8"])
@pytest.mark.parametrize("shape", [(1, 77, 3072), (2, 4096 + 3, 64), (3, 5, 1000)])
def test_quantize_exact(dtype, kind, shape):
    x = (torch.randn(*shape, device="cuda") * 3).to(dtype)
    q, s = lyra.quantize(x, kind, None)
    rq, rs = numerics.quantize_rows(x, kind)
    assert q.shape == x.shape and s.shape == x.shape[:-1]
    assert torch.equal(_bytes(q), _bytes(rq))
    torch.testing.assert_close(s, rs, rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", DT)
@pytest.mark.parametrize("kind", ["fp8", "int8"])
@pytest.mark.parametrize("norm", ["layer", "rms"])
@pytest.mark.parametrize("shape", [(2, 4096, 3072), (3, 5, 40), (2, 7, 37)])
@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_adaln_quant_matches_adaln_then_quantize(dtype, kind, norm, shape, offset):
    b, _, d = shape
    x = (torch.randn(*shape, device="cuda") * 2 + 0.3).to(dtype)
    w = (1 + 0.1 * torch.randn(d, device="cuda")).to(dtype) if norm == "rms" else None
    mul = (1 - offset + 0.1 * torch.randn(b, 1, d, device="cuda")).to(dtype)  # the factor is offset + mul
    add = torch.randn(b, 1, d, device="cuda").to(dtype)
    q, s = lyra.adaln_quant(x, w, None, mul, add, norm, 1e-6, kind, offset)
    # the kernel quantises exactly what lyra::adaln's kernel computes, rounded to the dtype
    y = lyra.adaln(x, w, None, mul, add, norm, 1e-6, offset)
    rq, rs = numerics.quantize_rows(y, kind)
    assert torch.equal(_bytes(q), _bytes(rq))
    torch.testing.assert_close(s, rs, rtol=1e-6, atol=0)
    if offset:  # and that is eager's `1 + scale`, rounded to the dtype before the product
        eager_q, _ = lyra.adaln_quant(x, w, None, offset + mul, add, norm, 1e-6, kind)
        assert torch.equal(_bytes(q), _bytes(eager_q))


@pytest.mark.parametrize("dtype", DT)
@pytest.mark.parametrize("kind", ["fp8", "int8"])
@pytest.mark.parametrize("act,gate,res", [("none", False, False), ("gelu_tanh", False, False),
                                          ("none", True, True)])
def test_qlinear_q_against_reference(dtype, kind, act, gate, res):
    m_rows, k, n = 333, 3072, 1024
    x = torch.randn(1, m_rows, k, device="cuda").to(dtype)
    w = torch.randn(n, k, device="cuda") / k ** 0.5
    wq, ws = numerics.quantize_rows(w, kind)
    b = torch.randn(n, device="cuda").to(dtype)
    g = torch.randn(1, 1, n, device="cuda").to(dtype) if gate else None
    r = torch.randn(1, m_rows, n, device="cuda").to(dtype) if res else None
    q, s = lyra.quantize(x, kind, None)
    out = lyra.qlinear_q(q, s, wq, ws, b, act, False, g, r, kind, dtype)
    from lyradynamo.ops.qlinear import qlinear_q_reference

    f32 = [t.float() if t is not None else None for t in (b, g, r)]
    expect = qlinear_q_reference(q, s, wq, ws, f32[0], act, False, f32[1], f32[2], kind, torch.float32)
    assert out.dtype == dtype and torch.isfinite(out).all()
    rel = float((out.double() - expect.double()).norm() / expect.double().norm())
    assert rel < 1e-2, rel


@pytest.mark.parametrize("dtype", DT)
def test_fp8_gelu_runs_in_the_gemm_epilogue(dtype):
    """On Hopper, fp8 linears with GELU(tanh) (FLUX's MLP) take cuBLASLt's GELU epilogue: no
    separate activation pass; a refusal would be logged and recorded, and fails here."""
    from lyradynamo.ops import qlinear as ql

    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("fp8 GEMMs need sm89+; the outer-vector scales sm90")
    m_rows, k, n = 129, 256, 512
    x = torch.randn(m_rows, k, device="cuda").to(dtype)
    wq, ws = numerics.quantize_rows(torch.randn(n, k, device="cuda") / k ** 0.5, "fp8")
    b = torch.randn(n, device="cuda").to(dtype)
    q, s = lyra.quantize(x, "fp8", None)
    out = lyra.qlinear_q(q, s, wq, ws, b, "gelu_tanh", False, None, None, "fp8", dtype)
    oq, osc = lyra.qlinear_q_qout(q, s, wq, ws, b, "gelu_tanh", False, "fp8", dtype)
    assert (torch.cuda.current_device(), dtype) not in ql._FP8_GELU_FAILED, ql._FP8_GELU_FAILED
    ref = ql.qlinear_q_reference(q, s, wq, ws, b, "gelu_tanh", False, None, None, "fp8", dtype)
    assert float((out.float() - ref.float()).norm() / ref.float().norm()) < 1e-2
    rq, rs = numerics.quantize_rows(out, "fp8")  # qout quantises exactly the GEMM's GELU output
    assert torch.equal(oq.view(torch.uint8), rq.view(torch.uint8))
    torch.testing.assert_close(osc, rs, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DT)
@pytest.mark.parametrize("fast_accum", [False, True], ids=["exact_acc", "fast_acc"])
@pytest.mark.parametrize("gate_rows,res", [(2, True), (1, True), (2, False), (0, True)],
                         ids=["per_sample_gate+res", "shared_gate+res", "gate_only", "res_only"])
def test_fp8_gate_and_residual_in_the_gemm_epilogue(dtype, fast_accum, gate_rows, res):
    """fp8: residual + gate * (x W^T + b) runs as the cuBLASLt GEMM's epilogue (gate folded into
    the per-column scale and the bias, one GEMM per sample; residual through C)."""
    from lyradynamo.ops import qlinear as ql

    b_, l_, k, n = 2, 259, 3072, 1040
    x = torch.randn(b_, l_, k, device="cuda").to(dtype)
    wq, ws = numerics.quantize_rows(torch.randn(n, k, device="cuda") / k ** 0.5, "fp8")
    b = torch.randn(n, device="cuda").to(dtype)
    g = (torch.randn(gate_rows, 1, n, device="cuda") * 2).to(dtype) if gate_rows else None
    r = torch.randn(b_, l_, n, device="cuda").to(dtype) if res else None
    q, s = lyra.quantize(x, "fp8", None)
    with lyradynamo.config.patch(quant_fast_accum=fast_accum):
        out = lyra.qlinear_q(q, s, wq, ws, b, "none", False, g, r, "fp8", dtype)
    assert not ql._FP8_FUSED_FAILED, ql._FP8_FUSED_FAILED
    f32 = [t.float() if t is not None else None for t in (b, g, r)]
    expect = ql.qlinear_q_reference(q, s, wq, ws, f32[0], "none", False, f32[1], f32[2], "fp8", torch.float32)
    rel = float((out.double() - expect.double()).norm() / expect.double().norm())
    assert out.dtype == dtype and rel < 1e-2, rel
    if gate_rows == 2:  # the samples' gates swapped: must be far off (the test discriminates)
        wrong = ql.qlinear_q_reference(q, s, wq, ws, f32[0], "none", False, f32[1].flip(0), f32[2], "fp8",
                                       torch.float32)
        assert float((wrong - expect).norm() / expect.norm()) > 20 * rel


@pytest.mark.parametrize("dtype", DT)
@pytest.mark.parametrize("kind,path", [("fp8", "outer_vec"), ("fp8", "f32_acc"), ("int8", "i32_acc")])
@pytest.mark.parametrize("act,glu", [("gelu_tanh", False), ("gelu", True), ("silu", False)])
def test_qlinear_q_qout_against_reference(dtype, kind, path, act, glu, monkeypatch):
    """The activated output leaves quantised from the epilogue kernel: its dequantised values and
    row scales match quantising the reference output (within one quantisation step)."""
    from lyradynamo.ops import qlinear as ql

    if path == "f32_acc":
        monkeypatch.setitem(ql._outer_vec_ok, (torch.cuda.current_device(), dtype), False)
    m_rows, k, n = 333, 3072, 1040
    x = torch.randn(2, m_rows, k, device="cuda").to(dtype)
    wq, ws = numerics.quantize_rows(torch.randn(n, k, device="cuda") / k ** 0.5, kind)
    b = torch.randn(n, device="cuda").to(dtype)
    q, s = lyra.quantize(x, kind, None)
    oq, osc = lyra.qlinear_q_qout(q, s, wq, ws, b, act, glu, kind, dtype)
    rq, rs = ql.qlinear_q_qout_reference(q, s, wq, ws, b, act, glu, kind, dtype)
    assert oq.dtype == rq.dtype and oq.shape == rq.shape and osc.shape == rs.shape
    torch.testing.assert_close(osc, rs, rtol=2e-2, atol=0)
    deq, rdeq = oq.float() * osc[..., None], rq.float() * rs[..., None]
    rel = float((deq - rdeq).norm() / rdeq.norm())
    assert rel < 3e-2, rel
