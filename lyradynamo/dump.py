"""Graph dump: what the passes matched and rewrote, per compiled graph.

Set `lyradynamo.config.dump_dir` (or env LYRA_DUMP_DIR) and each compiled graph writes
    graph_<i>/before.py   the graph as Dynamo traced it
    graph_<i>/after.py    the rewritten graph
    graph_<i>/summary.txt and summary.json: ops matched per pass, anchor ops left with the
                          reason, relaxed guards, which kernel path each lyra op takes, histogram
    graph_<i>/graph.html  a picture: one row per op in run order, rewritten ops in green,
                          anchor ops left unrewritten in red, data edges on the left

    python -m lyradynamo.dump --model sdxl-tiny     # prints the summary for a zoo model
"""
from __future__ import annotations

import argparse
import collections
import html
import json
import os
import sys

import torch
import torch.fx as fx

from .passes.report import anchor_kind


def _target_name(node: fx.Node) -> str:
    if node.op == "call_method":
        return f".{node.target}"
    if node.op == "call_function":
        t = node.target
        if isinstance(t, torch._ops.OpOverload):
            return str(t.name())
        return getattr(t, "__name__", str(t))
    return node.op


def op_histogram(gm: fx.GraphModule) -> dict[str, int]:
    c = collections.Counter(_target_name(n) for n in gm.graph.nodes if n.op in ("call_function", "call_method"))
    return dict(c.most_common())


def kernel_paths(gm: fx.GraphModule, device: str) -> dict[str, str]:
    """Which implementation each lyra op in the graph runs on this device."""
    from .ops import csrc_status

    used = {str(n.target.name()).split("::")[-1] for n in gm.graph.nodes
            if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload)
            and n.target.namespace == "lyra"}
    if device != "cuda":
        return {op: f"PyTorch reference ({device})" for op in sorted(used)}
    status = csrc_status()
    paths = {}
    for op in sorted(used):
        if op == "attention":
            paths[op] = "torch SDPA backends (cuDNN/flash/efficient) or flash_attn"
            from . import config

            if status == "built" and config.short_kv_attention == "auto" and config.attention_backend == "auto":
                paths[op] = ("16-bit, at most 128 keys and 2^16 (query row, head) pairs: attention_short_kv.cu "
                             "(config.short_kv_attention); otherwise " + paths[op])
        elif status == "built":
            paths[op] = "csrc CUDA kernel (shapes/dtypes it cannot take fall back to the reference, logged)"
            if op == "group_norm":
                from . import config
                from .ops import group_norm as gn

                rows = {True: "; channels_last groups under 128 bytes: group_norm_rows.cu (whole rows)",
                        False: "; group_norm.cu (per-group clusters)",
                        "auto": "; channels_last groups under 128 bytes: group_norm_rows.cu (whole rows) "
                                "where it measured faster (ops.group_norm.prefer_rows: narrow groups, "
                                f"tensors of {gn.ROWS_AUTO_NARROW_BYTES >> 20} / {gn.ROWS_AUTO_ANY_BYTES >> 20} "
                                "MiB or more), else group_norm.cu (per-group clusters)"}
                paths[op] += rows[config.group_norm_rows]
        else:
            paths[op] = f"PyTorch reference on CUDA: {status}"
    return paths


def summary_dict(record, gm: fx.GraphModule) -> dict:
    rep = record.report
    return {
        "graph": record.index,
        "device": record.device,
        "nodes": record.num_nodes,
        "dynamic_inputs": record.dynamic_inputs,
        "frame_inputs": record.frame_inputs,
        "params_lifted": record.params_lifted,
        "shape_policy_active": record.policy_active,
        "backend_seconds": round(record.seconds, 4),
        "recompile_reason": record.recompile_reason,
        "cuda_graphs_off": getattr(record, "cuda_graphs_off", None),
        "host_prefix": getattr(record, "host_prefix", None),
        **rep.as_dict(),
        "kernel_paths": kernel_paths(gm, record.device),
        "op_histogram": op_histogram(gm),
    }


