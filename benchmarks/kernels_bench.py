"""Times each lyradynamo._C kernel against its eager PyTorch equivalent.

CUDA-event timing, median over --iters runs after --warmup runs. By default
each measurement replays a CUDA graph of --graph-reps calls (GPU time, no
Python launch overhead); --graph-reps 0 times eager calls instead. Prints a
table and writes JSON to --out.

    python benchmarks/kernels_bench.py --out benchmarks/results/kernels.json
    python benchmarks/kernels_bench.py --dtype bf16 --quant --out /tmp/kernels_quant.json
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
import os
import platform
import statistics
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import lyradynamo  # noqa: E402,F401  (registers the lyra:: ops)
from lyradynamo import _C  # noqa: E402

CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def time_us(fn, warmup: int, iters: int, graph_reps: int) -> float:
    """Median GPU time of one fn() call in microseconds.

    With graph_reps > 0, graph_reps calls are captured in one CUDA graph and
    each timed replay is divided by graph_reps: this measures GPU time without
    the Python/launch overhead (which dominates kernels of a few microseconds,
    and which a CUDA-graph deployment does not pay). graph_reps = 0 times
    plain eager calls, launch overhead included.
    """
    return median_us(*replayable(fn, warmup, graph_reps), iters)


def replayable(fn, warmup: int, graph_reps: int):
    """(run, calls per run): fn warmed up on a side stream, then graph_reps calls of it
    captured as one CUDA graph (run = its replay), or fn itself when graph_reps is 0."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    run, per = fn, 1
    if graph_reps > 0:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(graph_reps):
                fn()
        run, per = g.replay, graph_reps
        run()
    torch.cuda.synchronize()
    return run, per


def median_us(run, per: int, iters: int) -> float:
    """Median GPU time of run() over iters runs, divided by per, in microseconds."""
    times = []
    for _ in range(iters):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000.0 / per)
    return statistics.median(times)


def s() -> int:
    return torch.cuda.current_stream().cuda_stream


