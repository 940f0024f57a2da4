"""FP8 attention (config.quant = fp8) on the CPU: the reference math of the three ops (scales,
quantised q / k / v, attention with an e4m3 output), the graph rewrite on FLUX / SDXL, and its
options and refusals. tests/cuda/test_attention_fp8_cuda.py checks the kernels and cuDNN."""
import math

import pytest
import torch

import lyradynamo
from lyradynamo import dump, zoo
from lyradynamo.ops import attention_fp8 as fa
from lyradynamo.ops.rope import qk_norm_rope_reference
from lyradynamo.quant import numerics

lyra = torch.ops.lyra
g = torch.Generator().manual_seed(11)


def rnd(*shape, scale=1.0):
    return torch.randn(*shape, generator=g) * scale


@pytest.fixture(autouse=True)
def _restore_config():
    with lyradynamo.config.patch(**lyradynamo.config.snapshot()):
        yield


def _rope_tables(length, d):
    ang = rnd(length, d // 2)
    return ang.cos().repeat_interleave(2, -1).contiguous(), ang.sin().repeat_interleave(2, -1).contiguous()


def test_rms_weight_bound_covers_normed_rotated_values():
    """|rope(rms_norm(x) * w)| <= sqrt(D) max|w|: the weight bound never saturates, even for a
    head vector with all its energy in one element."""
    d, parts = 64, [rnd(2, 5, 3, 64, scale=4), rnd(2, 7, 3, 64)]
    parts[0][0, 0, 0] = 0
    parts[0][0, 0, 0, 9] = 100.0  # one spike: |x_i| / rms(x) = sqrt(D)
    ws = [(1 + 0.3 * rnd(d)).clamp(-1.9, 1.9), (1 + 0.3 * rnd(d)).clamp(-1.9, 1.9)]
    ws[0][9] = 2.0  # the largest weight meets the spike
    cos, sin = _rope_tables(12, d)
    y = qk_norm_rope_reference(parts, ws, "rms", 1e-6, cos, sin)
    s = lyra.attention_fp8_scales([], [], [parts[0]], ws, ws)
    bound = max(w.abs().max().item() for w in ws) * math.sqrt(d)
    assert y.abs().max() <= bound * (1 + 2 ** -7)
    assert y.abs().max() >= 0.7 * bound  # and tight for it (RoPE shares it within its pair)
    assert s[0].item() == pytest.approx(bound / 448, rel=1e-6) and s[4].item() == s[0].item()
    assert s[8].item() == pytest.approx(parts[0].abs().max().item() / 448, rel=1e-6)
    assert s[12].item() == pytest.approx(1 / 448) and s[16].item() == 448
    assert torch.equal(s[24:27], torch.reciprocal(s[0:12:4])) and s[20] == s[26]
    assert torch.equal(s[27:], torch.zeros(5))


def test_scales_amax_over_parts_and_nan():
    q, k, v = rnd(1, 4, 2, 32), rnd(1, 4, 2, 32, scale=3), [rnd(1, 3, 2, 32), rnd(1, 6, 2, 32, scale=7)]
    s = lyra.attention_fp8_scales([q], [k], v, [], [])
    for slot, t in ((0, q), (4, k), (8, torch.cat(v, 1))):
        assert s[slot] == (t.abs().max() / 448).float()
    v[1][0, 0, 0, 0] = float("nan")
    assert torch.isnan(lyra.attention_fp8_scales([q], [k], v, [], [])[8])


def test_qkv_quant_is_quantised_qk_norm_rope():
    d = 32
    parts, ws = [rnd(2, 3, 4, d), rnd(2, 9, 4, d, scale=2)], [1 + 0.1 * rnd(d), 1 + 0.1 * rnd(d)]
    cos, sin = _rope_tables(12, d)
    s = lyra.attention_fp8_scales([], [], parts, ws, ws)
    q8 = lyra.qkv_quant(parts, ws, "rms", 1e-6, cos, sin, s, 0)
    y = qk_norm_rope_reference(parts, ws, "rms", 1e-6, cos, sin)
    assert q8.dtype == torch.float8_e4m3fn and q8.shape == y.shape
    assert torch.equal(q8.view(torch.int8), numerics.to_e4m3(y.float() * s[24]).view(torch.int8))
    v8 = lyra.qkv_quant(parts, [], "none", 0.0, None, None, s, 2)  # v: the cat, quantised
    q3, k3, v3 = lyra.qkv_quant3(parts, parts, parts, ws, ws, "rms", 1e-6, cos, sin, s)
    assert torch.equal(q3.view(torch.int8), q8.view(torch.int8)) and torch.equal(v3.view(torch.int8), v8.view(torch.int8))
    assert torch.equal(k3.view(torch.int8), lyra.qkv_quant(parts, ws, "rms", 1e-6, cos, sin, s, 1).view(torch.int8))
    assert torch.equal(v8.view(torch.int8), numerics.to_e4m3(torch.cat(parts, 1) * s[26]).view(torch.int8))
    assert numerics.sqnr_db(torch.cat(parts, 1), v8.float() * s[8]) > 25


@pytest.mark.parametrize("lq,lk,causal", [(40, 40, False), (33, 7, False), (24, 24, True)])
def test_attention_fp8_reference_is_close_and_scaled_by_v(lq, lk, causal):
    q, k, v = rnd(2, lq, 3, 64), rnd(2, lk, 3, 64), rnd(2, lk, 3, 64, scale=2)
    s = lyra.attention_fp8_scales([q], [k], [v], [], [])
    q8, k8, v8 = (lyra.qkv_quant([t], [], "none", 0.0, None, None, s, i) for i, t in enumerate((q, k, v)))
    o8, o_scale = lyra.attention_fp8(q8, k8, v8, s, None, causal)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal).transpose(1, 2)
    assert o8.dtype == torch.float8_e4m3fn and o8.shape == q.shape and o8.is_contiguous()
    assert o_scale.shape == (2, lq) and torch.all(o_scale == s[8])
    assert numerics.sqnr_db(ref, o8.float() * o_scale[..., None, None]) > 25


