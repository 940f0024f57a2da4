"""split_cat with config.quant = fp8 / int8 on the CPU (the reference path of lyra::qlinear): a
linear over a concat becomes one quantised linear per weight column slice, each slice with its
own quantised copy; the slices follow in-place patches of the parent weight, and the parent's
high-precision copy leaves the device only when every slice of it is quantised."""
import copy

import pytest
import torch

import lyradynamo
from lyradynamo import config, zoo
from lyradynamo.quant import numerics, weights
from helpers import flux_lora, lora_round_trip, quantised_linear_ops, quantised_weights, rel_err

NO_SPLIT = tuple(p for p in config.ALL_PASSES if p != "split_cat")


@pytest.fixture(autouse=True)
def _restore_config():
    with config.patch(**config.snapshot()):  # undone when the test ends
        yield


@pytest.fixture
def offload_on_cpu(monkeypatch):
    """quant_master="host" moves a master off the device only on CUDA; on the CPU, let it do the
    same moves (host copy, NaN placeholder Parameter) so that they can be checked here."""
    monkeypatch.setattr(weights, "_offloadable", lambda param: True)


def _proj_out_slices(model) -> dict:
    """Each single block's proj_out weight name -> its two column slices as reported
    (attention output | MLP activation)."""
    out = {}
    for i, block in enumerate(model.single_transformer_blocks):
        k, mlp = block.proj_out.in_features, block.proj_mlp.out_features
        name = f"single_transformer_blocks.{i}.proj_out.weight"
        out[name] = [weights.sliced_name(name, (0, k - mlp)), weights.sliced_name(name, (k - mlp, mlp))]
    return out


def _run(model, shapes, **cfg):
    """Compile `model` afresh under cfg and run it on each input dict of `shapes` (from the
    second on under fail_on_recompile); returns (outputs, summary of the one compiled graph)."""
    torch._dynamo.reset()
    lyradynamo.reset_stats()
    outs = []
    with config.patch(**cfg), torch.no_grad():
        compiled = torch.compile(model, backend="lyra")
        for i, inputs in enumerate(shapes):
            with torch.compiler.set_stance("fail_on_recompile" if i else "default"):
                outs.append(compiled(**inputs)[0].clone())
    assert lyradynamo.compile_count() == 1
    summary = lyradynamo.compiled_graphs()[0].summary
    assert not summary["errors"], summary["errors"]
    return outs, summary


# min_db against float32 eager of the same weights (measured: fp8 48, int8 62 in float32;
# about 30 in bf16, where bf16 itself is most of the error)
@pytest.mark.parametrize("kind,dtype,min_db", [("fp8", torch.float32, 40.0), ("int8", torch.float32, 50.0),
                                               ("fp8", torch.bfloat16, 22.0), ("int8", torch.bfloat16, 22.0)])
def test_split_quantised_flux_report_quality_and_one_compile(kind, dtype, min_db, tmp_path):
    model = zoo.build_denoiser("flux", dtype=dtype)
    shapes = [zoo.denoiser_inputs("flux", model, batch=2),
              zoo.denoiser_inputs("flux", model, batch=1, height=48, width=80, seed=1)]
    # the reference: the same weights in float32, eager (for bf16, this isolates what the
    # quantisation and the split cost from what bf16 itself costs)
    ref_model = copy.deepcopy(model).float()
    with torch.no_grad():
        refs = [ref_model(**{k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v
                             for k, v in s.items()})[0] for s in shapes]
    plain, s_plain = _run(model, shapes, quant=kind, passes=NO_SPLIT, quant_master="gpu")
    split, s_split = _run(model, shapes, quant=kind, quant_master="gpu", dump_dir=str(tmp_path))

    hits = s_split["matched"]["split_cat"]
    assert hits == {"linear over cat of 2": len(model.single_transformer_blocks)}, hits
    q, q_plain = s_split["quant"], s_plain["quant"]
    for parent, slices in _proj_out_slices(model).items():
        assert parent in q_plain["quantized"]  # unsplit: one linear over the concat
        assert parent not in q["quantized"] and parent not in q["kept"]
        assert all(s in q["quantized"] for s in slices), (slices, q["quantized"])
    assert len(q["quantized"]) == len(q_plain["quantized"]) + len(model.single_transformer_blocks)
    hist, hist_plain = s_split["op_histogram"], s_plain["op_histogram"]
    assert hist["cat"] == hist_plain["cat"] - len(model.single_transformer_blocks)  # no concat is built
    assert quantised_linear_ops(s_split) == len(q["quantized"])
    assert "lyra::linear" not in hist or hist["lyra::linear"] == len(q["kept"])
    dumped = (tmp_path / "graph_0" / "summary.txt").read_text()
    assert f"quantized column slice {_proj_out_slices(model)['single_transformer_blocks.0.proj_out.weight'][1]}" \
        in dumped

    for ref, p, s in zip(refs, plain, split):
        db_plain, db_split = numerics.sqnr_db(ref, p), numerics.sqnr_db(ref, s)
        assert min_db <= db_split < 120, db_split  # quantised: close, but not the float result
        assert db_split >= db_plain - 1.0, (db_split, db_plain)  # per-part scales: not worse


