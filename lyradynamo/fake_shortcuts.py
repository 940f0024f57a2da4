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
dtype and device, contiguous. So do (session 29; fake-run times per call in SDXL's trace on the CPU
machine, full config, 128 px):
- `group_norm` (27 ms, 46 calls: torch decomposes it into ~20 ops): x's shape, where x is exactly
  contiguous or channels_last and the channel count is a known multiple of the groups; x's layout
  on the CPU, contiguous elsewhere (session 30's run A found the first version, x's layout on
  every device, wrong on CUDA);
- `conv2d` (9 ms, 51 calls) with stride 1, dilation 1, one group and the padding that keeps the
  size (k odd, padding (k - 1) / 2): (N, C_out, H, W) in the layout x and the weight share;
- `dropout` (1.9 ms, 227 calls) in eval mode or with p = 0: the input itself, as torch returns it.

Some ops run past the fake-tensor cache (session 32; `cache_enabled`, torch's own switch, off
for the one run): view ops, whose cache hits rebuild the view with `set_` on symbolic sizes (the
storage-size and contiguity arithmetic again, ~50 sympy operations), and ops met at few repeated
shapes (interpolate, reshape, the norms that run in full, the linear / norm shortcuts' own factory
calls), where most calls miss and the cache makes and checks an entry for each. conv2d and cat
would gain too but keep the cache: on torch 2.11 (the GPU machine's) their uncached
channels_last outputs report is_contiguous(channels_last) False where the cache's hits report
True (CUDA fakes, symbolic sizes); for every op past the cache the three runs (uncached, miss,
hit) give the same sizes, strides and flags, on both torch versions. Per call on the CPU
machine, a symbolic (B, H*W, 640) tensor, cached hit against uncached: transpose 1.3 vs 0.8 ms,
permute 2.2 vs 0.9, chunk 2.8 vs 1.2, a slice 5.2 vs 2.8. Ops repeated at one shape (add,
mul, truediv, gelu, silu, to) keep the cache: uncached, gelu's 70 calls in SDXL's trace took 1.0 s
instead of 0.2. The values are torch's own either way. Full SDXL's trace on the CPU machine (fp32,
128 px, three alternating rounds, means, torch 2.11): run_node 6.96 -> 5.47 s, bytecode tracing
18.4 -> 16.4 s.

Tests set CHECK: every shortcut is then also run in full and compared (shape, dtype, strides),
with the full run's guards suppressed (they would make the traced program differ from the one
traced without CHECK).
"""
from __future__ import annotations

import logging
import operator
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from .ops._common import layout_strides, size_expr, strides_as_written
from .passes.matcher import check_same_meta, int_pair, known_eq

log = logging.getLogger("lyradynamo")

CHECK = False
_LINEARS = (torch._C._nn.linear, F.linear)
_LAYER_NORMS = (F.layer_norm, torch.layer_norm)
_GROUP_NORMS = (F.group_norm,)
_CONV2DS = (F.conv2d,)
_DROPOUTS = (F.dropout,)
_installed = False
# ops whose fake runs are shorter past the fake-tensor cache and give the same sizes, strides and
# contiguity flags there (module docstring): view ops, and ops met at few repeated shapes (misses:
# the cache's entry is made and checked on each), among them the shortcuts' own factory calls.
# Not conv2d or cat: on torch 2.11 their uncached channels_last outputs say is_contiguous(
# channels_last) False where a cache hit says True (CUDA fakes; 2.13 says True for both).
_UNCACHED_METHODS = frozenset({"transpose", "view", "permute", "chunk", "split", "expand", "squeeze", "reshape"})
_UNCACHED_FUNCTIONS = frozenset({torch.transpose, torch.permute, torch.chunk, torch.split, torch.squeeze,
                                 operator.getitem, F.interpolate, *_LINEARS, *_LAYER_NORMS, *_GROUP_NORMS})


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
        def full():  # noqa: ANN202
            return original(tracer, node, args, kwargs, nnmodule)

        if not policy_active():
            return full()
        run = full
        if node.op == "call_function" and node.target in _SHORTCUTS:
            def run():  # noqa: ANN202
                return _shortcut_or_full(node.target, args, kwargs, FakeTensor, full, node.format_node)
        fake_mode = _uncached_fake_mode(node, args, FakeTensor)
        return run() if fake_mode is None else _uncached(fake_mode, run)

    run_node.__wrapped__ = original  # type: ignore[attr-defined]
    dynamo_utils.run_node = run_node
    _installed = True


def _uncached_fake_mode(node, args: tuple, fake_cls: type) -> Any:  # noqa: ANN001 - an fx.Node
    """The fake mode to run node past the cache in (its first operand's, a fake tensor), or
    None: node runs as torch runs it."""
    if node.op == "call_method":
        listed = node.target in _UNCACHED_METHODS
    else:
        listed = node.op == "call_function" and node.target in _UNCACHED_FUNCTIONS
    if not listed or not args or not isinstance(args[0], fake_cls):
        return None
    return args[0].fake_mode


def _uncached(fake_mode: Any, run: Callable[[], Any]) -> Any:
    """run() with fake_mode's dispatch cache off (torch's own switch, restored after)."""
    if not hasattr(fake_mode, "cache_enabled"):
        return run()
    old = fake_mode.cache_enabled
    fake_mode.cache_enabled = False
    try:
        return run()
    finally:
        fake_mode.cache_enabled = old


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


def _memory_format(t: torch.Tensor) -> Optional[torch.memory_format]:
    """A 4-D tensor's layout where its strides are, term for term, those of a contiguous or a
    channels_last tensor of its sizes; None otherwise, and where a channel or spatial size is
    the constant 1 (both layouts would fit). The comparison is of the size expressions as
    written (ops._common.strides_as_written: sympy's structural ==), no symbolic reasoning:
    torch's own is_contiguous() on symbolic sizes cost ~3 ms a call here, more than the rest of
    a shortcut. (passes/conv1x1's _traced_nhwc reads the layout at the traced sizes instead:
    enough for a rewrite's choice, not for a fake value that must equal the full run's at every
    size.)"""
    if t.dim() != 4 or any(size_expr(d) == 1 for d in t.shape[1:]):
        return None
    for memory_format in (torch.contiguous_format, torch.channels_last):
        if strides_as_written(t, memory_format):
            return memory_format
    return None


def _empty(x: torch.Tensor, shape, memory_format: torch.memory_format) -> torch.Tensor:
    """A new fake (N, C, H, W) tensor like x in `memory_format`, its strides written as torch
    writes them (so that _memory_format reads them back)."""
    if memory_format == torch.contiguous_format:
        return x.new_empty(shape)
    n, c, h, w = shape
    return x.new_empty_strided(shape, layout_strides(c, h, w, memory_format))


def _group_norm_value(args: tuple, kwargs: dict, fake_cls: type) -> Optional[torch.Tensor]:
    """group_norm(x, num_groups, weight, bias, eps)'s output (x's shape and dtype, the layout
    torch gives it on x's device), or None: run it in full. (The full run also checks that a
    channel group holds more than one value; skipping that check drops a guard no diffusers
    shape can fail.)"""
    vals = _bind(args, kwargs, ("input", "num_groups", "weight", "bias", "eps"))
    if vals is None:
        return None
    x, groups = vals.get("input"), vals.get("num_groups")
    affine = [t for t in (vals.get("weight"), vals.get("bias")) if t is not None]
    if not isinstance(groups, int) or groups <= 0 or not _plain(x, affine, fake_cls) or x.dim() != 4:
        return None
    channels = x.shape[1]
    if not isinstance(channels, int) or channels % groups:
        return None
    if any(t.dim() != 1 or not known_eq(t.shape[0], channels) for t in affine):
        return None
    layout = _memory_format(x)  # answered only for an exactly contiguous or channels_last x
    if layout is None:
        return None
    # torch's group_norm keeps x's layout on the CPU only; elsewhere it makes x contiguous first
    # (so does the fake run: the full run on CUDA fakes gives contiguous strides).
    return _empty(x, x.shape, layout if x.device.type == "cpu" else torch.contiguous_format)


def _conv2d_value(args: tuple, kwargs: dict, fake_cls: type) -> Optional[torch.Tensor]:
    """conv2d(x, weight, bias, stride, padding, dilation, groups)'s output where it keeps the
    size (stride 1, dilation 1, one group, odd kernel, padding (k - 1) / 2) and x and the weight
    share one layout, contiguous or channels_last (torch's CUDA and CPU fakes then agree: that
    layout), or None: run it in full."""
    vals = _bind(args, kwargs, ("input", "weight", "bias", "stride", "padding", "dilation", "groups"))
    if vals is None:
        return None
    x, w, b = vals.get("input"), vals.get("weight"), vals.get("bias")
    if w is None or not _plain(x, [t for t in (w, b) if t is not None], fake_cls):
        return None
    if x.dim() != 4 or w.dim() != 4 or (b is not None and (b.dim() != 1 or not known_eq(b.shape[0], w.shape[0]))):
        return None
    kh, kw = w.shape[2], w.shape[3]
    if not (isinstance(kh, int) and isinstance(kw, int) and kh % 2 and kw % 2):
        return None
    padding = vals.get("padding", 0)
    if padding != "same" and int_pair(padding) != ((kh - 1) // 2, (kw - 1) // 2):
        return None
    if int_pair(vals.get("stride", 1)) != (1, 1) or int_pair(vals.get("dilation", 1)) != (1, 1) or vals.get("groups", 1) != 1:
        return None
    if not known_eq(x.shape[1], w.shape[1]):
        return None
    layout = _memory_format(x)
    if layout is None or _memory_format(w) != layout:
        return None
    return _empty(x, (x.shape[0], w.shape[0], x.shape[2], x.shape[3]), layout)


def _dropout_value(args: tuple, kwargs: dict, fake_cls: type) -> Optional[torch.Tensor]:
    """dropout(x, p, training, inplace) in eval mode or with p = 0: x itself, as torch returns
    it; None: run it in full."""
    vals = _bind(args, kwargs, ("input", "p", "training", "inplace"))
    if vals is None:
        return None
    x, p, training = vals.get("input"), vals.get("p", 0.5), vals.get("training", True)
    if not isinstance(x, fake_cls) or vals.get("inplace", False) is not False or not isinstance(training, bool):
        return None
    if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0.0 <= p <= 1.0:
        return None
    return x if (not training or p == 0) else None


_SHORTCUTS = {**{f: _linear_value for f in _LINEARS}, **{f: _layer_norm_value for f in _LAYER_NORMS},
              **{f: _group_norm_value for f in _GROUP_NORMS}, **{f: _conv2d_value for f in _CONV2DS},
              **{f: _dropout_value for f in _DROPOUTS}}


def _shortcut_or_full(target: Any, args: tuple, kwargs: dict, fake_cls: type, full: Callable[[], Any],
                      what: Callable[[], str]) -> Any:
    """A shortcut's value for target(*args, **kwargs) on fake tensors, or full() where none
    applies. Under CHECK the full run too, without the guards it would add (they are what the
    shortcut saves: a check that recorded them would trace another program), compared."""
    shortcut = _SHORTCUTS.get(target)
    value = shortcut(args, kwargs, fake_cls) if shortcut is not None else None
    if value is None:
        return full()
    if CHECK:
        with _guards_suppressed(value):
            expected = full()
        check_same_meta(value, expected, f"fake_shortcuts: {what()}: the shortcut gives")
    return value


def fake_value(target: Any, args: tuple, kwargs: dict, fake_mode: Any) -> Any:
    """target(*args, **kwargs) on fake tensors, for lyra's passes (their fake runs of torch ops
    they emit anew, e.g. conv_bias's convolution without its bias): a shortcut's answer where one
    applies, else the full run, as Dynamo's runs get them (run_node above)."""
    from torch._subclasses.fake_tensor import FakeTensor

    with fake_mode:
        return _shortcut_or_full(target, args, kwargs, FakeTensor, lambda: target(*args, **kwargs),
                                 lambda: f"{getattr(target, '__name__', target)} in a pass")
