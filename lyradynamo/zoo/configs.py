"""Config dicts for every zoo model: the published full-size configs and tiny stand-ins.

Why plain dicts: the compile backend is exercised on models built from these with random
weights, so nothing here may touch a model hub. Full-size configs mirror the published
``config.json`` files (only the ``_class_name`` / ``_diffusers_version`` bookkeeping keys are
dropped); tiny configs keep every block *type* of the real model but shrink channels and depth so
that a CPU forward at 64x64 pixels takes milliseconds.

Every accessor returns a deep copy, so callers may mutate what they get.
"""

from __future__ import annotations

import copy

MODEL_NAMES = ("sd15", "sdxl", "flux", "sd3", "pixart", "sana", "auraflow")

# Denoiser class (diffusers) and the subfolder it lives in inside a pipeline checkpoint.
DENOISER_CLASSES = {
    "sd15": "UNet2DConditionModel",
    "sdxl": "UNet2DConditionModel",
    "flux": "FluxTransformer2DModel",
    "sd3": "SD3Transformer2DModel",
    "pixart": "PixArtTransformer2DModel",
    "sana": "SanaTransformer2DModel",
    "auraflow": "AuraFlowTransformer2DModel",
}
DENOISER_SUBFOLDERS = {name: ("unet" if cls.startswith("UNet") else "transformer") for name, cls in DENOISER_CLASSES.items()}

# Published checkpoints the full-size configs come from (documentation only; never downloaded).
SOURCE_CHECKPOINTS = {
    "sd15": "runwayml/stable-diffusion-v1-5",
    "sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
    "flux": "black-forest-labs/FLUX.1-dev",
    "sd3": "stabilityai/stable-diffusion-3-medium-diffusers",
    "pixart": "PixArt-alpha/PixArt-XL-2-1024-MS",
    "sana": "Efficient-Large-Model/Sana_1600M_1024px_diffusers",
    "auraflow": "fal/AuraFlow",
}

# --------------------------------------------------------------------------------------------
# Full-size denoisers
# --------------------------------------------------------------------------------------------

_SD15_UNET = {
    "act_fn": "silu",
    "attention_head_dim": 8,  # SD1.x semantics: this is the number of heads (head dim = 40..160)
    "block_out_channels": (320, 640, 1280, 1280),
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-5,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
}

_SDXL_UNET = {
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": (5, 10, 20),
    "block_out_channels": (320, 640, 1280),
    "center_input_sample": False,
    "class_embed_type": None,
    "class_embeddings_concat": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "cross_attention_dim": 2048,
    "cross_attention_norm": None,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-5,
    "norm_num_groups": 32,
    "num_attention_heads": None,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,  # 6 * 256 (time ids) + 1280 (pooled text_embeds)
    "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default",
    "sample_size": 128,
    "time_cond_proj_dim": None,
    "time_embedding_act_fn": None,
    "time_embedding_dim": None,
    "time_embedding_type": "positional",
    "timestep_post_act": None,
    "transformer_layers_per_block": (1, 2, 10),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "upcast_attention": None,
    "use_linear_projection": True,
}

_FLUX_DEV_TRANSFORMER = {
    "attention_head_dim": 128,
    "axes_dims_rope": (16, 56, 56),
    "guidance_embeds": True,  # FLUX.1-dev is guidance-distilled (schnell has False)
    "in_channels": 64,  # 16 latent channels packed 2x2
    "joint_attention_dim": 4096,
    "num_attention_heads": 24,
    "num_layers": 19,
    "num_single_layers": 38,
    "patch_size": 1,
    "pooled_projection_dim": 768,
}

_SD3_MEDIUM_TRANSFORMER = {
    "attention_head_dim": 64,
    "caption_projection_dim": 1536,
    "in_channels": 16,
    "joint_attention_dim": 4096,
    "num_attention_heads": 24,
    "num_layers": 24,
    "out_channels": 16,
    "patch_size": 2,
    "pooled_projection_dim": 2048,
    "pos_embed_max_size": 192,
    "sample_size": 128,
}

