"""Every tiny zoo model under backend="lyra": matches eager (fp32, rel. error < 1e-5),
rewrites 100% of its anchor ops (or names why not), and compiles ONCE for a matrix of
batch sizes (incl. 1), square and non-square resolutions and prompt lengths."""
import pytest
import torch

import lyradynamo
from lyradynamo import zoo
from helpers import rel_err

# (batch, (height, width) in pixels, prompt_len or None for the default)
SHAPES = [(2, (64, 64), None), (1, (64, 64), None), (4, (64, 96), 24), (1, (96, 64), 40), (2, (96, 96), 24)]


def _out(o):
    return o[0] if isinstance(o, (tuple, list)) else o.sample


def _one_compilation_matches_eager(name, shapes):
    """The zoo model `name` compiled once, called at each of `shapes` (recompiling from the second
    call on is an error), each output as eager's."""
    model = zoo.build_denoiser(name, seed=0)
    compiled = torch.compile(model, backend="lyra")
    with torch.no_grad():
        for i, (b, (h, w), L) in enumerate(shapes):
            inputs = zoo.denoiser_inputs(name, model, batch=b, height=h, width=w, prompt_len=L, seed=i)
            if i == 1:  # from the second call on, any recompilation is an error
                torch.compiler.set_stance("fail_on_recompile")
            try:
                out = _out(compiled(**inputs))
            finally:
                torch.compiler.set_stance("default")
            ref = _out(model(**inputs))
            assert out.shape == ref.shape
            assert rel_err(out, ref) < 1e-5, (name, b, h, w, L)
    assert lyradynamo.compile_count() == 1


@pytest.mark.parametrize("name", zoo.MODEL_NAMES)
def test_one_compilation_matches_eager_and_full_coverage(name):
    _one_compilation_matches_eager(name, SHAPES)
    (rec,) = lyradynamo.compiled_graphs()
    assert rec.policy_active and rec.dynamic_inputs > 0
    cov = rec.summary["coverage"]
    assert cov, "no anchor ops found"
    for kind, c in cov.items():
        assert c["left"] == 0, (kind, rec.summary["left"])
    # every lyra op kind the model needs is present
    hist = rec.summary["op_histogram"]
    # split_cat turns a linear over an N-part concat into N linears
    extra = sum((int(label.rsplit(" ", 1)[1]) - 1) * n
                for label, n in rec.summary["matched"].get("split_cat", {}).items())
    # shared_input runs linears reading one input as one lyra::linear_group
    grouped = [g for g in rec.summary["shared_input"] if g["fused"]]
    assert hist.get("lyra::linear_group", 0) == len(grouped)
    assert hist.get("lyra::linear", 0) + sum(len(g["nodes"]) for g in grouped) == cov["linear"]["before"] + extra
    assert hist.get("lyra::attention", 0) == cov["sdpa"]["before"]


# The same matrix with batch 1 first: a first trace at batch 1 must not specialise anything on
# B == 1 (FLUX's attention did, through a .contiguous() of a split: shape_policy).
SHAPES_BATCH_ONE_FIRST = [(1, (64, 96), 24), (2, (64, 64), None), (3, (96, 64), 40)]


@pytest.mark.parametrize("name", zoo.MODEL_NAMES)
def test_compiled_at_batch_one_serves_larger_batches(name):
    _one_compilation_matches_eager(name, SHAPES_BATCH_ONE_FIRST)


def test_plain_dynamic_true_recompiles_where_lyra_does_not():
    """The problem the shape policy solves, shown with torch's own eager backend."""
    model = zoo.build_denoiser("sd3")
    calls = []

    def counting(gm, example_inputs):
        calls.append(1)
        return gm.forward

    compiled = torch.compile(model, backend=counting, dynamic=True)
    with torch.no_grad():
        for b, (h, w), L in [(2, (64, 64), None), (1, (64, 96), None)]:
            compiled(**zoo.denoiser_inputs("sd3", model, batch=b, height=h, width=w, prompt_len=L))
    assert len(calls) > 1


