"""lyradynamo.quant.numerics: the reference math of W8A8 quantisation (CPU).

Every check asserts concrete values worked out by hand (scales, rounding ties, saturation,
SmoothQuant factors), so a wrong formula fails here before it reaches the CUDA tests.
"""
from __future__ import annotations

import math

import pytest
import torch

from lyradynamo.quant import numerics as qn


def f32(v) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float32)


def fp8_finite_values() -> torch.Tensor:
    """All 254 finite float8_e4m3fn values (every byte but the two NaNs), as float32."""
    b = torch.arange(256, dtype=torch.uint8)
    b = b[(b & 0x7F) != 0x7F]
    return b.view(torch.float8_e4m3fn).float()


# ----------------------------------------------------------------------------
# constants, kinds
# ----------------------------------------------------------------------------


def test_constants_and_kinds():
    assert qn.QMAX == {"fp8": 448.0, "int8": 127.0}
    assert qn.QDTYPE == {"fp8": torch.float8_e4m3fn, "int8": torch.int8}
    assert qn.KIND_CODES == {"fp8": 0, "int8": 1}
    assert fp8_finite_values().abs().max().item() == 448.0
    qn.check_kind("fp8")
    qn.check_kind("int8")
    for bad in ("fp4", "FP8", None, 0):
        with pytest.raises(ValueError, match="fp8.*int8"):
            qn.check_kind(bad)
    with pytest.raises(ValueError, match="kind"):
        qn.quantize_rows(torch.ones(2, 4), "e5m2")


# ----------------------------------------------------------------------------
# scales
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["fp8", "int8"])
def test_row_scales_values(kind):
    x = f32([[1.0, -3.0, 2.0], [0.0, 0.0, 0.0], [-896.0, 1.0, 1.0], [0.0, -0.0, 1e-30]])
    s = qn.row_scales(x, kind)
    qmax = f32(qn.QMAX[kind])
    expected = torch.stack([f32(3.0) / qmax, f32(1e-12), f32(896.0) / qmax,
                            torch.maximum(f32(1e-30) / qmax, f32(1e-12))])
    assert s.dtype == torch.float32 and s.shape == (4,)
    assert torch.equal(s, expected)
    assert s[1].item() == pytest.approx(1e-12, rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_row_scales_any_dtype_and_leading_dims(dtype):
    x = torch.randn(2, 3, 40).to(dtype)
    s = qn.row_scales(x, "fp8")
    assert s.shape == (2, 3) and s.dtype == torch.float32
    assert torch.equal(s, (x.float().abs().amax(-1) / f32(448.0)).clamp_min(1e-12))


@pytest.mark.parametrize("kind", ["fp8", "int8"])
def test_all_zero_row(kind):
    x = torch.zeros(3, 16)
    x[1] = torch.linspace(-1, 1, 16)
    q, s = qn.quantize_rows(x, kind)
    assert q.dtype == qn.QDTYPE[kind]
    assert torch.equal(q[0].float(), torch.zeros(16)) and torch.equal(q[2].float(), torch.zeros(16))
    assert s[0].item() == s[2].item() == f32(1e-12).item()
    assert not torch.isnan(q.float()).any()


# ----------------------------------------------------------------------------
# rounding, saturation
# ----------------------------------------------------------------------------


def test_int8_round_half_even():
    # amax 127 -> scale exactly 1, so v == x and the ties are exact.
    x = f32([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5, 0.49, -126.5, 126.5]])
    q, s = qn.quantize_rows(x, "int8")
    assert s.item() == 1.0
    assert q.tolist() == [[127, 0, 2, 2, 0, -2, -2, 4, 0, -126, 126]]


def test_fp8_round_nearest_even():
    # amax 448 -> scale 1. Ties: 17 (16|18) -> 16, 19 (18|20) -> 20, 272 (256|288) -> 256,
    # 1.5 * 2**-9 (subnormals 2**-9 | 2**-8) -> 2**-8; below half the smallest subnormal -> 0.
    x = f32([[448.0, 17.0, 19.0, 272.0, 1.5 * 2**-9, 0.49 * 2**-9, -17.0, 17.01]])
    q, s = qn.quantize_rows(x, "fp8")
    assert s.item() == 1.0
    assert q.float().tolist() == [[448.0, 16.0, 20.0, 256.0, 2**-8, 0.0, -16.0, 18.0]]


