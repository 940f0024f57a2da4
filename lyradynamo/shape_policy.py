"""Shape policy: one compilation for every batch size, resolution and prompt length.

Dynamo's defaults recompile a diffusers model three times over:
  * the first trace is static (`assume_static_by_default`), so the second shape recompiles;
  * duck sizing gives equal sizes one symbol (a square latent: H is W), so a non-square
    latent recompiles;
  * sizes 0/1 are specialised, so batch size 1 recompiles.
The policy (`policy_context`) turns all three off while a lyra-compiled frame is traced.

A fourth source remains: torch's own operator implementations guard on sizes while Dynamo
runs them on fake tensors (`contiguous()`, the matmul inside `linear`, conv's backend
heuristic `batch < 16`, ...). Those guards decide strides and kernel choices *inside* one
op; our graph is a torch-level FX graph that re-runs every op on real tensors, so such
decisions are re-made at run time and the guards protect nothing. `relax_internal_guards`
drops them: only guards recorded inside operator implementations (never the model's own
Python), and only non-equalities (`Ne`, `<`, `>=`, ...); equalities can change shapes, so
they stay.

torch.compile wraps a named backend in `_TorchCompileWrapper`, which drops the
`backend_ctx_ctor` hook Dynamo offers backends for exactly this purpose; `install()` lets it
through for backends that define one (ours).
"""
from __future__ import annotations

import contextlib
import logging
from typing import Iterator

import sympy
import torch
import torch._dynamo
import torch._dynamo.eval_frame as _eval_frame
import torch.fx.experimental._config as _fx_config

log = logging.getLogger("lyradynamo")

# Dynamo options while tracing a lyra frame.
_DYNAMO_POLICY = dict(
    assume_static_by_default=False,  # trace dynamic from the first call
    automatic_dynamic_shapes=True,
    specialize_float=True,  # eps / dropout p stay Python constants (matchable)
)
_FX_POLICY = dict(
    # Duck sizing stays on, but `_batch_only_duck` limits it to dim 0: the batch dims of
    # all inputs (latents, text embeddings, masks, timesteps) share one symbol, while H and
    # W of a square latent, or a prompt length equal to some width, stay apart.
    use_duck_shape=True,
    backed_size_oblivious=True,  # no 0/1 specialisation of sizes
)

# Files of torch's operator implementations: guards recorded there are op-internal.
_OP_INTERNAL_FILES = (
    "torch/_dynamo/utils.py",  # run_node: a C++ kernel evaluated on fake tensors
    "torch/_subclasses/",
    "torch/_meta_registrations.py",
    "torch/_refs/",
    "torch/_prims/",
    "torch/_prims_common/",
    "torch/_decomp/",
    # torch.nn.functional wrappers: argument checks (_verify_batch_size) and the C++ kernel
    # they call (its memory-format heuristics guard on sizes: a channels_last group_norm on
    # CUDA guards batch != 1). The graph keeps the op and re-runs it on real tensors.
    "torch/nn/functional.py",
)


@contextlib.contextmanager
def policy_context() -> Iterator[None]:
    """Dynamo + symbolic-shape settings for tracing a lyra-compiled frame."""
    global _active
    with torch._dynamo.config.patch(**_DYNAMO_POLICY), _fx_config.patch(**_FX_POLICY):
        _active += 1
        try:
            yield
        finally:
            _active -= 1


_active = 0  # >0 while a lyra frame runs (policy_context entered)


_installed = False


def install() -> None:
    """Forward a backend's `backend_ctx_ctor` through torch.compile's backend wrapper.

    Idempotent. If torch's internals moved, logs a warning and leaves torch as it is: the
    compiled model is still correct, it only recompiles per new shape.
    """
    global _installed
    if _installed:
        return
    original = getattr(_eval_frame, "get_compiler_fn", None)
    if original is None:
        log.warning("lyradynamo: torch._dynamo.eval_frame.get_compiler_fn not found; "
                    "the shape policy is off and new shapes will recompile")
        return

    def get_compiler_fn(compiler_fn):  # noqa: ANN001 - mirrors torch's signature
        wrapped = original(compiler_fn)
        inner = getattr(compiler_fn, "compiler_fn", None)  # _TorchCompileWrapper
        ctx = getattr(inner, "backend_ctx_ctor", None)
        if ctx is not None and getattr(wrapped, "backend_ctx_ctor", None) is None:
            try:
                wrapped.backend_ctx_ctor = ctx
            except AttributeError:  # pragma: no cover - a wrapper without __dict__
                log.warning("lyradynamo: cannot attach the shape policy to %r", wrapped)
        return wrapped

    get_compiler_fn.__wrapped__ = original  # type: ignore[attr-defined]
    _eval_frame.get_compiler_fn = get_compiler_fn
    _install_batch_only_duck()
    _installed = True


