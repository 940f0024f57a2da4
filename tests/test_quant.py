"""config.quant = fp8 / int8 on the CPU (the reference path of lyra::qlinear): the rewrite,
per-layer decisions in the dump, quality, weight refresh after in-place patches, SmoothQuant."""
import pytest
import torch

import lyradynamo
from lyradynamo import zoo
from lyradynamo.quant import calibration, numerics
from helpers import flux_lora, lora_round_trip, quantised_linear_ops, quantised_weights, rel_err, reported_weights

lyra = torch.ops.lyra
g = torch.Generator().manual_seed(7)


def rnd(*shape):
    return torch.randn(*shape, generator=g)


@pytest.fixture(autouse=True)
def _restore_config():
    with lyradynamo.config.patch(**lyradynamo.config.snapshot()):  # undone when the test ends
        yield


def _compile(model, kind, **cfg):
    """Options are read when the graph compiles (the first call): set them for the test."""
    lyradynamo.config.quant = kind
    for k, v in cfg.items():
        setattr(lyradynamo.config, k, v)
    return torch.compile(model, backend="lyra")


def _linears(model):
    return {n + ".weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


@pytest.mark.parametrize("kind,min_db", [("fp8", 25.0), ("int8", 20.0)])
@pytest.mark.parametrize("name", ["flux", "sdxl"])
def test_quantized_model_quality_layers_and_one_compile(name, kind, min_db):
    model = zoo.build_denoiser(name)
    shapes = [dict(batch=2), dict(batch=1, height=48, width=80)]
    with torch.no_grad():
        refs = [model(**zoo.denoiser_inputs(name, model, **s))[0] for s in shapes]
        compiled = _compile(model, kind)
        outs = [compiled(**zoo.denoiser_inputs(name, model, **shapes[0]))[0]]
        torch.compiler.set_stance("fail_on_recompile")
        try:
            outs.append(compiled(**zoo.denoiser_inputs(name, model, **shapes[1]))[0])
        finally:
            torch.compiler.set_stance("default")
    assert lyradynamo.compile_count() == 1
    for out, ref in zip(outs, refs):
        db = numerics.sqnr_db(ref, out)
        assert min_db <= db < 120, db  # quantised: close, but not the unquantised result
    assert not lyradynamo.compiled_graphs()[0].summary["errors"]
    q = lyradynamo.compiled_graphs()[0].summary["quant"]
    assert q["kind"] == kind and q["quantized"]
    assert reported_weights(q["quantized"]) | reported_weights(q["kept"]) == _linears(model)
    assert all("config.quant_exclude" in why or "not a multiple" in why or "quant_input_pass" in why
               for why in q["kept"].values()), q["kept"]
    hist = lyradynamo.compiled_graphs()[0].summary["op_histogram"]
    assert quantised_linear_ops(lyradynamo.compiled_graphs()[0].summary) == len(q["quantized"])
    if name == "flux":  # the adaLN norms feeding q/k/v (and the single blocks' MLP) quantise
        assert q["activation_quant"]["fused_into_norm"] >= 1 and hist.get("lyra::adaln_quant", 0) >= 1


def test_gpu_master_option_quantises_and_keeps_parameters():
    """quant_master="gpu": the same rewrite, Parameters untouched (the H100 run caught this
    path failing: quantisation raised and the graph silently stayed unquantised)."""
    model = zoo.build_denoiser("flux")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        _compile(model, "fp8", quant_master="gpu")(**zoo.denoiser_inputs("flux", model))
    s = lyradynamo.compiled_graphs()[0].summary
    assert not s["errors"], s["errors"]
    assert s["quant"]["quantized"] and s["quant"]["master"] == "gpu"
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_exclude_pattern_keeps_layers_in_high_precision():
    model = zoo.build_denoiser("flux")
    with torch.no_grad():
        _compile(model, "fp8", quant_exclude=(r"\.ff\.",))(**zoo.denoiser_inputs("flux", model))
    q = lyradynamo.compiled_graphs()[0].summary["quant"]
    assert any(".ff." in k for k in q["kept"]) and not any(".ff." in k for k in q["quantized"])
    assert any(k.startswith("x_embedder") for k in q["quantized"])  # default exclusions replaced


def test_patched_weight_is_requantized_without_recompile():
    model = zoo.build_denoiser("flux")
    inputs = zoo.denoiser_inputs("flux", model)
    compiled = _compile(model, "fp8")
    with torch.no_grad():
        before = compiled(**inputs)[0]
        torch.compiler.set_stance("fail_on_recompile")
        try:
            w = model.transformer_blocks[0].attn.to_q.weight
            lyradynamo.quant.master_weight(w).add_(0.5 * rnd(*w.shape))
            after = compiled(**inputs)[0]
        finally:
            torch.compiler.set_stance("default")
        torch._dynamo.reset()
        fresh = _compile(model, "fp8")(**inputs)[0]  # quantised from the patched weights
    assert rel_err(after, before) > 1e-4
    torch.testing.assert_close(after, fresh, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["fp8", "int8"])
@pytest.mark.parametrize("act,glu,with_gate,with_res", [("none", False, False, False), ("gelu_tanh", False, True, True),
                                                         ("gelu", True, False, False), ("silu", False, False, True)])
def test_qlinear_op(kind, act, glu, with_gate, with_res):
    x, w, b = rnd(3, 5, 32), rnd(48, 32), rnd(48)
    n = 24 if glu else 48
    gate = rnd(3, 1, n) if with_gate else None
    res = rnd(3, 5, n) if with_res else None
    wq, ws = numerics.quantize_rows(w, kind)
    args = (x, wq, ws, b, act, glu, gate, res, kind, None)
    # test_schema compares fp8 tensors with ops the CPU lacks for float8; the rest run for both
    utils = ("test_faketensor", "test_aot_dispatch_dynamic") if kind == "fp8" else None
    torch.library.opcheck(lyra.qlinear.default, args, **({"test_utils": utils} if utils else {}))
    out = lyra.qlinear(*args)
    exact = lyra.linear(x, w, b, act, glu, gate, res)
    assert numerics.sqnr_db(exact, out) > (20 if kind == "fp8" else 30)
    # emulation: dequantised operands through the float op give the same numbers
    xq, xs = numerics.quantize_rows(x, kind)
    emu = lyra.linear(numerics.dequantize_rows(xq, xs), numerics.dequantize_rows(wq, ws), b, act, glu, gate, res)
    torch.testing.assert_close(out, emu, rtol=1e-5, atol=1e-5)


def test_smoothquant_calibration_helps_an_outlier_channel():
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 32))
    with torch.no_grad():
        model[0].weight.mul_(0.1)
        model[0].bias.zero_()
        model[0].bias[3] = 300.0  # one activation channel of the second linear is an outlier
    x = rnd(16, 64)
    with torch.no_grad():
        ref = model(x)
        plain = _compile(model, "int8")(x)
        torch._dynamo.reset()
        assert lyradynamo.quant.calibrate(model, [{"input": x}]) == 2
        smooth = _compile(model, "int8")(x)
    assert calibration.smooth_of(model[1].weight) is not None
    assert numerics.sqnr_db(ref, smooth) > numerics.sqnr_db(ref, plain) + 3
    calibration.clear()


