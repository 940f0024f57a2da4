"""FP8 attention on CUDA: the scales kernel and the quantising q / k norm + RoPE kernel
bit-exact with their references (odd sizes, strided parts of a fused projection, every
dtype), cuDNN's fp8 SDPA close to the reference, all of it under CUDA-graph capture, and a
compiled model with fp8 attention and no fallback."""
import math

import pytest
import torch

import lyradynamo
from lyradynamo import zoo
from lyradynamo.ops import attention_fp8 as fa
from lyradynamo.quant import numerics

pytestmark = [pytest.mark.cuda]
lyra = torch.ops.lyra
DT = [torch.float16, torch.bfloat16, torch.float32]
IDS = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
needs_cudnn = pytest.mark.skipif(fa.unavailable_reason(torch.device("cuda")) is not None,
                                 reason=f"{fa.unavailable_reason(torch.device('cuda'))}")


def _bytes(t):
    return t.view(torch.int8)


def _fused_projection(b, length, h, d, dtype, n_proj=3, scale=1.0):
    """q, k, v as strided (B, L, H, D) views of one (B, L, n_proj*H*D) projection output."""
    y = (torch.randn(b, length, n_proj * h * d, device="cuda") * scale).to(dtype)
    return [y[..., i * h * d:(i + 1) * h * d].unflatten(-1, (h, d)) for i in range(n_proj)]


