"""Extended dict-tag guards (lyradynamo/guard_tags.py): attention processors and modules read
through `__dict__` are checked by dict version tags in lyra compilations, and every change that
the full guards would see is still seen (each call below is compared with eager)."""
import logging

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch._dynamo.eval_frame import _debug_get_cache_entry_list

import lyradynamo
from lyradynamo import guard_tags


class ScaledProcessor(AttnProcessor2_0):
    """A processor with state of its own, read at every call."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = scale

    def __call__(self, attn, hidden_states, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        return super().__call__(attn, hidden_states, *args, **kwargs) * self.scale


class FactorBase(AttnProcessor2_0):
    factor = 1.0  # a class attribute of a base class, read through the instance


class FactorProcessor(FactorBase):
    def __call__(self, attn, hidden_states, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        return super().__call__(attn, hidden_states, *args, **kwargs) * self.factor


class Blocks(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attns = torch.nn.ModuleList(Attention(query_dim=16, heads=2, dim_head=8) for _ in range(2))
        self.attns[1].set_processor(ScaledProcessor(0.5))

    def forward(self, x):  # noqa: ANN001
        for attn in self.attns:
            x = x + attn(x)
        return x


def _guard_nodes(fn_code) -> list:
    (entry, *_) = _debug_get_cache_entry_list(fn_code)  # the newest compilation first
    return [node for _, node, _ in guard_tags._walk(entry.guard_manager.root)]


def _processor_nodes(nodes) -> list:
    return [n for n in nodes if n.get_source().endswith(".processor")]


@pytest.fixture
def model():
    torch._dynamo.reset()
    torch.manual_seed(0)
    return Blocks().eval()


def _check(compiled, model, x) -> None:
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))


def test_processors_are_tag_safe_under_lyra_only(model):
    x = torch.randn(2, 5, 16)
    compiled = torch.compile(model, backend="lyra")
    _check(compiled, model, x)
    nodes = _guard_nodes(Blocks.forward.__code__)
    procs = _processor_nodes(nodes)
    assert len(procs) == 2 and all(n.is_tag_safe() for n in procs)
    assert guard_tags.last_marked > 0
    roots = [n for n in nodes if n.is_tag_safe_root()]
    # one root above both attentions (torch alone: a root per linear inside each of them)
    assert len(roots) == 1 and all(p.get_source().startswith(roots[0].get_source()) for p in procs)

    # another backend: torch's rules only (the processors stay on full guards)
    torch._dynamo.reset()
    eager_compiled = torch.compile(model, backend="eager")
    _check(eager_compiled, model, x)
    assert not any(n.is_tag_safe() for n in _processor_nodes(_guard_nodes(Blocks.forward.__code__)))


def test_option_off_keeps_torchs_rules(model):
    x = torch.randn(2, 5, 16)
    with lyradynamo.config.patch(extended_dict_tags=False):
        compiled = torch.compile(model, backend="lyra")
        _check(compiled, model, x)
    assert not any(n.is_tag_safe() for n in _processor_nodes(_guard_nodes(Blocks.forward.__code__)))


def test_changes_behind_the_tags_are_seen(model):
    x = torch.randn(2, 5, 16)
    compiled = torch.compile(model, backend="lyra")
    _check(compiled, model, x)
    _check(compiled, model, x)  # the tags are recorded by now
    model.attns[1].processor.scale = 2.0  # the processor's own state
    _check(compiled, model, x)
    model.attns[0].set_processor(ScaledProcessor(3.0))  # another processor class
    _check(compiled, model, x)
    model.attns[0].set_processor(ScaledProcessor(-1.0))  # same class, another instance
    _check(compiled, model, x)
    model.attns[1].scale = 0.1  # an attribute of the Attention module the processor reads
    _check(compiled, model, x)

    original = ScaledProcessor.__call__

    def doubled(self, attn, hidden_states, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        return 2.0 * original(self, attn, hidden_states, *args, **kwargs)

    ScaledProcessor.__call__ = doubled  # a method rebound on the class
    try:
        _check(compiled, model, x)
    finally:
        ScaledProcessor.__call__ = original
    _check(compiled, model, x)


def test_torch_api_mismatch_falls_back_with_a_warning(model, monkeypatch, caplog):
    def broken(*args):  # noqa: ANN002
        raise AttributeError("no such accessor method")

    monkeypatch.setattr(guard_tags, "_qualifies", broken)
    monkeypatch.setattr(guard_tags, "_warned", False)
    x = torch.randn(2, 5, 16)
    with caplog.at_level(logging.WARNING, logger="lyradynamo"):
        compiled = torch.compile(model, backend="lyra")
        _check(compiled, model, x)
    assert "extended dict-tag guards off" in caplog.text and guard_tags.last_marked == 0
    model.attns[1].processor.scale = 2.0
    _check(compiled, model, x)


def _tiny_compiled(name: str = "sd15", batch: int = 2):
    """A tiny model (SD1.5's UNet by default), its lyra compilation, a no-grad call and eager's
    output; the compiled model is called twice (its tags are recorded on the first call and used
    on the second), and its processors are checked by tags."""
    from lyradynamo import zoo

    torch._dynamo.reset()
    model = zoo.build_denoiser(name, tiny=True)
    inputs = zoo.denoiser_inputs(name, model, batch=batch, height=64, width=64)
    compiled = torch.compile(model, backend="lyra")
    run = torch.no_grad()(lambda m: m(**inputs).sample)
    plain = run(model)
    torch.testing.assert_close(run(compiled), plain)
    torch.testing.assert_close(run(compiled), plain)
    procs = _processor_nodes(_guard_nodes(type(model).forward.__code__))
    assert procs and all(n.is_tag_safe() for n in procs)
    return model, compiled, run, plain


def test_unet_processor_method_rebound_on_its_class_is_seen():
    """A method rebound on the processors' class, seen by the next compiled call (the compiled
    calls come first, so the tags recorded by them decide). The class's dict is in the tree:
    Dynamo guards it at one of the UNet's eight processors, the extension adds it at the others."""
    unet, compiled, run, before = _tiny_compiled()

    original = AttnProcessor2_0.__call__

    def halved(self, attn, hidden_states, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        return 0.5 * original(self, attn, hidden_states, *args, **kwargs)

    AttnProcessor2_0.__call__ = halved
    try:
        after = run(compiled)
        torch.testing.assert_close(after, run(unet))
    finally:
        AttnProcessor2_0.__call__ = original
    assert not torch.allclose(after, before)
    torch.testing.assert_close(run(compiled), before)


def test_unet_level_switches_after_compilation_are_seen():
    """What users switch on a compiled UNet between calls: FreeU (attributes on the up blocks),
    all processors at once, and back. Each compiled call matches eager."""
    from diffusers.models.attention_processor import AttnProcessor

    unet, compiled, run, plain = _tiny_compiled()
    steps = [
        lambda: unet.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4),
        lambda: unet.disable_freeu(),
        lambda: unet.set_attn_processor(AttnProcessor()),
        lambda: unet.set_attn_processor(ScaledProcessor(0.25)),
    ]
    for step in steps:
        step()
        got = run(compiled)  # before any eager call, so the tags recorded by compiled calls decide
        torch.testing.assert_close(got, run(unet))
    assert not torch.allclose(got, plain)