def test_bad_quant_options_are_named():
    with pytest.raises(lyradynamo.config.LyraConfigError, match="quant_master"):
        lyradynamo.config.quant_master = "disk"
    with pytest.raises(ValueError, match="alpha"):
        lyradynamo.quant.calibrate(torch.nn.Linear(4, 4), {"input": torch.randn(2, 4)}, alpha=2.0)


# ---- LoRA switching on a quantised model ----------------------------------------------------


def test_lora_switch_a_b_a_is_bit_identical_in_fp8():
    """fp8: LoRA A, then A -> B -> A (unload / load / set_loras) on the compiled tiny FLUX: every switch
    re-quantises the touched weights (refresh path), nothing recompiles, and A after the round trip
    gives exactly A's output and quantised weights; unloading everything gives the base output back."""
    pytest.importorskip("peft")
    model = zoo.build_denoiser("flux")
    lora_a, lora_b = flux_lora(model, seed=11), flux_lora(model, seed=12, r=2, alpha=1)
    inputs = zoo.denoiser_inputs("flux", model, batch=2)
    compiled = _compile(model, "fp8")
    r = lora_round_trip(compiled, model, inputs, lora_a, lora_b)
    assert r["q0"], "no quantised weight entries"
    assert lyradynamo.compile_count() == 1
    assert rel_err(r["out_a"], r["out0"]) > 1e-3 and rel_err(r["out_b"], r["out_a"]) > 1e-3  # the LoRAs did something
    changed = [n for n in r["q0"] if not torch.equal(r["q0"][n], r["q_a"][n])]
    assert any(".to_q." in n for n in changed) and any("norm1.linear" in n for n in changed), changed
    assert torch.equal(r["out_a2"], r["out_a"])
    assert all(torch.equal(r["q_a2"][n], r["q_a"][n]) for n in r["q_a"])
    assert torch.equal(r["out_unloaded"], r["out0"]) and torch.equal(r["out_end"], r["out0"])
    assert all(torch.equal(quantised_weights(model)[n], r["q0"][n]) for n in r["q0"])