@pytest.mark.parametrize("kind", ["fp8", "int8"])
def test_saturation_and_row_max_maps_to_qmax(kind):
    torch.manual_seed(0)
    x = torch.randn(64, 300) * torch.logspace(-3, 3, 64)[:, None]
    q, s = qn.quantize_rows(x, kind)
    qf = q.float()
    qmax = qn.QMAX[kind]
    assert qf.abs().max().item() == qmax
    assert not torch.isnan(qf).any()
    # The largest |x| of every row lands on +-QMAX (x / (amax / QMAX) is within an ulp of QMAX).
    idx = x.abs().argmax(dim=1)
    picked = qf.gather(1, idx[:, None])[:, 0]
    assert torch.equal(picked.abs(), torch.full((64,), qmax))
    assert torch.equal(picked.sign(), x.gather(1, idx[:, None])[:, 0].sign())
    # Dequantised error per element is at most half a step (int8) / half an fp8 ulp.
    err = (qn.dequantize_rows(q, s) - x).abs()
    bound = (0.5 * s[:, None]) if kind == "int8" else (x.abs() * 2**-4 + 2**-10 * s[:, None])
    assert (err <= bound * (1 + 1e-6)).all()


def test_fp8_representable_values_round_trip():
    vals = fp8_finite_values()
    x = vals[None, :]  # contains +-448 -> scale 1
    q, s = qn.quantize_rows(x, "fp8")
    assert s.item() == 1.0
    assert torch.equal(q.float(), x)
    # A power-of-two scale keeps every value exact too: amax 56 -> scale 0.125.
    x2 = x * 0.125
    q2, s2 = qn.quantize_rows(x2, "fp8")
    assert s2.item() == 0.125
    assert torch.equal(q2.float(), x)
    assert torch.equal(qn.dequantize_rows(q2, s2), x2)


def test_int8_integers_round_trip():
    x = torch.arange(-127, 128, dtype=torch.float32)[None, :] * 0.25
    q, s = qn.quantize_rows(x, "int8")
    assert s.item() == 0.25
    assert torch.equal(q.float()[0], torch.arange(-127, 128, dtype=torch.float32))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["fp8", "int8"])
def test_quantize_matches_formula(kind, dtype):
    torch.manual_seed(1)
    x = (torch.randn(5, 7, 72) * 3).to(dtype)
    q, s = qn.quantize_rows(x, kind)
    assert q.shape == x.shape and s.shape == (5, 7)
    xf = x.float()
    scale = (xf.abs().amax(-1) / f32(qn.QMAX[kind])).clamp_min(1e-12)
    v = xf * (1.0 / scale)[..., None]  # one IEEE reciprocal per row, then fp32 products
    if kind == "int8":
        ref = torch.round(v).clamp(-127, 127)
    else:
        ref = v.clamp(-448, 448).to(torch.float8_e4m3fn).float()
    assert torch.equal(s, scale)
    assert torch.equal(q.float(), ref)


# ----------------------------------------------------------------------------
# SmoothQuant
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["fp8", "int8"])
def test_smoothing_is_applied_before_amax(kind):
    torch.manual_seed(2)
    x = torch.randn(9, 32, dtype=torch.bfloat16)
    x[:, 3] *= 50  # outlier channel
    inv = torch.rand(32) + 0.5
    inv[3] = 0.02
    q, s = qn.quantize_rows(x, kind, inv)
    q_ref, s_ref = qn.quantize_rows(x.float() * inv, kind)
    assert torch.equal(q.float(), q_ref.float()) and torch.equal(s, s_ref)
    q0, s0 = qn.quantize_rows(x, kind)
    assert not torch.equal(s, s0)  # the outlier no longer sets the scale
    assert (s < s0).all()
    with pytest.raises(ValueError, match="inv_smooth"):
        qn.quantize_rows(x, kind, torch.ones(31))


def test_smooth_factors_values():
    act = f32([4.0, 1.0, 0.0, 9.0, 1e12, 1e-12])
    w = torch.zeros(2, 6)
    w[0] = f32([1.0, -4.0, 2.0, 0.0, 1e-12, 1e12])
    w[1] = f32([-0.5, 1.0, -1.0, 0.0, 0.0, 0.0])
    s = qn.smooth_factors(act, w, alpha=0.5)
    assert s.dtype == torch.float32 and s.shape == (6,)
    # sqrt(4)/sqrt(1) = 2; sqrt(1)/sqrt(4) = 0.5; zero act -> 1; zero weight column -> 1;
    # 1e6 / 1e-6 = 1e12 -> clamped 1e5; 1e-6 / 1e6 -> clamped 1e-5.
    assert s.tolist() == pytest.approx([2.0, 0.5, 1.0, 1.0, 1e5, 1e-5], rel=1e-6)
    s1 = qn.smooth_factors(act[:2], w[:, :2], alpha=1.0)
    assert s1.tolist() == pytest.approx([4.0, 1.0])
    s0 = qn.smooth_factors(act[:2], w[:, :2], alpha=0.0)
    assert s0.tolist() == pytest.approx([1.0, 0.25])
    with pytest.raises(ValueError, match="alpha"):
        qn.smooth_factors(act, w, alpha=1.5)
    with pytest.raises(ValueError, match="act_absmax"):
        qn.smooth_factors(act[:5], w)


