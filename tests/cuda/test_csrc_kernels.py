"""GPU tests of the raw lyradynamo._C kernels against float64 references.

Tolerance rule (project rule): for float16 / bfloat16 the relative error
||out - ref|| / ||ref|| of the kernel must be at most 2x the error of the eager
PyTorch op(s) in the same dtype (plus a 1e-6 floor), both measured against a
float64 reference computed from the same (already rounded) inputs. float32
results must be within 1e-5 relative error. Outputs are poisoned with NaN
before each call so that unwritten elements are caught.
"""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from helpers import rel_err  # noqa: E402
from kernel_helpers import (ACTS, CODE, DEV, IDS, NM_SMALL_CASES, epilogue_ref, nm_inputs,  # noqa: E402,F401
                            ptr, randn, stream)

pytestmark = [pytest.mark.cuda, pytest.mark.usefixtures("seed_from_test_id")]

DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def d64(t):
    return None if t is None else t.double()


def poison(*shape, dtype):
    return torch.full(shape, float("nan"), device=DEV, dtype=dtype)


def check(out, ref, eager, dtype, what=""):
    torch.cuda.synchronize()
    assert not torch.isnan(out).any(), f"{what}: output has NaN (element not written)"
    err = rel_err(out, ref)
    if dtype == torch.float32:
        assert err < 1e-5, f"{what}: fp32 rel err {err:.3e} >= 1e-5"
    else:
        ref_err = rel_err(eager, ref)
        assert err <= 2.0 * ref_err + 1e-6, (
            f"{what}: rel err {err:.3e} > 2 x eager {IDS[dtype]} rel err {ref_err:.3e}"
        )


# ----------------------------------------------------------------------------
# group_norm
# ----------------------------------------------------------------------------

GN_SHAPES = [  # (N, C, HW, groups)
    (2, 24, 7, 3),  # tiny, odd HW, scalar path
    (3, 96, 49, 32),  # cpg = 3
    (2, 640, 1024, 32),  # SD
    (2, 320, 4096, 32),  # SD 64x64, cpg = 10 (NHWC: 2-wide vectors)
    (1, 1280, 256, 32),  # cpg = 40
    (8, 128, 1024, 32),  # many groups: one block per group (no cluster)
]


def group_norm_refs(x, G, w, b, eps, silu, pb=None):
    """(float64 reference, eager in x's dtype) of group_norm(x + pre_bias pb) (+ SiLU)."""
    xb = x if pb is None else x + pb.view(pb.shape[0], -1, 1, 1)
    ref = F.group_norm(d64(xb), G, d64(w), d64(b), eps)
    eager = F.group_norm(xb, G, w, b, eps)
    return (F.silu(ref), F.silu(eager)) if silu else (ref, eager)


def _hw_split(hw):
    r = int(math.isqrt(hw))
    return (r, r) if r * r == hw else (1, hw)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS.get)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("silu", [False, True], ids=["plain", "silu"])
