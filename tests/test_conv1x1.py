"""passes/conv1x1.py: a 1x1 convolution over channels_last 16-bit activations becomes a linear
over the channels (bias, and a residual where one follows, in the GEMM's epilogue)."""
import pytest
import torch
import torch.nn as nn

import lyradynamo
from lyradynamo import dump
from lyradynamo.passes import conv1x1

CL = torch.channels_last


class Block(nn.Module):
    """The three places a UNet has 1x1 convolutions: a Transformer2D's proj_in (after a
    GroupNorm) and proj_out (+ the block's input), a ResNet's shortcut (+ conv2, / a scale)."""

    def __init__(self, c=64, inner=32, out=48):
        super().__init__()
        self.norm = nn.GroupNorm(8, c)
        self.proj_in = nn.Conv2d(c, inner, 1)
        self.proj_out = nn.Conv2d(inner, c, 1)
        self.conv2 = nn.Conv2d(c, out, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(c, out, 1)

    def forward(self, x):
        h = self.proj_in(self.norm(x))
        h = self.proj_out(h) + x
        return (self.conv_shortcut(h) + self.conv2(h)) / 1.0


def _model(dtype=torch.float16):
    torch.manual_seed(0)
    return Block().to(dtype).to(memory_format=CL).eval()


def _input(dtype=torch.float16, h=6, w=10):
    return torch.randn(2, 64, h, w, dtype=dtype).contiguous(memory_format=CL)


def _compile(model, x, **cfg):
    torch._dynamo.reset()
    with torch.no_grad(), lyradynamo.config.patch(**{"channels_last": True, **cfg}):
        out = torch.compile(model, backend="lyra")(x)
    return out, lyradynamo.compiled_graphs()[-1]


def test_rewrites_proj_in_proj_out_and_shortcut():
    model, x = _model(), _input()
    with torch.no_grad():
        ref = model(x)
    out, rec = _compile(model, x)
    hits = rec.report.matched.get("conv1x1", {})
    assert hits == {"conv1x1->linear+bias": 2, "conv1x1->linear+bias+residual": 1}, hits
    # the residual and both biases now sit in lyra::linear epilogues; conv2 keeps its bias pass
    # with the shortcut's output as residual, and no weight-only bias sum is left
    assert rec.report.matched["linear"], rec.report.matched
    labels = rec.report.matched["conv_bias"]
    assert sum(labels.values()) == 1 and all(k.startswith("conv+bias+residual") and "(conv+bias)" not in k
                                             for k in labels), labels
    assert out.is_contiguous(memory_format=CL) == ref.is_contiguous(memory_format=CL)
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)


def test_same_value_as_without_the_pass():
    model, x = _model(), _input(h=9, w=7)
    with_pass, _ = _compile(model, x)
    without, rec = _compile(model, x, passes=tuple(p for p in lyradynamo.config.ALL_PASSES if p != "conv1x1"))
    assert "conv1x1" not in rec.report.matched
    torch.testing.assert_close(with_pass, without, atol=2e-2, rtol=2e-2)


def test_in_place_weight_patch_is_seen():
    model, x = _model(), _input()
    torch._dynamo.reset()
    with torch.no_grad(), lyradynamo.config.patch(channels_last=True):
        compiled = torch.compile(model, backend="lyra")
        compiled(x)
        assert lyradynamo.compiled_graphs()[-1].report.matched.get("conv1x1")
        model.proj_out.weight.add_(0.5)  # a LoRA fuse writes the Parameter in place
        model.conv_shortcut.bias.mul_(-1)
        out = compiled(x)
        ref = model(x)
    torch.testing.assert_close(out, ref, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("case", ["nchw", "fp32", "stride2", "odd_channels", "kernel3"])
def test_left_alone(case):
    dtype = torch.float32 if case == "fp32" else torch.float16
    cin = 12 if case == "odd_channels" else 64
    conv = nn.Conv2d(cin, 32, 3 if case == "kernel3" else 1, stride=2 if case == "stride2" else 1,
                     padding=1 if case == "kernel3" else 0).to(dtype)
    x = torch.randn(2, cin, 6, 6, dtype=dtype)
    if case != "nchw":
        conv = conv.to(memory_format=CL)
        x = x.contiguous(memory_format=CL)
    with torch.no_grad():
        ref = conv(x)
    out, rec = _compile(conv, x, channels_last=case != "nchw")
    assert "conv1x1" not in rec.report.matched, rec.report.matched
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)


