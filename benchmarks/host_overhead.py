#!/usr/bin/env python3
"""Host time of one compiled model call under CUDA graphs, and where it goes (GPU only).

    python benchmarks/host_overhead.py --models sd15,sdxl [--calls 50] [--out f.json]

A model whose scheduler syncs the host every step (SD's PNDM) leaves the GPU idle while the
host prepares the next call, so this host time is on the critical path. Per call (the GPU
drained before each one, so no call waits for the previous) it measures, on the host:

  dynamo   from the call until lyra's runner starts: Dynamo's guards and the frame's
           bytecode gathering the graph inputs (every parameter is an input);
  runner   the runner before the replay: signature, parameter addresses, input copies
           (plus the quantised-weight version check when quantised);
  replay   launching the CUDA graph;
  after    cloning the outputs, and back to the caller.

Medians over --calls calls, in microseconds.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import lyradynamo  # noqa: E402
from lyradynamo import runtime, zoo  # noqa: E402
from profile_gaps import QUANT  # noqa: E402  (benchmarks/ is this script's folder)


class _Marks:
    """perf_counter stamps set by the instrumented runner."""

    def __init__(self) -> None:
        self.enter = self.replay0 = self.replay1 = 0.0


def _instrument(marks: _Marks):
    """Wrap CudaGraphRunner.__call__ and CUDAGraph.replay with time stamps; returns an undo."""
    call, replay = runtime.CudaGraphRunner.__call__, torch.cuda.CUDAGraph.replay

    def timed_call(self, *args):
        marks.enter = time.perf_counter()
        return call(self, *args)

    def timed_replay(self):
        marks.replay0 = time.perf_counter()
        replay(self)
        marks.replay1 = time.perf_counter()

    runtime.CudaGraphRunner.__call__, torch.cuda.CUDAGraph.replay = timed_call, timed_replay

    def undo():
        runtime.CudaGraphRunner.__call__, torch.cuda.CUDAGraph.replay = call, replay

    return undo


def _cprofile_calls(compiled, inputs: dict, calls: int, top: int) -> None:
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    for _ in range(calls):
        torch.cuda.synchronize()
        prof.enable()
        compiled(**inputs)
        prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(top)
    print(f"-- cProfile over {calls} calls (per-call times: divide by {calls})\n" + buf.getvalue(), flush=True)


def guard_tree_stats(model) -> dict:
    """Size of the guard tree of model's newest compilation: managers, those not tag safe (checked
    guard by guard on every call), tag-safe roots (checked by dict tags), and the nodes lyra's
    extension marked (lyradynamo/guard_tags.py)."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    from lyradynamo import guard_tags

    try:
        entries = _debug_get_cache_entry_list(type(model).forward.__code__)
        nodes = [n for _, n, _ in guard_tags._walk(entries[0].guard_manager.root)]
    except Exception as exc:  # noqa: BLE001 - a diagnostic only
        return {"guard_tree_error": str(exc)[:200]}
    return {"guard_managers": len(nodes), "not_tag_safe": sum(not n.is_tag_safe() for n in nodes),
            "tag_safe_roots": sum(n.is_tag_safe_root() for n in nodes),
            "marked_by_lyra": guard_tags.last_marked}


def measure(model_name: str, mode: str, calls: int, skip_guards: bool = False, cprofile: int = 0,
            lyra_config: dict | None = None) -> dict:
    dtype = zoo.default_dtype(model_name, "cuda")
    model = zoo.build_denoiser(model_name, tiny=False, dtype=dtype, device="cuda")
    inputs = zoo.denoiser_inputs(model_name, model, batch=2 if model_name in ("sd15", "sdxl") else 1)
    marks = _Marks()
    parts = {"total": [], "dynamo": [], "runner": [], "replay": [], "after": []}
    with torch.no_grad(), lyradynamo.config.patch(quant=QUANT[mode], **(lyra_config or {})):
        compiled = torch.compile(model, backend="lyra")
        for _ in range(3):
            compiled(**inputs)
        if cprofile:  # where the host time of the calls goes, by function (before the timed calls)
            _cprofile_calls(compiled, inputs, calls, cprofile)
        undo = _instrument(marks)
        # skip_guards is UNSAFE (torch's docs): only the guards telling compiled graphs apart run
        try:
            with torch.compiler.set_stance("default", skip_guard_eval_unsafe=skip_guards):
                for _ in range(calls):
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    compiled(**inputs)
                    t1 = time.perf_counter()
                    parts["total"].append(t1 - t0)
                    parts["dynamo"].append(marks.enter - t0)
                    parts["runner"].append(marks.replay0 - marks.enter)
                    parts["replay"].append(marks.replay1 - marks.replay0)
                    parts["after"].append(t1 - marks.replay1)
        finally:
            undo()
        torch.cuda.synchronize()
    tree = guard_tree_stats(model)
    n_params = sum(1 for _ in model.parameters()) + sum(1 for _ in model.buffers())
    del compiled, model
    torch._dynamo.reset()
    torch.cuda.empty_cache()
    return {"model": model_name, "mode": mode, "gpu": torch.cuda.get_device_name(), "calls": calls,
            "skip_guard_eval_unsafe": skip_guards,
            "parameters_and_buffers": n_params, "lyra_config": lyra_config or {}, **tree,
            **{f"{k}_us": round(statistics.median(v) * 1e6, 1) for k, v in parts.items()}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="sd15")
    p.add_argument("--mode", default="lyra", choices=sorted(QUANT))
    p.add_argument("--calls", type=int, default=50)
    p.add_argument("--out", default=None)
    p.add_argument("--cprofile", type=int, default=0, help="also print the top N functions (cProfile) of the calls")
    p.add_argument("--policy", action="append", default=[], metavar="KEY=VALUE",
                   help="override one of the shape policy's Dynamo settings for this run (an A/B of a "
                        "setting in one call, e.g. use_recursive_dict_tags_for_guards=False)")
    p.add_argument("--skip-guard-eval", action="store_true",
                   help="also measure under torch.compiler.set_stance(skip_guard_eval_unsafe=True)")
    p.add_argument("--lyra-config", action="append", default=[], metavar="KEY=VALUE",
                   help="a lyradynamo.config option for the calls (as bench.py's)")
    p.add_argument("--ab", default=None, metavar="KEY",
                   help="a boolean lyradynamo.config option measured on, off, on again per model, in this "
                        "process (an A/B/A on one host), e.g. extended_dict_tags")
    args = p.parse_args()
    from bench import parse_lyra_config  # noqa: E402  (benchmarks/ is this script's folder)
    from lyradynamo import shape_policy

    lyra_config = parse_lyra_config(args.lyra_config)
    settings = [dict(lyra_config)] if not args.ab else [
        {**lyra_config, args.ab: value} for value in (True, False, True)]

    for item in args.policy:  # e.g. use_recursive_dict_tags_for_guards=False
        key, _, value = item.partition("=")
        if key not in shape_policy._DYNAMO_POLICY:
            p.error(f"--policy {key}: not one of the shape policy's settings {sorted(shape_policy._DYNAMO_POLICY)}")
        shape_policy._DYNAMO_POLICY[key] = {"True": True, "False": False}.get(value, value)
    rows = []
    runs = [(n, s, cfg) for n in args.models.split(",") for cfg in settings
            for s in ((False, True) if args.skip_guard_eval else (False,))]
    for name, skip, cfg in runs:
        row = measure(name, args.mode, args.calls, skip, args.cprofile if not skip else 0, cfg)
        row["policy_overrides"] = args.policy
        rows.append(row)
        print("== " + json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