@pytest.mark.parametrize("name", ["flux", "sdxl"])
@pytest.mark.parametrize("kind", ["fp8", "int8"])
def test_activated_outputs_leave_quantised_from_their_producer(name, kind, monkeypatch):
    """GELU / GEGLU linears read only by quantised linears hand them a quantised output
    (lyra::qlinear_q_qout): the same numbers as quantising it in the reader (bit-identical on
    the CPU, where both run the reference math), one pass fewer on CUDA."""
    from lyradynamo.quant import apply as quant_apply

    model = zoo.build_denoiser(name)
    inputs = zoo.denoiser_inputs(name, model, batch=2)

    def run():
        torch._dynamo.reset()
        lyradynamo.reset_stats()
        with lyradynamo.config.patch(quant=kind, quant_master="gpu"), torch.no_grad():
            out = torch.compile(model, backend="lyra")(**inputs, return_dict=False)[0]
        return out, lyradynamo.compiled_graphs()[0]

    fused, rec = run()
    n = rec.report.quant["activation_quant"]["fused_into_producer"]
    assert n > 0 and rec.summary["op_histogram"].get("lyra::qlinear_q_qout") == n
    monkeypatch.setattr(quant_apply, "_quantise_activated_outputs", lambda gm, kind: 0)
    plain, rec = run()
    assert "lyra::qlinear_q_qout" not in rec.summary["op_histogram"]
    assert torch.equal(fused, plain)


def test_float32_linears_of_a_16_bit_model_stay_in_high_precision():
    """Wan loaded as from_pretrained(torch_dtype=bf16) keeps its time embedder in float32: its
    two linears run float32 activations, which the quantised GEMMs do not take (on CUDA they
    ran the PyTorch reference, logged as fallbacks). They are kept, with the reason; the bf16
    linears are quantised, and an all-float32 model still quantises (the tests above)."""
    import more_models

    if not more_models.available("wan"):
        pytest.skip("this diffusers has no WanTransformer3DModel")
    model = more_models.keep_in_fp32(more_models.build("wan", dtype=torch.bfloat16))
    kwargs = more_models.inputs("wan", 2, 16, 16, 7, dtype=torch.bfloat16)
    torch._dynamo.reset()
    lyradynamo.reset_stats()
    with lyradynamo.config.patch(quant="fp8", quant_master="gpu"), torch.no_grad():
        more_models.call_compiled(torch.compile(model, backend="lyra"), kwargs, recompile_is_error=False)
    quant = max(lyradynamo.compiled_graphs(), key=lambda r: r.summary["nodes"]).report.quant
    kept = {k for k, why in quant["kept"].items() if "float32 in a 16-bit model" in why}
    assert kept == {f"condition_embedder.time_embedder.linear_{i}.weight" for i in (1, 2)}, quant["kept"]
    assert len(quant["quantized"]) > 10