def _tables(length, d):
    ang = torch.randn(length, d // 2, device="cuda")
    return ang.cos().repeat_interleave(2, -1).contiguous(), ang.sin().repeat_interleave(2, -1).contiguous()


@pytest.mark.usefixtures("no_fallback")
@pytest.mark.parametrize("dtype", DT, ids=IDS.get)
@pytest.mark.parametrize("b,lens,h,d", [(1, (512, 4096), 24, 128), (2, (7, 33), 3, 48), (3, (5,), 5, 20)])
def test_scales_kernel_is_exact(dtype, b, lens, h, d):
    q = [p[0] for p in (_fused_projection(b, n, h, d, dtype, scale=3) for n in lens)]
    k = [torch.randn(b, n, h, d, device="cuda").to(dtype) * 2 for n in lens]
    v = [p[2] for p in (_fused_projection(b, n, h, d, dtype, scale=5) for n in lens)]
    v[-1][0, -1, -1, -1] = -1000.0  # the last element of the last part
    ws = [(1 + 0.2 * torch.randn(d, device="cuda")).to(dtype) for _ in lens]
    for args in ((q, k, v, [], []), ([], [], v, ws, ws), (q, [], v, [], ws)):
        got = lyra.attention_fp8_scales(*args)
        assert torch.equal(got, fa.scales_reference(*args)), (got, fa.scales_reference(*args))
    assert lyra.attention_fp8_scales(q, k, v, [], [])[8].item() == pytest.approx(1000.0 / 448)


@pytest.mark.usefixtures("no_fallback")
def test_scales_kernel_empty_and_nan():
    v = torch.empty(2, 0, 3, 16, device="cuda", dtype=torch.bfloat16)
    w = torch.ones(16, device="cuda", dtype=torch.bfloat16)
    s = lyra.attention_fp8_scales([], [], [v], [w], [w])
    assert torch.equal(s, fa.scales_reference([], [], [v], [w], [w]))  # amax of nothing: the floor
    x = torch.randn(2, 9, 3, 16, device="cuda", dtype=torch.bfloat16)
    x[1, 4, 2, 7] = float("nan")
    assert torch.isnan(lyra.attention_fp8_scales([x], [x], [x], [], [])[0:12:4]).all()


@pytest.mark.usefixtures("no_fallback")
@pytest.mark.parametrize("dtype", DT, ids=IDS.get)
@pytest.mark.parametrize("b,lens,h,d", [(1, (512, 4096), 24, 128), (2, (7, 33), 3, 64), (1, (5,), 5, 20)])
def test_qkv_quant_is_exact(dtype, b, lens, h, d):
    projections = [_fused_projection(b, n, h, d, dtype, scale=2) for n in lens]
    parts = [p[0] for p in projections]
    ws = [(1 + 0.2 * torch.randn(d, device="cuda")).to(dtype) for _ in lens]
    cos, sin = _tables(sum(lens), d)
    s = lyra.attention_fp8_scales([], [], [p[2] for p in projections], ws, ws)
    for args in ((parts, ws, "rms", 1e-6, cos, sin, s, 0),
                 ([p[2] for p in projections], [], "none", 0.0, None, None, s, 2),
                 ([p[1] for p in projections], [], "none", 0.0, cos, sin, s, 1)):
        got = lyra.qkv_quant(*args)
        ref = fa.qkv_quant_reference(*args)
        assert got.dtype == torch.float8_e4m3fn and got.shape == ref.shape
        if args[2] == "none":  # copy (+ RoPE) and quantise: the same fp32 operations
            assert torch.equal(_bytes(got), _bytes(ref))
        else:  # RMSNorm: the kernel's sum of squares runs in another order (rstd +-1 ulp, which
            # RoPE's difference of products can magnify in a small output): rare, small changes
            assert (_bytes(got) != _bytes(ref)).float().mean() < 1e-3
            assert numerics.sqnr_db(ref.float(), got.float()) > 40


def _check_close_bytes(got, ref, exact):
    assert got.dtype == torch.float8_e4m3fn and got.shape == ref.shape
    if exact:
        assert torch.equal(_bytes(got), _bytes(ref))
    else:  # RMSNorm statistics summed in another order: rare one-step changes
        assert (_bytes(got) != _bytes(ref)).float().mean() < 1e-3
        assert numerics.sqnr_db(ref.float(), got.float()) > 40


@pytest.mark.usefixtures("no_fallback")
@pytest.mark.parametrize("dtype", DT, ids=IDS.get)
@pytest.mark.parametrize("b,lens,h,d,norm", [(1, (512, 4096), 24, 128, "rms"), (2, (7, 33), 3, 64, "rms"),
                                             (1, (300,), 5, 64, "none"), (2, (9,), 7, 32, "rms")])
def test_qkv_quant3_fused_pass(dtype, b, lens, h, d, norm):
    """One kernel for q, k (norm + RoPE) and v (copy), against the reference: exact without
    RMSNorm; the fused and per-tensor launches agree the same way."""
    if d * torch.finfo(dtype).bits // 8 // 16 > 32:
        pytest.skip("more than 32 vectors per head: the per-tensor kernel path")
    projections = [_fused_projection(b, n, h, d, dtype, scale=2) for n in lens]
    q, k, v = ([p[i] for p in projections] for i in range(3))
    ws = [(1 + 0.2 * torch.randn(d, device="cuda")).to(dtype) for _ in lens] if norm == "rms" else []
    cos, sin = _tables(sum(lens), d)
    s = lyra.attention_fp8_scales([], [], v, ws, ws) if ws else lyra.attention_fp8_scales(q, k, v, [], [])
    args = (q, k, v, ws, ws, norm, 1e-6, cos, sin, s)
    got = lyra.qkv_quant3(*args)
    ref = fa.qkv_quant3_reference(*args)
    for i, (g, r) in enumerate(zip(got, ref)):
        _check_close_bytes(g, r, exact=norm == "none" or i == 2)


@needs_cudnn
@pytest.mark.usefixtures("no_fallback")
@pytest.mark.parametrize("b,lq,lk,h,d,causal", [(1, 4608, 4608, 24, 128, False), (2, 1024, 77, 10, 64, False),
                                                 (2, 333, 333, 3, 128, False), (1, 200, 200, 2, 64, True)])
def test_cudnn_attention_close_to_reference(b, lq, lk, h, d, causal):
    q, k, v = (torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16) * sc
               for n, sc in ((lq, 1.0), (lk, 1.0), (lk, 3.0)))
    s = lyra.attention_fp8_scales([q], [k], [v], [], [])
    q8, k8, v8 = (lyra.qkv_quant([t], [], "none", 0.0, None, None, s, i) for i, t in enumerate((q, k, v)))
    o8, o_scale = lyra.attention_fp8(q8, k8, v8, s, None, causal)
    r8, r_scale = fa.attention_fp8_reference(q8, k8, v8, s, None, causal)
    assert o8.dtype == torch.float8_e4m3fn and o8.shape == (b, lq, h, d) and o8.is_contiguous()
    assert torch.equal(o_scale, r_scale) and torch.all(o_scale == s[8])
    exact = torch.nn.functional.scaled_dot_product_attention(
        q.float().transpose(1, 2), k.float().transpose(1, 2), v.float().transpose(1, 2),
        is_causal=causal).transpose(1, 2)
    got = o8.float() * o_scale[..., None, None]
    # cuDNN also rounds P to e4m3: ~24 dB on random inputs against ~29 for one e4m3 rounding
    assert numerics.sqnr_db(r8.float() * r_scale[..., None, None], got) > 22
    assert numerics.sqnr_db(exact, got) > 21