def test_smoothing_identity_fp64():
    torch.manual_seed(3)
    x = torch.randn(17, 48, dtype=torch.float64)
    x[:, 5] *= 30
    w = torch.randn(24, 48, dtype=torch.float64)
    s = qn.smooth_factors(x.abs().amax(0), w, 0.5).double()
    assert not torch.allclose(s, torch.ones_like(s))
    lhs = (x / s) @ (w * s).t()
    rhs = x @ w.t()
    assert torch.allclose(lhs, rhs, rtol=1e-12, atol=1e-12)
    # And smoothing makes the activation easier to quantise: the outlier channel shrinks.
    assert (x / s).abs().amax(0).max() < x.abs().amax(0).max()


# ----------------------------------------------------------------------------
# quantised linear
# ----------------------------------------------------------------------------


def test_quantized_linear_int8_exact_integers():
    torch.manual_seed(4)
    xq = torch.randint(-127, 128, (5, 64), dtype=torch.int8)
    wq = torch.randint(-127, 128, (12, 64), dtype=torch.int8)
    out = qn.quantized_linear_reference(xq, torch.ones(5), wq, torch.ones(12), None, torch.float32)
    exact = xq.long() @ wq.long().t()
    assert torch.equal(out, exact.float())
    bias = torch.arange(12, dtype=torch.float32)
    out_b = qn.quantized_linear_reference(xq, torch.full((5,), 2.0), wq, torch.full((12,), 0.5),
                                          bias, torch.float32)
    assert torch.equal(out_b, exact.float() + bias)


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["fp8", "int8"])
def test_quantized_linear_vs_emulation(kind, out_dtype):
    torch.manual_seed(5)
    x = torch.randn(2, 7, 96) * torch.exp(torch.randn(2, 7, 1))
    w = torch.randn(40, 96) / math.sqrt(96)
    bias = torch.randn(40).to(out_dtype)
    xq, xs = qn.quantize_rows(x, kind)
    wq, ws = qn.quantize_rows(w, kind)
    out = qn.quantized_linear_reference(xq, xs, wq, ws, bias, out_dtype)
    assert out.shape == (2, 7, 40) and out.dtype == out_dtype
    # Independent emulation: dequantise both operands, multiply in float64.
    emu = qn.dequantize_rows(xq, xs).double() @ qn.dequantize_rows(wq, ws).double().t()
    emu = emu + bias.double()
    tol = 1e-5 if out_dtype == torch.float32 else 1e-2
    err = ((out.double() - emu).norm() / emu.norm()).item()
    assert err < tol
    # Quantisation noise against the float product: W8A8 should be far above 20 dB.
    exact = x.double() @ w.double().t() + bias.double()
    db = qn.sqnr_db(exact, out)
    assert db > (25.0 if kind == "fp8" else 30.0), db
    # A swapped-scale variant is far worse: the check above can fail.
    bad = qn.quantized_linear_reference(xq, xs.flip(-1), wq, ws, bias, torch.float32)
    assert qn.sqnr_db(exact, bad) < db - 10


def test_quantized_linear_checks():
    q = torch.zeros(3, 16, dtype=torch.int8)
    with pytest.raises(ValueError, match="share a dtype"):
        qn.quantized_linear_reference(q, torch.ones(3), q.view(torch.float8_e4m3fn), torch.ones(3),
                                      None, torch.float32)
    with pytest.raises(ValueError, match="wscale"):
        qn.quantized_linear_reference(q, torch.ones(3), q, torch.ones(4), None, torch.float32)


# ----------------------------------------------------------------------------
# SQNR
# ----------------------------------------------------------------------------


def test_sqnr_db():
    ref = f32([3.0, 4.0])
    assert qn.sqnr_db(ref, ref.clone()) == math.inf
    assert qn.sqnr_db(ref, f32([3.0, 3.0])) == pytest.approx(10 * math.log10(25.0))
    assert qn.sqnr_db(ref, f32([0.0, 0.0])) == pytest.approx(0.0)
    assert qn.sqnr_db(torch.zeros(2), f32([1.0, 0.0])) == -math.inf
