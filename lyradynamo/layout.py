"""Memory layout chosen when a graph is traced: convolution weights go channels_last.

cuDNN runs fp16/bf16 convolutions NHWC; with NCHW tensors every convolution pays a transpose
of its input and output. A convolution whose weight is channels_last returns channels_last,
elementwise ops and lyra::group_norm keep that format, so converting the weights is enough
to keep a whole UNet NHWC. The conversion must happen before Dynamo records the parameter's
strides (it guards on them), so shape_policy calls `prepare_parameter` while Dynamo wraps each
graph input. The Parameter object and its values stay the same: in-place patches (LoRA fuse,
ControlNet weight copies) keep working; only `.stride()` changes.
"""
from __future__ import annotations

import logging

import torch

from . import config

log = logging.getLogger("lyradynamo")


def wants_channels_last(t: torch.Tensor) -> bool:
    mode = config.channels_last
    if mode is False:
        return False
    return mode is True or t.is_cuda


def is_conv_weight(t, source_name: str) -> bool:
    """A 4-D floating Parameter registered as some module's `weight`: a Conv2d/ConvTranspose2d
    kernel (O, I, kh, kw). Any view of it stays valid: channels_last only permutes strides."""
    return (isinstance(t, torch.nn.Parameter) and t.dim() == 4 and t.is_floating_point()
            and source_name.endswith("_parameters['weight']") and t.shape[2] * t.shape[3] > 0)


def prepare_parameter(t, source_name: str) -> None:
    """Convert a convolution weight to channels_last in place (same Parameter, new strides)."""
    if not is_conv_weight(t, source_name) or not wants_channels_last(t):
        return
    if t.is_contiguous(memory_format=torch.channels_last) or t.shape[1] == 1 or t.shape[2] * t.shape[3] == 1:
        # Spatial, non-depthwise kernels only: they carry the layout (a 1x1 convolution
        # follows its input's). Depthwise and 1x1 kernels were excluded while chasing tiny
        # Sana's per-batch recompile on the H100; that recompile stayed, so they are not its
        # cause (open, see benchmarks/NOTES.md).
        return
    with torch.no_grad():
        t.data = t.data.contiguous(memory_format=torch.channels_last)
    log.debug("lyradynamo: %s -> channels_last", source_name)
