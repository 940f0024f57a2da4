"""canonicalize: no-ops between fused ops go, results unchanged. Here: a cat of adjacent slices
that cover a tensor (FLUX single blocks split text | image and the next block re-joins them)."""
import torch

import lyradynamo
from lyradynamo import zoo
from helpers import compiled_bitwise, rel_err


class SplitJoin(torch.nn.Module):
    """Each block splits its output at t and the next one concatenates the parts again."""

    def __init__(self, gap: bool = False):
        super().__init__()
        self.proj = torch.nn.Linear(16, 16)
        self.gap = gap

    def forward(self, text, image):
        for _ in range(3):
            t = text.shape[1]
            h = torch.cat([text, image], dim=1)
            h = h + self.proj(h)
            text, image = h[:, :t], h[:, t + (1 if self.gap else 0):]
        return text, image


def _cats_removed(model, *inputs) -> int:
    lyradynamo.reset_stats()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="lyra")
    with torch.no_grad():
        ref = model(*inputs)
        out = compiled(*inputs)
    for o, r in zip(out, ref):
        assert o.shape == r.shape and rel_err(o, r) < 1e-6
    return sum(g.report.canonicalized.get("cat(slices of x)", 0) for g in lyradynamo.compiled_graphs())


def test_cat_of_adjacent_slices_is_the_tensor():
    text, image = torch.randn(2, 5, 16), torch.randn(2, 9, 16)
    assert _cats_removed(SplitJoin(), text, image) == 2  # the first cat joins two inputs: it stays


def test_slices_with_a_gap_are_not_a_cat_of_the_whole():
    text, image = torch.randn(2, 5, 16), torch.randn(2, 9, 16)
    assert _cats_removed(SplitJoin(gap=True), text, image) == 0


def test_flux_single_blocks_do_not_rejoin_their_output():
    import diffusers

    from lyradynamo.zoo import configs

    torch.manual_seed(0)
    cfg = dict(configs.TINY_DENOISER_CONFIGS["flux"], num_single_layers=3)
    model = diffusers.FluxTransformer2DModel.from_config(cfg).eval()
    inputs = zoo.denoiser_inputs("flux", model, batch=1, height=32, width=32)
    lyradynamo.reset_stats()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="lyra")
    with torch.no_grad():
        ref = model(**inputs)[0]
        out = compiled(**inputs)[0]
    assert rel_err(out, ref) < 1e-5
    removed = sum(g.report.canonicalized.get("cat(slices of x)", 0) for g in lyradynamo.compiled_graphs())
    assert removed == 2  # every single block but the first re-joined the previous one's output


class TwoModulations(torch.nn.Module):
    """Two blocks, each with its own silu(t) -> linear (DiT adaLN), and a gelu read twice."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(16, 32), torch.nn.Linear(16, 32)

    def forward(self, t):
        g = torch.nn.functional.gelu(t, approximate="tanh") + torch.nn.functional.gelu(t)  # two different gelus
        return self.a(torch.nn.functional.silu(t)), self.b(torch.nn.functional.silu(t)), g


def test_an_activation_of_one_tensor_is_computed_once():
    rec = compiled_bitwise(TwoModulations(), torch.randn(2, 16))
    assert rec.report.canonicalized.get("activation computed once", 0) == 1  # the silu, not the gelus
    assert rec.summary["op_histogram"].get("lyra::linear_group") == 1  # a and b now read one input