def test_class_attribute_of_a_base_class_changed_is_seen(model):
    """obj.factor comes from a base class's dict (the extension adds the MRO's dicts to the tree;
    Dynamo's own guards on the class also see this change): the next compiled call sees it."""
    model.attns[0].set_processor(FactorProcessor())
    x = torch.randn(2, 5, 16)
    compiled = torch.no_grad()(torch.compile(model, backend="lyra"))
    before = compiled(x)
    compiled(x)  # the tags are recorded by now
    assert all(n.is_tag_safe() for n in _processor_nodes(_guard_nodes(Blocks.forward.__code__)))
    FactorBase.factor = 3.0
    try:
        after = compiled(x)  # compiled first: the recorded tags decide
        with torch.no_grad():
            torch.testing.assert_close(after, model(x))
    finally:
        FactorBase.factor = 1.0
    assert not torch.allclose(after, before)


@pytest.mark.parametrize("name", ["flux", "sd3"])
def test_dit_processor_swap_after_compilation_is_seen(name):
    """A DiT's processors replaced after compilation (their own class, scaled): the next compiled
    call matches eager."""
    model, compiled, run, plain = _tiny_compiled(name, batch=1)
    base = type(next(iter(model.attn_processors.values())))

    class Halved(base):
        def __call__(self, *args, **kwargs):  # noqa: ANN002, ANN003
            out = super().__call__(*args, **kwargs)
            return tuple(0.5 * o for o in out) if isinstance(out, tuple) else 0.5 * out

    model.set_attn_processor(Halved())
    got = run(compiled)
    torch.testing.assert_close(got, run(model))
    assert not torch.allclose(got, plain)