@needs_cudnn
@pytest.mark.usefixtures("no_fallback")
def test_fp8_attention_chain_replays_in_a_cuda_graph():
    d, h = 128, 4
    x = _fused_projection(1, 300, h, d, torch.bfloat16)
    w = (1 + 0.2 * torch.randn(d, device="cuda")).to(torch.bfloat16)
    cos, sin = _tables(300, d)

    def chain():
        s = lyra.attention_fp8_scales([], [], [x[2]], [w], [w])
        q8, k8, v8 = lyra.qkv_quant3([x[0]], [x[1]], [x[2]], [w], [w], "rms", 1e-6, cos, sin, s)
        o8, o_scale = lyra.attention_fp8(q8, k8, v8, s, None, False)
        return o8.float() * o_scale[..., None, None]

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        chain()  # warm-up: the cuDNN graph is built outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = chain()
    for scale in (1.0, 7.0):  # new values in the same buffers, a new v scale
        for t in x:
            t.copy_(torch.randn_like(t) * scale)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, chain())


@needs_cudnn
@pytest.mark.usefixtures("no_fallback")
def test_compiled_flux_runs_fp8_attention_without_fallback():
    model = zoo.build_denoiser("flux", dtype=torch.bfloat16, device="cuda")
    inputs = zoo.denoiser_inputs("flux", model, batch=1)
    with torch.no_grad():
        ref = model(**inputs, return_dict=False)[0]
        torch._dynamo.reset()
        lyradynamo.reset_stats()
        with lyradynamo.config.patch(quant="fp8", quant_master="gpu"):
            compiled = torch.compile(model, backend="lyra")
            outs = [compiled(**inputs, return_dict=False)[0] for _ in range(3)]  # capture + replays
    att = lyradynamo.compiled_graphs()[0].report.quant["attention"]
    assert att["fp8"] == 2, att
    assert torch.equal(outs[1], outs[2])
    assert numerics.sqnr_db(ref.float(), outs[2].float()) > 20


@pytest.mark.usefixtures("no_fallback")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=IDS.get)
@pytest.mark.parametrize("b,lens,h,d,with_v", [(1, (512, 4096), 24, 128, True), (1, (4608,), 24, 128, False),
                                               (2, (7, 33), 3, 64, True), (3, (5, 2), 6, 96, True)])
def test_qk_norm_rope3_one_pass(dtype, b, lens, h, d, with_v):
    """The dtype form of the fused pass against the reference (q / k within the RMSNorm
    ordering tolerance, v exact); D=96 (12 vectors a head) takes the per-tensor kernels."""
    from lyradynamo.ops.rope import qk_norm_rope3_reference

    projections = [_fused_projection(b, n, h, d, dtype, scale=2) for n in lens]
    q, k, v = ([p[i] for p in projections] for i in range(3))
    ws = [(1 + 0.2 * torch.randn(d, device="cuda")).to(dtype) for _ in lens]
    cos, sin = _tables(sum(lens), d)
    args = (q, k, v if with_v else [], ws, ws, "rms", 1e-6, cos, sin)
    got = lyra.qk_norm_rope3(*args)
    ref = qk_norm_rope3_reference(*args)
    for g, r in zip(got[:2], ref[:2]):
        torch.testing.assert_close(g, r, rtol=2 ** -7, atol=2 ** -7)
        assert (g != r).float().mean() < 1e-2
    assert torch.equal(got[2], ref[2])
