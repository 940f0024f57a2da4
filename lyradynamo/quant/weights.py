"""Quantised copies of the model's linear weights, kept in step with the model.

For each weight a quantised lyra::qlinear reads, one `QuantWeight` holds:
  master   the high-precision weight: the Parameter itself (config.quant_master = "gpu"), or
           a host copy (= "host", the default on CUDA: the GPU keeps only the fp8/int8 copy;
           the Parameter's storage becomes a NaN placeholder so that running the original
           module eagerly fails loudly instead of silently using stale values);
  cols     None, or (offset, width): the copy covers master[:, offset:offset + width] only;
  qweight  (N, K) fp8 e4m3 / int8 and wscale (N,) float32 on the GPU (buffers of the graph);
  version  master._version when qweight was derived.
Column slices come from passes/split_cat.py (a linear over a concat becomes one linear per
part, each reading a narrow of the weight): each slice gets its own contiguous qweight (the
GEMM needs one) and its own per-output-channel scales over its K columns. All copies of one
Parameter share one master: a patch of it (a view's _version is its base's) re-derives every
slice, and the master moves to the host or back for all of them at once.
`refresh()` (run before every call of a quantised graph) re-derives the copies of exactly the
weights whose master changed in place since (LoRA loads and unloads, ControlNet weight
copies), writing into the same buffers, so CUDA graphs stay valid. Patch a quantised weight
through `master_weight(param)` (lyradynamo.lora does).
"""
from __future__ import annotations

import dataclasses
import logging
import threading
import weakref
from typing import Optional

import torch
from torch import Tensor

from . import host_copy, numerics

log = logging.getLogger("lyradynamo")

class TensorKeyed:
    """A map keyed by tensor identity that does not keep the tensor alive (a WeakKeyDictionary
    would compare tensors with `==`, which is elementwise)."""

    def __init__(self) -> None:
        self._d: dict[int, tuple] = {}

    def get(self, t: Tensor, default=None):
        item = self._d.get(id(t))
        return item[1] if item is not None and item[0]() is t else default

    def __setitem__(self, t: Tensor, value) -> None:
        key = id(t)
        self._d[key] = (weakref.ref(t, lambda _r, k=key: self._d.pop(k, None)), value)

    def pop(self, t: Tensor, default=None):
        value = self.get(t, default)
        self._d.pop(id(t), None)
        return value

    def clear(self) -> None:
        self._d.clear()


_lock = threading.Lock()
_by_param = TensorKeyed()  # Parameter -> {cols: QuantWeight}, all sharing one master
_placeholders: dict[tuple, Tensor] = {}  # (device, dtype) -> NaN storage shared by placeholders


@dataclasses.dataclass(eq=False)
class QuantWeight:
    name: str
    kind: str
    param: Tensor
    master: Tensor
    qweight: Tensor
    wscale: Tensor
    smooth: Optional[Tensor]  # SmoothQuant s (K,) folded into the weight (x is multiplied by 1/s)
    inv_smooth: Optional[Tensor]
    cols: Optional[tuple[int, int]] = None  # (offset, width) of the columns this copy covers
    version: int = -1
    param_version: int = -1

    def derive(self) -> None:
        """(Re)compute qweight / wscale from master (its columns `cols`), in place."""
        w = self.master if self.cols is None else self.master.narrow(1, *self.cols)
        # blocking: the host master may be patched again right after this returns
        w = w.to(self.qweight.device)
        if self.smooth is not None:
            w = w.float() * self.smooth.to(w.device)[None, :]
        q, s = numerics.quantize_rows(w, self.kind)
        self.qweight.copy_(q)
        self.wscale.copy_(s)
        self.version = self.master._version
        self.param_version = self.param._version

    def stale(self) -> bool:
        return self.master._version != self.version

    def param_patched(self) -> bool:
        """The placeholder Parameter was written to (a patch that bypassed master_weight)."""
        return self.master is not self.param and self.param._version != self.param_version


def sliced_name(name: str, cols: Optional[tuple[int, int]]) -> str:
    """'proj_out.weight[:, 0:3072]' for columns (0, 3072) of 'proj_out.weight'."""
    return name if cols is None else f"{name}[:, {cols[0]}:{cols[0] + cols[1]}]"


def quantize_weight(name: str, param: Tensor, kind: str, smooth: Optional[Tensor],
                    cols: Optional[tuple[int, int]] = None) -> QuantWeight:
    """The QuantWeight of `param` (of its columns `cols`) for `kind`, created on first use and
    shared by all graphs. `name` is the Parameter's; `smooth` covers all its columns."""
    n, k = param.shape
    if cols == (0, k):
        cols = None
    if smooth is not None and cols is not None:
        smooth = smooth.narrow(0, *cols)
    with _lock:
        group = _by_param.get(param)
        if group is None:
            group = _by_param[param] = {}
        entry = group.get(cols)
        if entry is not None and entry.kind == kind and _same(entry.smooth, smooth):
            return entry
        master = next(iter(group.values())).master if group else param
        width = k if cols is None else cols[1]
        qweight = torch.empty((n, width), dtype=numerics.QDTYPE[kind], device=param.device)
        wscale = torch.empty((n,), dtype=torch.float32, device=param.device)
        inv = None if smooth is None else (1.0 / smooth.float()).to(param.device)
        entry = QuantWeight(sliced_name(name, cols), kind, param, master, qweight, wscale,
                            None if smooth is None else smooth.float().cpu(), inv, cols)
        entry.derive()
        group[cols] = entry
        return entry


