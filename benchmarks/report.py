#!/usr/bin/env python3
"""Markdown tables (+ optional PNG chart) from bench.py's JSONL rows.

    python benchmarks/report.py benchmarks/results/*.jsonl --out benchmarks/results/RESULTS.md \\
        [--png benchmarks/results/chart.png]

One table per (model, scenario, gpu); the most recent row per (model, mode, size, scenario, gpu)
wins (latest "date", then the later line). Speed-ups compare seconds of rows of the same table
and size: "vs eager" = eager / row, "vs best peer" = fastest of inductor, inductor-cg,
torchao-fp8 / row (>1 = the row is faster). Rows of benchmarks/bench_swap.py (they carry an
"op": load / swap / set_loras / unload) get their own "swap" table per model, one row per
(mode, op), without speed-ups (a swap time is not an image time).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

MODE_ORDER = ("eager", "inductor", "inductor-cg", "lyra", "lyra-fp8", "lyra-int8", "torchao-fp8")
PEER_MODES = ("inductor", "inductor-cg", "torchao-fp8")
MODEL_ORDER = ("sd15", "sdxl", "flux")
SCENARIO_ORDER = ("steady", "sweep", "cold", "swap")
SWAP_OP_ORDER = ("swap", "set_loras", "unload", "load")
PSNR_IDENTICAL = 200.0


def load(paths):
    rows, order = [], 0
    for path in paths:
        with open(path, errors="replace") as f:
            for n, line in enumerate(f, 1):
                line = line.strip()
                if not line:
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    print(f"[report] {path}:{n}: not JSON, skipped", file=sys.stderr)
                    continue
                if not isinstance(row, dict) or not {"model", "mode", "size"} <= row.keys():
                    continue
                row["_order"] = order
                row["_file"] = path
                order += 1
                rows.append(row)
    return rows


def _interrupted(r):
    return str(r.get("error") or "").startswith("interrupted")


def latest(rows):
    """The most recent row per (model, mode, size, scenario, gpu); a row cut short by a time
    limit ("interrupted") never hides a measured one."""
    best = {}
    for r in rows:
        key = (r.get("model"), r.get("mode"), r.get("op"), r.get("size"), r.get("scenario", "steady"), r.get("gpu", "?"))
        cur = best.get(key)
        rank = (not _interrupted(r), str(r.get("date") or ""), r["_order"])
        if cur is None or rank >= (not _interrupted(cur), str(cur.get("date") or ""), cur["_order"]):
            best[key] = r
    return sorted(best.values(), key=lambda r: r["_order"])


def _rank(seq, v):
    return seq.index(v) if v in seq else len(seq)


def _scenario(r):
    return "swap" if r.get("op") else r.get("scenario", "steady")


def group(rows):
    tables = {}
    for r in rows:
        tables.setdefault((r.get("model"), _scenario(r), r.get("gpu", "?")), []).append(r)
    keys = sorted(tables, key=lambda k: (_rank(MODEL_ORDER, k[0]), str(k[0]), _rank(SCENARIO_ORDER, k[1]), str(k[2])))
    return [(k, tables[k]) for k in keys]


def _ok(r):
    return not r.get("error") and isinstance(r.get("seconds"), (int, float)) and r["seconds"] > 0


def speedups(table_rows):
    """{id(row): (vs_eager, vs_best_peer, best_peer_mode)} within one table."""
    by_size = {}
    for r in table_rows:
        by_size.setdefault(r.get("size"), []).append(r)
    out = {}
    for _size, rs in by_size.items():
        eager = next((r for r in rs if r.get("mode") == "eager" and _ok(r)), None)
        peers = [r for r in rs if r.get("mode") in PEER_MODES and _ok(r)]
        best = min(peers, key=lambda r: r["seconds"]) if peers else None
        for r in rs:
            if not _ok(r):
                out[id(r)] = (None, None, None)
                continue
            ve = eager["seconds"] / r["seconds"] if eager else None
            vp = best["seconds"] / r["seconds"] if best else None
            out[id(r)] = (ve, vp, best.get("mode") if best else None)
    return out


def _f(v, fmt):
    return "–" if v is None else format(v, fmt)


def _psnr(v):
    if v is None:
        return "–"
    return "identical" if v >= PSNR_IDENTICAL else f"{v:.1f}"


def _cell(s):
    return str(s).replace("|", "\\|").replace("\n", " ")


def _size_key(sizes_in_order):
    return lambda r: (sizes_in_order.index(r.get("size")), _rank(MODE_ORDER, r.get("mode")), str(r.get("mode")))


def _distinct(rows, key):
    vals = []
    for r in rows:
        v = r.get(key)
        if v is not None and v not in vals:
            vals.append(v)
    return vals


def _meta(rows, gpu):
    meta = []
    for k, label in (("steps", "steps"), ("batch", "batch"), ("dtype", "dtype"), ("rank", "LoRA rank"),
                     ("torch", "torch"), ("diffusers", "diffusers"), ("lyradynamo", "lyradynamo"),
                     ("weights", "weights")):
        vals = _distinct(rows, k)
        if vals:
            meta.append(f"{label} {'/'.join(str(v) for v in vals)}")
    dates = sorted(str(d) for d in _distinct(rows, "date"))
    if dates:
        meta.append(f"measured {dates[0]}" + (f" … {dates[-1]}" if dates[-1] != dates[0] else ""))
    return "Card: **" + str(gpu) + "**; " + ", ".join(meta) + "."


def _note(r, width=90):
    note = r.get("error") or r.get("notes") or ""
    if r.get("vae") == "compiled" and not r.get("error"):
        note = "VAE compiled" + (f"; {note}" if note else "")
    if r.get("error"):
        note = "error: " + note
    return note if len(note) <= width else note[: width - 3] + "..."


def swap_table_md(key, rows):
    model, _scenario_name, gpu = key
    rows = sorted(rows, key=lambda r: (_rank(("lora-swap", "controlnet-swap", "diffusers-fuse", "diffusers-unload",
                                                "diffusers-hotswap"), r.get("mode")), _rank(SWAP_OP_ORDER, r.get("op"))))
    lines = [f"### {model} · swap · {gpu}", "", _meta(rows, gpu), "",
             "| mode | op | size after | seconds (median) | runs | note |", "|---|---|---|--:|--:|---|"]
    for r in rows:
        lines.append("| " + " | ".join(_cell(c) for c in (
            r.get("mode"), r.get("op"), r.get("size"), _f(r.get("seconds"), ".3f"),
            "–" if r.get("runs") is None else r.get("runs"), _note(r, 140))) + " |")
    lines.append("")
    return "\n".join(lines)


def table_md(key, rows):
    model, scenario, gpu = key
    if scenario == "swap":
        return swap_table_md(key, rows)
    sizes = []
    for r in rows:
        if r.get("size") not in sizes:
            sizes.append(r.get("size"))
    rows = sorted(rows, key=_size_key(sizes))
    sp = speedups(rows)
    lines = [f"### {model} · {scenario} · {gpu}", "", _meta(rows, gpu), ""]
    secs = "time to first image s" if scenario == "cold" else "s/image"
    lines.append(f"| mode | size | {secs} | first call s | compiles | peak GB | rel_err | SQNR dB | PSNR dB | vs eager | vs best peer | note |")
    lines.append("|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|")
    for r in rows:
        ve, vp, peer = sp.get(id(r), (None, None, None))
        note = _note(r)
        vp_s = "–" if vp is None else f"{vp:.2f}x ({peer})"
        lines.append("| " + " | ".join(_cell(c) for c in (
            r.get("mode"), r.get("size"), _f(r.get("seconds"), ".3f"), _f(r.get("first_call_s"), ".1f"),
            "–" if r.get("compiles") is None else r.get("compiles"), _f(r.get("peak_mem_gb"), ".2f"),
            _f(r.get("rel_err"), ".1e"), _psnr(r.get("sqnr_db")), _psnr(r.get("psnr_db")), "–" if ve is None else f"{ve:.2f}x",
            vp_s, note)) + " |")
    lines.append("")
    return "\n".join(lines)


LEGEND = """\
Columns: *s/image* = median wall time of the denoising loop + one VAE decode, divided by the
batch (CUDA events; perf_counter on CPU); *first call s* = the first loop + decode at that size
in the process (tracing, compiling, CUDA-graph capture; for later sizes: any recompilation);
*compiles* = compilations of the mode so far (lyra: `lyradynamo.compile_count()`; inductor,
torchao: Dynamo `unique_graphs`); *peak GB* = `torch.cuda.max_memory_allocated()` over the
first call and the timed runs; *rel_err* = ‖out − eager‖ / ‖eager‖ of one denoiser call;
*PSNR dB* = decoded image vs eager's ("identical" = bit-identical); *vs eager* / *vs best peer*
= that row's speed-up (>1 = faster) over eager / over the fastest of inductor, inductor-cg,
torchao-fp8 at the same size. Cold tables: seconds = wall time from starting a fresh process to
its first image. Prompt embeddings are random (text encoders are not run); the VAE decode is eager
unless the note says *VAE compiled* (bench `--compile-vae`: that mode's compiler compiled it too).
"""


def chart(tables, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as exc:  # noqa: BLE001
        return f"matplotlib not importable ({type(exc).__name__}); chart skipped"
    tables = [(k, [r for r in rs if _ok(r)]) for k, rs in tables if k[1] != "swap"]
    tables = [(k, rs) for k, rs in tables if rs]
    if not tables:
        return "no successful rows; chart skipped"
    n = len(tables)
    fig, axes = plt.subplots(n, 1, figsize=(10, 3.6 * n), squeeze=False)
    for ax, (key, rs) in zip(axes[:, 0], tables):
        sizes = _distinct(rs, "size")
        modes = sorted(_distinct(rs, "mode"), key=lambda m: (_rank(MODE_ORDER, m), m))
        width = 0.8 / max(1, len(modes))
        for i, m in enumerate(modes):
            xs, ys = [], []
            for j, s in enumerate(sizes):
                r = next((r for r in rs if r["mode"] == m and r["size"] == s), None)
                if r is not None:
                    xs.append(j - 0.4 + width * (i + 0.5))
                    ys.append(r["seconds"])
            bars = ax.bar(xs, ys, width, label=m)
            ax.bar_label(bars, fmt="%.2f", fontsize=7)
        ax.set_xticks(range(len(sizes)))
        ax.set_xticklabels(sizes)
        ax.set_ylabel("time to first image (s)" if key[1] == "cold" else "s / image")
        ax.set_title(f"{key[0]} · {key[1]} · {key[2]}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def render(rows, png_note=None, png_rel=None):
    tables = group(latest(rows))
    gpus = _distinct([r for _k, rs in tables for r in rs], "gpu")
    out = ["# lyradynamo benchmark results", "",
           f"Cards: {', '.join(str(g) for g in gpus) or '–'}. Generated by `benchmarks/report.py`.", ""]
    if png_rel:
        out += [f"![time per image]({png_rel})", ""]
    if png_note:
        out += [f"_Chart: {png_note}._", ""]
    for key, rs in tables:
        out.append(table_md(key, rs))
    out.append(LEGEND)
    return "\n".join(out), tables


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="+", help="JSONL files written by bench.py")
    p.add_argument("--out", required=True, help="markdown file to write")
    p.add_argument("--png", default=None, help="grouped bar chart (needs matplotlib; skipped with a note otherwise)")
    args = p.parse_args(argv)
    files = [f for f in args.files if os.path.isfile(f)]
    for f in set(args.files) - set(files):
        print(f"[report] {f}: no such file, skipped", file=sys.stderr)
    rows = load(files)
    _md, tables = render(rows)
    note = rel = None
    if args.png:
        note = chart(tables, args.png)
        if note:
            print(f"[report] {note}", file=sys.stderr)
        else:
            rel = os.path.relpath(os.path.abspath(args.png), os.path.dirname(os.path.abspath(args.out)))
    md, _ = render(rows, png_note=note, png_rel=rel)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(md)
    print(f"[report] {len(tables)} table(s), {sum(len(rs) for _k, rs in tables)} rows -> {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
