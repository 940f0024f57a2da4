"""Small helpers shared by the CPU tests (imported as `helpers`)."""
import contextlib
import os

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rel_err(a, b) -> float:
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def flat_outputs(out) -> torch.Tensor:
    """All tensors of a (nested tuple) model output, e.g. a ControlNet's down + mid residuals
    (FLUX: block + single-block tuples; None parts skipped), as one vector."""
    ts = []
    for part in out:
        if part is None:
            continue
        ts.extend(part if isinstance(part, (tuple, list)) else [part])
    return torch.cat([t.flatten() for t in ts])


@contextlib.contextmanager
def one_thread():
    """torch on one CPU thread (tiny models: thread start-up costs more than it saves)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


# ---- quantised models and LoRA switching (tests/test_quant.py, tests/cuda/test_quant_cuda.py) ----

FLUX_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_v_proj", "proj_mlp", "proj_out",
                     "ff.net.2", "norm1.linear"]


def flux_lora(template, seed, r=4, alpha=4) -> dict:
    """A random peft LoRA for the tiny FLUX transformer, as a diffusers state dict ('transformer.'
    keys). `template` (on the CPU) is only read for shapes: peft wraps a deep copy."""
    import copy

    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    cfg = LoraConfig(r=r, lora_alpha=alpha, init_lora_weights=False, target_modules=FLUX_LORA_TARGETS)
    wrapped = inject_adapter_in_model(cfg, copy.deepcopy(template), adapter_name="tmp")
    sd = get_peft_model_state_dict(wrapped, adapter_name="tmp")
    return {f"transformer.{k}": v.detach().clone() for k, v in sd.items()}


def quantised_weights(model) -> dict:
    """name -> the bytes of the quantised copy of each of model's quantised weights (a column
    slice, from split_cat, as 'name[:, 0:32]')."""
    from lyradynamo.quant import weights

    return {weights.sliced_name(n, e.cols): e.qweight.view(torch.uint8).clone()
            for n, p in model.named_parameters() for e in weights.entries_of(p)}


def reported_weights(names) -> set:
    """The Parameter names of quant report entries: a column slice 'a.weight[:, 0:32]' -> 'a.weight'."""
    return {n.split("[", 1)[0] for n in names}


def lora_round_trip(compiled, model, inputs: dict, lora_a: dict, lora_b: dict) -> dict:
    """Base, then (under fail_on_recompile) LoRA A, unload, B at 0.8, A again with B set to 0
    (A -> B -> A), unload all. Returns each state's first output ("out0", "out_a",
    "out_unloaded", "out_b", "out_a2", "out_end") and the quantised weights of `model` (the
    module `compiled` wraps) at "q0", "q_a", "q_a2"."""
    from lyradynamo import lora

    def qweights():
        return quantised_weights(model)

    r = {}
    with torch.no_grad():
        r["out0"] = compiled(**inputs)[0].clone()
        r["q0"] = qweights()
        with torch.compiler.set_stance("fail_on_recompile"):
            lora.load_lora(compiled, dict(lora_a), name="A")
            r["out_a"] = compiled(**inputs)[0].clone()
            r["q_a"] = qweights()
            lora.unload_lora(compiled, "A")
            r["out_unloaded"] = compiled(**inputs)[0].clone()
            lora.load_lora(compiled, dict(lora_b), scale=0.8, name="B")
            r["out_b"] = compiled(**inputs)[0].clone()
            lora.load_lora(compiled, dict(lora_a), name="A")
            lora.set_loras(compiled, {"A": 1.0, "B": 0.0})  # A -> B -> A
            r["out_a2"] = compiled(**inputs)[0].clone()
            r["q_a2"] = qweights()
            lora.unload_lora(compiled)
            r["out_end"] = compiled(**inputs)[0].clone()
    return r


QUANTISED_LINEAR_OPS = ("lyra::qlinear", "lyra::qlinear_q", "lyra::qlinear_q_qout")


def quantised_linear_ops(summary: dict) -> int:
    """How many quantised linears a compiled graph holds (all three op forms, and those that
    passes/shared_input.py runs as one lyra::qlinear_q_group)."""
    hist = summary["op_histogram"]
    grouped = sum(len(g["nodes"]) for g in summary.get("shared_input", [])
                  if g["fused"] and g["op"] == "lyra::qlinear_q_group")
    return sum(hist.get(op, 0) for op in QUANTISED_LINEAR_OPS) + grouped


def compiled_bitwise(model, *inputs):
    """model compiled with lyra (a fresh compilation) gives eager's outputs bit for bit; returns
    its one CompiledGraph record."""
    import lyradynamo

    lyradynamo.reset_stats()
    torch._dynamo.reset()
    with torch.no_grad():
        ref = model(*inputs)
        out = torch.compile(model, backend="lyra")(*inputs)
    for o, r in zip(out, ref):
        assert torch.equal(o, r)
    (rec,) = lyradynamo.compiled_graphs()
    return rec


def flux_heads(head_dim=128, heads=2, dtype=torch.float32, seed=0):
    """A tiny FLUX transformer (one double block, one single block) whose attention heads have
    head_dim channels (the zoo's tiny one has 16: FLUX.1's 128 is what the fused q / k / v
    epilogue takes; tests/test_qkv_projection.py and its GPU twin)."""
    import diffusers

    from lyradynamo.zoo import configs

    rope = {128: (16, 56, 56), 64: (8, 28, 28)}[head_dim]
    cfg = dict(configs.TINY_DENOISER_CONFIGS["flux"], attention_head_dim=head_dim, num_attention_heads=heads,
               axes_dims_rope=rope)
    torch.manual_seed(seed)
    return diffusers.FluxTransformer2DModel.from_config(cfg).to(dtype).eval()


def run_flux(model, seed=0):
    """model's output on the zoo's FLUX inputs (batch 1, 32 x 32) on model's device."""
    from lyradynamo import zoo

    inputs = zoo.denoiser_inputs("flux", model, batch=1, height=32, width=32, seed=seed)
    with torch.no_grad():
        return model(**inputs)[0]


class SelfAndCross(torch.nn.Module):
    """A self-attention then a cross-attention (diffusers' Attention), each with a residual."""

    def __init__(self, dim: int, heads: int, dim_head: int, ctx_dim: int) -> None:
        super().__init__()
        from diffusers.models.attention_processor import Attention

        self.self_attn = Attention(query_dim=dim, heads=heads, dim_head=dim_head)
        self.cross = Attention(query_dim=dim, cross_attention_dim=ctx_dim, heads=heads, dim_head=dim_head)

    def forward(self, x, ctx):  # noqa: ANN001
        x = x + self.self_attn(x)
        return x + self.cross(x, encoder_hidden_states=ctx)
