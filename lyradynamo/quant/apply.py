"""Turn a graph's lyra::linear nodes into lyra::qlinear (config.quant = "fp8" | "int8").

    lyra::linear(x, W, b, act, glu, gate, residual)     W a model Parameter (graph input)
 -> lyra::qlinear(x, Wq, Ws, b, act, glu, gate, residual, kind, inv_smooth)
with Wq / Ws (and inv_smooth) buffers of the graph module, derived from W by weights.py.
Layers stay in high precision by name (config.quant_exclude, regexes on the module path such
as "transformer_blocks.0.attn.to_q.weight"), because their shape does not fit the quantised
GEMM, because they are 1x1 convolutions run as GEMMs (passes/conv1x1.py; no convolution is
quantised), because a 16-bit model runs them in float32 (modules it keeps in float32: the
quantised GEMMs take fp16 / bf16), or because no kernel can hand them their input quantised (quant/input_pass.py,
config.quant_input_pass); the report lists every layer with its decision. With config.quant_master = "host" the
high-precision copy of a weight used only by quantised linears leaves the GPU.

A weight may also arrive as column slices, `narrow(W, 1, offset, width)` (passes/split_cat.py:
one linear per part of a concatenated input). Each slice is quantised on its own (its own
scales over its K columns, its own contiguous buffer) and decided on its own (shape), under
the Parameter's module path (exclusion) reported as 'path[:, offset:offset+width]'; the
Parameter leaves the GPU only when every slice of it is quantised.
"""
from __future__ import annotations

import re
import time
from typing import NamedTuple, Optional

import torch
import torch.fx as fx

from .. import config, params
from ..ops.qlinear import shape_unsupported
from ..passes import conv1x1
from ..passes import matcher as m
from ..passes.adaln import out_dtype as adaln_out_dtype
from . import attention as quant_attention
from . import calibration, input_pass, weights

_LINEAR = torch.ops.lyra.linear.default
_QLINEAR = torch.ops.lyra.qlinear.default
_QLINEAR_Q = torch.ops.lyra.qlinear_q.default
_ADALN = torch.ops.lyra.adaln.default
_ADALN_QUANT = torch.ops.lyra.adaln_quant.default
_QUANTIZE = torch.ops.lyra.quantize.default
_QLINEAR_Q_QOUT = torch.ops.lyra.qlinear_q_qout.default


def module_path(node: fx.Node) -> str:
    """'transformer_blocks.0.attn.to_q.weight' for a placeholder Dynamo made from that Parameter
    (or lyra lifted from a graph attribute: params.py)."""
    name = node.meta.get(params.SOURCE_META)
    if name is None:
        source = getattr(node.meta.get("grapharg"), "source", None)
        name = getattr(source, "name", None)
        name = name() if callable(name) else name
    if not isinstance(name, str):
        return node.name
    keys = [k for k in re.findall(r"\['([^']*)'\]", name) if k not in ("_modules", "_parameters", "_buffers")]
    # keys[0] is the frame's local holding the root module ("self", or any other name)
    return ".".join(keys[1:]) or node.name


def _column_slice(w_node):
    """(source, (offset, width)) for w_node = narrow(source, 1, offset, width) with int
    offset and width, else (w_node, None)."""
    if (isinstance(w_node, fx.Node) and w_node.op == "call_function" and w_node.target is torch.narrow
            and len(w_node.args) == 4 and not w_node.kwargs and w_node.args[1] == 1
            and all(type(a) is int for a in w_node.args[2:])):
        return w_node.args[0], tuple(w_node.args[2:])
    return w_node, None


# a 1x1 convolution that passes/conv1x1.py turned into a lyra::linear: not a linear layer of the
# model, so not in the report's "kept" list but in its own ("conv1x1_16bit")
CONV1X1_REASON = "a 1x1 convolution run as a GEMM (passes/conv1x1.py): convolutions stay 16-bit"


def _conv_weight(src) -> bool:
    return (isinstance(src, fx.Node) and bool(src.meta.get(conv1x1.CONV_WEIGHT_META))
            and isinstance(src.args[0], fx.Node))


class _Decision(NamedTuple):
    param: Optional[torch.Tensor]  # the model Parameter, or None (a weight computed in the graph)
    source: object  # the graph input W (or whatever the weight is when it is not one)
    cols: Optional[tuple[int, int]]  # (offset, width) when the linear reads a column slice of W
    path: str  # W's module path: the exclusion patterns match it
    reason: Optional[str]  # why it stays in high precision, None = quantise

    @property
    def name(self) -> str:  # in the report
        return weights.sliced_name(self.path, self.cols)


