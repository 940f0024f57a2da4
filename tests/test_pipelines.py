"""Whole tiny pipelines (built offline, random weights, in-code tokenizers): the image
with the denoiser compiled by lyra equals eager's, image for image."""
import pytest
import torch

import lyradynamo
from lyradynamo import zoo
from helpers import rel_err


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sd15", "sdxl", "flux"])
def test_pipeline_image_matches_eager(name):
    pipe = zoo.build_pipeline(name)
    attr = "unet" if hasattr(pipe, "unet") else "transformer"
    args = dict(prompt="a photo of a cat", num_inference_steps=3, output_type="np")

    def run(h, w, seed):
        return pipe(**args, height=h, width=w, generator=torch.Generator().manual_seed(seed)).images

    eager = [run(64, 64, 0), run(64, 96, 1)]
    module = getattr(pipe, attr)
    setattr(pipe, attr, torch.compile(module, backend="lyra"))
    compiled = [run(64, 64, 0)]
    torch.compiler.set_stance("fail_on_recompile")
    try:
        compiled.append(run(64, 96, 1))  # a new resolution: no recompilation
    finally:
        torch.compiler.set_stance("default")
    for a, b in zip(compiled, eager):
        assert a.shape == b.shape
        assert rel_err(a, b) < 1e-5
    assert lyradynamo.compile_count() == 1
