"""The lyra:: custom ops. Importing this package registers them with torch.library.

Each op has: a schema (torch.library.custom_op), a fake implementation for symbolic
shapes that adds no guards, a PyTorch reference (the CPU kernel and the test oracle), and
a CUDA implementation that calls csrc (`lyradynamo._C`).
"""
from . import (adaln, attention, attention_fp8, bias_residual, group_norm, linear, linear_group,  # noqa: F401  (registration)
               qkv_projection, qlinear, quantize, rope)
from ._common import csrc_status, fallback_counts, reset_fallback_counts  # noqa: F401

OPS = {
    "linear": linear.linear,
    "linear_group": linear_group.linear_group,
    "attention": attention.attention,
    "group_norm": group_norm.group_norm,
    "bias_residual": bias_residual.bias_residual,
    "adaln": adaln.adaln,
    "qk_norm_rope": rope.qk_norm_rope,
    "qkv_projection": qkv_projection.qkv_projection,
    "qlinear": qlinear.qlinear,
    "qlinear_q": qlinear.qlinear_q,
    "qlinear_q_group": linear_group.qlinear_q_group,
    "quantize": quantize.quantize,
    "adaln_quant": quantize.adaln_quant,
    "attention_fp8_scales": attention_fp8.attention_fp8_scales,
    "qkv_quant": attention_fp8.qkv_quant,
    "qkv_quant3": attention_fp8.qkv_quant3,
    "attention_fp8": attention_fp8.attention_fp8,
}