def _decider(real: dict, kind: str):
    """w_node (a weight, or a column slice of one) -> its _Decision, worked out once."""
    decisions: dict = {}

    def decide(w_node) -> _Decision:
        if w_node not in decisions:
            src, cols = _column_slice(w_node)
            is_node = isinstance(src, fx.Node)
            param = real.get(src) if is_node else None
            path = module_path(src) if is_node else str(src)
            reason = None
            if _conv_weight(src):
                path, reason = module_path(src.args[0]), CONV1X1_REASON
            decisions[w_node] = _Decision(param, src, cols, path, reason or _reason(param, path, cols, kind))
        return decisions[w_node]

    def keep(w_node, reason: str) -> None:
        """w_node stays in high precision for `reason` (a decision made on the graph, not the name)."""
        decisions[w_node] = decide(w_node)._replace(reason=reason)

    decide.keep = keep
    return decide


def _quantised_reader(u: fx.Node, w_node: fx.Node, decide) -> bool:
    """u reads w_node only as the weight of a lyra::linear that will be quantised."""
    return (u.op == "call_function" and u.target is _LINEAR and u.args[1] is w_node
            and w_node not in (u.args[0], *u.args[2:]) and not decide(w_node).reason)


def _only_quantised_readers(real: dict, decide) -> set:
    """Weight placeholders every reader of which is a lyra::linear that will be quantised, or a
    column slice all readers of which are: their high-precision GPU copy is not needed after
    quantisation."""
    def done_with(u, w_node):
        if _column_slice(u)[0] is w_node:
            return bool(u.users) and all(_quantised_reader(r, u, decide) for r in u.users)
        return _quantised_reader(u, w_node, decide)

    return {w for w in real if w.users and all(done_with(u, w) for u in w.users)}


def _excluded(path: str):
    for pattern in config.quant_exclude:
        if re.search(pattern, path):
            return pattern
    return None


def quantize_graph(gm: fx.GraphModule, example_inputs: list, report) -> list:
    """Rewrite gm in place; returns the QuantWeight entries the graph reads (for refresh)."""
    kind = config.quant
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    real = {n: example_inputs[i] for i, n in enumerate(placeholders) if i < len(example_inputs)}
    quantized, kept, entries, attrs, convs = [], {}, {}, {}, []
    decide = _decider(real, kind)
    for node, why in _float32_islands(gm).items():
        decide.keep(node.args[1], why)
    for node, why in input_pass.unfused_linears(gm, lambda n: not decide(n.args[1]).reason, kind).items():
        decide.keep(node.args[1], why)
    # report.phases_s: wall seconds of weight quantisation and host offload (no device sync of its
    # own: a quantisation kernel still running is counted in the offload, whose copy waits for it)
    t_quant = t_offload = 0.0
    offload = _only_quantised_readers(real, decide) if config.quant_master == "host" else set()
    if "shared_input" in config.passes:
        t0 = time.perf_counter()
        _allocate_siblings_jointly(gm, decide, kind)
        t_quant += time.perf_counter() - t0
    for node in list(gm.graph.nodes):
        if not (node.op == "call_function" and node.target is _LINEAR):
            continue
        d = decide(node.args[1])
        if d.reason == CONV1X1_REASON:
            convs.append(d.name)
            continue
        if d.reason:
            kept[d.name] = d.reason
            continue
        key = (d.source, d.cols)
        entry = entries.get(key)
        if entry is None:
            smooth = calibration.smooth_of(d.param) if kind == "int8" else None
            t0 = time.perf_counter()
            entry = weights.quantize_weight(d.path, d.param, kind, smooth, d.cols)
            entries[key] = entry
            t_quant += time.perf_counter() - t0
            if d.source in offload:  # at once: the GPU never holds all bf16 and fp8 copies together
                t0 = time.perf_counter()
                weights.offload_master(d.param)
                t_offload += time.perf_counter() - t0
            idx = len(entries) - 1
            attrs[key] = []
            for tag, t in (("qw", entry.qweight), ("ws", entry.wscale), ("is", entry.inv_smooth)):
                if t is not None:
                    gm.register_buffer(f"_lyra_{tag}{idx}", t, persistent=False)
                attrs[key].append(f"_lyra_{tag}{idx}" if t is not None else None)
        with gm.graph.inserting_before(node):
            qw, ws, inv = (gm.graph.get_attr(a) if a else None for a in attrs[key])
        for n, t in ((qw, entry.qweight), (ws, entry.wscale), (inv, entry.inv_smooth)):
            if n is not None:
                n.meta["example_value"] = _fake_like(node, t)
        x, _, bias, act, glu, gate, residual = node.args
        node.target = _QLINEAR
        node.args = (x, qw, ws, bias, act, glu, gate, residual, kind, inv)
        node.meta["lyra"] = node.meta.get("lyra", "linear").replace("linear", f"qlinear[{kind}]", 1)
        quantized.append(d.name)
    for n in list(gm.graph.nodes):  # slices now read through their quantised copies: dead
        if not n.users and _column_slice(n)[1] is not None:
            gm.graph.erase_node(n)
    attention = quant_attention.quantise_attention(gm) if quantized and kind == "fp8" else {"fp8": 0}
    activation = _share_activation_quant(gm, kind) if quantized else {}
    if quantized:
        activation["fused_into_producer"] = _quantise_activated_outputs(gm, kind)
        activation["separate_passes"] = input_pass.separate_passes(gm)
    gm.graph.lint()
    gm.recompile()
    report.phases_s.update(quant_weights=t_quant, quant_offload=t_offload)
    report.quant = {"kind": kind, "quantized": quantized, "kept": kept, "conv1x1_16bit": convs,
                    "master": config.quant_master, "activation_quant": activation, "attention": attention,
                    "input_pass": input_pass.policy(kind)}
    return list(entries.values())


