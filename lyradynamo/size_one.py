"""An operator's own `size == 1` question, asked while a lyra frame is traced, answered from
the traced size without a guard.

Traced at batch 1, torch 2.11 asks `size == 1` (or `!=`) about the batch inside several
operators: a convolution's output converted to channels_last (fake_impls' `convert`), the
attention-mask check of SDPA's backend choice (`sdp::check_attn_mask_shape`), a view's stride
computation (`_compute_stride`). Each answer would be guarded as `Eq(B, 1)`, with B replaced by
1 in everything traced after it: the batch is pinned and batch 2 recompiles. What these
questions decide (a layout, a backend, a view's strides) is re-decided on the real tensors at
run time: lyra's graph re-runs every op. So the question, `Eq(s, 1)` / `Ne(s, 1)` about a size
symbol s whose traced value is 1, asked from an operator's implementation (shape_policy's
op-internal files, C++ kernels included: Dynamo's run_node calls them), is answered from that
value with guards suppressed: no guard, no replacement of s by 1, no axiom. The model's own
`if batch == 1:` is not an operator's question and is guarded as before; so is an operator's
assertion (`torch._check(s == 1)`, `expect_true`: torch 2.13's expand specialises a broadcast
size this way, and the trace relies on the answer), and every question where
config.relax_size_guards is off. torch 2.13 no longer asks most of these (its operators
ask `guard_or_false`). The dump lists the questions answered this way.

This module is registered with torch as a file of its own internals (`uninteresting_files`):
torch names a guard's source after the innermost frame outside them, and the wrapper below
sits between every question and the code that asked it.
"""
from __future__ import annotations

import sys

import sympy

from . import shape_policy

# "<question> (<where>)" per question answered since the last take_answers()
_answers: list[str] = []


def install() -> None:
    try:
        from torch.fx.experimental.symbolic_shapes import ShapeEnv, uninteresting_files
    except ImportError:
        return
    original = getattr(ShapeEnv, "evaluate_expr", None)
    files = uninteresting_files()
    if original is None or getattr(original, "__wrapped__", None) is not None or not isinstance(files, set):
        return
    files.add(__file__)
    suppressed = ShapeEnv._suppress_guards_tls

    def evaluate_expr(self, orig_expr, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        if shape_policy._active and _asks_size_one(self, orig_expr) and not suppressed():
            from . import config

            sloc = self._get_sloc() if config.relax_size_guards else None
            if sloc is not None and shape_policy._in_op_internal_file(sloc) and not _asserted():
                with self.suppress_guards():
                    answer = original(self, orig_expr, *args, **kwargs)
                where = shape_policy._frame_file(sloc).rsplit("torch/", 1)[-1]
                _answers.append(f"{orig_expr} ({where})")
                return answer
        return original(self, orig_expr, *args, **kwargs)

    evaluate_expr.__wrapped__ = original  # type: ignore[attr-defined]
    ShapeEnv.evaluate_expr = evaluate_expr


def _asserted() -> bool:
    """The question comes from `torch._check` / `expect_true`: the operator asserts the answer
    and specialises on it (torch 2.13's expand ref: `torch._check(x == 1)` for a size traced at 1
    that is broadcast), so the answer holds only under its guard. Found by the callers' names,
    within the few frames between the check and this hook."""
    frame = sys._getframe(2)
    for _ in range(_ASSERT_DEPTH):
        if frame is None:
            return False
        code = frame.f_code
        if code.co_name in _ASSERTING and "torch" in code.co_filename:
            return True
        frame = frame.f_back
    return False


_ASSERTING = frozenset({"expect_true", "_check_with"})
_ASSERT_DEPTH = 12


def _asks_size_one(shape_env, expr) -> bool:  # noqa: ANN001
    """expr is `Eq(s, 1)` or `Ne(s, 1)` for a backed size symbol s traced at 1."""
    if not isinstance(expr, (sympy.Eq, sympy.Ne)) or len(expr.args) != 2:
        return False
    a, b = expr.args
    sym = a if b == 1 else b if a == 1 else None
    if not isinstance(sym, sympy.Symbol) or not sym.name.startswith("s"):
        return False
    hints = getattr(shape_env, "backed_var_to_val", None) or getattr(shape_env, "var_to_val", {})
    return hints.get(sym) == 1


def take_answers() -> list[str]:
    """The questions answered without a guard since the last take (and forget them)."""
    out = list(_answers)
    _answers.clear()
    return out
