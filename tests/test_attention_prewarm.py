"""attention_prewarm (CPU): the attention calls of a compiled graph evaluated at a call's sizes,
and the worker bookkeeping (start once per call shape, join, wait before a capture). The GPU
side (a worker's compile serving the main thread's build) is measured by
benchmarks/new_shape_probe.py on the device."""
import threading
import time

import pytest
import torch
from helpers import SelfAndCross

import lyradynamo
from lyradynamo import attention_prewarm, runtime
from lyradynamo.ops import attention as attention_ops


@pytest.fixture
def attention_runs(monkeypatch):
    """The (q, k, v) sizes and strides, dtype, scale, is_causal and layout of each lyra::attention
    run (on the CPU, the op runs its reference)."""
    seen: dict = {}
    real = attention_ops.attention_reference

    def reference(q, k, v, mask, scale, is_causal, layout):  # noqa: ANN001
        seen[(tuple((tuple(t.shape), t.stride()) for t in (q, k, v)), q.dtype, scale, is_causal, layout)] = None
        return real(q, k, v, mask, scale, is_causal, layout)

    monkeypatch.setattr(attention_ops, "attention_reference", reference)
    return seen


@pytest.fixture
def graph_and_calls(monkeypatch):
    """Compile SelfAndCross with lyra; returns the rewritten graph and a list that collects the
    graph's arguments of every call."""
    torch._dynamo.reset()
    graphs, calls = [], []
    real = runtime.make_runner

    def make_runner(gm, example_inputs, record, n_lifted=0):  # noqa: ANN001
        run = real(gm, example_inputs, record, n_lifted)
        graphs.append(gm)

        def recording(*args):
            calls.append(list(args))
            return run(*args)
        return recording

    monkeypatch.setattr(runtime, "make_runner", make_runner)
    return graphs, calls


def test_calls_are_the_attention_runs_at_every_size(graph_and_calls, attention_runs):
    graphs, calls = graph_and_calls
    m = SelfAndCross(32, 2, 16, 24).eval()
    compiled = torch.compile(m, backend="lyra")
    with torch.no_grad():
        for batch, length, ctx_len in ((2, 64, 7), (1, 37, 5), (3, 9, 11)):
            x, ctx = torch.randn(batch, length, 32), torch.randn(batch, ctx_len, 24)
            attention_runs.clear()
            compiled(x, ctx)
            (gm,) = graphs  # one compilation serves every size
            assert len(attention_runs) == 2  # self- and cross-attention
            assert attention_prewarm.calls(gm, calls[-1]) == list(attention_runs)


def test_a_size_that_cannot_be_evaluated_gives_no_call(graph_and_calls):
    graphs, calls = graph_and_calls
    with torch.no_grad():
        torch.compile(SelfAndCross(32, 2, 16, 24).eval(), backend="lyra")(torch.randn(2, 16, 32), torch.randn(2, 7, 24))
    (gm,) = graphs
    assert attention_prewarm.calls(gm, []) == []  # no values for the symbols
    assert attention_prewarm.start(gm, calls[0], torch.device("cpu")) == 0  # CPU: nothing to compile


@pytest.fixture
def fake_workers(monkeypatch):
    """start() with `_warm` replaced: each worker waits for its event, records its call."""
    events, ran = {}, []
    monkeypatch.setattr(attention_prewarm, "_pending", {})
    monkeypatch.setattr(attention_prewarm, "_started", set())
    monkeypatch.setattr(attention_prewarm, "stats", dict.fromkeys(attention_prewarm.stats, 0))

    def warm(call, device):  # noqa: ANN001
        events.setdefault(call[0][0][0], threading.Event()).wait(5)
        ran.append(call[0][0][0])
        return True

    monkeypatch.setattr(attention_prewarm, "_warm", warm)
    # CPU tensors stand for CUDA ones: started for torch.device("cuda") with no current device,
    # the workers are keyed by the device index a CPU tensor has (None)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: None)
    return events, ran


def _tensors(size):
    return (torch.zeros(size),) * 3


def test_join_waits_for_a_pending_worker_but_not_for_a_rounds_first_call(fake_workers, monkeypatch):
    events, ran = fake_workers
    sizes = [(2, 8, 16, 4), (2, 8, 64, 4)]
    specs = [(tuple((s, torch.zeros(s).stride()) for _ in range(3)), torch.float32, None, False, "bhld") for s in sizes]
    monkeypatch.setattr(attention_prewarm, "calls", lambda gm, args: specs)
    for s in sizes:
        events[s] = threading.Event()
    cuda = torch.device("cuda")
    assert attention_prewarm.start(None, [], cuda) == 2
    assert attention_prewarm.start(None, [], cuda) == 0  # one worker per call shape and process
    t = time.perf_counter()
    q0 = torch.zeros(sizes[0])
    attention_prewarm.join(q0, q0, q0, None, False, "bhld")  # the round's first: not waited for
    assert time.perf_counter() - t < 1 and ran == []
    threading.Timer(0.2, events[sizes[1]].set).start()
    q1 = torch.zeros(sizes[1])
    attention_prewarm.join(q1, q1, q1, None, False, "bhld")  # waited for
    assert ran == [sizes[1]]
    assert attention_prewarm.stats["waited"] == 1 and attention_prewarm.stats["not_waited"] == 1
    events[sizes[0]].set()
    attention_prewarm.wait_all()  # nothing left pending
    assert not attention_prewarm._pending


def test_wait_all_waits_for_every_worker(fake_workers, monkeypatch):
    events, ran = fake_workers
    sizes = [(1, 2, 3, 4), (1, 2, 5, 4), (1, 2, 7, 4)]
    specs = [(tuple((s, torch.zeros(s).stride()) for _ in range(3)), torch.float16, 0.5, False, "blhd") for s in sizes]
    monkeypatch.setattr(attention_prewarm, "calls", lambda gm, args: specs)
    assert attention_prewarm.start(None, [], torch.device("cuda")) == 3
    for s in sizes:
        threading.Timer(0.1, events.setdefault(s, threading.Event()).set).start()
    attention_prewarm.wait_all()
    assert sorted(ran) == sorted(sizes)


def test_the_option_turns_it_off(fake_workers, monkeypatch):
    monkeypatch.setattr(attention_prewarm, "calls", lambda gm, args: pytest.fail("not evaluated when off"))
    with lyradynamo.config.patch(attention_prewarm=False):
        assert attention_prewarm.start(None, [], torch.device("cuda")) == 0
