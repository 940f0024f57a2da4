"""The CUDA-graph runner's call order, on the CPU with a stand-in graph: the replay is launched
before the parameters' addresses are checked, a capture keeps the storages it reads alive, and a
replaced parameter (`.data =`) makes the same call recapture and replay again before any output
is handed out."""
import operator
import types

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from lyradynamo import config, runtime


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


def _capture_steps(monkeypatch, fail_direct: bool = False):
    """A runner whose _capture runs for real around stand-in warm-up / record steps (CPU: the
    side stream is a dummy), and the log of those steps."""
    streams = []
    monkeypatch.setattr(runtime, "side_stream", lambda device: streams.append(device) or object())
    repaired = []
    monkeypatch.setattr(runtime, "_after_failed_capture", lambda device: repaired.append(device))
    rec = types.SimpleNamespace(summary={}, index=0)
    runner = runtime.CudaGraphRunner(None, set(), torch.device("cpu"), rec)
    log: list = []

    def record(stream, static_args):
        warmed = ("warm-up", runner.captures_made) in log
        log.append(("record", runner.captures_made))
        if fail_direct and not warmed:
            raise RuntimeError("needs a workspace outside capture")
        return torch.zeros(()), object()

    runner.repaired, runner.streams = repaired, streams
    monkeypatch.setattr(runner, "_warm_up", lambda stream, static_args: log.append(("warm-up", runner.captures_made)))
    monkeypatch.setattr(runner, "_record", record)
    return runner, rec, log


def test_a_new_shape_is_recorded_directly_once_the_graph_was_warmed(monkeypatch):
    runner, rec, log = _capture_steps(monkeypatch)
    with config.patch(new_shape_warmup=False):
        runner._capture((torch.ones(2),))
        runner._capture((torch.ones(3),))
    assert log == [("warm-up", 0), ("record", 0), ("record", 1)]  # the first capture still warms up
    assert rec.summary["capture_phases_s"]["warmup"] >= 0 and "direct_capture_failures" not in rec.summary
    assert runner.repaired == []
    log.clear()
    with config.patch(new_shape_warmup=True):
        runner._capture((torch.ones(4),))
    assert log == [("warm-up", 2), ("record", 2)]


def test_a_failed_direct_capture_warms_up_and_records_again(monkeypatch):
    runner, rec, log = _capture_steps(monkeypatch, fail_direct=True)
    with config.patch(new_shape_warmup=False):
        runner._capture((torch.ones(2),))
        cap = runner._capture((torch.ones(3),))
    assert log == [("warm-up", 0), ("record", 0), ("record", 1), ("warm-up", 1), ("record", 1)]
    assert cap.graph is not None and runner.captures_made == 2
    assert len(rec.summary["direct_capture_failures"]) == 1
    assert "workspace" in rec.summary["direct_capture_failures"][0]
    # a reset CUDA generator and a new side stream after the failed capture (3 streams, 2 captures)
    assert runner.repaired == [torch.device("cpu")] and len(runner.streams) == 3


def test_a_failed_capture_after_a_warm_up_is_not_retried(monkeypatch):
    runner, rec, log = _capture_steps(monkeypatch)
    monkeypatch.setattr(runner, "_record", lambda stream, static_args: (_ for _ in ()).throw(RuntimeError("sync")))
    try:
        runner._capture((torch.ones(2),))
    except RuntimeError as exc:
        assert "sync" in str(exc)
    else:
        raise AssertionError("the capture error must reach _capture_or_none")
    assert log == [("warm-up", 0)]