def format_summary(s: dict) -> str:
    lines = [f"graph {s['graph']}: {s['nodes']} nodes on {s['device']}, {s['dynamic_inputs']} dynamic size inputs, "
             f"shape policy {'on' if s['shape_policy_active'] else 'OFF'}",
             f"inputs gathered per call: {s.get('frame_inputs', '?')}; parameters / buffers passed by lyra: "
             f"{s.get('params_lifted', 0)}"]
    if s.get("recompile_reason"):
        lines.append(f"RECOMPILED because: {s['recompile_reason']}")
    lines.append("anchor ops rewritten:")
    for kind, c in sorted(s["coverage"].items()):
        done = c["before"] - c["left"]
        lines.append(f"  {kind:<11} {done:>4}/{c['before']:<4} ({100.0 * done / max(c['before'], 1):.0f}%)")
    lines.append("matched per pass:")
    for p, labels in s["matched"].items():
        lines.append(f"  {p}: " + ", ".join(f"{k} x{v}" for k, v in sorted(labels.items())))
    if s["left"]:
        lines.append("anchor ops left unrewritten:")
        reasons = collections.Counter((d["kind"], d["reason"]) for d in s["left"])
        for (kind, reason), n in reasons.most_common():
            lines.append(f"  {kind} x{n}: {reason}")
    if s["canonicalized"]:
        lines.append("no-ops removed: " + ", ".join(f"{k} x{v}" for k, v in s["canonicalized"].items()))
    if s["relaxed_guards"]:
        lines.append(f"op-internal size guards relaxed: {len(s['relaxed_guards'])} "
                     f"(e.g. {', '.join(s['relaxed_guards'][:3])})")
    if s.get("cuda_graphs_off"):
        lines.append(f"CUDA graphs off for this graph (it runs op by op): {s['cuda_graphs_off']}")
    if s.get("host_prefix"):
        hp = s["host_prefix"]
        lines.append(f"host tensors computed before each CUDA-graph replay: {hp['host_nodes']} ops, "
                     f"{hp['copies']} copies to the device; {hp.get('filled', 0)} sizes made device "
                     "tensors by a fill")
    if s.get("cuda_graph_failures"):
        lines.append(f"CUDA graph captures failed (those shapes run op by op): {len(s['cuda_graph_failures'])} "
                     f"(first: {s['cuda_graph_failures'][0]})")
    if s.get("size_one_answers"):
        lines.append(f"op-internal size == 1 questions answered at the traced size, unguarded: "
                     f"{len(s['size_one_answers'])} (e.g. {', '.join(s['size_one_answers'][:3])})")
    q = s.get("quant") or {}
    if q:
        lines.append(f"quantized ({q['kind']}, master on {q['master']}): {len(q['quantized'])} linear(s); "
                     f"kept in high precision: {len(q['kept'])}")
        by_reason: dict = {}
        for name, why in q["kept"].items():
            by_reason.setdefault(why, []).append(name)
        for why, names in sorted(by_reason.items(), key=lambda kv: -len(kv[1])):
            shown = ", ".join(names[:3]) + (f", ... ({len(names) - 3} more)" if len(names) > 3 else "")
            lines.append(f"  kept x{len(names)} ({shown}): {why}")
        if q.get("conv1x1_16bit"):
            lines.append(f"1x1 convolutions run as 16-bit GEMMs (passes/conv1x1.py; no convolution is quantised): "
                         f"{len(q['conv1x1_16bit'])}")
        passes = (q.get("activation_quant") or {}).get("separate_passes") or {}
        if q.get("input_pass"):
            lines.append(f"activations quantised by a separate pass (config.quant_input_pass = {q['input_pass']!r}): "
                         f"{sum(passes.values())}" + (" (produced by " + ", ".join(
                             f"{k} x{v}" for k, v in sorted(passes.items(), key=lambda kv: -kv[1])) + ")"
                                                      if passes else ""))
        att = q.get("attention") or {}
        if att.get("fp8") or att.get("kept"):
            # kept: 16-bit attention; its out-projection stays 16-bit or quantises its input in a pass
            # of its own (config.quant_input_pass)
            lines.append(f"attention in fp8 (its output quantised by the kernel): {att.get('fp8', 0)}; "
                         f"left in 16-bit: {len(att.get('kept', {}))}")
            for why, n in collections.Counter(att.get("kept", {}).values()).most_common(5):
                lines.append(f"  attention x{n}: {why}")
        sliced = [name for name in q["quantized"] if name.endswith("]")]  # column slices (split_cat)
        for name in sliced[:20]:
            lines.append(f"  quantized column slice {name}")
    groups = s.get("shared_input") or []
    if groups:
        fused = [g for g in groups if g["fused"]]
        lines.append(f"linears sharing an input: {len(fused)}/{len(groups)} group(s) run as one GEMM")
        for g in groups:
            if not g["fused"]:
                lines.append(f"  kept apart {', '.join(g['nodes'])}: {g['reason']}")
    for op, path in s["kernel_paths"].items():
        lines.append(f"kernel lyra::{op}: {path}")
    for e in s["errors"]:
        lines.append(f"PASS ERROR {e['pass']}: {e['error']}")
    top = list(s["op_histogram"].items())[:12]
    lines.append("op histogram (top): " + ", ".join(f"{k} {v}" for k, v in top))
    return "\n".join(lines)


