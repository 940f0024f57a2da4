"""lyradynamo options: one typed module, settable at module level or in a `with` block.

    import lyradynamo
    lyradynamo.config.quant = "fp8"
    with lyradynamo.config.patch(cuda_graphs=False, dump_dir="/tmp/dump"):
        ...

Every assignment is validated: a bad value raises `LyraConfigError` naming the option and
the allowed values. Environment variables exist only for debugging knobs (`LYRA_DUMP_DIR`,
`LYRA_LOG`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import types
from typing import Any, Iterator

ALL_PASSES = ("layout", "group_norm", "conv1x1", "conv_bias", "adaln", "rope", "attention", "linear", "split_cat",
              "shared_input")


class LyraConfigError(ValueError):
    """A lyradynamo.config option was given a value it does not accept."""


@dataclasses.dataclass(frozen=True)
class _Option:
    default: Any
    doc: str
    choices: tuple | None = None  # allowed values (for enums)
    kind: type | tuple | None = None  # allowed Python types


_OPTIONS: dict[str, _Option] = {
    "passes": _Option(
        ALL_PASSES,
        "Which rewrite passes run, in order. A subset of "
        + ", ".join(ALL_PASSES) + ". An empty tuple runs the graph as Dynamo traced it.",
        kind=(tuple, list),
    ),
    "quant": _Option(
        "none",
        "Weight/activation quantization of the rewritten linears: none, fp8 (Hopper/Ada), int8.",
        choices=("none", "fp8", "int8"),
    ),
    "quant_exclude": _Option(
        (r"(^|\.)(x_embedder|context_embedder|pos_embed|patch_embed|time_text_embed|time_embedding|"
         r"time_embed|add_embedding|caption_projection|adaln_single|conv_in|conv_out)\.",
         r"^(proj_out|norm_out)\."),
        "With quant on: regexes (re.search) on a weight's module path, e.g. "
        "'transformer_blocks.0.attn.to_q.weight'; matching layers stay in high precision. "
        "Default: embedders and the final norm / projection.",
        kind=(tuple, list),
    ),
    "quant_master": _Option(
        "host",
        "With quant on, where the high-precision copy of a quantised weight lives: host (CPU "
        "memory, copied through small page-locked staging buffers: the GPU holds only fp8/int8; the Parameter becomes a NaN placeholder, "
        "lyradynamo.quant.restore(model) brings it back) or gpu (kept as is).",
        choices=("host", "gpu"),
    ),
    "lora_backup": _Option(
        "auto",
        "Where lyradynamo.lora keeps the original value of a GPU weight a LoRA touches (the source "
        "of every recompute and of the bit-exact unload): gpu (a device copy: a switch or unload "
        "moves no weight over PCIe), host (page-locked CPU memory: no GPU memory, but every switch "
        "copies the touched weights host->device, ~0.09 s per 4.4 GB on an H100), or auto (gpu "
        "while the device keeps lora_backup_reserve of its memory free, host after that).",
        choices=("auto", "gpu", "host"),
    ),
    "lora_backup_reserve": _Option(
        0.25,
        "With lora_backup = auto: the fraction of the device's total memory that GPU backups must "
        "leave free (for activations and CUDA-graph pools).",
        kind=(float, int),
    ),
    "fp8_attention": _Option(
        "auto",
        "With quant = fp8: attention in fp8 (q, k, v quantised per tensor by the kernels that "
        "produce them, cuDNN's fp8 SDPA, its e4m3 output read as is by the quantised "
        "out-projection). auto = where it pays (q / k RMS-normalised per head, as in FLUX and SD3; "
        "or long and wide attention: head dim >= 128 and >= 8192 queries and keys at the first "
        "call, a video DiT's self-attention) and where it runs (SM90+ with the cuDNN frontend, "
        "`pip install nvidia-cudnn-frontend`; the reference math on the CPU), the dump saying why "
        "not elsewhere; on = always (a logged reference fallback where cuDNN is missing); off.",
        choices=("auto", "on", "off"),
    ),
    "quant_input_pass": _Option(
        "auto",
        "With quant on, a linear whose input comes from a kernel that cannot write it quantised "
        "per row (16-bit attention, GroupNorm, a GEMM with a bias / residual epilogue): avoid = it "
        "stays in high precision, so no separate quantise pass runs over an activation (the "
        "report names the producer); allow = it quantises its input with a separate pass "
        "(SDXL fp8 on an H100: the same speed, 6 dB lower SQNR; NOTES session 22); auto = "
        "avoid with fp8, allow with int8 (no int8 attention writes quantised rows).",
        choices=("auto", "avoid", "allow"),
    ),
    "quant_fast_accum": _Option(
        True,
        "fp8 on Hopper: cuBLASLt's fast accumulation (partial sums not periodically promoted "
        "to full fp32; what torchao's float8 inference uses). False: exact fp32 accumulation.",
        kind=bool,
    ),
    "gemm_autotune": _Option(
        8,
        "cuBLASLt algorithms timed for each new GEMM shape of at least 2^33 multiply-adds, on its "
        "first call outside CUDA-graph capture, that many with and that many without workspace "
        "(the fastest is kept for the process; smaller GEMMs take the heuristic's first "
        "workspace-free choice); 0 or 1 = never time. Costs 4 runs per candidate and "
        "one host sync per tuned shape; a plan made before a change keeps its choice. A new shape "
        "that differs from a timed one only in M, by at most 4x (a new image size), takes that "
        "shape's winner untimed when cuBLASLt accepts it there.",
        kind=int,
    ),
    "gemm_workspace_mb": _Option(
        32,
        "Workspace (MiB, 0-32) the cuBLASLt heuristic may give lyra's GEMMs. Algorithms that use "
        "it may add a memset before their kernel; 0 = only workspace-free algorithms. Applies to "
        "GEMM shapes planned after the change.",
        kind=int,
    ),
    "cuda_graphs": _Option(
        True, "On CUDA, replay each compiled graph as a CUDA graph (one capture per input shape).",
        kind=bool,
    ),
    "new_shape_warmup": _Option(
        False,
        "True: before capturing a new input shape, run the graph once uncaptured (a warm-up: "
        "per-shape library set-up such as cuDNN plans, attention graph builds and GEMM timings "
        "happens there). False (the default since session 30): a graph already captured at "
        "another shape records the new one directly, one Python pass fewer; per-shape set-up runs "
        "inside the capture, new GEMM shapes take their reused or heuristic plan untimed, and a "
        "direct capture that fails warms up and records again (its error listed in the dump's "
        "summary). The first capture of a graph always warms up. H200 (benchmarks/NOTES.md, "
        "sessions 28-30): SD1.5 whole images, 768 after 512, first image 0.92 -> 0.69-0.78 s, "
        "640 within +-0.05 s; SDXL's new sizes within +-0.05 s; steady unchanged; the CUDA tests "
        "that compile a model pass either way (pytest --lyra-config new_shape_warmup=true).",
        kind=bool,
    ),
    "channels_last": _Option(
        "auto",
        "Lay 4-D convolution weights out channels_last when a graph is traced, so a UNet's "
        "convolutions, GroupNorms and residual adds run NHWC with no layout copies between them "
        "(the parameter keeps its identity and values; only its strides change). auto = on CUDA.",
        choices=("auto", True, False),
    ),
    "group_norm_rows": _Option(
        "auto",
        "channels_last GroupNorm whose groups are narrower than a 128-byte line (VAE decoders: "
        "4-16 fp32 channels per group; UNets: 10-40 fp16 ones) through csrc/group_norm_rows.cu: "
        "blocks read whole rows (coalesced), statistics are finished in a second small kernel. "
        "True = every such shape; False = never (group_norm.cu's per-group clusters); auto = "
        "where it measured faster on the H100 (benchmarks/NOTES.md, session 14): groups under "
        "16 bytes; under 32 bytes or off a multiple of 16 in tensors of 8 MiB or more; any "
        "group in tensors of 40 MiB or more. Read when "
        "the op runs (under CUDA graphs: at capture).",
        choices=("auto", True, False),
    ),
    "gated_gemm": _Option(
        "auto",
        "Linears whose epilogue cuBLASLt cannot do in 16-bit, on CUDA: the gated residual "
        "linear of DiT blocks, residual + gate * (x W^T + b), the GEGLU linear, a * gelu(g) "
        "with [a, g] = x W^T + b, and FLUX's q / k / v projection with the q / k RMSNorm + RoPE "
        "(lyra::qkv_projection); and fp8 linears with a residual (cuBLASLt adds it through C, "
        "CUTLASS in its TMA epilogue). cutlass = CUTLASS sm90 GEMMs with that epilogue fused (Hopper, "
        "a library built with the CUTLASS headers; GEGLU: cuBLASLt for a, CUTLASS for g); "
        "cublaslt = one cuBLASLt GEMM + bias, then the epilogue kernel; auto = time both (as "
        "captured CUDA graphs) on each shape's first call and keep the faster (a new M within 4x "
        "of a timed shape, same N and K, takes its winner untimed).",
        choices=("auto", "cutlass", "cublaslt"),
    ),
    "qkv_projection": _Option(
        True,
        "FLUX-style attention (q / k RMSNorm + RoPE, head dim 128), high precision: each part's "
        "q / k / v projection (a joint attention's text and image tokens) writes its rows of one "
        "q / k / v buffer that attention reads as is, no cat copy (lyra::qkv_projection); on "
        "Hopper the norm and RoPE can run in the GEMM's epilogue (gated_gemm chooses). False: "
        "GEMMs, then one pass for the norm, the RoPE and the cat, as before.",
        kind=bool,
    ),
    "attention_backend": _Option(
        "auto",
        "Attention kernel: auto (fastest available per shape), sdpa (torch SDPA, any backend), "
        "cudnn, flash (torch SDPA flash), flash_attn (the flash_attn package), math.",
        choices=("auto", "sdpa", "cudnn", "flash", "flash_attn", "math"),
    ),
    "attention_prewarm": _Option(
        True,
        "Compile a graph's attention kernels in worker threads while Dynamo finishes the compile "
        "(attention_prewarm.py): each distinct attention call that goes to torch SDPA runs once on "
        "zeroed tensors of its sizes, so that cuDNN's run-time kernel compiles (0.3-1.1 s each "
        "with an empty CUDA JIT cache, H200) overlap Dynamo's guard building instead of running "
        "one after another inside the first call's warm-up.",
        kind=bool,
    ),
    "short_kv_attention": _Option(
        "auto",
        "16-bit attention over at most 128 keys (cross-attention on text tokens) in lyra's own "
        "kernel (csrc/attention_short_kv.cu: fp16 / bf16, head dims 40, 64, 80, 128, 160, blhd, no "
        "mask, not causal; one launch, no memset), on CUDA with attention_backend = auto. auto = "
        "where it measured at least as fast as cuDNN on an H100: at most 2^16 (query row, head) "
        "pairs per call, B * Lq * H (SD1.5's cross-attentions and SDXL's second level at batch 2, "
        "not SDXL's first; ops/attention.py has the table); off = never (torch SDPA / flash_attn as "
        "attention_backend says).",
        choices=("auto", "off"),
    ),
    "fp32_attention": _Option(
        "tf32x3",
        "float32 attention on CUDA with at least 2^30 multiply-adds and no mask (the VAE "
        "decoders' mid-block attention; cuDNN and flash take 16-bit inputs only): tf32x3 = two "
        "GEMMs per chunk of queries on the TF32 tensor cores, each operand split into a TF32 "
        "high part and its fp32 remainder (three products: ~2e-5 relative error, against 7e-7 for "
        "torch's fp32 kernel; the SDXL decoder's attention at 1024 px 14.1 -> ~7.5 ms on an H100); "
        "tf32 = one TF32 product each (TF32's rounding, as torch's allow_tf32 matmuls; ~2.7 ms); "
        "sdpa = torch SDPA's fp32 kernel.",
        choices=("tf32x3", "tf32", "sdpa"),
    ),
    "dump_dir": _Option(
        None,
        "Directory for the graph dump (graphs before/after, summary, HTML picture); None = off. "
        "Env LYRA_DUMP_DIR sets it too.",
        kind=(str, os.PathLike, type(None)),
    ),
    "relax_size_guards": _Option(
        True,
        "Drop the size-1 / heuristic guards that torch's own operator implementations add while "
        "tracing (not the model's), so batch size 1 does not recompile. See shape_policy.py.",
        kind=bool,
    ),
    "extended_dict_tags": _Option(
        True,
        "Let Dynamo check attention processors, attributes read off classes and modules read "
        "through __dict__ by their dicts' version tags, as torch does for plain modules (host time "
        "per call; see guard_tags.py). False: torch's own rules only.",
        kind=bool,
    ),
    "params_as_attributes": _Option(
        True,
        "Let Dynamo keep parameters and buffers as attributes of the graph instead of gathering "
        "them as inputs on every call (~690 per SD1.5 call, ~1700 per SDXL call: most of what is "
        "left of Dynamo's host time). lyra lifts them back for the passes and hands them to the "
        "graph itself. In-place and `.data =` patches are seen by the next call; a parameter "
        "replaced by a new object recompiles (an identity guard). See params.py.",
        kind=bool,
    ),
    "pause_gc_in_compile": _Option(
        True,
        "Pause Python's automatic garbage collection while lyra compiles a frame (Dynamo's trace "
        "and the rewrite). Its full collections walk every object the trace has made, again each "
        "time the heap grows by a quarter: 3-4 collections of 0.3-0.6 s in one SD1.5 or SDXL first "
        "call on an H200 host (benchmarks/NOTES.md, session 26). The pause lasts through the "
        "frame's first run and ends, when the frame returns, with one collection of what the "
        "compile made (torch's own collection after a compile is left out for it), the older "
        "objects frozen out of it (gc.freeze, "
        "undone after; skipped where the caller froze objects itself), then collection resumes; "
        "gc.disable() made by the caller is left as it is.",
        kind=bool,
    ),
    "use_csrc": _Option(
        True, "Use the compiled CUDA library where it is built; False forces the reference ops.",
        kind=bool,
    ),
}


class _Config(types.ModuleType):
    """Module subclass so that `lyradynamo.config.x = v` is validated."""

    def __init__(self, name: str) -> None:
        super().__init__(name, __doc__)
        object.__setattr__(self, "_values", {k: o.default for k, o in _OPTIONS.items()})
        env_dump = os.environ.get("LYRA_DUMP_DIR")
        if env_dump:
            self._values["dump_dir"] = env_dump

    def __getattr__(self, name: str) -> Any:
        values = object.__getattribute__(self, "_values")
        if name in values:
            return values[name]
        raise AttributeError(f"lyradynamo.config has no option {name!r}; options: {', '.join(_OPTIONS)}")

    def __setattr__(self, name: str, value: Any) -> None:
        if name.startswith("__"):
            object.__setattr__(self, name, value)
            return
        self._values[name] = _validate(name, value)

    def __dir__(self) -> list[str]:
        return list(_OPTIONS) + ["patch", "parse", "describe", "snapshot", "LyraConfigError", "ALL_PASSES"]

    def snapshot(self) -> dict[str, Any]:
        """A copy of every option's current value (what a compiled graph was built with)."""
        return dict(self._values)

    def describe(self) -> str:
        """One line per option: name, current value, allowed values, doc."""
        lines = []
        for name, opt in _OPTIONS.items():
            allowed = f" (one of {opt.choices})" if opt.choices else ""
            lines.append(f"{name} = {self._values[name]!r}{allowed}: {opt.doc}")
        return "\n".join(lines)

    def parse(self, items) -> dict[str, Any]:
        """Options given as "KEY=VALUE" strings (command lines: the benchmarks' and the tests'
        --lyra-config), as values for patch(). A tuple option (passes) takes "-x" (all but x),
        "+x" (all and x) or "a,b,c" (exactly these); an int option an integer; a bool option
        true / false. Raises LyraConfigError on an unknown key or a missing "="."""
        out: dict[str, Any] = {}
        for item in items:
            key, sep, value = item.partition("=")
            if not sep or key not in self._values:
                raise LyraConfigError(f"{item!r}: expected KEY=VALUE with KEY one of: {', '.join(_OPTIONS)}")
            current = self._values[key]
            if isinstance(current, (tuple, list)):
                if value.startswith("-"):
                    out[key] = tuple(v for v in current if v != value[1:])
                elif value.startswith("+"):
                    out[key] = (*current, value[1:])
                else:
                    out[key] = tuple(v for v in value.split(",") if v)
            elif isinstance(current, int) and not isinstance(current, bool):
                out[key] = int(value)
            else:
                out[key] = {"true": True, "false": False}.get(value.lower(), value)
        return out

    @contextlib.contextmanager
    def patch(self, **changes: Any) -> Iterator[None]:
        """Set options for the duration of a `with` block; all are validated before any is set."""
        checked = {k: _validate(k, v) for k, v in changes.items()}
        saved = {k: self._values[k] for k in checked}
        self._values.update(checked)
        try:
            yield
        finally:
            self._values.update(saved)

    LyraConfigError = LyraConfigError
    ALL_PASSES = ALL_PASSES


