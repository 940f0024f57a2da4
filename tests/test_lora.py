"""lyradynamo.lora: LoRAs patched into the weights in place, on compiled models, without recompiling.

The reference for every state is diffusers itself: the same files loaded through
`load_lora_weights` (+ `set_adapters`) and fused with `fuse_lora` on an eager copy of the model.
"""
import copy
import os

import pytest
import torch

import lyradynamo
from lyradynamo import lora, zoo
from helpers import rel_err

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
# layers that have a bias (a lora_B.bias needs one), resnet 3x3 convs included
BIASED_TARGETS = ["to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv_shortcut", "time_emb_proj"]
FLUX_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_v_proj", "proj_mlp", "proj_out",
                "ff.net.2", "norm1.linear"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1"]


# ------------------------------------------------------------------------------------------
# LoRA files
# ------------------------------------------------------------------------------------------


def _peft_lora(model, targets, seed, r=4, alpha=4, bias=False):
    """(peft state dict, adapter metadata) of a random LoRA made with peft on a copy of `model`."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    cfg = LoraConfig(r=r, lora_alpha=alpha, init_lora_weights=False, target_modules=targets, lora_bias=bias)
    model = inject_adapter_in_model(cfg, copy.deepcopy(model), adapter_name="tmp")
    sd = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model, adapter_name="tmp").items()}
    meta = cfg.to_dict()
    meta["target_modules"] = sorted(meta["target_modules"])
    return sd, meta


def make_diffusers_lora(name, path, seed, *, r=4, alpha=4, unet_targets=UNET_TARGETS, te=False, bias=False):
    """A diffusers-format LoRA file for the zoo pipeline `name`, saved like diffusers' training scripts."""
    src = zoo.build_pipeline(name, seed=100 + seed)  # another instance: peft wrappers never touch the test's
    denoiser = src.transformer if name == "flux" else src.unet
    targets = FLUX_TARGETS if name == "flux" else unet_targets
    sd, meta = _peft_lora(denoiser, targets, seed, r=r, alpha=alpha, bias=bias)
    kw = {}
    if name == "flux":
        kw["transformer_lora_layers"], kw["transformer_lora_adapter_metadata"] = sd, meta
    else:
        kw["unet_lora_layers"], kw["unet_lora_adapter_metadata"] = sd, meta
    if te:
        tsd, tmeta = _peft_lora(src.text_encoder, TE_TARGETS, seed + 1, r=r, alpha=alpha)
        kw["text_encoder_lora_layers"], kw["text_encoder_lora_adapter_metadata"] = tsd, tmeta
    type(src).save_lora_weights(str(path), safe_serialization=True, **kw)
    return str(path)


def _kohya_pairs(module, prefix, filt, g, r, alpha):
    sd = {}
    for name, m in module.named_modules():
        if not filt(name, m):
            continue
        key = prefix + name.replace(".", "_")
        W = m.weight
        if isinstance(m, torch.nn.Conv2d):
            sd[key + ".lora_down.weight"] = torch.randn((r, W.shape[1]) + tuple(W.shape[2:]), generator=g) * 0.3
            sd[key + ".lora_up.weight"] = torch.randn((W.shape[0], r, 1, 1), generator=g) * 0.3
        else:
            sd[key + ".lora_down.weight"] = torch.randn((r, W.shape[1]), generator=g) * 0.3
            sd[key + ".lora_up.weight"] = torch.randn((W.shape[0], r), generator=g) * 0.3
        sd[key + ".alpha"] = torch.tensor(float(alpha))
    return sd


def _kohya_unet_filter(name, m):
    if not isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
        return False
    leaf = name.split(".")
    return (name.endswith(("attn1.to_q", "attn1.to_k", "attn2.to_v", "attn1.to_out.0", "ff.net.2", "proj_in"))
            or (leaf[-1] in ("conv1", "time_emb_proj") and "resnets" in leaf))


