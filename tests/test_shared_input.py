"""passes/shared_input.py: linears reading one input become one lyra::linear_group (or, quantised,
one lyra::qlinear_q_group), with their Parameters joined into one buffer; outputs, in-place
patches and recompilation behave as before."""
import pytest
import safetensors.torch
import torch

import lyradynamo
from helpers import compiled_bitwise
from lyradynamo import config, zoo
from lyradynamo.ops.linear_group import joined
from lyradynamo.passes import shared_input

lyra = torch.ops.lyra


def _out(o):
    return o[0] if isinstance(o, (tuple, list)) else o.sample


def _run(name, model, seed=0, batch=2, hw=64):
    inputs = zoo.denoiser_inputs(name, model, batch=batch, height=hw, width=hw, seed=seed)
    with torch.no_grad():
        return _out(model(**inputs))


def test_joined_views_only_adjacent_rows_of_one_storage():
    buf = torch.randn(10, 4)
    a, b, c = buf[0:3], buf[3:5], buf[5:10]
    j = joined([a, b, c])
    assert j is not None and j.data_ptr() == buf.data_ptr() and torch.equal(j, buf)
    assert joined([a, c]) is None  # a gap
    assert joined([b, a]) is None  # wrong order
    assert joined([a, torch.randn(2, 4)]) is None  # another storage
    assert joined([buf[:, :2], buf[:, 2:]]) is None  # not contiguous
    assert joined([buf.view(-1)[0:4], buf.view(-1)[4:8]]).shape == (8,)


