"""size_scalars: where a traced size meets a Python value while a lyra frame is traced.
`torch.as_tensor(size)` stays symbolic (Qwen-Image's text-length fallback: before, every new
prompt length recompiled), and an int argument formatted into a string is specialised instead
of breaking the graph (Z-Image's `self.all_x_embedder[f"{patch_size}-{f_patch_size}"]`)."""
import torch

import lyradynamo


def _fresh():
    torch._dynamo.reset()
    lyradynamo.reset_stats()


def test_a_size_made_a_tensor_serves_every_size_with_one_compilation():
    def f(x):
        n = torch.as_tensor(x.shape[1], device=x.device)
        half = torch.tensor(x.shape[0] * 0.5)
        return x.sum(1) * n * half, n, half

    _fresh()
    compiled = torch.compile(f, backend="lyra")
    for length in (5, 7, 12):
        x = torch.randn(2, length, 4)
        out, ref = compiled(x), f(x)
        for o, r in zip(out, ref):
            assert o.dtype == r.dtype and torch.equal(o, r)
    assert lyradynamo.compile_count() == 1


def test_an_as_tensor_with_other_arguments_is_traced_as_before():
    def f(x):
        return x * torch.as_tensor([x.shape[1], 2.0], dtype=torch.float32)  # a list: not one size

    _fresh()
    compiled = torch.compile(f, backend="lyra")
    x = torch.randn(3, 2)
    torch.testing.assert_close(compiled(x), f(x))


class Embedders(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.ModuleDict({"2-1": torch.nn.Linear(4, 4), "3-1": torch.nn.Linear(4, 4)})

    def forward(self, x, patch, frames):
        return self.embed[f"{patch}-{frames}"](x) * 2


def test_an_int_argument_in_an_f_string_is_specialised_not_a_graph_break():
    model = Embedders()
    _fresh()
    compiled = torch.compile(model, backend="lyra")
    with torch.no_grad():
        for n in (3, 6):  # a new size: the same graph
            x = torch.randn(n, 4)
            torch.testing.assert_close(compiled(x, 2, 1), model(x, 2, 1))
        assert lyradynamo.compile_count() == 1  # one graph: the embedder call is in it
        x = torch.randn(5, 4)
        torch.testing.assert_close(compiled(x, 3, 1), model(x, 3, 1))  # another key: recompiled
    assert lyradynamo.compile_count() == 2


def test_a_slice_of_sizes_compared_with_none_keeps_its_sizes():
    """QwenImage21's `cache_write_slice = slice(0, prefix_len)` then `if ... is not None`: Dynamo
    compared the slice by its bounds and pinned prefix_len (a recompile per prompt length)."""
    def f(x, n):
        s = slice(0, n)
        if s is not None and not (s is None):
            return x[:, s] * 2
        return x

    _fresh()
    compiled = torch.compile(f, backend="lyra")
    for n in (3, 4, 6):
        x = torch.randn(2, 8)
        assert torch.equal(compiled(x, n), f(x, n))
    assert lyradynamo.compile_count() == 1
