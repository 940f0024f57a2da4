"""Attention with a bool mask (True: attend): Qwen-Image's and Lumina2's text-padding masks.
The attention pass refused them ("attn_mask has dtype torch.bool"), so their head transposes and
q/k/v projections stayed unfused; lyra::attention hands a bool mask to torch SDPA as it is."""
import pytest
import torch
import torch.nn.functional as F

import lyradynamo
import more_models
from helpers import compiled_bitwise, rel_err

H, D = 2, 16


class MaskedAttention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = (torch.nn.Linear(H * D, H * D) for _ in range(3))

    def forward(self, x, keep):  # keep: (B, L) 0/1, 1 = a real token
        b, n, _ = x.shape
        q, k, v = (p(x).view(b, n, H, D).transpose(1, 2) for p in (self.q, self.k, self.v))
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=keep.bool()[:, None, None, :])
        return (o.transpose(1, 2).reshape(b, n, H * D),)


def test_bool_mask_attention_is_fused_and_bitwise():
    torch.manual_seed(0)
    x = torch.randn(2, 9, H * D)
    keep = torch.ones(2, 9, dtype=torch.long)
    keep[1, 6:] = 0
    rec = compiled_bitwise(MaskedAttention().eval(), x, keep)
    assert rec.summary["matched"]["attention"] == {"attention(blhd)": 1}


@pytest.mark.parametrize("name", ["qwenimage", "lumina2"])
def test_models_with_bool_masks_match_every_attention(name):
    if not more_models.available(name):
        pytest.skip(f"this diffusers has no {more_models.MODELS[name][0]}")
    torch._dynamo.reset()
    lyradynamo.reset_stats()
    model = more_models.build(name)
    kwargs = more_models.inputs(name, 2, 8, 8, 12)
    with torch.no_grad():
        out = more_models.first_output(torch.compile(model, backend="lyra")(**kwargs))
        ref = more_models.first_output(model(**kwargs))
    assert rel_err(out, ref) < 1e-5
    left = [i for r in lyradynamo.compiled_graphs() for i in r.report.left if i["kind"] == "sdpa"]
    assert not left, left