def _allocate_siblings_jointly(gm: fx.GraphModule, decide, kind: str) -> None:
    """Quantised copies of linears that read one input (passes/shared_input.py's groups) go into
    one buffer, so that the shared-input pass can run them as one GEMM."""
    from ..passes import shared_input

    for group in shared_input.sibling_groups(gm.graph, _LINEAR, capped=False):
        # members kept in high precision leave the group (they stay lyra::linear); the rest is
        # cut the way shared_input cuts the quantised group later
        for nodes in shared_input.cap_runs([n for n in group if not decide(n.args[1]).reason]):
            ds = [decide(n.args[1]) for n in nodes]
            if any(d.cols is not None for d in ds):
                continue
            if kind == "int8" and any(calibration.smooth_of(d.param) is not None for d in ds):
                continue  # smoothed siblings quantise x each their own way
            weights.quantize_jointly([d.path for d in ds], [d.param for d in ds], kind)


def _share_activation_quant(gm: fx.GraphModule, kind: str) -> dict:
    """Quantise each activation once for all the quantised linears reading it, inside the
    lyra::adaln that produces it when nothing else reads it (lyra::adaln_quant)."""

    readers: dict = {}
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is _QLINEAR and node.args[9] is None:
            readers.setdefault(node.args[0], []).append(node)
    counts = {"fused_into_norm": 0, "shared": 0}
    for x, users in readers.items():
        xv = m.val(x)
        mode = getattr(xv, "fake_mode", None)
        if not isinstance(xv, torch.Tensor) or not xv.is_floating_point():
            continue
        fuse = (x.op == "call_function" and x.target is _ADALN and set(x.users) == set(users)
                and adaln_out_dtype(x) is None)  # lyra::adaln_quant has no float32 island
        if not fuse and len(users) < 2:
            continue  # one reader: qlinear quantises on its own, same cost
        if fuse:
            # adaln's (x, weight, bias, mul, add, norm, eps), the quant kind, then adaln's mul_offset if given
            args = (*x.args[:7], kind, *x.args[7:])
            q, sc = _pair(gm, _ADALN_QUANT, args, mode, gm.graph.inserting_after(x))
        else:
            q, sc = _pair(gm, _QUANTIZE, (x, kind, None), mode, gm.graph.inserting_after(x))
        _read_quantised(gm, users, q, sc, xv.dtype)
        if fuse:
            gm.graph.erase_node(x)
        counts["fused_into_norm" if fuse else "shared"] += 1
    return counts


def _pair(gm: fx.GraphModule, target, args, mode, where):
    """target(*args), an op returning (q, scale), inserted at `where` (a graph inserting_*
    context); returns the (q, scale) getitem nodes, fake values filled in."""

    value = m.fake_run(target, args, mode)  # first: a failure leaves the graph as it was
    with where:
        pair = gm.graph.call_function(target, args)
    pair.meta["example_value"] = value
    q, sc = m.getitems(gm.graph, pair, 2)
    return q, sc


