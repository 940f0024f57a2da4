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


def test_a_new_m_takes_the_nearest_timed_winner_within_4x(monkeypatch):
    """dispatch's reuse rule (the timing itself runs on the GPU): a shape that differs from a
    timed one only in M, by at most 4x, takes the nearest timed M's path without timing; a
    reused decision is no source; other N / K / dtype / kinds, or M 5x away, are timed."""
    monkeypatch.setattr(gated_gemm, "_choice", {})
    timed = []

    def decide(key, paths):
        timed.append(key)
        decided = {"path": "cutlass" if key[3] < 10000 else "cutlass-pingpong", "cutlass_us": 1.0}
        gated_gemm._choice[key] = decided
        return decided

    monkeypatch.setattr(gated_gemm, "_decide", decide)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)  # CPU build
    paths = {name: (lambda name=name: name) for name in ("cutlass", "cutlass-pingpong", "cublaslt")}

    def run(kind, m, n=1280, k=640, dtype=torch.float16):
        rest = (1, True) if kind == "gated" else (True,)
        return gated_gemm.dispatch("auto", (kind, 0, dtype, m, n, k, *rest), paths)

    assert run("glu", 8192) == "cutlass" and len(timed) == 1        # timed
    assert run("glu", 18432) == "cutlass" and len(timed) == 1       # 2.25x: 8192's winner
    assert run("glu", 40960) == "cutlass-pingpong" and len(timed) == 2  # 5x from the timed 8192
    # 20000: both timed Ms are within 4x (8192: 2.44x, 40960: 2.05x): the nearer one's winner
    assert run("glu", 20000) == "cutlass-pingpong" and len(timed) == 2
    assert gated_gemm._choice[("glu", 0, torch.float16, 20000, 1280, 640, True)] == \
        {"path": "cutlass-pingpong", "reused_from": 40960}
    # 5000: within 4x of 18432 (reused, no source: 3.7x) and of 8192 (1.6x): 8192's
    assert run("glu", 5000) == "cutlass" and len(timed) == 2
    for key in (("glu", 12800, 2560), ("gated", 8192, 1280)):         # another N, another kind: timed
        run(key[0], key[1], n=key[2])
    run("glu", 8192, dtype=torch.bfloat16)
    assert len(timed) == 5
    assert gated_gemm._choice[("glu", 0, torch.float16, 18432, 1280, 640, True)] == \
        {"path": "cutlass", "reused_from": 8192}


def test_a_reused_path_refused_at_the_new_m_is_timed_there(monkeypatch):
    monkeypatch.setattr(gated_gemm, "_choice", {("glu", 0, torch.float16, 8192, 1280, 640, True): {"path": "cutlass"}})
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    timed = []

    def decide(key, paths):
        timed.append(key)
        gated_gemm._choice[key] = {"path": "cublaslt", "cublaslt_us": 1.0}
        return gated_gemm._choice[key]

    def refused():
        raise RuntimeError("gemm_glu: M must be ...")

    monkeypatch.setattr(gated_gemm, "_decide", decide)
    key = ("glu", 0, torch.float16, 12800, 1280, 640, True)
    assert gated_gemm.dispatch("auto", key, {"cutlass": refused, "cublaslt": lambda: "split"}) == "split"
    assert timed == [key] and gated_gemm._choice[key] == {"path": "cublaslt", "cublaslt_us": 1.0}


def test_a_qkv_projection_at_a_new_image_size_takes_the_nearest_timed_winner(monkeypatch):
    """q / k / v projection keys carry the parts' lengths ("text+image"): compared by their total,
    with the same number of parts (FLUX 1024 -> 768: 512+4096 -> 512+2304, 1.6x)."""
    monkeypatch.setattr(gated_gemm, "_choice", {})
    timed = []

    def decide(key, paths):
        timed.append(key)
        gated_gemm._choice[key] = {"path": "cutlass", "cutlass_us": 1.0}
        return gated_gemm._choice[key]

    monkeypatch.setattr(gated_gemm, "_decide", decide)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    paths = {name: (lambda name=name: name) for name in ("cutlass", "cublaslt")}

    def run(lengths):
        return gated_gemm.dispatch("auto", ("qkv", 0, torch.bfloat16, lengths, 9216, (3072,), 1, True), paths)

    assert run("512+4096") == "cutlass" and len(timed) == 1
    assert run("512+2304") == "cutlass" and len(timed) == 1        # 1.6x: reused
    assert gated_gemm._choice[("qkv", 0, torch.bfloat16, "512+2304", 9216, (3072,), 1, True)] == \
        {"path": "cutlass", "reused_from": "512+4096"}
    run("4608")                                                     # one part: another problem, timed
    run("512+256+4096")                                             # three parts: timed
    run("77+300")                                                   # 12x fewer rows: timed
    assert len(timed) == 4
