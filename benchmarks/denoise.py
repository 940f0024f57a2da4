"""The denoising loop of each model family, written the way its diffusers pipeline runs it.

Used by bench.py: build the denoiser + VAE + scheduler once, then ``Workload.run(fn)`` runs
``steps`` denoiser calls through ``fn`` (the eager model or a torch.compile wrapper of it) and
decodes once with the VAE, exactly like

  * StableDiffusionPipeline / StableDiffusionXLPipeline: classifier-free guidance (UNet batch
    2*batch: [uncond; cond]), guidance 7.5, ``set_timesteps`` / ``scale_model_input`` / ``step``
    of the published scheduler, SDXL ``added_cond_kwargs`` (text_embeds, time_ids), SDXL's VAE
    upcast to fp32 when the model runs in fp16 (``force_upcast``);
  * FluxPipeline (FLUX.1-dev): guidance-distilled (guidance embed 3.5, no CFG), packed 2x2
    latents with img_ids/txt_ids, FlowMatchEulerDiscreteScheduler with the pipeline's sigmas
    ``linspace(1, 1/steps, steps)`` and ``mu = calculate_shift(image_seq_len, ...)``, timestep / 1000,
    latents unpacked and ``/ scaling_factor + shift_factor`` before decoding.

Not run: text encoders (prompt embeddings are seeded random tensors of the right shapes,
drawn by ``lyradynamo.zoo.denoiser_inputs``), the safety checker, image post-processing to
PIL. The VAE is always eager: only the denoiser is compiled.
"""
from __future__ import annotations

import os

import numpy as np
import torch

from lyradynamo import zoo

GUIDANCE_SCALE_SD = 7.5
GUIDANCE_FLUX = 3.5
FAMILIES = {"sd15": "sd", "sdxl": "sd", "flux": "flux"}


def family(name: str) -> str:
    if name not in FAMILIES:
        raise ValueError(f"no denoising loop for {name!r}; supported: {tuple(FAMILIES)}")
    return FAMILIES[name]


def size_multiple(name: str) -> int:
    """Image sides must be multiples of this (FLUX packs 2x2 latents of a /8 VAE)."""
    return 16 if family(name) == "flux" else 8


# ------------------------------------------------------------------------------------------
# Components
# ------------------------------------------------------------------------------------------


def vae_dtype(name: str, dtype: torch.dtype, vae_config) -> torch.dtype:
    """SDXL's pipeline upcasts a fp16 VAE with force_upcast to fp32 before decoding; the SD1.5
    and FLUX pipelines decode in the model dtype."""
    if name == "sdxl" and dtype == torch.float16 and vae_config.get("force_upcast", True):
        return torch.float32
    return dtype


def build_vae(name, *, tiny, dtype, device, seed=0, model_path=None):
    """AutoencoderKL: from ``model_path``/vae when that exists, else the zoo's config (random weights)."""
    import diffusers

    if model_path is not None and os.path.isdir(os.path.join(model_path, "vae")):
        vae = diffusers.AutoencoderKL.from_pretrained(model_path, subfolder="vae", local_files_only=True)
    else:
        _, spec = zoo.pipeline_spec(name, tiny)
        vae = zoo.build_vae(name, tiny=tiny, dtype=vae_dtype(name, dtype, spec["vae"][2]), device=device,
                            seed=seed + 1)
    vdt = vae_dtype(name, dtype, dict(vae.config))
    torch.nn.Module.to(vae, device=device, dtype=vdt)
    return vae.eval().requires_grad_(False)


def build_scheduler(name, model_path=None):
    import diffusers

    cls_name, cfg = zoo.scheduler_config(name)
    cls = getattr(diffusers, cls_name)
    if model_path is not None and os.path.isdir(os.path.join(model_path, "scheduler")):
        return cls.from_pretrained(model_path, subfolder="scheduler", local_files_only=True)
    return cls.from_config(cfg)


