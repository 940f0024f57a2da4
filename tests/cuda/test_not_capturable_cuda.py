"""Graphs a CUDA graph would get wrong or record empty run op by op (runtime.not_capturable):
an output the host computes (a replay would hand back the recorded value), and a graph left with
no operation (a graph break, or lyra's removal of a no-op `.to`, can leave one that only returns
its inputs: torch warns "The CUDA Graph is empty"). Graphs with device work still replay."""
import warnings

import pytest
import torch

import lyradynamo

pytestmark = pytest.mark.cuda


def test_an_output_the_host_computes_is_fresh_on_every_call():
    def f(x, ids):
        return x * 2, ids * 2 + 1  # ids stays on the CPU: its output is computed by the host

    compiled = torch.compile(f, backend="lyra")
    x = torch.randn(8, device="cuda")
    for start in (0, 10, 20):  # same shapes, new host values
        ids = torch.arange(start, start + 4)
        y, pos = compiled(x, ids)
        torch.testing.assert_close(pos, ids * 2 + 1)
        torch.testing.assert_close(y, x * 2)
    (rec,) = lyradynamo.compiled_graphs()
    assert "computed on the host" in rec.summary["cuda_graphs_off"]


class _Table(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("table", torch.randn(16, 4))

    def forward(self, x):
        return self.table.to(x.device), x  # a no-op .to: nothing left to launch


def test_a_graph_with_nothing_to_launch_records_no_empty_cuda_graph():
    model = _Table().cuda()
    compiled = torch.compile(model, backend="lyra")
    x = torch.randn(3, device="cuda")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "The CUDA Graph is empty" would raise here
        for _ in range(3):
            table, same = compiled(x)
    torch.testing.assert_close(table, model.table)
    torch.testing.assert_close(same, x)
    (rec,) = lyradynamo.compiled_graphs()
    assert rec.summary["cuda_graphs_off"] and "no operation" in rec.summary["cuda_graphs_off"]


def test_a_graph_with_device_work_still_replays():
    compiled = torch.compile(lambda x: torch.sin(x) * 2, backend="lyra")
    x = torch.randn(8, device="cuda")
    for _ in range(3):
        torch.testing.assert_close(compiled(x), torch.sin(x) * 2)
    (rec,) = lyradynamo.compiled_graphs()
    assert rec.summary["cuda_graphs_off"] is None and rec.summary.get("capture_s", 0) > 0