@pytest.mark.parametrize("shape", GN_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_group_norm(C, shape, silu, channels_last, dtype):
    N, Ch, HW, G = shape
    H, W = _hw_split(HW)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = randn(N, Ch, H, W, dtype=dtype, scale=2.0, shift=0.5).contiguous(memory_format=fmt)
    w = randn(Ch, dtype=dtype, shift=1.0)
    b = randn(Ch, dtype=dtype)
    eps = 1e-5
    y = torch.empty_like(x).fill_(float("nan"))
    C.group_norm(ptr(x), ptr(w), ptr(b), ptr(y), N, Ch, HW, G, eps, silu, channels_last,
                 CODE[dtype], stream())
    check(y, *group_norm_refs(x, G, w, b, eps, silu), dtype, f"group_norm {shape}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=IDS.get)
def test_group_norm_no_affine_inplace(C, dtype):
    N, Ch, HW, G = 2, 64, 100, 8
    x = randn(N, Ch, 10, 10, dtype=dtype, scale=3.0, shift=-1.0)
    ref, eager = group_norm_refs(x, G, None, None, 1e-6, False)
    C.group_norm(ptr(x), 0, 0, ptr(x), N, Ch, HW, G, 1e-6, False, False, CODE[dtype], stream())
    check(x, ref, eager, dtype, "group_norm in place")


# ----------------------------------------------------------------------------
# norm_modulate
# ----------------------------------------------------------------------------

NM_CASES = NM_SMALL_CASES + [(2, 4096, 3072, False, True, False)]  # + FLUX


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS.get)
@pytest.mark.parametrize("rms", [False, True], ids=["layernorm", "rmsnorm"])
@pytest.mark.parametrize("case", NM_CASES, ids=lambda c: f"{c[0]}x{c[1]}x{c[2]}")
def test_norm_modulate(C, case, rms, dtype):
    B, L, D, affine, modulate, bcast = case
    eps = 1e-6
    x, w, b, mul, add = nm_inputs(B, L, D, affine, modulate, bcast, rms, dtype)
    y = poison(B, L, D, dtype=dtype)
    C.norm_modulate(ptr(x), ptr(w), ptr(b), ptr(mul), ptr(add), ptr(y), B * L, D, L,
                    0 if bcast else D, 0 if bcast else D, eps, rms, CODE[dtype], stream())

    def run(xx, ww, bb, mm, aa, exact):
        if rms:
            xf = xx.double() if exact else xx.float()
            n = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
            n = n if exact else n.to(xx.dtype)  # diffusers RMSNorm rounds first
            if ww is not None:
                n = n * ww
        else:
            n = F.layer_norm(xx, (D,), ww, bb, eps)
        if mm is not None:
            n = n * mm[:, None, :] + aa[:, None, :]
        return n

    ref = run(d64(x), d64(w), d64(b), d64(mul), d64(add), True)
    eager = run(x, w, b, mul, add, False)
    check(y, ref, eager, dtype, f"norm_modulate {case} rms={rms}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=IDS.get)
def test_norm_modulate_misaligned(C, dtype):
    # x starts one element into its buffer: the 16-byte path must not be taken.
    rows, D = 6, 64
    buf = randn(rows * D + 1, dtype=dtype)
    x = buf[1:].view(rows, D)
    y = poison(rows, D, dtype=dtype)
    C.norm_modulate(ptr(x), 0, 0, 0, 0, ptr(y), rows, D, rows, 0, 0, 1e-5, False, CODE[dtype],
                    stream())
    check(y, F.layer_norm(d64(x), (D,), eps=1e-5), F.layer_norm(x, (D,), eps=1e-5), dtype,
          "norm_modulate misaligned")


# ----------------------------------------------------------------------------
# gemm
# ----------------------------------------------------------------------------

GEMM_SHAPES = [(1, 24, 40), (7, 24, 40), (33, 40, 72), (4096, 3072, 3072)]


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS.get)
@pytest.mark.parametrize("has_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("shape", GEMM_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gemm(C, no_tf32, shape, has_bias, dtype):
    M, N, K = shape
    scale = 1.0 / math.sqrt(K)
    a = randn(M, K, dtype=dtype)
    b = randn(N, K, dtype=dtype, scale=scale)
    bias = randn(N, dtype=dtype) if has_bias else None
    out = poison(M, N, dtype=dtype)
    C.gemm(ptr(a), ptr(b), ptr(bias), ptr(out), M, N, K, K, N, CODE[dtype], stream())
    ref = F.linear(d64(a), d64(b), d64(bias))
    eager = F.linear(a, b, bias)
    check(out, ref, eager, dtype, f"gemm {shape}")


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS.get)
def test_gemm_strided(C, no_tf32, dtype):
    # a is a column slice of a wider buffer (lda > K); out is written into a
    # wider buffer (ldo > N) whose padding must stay untouched.
    M, N, K, pad_a, pad_o = 37, 48, 64, 8, 16
    a_full = randn(M, K + pad_a, dtype=dtype)
    a = a_full[:, :K]
    b = randn(N, K, dtype=dtype, scale=0.125)
    bias = randn(N, dtype=dtype)
    out_full = poison(M, N + pad_o, dtype=dtype)
    C.gemm(ptr(a), ptr(b), ptr(bias), ptr(out_full), M, N, K, K + pad_a, N + pad_o, CODE[dtype],
           stream())
    torch.cuda.synchronize()
    assert torch.isnan(out_full[:, N:]).all(), "gemm wrote past N into the ldo padding"
    check(out_full[:, :N], F.linear(d64(a), d64(b), d64(bias)), F.linear(a, b, bias), dtype,
          "gemm strided")


# ----------------------------------------------------------------------------
# linear_epilogue
# ----------------------------------------------------------------------------

def _run_epilogue(C, M, n_out, act, glu, use_gate, use_res, dtype, batches=2, out_alias=None):
    rpb = -(-M // batches)
    ny = 2 * n_out if glu else n_out
    y = randn(M, ny, dtype=dtype, scale=2.0)
    gate = randn(batches, n_out, dtype=dtype) if use_gate else None
    res = randn(M, n_out, dtype=dtype) if use_res else None
    ref = epilogue_ref(d64(y), d64(gate), d64(res), act, glu, n_out, rpb)
    eager = epilogue_ref(y, gate, res, act, glu, n_out, rpb)
    if out_alias == "y":
        out = y
    elif out_alias == "residual":
        out = res
    else:
        out = poison(M, n_out, dtype=dtype)
    C.linear_epilogue(ptr(y), ptr(gate), ptr(res), ptr(out), M, n_out, act, glu, rpb,
                      n_out if use_gate else 0, CODE[dtype], stream())
    return out, ref, eager


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS.get)
@pytest.mark.parametrize("glu", [False, True], ids=["plain", "glu"])
@pytest.mark.parametrize("act", list(ACTS), ids=ACTS.get)
def test_linear_epilogue_acts(C, act, glu, dtype):
    out, ref, eager = _run_epilogue(C, 37, 72, act, glu, True, True, dtype)
    check(out, ref, eager, dtype, f"epilogue act={ACTS[act]} glu={glu}")


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS.get)
@pytest.mark.parametrize(
    "case",
    [
        (1, 24, 1, False, False, False),
        (7, 24, 3, True, False, True),
        (5, 25, 2, True, True, True),  # N_out % 8 != 0: scalar path
        (2 * 4096, 3072, 0, False, True, True),  # FLUX gated residual
        (2 * 1024, 5120, 1, True, False, False),  # SD GEGLU
    ],
    ids=lambda c: f"{c[0]}x{c[1]}-act{c[2]}-glu{int(c[3])}-g{int(c[4])}-r{int(c[5])}",
)
def test_linear_epilogue_shapes(C, case, dtype):
    M, n, act, glu, g, r = case
    out, ref, eager = _run_epilogue(C, M, n, act, glu, g, r, dtype)
    check(out, ref, eager, dtype, f"epilogue {case}")


