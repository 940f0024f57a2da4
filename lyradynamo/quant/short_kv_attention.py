"""Attention over few keys writes its output quantised (config.quant = "fp8" or "int8").

    o = lyra::attention(q, k, v, None, scale, False, 'blhd')       k: few keys (77 text tokens)
    o -> flatten / reshape / split / slice / contiguous -> lyra::qlinear(.., kind, inv_smooth)
becomes
    oq, o_scale = lyra::attention_quant(q, k, v, scale, kind, inv_smooth)
    oq -> the same view chain, mirrored on o_scale (B, L) -> lyra::qlinear_q(oq view, o_scale view, ..)

lyra's short-KV kernel (ops/attention_short_kv.py) computes every head of a block of query rows,
so it can quantise whole rows as it writes them: the out-projection's separate quantise pass over
the attention output is gone (SD / SDXL cross-attention). Which attention: blhd, no mask, not
causal, fp16 / bf16, a head dim the kernel has, at most MAX_KEYS keys in the traced call (the
text length; a later call with more keys runs cuDNN and the quantise pass, recorded as a
fallback), its output read only by quantised linears of the same kind and smoothing.
Self-attention over the image tokens keeps cuDNN and the quantise pass (the reason is in the
report): its output cannot be quantised per row inside cuDNN's kernel.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.fx as fx

from .. import config
from ..ops import attention_short_kv as kernel
from ..passes import matcher as m
from . import attention as fp8_attention

_ATTENTION_QUANT = torch.ops.lyra.attention_quant.default


def quantise_short_kv_attention(gm: fx.GraphModule, kind: str) -> dict:
    """Rewrite every eligible lyra::attention of gm; returns {"rows": n, "kept": {node: why}}."""
    done, kept = fp8_attention.rewrite_each_attention(
        gm, _unsupported, lambda node: fp8_attention.consumers(node, kind, smoothed=True),
        lambda gm_, node, chain: _rewrite(gm_, node, chain, kind))
    return {"rows": done, "kept": kept}


def _unsupported(node: fx.Node) -> Optional[str]:
    q, k, v, mask, _scale, is_causal, layout = node.args
    if config.short_kv_attention == "off":
        return "config.short_kv_attention = 'off'"
    if layout != "blhd" or mask is not None or is_causal:
        return "only blhd attention without a mask, not causal, has a short-KV kernel"
    qv, kv = m.val(q), m.val(k)
    if not isinstance(qv, torch.Tensor) or not isinstance(kv, torch.Tensor):
        return "no tensor values for q / k"
    if getattr(qv, "fake_mode", None) is None:
        return "no fake values to check the rewrite with"
    if qv.dtype not in (torch.float16, torch.bfloat16):
        return f"{qv.dtype} attention (the short-KV kernel takes float16 / bfloat16)"
    heads, d = qv.shape[-2], qv.shape[-1]
    if not isinstance(d, int) or d not in kernel.HEAD_DIMS:
        return f"head dim {d} (the short-KV kernel has {kernel.HEAD_DIMS})"
    if not isinstance(heads, int) or heads * d > kernel.MAX_WIDTH:
        return f"{heads} heads x {d} (the short-KV kernel takes H * D <= {kernel.MAX_WIDTH})"
    keys = m.hint(kv.shape[1])
    if keys > kernel.MAX_KEYS:
        return (f"{keys} keys in the traced call (the short-KV kernel takes at most {kernel.MAX_KEYS}; "
                "the output is quantised by the out-projection's own pass)")
    return None


def _rewrite(gm: fx.GraphModule, attn: fx.Node, consumers, kind: str) -> None:
    graph = gm.graph
    chain, leaves = consumers
    q, k, v, _mask, scale, _causal, _layout = attn.args
    inv = leaves[0].args[9]  # the leaves' shared smoothing factors (a get_attr) or None
    mode = m.val(q).fake_mode
    pair_value = fp8_attention.fake_value(mode, _ATTENTION_QUANT, q, k, v, scale, kind, inv)
    plan = fp8_attention.plan_chain(attn, chain, leaves, pair_value, kind, mode)
    if isinstance(inv, fx.Node):
        attn.prepend(inv)  # a get_attr made for the leaf: the new op reads it before attn's place
    pair = fp8_attention.insert_before(graph, attn, _ATTENTION_QUANT, (q, k, v, scale, kind, inv), pair_value)
    fp8_attention.rewire_chain(graph, attn, chain, leaves, pair, plan, f"{kind} rows from the short-KV attention")
