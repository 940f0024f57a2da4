"""slice_bounds: while a lyra frame is traced, a slice bound that torch 2.11's fake slice cannot
place (`_compute_slice_index` returns None: its size would become a fresh unbacked symbol) is
clamped into the size as Python slicing defines it. torch 2.13 (CI's) places such bounds itself,
so torch 2.11's answer is stood in for here; tests/test_more_models.py[wan] fails under torch
2.11 without the module."""
import pytest
import torch.fx.experimental._config as fx_config
from torch._dynamo.source import LocalSource
from torch._subclasses import fake_impls
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv

from lyradynamo import shape_policy, slice_bounds


def _sizes(*hints):
    """Backed size symbols traced at `hints`, made as the policy makes them."""
    env = ShapeEnv()
    with fx_config.patch(backed_size_oblivious=True):
        syms = [env.create_symintnode(env.create_symbol(h, LocalSource(f"x{i}"), dynamic_dim=DimDynamic.DYNAMIC,
                                                        do_not_specialize_zero_one=True), hint=h)
                for i, h in enumerate(hints)]
    return env, syms


@pytest.fixture
def torch_211_slice(monkeypatch):
    """fake_impls' slice index as torch 2.11 answers an unplaceable bound (None), wrapped by
    slice_bounds as install() wraps torch's."""
    monkeypatch.setattr(fake_impls, "_compute_slice_index", lambda size, index: None)
    slice_bounds.install()
    return fake_impls._compute_slice_index


def test_an_unplaced_bound_is_clamped_into_the_size_while_tracing(torch_211_slice, monkeypatch):
    env, (frames,) = _sizes(2)
    monkeypatch.setattr(shape_policy, "_active", 1)
    with fx_config.patch(backed_size_oblivious=True):
        end = torch_211_slice(1024, frames)
        start = torch_211_slice(1024, -frames)
    assert str(end.node.expr) == f"Min(1024, {frames.node.expr})"
    assert str(start.node.expr) == f"Max(0, 1024 - {frames.node.expr})"
    assert end.node.hint == 2 and start.node.hint == 1022
    assert not env.var_to_range.keys() - {frames.node.expr}  # no unbacked symbol was made


def test_outside_lyra_frames_torch_answers_alone(torch_211_slice):
    _, (frames,) = _sizes(2)
    assert torch_211_slice(1024, frames) is None


def test_torchs_own_answers_are_kept(monkeypatch):
    monkeypatch.setattr(fake_impls, "_compute_slice_index", lambda size, index: "torch's")
    slice_bounds.install()
    monkeypatch.setattr(shape_policy, "_active", 1)
    assert fake_impls._compute_slice_index(8, 3) == "torch's"


def test_install_wraps_once():
    slice_bounds.install()
    wrapper = fake_impls._compute_slice_index
    slice_bounds.install()
    assert fake_impls._compute_slice_index is wrapper and hasattr(wrapper, "__wrapped__")


def test_a_bound_of_unknown_sign_is_decided_by_its_value_with_a_guard(torch_211_slice, monkeypatch):
    """An int argument traced as a symbol (Qwen-Image's frame count in `table[idx : idx + frame]`)
    has no known sign: neither clamp applies. Its value at this call decides the branch; the
    branch is guarded (inequalities) and the index is exact."""
    env = ShapeEnv()
    n = env.create_symintnode(env.create_symbol(3, LocalSource("n"), dynamic_dim=DimDynamic.DYNAMIC, positive=None),
                              hint=3)
    monkeypatch.setattr(shape_policy, "_active", 1)
    with fx_config.patch(backed_size_oblivious=True):
        assert torch_211_slice(1024, n) is n
        assert torch_211_slice(2, n) == 2  # past the end: the size
        assert torch_211_slice(1024, -n).node.expr == 1024 - n.node.expr
    assert env.guards  # the branches taken are guarded
    assert not [s for s in env.var_to_range if str(s).startswith("u")]  # no unbacked symbol


def test_a_table_sliced_by_an_int_argument_traces_in_one_graph():
    """End to end: the slice, then a view by the same int, trace with exact sizes, and one
    compilation serves every value of the int. Before: the slice had a fresh unbacked size, which
    the graph checked at run time (`_assert_scalar`), and in Qwen-Image's RoPE the view after it
    broke the graph."""
    import torch

    import lyradynamo

    table = torch.randn(64, 8)

    def f(x, shapes):  # the int inside a list of tuples, as Qwen-Image's img_shapes
        n, w = shapes[0]
        return x * table[0:n].view(n, 1, -1).expand(n, w, -1).reshape(n * w, -1).sum(0)

    torch._dynamo.reset()
    lyradynamo.reset_stats()
    compiled = torch.compile(f, backend="lyra")
    for n in (1, 2, 5):
        x = torch.randn(3, 8)
        torch.testing.assert_close(compiled(x, [(n, 3)]), f(x, [(n, 3)]))
    assert lyradynamo.compile_count() == 1 and len(lyradynamo.compiled_graphs()) == 1
    assert "aten::_assert_scalar" not in lyradynamo.compiled_graphs()[0].summary["op_histogram"]