def _validate(name: str, value: Any) -> Any:
    opt = _OPTIONS.get(name)
    if opt is None:
        raise LyraConfigError(
            f"lyradynamo.config has no option {name!r}; options: {', '.join(_OPTIONS)}"
        )
    if opt.choices is not None and value not in opt.choices:
        raise LyraConfigError(
            f"lyradynamo.config.{name} = {value!r} is not allowed; allowed values: "
            + ", ".join(repr(c) for c in opt.choices)
        )
    if opt.kind is not None and not isinstance(value, opt.kind):
        kinds = opt.kind if isinstance(opt.kind, tuple) else (opt.kind,)
        raise LyraConfigError(
            f"lyradynamo.config.{name} = {value!r} has type {type(value).__name__}; expected "
            + " or ".join(k.__name__ for k in kinds)
        )
    if name == "passes":
        unknown = [p for p in value if p not in ALL_PASSES]
        if unknown:
            raise LyraConfigError(
                f"lyradynamo.config.passes contains unknown pass(es) {unknown}; allowed: {ALL_PASSES}"
            )
        value = tuple(value)
    if name == "dump_dir" and value is not None:
        value = os.fspath(value)
    return value


_self = sys.modules[__name__]
_cfg = _Config(__name__)
_cfg.__dict__.update({"__file__": __file__, "__package__": __package__, "__spec__": __spec__})
sys.modules[__name__] = _cfg