def _read_quantised(gm: fx.GraphModule, readers, q: fx.Node, sc: fx.Node, out_dtype: torch.dtype) -> None:
    """Each lyra::qlinear in `readers` becomes a lyra::qlinear_q reading (q, sc) instead of
    quantising its x itself."""
    for u in readers:
        _, qw, ws, bias, act, glu, gate, residual, k, _ = u.args
        with gm.graph.inserting_before(u):
            new = gm.graph.call_function(_QLINEAR_Q, (q, sc, qw, ws, bias, act, glu, gate, residual, k, out_dtype))
        new.meta.update({key: u.meta[key] for key in ("example_value", "stack_trace", "nn_module_stack")
                         if key in u.meta})
        new.meta["lyra"] = u.meta.get("lyra", "qlinear")
        u.replace_all_uses_with(new)
        gm.graph.erase_node(u)


def _quantise_activated_outputs(gm: fx.GraphModule, kind: str) -> int:
    """A quantised linear with an activation (act or GLU; no gate / residual) whose output only
    quantised linears read (through x, unsmoothed) hands them its output quantised: its epilogue
    kernel applies the activation and quantises (lyra::qlinear_q_qout), the readers become
    lyra::qlinear_q. FLUX: ff.net.0 (GELU) -> ff.net.2, the single blocks' proj_mlp -> proj_out."""

    n_fused = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in (_QLINEAR, _QLINEAR_Q):
            continue
        q_in = node.target is _QLINEAR_Q
        bias, act, glu, gate, residual = node.args[4:9] if q_in else node.args[3:8]
        nv = m.val(node)
        readers = list(node.users)
        if (act == "none" and not glu) or gate is not None or residual is not None or not readers \
                or not isinstance(nv, torch.Tensor):
            continue
        if not all(u.op == "call_function" and u.target is _QLINEAR and u.args[0] is node
                   and node not in u.args[1:] and u.args[9] is None and u.args[8] == kind for u in readers):
            continue
        mode = getattr(nv, "fake_mode", None)
        if q_in:
            xq, xs, qw, ws = node.args[:4]
        else:
            x, qw, ws, _, _, _, _, _, _, inv = node.args
            xq, xs = _pair(gm, _QUANTIZE, (x, kind, inv), mode, gm.graph.inserting_before(node))
        q, sc = _pair(gm, _QLINEAR_Q_QOUT, (xq, xs, qw, ws, bias, act, glu, kind, nv.dtype), mode,
                      gm.graph.inserting_before(node))
        _read_quantised(gm, readers, q, sc, nv.dtype)
        gm.graph.erase_node(node)
        n_fused += 1
    return n_fused


def _float32_islands(gm: fx.GraphModule) -> dict:
    """The linears of a 16-bit model that run in float32 (modules it keeps in float32, such as
    Wan's time embedder under from_pretrained's _keep_in_fp32_modules) -> why they stay in high
    precision: the quantised GEMMs take and give fp16 / bf16 activations. A model that is all
    float32 keeps its linears quantised (the PyTorch reference on the CPU)."""
    half = set(m.HALF_DTYPES)
    other = {n: {getattr(m.val(a), "dtype", None) for a in (n.args[0], n)} - half  # input, output
             for n in gm.graph.nodes if n.op == "call_function" and n.target is _LINEAR}
    if all(other.values()):  # no linear with 16-bit activations: not a 16-bit model
        return {}
    return {n: f"its activations are {', '.join(sorted(map(str, d)))} in a 16-bit model (the quantised "
               "GEMMs take and give fp16 / bf16)" for n, d in other.items() if d - {None}}


def _reason(param, path: str, cols, kind: str):
    if not isinstance(param, torch.nn.Parameter) or param.dim() != 2:
        return "weight is not a model Parameter (computed in the graph)"
    if param.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"weight dtype {param.dtype}"
    pattern = _excluded(path)
    if pattern:
        return f"kept in high precision by config.quant_exclude pattern {pattern!r}"
    return shape_unsupported(param.shape[0], param.shape[1] if cols is None else cols[1], kind)


def _fake_like(node: fx.Node, t: torch.Tensor):
    """A fake tensor for a new buffer (static shape, t's strides, dtype and device), in the fake
    mode of the graph's traced values, made from a meta tensor: mode.from_tensor converted each
    real buffer through meta_utils at ~1 ms a call, 1.6 s of SDXL's fp8 compile (1478 buffers),
    and an empty_strided under the mode took ~0.5 ms (CPU profile, NOTES session 15)."""
    mode = getattr(node.meta.get("example_value"), "fake_mode", None)
    if mode is None:
        return None
    from_meta = getattr(mode.fake_tensor_converter, "from_meta_and_device", None)
    if from_meta is None:  # a torch without it: the general conversion
        return mode.from_tensor(t, static_shapes=True)
    meta = torch.empty_strided(tuple(t.shape), t.stride(), dtype=t.dtype, device="meta")
    return from_meta(mode, meta, t.device)