def test_sdxl_groups_fused_params_joined_and_output_unchanged():
    model = zoo.build_denoiser("sdxl", seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with config.patch(passes=tuple(p for p in config.ALL_PASSES if p != "shared_input")):
        ref = _run("sdxl", torch.compile(model, backend="lyra"))
    torch._dynamo.reset()
    lyradynamo.reset_stats()
    out = _run("sdxl", torch.compile(model, backend="lyra"))
    assert torch.equal(out, ref)  # the reference runs one linear per weight: the same bits
    (rec,) = lyradynamo.compiled_graphs()
    groups = rec.summary["shared_input"]
    assert groups and all(g["fused"] for g in groups), groups
    assert rec.summary["op_histogram"]["lyra::linear_group"] == len(groups)
    # every self-attention's q, k, v and every cross-attention's k, v became one group
    attn = [m for n, m in model.named_modules() if n.endswith("attn1") or n.endswith("attn2")]
    for a in attn:
        names = ("to_q", "to_k", "to_v") if a.is_cross_attention is False else ("to_k", "to_v")
        ws = [getattr(a, n).weight for n in names]
        assert joined(ws) is not None, "weights not adjacent"
    for k, v in model.state_dict().items():  # values unchanged
        assert torch.equal(v, before[k]), k


def test_in_place_patch_of_a_joined_weight_is_seen_without_recompiling():
    model = zoo.build_denoiser("sd15", seed=0)
    compiled = torch.compile(model, backend="lyra")
    _run("sd15", compiled)
    to_k = model.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_k
    assert to_k.weight.untyped_storage().nbytes() > to_k.weight.numel() * 4  # joined
    with torch.no_grad():
        to_k.weight.mul_(1.5)  # what lyradynamo.lora / controlnet do: an in-place write
    with torch.compiler.set_stance("fail_on_recompile"):
        out = _run("sd15", compiled, seed=1)
    ref = _run("sd15", model, seed=1)
    assert (out - ref).abs().max() < 1e-4
    assert lyradynamo.compile_count() == 1


def test_joined_parameters_save_with_safetensors_and_load_back(tmp_path):
    model = zoo.build_denoiser("flux", seed=0)
    _run("flux", torch.compile(model, backend="lyra"))
    to_q = model.transformer_blocks[0].attn.to_q.weight
    assert to_q.untyped_storage().nbytes() > to_q.numel() * to_q.element_size()  # joined
    path = str(tmp_path / "model.safetensors")
    safetensors.torch.save_file(model.state_dict(), path)
    back = safetensors.torch.load_file(path)
    for k, v in model.state_dict().items():
        assert torch.equal(back[k], v), k


def test_a_replaced_parameter_keeps_the_compiled_graph_right():
    model = zoo.build_denoiser("flux", seed=0)
    compiled = torch.compile(model, backend="lyra")
    _run("flux", compiled)
    to_k = model.transformer_blocks[0].attn.to_k.weight
    with torch.no_grad():
        to_k.data = to_k.data.clone() * 2  # no longer adjacent to to_q / to_v
    with torch.compiler.set_stance("fail_on_recompile"):
        out = _run("flux", compiled, seed=3)
    ref = _run("flux", model, seed=3)
    assert torch.equal(out, ref) or (out - ref).abs().max() < 1e-5


def test_groups_need_one_input_one_activation_and_bias_on_all_or_none():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(32, 16)
            self.b = torch.nn.Linear(32, 16)
            self.c = torch.nn.Linear(32, 16, bias=False)  # no bias: not with a, b
            self.d = torch.nn.Linear(32, 24)  # gelu: a group of its own kind (alone here)
            self.e = torch.nn.Linear(16, 16)  # another input

        def forward(self, x):
            return self.a(x), self.b(x), self.c(x), torch.nn.functional.gelu(self.d(x)), self.e(x[..., :16])

    m = Block()
    rec = compiled_bitwise(m, torch.randn(3, 5, 32))
    fused = [g for g in rec.summary["shared_input"] if g["fused"]]
    assert len(fused) == 1 and len(fused[0]["nodes"]) == 2
    assert joined([m.a.weight, m.b.weight]) is not None and joined([m.a.bias, m.b.bias]) is not None


def test_off_by_config():
    model = zoo.build_denoiser("sd15", seed=0)
    with config.patch(passes=tuple(p for p in config.ALL_PASSES if p != "shared_input")):
        _run("sd15", torch.compile(model, backend="lyra"))
    (rec,) = lyradynamo.compiled_graphs()
    assert "lyra::linear_group" not in rec.summary["op_histogram"]
    w = model.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.weight
    assert w.untyped_storage().nbytes() == w.numel() * w.element_size()  # untouched


def test_quantised_siblings_share_one_buffer_and_one_gemm():
    model = zoo.build_denoiser("sdxl", seed=0)
    ref_model = zoo.build_denoiser("sdxl", seed=0)
    with config.patch(quant="fp8", quant_master="gpu",
                      passes=tuple(p for p in config.ALL_PASSES if p != "shared_input")):
        ref = _run("sdxl", torch.compile(ref_model, backend="lyra"))
    torch._dynamo.reset()
    lyradynamo.reset_stats()
    with config.patch(quant="fp8", quant_master="gpu"):
        out = _run("sdxl", torch.compile(model, backend="lyra"))
    (rec,) = lyradynamo.compiled_graphs()
    hist = rec.summary["op_histogram"]
    assert hist.get("lyra::qlinear_q_group", 0) > 0, rec.summary["shared_input"]
    assert torch.equal(out, ref)  # the same quantised math per weight
    from lyradynamo.quant import weights

    a = model.down_blocks[1].attentions[0].transformer_blocks[0].attn1
    es = [weights.entry_of(getattr(a, n).weight) for n in ("to_q", "to_k", "to_v")]
    assert joined([e.qweight for e in es]) is not None and joined([e.wscale for e in es]) is not None


def test_second_quant_kind_on_one_model_still_groups_its_siblings():
    """A model compiled with fp8, restored, then compiled again with int8 (as benchmarks/bench.py
    does per mode): the int8 copies replace the fp8 ones and are allocated jointly again, so the
    second compilation runs the same grouped GEMMs as a fresh one (before: none, "the quantised
    weights were not allocated jointly"), and matches a fresh int8 compilation bit for bit."""
    fresh = zoo.build_denoiser("sdxl", seed=0)
    with config.patch(quant="int8", quant_master="gpu"):
        ref = _run("sdxl", torch.compile(fresh, backend="lyra"))
    (rec_fresh,) = lyradynamo.compiled_graphs()
    fused_fresh = sorted(tuple(g["nodes"]) for g in rec_fresh.summary["shared_input"] if g["fused"])
    assert fused_fresh
    torch._dynamo.reset()
    lyradynamo.reset_stats()
    model = zoo.build_denoiser("sdxl", seed=0)
    with config.patch(quant="fp8", quant_master="gpu"):
        _run("sdxl", torch.compile(model, backend="lyra"))
    torch._dynamo.reset()
    lyradynamo.quant.restore(model)
    with config.patch(quant="int8", quant_master="gpu"):
        out = _run("sdxl", torch.compile(model, backend="lyra"))
    rec = lyradynamo.compiled_graphs()[-1]
    assert sorted(tuple(g["nodes"]) for g in rec.summary["shared_input"] if g["fused"]) == fused_fresh
    assert torch.equal(out, ref)


def test_sibling_groups_found_in_flux_single_and_double_blocks():
    model = zoo.build_denoiser("flux", seed=0)
    _run("flux", torch.compile(model, backend="lyra"))
    (rec,) = lyradynamo.compiled_graphs()
    fused = [g for g in rec.summary["shared_input"] if g["fused"]]
    # double blocks: image q/k/v and text q/k/v; single blocks: q/k/v (proj_mlp has GELU); and
    # every block's modulation linear, which all read silu(conditioning) (canonicalize computes
    # it once)
    n_double, n_single = len(model.transformer_blocks), len(model.single_transformer_blocks)
    assert len(fused) == 2 * n_double + n_single + 1
    mods = ([b.norm1.linear for b in model.transformer_blocks]
            + [b.norm1_context.linear for b in model.transformer_blocks]
            + [b.norm.linear for b in model.single_transformer_blocks] + [model.norm_out.linear])
    assert max(len(g["nodes"]) for g in fused) == len(mods)
    order = [model.transformer_blocks[0].norm1.linear, model.transformer_blocks[0].norm1_context.linear]
    assert joined([lin.weight for lin in order]) is not None
    assert shared_input.sibling_groups  # public: quant/apply.py allocates by the same groups


def _modulation_groups(quant: str, monkeypatch, cap: int):
    """FLUX (tiny, 2 + 2 blocks) with shared_input.MAX_GROUP_ELEMENTS = cap: the fused groups'
    sizes and the output against the same model compiled without shared_input."""
    import diffusers

    from lyradynamo.zoo import configs

    cfg = dict(configs.TINY_DENOISER_CONFIGS["flux"], num_layers=2, num_single_layers=2)
    torch.manual_seed(0)
    model = diffusers.FluxTransformer2DModel.from_config(cfg).eval()
    torch.manual_seed(0)
    ref_model = diffusers.FluxTransformer2DModel.from_config(cfg).eval()
    master = {"quant_master": "gpu"} if quant != "none" else {}
    with config.patch(quant=quant, passes=tuple(p for p in config.ALL_PASSES if p != "shared_input"), **master):
        ref = _run("flux", torch.compile(ref_model, backend="lyra"), batch=1, hw=32)
    torch._dynamo.reset()
    lyradynamo.reset_stats()
    monkeypatch.setattr(shared_input, "MAX_GROUP_ELEMENTS", cap)
    with config.patch(quant=quant, **master):
        out = _run("flux", torch.compile(model, backend="lyra"), batch=1, hw=32)
    (rec,) = lyradynamo.compiled_graphs()
    groups = rec.summary["shared_input"]
    assert all(g["fused"] for g in groups), groups
    return sorted(len(g["nodes"]) for g in groups), out, ref


@pytest.mark.parametrize("quant", ["none", "int8"])
def test_groups_are_capped_in_weight_size(quant, monkeypatch):
    """A group larger than MAX_GROUP_ELEMENTS runs as consecutive GEMMs of at most that many
    weights (joining copies the weights: the cap bounds that extra memory); quantised, the
    weights were allocated by the same groups, so every group still fuses."""
    big, out_big, ref = _modulation_groups(quant, monkeypatch, 1 << 29)
    # 2 x 2 double-block + 2 single-block + norm_out modulation linears (quantised: norm_out is
    # kept in high precision by config.quant_exclude, and leaves the group)
    n_mod = 7 if quant == "none" else 6
    assert big[-1] == n_mod
    torch._dynamo.reset()
    lyradynamo.reset_stats()
    # the tiny modulation weights: 6 x 32 rows of 32 (double), 3 x 32 (single), 2 x 32 (norm_out):
    # with room for two double-block ones, the group becomes 2 + 2 + 3 (quantised 2 + 2 + 2)
    small, out_small, _ = _modulation_groups(quant, monkeypatch, 2 * 6 * 32 * 32)
    assert n_mod not in small and len(small) == len(big) + 2, (big, small)
    assert torch.equal(out_big, ref) and torch.equal(out_small, ref)
