"""Parameters and buffers as graph attributes (lyradynamo/params.py): the compiled frame gathers
only the real inputs per call, lyra passes the weights itself, and every way of changing a weight
is still seen (each call below is compared with eager)."""
import pytest
import torch

import lyradynamo
from lyradynamo import zoo


def _unet():
    torch.manual_seed(0)
    return zoo.build_denoiser("sd15").eval()


def _inputs(model, batch=2, seed=1):
    torch.manual_seed(seed)
    return zoo.denoiser_inputs("sd15", model, batch=batch)


def _check(compiled, model, inputs):
    with torch.no_grad():
        out, ref = compiled(**inputs).sample, model(**inputs).sample
    assert (out - ref).abs().max().item() < 1e-4 * max(1.0, ref.abs().max().item())
    return out


def _compiled_ok(model):
    compiled = torch.compile(model, backend="lyra")
    _check(compiled, model, _inputs(model))
    return compiled


def test_the_frame_gathers_only_the_real_inputs():
    model = _unet()
    _compiled_ok(model)
    (rec,) = lyradynamo.compiled_graphs()
    n_weights = sum(1 for _ in model.parameters()) + sum(1 for _ in model.buffers())
    assert rec.params_lifted >= n_weights - 2 and rec.frame_inputs < 12
    assert rec.summary["params_lifted"] == rec.params_lifted
    assert "parameters / buffers passed by lyra" in lyradynamo.dump.format_summary(rec.summary)
    assert all(not p.requires_grad for p in model.parameters())  # frozen before Dynamo recorded them


def test_option_off_keeps_them_frame_inputs():
    model = _unet()
    with lyradynamo.config.patch(params_as_attributes=False):
        _compiled_ok(model)
    (rec,) = lyradynamo.compiled_graphs()
    assert rec.params_lifted == 0 and rec.frame_inputs > 100


def test_patches_in_place_and_new_sizes_do_not_recompile():
    model = _unet()
    compiled = _compiled_ok(model)
    conv = model.conv_in
    linear = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))
    with torch.compiler.set_stance("fail_on_recompile"):
        with torch.no_grad():
            conv.weight.mul_(1.5)  # a LoRA fuse, lyra's swaps: copy_ / in-place ops
        _check(compiled, model, _inputs(model, seed=2))
        with torch.no_grad():
            linear.weight.data = linear.weight.data * -2.0  # `.data =` (peft's merge): same object
        _check(compiled, model, _inputs(model, seed=3))
        _check(compiled, model, _inputs(model, batch=1, seed=4))  # another batch size
    assert lyradynamo.compile_count() == 1


def test_a_parameter_replaced_by_a_new_object_recompiles_and_is_read():
    """Dynamo guards an installed attribute's metadata only; lyra adds its identity, so a new
    Parameter of the same shape is not silently ignored by the graph holding the old one."""
    model = _unet()
    compiled = _compiled_ok(model)
    old = model.conv_in.weight
    model.conv_in.weight = torch.nn.Parameter(torch.randn_like(old), requires_grad=False)
    _check(compiled, model, _inputs(model, seed=5))
    assert lyradynamo.compile_count() == 2
    assert "conv_in" in (lyradynamo.compiled_graphs()[1].recompile_reason or "")


def test_quant_exclude_names_lifted_weights_by_their_module_path():
    """The quantiser names a weight by its module path (quant_exclude patterns, reports); a lifted
    weight carries the source Dynamo read it from."""
    model = zoo.build_denoiser("flux", seed=0).eval()
    inputs = zoo.denoiser_inputs("flux", model, batch=1)
    with lyradynamo.config.patch(quant="int8", quant_exclude=[r"transformer_blocks\.0\.attn\.to_q"]):
        compiled = torch.compile(model, backend="lyra")
        with torch.no_grad():
            compiled(**inputs)
    (rec,) = lyradynamo.compiled_graphs()
    assert rec.params_lifted > 0
    quantized = rec.summary["quant"]["quantized"]
    assert any(k.startswith("transformer_blocks.0.attn.to_k") for k in quantized)
    assert not any(k.startswith("transformer_blocks.0.attn.to_q") for k in quantized)


@pytest.mark.parametrize("on", [True, False])
def test_same_result_with_the_option_on_and_off(on):
    model = _unet()
    with lyradynamo.config.patch(params_as_attributes=on):
        compiled = torch.compile(model, backend="lyra")
        _check(compiled, model, _inputs(model))


def test_identity_guards_describe_tensors_by_metadata(monkeypatch):
    """torch 2.10-2.12 write repr(value) into each ID_MATCH guard's text, which for a CUDA
    parameter formats its values (~5 ms each, 8 s of SDXL's first call on an H200 host). This
    torch (2.13) writes the type only, so the test stands in torch 2.11's behaviour (a repr of the
    guarded value before the guard is added) and checks what that repr gives inside a lyra
    compilation: the metadata form, never the values; outside, the usual repr."""
    from torch._dynamo.guards import GuardBuilder

    wrapper = GuardBuilder.id_match_unchecked
    torch_own = wrapper.__wrapped__
    reprs = []

    def like_torch_2_11(self, guard, *args, **kwargs):
        val = self.get(guard)
        if isinstance(val, torch.Tensor):
            reprs.append(repr(val))
        return torch_own(self, guard, *args, **kwargs)

    monkeypatch.setattr(wrapper, "__wrapped__", like_torch_2_11)
    model = _unet()
    _compiled_ok(model)
    n_params = sum(1 for _ in model.parameters())
    assert len(reprs) >= n_params - 2  # one identity guard per lifted parameter
    assert all(r.startswith("<Parameter (") or r.startswith("<Tensor (") for r in reprs), reprs[:3]
    p = model.conv_in.weight
    assert repr(p).startswith("Parameter containing") and "<Parameter" not in repr(p)
    assert repr(p.data).startswith("tensor(")
