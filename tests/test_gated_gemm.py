"""The rule that decides which gated residual linears the fused CUTLASS GEMM can take
(ops/gated_gemm.py; the kernel itself is tested on the GPU in tests/cuda/test_gated_gemm_cuda.py):
the gate must be one row per sample (or one row for all), read with a batch stride the kernel's
16-byte loads allow, and each sample must be a block of rows of x."""
import pytest
import torch

from lyradynamo.ops import gated_gemm


@pytest.mark.parametrize("x_shape,gate_shape,expected", [
    ((1, 4608, 3072), (1, 1, 3072), (0, 1)),        # FLUX, batch 1: one gate row for all rows
    ((2, 1024, 1152), (2, 1, 1152), (1152, 2)),     # per-sample gate: two problems of 1024 rows
    ((2, 1024, 1152), (1152,), (0, 1)),             # a shared gate
    ((2, 1024, 1152), (2, 1152), None),             # (B, N) against a 3-D x: not broadcastable per sample
    ((2048, 1152), (2048, 1152), None),             # a gate per row is no epilogue vector
    ((2, 4, 1152), (2, 1, 1152), None),             # samples of fewer than 8 rows
    ((2, 1024, 1100), (2, 1, 1100), None),          # batch stride 1100: not a multiple of 8
])
def test_batching(x_shape, gate_shape, expected):
    x, gate = torch.empty(x_shape), torch.empty(gate_shape)
    m, n = x.numel() // x.shape[-1], gate.shape[-1]
    got = gated_gemm._batching(x, gate, m, n)
    assert got == ((None, 0) if expected is None else expected)


def test_column_slice_row_stride():
    w = torch.empty(512, 576)
    assert gated_gemm._ldb(w[:, 320:], 256) == 576 and gated_gemm._ldb(w, 576) == 576
    assert gated_gemm._ldb(torch.empty(1, 64), 64) == 64  # one row: its stride says nothing



def test_describe_names_the_kind_and_shape():
    """bench rows name each choices() key as text."""
    assert gated_gemm.describe(("gated", 0, torch.float16, 4096, 3072, 3072, 1, True)) == \
        "gated M4096 N3072 K3072 batches 1 bias True"
    assert gated_gemm.describe(("glu", 0, torch.bfloat16, 8192, 2560, 640, False)) == "glu M8192 N2560 K640 bias False"
