"""conv_bias on CUDA: lyra::group_norm(pre_bias=...) and lyra::bias_residual run their csrc kernels
(no fallback) and match their references; the tiny UNets under lyra keep eager's numbers.

Tolerances (project rule): a float16 / bfloat16 result may be at most 2x as far from a float64
reference as eager in the same dtype (plus 1e-6); float32 within 1e-5 relative. Against the op's
own reference (fp32 inside, one rounding) the kernel may differ by a rounding unit."""
import pytest
import torch
import torch.nn.functional as F

import lyradynamo
from lyradynamo import zoo
from lyradynamo.ops import _common
from lyradynamo.ops import bias_residual as br_op
from lyradynamo.ops import group_norm as gn_op
from kernel_helpers import CODE, DEV, IDS, ptr, stream
from helpers import rel_err as err

pytestmark = [pytest.mark.cuda, pytest.mark.usefixtures("seed_from_test_id")]
lyra = torch.ops.lyra
DTYPES = [torch.float16, torch.bfloat16, torch.float32]
MY_OPS = ("group_norm", "bias_residual")



def fmt(channels_last):
    return torch.channels_last if channels_last else torch.contiguous_format


def rand(*shape, dtype, scale=1.0, shift=0.0):
    return (torch.randn(*shape, device=DEV) * scale + shift).to(dtype)


def check(out, exact, eager, dtype, what):
    torch.cuda.synchronize()
    assert out.dtype == dtype and torch.isfinite(out).all(), what
    if dtype == torch.float32:
        assert err(out, exact) < 1e-5, (what, err(out, exact))
    else:
        assert err(out, exact) <= 2 * err(eager, exact) + 1e-6, (what, err(out, exact), err(eager, exact))


def close_to_reference(out, ref, dtype):
    """Both round an fp32 value once: at most a unit or so apart."""
    tol = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 1e-5}[dtype]
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)


# ---- lyra::group_norm(pre_bias=...) ------------------------------------------------------------

GN_CASES = [  # (N, C, H, W), groups
    ((2, 24, 5, 7), 3),  # H*W odd: NCHW scalar path
    ((3, 20, 3, 3), 4),  # cpg 5: NHWC scalar path
    ((2, 96, 7, 9), 32),  # cpg 3
    ((2, 320, 32, 32), 32),  # SD 1.5 at 256 px: cpg 10, NHWC 2-wide
    ((2, 640, 16, 24), 32),  # cpg 20, NHWC 4-wide
    ((1, 1280, 8, 8), 32),  # cpg 40, NHWC 8-wide
    ((8, 128, 32, 32), 32),  # many groups: one block per group
]


def _pre_bias(kind, n, c, dtype):
    shape = {"C": (c,), "NC": (n, c), "1C": (1, c)}[kind]
    return rand(*shape, dtype=dtype, scale=3.0)


def _gn_expected(x, groups, w, b, act, *pre_biases):
    """(float64 result, eager in x's dtype: x + each pre-bias in turn, rounded after each add,
    then the norm, then SiLU); None pre-biases are skipped."""
    x64, xe = x.double(), x
    for pb in (t for t in pre_biases if t is not None):
        x64 = x64 + pb.double().reshape(-1, x.shape[1], 1, 1)
        xe = xe + pb.reshape(-1, x.shape[1], 1, 1)
    exact = F.group_norm(x64, groups, w.double(), b.double(), 1e-5)
    eager = F.group_norm(xe, groups, w, b, 1e-5)
    if act == "silu":
        exact, eager = F.silu(exact), F.silu(eager)
    return exact, eager


@pytest.mark.usefixtures("no_fallback")
@pytest.mark.parametrize("dtype", DTYPES, ids=IDS.get)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("kind", [None, "C", "NC", "1C"], ids=lambda k: f"pre_bias_{k}")
@pytest.mark.parametrize("case", GN_CASES, ids=lambda c: "x".join(map(str, c[0])) + f"g{c[1]}")
def test_group_norm_pre_bias(case, kind, channels_last, dtype):
    shape, groups = case
    n, c = shape[:2]
    act = "silu" if kind != "1C" else "none"
    x = rand(*shape, dtype=dtype, scale=2.0, shift=0.5).contiguous(memory_format=fmt(channels_last))
    w, b = rand(c, dtype=dtype, scale=0.3, shift=1.0), rand(c, dtype=dtype)
    pb = _pre_bias(kind, n, c, dtype) if kind else None
    out = lyra.group_norm(x, groups, w, b, 1e-5, act, channels_last, pb)
    assert out.stride() == x.stride()
    exact, eager = _gn_expected(x, groups, w, b, act, pb)
    check(out, exact, eager, dtype, f"group_norm {shape} pre_bias={kind}")
    close_to_reference(out, gn_op.group_norm_reference(x, groups, w, b, 1e-5, act, channels_last, pb), dtype)


