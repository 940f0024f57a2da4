"""lyradynamo.lora on the GPU: where backups live (config.lora_backup), bit-exact unload and
A -> B -> A, on a compiled tiny FLUX transformer, with no recompilation."""
import re

import pytest
import torch

import lyradynamo
from lyradynamo import lora, zoo

pytestmark = pytest.mark.cuda
TARGETS = re.compile(r"(to_[qkv]|to_out\.0|add_[qk]_proj|ff\.net\.2|proj_mlp)$")


@pytest.fixture(autouse=True)
def fresh():
    torch._dynamo.reset()
    lyradynamo.reset_stats()
    yield
    torch._dynamo.reset()


def first(o):
    return o[0] if isinstance(o, (tuple, list)) else o.sample


def _lora(model, seed, rank=4):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and TARGETS.search(name):
            o, i = m.weight.shape
            sd[f"transformer.{name}.lora_A.weight"] = (torch.randn(rank, i, generator=g) / i ** 0.5).to(m.weight.dtype)
            sd[f"transformer.{name}.lora_B.weight"] = (torch.randn(o, rank, generator=g) * 0.05).to(m.weight.dtype)
    assert sd
    return sd


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def _assert_bits(model, snap):
    for k, v in model.named_parameters():
        assert torch.equal(v.view(torch.int16), snap[k].view(torch.int16)), k


@pytest.mark.parametrize("where,reserve,expect", [("gpu", 0.25, "cuda"), ("host", 0.25, "cpu"),
                                                  ("auto", 0.25, "cuda"), ("auto", 1.0, "cpu")])
def test_backup_placement_exact_unload_and_aba(where, reserve, expect):
    model = zoo.build_denoiser("flux", dtype=torch.bfloat16, device="cuda")
    compiled = torch.compile(model, backend="lyra")
    inp = zoo.denoiser_inputs("flux", model, batch=1)
    base = _snapshot(model)
    a, b = _lora(model, 1), _lora(model, 2)
    with lyradynamo.config.patch(lora_backup=where, lora_backup_reserve=reserve), torch.no_grad():
        compiled(**inp)
        lora.load_lora(model, a, name="a")
        st = lora._STATES[model]
        assert st.backup and {t.device.type for t in st.backup.values()} == {expect}
        after_a = _snapshot(model)
        out_a = first(compiled(**inp)).clone()
        torch.testing.assert_close(out_a, first(model(**inp)), atol=3e-2, rtol=3e-2)
        lora.unload_lora(model, "a")
        _assert_bits(model, base)
        lora.load_lora(model, b, name="b")
        out_b = first(compiled(**inp))
        assert (out_b - out_a).abs().max() > 1e-3
        lora.unload_lora(model, "b")
        lora.load_lora(model, a, name="a")
        _assert_bits(model, after_a)
        assert torch.equal(first(compiled(**inp)), out_a)
        lora.unload_lora(model)
        _assert_bits(model, base)
        assert lora.release_backups(model) > 0
    assert lyradynamo.compile_count() == 1
