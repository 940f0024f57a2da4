"""Denoisers and whole diffusers pipelines with random weights, plus denoiser call inputs.

Why random weights: the compile backend is tested and benchmarked on exact model architectures,
not on image quality, and this must work offline. Models are built from the dicts in
``configs.py``; ``model_path`` switches to loading a *local* checkpoint instead (never a hub id).
"""

from __future__ import annotations

import contextlib
import os

import torch

from . import configs
from .configs import MODEL_NAMES, denoiser_config, pipeline_spec, scheduler_config
from .tokenizers import build_tokenizer

# Pipelines that run end to end with the plain call
#   pipe(prompt=..., num_inference_steps=..., height=..., width=..., generator=..., output_type=...).
# build_pipeline("pixart") also works but is left out: PixArtAlphaPipeline bins the requested size
# to its 1024px aspect-ratio table by default (a 64x64 request denoises at 1024x1024 and is resized
# back) and defaults to clean_caption=True; call it with use_resolution_binning=False,
# clean_caption=False.
PIPELINE_NAMES = ("sd15", "sdxl", "flux", "sd3")

# Default text lengths fed to the denoiser: (full size, tiny). SD3's 154 = 77 CLIP + 77 T5 tokens
# (StableDiffusion3Pipeline's own default, max_sequence_length=256, gives 333).
_PROMPT_LEN = {
    "sd15": (77, 77),
    "sdxl": (77, 77),
    "flux": (512, 32),
    "sd3": (154, 32),
    "pixart": (120, 16),
    "sana": (300, 16),
    "auraflow": (256, 16),
}
_FULL_SIZE = {"sd15": 512, "sdxl": 1024, "flux": 1024, "sd3": 1024, "pixart": 1024, "sana": 1024, "auraflow": 1024}


def tiny_model_names() -> tuple:
    """Every model has a tiny variant."""
    return MODEL_NAMES


def default_size(name: str, tiny: bool = True) -> tuple[int, int]:
    """(height, width) in image pixels: 64x64 for tiny models, the checkpoint's native size otherwise."""
    configs._check(name)
    side = 64 if tiny else _FULL_SIZE[name]
    return side, side


def default_prompt_len(name: str, tiny: bool = True) -> int:
    """Text sequence length the pipeline feeds the denoiser by default (e.g. FLUX: 512 T5 tokens)."""
    configs._check(name)
    return _PROMPT_LEN[name][1 if tiny else 0]


def latent_downsample(name: str, tiny: bool = True) -> int:
    """Pixels per latent pixel. 8 for every model, except full-size Sana whose DC-AE VAE uses 32."""
    return 32 if (name == "sana" and not tiny) else 8


# --------------------------------------------------------------------------------------------
# Construction helpers
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _build_context(device, dtype):
    """Allocate parameters directly on ``device`` in ``dtype``: a 12B FLUX in fp32 would not fit
    next to its bf16 copy, so full-size models must never be materialized in fp32 first.
    Note: the default dtype is process-global while this is active (not thread-safe)."""
    old = torch.get_default_dtype()
    if dtype.is_floating_point:
        torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(old)


def _finalize(model: torch.nn.Module, dtype, device) -> torch.nn.Module:
    """Move/cast like from_pretrained(torch_dtype=...) does, honouring transformers' fp32 islands
    (T5's ``wo`` overflows in fp16)."""
    tensors = list(model.parameters()) + list(model.buffers())
    if any(t.is_floating_point() and t.dtype != dtype for t in tensors):
        # Plain nn.Module.to: diffusers' ModelMixin.to() logs a spurious fp32-modules warning on
        # every dtype cast, and none of the zoo's diffusers models has fp32 islands.
        torch.nn.Module.to(model, dtype=dtype)
    model.to(device)
    keep = []
    if dtype == torch.float16:
        keep += list(getattr(model, "_keep_in_fp32_modules", None) or [])
    if dtype in (torch.float16, torch.bfloat16):
        keep += list(getattr(model, "_keep_in_fp32_modules_strict", None) or [])
    if keep:
        for mod_name, mod in model.named_modules():
            if any(k in mod_name.split(".") for k in keep):
                mod.to(torch.float32)
    return model.eval()


