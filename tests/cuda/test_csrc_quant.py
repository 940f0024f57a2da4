"""GPU tests of the W8A8 kernels of lyradynamo._C against lyradynamo.quant.numerics.

- quantize_rows / norm_modulate_quant / linear_epilogue_quant: q must be bit-exact and the
  scales equal to numerics.quantize_rows applied to the *kernel's own* high-precision output
  (norm_modulate, linear_epilogue or scaled_epilogue with the same arguments), moved to the
  CPU. The fused kernels share the fp32 code of those entry points, so no tolerance is needed.
- gemm_int8: int32 accumulators exact; scaled_epilogue on them bit-exact with
  numerics.quantized_linear_reference (same fp32 ops in the same order).
- gemm_fp8 (cuBLASLt OUTER_VEC scales) and gemm_fp8_unscaled + scaled_epilogue: relative error
  to numerics.quantized_linear_reference below 1e-2, and far below the error of a deliberately
  wrong variant (scales rolled by one row / column).
- scaled_epilogue with act / glu / gate / residual: the project rule of test_csrc_kernels
  (at most 2x the error of eager PyTorch in the same dtype against a float64 reference).
Outputs are poisoned first (q bytes 0x7F = fp8 NaN / int8 127, scales and outputs NaN).
"""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from helpers import rel_err  # noqa: E402
from kernel_helpers import (ACTS, CODE, DEV, IDS, NM_SMALL_CASES, epilogue_ref, nm_inputs,  # noqa: E402,F401
                            ptr, randn, stream)

from lyradynamo.quant import numerics as qn  # noqa: E402

pytestmark = [pytest.mark.cuda, pytest.mark.usefixtures("seed_from_test_id")]

KINDS = ["fp8", "int8"]
LP = [torch.float16, torch.bfloat16]
ACC_F32, ACC_I32 = 0, 3


