"""csrc/gemm_gated.cu (CUTLASS sm90) and its use by lyra::linear: out = residual + gate *
(x W^T + b) in one GEMM, against an fp32 reference on fresh random inputs, odd row counts,
per-sample and shared gates, with and without bias; the auto choice, CUDA-graph capture, and
the errors for operands the kernel cannot take."""
import pytest
import torch

import lyradynamo
from kernel_helpers import capture_after_warmup, check_auto_decision, need_cutlass, norm_err
from lyradynamo.ops import gated_gemm, linear

pytestmark = [pytest.mark.cuda, pytest.mark.usefixtures("no_fallback")]
lyra = torch.ops.lyra
DT = [torch.float16, torch.bfloat16]
CODES = {torch.float16: 1, torch.bfloat16: 2}


def _operands(b, t, n, k, per_sample, bias):
    """fp32 operands from torch's generator (seeded per test by seed_from_test_id)."""
    x = torch.randn(b, t, k, device="cuda")
    w = torch.randn(n, k, device="cuda") / k ** 0.5
    bb = torch.randn(n, device="cuda") if bias else None
    gate = torch.randn(b if per_sample else 1, 1, n, device="cuda")
    r = torch.randn(b, t, n, device="cuda")
    return x, w, bb, gate, r


def _check(out, args, dtype):
    """out (dtype) at most 2x as far from the fp32 reference as eager in dtype is."""
    ref = linear.linear_reference(*args[:2], args[2], "none", False, args[3], args[4])
    low = [a.to(dtype) if a is not None else None for a in args]
    eager = linear.linear_reference(*low[:2], low[2], "none", False, low[3], low[4])
    assert out.dtype == dtype and out.shape == ref.shape and torch.isfinite(out).all()
    assert norm_err(out, ref) <= 2 * norm_err(eager, ref) + 1e-6, (norm_err(out, ref), norm_err(eager, ref))


@pytest.mark.parametrize("dtype", DT)
@pytest.mark.parametrize("b,t,n,k", [(1, 4096 + 7, 3072, 3072), (2, 333, 1032, 72), (3, 77, 256, 1024),
                                     (1, 1, 64, 64), (2, 8, 8, 8)])
@pytest.mark.parametrize("per_sample", [True, False])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("variant", [0, 1, 2], ids=["persistent", "streamk", "pingpong"])
def test_kernel_against_reference(dtype, b, t, n, k, per_sample, bias, variant, seed_from_test_id):
    C = need_cutlass()
    args = _operands(b, t, n, k, per_sample, bias)
    x, w, bb, gate, r = (a.to(dtype) if a is not None else None for a in args)
    out = torch.empty_like(r)
    batches = b if per_sample else 1
    C.gemm_gated(x.data_ptr(), w.data_ptr(), 0 if bb is None else bb.data_ptr(), gate.data_ptr(),
                 r.data_ptr(), out.data_ptr(), b * t // batches, batches, n, k, k, k, n if per_sample else 0,
                 CODES[dtype], variant, torch.cuda.current_stream().cuda_stream)
    _check(out, args, dtype)


@pytest.mark.parametrize("dtype", DT)
@pytest.mark.parametrize("mode", ["cutlass", "cublaslt", "auto"])
def test_linear_paths_agree(dtype, mode, fresh_gemm_decisions, seed_from_test_id):
    """lyra::linear's gated residual through each path; auto records its decision."""
    need_cutlass()
    args = _operands(2, 1031, 1536, 640, True, True)
    low = [a.to(dtype) for a in args]
    with lyradynamo.config.patch(gated_gemm=mode):
        out = lyra.linear(low[0], low[1], low[2], "none", False, low[3], low[4])
    _check(out, args, dtype)
    if mode == "auto":
        key = ("gated", 0 if low[0].device.index is None else low[0].device.index, dtype, 2 * 1031, 1536, 640, 2,
               True)
        check_auto_decision(gated_gemm.choices()[key], 2.0 * 2 * 1031 * 1536 * 640)


@pytest.mark.parametrize("m", [4099, 515])
def test_auto_times_whole_paths(m, fresh_gemm_decisions, seed_from_test_id):
    """auto's timings at FLUX-sized shapes, where the GEMM dominates every path: each path's
    time covers its whole GEMM (a capture that missed the GEMM's launch times its epilogue
    only and falls under the floor)."""
    need_cutlass()
    n, k = 3072, 3072
    args = _operands(1, m, n, k, True, True)
    low = [a.to(torch.bfloat16) for a in args]
    with lyradynamo.config.patch(gated_gemm="auto"):
        out = lyra.linear(low[0], low[1], low[2], "none", False, low[3], low[4])
    _check(out, args, torch.bfloat16)
    key = ("gated", torch.cuda.current_device(), torch.bfloat16, m, n, k, 1, True)
    check_auto_decision(gated_gemm.choices()[key], 2.0 * m * n * k)