def graph_html(gm: fx.GraphModule, title: str) -> str:
    """One row per op; lyra ops green, anchors left red; edges as arcs at the left."""
    nodes = [n for n in gm.graph.nodes if n.op in ("call_function", "call_method", "output")]
    row = {n: i for i, n in enumerate(nodes)}
    h, left, width = 20, 160, 1100
    parts = []
    for i, n in enumerate(nodes):
        y = i * h + 10
        lyra = n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload) and n.target.namespace == "lyra"
        color = "#b7f0b1" if lyra else ("#f6b3b3" if anchor_kind(n) else "#eeeeee")
        label = f"{n.name} = {_target_name(n)}"
        if lyra:
            label += f"   [{n.meta.get('lyra', '')}]"
        parts.append(f'<rect x="{left}" y="{y}" width="{width - left - 10}" height="{h - 4}" fill="{color}" rx="3"/>'
                     f'<text x="{left + 6}" y="{y + 12}" font-size="11" font-family="monospace">'
                     f'{html.escape(label[:150])}</text>')
        for a in n.all_input_nodes:
            if a in row:
                y0, span = row[a] * h + 18, i - row[a]
                bend = left - 8 - min(span * 3, left - 20)
                parts.append(f'<path d="M{left},{y0} C{bend},{y0} {bend},{y + 8} {left},{y + 8}" '
                             f'stroke="#6a8cc7" fill="none" stroke-width="0.7"/>')
    svg = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{len(nodes) * h + 20}">'
           + "".join(parts) + "</svg>")
    legend = ('<p><span style="background:#b7f0b1">lyra op (rewritten)</span> '
              '<span style="background:#f6b3b3">anchor op left unrewritten</span> '
              '<span style="background:#eeeeee">other op</span></p>')
    return f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title></head>" \
           f"<body><h3>{html.escape(title)}</h3>{legend}{svg}</body></html>"


def write_graph_dump(dump_dir: str, record, gm: fx.GraphModule, before_code: str | None = None) -> str:
    path = os.path.join(dump_dir, f"graph_{record.index}")
    os.makedirs(path, exist_ok=True)
    if before_code is not None:
        with open(os.path.join(path, "before.py"), "w") as f:
            f.write(before_code)
    with open(os.path.join(path, "after.py"), "w") as f:
        f.write(gm.code)
    s = summary_dict(record, gm)
    with open(os.path.join(path, "summary.json"), "w") as f:
        json.dump(s, f, indent=1, default=str)
    with open(os.path.join(path, "summary.txt"), "w") as f:
        f.write(format_summary(s) + "\n")
    with open(os.path.join(path, "graph.html"), "w") as f:
        f.write(graph_html(gm, f"lyradynamo graph {record.index}"))
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lyradynamo.dump",
                                description="Compile a zoo model with backend='lyra' and print the rewrite summary.")
    p.add_argument("--model", required=True, help="zoo model, e.g. sdxl-tiny, flux-tiny, sd15 (full size)")
    p.add_argument("--model-path", default=None, help="local diffusers checkpoint (real weights)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="float32 | float16 | bfloat16 (default: fp32 on cpu, "
                                                  "fp16 for SD / bf16 for DiTs on cuda)")
    p.add_argument("--dir", default=None, help="also write the full dump here")
    args = p.parse_args(argv)

    import lyradynamo
    from lyradynamo import zoo

    name, tiny = args.model.removesuffix("-tiny"), args.model.endswith("-tiny")
    if name not in zoo.MODEL_NAMES:
        p.error(f"unknown model {args.model!r}; choose from "
                + ", ".join(f"{n}-tiny" for n in zoo.MODEL_NAMES) + " (or a name without -tiny for full size)")
    dtype = getattr(torch, args.dtype) if args.dtype else zoo.default_dtype(name, args.device)
    model = zoo.build_denoiser(name, tiny=tiny, dtype=dtype, device=args.device, model_path=args.model_path)
    inputs = zoo.denoiser_inputs(name, model)
    lyradynamo.backend.reset_stats()
    compiled = torch.compile(model, backend="lyra")
    with torch.no_grad(), lyradynamo.config.patch(dump_dir=args.dir):
        compiled(**inputs)
    for rec in lyradynamo.backend.compiled_graphs():
        print(format_summary(rec.summary))
    print(f"compiled graphs: {lyradynamo.backend.compile_count()}")
    if args.dir:
        print(f"dump written to {args.dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
