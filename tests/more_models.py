"""Tiny configs of diffusers denoisers outside the zoo, with call inputs, for tests that check
lyra on architectures no pass was written for (the passes know patterns, not models).

Each entry: the diffusers class, a tiny config (head dims of 32, widths that are multiples of 16,
as the CUDA kernels see in real models) and a function making one call's keyword arguments at
(batch, latent height, latent width, text length). `ONE_COMPILATION` names the models whose own
Python code does not depend on the input sizes: lyra must serve all shapes with one compilation
there. `ONE_COMPILATION_PER_BATCH` names those whose code builds a Python list or tensor as long
as the batch (Qwen-Image's `img_shapes`, Chroma's `torch.tensor([0] * batch_size)`): Dynamo
guards a list's length, so each new batch size compiles once, and every resolution and prompt
length at that batch is served by it. The others (Lumina2's per-sample caption lengths after a
data-dependent graph break, Z-Image's per-sample input lists and its RoPE table made under
`with torch.device("cpu")` at the first call, QwenImage21's data-dependent token metadata, LTX-2's
batch-expanded coords whose stride changes from batch 1 to 2) recompile for other reasons too,
as under torch's own `dynamic=True`, so only their outputs are checked.
"""
from __future__ import annotations

import functools

import diffusers
import torch

from lyradynamo.zoo.pipelines import _diffusers_model, keep_in_fp32  # noqa: F401 (tests use it)


