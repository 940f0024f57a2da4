"""host_prefix.split: a graph that computes small tensors on the host and copies them to the GPU
(Chroma's guidance ids, CogView4's RoPE tables) splits into a host part, run before each replay,
and a device part that a CUDA graph can capture. Checked on the CPU from the nodes' traced
values (fake CUDA tensors set by hand), and by running both parts on CPU tensors: together they
compute what the whole graph computes."""
import operator

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode

from lyradynamo import host_prefix


class RopeOnHost(torch.nn.Module):
    """CogView4's pattern: positions from torch.arange on the CPU, a table, a copy to x's device."""

    def forward(self, x):
        pos = torch.arange(x.shape[1]).float()
        table = pos[:, None].cos().to(x.device)
        return x * table + 1


class AsTensorCopy(torch.nn.Module):
    """Qwen-Image's form of the copy: torch.as_tensor(host tensor, device=...)."""

    def forward(self, x):
        return x + torch.as_tensor(torch.arange(x.shape[1]).float()[:, None], device=x.device)


class DeviceReadsHostTensor(torch.nn.Module):
    def forward(self, x):
        return x * torch.arange(x.shape[1]).float()[:, None]  # no copy: a CPU tensor in a GPU op


class HostReadsDeviceValue(torch.nn.Module):
    def forward(self, x):
        y = x * 2
        return x + y.sum().cpu().cos().to(x.device)  # the host part would need y: a device value


class SizeOfHostTensorOnDevice(torch.nn.Module):
    def forward(self, x):
        pos = torch.arange(x.shape[1]).float()
        return x[:, : pos.shape[0]] * pos[:, None].to(x.device)


class TableInputOnHost(torch.nn.Module):
    """Qwen-Image's RoPE tables: a CPU tensor the model keeps as a plain attribute (Dynamo lifts
    it to a graph input), copied to x's device on every call, then sliced by a size. (The dtype
    makes `.to` a copy in the CPU run of the test as well.)"""

    def forward(self, x, table):
        return x * table.to(x.device, torch.float64)[: x.shape[1]]


def _traced(module, x_shape=(2, 5, 3), host_inputs=()):
    """module traced by torch.fx, each node's value faked as Dynamo would trace it with x on the
    GPU: torch.arange makes a host tensor, .to(x.device) copies to "cuda", .cpu() to the host,
    any other op runs where its tensor inputs are (on "cuda" if any of them is)."""
    gm = fx.symbolic_trace(module)

    def where(a):
        v = a.meta.get("example_value")
        return v.device.type if isinstance(v, torch.Tensor) else None

    with FakeTensorMode(allow_non_fake_inputs=True):
        for n in gm.graph.nodes:
            if n.op == "output":
                continue
            if n.op == "placeholder":
                value = torch.empty(*x_shape, device="cpu" if n.name in host_inputs else "cuda")
            elif n.target is getattr:
                src = n.args[0].meta["example_value"]
                value = torch.device("cuda") if n.args[1] == "device" else src.shape
            elif n.target is operator.getitem and isinstance(n.args[0].meta["example_value"], torch.Size):
                value = n.args[0].meta["example_value"][n.args[1]]  # a size
            else:
                devices = {where(a) for a in n.all_input_nodes}
                on_host = n.target is torch.arange or n.target == "cpu" or (
                    n.target not in ("to", torch.as_tensor) and "cuda" not in devices and "cpu" in devices)
                value = torch.empty(3, device="cpu" if on_host else "cuda")
            n.meta["example_value"] = value
    return gm


def test_host_tensors_and_their_copies_split_off():
    gm = _traced(RopeOnHost())
    parts = host_prefix.split(gm)
    assert parts is not None and parts.copies == 1
    device_ops = {n.target for n in parts.device.graph.nodes if n.op in ("call_function", "call_method")}
    assert torch.arange not in device_ops and "cos" not in device_ops and "to" not in device_ops
    assert [n.name for n in parts.device.graph.nodes if n.op == "placeholder"] == ["x", "_host_copy_0"]
    x = torch.randn(2, 5, 3)
    copies = parts.host(x)
    assert isinstance(copies, tuple) and len(copies) == 1
    assert torch.equal(parts.device(x, *copies), gm(x))
    runner = host_prefix.HostThenDevice(parts.host, parts.device)
    assert torch.equal(runner(x), RopeOnHost()(x))


