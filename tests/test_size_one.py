"""size_one: an operator's own `size == 1` question about a size traced at 1 is answered from
the traced size without a guard (torch 2.11 asks it inside convolutions, SDPA and views: a
first call at batch 1 pinned the batch). Every other question is guarded as torch guards it.

torch 2.13 (CI's) no longer asks these questions in the zoo models, so the mechanism is driven
here directly: a ShapeEnv symbol traced at 1, asked `== 1` from code that counts as an
operator's (shape_policy's op-internal files: monkeypatched) or as the model's."""
import pytest
import torch
import torch.fx.experimental._config as fx_config
from torch._dynamo.source import LocalSource
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv

import lyradynamo
from lyradynamo import shape_policy, size_one


def _size(hint: int):
    """A fresh ShapeEnv and a backed size symbol traced at `hint` (as the policy makes them)."""
    env = ShapeEnv()
    with fx_config.patch(backed_size_oblivious=True):
        expr = env.create_symbol(hint, LocalSource(f"x{hint}"), dynamic_dim=DimDynamic.DYNAMIC,
                                 do_not_specialize_zero_one=True)
    return env, env.create_symintnode(expr, hint=hint)


@pytest.fixture
def tracing(monkeypatch):
    """A lyra frame is being traced; `op_internal` says whether the asking code is an operator's."""
    shape_policy.install()
    state = {"op_internal": True}
    monkeypatch.setattr(shape_policy, "_active", 1)
    monkeypatch.setattr(shape_policy, "_in_op_internal_file", lambda sloc: state["op_internal"])
    size_one.take_answers()
    yield state
    size_one.take_answers()


@pytest.mark.parametrize("question", ["eq", "ne"])
def test_an_operators_size_one_question_is_answered_without_a_guard(tracing, question):
    env, s = _size(1)
    name = str(s.node.expr)
    answer = (s == 1) if question == "eq" else (s != 1)
    assert bool(answer) is (question == "eq")  # the traced size's answer
    assert not env.guards and not env.replacements  # no guard, s not replaced by 1
    assert not env.axioms
    (asked,) = size_one.take_answers()
    assert asked.startswith("Eq(" if question == "eq" else "Ne(")
    # asked again (from the model's code now), the question is guarded as before
    tracing["op_internal"] = False
    assert bool(s == 1)
    assert [str(g.expr) for g in env.guards] == [f"Eq({name}, 1)"]  # and s is now 1


def test_the_models_own_size_one_question_is_guarded(tracing):
    tracing["op_internal"] = False
    env, s = _size(1)
    assert bool(s == 1)
    assert len(env.guards) == 1 and not size_one.take_answers()


def test_other_questions_and_sizes_go_to_torch_as_they_came(tracing):
    env, s = _size(2)
    assert not bool(s == 1)  # traced at 2: guarded (relax_internal_guards drops such a Ne later)
    assert len(env.guards) == 1
    env, s = _size(1)
    assert bool(s < 4)  # not an `== 1` question
    assert len(env.guards) == 1 and not size_one.take_answers()


def test_relax_size_guards_off_keeps_the_guard(tracing):
    env, s = _size(1)
    with lyradynamo.config.patch(relax_size_guards=False):
        assert bool(s == 1)
    assert len(env.guards) == 1 and not size_one.take_answers()


def test_guards_asked_through_the_hook_name_their_asker():
    """The hook is a frame between every question and its asker: torch must not name guards
    after it (relax_internal_guards tells an operator's guards from the model's by that name)."""
    shape_policy.install()
    env, s = _size(3)
    assert bool(s > 2)
    (guard,) = env.guards
    assert shape_policy._frame_file(guard.sloc).endswith("test_size_one.py")


def test_answers_reach_the_graphs_report_and_the_dump(monkeypatch):
    """Through a whole compile at batch 1 (the question comes from the model's code here,
    counted as an operator's by the monkeypatch: torch 2.13's operators no longer ask it)."""
    from lyradynamo import dump

    monkeypatch.setattr(shape_policy, "_in_op_internal_file", lambda sloc: True)

    class M(torch.nn.Module):
        def forward(self, x):
            return x * 2 if x.shape[0] == 1 else x * 3

    with torch.no_grad():
        torch.compile(M(), backend="lyra")(torch.randn(1, 4, 8))
    (rec,) = lyradynamo.compiled_graphs()
    answers = rec.summary["size_one_answers"]
    assert answers and answers[0].startswith("Eq(s")
    assert "size == 1 questions answered at the traced size, unguarded: " in dump.format_summary(rec.summary)


def test_an_operators_assertion_is_guarded(tracing):
    """`torch._check(s == 1)` asserts and specialises (torch 2.13's expand does it for a size
    traced at 1 that is broadcast): answered without its guard, s would stay a symbol that the
    rest of the trace cannot read as 1."""
    env, s = _size(1)
    name = str(s.node.expr)
    torch._check(s == 1)
    assert [str(g.expr) for g in env.guards] == [f"Eq({name}, 1)"]
    assert env.replacements  # s is 1 from here on
    assert not size_one.take_answers()


def test_a_size_traced_at_one_broadcast_by_expand_compiles_and_matches_eager():
    """A frame input whose dim traced at 1 is broadcast by expand (Qwen-Image's RoPE tables reach
    a resumed frame this way, after a graph break): torch 2.13's expand asserts the dim is 1, and
    the trace failed ('non-broadcasting semantics require s1 == s3') while size_one answered
    the assertion without its guard."""

    def f(table, x):
        return table.expand(x.shape[0], x.shape[1], -1) + x

    compiled = torch.compile(f, backend="lyra")
    for rows, cols in ((3, 5), (4, 6)):
        table, x = torch.randn(1, 1, 8), torch.randn(rows, cols, 8)
        torch.testing.assert_close(compiled(table, x), f(table, x))
