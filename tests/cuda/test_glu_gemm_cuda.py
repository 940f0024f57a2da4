"""csrc/gemm_glu.cu (CUTLASS sm90) and its use by lyra::linear for GLU linears (diffusers'
GEGLU): out = a * gelu(g), [a, g] = x W^T + b, with a from cuBLASLt and g's half in the
CUTLASS GEMM whose epilogue multiplies. Against an fp32 reference on fresh random inputs, odd
row counts, with and without bias; every gated_gemm mode; the fused path taken; CUDA-graph
replay; the errors and fallbacks for what the kernel cannot take."""
import pytest
import torch

import lyradynamo
from kernel_helpers import capture_after_warmup, check_auto_decision, need_cutlass, norm_err
from lyradynamo.ops import gated_gemm, linear

pytestmark = [pytest.mark.cuda, pytest.mark.usefixtures("no_fallback")]
lyra = torch.ops.lyra
DT = [torch.float16, torch.bfloat16]
CODES = {torch.float16: 1, torch.bfloat16: 2}


def _operands(rows, n, k, bias):
    """fp32 x (rows, k), weight (2n, k), bias (2n,) from torch's generator (seeded per test)."""
    x = torch.randn(*rows, k, device="cuda")
    w = torch.randn(2 * n, k, device="cuda") / k ** 0.5
    bb = torch.randn(2 * n, device="cuda") if bias else None
    return x, w, bb


def _check(out, args, dtype, act="gelu"):
    """out (dtype) at most 2x as far from the fp32 reference as eager in dtype is."""
    ref = linear.linear_reference(args[0], args[1], args[2], act, True, None, None)
    low = [a.to(dtype) if a is not None else None for a in args]
    eager = linear.linear_reference(low[0], low[1], low[2], act, True, None, None)
    assert out.dtype == dtype and out.shape == ref.shape and torch.isfinite(out).all()
    assert norm_err(out, ref) <= 2 * norm_err(eager, ref) + 1e-6, (norm_err(out, ref), norm_err(eager, ref))