def make_kohya_lora(pipe, path, seed, r=4, alpha=2.0):
    """A kohya-ss (A1111) file: lora_unet_* (attention, FF, proj, resnet 3x3 conv + time_emb_proj)
    and lora_te*_ (CLIP attention + MLP) keys with .alpha, names as kohya writes them."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    sd = _kohya_pairs(pipe.unet, "lora_unet_", _kohya_unet_filter, g, r, alpha)
    te_filter = lambda n, m: isinstance(m, torch.nn.Linear) and n.endswith(("self_attn.q_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1"))  # noqa: E731
    encoders = [("lora_te_", pipe.text_encoder)]
    if getattr(pipe, "text_encoder_2", None) is not None:
        encoders = [("lora_te1_", pipe.text_encoder), ("lora_te2_", pipe.text_encoder_2)]
    for pre, te in encoders:
        # kohya keeps the "text_model" level of CLIPTextModel in its names
        pre = pre + ("" if hasattr(te, "text_model") else "text_model_")
        sd.update(_kohya_pairs(te, pre, te_filter, g, r, alpha))
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return str(path)


# ------------------------------------------------------------------------------------------
# diffusers reference and helpers
# ------------------------------------------------------------------------------------------


def diffusers_fused(pipe_template, base, loras):
    """A copy of the eager base components with `loras` ({path: scale}) loaded through diffusers'
    load_lora_weights and fused with fuse_lora; returns the pipeline."""
    ref = copy.copy(pipe_template)
    for attr, module in base.items():
        setattr(ref, attr, copy.deepcopy(module))
    ref.register_modules(**{a: getattr(ref, a) for a in base})
    if loras:
        names = []
        for i, path in enumerate(loras):
            ref.load_lora_weights(path, adapter_name=f"a{i}")
            names.append(f"a{i}")
        ref.set_adapters(names, list(loras.values()))
        ref.fuse_lora(adapter_names=names)
        ref.unload_lora_weights()  # fused weights stay, LoRA layers go
    return ref


def params(module):
    return {k: v.detach().clone() for k, v in module.named_parameters()}


def assert_same_params(module, snapshot):
    now = dict(module.named_parameters())
    assert now.keys() == snapshot.keys()
    bad = [k for k, v in snapshot.items() if not torch.equal(now[k], v)]
    assert not bad, f"{len(bad)} parameters differ, e.g. {bad[:3]}"


def unet_out(model, inputs):
    with torch.no_grad():
        return model(**inputs)[0]


def compiled_pipeline(name, attr, batch):
    """A tiny pipeline whose denoiser `attr` is replaced by its lyra-compiled self. Returns (pipe,
    {attr: eager deep copy}, original parameters, denoiser inputs, compiled, its first output)."""
    pipe = zoo.build_pipeline(name)
    denoiser = getattr(pipe, attr)
    base = {attr: copy.deepcopy(denoiser)}
    orig = params(denoiser)
    inputs = zoo.denoiser_inputs(name, denoiser, batch=batch)
    compiled = torch.compile(denoiser, backend="lyra")
    setattr(pipe, attr, compiled)
    return pipe, base, orig, inputs, compiled, unet_out(compiled, inputs)


@pytest.fixture(autouse=True)
def _threads():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models; the CPU is shared
    yield
    torch.set_num_threads(n)


# ------------------------------------------------------------------------------------------
# Tests
# ------------------------------------------------------------------------------------------


def test_compiled_unet_load_switch_mix_unload_match_diffusers(tmp_path):
    """Loads, switches, mixes and unloads on a lyra-compiled UNet: no recompilation, each state equals
    diffusers fused, unload restores every bit, A->B->A gives A's exact weights."""
    path_a = make_diffusers_lora("sd15", tmp_path / "a", seed=1, r=4, alpha=8)  # alpha/r = 2 via metadata
    path_b = make_diffusers_lora("sd15", tmp_path / "b", seed=2, r=2, alpha=2, bias=True,
                                 unet_targets=BIASED_TARGETS)  # LoRA biases, 3x3 conv
    pipe, base, orig, inputs, compiled, out0 = compiled_pipeline("sd15", "unet", batch=2)

    def check(loras, label):
        got = unet_out(compiled, inputs)
        ref = unet_out(diffusers_fused(pipe, base, loras).unet, inputs)
        assert rel_err(got, ref) < 1e-5, (label, rel_err(got, ref))
        return got

    states = {}
    torch.compiler.set_stance("fail_on_recompile")
    try:
        assert lora.load_lora(pipe, path_a, name="A") == "A"
        out_a = check({path_a: 1.0}, "A")
        weights_a = params(pipe.unet._orig_mod)
        assert rel_err(out_a, out0) > 1e-3
        lora.unload_lora(pipe, "A")
        lora.load_lora(pipe, path_b, scale=0.8, name="B")
        check({path_b: 0.8}, "B")
        lora.load_lora(pipe, path_a, name="A")
        lora.set_loras(pipe, {"B": 0.0, "A": 1.0})  # A->B->A
        assert lora.list_loras(pipe) == {"B": 0.0, "A": 1.0}
        states["A again"] = params(pipe.unet._orig_mod)
        lora.set_loras(pipe, {"A": 0.5, "B": 1.0})
        check({path_a: 0.5, path_b: 1.0}, "mix")
        lora.set_loras(pipe, {"B": 1.0})  # A left out -> 0, still loaded
        assert lora.list_loras(pipe) == {"B": 1.0, "A": 0.0}
        check({path_b: 1.0}, "B only")
        lora.unload_lora(pipe)
        assert lora.list_loras(pipe) == {}
        out_end = unet_out(compiled, inputs)
    finally:
        torch.compiler.set_stance("default")
    assert lyradynamo.compile_count() == 1
    assert_same_params(pipe.unet._orig_mod, orig)
    assert torch.equal(out_end, out0)
    assert_same_params(pipe.unet._orig_mod, orig)
    for k, v in weights_a.items():  # A -> B -> A: bit-identical to A loaded first
        assert torch.equal(states["A again"][k], v), k