def test_as_tensor_is_a_copy_too():
    gm = _traced(AsTensorCopy())
    parts = host_prefix.split(gm)
    assert parts is not None and parts.copies == 1
    x = torch.randn(2, 5, 3)
    assert torch.equal(parts.device(x, *parts.host(x)), gm(x))


class SizeAsDeviceTensor(torch.nn.Module):
    """Qwen-Image's `torch.as_tensor(text_seq_len, device=...)`: a Python value copied to the GPU."""

    def forward(self, x):
        return x * torch.as_tensor(x.shape[1], device=x.device)


class ListAsDeviceTensor(torch.nn.Module):
    def forward(self, x):
        return x * torch.as_tensor([x.shape[1], 2], device=x.device)[:, None, None]


def test_a_size_made_a_device_tensor_becomes_a_fill():
    """Qwen-Image's `torch.as_tensor(text_seq_len, device=...)`: a fill kernel a capture records
    (the size is in the capture's signature), not a host copy."""
    gm = _traced(SizeAsDeviceTensor())
    for n in gm.graph.nodes:
        if n.target is torch.as_tensor:
            with FakeTensorMode():
                n.meta["example_value"] = torch.empty((), dtype=torch.int64, device="cuda")
    x = torch.randn(2, 5, 3)
    expected = gm(x)
    assert host_prefix.fill_scalars(gm) == 1
    assert [n.target for n in gm.graph.nodes if n.op == "call_function"].count(torch.full) == 1
    assert torch.equal(gm(x), expected) and gm(x).dtype == expected.dtype
    assert host_prefix.split(gm) is None  # nothing left on the host


def test_a_list_made_a_device_tensor_is_a_copy():
    gm = _traced(ListAsDeviceTensor())
    assert host_prefix.fill_scalars(gm) == 0  # not one number: copied before the replay
    parts = host_prefix.split(gm)
    assert parts is not None and (parts.host_nodes, parts.copies) == (0, 1)
    x = torch.randn(2, 5, 3)
    assert torch.equal(parts.device(x, *parts.host(x)), gm(x))


def test_a_host_input_copied_to_the_device_is_copied_once_per_version():
    gm = _traced(TableInputOnHost(), host_inputs=("table",))
    parts = host_prefix.split(gm)
    assert parts is not None and (parts.host_nodes, parts.copies) == (0, 1)
    assert "to" not in {n.target for n in parts.device.graph.nodes if n.op == "call_method"}
    x, table = torch.randn(2, 5, 3), torch.randn(7, 3)
    first = parts.host(x, table)
    assert torch.equal(parts.device(x, table, *first), gm(x, table))
    assert parts.host(x, table)[0] is first[0]  # the same table, unchanged: not copied again
    table.mul_(2)  # modified in place: copied again, the new values seen
    again = parts.host(x, table)
    assert again[0] is not first[0] and torch.equal(parts.device(x, table, *again), gm(x, table))
    other = table.clone()  # another tensor with equal values and version: copied
    assert parts.host(x, other)[0] is not again[0]


def test_graph_without_host_tensors_does_not_split():
    class Plain(torch.nn.Module):
        def forward(self, x):
            return x * 2

    assert host_prefix.split(_traced(Plain())) is None


def test_a_host_tensor_read_without_a_copy_does_not_split():
    assert host_prefix.split(_traced(DeviceReadsHostTensor())) is None


def test_host_work_that_reads_a_device_value_does_not_split():
    assert host_prefix.split(_traced(HostReadsDeviceValue())) is None


def test_a_host_tensors_size_read_on_the_device_does_not_split():
    assert host_prefix.split(_traced(SizeOfHostTensorOnDevice())) is None
