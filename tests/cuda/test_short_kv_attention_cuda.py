"""lyra's attention over few keys (csrc/attention_short_kv.cu) on fresh random inputs: the 16-bit
output against a float64 reference within the error torch's own fp16 / bf16 SDPA makes (odd
query counts, every head dim it has, 1..128 keys, strided k / v read out of a wider buffer as the
grouped k / v projection leaves them); the quantised output exactly numerics.quantize_rows of the
16-bit one (fp8, int8, with smoothing factors); lyra::attention and lyra::attention_quant taking
it where they should and falling back with the reason where they should not; CUDA-graph capture;
argument errors."""
import pytest
import torch
import torch.nn.functional as F

import lyradynamo
from kernel_helpers import capture_after_warmup
from lyradynamo.ops import _common
from lyradynamo.ops import attention_short_kv as skv
from lyradynamo.ops.attention import attention_reference
from lyradynamo.quant import numerics

pytestmark = [pytest.mark.cuda, pytest.mark.usefixtures("seed_from_test_id")]
lyra = torch.ops.lyra
DT = {"fp16": torch.float16, "bf16": torch.bfloat16}


def _qkv(b, lq, lk, h, d, dtype, kv_wide=False):
    q = torch.randn(b, lq, h, d, device="cuda", dtype=dtype)
    if kv_wide:  # k and v: column slices of one (B, Lk, 3 * H * D) buffer, as a grouped GEMM writes them
        buf = torch.randn(b, lk, 3, h * d, device="cuda", dtype=dtype)
        k, v = buf[:, :, 1].unflatten(-1, (h, d)), buf[:, :, 2].unflatten(-1, (h, d))
    else:
        k = torch.randn(b, lk, h, d, device="cuda", dtype=dtype)
        v = torch.randn(b, lk, h, d, device="cuda", dtype=dtype)
    return q, k, v


def _ref64(q, k, v, scale):
    return attention_reference(q.double(), k.double(), v.double(), None, scale, False, "blhd")


def _torch_err(q, k, v, scale, ref):
    with torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.MATH]):
        t = F.scaled_dot_product_attention(q.transpose(1, 2).float(), k.transpose(1, 2).float(),
                                           v.transpose(1, 2).float(), scale=scale).transpose(1, 2).to(q.dtype)
    return (t.double() - ref).abs().max().item()


CASES = [  # b, lq, lk, h, d
    (2, 1000, 77, 10, 64), (2, 257, 77, 20, 64), (1, 33, 1, 5, 64), (2, 100, 80, 8, 40), (1, 77, 81, 8, 80),
    (3, 19, 128, 8, 160), (2, 64, 16, 4, 128), (1, 1, 7, 2, 40), (2, 4096, 77, 8, 40), (1, 300, 120, 16, 64),
]


@pytest.mark.parametrize("dt", list(DT))
@pytest.mark.parametrize("b,lq,lk,h,d", CASES)
def test_16bit_output_matches_float64(C, dt, b, lq, lk, h, d):
    dtype = DT[dt]
    q, k, v = _qkv(b, lq, lk, h, d, dtype, kv_wide=(lq % 2 == 0))
    scale = 0.7 / d ** 0.5
    out = skv.run(C, q, k, v, scale, None)
    ref = _ref64(q, k, v, scale)
    assert out.shape == q.shape[:3] + (d,) and out.dtype == dtype
    err = (out.double() - ref).abs().max().item()
    # fp32 scores and sums, P and the output rounded to the storage type: torch's fp32 math
    # attention rounded once is the floor; P's rounding adds about one more output ulp
    assert err <= 2.0 * _torch_err(q, k, v, scale, ref) + (4e-3 if dtype == torch.float16 else 3e-2), err


@pytest.mark.parametrize("kind", ["fp8", "int8"])
@pytest.mark.parametrize("smooth", [False, True])
@pytest.mark.parametrize("b,lq,lk,h,d", [CASES[0], CASES[3], CASES[5], CASES[7]])
def test_quantised_output_is_quantize_rows_of_the_16bit_one(C, kind, smooth, b, lq, lk, h, d):
    q, k, v = _qkv(b, lq, lk, h, d, torch.float16, kv_wide=True)
    inv = (torch.rand(h * d, device="cuda") + 0.5) if smooth else None
    o16 = skv.run(C, q, k, v, None, None)
    oq, scale = skv.run(C, q, k, v, None, kind, inv)
    rq, rs = numerics.quantize_rows(o16.flatten(2), kind, inv)
    assert oq.dtype == numerics.QDTYPE[kind] and scale.shape == (b, lq)
    assert torch.equal(scale, rs)
    assert torch.equal(oq.flatten(2).view(torch.int8), rq.view(torch.int8))


