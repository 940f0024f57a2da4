"""config.quant_input_pass: a quantised linear whose input no kernel can write quantised (16-bit
attention, GroupNorm, a GEMM's bias / residual epilogue) stays in high precision ("avoid", fp8's
default) or quantises its input with a separate pass ("allow", int8's default); the report and
the dump name the producers of every separate pass left."""
import pytest
import torch

import lyradynamo
from lyradynamo import dump, zoo
from lyradynamo.quant import input_pass, numerics

# what fp8 may still quantise by a pass: the text embeddings (a graph input) and the per-sample time
# embedding (rows = batch: silu(temb), or a 16-bit linear with a SiLU epilogue)
_CONDITIONING = {"graph input", "silu", "lyra::linear[silu]"}


@pytest.fixture(autouse=True)
def _restore_config():
    with lyradynamo.config.patch(**lyradynamo.config.snapshot()):
        yield


def _run(name, model, inputs, kind, **cfg):
    torch._dynamo.reset()
    lyradynamo.reset_stats()
    with lyradynamo.config.patch(quant=kind, quant_master="gpu", **cfg), torch.no_grad():
        out = torch.compile(model, backend="lyra")(**inputs, return_dict=False)[0]
    return out, lyradynamo.compiled_graphs()[0]


def _kept_by_input_pass(q) -> dict:
    return {n: why for n, why in q["kept"].items() if "quant_input_pass" in why}


@pytest.mark.parametrize("name", ["sdxl", "sd15"])
def test_fp8_leaves_no_separate_pass_over_token_activations(name):
    model = zoo.build_denoiser(name)
    inputs = zoo.denoiser_inputs(name, model, batch=2)
    with torch.no_grad():
        ref = model(**inputs, return_dict=False)[0]
    avoid, rec = _run(name, model, inputs, "fp8")
    q = rec.report.quant
    assert q["input_pass"] == "avoid"
    passes = q["activation_quant"]["separate_passes"]
    assert set(passes) <= _CONDITIONING, passes
    assert "lyra::qlinear" not in rec.summary["op_histogram"]  # no linear quantises its own input
    kept = _kept_by_input_pass(q)
    assert any("attn1.to_out" in n for n in kept) and any("attn2.to_out" in n for n in kept)
    assert all("16-bit attention" in why for n, why in kept.items() if ".to_out." in n)
    if name == "sdxl":  # use_linear_projection: proj_in reads GroupNorm, proj_out the FF's residual GEMM
        assert all("GroupNorm" in why for n, why in kept.items() if ".proj_in." in n)
        assert all("residual" in why for n, why in kept.items() if ".proj_out." in n)
    assert set(kept).isdisjoint(q["quantized"])
    text = dump.format_summary(rec.summary)
    assert "activations quantised by a separate pass (config.quant_input_pass = 'avoid'): 2" in text
    assert f"kept x{sum('to_out' in n for n in kept)} (" in text

    allow, rec_allow = _run(name, model, inputs, "fp8", quant_input_pass="allow")
    qa = rec_allow.report.quant
    assert not _kept_by_input_pass(qa) and set(kept) <= set(qa["quantized"])
    passes_allow = qa["activation_quant"]["separate_passes"]
    assert passes_allow.get("lyra::attention", 0) == sum(".to_out." in n for n in kept), passes_allow
    # fewer layers quantised: closer to eager (the CPU runs the same reference math for both)
    assert numerics.sqnr_db(ref, avoid) > numerics.sqnr_db(ref, allow) >= 25


def test_fused_producers_keep_their_linears_quantised():
    """FLUX fp8: every token activation arrives quantised from its producer (adaLN, the GELU
    epilogue, fp8 attention), so 'avoid' keeps nothing and changes nothing."""
    model = zoo.build_denoiser("flux")
    inputs = zoo.denoiser_inputs("flux", model, batch=2)
    avoid, rec = _run("flux", model, inputs, "fp8")
    allow, rec_allow = _run("flux", model, inputs, "fp8", quant_input_pass="allow")
    assert not _kept_by_input_pass(rec.report.quant)
    assert rec.report.quant["quantized"] == rec_allow.report.quant["quantized"]
    assert set(rec.report.quant["activation_quant"]["separate_passes"]) <= _CONDITIONING
    assert torch.equal(avoid, allow)


def test_fp8_attention_on_makes_sdxl_out_projections_quantised_again():
    """With fp8 attention (config.fp8_attention = 'on') the attention kernel writes its output
    quantised: the out-projections read it as is and stay fp8 under 'avoid'."""
    model = zoo.build_denoiser("sdxl")
    inputs = zoo.denoiser_inputs("sdxl", model, batch=2)
    _, rec = _run("sdxl", model, inputs, "fp8", fp8_attention="on")
    q = rec.report.quant
    assert q["attention"]["fp8"] == 16
    assert not any(".to_out." in n for n in _kept_by_input_pass(q))
    assert "lyra::attention" not in q["activation_quant"]["separate_passes"]


def test_int8_auto_allows_the_pass_and_avoid_is_honoured():
    model = zoo.build_denoiser("sdxl")
    inputs = zoo.denoiser_inputs("sdxl", model, batch=2)
    _, rec = _run("sdxl", model, inputs, "int8")
    q = rec.report.quant
    assert q["input_pass"] == "allow" and not _kept_by_input_pass(q)
    assert q["activation_quant"]["separate_passes"].get("lyra::attention", 0) > 0
    _, rec = _run("sdxl", model, inputs, "int8", quant_input_pass="avoid")
    assert rec.report.quant["input_pass"] == "avoid" and _kept_by_input_pass(rec.report.quant)


def test_producer_looks_through_views_and_names_ops():
    g = torch.fx.Graph()
    x = g.placeholder("x")
    gn = g.call_function(torch.ops.lyra.group_norm.default, (x, 2, None, None, 1e-5, "none", True))
    p = g.call_method("permute", (gn, 0, 2, 3, 1))
    r = g.call_method("reshape", (p, 2, -1, 8))
    s = g.call_function(torch.nn.functional.silu, (r,))
    assert input_pass.producer(r) is gn and input_pass.describe(gn) == "lyra::group_norm"
    assert input_pass.producer(s) is s and input_pass.describe(s) == "silu"
    assert input_pass.describe(input_pass.producer(g.call_method("view", (x, -1)))) == "graph input"


def test_bad_policy_is_named():
    with pytest.raises(lyradynamo.config.LyraConfigError, match="quant_input_pass"):
        lyradynamo.config.quant_input_pass = "sometimes"
