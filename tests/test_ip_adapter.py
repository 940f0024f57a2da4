"""IP-Adapter on a lyra-compiled SD1.5 / SDXL UNet and FLUX transformer: diffusers' load_ip_adapter
(before compiling) works and matches eager; lyradynamo.ip_adapter.set_scale changes the scale without
recompiling (diffusers' set_ip_adapter_scale recompiles: the processors use the Python float as a
constant) and equals eager diffusers with set_ip_adapter_scale; lyradynamo.ip_adapter.unload turns
the IP-Adapter off without recompiling and equals the model without one.

The IP-Adapters are random state dicts in the layouts diffusers' loaders take: UNets (SD1.5, SDXL)
`{"image_proj": ImageProjection, "ip_adapter": {"{k}.to_k_ip/to_v_ip.weight"}}` with k = 1, 3, 5, ...
over the cross-attention processors (no biases); FLUX `{"{k}.to_k_ip/to_v_ip.weight/bias"}` with
k = 0, 1, ... over the double-stream blocks (the value projection has a bias, scaled with it)."""
import copy
import types

import pytest
import torch

import lyradynamo
from lyradynamo import ip_adapter, zoo
from helpers import rel_err

CLIP_DIM = 16
MODELS = ("sd15", "sdxl", "flux")
TOL = 1e-5  # fp32, compiled vs eager

# Scale configs per model, each (where, scale): where = "pipe" (lyradynamo.ip_adapter.set_scale
# on the pipeline: every config its set_ip_adapter_scale takes) or "model" (on the compiled model
# itself: a float, or one per IP-Adapter). Tiny SD1.5: up block_1 has 2 attentions; tiny SDXL: down block_1 has 1
# (2 transformer layers in it: one processor name prefix), up block_0 has 2; tiny FLUX: 1 double block.
SCALES = {
    "sd15": [("pipe", 0.5), ("pipe", 0.0), ("pipe", {"up": {"block_1": [0.0, 1.0]}}), ("model", 1.3)],
    "sdxl": [("pipe", 0.5), ("model", 0.0), ("pipe", {"down": {"block_1": 0.4}, "up": {"block_0": [0.0, 1.2]}}),
             ("pipe", 1.3)],
    "flux": [("pipe", 0.5), ("pipe", 0.0), ("pipe", [0.7]), ("model", 1.3)],  # [0.7]: one per double block
}
# Two IP-Adapters: one config per IP-Adapter (diffusers' UNet set_ip_adapter_scale rejects a single
# float for two; FLUX's takes it, and a bare model takes it for all IP-Adapters).
SCALES_TWO = {
    "sdxl": [("pipe", [0.3, 1.1]), ("model", [0.0, 0.6]), ("pipe", [{"up": {"block_0": [0.0, 1.0]}}, 0.5])],
    "flux": [("pipe", [0.3, 1.1]), ("model", [0.0, 0.6]), ("pipe", [[0.9], [0.2]]), ("pipe", 0.8)],
}


def _is_flux(model) -> bool:
    return hasattr(model, "transformer_blocks") and hasattr(model, "single_transformer_blocks")


def make_ip_adapter(model, seed=0):
    """A random IP-Adapter state dict for `model` (a UNet2DConditionModel or a FluxTransformer2DModel)
    in the layout diffusers' load_ip_adapter takes: image_proj (ImageProjection: CLIP image embedding
    -> 4 tokens of the model's text width) + ip_adapter (per-processor key/value projections)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, s=0.2):
        return torch.randn(*shape, generator=g) * s

    flux = _is_flux(model)
    D = model.config.joint_attention_dim if flux else model.config.cross_attention_dim
    sd = {"image_proj": {"proj.weight": rnd(4 * D, CLIP_DIM), "proj.bias": rnd(4 * D, s=0.05) if flux else torch.zeros(4 * D),
                         "norm.weight": torch.ones(D), "norm.bias": torch.zeros(D)},
          "ip_adapter": {}}
    if flux:
        for k in range(len(model.transformer_blocks)):
            for proj in ("to_k_ip", "to_v_ip"):
                sd["ip_adapter"][f"{k}.{proj}.weight"] = rnd(model.inner_dim, D)
                sd["ip_adapter"][f"{k}.{proj}.bias"] = rnd(model.inner_dim, s=0.1)
        return sd
    k = 1
    for name in model.attn_processors:
        if name.endswith("attn2.processor"):
            hidden = model.get_submodule(name.removesuffix(".processor")).to_q.out_features
            sd["ip_adapter"][f"{k}.to_k_ip.weight"] = rnd(hidden, D)
            sd["ip_adapter"][f"{k}.to_v_ip.weight"] = rnd(hidden, D)
            k += 2
    return sd


def load_ip_adapters(pipe, n=1):
    """diffusers' own pipe.load_ip_adapter with n random IP-Adapters (state dicts, no image encoder)."""
    attr = "transformer" if hasattr(pipe, "transformer") else "unet"
    sds = [make_ip_adapter(getattr(pipe, attr), seed=i) for i in range(n)]
    names = [f"ip{i}.safetensors" for i in range(n)]
    if attr == "transformer":  # FluxIPAdapterMixin
        pipe.load_ip_adapter(sds, weight_name=names, image_encoder_pretrained_model_name_or_path=None)
    else:  # IPAdapterMixin
        pipe.load_ip_adapter(sds, subfolder=[None] * n, weight_name=names, image_encoder_folder=None)


