"""passes/conv1x1.py on CUDA: 1x1 convolutions over channels_last 16-bit activations run as
lyra::linear GEMMs (bias / residual in the epilogue, no fallback), on fresh random inputs of
odd spatial sizes, within the project's 2x rule against a float64 reference; the tiny SD1.5
UNet has every one of its 1x1 convolutions rewritten on the GPU, where the traced strides
(NCHW after aten's GroupNorm) differ from the ones the kernels produce (NHWC)."""
import pytest
import torch
import torch.nn as nn

import lyradynamo
from lyradynamo import zoo
from lyradynamo.ops import _common
from tests.test_conv1x1 import Block  # the CPU test's proj_in / proj_out / shortcut block
from helpers import rel_err as err

pytestmark = [pytest.mark.cuda, pytest.mark.usefixtures("seed_from_test_id")]
CL = torch.channels_last



@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("c,inner,out,hw", [(64, 32, 48, (7, 5)), (320, 320, 640, (16, 9)), (96, 40, 24, (3, 13))])
def test_block_matches_float64_reference(dtype, c, inner, out, hw):
    ref64 = Block(c, inner, out).double().cuda().eval()
    model = Block(c, inner, out).cuda().eval()
    model.load_state_dict(ref64.state_dict())
    model = model.to(dtype).to(memory_format=CL)
    x = torch.randn(2, c, *hw, device="cuda", dtype=torch.float64)
    _common.reset_fallback_counts()
    torch._dynamo.reset()
    with torch.no_grad():
        exact = ref64(x)
        eager = model(x.to(dtype).contiguous(memory_format=CL))
        compiled = torch.compile(model, backend="lyra")
        got = compiled(x.to(dtype).contiguous(memory_format=CL))
        again = compiled(x.to(dtype).contiguous(memory_format=CL))  # a CUDA-graph replay
    rec = lyradynamo.compiled_graphs()[-1]
    assert rec.report.matched.get("conv1x1") == {"conv1x1->linear+bias": 2, "conv1x1->linear+bias+residual": 1}
    assert err(got, exact) <= 2 * err(eager, exact) + 1e-6, (err(got, exact), err(eager, exact))
    torch.testing.assert_close(again, got, rtol=0, atol=0)
    linear_fallbacks = {k: v for k, v in _common.fallback_counts().items() if k[0] == "linear"}
    assert not linear_fallbacks, linear_fallbacks


def test_sd15_unet_every_1x1_convolution_rewritten():
    model = zoo.build_denoiser("sd15", dtype=torch.float16, device="cuda")
    n_1x1 = sum(1 for mod in model.modules() if isinstance(mod, nn.Conv2d) and mod.kernel_size == (1, 1))
    inputs = zoo.denoiser_inputs("sd15", model, batch=2, height=64, width=64)
    torch._dynamo.reset()
    with torch.no_grad():
        eager = model(**inputs).sample
        out = torch.compile(model, backend="lyra")(**inputs).sample
    hits = lyradynamo.compiled_graphs()[-1].report.matched.get("conv1x1", {})
    assert n_1x1 > 0 and sum(hits.values()) == n_1x1, (hits, n_1x1)
    assert err(out, eager) < 2e-2, err(out, eager)
