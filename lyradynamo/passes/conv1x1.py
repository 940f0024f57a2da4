"""A 1x1 convolution over channels_last activations, as a linear over the channels.

    y = conv2d(x, w, b)     w (Cout, Cin, 1, 1), stride 1, padding 0, groups 1; x 16-bit and
                            NHWC in memory on the GPU ((B*H*W, C) rows); Cin, Cout % 8 == 0
 => y = linear(x.permute(0, 2, 3, 1), w.flatten(1), b).permute(0, 3, 1, 2)
and, where y's only reader adds a residual r of y's shape that is also NHWC, r is not itself a
convolution and no output scale follows (a Transformer2D's proj_out: `proj_out(h) + residual`):
    y + r => (linear(x', w', b) + r.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

The linear pass then puts the bias (and the residual) in the GEMM's epilogue: one kernel where the
convolution took two (cuDNN's convolution, then lyra::bias_residual's pass over the output: see
conv_bias.py), and a ResNet shortcut's bias no longer needs the weight-only `b + b_shortcut` add
that conv_bias forms when both sides of the residual are convolutions. SD1.5's UNet has 46 such
kernels per call (16 proj_in, 16 proj_out, 14 shortcuts). Where r is a convolution (a ResNet's
conv2) or a scale follows, conv_bias folds the add into that convolution's bias pass instead.

Which activations are NHWC. The traced strides do not say it everywhere: aten's GroupNorm is
traced NCHW (lyra::group_norm, which replaces it, keeps its input's format), and a 1x1
convolution follows its input's format, so one traced after an NCHW-traced norm is NCHW in the
trace and NHWC on the GPU. `runtime_nhwc` follows the formats through the graph the way the ops
set them on CUDA (convolutions with a channels_last spatial kernel, lyra's norms and bias passes,
elementwise ops and cats of NHWC tensors, upsampling). Only the speed depends on it: the rewrite
is exact for any layout (a GEMM over a strided input copies it first).

The permutes are views. `w.flatten(1)` is a view of the Parameter (a 1x1 kernel is (Cout, Cin)
rows in both memory formats): in-place patches (LoRA, ControlNet) reach the GEMM. Quantisation
keeps these linears in 16-bit, as it keeps every convolution (quant/apply.py). Only patterns:
the layout and the kernel size decide, never a module's name.
"""
from __future__ import annotations

import numbers
import operator
from typing import Any, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F

from . import matcher as m
from .report import GraphReport

_DTYPES = (torch.float16, torch.bfloat16)
# set on the linear's weight node (w.flatten(1)): quant/apply.py names why it stays 16-bit
CONV_WEIGHT_META = "lyra_conv1x1_weight"
CL = torch.channels_last
_KEEPS_FIRST_INPUT_FORMAT = {torch.ops.lyra.group_norm.default, torch.ops.lyra.bias_residual.default,
                             F.interpolate, F.silu, torch._C._nn.silu, F.gelu, torch._C._nn.gelu,
                             F.dropout, torch.clone}
_ELEMENTWISE = m.ADD | m.MUL | {operator.sub, operator.truediv, torch.sub, torch.div}


def _traced_nhwc(v: Any) -> bool:
    """Traced channels_last and not also NCHW (C > 1 and H * W > 1), read from the sizes' and
    strides' example values: a fake tensor's is_contiguous(memory_format=...) with symbolic
    sizes worked the strides out symbolically on every call (~1 ms each, 1.2 s for SD1.5)."""
    if not (isinstance(v, torch.Tensor) and v.dim() == 4):
        return False
    n, c, h, w = (m.hint(d, allow_none=True) for d in v.shape)
    s = tuple(m.hint(d, allow_none=True) for d in v.stride())
    if None in (n, c, h, w) or None in s:  # a data-dependent size: not read as NHWC
        return False
    return c > 1 and h * w > 1 and s[1] == 1 and s[3] == c and s[2] == w * c and (n == 1 or s[0] == h * w * c)


def runtime_nhwc(graph: fx.Graph) -> set:
    """The 4-D nodes whose value is NHWC when the graph runs on CUDA (module docstring)."""
    out: set = set()
    for node in graph.nodes:
        v = m.val(node)
        if not (isinstance(v, torch.Tensor) and v.dim() == 4):
            continue
        if _traced_nhwc(v):
            out.add(node)
        elif node.op != "call_function":
            continue
        elif m.is_fn(node, m.CONV2D):
            w = m.arg(node, 1, "weight")
            if m.arg(node, 0, "input") in out or _traced_nhwc(m.val(w)):
                out.add(node)
        elif node.target in _KEEPS_FIRST_INPUT_FORMAT:
            if node.args and node.args[0] in out:
                out.add(node)
        elif node.target is torch.cat:  # NHWC when every input is
            parts = node.args[0] if node.args else ()
            if parts and all(isinstance(a, fx.Node) and a in out for a in parts):
                out.add(node)
        elif m.is_fn(node, _ELEMENTWISE):  # NHWC when every full-size operand is
            full = [a for a in node.args if isinstance(a, fx.Node) and isinstance(m.val(a), torch.Tensor)
                    and m.same_shape(m.val(a), v)]
            if full and all(a in out for a in full):
                out.add(node)
        elif m.is_method(node, "contiguous") and node.kwargs.get("memory_format") is CL:
            out.add(node)
    return out