def build(name, n_adapters=1):
    """The pipeline with its IP-Adapter(s) loaded, an eager reference (a shallow copy of the pipeline
    with a deep copy of its denoiser) and input builders. Each call of `inputs(seed)` gives fresh
    kwargs (the denoiser's inputs as its pipeline passes them, plus image embeddings drawn from
    `seed`); `plain()` the same call without any IP-Adapter input."""
    torch.set_num_threads(1)
    pipe = zoo.build_pipeline(name)
    load_ip_adapters(pipe, n_adapters)
    attr = "transformer" if name == "flux" else "unet"
    ref = copy.copy(pipe)
    setattr(ref, attr, copy.deepcopy(getattr(pipe, attr)))

    def plain():
        return zoo.denoiser_inputs(name, getattr(ref, attr), batch=2)

    def inputs(seed=1):
        g = torch.Generator().manual_seed(seed)
        embeds = [torch.randn(2, 1, CLIP_DIM, generator=g) for _ in range(n_adapters)]
        kw = plain()
        if name == "flux":  # FluxPipeline: joint_attention_kwargs["ip_adapter_image_embeds"]
            kw["joint_attention_kwargs"] = {"ip_adapter_image_embeds": embeds}
        else:  # SD / SDXL pipelines: added_cond_kwargs["image_embeds"] (SDXL: next to text_embeds, time_ids)
            kw["added_cond_kwargs"] = {**kw.get("added_cond_kwargs", {}), "image_embeds": embeds}
        return kw

    return types.SimpleNamespace(pipe=pipe, ref=ref, attr=attr, inputs=inputs, plain=plain,
                                 model=lambda p: getattr(p, attr))


def _out(m, inputs):
    with torch.no_grad():
        return m(**inputs)[0]


def _compile(s):
    compiled = torch.compile(s.model(s.pipe), backend="lyra")
    setattr(s.pipe, s.attr, compiled)
    return compiled


def _check_ip_attention_matched(s):
    """The IP-Adapter's attentions are matched like the model's own: one sdpa per attention
    processor plus one per IP-Adapter branch, every one of them a lyra::attention, nothing left."""
    (rec,) = lyradynamo.compiled_graphs()
    procs = s.model(s.ref).attn_processors.values()
    n_ip = sum(len(p.to_v_ip) for p in procs if hasattr(p, "to_v_ip"))
    assert n_ip > 0
    cov = rec.summary["coverage"]
    assert cov["sdpa"]["before"] == len(procs) + n_ip
    assert all(c["left"] == 0 for c in cov.values()), rec.summary["left"]
    assert rec.summary["op_histogram"].get("lyra::attention", 0) == cov["sdpa"]["before"]


def _check_scales(s, compiled, scales, full=None):
    """Each (where, scale): lyra's set_scale on the pipeline or the compiled model gives eager
    diffusers' output after its set_ip_adapter_scale; with `full` (the output at the loaded scale),
    every scale but 1.0 also changes the output."""
    for where, scale in scales:
        ip_adapter.set_scale(s.pipe if where == "pipe" else compiled, scale)
        s.ref.set_ip_adapter_scale(scale)
        got, want = _out(compiled, s.inputs()), _out(s.model(s.ref), s.inputs())
        assert rel_err(got, want) < TOL, (scale, rel_err(got, want))
        if full is not None:
            assert rel_err(got, full) > 1e-3 or scale == 1.0  # the scale mattered


@pytest.mark.parametrize("name", MODELS)
def test_set_scale_on_compiled_model_matches_diffusers_without_recompile(name):
    s = build(name)
    compiled = _compile(s)
    full = _out(compiled, s.inputs())
    assert rel_err(full, _out(s.model(s.ref), s.inputs())) < TOL
    _check_ip_attention_matched(s)
    with torch.compiler.set_stance("fail_on_recompile"):
        _check_scales(s, compiled, SCALES[name], full)
        ip_adapter.restore(s.pipe)
        assert torch.equal(_out(compiled, s.inputs()), full)
    assert lyradynamo.compile_count() == 1


@pytest.mark.parametrize("name", ["sdxl", "flux"])
def test_diffusers_set_ip_adapter_scale_recompiles(name):
    """Why set_scale exists: diffusers' own scale change is a guard failure on the compiled model."""
    s = build(name)
    compiled = _compile(s)
    _out(compiled, s.inputs())
    s.pipe.set_ip_adapter_scale(0.5)
    with torch.compiler.set_stance("fail_on_recompile"), pytest.raises(Exception, match="(?i)recompil"):
        _out(compiled, s.inputs())