def test_bare_compiled_model_and_uncompiled_model(tmp_path):
    """A torch.compile'd model and a plain model are accepted directly; a pipeline holding a compiled
    UNet sees the adapters loaded through the bare model."""
    path = make_diffusers_lora("sd15", tmp_path / "a", seed=3)
    pipe = zoo.build_pipeline("sd15")
    inputs = zoo.denoiser_inputs("sd15", pipe.unet, batch=1)
    ref = unet_out(diffusers_fused(pipe, {"unet": pipe.unet}, {path: 0.7}).unet, inputs)

    plain = copy.deepcopy(pipe.unet)
    lora.load_lora(plain, path, scale=0.7)  # uncompiled, default name
    assert lora.list_loras(plain) == {"lora_0": 0.7}
    assert rel_err(unet_out(plain, inputs), ref) < 1e-5

    compiled = torch.compile(pipe.unet, backend="lyra")
    base = unet_out(compiled, inputs)
    with torch.compiler.set_stance("fail_on_recompile"):
        lora.load_lora(compiled, os.path.join(path, "pytorch_lora_weights.safetensors"), scale=0.7, name="x")
        assert rel_err(unet_out(compiled, inputs), ref) < 1e-5
        pipe.unet = compiled
        assert lora.list_loras(pipe) == {"x": 0.7}
        lora.unload_lora(pipe, "x")
        assert torch.equal(unet_out(compiled, inputs), base)
    assert lyradynamo.compile_count() == 1


