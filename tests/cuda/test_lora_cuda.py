"""lyradynamo.lora on the GPU: where backups live (config.lora_backup), bit-exact unload and
A -> B -> A, on a compiled tiny FLUX transformer, with no recompilation."""
import pytest
import torch

import lyradynamo
from lyradynamo import lora, zoo

from helpers import flux_lora  # noqa: E402

pytestmark = pytest.mark.cuda


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def _assert_bits(model, snap):
    for k, v in model.named_parameters():
        assert torch.equal(v.view(torch.int16), snap[k].view(torch.int16)), k


@pytest.mark.parametrize("where,reserve,expect", [("gpu", 0.25, "cuda"), ("host", 0.25, "cpu"),
                                                  ("auto", 0.25, "cuda"), ("auto", 1.0, "cpu")])
def test_backup_placement_exact_unload_and_aba(where, reserve, expect):
    pytest.importorskip("peft")  # flux_lora makes the LoRAs with peft
    pytest.importorskip("transformers")  # lyradynamo.lora reads through diffusers.FluxPipeline
    template = zoo.build_denoiser("flux")
    model = zoo.build_denoiser("flux", dtype=torch.bfloat16, device="cuda")
    compiled = torch.compile(model, backend="lyra")
    inp = zoo.denoiser_inputs("flux", model, batch=1)
    base = _snapshot(model)
    a, b = flux_lora(template, seed=1), flux_lora(template, seed=2)
    with lyradynamo.config.patch(lora_backup=where, lora_backup_reserve=reserve), torch.no_grad():
        compiled(**inp)
        lora.load_lora(model, a, name="a")
        st = lora._STATES[model]
        assert st.backup and {t.device.type for t in st.backup.values()} == {expect}
        after_a = _snapshot(model)
        out_a = compiled(**inp)[0].clone()
        torch.testing.assert_close(out_a, model(**inp)[0], atol=3e-2, rtol=3e-2)
        lora.unload_lora(model, "a")
        _assert_bits(model, base)
        lora.load_lora(model, b, name="b")
        out_b = compiled(**inp)[0]
        assert (out_b - out_a).abs().max() > 1e-3
        lora.unload_lora(model, "b")
        lora.load_lora(model, a, name="a")
        _assert_bits(model, after_a)
        assert torch.equal(compiled(**inp)[0], out_a)
        lora.unload_lora(model)
        _assert_bits(model, base)
        assert lora.release_backups(model) > 0
    assert lyradynamo.compile_count() == 1
