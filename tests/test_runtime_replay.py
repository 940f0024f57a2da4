"""The CUDA-graph runner's call order, on the CPU with a stand-in graph: the replay is launched
before the parameters' addresses are checked, a capture keeps the storages it reads alive, and a
replaced parameter (`.data =`) makes the same call recapture and replay again before any output
is handed out."""
import types

import torch

from lyradynamo import runtime


class _StandInGraph:
    """Replays 'read' the parameter storages their capture holds (as a CUDA graph reads the
    addresses it recorded) and write their sum into the capture's output buffer."""

    def __init__(self, cap, log):
        self.cap, self.log = cap, log

    def replay(self):
        total = sum(float(torch.empty(0).set_(st).sum()) for st in self.cap.param_storages)
        total += float(self.cap.buffers[0].sum())
        self.cap.outputs.fill_(total)
        self.log.append(("replay", total))


def _runner(params, log):
    rec = types.SimpleNamespace(summary={}, index=0)
    n = len(params)
    runner = runtime.CudaGraphRunner(None, set(range(1, 1 + n)), torch.device("cpu"), rec)

    def capture(args):
        cap, _ = runner._prepare(args)
        cap.outputs = torch.zeros(())
        cap.graph = _StandInGraph(cap, log)
        runner.captures_made += 1
        log.append(("capture", runner.captures_made))
        return cap

    runner._capture = capture
    return runner, rec


def test_replay_first_then_the_address_check_and_a_recapture(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    params = [torch.nn.Parameter(torch.full((3,), float(i + 1)), requires_grad=False) for i in range(4)]
    x = torch.ones(2)
    log: list = []
    runner, rec = _runner(params, log)

    out = runner(x, *params)
    assert float(out) == 2 + 3 * (1 + 2 + 3 + 4) and runner.captures_made == 1
    calls = []
    monkeypatch.setattr(runner, "_params_moved", lambda cap, args: calls.append(len(log)) or
                        runtime.CudaGraphRunner._params_moved(runner, cap, args))
    log.clear()
    out = runner(x, *params)
    assert log == [("replay", 32.0)] and calls == [1]  # checked after the replay was launched
    assert float(out) == 32.0

    # `.data =`: a new storage at a new address; the held capture still holds (reads) the old one
    old = params[2].untyped_storage()
    held = runner.captures[runner._signature((x, *params))]
    params[2].data = torch.full((3,), 10.0)
    assert held.param_storages[2].data_ptr() == old.data_ptr()  # kept alive, not reused
    log.clear()
    out = runner(x, *params)
    # the stale replay read the old weights, then the same call recaptured and replayed again
    assert log == [("replay", 32.0), ("capture", 2), ("replay", 2 + 3 * (1 + 2 + 10 + 4))]
    assert float(out) == 53.0 and rec.summary["recaptures_after_replacement"] == 1
    log.clear()
    assert float(runner(x, *params)) == 53.0 and log == [("replay", 53.0)]  # no further capture


def test_outputs_are_copies_the_caller_may_keep(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    params = [torch.nn.Parameter(torch.ones(2), requires_grad=False)]
    runner, _ = _runner(params, [])
    a = runner(torch.zeros(1), *params)
    b = runner(torch.full((1,), 5.0), *params)
    assert float(a) == 2.0 and float(b) == 7.0
