"""Parameters and buffers as graph attributes (`config.params_as_attributes`).

By default Dynamo gathers every parameter and buffer a frame reads as a graph input, on every
call: ~690 attribute loads for an SD1.5 UNet, ~1700 for SDXL's. After lyra's guard work
(guard_tags.py) that gathering is most of Dynamo's host time per call. With torch's
`install_free_tensors` Dynamo keeps them as `get_attr` nodes of the graph instead, and the
frame passes only the real inputs (latents, timestep, text embeddings).

lyra's passes and runtime read weights from placeholders and their real values (quantisation,
the shared-input and q / k / v joins, the runner's address checks), so `lift` turns those
`get_attr` nodes back into placeholders at the start of the backend, and `with_params` passes
the tensors to the graph after the caller's inputs. The passes see the graph they always saw.

Guards. For such an attribute torch guards the tensor's metadata (TENSOR_MATCH), not its
identity: a parameter replaced by a new object with the same shape would pass, and the graph
would keep reading the old one. `_install_identity_guards` adds an ID_MATCH on each, so a
replacement recompiles. Patches that keep the object (`copy_`, `.data =`: LoRA fusing,
ControlNet and lyra's own swaps) are seen without one: the runner checks the addresses it
captured (runtime.py) and the graph reads the current storage.
"""
from __future__ import annotations

import logging
from typing import Callable

import torch
import torch.fx as fx

from . import config

log = logging.getLogger("lyradynamo")

SOURCE_META = "lyra_source"  # node.meta key: the Dynamo source name of a lifted attribute


def dynamo_settings() -> dict:
    """torch._dynamo.config settings for a lyra compilation (shape_policy applies them)."""
    if config.params_as_attributes and _installed and hasattr(torch._dynamo.config, "install_free_tensors"):
        return {"install_free_tensors": True}
    return {}


def _source_names() -> dict:
    """Dynamo's attribute name -> source name ("L['self']._modules['conv_in']._parameters['weight']")
    of the frame being compiled, where torch exposes it."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        tx = InstructionTranslator.current_tx()
        sources = getattr(tx.output, "param_name_to_source", None) or {}
    except Exception:  # noqa: BLE001 - names only feed reports and quant_exclude patterns
        return {}
    names = {}
    for key, source in sources.items():
        name = getattr(source, "name", None)
        name = name() if callable(name) else name
        if isinstance(name, str):
            names[key] = name
    return names


def lift(gm: fx.GraphModule, example_inputs: list) -> tuple[fx.GraphModule, list, list]:
    """A copy of gm whose tensor `get_attr` nodes are placeholders after the existing ones.

    Returns (the copy, the inputs it takes: example_inputs then the lifted tensors, the lifted
    tensors); gm itself when there is nothing to lift. A copy, because Dynamo reads its graph's
    placeholders after the backend returns (one per input it passes). The copy does not hold the
    attributes: the tensors reach the graph as arguments.
    """
    tensors = {n.target: _attr(gm, n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    tensors = {target: t for target, t in tensors.items() if isinstance(t, torch.Tensor)}
    if not tensors:
        return gm, list(example_inputs), []
    graph = fx.Graph()
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    attrs = [n for n in graph.nodes if n.op == "get_attr" and n.target in tensors]
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    sources = _source_names()
    lifted, by_target = [], {}
    anchor = placeholders[-1] if placeholders else None
    for node in attrs:
        target = node.target
        if target not in by_target:
            where = graph.inserting_after(anchor) if anchor is not None else graph.inserting_before(next(iter(graph.nodes)))
            with where:
                ph = graph.placeholder(node.name)
            ph.meta.update(node.meta)
            if target in sources:
                ph.meta[SOURCE_META] = sources[target]
            by_target[target] = ph
            lifted.append(tensors[target])
            anchor = ph
        node.replace_all_uses_with(by_target[target])
        graph.erase_node(node)
    lifted_gm = _graph_module_like(gm, graph)
    lifted_gm.meta.update(gm.meta)
    log.debug("lyradynamo: %d parameters / buffers lifted from graph attributes", len(lifted))
    return lifted_gm, list(example_inputs) + lifted, lifted


def with_params(runner: Callable, lifted: list) -> Callable:
    """The compiled callable: the caller's inputs, then the lifted parameters and buffers."""
    if not lifted:
        return runner
    params = tuple(lifted)

    def run(*args):
        return runner(*args, *params)

    run.runner = getattr(runner, "runner", runner)  # type: ignore[attr-defined]
    return run