@pytest.mark.parametrize("alias", ["y", "residual"])
def test_linear_epilogue_aliasing(C, alias):
    dtype = torch.bfloat16
    out, ref, eager = _run_epilogue(C, 64, 128, 3, False, True, True, dtype, out_alias=alias)
    check(out, ref, eager, dtype, f"epilogue out aliases {alias}")


# ----------------------------------------------------------------------------
# qk_norm_rope
# ----------------------------------------------------------------------------


def _rope_tables(rope_len, D):
    freqs = 1.0 / (10000.0 ** (torch.arange(0, D, 2, device=DEV, dtype=torch.float64) / D))
    pos = torch.arange(rope_len, device=DEV, dtype=torch.float64) * 1.37
    ang = pos[:, None] * freqs[None, :]
    cos = ang.cos().repeat_interleave(2, dim=-1).float().contiguous()
    sin = ang.sin().repeat_interleave(2, dim=-1).float().contiguous()
    return cos, sin


def _qk_ref(x, w, cos, sin, eps, has_norm, off, rope_len, exact):
    """x (B, L, H, D). exact: float64 math; else diffusers' eager numerics."""
    if has_norm:
        xf = x.double() if exact else x.float()
        n = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        if exact:
            n = n * w.double() if w is not None else n
        else:
            n = n.to(x.dtype)
            n = n * w if w is not None else n
    else:
        n = x.double() if exact else x
    if cos is None:
        return n
    L = x.shape[1]
    out = n.clone()
    lo, hi = max(off, 0), min(L, off + rope_len)
    if hi > lo:
        seg = n[:, lo:hi]
        c = cos[lo - off: hi - off][None, :, None, :]
        s = sin[lo - off: hi - off][None, :, None, :]
        re, im = seg.reshape(*seg.shape[:-1], -1, 2).unbind(-1)
        rot = torch.stack([-im, re], dim=-1).flatten(3)
        if exact:
            out[:, lo:hi] = seg * c.double() + rot * s.double()
        else:
            out[:, lo:hi] = (seg.float() * c + rot.float() * s).to(x.dtype)
    return out


