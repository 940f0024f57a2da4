"""Diffusers denoisers outside the zoo (tests/more_models.py: Qwen-Image, Wan, FLUX.2, Chroma,
CogView4, Lumina2, SD3.5, Z-Image, LTX-Video) under backend="lyra" on the CPU: each output as
eager's at several batch sizes, resolutions and text lengths; one compilation for all of them
where the model's own Python code does not depend on the sizes.

Qwen-Image's first trace failed before this test existed (torch 2.13: size_one answered
expand's `torch._check(s == 1)` without its guard, and the trace then read s as unknown)."""
import pytest
import torch

import lyradynamo
import more_models
from helpers import rel_err

# (batch, latent height, latent width, text length)
SHAPES = [(2, 8, 8, 12), (1, 8, 12, 12), (3, 12, 8, 20)]


@pytest.mark.parametrize("name", list(more_models.MODELS))
def test_model_outside_the_zoo_matches_eager(name):
    if not more_models.available(name):
        pytest.skip(f"this diffusers has no {more_models.MODELS[name][0]}")
    model = more_models.build(name)
    compiled = torch.compile(model, backend="lyra")
    one = name in more_models.ONE_COMPILATION
    with torch.no_grad():
        for i, shape in enumerate(SHAPES):
            kwargs = more_models.inputs(name, *shape, seed=i)
            out = more_models.call_compiled(compiled, kwargs, recompile_is_error=one and i > 0)
            ref = more_models.first_output(model(**kwargs))
            assert out.shape == ref.shape and ref.abs().max() > 0
            assert rel_err(out, ref) < 1e-5, (name, shape)
    graphs = lyradynamo.compiled_graphs()
    assert graphs and any(sum(c["before"] for c in r.summary["coverage"].values()) for r in graphs)
    if one:
        assert lyradynamo.compile_count() == 1


# (latent height, latent width, text length) at one batch size
SIZES_AT_ONE_BATCH = [(8, 8, 12), (8, 12, 20), (12, 8, 7)]


@pytest.mark.parametrize("name", more_models.ONE_COMPILATION_PER_BATCH)
def test_model_with_batch_long_lists_compiles_once_per_batch(name):
    """Qwen-Image: its RoPE slices a table by the sizes in `img_shapes` (before: an unbacked size,
    a graph break, and the text length pinned across it) and makes a tensor of the text length
    (before: pinned). Now one graph per batch size serves every resolution and prompt length."""
    if not more_models.available(name):
        pytest.skip(f"this diffusers has no {more_models.MODELS[name][0]}")
    torch._dynamo.reset()
    lyradynamo.reset_stats()
    model = more_models.build(name)
    compiled = torch.compile(model, backend="lyra")
    with torch.no_grad():
        for batch in (1, 2):
            for i, size in enumerate(SIZES_AT_ONE_BATCH):
                kwargs = more_models.inputs(name, batch, *size, seed=i)
                out = more_models.call_compiled(compiled, kwargs, recompile_is_error=i > 0)
                assert rel_err(out, more_models.first_output(model(**kwargs))) < 1e-5, (name, batch, size)
            assert lyradynamo.compile_count() == batch, [r.recompile_reason for r in lyradynamo.compiled_graphs()]