def test_attention_op_runs_the_kernel_for_short_kv_and_sdpa_otherwise(C, monkeypatch):
    calls = []
    real = skv.run
    monkeypatch.setattr(skv, "run", lambda *a, **kw: calls.append(a[1].shape) or real(*a, **kw))
    q, k, v = _qkv(2, 300, 77, 10, 64, torch.float16)
    out = lyra.attention(q, k, v, None, None, False, "blhd")
    assert calls == [q.shape]
    torch.testing.assert_close(out, attention_reference(q, k, v, None, None, False, "blhd"), atol=4e-3, rtol=0)
    q2, k2, v2 = _qkv(2, 300, 300, 10, 64, torch.float16)  # self-attention: cuDNN / flash
    lyra.attention(q2, k2, v2, None, None, False, "blhd")
    with lyradynamo.config.patch(short_kv_attention="off"):
        lyra.attention(q, k, v, None, None, False, "blhd")
    with lyradynamo.config.patch(attention_backend="cudnn"):
        lyra.attention(q, k, v, None, None, False, "blhd")
    assert calls == [q.shape]


def test_attention_quant_falls_back_with_the_reason_past_128_keys(C):
    _common.reset_fallback_counts()
    q, k, v = _qkv(2, 64, 200, 4, 64, torch.bfloat16)
    oq, scale = lyra.attention_quant(q, k, v, None, "fp8", None)
    ref_q, ref_s = numerics.quantize_rows(lyra.attention(q, k, v, None, None, False, "blhd").flatten(2), "fp8")
    assert torch.equal(scale, ref_s) and torch.equal(oq.flatten(2).view(torch.int8), ref_q.view(torch.int8))
    assert any(op == "attention_quant" and "200 keys" in why for op, why in _common.fallback_counts())
    _common.reset_fallback_counts()
    q, k, v = _qkv(2, 64, 77, 4, 64, torch.bfloat16)
    lyra.attention_quant(q, k, v, None, "int8", None)
    assert not _common.fallback_counts()


def test_capture_and_replay_see_new_inputs(C):
    q, k, v = _qkv(2, 500, 77, 10, 64, torch.float16, kv_wide=True)
    graph, (oq, scale) = capture_after_warmup(lambda: lyra.attention_quant(q, k, v, None, "fp8", None))
    for t in (q, k, v):
        t.copy_(torch.randn_like(t))
    graph.replay()
    rq, rs = lyra.attention_quant(q, k, v, None, "fp8", None)
    assert torch.equal(scale, rs) and torch.equal(oq.view(torch.int8), rq.view(torch.int8))


def test_argument_errors_name_the_problem(C):
    q, k, v = _qkv(1, 8, 7, 2, 64, torch.float16)
    out = torch.empty_like(q)
    base = dict(q=q.data_ptr(), k=k.data_ptr(), v=v.data_ptr(), out=out.data_ptr(), out_scale=0, inv_smooth=0,
                B=1, Lq=8, Lk=7, H=2, D=64, q_bs=0, q_rs=128, k_bs=0, k_rs=128, v_bs=0, v_rs=128, scale=0.125,
                dtype=1, kind=-1, stream=torch.cuda.current_stream().cuda_stream)
    C.attention_short_kv(**base)
    for change, match in ((dict(D=48), "head dim must be one of"), (dict(Lk=129), "Lk \\(keys\\)"),
                          (dict(dtype=0), "dtype must be 1"), (dict(kind=2), "kind must be"),
                          (dict(q_rs=127), "even"), (dict(k_rs=130), "multiples of 8"), (dict(kind=0), "scale must be a non-null"),
                          (dict(inv_smooth=out.data_ptr()), "inv_smooth is only taken"),
                          (dict(H=49), "H \\* D must be")):
        with pytest.raises(ValueError, match=match):
            C.attention_short_kv(**{**base, **change})
