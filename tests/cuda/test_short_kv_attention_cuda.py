"""lyra's attention over few keys (csrc/attention_short_kv.cu, 16-bit output) on fresh random
inputs: fp16 and bf16 against F.scaled_dot_product_attention on float32 copies within twice the
error of rounding that float32 result to the dtype (plus the softmax numerators' rounding), at
every head dim it has, odd query counts (1, 33, 257, 1000), 1..128 keys (77 and others), batch 1
and 2, k / v read out of one wider buffer as the grouped k / v projection leaves them;
lyra::attention taking it where the rule says and cuDNN elsewhere; CUDA-graph capture; the
library's limits matching the Python side's; argument errors."""
import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import lyradynamo
from kernel_helpers import capture_after_warmup
from lyradynamo.ops import attention_short_kv as skv

pytestmark = [pytest.mark.cuda, pytest.mark.usefixtures("seed_from_test_id", "no_tf32")]
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


def _check_close(out, q, k, v, scale):
    """out against SDPA on float32 copies (torch's math backend, no TF32): no further than twice
    that result's own rounding to the dtype, plus the kernel's rounding of P to the dtype (about
    one more output ulp; flash kernels round P the same way)."""
    with sdpa_kernel([SDPBackend.MATH]):
        ref32 = F.scaled_dot_product_attention(q.transpose(1, 2).float(), k.transpose(1, 2).float(),
                                               v.transpose(1, 2).float(), scale=scale).transpose(1, 2)
    assert out.shape == q.shape[:3] + (v.shape[3],) and out.dtype == q.dtype and out.is_contiguous()
    floor = (ref32.to(q.dtype).float() - ref32).abs().max().item()
    err = (out.float() - ref32).abs().max().item()
    assert err <= 2.0 * floor + (4e-3 if q.dtype == torch.float16 else 3e-2), (err, floor)


CASES = [  # b, lq, lk, h, d
    (2, 1000, 77, 10, 64), (2, 257, 77, 20, 64), (1, 257, 77, 8, 40), (2, 1000, 77, 8, 40),
    (1, 1000, 77, 8, 80), (2, 257, 77, 8, 160), (1, 33, 77, 8, 128), (2, 4096, 77, 8, 40),
    (2, 64, 77, 8, 160), (1, 33, 1, 5, 64), (2, 100, 80, 8, 40), (1, 77, 81, 8, 80),
    (2, 19, 128, 8, 160), (1, 64, 16, 4, 128), (1, 1, 7, 2, 40), (2, 300, 120, 16, 64),
    (2, 257, 128, 4, 128), (1, 1000, 100, 2, 80),
]


@pytest.mark.parametrize("dt", list(DT))
@pytest.mark.parametrize("b,lq,lk,h,d", CASES)
def test_output_matches_float32_sdpa(C, dt, b, lq, lk, h, d):
    q, k, v = _qkv(b, lq, lk, h, d, DT[dt], kv_wide=(lq % 2 == 0))
    scale = 0.7 / d ** 0.5
    assert skv.unsupported(q, k, v, C=C) is None
    _check_close(skv.run(C, q, k, v, scale), q, k, v, scale)


@pytest.mark.parametrize("dt", list(DT))
def test_default_scale_and_large_scores(C, dt):
    """scale None is 1 / sqrt(D) (as SDPA); scores far from 0 (exp2 of large arguments after the
    row max is taken off) stay finite."""
    q, k, v = _qkv(2, 257, 77, 8, 64, DT[dt])
    _check_close(skv.run(C, q, k, v, None), q, k, v, None)
    q = q * 8
    out = skv.run(C, q, k, v, None)
    assert torch.isfinite(out.float()).all()
    _check_close(out, q, k, v, None)


def test_attention_op_takes_the_kernel_by_rule(C, monkeypatch):
    calls = []
    real = skv.run
    monkeypatch.setattr(skv, "run", lambda *a, **kw: calls.append(tuple(a[1].shape)) or real(*a, **kw))
    q, k, v = _qkv(2, 1024, 77, 8, 80, torch.float16, kv_wide=True)  # sd15-l2: the kernel
    out = lyra.attention(q, k, v, None, None, False, "blhd")
    assert calls == [tuple(q.shape)]
    assert torch.equal(out, real(C, q, k, v, None))
    for shape in ((2, 4096, 77, 10, 64), (2, 300, 300, 8, 64)):  # sdxl-l1; self-attention (300 keys)
        q2, k2, v2 = _qkv(*shape, torch.float16)
        _check_close(lyra.attention(q2, k2, v2, None, None, False, "blhd"), q2, k2, v2, None)
    with lyradynamo.config.patch(short_kv_attention="off"):
        lyra.attention(q, k, v, None, None, False, "blhd")
    with lyradynamo.config.patch(attention_backend="cudnn"):
        lyra.attention(q, k, v, None, None, False, "blhd")
    qt = q.transpose(2, 3).contiguous().transpose(2, 3)  # D not unit-stride: SDPA, same numbers
    assert "q's strides" in skv.unsupported(qt, k, v, C=C)
    _check_close(lyra.attention(qt, k, v, None, None, False, "blhd"), q, k, v, None)
    assert calls == [tuple(q.shape)]


def test_capture_and_replay_see_new_inputs(C):
    q, k, v = _qkv(2, 500, 77, 10, 64, torch.float16, kv_wide=True)
    graph, out = capture_after_warmup(lambda: skv.run(C, q, k, v, None))
    for t in (q, k, v):
        t.copy_(torch.randn_like(t))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, skv.run(C, q, k, v, None))  # one launch, no atomics: the same bits


def test_library_limits_match_the_python_side(C):
    assert C.attention_short_kv_max_keys() == skv.MAX_KEYS
    assert [d for d in range(1, 513) if C.attention_short_kv_head_dim_ok(d)] == list(skv.HEAD_DIMS)


def test_argument_errors_name_the_problem(C):
    q, k, v = _qkv(1, 8, 7, 2, 64, torch.float16)
    out = torch.empty_like(q)
    base = dict(q=q.data_ptr(), k=k.data_ptr(), v=v.data_ptr(), out=out.data_ptr(), B=1, Lq=8, Lk=7, H=2, D=64,
                q_bs=0, q_rs=128, k_bs=0, k_rs=128, v_bs=0, v_rs=128, scale=0.125, dtype=1,
                stream=torch.cuda.current_stream().cuda_stream)
    C.attention_short_kv(**base)
    torch.cuda.synchronize()
    for change, match in ((dict(D=48), "head dim must be one of"), (dict(Lk=129), "Lk \\(keys\\)"),
                          (dict(Lk=0), "Lk \\(keys\\)"), (dict(dtype=0), "dtype must be 1"),
                          (dict(q_rs=127), "even"), (dict(k_rs=130), "multiples of 8"),
                          (dict(q_rs=64), "at least H \\* D"), (dict(out=0), "non-null"),
                          (dict(k=k.data_ptr() + 8), "16-byte aligned"),
                          (dict(out=out.data_ptr() + 2), "out must be 4-byte"),
                          (dict(B=0), "B must be in"), (dict(H=70000), "H must be in")):
        with pytest.raises(ValueError, match=match):
            C.attention_short_kv(**{**base, **change})
