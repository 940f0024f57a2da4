"""Model zoo: diffusers denoisers and pipelines with random weights, built offline.

The compile backend is developed and benchmarked against these, so each model keeps the exact
architecture of its published checkpoint (``tiny=False``) or a few-channel stand-in with the same
block types (``tiny=True``, the default, fast on CPU). Nothing here touches a model hub:
``model_path`` arguments load local directories only.

    from lyradynamo.zoo import build_denoiser, denoiser_inputs
    model = build_denoiser("flux")                  # tiny FluxTransformer2DModel
    out = model(**denoiser_inputs("flux", model, batch=2))
"""

from .configs import MODEL_NAMES, denoiser_config, pipeline_spec, scheduler_config
from .pipelines import (
    PIPELINE_NAMES,
    build_denoiser,
    build_pipeline,
    build_vae,
    default_dtype,
    default_prompt_len,
    default_size,
    denoiser_inputs,
    is_tiny,
    latent_downsample,
    tiny_model_names,
)
from .tokenizers import clip_g_tokenizer, clip_tokenizer, t5_tokenizer
from .controlnet import CONTROLNET_NAMES, build_controlnet, controlnet_inputs  # noqa: F401

__all__ = [
    "MODEL_NAMES",
    "PIPELINE_NAMES",
    "build_denoiser",
    "build_pipeline",
    "build_vae",
    "clip_g_tokenizer",
    "clip_tokenizer",
    "default_dtype",
    "default_prompt_len",
    "default_size",
    "denoiser_config",
    "denoiser_inputs",
    "is_tiny",
    "latent_downsample",
    "pipeline_spec",
    "scheduler_config",
    "t5_tokenizer",
    "tiny_model_names",
]
