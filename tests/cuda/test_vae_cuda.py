"""The VAE decoder under lyra on CUDA: the full-size SD1.5 / SDXL / FLUX AutoencoderKL configs
(random weights) at small latents, in the dtype each pipeline decodes in (SDXL's fp16 VAE is
upcast to fp32 by diffusers, force_upcast), checked against an fp32 reference by the 2x rule,
served at a second size from the same compilation, its group norms and conv biases on csrc."""
import pytest
import torch

import lyradynamo
from lyradynamo import zoo

pytestmark = pytest.mark.cuda

CASES = [("sdxl", torch.float32), ("sd15", torch.float16), ("flux", torch.bfloat16)]


def _vae(name, dtype):
    """Drawn on the CPU in fp32, then cast: every dtype holds the same weights."""
    return zoo.build_vae(name, tiny=False).to(device="cuda", dtype=dtype)


def _err(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture
def exact_fp32():
    """A reference without TF32 in cuDNN convolutions and matmuls (eager fp32 uses TF32 in
    cuDNN by default, and so does lyra: the test compares both against this)."""
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32

    def run(fn, *args):
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        try:
            return fn(*args)
        finally:
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old

    return run


@pytest.mark.parametrize("rows", [False, True], ids=["gn-groups", "gn-rows"])
@pytest.mark.parametrize("name,dtype", CASES, ids=[f"{n}-{str(d)[6:]}" for n, d in CASES])
def test_vae_decode_matches_eager_across_sizes(name, dtype, rows, exact_fp32, no_fallback):
    """rows: config.group_norm_rows (csrc/group_norm_rows.cu for the decoder's narrow groups)."""
    with lyradynamo.config.patch(group_norm_rows=rows):
        _decode_matches_eager(name, dtype, exact_fp32)


def _decode_matches_eager(name, dtype, exact_fp32):
    vae = _vae(name, dtype)
    ref_vae = _vae(name, torch.float32)
    latent_ch = vae.config.latent_channels
    decode = torch.compile(vae.decode, backend="lyra")
    kept = []
    with torch.no_grad():
        for i, (h, w) in enumerate([(16, 16), (24, 16), (16, 16)]):
            g = torch.Generator(device="cuda").manual_seed(0 if i == 2 else i)
            z = torch.randn(1, latent_ch, h, w, device="cuda", generator=g)
            out = decode(z.to(dtype), return_dict=False)[0]
            assert out.shape == (1, 3, 8 * h, 8 * w) and out.dtype == dtype
            ref = exact_fp32(lambda t: ref_vae.decode(t, return_dict=False)[0], z)
            eager = vae.decode(z.to(dtype), return_dict=False)[0]
            e_lyra, e_eager = _err(out, ref), _err(eager, ref)
            assert e_lyra <= 2 * e_eager + 1e-4, (name, h, w, e_lyra, e_eager)
            kept.append(out)
    torch.testing.assert_close(kept[0], kept[2], rtol=0, atol=0)  # kept across a replay at another size
    assert lyradynamo.compile_count() == 1
    record = lyradynamo.compiled_graphs()[0]
    assert record.device == "cuda"
    matched = record.report.matched
    assert sum(matched["group_norm"].values()) > 0 and sum(matched["conv_bias"].values()) > 0, matched
