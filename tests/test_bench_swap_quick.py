"""CPU smoke test of benchmarks/bench_swap.py --quick: the real CLI in a subprocess on the tiny SD1.5
model (LoRA swaps, ControlNet swap, diffusers peers), checking the JSON rows it writes."""
import datetime
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "bench_swap.py")
FIELDS = ("model", "mode", "size", "seconds", "gpu", "torch", "diffusers", "lyradynamo", "date", "notes", "error")


def test_bench_swap_quick(tmp_path):
    out = tmp_path / "swap.jsonl"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, SCRIPT, "--quick", "--models", "sd15", "--runs", "2", "--out", str(out), "--tmp", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    got = [(r["mode"], r.get("op")) for r in rows]
    assert got == [("lora-swap", "load"), ("lora-swap", "swap"), ("lora-swap", "set_loras"), ("lora-swap", "unload"),
                   ("controlnet-swap", "swap"), ("diffusers-fuse", "load"), ("diffusers-unload", "unload"),
                   ("diffusers-hotswap", "swap")], got
    for r in rows:
        assert not [f for f in FIELDS if f not in r], r
        assert r["model"] == "sd15" and r["size"] == "64x64" and r["gpu"] == "cpu"
        assert r["error"] is None, r
        assert r["seconds"] > 0
        datetime.datetime.fromisoformat(r["date"])
    by_op = {(r["mode"], r.get("op")): r for r in rows}
    assert by_op[("lora-swap", "unload")]["compiles_after_swaps"] == 0  # lyra swaps never recompile
    assert by_op[("controlnet-swap", "swap")]["compiles_after_swaps"] == 0
