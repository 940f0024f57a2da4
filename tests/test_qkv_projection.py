"""lyra::qkv_projection and passes/qkv_projection.py: FLUX-style attention's q / k / v linears,
q / k RMSNorm, RoPE and the joint cat as one op (one GEMM per part on Hopper); on the CPU the
rewritten graph gives bit for bit what the graph without it gives (lyra::linear_group +
lyra::qk_norm_rope3)."""
import pytest
import torch

import lyradynamo
from helpers import flux_heads
from helpers import run_flux as _run
from lyradynamo import config
from lyradynamo.ops.qkv_projection import qkv_projection_reference
from lyradynamo.ops.rope import qk_norm_rope_reference

lyra = torch.ops.lyra


def _flux(head_dim=128, dtype=torch.bfloat16):
    return flux_heads(head_dim=head_dim, dtype=dtype)



def _rope_hits():
    (rec,) = lyradynamo.compiled_graphs()
    return rec.report.matched.get("rope", {})


def _compiled(model, **options):
    torch._dynamo.reset()
    lyradynamo.reset_stats()
    with config.patch(**options):
        return _run(torch.compile(model, backend="lyra"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_flux_attention_becomes_one_op_per_attention_and_stays_bitwise(dtype):
    model = _flux(dtype=dtype)
    without = _compiled(model, qkv_projection=False)
    out = _compiled(model)
    hits = _rope_hits()
    assert hits.get("q/k/v projections + q/k norm + rope into one buffer (2 part(s))") == 1  # double block
    assert hits.get("q/k/v projections + q/k norm + rope into one buffer (1 part(s))") == 1  # single block
    assert torch.equal(out, without)
    ref = _run(model)  # eager: the same up to the rounding of other rewrites (bf16: a few ulp)
    assert (out.float() - ref.float()).abs().max() <= (0.02 if dtype == torch.bfloat16 else 1e-5)


@pytest.mark.parametrize("why", ["config", "head_dim"])
def test_not_rewritten_when_off_or_head_dim_is_not_128(why):
    model = _flux(head_dim=64) if why == "head_dim" else _flux()
    _compiled(model, qkv_projection=why != "config")
    assert not any("into one buffer" in label for label in _rope_hits())
    assert any("in one pass" in label for label in _rope_hits())  # the q / k norm + rope pass instead


def test_in_place_weight_patch_is_seen():
    """The op reads the (joined) Parameters themselves: a LoRA-style in-place patch of to_q shows."""
    model = _flux()
    compiled = torch.compile(model, backend="lyra")
    _run(compiled)
    assert any("into one buffer" in label for label in _rope_hits())
    without = torch.compile(_flux(), backend="lyra")  # the same weights, patched alike
    with torch.no_grad():
        for mod in (model, without._orig_mod):
            mod.transformer_blocks[0].attn.to_q.weight.mul_(1.5)
            mod.single_transformer_blocks[0].attn.to_k.bias.add_(0.25)
    with config.patch(qkv_projection=False):
        ref = _run(without, seed=1)
    assert torch.equal(_run(compiled, seed=1), ref)
    assert not torch.equal(ref, _run(_flux(), seed=1))  # the patch changed the output


def _random_call(parts=(5, 11), heads=2, d=128, k=24, batch=2, bias=True, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, dt=dtype):
        return torch.randn(*shape, generator=g).to(dt)

    xs = [r(batch, n, k) for n in parts]
    weights = [r(heads * d, k) * 0.2 for _ in parts for _ in range(3)]
    biases = [r(heads * d) for _ in parts for _ in range(3)] if bias else []
    q_norms, k_norms = [r(d) for _ in parts], [r(d) for _ in parts]
    length = sum(parts)
    cos, sin = r(length, d, dt=torch.float32), r(length, d, dt=torch.float32)
    return xs, weights, biases, q_norms, k_norms, heads, 1e-6, cos, sin


@pytest.mark.parametrize("bias", [True, False])
def test_op_is_the_eager_composition(bias):
    args = _random_call(bias=bias)
    xs, weights, biases, q_norms, k_norms, heads, eps, cos, sin = args
    out = lyra.qkv_projection(*args)
    assert out.shape == (2, 16, 3 * heads * 128)
    lin = [torch.nn.functional.linear(x, w, biases[3 * i + j] if bias else None)
           for i, x in enumerate(xs) for j, w in enumerate(weights[3 * i:3 * i + 3])]
    q = qk_norm_rope_reference([lin[0].unflatten(-1, (heads, -1)), lin[3].unflatten(-1, (heads, -1))], q_norms,
                               "rms", eps, cos, sin)
    k = qk_norm_rope_reference([lin[1].unflatten(-1, (heads, -1)), lin[4].unflatten(-1, (heads, -1))], k_norms,
                               "rms", eps, cos, sin)
    v = torch.cat([lin[2], lin[5]], dim=1)
    assert torch.equal(out, torch.cat([q.flatten(2), k.flatten(2), v], dim=-1))
    assert torch.equal(out, qkv_projection_reference(*args))


@pytest.mark.parametrize("change, message", [
    (lambda a: (a[0], a[1][:-1], *a[2:]), "3 weights"),
    (lambda a: (a[0], a[1], a[2][:-1], *a[3:]), "3 biases"),
    (lambda a: (*a[:3], a[3][:1], *a[4:]), "one q and one k"),
    (lambda a: (*a[:5], 3, *a[6:]), "does not divide"),
    (lambda a: ([a[0][0], a[0][1][:1]], *a[1:]), "one B"),
])
def test_bad_arguments_name_the_problem(change, message):
    with pytest.raises(ValueError, match=message):
        lyra.qkv_projection(*change(_random_call()))


def test_lora_switches_match_the_graph_without_the_rewrite():
    """lyradynamo.lora on the joined q / k / v weights the op reads (load, unload, switch A -> B
    -> A, unload all, no recompilation): every state bit for bit as the same model compiled
    without the rewrite, and the LoRA visibly changes the output."""
    from helpers import flux_lora, lora_round_trip
    from lyradynamo import zoo

    template = _flux(dtype=torch.float32)
    lora_a, lora_b = flux_lora(template, seed=1), flux_lora(template, seed=2)
    states = {}
    for on in (True, False):
        torch._dynamo.reset()
        lyradynamo.reset_stats()
        model = _flux(dtype=torch.float32)
        inputs = zoo.denoiser_inputs("flux", model, batch=1, height=32, width=32, seed=0)
        with config.patch(qkv_projection=on):
            compiled = torch.compile(model, backend="lyra")
            states[on] = lora_round_trip(compiled, model, inputs, lora_a, lora_b)
        assert any("into one buffer" in label for label in _rope_hits()) == on
        assert lyradynamo.compile_count() == 1
    for key in ("out0", "out_a", "out_unloaded", "out_b", "out_a2", "out_end"):
        assert torch.equal(states[True][key], states[False][key]), key
    assert not torch.equal(states[True]["out_a"], states[True]["out0"])
    assert torch.equal(states[True]["out_end"], states[True]["out0"])


def _three_calls(on: bool, shapes) -> list:
    from lyradynamo import zoo

    torch._dynamo.reset()
    lyradynamo.reset_stats()
    model = _flux(dtype=torch.float32)
    compiled = torch.compile(model, backend="lyra")
    with config.patch(qkv_projection=on), torch.no_grad():
        outs = [compiled(**zoo.denoiser_inputs("flux", model, batch=b, height=hw, width=hw, seed=3))[0]
                for b, hw in shapes]
    assert lyradynamo.compile_count() == 1
    return outs


def test_batch_sizes_and_a_new_size_without_recompiling():
    """One compilation serves batch 2, batch 1 and another image size; outputs as without the
    rewrite (the op's parts and batch strides)."""
    shapes = ((2, 64), (1, 64), (4, 96))
    for got, want in zip(_three_calls(True, shapes), _three_calls(False, shapes)):
        assert torch.equal(got, want)


@pytest.mark.parametrize("on", [True, False])
def test_batch_one_first_then_batch_two(on):
    """Compiled at batch 1, FLUX serves batch 2 without recompiling (diffusers'
    FluxAttnProcessor calls .contiguous() on a split of the joint attention output, whose
    contiguity depends on B == 1: shape_policy traces it without that guard)."""
    from lyradynamo import zoo

    shapes = ((1, 32), (2, 32), (1, 48))
    outs = _three_calls(on, shapes)
    model = _flux(dtype=torch.float32)
    with torch.no_grad():
        for got, (b, hw) in zip(outs, shapes):
            want = model(**zoo.denoiser_inputs("flux", model, batch=b, height=hw, width=hw, seed=3))[0]
            assert got.shape[0] == b
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