# PixArt-XL-2-1024-MS ships a Transformer2DModel-style config; these are the keys
# PixArtTransformer2DModel understands. sample_size == 128 switches on the resolution /
# aspect-ratio micro-conditions (use_additional_conditions=None -> derived from sample_size).
_PIXART_XL_1024_TRANSFORMER = {
    "activation_fn": "gelu-approximate",
    "attention_bias": True,
    "attention_head_dim": 72,
    "attention_type": "default",
    "caption_channels": 4096,
    "cross_attention_dim": 1152,
    "dropout": 0.0,
    "in_channels": 4,
    "interpolation_scale": None,
    "norm_elementwise_affine": False,
    "norm_eps": 1e-6,
    "norm_num_groups": 32,
    "norm_type": "ada_norm_single",
    "num_attention_heads": 16,
    "num_embeds_ada_norm": 1000,
    "num_layers": 28,
    "out_channels": 8,  # learned sigma: 2 x 4 latent channels
    "patch_size": 2,
    "sample_size": 128,
    "upcast_attention": False,
    "use_additional_conditions": None,
}

_SANA_1600M_1024_TRANSFORMER = {
    "attention_bias": False,
    "attention_head_dim": 32,
    "caption_channels": 2304,  # Gemma-2-2B hidden size
    "cross_attention_dim": 2240,
    "cross_attention_head_dim": 112,
    "dropout": 0.0,
    "in_channels": 32,  # DC-AE f32c32 latents
    "interpolation_scale": None,
    "mlp_ratio": 2.5,
    "norm_elementwise_affine": False,
    "norm_eps": 1e-6,
    "num_attention_heads": 70,
    "num_cross_attention_heads": 20,
    "num_layers": 20,
    "out_channels": 32,
    "patch_size": 1,
    "sample_size": 32,
}

_AURAFLOW_TRANSFORMER = {
    "attention_head_dim": 256,
    "caption_projection_dim": 3072,
    "in_channels": 4,
    "joint_attention_dim": 2048,
    "num_attention_heads": 12,
    "num_mmdit_layers": 4,
    "num_single_dit_layers": 32,
    "out_channels": 4,
    "patch_size": 2,
    "pos_embed_max_size": 4096,  # 64x64 patch grid = 1024px images
    "sample_size": 64,
}

FULL_DENOISER_CONFIGS = {
    "sd15": _SD15_UNET,
    "sdxl": _SDXL_UNET,
    "flux": _FLUX_DEV_TRANSFORMER,
    "sd3": _SD3_MEDIUM_TRANSFORMER,
    "pixart": _PIXART_XL_1024_TRANSFORMER,
    "sana": _SANA_1600M_1024_TRANSFORMER,
    "auraflow": _AURAFLOW_TRANSFORMER,
}

# --------------------------------------------------------------------------------------------
# Tiny denoisers: same block types, a few channels. Latent channel counts are kept real so that
# latent shapes mean the same thing at both sizes.
# --------------------------------------------------------------------------------------------

TINY_TEXT_DIM = 32  # tiny CLIP hidden / projection size
TINY_T5_DIM = 64  # tiny T5 d_model; >= 2 * TINY_TEXT_DIM because SD3 zero-pads CLIP embeds to it