def test_bad_inputs_are_named():
    x = rnd(1, 4, 2, 16)
    with pytest.raises(ValueError, match="k needs either parts or RMSNorm weights"):
        lyra.attention_fp8_scales([x], [], [x], [], [])
    s = lyra.attention_fp8_scales([x], [x], [x], [], [])
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        lyra.attention_fp8(x, x, x, s, None, False)
    with pytest.raises(ValueError, match="which=3"):
        lyra.qkv_quant([x], [], "none", 0.0, None, None, s, 3)
    with pytest.raises(ValueError, match="scales must be float32"):
        lyra.qkv_quant([x], [], "none", 0.0, None, None, s[:8], 0)


def _compile_run(name, model, inputs, **cfg):
    torch._dynamo.reset()
    lyradynamo.reset_stats()
    with lyradynamo.config.patch(quant="fp8", quant_master="gpu", **cfg), torch.no_grad():
        out = torch.compile(model, backend="lyra")(**inputs, return_dict=False)[0]
    rec = lyradynamo.compiled_graphs()[0]
    return out, rec.report.quant["attention"], rec.summary["op_histogram"]


@pytest.mark.parametrize("name,n_attn,mode", [("flux", 2, "auto"), ("sdxl", 16, "on")])
def test_rewrite_quantises_attention_read_by_quantised_linears(name, n_attn, mode):
    model = zoo.build_denoiser(name)
    inputs = zoo.denoiser_inputs(name, model, batch=2)
    with torch.no_grad():
        ref = model(**inputs, return_dict=False)[0]
    out, att, hist = _compile_run(name, model, inputs, fp8_attention=mode)
    assert att["fp8"] == n_attn and not att["kept"], att
    assert hist.get("lyra::attention_fp8") == n_attn and "lyra::attention" not in hist
    assert numerics.sqnr_db(ref, out) > 25
    if name == "flux":  # q / k norms + RoPE and v's cat: one quantising pass, no bf16 copy left
        assert hist.get("lyra::qkv_quant3") == n_attn and "lyra::qk_norm_rope" not in hist
    else:  # q / k / v each scaled by its amax
        assert hist.get("lyra::qkv_quant3") == n_attn
        _, att_auto, _ = _compile_run(name, model, inputs)
        assert att_auto["fp8"] == 0 and all("not RMS-normalised" in why for why in att_auto["kept"].values())
        assert all("not long and wide enough" in why for why in att_auto["kept"].values())
        text = dump.format_summary(lyradynamo.compiled_graphs()[0].summary)
        assert f"attention in fp8 (its output quantised by the kernel): 0; left in 16-bit: {n_attn}" in text
        assert f"attention x{n_attn}: q / k are not RMS-normalised" in text
    off, att_off, hist_off = _compile_run(name, model, inputs, fp8_attention="off")
    assert att_off["fp8"] == 0 and set(att_off["kept"].values()) == {"config.fp8_attention = 'off'"}
    assert hist_off.get("lyra::attention") == n_attn and "lyra::attention_fp8" not in hist_off
    assert numerics.sqnr_db(ref, off) > 25 and not torch.equal(out, off)