def _matched(name):
    """What the passes matched when the tiny `name` denoiser compiled (one call)."""
    model = zoo.build_denoiser(name)
    with torch.no_grad():
        torch.compile(model, backend="lyra")(**zoo.denoiser_inputs(name, model))
    return lyradynamo.compiled_graphs()[0].summary["matched"]


def test_dit_gated_residual_and_adaln_are_fused():
    matched = _matched("flux")
    assert any("gate+residual" in k for k in matched["linear"])
    assert any("+(1+scale)+shift" in k for k in matched["adaln"])  # with the `1 + scale` add folded in
    assert any("gelu_tanh" in k for k in matched["linear"])


def test_unet_fusions():
    matched = _matched("sd15")
    assert matched["group_norm"].get("group_norm+silu", 0) > 0
    assert any("glu_gelu" in k for k in matched["linear"])  # GEGLU
    assert matched["attention"].get("attention(blhd)", 0) > 0  # head transposes removed


def test_repeat_interleave_output_size_does_not_pin_the_batch(monkeypatch):
    """diffusers' prepare_attention_mask: `mask.repeat_interleave(heads, dim=0,
    output_size=mask.shape[0] * heads)`; torch 2.11 checks output_size with guard_int, which
    made the batch static (tiny Sana recompiled per batch size on the H100). The shape
    policy traces it without the hint."""
    from lyradynamo import backend

    seen = []
    run_passes = backend.run_passes

    def spy(gm, *args, **kwargs):
        seen.extend(n.kwargs for n in gm.graph.nodes if n.target == "repeat_interleave")
        return run_passes(gm, *args, **kwargs)

    monkeypatch.setattr(backend, "run_passes", spy)

    def f(mask, x):
        return x + mask.repeat_interleave(3, dim=0, output_size=mask.shape[0] * 3)[:, None]

    compiled = torch.compile(f, backend="lyra")
    for b in (2, 1, 5):
        mask, x = torch.randn(b, 7), torch.randn(3 * b, 1, 7)
        torch.testing.assert_close(compiled(mask, x), f(mask, x))
    assert lyradynamo.compile_count() == 1
    assert seen and all("output_size" not in kw for kw in seen)


@pytest.mark.parametrize("batches", [(1, 2, 3), (2, 1)])
def test_contiguous_of_a_split_does_not_pin_the_batch(batches):
    """FLUX's attention: `hidden.split_with_sizes([l_txt, l_img], dim=1)` then `.contiguous()`
    of each part; a part is contiguous only at B == 1, and torch's tracing guards Eq(B, 1)
    (traced at batch 1: a recompile at batch 2). The shape policy traces it without asking;
    at run time the method copies exactly when eager's does."""
    lin = torch.nn.Linear(8, 8)

    def f(x, ctx):
        a, b = x.split_with_sizes([ctx.shape[1], x.shape[1] - ctx.shape[1]], dim=1)
        return lin(a.contiguous()), lin(b.contiguous()) * 2

    compiled = torch.compile(f, backend="lyra")
    with torch.no_grad():
        for bsz in batches:
            x, ctx = torch.randn(bsz, 11, 8), torch.randn(bsz, 4, 8)
            for got, want in zip(compiled(x, ctx), f(x, ctx)):
                torch.testing.assert_close(got, want)
    assert lyradynamo.compile_count() == 1


def test_contiguity_without_guard():
    from lyradynamo.shape_policy import contiguity_without_guard as decide

    t = torch.randn(2, 3, 4)
    assert decide(t) is True
    assert decide(t.transpose(1, 2)) is False
    assert decide(t[:, :2]) is False  # split along dim 1 at B = 2
    assert decide(t[:1, :2]) is True  # at B = 1 the batch stride does not matter
    assert decide(torch.empty(0, 3)[:, :2]) is True
