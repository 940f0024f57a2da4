"""A capture that fails on the GPU (a host sync inside the recorded run) leaves the process
usable: the shape runs without CUDA graphs, with the right output, and random ops on the device
still work afterwards (torch 2.11's CUDA generator stays in capture mode after a capture whose
end fails: lyra resets it)."""
import gc
import types

import pytest
import torch
import torch.fx as fx

from lyradynamo import runtime

pytestmark = pytest.mark.cuda


@fx.wrap
def _sync_then_double(x):
    torch.cuda.synchronize()  # not allowed while a stream captures: invalidates the capture
    return x * 2


_SYNCS_LEFT = {"n": 0}


@fx.wrap
def _sync_once_while_capturing(x):
    if _SYNCS_LEFT["n"] > 0 and torch.cuda.is_current_stream_capturing():
        _SYNCS_LEFT["n"] -= 1
        torch.cuda.synchronize()
    return x * 3


def _graph() -> fx.GraphModule:
    def f(x):
        return _sync_then_double(x) + 1

    return fx.symbolic_trace(f)


def test_a_failed_capture_runs_eagerly_and_random_ops_still_work():
    rec = types.SimpleNamespace(summary={}, index=0)
    runner = runtime.CudaGraphRunner(_graph(), set(), torch.device("cuda"), rec)
    x = torch.arange(6.0, device="cuda")
    out = runner(x)
    torch.testing.assert_close(out, x * 2 + 1)
    assert rec.summary["cuda_graph_failures"] and runner.captures_made == 0
    torch.randn(8, device="cuda")  # raised "Offset increment outside graph capture" before the reset
    torch.testing.assert_close(runner(x + 1), (x + 1) * 2 + 1)  # no second attempt at this shape
    assert len(rec.summary["cuda_graph_failures"]) == 1
    _captures_still_work()


def _captures_still_work():
    """The caller's stream is current again and another graph captures and replays."""
    assert torch.cuda.current_stream() == torch.cuda.default_stream()
    rec = types.SimpleNamespace(summary={}, index=1)
    runner = runtime.CudaGraphRunner(fx.symbolic_trace(lambda x: x * 5), set(), torch.device("cuda"), rec)
    x = torch.randn(7, device="cuda")
    torch.testing.assert_close(runner(x), x * 5)
    torch.testing.assert_close(runner(x + 1), (x + 1) * 5)
    assert runner.captures_made == 1 and "cuda_graph_failures" not in rec.summary


def test_a_failed_direct_capture_warms_up_records_and_random_ops_still_work():
    """The graph was captured at one shape; a later shape's direct capture fails (the op syncs only
    at that shape), so the runner warms up and records again: still a CUDA graph."""
    from lyradynamo import config

    def f(x):
        return _sync_once_while_capturing(x) - 1

    gm = fx.symbolic_trace(f)
    rec = types.SimpleNamespace(summary={}, index=0)
    runner = runtime.CudaGraphRunner(gm, set(), torch.device("cuda"), rec)
    with config.patch(new_shape_warmup=False):
        a = torch.ones(4, device="cuda")
        torch.testing.assert_close(runner(a), a * 3 - 1)
        b = torch.arange(10.0, device="cuda")
        _SYNCS_LEFT["n"] = 1  # the direct capture of b's shape syncs, the one after the warm-up not
        torch.testing.assert_close(runner(b), b * 3 - 1)
    assert len(rec.summary["direct_capture_failures"]) == 1 and runner.captures_made == 2
    assert "cuda_graph_failures" not in rec.summary
    torch.randn(8, device="cuda")
    torch.testing.assert_close(runner(b + 1), (b + 1) * 3 - 1)  # a replay
    _captures_still_work()


def test_a_capture_after_every_earlier_graph_died():
    """Once every graph captured into the shared pool is gone, torch's allocator still holds the
    pool (until its memory is freed) with no users, and a capture into it failed its
    `use_count > 0` assert (session 29, run B, after torch._dynamo.reset()): a new pool is used."""
    for i in range(3):
        rec = types.SimpleNamespace(summary={}, index=i)
        runner = runtime.CudaGraphRunner(fx.symbolic_trace(lambda x: x * 5), set(), torch.device("cuda"), rec)
        x = torch.randn(5 + i, device="cuda")
        torch.testing.assert_close(runner(x), x * 5)
        assert runner.captures_made == 1 and "cuda_graph_failures" not in rec.summary, rec.summary
        del runner
        gc.collect()
