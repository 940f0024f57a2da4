"""lyradynamo/quiet_compile.py: two renderings of the whole graph that torch makes on every
compile for records nobody reads are skipped inside lyra compilations, and only there."""
import sys

import torch
from torch._dynamo.output_graph import OutputGraph

import lyradynamo  # noqa: F401  (installs the backend and its hooks)
from lyradynamo import zoo


def _count_calls(monkeypatch, cls, name):
    """The callers (function names) of the calls that reach torch's own cls.name through lyra's
    wrapper. (Where torch's structured trace is on, e.g. after another test, its logging calls
    them too, from lambdas: those are meant to reach torch.)"""
    wrapper = getattr(cls, name)
    torch_own = wrapper.__wrapped__
    calls = []

    def counted(self, *args, **kwargs):
        calls.append(sys._getframe(2).f_code.co_name)  # 1: lyra's wrapper, 2: its caller
        return torch_own(self, *args, **kwargs)

    monkeypatch.setattr(wrapper, "__wrapped__", counted)
    return calls


def _compile_once(backend):
    torch.manual_seed(0)
    model = zoo.build_denoiser("sd15").eval()
    with torch.no_grad():
        torch.compile(model, backend=backend)(**zoo.denoiser_inputs("sd15", model, batch=2))


def test_graph_sizes_for_the_metrics_are_not_rendered_in_lyra_compilations(monkeypatch):
    calls = _count_calls(monkeypatch, OutputGraph, "get_graph_sizes_structured")
    _compile_once("lyra")
    assert "_compile" not in calls
    torch._dynamo.reset()
    _compile_once("eager")  # any other backend: torch's behaviour
    assert "_compile" in calls


def test_the_bypass_print_is_not_rendered_in_lyra_compilations(monkeypatch):
    calls = _count_calls(monkeypatch, torch.fx.GraphModule, "print_readable")
    _compile_once("lyra")
    assert "compile_and_call_fx_graph" not in calls
    gm = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()))
    text = gm.print_readable(print_output=False)  # outside a compile: in full
    assert "def forward" in text and "lyradynamo" not in text
    assert calls[-1] == "test_the_bypass_print_is_not_rendered_in_lyra_compilations"