TINY_DENOISER_CONFIGS = {
    "sd15": {
        "attention_head_dim": 2,
        "block_out_channels": (32, 64),
        "cross_attention_dim": TINY_TEXT_DIM,
        "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
        "in_channels": 4,
        "layers_per_block": 1,
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "norm_num_groups": 8,
        "out_channels": 4,
        "sample_size": 8,
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
    },
    "sdxl": {
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 8,
        "attention_head_dim": (2, 4),
        "block_out_channels": (32, 64),
        "cross_attention_dim": 2 * TINY_TEXT_DIM,  # concat of both text encoders' hidden states
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
        "in_channels": 4,
        "layers_per_block": 1,
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "norm_num_groups": 8,
        "out_channels": 4,
        "projection_class_embeddings_input_dim": 6 * 8 + TINY_TEXT_DIM,
        "sample_size": 8,
        "transformer_layers_per_block": (1, 2),
        "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
        "use_linear_projection": True,
    },
    "flux": {
        "attention_head_dim": 16,
        "axes_dims_rope": (4, 6, 6),
        "guidance_embeds": True,
        "in_channels": 64,
        "joint_attention_dim": TINY_T5_DIM,
        "num_attention_heads": 2,
        "num_layers": 1,
        "num_single_layers": 1,
        "patch_size": 1,
        "pooled_projection_dim": TINY_TEXT_DIM,
    },
    "sd3": {
        "attention_head_dim": 8,
        "caption_projection_dim": 16,
        "dual_attention_layers": (0,),
        "in_channels": 16,
        "joint_attention_dim": TINY_T5_DIM,
        "num_attention_heads": 2,
        "num_layers": 2,
        "out_channels": 16,
        "patch_size": 2,
        "pooled_projection_dim": 2 * TINY_TEXT_DIM,
        "pos_embed_max_size": 32,
        "qk_norm": "rms_norm",
        "sample_size": 8,
    },
    "pixart": {
        # sample_size stays 128 like the 1024px checkpoint: it turns on the resolution /
        # aspect-ratio micro-conditions and makes PixArtAlphaPipeline pass them.
        # inner dim (heads * head dim) must divide by 3: the size embeddings take a third each.
        "attention_head_dim": 8,
        "caption_channels": TINY_T5_DIM,
        "cross_attention_dim": 24,
        "in_channels": 4,
        "norm_num_groups": 8,
        "num_attention_heads": 3,
        "num_layers": 2,
        "out_channels": 8,
        "patch_size": 2,
        "sample_size": 128,
    },
    "sana": {
        "attention_head_dim": 8,
        "caption_channels": 32,
        "cross_attention_dim": 16,
        "cross_attention_head_dim": 8,
        "in_channels": 32,
        "num_attention_heads": 2,
        "num_cross_attention_heads": 2,
        "num_layers": 2,
        "out_channels": 32,
        "patch_size": 1,
        "sample_size": 8,
    },
    "auraflow": {
        "attention_head_dim": 8,
        "caption_projection_dim": 16,
        "in_channels": 4,
        "joint_attention_dim": 32,
        "num_attention_heads": 2,
        "num_mmdit_layers": 1,
        "num_single_dit_layers": 1,
        "out_channels": 4,
        "patch_size": 2,
        "pos_embed_max_size": 256,  # 16x16 patch grid: up to 256px images
        "sample_size": 8,
    },
}

# --------------------------------------------------------------------------------------------
# Pipeline components (text encoders, VAEs, schedulers)
# --------------------------------------------------------------------------------------------

# openai/clip-vit-large-patch14 text tower (SD1.5, SDXL text_encoder, FLUX, SD3 text_encoder).
CLIP_L_TEXT = {
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 2,
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-5,
    "max_position_embeddings": 77,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "pad_token_id": 1,
    "projection_dim": 768,
    "vocab_size": 49408,
}

# OpenCLIP ViT-bigG/14 text tower (SDXL / SD3 text_encoder_2, with projection).
CLIP_G_TEXT = {
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 2,
    "hidden_act": "gelu",
    "hidden_size": 1280,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 5120,
    "layer_norm_eps": 1e-5,
    "max_position_embeddings": 77,
    "num_attention_heads": 20,
    "num_hidden_layers": 32,
    "pad_token_id": 1,
    "projection_dim": 1280,
    "vocab_size": 49408,
}

# google/t5-v1_1-xxl encoder (FLUX / SD3 text_encoder_2/3, PixArt text_encoder).
T5_XXL = {
    "d_ff": 10240,
    "d_kv": 64,
    "d_model": 4096,
    "decoder_start_token_id": 0,
    "dense_act_fn": "gelu_new",
    "dropout_rate": 0.1,
    "eos_token_id": 1,
    "feed_forward_proj": "gated-gelu",
    "initializer_factor": 1.0,
    "is_encoder_decoder": True,
    "is_gated_act": True,
    "layer_norm_epsilon": 1e-6,
    "num_decoder_layers": 24,
    "num_heads": 64,
    "num_layers": 24,
    "pad_token_id": 0,
    "relative_attention_max_distance": 128,
    "relative_attention_num_buckets": 32,
    "tie_word_embeddings": False,
    "vocab_size": 32128,
}

