"""SmoothQuant calibration for INT8: `lyradynamo.quant.calibrate(model, example_inputs)`.

Runs the model eagerly on the example inputs, records each nn.Linear's per-input-channel
activation absmax, and stores smoothing factors s = absmax**alpha / max|W|**(1 - alpha)
(numerics.smooth_factors) per weight. An int8 graph compiled afterwards multiplies the
weight columns by s before quantising and the activations by 1/s inside the quantisation
kernel, moving outliers from activations into weights. Optional: without calibration int8
quantises plain per-token x per-channel.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import Tensor

from . import numerics
from .weights import TensorKeyed

_smooth = TensorKeyed()


def calibrate(model: torch.nn.Module, example_inputs, alpha: float = 0.5) -> int:
    """Record activation ranges on `example_inputs` (a kwargs dict, or a list of them) and set the
    smoothing factors of every nn.Linear of `model`. Returns the number of layers calibrated.
    Call it before compiling with config.quant = "int8"."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"calibrate: alpha must be in [0, 1], got {alpha}")
    model = getattr(model, "_orig_mod", model)
    batches = [example_inputs] if isinstance(example_inputs, dict) else list(example_inputs)
    if not batches or not all(isinstance(b, dict) for b in batches):
        raise ValueError("calibrate: example_inputs must be a dict of model kwargs or a list of them")
    absmax: dict[torch.nn.Linear, Tensor] = {}

    def hook(mod, args):
        x = args[0].detach()
        a = x.reshape(-1, x.shape[-1]).abs().amax(dim=0).float()
        absmax[mod] = a if mod not in absmax else torch.maximum(absmax[mod], a)

    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    handles = [m.register_forward_pre_hook(hook) for m in linears]
    try:
        with torch.no_grad():
            for kwargs in batches:
                model(**kwargs)
    finally:
        for h in handles:
            h.remove()
    for mod, a in absmax.items():
        _smooth[mod.weight] = numerics.smooth_factors(a, mod.weight.detach(), alpha).cpu()
    return len(absmax)


def smooth_of(param: Tensor) -> Optional[Tensor]:
    return _smooth.get(param)


def clear(params: Optional[Iterable[Tensor]] = None) -> None:
    if params is None:
        _smooth.clear()
    else:
        for p in params:
            _smooth.pop(p, None)
