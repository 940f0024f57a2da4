"""lyra::qkv_projection on the GPU, both paths (config.gated_gemm): cutlass, the q / k / v GEMM
with the q / k RMSNorm and RoPE in its epilogue (csrc/gemm_qk_norm_rope.cu), and cublaslt,
cuBLASLt GEMMs + the norm and RoPE in place; each part writing its rows of one buffer. Against
an fp32 reference on fresh random inputs (odd token counts, several parts, batch > 1, with and
without bias), inside a CUDA graph, auto's choice, in a compiled FLUX, and the errors for what the
kernel cannot take."""
import pytest
import torch

import lyradynamo
from kernel_helpers import need_cutlass, norm_err
from lyradynamo import config, ops
from lyradynamo.ops import gated_gemm
from lyradynamo.ops import qkv_projection as qp
from helpers import flux_heads, run_flux  # noqa: E402

pytestmark = [pytest.mark.cuda]
lyra = torch.ops.lyra
DT = [torch.float16, torch.bfloat16]


def _call(parts, heads, k, batch, bias, seed=0):
    """fp32 arguments of lyra::qkv_projection on the GPU (RoPE tables of unit-circle pairs, as
    FLUX's)."""
    g = torch.Generator(device="cuda").manual_seed(seed)

    def r(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, device="cuda") * scale

    d = 128
    xs = [r(batch, n, k) for n in parts]
    weights = [r(heads * d, k, scale=k ** -0.5) for _ in parts for _ in range(3)]
    biases = [r(heads * d, scale=0.5) for _ in parts for _ in range(3)] if bias else []
    q_norms = [1.0 + r(d, scale=0.2) for _ in parts]
    k_norms = [1.0 + r(d, scale=0.2) for _ in parts]
    length = sum(parts)
    angle = r(length, d // 2) * 3.0
    cos = angle.cos().repeat_interleave(2, dim=1).contiguous()
    sin = angle.sin().repeat_interleave(2, dim=1).contiguous()
    return [xs, weights, biases, q_norms, k_norms, heads, 1e-6, cos, sin]


def _low(args, dtype):
    """The call in dtype, its weights joined per part (as passes/shared_input.py leaves them)."""
    xs, weights, biases, qn, kn, heads, eps, cos, sin = args
    n = len(xs)
    ws, bs = [], []
    for i in range(n):
        buf = torch.cat(weights[3 * i:3 * i + 3]).to(dtype)
        ws += list(buf.split(weights[0].shape[0]))
        if biases:
            bb = torch.cat(biases[3 * i:3 * i + 3]).to(dtype)
            bs += list(bb.split(weights[0].shape[0]))
    return [[x.to(dtype) for x in xs], ws, bs, [t.to(dtype) for t in qn], [t.to(dtype) for t in kn], heads, eps,
            cos, sin]


def _check(out, args, dtype):
    """out at most 2x as far from the fp32 reference as the eager op order in dtype is."""
    ref = qp.qkv_projection_reference(*args)
    eager = qp.qkv_projection_reference(*_low(args, dtype))
    assert out.dtype == dtype and out.shape == ref.shape and torch.isfinite(out).all()
    assert norm_err(out, ref) <= 2 * norm_err(eager, ref) + 1e-6, (norm_err(out, ref), norm_err(eager, ref))


@pytest.mark.parametrize("dtype", DT)
@pytest.mark.parametrize("parts,heads,k,batch", [((512, 4096), 24, 3072, 1), ((77, 300 + 5), 2, 136, 2),
                                                 ((1,), 1, 64, 3), ((4608,), 3, 256, 1), ((9, 250, 3), 2, 72, 2)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("path", ["cutlass", "cublaslt"])
def test_op_against_reference(dtype, parts, heads, k, batch, bias, path):
    need_cutlass()
    args = _call(parts, heads, k, batch, bias)
    ops.reset_fallback_counts()
    with config.patch(gated_gemm=path):
        out = lyra.qkv_projection(*_low(args, dtype))
    assert not [key for key in ops.fallback_counts() if key[0] == "qkv_projection"], ops.fallback_counts()
    _check(out, args, dtype)


@pytest.mark.parametrize("dtype", DT)
def test_paths_agree_with_the_graph_they_replace(dtype):
    """Both paths against lyra::linear_group + lyra::qk_norm_rope3 + cat (same rounding steps:
    the GEMMs' and the norm's fp32 summation orders differ); auto records what it chose."""
    need_cutlass()
    low = _low(_call((77, 1000), 4, 512, 2, True), dtype)
    unfused = qp._unfused(*low, reason="test")
    for path in ("cutlass", "cublaslt", "auto"):
        with config.patch(gated_gemm=path):
            out = lyra.qkv_projection(*low)
        assert norm_err(out, unfused) < (8e-3 if dtype == torch.bfloat16 else 1e-3), path
    chosen = [v for key, v in gated_gemm.choices().items() if key[0] == "qkv" and key[3] == "77+1000"]
    assert chosen and chosen[-1]["path"] in ("cutlass", "cublaslt")


@pytest.mark.parametrize("path", ["cutlass", "cublaslt"])
def test_replays_in_a_cuda_graph_and_sees_new_inputs(path):
    need_cutlass()
    low = _low(_call((33, 200), 2, 128, 1, True), torch.bfloat16)
    with config.patch(gated_gemm=path):
        lyra.qkv_projection(*low)  # first call outside capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = lyra.qkv_projection(*low)
        for x in low[0]:
            x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, lyra.qkv_projection(*low))


def test_compiled_flux_uses_it_and_matches_without():
    """A tiny FLUX with 128-channel heads: the pass rewrites both attentions, the kernel runs
    (no fallback), and the output is as close to eager as the unfused graph's."""
    need_cutlass()
    model = flux_heads(dtype=torch.bfloat16).cuda()
    outs = {}
    for on in (True, False):
        torch._dynamo.reset()
        lyradynamo.reset_stats()
        ops.reset_fallback_counts()
        with config.patch(qkv_projection=on):
            compiled = torch.compile(model, backend="lyra")
            run_flux(compiled)  # compiles and captures
            outs[on] = run_flux(compiled, seed=1)  # a replay with new inputs
        (rec,) = lyradynamo.compiled_graphs()
        hits = [label for label in rec.report.matched.get("rope", {}) if "into one buffer" in label]
        assert bool(hits) == on
        assert not [key for key in ops.fallback_counts() if key[0] == "qkv_projection"]
    ref = run_flux(model, seed=1)
    assert norm_err(outs[True], ref) <= 1.5 * norm_err(outs[False], ref) + 1e-3


def test_compiled_at_batch_one_serves_batch_two_without_recompiling():
    """FLUX compiled (and captured) at batch 1 then called at batch 2 and another size: one
    compilation (shape_policy traces the .contiguous() of the attention output's split without
    its B == 1 guard), each output as close to eager as at batch 1 (the batch-2 contiguous copy
    and the joint buffer's batch strides on the GPU)."""
    from lyradynamo import zoo

    model = flux_heads(dtype=torch.bfloat16).cuda()
    torch._dynamo.reset()
    lyradynamo.reset_stats()
    compiled = torch.compile(model, backend="lyra")
    errs = []
    with torch.no_grad():
        for b, hw in ((1, 32), (2, 32), (1, 48), (2, 48)):
            inputs = zoo.denoiser_inputs("flux", model, batch=b, height=hw, width=hw, seed=b)
            got = compiled(**inputs)[0]
            errs.append(norm_err(got, model(**inputs)[0]))
    assert lyradynamo.compile_count() == 1
    assert max(errs) <= 2 * errs[0] + 1e-3, errs


def test_kernel_errors_name_the_problem():
    C = need_cutlass()
    x = torch.zeros(8, 64, device="cuda", dtype=torch.bfloat16)
    w = torch.zeros(3 * 64, 64, device="cuda", dtype=torch.bfloat16)
    nw = torch.zeros(64, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(8, 3 * 64, device="cuda", dtype=torch.bfloat16)
    s = torch.cuda.current_stream().cuda_stream
    with pytest.raises(ValueError, match="head_dim must be 128"):
        C.gemm_qk_norm_rope(x.data_ptr(), w.data_ptr(), 0, out.data_ptr(), nw.data_ptr(), nw.data_ptr(), 0, 0,
                            8, 1, 192, 64, 64, 64, 8 * 192, 1, 64, 0, 0, 1e-6, 2, s)
    with pytest.raises(ValueError, match="N must be 3"):
        C.gemm_qk_norm_rope(x.data_ptr(), w.data_ptr(), 0, out.data_ptr(), nw.data_ptr(), nw.data_ptr(), 0, 0,
                            8, 1, 192, 64, 64, 64, 8 * 192, 1, 128, 0, 0, 1e-6, 2, s)
    with pytest.raises(ValueError, match="dtype"):
        C.gemm_qk_norm_rope(x.data_ptr(), w.data_ptr(), 0, out.data_ptr(), nw.data_ptr(), nw.data_ptr(), 0, 0,
                            8, 1, 384, 64, 64, 64, 8 * 384, 1, 128, 0, 0, 1e-6, 0, s)


def test_op_falls_back_with_a_log_when_weights_are_not_joined():
    """Weights that are not adjacent rows of one buffer (a replaced Parameter): the unfused path,
    recorded as a fallback, same result."""
    need_cutlass()
    args = _call((40, 90), 2, 64, 1, True)
    low = _low(args, torch.bfloat16)
    apart = list(low)
    apart[1] = [w.clone() for w in low[1]]
    ops.reset_fallback_counts()
    out = lyra.qkv_projection(*apart)
    assert [key for key in ops.fallback_counts() if key[0] == "qkv_projection"]
    _check(out, args, torch.bfloat16)
