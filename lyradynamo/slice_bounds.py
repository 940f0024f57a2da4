"""A slice whose bound is a symbol keeps a size expression, not an unknown size.

Under lyra's shape policy torch reasons about backed sizes size-obliviously
(`backed_size_oblivious`: what keeps a first call at batch 1 from pinning the batch). There a
slice such as `table[:frames]` (Wan's and Qwen-Image's RoPE tables; SD3's cropped position
table) cannot tell whether `frames <= len(table)`. torch 2.11's fake slice
(`fake_impls._compute_slice_index`) then gives up on the bound and gives the result a fresh
unbacked size `u0`; the `view` / `expand` after it cannot be traced on `u0` ("Could not guard
on data-dependent expression"), and Dynamo breaks the graph there. The frames resumed after such
a break take the model's intermediate tensors as inputs, size-1 broadcast dimensions included,
and Wan's then failed to trace at all ("size of tensor a (2) must match the size of tensor b
(s27: hint = 1)"). torch 2.13 answers instead with the bound clamped to the size, as Python
slicing defines it: `min(index, size)` for an index known to be >= 0, `max(index + size, 0)`
for one known to be < 0. While a lyra frame is traced, this module gives torch 2.11 the same
answer where its own function returns none; every answer torch gives is kept.

Both versions return none for a bound of unknown sign: an int argument of the call, which the
policy traces as a symbol (Qwen-Image slices its RoPE table by the frame count of `img_shapes`,
`table[idx : idx + frame]`). There the bound's value at this call decides, and the branch it
takes is guarded (`_decided_by_hint`): inequalities on the int, so one compilation still serves
its other values on the same side.
"""
from __future__ import annotations

import torch

from . import shape_policy


def install() -> None:
    """Idempotent; if torch's fake slice moved, leaves it as it is (the graph breaks stay)."""
    try:
        from torch._subclasses import fake_impls
    except ImportError:
        return
    original = getattr(fake_impls, "_compute_slice_index", None)
    if original is None or getattr(original, "__wrapped__", None) is not None:
        return

    def _compute_slice_index(size, index):  # noqa: ANN001, ANN202 - torch's signature
        answer = original(size, index)
        if answer is None and shape_policy._active:
            answer = clamped_slice_index(size, index)
        return answer

    _compute_slice_index.__wrapped__ = original  # type: ignore[attr-defined]
    fake_impls._compute_slice_index = _compute_slice_index


def clamped_slice_index(size, index):  # noqa: ANN001, ANN201 - SymInt or int
    """A slice index clamped into [0, size] by its sign, or None where the sign is unknown."""
    from torch.fx.experimental.symbolic_shapes import guard_or_false

    if guard_or_false(index >= 0):
        return torch.sym_min(index, size)
    if guard_or_false(index < 0):
        return torch.sym_max(index + size, 0)
    return _decided_by_hint(size, index)


def _decided_by_hint(size, index):  # noqa: ANN001, ANN202 - SymInt or int
    """The index of a slice bounded by an int argument of the call (Qwen-Image's frame count in
    `table[idx : idx + frame]`): such an int is traced as a symbol of unknown sign, so neither
    rule above applies. Where its value at this call is known, the branch it takes is guarded
    (`frame >= 0`, `frame <= 4096`: inequalities, no specialisation) and the index is exact."""
    from torch.fx.experimental import symbolic_shapes as sym

    has_hint = getattr(sym, "has_guarding_hint", None) or getattr(sym, "has_hint", None)  # 2.13 / 2.11
    if has_hint is None or not all(has_hint(v) for v in (size, index)):
        return None
    if sym.guard_bool(index >= 0):
        return index if sym.guard_bool(index <= size) else size
    return index + size if sym.guard_bool(index >= -size) else 0