def _install_batch_only_duck() -> None:
    """Under the policy, duck-size dim 0 only (see _FX_POLICY); other dims get own symbols."""
    import dataclasses

    from torch._dynamo.variables import builder
    from torch.fx.experimental.symbolic_shapes import DimDynamic

    original = getattr(builder, "_automatic_dynamic", None)
    if original is None:
        log.warning("lyradynamo: torch._dynamo.variables.builder._automatic_dynamic not found; "
                    "square latents may recompile at non-square sizes")
        return

    def _automatic_dynamic(*args, **kwargs):  # noqa: ANN002, ANN003 - torch's signature
        if _active and args:
            _prepare_input(args[0], args[2] if len(args) > 2 else kwargs.get("source"))
        ctx = original(*args, **kwargs)
        sizes = getattr(ctx, "dynamic_sizes", None)
        if not _active or not sizes or DimDynamic.DUCK not in sizes[1:]:
            return ctx
        batch_duck = [d if (i == 0 or d is not DimDynamic.DUCK) else DimDynamic.DYNAMIC
                      for i, d in enumerate(sizes)]
        try:
            return dataclasses.replace(ctx, dynamic_sizes=batch_duck)
        except Exception:  # noqa: BLE001 - keep torch's choice if its context changed shape
            return ctx

    _automatic_dynamic.__wrapped__ = original  # type: ignore[attr-defined]
    builder._automatic_dynamic = _automatic_dynamic


def _prepare_input(t, source) -> None:  # noqa: ANN001
    """Re-lay a parameter out (layout.py) before Dynamo records its strides."""
    try:
        from . import layout

        name = getattr(source, "name", "")
        layout.prepare_parameter(t, (name() if callable(name) else name) or "")
    except Exception as exc:  # noqa: BLE001 - a layout choice must never break tracing
        log.warning("lyradynamo: could not prepare input layout (%s)", exc)


def policy_active() -> bool:
    """True while a frame is traced under the policy (checked by the backend)."""
    return bool(_active) and not torch._dynamo.config.assume_static_by_default


def _frame_file(sloc) -> str:  # noqa: ANN001 - torch's SLoc, varies across versions
    loc = getattr(sloc, "framework_loc", None)
    if loc is None:
        return ""
    filename = getattr(loc, "filename", None)
    return (filename if filename is not None else str(loc)).replace("\\", "/")


def _is_op_internal(guard) -> bool:  # noqa: ANN001
    path = _frame_file(guard.sloc)
    return any(part in path for part in _OP_INTERNAL_FILES)


def _has_equality(expr: sympy.Basic) -> bool:
    return isinstance(expr, sympy.Eq) or any(isinstance(a, sympy.Eq) for a in expr.atoms(sympy.Eq))


def relax_internal_guards(shape_env) -> list[str]:  # noqa: ANN001
    """Drop op-internal non-equality guards; return them as strings (for the dump)."""
    if shape_env is None:
        return []
    kept, dropped = [], []
    for guard in shape_env.guards:
        if _is_op_internal(guard) and not _has_equality(guard.expr):
            dropped.append(guard)
        else:
            kept.append(guard)
    if not dropped:
        return []
    shape_env.guards[:] = kept
    # Range refinements those guards made (s > 1 => s in [2, oo]) would still become
    # "2 <= s" guards: reset the ranges of their symbols and re-derive them from what stays.
    touched = set().union(*(g.expr.free_symbols for g in dropped))
    default = shape_env._default_value_range(do_not_specialize_zero_one=_fx_config.backed_size_oblivious)
    for sym in touched:
        if sym in shape_env.var_to_range and str(sym).startswith("s"):
            shape_env.var_to_range[sym] = default
    for guard in kept:
        if guard.expr.free_symbols & touched:
            try:
                shape_env._refine_ranges(guard.expr)
            except Exception:  # noqa: BLE001 - refinement is an optimisation only
                pass
    shape_env._maybe_evaluate_static.cache_clear()
    return [str(g.expr) for g in dropped]
