"""csrc/group_norm_rows.cu (channels_last GroupNorm over whole rows) against float64 references,
by the project's rule (fp32 within 1e-5; fp16 / bf16 within 2x eager's error): odd sizes,
1 to 8-wide vectors, SiLU, pre-bias per sample and shared, in place, misaligned pointers, the
shapes it refuses, and the lyra::group_norm op taking it under config.group_norm_rows."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import lyradynamo  # noqa: E402
from kernel_helpers import CODE, DEV, IDS, ptr, randn, stream  # noqa: E402
from test_csrc_kernels import check, group_norm_refs  # noqa: E402

pytestmark = [pytest.mark.cuda, pytest.mark.usefixtures("seed_from_test_id")]

DTYPES = [torch.float16, torch.bfloat16, torch.float32]

ROWS_SHAPES = [  # (N, C, H, W, groups)
    (2, 24, 1, 7, 3),  # tiny, odd HW, cpg 8
    (3, 96, 7, 7, 32),  # cpg 3: 1-wide vectors
    (2, 320, 64, 64, 32),  # SD 64x64, cpg 10
    (2, 960, 16, 16, 32),  # SDXL up-block concat, cpg 30 (480 threads a row in 16-bit)
    (2, 1920, 8, 8, 32),  # cpg 60
    (1, 128, 128, 128, 32),  # VAE decoder at full width, cpg 4
    (1, 512, 33, 31, 32),  # VAE mid block, odd sides, cpg 16
    (3, 120, 5, 9, 12),  # 12 groups: the finalize's second block of 8 warps half used
    (2, 64, 4, 4, 1),  # one group of 64 channels: each lane writes two
]


def _ws(C, x, y, N, Ch, HW, G, dtype, w=None, b=None, pb=None, pb_stride=0):
    need = C.group_norm_rows_workspace(N, Ch, HW, G, CODE[dtype], ptr(x), ptr(y), ptr(w), ptr(b), ptr(pb),
                                       pb_stride)
    assert need > 0, (N, Ch, HW, G)
    return torch.full((need,), float("nan"), device=DEV, dtype=torch.float32), need


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS.get)
@pytest.mark.parametrize("silu", [False, True], ids=["plain", "silu"])
@pytest.mark.parametrize("shape", ROWS_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_group_norm_rows(C, shape, silu, dtype):
    N, Ch, H, W, G = shape
    x = randn(N, Ch, H, W, dtype=dtype, scale=2.0, shift=0.5).contiguous(memory_format=torch.channels_last)
    w, b = randn(Ch, dtype=dtype, shift=1.0), randn(Ch, dtype=dtype)
    y = torch.empty_like(x).fill_(float("nan"))
    ws, need = _ws(C, x, y, N, Ch, H * W, G, dtype, w, b)
    C.group_norm_rows(ptr(x), ptr(w), ptr(b), ptr(y), N, Ch, H * W, G, 1e-5, silu, CODE[dtype], stream(),
                      0, 0, ptr(ws), need)
    check(y, *group_norm_refs(x, G, w, b, 1e-5, silu), dtype, f"group_norm_rows {shape}")


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS.get)
@pytest.mark.parametrize("shared", [False, True], ids=["per-sample", "shared"])
def test_group_norm_rows_pre_bias(C, shared, dtype):
    N, Ch, H, W, G = 2, 640, 16, 24, 32
    x = randn(N, Ch, H, W, dtype=dtype, scale=2.0).contiguous(memory_format=torch.channels_last)
    w, b = randn(Ch, dtype=dtype, shift=1.0), randn(Ch, dtype=dtype)
    pb = randn(1 if shared else N, Ch, dtype=dtype, scale=3.0)
    pb_stride = 0 if shared else Ch
    y = torch.empty_like(x).fill_(float("nan"))
    ws, need = _ws(C, x, y, N, Ch, H * W, G, dtype, w, b, pb, pb_stride)
    C.group_norm_rows(ptr(x), ptr(w), ptr(b), ptr(y), N, Ch, H * W, G, 1e-5, True, CODE[dtype], stream(),
                      ptr(pb), pb_stride, ptr(ws), need)
    check(y, *group_norm_refs(x, G, w, b, 1e-5, True, pb.expand(N, Ch)), dtype, "group_norm_rows pre_bias")


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=IDS.get)
def test_group_norm_rows_in_place_no_affine(C, dtype):
    N, Ch, H, W, G = 2, 256, 20, 20, 32
    x = randn(N, Ch, H, W, dtype=dtype, scale=3.0, shift=-1.0).contiguous(memory_format=torch.channels_last)
    ref, eager = group_norm_refs(x, G, None, None, 1e-6, False)
    ws, need = _ws(C, x, x, N, Ch, H * W, G, dtype)
    C.group_norm_rows(ptr(x), 0, 0, ptr(x), N, Ch, H * W, G, 1e-6, False, CODE[dtype], stream(), 0, 0, ptr(ws),
                      need)
    check(x, ref, eager, dtype, "group_norm_rows in place")


def test_group_norm_rows_misaligned_falls_to_scalar_vectors(C):
    N, Ch, H, W, G = 2, 320, 8, 8, 32
    buf = randn(N * Ch * H * W + 1, dtype=torch.float16)
    x = buf[1:].view(N, H, W, Ch).permute(0, 3, 1, 2)  # channels_last, 2-byte aligned only
    assert x.is_contiguous(memory_format=torch.channels_last) and ptr(x) % 4
    w, b = randn(Ch, dtype=torch.float16, shift=1.0), randn(Ch, dtype=torch.float16)
    y = torch.empty_like(x, memory_format=torch.channels_last).fill_(float("nan"))
    ws, need = _ws(C, x, y, N, Ch, H * W, G, torch.float16, w, b)
    C.group_norm_rows(ptr(x), ptr(w), ptr(b), ptr(y), N, Ch, H * W, G, 1e-5, False, 1, stream(), 0, 0, ptr(ws),
                      need)
    check(y, *group_norm_refs(x, G, w, b, 1e-5, False), torch.float16, "group_norm_rows misaligned")


def test_group_norm_rows_refuses_with_clear_errors(C):
    x = torch.zeros(4096 * 16, device=DEV, dtype=torch.float16)
    # 1 channel per group, 4096 channels: a row needs 4096 threads -> not this path
    assert C.group_norm_rows_workspace(1, 4096, 16, 4096, 1, ptr(x), ptr(x), 0, 0) == 0
    with pytest.raises(ValueError, match="not supported by the rows path"):
        C.group_norm_rows(ptr(x), 0, 0, ptr(x), 1, 4096, 16, 4096, 1e-5, False, 1, stream(), 0, 0, ptr(x), 10**6)
    y = torch.zeros(2 * 320 * 64, device=DEV, dtype=torch.float16)
    need = C.group_norm_rows_workspace(2, 320, 64, 32, 1, ptr(y), ptr(y), 0, 0)
    ws = torch.zeros(need, device=DEV)
    with pytest.raises(ValueError, match="workspace"):
        C.group_norm_rows(ptr(y), 0, 0, ptr(y), 2, 320, 64, 32, 1e-5, False, 1, stream(), 0, 0, ptr(ws), need - 1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=IDS.get)
def test_op_takes_rows_path_under_config(C, dtype, monkeypatch, no_fallback):
    """lyra::group_norm with config.group_norm_rows: narrow channels_last groups go through
    group_norm_rows (counted), wide ones (>= 128 bytes) and NCHW through group_norm.cu."""
    from lyradynamo.ops import group_norm as gn_op

    calls = []
    real = C.group_norm_rows
    monkeypatch.setattr(C, "group_norm_rows", lambda *a, **k: (calls.append(a[4:8]), real(*a, **k))[1])
    with lyradynamo.config.patch(group_norm_rows=True):
        for Ch, cl in ((320, True), (128, True), (320, False), (2560, True)):
            x = randn(2, Ch, 12, 12, dtype=dtype, scale=2.0)
            x = x.contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
            w, b = randn(Ch, dtype=dtype, shift=1.0), randn(Ch, dtype=dtype)
            out = torch.ops.lyra.group_norm(x, 32, w, b, 1e-5, "silu", cl)
            ref = gn_op.group_norm_reference(x, 32, w, b, 1e-5, "silu", cl)
            torch.testing.assert_close(out, ref, rtol=2e-2 if dtype != torch.float32 else 1e-5,
                                       atol=2e-2 if dtype != torch.float32 else 1e-5)
    assert [(c[0], c[1]) for c in calls] == [(2, 320), (2, 128)]  # C 2560: 80 channels a group, >= 128 bytes
    calls.clear()
    with lyradynamo.config.patch(group_norm_rows="auto"):
        shapes = ((2, 320, 12, 12), (2, 640, 12, 12), (1, 128, 8, 8), (1, 64, 8, 8))
        for shape in shapes:
            x = randn(*shape, dtype=dtype).contiguous(memory_format=torch.channels_last)
            w, b = randn(shape[1], dtype=dtype, shift=1.0), randn(shape[1], dtype=dtype)
            torch.ops.lyra.group_norm(x, 32, w, b, 1e-5, "silu", True)
    es = torch.empty((), dtype=dtype).element_size()
    want = [s[:2] for s in shapes if gn_op.prefer_rows("auto", s[0], s[1], s[2] * s[3], 32, es)]
    assert want and [(c[0], c[1]) for c in calls] == want
