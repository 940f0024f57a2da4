"""Tests for lyradynamo.zoo: tiny denoisers/pipelines run on CPU, full-size configs are right.

Full-size models are never materialized here (far too slow on CPU); their configs are checked
by key numbers, and by building them on the "meta" device (no storage) to compare parameter
counts with the published checkpoints and to shape-check a forward at the native resolution.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from lyradynamo import zoo
from lyradynamo.zoo import configs

SIZES = [(64, 64), (64, 96)]


@functools.lru_cache(maxsize=None)
def _tiny(name):
    return zoo.build_denoiser(name)


@functools.lru_cache(maxsize=None)
def _pipe(name):
    return zoo.build_pipeline(name)


def _expected_shape(name, model, kw):
    if name == "flux":  # packed tokens in, packed tokens out
        return tuple(kw["hidden_states"].shape)
    x = kw["sample"] if "sample" in kw else kw["hidden_states"]
    return (x.shape[0], model.config.out_channels, x.shape[2], x.shape[3])


# ------------------------------------------------------------------------------------------
# Tiny denoisers
# ------------------------------------------------------------------------------------------


def test_names():
    assert zoo.MODEL_NAMES == ("sd15", "sdxl", "flux", "sd3", "pixart", "sana", "auraflow")
    assert zoo.tiny_model_names() == zoo.MODEL_NAMES
    assert set(zoo.PIPELINE_NAMES) >= {"sd15", "sdxl", "flux"}
    with pytest.raises(ValueError):
        zoo.build_denoiser("nope")


@pytest.mark.parametrize("name", zoo.MODEL_NAMES)
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("prompt_len", [None, 24])
def test_tiny_denoiser_forward(name, batch, size, prompt_len):
    model = _tiny(name)
    h, w = size
    kw = zoo.denoiser_inputs(name, model, batch=batch, height=h, width=w, prompt_len=prompt_len)
    with torch.no_grad():
        out = model(**kw)[0]
    assert tuple(out.shape) == _expected_shape(name, model, kw)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
    # latent = pixels // 8 for every tiny model
    if name == "flux":
        assert out.shape[1] == (h // 16) * (w // 16)
    else:
        assert out.shape[-2:] == (h // 8, w // 8)
    text = kw["encoder_hidden_states"]
    assert text.shape[:2] == (batch, prompt_len or zoo.default_prompt_len(name, tiny=True))


@pytest.mark.parametrize("name", zoo.MODEL_NAMES)
def test_tiny_defaults_and_determinism(name):
    model = _tiny(name)
    assert zoo.is_tiny(name, model)
    assert zoo.default_size(name) == (64, 64)
    a = zoo.denoiser_inputs(name, model)
    b = zoo.denoiser_inputs(name, model)
    c = zoo.denoiser_inputs(name, model, seed=1)
    x = "sample" if "sample" in a else "hidden_states"
    assert a[x].shape[0] == 1
    assert torch.equal(a[x], b[x]) and not torch.equal(a[x], c[x])
    with torch.no_grad():
        assert torch.equal(model(**a)[0], model(**b)[0])
    # same seed -> same weights
    rebuilt = zoo.build_denoiser(name)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), rebuilt.parameters()))
    assert not model.training


def test_tiny_keeps_block_types():
    sd15, sdxl = zoo.denoiser_config("sd15"), zoo.denoiser_config("sdxl")
    assert set(sd15["down_block_types"]) == {"CrossAttnDownBlock2D", "DownBlock2D"}
    assert sdxl["addition_embed_type"] == "text_time" and max(sdxl["transformer_layers_per_block"]) > 1
    assert sdxl["projection_class_embeddings_input_dim"] == 6 * sdxl["addition_time_embed_dim"] + configs.TINY_TEXT_DIM
    flux = zoo.denoiser_config("flux")
    assert flux["guidance_embeds"] and sum(flux["axes_dims_rope"]) == flux["attention_head_dim"]
    sd3 = zoo.denoiser_config("sd3")
    assert sd3["qk_norm"] == "rms_norm" and sd3["dual_attention_layers"] == (0,)
    assert _tiny("pixart").use_additional_conditions  # like the 1024px checkpoint


def test_special_inputs():
    kw = zoo.denoiser_inputs("sdxl", _tiny("sdxl"), batch=2, height=64, width=96)
    assert kw["added_cond_kwargs"]["time_ids"].tolist() == [[64, 96, 0, 0, 64, 96]] * 2
    assert kw["added_cond_kwargs"]["text_embeds"].shape == (2, configs.TINY_TEXT_DIM)
    kw = zoo.denoiser_inputs("flux", _tiny("flux"), batch=2, height=64, width=96)
    assert kw["img_ids"].shape == (4 * 6, 3) and kw["txt_ids"].shape == (32, 3)
    assert kw["img_ids"][-1].tolist() == [0, 3, 5] and not kw["txt_ids"].any()
    assert kw["guidance"].dtype == torch.float32 and kw["guidance"].shape == (2,)
    assert ((kw["timestep"] >= 0) & (kw["timestep"] <= 1)).all()
    kw = zoo.denoiser_inputs("pixart", _tiny("pixart"), batch=2, height=64, width=96)
    assert kw["added_cond_kwargs"]["resolution"].tolist() == [[64, 96]] * 2


@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_tiny_denoiser_dtype(dtype):
    for name in zoo.MODEL_NAMES:
        model = zoo.build_denoiser(name, dtype=dtype)
        assert {p.dtype for p in model.parameters()} == {dtype}
        with torch.no_grad():
            out = model(**zoo.denoiser_inputs(name, model, batch=2))[0]
        assert out.dtype == dtype and torch.isfinite(out).all()


def test_model_path_roundtrip(tmp_path):
    model = _tiny("sd15")
    model.save_pretrained(tmp_path / "pipe" / "unet")
    model.save_pretrained(tmp_path / "bare")
    kw = zoo.denoiser_inputs("sd15", model)
    with torch.no_grad():
        ref = model(**kw)[0]
        for path in (tmp_path / "pipe", tmp_path / "bare"):
            loaded = zoo.build_denoiser("sd15", model_path=path)
            assert zoo.is_tiny("sd15", loaded)
            torch.testing.assert_close(loaded(**kw)[0], ref)
    with pytest.raises(FileNotFoundError):
        zoo.build_denoiser("sd15", model_path=tmp_path / "missing")


# ------------------------------------------------------------------------------------------
# Tokenizers
# ------------------------------------------------------------------------------------------


def test_tokenizers():
    clip = zoo.clip_tokenizer()
    assert clip.model_max_length == 77 and len(clip) < 49408
    assert clip.eos_token_id == max(clip.get_vocab().values())  # argmax pooling lands on EOS
    ids = clip("a photo of a cat", padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert ids.shape == (1, 77) and ids[0, 0] == clip.bos_token_id
    assert zoo.clip_g_tokenizer().pad_token == "!"
    t5 = zoo.t5_tokenizer()
    assert t5.model_max_length == 512 and len(t5) < 32128
    assert (t5.pad_token_id, t5.eos_token_id, t5.unk_token_id) == (0, 1, 2)
    out = t5(["a cat", "Zebra 42!"], padding="max_length", max_length=16, truncation=True, return_tensors="pt")
    assert out.input_ids.shape == (2, 16) and (out.input_ids == 1).sum() == 2
    assert zoo.clip_tokenizer() is clip  # cached


# ------------------------------------------------------------------------------------------
# Tiny pipelines
# ------------------------------------------------------------------------------------------


def _run(pipe, h=64, w=64, **kw):
    return pipe(
        prompt="a cat",
        num_inference_steps=2,
        height=h,
        width=w,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
        **kw,
    ).images


@pytest.mark.parametrize("name", zoo.PIPELINE_NAMES)
def test_tiny_pipeline(name):
    pipe = _pipe(name)
    a, b = _run(pipe), _run(pipe)
    assert a.shape == (1, 64, 64, 3)
    assert np.isfinite(a).all()
    np.testing.assert_array_equal(a, b)


def test_tiny_pipeline_non_square():
    assert _run(_pipe("sdxl"), 64, 96).shape == (1, 64, 96, 3)
    assert _run(_pipe("flux"), 64, 96).shape == (1, 64, 96, 3)


def test_tiny_pixart_pipeline():
    pipe = zoo.build_pipeline("pixart")
    img = _run(pipe, use_resolution_binning=False, clean_caption=False)
    assert img.shape == (1, 64, 64, 3) and np.isfinite(img).all()


def test_pipeline_model_path(tmp_path):
    pipe = _pipe("sd15")
    pipe.save_pretrained(tmp_path)
    loaded = zoo.build_pipeline("sd15", model_path=tmp_path)
    np.testing.assert_allclose(_run(loaded), _run(pipe), atol=1e-4)


# ------------------------------------------------------------------------------------------
# Full-size configs (never materialized)
# ------------------------------------------------------------------------------------------


def test_full_configs_key_numbers():
    sd15 = zoo.denoiser_config("sd15", tiny=False)
    assert sd15["cross_attention_dim"] == 768 and tuple(sd15["block_out_channels"]) == (320, 640, 1280, 1280)
    sdxl = zoo.denoiser_config("sdxl", tiny=False)
    assert tuple(sdxl["block_out_channels"]) == (320, 640, 1280)
    assert sdxl["cross_attention_dim"] == 2048 and sdxl["addition_embed_type"] == "text_time"
    assert sdxl["projection_class_embeddings_input_dim"] == 2816
    assert tuple(sdxl["transformer_layers_per_block"]) == (1, 2, 10)
    flux = zoo.denoiser_config("flux", tiny=False)
    assert (flux["num_layers"], flux["num_single_layers"]) == (19, 38)
    assert (flux["attention_head_dim"], flux["num_attention_heads"]) == (128, 24)
    assert flux["guidance_embeds"] is True and flux["joint_attention_dim"] == 4096
    sd3 = zoo.denoiser_config("sd3", tiny=False)
    assert (sd3["num_layers"], sd3["num_attention_heads"], sd3["pooled_projection_dim"]) == (24, 24, 2048)
    pixart = zoo.denoiser_config("pixart", tiny=False)
    assert (pixart["num_layers"], pixart["caption_channels"], pixart["sample_size"]) == (28, 4096, 128)
    sana = zoo.denoiser_config("sana", tiny=False)
    assert (sana["num_layers"], sana["num_attention_heads"], sana["caption_channels"]) == (20, 70, 2304)
    aura = zoo.denoiser_config("auraflow", tiny=False)
    assert (aura["num_mmdit_layers"], aura["num_single_dit_layers"], aura["pos_embed_max_size"]) == (4, 32, 4096)
    assert {n: zoo.default_size(n, tiny=False)[0] for n in ("sd15", "sdxl", "flux")} == {
        "sd15": 512,
        "sdxl": 1024,
        "flux": 1024,
    }


# Published parameter counts of the denoisers.
FULL_PARAMS = {
    "sd15": 859_520_964,
    "sdxl": 2_567_463_684,
    "flux": 11_901_408_320,
    "sd3": 2_028_328_000,
    "pixart": 611_349_152,
    "sana": 1_604_462_752,
    "auraflow": 6_842_876_928,
}


@pytest.mark.parametrize("name", zoo.MODEL_NAMES)
def test_full_denoiser_on_meta(name):
    import diffusers

    with torch.device("meta"):
        model = getattr(diffusers, configs.DENOISER_CLASSES[name]).from_config(zoo.denoiser_config(name, tiny=False))
    assert sum(p.numel() for p in model.parameters()) == FULL_PARAMS[name]
    assert not zoo.is_tiny(name, model)
    kw = zoo.denoiser_inputs(name, model, batch=2)
    with torch.no_grad():
        out = model(**kw)[0]
    assert tuple(out.shape) == _expected_shape(name, model, kw)
    seq = kw["encoder_hidden_states"].shape[1]
    assert seq == {"sd15": 77, "sdxl": 77, "flux": 512, "sd3": 154, "pixart": 120, "sana": 300, "auraflow": 256}[name]
    side = {"sd15": 64, "sana": 32}.get(name, 128)  # latent side at the native resolution
    if name == "flux":
        assert out.shape[1] == (side // 2) ** 2
    else:
        assert out.shape[-2:] == (side, side)


FULL_COMPONENT_PARAMS = {
    "CLIPTextModel": 123_060_480,
    "CLIPTextModelWithProjection": None,  # CLIP-L 123_650_304 / bigG 694_659_840
    "T5EncoderModel": 4_762_310_656,
}


@pytest.mark.parametrize("name", ["sd15", "sdxl", "flux", "sd3", "pixart"])
def test_full_pipeline_components_on_meta(name):
    import diffusers
    import transformers

    _, spec = zoo.pipeline_spec(name, tiny=False)
    for comp, (lib, cls_name, cfg) in spec.items():
        if lib == "tokenizer":
            continue
        with torch.device("meta"):
            if lib == "diffusers":
                model = getattr(diffusers, cls_name).from_config(cfg)
            else:
                cls = getattr(transformers, cls_name)
                model = cls(cls.config_class(**cfg))
        n = sum(p.numel() for p in model.parameters())
        if cls_name == "AutoencoderKL":
            assert n == (83_819_683 if cfg["latent_channels"] == 16 else 83_653_863)
        elif cls_name == "CLIPTextModelWithProjection":
            assert n in (123_650_304, 694_659_840)
        else:
            assert n == FULL_COMPONENT_PARAMS[cls_name]
    sched_cls, _ = zoo.scheduler_config(name)
    assert hasattr(diffusers, sched_cls)
