"""The `lyra` torch.compile backend: rewrite the graph Dynamo hands over, then run it.

    torch.compile(model, backend="lyra")

1. shape policy (shape_policy.py): traced dynamic from the first call, no duck sizing, no
   0/1 specialisation, op-internal size guards relaxed: one compilation for all shapes;
2. passes (passes/): anchor subgraphs -> lyra:: custom ops;
3. runtime (runtime.py): CUDA graphs on CUDA, the rewritten graph as is elsewhere;
4. dump (dump.py) when `config.dump_dir` is set.
"""
from __future__ import annotations

import dataclasses
import logging
import threading
import time
import traceback
from typing import Any, Callable

import torch
import torch.fx as fx

from . import attention_prewarm, config, params, runtime, shape_policy, size_one
from .passes import attention as attention_pass
from .passes import qkv_projection as qkv_projection_pass
from .passes import shared_input as shared_input_pass
from .passes import run_passes
from .passes.report import GraphReport

log = logging.getLogger("lyradynamo")


@dataclasses.dataclass
class CompiledGraph:
    """One backend call: what was compiled and what the passes did."""

    index: int
    seconds: float  # time spent in the backend (passes + dump), not Dynamo's tracing
    report: GraphReport
    policy_active: bool
    device: str
    num_nodes: int
    dynamic_inputs: int  # SymInt inputs: >0 means the graph serves many shapes
    dump_path: str | None = None
    recompile_reason: str | None = None  # the guard that failed, when this is a recompilation
    frame_inputs: int = 0  # inputs the compiled frame gathers per call (Dynamo's example_inputs)
    params_lifted: int = 0  # parameters / buffers Dynamo kept as graph attributes (params.py)
    cuda_graphs_off: str | None = None  # why a CUDA graph runs op by op (runtime.not_capturable)
    host_prefix: dict | None = None  # host tensors computed before each replay (host_prefix.py)
    summary: dict = dataclasses.field(default_factory=dict)  # dump.summary_dict(), always filled


_lock = threading.Lock()
_compiled: list[CompiledGraph] = []


def compile_count() -> int:
    """How many graphs the lyra backend has compiled in this process."""
    return len(_compiled)


def compiled_graphs() -> list[CompiledGraph]:
    return list(_compiled)


def reset_stats() -> None:
    with _lock:
        _compiled.clear()


def _device_of(example_inputs) -> str:
    return runtime.input_device(example_inputs).type


def _freeze_parameters(example_inputs: list) -> None:
    """lyra compiles for inference: parameters become requires_grad=False, as diffusers' own
    LoRA loading does. Dynamo guards on requires_grad, so without this a LoRA load/fuse on the
    compiled model would recompile. Most parameters were already frozen before Dynamo recorded
    them (shape_policy._prepare_input: needed for graph attributes, params.py, whose guards
    record the value at trace time); this catches parameters passed as frame inputs."""
    frozen = 0
    for t in example_inputs:
        if isinstance(t, torch.nn.Parameter) and t.requires_grad:
            t.requires_grad_(False)
            frozen += 1
    if frozen:
        log.info("lyradynamo: set requires_grad=False on %d parameters (inference backend)", frozen)


