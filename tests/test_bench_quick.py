"""CPU smoke test of the benchmark harness (benchmarks/bench.py --quick, benchmarks/report.py).

Runs the real CLI in a subprocess on tiny zoo models (sd15 and flux, eager and lyra, 64x64,
2 steps, 1 timed run) into a temporary directory, checks the JSON rows, then renders the
markdown report. The GPU paths (CUDA events, peak memory, inductor-cg, torchao) are not run here.
"""
from __future__ import annotations

import datetime
import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks", "bench.py")
REPORT = os.path.join(ROOT, "benchmarks", "report.py")

FIELDS = (
    "model", "mode", "size", "steps", "batch", "scenario", "seconds", "first_call_s", "compiles",
    "peak_mem_gb", "rel_err", "psnr_db", "gpu", "torch", "diffusers", "lyradynamo", "date", "error",
)


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def quick_rows(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    out = tmp / "quick.jsonl"
    stdout = _run_bench(tmp, out, "--model", "sd15,flux", "--modes", "eager,lyra", "--sizes", "64x64")
    rows = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    return tmp, out, rows, stdout


def _run_bench(cwd, out, *args) -> str:
    """bench.py --quick (2 steps, 1 run, no warm-up) with `args` in a subprocess; its stdout."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, BENCH, "--quick", *args, "--steps", "2", "--runs", "1", "--warmup", "0",
           "--progress", "none", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=str(cwd), env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_quick_rows(quick_rows):
    _tmp, _out, rows, stdout = quick_rows
    assert [(r["model"], r["mode"]) for r in rows] == [
        ("sd15", "eager"), ("sd15", "lyra"), ("flux", "eager"), ("flux", "lyra")]
    for r in rows:
        missing = [f for f in FIELDS if f not in r]
        assert not missing, (r["model"], r["mode"], missing)
        assert r["error"] is None, r["error"]
        assert r["size"] == "64x64" and r["steps"] == 2 and r["batch"] == 1
        assert r["scenario"] == "steady"
        assert r["gpu"] == "cpu" and r["peak_mem_gb"] is None
        assert r["seconds"] > 0 and r["first_call_s"] > 0
        if r["mode"].startswith("lyra"):  # the first call's breakdown (CPU: no CUDA-graph capture)
            assert 0 < r["backend_s"] < r["first_call_s"] and r["capture_s"] == 0.0
            dyn = r["dynamo_phases_s"]  # Dynamo's own timers: the trace holds the backend call
            assert 0 < dyn["backend"] <= dyn["compile_inner"] < r["first_call_s"], dyn
            assert 0 < dyn["fake_runs"] < dyn["bytecode_tracing"] < dyn["compile_inner"], dyn
        assert isinstance(r["rel_err"], float) and math.isfinite(r["rel_err"])
        datetime.datetime.fromisoformat(r["date"])
        if r["mode"] == "eager":
            assert r["psnr_db"] is None
            assert r["compiles"] == 0
        else:
            assert r["rel_err"] < 1e-4, r
            assert r["psnr_db"] is not None and r["psnr_db"] > 60, r
            assert r["compiles"] >= 1, r
            assert r["compiles_source"] == "lyradynamo.compile_count"
    # the summary table is printed
    assert "first_call_s" in stdout and "lyra" in stdout


def test_compile_vae_rows(tmp_path):
    """--compile-vae: compiled rows decode through a compiled vae.decode (one more compilation,
    same image as eager's to the quality bar), eager rows through the plain one."""
    out = tmp_path / "vae.jsonl"
    _run_bench(tmp_path, out, "--model", "sdxl", "--modes", "eager,lyra", "--compile-vae", "--sizes", "64x64,64x96")
    rows = {(r["mode"], r["size"]): r for r in map(json.loads, out.read_text().splitlines())}
    assert [r["vae"] for r in rows.values()] == ["eager", "eager", "compiled", "compiled"]
    lyra = rows[("lyra", "64x64")], rows[("lyra", "64x96")]
    assert lyra[0]["new_compiles"] == 2 and lyra[1]["new_compiles"] == 0, lyra  # denoiser + decoder, once
    assert all(r["error"] is None and r["psnr_db"] > 60 for r in lyra), lyra


def test_report_markdown(quick_rows):
    tmp, out, _rows, _ = quick_rows
    md_path = tmp / "RESULTS.md"
    proc = subprocess.run([sys.executable, REPORT, str(out), "--out", str(md_path), "--png", str(tmp / "chart.png")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    md = md_path.read_text()
    assert "cpu" in md
    assert "### sd15 · steady · cpu" in md and "### flux · steady · cpu" in md
    assert md.count("| lyra | 64x64 |") == 2
    if importlib.util.find_spec("matplotlib") is None:
        assert "chart skipped" in md
    else:
        assert (tmp / "chart.png").exists()


def test_report_speedups_and_latest(tmp_path):
    """Synthetic rows: most recent row wins, speed-ups vs eager and vs the best peer, error rows."""
    report = _load("lyra_bench_report", REPORT)
    base = dict(model="sdxl", size="1024x1024", scenario="steady", gpu="NVIDIA H100 80GB HBM3", steps=20, batch=1,
                first_call_s=1.0, compiles=1, peak_mem_gb=10.0, rel_err=1e-3, psnr_db=40.0, error=None)
    rows = [
        dict(base, mode="eager", seconds=9.0, date="2026-01-01T00:00:00+00:00"),  # superseded
        dict(base, mode="eager", seconds=4.0, date="2026-01-02T00:00:00+00:00"),
        dict(base, mode="inductor", seconds=3.0, date="2026-01-02T00:00:00+00:00"),
        dict(base, mode="inductor-cg", seconds=2.5, date="2026-01-02T00:00:00+00:00"),
        dict(base, mode="lyra", seconds=2.0, date="2026-01-02T00:00:00+00:00"),
        dict(base, mode="lyra-fp8", seconds=None, error="quant mode not implemented", date="2026-01-02T00:00:00+00:00"),
    ]
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    md_path = tmp_path / "R.md"
    assert report.main([str(path), "--out", str(md_path)]) == 0
    md = md_path.read_text()
    assert "NVIDIA H100 80GB HBM3" in md
    lyra = next(line for line in md.splitlines() if line.startswith("| lyra |"))
    assert "2.00x" in lyra and "1.25x (inductor-cg)" in lyra
    eager = next(line for line in md.splitlines() if line.startswith("| eager |"))
    assert "4.000" in eager and "9.000" not in md
    assert "quant mode not implemented" in md


def test_report_swap_rows_get_their_own_table(tmp_path):
    """bench_swap.py rows (with an "op") form a per-model swap table, one row per (mode, op), and
    never enter the image-time tables' speed-ups."""
    report = _load("lyra_bench_report_swap", REPORT)
    base = dict(model="sd15", size="512x512", scenario="steady", gpu="G", date="2026-01-02T00:00:00+00:00", error=None)
    rows = [dict(base, mode="eager", seconds=0.5, steps=20, batch=1),
            dict(base, mode="lora-swap", op="swap", seconds=0.05, runs=5),
            dict(base, mode="lora-swap", op="unload", seconds=0.007, runs=5),
            dict(base, mode="diffusers-fuse", op="load", seconds=0.3, runs=5)]
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    md_path = tmp_path / "R.md"
    assert report.main([str(path), "--out", str(md_path)]) == 0
    md = md_path.read_text()
    swap = md[md.index("### sd15 · swap · G"):]
    steady = md[md.index("### sd15 · steady · G"):md.index("### sd15 · swap · G")]
    assert "| lora-swap | swap | 512x512 | 0.050 | 5 |" in swap and "| lora-swap | unload | 512x512 | 0.007 | 5 |" in swap
    assert "| diffusers-fuse | load |" in swap
    assert "lora-swap" not in steady and "| eager |" in steady


def test_cli_helpers():
    bench = _load("lyra_bench_cli", BENCH)
    assert bench.parse_size("1280x768") == (1280, 768)
    args = bench.resolve(bench.parse_args(["--model", "sd15", "--quick", "--modes", "torchao-fp8,lyra,eager,inductor"]))
    assert args.mode_list == ["eager", "lyra", "inductor", "torchao-fp8"]  # eager first, torchao last
    assert args.device == "cpu" and args.steps == 2 and args.runs == 3
    assert bench.sizes_for(args, "sd15") == [(64, 64)]
    with pytest.raises(SystemExit):
        bench.sizes_for(bench.resolve(bench.parse_args(["--model", "flux", "--quick", "--sizes", "72x72"])), "flux")
    import torch

    img = torch.rand(1, 3, 8, 8)
    assert bench.psnr(img, img) == bench.PSNR_IDENTICAL
    assert 20 < bench.psnr((img + 0.01).clamp(0, 1), img) < 60
    assert bench.gpu_short("NVIDIA H100 80GB HBM3") == "h100" and bench.gpu_short("cpu") == "cpu"
    assert bench.mode_unavailable("lyra") is None
    err = bench.mode_unavailable("lyra-fp8")
    assert err in (None, bench.ERR_QUANT)


def test_lyra_config_arguments():
    """--lyra-config KEY=VALUE: a tuple option takes -NAME (all but), +NAME (all and), or a list."""
    import lyradynamo

    bench = _load("lyra_bench_cfg", BENCH)
    default = lyradynamo.config.snapshot()["quant_exclude"]
    got = bench.parse_lyra_config([r"quant_exclude=+\.attn[12]\.to_out\.", "fp8_attention=on", "gemm_autotune=0",
                                   "cuda_graphs=false"])
    assert got["quant_exclude"] == (*default, r"\.attn[12]\.to_out\.")
    assert got["fp8_attention"] == "on" and got["gemm_autotune"] == 0 and got["cuda_graphs"] is False
    passes = lyradynamo.config.snapshot()["passes"]
    assert bench.parse_lyra_config(["passes=-shared_input"])["passes"] == tuple(p for p in passes if p != "shared_input")
    assert bench.parse_lyra_config(["passes=layout,linear"])["passes"] == ("layout", "linear")
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        bench.parse_lyra_config(["no_such_option=1"])


def test_skip_guard_eval_rows(tmp_path):
    """--skip-guard-eval: the compiled rows' timed runs under skip_guard_eval_unsafe, said in
    their note; eager rows untouched; torch's stance restored afterwards (the quality call and
    later modes run with guards)."""
    out = tmp_path / "skip.jsonl"
    _run_bench(tmp_path, out, "--model", "sd15", "--modes", "eager,lyra", "--skip-guard-eval", "--sizes", "64x64")
    rows = {r["mode"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert "skip_guard_eval_unsafe" not in (rows["eager"]["notes"] or "")
    assert "skip_guard_eval_unsafe" in rows["lyra"]["notes"], rows["lyra"]
    assert rows["lyra"]["error"] is None and rows["lyra"]["psnr_db"] > 60


def test_loop_gaps_smoke():
    """benchmarks/loop_gaps.py runs end to end (tiny configs on the CPU)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "loop_gaps.py"), "--model", "sd15",
                           "--mode", "lyra", "--tiny", "--steps", "2"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "median of the middle steps" in proc.stdout


@pytest.mark.parametrize("name", ["sd15", "sdxl", "flux"])
def test_loop_matches_diffusers_pipeline(name):
    """benchmarks/denoise.py's loop + decode gives the diffusers pipeline's image (same latents/embeddings)."""
    import torch

    from lyradynamo import zoo

    if os.path.join(ROOT, "benchmarks") not in sys.path:
        sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    denoise = _load("lyra_bench_denoise", os.path.join(ROOT, "benchmarks", "denoise.py"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: more threads only spin when the CPU is shared
    try:
        _compare_with_pipeline(name, denoise, zoo, torch)
    finally:
        torch.set_num_threads(threads)


def _compare_with_pipeline(name, denoise, zoo, torch):
    pipe = zoo.build_pipeline(name)
    model = pipe.transformer if name == "flux" else pipe.unet
    W, H = 64, 96
    wl = denoise.Workload(name, model, pipe.vae, pipe.scheduler, height=H, width=W, steps=3)
    ours = denoise.postprocess(wl.run(model))
    kw = dict(num_inference_steps=3, height=H, width=W, output_type="pt", return_dict=False, latents=wl.noise)
    if name == "flux":
        kw.update(prompt_embeds=wl.prompt_embeds, pooled_prompt_embeds=wl.pooled, guidance_scale=3.5)
    else:
        e = wl.encoder_hidden_states
        b = e.shape[0] // 2
        kw.update(prompt_embeds=e[b:], negative_prompt_embeds=e[:b], guidance_scale=7.5)
        if name == "sdxl":
            pooled = wl.added_cond_kwargs["text_embeds"]
            kw.update(pooled_prompt_embeds=pooled[b:], negative_pooled_prompt_embeds=pooled[:b])
    with torch.no_grad():
        theirs = pipe(**kw)[0].float()
    assert theirs.shape == ours.shape
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