def test_patch_of_the_parent_requantises_every_slice_once():
    """An in-place patch of the parent weight (through master_weight, as LoRA does) re-derives
    both slices before the next call, nothing recompiles, and patching it back gives the first
    output bit for bit. A call with nothing patched re-derives nothing."""
    model = zoo.build_denoiser("flux")
    inputs = zoo.denoiser_inputs("flux", model)
    w = model.single_transformer_blocks[0].proj_out.weight
    with config.patch(quant="fp8"), torch.no_grad():
        compiled = torch.compile(model, backend="lyra")
        out0 = compiled(**inputs)[0].clone()
        slices = weights.entries_of(w)
        assert sorted(e.cols for e in slices) == [(0, 32), (32, 128)]
        assert weights.refresh(slices) == 0  # unchanged: nothing to re-derive
        q0 = quantised_weights(model)
        master = weights.master_weight(w)
        orig = master.clone()
        with torch.compiler.set_stance("fail_on_recompile"):
            master.add_(0.5 * torch.randn(master.shape, generator=torch.Generator().manual_seed(3)))
            assert all(e.stale() for e in slices)
            patched = compiled(**inputs)[0].clone()
            assert weights.refresh(slices) == 0  # the call re-derived them
            for e in slices:
                q, s = numerics.quantize_rows(master.narrow(1, *e.cols), "fp8")
                assert e.qweight.is_contiguous() and torch.equal(e.qweight.view(torch.uint8), q.view(torch.uint8))
                assert torch.equal(e.wscale, s)
            master.copy_(orig)
            back = compiled(**inputs)[0].clone()
    assert lyradynamo.compile_count() == 1
    assert rel_err(patched, out0) > 1e-3
    assert torch.equal(back, out0)
    q_back = quantised_weights(model)
    assert all(torch.equal(q_back[n], q0[n]) for n in q0)


def test_lora_round_trip_through_the_slices():
    """LoRA A -> B -> A on the split, fp8 tiny FLUX (proj_out is a LoRA target): its slices change
    with A and come back bit for bit."""
    pytest.importorskip("peft")
    model = zoo.build_denoiser("flux")
    lora_a, lora_b = flux_lora(model, seed=11), flux_lora(model, seed=12, r=2, alpha=1)
    inputs = zoo.denoiser_inputs("flux", model, batch=2)
    with config.patch(quant="fp8"):
        r = lora_round_trip(torch.compile(model, backend="lyra"), model, inputs, lora_a, lora_b)
    assert lyradynamo.compile_count() == 1
    slices = [s for ss in _proj_out_slices(model).values() for s in ss]
    assert all(not torch.equal(r["q0"][s], r["q_a"][s]) for s in slices), slices
    assert all(torch.equal(r["q_a2"][n], r["q_a"][n]) for n in r["q_a"])
    assert torch.equal(r["out_a2"], r["out_a"]) and torch.equal(r["out_end"], r["out0"])


