"""Float arguments of a compiled forward are graph inputs: a new value never recompiles, while
floats of the model's code and modules (eps, dropout p, scales from head_dim) stay constants
the passes match on (shape_policy._install_input_floats)."""
import copy
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lyradynamo
from lyradynamo import zoo
from helpers import flat_outputs, one_thread, rel_err


@pytest.fixture(autouse=True)
def _threads():
    with one_thread():
        yield


def _controlnet_scales(device: str) -> None:
    cn = zoo.build_controlnet("sd15", seed=0, device=device)
    kw = zoo.controlnet_inputs("sd15", cn, batch=2)
    kw = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    compiled = torch.compile(cn, backend="lyra")
    outs = {}
    with torch.no_grad():
        for i, scale in enumerate((1.0, 0.5, 0.8, 0.5)):
            if i == 1:  # from the second call on, any recompilation is an error
                torch.compiler.set_stance("fail_on_recompile")
            try:
                got = flat_outputs(compiled(**kw, conditioning_scale=scale, return_dict=False))
            finally:
                torch.compiler.set_stance("default")
            ref = flat_outputs(cn(**kw, conditioning_scale=scale, return_dict=False))
            assert rel_err(got, ref) < 1e-5, scale
            outs[scale] = got
    assert rel_err(outs[0.5], outs[1.0]) > 0.1  # the scale really reached the graph
    assert lyradynamo.compile_count() == 1
    (rec,) = lyradynamo.compiled_graphs()
    assert rec.recompile_reason is None
    for kind, c in rec.summary["coverage"].items():
        assert c["left"] == 0, (kind, rec.summary["left"])


def test_controlnet_conditioning_scale_does_not_recompile():
    _controlnet_scales("cpu")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_controlnet_conditioning_scale_cuda_graphs():
    """On CUDA the graph replays as a CUDA graph: the scale (a CPU float64 0-d input that the
    graph .item()s) must not be baked into a capture made for another value."""
    _controlnet_scales("cuda")


def test_multi_controlnet_unequal_scales_compile_once_per_net():
    import diffusers

    nets = [zoo.build_controlnet("sd15", seed=s) for s in (1, 2)]
    kw = zoo.controlnet_inputs("sd15", nets[0], batch=2)
    cond = kw.pop("controlnet_cond")
    conds = [cond, cond.flip(-1)]
    eager = diffusers.MultiControlNetModel([copy.deepcopy(n) for n in nets])
    multi = diffusers.MultiControlNetModel([torch.compile(n, backend="lyra") for n in nets])
    with torch.no_grad():
        for i, scales in enumerate(([0.5, 0.8], [1.0, 0.3], [0.25, 0.25])):
            if i == 1:
                torch.compiler.set_stance("fail_on_recompile")
            try:
                got = flat_outputs(multi(**kw, controlnet_cond=conds, conditioning_scale=scales, return_dict=False))
            finally:
                torch.compiler.set_stance("default")
            ref = flat_outputs(eager(**kw, controlnet_cond=conds, conditioning_scale=scales, return_dict=False))
            assert rel_err(got, ref) < 1e-5, scales
    assert lyradynamo.compile_count() == 2  # one graph per ControlNet, none per scale


class _Toy(nn.Module):
    """Float arguments (alpha; beta with a default; opts["shift"]) next to float attributes
    (the eps of group_norm / layer_norm) that the passes need as constants."""

    def __init__(self):
        super().__init__()
        self.gn_w, self.gn_b = nn.Parameter(torch.randn(8)), nn.Parameter(torch.randn(8))
        self.ln = nn.LayerNorm(8)
        self.lin = nn.Linear(8, 8)
        self.eps = 1e-5
        self.ln_eps = 1e-6

    def forward(self, x, alpha: float, beta: float = 0.25, opts=None):
        h = F.silu(F.group_norm(x, 4, self.gn_w, self.gn_b, eps=self.eps)) * alpha  # (B, 8, H, W)
        t = h.flatten(2).transpose(1, 2)  # (B, HW, 8)
        t = F.layer_norm(t, (8,), self.ln.weight, self.ln.bias, eps=self.ln_eps)
        t = self.lin(t) * beta + alpha
        if opts is not None:
            t = t - opts["shift"][0]
        return t


def test_float_argument_is_an_input_and_eps_stays_constant():
    torch.manual_seed(0)
    model = _Toy().eval()
    x = torch.randn(2, 8, 4, 4)
    compiled = torch.compile(model, backend="lyra")
    calls = [((x, 0.5), {}), ((x, 1.5), {}), ((x, 2.0), {"beta": 0.7}), ((x,), {"alpha": -3.0, "beta": 1e-3})]
    with torch.no_grad():
        for i, (args, kwargs) in enumerate(calls):
            if i == 1:
                torch.compiler.set_stance("fail_on_recompile")
            try:
                got = compiled(*args, **kwargs)
            finally:
                torch.compiler.set_stance("default")
            assert rel_err(got, model(*args, **kwargs)) < 1e-5, kwargs
    assert lyradynamo.compile_count() == 1
    cov = lyradynamo.compiled_graphs()[0].summary["coverage"]
    assert set(cov) == {"group_norm", "layer_norm", "linear"}
    for kind, c in cov.items():
        assert c["before"] == 1 and c["left"] == 0, (kind, c)

    # eps is a constant of the graph, guarded by value: changing it recompiles (and stays right)
    model.eps = 1e-2
    with torch.no_grad():
        assert rel_err(compiled(x, 0.5), model(x, 0.5)) < 1e-5
    assert lyradynamo.compile_count() == 2
    assert lyradynamo.compiled_graphs()[1].summary["coverage"]["group_norm"]["left"] == 0


