"""IP-Adapter on a lyra-compiled SD1.5 UNet: diffusers' load_ip_adapter (before compiling) works and
matches eager; lyradynamo.ip_adapter.set_scale changes the scale without recompiling (diffusers'
set_ip_adapter_scale recompiles: the processors branch on the Python float) and equals eager
diffusers with set_ip_adapter_scale."""
import copy

import pytest
import torch

import lyradynamo
from lyradynamo import ip_adapter, zoo
from helpers import rel_err

CLIP_DIM = 16


def make_ip_adapter(unet, seed=0):
    """A random IP-Adapter state dict in the layout diffusers loads: image_proj (ImageProjection) +
    ip_adapter["{k}.to_k_ip/to_v_ip.weight"] with k = 1, 3, 5, ... over the cross-attention processors."""
    g = torch.Generator().manual_seed(seed)
    D = unet.config.cross_attention_dim
    sd = {"image_proj": {"proj.weight": torch.randn(4 * D, CLIP_DIM, generator=g) * 0.2, "proj.bias": torch.zeros(4 * D),
                         "norm.weight": torch.ones(D), "norm.bias": torch.zeros(D)},
          "ip_adapter": {}}
    k = 1
    for name in unet.attn_processors:
        if name.endswith("attn2.processor"):
            hidden = unet.get_submodule(name.removesuffix(".processor")).to_q.out_features
            sd["ip_adapter"][f"{k}.to_k_ip.weight"] = torch.randn(hidden, D, generator=g) * 0.2
            sd["ip_adapter"][f"{k}.to_v_ip.weight"] = torch.randn(hidden, D, generator=g) * 0.2
            k += 2
    return sd


@pytest.fixture
def setup():
    torch.set_num_threads(1)
    pipe = zoo.build_pipeline("sd15")
    pipe.load_ip_adapter(make_ip_adapter(pipe.unet), subfolder=None, weight_name="ip.safetensors",
                         image_encoder_folder=None)
    ref = copy.copy(pipe)
    ref.unet = copy.deepcopy(pipe.unet)  # eager diffusers reference
    inputs = zoo.denoiser_inputs("sd15", pipe.unet, batch=2)
    embeds = torch.randn(2, 1, CLIP_DIM, generator=torch.Generator().manual_seed(1))
    inputs["added_cond_kwargs"] = {"image_embeds": [embeds]}
    return pipe, ref, inputs


def _out(m, inputs):
    with torch.no_grad():
        return m(**inputs)[0]


def test_set_scale_on_compiled_unet_matches_diffusers_without_recompile(setup):
    pipe, ref, inputs = setup
    compiled = torch.compile(pipe.unet, backend="lyra")
    pipe.unet = compiled
    full = _out(compiled, inputs)
    assert rel_err(full, _out(ref.unet, inputs)) < 1e-5
    with torch.compiler.set_stance("fail_on_recompile"):
        for scale in (0.5, 0.0, {"up": {"block_1": [0.0, 1.0]}}, 1.3):
            ip_adapter.set_scale(pipe, scale)
            ref.set_ip_adapter_scale(scale)
            got, want = _out(compiled, inputs), _out(ref.unet, inputs)
            assert rel_err(got, want) < 1e-5, (scale, rel_err(got, want))
        ip_adapter.restore(pipe)
        assert torch.equal(_out(compiled, inputs), full)
    assert lyradynamo.compile_count() == 1
    assert rel_err(full, _out(ref.unet, inputs)) > 1e-3  # the scales mattered


def test_scale_zero_equals_no_ip_adapter(setup):
    pipe, ref, inputs = setup
    ip_adapter.set_scale(pipe.unet, 0.0)
    ref.unload_ip_adapter()
    kw = dict(inputs)
    kw.pop("added_cond_kwargs")
    assert rel_err(_out(pipe.unet, inputs), _out(ref.unet, kw)) < 1e-6


def test_set_scale_without_ip_adapter_is_an_error():
    with pytest.raises(ValueError, match="no IP-Adapter is loaded"):
        ip_adapter.set_scale(zoo.build_denoiser("sd15"), 0.5)
