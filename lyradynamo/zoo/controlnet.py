"""ControlNets with random weights, built offline from the zoo's denoiser configs.

    from lyradynamo.zoo import build_controlnet, controlnet_inputs
    cn = build_controlnet("sd15")                       # tiny ControlNetModel (from the tiny SD1.5 UNet)
    down, mid = cn(**controlnet_inputs("sd15", cn, batch=2), return_dict=False)

SD1.5 / SDXL: `ControlNetModel.from_unet` on the zoo UNet (same architecture as the published
ControlNets for those bases: the UNet's encoder half + zero convs + a conditioning embedding).
FLUX: `FluxControlNetModel` with the tiny FLUX dims, or the published FLUX.1-dev ControlNet layout
(5 double + 10 single blocks) at full size. The zero-initialised output convs / linears get small
seeded random values, so that every ControlNet actually changes the denoiser's output (tests can
tell two ControlNets apart).
"""
from __future__ import annotations

import torch

from . import pipelines
from .configs import TINY_T5_DIM, TINY_TEXT_DIM

CONTROLNET_NAMES = ("sd15", "sdxl", "flux")

_FLUX_CONTROLNET = {  # the FLUX.1-dev ControlNets (InstantX / XLabs-style diffusers ports)
    "attention_head_dim": 128, "axes_dims_rope": (16, 56, 56), "guidance_embeds": True, "in_channels": 64,
    "joint_attention_dim": 4096, "num_attention_heads": 24, "num_layers": 5, "num_single_layers": 10,
    "patch_size": 1, "pooled_projection_dim": 768,
}
_TINY_FLUX_CONTROLNET = {
    "attention_head_dim": 16, "axes_dims_rope": (4, 6, 6), "guidance_embeds": True, "in_channels": 64,
    "joint_attention_dim": TINY_T5_DIM, "num_attention_heads": 2, "num_layers": 1, "num_single_layers": 1,
    "patch_size": 1, "pooled_projection_dim": TINY_TEXT_DIM,
}


def controlnet_config(name: str, tiny: bool = True) -> dict:
    """FluxControlNetModel config for "flux"; for sd15/sdxl the ControlNet derives from the UNet config."""
    if name != "flux":
        raise ValueError(f"controlnet_config is for 'flux' only ({name!r} ControlNets come from the UNet config)")
    return dict(_TINY_FLUX_CONTROLNET if tiny else _FLUX_CONTROLNET)


def build_controlnet(name: str = "sd15", *, tiny: bool = True, dtype=torch.float32, device="cpu", seed: int = 0,
                     conditioning_channels: int = 3) -> torch.nn.Module:
    """A ControlNet for the zoo model `name` ("sd15", "sdxl" or "flux") with seeded random weights, eval mode."""
    import diffusers

    if name not in CONTROLNET_NAMES:
        raise ValueError(f"no ControlNet for {name!r}; known: {CONTROLNET_NAMES}")
    with pipelines._build_context(device, dtype):
        torch.manual_seed(seed)
        if name == "flux":
            model = diffusers.FluxControlNetModel.from_config(controlnet_config(name, tiny))
        else:
            unet = diffusers.UNet2DConditionModel.from_config(pipelines.denoiser_config(name, tiny))
            emb = (8, 8, 16, 16) if tiny else (16, 32, 96, 256)  # 3 stride-2 convs: pixels -> latents
            model = diffusers.ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=emb,
                                                        conditioning_channels=conditioning_channels)
            del unet
        _fill_zero_params(model, seed)
    return pipelines._finalize(model, dtype, device)


def _fill_zero_params(model: torch.nn.Module, seed: int) -> None:
    """Zero-initialised weights (ControlNet zero convs) -> small seeded noise."""
    g = torch.Generator("cpu").manual_seed(seed + 12345)
    with torch.no_grad():
        for _name, p in model.named_parameters():
            if p.dim() >= 2 and not p.any():
                fan_in = p[0].numel()
                # device="cpu" explicitly: builders may run under a torch.device("cuda") context
                p.copy_(torch.randn(p.shape, generator=g, device="cpu") * (0.5 / fan_in ** 0.5))


def controlnet_inputs(name: str, controlnet: torch.nn.Module, *, batch: int = 1, height: int | None = None,
                      width: int | None = None, prompt_len: int | None = None, seed: int = 0) -> dict:
    """Keyword arguments for one `controlnet(**kwargs)` call: what `denoiser_inputs` gives the
    matching denoiser (same seed -> same latents and text) plus a `controlnet_cond` in [0, 1]
    (SD: a 3-channel image in pixel space; FLUX: packed latent tokens, as FluxControlNetPipeline
    passes the VAE-encoded control image)."""
    tiny = is_tiny_controlnet(controlnet)
    dh, dw = pipelines.default_size(name, tiny)
    height, width = height or dh, width or dw
    prompt_len = prompt_len or pipelines.default_prompt_len(name, tiny)
    p = next(controlnet.parameters())
    # the ControlNet's config carries every field denoiser_inputs reads from the denoiser's
    kw = pipelines.denoiser_inputs(name, controlnet, batch=batch, height=height, width=width,
                                   prompt_len=prompt_len, seed=seed)
    g = torch.Generator("cpu").manual_seed(seed + 1)
    if name == "flux":
        kw["controlnet_cond"] = torch.rand(kw["hidden_states"].shape, generator=g).to(p.device, p.dtype)
    else:
        ch = controlnet.config.conditioning_channels
        kw["controlnet_cond"] = torch.rand((batch, ch, height, width), generator=g).to(p.device, p.dtype)
    return kw


def is_tiny_controlnet(controlnet: torch.nn.Module) -> bool:
    """Tiny zoo ControlNets have well under a million parameters; published ones have hundreds of millions."""
    return sum(p.numel() for p in controlnet.parameters()) < 5_000_000