@pytest.mark.parametrize("name", ["sd15", "sdxl"])
def test_kohya_unet_and_text_encoders_match_diffusers(tmp_path, name):
    """kohya keys (lora_unet_*, lora_te*_*, .alpha, 3x3 conv LoRA) through diffusers' own conversion:
    every targeted layer is patched, UNet and text encoder(s) equal diffusers fused."""
    pipe = zoo.build_pipeline(name)
    path = make_kohya_lora(pipe, tmp_path / "kohya.safetensors", seed=4)
    encoders = ["text_encoder"] + (["text_encoder_2"] if name == "sdxl" else [])
    base = {a: getattr(pipe, a) for a in ["unet"] + encoders}
    ref = diffusers_fused(pipe, base, {path: 0.6})
    orig = {a: params(m) for a, m in base.items()}
    pipe = copy.copy(pipe)
    for a, m in base.items():
        setattr(pipe, a, copy.deepcopy(m))
    lora.load_lora(pipe, path, scale=0.6, name="k")

    inputs = zoo.denoiser_inputs(name, pipe.unet, batch=2)
    assert rel_err(unet_out(pipe.unet, inputs), unet_out(ref.unet, inputs)) < 1e-5
    ids = torch.randint(0, pipe.text_encoder.config.vocab_size, (2, 77), generator=torch.Generator().manual_seed(0))
    for a in encoders:
        ours, theirs = getattr(pipe, a), getattr(ref, a)
        with torch.no_grad():
            o, t = ours(ids).last_hidden_state, theirs(ids).last_hidden_state
        assert rel_err(o, t) < 1e-5, a
    # every layer the file names was patched (the kohya names were all understood)
    n_kohya = sum(1 for k in _read_keys(path) if k.startswith("lora_unet_") and k.endswith(".lora_down.weight"))
    changed = [k for k, v in orig["unet"].items() if not torch.equal(v, dict(pipe.unet.named_parameters())[k])]
    assert len(changed) == n_kohya
    for a in encoders:
        changed = [k for k, v in orig[a].items() if not torch.equal(v, dict(getattr(pipe, a).named_parameters())[k])]
        assert len(changed) == 2 * 4, (a, changed)  # 2 layers x (q, v, out, fc1) weights
    lora.unload_lora(pipe)
    for a in base:
        assert_same_params(getattr(pipe, a), orig[a])


def _read_keys(path):
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return list(f.keys())