def test_float_inside_a_container_argument():
    """opts={"shift": [s]}: L['opts']['shift'][0] is an input too (a new structure recompiles once)."""
    torch.manual_seed(0)
    model = _Toy().eval()
    x = torch.randn(1, 8, 2, 2)
    compiled = torch.compile(model, backend="lyra")
    with torch.no_grad():
        for i, s in enumerate((0.1, 0.2, -7.5)):
            if i == 1:
                torch.compiler.set_stance("fail_on_recompile")
            try:
                got = compiled(x, 1.0, opts={"shift": [s]})
            finally:
                torch.compiler.set_stance("default")
            assert rel_err(got, model(x, 1.0, opts={"shift": [s]})) < 1e-5, s
    assert lyradynamo.compile_count() == 1


class _Branch(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x, scale: float):
        if scale == 0:  # Python control flow on the float argument
            return x
        y = self.lin(x) * scale
        if scale > 1.0:
            y = y + 1
        return y


def test_float_argument_in_python_control_flow_guards_per_branch():
    """A branch on the float guards on its outcome (scale != 0, scale <= 1), not on its value:
    one graph per branch taken, each correct; values on a branch already compiled reuse it."""
    torch.manual_seed(0)
    model = _Branch().eval()
    compiled = torch.compile(model, backend="lyra")
    x = torch.randn(3, 8)
    expected_count = [(0.5, 1), (0.7, 1), (0.0, 2), (2.0, 3), (3.0, 3), (0.3, 3), (-0.0, 3), (0.0, 3)]
    with torch.no_grad():
        for s, n in expected_count:
            got = compiled(x, s)
            ref = model(x, s)
            assert rel_err(got, ref) < 1e-5, s
            if s == 0:
                assert torch.equal(got, x)
            assert lyradynamo.compile_count() == n, s
    reasons = [r.recompile_reason or "" for r in lyradynamo.compiled_graphs()[1:]]
    assert "scale" in reasons[0] and "scale" in reasons[1]


def test_unet_python_float_timestep_and_lora_scale_kwarg():
    """Pipelines that pass `timestep` as a Python float, and diffusers' peft LoRA scale in
    cross_attention_kwargs={"scale": s}: new values do not recompile (the peft path branches on
    `scale == 1.0`, so 1.0 itself is one more graph)."""
    from peft import LoraConfig

    model = zoo.build_denoiser("sd15", seed=0)
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                 init_lora_weights=False))
    kw = zoo.denoiser_inputs("sd15", model, batch=2)
    compiled = torch.compile(model, backend="lyra")
    calls = [(999.0, 0.5), (500.5, 0.5), (10.0, 0.8), (1.0, 0.3)]
    with torch.no_grad():
        for i, (t, s) in enumerate(calls):
            inputs = dict(kw, timestep=t, cross_attention_kwargs={"scale": s})
            if i == 1:
                torch.compiler.set_stance("fail_on_recompile")
            try:
                got = compiled(**inputs).sample
            finally:
                torch.compiler.set_stance("default")
            assert rel_err(got, model(**inputs).sample) < 1e-5, (t, s)
    assert lyradynamo.compile_count() == 1
    cov = lyradynamo.compiled_graphs()[0].summary["coverage"]
    assert all(c["left"] == 0 for c in cov.values()), cov
    from peft.tuners.tuners_utils import BaseTunerLayer

    # peft's scale_layer/unscale_layer ran traced: the modules' scaling is back to its value
    scalings = {v for m in model.modules() if isinstance(m, BaseTunerLayer) for v in m.scaling.values()}
    assert scalings == {1.0}


def test_input_floats_work_when_torch_compiled_before_lyradynamo_was_imported():
    """Dynamo caches its type -> wrap function table on first use; installing the hook after
    another torch.compile must still take effect (a fresh process: conftest imports us first)."""
    code = textwrap.dedent("""
        import torch
        torch.compile(lambda x, a: x * a, backend="eager")(torch.ones(2), 0.5)
        import lyradynamo
        lin = torch.nn.Linear(4, 4)
        f = torch.compile(lambda x, a: lin(x) * a, backend="lyra")
        with torch.no_grad():
            for a in (0.5, 0.6, 0.7):
                x = torch.randn(2, 4)
                assert torch.allclose(f(x, a), lin(x) * a)
        print("COUNT", lyradynamo.compile_count())
    """)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "COUNT 1" in out.stdout, out.stdout + out.stderr[-2000:]