def test_unsupported_reasons_name_the_condition():
    import torch.fx as fx

    g = fx.Graph()
    x, w = g.placeholder("x"), g.placeholder("w")
    conv = g.call_function(torch.conv2d, (x, w, None, (2, 2), (0, 0), (1, 1), 1))
    x.meta["example_value"] = _input()
    w.meta["example_value"] = torch.randn(32, 64, 1, 1, dtype=torch.float16)
    conv.meta["example_value"] = torch.empty(2, 32, 3, 5, dtype=torch.float16).contiguous(memory_format=CL)
    assert conv1x1.unsupported(conv, {x}) == "stride, padding or groups"
    w.meta["example_value"] = torch.randn(32, 64, 3, 3, dtype=torch.float16)
    assert conv1x1.unsupported(conv, {x}) == "kernel is not 1x1"


def test_quantisation_keeps_them_16_bit_and_says_why():
    model, x = _model(), _input()
    _, rec = _compile(model, x, quant="fp8")
    q = rec.report.quant
    assert set(q["conv1x1_16bit"]) == {"proj_in.weight", "proj_out.weight", "conv_shortcut.weight"}, q
    assert not q["quantized"] and not q["kept"], q  # not linear layers of the model: not "kept"
    assert "1x1 convolutions run as 16-bit GEMMs (passes/conv1x1.py; no convolution is quantised): 3" \
        in dump.format_summary(rec.summary)


def test_tiny_sd15_every_1x1_convolution_rewritten():
    """The traced strides say NCHW after aten's GroupNorm and the cats of the up blocks, while
    the GPU (and lyra::group_norm) run them NHWC: runtime_nhwc must see through that."""
    from lyradynamo import zoo

    model = zoo.build_denoiser("sd15", tiny=True, dtype=torch.float16, device="cpu")
    n_1x1 = sum(1 for mod in model.modules() if isinstance(mod, nn.Conv2d) and mod.kernel_size == (1, 1))
    inputs = zoo.denoiser_inputs("sd15", model, batch=2, height=64, width=64)
    with torch.no_grad():
        ref = model(**inputs).sample
    torch._dynamo.reset()
    with torch.no_grad(), lyradynamo.config.patch(channels_last=True):
        out = torch.compile(model, backend="lyra")(**inputs).sample
    rec = lyradynamo.compiled_graphs()[-1]
    hits = rec.report.matched.get("conv1x1", {})
    assert n_1x1 > 0 and sum(hits.values()) == n_1x1, (hits, n_1x1, rec.report.skipped)
    torch.testing.assert_close(out, ref, atol=1e-2, rtol=1e-2)


def test_a_data_dependent_size_is_not_read_as_nhwc():
    """SD3's cropped position table on torch 2.11 is (1, u0, u1, C): sizes without an example
    value. The layout reader says "not NHWC" instead of raising (the raise dropped every conv1x1
    rewrite of the graph)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    from lyradynamo.passes import conv1x1

    mode = FakeTensorMode(shape_env=ShapeEnv())
    u0, u1 = mode.shape_env.create_unbacked_symint(), mode.shape_env.create_unbacked_symint()
    with mode:
        v = torch.empty_strided((1, u0, u1, 16), (16384, 512, 16, 1))
        nhwc = torch.empty_strided((1, 16, u0, u1), (16 * u0 * u1, 1, 16 * u1, 16))
    assert conv1x1._traced_nhwc(v) is False
    assert conv1x1._traced_nhwc(nhwc) is False
