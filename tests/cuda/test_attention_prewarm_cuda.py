"""attention_prewarm on the GPU: a compiled model's attention calls run once in worker threads
when the graph is compiled (not at later sizes), every worker is met by the call it prewarmed (same sizes and strides, the shared_input pass's q / k / v views of one GEMM
included), and the outputs are those of a run without it, bit for bit."""
import pytest
import torch
from helpers import SelfAndCross

import lyradynamo
from lyradynamo import attention_prewarm

pytestmark = [pytest.mark.cuda, pytest.mark.usefixtures("seed_from_test_id")]


def _run(prewarm: bool, sizes) -> tuple[list, dict]:
    torch._dynamo.reset()
    torch.manual_seed(0)
    m = SelfAndCross(320, 8, 40, 768).cuda().half().eval()
    compiled = torch.compile(m, backend="lyra")
    before, outs = dict(attention_prewarm.stats), []
    with torch.no_grad(), lyradynamo.config.patch(attention_prewarm=prewarm):
        for length, ctx_len in sizes:
            x = torch.randn(2, length, 320, device="cuda", dtype=torch.half)
            ctx = torch.randn(2, ctx_len, 768, device="cuda", dtype=torch.half)
            outs.append(compiled(x, ctx))
            outs.append(compiled(x, ctx))  # a replay
    return outs, {k: attention_prewarm.stats[k] - before[k] for k in before}


def test_prewarmed_calls_are_met_and_outputs_do_not_change(monkeypatch):
    # sizes no other test met (the workers run once per call shape and process); cross-attention
    # over 200 keys: more than the short-KV kernel takes, so SDPA runs it
    sizes = [(1031, 200), (517, 200), (1031, 200)]
    monkeypatch.setattr(attention_prewarm, "_started", set())
    with_prewarm, stats = _run(True, sizes)
    assert stats["started"] == 2  # self and cross at the compiled size
    assert stats["warmed"] == 2 and stats["failed"] == 0
    assert stats["unjoined"] == 0 and stats["waited"] + stats["not_waited"] == 2  # every worker met
    monkeypatch.setattr(attention_prewarm, "_started", set())
    without, stats_off = _run(False, sizes)
    assert stats_off["started"] == 0
    for a, b in zip(with_prewarm, without):
        assert torch.equal(a, b)


def test_no_worker_runs_while_a_capture_records(monkeypatch):
    """wait_all() before the record: every worker has finished when the runner's capture starts."""
    monkeypatch.setattr(attention_prewarm, "_started", set())
    states = []
    real = torch.cuda.graph.__enter__

    def enter(self):  # noqa: ANN001
        states.append(dict(attention_prewarm._pending))
        return real(self)

    monkeypatch.setattr(torch.cuda.graph, "__enter__", enter)
    _run(True, [(333, 150)])
    assert states and all(not pending for pending in states)
