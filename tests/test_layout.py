"""channels_last: convolution weights are re-laid out before Dynamo records their strides, so
the UNet runs NHWC with one compilation, the same Parameters and eager's results."""
import torch

import lyradynamo
from lyradynamo import layout, zoo
from helpers import rel_err


def _conv_weights(model):
    return [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d)]


def test_conv_weights_go_channels_last_without_recompiling():
    model = zoo.build_denoiser("sd15")
    params_before = {id(p) for p in model.parameters()}
    ref_inputs = [zoo.denoiser_inputs("sd15", model, batch=b, height=h, width=w)
                  for b, h, w in ((2, 64, 64), (1, 48, 80))]
    with torch.no_grad():
        refs = [model(**i)[0] for i in ref_inputs]
    with lyradynamo.config.patch(channels_last=True):
        compiled = torch.compile(model, backend="lyra")
        with torch.no_grad():
            outs = [compiled(**ref_inputs[0])[0]]
            torch.compiler.set_stance("fail_on_recompile")
            try:
                outs.append(compiled(**ref_inputs[1])[0])
            finally:
                torch.compiler.set_stance("default")
    convs = [w for w in _conv_weights(model) if w.shape[2] * w.shape[3] > 1]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
                         for w in convs)
    assert {id(p) for p in model.parameters()} == params_before  # same Parameter objects
    assert lyradynamo.compile_count() == 1
    for out, ref in zip(outs, refs):
        assert rel_err(out, ref) < 1e-5


def test_off_keeps_nchw():
    model = zoo.build_denoiser("sd15")
    with lyradynamo.config.patch(channels_last=False):
        compiled = torch.compile(model, backend="lyra")
        with torch.no_grad():
            compiled(**zoo.denoiser_inputs("sd15", model, batch=1))
    assert all(w.is_contiguous() for w in _conv_weights(model))


def test_auto_is_cuda_only():
    w = torch.nn.Parameter(torch.randn(8, 4, 3, 3))
    assert lyradynamo.config.channels_last == "auto"
    layout.prepare_parameter(w, "self._modules['conv']._parameters['weight']")
    assert w.is_contiguous()  # CPU tensor: auto leaves it alone
    with lyradynamo.config.patch(channels_last=True):
        layout.prepare_parameter(w, "self._modules['pos']._parameters['pos_embed']")
        assert w.is_contiguous()  # not a module's `weight`
        layout.prepare_parameter(w, "self._modules['conv']._parameters['weight']")
        assert w.is_contiguous(memory_format=torch.channels_last)


def test_nhwc_contiguous_is_kept_nhwc():
    """Transformer2DModel's `permute(0, 3, 1, 2).contiguous()` on an NHWC tensor stays NHWC."""
    model = zoo.build_denoiser("sd15")
    inputs = zoo.denoiser_inputs("sd15", model, batch=2)
    with torch.no_grad():
        ref = model(**inputs)[0]
    with lyradynamo.config.patch(channels_last=True):
        out = torch.compile(model, backend="lyra")(**inputs)[0]
    summary = lyradynamo.compiled_graphs()[0].summary
    hits = summary["matched"].get("layout", {})
    assert hits.get("contiguous->channels_last", 0) >= 1, summary["matched"]
    assert rel_err(out, ref) < 1e-5