def test_text_encoder_peft_lora_on_pipeline(tmp_path):
    """A diffusers-format file with unet + text_encoder parts patches both; scale applies to both."""
    path = make_diffusers_lora("sd15", tmp_path / "a", seed=5, te=True, alpha=2)
    pipe = zoo.build_pipeline("sd15")
    base = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    ref = diffusers_fused(pipe, base, {path: 0.9})
    orig_te = params(pipe.text_encoder)
    pipe = copy.copy(pipe)
    pipe.unet, pipe.text_encoder = copy.deepcopy(base["unet"]), copy.deepcopy(base["text_encoder"])
    te_compiled = torch.compile(pipe.text_encoder, backend="lyra")
    ids = torch.randint(0, pipe.text_encoder.config.vocab_size, (1, 77), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        te_base = te_compiled(ids).last_hidden_state
    pipe.text_encoder = te_compiled
    n0 = lyradynamo.compile_count()
    with torch.compiler.set_stance("fail_on_recompile"):
        lora.load_lora(pipe, path, scale=0.9)
        with torch.no_grad():
            got = te_compiled(ids).last_hidden_state
            want = ref.text_encoder(ids).last_hidden_state
        assert rel_err(got, want) < 1e-5 and rel_err(got, te_base) > 1e-4
        inputs = zoo.denoiser_inputs("sd15", pipe.unet, batch=1)
        assert rel_err(unet_out(pipe.unet, inputs), unet_out(ref.unet, inputs)) < 1e-5
        lora.unload_lora(pipe)
    assert lyradynamo.compile_count() == n0
    assert_same_params(te_compiled._orig_mod, orig_te)


def test_flux_transformer_lora_compiled(tmp_path):
    """FLUX: a peft LoRA on attention, single-block MLP and adaLN linears, on the compiled transformer."""
    path_a = make_diffusers_lora("flux", tmp_path / "a", seed=6)
    path_b = make_diffusers_lora("flux", tmp_path / "b", seed=7, r=2, alpha=1)
    pipe, base, orig, inputs, compiled, out0 = compiled_pipeline("flux", "transformer", batch=1)
    with torch.compiler.set_stance("fail_on_recompile"):
        lora.load_lora(pipe, path_a, name="A")
        lora.load_lora(pipe, path_b, scale=0.5, name="B")
        got = unet_out(compiled, inputs)
        ref = unet_out(diffusers_fused(pipe, base, {path_a: 1.0, path_b: 0.5}).transformer, inputs)
        assert rel_err(got, ref) < 1e-5 and rel_err(got, out0) > 1e-3
        lora.unload_lora(pipe, "A")
        ref = unet_out(diffusers_fused(pipe, base, {path_b: 0.5}).transformer, inputs)
        assert rel_err(unet_out(compiled, inputs), ref) < 1e-5
        lora.unload_lora(pipe)
        assert torch.equal(unet_out(compiled, inputs), out0)
    assert lyradynamo.compile_count() == 1
    assert_same_params(pipe.transformer._orig_mod, orig)


def test_flux_kohya_format_goes_through_diffusers_conversion():
    """A kohya-style FLUX key set (lora_unet_double_blocks_0_img_attn_qkv ...) is converted by FluxPipeline's
    reader into diffusers names; the fused qkv LoRA lands on to_q/to_k/to_v as diffusers would put it."""
    pipe = zoo.build_pipeline("flux")
    model = pipe.transformer
    inner = model.config.num_attention_heads * model.config.attention_head_dim
    g = torch.Generator().manual_seed(8)
    r = 4
    sd = {
        "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.randn(r, inner, generator=g),
        "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.randn(3 * inner, r, generator=g),
        "lora_unet_double_blocks_0_img_attn_qkv.alpha": torch.tensor(2.0),
    }
    ref = diffusers_fused(pipe, {"transformer": model}, {})
    ref.load_lora_weights(dict(sd), adapter_name="k")
    ref.fuse_lora()
    ref.unload_lora_weights()
    orig = params(model)
    lora.load_lora(pipe, sd, name="k")
    inputs = zoo.denoiser_inputs("flux", model, batch=1)
    assert rel_err(unet_out(model, inputs), unet_out(ref.transformer, inputs)) < 1e-5
    changed = sorted(k for k, v in orig.items() if not torch.equal(v, dict(model.named_parameters())[k]))
    assert changed == [f"transformer_blocks.0.attn.to_{c}.weight" for c in "kqv"]


# ------------------------------------------------------------------------------------------
# Bad input (issue point 6): clear errors, model untouched
# ------------------------------------------------------------------------------------------


@pytest.fixture
def loaded_pipe(tmp_path):
    """A tiny SD1.5 pipeline with one LoRA already loaded (errors must not disturb it either)."""
    path = make_diffusers_lora("sd15", tmp_path / "good", seed=9, te=True)
    pipe = zoo.build_pipeline("sd15")
    lora.load_lora(pipe, path, scale=0.5, name="good")
    snap = {"unet": params(pipe.unet), "text_encoder": params(pipe.text_encoder)}
    return pipe, path, snap


def _unchanged(pipe, snap):
    assert_same_params(pipe.unet, snap["unet"])
    assert_same_params(pipe.text_encoder, snap["text_encoder"])
    assert lora.list_loras(pipe) == {"good": 0.5}


def test_bad_keys_match_nothing(loaded_pipe):
    pipe, path, snap = loaded_pipe
    from safetensors.torch import load_file

    sd = load_file(os.path.join(path, "pytorch_lora_weights.safetensors"))
    key = next(k for k in sd if k.startswith("unet.") and "lora_A" in k)
    bad = dict(sd)
    bad[key.replace("down_blocks.0", "down_blocks.7")] = bad.pop(key)  # one module that does not exist
    bad[key.replace("lora_A", "lora_B").replace("down_blocks.0", "down_blocks.7")] = bad.pop(key.replace("lora_A", "lora_B"))
    with pytest.raises(ValueError, match=r"2 keys match no module.*down_blocks\.7"):
        lora.load_lora(pipe, bad, name="bad")
    _unchanged(pipe, snap)


def test_bad_shapes(loaded_pipe):
    pipe, path, snap = loaded_pipe
    from safetensors.torch import load_file

    sd = load_file(os.path.join(path, "pytorch_lora_weights.safetensors"))
    key = next(k for k in sd if k.startswith("unet.") and "ff.net.2.lora_A" in k)
    sd[key] = torch.randn(sd[key].shape[0], 7)
    layer = key.removesuffix(".lora_A.weight")
    with pytest.raises(ValueError, match=rf"{layer}: weight is \(32, 128\) but the LoRA gives .*\(4, 7\)"):
        lora.load_lora(pipe, sd, name="bad")
    _unchanged(pipe, snap)


def test_not_a_lora(loaded_pipe, tmp_path):
    pipe, _path, snap = loaded_pipe
    text = tmp_path / "notes.safetensors"
    text.write_text("not a tensor file")
    with pytest.raises(ValueError, match="not a safetensors file"):
        lora.load_lora(pipe, str(text))
    from safetensors.torch import save_file

    full = tmp_path / "model.safetensors"  # a full checkpoint, not a LoRA
    save_file({k: v.contiguous() for k, v in list(pipe.unet.state_dict().items())[:5]}, str(full))
    with pytest.raises(ValueError, match="not a LoRA"):
        lora.load_lora(pipe, str(full))
    with pytest.raises(FileNotFoundError):
        lora.load_lora(pipe, str(tmp_path / "missing.safetensors"))
    _unchanged(pipe, snap)


def test_bad_names(loaded_pipe):
    pipe, path, snap = loaded_pipe
    with pytest.raises(ValueError, match="already loaded"):
        lora.load_lora(pipe, path, name="good")
    with pytest.raises(ValueError, match="no LoRA named 'nope'"):
        lora.unload_lora(pipe, "nope")
    with pytest.raises(ValueError, match=r"no LoRA named \['nope'\]"):
        lora.set_loras(pipe, {"good": 1.0, "nope": 1.0})
    _unchanged(pipe, snap)


def test_swap_reuses_backups_and_detects_foreign_writes(tmp_path, monkeypatch):
    """unload -> load (a swap) reuses the backups kept at unload (no new host copies), the result
    is what a fresh load gives, and a weight written by someone else after the unload gets a
    fresh backup (its new value is what a later unload restores, not the stale spare)."""
    pa = make_diffusers_lora("sd15", tmp_path / "a", seed=3)
    pb = make_diffusers_lora("sd15", tmp_path / "b", seed=4)
    unet = zoo.build_pipeline("sd15").unet
    fresh = copy.deepcopy(unet)
    lora.load_lora(fresh, pb, name="b")
    want_b = params(fresh)

    taken = []
    backup = lora._backup
    monkeypatch.setattr(lora, "_backup", lambda p, budget: taken.append(p) or backup(p, budget))
    orig = params(unet)
    lora.load_lora(unet, pa, name="a")
    first = len(taken)
    assert first > 0
    lora.unload_lora(unet, "a")
    assert_same_params(unet, orig)
    lora.load_lora(unet, pb, name="b")  # the swap: every backup is a spare from the unload
    assert len(taken) == first
    assert_same_params(unet, want_b)
    lora.unload_lora(unet, "b")
    assert_same_params(unet, orig)

    # someone else writes a LoRA-touched weight in place: its spare is stale
    name = next(k for k in lora._STATES[unet].spare)
    with torch.no_grad():
        dict(unet.named_parameters())[name].add_(1.0)
    edited = params(unet)
    lora.load_lora(unet, pa, name="a")
    assert len(taken) == first + 1  # exactly the edited weight was backed up again
    lora.unload_lora(unet, "a")
    assert_same_params(unet, edited)
    assert lora.release_backups(unet) == first
    assert not lora._STATES[unet].spare


def test_gpu_backup_budget_auto_gpu_host(monkeypatch, caplog):
    """config.lora_backup: auto keeps GPU backups until lora_backup_reserve of the card would be
    left, then says once that the rest go to the host; gpu / host force one place."""
    import types

    dev = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d=None: (50 * 2**20, 100 * 2**20))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda d=None: 10 * 2**20)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda d=None: 0)
    w = types.SimpleNamespace(numel=lambda: 5 * 2**20, element_size=lambda: 2, device=dev)  # 10 MiB
    with lyradynamo.config.patch(lora_backup="auto", lora_backup_reserve=0.25), caplog.at_level("INFO", "lyradynamo"):
        budget = lora._GpuBudget()  # 50 free + 10 cached - 25 reserved = 35 MiB: three 10 MiB backups fit
        assert [budget.take(w) for _ in range(5)] == [True, True, True, False, False]
    assert sum("further backups go to host memory" in r.message for r in caplog.records) == 1
    for where, want in (("gpu", True), ("host", False)):
        with lyradynamo.config.patch(lora_backup=where):
            assert all(lora._GpuBudget().take(w) is want for _ in range(8))
    with pytest.raises(Exception, match="lora_backup"):
        lyradynamo.config.lora_backup = "disk"
