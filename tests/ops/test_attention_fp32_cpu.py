"""lyradynamo/ops/attention_fp32.py on the CPU: the chunking, the layouts and the hi / lo split
algebra against torch's SDPA (CPU matmuls are plain fp32, so the split is exact here; the TF32
rounding itself is checked on the GPU in tests/cuda/test_attention_fp32_cuda.py), the TF32 high
part's bits, when the path is taken, and that the caller's matmul precision is restored."""
import pytest
import torch

from lyradynamo.ops import attention_fp32 as af
from lyradynamo.ops.attention import attention_reference


def _qkv(b, h, lq, lk, d, dv, layout, gen):
    shape = (lambda l, e: (b, h, l, e)) if layout == "bhld" else (lambda l, e: (b, l, h, e))
    return (torch.randn(shape(lq, d), generator=gen), torch.randn(shape(lk, d), generator=gen),
            torch.randn(shape(lk, dv), generator=gen))


@pytest.mark.parametrize("layout", ["bhld", "blhd"])
@pytest.mark.parametrize("mode", ["tf32x3", "tf32"])
@pytest.mark.parametrize("b,h,lq,lk,d,dv,scale", [(1, 1, 257, 300, 64, 64, None), (2, 3, 33, 17, 40, 24, 0.3),
                                                 (1, 2, 5, 1, 8, 8, None)])
def test_matches_sdpa(layout, mode, b, h, lq, lk, d, dv, scale, monkeypatch):
    gen = torch.Generator().manual_seed(lq * 31 + lk)
    q, k, v = _qkv(b, h, lq, lk, d, dv, layout, gen)
    monkeypatch.setattr(af, "_CHUNK_ELEMENTS", 7 * b * h * lk)  # 7 query rows a chunk: a ragged last chunk
    out = af.attention_tf32(q, k, v, scale, layout, mode)
    ref = attention_reference(q, k, v, None, scale, False, layout)
    assert out.shape == ref.shape and out.is_contiguous()
    torch.testing.assert_close(out, ref, rtol=2e-5, atol=2e-6)


def test_tf32_hi_keeps_ten_mantissa_bits():
    x = torch.tensor([1.0, -1.0, 3.14159265, -2.5e-30, 6.0e37, 1.0 + 2.0 ** -10, 1.0 + 2.0 ** -11, 0.0,
                      float("inf"), -float("inf")])
    hi = af.tf32_hi(x)
    bits = hi.view(torch.int32)
    assert torch.all(bits & 0x1FFF == 0)
    assert torch.equal(hi[[0, 1, 5, 7, 8, 9]], x[[0, 1, 5, 7, 8, 9]])  # already TF32: unchanged
    assert hi[6] == 1.0  # below TF32's last bit: dropped (truncation; the remainder carries it)
    fin = torch.isfinite(x)
    lo = x[fin] - hi[fin]
    assert torch.all(lo.abs() <= x[fin].abs() * 2.0 ** -10)
    assert torch.equal(hi[fin] + lo, x[fin])  # hi + lo is x exactly
    assert torch.isnan(af.tf32_hi(torch.tensor([float("nan")]))).all()


def test_wanted_only_for_long_fp32_cuda_attention():
    q = torch.empty(1, 1, 16384, 512)
    assert not af.wanted(q, q, q, None, False, "bhld", "tf32x3")  # CPU tensors
    meta = q.to("meta")
    assert not af.wanted(meta, meta, meta, None, False, "bhld", "tf32x3")


@pytest.mark.parametrize("shape", [(1, 2, 0, 8), (0, 2, 5, 8)])
def test_empty_inputs(shape):
    q = torch.randn(shape)
    out = af.attention_tf32(q, q, q, None, "bhld", "tf32x3")
    assert out.shape == shape


def test_bad_mode_is_refused():
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(ValueError, match="tf32x3 or tf32"):
        af.attention_tf32(q, q, q, None, "bhld", "sdpa")


def test_matmul_precision_is_restored():
    m = torch.backends.cuda.matmul
    before = m.fp32_precision
    with af._tf32_matmuls():
        assert m.fp32_precision == "tf32"
    assert m.fp32_precision == before
    with pytest.raises(KeyError):
        with af._tf32_matmuls():
            raise KeyError("inside")
    assert m.fp32_precision == before
