"""Shared by the raw-kernel GPU tests (test_csrc_*.py): device, dtype codes, pointers, inputs.
Their fixtures (C, no_tf32, seed_from_test_id, no_fallback) live in conftest.py."""
import torch

from lyradynamo.ops._common import DTYPE_CODES as CODE  # noqa: F401  (dtype -> csrc code)
from lyradynamo.ops._common import ptr  # noqa: F401  (0 for None, else data_ptr)

DEV = "cuda"
IDS = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def stream() -> int:
    return torch.cuda.current_stream().cuda_stream


def randn(*shape, dtype, scale=1.0, shift=0.0):
    return (torch.randn(*shape, device=DEV, dtype=torch.float32) * scale + shift).to(dtype)


ACTS = {0: "none", 1: "gelu", 2: "gelu_tanh", 3: "silu"}  # csrc act codes


def epilogue_ref(y, gate, res, act, glu, n_out, rpb):
    """The csrc epilogue chain on y (M, N_y) with torch ops, in y's dtype (eager) or float64
    (reference): act / GLU, gate rows repeated per batch of `rpb` rows (or one row for all),
    residual."""
    from lyradynamo.ops.linear import activate

    if glu:
        h = y[:, :n_out] * activate(y[:, n_out:], ACTS[act])
    else:
        h = activate(y, ACTS[act])
    if gate is not None:
        h = h * (gate.repeat_interleave(rpb, dim=0)[: h.shape[0]] if gate.shape[0] > 1 else gate)
    if res is not None:
        h = res + h
    return h


# norm_modulate(_quant) cases: (B, L, D, affine, modulate, mul broadcast over batch)
NM_SMALL_CASES = [
    (1, 7, 40, True, False, False),
    (2, 5, 72, True, True, False),
    (3, 9, 37, True, True, False),  # odd D: scalar path
    (2, 33, 256, False, True, True),
    # rows of 129-256 16-byte vectors: two warps a row, up to 4 vectors a thread
    (2, 37, 1280, True, False, False),  # SDXL level 2 (16-bit: 160 vectors; fp32: 320, three warps)
    (3, 5, 1032, True, True, False),  # 129 vectors: one warp's worth plus one (fp32: 258)
    (1, 9, 2040, True, True, True),  # 255 vectors, the last thread one short (fp32: 510, four warps)
    (2, 6, 1024, False, True, False),  # 16-bit: 128 vectors, one full warp; fp32: 256, two full warps
]


def nm_inputs(B, L, D, affine, modulate, bcast, rms, dtype):
    """x (B, L, D) and the optional affine weight / bias and adaLN mul / add of one case."""
    x = randn(B, L, D, dtype=dtype, scale=1.5, shift=0.3)
    w = randn(D, dtype=dtype, shift=1.0) if affine else None
    b = randn(D, dtype=dtype) if (affine and not rms) else None
    nb = 1 if bcast else B
    mul = (1.0 + randn(nb, D, dtype=dtype, scale=0.2)).to(dtype) if modulate else None
    add = randn(nb, D, dtype=dtype, scale=0.5) if modulate else None
    return x, w, b, mul, add


def need_cutlass():
    """The library, or skip: the CUTLASS sm90 kernels (gemm_gated, gemm_glu) need a build with
    the CUTLASS headers and an SM90 GPU."""
    import pytest

    from lyradynamo.ops import _common

    C = _common.csrc()
    if C is None or not getattr(C, "gemm_gated_available", lambda: False)():
        pytest.skip("library built without CUTLASS headers")
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the CUTLASS sm90 kernels need an SM90 GPU")
    return C


def norm_err(a, b) -> float:
    """||a - b|| / ||b|| in float64."""
    return float((a.double() - b.double()).norm() / b.double().norm())


FUSED_PATHS = ("cutlass", "cutlass-streamk", "cutlass-pingpong", "cublaslt")  # gated_gemm's paths


