"""The VAE decoder (AutoencoderKL.decode) compiled with lyra on the CPU: every zoo pipeline's
VAE config (tiny) matches eager in fp32, serves new latent sizes without recompiling, and its
group norms, conv biases and the mid-block attention are rewritten; the encoder likewise."""
import pytest
import torch

import lyradynamo
from lyradynamo import zoo


@pytest.mark.parametrize("name", ["sd15", "sdxl", "flux", "sd3"])
def test_vae_decode_one_compilation_matches_eager(name):
    vae = zoo.build_vae(name)
    decode = torch.compile(vae.decode, backend="lyra")
    ch = vae.config.latent_channels
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        for b, h, w in [(1, 16, 16), (2, 24, 16), (1, 12, 20)]:
            z = torch.randn(b, ch, h, w)
            out = decode(z, return_dict=False)[0]
            ref = vae.decode(z, return_dict=False)[0]
            assert out.shape == ref.shape == (b, 3, 8 * h, 8 * w)
            assert float((out - ref).norm() / ref.norm()) < 1e-5
    assert lyradynamo.compile_count() == 1
    report = lyradynamo.compiled_graphs()[0].report
    cov = report.coverage
    for kind in ("group_norm", "sdpa"):
        assert cov[kind]["before"] > 0 and cov[kind]["left"] == 0, cov
    assert sum(report.matched["conv_bias"].values()) > 0, report.matched


@pytest.mark.parametrize("name", ["sd15", "flux"])
def test_vae_encode_one_compilation_matches_eager(name):
    """img2img / inpainting encode images: AutoencoderKL.encode under lyra, batch and size changing."""
    vae = zoo.build_vae(name)
    encode = torch.compile(vae.encode, backend="lyra")
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        for b, h, w in [(1, 64, 64), (2, 96, 64), (1, 48, 80)]:
            x = torch.randn(b, 3, h, w)
            out, ref = encode(x).latent_dist, vae.encode(x).latent_dist
            for got, want in ((out.mean, ref.mean), (out.std, ref.std)):
                assert got.shape == want.shape == (b, vae.config.latent_channels, h // 8, w // 8)
                assert float((got - want).norm() / want.norm()) < 1e-5
    assert lyradynamo.compile_count() == 1
    cov = lyradynamo.compiled_graphs()[0].report.coverage
    assert cov["group_norm"]["before"] > 0 and cov["group_norm"]["left"] == 0, cov