def quantize_jointly(names: list, params: list, kind: str) -> bool:
    """Whole-weight, unsmoothed quantised copies of `params` (same K), allocated as adjacent rows
    of one qweight buffer and one wscale buffer, in this order, so that one GEMM can read them
    all. False (nothing done) when any of them already has a quantised copy of this kind (an
    earlier graph's, reused as it is). Copies of another kind (an earlier compilation with
    another config.quant) are replaced, as quantize_weight replaces them: the new copies derive
    from the same master (the host copy, where the Parameter is a placeholder)."""
    if len({p.shape[1] for p in params}) != 1 or len({p.device for p in params}) != 1:
        return False
    with _lock:
        groups = [_by_param.get(p) or {} for p in params]
        if any(e.kind == kind for g in groups for e in g.values()):
            return False
        rows = sum(p.shape[0] for p in params)
        k, device = params[0].shape[1], params[0].device
        qall = torch.empty((rows, k), dtype=numerics.QDTYPE[kind], device=device)
        sall = torch.empty((rows,), dtype=torch.float32, device=device)
        off = 0
        for name, p, group in zip(names, params, groups):
            n = p.shape[0]
            master = next(iter(group.values())).master if group else p
            entry = QuantWeight(name, kind, p, master, qall[off:off + n], sall[off:off + n], None, None)
            entry.derive()
            _by_param[p] = {**group, None: entry}
            off += n
    return True


def _same(a: Optional[Tensor], b: Optional[Tensor]) -> bool:
    if a is None or b is None:
        return a is b
    return a.shape == b.shape and torch.equal(a.cpu().float(), b.cpu().float())


def _offloadable(param: Tensor) -> bool:
    """Whether moving the master to the host frees anything (on the CPU it would not)."""
    return param.is_cuda


def offload_master(param: Tensor) -> None:
    """Move the high-precision weight to the host; the Parameter keeps shape, strides, dtype and
    device (Dynamo's guards) but points into a shared NaN placeholder. Every quantised copy of
    the Parameter (whole or column slices) follows the host copy from then on."""
    group = _by_param.get(param) or {}
    if not group or next(iter(group.values())).master is not param or not _offloadable(param):
        return
    with torch.no_grad():
        host = host_copy.to_host(param)
        param.data = _placeholder(param)
        _set_master(group.values(), host, param)


def _set_master(entries, master: Tensor, param: Tensor) -> None:
    """Point entries at `master` (holding the values they were derived from: no re-derive)."""
    for entry in entries:
        entry.master = master
        entry.version = master._version
        entry.param_version = param._version


def _placeholder(param: Tensor) -> Tensor:
    key = (param.device, param.dtype)
    buf = _placeholders.get(key)
    if buf is None or buf.numel() < param.numel():
        buf = torch.full((max(param.numel(), 1 << 20),), float("nan"), dtype=param.dtype, device=param.device)
        _placeholders[key] = buf
    return buf[: param.numel()].view(param.shape)


def refresh(entries) -> int:
    """Re-derive the quantised copies whose master changed in place; returns how many."""
    done = 0
    for entry in entries:
        if entry.param_patched():
            raise RuntimeError(
                f"lyradynamo: the weight {entry.name} is quantised and its high-precision copy lives "
                "on the host; it was patched through the Parameter, which is only a placeholder. "
                "Patch it through lyradynamo.quant.master_weight(param) (lyradynamo.lora does), or "
                "set lyradynamo.config.quant_master = 'gpu'.")
        if entry.stale():
            entry.derive()
            done += 1
    if done:
        log.info("lyradynamo: re-quantised %d weight(s) changed in place", done)
    return done


def master_weight(param: Tensor) -> Tensor:
    """The tensor holding `param`'s high-precision values: patch this one in place."""
    group = _by_param.get(param)
    return next(iter(group.values())).master if group else param


def entry_of(param: Tensor, cols: Optional[tuple[int, int]] = None) -> Optional[QuantWeight]:
    """The quantised copy of `param` (of its columns `cols`), if there is one."""
    return (_by_param.get(param) or {}).get(cols)


def entries_of(param: Tensor) -> list[QuantWeight]:
    """All quantised copies of `param`: the whole weight and / or column slices."""
    return list((_by_param.get(param) or {}).values())


def restore(model: torch.nn.Module) -> int:
    """Put the high-precision weights of `model` back into its Parameters (on their device), e.g.
    to run the module eagerly again. Compiled graphs keep working and keep following them."""
    count = 0
    with torch.no_grad():
        for p in model.parameters():
            master = master_weight(p)
            if master is p:
                continue
            p.data = master.to(p.device)
            _set_master(entries_of(p), p, p)
            count += 1
    return count