def test_fused_path_is_taken(monkeypatch, seed_from_test_id):
    """Under "cutlass" the fused kernel runs (no split GEMM, no epilogue kernel)."""
    C = need_cutlass()
    calls = []
    for name in ("gemm", "gemm_ex", "linear_epilogue"):
        real = getattr(C, name)
        monkeypatch.setattr(C, name, lambda *a, _r=real, _n=name: (calls.append(_n), _r(*a))[1])
    args = [a.to(torch.bfloat16) for a in _operands(1, 512, 3072, 3072, False, True)]
    with lyradynamo.config.patch(gated_gemm="cutlass"):
        lyra.linear(args[0], args[1], args[2], "none", False, args[3], args[4])
    assert calls == [], calls


def test_unaligned_shapes_use_the_split_path(seed_from_test_id):
    """K not a multiple of 8: lyra::linear takes cuBLASLt + epilogue, still right; the kernel
    itself refuses with an error that names the rule."""
    C = need_cutlass()
    args = _operands(2, 33, 96, 36, True, True)
    low = [a.to(torch.float16) for a in args]
    with lyradynamo.config.patch(gated_gemm="cutlass"):
        out = lyra.linear(low[0], low[1], low[2], "none", False, low[3], low[4])
    _check(out, args, torch.float16)
    x, w, bb, gate, r = low
    with pytest.raises(ValueError, match="multiples of 8"):
        C.gemm_gated(x.data_ptr(), w.data_ptr(), bb.data_ptr(), gate.data_ptr(), r.data_ptr(),
                     torch.empty_like(r).data_ptr(), 33, 2, 96, 36, 36, 36, 96, 1, 0,
                     torch.cuda.current_stream().cuda_stream)
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        C.gemm_gated(x.data_ptr(), w.data_ptr(), 0, gate.data_ptr(), r.data_ptr(),
                     torch.empty_like(r).data_ptr(), 32, 2, 96, 32, 32, 32, 96, 0, 0,
                     torch.cuda.current_stream().cuda_stream)
    with pytest.raises(ValueError, match="variant"):
        C.gemm_gated(x.data_ptr(), w.data_ptr(), 0, gate.data_ptr(), r.data_ptr(),
                     torch.empty_like(r).data_ptr(), 32, 2, 96, 32, 32, 32, 96, 1, 7,
                     torch.cuda.current_stream().cuda_stream)


def test_cuda_graph_replay_sees_new_inputs(seed_from_test_id):
    """Captured after a warm-up (as the runner does), the fused GEMM replays on new data."""
    need_cutlass()
    args = [a.to(torch.bfloat16) for a in _operands(2, 300, 1024, 512, True, True)]
    with lyradynamo.config.patch(gated_gemm="cutlass"):
        fn = lambda: lyra.linear(args[0], args[1], args[2], "none", False, args[3], args[4])  # noqa: E731
        graph, out = capture_after_warmup(fn)
    for a in (args[0], args[3], args[4]):
        a.copy_(torch.randn_like(a))
    graph.replay()
    ref = linear.linear_reference(*[a.float() for a in args[:3]], "none", False, args[3].float(), args[4].float())
    assert norm_err(out, ref) < 2e-2


@pytest.mark.parametrize("dtype", DT)
def test_weight_column_slice(dtype, seed_from_test_id, monkeypatch):
    """split_cat's parts: the weight is a column slice W[:, a:b] (row stride > K), read in place."""
    C = need_cutlass()
    x, _, bb, gate, r = _operands(1, 777, 512, 256, False, True)
    w_full = torch.randn(512, 256 + 320, device="cuda") / 24
    w_low = w_full.to(dtype)
    real = C.gemm_gated
    for start in (0, 320):
        args = (x, w_full[:, start:start + 256], bb, gate, r)
        low = [x.to(dtype), w_low[:, start:start + 256], bb.to(dtype), gate.to(dtype), r.to(dtype)]
        calls = []
        monkeypatch.setattr(C, "gemm_gated", lambda *a: (calls.append(a), real(*a))[1])
        with lyradynamo.config.patch(gated_gemm="cutlass"):
            out = lyra.linear(low[0], low[1], low[2], "none", False, low[3], low[4])
        assert calls and calls[0][11] == 576, "the kernel read the slice with its row stride"
        _check(out, args, dtype)
