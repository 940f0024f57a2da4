"""Graph passes: canonicalise, then match + rewrite anchor subgraphs into lyra:: ops.

Each pass is `run(graph, fake_mode, report)`; it matches patterns (never model names),
rewrites what it can and records in the report why it left an anchor op alone. A pass that
raises keeps the rewrites it completed (each rewrite is atomic: the new node's value is
computed before the graph changes) and the error is reported: the model still runs,
unrewritten there.
"""
from __future__ import annotations

import logging
import time
import traceback

import torch.fx as fx

from .. import ops  # noqa: F401  (registers the lyra:: ops)
from . import adaln, attention, canonicalize, conv1x1, conv_bias, group_norm, layout, linear, rope, split_cat
from .report import GraphReport, count_anchors

log = logging.getLogger("lyradynamo")

PASSES = {
    "layout": layout.run,
    "conv1x1": conv1x1.run,
    "split_cat": split_cat.run,
    "linear": linear.run,
    "attention": attention.run,
    "group_norm": group_norm.run,
    "conv_bias": conv_bias.run,
    "adaln": adaln.run,
    "rope": rope.run,
}


def run_passes(gm: fx.GraphModule, names, fake_mode) -> tuple[fx.GraphModule, GraphReport]:
    """Rewrite gm in order canonicalize, then `names` (config.passes order). Returns (gm, report)."""
    report = GraphReport(anchors_before=count_anchors(gm.graph))
    if names:
        t = time.perf_counter()
        canonicalize.run(gm.graph, fake_mode, report)
        report.phases_s["pass:canonicalize"] = time.perf_counter() - t
    # group_norm and adaln first: their patterns start at a norm and must see the mul/add
    # epilogues before the linear pass could claim a neighbouring add as a residual; rope
    # folds the q/k RMSNorms adaln produced. conv_bias folds convolution biases into the
    # lyra::group_norm ops group_norm made; conv1x1 runs between the two: after group_norm (whose
    # lyra::group_norm keeps NHWC, which conv1x1 follows) and before conv_bias, so that a 1x1
    # convolution's bias goes into its GEMM's epilogue instead.
    order = [n for n in ("layout", "group_norm", "conv1x1", "conv_bias", "adaln", "rope", "attention", "linear",
                         "split_cat")
             if n in names]
    for name in order:
        t = time.perf_counter()
        try:
            PASSES[name](gm.graph, fake_mode, report)
        except Exception as exc:  # noqa: BLE001 - a pass bug must not break the user's model
            log.warning("lyradynamo: pass %s failed (%s); its rewrites are dropped", name, exc)
            report.errors.append({"pass": name, "error": repr(exc), "trace": traceback.format_exc()})
        report.phases_s[f"pass:{name}"] = time.perf_counter() - t
    gm.graph.lint()
    gm.recompile()
    report.finish(gm.graph)
    return gm, report