@pytest.mark.usefixtures("no_fallback")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=IDS.get)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_group_norm_pre_bias_strided_and_misaligned(dtype, channels_last):
    """Rows of a wider (N, 2C) tensor (batch stride 2C), and rows at an odd element offset
    (vector loads misaligned: the kernel picks narrower vectors)."""
    n, c, groups = 2, 320, 32
    x = rand(n, c, 8, 12, dtype=dtype, scale=2.0).contiguous(memory_format=fmt(channels_last))
    w, b = rand(c, dtype=dtype, shift=1.0), rand(c, dtype=dtype)
    wide = rand(n, 2 * c, dtype=dtype, scale=3.0)[:, c // 2: c // 2 + c]
    odd = rand(n * c + 1, dtype=dtype, scale=3.0)[1:].view(n, c)
    for pb in (wide, odd):
        out = lyra.group_norm(x, groups, w, b, 1e-5, "silu", channels_last, pb)
        exact, eager = _gn_expected(x, groups, w, b, "silu", pb)
        check(out, exact, eager, dtype, f"group_norm pre_bias strides {pb.stride()}")


@pytest.mark.usefixtures("no_fallback")
@pytest.mark.parametrize("dtype", DTYPES, ids=IDS.get)
@pytest.mark.parametrize("rows", [False, True], ids=["clusters", "rows"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("kinds", [("NC", "C"), ("C", "NC"), ("1C", "C"), ("NC", "NC")], ids="+".join)
@pytest.mark.parametrize("case", GN_CASES, ids=lambda c: "x".join(map(str, c[0])) + f"g{c[1]}")
def test_group_norm_two_pre_biases(case, kinds, channels_last, rows, dtype):
    """pre_bias + pre_bias2 (a ResNet block's time embedding and conv1's bias): the kernel
    reads x + (pb + pb2) in fp32, on group_norm.cu's clusters and on the rows path."""
    if rows and not channels_last:
        pytest.skip("the rows path is channels_last only")
    shape, groups = case
    n, c = shape[:2]
    x = rand(*shape, dtype=dtype, scale=2.0, shift=0.5).contiguous(memory_format=fmt(channels_last))
    w, b = rand(c, dtype=dtype, scale=0.3, shift=1.0), rand(c, dtype=dtype)
    pb, pb2 = (_pre_bias(k, n, c, dtype) for k in kinds)
    with lyradynamo.config.patch(group_norm_rows=rows):
        out = lyra.group_norm(x, groups, w, b, 1e-5, "silu", channels_last, pb, pb2)
        only_second = lyra.group_norm(x, groups, w, b, 1e-5, "silu", channels_last, None, pb2)
        only_first = lyra.group_norm(x, groups, w, b, 1e-5, "silu", channels_last, pb2)
    assert out.stride() == x.stride()
    exact, eager = _gn_expected(x, groups, w, b, "silu", pb, pb2)
    check(out, exact, eager, dtype, f"group_norm {shape} pre_biases {kinds}")
    close_to_reference(out, gn_op.group_norm_reference(x, groups, w, b, 1e-5, "silu", channels_last, pb, pb2), dtype)
    # a lone second pre-bias is the same as a lone first one, bit for bit
    torch.testing.assert_close(only_second, only_first, rtol=0, atol=0)


@pytest.mark.usefixtures("no_fallback")
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_group_norm_two_pre_biases_strided_misaligned_in_a_graph(channels_last):
    """The second pre-bias as rows of a wider tensor and at an odd offset (the rows path's
    vectors narrow; the cluster path stages it in shared memory), and a CUDA-graph replay
    that reads new pre-bias values in place."""
    dtype, n, c, groups = torch.float16, 2, 320, 32
    x = rand(n, c, 16, 12, dtype=dtype, scale=2.0).contiguous(memory_format=fmt(channels_last))
    w, b = rand(c, dtype=dtype, shift=1.0), rand(c, dtype=dtype)
    pb = rand(n, 2 * c, dtype=dtype, scale=3.0)[:, 7: 7 + c]
    pb2 = rand(c + 1, dtype=dtype, scale=3.0)[1:]
    for rows in (False, True):
        with lyradynamo.config.patch(group_norm_rows=rows):
            out = lyra.group_norm(x, groups, w, b, 1e-5, "silu", channels_last, pb, pb2)
            exact, eager = _gn_expected(x, groups, w, b, "silu", pb, pb2)
            check(out, exact, eager, dtype, f"strided pre-biases rows={rows}")
            graph = torch.cuda.CUDAGraph()
            lyra.group_norm(x, groups, w, b, 1e-5, "silu", channels_last, pb, pb2)  # warm-up
            torch.cuda.synchronize()
            with torch.cuda.graph(graph):
                y = lyra.group_norm(x, groups, w, b, 1e-5, "silu", channels_last, pb, pb2)
            pb2.mul_(-1.5)  # patched in place: the replay reads the new values
            graph.replay()
            exact, eager = _gn_expected(x, groups, w, b, "silu", pb, pb2)
            check(y, exact, eager, dtype, f"replay after an in-place pre-bias change rows={rows}")


def _falls_back_recorded(x, groups, pb, reason_part):
    """lyra::group_norm(x, pre_bias=pb) runs the reference, counted as a fallback naming why."""
    _common.reset_fallback_counts()
    out = lyra.group_norm(x, groups, None, None, 1e-5, "none", False, pb)
    assert any(op == "group_norm" and reason_part in why for op, why in _common.fallback_counts())
    _common.reset_fallback_counts()
    ref = gn_op.group_norm_reference(x, groups, None, None, 1e-5, "none", False, pb)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_group_norm_wide_groups_with_pre_bias_fall_back_recorded():
    """C / groups over the staged row's limit: the reference runs, logged as a fallback."""
    c = 2 * gn_op.MAX_PRE_BIAS_CPG + 2
    _falls_back_recorded(rand(1, c, 1, 2, dtype=torch.float16), 1, rand(c, dtype=torch.float16), "channels per group")


@pytest.mark.usefixtures("no_fallback")
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_group_norm_pre_bias_at_the_staged_row_limit(channels_last):
    """C / groups exactly at the limit: the kernel runs (its dynamic shared memory fits)."""
    c = gn_op.MAX_PRE_BIAS_CPG
    x = rand(2, c, 2, 3, dtype=torch.float16, scale=2.0).contiguous(memory_format=fmt(channels_last))
    w, b = rand(c, dtype=torch.float16, shift=1.0), rand(c, dtype=torch.float16)
    pb, pb2 = rand(2, c, dtype=torch.float16, scale=3.0), rand(c, dtype=torch.float16)
    out = lyra.group_norm(x, 1, w, b, 1e-5, "silu", channels_last, pb, pb2)
    exact, eager = _gn_expected(x, 1, w, b, "silu", pb, pb2)
    check(out, exact, eager, torch.float16, "group_norm at the staged row limit")


def test_group_norm_pre_bias_dtype_mismatch_falls_back_recorded():
    _falls_back_recorded(rand(2, 16, 4, 4, dtype=torch.float16), 4, rand(2, 16, dtype=torch.float32), "pre_bias")


# ---- lyra::bias_residual ----------------------------------------------------------------------

BR_SHAPES = [(2, 12, 5, 7), (1, 3, 7, 9), (3, 5, 1, 1), (1, 1, 4, 6), (2, 320, 32, 32), (2, 640, 16, 24)]
BR_PARTS = [(True, True, 1.0), (True, False, 1.0), (False, True, 0.5), (True, True, 1 / 1.4142)]


def _br_expected(y, bias, res, scale):
    exact, eager = y.double(), y
    if bias is not None:
        exact, eager = exact + bias.double()[:, None, None], eager + bias[:, None, None]
    if res is not None:
        exact, eager = exact + res.double(), eager + res
    return exact * scale, eager * scale


@pytest.mark.usefixtures("no_fallback")
@pytest.mark.parametrize("dtype", DTYPES, ids=IDS.get)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("parts", BR_PARTS, ids=lambda p: f"bias{int(p[0])}_res{int(p[1])}_s{p[2]:.3f}")
@pytest.mark.parametrize("shape", BR_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_bias_residual(shape, parts, channels_last, dtype):
    with_bias, with_res, scale = parts
    y = rand(*shape, dtype=dtype, scale=2.0).contiguous(memory_format=fmt(channels_last))
    bias = rand(shape[1], dtype=dtype) if with_bias else None
    res = rand(*shape, dtype=dtype).contiguous(memory_format=fmt(channels_last)) if with_res else None
    out = lyra.bias_residual(y, bias, res, scale)
    assert out.stride() == y.stride()
    exact, eager = _br_expected(y, bias, res, scale)
    check(out, exact, eager, dtype, f"bias_residual {shape}")
    # the reference does the same fp32 adds in the same order and rounds once
    ref = br_op.bias_residual_reference(y, bias, res, scale)
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(out, ref, rtol=eps, atol=torch.finfo(dtype).tiny)


@pytest.mark.usefixtures("no_fallback")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=IDS.get)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_bias_residual_misaligned(dtype, channels_last):
    """Tensors at an odd element offset: narrower vectors, same results."""
    shape = (2, 64, 6, 10)
    numel = 2 * 64 * 60

    def odd(t):
        buf = torch.empty(numel + 1, device=DEV, dtype=dtype)
        v = buf[1:].view(shape[0], shape[2], shape[3], shape[1]).permute(0, 3, 1, 2) if channels_last \
            else buf[1:].view(shape)
        return v.copy_(t)

    y, res = odd(rand(*shape, dtype=dtype)), odd(rand(*shape, dtype=dtype))
    bias = rand(65, dtype=dtype)[1:]
    out = lyra.bias_residual(y, bias, res, 1.0)
    exact, eager = _br_expected(y, bias, res, 1.0)
    check(out, exact, eager, dtype, "bias_residual misaligned")


def test_bias_residual_mixed_layouts_fall_back_recorded():
    y = rand(2, 8, 4, 4, dtype=torch.float16).contiguous(memory_format=torch.channels_last)
    res = rand(2, 8, 4, 4, dtype=torch.float16)
    _common.reset_fallback_counts()
    out = lyra.bias_residual(y, None, res, 1.0)
    assert any(op == "bias_residual" for op, _ in _common.fallback_counts())
    _common.reset_fallback_counts()
    assert out.stride() == y.stride()
    torch.testing.assert_close(out, y + res, rtol=0, atol=0)


# ---- the raw kernels: in place, bad arguments ----------------------------------------------------

@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_raw_bias_residual_in_place(C, channels_last):
    dtype = torch.float16
    y = rand(2, 40, 6, 6, dtype=dtype).contiguous(memory_format=fmt(channels_last))
    res = rand(2, 40, 6, 6, dtype=dtype).contiguous(memory_format=fmt(channels_last))
    bias = rand(40, dtype=dtype)
    expect = br_op.bias_residual_reference(y, bias, res, 2.0)
    C.bias_residual(ptr(y), ptr(bias), ptr(res), ptr(y), 2, 40, 36, channels_last, 2.0, CODE[dtype], stream())
    torch.cuda.synchronize()
    torch.testing.assert_close(y, expect, rtol=torch.finfo(dtype).eps, atol=0)


def test_raw_bad_arguments(C):
    x = torch.randn(64, device=DEV, dtype=torch.float16)
    p, s = ptr(x), stream()
    with pytest.raises((ValueError, RuntimeError), match="pre_bias_bstride"):
        C.group_norm(p, 0, 0, p, 2, 8, 2, 4, 1e-5, False, False, 1, s, pre_bias=0, pre_bias_bstride=8)
    with pytest.raises((ValueError, RuntimeError), match="pre_bias_bstride"):
        C.group_norm(p, 0, 0, p, 2, 8, 2, 4, 1e-5, False, False, 1, s, pre_bias=p, pre_bias_bstride=4)
    with pytest.raises((ValueError, RuntimeError), match="N must be positive"):
        C.bias_residual(p, 0, 0, p, 0, 8, 2, False, 1.0, 1, s)
    with pytest.raises((ValueError, RuntimeError), match="dtype"):
        C.bias_residual(p, 0, 0, p, 1, 8, 2, False, 1.0, 7, s)


# ---- whole tiny UNets -------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["sd15", "sdxl"])
def test_tiny_unet_conv_bias_on_cuda(name):
    ref32 = zoo.build_denoiser(name, dtype=torch.float32, device="cuda")
    model = zoo.build_denoiser(name, dtype=torch.float16, device="cuda")
    compiled = torch.compile(model, backend="lyra")
    _common.reset_fallback_counts()
    with torch.no_grad():
        for i, (b, h, w) in enumerate([(2, 64, 64), (1, 64, 96), (3, 96, 64)]):
            inp = zoo.denoiser_inputs(name, model, batch=b, height=h, width=w, seed=i)
            inp32 = zoo.denoiser_inputs(name, ref32, batch=b, height=h, width=w, seed=i)
            with torch.compiler.set_stance("fail_on_recompile" if i else "default"):
                out = compiled(**inp)[0]
            exact = ref32(**inp32)[0]
            e_lyra, e_eager = err(out, exact), err(model(**inp)[0], exact)
            assert e_lyra <= 2 * e_eager + 1e-3, (name, b, h, w, e_lyra, e_eager)
    mine = {k: v for k, v in _common.fallback_counts().items() if k[0] in MY_OPS}
    assert mine == {}, mine
    assert lyradynamo.compile_count() == 1
    matched = lyradynamo.compiled_graphs()[0].summary["matched"]
    hits = matched["conv_bias"]
    assert hits.get("conv+bias+add->group_norm", 0) > 0
    # the ResNet shortcut (a 1x1 conv): conv_bias joins its bias to conv2's, unless the conv1x1
    # pass (before conv_bias, on by default) made it a GEMM; conv2 then takes it as its residual
    assert (hits.get("conv+bias+residual(conv+bias)", 0) > 0
            or sum(matched.get("conv1x1", {}).values()) > 0 and hits.get("conv+bias+residual", 0) > 0), matched