def _qk_call(C, x, w, cos, sin, y, eps, has_norm, off, rope_len, dtype):
    B, L, H, D = x.shape
    C.qk_norm_rope(ptr(x), ptr(w), ptr(cos), ptr(sin), ptr(y), B, L, H, D,
                   x.stride(0), x.stride(1), x.stride(2), y.stride(0), y.stride(1), y.stride(2),
                   eps, has_norm, off, rope_len, CODE[dtype], 0, stream())


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS.get)
@pytest.mark.parametrize("which", ["q", "k"])
def test_qk_norm_rope_fused_qkv(C, which, dtype):
    # FLUX: q / k are views into the fused (B, L, 3*H*D) projection output.
    B, L, H, D, eps = 2, 600, 24, 128, 1e-6
    qkv = randn(B, L, 3 * H * D, dtype=dtype, scale=2.0)
    idx = 0 if which == "q" else 1
    x = qkv[..., idx * H * D:(idx + 1) * H * D].view(B, L, H, D)
    w = randn(D, dtype=dtype, scale=0.3, shift=1.0)
    cos, sin = _rope_tables(L, D)
    y = poison(B, L, H, D, dtype=dtype)
    _qk_call(C, x, w, cos, sin, y, eps, True, 0, L, dtype)
    ref = _qk_ref(x, w, cos, sin, eps, True, 0, L, True)
    eager = _qk_ref(x, w, cos, sin, eps, True, 0, L, False)
    check(y, ref, eager, dtype, "qk_norm_rope fused qkv")


