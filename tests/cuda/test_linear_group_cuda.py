"""lyra::linear_group / lyra::qlinear_q_group on CUDA: one GEMM over adjacent weights, checked
against the per-weight reference on fresh random inputs (odd sizes included); weights that are
not adjacent take the logged per-weight path and stay right; whole tiny models run their
joined projections with no fallback, see in-place patches in CUDA-graph replays, and keep
working when a joined Parameter is replaced."""
import pytest
import torch
import torch.nn.functional as F

import lyradynamo
from lyradynamo import config, zoo
from lyradynamo.ops import _common
from lyradynamo.ops.linear_group import joined
from lyradynamo.quant import numerics
from helpers import rel_err as err

pytestmark = pytest.mark.cuda
lyra = torch.ops.lyra
DT = [torch.float16, torch.bfloat16]



def _adjacent(parts):
    """Copies of `parts` as adjacent rows of one buffer (what the pass makes of Parameters)."""
    buf = torch.cat(parts, 0)
    out, off = [], 0
    for p in parts:
        out.append(buf[off:off + p.shape[0]])
        off += p.shape[0]
    assert joined(out) is not None
    return out


@pytest.mark.parametrize("dtype", DT)
@pytest.mark.parametrize("widths", [[64, 64, 64], [320, 320, 320], [128, 40, 200], [1280, 1280]])
@pytest.mark.parametrize("act,bias", [("none", True), ("none", False), ("gelu_tanh", True), ("silu", True)])
@pytest.mark.parametrize("lead", [(2, 77), (1, 1), (3, 333)])
def test_linear_group_matches_reference(dtype, widths, act, bias, lead, seed_from_test_id):
    k = 96 if widths[0] != 1280 else 1280
    x32 = torch.randn(*lead, k, device="cuda")
    w32 = [torch.randn(n, k, device="cuda") / k ** 0.5 for n in widths]
    b32 = [torch.randn(n, device="cuda") for n in widths] if bias else []
    ref = torch.cat([lyradynamo.ops.linear.activate(F.linear(x32, w, b), act)
                     for w, b in zip(w32, b32 or [None] * len(w32))], -1)
    ws = _adjacent([w.to(dtype) for w in w32])
    bs = _adjacent([b.to(dtype) for b in b32]) if bias else []
    x = x32.to(dtype)
    _common.reset_fallback_counts()
    out = lyra.linear_group(x, ws, bs, act)
    assert _common.fallback_counts() == {}
    eager = torch.cat([lyradynamo.ops.linear.activate(F.linear(x, w, b), act)
                       for w, b in zip(ws, bs or [None] * len(ws))], -1)
    assert out.shape == (*lead, sum(widths)) and out.dtype == dtype
    assert err(out, ref) <= 2 * err(eager, ref) + 1e-6, (err(out, ref), err(eager, ref))


def test_linear_group_not_adjacent_is_logged_and_right(seed_from_test_id):
    x = torch.randn(5, 33, 64, device="cuda", dtype=torch.bfloat16)
    ws = [torch.randn(64, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3)]  # 3 allocations
    bs = [torch.randn(64, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
    _common.reset_fallback_counts()
    out = lyra.linear_group(x, ws, bs, "none")
    (key,) = _common.fallback_counts()
    assert key[0] == "linear_group" and "not adjacent" in key[1]
    ref = torch.cat([F.linear(x, w, b) for w, b in zip(ws, bs)], -1)
    assert err(out, ref) < 1e-2


@pytest.mark.parametrize("widths", [[640, 640, 640], [320, 320, 320], [128, 48, 208]])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("m", [1, 77, 4099])
def test_qlinear_q_group_matches_per_weight_quantised_linears(widths, bias, m, seed_from_test_id):
    k = 640
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    xq, xs = numerics.quantize_rows(x, "fp8")
    qs = [numerics.quantize_rows(torch.randn(n, k, device="cuda") / k ** 0.5, "fp8") for n in widths]
    qw = _adjacent([q for q, _ in qs])
    sc = _adjacent([s for _, s in qs])
    bs = _adjacent([torch.randn(n, device="cuda", dtype=torch.bfloat16) for n in widths]) if bias else []
    _common.reset_fallback_counts()
    out = lyra.qlinear_q_group(xq, xs, qw, sc, bs, "none", "fp8", torch.bfloat16)
    assert _common.fallback_counts() == {}
    parts = [lyra.qlinear_q(xq, xs, w, s, b, "none", False, None, None, "fp8", torch.bfloat16)
             for w, s, b in zip(qw, sc, bs or [None] * len(qw))]
    ref = torch.cat([numerics.quantized_linear_reference(xq, xs, w, s, b, torch.float32)
                     for w, s, b in zip(qw, sc, bs or [None] * len(qw))], -1)
    assert out.shape == (m, sum(widths))
    assert err(out, ref) <= 2 * err(torch.cat(parts, -1), ref) + 1e-3


def _first(o):
    return o[0] if isinstance(o, (tuple, list)) else o.sample


@pytest.mark.parametrize("name,quant", [("sdxl", "none"), ("flux", "none"), ("sdxl", "fp8"), ("flux", "fp8")])
def test_tiny_model_runs_joined_projections_without_fallback(name, quant):
    dtype = torch.float16 if name == "sdxl" else torch.bfloat16
    model = zoo.build_denoiser(name, dtype=dtype, device="cuda")
    ref_model = zoo.build_denoiser(name, dtype=dtype, device="cuda")
    with config.patch(quant=quant):
        compiled = torch.compile(model, backend="lyra")
        inp = zoo.denoiser_inputs(name, model, batch=2, height=64, width=64, seed=0)
        _common.reset_fallback_counts()
        with torch.no_grad():
            out = _first(compiled(**inp))
            ref = _first(ref_model(**inp))
        assert _common.fallback_counts() == {}, _common.fallback_counts()
    (rec,) = lyradynamo.compiled_graphs()
    op = "lyra::qlinear_q_group" if quant == "fp8" else "lyra::linear_group"
    assert rec.summary["op_histogram"].get(op, 0) > 0, rec.summary["shared_input"]
    if quant == "fp8":
        assert numerics.sqnr_db(ref, out) >= 20, numerics.sqnr_db(ref, out)
    else:
        assert err(out, ref) < 0.02, err(out, ref)


def test_replay_sees_in_place_patch_and_survives_a_replaced_parameter():
    model = zoo.build_denoiser("sdxl", dtype=torch.float16, device="cuda")
    compiled = torch.compile(model, backend="lyra")
    inp = zoo.denoiser_inputs("sdxl", model, batch=2, height=64, width=64, seed=0)
    attn = model.down_blocks[1].attentions[0].transformer_blocks[0].attn1
    with torch.no_grad():
        _first(compiled(**inp))
        assert joined([attn.to_q.weight, attn.to_k.weight, attn.to_v.weight]) is not None
        attn.to_v.weight.mul_(-2.0)  # in place: lands in the joined buffer, seen by the replay
        out = _first(compiled(**inp))
        assert err(out, _first(model(**inp))) < 0.02
        attn.to_k.weight.data = attn.to_k.weight.data.clone() * 0.5  # replaced: not adjacent now
        _common.reset_fallback_counts()
        with torch.compiler.set_stance("fail_on_recompile"):
            out = _first(compiled(**inp))
        assert any(op == "linear_group" for op, _ in _common.fallback_counts())
        assert err(out, _first(model(**inp))) < 0.02
    assert lyradynamo.compile_count() == 1