def _graph_with_vals(fn, *example):
    """fn traced to an FX graph whose nodes carry fake values (as Dynamo's graphs do)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    return make_fx(fn, tracing_mode="fake")(*example)


def test_a_graph_that_launches_nothing_is_not_captured():
    gm = torch.fx.symbolic_trace(lambda x, y: (y, x))
    assert "no operation" in runtime.not_capturable(gm)


def _dynamo_graph(fn, *args):
    graphs = []

    def grab(gm, example_inputs):  # noqa: ANN001, ANN202
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(fn, backend=grab, dynamic=True)(*args)
    torch._dynamo.reset()
    (gm,) = graphs
    return gm


def test_a_graph_of_views_and_sizes_is_not_captured():
    """A graph break can leave a graph that only splits its input into views and asserts on
    sizes (Qwen-Image's): a capture of it would record no kernel."""
    meta = torch.ones(3, 8, device="meta")
    views = _dynamo_graph(lambda x: (*x.split(x.shape[-1] // 2, dim=-1), x.unsqueeze(0)[:, 1:]), meta)
    assert "no kernel" in runtime.not_capturable(views)
    # one kernel among the views is enough to capture
    assert runtime.not_capturable(_dynamo_graph(lambda x: (*x.split(4, dim=-1), x + 1), meta)) is None
    assert runtime.not_capturable(_dynamo_graph(lambda x: x.reshape(-1), meta.t())) is None


def test_an_output_computed_on_the_host_is_not_captured():
    """A replay re-launches kernels only: a CPU output would come back as recorded."""
    meta = torch.empty(4, device="meta")
    ids = torch.arange(4)
    gm = _graph_with_vals(lambda x, ids: (x * 2, ids * 2 + 1), meta, ids)
    assert "computed on the host" in runtime.not_capturable(gm)
    # the device output alone, or a host input handed back as it came, can be recorded
    assert runtime.not_capturable(_graph_with_vals(lambda x, ids: (x * 2, ids), meta, ids)) is None
    assert runtime.not_capturable(_graph_with_vals(lambda x, ids: x * ids.sum().to("meta"), meta, ids)) is None


def test_the_reason_reaches_the_dump():
    import lyradynamo
    from lyradynamo import dump

    with torch.no_grad():
        torch.compile(lambda x: x * 2, backend="lyra")(torch.zeros(2))
    (rec,) = lyradynamo.compiled_graphs()
    assert rec.summary["cuda_graphs_off"] is None  # the CPU runs graphs as they are: nothing to report
    assert "CUDA graphs off" not in dump.format_summary(rec.summary)
    why = "no operation to launch (the graph only returns its inputs)"
    assert f"CUDA graphs off for this graph (it runs op by op): {why}" in \
        dump.format_summary(rec.summary | {"cuda_graphs_off": why})


def test_host_reads_inside_device_ops_and_mask_writes_are_not_captured():
    """QwenImage21's token metadata after its graph breaks: a GPU table indexed by CPU indices
    (torch copies them inside the op) and a write through a boolean mask (a host sync); both
    would fail inside a capture. An explicit copy is left to host_prefix unless it could not be
    split off (copies_ok=False)."""
    meta = torch.empty(6, 4, device="meta")
    idx = torch.arange(3)
    gm = _graph_with_vals(lambda table, idx: table[idx] * 2, meta, idx)
    assert "reads host tensor" in runtime.not_capturable(gm)
    mask = torch.ones(6, dtype=torch.bool, device="meta")

    def masked_write(x, mask):
        x = x.clone()
        x[mask] = 0.0
        return x

    assert "boolean mask" in runtime.not_capturable(_dynamo_graph(masked_write, meta, mask))
    copy = torch.fx.symbolic_trace(lambda x, ids: x * ids.to(x.device))
    with FakeTensorMode(allow_non_fake_inputs=True):  # x on "cuda", ids on the host
        for n in copy.graph.nodes:
            on_host = n.op == "placeholder" and n.name == "ids"
            n.meta["example_value"] = torch.empty(6, device="cpu" if on_host else "cuda")
    assert runtime.not_capturable(copy) is None  # an explicit copy: host_prefix's to move
    assert "reads host tensor" in runtime.not_capturable(copy, copies_ok=False)


def test_host_constants_and_host_values_written_into_device_tensors_are_not_captured():
    """Dynamo folds `torch.tensor([0, 0, ...])` into a constant the graph keeps as an attribute
    (no traced value): indexing a device tensor by it is an implicit copy too. So is writing a
    host tensor, even a 0-d one, into a device tensor."""
    class Table(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("ids", torch.tensor([0, 0, 1]))

        def forward(self, x):
            return x[self.ids] * 2

    with FakeTensorMode(allow_non_fake_inputs=True):
        cuda = torch.empty(5, device="cuda")
    table = torch.fx.symbolic_trace(Table())
    for n in table.graph.nodes:
        if n.op != "get_attr" and n.op != "output":
            n.meta["example_value"] = cuda
    assert "reads host tensor ids" in runtime.not_capturable(table)
    graph = torch.fx.Graph()  # y = x * 1; y[0] = v (v a 0-d host tensor)
    x, v = graph.placeholder("x"), graph.placeholder("v")
    y = graph.call_function(operator.mul, (x, 1))
    graph.call_function(operator.setitem, (y, 0, v))
    graph.output(y)
    gm = torch.fx.GraphModule(torch.nn.Module(), graph)
    with FakeTensorMode(allow_non_fake_inputs=True):
        x.meta["example_value"], y.meta["example_value"] = cuda, cuda
        v.meta["example_value"] = torch.empty((), device="cpu")
    assert "writes host tensor v" in runtime.not_capturable(gm)