def _recompile_reason() -> str | None:
    """Why Dynamo is compiling this frame again (its last guard failure), if it is."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator
        from torch._dynamo.utils import guard_failures

        tx = InstructionTranslator.current_tx()
        failures = guard_failures.get(tx.f_code) if tx is not None else None
        return str(failures[-1])[:500] if failures else None
    except Exception:  # noqa: BLE001 - diagnostics only
        return None


def _fake_mode_of(gm: fx.GraphModule, example_inputs: list):
    """The fake mode of the traced values in node.meta (the passes compute new values in it)."""
    for n in gm.graph.nodes:
        mode = getattr(n.meta.get("example_value"), "fake_mode", None)
        if mode is not None:
            return mode
    tracing = torch._guards.TracingContext.try_get()
    return tracing.fake_mode if tracing is not None else None


def _quantize(gm: fx.GraphModule, example_inputs: list, report: GraphReport) -> list:
    """config.quant: lyra::linear -> lyra::qlinear with quantised weight buffers (quant/apply.py)."""
    if config.quant == "none":
        return []
    from .quant import apply as quant_apply

    try:
        return quant_apply.quantize_graph(gm, example_inputs, report)
    except Exception as exc:  # noqa: BLE001 - the graph stays valid: linears not yet rewritten stay bf16
        log.warning("lyradynamo: quantisation failed (%s); remaining linears stay in high precision", exc)
        report.errors.append({"pass": "quant", "error": repr(exc), "trace": traceback.format_exc()})
        return []


def _with_weight_refresh(runner: Callable, entries: list) -> Callable:
    """Before each call, re-derive quantised weights whose high-precision copy changed in place."""
    from .quant import weights

    def run(*args):
        weights.refresh(entries)
        return runner(*args)

    run.runner = runner  # type: ignore[attr-defined]
    return run


def _after_quant(gm: fx.GraphModule, name: str, rewrite: Callable[[], None], report: GraphReport) -> None:
    """Run a rewrite that must see quantisation's result (its time in report.phases_s as
    "late:<name>"); a failure is logged and reported, and leaves the graph valid (each of these
    rewrites changes a match only once it is complete)."""
    t = time.perf_counter()
    try:
        rewrite()
        gm.graph.lint()
        gm.recompile()
    except Exception as exc:  # noqa: BLE001 - an optimisation; never fatal
        log.warning("lyradynamo: %s failed (%s)", name, exc)
        report.errors.append({"pass": name, "error": repr(exc), "trace": traceback.format_exc()})
    finally:
        report.phases_s[f"late:{name}"] = time.perf_counter() - t


def _late_fusions(gm: fx.GraphModule, example_inputs: list, fake_mode, report: GraphReport) -> None:
    """After quantisation, which rewrites the same ops: q/k/v norm + RoPE + cat in one pass
    (passes/attention.fuse_qkv_late), then linears reading one input as one GEMM
    (passes/shared_input.py), then, last, a q / k / v GEMM with that norm + RoPE in its epilogue
    (passes/qkv_projection.py)."""
    attention_passes = {"rope", "attention"} <= set(config.passes)
    if attention_passes:
        _after_quant(gm, "late_fusions", lambda: attention_pass.fuse_qkv_late(gm.graph, fake_mode, report), report)
    if "shared_input" in config.passes:
        _after_quant(gm, "shared_input", lambda: shared_input_pass.run(gm, example_inputs, fake_mode, report),
                     report)
        if attention_passes:
            _after_quant(gm, "qkv_projection", lambda: qkv_projection_pass.run(gm.graph, fake_mode, report),
                         report)


def lyra_backend(gm: fx.GraphModule, example_inputs: list, **kwargs: Any) -> Callable:
    """torch.compile backend entry point (registered as "lyra")."""
    if kwargs:
        log.warning("lyradynamo: backend options %s are ignored; use lyradynamo.config", sorted(kwargs))
    start = time.perf_counter()
    fake_mode = _fake_mode_of(gm, example_inputs)
    # parameters installed as graph attributes (config.params_as_attributes): placeholders again
    # for the passes; the returned callable passes them after the caller's inputs
    frame_inputs = len(example_inputs)
    gm, example_inputs, lifted = params.lift(gm, example_inputs)
    policy = shape_policy.policy_active()
    if not policy:
        log.warning("lyradynamo: this graph was traced without lyra's shape policy (the backend was "
                    "reached without torch.compile's backend hook); new shapes may recompile")
    before_code = gm.code if config.dump_dir else None
    gm, report = run_passes(gm, config.passes, fake_mode)
    report.phases_s["passes"] = time.perf_counter() - start
    if config.relax_size_guards and fake_mode is not None and fake_mode.shape_env is not None:
        try:
            report.relaxed_guards = shape_policy.relax_internal_guards(fake_mode.shape_env)
        except Exception as exc:  # noqa: BLE001 - relaxing is an optimisation; never fatal
            log.warning("lyradynamo: could not relax size guards (%s); batch 1 may recompile", exc)
    _freeze_parameters(example_inputs)
    t = time.perf_counter()
    quant_entries = _quantize(gm, example_inputs, report)
    _late_fusions(gm, example_inputs, fake_mode, report)
    report.phases_s["quant"] = time.perf_counter() - t
    report.size_one_answers = size_one.take_answers()  # Dynamo's trace's, the passes', the late rewrites'
    reason = _recompile_reason()
    if reason:
        log.warning("lyradynamo: recompiling: %s (a model that branches on a size or a float argument "
                    "in its own Python code compiles once per branch taken)", reason)
    device = _device_of(example_inputs)
    with _lock:
        record = CompiledGraph(
            index=len(_compiled), seconds=0.0, report=report, policy_active=policy, device=device,
            num_nodes=len(gm.graph.nodes),
            dynamic_inputs=sum(isinstance(t, torch.SymInt) for t in example_inputs),
            recompile_reason=reason, frame_inputs=frame_inputs, params_lifted=len(lifted),
        )
        _compiled.append(record)
    from . import dump  # lazy: keeps `python -m lyradynamo.dump` free of a double import

    t = time.perf_counter()
    runner = runtime.make_runner(gm, example_inputs, record, n_lifted=len(lifted))
    # the workers compile while Dynamo builds the guards and the first call warms up
    prewarmed = attention_prewarm.start(gm, example_inputs, runtime.input_device(example_inputs))
    report.phases_s["runner"] = time.perf_counter() - t
    if quant_entries:
        runner = _with_weight_refresh(runner, quant_entries)
    runner = params.with_params(runner, lifted)
    record.seconds = time.perf_counter() - start
    record.summary = dump.summary_dict(record, gm)
    if prewarmed:
        record.summary["attention_prewarm_started"] = prewarmed
    if config.dump_dir:
        record.dump_path = dump.write_graph_dump(config.dump_dir, record, gm, before_code)
    log.info("lyradynamo: compiled graph %d (%d nodes, %s) in %.2fs: %s", record.index,
             record.num_nodes, device, record.seconds, report.matched)
    return runner


lyra_backend.backend_ctx_ctor = shape_policy.policy_context  # type: ignore[attr-defined]
lyra_backend.compiler_name = "lyra"  # type: ignore[attr-defined]


def register() -> None:
    """Make backend="lyra" resolve to this backend and install the shape-policy hook.

    If torch discovered our `torch_dynamo_backends` entry point and is loading it right now,
    torch registers the function itself when the import returns: registering it here too
    would be a duplicate.
    """
    from torch._dynamo.backends import registry

    shape_policy.install()
    if "lyra" in registry._COMPILER_FNS or registry._BACKENDS.get("lyra") is not None:
        return
    registry.register_backend(lyra_backend, name="lyra")