def _diffusers_model(cls_name: str, config: dict, dtype, device, seed: int):
    import diffusers

    cls = getattr(diffusers, cls_name)
    torch.manual_seed(seed)
    with _build_context(device, dtype):
        model = cls.from_config(config)
    return _finalize(model, dtype, device)


def plain_tensors_on_cpu(model: torch.nn.Module) -> torch.nn.Module:
    """Tensors that model's modules keep as plain attributes (not parameters, not buffers: Qwen-
    Image's RoPE tables) moved to the CPU, where `from_pretrained` leaves them (made in
    `__init__`, not moved by `.to(device)`). A model built on the GPU has them there instead.
    Returns model."""
    for module in model.modules():
        for name, value in list(vars(module).items()):
            if isinstance(value, torch.Tensor) and not isinstance(value, torch.nn.Parameter):
                setattr(module, name, value.cpu())
    return model


def keep_in_fp32(model: torch.nn.Module) -> torch.nn.Module:
    """model's parameters and buffers under its class's `_keep_in_fp32_modules` back in float32,
    as `from_pretrained(torch_dtype=torch.bfloat16)` leaves them (Wan: the RoPE tables, the
    modulation tables and the norms). Returns model."""
    keep = getattr(model, "_keep_in_fp32_modules", None) or []
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if any(k in name.split(".") for k in keep):
            t.data = t.data.float()
    return model


def _transformers_model(cls_name: str, config: dict, dtype, device, seed: int):
    import transformers

    cls = getattr(transformers, cls_name)
    torch.manual_seed(seed)
    with _build_context(device, dtype):
        model = cls(cls.config_class(**config))
    return _finalize(model, dtype, device)


