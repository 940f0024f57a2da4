"""Attention over few keys (cross-attention on text tokens) with its output quantised by the
attention op (config.quant fp8 / int8), on the CPU: the op's reference and checks, the graph
rewrite on a UNet whose heads the kernel takes (40 / 64 wide), its refusals with reasons, and
one compilation for new text lengths. tests/cuda/test_short_kv_attention_cuda.py runs the kernel."""
import pytest
import torch

import lyradynamo
from lyradynamo import dump
from lyradynamo.ops import attention_short_kv as skv
from lyradynamo.ops.attention import attention_reference
from lyradynamo.quant import numerics

lyra = torch.ops.lyra
g = torch.Generator().manual_seed(5)


@pytest.fixture(autouse=True)
def _restore_config():
    with lyradynamo.config.patch(**lyradynamo.config.snapshot()):
        yield


def _unet(head_dim: int, dtype=torch.bfloat16):
    """A two-level SD-style UNet: one cross-attention block per level, heads head_dim wide."""
    import diffusers

    torch.manual_seed(0)
    ch = (2 * head_dim, 4 * head_dim)
    model = diffusers.UNet2DConditionModel(
        block_out_channels=ch, attention_head_dim=(2, 4), cross_attention_dim=48, layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        mid_block_type=None, norm_num_groups=8, in_channels=4, out_channels=4, sample_size=8)
    return model.eval().to(dtype)


def _inputs(dtype=torch.bfloat16, batch=2, size=8, keys=7):
    return dict(sample=torch.randn(batch, 4, size, size, generator=g).to(dtype),
                timestep=torch.tensor([10] * batch),
                encoder_hidden_states=torch.randn(batch, keys, 48, generator=g).to(dtype))


def _compile_run(model, inputs, **cfg):
    torch._dynamo.reset()
    lyradynamo.reset_stats()
    cfg.setdefault("quant", "fp8")
    with lyradynamo.config.patch(quant_master="gpu", **cfg), torch.no_grad():
        out = torch.compile(model, backend="lyra")(**inputs, return_dict=False)[0]
    rec = lyradynamo.compiled_graphs()[0]
    return out, rec.report.quant["attention"], rec.summary["op_histogram"]


def test_reference_is_attention_then_row_quantisation():
    q, k, v = (torch.randn(2, 5, 3, 40, generator=g).to(torch.bfloat16) for _ in range(3))
    k, v = k[:, :4], v[:, :4]
    inv = torch.rand(120, generator=g) + 0.5
    for kind, smooth in (("fp8", None), ("int8", inv)):
        oq, scale = lyra.attention_quant(q, k, v, 0.3, kind, smooth)
        o = attention_reference(q, k, v, None, 0.3, False, "blhd")
        rq, rs = numerics.quantize_rows(o.flatten(2), kind, smooth)
        assert oq.shape == (2, 5, 3, 40) and oq.dtype == numerics.QDTYPE[kind] and scale.shape == (2, 5)
        assert torch.equal(oq.flatten(2).view(torch.int8), rq.view(torch.int8)) and torch.equal(scale, rs)


def test_op_checks_its_arguments():
    x = torch.randn(1, 4, 2, 40).to(torch.bfloat16)
    with pytest.raises(ValueError, match="quant kind"):
        lyra.attention_quant(x, x, x, None, "int4", None)
    with pytest.raises(ValueError, match="q must be 4-D"):
        lyra.attention_quant(x[0], x, x, None, "fp8", None)


def test_unsupported_names_the_reason():
    """The kernel's host-side check on real tensors: every refusal says what it refuses."""
    C = object()  # no attention_short_kv attribute: a library without the kernel
    q = torch.randn(2, 5, 3, 64).to(torch.float16)
    assert "csrc not built" in skv.unsupported(q, q, q, C=C)

    class Lib:
        attention_short_kv = None

    assert "CUDA device" in skv.unsupported(q, q, q, C=Lib)  # a CPU tensor
    assert "blhd" in skv.unsupported(q, q, q, layout="bhld", C=Lib)
    assert "mask" in skv.unsupported(q, q, q, attn_mask=q, C=Lib)


@pytest.mark.parametrize("head_dim,kind", [(64, "fp8"), (40, "int8"), (64, "int8")])
def test_rewrite_quantises_cross_attention_output_in_the_op(head_dim, kind):
    """Each cross-attention (7 text tokens) becomes lyra::attention_quant and its out-projection
    a qlinear_q of that output; self-attention over the 64 image tokens of the traced size is
    within 128 keys too and rewritten as well. Same numbers as the unfused graph (the CPU
    reference quantises the same attention output the same way)."""
    model = _unet(head_dim)
    inputs = _inputs()
    out, att, hist = _compile_run(model, inputs, quant=kind)
    n_attn = 6  # down: 1 transformer block, up: 2 (one per resnet); self + cross each
    assert att["rows"] == n_attn and not att["kept"], att
    assert hist.get("lyra::attention_quant") == n_attn and "lyra::attention" not in hist
    text = dump.format_summary(lyradynamo.compiled_graphs()[0].summary)
    assert f"0 fp8 attention, {n_attn} short-KV rows; left to the out-projection's quantise pass: 0" in text
    off, att_off, hist_off = _compile_run(model, inputs, quant=kind, short_kv_attention="off")
    assert att_off["rows"] == 0 and hist_off.get("lyra::attention") == n_attn
    assert all("short_kv_attention = 'off'" in why for why in att_off["kept"].values())
    assert torch.equal(out, off)


def test_long_self_attention_keeps_its_quantise_pass_and_says_why():
    """At 16 x 16 latents the self-attentions (all on the first level) have 256 keys: they stay
    lyra::attention (cuDNN on a GPU; the out-projection quantises the output itself), with the
    reason reported; the three cross-attentions are rewritten."""
    model = _unet(64)
    out, att, hist = _compile_run(model, _inputs(size=16))
    assert att["rows"] == 3 and len(att["kept"]) == 3, att
    assert all("256 keys in the traced call" in why for why in att["kept"].values())
    text = dump.format_summary(lyradynamo.compiled_graphs()[0].summary)
    assert "left to the out-projection's quantise pass: 3" in text and "short-KV: 256 keys in the traced" in text
    assert hist.get("lyra::attention") == 3 and hist.get("lyra::attention_quant") == 3


def test_unsupported_head_dim_and_dtype_stay_with_the_reason():
    out, att, _ = _compile_run(_unet(32), _inputs())
    assert att["rows"] == 0 and all("head dim 32" in why for why in att["kept"].values())
    out, att, _ = _compile_run(_unet(64, torch.float32), _inputs(torch.float32))
    assert att["rows"] == 0 and all("torch.float32 attention" in why for why in att["kept"].values())


def test_one_compilation_serves_new_text_lengths_and_sizes():
    model = _unet(64)
    with lyradynamo.config.patch(quant="fp8", quant_master="gpu"), torch.no_grad():
        torch._dynamo.reset()
        lyradynamo.reset_stats()
        compiled = torch.compile(model, backend="lyra")
        compiled(**_inputs(), return_dict=False)
        torch.compiler.set_stance("fail_on_recompile")
        try:
            for shape in (dict(keys=77), dict(batch=3, keys=200), dict(batch=1, size=16, keys=5)):
                inputs = _inputs(**shape)
                got = compiled(**inputs, return_dict=False)[0]
                assert got.shape == inputs["sample"].shape and torch.isfinite(got.float()).all()
        finally:
            torch.compiler.set_stance("default")
    assert lyradynamo.compile_count() == 1
