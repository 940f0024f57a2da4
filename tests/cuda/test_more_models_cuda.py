"""Diffusers denoisers outside the zoo (tests/more_models.py) on CUDA under lyra, in bf16: each
call as close to fp32 eager as bf16 eager is (the 2x rule), across batch sizes, resolutions and
text lengths, with CUDA-graph replays; one compilation where the model's own Python code does
not depend on the sizes. No pass knows these models: what runs is pattern matching alone."""
import pytest
import torch

import lyradynamo
import more_models
from helpers import rel_err

pytestmark = pytest.mark.cuda

SHAPES = [(2, 16, 16, 24), (1, 16, 24, 24), (2, 16, 16, 24), (3, 24, 16, 40)]


@pytest.mark.parametrize("name", list(more_models.MODELS))
def test_model_outside_the_zoo_cuda(name):
    if not more_models.available(name):
        pytest.skip(f"this diffusers has no {more_models.MODELS[name][0]}")
    ref32 = more_models.build(name, dtype=torch.float32, device="cuda")
    model = more_models.build(name, dtype=torch.bfloat16, device="cuda")
    compiled = torch.compile(model, backend="lyra")
    one = name in more_models.ONE_COMPILATION
    with torch.no_grad():
        for i, shape in enumerate(SHAPES):
            seed = 0 if i == 2 else i  # call 2 repeats call 0: a replay of its capture
            kwargs = more_models.inputs(name, *shape, dtype=torch.bfloat16, device="cuda", seed=seed)
            kwargs32 = more_models.inputs(name, *shape, dtype=torch.float32, device="cuda", seed=seed)
            out = more_models.call_compiled(compiled, kwargs, recompile_is_error=one and i > 0)
            ref = more_models.first_output(ref32(**kwargs32))
            e_lyra, e_eager = rel_err(out, ref), rel_err(more_models.first_output(model(**kwargs)), ref)
            assert e_lyra <= 2 * e_eager + 1e-3, (name, shape, e_lyra, e_eager)
    if one:
        assert lyradynamo.compile_count() == 1
    assert any(r.device == "cuda" for r in lyradynamo.compiled_graphs())
    # every graph captured (host tensors copied to the GPU run before the replay: host_prefix.py)
    assert not [f for r in lyradynamo.compiled_graphs() for f in r.summary.get("cuda_graph_failures", [])]


@pytest.mark.parametrize("keep_fp32", [True, False], ids=["fp32 tables and norms", "all bf16"])
def test_wan_islands_run_csrc_kernels(keep_fp32):
    """Wan computes its norms, modulation, gated residuals and RoPE in float32 around bf16
    activations: lyra runs them as its csrc kernels (lyra::adaln with out_dtype, gated
    lyra::linear, lyra::qk_norm_rope), none through the PyTorch reference, and stays within the
    2x rule; with the tables and norms in float32 as `from_pretrained(torch_dtype=bf16)` keeps
    them, and with everything bf16."""
    from lyradynamo.ops import _common

    ref32 = more_models.build("wan", dtype=torch.float32, device="cuda")
    model = more_models.build("wan", dtype=torch.bfloat16, device="cuda")
    if keep_fp32:
        more_models.keep_in_fp32(model)
    compiled = torch.compile(model, backend="lyra")
    _common.reset_fallback_counts()
    with torch.no_grad():
        for i, shape in enumerate(SHAPES[:2]):
            kwargs = more_models.inputs("wan", *shape, dtype=torch.bfloat16, device="cuda", seed=i)
            out = more_models.call_compiled(compiled, kwargs, recompile_is_error=i > 0)
            ref = more_models.first_output(ref32(**more_models.inputs("wan", *shape, device="cuda", seed=i)))
            e_lyra, e_eager = rel_err(out, ref), rel_err(more_models.first_output(model(**kwargs)), ref)
            assert e_lyra <= 2 * e_eager + 1e-3, (shape, e_lyra, e_eager)
    assert _common.fallback_counts() == {}
    matched = lyradynamo.compiled_graphs()[0].summary["matched"]
    assert matched["rope"] == {"rope(split pairs)": 4}
    assert matched["linear"]["linear+gate(float32 island)+residual"] == 4
