"""Inputs with size-1 dims that broadcast (a (B, 1, D) modulation, a (1, L, 1, D) RoPE table)
under lyra's shape policy. The policy traces sizes without 0/1 specialisation
(backed_size_oblivious), which assumes a symbolic size is not 1: before shape_policy's
`_broadcast_ones`, `x * s` with s of shape (B, 1, D) failed to trace ("the size of tensor a
(s27) must match the size of tensor b (s15)") on torch 2.11 and 2.13 alike. Now such dims are
traced as the constant 1; batch 1 stays a symbol (batch 1 then batch 2: one compilation)."""
import torch

import lyradynamo


class Modulate(torch.nn.Module):
    def forward(self, x, scale):  # x (B, L, D), scale (B, 1, D)
        return (x * (1 + scale) + 1,)


class SharedTable(torch.nn.Module):
    def forward(self, q, table):  # q (B, L, H, D), table (1, L, 1, D): one table for the batch
        return (q * table,)


def _compiled(model):
    torch._dynamo.reset()
    lyradynamo.reset_stats()
    return torch.compile(model, backend="lyra")


def test_size_one_modulation_input_broadcasts_with_one_compilation():
    compiled = _compiled(Modulate())
    with torch.no_grad():
        for b, length in [(2, 9), (3, 5), (1, 7), (2, 12)]:
            x, scale = torch.randn(b, length, 16), torch.randn(b, 1, 16)
            assert torch.equal(compiled(x, scale)[0], x * (1 + scale) + 1)
    assert lyradynamo.compile_count() == 1


def test_batch_one_first_still_serves_batch_two():
    compiled = _compiled(Modulate())
    with torch.no_grad():
        for b in (1, 2):
            x, scale = torch.randn(b, 9, 16), torch.randn(b, 1, 16)
            assert torch.equal(compiled(x, scale)[0], x * (1 + scale) + 1)
    assert lyradynamo.compile_count() == 1


def test_table_shared_by_the_batch():
    compiled = _compiled(SharedTable())
    with torch.no_grad():
        for b, length in [(2, 11), (3, 6)]:
            q, table = torch.randn(b, length, 2, 8), torch.randn(1, length, 1, 8)
            assert torch.equal(compiled(q, table)[0], q * table)
    assert lyradynamo.compile_count() == 1


def test_a_size_one_dim_that_grows_recompiles_and_stays_correct():
    """The dim was 1 at the first call, so it was traced as 1: a later size recompiles (torch's
    default behaviour for 0/1 sizes), with the right result."""
    compiled = _compiled(Modulate())
    with torch.no_grad():
        x = torch.randn(2, 9, 16)
        for scale in (torch.randn(2, 1, 16), torch.randn(2, 9, 16)):
            assert torch.equal(compiled(x, scale)[0], x * (1 + scale) + 1)
    assert lyradynamo.compile_count() == 2