def _qwenimage(B, h, w, L, randn, dtype):
    return dict(hidden_states=randn(B, (h // 2) * (w // 2), 32), encoder_hidden_states=randn(B, L, 32),
                encoder_hidden_states_mask=torch.ones(B, L, dtype=torch.long), timestep=randn(B).abs().to(dtype),
                img_shapes=[(1, h // 2, w // 2)] * B)


def _wan(B, h, w, L, randn, dtype):
    return dict(hidden_states=randn(B, 8, 2, h, w), timestep=(randn(B).abs() * 500).long(),
                encoder_hidden_states=randn(B, L, 32))


def _ids(h, w, axes):
    """FLUX-style position ids of an (h / 2) x (w / 2) patch grid (row, column in axes 1, 2)."""
    n = (h // 2) * (w // 2)
    ids = torch.zeros(n, axes)
    ids[:, 1] = torch.arange(n) // (w // 2)
    ids[:, 2] = torch.arange(n) % (w // 2)
    return ids


def _flux2(B, h, w, L, randn, dtype):
    return dict(hidden_states=randn(B, (h // 2) * (w // 2), 32), encoder_hidden_states=randn(B, L, 64),
                timestep=randn(B).abs().to(dtype), img_ids=_ids(h, w, 4), txt_ids=torch.zeros(L, 4),
                guidance=torch.full((B,), 3.5))


def _chroma(B, h, w, L, randn, dtype):
    return dict(hidden_states=randn(B, (h // 2) * (w // 2), 32), encoder_hidden_states=randn(B, L, 64),
                timestep=randn(B).abs().to(dtype), img_ids=_ids(h, w, 3), txt_ids=torch.zeros(L, 3))


def _cogview4(B, h, w, L, randn, dtype):
    size = torch.tensor([[h * 8, w * 8]] * B, dtype=torch.float32)
    return dict(hidden_states=randn(B, 8, h, w), encoder_hidden_states=randn(B, L, 64),
                timestep=(randn(B).abs() * 500).round(), original_size=size, target_size=size.clone(),
                crop_coords=torch.zeros(B, 2))


def _sd35(B, h, w, L, randn, dtype):
    return dict(hidden_states=randn(B, 8, h, w), encoder_hidden_states=randn(B, L, 32),
                pooled_projections=randn(B, 32).to(dtype), timestep=(randn(B).abs() * 500).to(dtype))


def _zimage(B, h, w, L, randn, dtype):
    """Z-Image takes one latent and one caption per sample, as lists (its pipeline unbinds them)."""
    return dict(x=[t.to(dtype) for t in randn(B, 8, 1, h, w).unbind(0)], t=randn(B).abs().to(dtype),
                cap_feats=[randn(L, 32).to(dtype) for _ in range(B)])


def _ltx(B, h, w, L, randn, dtype):
    return dict(hidden_states=randn(B, 2 * h * w, 8), encoder_hidden_states=randn(B, L, 32),
                timestep=(randn(B).abs() * 500).long(), encoder_attention_mask=torch.ones(B, L),
                num_frames=2, height=h, width=w)


def _lumina2(B, h, w, L, randn, dtype):
    return dict(hidden_states=randn(B, 8, h, w), timestep=randn(B).abs().to(dtype),
                encoder_hidden_states=randn(B, L, 32), encoder_attention_mask=torch.ones(B, L, dtype=torch.bool))


def _flux3(B, h, w, L, randn, dtype):
    """As Flux3's modular denoiser passes them: packed latents (a transposed view), ids shared by
    the batch (image rows / columns at half scale), timestep / 1000 (contiguous here: the
pipeline's `t.expand(B)` has stride 0 at every batch, and a test that copies it to another
dtype would change the stride between calls, which Dynamo guards)."""
    gh, gw = h // 2, w // 2
    img_ids = torch.cartesian_prod(torch.arange(1), torch.arange(gh), torch.arange(gw), torch.tensor([0])).float()
    img_ids[:, 1:3] *= 0.5
    txt_ids = torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(L)).float()
    return dict(hidden_states=randn(B, 32, gh, gw).flatten(2).transpose(1, 2), encoder_hidden_states=randn(B, L, 64),
                timestep=torch.full((B,), 0.8, dtype=dtype), img_ids=img_ids, txt_ids=txt_ids)


def _krea2(B, h, w, L, randn, dtype):
    """Krea2Pipeline: packed latents, per-layer text states (B, L, layers, D), a bool text mask
    [prompt | pad | 5 suffix tokens] (L >= 6), position ids of text then image tokens."""
    gh, gw = h // 2, w // 2
    latents = randn(B, 8, h, w).view(B, 8, gh, 2, gw, 2).permute(0, 2, 4, 1, 3, 5).reshape(B, gh * gw, 32)
    mask = torch.zeros(B, L, dtype=torch.bool)
    for b in range(B):
        mask[b, : max(1, (L - 5) // 2 - b)] = True
        mask[b, L - 5:] = True
    image_ids = torch.zeros(gh, gw, 3)
    image_ids[..., 1] = torch.arange(gh)[:, None]
    image_ids[..., 2] = torch.arange(gw)[None, :]
    return dict(hidden_states=latents, encoder_hidden_states=randn(B, L, 4, 64), timestep=torch.full((B,), 0.8, dtype=dtype),
                position_ids=torch.cat([torch.zeros(L, 3), image_ids.reshape(-1, 3)]), encoder_attention_mask=mask)


def _hunyuanvideo(B, h, w, L, randn, dtype):
    """HunyuanVideoPipeline: a padded text mask (per-prompt token counts) in the model's dtype,
    guidance * 1000."""
    mask = torch.zeros(B, L)
    for b in range(B):
        mask[b, : max(1, L - 3 - 2 * b)] = 1
    return dict(hidden_states=randn(B, 8, 2, h, w), timestep=torch.full((B,), 937.5, dtype=dtype),
                encoder_hidden_states=randn(B, L, 32), encoder_attention_mask=mask.to(dtype),
                pooled_projections=randn(B, 32).to(dtype), guidance=torch.full((B,), 6000.0).to(dtype))


@functools.lru_cache(maxsize=None)
def _ltx2_ropes():
    """The tiny LTX-2's video and audio RoPE modules (the pipeline asks them for the coords)."""
    model = build("ltx2")
    return model.rope, model.audio_rope


def _ltx2(B, h, w, L, randn, dtype):
    """LTX2Pipeline (no CFG): packed video and audio latents, all-ones connector masks, sigma =
    timestep, coords from the model's RoPE modules (2 latent frames at 24
    fps; 9 audio frames)."""
    video_rope, audio_rope = _ltx2_ropes()
    t = torch.full((B,), 937.5)
    mask = torch.ones(B, L, dtype=torch.int64)
    cpu = torch.device("cpu")
    return dict(hidden_states=randn(B, 2 * h * w, 16), audio_hidden_states=randn(B, 8, 9, 4).transpose(1, 2).flatten(2).to(dtype),
                encoder_hidden_states=randn(B, L, 32), audio_encoder_hidden_states=randn(B, L, 32).to(dtype),
                timestep=t, sigma=t, encoder_attention_mask=mask, audio_encoder_attention_mask=mask,
                num_frames=2, height=h, width=w, fps=24.0, audio_num_frames=9,
                video_coords=video_rope.prepare_video_coords(B, 2, h, w, cpu, fps=24.0),
                audio_coords=audio_rope.prepare_audio_coords(B, 9, cpu))


def _qwenimage21(B, h, w, L, randn, dtype):
    """QwenImage21Pipeline, text to image without its KV cache: the prompt's pad mask (all False)
    then one True per 2x2 latents, img_shapes a list as long as the batch."""
    img_mask = torch.zeros(B, L, dtype=torch.bool)
    img_mask = torch.cat([img_mask, img_mask.new_ones(B, (h * w) // 4)], dim=1)
    return dict(hidden_states=randn(B, 16, h * w).transpose(1, 2), timestep=torch.full((B,), 0.8, dtype=dtype),
                encoder_hidden_states=randn(B, L, 32), encoder_hidden_states_mask=None,
                img_shapes=[[(1, h, w)]] * B, img_mask=img_mask)


MODELS = {
    "qwenimage": ("QwenImageTransformer2DModel", dict(
        patch_size=2, in_channels=32, out_channels=8, num_layers=2, attention_head_dim=32, num_attention_heads=2,
        joint_attention_dim=32, axes_dims_rope=(8, 12, 12)), _qwenimage),
    "wan": ("WanTransformer3DModel", dict(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=8, out_channels=8,
        text_dim=32, freq_dim=32, ffn_dim=128, num_layers=2, rope_max_seq_len=64), _wan),
    "flux2": ("Flux2Transformer2DModel", dict(
        patch_size=1, in_channels=32, num_layers=1, num_single_layers=2, attention_head_dim=32,
        num_attention_heads=2, joint_attention_dim=64, timestep_guidance_channels=32,
        axes_dims_rope=(8, 8, 8, 8)), _flux2),
    "chroma": ("ChromaTransformer2DModel", dict(
        patch_size=1, in_channels=32, num_layers=1, num_single_layers=2, attention_head_dim=32,
        num_attention_heads=2, joint_attention_dim=64, axes_dims_rope=(8, 12, 12), approximator_num_channels=16,
        approximator_hidden_dim=64, approximator_layers=1), _chroma),
    "cogview4": ("CogView4Transformer2DModel", dict(
        patch_size=2, in_channels=8, out_channels=8, num_layers=2, attention_head_dim=32, num_attention_heads=2,
        text_embed_dim=64, time_embed_dim=32, condition_dim=16, pos_embed_max_size=32, sample_size=16,
        rope_axes_dim=(32, 32)), _cogview4),
    "lumina2": ("Lumina2Transformer2DModel", dict(
        sample_size=16, patch_size=2, in_channels=8, hidden_size=64, num_layers=2, num_refiner_layers=1,
        num_attention_heads=2, num_kv_heads=1, multiple_of=16, axes_dim_rope=(8, 12, 12), axes_lens=(64, 64, 64),
        cap_feat_dim=32), _lumina2),
    # SD3.5: SD3's class with q / k RMSNorm and the MMDiT-X dual attention block
    "sd35": ("SD3Transformer2DModel", dict(
        sample_size=16, patch_size=2, in_channels=8, num_layers=2, attention_head_dim=32, num_attention_heads=2,
        joint_attention_dim=32, caption_projection_dim=64, pooled_projection_dim=32, out_channels=8,
        pos_embed_max_size=32, dual_attention_layers=(0,), qk_norm="rms_norm"), _sd35),
    "zimage": ("ZImageTransformer2DModel", dict(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=8, dim=64, n_layers=2, n_refiner_layers=1, n_heads=2,
        n_kv_heads=2, cap_feat_dim=32, axes_dims=[8, 12, 12], axes_lens=[256, 64, 64]), _zimage),
    "flux3": ("Flux3Transformer2DModel", dict(
        in_channels=32, cond_in_channels=32, num_layers=1, num_single_layers=2, attention_head_dim=32,
        num_attention_heads=2, joint_attention_dim=64, timestep_channels=32, mlp_ratio=3.0,
        axes_dims_rope=(8, 8, 8, 8)), _flux3),
    "krea2": ("Krea2Transformer2DModel", dict(
        in_channels=32, num_layers=2, attention_head_dim=32, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=128, timestep_embed_dim=32, text_hidden_dim=64, num_text_layers=4,
        text_num_attention_heads=2, text_num_key_value_heads=2, text_intermediate_size=128,
        num_layerwise_text_blocks=1, num_refiner_text_blocks=1, axes_dims_rope=(8, 12, 12), rope_theta=1000.0), _krea2),
    "hunyuanvideo": ("HunyuanVideoTransformer3DModel", dict(
        in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=32, num_layers=1,
        num_single_layers=2, num_refiner_layers=1, mlp_ratio=4.0, patch_size=2, patch_size_t=1, qk_norm="rms_norm",
        guidance_embeds=True, text_embed_dim=32, pooled_projection_dim=32, rope_theta=256.0,
        rope_axes_dim=(8, 12, 12)), _hunyuanvideo),
    # LTX-2: video and audio streams; its audio coords are a batch-expanded view, whose stride
    # changes between batch 1 and 2 (a recompile; before session 37 that recompile failed to trace)
    "ltx2": ("LTX2VideoTransformer3DModel", dict(
        in_channels=16, out_channels=16, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=32,
        cross_attention_dim=64, audio_in_channels=32, audio_out_channels=32, audio_num_attention_heads=2,
        audio_attention_head_dim=32, audio_cross_attention_dim=64, num_layers=2, caption_channels=32), _ltx2),
    "qwenimage21": ("QwenImage21Transformer2DModel", dict(
        patch_size=1, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=32, num_attention_heads=2,
        context_in_dim=32, mlp_ratio=3, axes_dims_rope=(8, 12, 12)), _qwenimage21),
    "ltx": ("LTXVideoTransformer3DModel", dict(
        in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=32,
        cross_attention_dim=64, num_layers=2, caption_channels=32), _ltx),
}
ONE_COMPILATION = ("wan", "flux2", "cogview4", "sd35", "ltx", "flux3", "krea2", "hunyuanvideo")
ONE_COMPILATION_PER_BATCH = ("qwenimage", "chroma")


def available(name: str) -> bool:
    """The installed diffusers has this model's class."""
    return hasattr(diffusers, MODELS[name][0])


def build(name: str, dtype=torch.float32, device="cpu", seed: int = 0) -> torch.nn.Module:
    cls_name, config, _ = MODELS[name]
    return _diffusers_model(cls_name, config, dtype, device, seed)


def inputs(name: str, batch: int, height: int, width: int, text_len: int, *, dtype=torch.float32, device="cpu",
           seed: int = 0) -> dict:
    """One call's keyword arguments (latent height / width in latent pixels), drawn on the CPU
    from `seed` and moved, so they are the same on every device; floats in `dtype` where the
    model takes activations, position ids and sizes as the pipelines pass them."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g)

    kwargs = MODELS[name][2](batch, height, width, text_len, randn, dtype)
    activations = {"hidden_states", "encoder_hidden_states"}

    def move(k, v):  # noqa: ANN001, ANN202
        if isinstance(v, list):  # Z-Image's per-sample lists
            return [move(k, t) for t in v]
        if not isinstance(v, torch.Tensor):
            return v
        return v.to(device=device, dtype=dtype) if k in activations else v.to(device)

    return {k: move(k, v) for k, v in kwargs.items()} | {"return_dict": False}


def first_output(out) -> torch.Tensor:
    """The denoised latents of a `return_dict=False` call (Z-Image returns one per sample)."""
    out = out[0]
    return torch.stack(out) if isinstance(out, (list, tuple)) else out


def call_compiled(compiled, kwargs: dict, *, recompile_is_error: bool) -> torch.Tensor:
    """compiled(**kwargs)'s latents; with recompile_is_error, a recompilation raises."""
    if recompile_is_error:
        torch.compiler.set_stance("fail_on_recompile")
    try:
        return first_output(compiled(**kwargs))
    finally:
        torch.compiler.set_stance("default")
