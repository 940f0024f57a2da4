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