def test_host_master_offloads_the_sliced_parent_and_restore_brings_it_back(offload_on_cpu):
    model = zoo.build_denoiser("flux", dtype=torch.bfloat16)
    inputs = zoo.denoiser_inputs("flux", model, batch=2)
    orig = {n: p.detach().clone() for n, p in model.named_parameters()}
    # the same weights with their masters in place: the quantised copies must not differ
    (gpu_out,), _ = _run(zoo.build_denoiser("flux", dtype=torch.bfloat16), [inputs], quant="fp8",
                         quant_master="gpu")
    torch._dynamo.reset()
    with config.patch(quant="fp8", quant_master="host"), torch.no_grad():
        compiled = torch.compile(model, backend="lyra")
        out = compiled(**inputs)[0].clone()
    assert torch.equal(out, gpu_out)
    params = dict(model.named_parameters())
    offloaded = [n for n, p in params.items() if weights.master_weight(p) is not p]
    for parent in _proj_out_slices(model):
        assert parent in offloaded  # both slices quantised: the parent left
        p, m = params[parent], weights.master_weight(params[parent])
        assert torch.isnan(p).all() and p.shape == m.shape and torch.equal(m, orig[parent])
        assert all(e.master is m for e in weights.entries_of(p))

    assert lyradynamo.quant.restore(model) == len(offloaded)
    assert all(torch.equal(p, orig[n]) and weights.master_weight(p) is p for n, p in params.items())
    with torch.no_grad():
        with torch.compiler.set_stance("fail_on_recompile"):
            again = compiled(**inputs)[0]
        eager = model(**inputs)[0]
    assert torch.equal(again, out)
    assert numerics.sqnr_db(eager, again) > 30


class _CatLinear(torch.nn.Module):
    """proj(cat([a, gelu(b)], -1)) with part widths ka | kb; returns a 1-tuple, as diffusers models."""

    def __init__(self, ka: int, kb: int) -> None:
        super().__init__()
        self.fa, self.fb, self.proj = torch.nn.Linear(16, ka), torch.nn.Linear(16, kb), torch.nn.Linear(ka + kb, 32)

    def forward(self, x):
        return (self.proj(torch.cat([self.fa(x), torch.nn.functional.gelu(self.fb(x))], dim=-1)),)


@pytest.mark.parametrize("exclude", [(), (r"^proj\.",)])
def test_a_slice_that_cannot_be_quantised_stays_and_keeps_its_parent(exclude, offload_on_cpu):
    """Widths 8 | 32: the 8-column slice does not fit the quantised GEMM (K % 16) and stays in high
    precision, so the parent keeps its Parameter (a reader still needs it) while the other slice
    is quantised. An exclusion pattern on the parent's module path keeps both slices."""
    torch.manual_seed(0)
    model = _CatLinear(8, 32)
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        ref = model(x)[0]
    (out,), s = _run(model, [{"x": x}], quant="fp8", quant_master="host", quant_exclude=exclude)
    q = s["quant"]
    assert s["matched"]["split_cat"] == {"linear over cat of 2": 1}
    if exclude:
        assert set(q["kept"]) == {"proj.weight[:, 0:8]", "proj.weight[:, 8:40]"}
        assert all("quant_exclude" in why for why in q["kept"].values())
    else:
        assert q["kept"] == {"proj.weight[:, 0:8]": "K=8 is not a multiple of 16 (FP8 GEMM)"}
        assert "proj.weight[:, 8:40]" in q["quantized"]
    assert weights.master_weight(model.proj.weight) is model.proj.weight
    assert torch.isfinite(model.proj.weight).all()
    assert weights.master_weight(model.fb.weight) is not model.fb.weight  # fully quantised: left
    assert 25 < numerics.sqnr_db(ref, out) < 120


def test_a_linear_quantised_whole_is_not_split_into_parts_that_cannot_be():
    """Widths 8 | 40 (K = 48): split, neither part would fit the quantised GEMM; unsplit, the
    weight does. split_cat leaves it whole and it is quantised whole."""
    torch.manual_seed(0)
    model = _CatLinear(8, 40)
    x = torch.randn(2, 5, 16)
    (out,), s = _run(model, [{"x": x}], quant="fp8")
    assert "split_cat" not in s["matched"] and "proj.weight" in s["quant"]["quantized"]
    (_,), s = _run(model, [{"x": x}])  # unquantised: split
    assert s["matched"]["split_cat"] == {"linear over cat of 2": 1}