# Tiny text encoders: vocab_size / special ids are filled in from the code-built tokenizers.
TINY_CLIP_TEXT = {
    "hidden_act": "quick_gelu",
    "hidden_size": TINY_TEXT_DIM,
    "intermediate_size": 37,
    "layer_norm_eps": 1e-5,
    "max_position_embeddings": 77,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,  # SDXL/SD3 read hidden_states[-2]
    "projection_dim": TINY_TEXT_DIM,
}
TINY_CLIP_G_TEXT = dict(TINY_CLIP_TEXT, hidden_act="gelu")
TINY_T5 = {
    "d_ff": 37,
    "d_kv": 8,
    "d_model": TINY_T5_DIM,
    "dense_act_fn": "gelu_new",
    "feed_forward_proj": "gated-gelu",
    "is_gated_act": True,
    "layer_norm_epsilon": 1e-6,
    "num_decoder_layers": 1,
    "num_heads": 4,
    "num_layers": 2,
    "relative_attention_max_distance": 16,
    "relative_attention_num_buckets": 8,
    "tie_word_embeddings": False,
}

_SD_VAE = {
    "act_fn": "silu",
    "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "scaling_factor": 0.18215,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
}
_SDXL_VAE = dict(_SD_VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=True)
_FLUX_VAE = dict(
    _SD_VAE,
    latent_channels=16,
    sample_size=1024,
    scaling_factor=0.3611,
    shift_factor=0.1159,
    force_upcast=True,
    use_quant_conv=False,
    use_post_quant_conv=False,
    mid_block_add_attention=True,
)
_SD3_VAE = dict(_FLUX_VAE, scaling_factor=1.5305, shift_factor=0.0609)

# Tiny VAEs keep 4 resolution levels so they also downsample by 8.
_TINY_VAE_BASE = {
    "block_out_channels": (8, 8, 16, 16),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "sample_size": 64,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
}


def _tiny_vae(full):
    keep = ("latent_channels", "scaling_factor", "shift_factor", "force_upcast", "use_quant_conv", "use_post_quant_conv")
    return dict(_TINY_VAE_BASE, **{k: full[k] for k in keep if k in full})


SCHEDULERS = {
    "sd15": (
        "PNDMScheduler",
        {
            "beta_end": 0.012,
            "beta_schedule": "scaled_linear",
            "beta_start": 0.00085,
            "clip_sample": False,
            "num_train_timesteps": 1000,
            "set_alpha_to_one": False,
            "skip_prk_steps": True,
            "steps_offset": 1,
            "trained_betas": None,
        },
    ),
    "sdxl": (
        "EulerDiscreteScheduler",
        {
            "beta_end": 0.012,
            "beta_schedule": "scaled_linear",
            "beta_start": 0.00085,
            "clip_sample": False,
            "interpolation_type": "linear",
            "num_train_timesteps": 1000,
            "prediction_type": "epsilon",
            "sample_max_value": 1.0,
            "set_alpha_to_one": False,
            "skip_prk_steps": True,
            "steps_offset": 1,
            "timestep_spacing": "leading",
            "trained_betas": None,
            "use_karras_sigmas": False,
        },
    ),
    "flux": (
        "FlowMatchEulerDiscreteScheduler",
        {
            "base_image_seq_len": 256,
            "base_shift": 0.5,
            "max_image_seq_len": 4096,
            "max_shift": 1.15,
            "num_train_timesteps": 1000,
            "shift": 3.0,
            "use_dynamic_shifting": True,
        },
    ),
    "sd3": ("FlowMatchEulerDiscreteScheduler", {"num_train_timesteps": 1000, "shift": 3.0}),
    "pixart": (
        "DPMSolverMultistepScheduler",
        {
            "algorithm_type": "dpmsolver++",
            "beta_end": 0.02,
            "beta_schedule": "linear",
            "beta_start": 0.0001,
            "dynamic_thresholding_ratio": 0.995,
            "lower_order_final": True,
            "num_train_timesteps": 1000,
            "prediction_type": "epsilon",
            "sample_max_value": 1.0,
            "solver_order": 2,
            "solver_type": "midpoint",
            "steps_offset": 0,
            "thresholding": False,
            "timestep_spacing": "linspace",
            "trained_betas": None,
            "use_karras_sigmas": False,
        },
    ),
}

