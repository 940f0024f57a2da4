"""Where a traced size (or an int argument, traced as a symbol) meets a Python value.

1. `torch.as_tensor(size)` / `torch.tensor(size)`: kept symbolic.

A model that makes a 0-d tensor of a size (Qwen-Image's text-length fallback in
`compute_text_seq_len_from_mask`: `torch.as_tensor(text_seq_len, device=...)`) would have
Dynamo fix the size to its current value: torch builds the fake tensor from a Python number,
so the symbol is evaluated and guarded (`Eq(L, 12)`), and every new prompt length recompiles.
While a lyra frame is traced, such a call whose data is one symbolic int, float or bool (and
whose other arguments are at most `dtype` and `device`) is traced as
`torch.scalar_tensor(size, dtype=..., device=...)` instead: the same 0-d tensor, with the dtype
`as_tensor` would infer (int64, the default float dtype, bool), and no guard. A call with any
other argument is traced by torch as before.

2. `f"{n}"`: the symbol is specialised. Z-Image picks its patch embedder by
`self.all_x_embedder[f"{patch_size}-{f_patch_size}"]`, with the patch sizes passed as int
arguments, which the shape policy traces as symbols. Dynamo's f-string of a symbol breaks the
graph in a way it cannot resume from: the rest of the forward ran eagerly, each block a frame of
its own (16 graphs in the tiny model). A symbol formatted into a string is a key or a message,
not a size the graph computes with, so it is guarded to its value (a new patch size recompiles,
as it would under torch's default static ints).

3. `s is None` / `s is not None` for a slice: answered without reading its bounds. Dynamo reads a
slice's bounds as Python values to compare it, which pins a size symbol among them: QwenImage21
builds `cache_write_slice = slice(0, prefix_len)` and asks `is not None`, so each new prompt
length recompiled its blocks. A slice object is never None.
"""
from __future__ import annotations

import operator

import torch

from . import shape_policy

_FACTORIES = (torch.as_tensor, torch.tensor)
_KWARGS = {"dtype", "device"}


def install() -> None:
    """Idempotent; if Dynamo's classes moved, leaves torch as it is (such sizes stay pinned)."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslatorBase
        from torch._dynamo.variables import BuiltinVariable, ConstantVariable, SliceVariable, SymNodeVariable
        from torch._dynamo.variables.torch import TorchInGraphFunctionVariable
    except ImportError:
        return

    def factory_of_a_size(original):  # noqa: ANN001, ANN202
        def call_function(self, tx, args, kwargs):  # noqa: ANN001, ANN202 - torch's signature
            if (shape_policy._active and getattr(self, "value", None) in _FACTORIES and len(args) == 1
                    and isinstance(args[0], SymNodeVariable) and set(kwargs) <= _KWARGS):
                dtype = _inferred_dtype(args[0].python_type())
                if dtype is not None:
                    kwargs = {"dtype": ConstantVariable.create(dtype)} | dict(kwargs)
                    return original(TorchInGraphFunctionVariable(torch.scalar_tensor), tx, list(args), kwargs)
            return original(self, tx, args, kwargs)
        return call_function

    def format_specialised(original):  # noqa: ANN001, ANN202
        def _format_value(self, fmt_spec, flags):  # noqa: ANN001, ANN202 - torch's signature
            if shape_policy._active and self.stack and isinstance(self.stack[-1], SymNodeVariable):
                value = self.pop()
                self.push(ConstantVariable.create(value.evaluate_expr(self.output)))
            return original(self, fmt_spec, flags)
        return _format_value

    def slice_is_never_none(original):  # noqa: ANN001, ANN202
        def call_function(self, tx, args, kwargs):  # noqa: ANN001, ANN202 - torch's signature
            fn = self.fn
            if shape_policy._active and (fn is operator.is_ or fn is operator.is_not) and len(args) == 2 and not kwargs:
                a, b = args
                if isinstance(a, ConstantVariable) and a.value is None:
                    a, b = b, a
                if isinstance(a, SliceVariable) and isinstance(b, ConstantVariable) and b.value is None:
                    return ConstantVariable.create(fn is operator.is_not)
            return original(self, tx, args, kwargs)
        return call_function

    _wrap(TorchInGraphFunctionVariable, "call_function", factory_of_a_size)
    _wrap(InstructionTranslatorBase, "_format_value", format_specialised)
    if _wrap(BuiltinVariable, "call_function", slice_is_never_none):
        try:  # torch 2.13 binds its `is` / `is not` handlers once, at import
            from torch._dynamo import symbolic_convert

            handlers = symbolic_convert.compare_op_handlers
            for name, op in (("is", operator.is_), ("is not", operator.is_not)):
                if name in handlers:
                    handlers[name] = BuiltinVariable(op).call_function
        except (ImportError, AttributeError):
            pass


def _wrap(owner, name: str, make) -> bool:  # noqa: ANN001
    """owner.name replaced by make(original) once (the wrapper keeps it as `__wrapped__`); False
    where torch has no such attribute or it is wrapped already."""
    original = getattr(owner, name, None)
    if original is None or getattr(original, "__wrapped__", None) is not None:
        return False
    wrapper = make(original)
    wrapper.__wrapped__ = original
    setattr(owner, name, wrapper)
    return True


def _inferred_dtype(kind: type) -> torch.dtype | None:
    """The dtype torch.as_tensor gives a Python number of this type."""
    if kind is int:
        return torch.int64
    if kind is float:
        return torch.get_default_dtype()
    if kind is bool:
        return torch.bool
    return None