def _graph_module_like(gm: fx.GraphModule, graph: fx.Graph) -> fx.GraphModule:
    """A GraphModule over graph with gm's attributes, lazy like Dynamo's own where gm is: its code
    is generated once, when it first runs, not at each of the passes' recompile() calls (~0.3 s
    each for a full-size UNet on the CI machine)."""
    try:
        from torch.fx._lazy_graph_module import _LazyGraphModule
    except ImportError:
        _LazyGraphModule = None
    cls = _LazyGraphModule if _LazyGraphModule is not None and isinstance(gm, _LazyGraphModule) else fx.GraphModule
    return cls(gm, graph, class_name=type(gm).__name__)


def _attr(gm: fx.GraphModule, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _install_identity_guards() -> None:
    """Under a lyra compilation with attributes installed, guard each tensor attribute's identity
    as well as its metadata (see the module docstring)."""
    from torch._dynamo import output_graph

    from . import shape_policy

    try:
        from torch._dynamo.source import is_constant_source
    except ImportError:
        log.warning("lyradynamo: torch._dynamo.source.is_constant_source not found; parameters stay "
                    "graph inputs (config.params_as_attributes has no effect)")
        return

    cls = getattr(output_graph, "OutputGraph", None)
    original = getattr(cls, "register_attr_or_module", None)
    guards = getattr(output_graph, "GuardBuilder", None), getattr(output_graph, "install_guard", None)
    if original is None or None in guards or not hasattr(guards[0], "ID_MATCH"):
        log.warning("lyradynamo: torch's OutputGraph.register_attr_or_module / install_guard not found; "
                    "parameters stay graph inputs (config.params_as_attributes has no effect)")
        return
    guard_builder, install_guard = guards

    def register_attr_or_module(self, target, *names, **options):  # noqa: ANN001, ANN002, ANN003, ANN202
        source = options.get("source")
        if (shape_policy._active and isinstance(target, torch.Tensor) and source is not None
                and torch._dynamo.config.install_free_tensors and not is_constant_source(source)):
            install_guard(source.make_guard(guard_builder.ID_MATCH))
        return original(self, target, *names, **options)

    register_attr_or_module.__wrapped__ = original  # type: ignore[attr-defined]
    cls.register_attr_or_module = register_attr_or_module
    _installed.append(True)


def _install_metadata_repr_in_identity_guards() -> None:
    """Let the identity guards above describe a tensor by its metadata, not its values.

    torch 2.10-2.12's `GuardBuilder.id_match_unchecked` writes `repr(value)` into each ID_MATCH
    guard's description (text for recompilation messages only). For a CUDA parameter that repr
    formats the tensor's values: a dozen small kernels and device-to-host copies, ~5 ms. With one
    identity guard per parameter that was 5 s of SD1.5's and 8 s of SDXL's first call on an H200
    host (torch 2.11; py-spy, benchmarks/NOTES.md session 31); the CPU never showed it (torch
    2.13 writes the type only). Inside lyra compilations, each such call runs with
    `torch.Tensor.__repr__` and `torch.nn.Parameter.__repr__` giving type, shape, dtype and device
    (`_metadata_repr`); the guard itself (an `id()` check) is unchanged. Another thread that prints
    a tensor during one of these calls (microseconds each) gets the short form too."""
    from . import shape_policy

    try:
        from torch._dynamo.guards import GuardBuilder
    except ImportError:
        return
    original = getattr(GuardBuilder, "id_match_unchecked", None)
    if original is None:
        return

    def id_match_unchecked(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        wrapped = id_match_unchecked.__wrapped__  # type: ignore[attr-defined]  (read at call time: tests swap it)
        if not shape_policy._active:
            return wrapped(self, *args, **kwargs)
        with _metadata_repr():
            return wrapped(self, *args, **kwargs)

    id_match_unchecked.__wrapped__ = original  # type: ignore[attr-defined]
    GuardBuilder.id_match_unchecked = id_match_unchecked


def _tensor_metadata(t: torch.Tensor) -> str:
    return f"<{type(t).__name__} {tuple(t.shape)} {t.dtype} {t.device}>"


class _metadata_repr:  # noqa: N801 - a context manager
    """While entered: Tensor and Parameter reprs show metadata only (see above)."""

    _classes = (torch.Tensor, torch.nn.Parameter)

    def __enter__(self) -> None:
        self._saved = [vars(cls).get("__repr__") for cls in self._classes]
        for cls in self._classes:
            cls.__repr__ = _tensor_metadata

    def __exit__(self, *exc) -> None:
        for cls, saved in zip(self._classes, self._saved):
            if saved is None:
                delattr(cls, "__repr__")
            else:
                cls.__repr__ = saved


_installed: list = []


def install() -> None:
    if not _installed:
        _install_identity_guards()
        if _installed:
            _install_metadata_repr_in_identity_guards()
