"""lyradynamo.controlnet.swap_controlnet: another ControlNet's weights copied into a compiled one,
no recompilation; ControlNet / FLUX ControlNet / multi-ControlNet compile with lyra and match eager."""
import copy

import pytest
import torch

import lyradynamo
from lyradynamo import zoo
from lyradynamo.controlnet import ControlNetMismatch, swap_controlnet
from helpers import flat_outputs, one_thread, rel_err


@pytest.fixture(autouse=True)
def _threads():
    with one_thread():
        yield


def _run(model, kw):
    with torch.no_grad():
        return flat_outputs(model(**kw, return_dict=False))


def _params(m):
    return {k: v.detach().clone() for k, v in m.named_parameters()}


def _swap_three_ways(compiled, kw, new, new_out, old_state, old_out, folder):
    """Swap `new` in as a module, `old_state` back as a state dict, then `new` again from the
    diffusers folder it is saved to: each time the compiled output is the eager one, and
    nothing recompiles."""
    new.save_pretrained(folder)  # diffusion_pytorch_model.safetensors + config.json
    with torch.compiler.set_stance("fail_on_recompile"):
        for source, want in ((new, new_out), (old_state, old_out), (folder, new_out)):
            swap_controlnet(compiled, source)
            assert rel_err(_run(compiled, kw), want) < 1e-5
    assert lyradynamo.compile_count() == 1


@pytest.mark.parametrize("name", ["sd15", "sdxl", "flux"])
def test_compiled_controlnet_matches_eager_and_swaps_without_recompile(name, tmp_path):
    a, b = zoo.build_controlnet(name, seed=0), zoo.build_controlnet(name, seed=1)
    kw = zoo.controlnet_inputs(name, a, batch=2)
    eager_a, eager_b = _run(a, kw), _run(b, kw)
    assert rel_err(eager_b, eager_a) > 0.1  # the two ControlNets differ
    orig_a = copy.deepcopy(a)
    compiled = torch.compile(a, backend="lyra")
    assert rel_err(_run(compiled, kw), eager_a) < 1e-5
    _swap_three_ways(compiled, kw, b, eager_b, orig_a.state_dict(), eager_a, str(tmp_path / "b"))
    for k, v in b.named_parameters():  # the weights are b's, bit for bit
        assert torch.equal(dict(a.named_parameters())[k], v), k


def test_swap_casts_to_the_targets_dtype():
    a = zoo.build_controlnet("sd15", seed=0)
    b = zoo.build_controlnet("sd15", seed=1, dtype=torch.float64)
    ids = {k: id(p) for k, p in a.named_parameters()}
    swap_controlnet(a, b)
    for k, p in a.named_parameters():
        assert p.dtype == torch.float32 and id(p) == ids[k]  # same Parameter objects
        assert torch.equal(p, dict(b.named_parameters())[k].float()), k


def test_other_architecture_is_refused_and_nothing_changes():
    a = zoo.build_controlnet("sd15", seed=0)
    compiled = torch.compile(a, backend="lyra")
    before = _params(a)
    with pytest.raises(ControlNetMismatch, match=r"shapes differ.*compile the other one separately"):
        swap_controlnet(compiled, zoo.build_controlnet("sd15", seed=1, conditioning_channels=1))
    with pytest.raises(ControlNetMismatch, match=r"(missing|unexpected|shapes differ).*compile the other one separately"):
        swap_controlnet(compiled, zoo.build_controlnet("sdxl", seed=1))
    with pytest.raises(ControlNetMismatch, match="FluxControlNetModel into a compiled ControlNetModel"):
        swap_controlnet(compiled, zoo.build_controlnet("flux", seed=1))
    sd = zoo.build_controlnet("sd15", seed=1).state_dict()
    sd.pop(next(iter(sd)))
    with pytest.raises(ControlNetMismatch, match="1 tensors missing"):
        swap_controlnet(compiled, sd)
    for k, v in before.items():
        assert torch.equal(dict(a.named_parameters())[k], v), k


def test_other_architecture_compiles_once_and_each_keeps_its_graph():
    """A ControlNet of another architecture (a 1-channel conditioning embedding) is compiled on its
    own: exactly one more compilation; afterwards both run and swap within their architecture
    without recompiling, and each still matches eager."""
    a, a2 = zoo.build_controlnet("sd15", seed=0), zoo.build_controlnet("sd15", seed=2)
    g, g2 = (zoo.build_controlnet("sd15", seed=s, conditioning_channels=1) for s in (1, 3))
    kw = zoo.controlnet_inputs("sd15", a, batch=2)
    kw_g = dict(kw, controlnet_cond=kw["controlnet_cond"][:, :1])
    eager = {n: _run(m, k) for n, m, k in (("a", a, kw), ("a2", a2, kw), ("g", g, kw_g), ("g2", g2, kw_g))}
    ca = torch.compile(a, backend="lyra")
    assert rel_err(_run(ca, kw), eager["a"]) < 1e-5
    assert lyradynamo.compile_count() == 1
    cg = torch.compile(g, backend="lyra")
    assert rel_err(_run(cg, kw_g), eager["g"]) < 1e-5
    assert lyradynamo.compile_count() == 2  # the other architecture: one compilation
    with torch.compiler.set_stance("fail_on_recompile"):
        swap_controlnet(ca, a2)
        swap_controlnet(cg, g2)
        assert rel_err(_run(ca, kw), eager["a2"]) < 1e-5
        assert rel_err(_run(cg, kw_g), eager["g2"]) < 1e-5
    assert lyradynamo.compile_count() == 2


