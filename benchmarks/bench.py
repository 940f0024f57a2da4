#!/usr/bin/env python3
"""lyradynamo benchmark: time-to-image of diffusers denoising loops, eager vs compiled.

    python benchmarks/bench.py --model sd15 --modes eager,inductor,inductor-cg,lyra \\
        --sizes 512x512,768x768 --steps 20 [--scenario steady|sweep|cold] [--quick]

One JSON object per (model, mode, size) is appended to --out as soon as it is measured (a run
killed by a time limit keeps what it measured). See benchmarks/README.md for the fields.

Modes (run in this order: eager first, torchao-fp8 last because it quantizes the model in place;
one model instance is shared, each mode wraps it anew after torch._dynamo.reset()):
  eager        the model as is
  inductor     torch.compile(model, dynamic=None)
  inductor-cg  torch.compile(model, mode="reduce-overhead") (inductor + CUDA graph trees)
  lyra         torch.compile(model, backend="lyra")
  lyra-fp8/-int8  lyra with lyradynamo.config.quant = "fp8"/"int8"
  torchao-fp8  torchao Float8DynamicActivationFloat8WeightConfig(PerRow()) + torch.compile(model)
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import gc
import importlib
import importlib.util
import json
import math
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

_PROCESS_T0 = time.time()  # before torch & co are imported (cold children report import_s from it)

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for _p in (ROOT, HERE):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import torch  # noqa: E402

import lyradynamo  # noqa: E402  (registers backend="lyra")
import denoise  # noqa: E402
from lyradynamo import zoo  # noqa: E402
from lyradynamo.quant import numerics  # noqa: E402

ALL_MODES = ("eager", "inductor", "inductor-cg", "lyra", "lyra-fp8", "lyra-int8", "torchao-fp8")
QUANT_MODES = {"lyra-fp8": "fp8", "lyra-int8": "int8"}
PEER_MODES = ("inductor", "inductor-cg", "torchao-fp8")
SCENARIOS = ("steady", "sweep", "cold")
SWEEP_SIZES = "512x512,768x768,1024x1024,1280x768,576x1024"
QUICK_SIZES = "64x64"
QUICK_SWEEP_SIZES = "64x64,64x96,96x64"
DEFAULT_MODES = "eager,inductor,inductor-cg,lyra"
QUICK_MODES = "eager,lyra"
PSNR_IDENTICAL = 200.0  # psnr_db written for bit-identical images (mse == 0)
ERR_QUANT = "quant mode not implemented"
ERR_TORCHAO = "torchao not importable"
DTYPES = {
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
}
DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
TABLE_COLS = ("mode", "size", "seconds", "first_call_s", "compiles", "peak_mem_gb", "rel_err", "sqnr_db",
              "psnr_db")


# ------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True,
                   help="sd15, sdxl or flux; a comma list runs them one after the other")
    p.add_argument("--modes", default=None,
                   help=f"comma list of {','.join(ALL_MODES)} (default {DEFAULT_MODES}; --quick: {QUICK_MODES}); "
                        "a lyra mode may add its own lyradynamo.config options, e.g. "
                        "lyra@params_as_attributes=false (an A/B in one process)")
    p.add_argument("--sizes", default=None,
                   help="comma list of WxH (default: the model's native size; sweep: "
                        f"{SWEEP_SIZES}; --quick: {QUICK_SIZES}, sweep {QUICK_SWEEP_SIZES})")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default 20; --quick: 2)")
    p.add_argument("--batch", type=int, default=1, help="images per prompt (SD UNet batch is 2x for CFG)")
    p.add_argument("--model-path", default=None, help="local diffusers checkpoint (pipeline dir) instead of random weights")
    p.add_argument("--out", default=None,
                   help="JSONL file rows are appended to (default benchmarks/results/<model>-<gpu>.jsonl, "
                        "--quick: benchmarks/results/quick-<gpu>.jsonl)")
    p.add_argument("--runs", type=int, default=None, help="timed runs, median reported (default 3; cold: 1)")
    p.add_argument("--warmup", type=int, default=1,
                   help="untimed loops after the first (compiling) call, before the timed runs (default 1)")
    p.add_argument("--quick", action="store_true",
                   help="tiny zoo configs on the CPU in fp32, 2 steps, 64x64, modes eager,lyra")
    p.add_argument("--scenario", choices=SCENARIOS, default="steady")
    p.add_argument("--dtype", default=None, help="fp16|bf16|fp32 (default fp16 for SD, bf16 for FLUX; fp32 on CPU)")
    p.add_argument("--device", default=None, help="cuda or cpu (default cuda when available; --quick: cpu)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and inputs")
    p.add_argument("--prompt-len", type=int, default=None, help="text tokens (default: the pipeline's, FLUX 512)")
    p.add_argument("--no-quality", action="store_true",
                   help="skip rel_err/psnr_db (no eager reference is computed for modes other than eager)")
    p.add_argument("--warm-cache", action="store_true",
                   help="cold scenario: keep the inductor/triton on-disk caches (default: a fresh cache dir per child)")
    p.add_argument("--report", default=None, help="regenerate this markdown file from --out at the end (report.py)")
    p.add_argument("--lyra-config", action="append", default=[], metavar="KEY=VALUE",
                   help="a lyradynamo.config option for the lyra modes (repeatable), e.g. fp8_attention=off, "
                        "passes=-shared_input (a tuple option less one name), quant_exclude=+REGEX (one more) "
                        "(the rows' lyra_config shows the options in force)")
    p.add_argument("--compile-vae", action="store_true",
                   help="also compile the VAE decoder (vae.decode) in the compiled modes, with the mode's own "
                        "compiler (Inductor, Inductor + CUDA graphs, lyra without quantisation); eager rows "
                        "decode eagerly. Rows say which in their `vae` field")
    p.add_argument("--skip-guard-eval", action="store_true",
                   help="timed runs of the compiled modes under torch.compiler.set_stance("
                        "skip_guard_eval_unsafe=True): Dynamo runs only the guards that tell its compiled "
                        "graphs apart. UNSAFE (torch's docs): a change the skipped guards would have caught "
                        "runs the stale graph. Measures what the guards cost per image; rows say so in a note")
    p.add_argument("--progress", choices=("auto", "tqdm", "plain", "none"), default="auto")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's; --quick: 1, tiny models gain nothing from more)")
    p.add_argument("--_cold-child", dest="cold_child", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def parse_size(s: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", s)
    if not m:
        raise SystemExit(f"bad size {s!r}: expected WxH, e.g. 512x512")
    return int(m.group(1)), int(m.group(2))  # (width, height)


def resolve(args):
    """Fill the defaults that depend on --quick / --scenario / the model."""
    args.models = [m.strip() for m in args.model.split(",") if m.strip()]
    for m in args.models:
        denoise.family(m)  # raises for unsupported models
    if args.model_path and len(args.models) > 1:
        raise SystemExit("--model-path needs a single --model")
    if args.device is None:
        args.device = "cpu" if args.quick or not torch.cuda.is_available() else "cuda"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch.cuda.is_available() is False")
    if args.steps is None:
        args.steps = 2 if args.quick else 20
    if args.modes is None:
        args.modes = QUICK_MODES if args.quick else DEFAULT_MODES
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m.split("@")[0] not in ALL_MODES or ("@" in m and not m.startswith("lyra"))]
    if bad:
        raise SystemExit(f"unknown mode(s) {bad}; known: {ALL_MODES} (lyra modes may add @KEY=VALUE)")
    for m in modes:
        split_mode(m)  # a bad @KEY=VALUE stops here, before any work
    # eager first (the reference), torchao-fp8 last (quantizes the shared model in place).
    args.mode_list = sorted(dict.fromkeys(modes), key=lambda m: (m != "eager", m == "torchao-fp8", modes.index(m)))
    if args.runs is None:
        args.runs = 1 if args.scenario == "cold" else 3
    args.runs = max(1, args.runs)
    args.warmup = max(0, args.warmup)
    if args.threads is None and args.quick:
        args.threads = 1
    return args


def sizes_for(args, model_name):
    if args.sizes:
        spec = args.sizes
    elif args.quick:
        spec = QUICK_SWEEP_SIZES if args.scenario == "sweep" else QUICK_SIZES
    elif args.scenario == "sweep":
        spec = SWEEP_SIZES
    else:
        h, w = zoo.default_size(model_name, tiny=False)
        spec = f"{w}x{h}"
    sizes = [parse_size(s) for s in spec.split(",") if s.strip()]
    mult = denoise.size_multiple(model_name)
    for w, h in sizes:
        if w % mult or h % mult:
            raise SystemExit(f"{model_name}: size {w}x{h} is not a multiple of {mult}")
    return sizes


def dtype_for(args, model_name):
    if args.dtype:
        if args.dtype not in DTYPES:
            raise SystemExit(f"bad --dtype {args.dtype!r}; use one of {sorted(DTYPES)}")
        return DTYPES[args.dtype]
    if not args.device.startswith("cuda"):
        return torch.float32
    return torch.bfloat16 if denoise.family(model_name) == "flux" else torch.float16


# ------------------------------------------------------------------------------------------
# Environment, output
# ------------------------------------------------------------------------------------------


def gpu_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return "cpu"


def gpu_short(name: str) -> str:
    if name == "cpu":
        return "cpu"
    skip = {"nvidia", "geforce", "rtx", "tesla", "quadro"}
    for tok in re.split(r"[\s_-]+", name):
        if tok and tok.lower() not in skip:
            return re.sub(r"[^a-z0-9]", "", tok.lower()) or "gpu"
    return "gpu"


# Dynamo's own timers (torch._dynamo.utils.compilation_time_metrics, seconds per event): the
# trace (bytecode_tracing, of which get_fake_value: the ops' fake runs), the backend call (lyra's
# passes, quantisation, runner set-up), guard building and Dynamo's collections. Rows keep the
# first call's share of each, so a slow first call on one host can be split into Dynamo's part and
# lyra's (benchmarks/NOTES.md, session 30: one SDXL UNet took 29-43 s on H200 hosts).
DYNAMO_PHASES = {"compile_inner": "_compile.compile_inner", "bytecode_tracing": "bytecode_tracing",
                 "fake_runs": "get_fake_value", "variable_building": "variable_builder_call",
                 "backend": "OutputGraph.call_user_compiler", "build_guards": "build_guards", "gc": "gc"}


def dynamo_seconds() -> dict:
    """Seconds spent so far in this process per DYNAMO_PHASES entry ({} where torch keeps no
    such timers)."""
    try:
        from torch._dynamo.utils import compilation_time_metrics as metrics
    except ImportError:
        return {}
    return {name: sum(metrics.get(key, ())) for name, key in DYNAMO_PHASES.items()}


def dynamo_phases(before: dict) -> dict | None:
    """The Dynamo seconds (dynamo_seconds) spent since `before` was taken, rounded; None where
    torch keeps no timers."""
    after = dynamo_seconds()
    return {k: round(v - before.get(k, 0.0), 3) for k, v in after.items()} or None


def backend_phases(first_graph: int) -> dict:
    """Seconds of lyra's backend by phase (passes, quant, runner, ...), summed over the graphs
    compiled since `lyradynamo.compiled_graphs()` held `first_graph` of them."""
    phases = collections.Counter()
    for r in lyradynamo.compiled_graphs()[first_graph:]:
        phases.update(r.report.phases_s)
    return {k: round(v, 3) for k, v in phases.items()}


def cuda_jit_cache_bytes() -> int:
    """Bytes in the CUDA driver's JIT cache (CUDA_CACHE_PATH, default ~/.nv/ComputeCache), where
    cuDNN's run-time compiled attention kernels are kept between processes: an empty cache makes
    first calls slower (benchmarks/NOTES.md, session 26), so rows record it."""
    root = os.environ.get("CUDA_CACHE_PATH") or os.path.join(os.path.expanduser("~"), ".nv", "ComputeCache")
    total = 0
    for folder, _, files in os.walk(root):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(folder, f))
            except OSError:
                pass
    return total


def environment(device: str) -> dict:
    import diffusers

    env = {
        "gpu": gpu_name(device),
        "device": device,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "lyradynamo": getattr(lyradynamo, "__version__", None),
        "python": platform.python_version(),
        "cuda": torch.version.cuda,
        "lyra_csrc": importlib.util.find_spec("lyradynamo._C") is not None,
        "cuda_jit_cache_bytes_at_start": cuda_jit_cache_bytes(),
    }
    return env


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def err_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:500]


class JsonlWriter:
    """Appends one row per line and flushes it to disk at once."""

    def __init__(self, path: str):
        self.path = path
        d = os.path.dirname(os.path.abspath(path))
        os.makedirs(d, exist_ok=True)
        self.rows: list[dict] = []

    def write(self, row: dict) -> None:
        line = json.dumps(row, allow_nan=False, default=str)
        with open(self.path, "a") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.rows.append(row)


class Progress:
    def __init__(self, kind: str, total: int, desc: str):
        self.n, self.total, self.desc, self.bar = 0, total, desc, None
        self.kind = kind
        if kind in ("auto", "tqdm"):
            try:
                from tqdm import tqdm

                tty = sys.stderr.isatty()
                self.bar = tqdm(total=total, desc=desc, file=sys.stderr, dynamic_ncols=True,
                                mininterval=0.5 if tty else 10.0)
            except ImportError:
                self.kind = "plain"
        if self.bar is None and self.kind != "none":
            self.kind = "plain"

    def step(self, what: str, n: int = 1) -> None:
        self.n += n
        if self.bar is not None:
            self.bar.set_postfix_str(what, refresh=False)
            self.bar.update(n)
        elif self.kind == "plain":
            print(f"[{self.desc} {self.n}/{self.total}] {what}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ------------------------------------------------------------------------------------------
# Measurement helpers
# ------------------------------------------------------------------------------------------


class _CpuEvent:
    def __init__(self):
        self.t = None

    def record(self):
        self.t = time.perf_counter()

    def synchronize(self):
        pass

    def elapsed_time(self, end) -> float:  # milliseconds, like torch.cuda.Event
        return (end.t - self.t) * 1000.0


def _events(cuda: bool):
    if cuda:
        return [torch.cuda.Event(enable_timing=True) for _ in range(3)]
    return [_CpuEvent() for _ in range(3)]


def _sync(cuda: bool):
    if cuda:
        torch.cuda.synchronize()


def rel_err(out: torch.Tensor, ref: torch.Tensor):
    a, b = out.double().cpu(), ref.double().cpu()
    if a.shape != b.shape:
        raise RuntimeError(f"output shape {tuple(a.shape)} != eager {tuple(b.shape)}")
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return None
    den = b.norm().item()
    return (a - b).norm().item() / den if den > 0 else None


def sqnr_db(out: torch.Tensor, ref: torch.Tensor):
    """Signal-to-quantisation-noise of one model call against eager, in dB (None if not finite)."""
    a, b = out.double().cpu(), ref.double().cpu()
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return None
    return min(PSNR_IDENTICAL, numerics.sqnr_db(b, a))


def psnr(img: torch.Tensor, ref: torch.Tensor):
    """PSNR in dB of two [0, 1] images; PSNR_IDENTICAL when they are bit-identical."""
    a, b = img.double(), ref.double()
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return None
    mse = ((a - b) ** 2).mean().item()
    if mse == 0:
        return PSNR_IDENTICAL
    return min(PSNR_IDENTICAL, 10 * math.log10(1.0 / mse))


def compile_counter(mode: str):
    """(name, fn) giving the number of compilations so far for this mode.

    lyra modes: lyradynamo.compile_count() (graphs the lyra backend compiled).
    inductor / torchao modes: torch._dynamo counters["stats"]["unique_graphs"] (graphs Dynamo
    handed to inductor, recompilations included). eager: 0."""
    if mode.startswith("lyra"):
        return "lyradynamo.compile_count", lyradynamo.compile_count
    if mode == "eager":
        return "none", lambda: 0
    from torch._dynamo.utils import counters

    return "dynamo.unique_graphs", lambda: int(counters["stats"]["unique_graphs"])


def quant_implemented(q: str) -> bool:
    """Whether lyradynamo implements config.quant == q.

    An explicit ``quant_implemented`` attribute on lyradynamo.config (bool or a collection of
    modes) decides when present. Otherwise: the option is only *accepted* by config.py, so look
    for a reader of ``config.quant`` anywhere else in the package."""
    flag = getattr(lyradynamo.config, "quant_implemented", None)
    if flag is not None:
        return q in flag if isinstance(flag, (tuple, list, set, frozenset, dict)) else bool(flag)
    import ast

    def reads_quant(node) -> bool:
        if isinstance(node, ast.Attribute) and node.attr == "quant":  # config.quant, lyradynamo.config.quant
            v = node.value
            return (isinstance(v, ast.Name) and v.id in ("config", "cfg", "_config")) or (
                isinstance(v, ast.Attribute) and v.attr == "config")
        if isinstance(node, ast.Subscript):  # snapshot["quant"]
            return isinstance(node.slice, ast.Constant) and node.slice.value == "quant"
        return False

    pkg = os.path.dirname(os.path.abspath(lyradynamo.__file__))
    for dirpath, _dirs, files in os.walk(pkg):
        for fn in files:
            if fn.endswith(".py") and not (dirpath == pkg and fn == "config.py"):
                try:
                    with open(os.path.join(dirpath, fn), encoding="utf-8") as f:
                        tree = ast.parse(f.read())
                except (OSError, SyntaxError, ValueError):
                    continue
                if any(reads_quant(n) for n in ast.walk(tree)):
                    return True
    return False


def mode_unavailable(mode: str):
    """Error text when the mode cannot run here (checked before any work), else None."""
    mode = split_mode(mode)[0]
    if mode in QUANT_MODES and not quant_implemented(QUANT_MODES[mode]):
        return ERR_QUANT
    if mode == "torchao-fp8":
        try:
            from torchao.quantization import (  # noqa: F401
                Float8DynamicActivationFloat8WeightConfig,
                PerRow,
                quantize_,
            )
        except Exception as exc:  # noqa: BLE001
            return ERR_TORCHAO if isinstance(exc, ImportError) else f"{ERR_TORCHAO}: {err_text(exc)}"[:500]
    return None


LYRA_CONFIG: dict = {}  # --lyra-config options, patched into lyradynamo.config for the lyra modes


def parse_lyra_config(items) -> dict:
    try:
        return lyradynamo.config.parse(items)
    except lyradynamo.config.LyraConfigError as exc:
        raise SystemExit(f"--lyra-config {exc}") from None


def split_mode(mode: str) -> tuple[str, dict]:
    """'lyra@params_as_attributes=false' -> ('lyra', {'params_as_attributes': False}): a lyra mode
    with lyradynamo.config options of its own on top of --lyra-config (an A/B in one process)."""
    base, *items = mode.split("@")
    return base, parse_lyra_config(items)


def make_fn(mode: str, model):
    """(callable used as the denoiser, per-call hook or None, context manager kept open while it runs)."""
    mode, own_config = split_mode(mode)
    if mode == "eager":
        return model, None, contextlib.nullcontext()
    if mode == "inductor":
        return torch.compile(model, dynamic=None), None, contextlib.nullcontext()
    if mode == "inductor-cg":
        return torch.compile(model, mode="reduce-overhead"), torch.compiler.cudagraph_mark_step_begin, contextlib.nullcontext()
    if mode == "lyra":
        return (torch.compile(model, backend="lyra"), None,
                lyradynamo.config.patch(**{**LYRA_CONFIG, **own_config, "quant": "none"}))
    if mode in QUANT_MODES:
        return (torch.compile(model, backend="lyra"), None,
                lyradynamo.config.patch(**{**LYRA_CONFIG, **own_config, "quant": QUANT_MODES[mode]}))
    if mode == "torchao-fp8":
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

        quantize_(model, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))
        return torch.compile(model), None, contextlib.nullcontext()
    raise ValueError(mode)


def make_decoder(mode: str, vae):
    """vae.decode compiled the way ``mode`` compiles the denoiser (bench --compile-vae), or None
    for eager. Quantisation stays off in the decoder (lyra-fp8 / -int8 / torchao-fp8 rows decode
    in the VAE's own dtype); Inductor + CUDA graphs starts a new graph-tree step before it and
    clones its output (the image must outlive the next step's replays)."""
    if mode == "eager":
        return None
    if mode.startswith("lyra"):
        compiled = torch.compile(vae.decode, backend="lyra")

        def decode(*args, **kwargs):
            with lyradynamo.config.patch(quant="none"):
                return compiled(*args, **kwargs)
        return decode
    if mode == "inductor-cg":
        compiled = torch.compile(vae.decode, mode="reduce-overhead")

        def decode(*args, **kwargs):  # cloned: the next step's replay (the quality check's
            # denoiser call) would overwrite a graph tree's output in place
            torch.compiler.cudagraph_mark_step_begin()
            return torch.utils._pytree.tree_map_only(torch.Tensor, torch.clone, compiled(*args, **kwargs))
        return decode
    return torch.compile(vae.decode, dynamic=None)


def cleanup(cuda: bool):
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def _lyra_cfg():
    try:
        snap = lyradynamo.config.snapshot()
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in snap.items()}
    except Exception:  # noqa: BLE001
        return None


# ------------------------------------------------------------------------------------------
# Components
# ------------------------------------------------------------------------------------------


def build_components(args, model_name):
    dtype = dtype_for(args, model_name)
    tiny = bool(args.quick)
    t0 = time.perf_counter()
    model = zoo.build_denoiser(model_name, tiny=tiny, dtype=dtype, device=args.device, seed=args.seed,
                               model_path=args.model_path)
    model.requires_grad_(False)
    vae = denoise.build_vae(model_name, tiny=tiny, dtype=dtype, device=args.device, seed=args.seed,
                            model_path=args.model_path)
    scheduler = denoise.build_scheduler(model_name, args.model_path)
    _sync(args.device.startswith("cuda"))
    return model, vae, scheduler, dtype, time.perf_counter() - t0


def base_row(args, env, model_name, mode, size, dtype, scenario):
    w, h = size
    row = {
        "model": model_name, "mode": mode, "size": f"{w}x{h}", "width": w, "height": h,
        "steps": args.steps, "batch": args.batch, "dtype": DTYPE_NAMES.get(dtype, str(dtype)),
        "scenario": scenario,
        "seconds": None, "first_call_s": None, "compiles": None, "new_compiles": None,
        "compiles_source": None, "peak_mem_gb": None, "rel_err": None, "sqnr_db": None, "psnr_db": None,
        "loop_s": None, "decode_s": None, "samples": None, "runs": args.runs, "warmup": args.warmup,
        "tiny": bool(args.quick), "weights": "checkpoint" if args.model_path else "random",
        "vae": "compiled" if args.compile_vae and mode != "eager" else "eager",
    }
    row.update(env)
    row["date"] = now_iso()
    row["error"] = None
    row["notes"] = None
    return row


def _add_note(row, note):
    row["notes"] = note if not row.get("notes") else f"{row['notes']}; {note}"


# ------------------------------------------------------------------------------------------
# steady / sweep: one process, every mode on one model instance
# ------------------------------------------------------------------------------------------


def run_in_process(args, model_name, env, writer, scenario):
    cuda = args.device.startswith("cuda")
    sizes = sizes_for(args, model_name)
    model, vae, scheduler, dtype, build_s = build_components(args, model_name)
    print(f"[bench] {model_name}: built denoiser+VAE ({'tiny' if args.quick else 'full size'}, "
          f"{DTYPE_NAMES.get(dtype)}) on {args.device} in {build_s:.1f}s", file=sys.stderr, flush=True)
    workloads = {
        s: denoise.Workload(model_name, model, vae, scheduler, height=s[1], width=s[0], batch=args.batch,
                            steps=args.steps, seed=args.seed, prompt_len=args.prompt_len)
        for s in sizes
    }
    refs: dict = {}  # size -> {"out": first-call output, "image": decoded [0,1] image}
    per_size = 1 + args.warmup + args.runs
    prog = Progress(args.progress, len(args.mode_list) * len(sizes) * per_size, model_name)

    def ensure_refs():
        """Eager reference (untimed) for every size that has none yet."""
        if args.no_quality:
            return
        for s in sizes:
            if s in refs:
                continue
            try:
                wl = workloads[s]
                out = wl.first_call(model)
                img = denoise.postprocess(wl.run(model))
                refs[s] = {"out": out.cpu(), "image": img}
            except Exception as exc:  # noqa: BLE001 - only the quality columns are lost
                print(f"[bench] eager reference at {s[0]}x{s[1]} failed: {err_text(exc)}", file=sys.stderr)
                refs[s] = None
            out = img = None
            cleanup(cuda)

    try:
        for mode in args.mode_list:
            unavailable = mode_unavailable(mode)
            if unavailable:
                for s in sizes:
                    row = base_row(args, env, model_name, mode, s, dtype, scenario)
                    row["error"] = unavailable
                    writer.write(row)
                    prog.step(f"{mode} {s[0]}x{s[1]} skipped", per_size)
                continue
            if mode != "eager":
                ensure_refs()
            torch._dynamo.reset()
            cleanup(cuda)
            src, count = compile_counter(mode)
            fn = ctx = None
            try:
                fn, hook, ctx = make_fn(mode, model)
                decode_fn = make_decoder(mode, vae) if args.compile_vae else None
                for wl in workloads.values():
                    wl.decode_fn = decode_fn
                ctx.__enter__()
                c_mode0 = count()
            except Exception as exc:  # noqa: BLE001
                msg = err_text(exc)
                traceback.print_exc()
                for s in sizes:
                    row = base_row(args, env, model_name, mode, s, dtype, scenario)
                    row["error"] = msg
                    writer.write(row)
                    prog.step(f"{mode} {s[0]}x{s[1]} failed", per_size)
                fn = ctx = None
                cleanup(cuda)
                continue
            try:
                for s in sizes:
                    row = base_row(args, env, model_name, mode, s, dtype, scenario)
                    row["compiles_source"] = src
                    if mode.startswith("lyra"):
                        row["lyra_config"] = _lyra_cfg()
                    done, failed = 0, False
                    try:
                        done = measure(args, row, fn, hook, workloads[s], refs.get(s), count, c_mode0,
                                       cuda, prog, f"{mode} {s[0]}x{s[1]}")
                        if mode == "eager" and refs.get(s) is None and "_ref" in row:
                            refs[s] = row.pop("_ref")
                        row.pop("_ref", None)
                    except KeyboardInterrupt:
                        row.pop("_ref", None)
                        row.pop("_steps_done", None)
                        row["error"] = "interrupted (SIGINT/SIGTERM, e.g. a time limit) while measuring"
                        row["date"] = now_iso()
                        writer.write(row)
                        raise
                    except Exception as exc:  # noqa: BLE001 - one mode/size failing must not end the run
                        row.pop("_ref", None)
                        row["error"] = err_text(exc)
                        print(f"[bench] {model_name} {mode} {s[0]}x{s[1]} failed:", file=sys.stderr)
                        traceback.print_exc()
                        try:
                            row["compiles"] = count() - c_mode0
                        except Exception:  # noqa: BLE001
                            pass
                        failed = True
                    if failed:  # outside the except block: the traceback no longer pins tensors
                        cleanup(cuda)
                    done = row.pop("_steps_done", done) or 0
                    row["date"] = now_iso()
                    writer.write(row)
                    if per_size - done > 0:
                        prog.step(f"{mode} {s[0]}x{s[1]}", per_size - done)
            finally:
                if ctx is not None:
                    ctx.__exit__(None, None, None)
                for wl in workloads.values():
                    wl.decode_fn = None
                del fn
                torch._dynamo.reset()
                if split_mode(mode)[0] in QUANT_MODES:  # bring the high-precision weights back for later modes
                    lyradynamo.quant.restore(model)
                cleanup(cuda)
    finally:
        prog.close()
    del workloads, model, vae
    cleanup(cuda)


def _capture_seconds() -> float:
    """Seconds lyra's runtime spent capturing CUDA graphs so far in this process."""
    return sum(r.summary.get("capture_s", 0.0) for r in lyradynamo.compiled_graphs())


def measure(args, row, fn, hook, wl, ref, count, c_mode0, cuda, prog, label):
    """Fill row's measurements for one mode x size. Returns the number of loops run."""
    steps_done = 0
    c0 = count()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    # 1) first call at this size: tracing + compiling + capture (for a new size: recompilation).
    lyra_mode = row["mode"].startswith("lyra")
    cap0 = _capture_seconds() if lyra_mode else 0.0
    if lyra_mode:
        from lyradynamo.ops import gated_gemm  # which path each gated / GLU linear shape took, and why

        timed_before = set(gated_gemm.choices())
    dynamo0 = dynamo_seconds()
    t0 = time.perf_counter()
    image = wl.run(fn, hook)
    _sync(cuda)
    row["first_call_s"] = round(time.perf_counter() - t0, 4)
    row["dynamo_phases_s"] = dynamo_phases(dynamo0)
    if lyra_mode:  # where the first call went: lyra's backend (passes, quantisation) and CUDA-graph
        # captures; the rest is Dynamo's tracing and the loop itself
        row["backend_s"] = round(sum(r.seconds for r in lyradynamo.compiled_graphs()[c0:]), 3)
        row["capture_s"] = round(_capture_seconds() - cap0, 3)
        row["backend_phases_s"] = backend_phases(c0)
        # the shapes timed during this first call (a mode after another in the process reuses the
        # earlier modes' choices for shapes they share; those are in the earlier rows)
        row["gated_gemm_choices"] = {gated_gemm.describe(key): v for key, v in gated_gemm.choices().items()
                                     if key not in timed_before} or None
    steps_done += 1
    row["_steps_done"] = steps_done
    prog.step(f"{label} first call {row['first_call_s']:.2f}s")
    first_image = image
    # 2) warm-up
    for _ in range(args.warmup):
        wl.run(fn, hook)
        steps_done += 1
        row["_steps_done"] = steps_done
        prog.step(f"{label} warm-up")
    # 3) timed runs (peak_mem_steady_gb: their peak alone, after compilation and capture)
    if cuda:
        torch.cuda.synchronize()
        steady0 = torch.cuda.max_memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    totals, loops, decodes = [], [], []
    skip_guards = args.skip_guard_eval and row["mode"] != "eager"
    if skip_guards:
        _add_note(row, "timed with skip_guard_eval_unsafe=True (Dynamo guards skipped: unsafe)")
    with torch.compiler.set_stance("default", skip_guard_eval_unsafe=skip_guards):
        for _ in range(args.runs):
            ev = _events(cuda)
            image = wl.run(fn, hook, events=ev)
            ev[2].synchronize()
            totals.append(ev[0].elapsed_time(ev[2]) / 1000.0)
            loops.append(ev[0].elapsed_time(ev[1]) / 1000.0)
            decodes.append(ev[1].elapsed_time(ev[2]) / 1000.0)
            steps_done += 1
            row["_steps_done"] = steps_done
            prog.step(f"{label} {totals[-1]:.3f}s")
    _sync(cuda)
    if cuda:
        steady = torch.cuda.max_memory_allocated()
        row["peak_mem_gb"] = round(max(steady0, steady) / 1e9, 3)
        row["peak_mem_steady_gb"] = round(steady / 1e9, 3)
    row["seconds"] = round(statistics.median(totals) / args.batch, 5)
    row["loop_s"] = round(statistics.median(loops), 5)
    row["decode_s"] = round(statistics.median(decodes), 5)
    row["samples"] = [round(t, 5) for t in totals]
    c1 = count()
    row["compiles"] = c1 - c_mode0
    row["new_compiles"] = c1 - c0
    # 4) quality vs eager (untimed): one denoiser call, and the decoded image of the whole loop.
    if not args.no_quality:
        if hook is not None:
            hook()
        out = wl.first_call(fn)
        img = denoise.postprocess(image)
        if ref is None and row["mode"] == "eager":
            # eager is the reference: its own first image, and its first call (run-to-run check below)
            ref = {"out": wl.first_call(wl.model).cpu(), "image": denoise.postprocess(first_image)}
            row["_ref"] = ref
        if ref is None:
            _add_note(row, "no eager reference (it failed): rel_err/psnr_db not measured")
        else:
            row["rel_err"] = rel_err(out, ref["out"])
            row["sqnr_db"] = sqnr_db(out, ref["out"])
            if row["rel_err"] is None:
                _add_note(row, "rel_err: non-finite or zero reference/output")
            if row["mode"] == "eager":
                row["psnr_db"] = None  # eager vs itself
            else:
                row["psnr_db"] = psnr(img, ref["image"])
                if row["psnr_db"] is None:
                    _add_note(row, "psnr: non-finite image or reference")
        del out
    row.pop("_steps_done", None)
    return steps_done


# ------------------------------------------------------------------------------------------
# cold: time-to-first-image of a fresh process
# ------------------------------------------------------------------------------------------


def child_argv(args, model_name, mode, size, result_path):
    argv = [sys.executable, os.path.abspath(__file__), "--model", model_name, "--modes", mode,
            "--sizes", f"{size[0]}x{size[1]}", "--steps", str(args.steps), "--batch", str(args.batch),
            "--device", args.device, "--seed", str(args.seed), "--scenario", "cold",
            "--progress", "none", "--_cold-child", result_path]
    if args.threads:
        argv += ["--threads", str(args.threads)]
    if args.quick:
        argv.append("--quick")
    if args.dtype:
        argv += ["--dtype", args.dtype]
    if args.model_path:
        argv += ["--model-path", args.model_path]
    if args.prompt_len:
        argv += ["--prompt-len", str(args.prompt_len)]
    if args.compile_vae:
        argv.append("--compile-vae")
    return argv


def run_cold(args, model_name, env, writer):
    sizes = sizes_for(args, model_name)
    dtype = dtype_for(args, model_name)
    prog = Progress(args.progress, len(args.mode_list) * len(sizes) * args.runs, model_name + " cold")
    try:
        for mode in args.mode_list:
            unavailable = mode_unavailable(mode)
            for s in sizes:
                row = base_row(args, env, model_name, mode, s, dtype, "cold")
                row["warmup"] = 0
                if unavailable:
                    row["error"] = unavailable
                    writer.write(row)
                    prog.step(f"{mode} {s[0]}x{s[1]} skipped", args.runs)
                    continue
                walls, results, error = [], [], None
                for _ in range(args.runs):
                    try:
                        res, wall, error = _cold_child(args, model_name, mode, s)
                    except KeyboardInterrupt:
                        row["error"] = "interrupted (SIGINT/SIGTERM, e.g. a time limit) while measuring"
                        writer.write(row)
                        raise
                    prog.step(f"{mode} {s[0]}x{s[1]} cold {wall:.1f}s" if wall else f"{mode} cold failed")
                    if error:
                        break
                    walls.append(wall)
                    results.append(res)
                if walls:
                    last = results[-1]
                    row["seconds"] = round(statistics.median(walls), 4)
                    row["samples"] = [round(w, 4) for w in walls]
                    row["first_call_s"] = round(statistics.median(r["first_call_s"] for r in results), 4)
                    for k in ("compiles", "new_compiles", "compiles_source", "peak_mem_gb", "import_s", "build_s",
                              "loop_s", "decode_s", "lyra_config"):
                        if k in last:
                            row[k] = last[k]
                    row["cache"] = "warm" if args.warm_cache else "fresh"
                row["error"] = error
                row["date"] = now_iso()
                writer.write(row)
    finally:
        prog.close()


def _cold_child(args, model_name, mode, size):
    """Run one cold child. Returns (result dict, wall seconds, error or None)."""
    with tempfile.TemporaryDirectory(prefix="lyra-cold-") as tmp:
        result_path = os.path.join(tmp, "result.json")
        log_path = os.path.join(tmp, "child.log")
        env = dict(os.environ)
        if not args.warm_cache:
            env["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(tmp, "inductor")
            env["TRITON_CACHE_DIR"] = os.path.join(tmp, "triton")
        env.setdefault("PYTHONUNBUFFERED", "1")
        argv = child_argv(args, model_name, mode, size, result_path)
        with open(log_path, "w") as log:
            t_start = time.time()
            rc = subprocess.call(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        res = None
        if os.path.exists(result_path):
            with open(result_path) as f:
                res = json.load(f)
        if rc != 0 or res is None or res.get("error"):
            with open(log_path, errors="replace") as f:
                tail = f.read()[-3000:]
            print(f"[bench] cold child failed (rc={rc}):\n{tail}", file=sys.stderr)
            err = (res or {}).get("error") or f"cold child exited with {rc}: {tail[-400:]}"
            return res, None, err[:500]
        return res, res["end_time"] - t_start, None


def cold_child_main(args):
    """Inside the child: build, compile, one image; report the wall-clock end time."""
    t_import = time.time()
    res = {"error": None}
    model_name = args.models[0]
    mode = args.mode_list[0]
    cuda = args.device.startswith("cuda")
    try:
        model, vae, scheduler, dtype, build_s = build_components(args, model_name)
        res["build_s"] = round(build_s, 4)
        w, h = sizes_for(args, model_name)[0]
        wl = denoise.Workload(model_name, model, vae, scheduler, height=h, width=w, batch=args.batch,
                              steps=args.steps, seed=args.seed, prompt_len=args.prompt_len)
        src, count = compile_counter(mode)
        fn, hook, ctx = make_fn(mode, model)
        wl.decode_fn = make_decoder(mode, vae) if args.compile_vae else None
        c0 = count()
        with ctx:
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            ev = _events(cuda)
            wl.run(fn, hook, events=ev)
            _sync(cuda)
            res["end_time"] = time.time()
            res["first_call_s"] = round(time.perf_counter() - t0, 4)
            res["loop_s"] = round(ev[0].elapsed_time(ev[1]) / 1000.0, 5)
            res["decode_s"] = round(ev[1].elapsed_time(ev[2]) / 1000.0, 5)
            if mode.startswith("lyra"):
                res["lyra_config"] = _lyra_cfg()
        res["compiles"] = res["new_compiles"] = count() - c0
        res["compiles_source"] = src
        if cuda:
            res["peak_mem_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 3)
    except Exception as exc:  # noqa: BLE001
        traceback.print_exc()
        res["error"] = err_text(exc)
    res["import_s"] = round(t_import - _PROCESS_T0, 4)
    with open(args.cold_child, "w") as f:
        json.dump(res, f, default=str)
    return 0 if res["error"] is None else 1


# ------------------------------------------------------------------------------------------
# Summary table, main
# ------------------------------------------------------------------------------------------


def _fmt(v, col):
    if v is None:
        return "-"
    if col == "rel_err":
        return f"{v:.2e}"
    if col == "psnr_db":
        return "identical" if v >= PSNR_IDENTICAL else f"{v:.1f}"
    if isinstance(v, float):
        return f"{v:.4f}" if col == "seconds" else f"{v:.2f}"
    return str(v)


def print_table(rows, file=sys.stdout):
    if not rows:
        return
    cols = ("model",) + TABLE_COLS + ("error",)
    data = [[_fmt(r.get(c), c) if c != "error" else ((r.get("error") or "")[:60] or "-") for c in cols] for r in rows]
    widths = [max(len(c), *(len(d[i]) for d in data)) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)), file=file)
    for d in data:
        print("  ".join(x.ljust(w) for x, w in zip(d, widths)), file=file)


def default_out(args, env):
    short = gpu_short(env["gpu"])
    name = f"quick-{short}.jsonl" if args.quick else f"{'_'.join(args.models)}-{short}.jsonl"
    return os.path.join(HERE, "results", name)


def _sigterm(_signum, _frame):
    raise KeyboardInterrupt("SIGTERM")


def main(argv=None) -> int:
    args = resolve(parse_args(argv))
    LYRA_CONFIG.update(parse_lyra_config(args.lyra_config))
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cold_child:
        return cold_child_main(args)
    with contextlib.suppress(ValueError):  # not in the main thread (in-process callers)
        signal.signal(signal.SIGTERM, _sigterm)
    env = environment(args.device)
    out = args.out or default_out(args, env)
    writer = JsonlWriter(out)
    print(f"[bench] models={','.join(args.models)} modes={','.join(args.mode_list)} scenario={args.scenario} "
          f"steps={args.steps} batch={args.batch} runs={args.runs} warmup={args.warmup} device={args.device} "
          f"({env['gpu']}) -> {out}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    rc = 0
    try:
        for model_name in args.models:
            if args.scenario == "cold":
                run_cold(args, model_name, env, writer)
            else:
                run_in_process(args, model_name, env, writer, args.scenario)
    except KeyboardInterrupt:
        print("[bench] interrupted: rows measured so far are in " + out, file=sys.stderr)
        rc = 130
    print(f"\n[bench] {len(writer.rows)} rows in {time.perf_counter() - t0:.1f}s -> {out}")
    print_table(writer.rows)
    if args.report:
        try:
            import report

            report.main([out, "--out", args.report])
        except Exception as exc:  # noqa: BLE001
            print(f"[bench] report failed: {err_text(exc)}", file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main())