def _fp8_against_off(model, kwargs, mode: str):
    """model compiled with quant fp8 and fp8_attention = mode, then "off": the record of the
    largest graph under mode, and whether the output under mode is as close to eager as with
    16-bit attention (SQNR within 3 dB)."""
    import more_models

    with torch.no_grad():
        ref = more_models.first_output(model(**kwargs))
    outs, recs = {}, {}
    for fa in (mode, "off"):
        torch._dynamo.reset()
        lyradynamo.reset_stats()
        with lyradynamo.config.patch(quant="fp8", quant_master="gpu", fp8_attention=fa), torch.no_grad():
            outs[fa] = more_models.call_compiled(torch.compile(model, backend="lyra"), kwargs,
                                                 recompile_is_error=False)
        recs[fa] = max(lyradynamo.compiled_graphs(), key=lambda r: r.summary["nodes"])
    return recs[mode], numerics.sqnr_db(ref, outs[mode]) > numerics.sqnr_db(ref, outs["off"]) - 3


def test_joint_attention_sliced_per_stream_runs_in_fp8():
    """Qwen-Image slices its joint attention's output per stream with three-slice indexing
    (`o[:, :txt_len, :]`, `o[:, txt_len:, :]`) before the two out-projections; its q / k come
    from its complex RoPE with the RMSNorm folded in. Both attentions run in fp8, every linear
    but the excluded ones is quantised, and the output is as close to eager as with 16-bit
    attention."""
    import more_models

    if not more_models.available("qwenimage"):
        pytest.skip("this diffusers has no QwenImageTransformer2DModel")
    model = more_models.build("qwenimage", dtype=torch.bfloat16)
    kwargs = more_models.inputs("qwenimage", 2, 16, 16, 7, dtype=torch.bfloat16)
    kwargs.pop("encoder_hidden_states_mask")  # the pipeline drops an all-ones mask
    rec, as_close = _fp8_against_off(model, kwargs, "auto")
    quant = rec.report.quant
    assert quant["attention"] == {"fp8": 2, "kept": {}}, quant["attention"]
    assert not any("attn.to" in k for k in quant["kept"]), quant["kept"]
    assert as_close


def test_a_cast_to_the_outputs_own_dtype_is_dropped_from_the_fp8_chain():
    """Wan writes `o.flatten(2, 3).type_as(query)` (bf16 to bf16) before its out-projection:
    with fp8_attention = 'on' (its q / k are normalised across heads, so auto keeps them) the
    cast is dropped from the view chain rather than replayed on the e4m3 output, every
    attention runs in fp8, and Wan's RoPE still fuses."""
    import more_models

    if not more_models.available("wan"):
        pytest.skip("this diffusers has no WanTransformer3DModel")
    model = more_models.keep_in_fp32(more_models.build("wan", dtype=torch.bfloat16))
    kwargs = more_models.inputs("wan", 2, 16, 16, 7, dtype=torch.bfloat16)
    rec, as_close = _fp8_against_off(model, kwargs, "on")
    assert rec.report.quant["attention"] == {"fp8": 4, "kept": {}}, rec.report.quant["attention"]
    assert rec.summary["matched"]["rope"] == {"rope(split pairs)": 4}
    assert as_close


def test_auto_takes_long_wide_attention_without_rms_normalised_q_k(monkeypatch):
    """fp8_attention = 'auto' also rewrites attention whose q / k are not RMS-normalised where
    it is long and wide at the traced call (head dim >= 128, >= 8192 queries and keys: Wan's
    self-attention at video sizes), and not cross-attention (a short text) nor short attention.
    Thresholds scaled down to the tiny Wan (head dim 32, 128 tokens, 7 text tokens)."""
    import more_models

    from lyradynamo.quant import attention as quant_attention

    if not more_models.available("wan"):
        pytest.skip("this diffusers has no WanTransformer3DModel")
    model = more_models.keep_in_fp32(more_models.build("wan", dtype=torch.bfloat16))
    kwargs = more_models.inputs("wan", 2, 16, 16, 7, dtype=torch.bfloat16)
    rec, _ = _fp8_against_off(model, kwargs, "auto")
    kept = rec.report.quant["attention"]["kept"]
    assert rec.report.quant["attention"]["fp8"] == 0 and len(kept) == 4
    assert all("not long and wide enough" in why for why in kept.values()), kept
    monkeypatch.setattr(quant_attention, "_WIDE_HEAD_DIM", 32)
    monkeypatch.setattr(quant_attention, "_LONG_TOKENS", 100)
    rec, as_close = _fp8_against_off(model, kwargs, "auto")
    att = rec.report.quant["attention"]
    assert att["fp8"] == 2 and len(att["kept"]) == 2, att  # the two self-attentions, not the cross
    assert all("not long and wide enough" in why for why in att["kept"].values())
    assert as_close