def calculate_shift(image_seq_len, base_seq_len=256, max_seq_len=4096, base_shift=0.5, max_shift=1.15):
    """diffusers.pipelines.flux.pipeline_flux.calculate_shift (copied: stable since 0.30)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    b = base_shift - m * base_seq_len
    return image_seq_len * m + b


def _pack_latents(latents, batch_size, num_channels_latents, height, width):
    latents = latents.view(batch_size, num_channels_latents, height // 2, 2, width // 2, 2)
    latents = latents.permute(0, 2, 4, 1, 3, 5)
    return latents.reshape(batch_size, (height // 2) * (width // 2), num_channels_latents * 4)


def _unpack_latents(latents, height, width, vae_scale_factor):
    batch_size, _num_patches, channels = latents.shape
    height = 2 * (int(height) // (vae_scale_factor * 2))
    width = 2 * (int(width) // (vae_scale_factor * 2))
    latents = latents.view(batch_size, height // 2, width // 2, channels // 4, 2, 2)
    latents = latents.permute(0, 3, 1, 4, 2, 5)
    return latents.reshape(batch_size, channels // (2 * 2), height, width)


def postprocess(image: torch.Tensor) -> torch.Tensor:
    """VaeImageProcessor.denormalize: [-1, 1] -> [0, 1], as float32 on the CPU."""
    return (image.float() / 2 + 0.5).clamp(0, 1).cpu()


# ------------------------------------------------------------------------------------------
# One workload: model x size x batch x steps, fixed inputs
# ------------------------------------------------------------------------------------------


class Workload:
    """Inputs for one (model, size, batch, steps); ``run(fn)`` makes one image batch.

    Every tensor that the loop starts from (initial noise, prompt embeddings, SDXL time ids,
    FLUX ids) is drawn once here from CPU generators seeded with ``seed`` and moved to the
    device, so every mode sees identical inputs.
    """

    def __init__(self, name, model, vae, scheduler, *, height, width, batch=1, steps=20, seed=0,
                 prompt_len=None):
        self.name = name
        self.fam = family(name)
        self.model, self.vae, self.scheduler = model, vae, scheduler
        self.decode_fn = None  # a compiled vae.decode (bench --compile-vae), else vae.decode itself
        self.height, self.width, self.batch, self.steps = height, width, batch, steps
        param = next(model.parameters())
        self.dtype, self.device = param.dtype, param.device
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        m = size_multiple(name)
        if height % m or width % m:
            raise ValueError(f"{name}: height and width must be multiples of {m}, got {width}x{height}")
        cfg = model.config
        g = torch.Generator("cpu").manual_seed(seed + 12345)
        if self.fam == "sd":
            # [uncond; cond] embeddings, as the pipeline concatenates them for CFG.
            kw = zoo.denoiser_inputs(name, model, batch=2 * batch, height=height, width=width,
                                     prompt_len=prompt_len, seed=seed)
            self.encoder_hidden_states = kw["encoder_hidden_states"]
            self.added_cond_kwargs = kw.get("added_cond_kwargs")
            shape = (batch, cfg.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
            self.noise = torch.randn(shape, generator=g).to(self.device, self.dtype)
        else:
            kw = zoo.denoiser_inputs(name, model, batch=batch, height=height, width=width,
                                     prompt_len=prompt_len, seed=seed)
            self.prompt_embeds = kw["encoder_hidden_states"]
            self.pooled = kw["pooled_projections"]
            self.txt_ids = kw["txt_ids"]
            c = cfg.in_channels // 4
            lh = 2 * (int(height) // (self.vae_scale_factor * 2))
            lw = 2 * (int(width) // (self.vae_scale_factor * 2))
            noise = torch.randn((batch, c, lh, lw), generator=g).to(self.device, self.dtype)
            self.noise = _pack_latents(noise, batch, c, lh, lw)
            from diffusers import FluxPipeline

            self.img_ids = FluxPipeline._prepare_latent_image_ids(batch, lh // 2, lw // 2, self.device, self.dtype)
            self.guidance = (
                torch.full([1], GUIDANCE_FLUX, device=self.device, dtype=torch.float32).expand(batch)
                if cfg.guidance_embeds else None
            )

    # -- scheduler ---------------------------------------------------------------------------

    def _set_timesteps(self):
        s = self.scheduler
        if self.fam == "sd":
            s.set_timesteps(self.steps, device=self.device)
        else:
            sigmas = np.linspace(1.0, 1 / self.steps, self.steps)
            if getattr(s.config, "use_flow_sigmas", False):
                sigmas = None
            mu = calculate_shift(
                self.noise.shape[1],
                s.config.get("base_image_seq_len", 256),
                s.config.get("max_image_seq_len", 4096),
                s.config.get("base_shift", 0.5),
                s.config.get("max_shift", 1.15),
            )
            if sigmas is None:
                s.set_timesteps(self.steps, device=self.device, mu=mu)
            else:
                s.set_timesteps(sigmas=sigmas, device=self.device, mu=mu)
        if hasattr(s, "set_begin_index") and self.name != "sd15":  # SDXL and FLUX pipelines do this
            s.set_begin_index(0)
        return s.timesteps

    # -- one denoiser call -------------------------------------------------------------------

    def _call(self, fn, latents, t):
        if self.fam == "sd":
            latent_model_input = torch.cat([latents] * 2)
            latent_model_input = self.scheduler.scale_model_input(latent_model_input, t)
            return fn(
                latent_model_input,
                t,
                encoder_hidden_states=self.encoder_hidden_states,
                timestep_cond=None,
                cross_attention_kwargs=None,
                added_cond_kwargs=self.added_cond_kwargs,
                return_dict=False,
            )[0]
        timestep = t.expand(latents.shape[0]).to(latents.dtype)
        return fn(
            hidden_states=latents,
            timestep=timestep / 1000,
            guidance=self.guidance,
            pooled_projections=self.pooled,
            encoder_hidden_states=self.prompt_embeds,
            txt_ids=self.txt_ids,
            img_ids=self.img_ids,
            joint_attention_kwargs=None,
            return_dict=False,
        )[0]

    def first_call(self, fn) -> torch.Tensor:
        """One denoiser call on the first step's inputs (for rel_err), cloned, in float32."""
        with torch.no_grad():
            timesteps = self._set_timesteps()
            latents = self.noise * self.scheduler.init_noise_sigma if self.fam == "sd" else self.noise
            out = self._call(fn, latents, timesteps[0])
            return out.detach().float().clone()

    # -- the whole loop + decode -------------------------------------------------------------

    def denoise(self, fn, before_call=None) -> torch.Tensor:
        """``steps`` denoiser calls; returns the final latents (unpacked for FLUX)."""
        timesteps = self._set_timesteps()
        if self.fam == "sd":
            latents = self.noise * self.scheduler.init_noise_sigma
            for t in timesteps:
                if before_call is not None:
                    before_call()
                noise_pred = self._call(fn, latents, t)
                noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
                noise_pred = noise_pred_uncond + GUIDANCE_SCALE_SD * (noise_pred_text - noise_pred_uncond)
                latents = self.scheduler.step(noise_pred, t, latents, return_dict=False)[0]
            return latents
        latents = self.noise
        for t in timesteps:
            if before_call is not None:
                before_call()
            noise_pred = self._call(fn, latents, t)
            latents = self.scheduler.step(noise_pred, t, latents, return_dict=False)[0]
        return _unpack_latents(latents, self.height, self.width, self.vae_scale_factor)

    def decode(self, latents) -> torch.Tensor:
        vcfg = self.vae.config
        vdt = next(self.vae.parameters()).dtype
        if self.fam == "flux":
            latents = latents / vcfg.scaling_factor + vcfg.shift_factor
        else:
            latents = latents / vcfg.scaling_factor
        return (self.decode_fn or self.vae.decode)(latents.to(vdt), return_dict=False)[0]

    def run(self, fn, before_call=None, events=None) -> torch.Tensor:
        """Loop + decode; returns the decoded image batch (VAE output, [-1, 1]).

        ``events``: optional (start, after_loop, end) objects with ``.record()`` (CUDA events)."""
        with torch.no_grad():
            if events:
                events[0].record()
            latents = self.denoise(fn, before_call)
            if events:
                events[1].record()
            image = self.decode(latents)
            if events:
                events[2].record()
        return image