def test_multi_controlnet_pipeline_compiled_matches_eager_and_swaps():
    """StableDiffusionControlNetPipeline with a MultiControlNetModel of two lyra-compiled ControlNets:
    the image equals eager; swapping one element (in the multi model) needs no recompilation."""
    import diffusers

    base = zoo.build_pipeline("sd15")
    nets = [zoo.build_controlnet("sd15", seed=s) for s in (1, 2)]
    third = zoo.build_controlnet("sd15", seed=3)

    def make(cns):
        p = diffusers.StableDiffusionControlNetPipeline(
            vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=base.unet,
            controlnet=cns, scheduler=base.scheduler, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False)
        p.set_progress_bar_config(disable=True)
        return p

    g = torch.Generator().manual_seed(0)
    images = [torch.rand(1, 3, 64, 64, generator=g) for _ in nets]

    def run(p):
        return p(prompt="a cat", image=images, num_inference_steps=2, height=64, width=64, output_type="pt",
                 generator=torch.Generator().manual_seed(0)).images

    eager = run(make([copy.deepcopy(n) for n in nets]))
    eager_swapped = run(make([copy.deepcopy(nets[0]), copy.deepcopy(third)]))
    pipe = make([torch.compile(n, backend="lyra") for n in nets])
    assert isinstance(pipe.controlnet, diffusers.MultiControlNetModel)
    got = run(pipe)
    assert rel_err(got, eager) < 1e-5
    assert lyradynamo.compile_count() == 2  # one graph per ControlNet
    with torch.compiler.set_stance("fail_on_recompile"):
        swap_controlnet(pipe.controlnet.nets[1], third)
        got_swapped = run(pipe)
        swap_controlnet(pipe.controlnet, [nets[0], copy.deepcopy(nets[1])])  # the whole multi model
    assert rel_err(got_swapped, eager_swapped) < 1e-5 and rel_err(got_swapped, got) > 1e-4
    assert lyradynamo.compile_count() == 2
    with pytest.raises(ControlNetMismatch, match="holds 2 ControlNets, got 1"):
        swap_controlnet(pipe.controlnet, [third])


def _xs_parts(seeds, size_ratio=0.5):
    """The tiny SD1.5 UNet (2 resnets per block, as ControlNet-XS requires) and one
    ControlNetXSAdapter per seed, every adapter weight random (none zero-initialised)."""
    import diffusers
    from lyradynamo.zoo import pipelines

    torch.manual_seed(0)
    cfg = dict(pipelines.denoiser_config("sd15", True), layers_per_block=2)
    unet = diffusers.UNet2DConditionModel.from_config(cfg).eval()
    adapters = []
    for s in seeds:
        torch.manual_seed(s)
        ad = diffusers.ControlNetXSAdapter.from_unet(unet, size_ratio=size_ratio, num_attention_heads=1,
                                                     conditioning_embedding_out_channels=(8, 8, 16, 16))
        for p in ad.parameters():
            p.data.normal_(0, 0.05)
        adapters.append(ad.eval())
    return unet, adapters


def test_controlnet_xs_adapter_swaps_into_the_compiled_unet(tmp_path):
    import diffusers

    unet, (ad_a, ad_b) = _xs_parts((1, 2))
    xs = diffusers.UNetControlNetXSModel.from_unet
    model = xs(unet, ad_a).eval()
    kw = dict(zoo.denoiser_inputs("sd15", unet, batch=2, height=64, width=64),
              controlnet_cond=torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5)))
    ref_a, ref_b = xs(unet, ad_a).eval(), xs(unet, ad_b).eval()
    eager_a, eager_b = _run(ref_a, kw), _run(ref_b, kw)
    assert rel_err(eager_b, eager_a) > 0.05  # the two adapters differ
    pb = dict(ref_b.named_parameters())
    base = {k: v.detach().clone() for k, v in ref_a.named_parameters() if torch.equal(v, pb[k])}  # the UNet's
    assert len(base) > len(dict(ad_a.named_parameters()))
    compiled = torch.compile(model, backend="lyra")
    assert rel_err(_run(compiled, kw), eager_a) < 1e-5
    _swap_three_ways(compiled, kw, ad_b, eager_b, ad_a.state_dict(), eager_a, str(tmp_path / "b"))
    now = dict(model.named_parameters())
    assert all(torch.equal(now[k], v) for k, v in base.items())  # the base UNet's weights untouched

    _, (other,) = _xs_parts((3,), size_ratio=0.25)  # another adapter architecture
    before = _params(model)
    with pytest.raises(ControlNetMismatch, match="same architecture"):
        swap_controlnet(compiled, other)
    assert all(torch.equal(v, before[k]) for k, v in model.named_parameters())