# Pipeline component specs: name -> (library, class name, full config, tiny config).
# "tokenizer*" entries name a builder in tokenizers.py instead of a config.
_PIPELINES = {
    "sd15": (
        "StableDiffusionPipeline",
        {
            "vae": ("diffusers", "AutoencoderKL", _SD_VAE),
            "text_encoder": ("transformers", "CLIPTextModel", CLIP_L_TEXT, TINY_CLIP_TEXT),
            "tokenizer": ("tokenizer", "clip", None),
        },
    ),
    "sdxl": (
        "StableDiffusionXLPipeline",
        {
            "vae": ("diffusers", "AutoencoderKL", _SDXL_VAE),
            "text_encoder": ("transformers", "CLIPTextModel", CLIP_L_TEXT, TINY_CLIP_TEXT),
            "text_encoder_2": ("transformers", "CLIPTextModelWithProjection", CLIP_G_TEXT, TINY_CLIP_G_TEXT),
            "tokenizer": ("tokenizer", "clip", None),
            "tokenizer_2": ("tokenizer", "clip_g", None),
        },
    ),
    "flux": (
        "FluxPipeline",
        {
            "vae": ("diffusers", "AutoencoderKL", _FLUX_VAE),
            "text_encoder": ("transformers", "CLIPTextModel", CLIP_L_TEXT, TINY_CLIP_TEXT),
            "text_encoder_2": ("transformers", "T5EncoderModel", T5_XXL, TINY_T5),
            "tokenizer": ("tokenizer", "clip", None),
            "tokenizer_2": ("tokenizer", "t5", None),
        },
    ),
    "sd3": (
        "StableDiffusion3Pipeline",
        {
            "vae": ("diffusers", "AutoencoderKL", _SD3_VAE),
            "text_encoder": ("transformers", "CLIPTextModelWithProjection", CLIP_L_TEXT, TINY_CLIP_TEXT),
            "text_encoder_2": ("transformers", "CLIPTextModelWithProjection", CLIP_G_TEXT, TINY_CLIP_G_TEXT),
            "text_encoder_3": ("transformers", "T5EncoderModel", T5_XXL, TINY_T5),
            "tokenizer": ("tokenizer", "clip", None),
            "tokenizer_2": ("tokenizer", "clip_g", None),
            "tokenizer_3": ("tokenizer", "t5", None),
        },
    ),
    "pixart": (
        "PixArtAlphaPipeline",
        {
            "vae": ("diffusers", "AutoencoderKL", _SD_VAE),
            "text_encoder": ("transformers", "T5EncoderModel", T5_XXL, TINY_T5),
            "tokenizer": ("tokenizer", "t5", None),
        },
    ),
}


def denoiser_config(name: str, tiny: bool = True) -> dict:
    """Config dict for ``name``'s denoiser (a fresh copy)."""
    _check(name)
    return copy.deepcopy((TINY_DENOISER_CONFIGS if tiny else FULL_DENOISER_CONFIGS)[name])


def scheduler_config(name: str) -> tuple[str, dict]:
    """(scheduler class name, published scheduler config). Same for tiny and full size."""
    cls, cfg = SCHEDULERS[name]
    return cls, copy.deepcopy(cfg)


def pipeline_spec(name: str, tiny: bool = True) -> tuple[str, dict]:
    """(pipeline class name, {component: (library, class, config_or_tokenizer_kind)}), denoiser excluded."""
    if name not in _PIPELINES:
        raise ValueError(f"no pipeline for {name!r}; known: {tuple(_PIPELINES)}")
    pipe_cls, comps = _PIPELINES[name]
    out = {}
    for comp, spec in comps.items():
        lib, cls = spec[0], spec[1]
        if lib == "tokenizer":
            out[comp] = (lib, cls, None)
        elif lib == "diffusers":  # VAEs: tiny derived from full
            out[comp] = (lib, cls, copy.deepcopy(_tiny_vae(spec[2]) if tiny else spec[2]))
        else:
            out[comp] = (lib, cls, copy.deepcopy(spec[3] if tiny else spec[2]))
    return pipe_cls, out


def _check(name: str) -> None:
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model {name!r}; known: {MODEL_NAMES}")