def cases(dt):
    """Yields (name, shape string, ours, torch_eager, bytes moved by ours)."""
    code, es = CODE[dt], torch.empty((), dtype=dt).element_size()
    dev = "cuda"

    def rn(*shape):
        return torch.randn(*shape, device=dev, dtype=dt)

    # group_norm (+SiLU), SD UNet shapes
    for n, c, hw in [(2, 320, 4096), (2, 640, 1024), (2, 1280, 256), (2, 320, 16384)]:
        h = int(math.isqrt(hw))
        for cl in (False, True):
            fmt = torch.channels_last if cl else torch.contiguous_format
            x = rn(n, c, h, h).contiguous(memory_format=fmt)
            w, b = rn(c), rn(c)
            y = torch.empty_like(x)
            yield (f"group_norm+silu {'nhwc' if cl else 'nchw'}", f"N{n} C{c} HW{hw} G32",
                   lambda x=x, w=w, b=b, y=y, n=n, c=c, hw=hw, cl=cl: _C.group_norm(
                       x.data_ptr(), w.data_ptr(), b.data_ptr(), y.data_ptr(), n, c, hw, 32,
                       1e-5, True, cl, code, s()),
                   lambda x=x, w=w, b=b: F.silu(F.group_norm(x, 32, w, b, 1e-5)),
                   2 * x.numel() * es)

    # norm_modulate: FLUX / SD3 adaLN  LayerNorm(x) * (1 + scale) + shift
    for B, L, D, rms in [(1, 4608, 3072, False), (2, 4096, 1536, False), (1, 4608, 3072, True)]:
        x, sc, sh = rn(B, L, D), rn(B, D), rn(B, D)
        mul = (1 + sc).contiguous()
        y = torch.empty_like(x)

        def eager(x=x, sc=sc, sh=sh, rms=rms, D=D):
            if rms:
                n = (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)).to(dt)
            else:
                n = F.layer_norm(x, (D,), eps=1e-6)
            return n * (1 + sc[:, None]) + sh[:, None]

        yield ("norm_modulate" + (" rms" if rms else ""), f"B{B} L{L} D{D}",
               lambda x=x, mul=mul, sh=sh, y=y, B=B, L=L, D=D, rms=rms: _C.norm_modulate(
                   x.data_ptr(), 0, 0, mul.data_ptr(), sh.data_ptr(), y.data_ptr(), B * L, D, L,
                   D, D, 1e-6, rms, code, s()),
               eager, 2 * x.numel() * es)

    # gemm (+bias), FLUX / SD linear shapes
    for M, N, K in [(4096, 3072, 3072), (4608, 12288, 3072), (8192, 1280, 5120), (77, 1280, 768)]:
        a, w, bias = rn(M, K), rn(N, K), rn(N)
        out = torch.empty(M, N, device=dev, dtype=dt)
        yield ("gemm+bias", f"M{M} N{N} K{K}",
               lambda a=a, w=w, bias=bias, out=out, M=M, N=N, K=K: _C.gemm(
                   a.data_ptr(), w.data_ptr(), bias.data_ptr(), out.data_ptr(), M, N, K, K, N,
                   code, s()),
               lambda a=a, w=w, bias=bias: F.linear(a, w, bias),
               (M * K + N * K + M * N) * es)

    # linear_epilogue: GEGLU (SD) and gated residual (FLUX)
    M, n_out = 2 * 4096, 5120
    y2, out = rn(M, 2 * n_out), torch.empty(M, n_out, device=dev, dtype=dt)

    def geglu(y2=y2, n=n_out):
        hid, gate = y2.chunk(2, dim=-1)
        return hid * F.gelu(gate)

    yield ("epilogue geglu", f"M{M} N{n_out}",
           lambda: _C.linear_epilogue(y2.data_ptr(), 0, 0, out.data_ptr(), M, n_out, 1, True, M,
                                      0, code, s()),
           geglu, 3 * M * n_out * es)
    M, n_out = 4608, 3072
    yv, gate, res = rn(M, n_out), rn(1, n_out), rn(M, n_out)
    out2 = torch.empty_like(res)
    yield ("epilogue gate+residual", f"M{M} N{n_out}",
           lambda: _C.linear_epilogue(yv.data_ptr(), gate.data_ptr(), res.data_ptr(),
                                      out2.data_ptr(), M, n_out, 0, False, M, 0, code, s()),
           lambda: res + gate * yv, 3 * M * n_out * es)

    # qk_norm_rope: FLUX q from fused QKV (B, L, 3*H*D)
    B, L, H, D = 1, 4608, 24, 128
    qkv = rn(B, L, 3 * H * D)
    q = qkv[..., : H * D].view(B, L, H, D)
    w = rn(D)
    ang = torch.randn(L, D // 2, device=dev).repeat_interleave(2, dim=-1)
    cos, sin = ang.cos().contiguous(), ang.sin().contiguous()
    yq = torch.empty(B, L, H, D, device=dev, dtype=dt)

    def qk_eager():
        n = (q.float() * torch.rsqrt(q.float().pow(2).mean(-1, keepdim=True) + 1e-6)).to(dt) * w
        t = n.transpose(1, 2)  # (B, H, L, D) as diffusers does
        re, im = t.reshape(*t.shape[:-1], -1, 2).unbind(-1)
        rot = torch.stack([-im, re], dim=-1).flatten(3)
        return (t.float() * cos + rot.float() * sin).to(dt)

    yield ("qk_norm_rope", f"B{B} L{L} H{H} D{D}",
           lambda: _C.qk_norm_rope(q.data_ptr(), w.data_ptr(), cos.data_ptr(), sin.data_ptr(),
                                   yq.data_ptr(), B, L, H, D, q.stride(0), q.stride(1),
                                   q.stride(2), yq.stride(0), yq.stride(1), yq.stride(2), 1e-6,
                                   True, 0, L, code, 0, s()),
           qk_eager, 2 * B * L * H * D * es)


def quant_cases(dt):
    """W8A8 rows at FLUX shapes (M = 4608 tokens): yields like cases().

    gemm_fp8: ours is cuBLASLt with OUTER_VEC row scales and fast accumulation (or, where the
    library reports it unavailable, the fp32-accumulator GEMM + scaled_epilogue), torch is
    torch._scaled_mm row-wise with fast accumulation (a CUTLASS sm90 kernel inside torch); the
    dense GEMM of the same shape (ours vs F.linear) gives the fp16/bf16 baseline;
    gemm_int8 + scaled_epilogue vs torch._int_mm + eager scaling; quantize_rows vs the eager
    quantisation of lyradynamo.quant.numerics.
    """
    from lyradynamo.quant import numerics as qn

    code, es = CODE[dt], torch.empty((), dtype=dt).element_size()
    dev = "cuda"
    outer = _C.gemm_fp8_supported_outer_vec(torch.cuda.current_device(), code)
    fp8_name = "gemm_fp8 outer_vec" if outer else "gemm_fp8 unscaled+epi"
    for M, K, N in [(4608, 3072, 3072), (4608, 3072, 9216), (4608, 3072, 12288),
                    (4608, 12288, 3072)]:
        shape = f"M{M} N{N} K{K}"
        x = torch.randn(M, K, device=dev, dtype=dt)
        w = (torch.randn(N, K, device=dev) / math.sqrt(K)).to(dt)
        out = torch.empty(M, N, device=dev, dtype=dt)
        acc = torch.empty(M, N, device=dev, dtype=torch.float32)
        acc_i = torch.empty(M, N, device=dev, dtype=torch.int32)
        xq, xs = qn.quantize_rows(x, "fp8")
        wq, ws = qn.quantize_rows(w, "fp8")
        xq8, xs8 = qn.quantize_rows(x, "int8")
        wq8, ws8 = qn.quantize_rows(w, "int8")
        q_bytes = M * K + N * K + M * N * es

        if outer:
            def ours(xq=xq, wq=wq, xs=xs, ws=ws, out=out, M=M, N=N, K=K):
                # as lyra::qlinear runs it: config.quant_fast_accum is on by default
                _C.gemm_fp8_ex(xq.data_ptr(), wq.data_ptr(), xs.data_ptr(), ws.data_ptr(), 0, 0,
                               out.data_ptr(), M, N, K, K, N, code, True, s())
        else:
            def ours(xq=xq, wq=wq, xs=xs, ws=ws, out=out, acc=acc, M=M, N=N, K=K):
                _C.gemm_fp8_unscaled(xq.data_ptr(), wq.data_ptr(), acc.data_ptr(), M, N, K, K, s())
                _C.scaled_epilogue(acc.data_ptr(), 0, xs.data_ptr(), ws.data_ptr(), 0, 0, 0,
                                   out.data_ptr(), M, N, 0, False, M, 0, code, s())

        def scaled_mm(xq=xq, wq=wq, xs=xs, ws=ws):
            return torch._scaled_mm(xq, wq.t(), scale_a=xs[:, None], scale_b=ws[None, :],
                                    out_dtype=dt, use_fast_accum=True)

        try:
            scaled_mm()
        except Exception as exc:  # e.g. no row-wise support for this dtype in this torch
            print(f"kernels_bench: torch._scaled_mm row-wise unavailable ({exc}); "
                  f"comparing {fp8_name} with torch's dense GEMM", file=sys.stderr)
            scaled_mm = (lambda x=x, w=w: F.linear(x, w))
        yield (fp8_name, shape, ours, scaled_mm, q_bytes)
        yield ("gemm dense (baseline)", shape,
               lambda x=x, w=w, out=out, M=M, N=N, K=K: _C.gemm(
                   x.data_ptr(), w.data_ptr(), 0, out.data_ptr(), M, N, K, K, N, code, s()),
               lambda x=x, w=w: F.linear(x, w), (M * K + N * K + M * N) * es)

        def ours_i8(xq8=xq8, wq8=wq8, xs8=xs8, ws8=ws8, acc_i=acc_i, out=out, M=M, N=N, K=K):
            _C.gemm_int8(xq8.data_ptr(), wq8.data_ptr(), acc_i.data_ptr(), M, N, K, K, s())
            _C.scaled_epilogue(acc_i.data_ptr(), 3, xs8.data_ptr(), ws8.data_ptr(), 0, 0, 0,
                               out.data_ptr(), M, N, 0, False, M, 0, code, s())

        yield ("gemm_int8+scaled_epi", shape, ours_i8,
               lambda xq8=xq8, wq8=wq8, xs8=xs8, ws8=ws8: (
                   torch._int_mm(xq8, wq8.t()).float() * xs8[:, None] * ws8[None, :]).to(dt),
               q_bytes)

    for M, K in [(4608, 3072), (4608, 12288)]:
        x = torch.randn(M, K, device=dev, dtype=dt)
        q = torch.empty(M, K, device=dev, dtype=torch.uint8)
        sc = torch.empty(M, device=dev, dtype=torch.float32)
        yield ("quantize_rows fp8", f"M{M} K{K}",
               lambda x=x, q=q, sc=sc, M=M, K=K: _C.quantize_rows(
                   x.data_ptr(), 0, q.data_ptr(), sc.data_ptr(), M, K, K, code, 0, s()),
               lambda x=x: _eager_quant_fp8(x), M * K * (es + 1))


def sdxl_fp8_gemm_cases(dt):
    """SDXL 1024's fp8 linears (batch 2; level 2: 2048 tokens x 1280, level 1: 8192 x 640) as
    lyra::qlinear runs them (cuBLASLt, per-row x per-column scales, fast accumulation, bias, and
    the residual through C where the model adds one), against torch._scaled_mm row-wise (fast
    accumulation, bias, no residual). TFLOP/s in the GB/s column's place: 2 M N K / time."""
    from lyradynamo.quant import numerics as qn

    code = CODE[dt]
    for name, M, N, K, bias, res in [
            ("lvl2 qkv", 2048, 3840, 1280, False, False), ("lvl2 to_out", 2048, 1280, 1280, True, True),
            ("lvl2 attn2 q", 2048, 1280, 1280, False, False), ("lvl2 ff1", 2048, 10240, 1280, True, False),
            ("lvl2 ff2", 2048, 1280, 5120, True, True), ("lvl2 proj", 2048, 1280, 1280, True, False),
            ("attn2 kv (text)", 154, 2560, 2048, False, False),
            ("lvl1 qkv", 8192, 1920, 640, False, False), ("lvl1 to_out", 8192, 640, 640, True, True),
            ("lvl1 ff1", 8192, 5120, 640, True, False), ("lvl1 ff2", 8192, 640, 2560, True, True)]:
        x = torch.randn(M, K, device="cuda", dtype=dt)
        w = (torch.randn(N, K, device="cuda") / math.sqrt(K)).to(dt)
        b = torch.randn(N, device="cuda", dtype=dt) if bias else None
        r = torch.randn(M, N, device="cuda", dtype=dt) if res else None
        out = torch.empty(M, N, device="cuda", dtype=dt)
        xq, xs = qn.quantize_rows(x, "fp8")
        wq, ws = qn.quantize_rows(w, "fp8")

        def ours(xq=xq, wq=wq, xs=xs, ws=ws, b=b, r=r, out=out, M=M, N=N, K=K):
            _C.gemm_fp8_ex(xq.data_ptr(), wq.data_ptr(), xs.data_ptr(), ws.data_ptr(),
                           0 if b is None else b.data_ptr(), 0 if r is None else r.data_ptr(),
                           out.data_ptr(), M, N, K, K, N, code, True, s())

        def scaled_mm(xq=xq, wq=wq, xs=xs, ws=ws, b=b):
            return torch._scaled_mm(xq, wq.t(), scale_a=xs[:, None], scale_b=ws[None, :], bias=b,
                                    out_dtype=dt, use_fast_accum=True)

        label = f"fp8 gemm {name}" + (" +bias" if bias else "") + (" +res" if res else "")
        yield (label, f"M{M} N{N} K{K}", ours, scaled_mm, 2 * M * N * K / 1e3)
        if res and getattr(_C, "gemm_fp8_res", None) is not None and _C.gemm_gated_available():
            # the residual in CUTLASS's TMA epilogue (csrc/gemm_fp8_res.cu) against cuBLASLt's C
            for variant, vname in ((0, "cutlass coop"), (2, "cutlass pingpong")):
                def cutlass(xq=xq, wq=wq, xs=xs, ws=ws, b=b, r=r, out=out, M=M, N=N, K=K, variant=variant):
                    _C.gemm_fp8_res(xq.data_ptr(), wq.data_ptr(), xs.data_ptr(), ws.data_ptr(),
                                    0 if b is None else b.data_ptr(), r.data_ptr(), out.data_ptr(), M, N, K,
                                    K, K, code, variant, s())
                yield (f"{label} {vname} vs cublaslt", f"M{M} N{N} K{K}", cutlass, ours, 2 * M * N * K / 1e3)


# (model, M tokens, K, widths of the projections that read one activation)
_SHARED_INPUT_PROJECTIONS = [
    ("flux double img qkv", 4096, 3072, [3072] * 3),
    ("flux double txt qkv", 512, 3072, [3072] * 3),
    ("flux single qkv+mlp", 4608, 3072, [3072] * 3 + [12288]),
    ("sdxl 1024 qkv lvl1", 8192, 640, [640] * 3),
    ("sdxl 1024 qkv lvl2", 2048, 1280, [1280] * 3),
    ("sd15 512 qkv lvl0", 8192, 320, [320] * 3),
]


def fusion_cases(dt, quant: bool):
    """One GEMM over the concatenated weights of projections sharing an input (ours) against
    one GEMM per projection (the "torch" column): what a fused QKV GEMM saves, per shape."""
    from lyradynamo.quant import numerics as qn

    code, es = CODE[dt], torch.empty((), dtype=dt).element_size()
    for name, M, K, widths in _SHARED_INPUT_PROJECTIONS:
        N = sum(widths)
        x = torch.randn(M, K, device="cuda", dtype=dt)
        w = (torch.randn(N, K, device="cuda") / math.sqrt(K)).to(dt)
        out = torch.empty(M, N, device="cuda", dtype=dt)
        offs = [sum(widths[:i]) for i in range(len(widths))]
        shape = f"M{M} K{K} N{'+'.join(map(str, widths))}"
        nbytes = (M * K + N * K + M * N) * es

        def fused(x=x, w=w, out=out, M=M, N=N, K=K):
            _C.gemm(x.data_ptr(), w.data_ptr(), 0, out.data_ptr(), M, N, K, K, N, code, s())

        def split(x=x, w=w, out=out, M=M, N=N, K=K, offs=offs, widths=widths):
            for o, n in zip(offs, widths):
                _C.gemm(x.data_ptr(), w[o:].data_ptr(), 0, out[:, o:].data_ptr(), M, n, K, K, N, code, s())

        yield (f"fused {name}", shape, fused, split, nbytes)
        if not quant:
            continue
        xq, xs = qn.quantize_rows(x, "fp8")
        wq, ws = qn.quantize_rows(w, "fp8")

        def fused8(xq=xq, xs=xs, wq=wq, ws=ws, out=out, M=M, N=N, K=K):
            _C.gemm_fp8_ex(xq.data_ptr(), wq.data_ptr(), xs.data_ptr(), ws.data_ptr(), 0, 0,
                           out.data_ptr(), M, N, K, K, N, code, True, s())

        def split8(xq=xq, xs=xs, wq=wq, ws=ws, out=out, M=M, N=N, K=K, offs=offs, widths=widths):
            for o, n in zip(offs, widths):
                _C.gemm_fp8_ex(xq.data_ptr(), wq[o:].data_ptr(), xs.data_ptr(), ws[o:].data_ptr(), 0, 0,
                               out[:, o:].data_ptr(), M, n, K, K, N, code, True, s())

        yield (f"fused fp8 {name}", shape, fused8, split8, nbytes)


_GATED_LINEARS = [  # FLUX 1024x1024, batch 1: the gated residual linears of its blocks
    ("flux single proj_out", 1, 4608, 3072, 15360),
    ("flux single proj_out attn part", 1, 4608, 3072, 3072),  # split_cat's two parts
    ("flux single proj_out mlp part", 1, 4608, 3072, 12288),
    ("flux double img attn out", 1, 4096, 3072, 3072),
    ("flux double img ff out", 1, 4096, 3072, 12288),
    ("flux double txt attn out", 1, 512, 3072, 3072),
    ("flux double txt ff out", 1, 512, 3072, 12288),
    ("batch 2 per-sample gate", 2, 1024, 1152, 4608),
]


def gated_cases(dt):
    """residual + gate * (x W^T + b): one CUTLASS GEMM with the gate and residual in its
    epilogue (ours, csrc/gemm_gated.cu) against the cuBLASLt GEMM + bias and then the
    epilogue kernel (the "torch" column: what lyra::linear ran before)."""
    if not _C.gemm_gated_available():
        print("kernels_bench: library built without CUTLASS: no gated cases", file=sys.stderr)
        return
    code, es = CODE[dt], torch.empty((), dtype=dt).element_size()
    for name, B, T, N, K in _GATED_LINEARS:
        M = B * T
        x = torch.randn(M, K, device="cuda", dtype=dt)
        w = (torch.randn(N, K, device="cuda") / math.sqrt(K)).to(dt)
        b = torch.randn(N, device="cuda", dtype=dt)
        g = torch.randn(B, N, device="cuda", dtype=dt)
        r = torch.randn(M, N, device="cuda", dtype=dt)
        out, y = torch.empty(M, N, device="cuda", dtype=dt), torch.empty(M, N, device="cuda", dtype=dt)
        gstride = N if B > 1 else 0

        def fused(x=x, w=w, b=b, g=g, r=r, out=out, T=T, B=B, N=N, K=K, gstride=gstride, variant=0):
            _C.gemm_gated(x.data_ptr(), w.data_ptr(), b.data_ptr(), g.data_ptr(), r.data_ptr(),
                          out.data_ptr(), T if gstride else T * B, B if gstride else 1, N, K, K, K, gstride,
                          code, variant, s())

        def split(x=x, w=w, b=b, g=g, r=r, out=out, y=y, M=M, T=T, N=N, K=K, gstride=gstride):
            _C.gemm(x.data_ptr(), w.data_ptr(), b.data_ptr(), y.data_ptr(), M, N, K, K, N, code, s())
            _C.linear_epilogue(y.data_ptr(), g.data_ptr(), r.data_ptr(), out.data_ptr(), M, N, 0, False,
                               T if gstride else M, gstride, code, s())

        nbytes = (M * K + N * K + 2 * M * N) * es
        yield (f"gated {name}", f"M{M} N{N} K{K}", fused, split, nbytes)
        yield (f"gated stream-K {name}", f"M{M} N{N} K{K}", functools.partial(fused, variant=1), split, nbytes)
        yield (f"gated ping-pong {name}", f"M{M} N{N} K{K}", functools.partial(fused, variant=2), split, nbytes)


_GLU_LINEARS = [  # GEGLU linears at batch 2 (M, N of each half, K)
    ("sdxl 1024 level 1 geglu", 8192, 2560, 640),
    ("sdxl 1024 level 2 geglu", 2048, 5120, 1280),
    ("sd15 512 level 0 geglu", 8192, 1280, 320),
    ("sd15 512 level 2 geglu", 512, 5120, 1280),
]


def glu_cases(dt):
    """a * gelu(g), [a, g] = x W^T + b: cuBLASLt for a and the CUTLASS GEMM with the product in
    its epilogue for g (ours, csrc/gemm_glu.cu) against one (M, 2N) GEMM + bias and the GEGLU
    epilogue kernel (the "torch" column: what lyra::linear ran before)."""
    if not _C.gemm_gated_available():
        print("kernels_bench: library built without CUTLASS: no GLU cases", file=sys.stderr)
        return
    code, es = CODE[dt], torch.empty((), dtype=dt).element_size()
    for name, M, N, K in _GLU_LINEARS:
        x = torch.randn(M, K, device="cuda", dtype=dt)
        w = (torch.randn(2 * N, K, device="cuda") / math.sqrt(K)).to(dt)
        b = torch.randn(2 * N, device="cuda", dtype=dt)
        out, y = torch.empty(M, N, device="cuda", dtype=dt), torch.empty(M, 2 * N, device="cuda", dtype=dt)

        def fused(x=x, w=w, b=b, out=out, M=M, N=N, K=K, variant=0):
            _C.gemm(x.data_ptr(), w.data_ptr(), b.data_ptr(), out.data_ptr(), M, N, K, K, N, code, s())
            _C.gemm_glu(x.data_ptr(), w[N:].data_ptr(), b[N:].data_ptr(), out.data_ptr(), out.data_ptr(), M, N,
                        K, K, K, 1, code, variant, s())

        def split(x=x, w=w, b=b, out=out, y=y, M=M, N=N, K=K):
            _C.gemm(x.data_ptr(), w.data_ptr(), b.data_ptr(), y.data_ptr(), M, 2 * N, K, K, 2 * N, code, s())
            _C.linear_epilogue(y.data_ptr(), 0, 0, out.data_ptr(), M, N, 1, True, M, 0, code, s())

        nbytes = (M * K + 2 * N * K + M * N) * es
        yield (f"glu {name}", f"M{M} N{N} K{K}", fused, split, nbytes)
        yield (f"glu stream-K {name}", f"M{M} N{N} K{K}", functools.partial(fused, variant=1), split, nbytes)
        yield (f"glu ping-pong {name}", f"M{M} N{N} K{K}", functools.partial(fused, variant=2), split, nbytes)


_QKV_ATTENTIONS = [  # FLUX.1 at 1024 x 1024: (name, token counts of the parts, heads, K)
    ("flux double block (text + image)", (512, 4096), 24, 3072),
    ("flux single block", (4608,), 24, 3072),
]


def qkv_cases(dt):
    """q / k / v projection + q / k RMSNorm + RoPE (+ the joint cat): lyra::qkv_projection's
    two paths, a CUTLASS GEMM per part with the norm and RoPE in its epilogue (csrc/
    gemm_qk_norm_rope.cu) and cuBLASLt GEMMs into one buffer + the norm and RoPE in place,
    against what ran before: one cuBLASLt GEMM per part (lyra::linear_group) and
    lyra::qk_norm_rope3's pass with the v cat (the "torch" column)."""
    if not _C.gemm_gated_available():
        print("kernels_bench: library built without CUTLASS: no qkv cases", file=sys.stderr)
        return
    es = torch.empty((), dtype=dt).element_size()
    for name, parts, heads, K in _QKV_ATTENTIONS:
        d, length = 128, sum(parts)
        xs = [torch.randn(1, n, K, device="cuda", dtype=dt) for n in parts]
        ws = [(torch.randn(3 * heads * d, K, device="cuda") / math.sqrt(K)).to(dt) for _ in parts]
        bs = [torch.randn(3 * heads * d, device="cuda", dtype=dt) for _ in parts]
        weights = [w for buf in ws for w in buf.split(heads * d)]
        biases = [b for buf in bs for b in buf.split(heads * d)]
        norms = [torch.rand(d, device="cuda", dtype=dt) + 0.5 for _ in parts]
        angle = torch.rand(length, d // 2, device="cuda") * 6.28
        cos = angle.cos().repeat_interleave(2, dim=1).contiguous()
        sin = angle.sin().repeat_interleave(2, dim=1).contiguous()

        def fused(xs=xs, weights=weights, biases=biases, norms=norms, heads=heads, cos=cos, sin=sin, path="cutlass"):
            with lyradynamo.config.patch(gated_gemm=path):
                torch.ops.lyra.qkv_projection(xs, weights, biases, norms, norms, heads, 1e-6, cos, sin)

        def split(xs=xs, weights=weights, biases=biases, norms=norms, heads=heads, cos=cos, sin=sin):
            qs, ks, vs = [], [], []
            for i, x in enumerate(xs):
                y = torch.ops.lyra.linear_group(x, weights[3 * i:3 * i + 3], biases[3 * i:3 * i + 3], "none")
                for out, t in zip((qs, ks, vs), y.split(heads * 128, dim=-1)):
                    out.append(t.unflatten(-1, (heads, 128)))
            torch.ops.lyra.qk_norm_rope3(qs, ks, vs if len(xs) > 1 else [], norms, norms, "rms", 1e-6, cos, sin)

        nbytes = (length * K + len(parts) * 3 * heads * d * K + 3 * length * heads * d) * es
        shape = f"L{'+'.join(map(str, parts))} N{3 * heads * d} K{K}"
        yield (f"qkv epilogue {name}", shape, fused, split, nbytes)
        yield (f"qkv cublaslt joint {name}", shape, functools.partial(fused, path="cublaslt"), split, nbytes)
        # the norm + RoPE pass alone, in place over one joint buffer (the cublaslt path's second
        # half) against the same pass writing new q / k buffers
        from lyradynamo.ops import rope

        joint = torch.randn(1, length, 3 * heads * d, device="cuda", dtype=dt)
        q, k = (joint.narrow(-1, i * heads * d, heads * d).unflatten(-1, (heads, d)) for i in range(2))
        qp, kp = list(q.split(list(parts), dim=1)), list(k.split(list(parts), dim=1))

        def in_place(qp=qp, kp=kp, q=q, k=k, norms=norms, cos=cos, sin=sin):
            rope.launch_fused(_C, qp, kp, [], norms, norms, "rms", 1e-6, cos, sin, 0, (q, k))

        def new_buffers(qp=qp, kp=kp, norms=norms, cos=cos, sin=sin):
            torch.ops.lyra.qk_norm_rope3(qp, kp, [], norms, norms, "rms", 1e-6, cos, sin)

        yield (f"qk norm+rope pass {name}", f"L{length} H{heads} D{d}", in_place, new_buffers,
               4 * length * heads * d * es)
        # where the epilogue's time goes: the kernel without RoPE (norm only) against cuBLASLt's
        # GEMM alone (no norm, no RoPE, no pass), one part
        x, w, b, n = xs[-1], ws[-1], bs[-1], 3 * heads * d
        y = torch.empty(x.shape[1], n, device="cuda", dtype=dt)

        def norm_only(x=x, w=w, b=b, y=y, n=n, heads=heads, K=K, nrm=norms[-1]):
            _C.gemm_qk_norm_rope(x.data_ptr(), w.data_ptr(), b.data_ptr(), y.data_ptr(), nrm.data_ptr(),
                                 nrm.data_ptr(), 0, 0, x.shape[1], 1, n, K, K, K, x.shape[1] * n, heads, 128, 0, 0,
                                 1e-6, CODE[dt], s())

        def gemm_only(x=x, w=w, b=b, y=y, n=n, K=K):
            _C.gemm(x.data_ptr(), w.data_ptr(), b.data_ptr(), y.data_ptr(), x.shape[1], n, K, K, n, CODE[dt], s())

        yield (f"qkv epilogue norm only {name}", f"M{x.shape[1]} N{n} K{K}", norm_only, gemm_only, nbytes)


def epilogue_quant_cases(dt):
    """The act + quantise epilogue (ours: one linear_epilogue_quant pass over the GEMM output;
    torch: the eager activation + the eager fp8 quantisation) at FLUX's MLP width (GELU(tanh))
    and SDXL's GEGLU widths at 1024 (batch 2, levels 2 and 1)."""
    code = CODE[dt]
    for M, N, glu in [(4608, 12288, False), (4096, 12288, False), (2048, 5120, True), (8192, 2560, True)]:
        y = torch.randn(M, 2 * N if glu else N, device="cuda", dtype=dt)
        q = torch.empty(M, N, device="cuda", dtype=torch.uint8)
        sc = torch.empty(M, device="cuda", dtype=torch.float32)
        act = 1 if glu else 2  # csrc act codes: gelu (GEGLU) / gelu_tanh
        if glu:
            eager = (lambda y=y, N=N: _eager_quant_fp8(y[:, :N] * F.gelu(y[:, N:])))
        else:
            eager = (lambda y=y: _eager_quant_fp8(F.gelu(y, approximate="tanh")))
        def ours(y=y, q=q, sc=sc, M=M, N=N, act=act, glu=glu):
            _C.linear_epilogue_quant(y.data_ptr(), code, 0, 0, 0, 0, 0, 0, q.data_ptr(), sc.data_ptr(), M, N,
                                     act, glu, M, 0, code, 0, s())

        def generic(ours=ours):
            # the generic chain kernel on the same call (act_quant_kernel off while it launches)
            previous = _C.set_act_quant_kernel(False)
            try:
                ours()
            finally:
                _C.set_act_quant_kernel(previous)

        name = "epilogue geglu+quant fp8" if glu else "epilogue gelu_tanh+quant fp8"
        nbytes = M * N * ((2 if glu else 1) * y.element_size() + 1)  # y read once, q written
        yield (name, f"M{M} N{N}", ours, eager, nbytes)
        if hasattr(_C, "set_act_quant_kernel"):
            yield (name + " vs generic", f"M{M} N{N}", ours, generic, nbytes)


def norm_quant_cases(dt):
    """LayerNorm (+ affine) rows as the SD / SDXL transformer blocks run them: norm_modulate
    (bf16 / fp16 lyra) and norm_modulate_quant (lyra-fp8: the norm writes the next linear's
    fp8 activation), ours against eager layer_norm (+ the eager fp8 quantisation), at SDXL 1024
    (levels 2 and 1, batch 2) and SD1.5 512 (levels 0-2)."""
    code, es = CODE[dt], torch.empty((), dtype=dt).element_size()
    for M, D in [(2048, 1280), (8192, 640), (8192, 320), (2048, 640), (512, 1280)]:
        x = torch.randn(M, D, device="cuda", dtype=dt)
        w, b = torch.randn(D, device="cuda", dtype=dt), torch.randn(D, device="cuda", dtype=dt)
        y = torch.empty_like(x)
        q = torch.empty(M, D, device="cuda", dtype=torch.uint8)
        sc = torch.empty(M, device="cuda", dtype=torch.float32)
        shape = f"M{M} D{D}"
        yield ("layernorm", shape,
               lambda x=x, w=w, b=b, y=y, M=M, D=D: _C.norm_modulate(
                   x.data_ptr(), w.data_ptr(), b.data_ptr(), 0, 0, y.data_ptr(), M, D, M, 0, 0,
                   1e-5, False, code, s()),
               lambda x=x, w=w, b=b, D=D: F.layer_norm(x, (D,), w, b, 1e-5), 2 * M * D * es)
        yield ("layernorm+quant fp8", shape,
               lambda x=x, w=w, b=b, q=q, sc=sc, M=M, D=D: _C.norm_modulate_quant(
                   x.data_ptr(), w.data_ptr(), b.data_ptr(), 0, 0, 0, q.data_ptr(), sc.data_ptr(),
                   M, D, M, 0, 0, 1e-5, False, 0, code, s()),  # kind 0: fp8
               lambda x=x, w=w, b=b, D=D: _eager_quant_fp8(F.layer_norm(x, (D,), w, b, 1e-5)),
               M * D * (es + 1))


def attention_cases(dt):
    """SDXL 1024's attention shapes (batch 2; q / k / v in the (B, L, H, D) layout the projections
    write): torch SDPA's cuDNN backend (what lyra::attention's "auto" takes) in the "ours" column
    against the flash backend, then the efficient backend against flash. Bytes: q, k, v, out."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def sdpa(backend, q, k, v):
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))

    es = torch.empty((), dtype=dt).element_size()
    for name, Lq, Lk, H in [("self lvl1", 4096, 4096, 10), ("cross lvl1", 4096, 77, 10),
                            ("self lvl2", 1024, 1024, 20), ("cross lvl2", 1024, 77, 20)]:
        q = torch.randn(2, Lq, H, 64, device="cuda", dtype=dt)
        k, v = (torch.randn(2, Lk, H, 64, device="cuda", dtype=dt) for _ in range(2))
        nbytes = 2 * (2 * Lq + 2 * Lk) * H * 64 * es
        shape = f"{name} B2 Lq{Lq} Lk{Lk} H{H} D64"
        flash = (lambda q=q, k=k, v=v: sdpa(SDPBackend.FLASH_ATTENTION, q, k, v))
        yield ("attention cudnn vs flash", shape,
               lambda q=q, k=k, v=v: sdpa(SDPBackend.CUDNN_ATTENTION, q, k, v), flash, nbytes)
        yield ("attention efficient vs flash", shape,
               lambda q=q, k=k, v=v: sdpa(SDPBackend.EFFICIENT_ATTENTION, q, k, v), flash, nbytes)


def _eager_quant_fp8(x):
    """Eager per-row fp8 quantisation (what torch code does without a fused kernel)."""
    xf = x.float()
    scale = (xf.abs().amax(-1) / 448.0).clamp_min(1e-12)
    return (xf / scale[:, None]).clamp(-448.0, 448.0).to(torch.float8_e4m3fn), scale


def gn_rows_cases(dt):
    """NHWC group norm + SiLU: csrc/group_norm_rows.cu ("ours") against group_norm.cu's per-group
    clusters (the "torch" column here), at SD UNet shapes and the VAE decoder's (batch 1)."""
    from lyradynamo.ops.group_norm import prefer_rows

    code, es = CODE[dt], torch.empty((), dtype=dt).element_size()
    for n, c, h, w in [(2, 320, 128, 128), (2, 640, 64, 64), (2, 960, 64, 64), (2, 1280, 32, 32),  # SDXL 1024
                       (2, 320, 96, 96), (2, 640, 48, 48), (2, 960, 48, 48),  # SDXL 768
                       (2, 320, 64, 64), (2, 640, 32, 32), (2, 960, 32, 32), (2, 1280, 16, 16),  # SD1.5 512
                       (1, 512, 128, 128), (1, 512, 256, 256), (1, 512, 512, 512), (1, 256, 512, 512),
                       (1, 256, 1024, 1024), (1, 128, 1024, 1024),  # SDXL / FLUX VAE decoder at 1024
                       (1, 512, 64, 64), (1, 256, 256, 256), (1, 128, 512, 512)]:  # SD1.5 decoder at 512
        if not prefer_rows(True, n, c, h * w, 32, es):  # groups of 128 bytes or more: not a rows shape
            continue
        x = torch.randn(n, c, h, w, device="cuda", dtype=dt).contiguous(memory_format=torch.channels_last)
        wt, b = torch.randn(c, device="cuda", dtype=dt), torch.randn(c, device="cuda", dtype=dt)
        y = torch.empty_like(x)
        need = _C.group_norm_rows_workspace(n, c, h * w, 32, code, x.data_ptr(), y.data_ptr(), wt.data_ptr(),
                                            b.data_ptr())
        if not need:
            continue
        ws = torch.empty(need, device="cuda", dtype=torch.float32)
        yield ("group_norm+silu rows vs groups", f"N{n} C{c} HW{h * w} G32",
               lambda x=x, wt=wt, b=b, y=y, n=n, c=c, hw=h * w, ws=ws, need=need: _C.group_norm_rows(
                   x.data_ptr(), wt.data_ptr(), b.data_ptr(), y.data_ptr(), n, c, hw, 32, 1e-5, True, code, s(),
                   0, 0, ws.data_ptr(), need),
               lambda x=x, wt=wt, b=b, y=y, n=n, c=c, hw=h * w: _C.group_norm(
                   x.data_ptr(), wt.data_ptr(), b.data_ptr(), y.data_ptr(), n, c, hw, 32, 1e-5, True, True, code,
                   s()),
               3 * x.numel() * es)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/kernels.json")
    ap.add_argument("--dtype", default="fp16", choices=sorted(DTYPES))
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--graph-reps", type=int, default=10,
                    help="calls per CUDA graph replay (0: time eager calls, launch overhead included)")
    ap.add_argument("--quant", action="store_true",
                    help="also time the W8A8 kernels (fp8 / int8 GEMMs, quantize_rows) at FLUX "
                         "shapes; needs --dtype fp16 or bf16")
    ap.add_argument("--fusion", action="store_true",
                    help="also time one GEMM over projections sharing an input (fused QKV) against "
                         "one GEMM per projection, at SD1.5 / SDXL / FLUX shapes")
    ap.add_argument("--qkv", action="store_true",
                    help="also time FLUX's q / k / v projection with the q / k norm + RoPE in the GEMM "
                         "epilogue (lyra::qkv_projection) against cuBLASLt GEMMs + the qk_norm_rope3 pass")
    ap.add_argument("--gated", action="store_true",
                    help="also time the gated residual linear (CUTLASS epilogue) against cuBLASLt + "
                         "the epilogue kernel, at FLUX shapes, and the GEGLU linear (cuBLASLt + "
                         "CUTLASS GLU epilogue) against one GEMM + the epilogue kernel, at SD shapes")
    ap.add_argument("--gn-rows", action="store_true",
                    help="also time the NHWC group norm over whole rows (group_norm_rows.cu) against "
                         "group_norm.cu's per-group clusters (in the torch column), SD and VAE shapes")
    ap.add_argument("--epi-quant", action="store_true",
                    help="also time the act + quantise epilogue (linear_epilogue_quant) at FLUX / SDXL "
                         "widths (a subset of --quant)")
    ap.add_argument("--norm-quant", action="store_true",
                    help="also time LayerNorm rows (norm_modulate, norm_modulate_quant) at SD / SDXL "
                         "transformer widths")
    ap.add_argument("--attn", action="store_true",
                    help="also time torch SDPA's backends at SDXL's attention shapes")
    ap.add_argument("--sdxl-fp8-gemm", action="store_true",
                    help="also time SDXL 1024's fp8 linears: cuBLASLt (ours) against torch._scaled_mm "
                         "(the GB/s column is TFLOP/s for these rows)")
    ap.add_argument("--autotune", type=int, default=None,
                    help="set_gemm_autotune(N) before timing (as config.gemm_autotune; the bench's "
                         "warm-up call is the first call that tunes a shape)")
    ap.add_argument("--no-base", action="store_true",
                    help="time only the cases the flags above add, not the base kernel set")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("kernels_bench: no CUDA GPU", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    if args.autotune is not None:
        _C.set_gemm_autotune(args.autotune)
    dt = DTYPES[args.dtype]
    rows = []
    with torch.no_grad():
        all_cases = iter(()) if args.no_base else cases(dt)
        if args.quant:
            if dt == torch.float32:
                print("kernels_bench: --quant needs --dtype fp16 or bf16", file=sys.stderr)
                return 2
            all_cases = itertools.chain(all_cases, quant_cases(dt), epilogue_quant_cases(dt))
        elif args.epi_quant:
            all_cases = itertools.chain(all_cases, epilogue_quant_cases(dt))
        if args.fusion:
            all_cases = itertools.chain(all_cases, fusion_cases(dt, args.quant))
        if args.gated:
            all_cases = itertools.chain(all_cases, gated_cases(dt), glu_cases(dt))
        if args.qkv:
            all_cases = itertools.chain(all_cases, qkv_cases(dt))
        if args.gn_rows:
            all_cases = itertools.chain(all_cases, gn_rows_cases(dt))
        if args.norm_quant:
            all_cases = itertools.chain(all_cases, norm_quant_cases(dt))
        if args.attn:
            all_cases = itertools.chain(all_cases, attention_cases(dt))
        if args.sdxl_fp8_gemm:
            all_cases = itertools.chain(all_cases, sdxl_fp8_gemm_cases(dt))
        for name, shape, ours, ref, nbytes in all_cases:
            t_ours = time_us(ours, args.warmup, args.iters, args.graph_reps)
            t_ref = time_us(ref, args.warmup, args.iters, args.graph_reps)
            rows.append({
                "kernel": name, "shape": shape, "dtype": args.dtype,
                "ours_us": round(t_ours, 2), "torch_us": round(t_ref, 2),
                "speedup": round(t_ref / t_ours, 3),
                "ours_GBps": round(nbytes / t_ours / 1e3, 1),
            })
    hdr = f"{'kernel':<30} {'shape':<32} {'ours us':>9} {'torch us':>9} {'speedup':>8} {'GB/s*':>8}"
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        print(f"{r['kernel']:<30} {r['shape']:<32} {r['ours_us']:>9.2f} {r['torch_us']:>9.2f} "
              f"{r['speedup']:>7.2f}x {r['ours_GBps']:>8.1f}")
    print("* GB/s: minimum bytes moved by our kernel / its median time (for gemm: operand bytes)")
    meta = {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__,
        "cuda": torch.version.cuda, "python": platform.python_version(),
        "dtype": args.dtype, "iters": args.iters, "warmup": args.warmup,
        "graph_reps": args.graph_reps,
        "timing": "CUDA graph replay / graph_reps" if args.graph_reps else "eager calls",
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "results": rows}, f, indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