QK_CASES = [  # (B, L, H, D, has_norm, weight, rope, rope_off, rope_len)
    (1, 17, 3, 72, True, True, True, 3, 9),  # partial rope window
    (2, 9, 2, 64, True, False, True, 0, 9),  # norm without weight
    (1, 11, 4, 256, False, False, True, 0, 11),  # rope only, D max
    (2, 5, 3, 40, True, True, False, 0, 0),  # norm only
    (1, 8, 2, 2, True, True, True, -2, 4),  # D = 2, negative offset
    # head counts that do not fill a warp's group of heads, at several head sizes
    (1, 19, 5, 128, True, True, True, 4, 9),  # FLUX head size, partial rope window
    (2, 6, 11, 32, True, True, True, 0, 6),
    (1, 5, 40, 16, True, False, True, -1, 5),
    (1, 3, 33, 8, True, True, False, 0, 0),  # norm only
]


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS.get)
@pytest.mark.parametrize("case", QK_CASES, ids=lambda c: f"L{c[1]}H{c[2]}D{c[3]}")
def test_qk_norm_rope_cases(C, case, dtype):
    B, L, H, D, has_norm, has_w, has_rope, off, rlen = case
    eps = 1e-6
    x = randn(B, L, H, D, dtype=dtype, scale=1.5)
    w = randn(D, dtype=dtype, shift=1.0) if has_w else None
    cos, sin = _rope_tables(max(rlen, 1), D) if has_rope else (None, None)
    y = poison(B, L, H, D, dtype=dtype)
    _qk_call(C, x, w, cos, sin, y, eps, has_norm, off, rlen, dtype)
    ref = _qk_ref(x, w, cos, sin, eps, has_norm, off, rlen, True)
    eager = _qk_ref(x, w, cos, sin, eps, has_norm, off, rlen, False)
    check(y, ref, eager, dtype, f"qk_norm_rope {case}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=IDS.get)
def test_qk_norm_rope_inplace_bhld_and_misaligned(C, dtype):
    B, L, H, D, eps = 2, 13, 3, 64, 1e-6
    w = randn(D, dtype=dtype, shift=1.0)
    cos, sin = _rope_tables(L, D)
    # In place on a (B, H, L, D) tensor viewed as (B, L, H, D) through strides.
    xt = randn(B, H, L, D, dtype=dtype)
    x = xt.transpose(1, 2)
    ref = _qk_ref(x, w, cos, sin, eps, True, 0, L, True)
    eager = _qk_ref(x, w, cos, sin, eps, True, 0, L, False)
    _qk_call(C, x, w, cos, sin, x, eps, True, 0, L, dtype)
    check(x, ref, eager, dtype, "qk_norm_rope in place")
    # Odd element offset: pair loads are misaligned, the scalar path must run.
    buf = randn(B * L * H * D + 1, dtype=dtype)
    x2 = buf[1:].view(B, L, H, D)
    y2 = poison(B, L, H, D, dtype=dtype)
    _qk_call(C, x2, w, cos, sin, y2, eps, True, 0, L, dtype)
    check(y2, _qk_ref(x2, w, cos, sin, eps, True, 0, L, True),
          _qk_ref(x2, w, cos, sin, eps, True, 0, L, False), dtype, "qk_norm_rope misaligned")


# ----------------------------------------------------------------------------
# argument validation, graph capture
# ----------------------------------------------------------------------------


def test_bad_arguments(C):
    x = torch.randn(64, device=DEV, dtype=torch.float16)
    p, s = ptr(x), stream()
    with pytest.raises((ValueError, RuntimeError), match="groups"):
        C.group_norm(p, 0, 0, p, 1, 30, 2, 4, 1e-5, False, False, 1, s)
    with pytest.raises((ValueError, RuntimeError), match="D"):
        C.qk_norm_rope(p, 0, 0, 0, p, 1, 1, 1, 5, 0, 0, 0, 0, 0, 0, 1e-6, True, 0, 0, 1, 0, s)
    with pytest.raises((ValueError, RuntimeError), match="lda"):
        C.gemm(p, p, 0, p, 2, 2, 8, 4, 2, 1, s)
    with pytest.raises((ValueError, RuntimeError), match="rows_per_batch"):
        C.norm_modulate(p, 0, 0, 0, 0, p, 2, 8, 0, 0, 0, 1e-6, False, 1, s)
    with pytest.raises((ValueError, RuntimeError), match="act"):
        C.linear_epilogue(p, 0, 0, p, 2, 8, 7, False, 2, 0, 1, s)
    with pytest.raises((ValueError, RuntimeError), match="dtype"):
        C.linear_epilogue(p, 0, 0, p, 2, 8, 0, False, 2, 0, 9, s)


def test_cuda_graph_capture(C):
    """All launches go to the given stream, so a captured graph replays them."""
    dtype, M, N, K = torch.float16, 64, 128, 96
    a = randn(M, K, dtype=dtype)
    wt = randn(N, K, dtype=dtype, scale=0.1)
    bias = randn(N, dtype=dtype)
    h = torch.empty(M, K, device=DEV, dtype=dtype)
    out = torch.empty(M, N, device=DEV, dtype=dtype)
    res = randn(M, N, dtype=dtype)
    fin = torch.empty(M, N, device=DEV, dtype=dtype)

    def step(s):
        C.norm_modulate(ptr(a), 0, 0, 0, 0, ptr(h), M, K, M, 0, 0, 1e-6, False, 1, s)
        C.gemm(ptr(h), ptr(wt), ptr(bias), ptr(out), M, N, K, K, N, 1, s)
        C.linear_epilogue(ptr(out), 0, ptr(res), ptr(fin), M, N, 1, False, M, 0, 1, s)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step(side.cuda_stream)  # warm-up: lazily creates the cuBLASLt state
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    expected = fin.clone()
    fin.fill_(float("nan"))
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        step(torch.cuda.current_stream().cuda_stream)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(fin, expected)