def test_attention_with_other_readers_stays_and_says_why(monkeypatch):
    """An output read by anything but a quantised linear (here: every linear kept in high
    precision) keeps the attention as it was, with the reason."""
    model = zoo.build_denoiser("flux")
    inputs = zoo.denoiser_inputs("flux", model, batch=1)
    _, att, hist = _compile_run("flux", model, inputs, quant_exclude=(r"to_out|to_add_out|proj_out",))
    assert att["fp8"] == 0 and len(att["kept"]) == 2
    assert all("read by" in why for why in att["kept"].values()), att
    assert hist.get("lyra::attention") == 2


def test_one_compilation_serves_new_shapes_with_fp8_attention():
    model = zoo.build_denoiser("flux")
    with lyradynamo.config.patch(quant="fp8", quant_master="gpu"), torch.no_grad():
        torch._dynamo.reset()
        lyradynamo.reset_stats()
        compiled = torch.compile(model, backend="lyra")
        compiled(**zoo.denoiser_inputs("flux", model, batch=2))
        torch.compiler.set_stance("fail_on_recompile")
        try:
            for shape in (dict(batch=3), dict(batch=1, height=48, width=80)):
                compiled(**zoo.denoiser_inputs("flux", model, **shape))
        finally:
            torch.compiler.set_stance("default")
    assert lyradynamo.compile_count() == 1
    assert lyradynamo.compiled_graphs()[0].report.quant["attention"]["fp8"] == 2


def test_high_precision_attention_gets_q_k_v_from_one_pass():
    """Without quantisation the same producers fuse: FLUX's q / k norm + RoPE and v's cat become
    one lyra::qk_norm_rope3 per attention (v left alone where it is not a cat), same numbers."""
    model = zoo.build_denoiser("flux")
    inputs = zoo.denoiser_inputs("flux", model, batch=2)
    with torch.no_grad():
        ref = model(**inputs, return_dict=False)[0]
        torch._dynamo.reset()
        lyradynamo.reset_stats()
        out = torch.compile(model, backend="lyra")(**inputs, return_dict=False)[0]
    rec = lyradynamo.compiled_graphs()[0]
    hist = rec.summary["op_histogram"]
    assert hist.get("lyra::qk_norm_rope3") == 2 and "lyra::qk_norm_rope" not in hist
    assert rec.report.matched["rope"]["q/k norm+rope + v cat in one pass"] == 1  # the joint block
    assert rec.report.matched["rope"]["q/k norm+rope in one pass"] == 1  # the single block: v is a view
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_qk_norm_rope3_reference():
    d = 32
    q, k, v = [rnd(2, 3, 4, d), rnd(2, 5, 4, d)], [rnd(2, 3, 4, d), rnd(2, 5, 4, d)], [rnd(2, 3, 4, d), rnd(2, 5, 4, d)]
    ws = [1 + 0.1 * rnd(d), 1 + 0.1 * rnd(d)]
    cos, sin = _rope_tables(8, d)
    yq, yk, yv = lyra.qk_norm_rope3(q, k, v, ws, ws, "rms", 1e-6, cos, sin)
    assert torch.equal(yq, lyra.qk_norm_rope(q, ws, "rms", 1e-6, cos, sin))
    assert torch.equal(yk, lyra.qk_norm_rope(k, ws, "rms", 1e-6, cos, sin))
    assert torch.equal(yv, torch.cat(v, 1))
    assert lyra.qk_norm_rope3(q, k, [], ws, ws, "rms", 1e-6, cos, sin)[2].numel() == 0


def test_a_rewrite_that_fails_leaves_the_graph_as_it_was(monkeypatch):
    """Every new value is worked out before the graph changes: a failure there keeps the
    high-precision attention (with the reason) and a model that runs."""
    from lyradynamo.quant import attention as quant_attention

    def broken(*args, **kwargs):
        raise RuntimeError("no fake value today")

    monkeypatch.setattr(quant_attention, "_fake", broken)
    model = zoo.build_denoiser("flux")
    inputs = zoo.denoiser_inputs("flux", model, batch=2)
    out, att, hist = _compile_run("flux", model, inputs)
    assert att["fp8"] == 0 and all("the rewrite failed (no fake value today)" in why for why in att["kept"].values())
    assert hist.get("lyra::attention") == 2 and "lyra::attention_fp8" not in hist
    with torch.no_grad():
        ref = model(**inputs, return_dict=False)[0]
    assert numerics.sqnr_db(ref, out) > 25
