"""Text torch renders eagerly during a compile, for records nobody reads: skipped in lyra's.

Two renderings of the whole traced graph with every symbolic size printed through sympy, each
made on every compile whether or not anything reads it:
- `GraphModule.print_readable(include_stride=True, ...)`, an argument of `bypass_package` (a note
  for compile packages, i.e. precompile), when the graph holds parameters (with
  `config.params_as_attributes`: always): ~1 s of a full-size SD1.5 first call on the CI machine.
- `OutputGraph.get_graph_sizes_structured()`, every node's sizes as strings, for the
  `graph_node_shapes` field of Dynamo's compilation metrics: 0.8 s of SDXL's first call on the
  CPU machine (5228 nodes), ~0.6 s on an H200 host (py-spy, benchmarks/NOTES.md session 31).
Inside lyra compilations, and only for the call made directly from the function named below,
the first returns a short note and the second an empty dict (the metrics record then has no
node shapes). torch's logging of the graph (TORCH_LOGS=graph_code, TORCH_TRACE's
`dynamo_output_graph`) calls them from other frames and is unchanged.
"""
from __future__ import annotations

import sys
from typing import Any, Callable

import torch.fx as fx

_installed: list = []


def _skip_when_called_from(cls: type, name: str, caller: str, quiet: Callable[[], Any]) -> None:
    """Wrap cls.name: under an active lyra policy, a call made from a function named `caller`
    returns quiet() instead."""
    from . import shape_policy

    original = getattr(cls, name, None)
    if original is None:
        return

    def wrapper(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        if shape_policy._active and sys._getframe(1).f_code.co_name == caller:
            return quiet()
        return wrapper.__wrapped__(self, *args, **kwargs)  # type: ignore[attr-defined]  (tests swap it)

    wrapper.__wrapped__ = original  # type: ignore[attr-defined]
    wrapper.__name__ = name
    setattr(cls, name, wrapper)


def install() -> None:
    if _installed:
        return
    _installed.append(True)
    _skip_when_called_from(fx.GraphModule, "print_readable", "compile_and_call_fx_graph",
                           lambda: "<graph not printed: lyradynamo skips this eager print (lyradynamo/quiet_compile.py)>")
    try:
        from torch._dynamo.output_graph import OutputGraph
    except ImportError:
        return
    _skip_when_called_from(OutputGraph, "get_graph_sizes_structured", "_compile", dict)
