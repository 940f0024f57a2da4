"""Shorter fake-tensor runs while Dynamo traces a lyra frame.

Dynamo runs every op it traces once on fake tensors to learn its output's shape, dtype and
strides. With lyra's dynamic sizes that is the larger part of a first call, and `linear` is
its largest single item: torch decomposes it (view, addmm or matmul, view) and each step does
symbolic size arithmetic, ~8 ms per call on the CPU machine, ~1500 calls in SDXL's UNet (a
cProfile of the whole first call: 11.6 of its 61 s).

The output of a linear is known without running it: (*x.shape[:-1], out_features),
contiguous, x's dtype and device. While the shape policy is active, Dynamo's `run_node`
returns that for a `linear` whose operands are fake tensors of one dtype and device, with
grad off or no operand requiring grad, autocast off, and an input width that equals the
weight's without a guard; any other linear runs as before (the first one reading a dynamic
width runs in full, and its size guard then makes the width known for the ones after it).

`layer_norm` (~5 ms a call, 210 in SDXL) gets the same treatment: its output has x's shape,
dtype and device, contiguous.

Tests set CHECK: every shortcut is then also run in full and compared (shape, dtype, strides),
with the full run's guards suppressed (they would make the traced program differ from the one
traced without CHECK).
"""
from __future__ import annotations

import logging
from typing import Any, Optional

import torch
import torch.nn.functional as F

from .passes.matcher import check_same_meta, known_eq

log = logging.getLogger("lyradynamo")

CHECK = False
_LINEARS = (torch._C._nn.linear, F.linear)
_LAYER_NORMS = (F.layer_norm, torch.layer_norm)
_installed = False


def install() -> None:
    """Idempotent; if torch's internals moved, logs and leaves Dynamo as it is."""
    global _installed
    if _installed:
        return
    try:
        from torch._dynamo import utils as dynamo_utils
        from torch._subclasses.fake_tensor import FakeTensor
    except ImportError:
        return
    original = getattr(dynamo_utils, "run_node", None)
    if original is None:
        log.warning("lyradynamo: torch._dynamo.utils.run_node not found; tracing runs every op in full")
        return
    from .shape_policy import policy_active

    def run_node(tracer, node, args, kwargs, nnmodule):  # noqa: ANN001, ANN202 - torch's signature
        if node.op == "call_function" and node.target in _SHORTCUTS and policy_active():
            value = _SHORTCUTS[node.target](args, kwargs, FakeTensor)
            if value is not None:
                if CHECK:  # the full run, without the guards it would add (they are what the
                    # shortcut saves: a check that recorded them would trace another program)
                    with _guards_suppressed(value):
                        full = original(tracer, node, args, kwargs, nnmodule)
                    _check_same(value, full, node)
                return value
        return original(tracer, node, args, kwargs, nnmodule)

    run_node.__wrapped__ = original  # type: ignore[attr-defined]
    dynamo_utils.run_node = run_node
    _installed = True


def _guards_suppressed(value: Any):
    """The shape env's suppress_guards() context for a fake value, or a no-op context."""
    import contextlib

    shape_env = getattr(getattr(value, "fake_mode", None), "shape_env", None)
    suppress = getattr(shape_env, "suppress_guards", None)
    return suppress() if suppress is not None else contextlib.nullcontext()


def _bind(args: tuple, kwargs: dict, names: tuple) -> Optional[dict]:
    """The call's arguments by name, or None when they do not fit `names`."""
    if len(args) > len(names) or set(kwargs) - set(names):
        return None
    vals = dict(zip(names, args))
    vals.update(kwargs)
    return vals


def _plain(x: Any, tensors: list, fake_cls: type) -> bool:
    """x and the other operands are fake tensors of x's dtype and device, no autograd is
    recorded and autocast is off: the output's dtype is x's."""
    if not isinstance(x, fake_cls) or not all(isinstance(t, fake_cls) for t in tensors):
        return False
    if any(t.dtype != x.dtype or t.device != x.device for t in tensors):
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, *tensors)):
        return False
    return not torch.is_autocast_enabled(x.device.type)


def _linear_value(args: tuple, kwargs: dict, fake_cls: type) -> Optional[torch.Tensor]:
    """linear(x, weight, bias)'s output as a fresh fake tensor, or None: run it in full."""
    vals = _bind(args, kwargs, ("input", "weight", "bias"))
    if vals is None:
        return None
    x, w, b = vals.get("input"), vals.get("weight"), vals.get("bias")
    if w is None or not _plain(x, [t for t in (w, b) if t is not None], fake_cls):
        return None
    if x.dim() < 1 or w.dim() != 2 or (b is not None and b.dim() != 1):
        return None
    if not known_eq(x.shape[-1], w.shape[1]) or (b is not None and not known_eq(b.shape[0], w.shape[0])):
        return None
    return x.new_empty((*x.shape[:-1], w.shape[0]))


def _layer_norm_value(args: tuple, kwargs: dict, fake_cls: type) -> Optional[torch.Tensor]:
    """layer_norm(x, normalized_shape, weight, bias, eps)'s output (x's shape, contiguous, x's
    dtype), or None: run it in full."""
    vals = _bind(args, kwargs, ("input", "normalized_shape", "weight", "bias", "eps"))
    if vals is None:
        return None
    x, shape = vals.get("input"), vals.get("normalized_shape")
    if not _plain(x, [t for t in (vals.get("weight"), vals.get("bias")) if t is not None], fake_cls):
        return None
    if not isinstance(shape, (list, tuple)) or not all(isinstance(d, int) for d in shape) or not shape:
        return None
    if x.dim() < len(shape) or not all(known_eq(a, b) for a, b in zip(x.shape[-len(shape):], shape)):
        return None
    return x.new_empty(x.shape)


_SHORTCUTS = {**{f: _linear_value for f in _LINEARS}, **{f: _layer_norm_value for f in _LAYER_NORMS}}


def _check_same(fast: Any, full: Any, node: Any) -> None:
    check_same_meta(fast, full, f"fake_shortcuts: {node.format_node()}: the shortcut gives")