# Above any dense 16-bit tensor-core rate of the cards we test on (H100 / H200: ~990 TFLOP/s).
PEAK_FLOP_PER_US = 1.2e9


def check_auto_decision(decided: dict, flops: float, paths=FUSED_PATHS, peak_per_us=PEAK_FLOP_PER_US) -> None:
    """gated_gemm auto chose one of its `paths` after timing every one of them, each time no
    shorter than the path's `flops` at the `peak_per_us` rate: a path whose launches missed the
    timing capture (gone to another stream) times too short and fails this."""
    assert decided["path"] in paths, decided
    floor = flops / peak_per_us
    assert all(decided[f"{p}_us"] >= floor for p in paths), (decided, f"floor {floor:.1f} us")


def w8a8_operands(m, n, k, dtype, bias, kind):
    """(xq, xs, wq, ws, b, r) for the W8A8 GEMMs: x (m, k) and w (n, k) in `dtype` quantised per
    row to `kind` ("fp8" / "int8"), a bias (n,) or None, a residual (m, n)."""
    from lyradynamo.quant import numerics

    x = torch.randn(m, k, device=DEV)
    w = torch.randn(n, k, device=DEV) / k ** 0.5
    xq, xs = numerics.quantize_rows(x.to(dtype), kind)
    wq, ws = numerics.quantize_rows(w.to(dtype), kind)
    b = torch.randn(n, device=DEV, dtype=dtype) if bias else None
    r = torch.randn(m, n, device=DEV, dtype=dtype)
    return xq, xs, wq, ws, b, r


def w8a8_reference(xq, xs, wq, ws, b, r):
    """xs[m] ws[n] (xq @ wq^T) + b (+ r) in float64 from the quantised operands; r None: none."""
    y = (xq.double() @ wq.double().t()) * xs.double()[:, None] * ws.double()[None, :]
    if b is not None:
        y = y + b.double()
    return y if r is None else y + r.double()


W8A8_PATHS = ("cutlass", "cutlass-pingpong", "cublaslt")  # the fp8-residual / int8 GEMMs' paths
W8A8_PEAK_PER_US = 2.4e9  # above the H100 / H200 dense fp8 and int8 rates (~1980 TFLOP/s, TOP/s)


def check_w8a8_decision(decided: dict, m: int, n: int, k: int) -> None:
    """check_auto_decision for the W8A8 GEMMs (gemm_fp8_res, gemm_int8_scaled): their paths and rate."""
    check_auto_decision(decided, 2.0 * m * n * k, W8A8_PATHS, W8A8_PEAK_PER_US)


def check_w8a8_refusals(C, entry: str, xq, xs, wq, ws, b, r, out, null: str) -> None:
    """A W8A8 entry point of the library (64 x 128 x 64 operands, fp16 out) refuses a bad variant,
    K not a multiple of 16, a non-16-bit output, a null `null` pointer and a misaligned scale, each
    with a ValueError naming the problem."""
    import pytest

    def call(**kw):
        a = dict(a=xq.data_ptr(), w=wq.data_ptr(), a_scale=xs.data_ptr(), b_scale=ws.data_ptr(), bias=b.data_ptr(),
                 residual=r.data_ptr(), out=out.data_ptr(), M=64, N=128, K=64, lda=64, ldb=64, dtype=1,
                 variant=0, stream=stream())
        a.update(kw)
        getattr(C, entry)(**a)

    with pytest.raises(ValueError, match="variant"):
        call(variant=1)
    with pytest.raises(ValueError, match="multiples of 16"):
        call(K=56, lda=56, ldb=56)
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        call(dtype=0)
    with pytest.raises(ValueError, match="non-null"):
        call(**{null: 0})
    with pytest.raises(ValueError, match="16-byte aligned"):
        call(a_scale=xs.data_ptr() + 4)


def capture_after_warmup(fn):
    """(graph, out): fn run once on a side stream (as the runner's warm-up call), then captured
    into a CUDA graph whose replays rewrite `out`."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out