@pytest.mark.parametrize("dtype", DT)
@pytest.mark.parametrize("m,n,k", [(8192 + 5, 2560, 640), (2048, 5120, 1280), (333, 1032, 72), (1, 64, 64),
                                   (77, 8, 8)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("variant", [0, 1, 2], ids=["persistent", "streamk", "pingpong"])
def test_kernel_against_reference(dtype, m, n, k, bias, variant, seed_from_test_id):
    """The kernel alone: src = the a half (computed in fp32 here and rounded), out = src * gelu(g)."""
    C = need_cutlass()
    x, w, bb = (a.to(dtype) if a is not None else None for a in _operands((m,), n, k, bias))
    src = torch.nn.functional.linear(x.float(), w[:n].float(), None if bb is None else bb[:n].float()).to(dtype)
    out = torch.empty_like(src)
    w_g, b_g = w[n:], None if bb is None else bb[n:]
    C.gemm_glu(x.data_ptr(), w_g.data_ptr(), 0 if b_g is None else b_g.data_ptr(), src.data_ptr(),
               out.data_ptr(), m, n, k, k, k, 1, CODES[dtype], variant, torch.cuda.current_stream().cuda_stream)
    g = torch.nn.functional.linear(x.float(), w_g.float(), None if b_g is None else b_g.float())
    ref = src.float() * torch.nn.functional.gelu(g)
    # one rounding of the product on top of src's: within a few units of the last place
    assert torch.isfinite(out).all()
    assert norm_err(out, ref) < (1e-3 if dtype == torch.float16 else 8e-3), norm_err(out, ref)


@pytest.mark.parametrize("dtype", DT)
@pytest.mark.parametrize("mode", ["cutlass", "cublaslt", "auto"])
@pytest.mark.parametrize("rows", [(2, 1031), (3, 77)])
def test_linear_paths_agree(dtype, mode, rows, fresh_gemm_decisions, seed_from_test_id):
    """lyra::linear's GLU through each path; auto records its decision with a time per path."""
    need_cutlass()
    args = _operands(rows, 1280, 640, True)
    low = [a.to(dtype) for a in args]
    with lyradynamo.config.patch(gated_gemm=mode):
        out = lyra.linear(low[0], low[1], low[2], "gelu", True, None, None)
    _check(out, args, dtype)
    if mode == "auto":
        m = rows[0] * rows[1]
        check_auto_decision(gated_gemm.choices()[("glu", torch.cuda.current_device(), dtype, m, 1280, 640, True)],
                            2.0 * m * 2560 * 640)


def test_auto_times_whole_paths(fresh_gemm_decisions, seed_from_test_id):
    """auto's GLU timings at SDXL's level-1 shape (M 8192 + 3, N 2560 per half, K 640):
    every path's time covers both halves' GEMMs (see the gated test of the same name)."""
    need_cutlass()
    args = _operands((1, 8195), 2560, 640, True)
    low = [a.to(torch.float16) for a in args]
    with lyradynamo.config.patch(gated_gemm="auto"):
        out = lyra.linear(low[0], low[1], low[2], "gelu", True, None, None)
    _check(out, args, torch.float16)
    key = ("glu", torch.cuda.current_device(), torch.float16, 8195, 2560, 640, True)
    check_auto_decision(gated_gemm.choices()[key], 2.0 * 8195 * 5120 * 640)


def _record_calls(monkeypatch, C):
    calls = []
    for name in ("gemm", "gemm_ex", "gemm_glu", "linear_epilogue"):
        real = getattr(C, name)
        monkeypatch.setattr(C, name, lambda *a, _r=real, _n=name: (calls.append(_n), _r(*a))[1])
    return calls


def test_fused_path_is_taken(monkeypatch, seed_from_test_id):
    """Under "cutlass": one half-width cuBLASLt GEMM and gemm_glu, no epilogue kernel."""
    C = need_cutlass()
    calls = _record_calls(monkeypatch, C)
    args = [a.to(torch.bfloat16) for a in _operands((2, 512), 640, 320, True)]
    with lyradynamo.config.patch(gated_gemm="cutlass"):
        lyra.linear(args[0], args[1], args[2], "gelu", True, None, None)
    assert calls == ["gemm", "gemm_glu"], calls


@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
def test_other_activations_use_the_split_path(act, monkeypatch, seed_from_test_id):
    """Only gelu is built into gemm_glu: SwiGLU and tanh-GEGLU keep GEMM + epilogue kernel, right."""
    C = need_cutlass()
    calls = _record_calls(monkeypatch, C)
    args = _operands((2, 100), 256, 128, True)
    low = [a.to(torch.float16) for a in args]
    with lyradynamo.config.patch(gated_gemm="cutlass"):
        out = lyra.linear(low[0], low[1], low[2], act, True, None, None)
    assert "gemm_glu" not in calls and "linear_epilogue" in calls, calls
    _check(out, args, torch.float16, act)


def test_unaligned_shapes_use_the_split_path(seed_from_test_id):
    """K not a multiple of 8: lyra::linear takes GEMM + epilogue, still right; the kernel itself
    refuses with errors that name the rule."""
    C = need_cutlass()
    args = _operands((2, 33), 96, 36, True)
    low = [a.to(torch.float16) for a in args]
    with lyradynamo.config.patch(gated_gemm="cutlass"):
        out = lyra.linear(low[0], low[1], low[2], "gelu", True, None, None)
    _check(out, args, torch.float16)
    x, w, _ = low
    o = torch.empty(66, 96, dtype=torch.float16, device="cuda")
    s = torch.cuda.current_stream().cuda_stream
    with pytest.raises(ValueError, match="multiples of 8"):
        C.gemm_glu(x.data_ptr(), w.data_ptr(), 0, o.data_ptr(), o.data_ptr(), 66, 96, 36, 36, 36, 1, 1, 0, s)
    with pytest.raises(ValueError, match="gelu"):
        C.gemm_glu(x.data_ptr(), w.data_ptr(), 0, o.data_ptr(), o.data_ptr(), 66, 96, 32, 32, 32, 3, 1, 0, s)
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        C.gemm_glu(x.data_ptr(), w.data_ptr(), 0, o.data_ptr(), o.data_ptr(), 66, 96, 32, 32, 32, 1, 0, 0, s)
    with pytest.raises(ValueError, match="non-null"):
        C.gemm_glu(x.data_ptr(), w.data_ptr(), 0, 0, o.data_ptr(), 66, 96, 32, 32, 32, 1, 1, 0, s)


def test_cuda_graph_replay_sees_new_inputs(seed_from_test_id):
    """Captured after a warm-up (as the runner does), the fused pair replays on new data."""
    need_cutlass()
    args = [a.to(torch.bfloat16) for a in _operands((2, 300), 1024, 512, True)]
    with lyradynamo.config.patch(gated_gemm="cutlass"):
        fn = lambda: lyra.linear(args[0], args[1], args[2], "gelu", True, None, None)  # noqa: E731
        graph, out = capture_after_warmup(fn)
    args[0].copy_(torch.randn_like(args[0]))
    graph.replay()
    ref = linear.linear_reference(*[a.float() for a in args], "gelu", True, None, None)
    assert norm_err(out, ref) < 2e-2
