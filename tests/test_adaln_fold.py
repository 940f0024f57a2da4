"""passes/adaln.py folds DiT's `1 + scale` into lyra::adaln's mul_offset: the aten add of the tiny
(B, 1, D) modulation leaves the graph (a launch per block on the GPU) and the compiled model still
gives eager's outputs bit for bit (the op adds the 1 in scale's dtype, as eager does)."""
import pytest
import torch
import torch.nn.functional as F

import lyradynamo
from lyradynamo.passes import adaln as adaln_pass
from helpers import compiled_bitwise

D = 32

# ways a model writes the factor (1 + scale) of its modulation; s = scale[:, None]
FACTORS = {
    "1 + s": lambda scale: 1 + scale[:, None],
    "s + 1": lambda scale: scale[:, None] + 1,
    "torch.add(s, 1)": lambda scale: torch.add(scale[:, None], 1),
    "s.add(1)": lambda scale: scale[:, None].add(1),
    "(1 + scale)[:, None, :]": lambda scale: (1 + scale)[:, None, :],  # diffusers' AdaLayerNormContinuous
    "0.25 + s": lambda scale: 0.25 + scale[:, None],
}


class Modulated(torch.nn.Module):
    """adaLN: norm(x) * factor(scale) + shift, (shift, scale) from silu(t) -> linear."""

    def __init__(self, factor: str, kind: str):
        super().__init__()
        self.emb = torch.nn.Linear(16, 2 * D)
        self.weight = torch.nn.Parameter(1 + 0.1 * torch.randn(D)) if kind.startswith("rms") else None
        self.factor, self.kind = factor, kind

    def norm(self, x):
        if self.kind == "rms":  # diffusers' RMSNorm
            var = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
            return (x * torch.rsqrt(var + 1e-6)).to(x.dtype) * self.weight
        if self.kind == "rms, torch.mean":  # the function form (QwenImage21's text norm)
            var = torch.mean(x.to(torch.float32) ** 2, dim=-1, keepdim=True)
            return (x * torch.rsqrt(var + 1e-6)).to(x.dtype) * self.weight
        return F.layer_norm(x, (D,), eps=1e-6)

    def forward(self, x, t):
        shift, scale = self.emb(F.silu(t)).chunk(2, dim=1)
        return (self.norm(x) * FACTORS[self.factor](scale) + shift[:, None],)


def _inputs(dtype, batch=2, length=7):
    g = torch.Generator().manual_seed(3)
    return (3 * torch.randn(batch, length, D, generator=g)).to(dtype), torch.randn(batch, 16, generator=g).to(dtype)


def _scalar_adds(rec) -> int:
    hist = rec.summary["op_histogram"]
    return hist.get("add", 0) + hist.get(".add", 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("factor", list(FACTORS))
def test_scalar_plus_scale_folds_into_the_norm(factor, dtype):
    torch.manual_seed(0)
    model = Modulated(factor, "layer").to(dtype).eval()
    rec = compiled_bitwise(model, *_inputs(dtype))
    assert _scalar_adds(rec) == 0, rec.summary["op_histogram"]
    offset = "0.25" if factor.startswith("0.25") else "1"
    assert rec.summary["matched"]["adaln"] == {f"layer_norm+({offset}+scale)+shift": 1}


@pytest.mark.parametrize("kind", ["rms", "rms, torch.mean"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_folds_too(dtype, kind):
    torch.manual_seed(0)
    rec = compiled_bitwise(Modulated("1 + s", kind).to(dtype).eval(), *_inputs(dtype))
    assert _scalar_adds(rec) == 0
    assert rec.summary["matched"]["adaln"] == {"rms_norm(diffusers)+(1+scale)+shift": 1}


class SharedFactor(torch.nn.Module):
    """Two norms modulated by one `1 + scale`; with `also_read`, something else reads it too."""

    def __init__(self, also_read: bool):
        super().__init__()
        self.emb = torch.nn.Linear(16, 2 * D)
        self.also_read = also_read

    def forward(self, x, y, t):
        shift, scale = self.emb(F.silu(t)).chunk(2, dim=1)
        factor = 1 + scale[:, None]
        a = F.layer_norm(x, (D,), eps=1e-6) * factor + shift[:, None]
        b = F.layer_norm(y, (D,), eps=1e-6) * factor + shift[:, None]
        return (a, b, factor * 3) if self.also_read else (a, b)


@pytest.mark.parametrize("also_read", [False, True])
def test_a_factor_shared_by_norms_folds_into_each(also_read):
    torch.manual_seed(0)
    x, t = _inputs(torch.bfloat16)
    y = torch.randn(2, 5, D).to(torch.bfloat16)
    rec = compiled_bitwise(SharedFactor(also_read).to(torch.bfloat16).eval(), x, y, t)
    assert rec.summary["matched"]["adaln"] == {"layer_norm+(1+scale)+shift": 2}
    assert _scalar_adds(rec) == (1 if also_read else 0)  # the add stays only for its other reader


def test_quantised_norm_folds_the_offset(monkeypatch):
    """config.quant: the norm that feeds quantised linears becomes lyra::adaln_quant, which keeps
    mul_offset: bit for bit what the same graph computes with the add left in place."""

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mod = Modulated("1 + s", "layer")
            self.q, self.k = torch.nn.Linear(D, 64), torch.nn.Linear(D, 64)

        def forward(self, x, t):
            h = self.mod(x, t)[0]
            return self.q(h), self.k(h)

    torch.manual_seed(0)
    model = Block().to(torch.bfloat16).eval()
    inputs = _inputs(torch.bfloat16)

    def compile_run():
        lyradynamo.reset_stats()
        torch._dynamo.reset()
        with torch.no_grad(), lyradynamo.config.patch(quant="fp8", quant_exclude=()):
            out = torch.compile(model, backend="lyra")(*inputs)
        (rec,) = lyradynamo.compiled_graphs()
        return out, rec

    folded, rec = compile_run()
    assert rec.summary["op_histogram"].get("lyra::adaln_quant") == 1 and _scalar_adds(rec) == 0
    monkeypatch.setattr(adaln_pass, "_fold_mul_offset", lambda *args: None)
    kept, rec = compile_run()
    assert _scalar_adds(rec) == 1
    for a, b in zip(folded, kept):
        assert torch.equal(a, b)
