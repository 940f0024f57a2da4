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
they stay. One equality of this kind is avoided instead: `t.contiguous()` of a view whose
contiguity depends on a size is traced without asking (`_install_call_method_hooks`).

Traced at batch 1, such a question becomes an equality (`size == 1` holds): `size_one.py`
answers an operator's `size == 1` about a size traced at 1 without a guard instead.

Floats. `specialize_float=True` keeps the floats of the model's code and modules (eps,
dropout p, output_scale_factor, an attention scale computed from head_dim) Python constants,
which the passes match on. It would also bake in a float *argument* of the compiled forward
(ControlNet's `conditioning_scale`, a `timestep` passed as a Python float, a scale inside
`cross_attention_kwargs`): every new value would recompile. `_install_input_floats` makes
exactly those floats (read from the frame's arguments, directly or through dict / list /
tuple items, never through an attribute) graph inputs the way `specialize_float=False` would:
Dynamo passes a float64 0-d tensor and the graph `.item()`s it into a SymFloat. Python
control flow on such a float (`if scale == 0:`) still guards on it, so a value on the other
side of the branch recompiles once, and the result stays correct.

torch.compile wraps a named backend in `_TorchCompileWrapper`, which drops the
`backend_ctx_ctor` hook Dynamo offers backends for exactly this purpose; `install()` lets it
through for backends that define one (ours).
"""
from __future__ import annotations

import contextlib
import functools
import gc
import logging

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
    specialize_float=True,  # eps / dropout p stay Python constants (matchable); but see
    # _install_input_floats: floats among the frame's arguments become graph inputs
)
# Guards, checked on every call (the host time of a denoising step under CUDA graphs): let a
# submodule whose guarded state is only its own `__dict__` (a resnet, a feed-forward, a linear)
# be checked by its dicts' version tags instead of guard by guard (torch's recursive dict tags;
# off by default in torch 2.13). What it may skip is what torch's default
# `skip_tensor_guards_with_matching_dict_tags` already skips: the tensor guards of a module whose
# dicts did not change. Any attribute set on such a module changes its tag and runs the full
# guards. Full-size SD1.5 on the CPU machine: ~760 -> ~460-560 us of guards per call.
if hasattr(torch._dynamo.config, "use_recursive_dict_tags_for_guards"):
    _DYNAMO_POLICY["use_recursive_dict_tags_for_guards"] = True
_FX_POLICY = dict(
    # Duck sizing stays on, but `_install_batch_only_duck` limits it to the batch: dim 0 of
    # the inputs (latents, text embeddings, masks, timesteps) shares one symbol, while H and
    # W of a square latent, a prompt length equal to some width, or FLUX's (L, 3) position
    # ids (dim 0 not the batch: `_dim0_is_batch`) stay apart. (Without duck sizing at all,
    # sympy cannot simplify the attention masks' sizes of PixArt: (B * L) // B'.)
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


class policy_context:  # noqa: N801 - used as `backend_ctx_ctor`, a context-manager factory
    """Marks a lyra-compiled frame as running (Dynamo enters it around *every* call of the
    frame, traced or not). The settings themselves (_DYNAMO_POLICY, _FX_POLICY) are applied
    only while Dynamo compiles inside such a frame (`_on_compile_start`): patching torch's
    config on each call cost ~50 us a call, on the critical path of every denoising step.
    Where torch has no compile callbacks, the settings are patched around the call instead."""

    __slots__ = ("_per_call",)

    def __enter__(self) -> None:
        global _active
        _active += 1
        self._per_call = not _compile_hooks_registered()
        if self._per_call:
            _enter_settings()

    def __exit__(self, *exc) -> None:  # noqa: ANN002
        global _active
        if self._per_call:
            _exit_settings()
        _active -= 1
        if not _active and _pending_collection:
            froze, torch_gc_off = _pending_collection.pop()
            if torch_gc_off:
                torch._dynamo.config.run_gc_after_compile = True
            _collect_after_pause(froze)


_active = 0  # >0 while a lyra frame runs (policy_context entered)
_settings: list[contextlib.ExitStack] = []  # the config patches entered, innermost last
# per compilation in progress: (did it enter the settings, did it pause the garbage collector,
# did it freeze the older objects)
_compiles_patched: list[tuple[bool, bool, bool]] = []
# a GC pause whose compile has ended, to be closed when the outermost lyra frame returns:
# (did it freeze the older objects, did it switch torch's run_gc_after_compile off)
_pending_collection: list[tuple[bool, bool]] = []
_callbacks = getattr(torch._dynamo, "callback_handler", None)  # Dynamo's compile callbacks


def _enter_settings() -> None:
    stack = contextlib.ExitStack()
    from . import params

    stack.enter_context(torch._dynamo.config.patch(**_DYNAMO_POLICY, **params.dynamo_settings()))
    stack.enter_context(_fx_config.patch(**_FX_POLICY))
    _settings.append(stack)


def _exit_settings() -> None:
    _settings.pop().close()


def _on_compile_start(args) -> None:  # noqa: ANN001 - torch's CallbackArgs
    # Dynamo runs the start callbacks once per outermost compilation (nested ones are counted,
    # not re-run), before it traces; the end callbacks when it finishes or fails.
    from . import config

    pause_gc = bool(_active) and config.pause_gc_in_compile and gc.isenabled()
    # The objects that exist before the compile (the model, torch, diffusers) are frozen out of
    # the collection that ends the pause, unless the caller uses gc.freeze() itself.
    froze = pause_gc and gc.get_freeze_count() == 0
    _compiles_patched.append((bool(_active), pause_gc, froze))
    if _active:
        from . import size_one

        size_one.take_answers()  # a new trace: forget an interrupted one's
        _enter_settings()
    if pause_gc:
        gc.disable()
        if froze:
            gc.freeze()


def _on_compile_end(args) -> None:  # noqa: ANN001
    if not _compiles_patched:
        return
    patched, paused_gc, froze = _compiles_patched.pop()
    if patched:
        _exit_settings()
    if paused_gc:
        if _active:  # the frame is still running (its first run follows): collect when it returns
            # torch's own collection after a compile (`run_gc_after_compile`, a young + middle
            # one, right after this callback) would walk every object of the compile once more
            # (the pause keeps them young): lyra's collection at the frame's return stands for it
            torch_gc_off = bool(getattr(torch._dynamo.config, "run_gc_after_compile", False))
            if torch_gc_off:
                torch._dynamo.config.run_gc_after_compile = False
            _pending_collection.append((froze, torch_gc_off))
        else:
            _collect_after_pause(froze)


def _collect_after_pause(froze: bool) -> None:
    """End a compile's GC pause with one collection of what the compile made. Resuming the
    automatic collector instead ran three (young, middle, full: 0.53 + 0.35 + 0.77 s after
    SDXL's trace on an H200 host, session 27), each walking the trace's objects again. With
    the older objects frozen, one walk covers only the compile's own objects. It runs when the
    outermost lyra frame returns (policy_context.__exit__), after the first run: at the compile's
    end Dynamo's tracer still held its objects, so a third of the compile's garbage (tiny SD1.5 on
    the CPU: 24759 of 71792 objects) outlived that collection and waited for a later automatic
    full one, a pause at some later call (SDXL: 0.55 s on the CPU machine)."""
    try:
        gc.collect()
    finally:
        if froze:
            gc.unfreeze()
        gc.enable()


def _compile_hooks_registered() -> bool:
    """Whether `_on_compile_start` / `_end` are registered with Dynamo, registering them if
    not (torch._dynamo.reset() clears them). False where this torch has no such hooks."""
    starts = getattr(_callbacks, "start_callbacks", None)
    if not isinstance(starts, list) or not hasattr(_callbacks, "register_end_callback"):
        return False
    if _on_compile_start not in starts:
        _callbacks.register_start_callback(_on_compile_start)
        _callbacks.register_end_callback(_on_compile_end)
    return True


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
    _install_input_floats()
    _install_call_method_hooks()
    from . import fake_shortcuts, guard_tags, params, quiet_compile, size_one, size_scalars, slice_bounds

    size_one.install()
    size_scalars.install()
    slice_bounds.install()
    fake_shortcuts.install()
    guard_tags.install()
    params.install()
    quiet_compile.install()
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
        if not _active or not sizes:
            return ctx
        batch_duck = [d if (i == 0 or d is not DimDynamic.DUCK) else DimDynamic.DYNAMIC
                      for i, d in enumerate(sizes)]
        if batch_duck[0] is DimDynamic.DUCK and args and not _dim0_is_batch(args[0]):
            batch_duck[0] = DimDynamic.DYNAMIC
        torch_constraints = getattr(ctx, "constraint_sizes", None)
        constraints = list(torch_constraints or [None] * len(sizes))
        if (args and _dim0_is_batch(args[0]) and _automatic_constraint(constraints[0])
                and batch_duck[0] in (DimDynamic.DUCK, DimDynamic.DYNAMIC)):
            # a recompile marks the dims that changed with a warn-only constraint (automatic
            # dynamic), which makes torch give each its own symbol: the batch keeps one symbol
            # across the inputs all the same, or `temb.view(batch, -1, D)` becomes
            # (s0, s1 // s0, D) and broadcasting fails (LTX-2 at a new batch size)
            batch_duck[0], constraints[0] = DimDynamic.DUCK, None
        for i in _broadcast_ones(args[0] if args else None):
            batch_duck[i] = DimDynamic.STATIC
        fields = {"dynamic_sizes": batch_duck}
        if torch_constraints is not None:
            fields["constraint_sizes"] = constraints
        if all(list(getattr(ctx, k)) == v for k, v in fields.items()):
            return ctx
        try:
            return dataclasses.replace(ctx, **fields)
        except Exception:  # noqa: BLE001 - keep torch's choice if its context changed shape
            return ctx

    _automatic_dynamic.__wrapped__ = original  # type: ignore[attr-defined]
    builder._automatic_dynamic = _automatic_dynamic


def _automatic_constraint(c) -> bool:  # noqa: ANN001
    """c is the warn-only constraint automatic dynamic gives a dim that changed between calls."""
    return c is not None and type(c).__name__ == "RelaxedUnspecConstraint" and bool(getattr(c, "warn_only", False))


def _broadcast_ones(t) -> list:  # noqa: ANN001
    """The dims of input t traced as the constant 1: its size-1 dims past dim 0 (a (B, 1, D)
    modulation, a (1, L, 1, D) RoPE table), and dim 0 when it is 1 while a 3+-D argument of the
    frame has a larger batch (a table shared by the batch). Such a dim broadcasts, and with
    backed_size_oblivious a symbol for it would be assumed != 1 (the trace then fails: "the size
    of tensor a (s27) must match the size of tensor b (s15)"). A later call where such a dim is
    not 1 recompiles, as torch's default 0/1 specialisation does; dim 0 at batch 1 stays a
    symbol (batch 1 then batch 2: one compilation)."""
    if not isinstance(t, torch.Tensor) or t.dim() == 0:
        return []
    ones = [i for i in range(1, t.dim()) if t.shape[i] == 1]
    if t.shape[0] == 1 and max(_frame_batch_sizes(), default=1) > 1:
        ones.insert(0, 0)
    return ones


def _dim0_is_batch(t) -> bool:  # noqa: ANN001
    """Whether dim 0 of input t is (probably) the batch: always for tensors of 3 or more dims
    (latents, text embeddings); for 1-D / 2-D inputs (timesteps, pooled embeddings, masks, but
    also FLUX's (L, 3) position ids) only if its size is the dim-0 size of such a tensor among
    the traced frame's arguments. Otherwise duck sizing would give two unrelated sizes one
    symbol whenever they happen to be equal at the first call (FLUX's text and image ids at
    24 tokens each: a recompile at the next size)."""
    if not isinstance(t, torch.Tensor) or t.dim() >= 3 or t.dim() == 0:
        return True
    batches = _frame_batch_sizes()
    return not batches or int(t.shape[0]) in batches


def _frame_batch_sizes() -> set:
    """Dim-0 sizes of the 3+-D tensors among the traced frame's arguments (one level into
    dicts, lists and tuples: kwargs, added_cond_kwargs), or an empty set if not found."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        tx = InstructionTranslator.current_tx()
        values = list(getattr(tx, "f_locals", {}).values())
    except Exception:  # noqa: BLE001 - torch internals moved: keep duck sizing as it was
        return set()
    out = set()
    for v in values:
        for item in (v.values() if isinstance(v, dict) else v if isinstance(v, (list, tuple)) else (v,)):
            if isinstance(item, torch.Tensor) and item.dim() >= 3:
                out.add(int(item.shape[0]))
    return out


def _install_call_method_hooks() -> None:
    """Two tensor methods traced differently under the policy (torch's own tracing would pin
    a size to its current value):

    `t.repeat_interleave(int, dim, output_size=...)` is traced without `output_size`. With an
    int `repeats` the output size is `t.size(dim) * repeats` by construction, so the argument
    is only a hint; but torch (2.11) checks it with `guard_int`, which pins the symbols in it
    to their current values: diffusers' `prepare_attention_mask` passes
    `output_size=batch * heads`, and the batch size became static (one compile per batch
    size for every model with an attention mask, e.g. Sana). A tensor `repeats` keeps the
    argument: there it sizes a data-dependent output.

    `t.contiguous()` whose contiguity depends on a size (a split along dim 1 of a (B, L, C)
    tensor is contiguous only when B == 1: FLUX's attention output, split into text and
    image rows) is traced without asking: the node is the same `contiguous` call, and its
    value is the contiguous copy's (shape and contiguous strides, as at any B > 1). Asking
    would guard the size (`Eq(B, 1)` when traced at batch 1: a recompile at batch 2). The
    graph runs the method on the real tensor, so at run time it copies exactly when eager
    does; at B == 1 it returns its input, which is contiguous too, as the value says.
    """
    try:
        from torch._dynamo.variables.builder import wrap_fx_proxy
        from torch._dynamo.variables.tensor import TensorVariable
    except ImportError:
        return
    original = getattr(TensorVariable, "call_method", None)
    if original is None:
        return

    def call_method(self, tx, name, args, kwargs):  # noqa: ANN001, ANN202 - torch's signature
        if _active and name == "repeat_interleave" and "output_size" in kwargs:
            repeats = args[0] if args else kwargs.get("repeats")
            if repeats is not None and not isinstance(repeats, TensorVariable):
                kwargs = {k: v for k, v in kwargs.items() if k != "output_size"}
        if _active and name == "contiguous" and not args and not kwargs:
            value = self.as_proxy().node.meta.get("example_value")
            if isinstance(value, torch.Tensor) and contiguity_without_guard(value) is None:
                proxy = tx.output.create_proxy("call_method", "contiguous", (self.as_proxy(),), {})
                return wrap_fx_proxy(tx, proxy, example_value=contiguous_value(value))
        return original(self, tx, name, args, kwargs)

    call_method.__wrapped__ = original  # type: ignore[attr-defined]
    TensorVariable.call_method = call_method


def contiguous_value(t: torch.Tensor) -> torch.Tensor:
    """What `t.contiguous()` gives, worked out without a guard: t itself when it is known to be
    contiguous, else a contiguous copy's value (for a fake t whose contiguity depends on a
    size, as traced by `_install_call_method_hooks`). Passes that re-run a traced
    `.contiguous()` on fake values use this, or they would add the guard themselves."""
    decided = contiguity_without_guard(t)
    if decided is None:
        return t.clone(memory_format=torch.contiguous_format)
    return t if decided else t.contiguous()


def contiguity_without_guard(t: torch.Tensor) -> bool | None:
    """Whether t is contiguous, when its sizes and strides decide it without a guard; None when
    the answer depends on the values of symbolic sizes."""
    from torch.fx.experimental.symbolic_shapes import statically_known_true as known

    if any(known(n == 0) for n in t.shape):
        return True
    undecided = False
    expected = 1
    for size, stride in reversed(list(zip(t.shape, t.stride()))):
        if not (known(size == 1) or known(stride == expected)):
            if known(size != 1) and known(stride != expected) and all(known(n != 0) for n in t.shape):
                return False
            undecided = True
        expected = expected * size
    return None if undecided else True


def _install_input_floats() -> None:
    """Under the policy, a float from the frame's arguments becomes a graph input (SymFloat).

    VariableBuilder.wrap_literal turns a Python float into a constant (guarded by value) when
    `specialize_float` is on, else into a SymFloat graph input. For float arguments we run it
    as with `specialize_float=False` and without the lazy-constant wrapper (whose type checks
    read the global flag, which says "constant"); every other float keeps torch's path.
    """
    from torch._dynamo.variables import builder

    cls = getattr(builder, "VariableBuilder", None)
    original = getattr(cls, "wrap_literal", None)
    if original is None or not hasattr(cls, "wrap_symfloat") or not _input_source_types():
        log.warning("lyradynamo: torch._dynamo's VariableBuilder.wrap_literal/wrap_symfloat or its "
                    "source types not found; float arguments stay specialised (a new value recompiles)")
        return

    def wrap_literal(self, value):  # noqa: ANN001, ANN202 - torch's signature
        if not (_active and type(value) is float and _is_input_source(getattr(self, "source", None))):
            return original(self, value)
        lazy = getattr(self, "allow_lazy_constant", False)
        with torch._dynamo.config.patch(specialize_float=False):
            if lazy:
                self.allow_lazy_constant = False
            try:
                return original(self, value)
            finally:
                if lazy:
                    self.allow_lazy_constant = lazy

    wrap_literal.__wrapped__ = original  # type: ignore[attr-defined]
    cls.wrap_literal = wrap_literal
    # The type -> wrap_* table is built once and cached (with the method it found then): an
    # earlier torch.compile in this process would have cached torch's wrap_literal.
    for table in ("_type_dispatch_impl", "_type_dispatch"):
        clear = getattr(getattr(cls, table, None), "cache_clear", None)
        if clear is not None:
            clear()
    _install_eager_input_floats(builder)


def _install_eager_input_floats(builder) -> None:  # noqa: ANN001
    """Build float arguments at once instead of as LazyConstantVariable.

    Dynamo wraps primitives lazily (LazyConstantVariable, torch >= 2.11) and answers type
    questions about them (`scale == 0` dispatch, isinstance) from the global
    `specialize_float` without building them: with our policy it would assume a constant, then
    get a SymFloat and fail. Building float arguments eagerly (through wrap_literal above)
    avoids the question; the cost is a TYPE_MATCH guard. Without this class there is nothing
    lazy to bypass.
    """
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator
        from torch._dynamo.variables import lazy
    except ImportError:
        return
    lcv = getattr(lazy, "LazyConstantVariable", None)
    original = getattr(lcv, "create", None)
    if original is None:
        return

    def create(value, source, **options):  # noqa: ANN001, ANN003, ANN202 - torch's signature
        if _active and not options and type(value) is float and _is_input_source(source):
            try:
                tx = InstructionTranslator.current_tx()
            except Exception:  # noqa: BLE001 - no frame being traced: stay lazy
                tx = None
            if tx is not None:
                return builder.VariableBuilder(tx, source, allow_lazy_constant=False)(value)
        return original(value, source, **options)

    create.__wrapped__ = original  # type: ignore[attr-defined]
    lcv.create = staticmethod(create)


@functools.lru_cache(maxsize=None)
def _input_source_types():  # noqa: ANN202
    """(LocalSource, the item sources) of torch._dynamo.source, or None if they moved."""
    try:
        from torch._dynamo import source as src
    except ImportError:
        return None
    local = getattr(src, "LocalSource", None)
    items = tuple(getattr(src, n) for n in ("GetItemSource", "DictGetItemSource", "DictSubclassGetItemSource")
                  if isinstance(getattr(src, n, None), type))
    if local is None or not items:
        return None
    return local, items


def _is_input_source(source) -> bool:  # noqa: ANN001
    """True for L['x'], L['kwargs']['scale'], L['args'][1], L['cfg']['a'][0]: a value read from an
    argument of the compiled frame through items only. Attributes (self.eps, module config),
    function defaults, closures and globals are not inputs: they stay specialised."""
    types_ = _input_source_types()
    if types_ is None or source is None:
        return False
    local, items = types_
    while isinstance(source, items):
        source = getattr(source, "base", None)
    return (isinstance(source, local) and bool(getattr(source, "is_input", False))
            and not getattr(source, "is_derefed_cell_contents", False))


def _prepare_input(t, source) -> None:  # noqa: ANN001
    """Before Dynamo records a tensor: re-lay a parameter out (layout.py), and freeze it.

    lyra compiles for inference: parameters become requires_grad=False, as diffusers' own LoRA
    loading does (Dynamo guards requires_grad, so a LoRA load on the compiled model would
    otherwise recompile). Done here, before the guards record it, and again in the backend
    (backend._freeze_parameters) for parameters this hook did not see."""
    if isinstance(t, torch.nn.Parameter) and t.requires_grad:
        t.requires_grad_(False)
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
    return _in_op_internal_file(guard.sloc)


def _in_op_internal_file(sloc) -> bool:  # noqa: ANN001
    path = _frame_file(sloc)
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