def rows_varied(M, K, dtype):
    """Rows of very different magnitudes (per-row scales matter) plus a few outliers."""
    x = torch.randn(M, K, device=DEV) * torch.exp(torch.randn(M, 1, device=DEV))
    if K > 4:
        x[:, K // 3] *= 8.0
    return x.to(dtype)


def poison_q(*shape):
    return torch.full(shape, 0x7F, device=DEV, dtype=torch.uint8)


def poison_f32(*shape):
    return torch.full(shape, float("nan"), device=DEV, dtype=torch.float32)


def inv_smooth_vec(K):
    return (torch.rand(K, device=DEV) * 1.5 + 0.25).contiguous()


def assert_quant_equal(q, s, ref_q, ref_s, what):
    """q: uint8 kernel bytes (CUDA); ref_q: numerics' QDTYPE tensor (CPU)."""
    torch.cuda.synchronize()
    q, s = q.cpu(), s.cpu()
    assert not torch.isnan(s).any(), f"{what}: scale not written (NaN)"
    torch.testing.assert_close(s, ref_s, rtol=1e-6, atol=0, msg=lambda m: f"{what}: scales: {m}")
    ref_b = ref_q.view(torch.uint8).reshape(q.shape)
    bad = q != ref_b
    if bad.any():
        idx = bad.nonzero()[:5].tolist()
        kind_dt = ref_q.dtype
        got = q.view(kind_dt).float()
        exp = ref_b.view(kind_dt).float()
        detail = [(i, got[tuple(i)].item(), exp[tuple(i)].item()) for i in idx]
        raise AssertionError(f"{what}: {int(bad.sum())} of {bad.numel()} q bytes differ, "
                             f"first (index, kernel, reference): {detail}")


def ref_quant(y, kind, inv=None):
    """numerics.quantize_rows of a CUDA tensor, computed on the CPU."""
    return qn.quantize_rows(y.cpu(), kind, None if inv is None else inv.cpu())


# ----------------------------------------------------------------------------
# quantize_rows
# ----------------------------------------------------------------------------

QR_SHAPES = [  # (M, K)
    (1, 1),
    (3, 7),  # odd K: scalar path
    (77, 72),
    (1024 + 5, 1000),
    (5, 3 * 1024 + 8),
    (1024 + 5, 3072),
    (3, 5001),  # odd, longer than the scalar register cache (recompute pass)
    (2, 20000),  # longer than the 16-bit vector register cache (recompute pass)
    (3, 15360),
]


@pytest.mark.parametrize("smooth", [False, True], ids=["plain", "smooth"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=IDS.get)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", QR_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_quantize_rows(C, shape, kind, dtype, smooth):
    M, K = shape
    x = rows_varied(M, K, dtype)
    if M > 2:
        x[1] = 0  # all-zero row: scale 1e-12, q 0
    inv = inv_smooth_vec(K) if smooth else None
    q, s = poison_q(M, K), poison_f32(M)
    C.quantize_rows(ptr(x), ptr(inv), ptr(q), ptr(s), M, K, K, CODE[dtype], qn.KIND_CODES[kind],
                    stream())
    ref_q, ref_s = ref_quant(x, kind, inv)
    assert_quant_equal(q, s, ref_q, ref_s, f"quantize_rows {shape} {kind}")
    if M > 2:
        assert s[1].item() == pytest.approx(1e-12, rel=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_quantize_rows_saturation_and_ties(C, kind):
    # Rows whose max is exactly QMAX give scale 1: exact ties and representable values.
    qmax = qn.QMAX[kind]
    if kind == "int8":
        row = [qmax, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5, -126.5, 126.5, 0.0, -qmax]
    else:
        row = [qmax, 17.0, 19.0, 272.0, 1.5 * 2**-9, 0.49 * 2**-9, -17.0, -qmax, 2**-9, 0.0,
               447.0, 240.0]
    x = torch.tensor([row, [v * 1e4 for v in row]], device=DEV, dtype=torch.float32)
    q, s = poison_q(2, len(row)), poison_f32(2)
    C.quantize_rows(ptr(x), 0, ptr(q), ptr(s), 2, len(row), len(row), 0, qn.KIND_CODES[kind],
                    stream())
    ref_q, ref_s = ref_quant(x, kind)
    assert_quant_equal(q, s, ref_q, ref_s, f"quantize_rows ties {kind}")
    assert s[0].item() == 1.0
    got = q.cpu().view(qn.QDTYPE[kind]).float()
    assert got.abs().max().item() == qmax


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", LP, ids=IDS.get)
def test_quantize_rows_strided_and_misaligned(C, dtype, kind):
    M, K, pad = 37, 64, 8
    # Row stride ld_x > K (a column slice of a wider activation).
    full = rows_varied(M, K + pad, dtype)
    x = full[:, :K]
    q, s = poison_q(M, K), poison_f32(M)
    C.quantize_rows(ptr(x), 0, ptr(q), ptr(s), M, K, K + pad, CODE[dtype], qn.KIND_CODES[kind],
                    stream())
    ref_q, ref_s = ref_quant(x, kind)
    assert_quant_equal(q, s, ref_q, ref_s, "quantize_rows strided")
    # x one element into its buffer: not 16-byte aligned, the scalar path must run.
    buf = rows_varied(1, M * K + 1, dtype)[0]
    x2 = buf[1:].view(M, K)
    q2, s2 = poison_q(M, K), poison_f32(M)
    inv = inv_smooth_vec(K)
    C.quantize_rows(ptr(x2), ptr(inv), ptr(q2), ptr(s2), M, K, K, CODE[dtype],
                    qn.KIND_CODES[kind], stream())
    ref_q2, ref_s2 = ref_quant(x2, kind, inv)
    assert_quant_equal(q2, s2, ref_q2, ref_s2, "quantize_rows misaligned")


# ----------------------------------------------------------------------------
# norm_modulate_quant
# ----------------------------------------------------------------------------

NM_CASES = NM_SMALL_CASES + [(2, 515, 3072, False, True, False)]  # + FLUX width


@pytest.mark.parametrize("smooth", [False, True], ids=["plain", "smooth"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=IDS.get)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("rms", [False, True], ids=["layernorm", "rmsnorm"])
@pytest.mark.parametrize("case", NM_CASES, ids=lambda c: f"{c[0]}x{c[1]}x{c[2]}")
def test_norm_modulate_quant(C, case, rms, kind, dtype, smooth):
    B, L, D, affine, modulate, bcast = case
    eps = 1e-6
    x, w, b, mul, add = nm_inputs(B, L, D, affine, modulate, bcast, rms, dtype)
    bstride = 0 if bcast else D
    inv = inv_smooth_vec(D) if smooth else None
    y = torch.full((B, L, D), float("nan"), device=DEV, dtype=dtype)
    C.norm_modulate(ptr(x), ptr(w), ptr(b), ptr(mul), ptr(add), ptr(y), B * L, D, L, bstride,
                    bstride, eps, rms, CODE[dtype], stream())
    q, s = poison_q(B * L, D), poison_f32(B * L)
    C.norm_modulate_quant(ptr(x), ptr(w), ptr(b), ptr(mul), ptr(add), ptr(inv), ptr(q), ptr(s),
                          B * L, D, L, bstride, bstride, eps, rms, qn.KIND_CODES[kind],
                          CODE[dtype], stream())
    torch.cuda.synchronize()
    assert not torch.isnan(y).any()
    ref_q, ref_s = ref_quant(y.reshape(B * L, D), kind, inv)
    assert_quant_equal(q, s, ref_q, ref_s, f"norm_modulate_quant {case} rms={rms}")


@pytest.mark.parametrize("kind", KINDS)
def test_norm_modulate_quant_misaligned(C, kind):
    # x one element into its buffer: both entry points take the scalar path.
    dtype, rows, D = torch.float16, 6, 64
    buf = randn(rows * D + 1, dtype=dtype)
    x = buf[1:].view(rows, D)
    y = torch.full((rows, D), float("nan"), device=DEV, dtype=dtype)
    C.norm_modulate(ptr(x), 0, 0, 0, 0, ptr(y), rows, D, rows, 0, 0, 1e-5, False, CODE[dtype],
                    stream())
    q, s = poison_q(rows, D), poison_f32(rows)
    C.norm_modulate_quant(ptr(x), 0, 0, 0, 0, 0, ptr(q), ptr(s), rows, D, rows, 0, 0, 1e-5, False,
                          qn.KIND_CODES[kind], CODE[dtype], stream())
    ref_q, ref_s = ref_quant(y, kind)
    assert_quant_equal(q, s, ref_q, ref_s, "norm_modulate_quant misaligned")


# ----------------------------------------------------------------------------
# gemm_int8 / gemm_fp8 (+ scaled_epilogue)
# ----------------------------------------------------------------------------


def _operands(M, N, K, kind, dtype):
    """Quantised activation (M, K) and weight (N, K) with very different row magnitudes."""
    x = rows_varied(M, K, dtype)
    w = (torch.randn(N, K, device=DEV) * torch.exp(0.5 * torch.randn(N, 1, device=DEV))
         / math.sqrt(K)).to(dtype)
    xq, xs = qn.quantize_rows(x, kind)
    wq, ws = qn.quantize_rows(w, kind)
    return xq.contiguous(), xs.contiguous(), wq.contiguous(), ws.contiguous()


def _ref_and_wrong(xq, xs, wq, ws, bias, out_dtype):
    ref = qn.quantized_linear_reference(xq, xs, wq, ws, bias, torch.float32)
    # Deliberately wrong: scales rolled by one row / column (what a swapped or
    # misindexed scale vector would produce).
    wrong = qn.quantized_linear_reference(xq, xs.roll(1), wq, ws.roll(1), bias, torch.float32)
    return ref, wrong


def _check_scaled(out, ref, wrong, what, tol=1e-2):
    torch.cuda.synchronize()
    assert not torch.isnan(out).any(), f"{what}: output has NaN (element not written)"
    err = rel_err(out, ref)
    err_wrong = rel_err(wrong, ref)
    assert err < tol, f"{what}: rel err {err:.3e} >= {tol}"
    assert err_wrong > 5e-2 and err < err_wrong / 10, (
        f"{what}: test not discriminative: err {err:.3e}, wrong-scales err {err_wrong:.3e}")


INT8_SHAPES = [(1, 24, 48), (3, 40, 48), (77, 3080, 3088), (1024 + 5, 40, 3088)]
FP8_SHAPES = [(1, 48, 48), (3, 80, 48), (77, 3088, 3088), (1024 + 5, 48, 3088)]


@pytest.mark.parametrize("shape", INT8_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gemm_int8_exact(C, shape):
    M, N, K = shape
    xq, xs, wq, ws = _operands(M, N, K, "int8", torch.bfloat16)
    acc = torch.full((M, N), -(2**31), device=DEV, dtype=torch.int32)
    C.gemm_int8(ptr(xq), ptr(wq), ptr(acc), M, N, K, K, stream())
    exact = xq.double() @ wq.double().t()  # integer sums < 2**53: exact in float64
    torch.cuda.synchronize()
    assert torch.equal(acc.double(), exact), f"gemm_int8 {shape}: accumulators differ"


@pytest.mark.parametrize("has_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16, torch.float32], ids=IDS.get)
@pytest.mark.parametrize("shape", INT8_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gemm_int8_scaled_epilogue_exact(C, shape, out_dtype, has_bias):
    M, N, K = shape
    xq, xs, wq, ws = _operands(M, N, K, "int8", torch.bfloat16)
    bias = randn(N, dtype=out_dtype) if has_bias else None
    acc = torch.empty(M, N, device=DEV, dtype=torch.int32)
    C.gemm_int8(ptr(xq), ptr(wq), ptr(acc), M, N, K, K, stream())
    out = torch.full((M, N), float("nan"), device=DEV, dtype=out_dtype)
    C.scaled_epilogue(ptr(acc), ACC_I32, ptr(xs), ptr(ws), ptr(bias), 0, 0, ptr(out), M, N, 0,
                      False, M, 0, CODE[out_dtype], stream())
    ref = qn.quantized_linear_reference(xq, xs, wq, ws, bias, out_dtype)
    torch.cuda.synchronize()
    assert not torch.isnan(out).any()
    # Same fp32 ops in the same order on the exact integer sums: bit-exact.
    assert torch.equal(out, ref), f"max abs diff {(out.float() - ref.float()).abs().max().item()}"
    ref32, wrong = _ref_and_wrong(xq, xs, wq, ws, bias, out_dtype)
    _check_scaled(out, ref32, wrong, f"int8 scaled {shape}")


def _outer_vec_or_skip(C, out_dtype):
    dev = torch.cuda.current_device()
    if not C.gemm_fp8_supported_outer_vec(dev, CODE[out_dtype]):
        pytest.skip(f"cuBLASLt OUTER_VEC_32F fp8 scaling not available on "
                    f"{torch.cuda.get_device_name(dev)} for {IDS[out_dtype]} output "
                    "(gemm_fp8_supported_outer_vec() is False): the unscaled fallback is tested")


@pytest.mark.parametrize("has_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16, torch.float32], ids=IDS.get)
@pytest.mark.parametrize("shape", FP8_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gemm_fp8_outer_vec(C, no_tf32, shape, out_dtype, has_bias):
    if has_bias and out_dtype == torch.float32:
        pytest.skip("gemm_fp8 takes no bias with float32 output (tested as a ValueError)")
    _outer_vec_or_skip(C, out_dtype)
    M, N, K = shape
    xq, xs, wq, ws = _operands(M, N, K, "fp8", torch.bfloat16)
    bias = randn(N, dtype=out_dtype) if has_bias else None
    out = torch.full((M, N), float("nan"), device=DEV, dtype=out_dtype)
    C.gemm_fp8(ptr(xq), ptr(wq), ptr(xs), ptr(ws), ptr(bias), ptr(out), M, N, K, K, N,
               CODE[out_dtype], stream())
    ref, wrong = _ref_and_wrong(xq, xs, wq, ws, bias, out_dtype)
    _check_scaled(out, ref, wrong, f"gemm_fp8 {shape}")


def test_gemm_fp8_outer_vec_strided(C, no_tf32):
    # a is a column slice (lda > K); out is written into a wider buffer (ldo > N).
    out_dtype = torch.bfloat16
    _outer_vec_or_skip(C, out_dtype)
    M, N, K, pad_a, pad_o = 37, 48, 64, 16, 16
    xq_full, xs, wq, ws = _operands(M, N, K + pad_a, "fp8", torch.bfloat16)
    xq = xq_full[:, :K]
    wq = wq[:, :K].contiguous()
    out_full = torch.full((M, N + pad_o), float("nan"), device=DEV, dtype=out_dtype)
    C.gemm_fp8(ptr(xq), ptr(wq), ptr(xs), ptr(ws), 0, ptr(out_full), M, N, K, K + pad_a, N + pad_o,
               CODE[out_dtype], stream())
    torch.cuda.synchronize()
    assert torch.isnan(out_full[:, N:]).all(), "gemm_fp8 wrote past N into the ldo padding"
    ref, wrong = _ref_and_wrong(xq, xs, wq, ws, None, out_dtype)
    _check_scaled(out_full[:, :N], ref, wrong, "gemm_fp8 strided")


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16, torch.float32], ids=IDS.get)
@pytest.mark.parametrize("shape", FP8_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gemm_fp8_unscaled_fallback(C, no_tf32, shape, out_dtype):
    M, N, K = shape
    xq, xs, wq, ws = _operands(M, N, K, "fp8", torch.bfloat16)
    bias = randn(N, dtype=out_dtype)
    acc = poison_f32(M, N)
    C.gemm_fp8_unscaled(ptr(xq), ptr(wq), ptr(acc), M, N, K, K, stream())
    exact = xq.double() @ wq.double().t()
    torch.cuda.synchronize()
    assert not torch.isnan(acc).any()
    acc_err = rel_err(acc, exact)
    assert acc_err < 2e-3, f"gemm_fp8_unscaled accumulators rel err {acc_err:.3e}"
    out = torch.full((M, N), float("nan"), device=DEV, dtype=out_dtype)
    C.scaled_epilogue(ptr(acc), ACC_F32, ptr(xs), ptr(ws), ptr(bias), 0, 0, ptr(out), M, N, 0,
                      False, M, 0, CODE[out_dtype], stream())
    ref, wrong = _ref_and_wrong(xq, xs, wq, ws, bias, out_dtype)
    _check_scaled(out, ref, wrong, f"gemm_fp8_unscaled+scaled_epilogue {shape}")


def test_gemm_quant_bad_arguments(C):
    x = torch.zeros(4096, device=DEV, dtype=torch.uint8)
    f = torch.zeros(256, device=DEV, dtype=torch.float32)
    p, pf, s = ptr(x), ptr(f), stream()
    with pytest.raises(ValueError, match="K must be a multiple of 16"):
        C.gemm_fp8(p, p, pf, pf, 0, pf, 2, 16, 40, 40, 16, 2, s)
    with pytest.raises(ValueError, match="K must be a multiple of 16"):
        C.gemm_fp8_unscaled(p, p, pf, 2, 16, 24, 24, s)
    with pytest.raises(ValueError, match="lda"):
        C.gemm_fp8(p, p, pf, pf, 0, pf, 2, 16, 32, 40, 16, 2, s)
    with pytest.raises(ValueError, match="bias"):
        C.gemm_fp8(p, p, pf, pf, pf, pf, 2, 16, 32, 32, 16, 0, s)
    with pytest.raises(ValueError, match="a_scale"):
        C.gemm_fp8(p, p, 0, pf, 0, pf, 2, 16, 32, 32, 16, 2, s)
    with pytest.raises(ValueError, match="K must be a multiple of 4"):
        C.gemm_int8(p, p, pf, 2, 16, 6, 6, s)
    with pytest.raises(ValueError, match="kind"):
        C.quantize_rows(pf, 0, p, pf, 2, 8, 8, 0, 2, s)
    with pytest.raises(ValueError, match="ld_x"):
        C.quantize_rows(pf, 0, p, pf, 2, 8, 4, 0, 0, s)
    with pytest.raises(ValueError, match="acc_dtype"):
        C.scaled_epilogue(pf, 1, pf, pf, 0, 0, 0, pf + 1024, 2, 8, 0, False, 2, 0, 1, s)
    with pytest.raises(ValueError, match="a_scale"):
        C.linear_epilogue_quant(pf, ACC_I32, 0, 0, 0, 0, 0, 0, p, pf, 2, 8, 0, False, 2, 0, 1, 0, s)
    with pytest.raises(ValueError, match="kind"):
        C.norm_modulate_quant(pf, 0, 0, 0, 0, 0, p, pf, 2, 8, 2, 0, 0, 1e-6, False, 5, 0, s)


# ----------------------------------------------------------------------------
# scaled_epilogue (act / glu / gate / residual) and linear_epilogue_quant
# ----------------------------------------------------------------------------


class EpiCase:
    """Random inputs of one epilogue call: acc (M, N_y) of acc_dtype + optional parts."""

    def __init__(self, M, n_out, act, glu, use_gate, use_res, use_bias, acc_dtype, out_dtype,
                 batches=2):
        self.M, self.n_out, self.act, self.glu = M, n_out, act, glu
        self.rpb = -(-M // batches)
        ny = 2 * n_out if glu else n_out
        self.acc_dtype, self.out_dtype = acc_dtype, out_dtype
        self.scaled = acc_dtype in ("int32", "fp32")
        if acc_dtype == "int32":
            self.acc = torch.randint(-20000, 20000, (M, ny), device=DEV, dtype=torch.int32)
            self.acc_code = ACC_I32
        elif acc_dtype == "fp32":
            self.acc = torch.randn(M, ny, device=DEV) * 2000
            self.acc_code = ACC_F32
        else:  # same dtype as out, no scales (the plain GEMM's output)
            self.acc = randn(M, ny, dtype=out_dtype, scale=2.0)
            self.acc_code = CODE[out_dtype]
        if self.scaled:
            self.sa = (torch.rand(M, device=DEV) + 0.5) * 1e-2
            self.sb = (torch.rand(ny, device=DEV) + 0.5) * 1e-2
        else:
            self.sa = self.sb = None
        self.bias = randn(ny, dtype=out_dtype) if use_bias else None
        self.gate = randn(batches, n_out, dtype=out_dtype) if use_gate else None
        self.res = randn(M, n_out, dtype=out_dtype) if use_res else None

    def y_fp32(self):
        """acc * sa * sb + bias in fp32, the ops of the kernel (before act)."""
        y = self.acc.float()
        if self.scaled:
            y = y * self.sa[:, None] * self.sb[None, :]
        if self.bias is not None:
            y = y + self.bias.float()
        return y

    def reference(self):
        y = self.y_fp32().double()
        g = None if self.gate is None else self.gate.double()
        r = None if self.res is None else self.res.double()
        return epilogue_ref(y, g, r, self.act, self.glu, self.n_out, self.rpb)

    def eager(self):
        y = self.y_fp32().to(self.out_dtype)
        return epilogue_ref(y, self.gate, self.res, self.act, self.glu, self.n_out, self.rpb)

    def run_out(self, C):
        """The high-precision entry point: scaled_epilogue or linear_epilogue."""
        out = torch.full((self.M, self.n_out), float("nan"), device=DEV, dtype=self.out_dtype)
        gstride = self.n_out if self.gate is not None else 0
        if self.scaled:
            C.scaled_epilogue(ptr(self.acc), self.acc_code, ptr(self.sa), ptr(self.sb),
                              ptr(self.bias), ptr(self.gate), ptr(self.res), ptr(out), self.M,
                              self.n_out, self.act, self.glu, self.rpb, gstride,
                              CODE[self.out_dtype], stream())
        else:
            assert self.bias is None
            C.linear_epilogue(ptr(self.acc), ptr(self.gate), ptr(self.res), ptr(out), self.M,
                              self.n_out, self.act, self.glu, self.rpb, gstride,
                              CODE[self.out_dtype], stream())
        return out

    def run_quant(self, C, kind, inv):
        q, s = poison_q(self.M, self.n_out), poison_f32(self.M)
        gstride = self.n_out if self.gate is not None else 0
        C.linear_epilogue_quant(ptr(self.acc), self.acc_code, ptr(self.sa), ptr(self.sb),
                                ptr(self.bias), ptr(self.gate), ptr(self.res), ptr(inv), ptr(q),
                                ptr(s), self.M, self.n_out, self.act, self.glu, self.rpb,
                                gstride, CODE[self.out_dtype], qn.KIND_CODES[kind], stream())
        return q, s


def _check_rule(out, case, what):
    torch.cuda.synchronize()
    assert not torch.isnan(out).any(), f"{what}: output has NaN (element not written)"
    ref = case.reference()
    err = rel_err(out, ref)
    if case.out_dtype == torch.float32:
        assert err < 1e-5, f"{what}: fp32 rel err {err:.3e}"
    else:
        eager_err = rel_err(case.eager(), ref)
        assert err <= 2.0 * eager_err + 1e-6, f"{what}: rel err {err:.3e} > 2 x eager {eager_err:.3e}"


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16, torch.float32], ids=IDS.get)
@pytest.mark.parametrize("acc_dtype", ["int32", "fp32"])
@pytest.mark.parametrize("glu", [False, True], ids=["plain", "glu"])
@pytest.mark.parametrize("act", list(ACTS), ids=ACTS.get)
def test_scaled_epilogueepilogue_ref(C, act, glu, acc_dtype, out_dtype):
    case = EpiCase(37, 72, act, glu, True, True, True, acc_dtype, out_dtype)
    _check_rule(case.run_out(C), case, f"scaled_epilogue act={ACTS[act]} glu={glu}")


@pytest.mark.parametrize("acc_dtype", ["int32", "fp32"])
@pytest.mark.parametrize(
    "case",
    [
        (1, 24, 0, False, False, False, False),
        (5, 25, 2, True, True, True, True),  # N_out % 4 != 0: scalar path
        (2 * 1029, 3072, 0, False, True, True, True),  # gated residual
        (2 * 77, 5120, 1, True, False, False, True),  # GEGLU
    ],
    ids=lambda c: f"{c[0]}x{c[1]}-act{c[2]}-glu{int(c[3])}",
)
def test_scaled_epilogue_shapes(C, case, acc_dtype):
    M, n, act, glu, g, r, b = case
    ec = EpiCase(M, n, act, glu, g, r, b, acc_dtype, torch.bfloat16)
    _check_rule(ec.run_out(C), ec, f"scaled_epilogue {case}")


def test_scaled_epilogue_inplace_fp32(C):
    # out == acc is allowed when the element sizes match and glu is off.
    ec = EpiCase(33, 40, 3, False, False, True, True, "fp32", torch.float32)
    ref = ec.reference()
    C.scaled_epilogue(ptr(ec.acc), ACC_F32, ptr(ec.sa), ptr(ec.sb), ptr(ec.bias), 0, ptr(ec.res),
                      ptr(ec.acc), ec.M, ec.n_out, ec.act, False, ec.rpb, 0, 0, stream())
    torch.cuda.synchronize()
    assert rel_err(ec.acc, ref) < 1e-5


EQ_CASES = [  # (M, N_out, act, glu, gate, residual, bias)
    (1, 24, 0, False, False, False, False),
    (3, 40, 2, False, True, True, True),
    (5, 25, 1, True, True, True, True),  # odd: scalar path
    (77, 3072, 2, False, False, False, True),  # FLUX MLP GELU(tanh) -> fc2
    (1024 + 5, 72, 3, True, True, False, True),
    (3, 12288, 1, True, False, False, True),  # longer than the register cache: recompute pass
    (2, 15360, 2, False, False, True, False),
    # acc "same" without gate / residual / bias: the act / GLU kernel (act_quant_kernel)
    (1024 + 5, 72, 3, True, False, False, False),
    (2, 16400, 1, True, False, False, False),  # 2050 vectors of 8: past its register cache
]


@pytest.mark.parametrize("smooth", [False, True], ids=["plain", "smooth"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("acc_dtype", ["int32", "fp32", "same"])
@pytest.mark.parametrize("out_dtype", LP, ids=IDS.get)
@pytest.mark.parametrize("case", EQ_CASES, ids=lambda c: f"{c[0]}x{c[1]}-act{c[2]}-glu{int(c[3])}")
def test_linear_epilogue_quant(C, case, out_dtype, acc_dtype, kind, smooth):
    M, n, act, glu, g, r, b = case
    if acc_dtype == "same":
        b = False  # the plain GEMM already added the bias
    ec = EpiCase(M, n, act, glu, g, r, b, acc_dtype, out_dtype)
    inv = inv_smooth_vec(n) if smooth else None
    out = ec.run_out(C)
    q, s = ec.run_quant(C, kind, inv)
    torch.cuda.synchronize()
    assert not torch.isnan(out).any()
    ref_q, ref_s = ref_quant(out, kind, inv)
    assert_quant_equal(q, s, ref_q, ref_s, f"linear_epilogue_quant {case} acc={acc_dtype}")


@pytest.mark.parametrize("smooth", [False, True], ids=["plain", "smooth"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("out_dtype", LP, ids=IDS.get)
@pytest.mark.parametrize("glu", [False, True], ids=["act", "glu"])
@pytest.mark.parametrize("act", [0, 1, 2, 3])
@pytest.mark.parametrize("M, n", [(37, 1280), (2048 + 3, 5120), (3, 16400), (5, 8)])
def test_act_quant_kernel_matches_generic(C, M, n, act, glu, out_dtype, kind, smooth):
    """linear_epilogue_quant's act / GLU kernel (16-bit acc, no scales, bias, gate or residual)
    against the generic kernel it replaces for those calls: the same q and scale bit for bit."""
    ec = EpiCase(M, n, act, glu, False, False, False, "same", out_dtype)
    ec.acc[0, : min(4, ec.acc.shape[1])] = torch.tensor([float("nan"), 0.0, -0.0, 1e4])[: min(4, ec.acc.shape[1])]
    inv = inv_smooth_vec(n) if smooth else None
    previous = C.set_act_quant_kernel(True)
    try:
        q_fast, s_fast = ec.run_quant(C, kind, inv)
        C.set_act_quant_kernel(False)
        q_gen, s_gen = ec.run_quant(C, kind, inv)
        torch.cuda.synchronize()
    finally:
        C.set_act_quant_kernel(previous)
    assert torch.equal(q_fast, q_gen), f"q differs in {(q_fast != q_gen).sum().item()} bytes"
    assert torch.equal(s_fast.isnan(), s_gen.isnan())
    assert torch.equal(torch.nan_to_num(s_fast), torch.nan_to_num(s_gen))
    assert not torch.isnan(s_fast[1:]).any()


def test_linear_epilogue_quant_fp32_out(C):
    # fp32 model: fp32 accumulators without scales, fp32 output dtype.
    ec = EpiCase(9, 48, 1, False, True, True, False, "same", torch.float32)
    out = ec.run_out(C)
    q, s = ec.run_quant(C, "fp8", None)
    ref_q, ref_s = ref_quant(out, "fp8")
    assert_quant_equal(q, s, ref_q, ref_s, "linear_epilogue_quant fp32")


# ----------------------------------------------------------------------------
# end to end, graph capture
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_w8a8_linear_end_to_end(C, no_tf32, kind):
    """quantize_rows -> GEMM -> scaled_epilogue close to the float linear (SQNR)."""
    dtype, M, N, K = torch.bfloat16, 333, 3088, 3072
    x = rows_varied(M, K, dtype)
    w = (torch.randn(N, K, device=DEV) / math.sqrt(K)).to(dtype)
    bias = randn(N, dtype=dtype)
    wq, ws = qn.quantize_rows(w, kind)
    xq, xs = poison_q(M, K), poison_f32(M)
    C.quantize_rows(ptr(x), 0, ptr(xq), ptr(xs), M, K, K, CODE[dtype], qn.KIND_CODES[kind],
                    stream())
    out = torch.full((M, N), float("nan"), device=DEV, dtype=dtype)
    if kind == "int8":
        acc = torch.empty(M, N, device=DEV, dtype=torch.int32)
        C.gemm_int8(ptr(xq), ptr(wq), ptr(acc), M, N, K, K, stream())
        C.scaled_epilogue(ptr(acc), ACC_I32, ptr(xs), ptr(ws), ptr(bias), 0, 0, ptr(out), M, N, 0,
                          False, M, 0, CODE[dtype], stream())
    else:
        acc = torch.empty(M, N, device=DEV, dtype=torch.float32)
        C.gemm_fp8_unscaled(ptr(xq), ptr(wq), ptr(acc), M, N, K, K, stream())
        C.scaled_epilogue(ptr(acc), ACC_F32, ptr(xs), ptr(ws), ptr(bias), 0, 0, ptr(out), M, N, 0,
                          False, M, 0, CODE[dtype], stream())
    exact = F.linear(x.double(), w.double(), bias.double())
    torch.cuda.synchronize()
    db = qn.sqnr_db(exact, out)
    assert db > (25.0 if kind == "fp8" else 30.0), f"{kind} W8A8 SQNR {db:.1f} dB"


def test_cuda_graph_capture_quant(C):
    """Every quant entry point launches on the given stream: a captured graph replays them."""
    dtype, M, K, N = torch.bfloat16, 64, 96, 128
    x = randn(M, K, dtype=dtype)
    wq8, ws8 = qn.quantize_rows(randn(N, K, dtype=dtype, scale=0.1), "int8")
    wqf, wsf = qn.quantize_rows(randn(N, K, dtype=dtype, scale=0.1), "fp8")
    bias = randn(N, dtype=dtype)
    outer_vec = C.gemm_fp8_supported_outer_vec(torch.cuda.current_device(), CODE[dtype])
    xq8, xs8 = torch.empty(M, K, device=DEV, dtype=torch.uint8), torch.empty(M, device=DEV)
    xqf, xsf = torch.empty(M, K, device=DEV, dtype=torch.uint8), torch.empty(M, device=DEV)
    acc_i = torch.empty(M, N, device=DEV, dtype=torch.int32)
    acc_f = torch.empty(M, N, device=DEV, dtype=torch.float32)
    out_i = torch.empty(M, N, device=DEV, dtype=dtype)
    out_f = torch.empty(M, N, device=DEV, dtype=dtype)
    out_v = torch.empty(M, N, device=DEV, dtype=dtype)
    q2, s2 = torch.empty(M, N, device=DEV, dtype=torch.uint8), torch.empty(M, device=DEV)

    def step(s):
        C.norm_modulate_quant(ptr(x), 0, 0, 0, 0, 0, ptr(xq8), ptr(xs8), M, K, M, 0, 0, 1e-6,
                              False, 1, CODE[dtype], s)
        C.quantize_rows(ptr(x), 0, ptr(xqf), ptr(xsf), M, K, K, CODE[dtype], 0, s)
        C.gemm_int8(ptr(xq8), ptr(wq8), ptr(acc_i), M, N, K, K, s)
        C.scaled_epilogue(ptr(acc_i), ACC_I32, ptr(xs8), ptr(ws8), ptr(bias), 0, 0, ptr(out_i), M,
                          N, 1, False, M, 0, CODE[dtype], s)
        C.gemm_fp8_unscaled(ptr(xqf), ptr(wqf), ptr(acc_f), M, N, K, K, s)
        C.linear_epilogue_quant(ptr(acc_f), ACC_F32, ptr(xsf), ptr(wsf), ptr(bias), 0, 0, 0,
                                ptr(q2), ptr(s2), M, N, 2, False, M, 0, CODE[dtype], 0, s)
        C.scaled_epilogue(ptr(acc_f), ACC_F32, ptr(xsf), ptr(wsf), ptr(bias), 0, 0, ptr(out_f), M,
                          N, 0, False, M, 0, CODE[dtype], s)
        if outer_vec:
            C.gemm_fp8(ptr(xqf), ptr(wqf), ptr(xsf), ptr(wsf), ptr(bias), ptr(out_v), M, N, K, K,
                       N, CODE[dtype], s)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step(side.cuda_stream)  # warm-up: lazily creates the cuBLASLt state and plans
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    outs = [xq8, xs8, xqf, xsf, acc_i, acc_f, out_i, out_f, q2, s2] + ([out_v] if outer_vec else [])
    expected = [t.clone() for t in outs]
    for t in outs:
        t.zero_()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        step(torch.cuda.current_stream().cuda_stream)
    g.replay()
    torch.cuda.synchronize()
    for i, (t, e) in enumerate(zip(outs, expected)):
        assert torch.equal(t, e), f"output {i} differs after graph replay"


@pytest.mark.parametrize("fast_accum", [False, True], ids=["exact_acc", "fast_acc"])
@pytest.mark.parametrize("has_res", [False, True], ids=["nores", "res"])
@pytest.mark.parametrize("shape", FP8_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gemm_fp8_ex_residual_and_fast_accum(C, no_tf32, shape, has_res, fast_accum):
    out_dtype = torch.bfloat16
    _outer_vec_or_skip(C, out_dtype)
    M, N, K = shape
    xq, xs, wq, ws = _operands(M, N, K, "fp8", torch.bfloat16)
    bias = randn(N, dtype=out_dtype)
    res = randn(M, N, dtype=out_dtype) if has_res else None
    out = torch.full((M, N), float("nan"), device=DEV, dtype=out_dtype)
    C.gemm_fp8_ex(ptr(xq), ptr(wq), ptr(xs), ptr(ws), ptr(bias), ptr(res), ptr(out), M, N, K, K, N,
                  CODE[out_dtype], fast_accum, stream())
    ref, wrong = _ref_and_wrong(xq, xs, wq, ws, bias, out_dtype)
    if has_res:
        ref, wrong = ref + res.float(), wrong + res.float()
    _check_scaled(out, ref, wrong, f"gemm_fp8_ex {shape} res={has_res} fast={fast_accum}")