def _local_dir(model_path) -> str:
    path = os.fspath(model_path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model_path must be a local directory (no hub access): {path!r}")
    return path


# --------------------------------------------------------------------------------------------
# Denoisers
# --------------------------------------------------------------------------------------------


def build_denoiser(name, *, tiny=True, dtype=torch.float32, device="cpu", seed=0, model_path=None) -> torch.nn.Module:
    """The UNet / transformer of ``name`` with random weights (seeded), in eval mode.

    ``tiny=False`` builds the published full-size architecture (GPU only in practice).
    ``model_path`` loads a local diffusers checkpoint instead: either a pipeline directory with a
    ``unet``/``transformer`` subfolder, or the model directory itself.
    """
    import diffusers

    configs._check(name)
    cls_name = configs.DENOISER_CLASSES[name]
    if model_path is not None:
        path = _local_dir(model_path)
        sub = configs.DENOISER_SUBFOLDERS[name]
        subfolder = sub if os.path.isdir(os.path.join(path, sub)) else None
        model = getattr(diffusers, cls_name).from_pretrained(
            path, subfolder=subfolder, dtype=dtype, local_files_only=True
        )
        return _finalize(model, dtype, device)
    return _diffusers_model(cls_name, denoiser_config(name, tiny), dtype, device, seed)


def build_vae(name, *, tiny=True, dtype=torch.float32, device="cpu", seed=0) -> torch.nn.Module:
    """The pipeline's VAE (AutoencoderKL, or its config's class) with random weights, in eval
    mode and without gradients. The weights depend on ``seed`` and, as for every zoo model, on
    the device and dtype they are drawn in: build once in fp32 and cast for copies that must
    hold the same values."""
    _, spec = pipeline_spec(name, tiny)
    _lib, cls_name, cfg = spec["vae"]
    return _diffusers_model(cls_name, cfg, dtype, device, seed).requires_grad_(False)


def _norm(v):
    return list(v) if isinstance(v, (tuple, list)) else v


def is_tiny(name: str, model: torch.nn.Module) -> bool:
    """True when ``model``'s config matches the zoo's tiny config for ``name`` (anything else,
    e.g. a loaded checkpoint, counts as full size)."""
    cfg = model.config
    return all(_norm(cfg.get(k)) == _norm(v) for k, v in denoiser_config(name, tiny=True).items())


def denoiser_inputs(
    name, model, *, batch=1, height=None, width=None, prompt_len=None, dtype=None, device=None, seed=0
) -> dict:
    """Keyword arguments for one ``model(**kwargs)`` call, shaped the way the diffusers pipeline calls it.

    ``height``/``width`` are image pixels; the latent is ``pixels // 8`` for every model except
    full-size Sana, whose DC-AE VAE downsamples by 32 (tiny Sana uses 8 like the other tiny
    models). Defaults come from ``default_size``/``default_prompt_len`` with ``tiny`` inferred
    from the model config. Values are drawn from a CPU generator seeded with ``seed`` and then
    moved, so they are identical on every device. ``return_dict`` is left at its default.

    Beyond the plain latents/text embeddings: SDXL gets ``added_cond_kwargs`` (pooled text embeds
    and the 6 size/crop time ids), FLUX gets packed latents with ``img_ids``/``txt_ids`` and a
    float32 ``guidance``, PixArt/Sana get the T5/Gemma ``encoder_attention_mask`` (all ones, int64)
    their pipelines pass, and PixArt's ``added_cond_kwargs`` carry resolution/aspect ratio when the
    model uses them (the 1024px checkpoint does).
    """
    configs._check(name)
    cfg = model.config
    tiny = is_tiny(name, model)
    param = next(model.parameters())
    dtype = dtype or param.dtype
    device = torch.device(device) if device is not None else param.device
    dh, dw = default_size(name, tiny)
    height, width = height or dh, width or dw
    seq = prompt_len or default_prompt_len(name, tiny)
    f = latent_downsample(name, tiny)
    h, w = height // f, width // f
    B = batch

    g = torch.Generator("cpu").manual_seed(seed)

    def randn(*shape, dt=dtype):
        return torch.randn(shape, generator=g).to(device=device, dtype=dt)

    def rand_t(scale, dt):
        return (torch.rand((B,), generator=g) * scale).to(device=device, dtype=dt)

    def ones_mask():
        return torch.ones((B, seq), dtype=torch.int64, device=device)

    if name in ("sd15", "sdxl"):
        kw = {
            "sample": randn(B, cfg.in_channels, h, w),
            "timestep": rand_t(1000.0, torch.float32),
            "encoder_hidden_states": randn(B, seq, cfg.cross_attention_dim),
        }
        if name == "sdxl":
            text_dim = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
            time_ids = torch.tensor([height, width, 0, 0, height, width], dtype=dtype, device=device)
            kw["added_cond_kwargs"] = {"text_embeds": randn(B, text_dim), "time_ids": time_ids.repeat(B, 1)}
        return kw

    if name == "flux":
        from diffusers import FluxPipeline

        # FluxPipeline: latent side = 2 * (pixels // 16), then packed into 2x2 patches.
        ph, pw = height // 16, width // 16
        return {
            "hidden_states": randn(B, ph * pw, cfg.in_channels),
            "encoder_hidden_states": randn(B, seq, cfg.joint_attention_dim),
            "pooled_projections": randn(B, cfg.pooled_projection_dim),
            "timestep": rand_t(1.0, dtype),
            "img_ids": FluxPipeline._prepare_latent_image_ids(B, ph, pw, device, dtype),
            "txt_ids": torch.zeros(seq, 3, device=device, dtype=dtype),
            "guidance": torch.full((B,), 3.5, device=device, dtype=torch.float32) if cfg.guidance_embeds else None,
        }

    if name == "sd3":
        return {
            "hidden_states": randn(B, cfg.in_channels, h, w),
            "encoder_hidden_states": randn(B, seq, cfg.joint_attention_dim),
            "pooled_projections": randn(B, cfg.pooled_projection_dim),
            "timestep": rand_t(1000.0, torch.float32),
        }

    if name == "pixart":
        text_dim = cfg.caption_channels or cfg.cross_attention_dim
        added = {"resolution": None, "aspect_ratio": None}
        if model.use_additional_conditions:  # PixArtAlphaPipeline: config.sample_size == 128
            added = {
                "resolution": torch.tensor([[height, width]], dtype=dtype, device=device).repeat(B, 1),
                "aspect_ratio": torch.tensor([[height / width]], dtype=dtype, device=device).repeat(B, 1),
            }
        return {
            "hidden_states": randn(B, cfg.in_channels, h, w),
            "encoder_hidden_states": randn(B, seq, text_dim),
            "encoder_attention_mask": ones_mask(),
            # DPMSolverMultistepScheduler timesteps are int64, passed through unchanged.
            "timestep": rand_t(1000.0, torch.float32).to(torch.int64),
            "added_cond_kwargs": added,
        }

    if name == "sana":
        return {
            "hidden_states": randn(B, cfg.in_channels, h, w),
            "encoder_hidden_states": randn(B, seq, cfg.caption_channels),
            "encoder_attention_mask": ones_mask(),
            "timestep": rand_t(1000.0 * cfg.timestep_scale, torch.float32),
        }

    # auraflow: the pipeline passes t / 1000 in the latent dtype.
    return {
        "hidden_states": randn(B, cfg.in_channels, h, w),
        "encoder_hidden_states": randn(B, seq, cfg.joint_attention_dim),
        "timestep": rand_t(1.0, dtype),
    }


# --------------------------------------------------------------------------------------------
# Pipelines
# --------------------------------------------------------------------------------------------


def _tokenizer_for(encoder_name: str) -> str:
    return encoder_name.replace("text_encoder", "tokenizer")


def build_pipeline(name, *, tiny=True, dtype=torch.float32, device="cpu", seed=0, model_path=None):
    """A complete diffusers pipeline for ``name`` with random weights, runnable offline.

    Text encoders, VAE and denoiser come from the configs (tiny or published full size), the
    scheduler from its published config, tokenizers from ``tokenizers.py``. ``model_path`` loads a
    local pipeline directory instead. SD1.5 never gets a safety checker. Progress bars are off.
    """
    import diffusers

    pipe_cls_name, spec = pipeline_spec(name, tiny)  # raises for names without a pipeline
    pipe_cls = getattr(diffusers, pipe_cls_name)
    extra = {}
    if name == "sd15":
        extra = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}

    if model_path is not None:
        pipe = pipe_cls.from_pretrained(_local_dir(model_path), dtype=dtype, local_files_only=True, **extra)
        pipe.to(device)
    else:
        components = {configs.DENOISER_SUBFOLDERS[name]: build_denoiser(name, tiny=tiny, dtype=dtype, device=device, seed=seed)}
        for comp, (lib, kind, _) in spec.items():
            if lib == "tokenizer":
                components[comp] = build_tokenizer(kind)
        for i, (comp, (lib, cls_name, cfg)) in enumerate(spec.items(), start=1):
            if lib == "diffusers":
                components[comp] = _diffusers_model(cls_name, cfg, dtype, device, seed + i)
            elif lib == "transformers":
                if tiny:  # size the tiny encoder to its tokenizer
                    tok = components[_tokenizer_for(comp)]
                    cfg.update(vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
                    if tok.bos_token_id is not None:
                        cfg["bos_token_id"] = tok.bos_token_id
                    if cls_name == "T5EncoderModel":
                        cfg["decoder_start_token_id"] = tok.pad_token_id
                components[comp] = _transformers_model(cls_name, cfg, dtype, device, seed + i)
        sched_cls, sched_cfg = scheduler_config(name)
        components["scheduler"] = getattr(diffusers, sched_cls).from_config(sched_cfg)
        pipe = pipe_cls(**components, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def default_dtype(name: str, device: str) -> torch.dtype:
    """The dtype diffusers users run a model in: fp32 on CPU, fp16 for SD UNets, bf16 for DiTs."""
    if device == "cpu":
        return torch.float32
    return torch.float16 if name in ("sd15", "sdxl") else torch.bfloat16
