"""Graphs that compute tensors on the host and copy them to the GPU (host_prefix.py) run under
CUDA graphs: the host part runs before each replay, so a replay sees this call's host values,
and no capture fails on the copy (before: "Cannot copy between CPU and CUDA tensors during CUDA
graph capture", and the whole graph ran without CUDA graphs)."""
import warnings

import pytest
import torch

import lyradynamo

pytestmark = pytest.mark.cuda


class HostEmbedding(torch.nn.Module):
    """Chroma's pattern: ids made on the host (here a CPU input), an embedding computed there,
    copied to x's device."""

    def forward(self, x, ids):
        freqs = torch.arange(x.shape[-1]).float()
        emb = (ids.float()[:, None] * freqs / x.shape[-1]).cos()
        return x * emb.to(x.device)[:, None, :] + 1


def test_host_part_runs_before_each_replay():
    torch._dynamo.reset()
    lyradynamo.reset_stats()
    model = HostEmbedding()
    compiled = torch.compile(model, backend="lyra")
    x = torch.randn(2, 7, 32, device="cuda")
    with torch.no_grad():
        for step in range(4):  # call 0 captures, calls 1-3 replay with new host values
            ids = torch.tensor([step, 3 * step + 1])
            out = compiled(x, ids)
            torch.testing.assert_close(out, model(x, ids), rtol=1e-6, atol=1e-6)
    (rec,) = lyradynamo.compiled_graphs()
    assert (rec.summary["host_prefix"] or {}).get("copies") == 1, rec.summary["host_prefix"]
    assert "cuda_graph_failures" not in rec.summary
    assert rec.summary.get("capture_s", 0) > 0 and rec.cuda_graphs_off is None


@pytest.mark.parametrize("name", ["chroma", "cogview4", "qwenimage"])
def test_models_with_host_tensors_capture(name):
    import more_models

    if not more_models.available(name):
        pytest.skip(f"this diffusers has no {more_models.MODELS[name][0]}")
    torch._dynamo.reset()
    lyradynamo.reset_stats()
    # built on the CPU and moved, as from_pretrained leaves it: tensors a model keeps as plain
    # attributes stay on the CPU (Qwen-Image's RoPE tables, copied to the GPU on every call)
    model = more_models.build(name, dtype=torch.bfloat16).to("cuda")
    compiled = torch.compile(model, backend="lyra")
    with torch.no_grad(), warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for i in range(2):
            kwargs = more_models.inputs(name, 2, 16, 16, 24, dtype=torch.bfloat16, device="cuda", seed=i)
            torch.testing.assert_close(more_models.first_output(compiled(**kwargs)),
                                       more_models.first_output(model(**kwargs)), rtol=0.05, atol=0.05)
    graphs = lyradynamo.compiled_graphs()
    assert not [f for r in graphs for f in r.summary.get("cuda_graph_failures", [])]
    assert any(r.summary["host_prefix"] for r in graphs)
    # a graph of views only (Qwen-Image's split after a graph break) runs without a capture,
    # not as an empty CUDA graph
    assert not [str(w.message) for w in seen if "CUDA Graph is empty" in str(w.message)]