def unsupported(conv: fx.Node, nhwc: set) -> Optional[str]:
    """Why conv is not rewritten (None: it is); nhwc from runtime_nhwc."""
    x, w = m.arg(conv, 0, "input"), m.arg(conv, 1, "weight")
    b = m.arg(conv, 2, "bias")
    xv, wv = m.val(x), m.val(w)
    if not (isinstance(wv, torch.Tensor) and wv.dim() == 4 and tuple(wv.shape[2:]) == (1, 1)):
        return "kernel is not 1x1"
    if not (m.int_pair(m.arg(conv, 3, "stride", 1)) == (1, 1)
            and m.int_pair(m.arg(conv, 4, "padding", 0)) == (0, 0) and m.arg(conv, 6, "groups", 1) == 1):
        return "stride, padding or groups"
    if not isinstance(xv, torch.Tensor) or xv.dtype not in _DTYPES or wv.dtype != xv.dtype:
        return "not 16-bit"
    if x not in nhwc:
        return "its input is not NHWC on the GPU"
    cout, cin = (m.hint(s) for s in wv.shape[:2])
    if cin % 8 or cout % 8 or m.hint(wv.stride(1)) != 1 or m.hint(wv.stride(0)) != cin:
        return "channels not a multiple of 8, or a weight that is not (Cout, Cin) rows"
    bv = m.val(b)
    if b is not None and not (isinstance(bv, torch.Tensor) and bv.dim() == 1 and bv.dtype == xv.dtype):
        return "bias"
    return None


def _same_shape_dtype(a: Any, b: Any) -> bool:
    return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
            and m.same_shape(a, b))


def _residual(conv: fx.Node, nhwc: set) -> Optional[tuple[fx.Node, fx.Node]]:
    """(add, r) when y = conv's only reader is `y + r` / `r + y` that the GEMM can take."""
    add = m.only_user(conv)
    if not (m.is_fn(add, m.ADD) and len(add.args) == 2 and not add.kwargs):
        return None
    r = m.other_operand(add, conv)
    yv = m.val(conv)
    if not (isinstance(r, fx.Node) and r is not conv and r in nhwc and _same_shape_dtype(m.val(r), yv)
            and _same_shape_dtype(m.val(add), yv)):
        return None
    if m.is_fn(r, m.CONV2D):
        return None  # conv_bias folds the add into r's bias pass (and r's bias joins it)
    nxt = m.only_user(add)
    if nxt is not None and (m.is_fn(nxt, m.MUL | {operator.truediv, torch.div})
                            and any(isinstance(a, numbers.Number) for a in nxt.args)):
        return None  # a scale follows: conv_bias's bias_residual takes it
    return add, r


def _values(x: fx.Node, w: fx.Node, root: fx.Node, fake_mode) -> tuple:
    """Traced values of the new nodes, as the GPU has them: x's and the output's NHWC rows, the
    (Cout, Cin) weight, the output NHWC. Built from the traced values already there with as few
    fake-tensor calls as possible (2-4 per convolution: with symbolic sizes each costs a few ms,
    and SD1.5 has 46 of these convolutions)."""
    def run(fn, v):
        return m.fake_run(fn, (v,), fake_mode)

    xv, yv = m.val(x), m.val(root)
    x_rows = run(lambda t: t.permute(0, 2, 3, 1), xv if _traced_nhwc(xv) else run(_to_nhwc, xv))
    y = yv if _traced_nhwc(yv) else run(_to_nhwc, yv)
    out_rows = run(lambda t: t.permute(0, 2, 3, 1), y)
    w_rows = run(lambda t: t.flatten(1), m.val(w))  # static sizes: cheap
    return x_rows, w_rows, out_rows, y


def _to_nhwc(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=CL)


def _rewrite(graph: fx.Graph, conv: fx.Node, nhwc: set, fake_mode) -> str:
    x, w = m.arg(conv, 0, "input"), m.arg(conv, 1, "weight")
    b = m.arg(conv, 2, "bias")
    res = _residual(conv, nhwc)
    root = res[0] if res is not None else conv
    x_val, w_val, out_val, y_val = _values(x, w, root, fake_mode)  # first: a failure changes nothing
    def emit(target, args, value):
        return m.emit(graph, target, args, {}, value, conv)

    with graph.inserting_before(root):
        x_rows = emit(torch.permute, (x, (0, 2, 3, 1)), x_val)
        w_rows = emit(torch.flatten, (w, 1), w_val)
        w_rows.meta[CONV_WEIGHT_META] = True
        out = emit(F.linear, (x_rows, w_rows, b), out_val)
        if res is not None:  # r's NHWC rows: the output's shape, dtype and strides
            r_rows = emit(torch.permute, (res[1], (0, 2, 3, 1)), out_val)
            out = emit(operator.add, (out, r_rows), out_val)
        y = emit(torch.permute, (out, (0, 3, 1, 2)), y_val)
    root.replace_all_uses_with(y)
    m.erase_unused(graph, [root, conv])
    nhwc.add(y)
    return "conv1x1->linear" + ("+bias" if b is not None else "") + ("+residual" if res is not None else "")


def run(graph: fx.Graph, fake_mode, report: GraphReport) -> None:
    if fake_mode is None:  # the rewrite needs traced values for its new nodes
        return
    nhwc = runtime_nhwc(graph)
    for conv in list(graph.nodes):
        if not m.is_fn(conv, m.CONV2D):
            continue
        why = unsupported(conv, nhwc)
        if why is None:
            report.hit("conv1x1", _rewrite(graph, conv, nhwc, fake_mode))
        elif why != "kernel is not 1x1":
            report.skip(conv, "conv1x1: " + why)