@pytest.mark.parametrize("name", ["sdxl", "flux"])
def test_two_ip_adapters_per_adapter_scales(name):
    """Two IP-Adapters: scale lists of two entries, to_v_ip ModuleLists of two projections."""
    s = build(name, n_adapters=2)
    compiled = _compile(s)
    assert rel_err(_out(compiled, s.inputs()), _out(s.model(s.ref), s.inputs())) < TOL
    _check_ip_attention_matched(s)
    with torch.compiler.set_stance("fail_on_recompile"):
        _check_scales(s, compiled, SCALES_TWO[name])
    assert lyradynamo.compile_count() == 1


@pytest.mark.parametrize("name", MODELS)
def test_unload_equals_no_ip_adapter_without_recompile(name):
    s = build(name)
    compiled = _compile(s)
    full = _out(compiled, s.inputs())
    # the same model without the IP-Adapter: diffusers' unload_ip_adapter on the eager reference,
    # and that model compiled on its own
    s.ref.unload_ip_adapter()
    eager_plain = _out(s.model(s.ref), s.plain())
    compiled_plain = _out(torch.compile(copy.deepcopy(s.model(s.ref)), backend="lyra"), s.plain())
    assert lyradynamo.compile_count() == 2
    with torch.compiler.set_stance("fail_on_recompile"):
        ip_adapter.unload(s.pipe)
        off = _out(compiled, s.inputs())
        assert torch.equal(off, compiled_plain)  # bit-exact: the branch adds +0.0
        assert rel_err(off, eager_plain) < TOL  # compiled vs eager: fp32 rounding
        assert torch.equal(_out(compiled, s.inputs(seed=7)), off)  # the embeddings no longer matter
        ip_adapter.set_scale(s.pipe, 1.0)  # back on: the original weights, bit for bit
        assert torch.equal(_out(compiled, s.inputs()), full)
        ip_adapter.unload(compiled)  # the compiled model itself works too
        assert torch.equal(_out(compiled, s.inputs()), off)
    assert lyradynamo.compile_count() == 2


@pytest.mark.parametrize("name", ["sd15", "flux"])
def test_restore_then_diffusers_unload(name):
    """restore() then diffusers' unload_ip_adapter on the pipeline with the compiled model: the
    IP-Adapter is gone for good (the model recompiles once, called without image embeddings)."""
    s = build(name)
    compiled = _compile(s)
    _out(compiled, s.inputs())
    ip_adapter.set_scale(s.pipe, 0.4)
    ip_adapter.restore(s.pipe)
    s.pipe.unload_ip_adapter()
    s.ref.unload_ip_adapter()
    assert rel_err(_out(compiled, s.plain()), _out(s.model(s.ref), s.plain())) < TOL
    assert lyradynamo.compile_count() == 2
    with pytest.raises(ValueError, match="no IP-Adapter is loaded"):
        ip_adapter.set_scale(s.pipe, 0.5)


def test_scale_zero_equals_no_ip_adapter_eager():
    """Without compiling: set_scale(model, 0) on the eager UNet equals diffusers' unloaded model."""
    s = build("sd15")
    ip_adapter.set_scale(s.pipe.unet, 0.0)
    s.ref.unload_ip_adapter()
    assert torch.equal(_out(s.pipe.unet, s.inputs()), _out(s.ref.unet, s.plain()))


@pytest.mark.parametrize("name", MODELS)
def test_set_scale_without_ip_adapter_is_an_error(name):
    torch.set_num_threads(1)
    model = zoo.build_denoiser(name)
    for call in (lambda t: ip_adapter.set_scale(t, 0.5), ip_adapter.unload, ip_adapter.restore):
        with pytest.raises(ValueError, match="no IP-Adapter is loaded"):
            call(model)
        with pytest.raises(ValueError, match="no IP-Adapter is loaded"):
            call(torch.compile(model, backend="lyra"))


def test_bad_scales_are_errors_and_leave_the_scales_alone():
    s = build("flux", n_adapters=2)
    procs = {n: p for n, p in s.pipe.transformer.attn_processors.items() if hasattr(p, "to_v_ip")}
    before = {n: (p.scale, list(p.scale)) for n, p in procs.items()}
    with pytest.raises(ValueError):
        ip_adapter.set_scale(s.pipe, [0.1, 0.2, 0.3])  # 3 scales for 2 IP-Adapters (diffusers' own check)
    with pytest.raises(ValueError, match="3 scales for 2"):
        ip_adapter.set_scale(s.pipe.transformer, [0.1, 0.2, 0.3])
    with pytest.raises(TypeError, match="pass the pipeline"):
        ip_adapter.set_scale(s.pipe.transformer, {"up": 0.5})
    for n, p in procs.items():
        assert p.scale is before[n][0] and p.scale == before[n][1]
