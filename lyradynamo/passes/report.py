"""What the passes did to one graph: matches per pass, anchors left with the reason."""
from __future__ import annotations

import collections
import dataclasses

import torch.fx as fx

from . import matcher as m

# Anchor ops: every one of these should become a lyra:: op, or the report says why not.
ANCHORS = {
    "linear": m.LINEAR,
    "sdpa": m.SDPA,
    "group_norm": m.GROUP_NORM,
    "layer_norm": m.LAYER_NORM,
    "rms_norm": m.RMS_NORM | m.RSQRT,  # rsqrt: the hand-written RMSNorm of diffusers
}


def anchor_kind(node: fx.Node) -> str | None:
    if node.op != "call_function":
        return None
    for kind, targets in ANCHORS.items():
        if node.target in targets:
            return kind
    return None


def count_anchors(graph: fx.Graph) -> collections.Counter:
    return collections.Counter(k for k in map(anchor_kind, graph.nodes) if k)


@dataclasses.dataclass
class GraphReport:
    anchors_before: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    matched: dict = dataclasses.field(default_factory=dict)  # pass -> Counter(label -> n)
    skipped: dict = dataclasses.field(default_factory=dict)  # node name -> reason
    left: list = dataclasses.field(default_factory=list)  # [{node, kind, reason}]
    canonicalized: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    relaxed_guards: list = dataclasses.field(default_factory=list)
    size_one_answers: list = dataclasses.field(default_factory=list)  # size_one.py: answered unguarded
    errors: list = dataclasses.field(default_factory=list)  # passes that raised (graph kept)
    quant: dict = dataclasses.field(default_factory=dict)  # quant/apply.py: layers and decisions
    phases_s: dict = dataclasses.field(default_factory=dict)  # backend phase -> seconds (first call)
    shared_input: list = dataclasses.field(default_factory=list)  # sibling linear groups: fused or why not

    def hit(self, pass_name: str, label: str) -> None:
        self.matched.setdefault(pass_name, collections.Counter())[label] += 1

    def skip(self, node: fx.Node, reason: str) -> None:
        self.skipped[node.name] = reason

    def finish(self, graph: fx.Graph) -> None:
        self.left = [
            {"node": n.name, "kind": anchor_kind(n),
             "reason": self.skipped.get(n.name, "no pass matched this node")}
            for n in graph.nodes if anchor_kind(n)
        ]

    @property
    def coverage(self) -> dict:
        left = collections.Counter(d["kind"] for d in self.left)
        return {k: {"before": n, "left": left.get(k, 0)} for k, n in self.anchors_before.items()}

    def as_dict(self) -> dict:
        return {
            "anchors_before": dict(self.anchors_before),
            "coverage": self.coverage,
            "matched": {p: dict(c) for p, c in self.matched.items()},
            "left": self.left,
            "canonicalized": dict(self.canonicalized),
            "relaxed_guards": self.relaxed_guards,
            "size_one_answers": self.size_one_answers,
            "errors": self.errors,
            "quant": self.quant,
            "shared_input": self.shared_input,
            "phases_s": {k: round(v, 4) for k, v in self.phases_s.items()},
        }
