"""Weights stay patchable: in-place parameter changes reach the compiled graph at once,
exactly as in eager, with no recompilation (parameters are graph inputs)."""
import pytest
import torch

import lyradynamo
from lyradynamo import zoo
from helpers import rel_err


def test_param_add_changes_output_like_eager_without_recompile():
    model = zoo.build_denoiser("flux")
    compiled = torch.compile(model, backend="lyra")
    inputs = zoo.denoiser_inputs("flux", model, batch=2)
    with torch.no_grad():
        before = compiled(**inputs)[0]
        torch.compiler.set_stance("fail_on_recompile")
        try:
            g = torch.Generator().manual_seed(7)
            for p in list(model.parameters())[::7]:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
            after = compiled(**inputs)[0]
        finally:
            torch.compiler.set_stance("default")
        ref = model(**inputs)[0]
    assert rel_err(after, before) > 1e-3  # the patch matters
    assert rel_err(after, ref) < 1e-5  # and is seen exactly
    assert lyradynamo.compile_count() == 1


def _make_lora(pipe, path, seed=0):
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    cfg = LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                     target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.2"])
    pipe.unet.add_adapter(cfg, adapter_name="tmp")
    sd = get_peft_model_state_dict(pipe.unet, adapter_name="tmp")
    pipe.unet.delete_adapters("tmp")
    type(pipe).save_lora_weights(str(path), unet_lora_layers=sd, safe_serialization=True)


@pytest.mark.slow
def test_fuse_lora_on_compiled_pipeline_matches_eager(tmp_path):
    _make_lora(zoo.build_pipeline("sd15"), tmp_path)  # another instance: peft wrappers stay off `pipe`
    pipe = zoo.build_pipeline("sd15")
    args = dict(prompt="a cat", num_inference_steps=2, height=64, width=64, output_type="np")

    def run(p):
        return p(**args, generator=torch.Generator().manual_seed(0)).images

    unet = pipe.unet
    compiled = torch.compile(unet, backend="lyra")
    pipe.unet = compiled
    base = run(pipe)
    torch.compiler.set_stance("fail_on_recompile")
    try:
        # diffusers' unload skips a compiled (OptimizedModule) unet, so patch through the
        # module the compiled one wraps: the fused weights change in place, LoRA layers go.
        pipe.unet = unet
        pipe.load_lora_weights(str(tmp_path))
        pipe.fuse_lora()
        pipe.unload_lora_weights()
        pipe.unet = compiled
        lora = run(pipe)
    finally:
        torch.compiler.set_stance("default")
    assert lyradynamo.compile_count() == 1
    pipe.unet = unet  # eager, same (fused) weights
    ref = run(pipe)
    assert rel_err(lora, base) > 1e-4
    assert rel_err(lora, ref) < 1e-5
