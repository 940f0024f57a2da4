#!/usr/bin/env python3
"""What a new attention shape costs through torch's cuDNN SDPA against the cuDNN frontend's own
graphs with dynamic shapes and a kernel cache, and whether their kernels run as fast (GPU only).

    python benchmarks/cudnn_sdpa_probe.py [--dtype fp16] [--variant all] [--model sdxl|sd15 [--cross]]
        [--sizes 1024,768,512] [--out f.json]

A first call at a new image size builds one cuDNN SDPA graph per new attention shape inside
torch (~70 ms each: the engine compiles its kernel at runtime); torch's cache is per thread and
knows no kernel cache. The frontend can mark a graph "dynamic shape" and give it a kernel cache,
so a second shape of the same topology binds the kernel compiled for the first. Per SDXL
attention shape (batch 2, the layouts lyra passes: q / k / v strided views of one projection
buffer, (B, L, H, D)), in the order a 1024 -> 768 -> 512 sweep meets them, this reports:
- torch: the first call's wall time (graph build) and the steady time per call, with cuDNN and
  with torch's flash backend (no per-shape build: a per-shape choice between them weighs a build
  paid once per shape against a slower kernel paid on every call);
- frontend, dynamic + kernel cache: the build time and the steady time, and the largest
  difference from torch's output;
- frontend, static (no cache): the build time;
and checks that a frontend execution can be captured in a CUDA graph and replayed.

--model sd15 takes SD1.5's shapes instead: self-attention at its four levels (head dims 40, 80,
160, 160, which cuDNN serves with generated kernels), with --cross also level 1's cross-attention.
--tuning-between gemm|gated runs a freshly timed lyra GEMM before each shape's builds, to see
whether that is what makes some builds ~10x slow inside a new size's warm-up (session 26: it is
not; those were cuDNN's NVRTC compiles with an empty CUDA JIT cache, CUDA_CACHE_PATH).

--variant threads (its own process, not part of "all"): whether graph builds run in parallel
across threads. The sizes take turns among four modes, each size's shapes built at once: the
frontend's static graphs one after another ("fe-serial") or one thread per shape, each with its
own handle ("fe-threads"), and torch's first calls one after another ("torch-serial") or one
thread per shape ("torch-threads": torch's cache is per thread, so each thread builds). Each
frontend graph is executed once and compared with torch's output.

--variant picks the frontend graphs that are built and run: dynamic-cache (dynamic shapes, one
kernel cache), dynamic (dynamic shapes, no cache), static; "all" runs each in a process of its
own (session 23's run A: dynamic-cache's second shape, cross-attention over 77 keys, ended in an
illegal memory access, which leaves the process's CUDA context unusable). torch and cuDNN are
warmed up on another shape first, so a first call's time is the new shape's graph build alone.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from kernels_bench import time_us  # noqa: E402
from lyradynamo import config  # noqa: E402  (importing lyradynamo registers torch.ops.lyra)
from lyradynamo.ops import cudnn_attention  # noqa: E402  (loads the frontend with torch's libcudnn)


def sdxl_shapes(sizes):
    """(name, B, Lq, Lk, H, D, packed) in sweep order: self-attention (q / k / v from one qkv
    buffer) and cross-attention (77 text tokens) at SDXL's two attention levels."""
    out = []
    for s in sizes:
        lat = s // 8
        for level, heads in ((2, 10), (4, 20)):
            L = (lat // level) ** 2
            out.append((f"{s}-self-L{L}", 2, L, L, heads, 64, True))
            out.append((f"{s}-cross-L{L}", 2, L, 77, heads, 64, False))
    return out


def sd15_shapes(sizes, cross: bool):
    """SD1.5's attention shapes in sweep order: self-attention at its four levels (head dims 40,
    80, 160, 160: cuDNN's generated kernels), and with `cross` level 1's cross-attention (77 text
    tokens; the smaller levels' go to lyra's short_kv kernel)."""
    out = []
    for s in sizes:
        lat = s // 8
        for level, d in ((1, 40), (2, 80), (4, 160), (8, 160)):
            L = (lat // level) ** 2
            out.append((f"{s}-self-L{L}-d{d}", 2, L, L, 8, d, True))
            if cross and level == 1:
                out.append((f"{s}-cross-L{L}-d{d}", 2, L, 77, 8, d, False))
    return out


def make_qkv(B, Lq, Lk, H, D, packed, dtype):
    if packed:
        buf = torch.randn(B, Lq, 3, H, D, device="cuda", dtype=dtype)
        return buf[:, :, 0], buf[:, :, 1], buf[:, :, 2]
    q = torch.randn(B, Lq, H, D, device="cuda", dtype=dtype)
    kv = torch.randn(B, Lk, 2, H, D, device="cuda", dtype=dtype)
    return q, kv[:, :, 0], kv[:, :, 1]


def torch_sdpa(q, k, v, backend=SDPBackend.CUDNN_ATTENTION):
    with sdpa_kernel([backend]):
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return o.transpose(1, 2)


def fe_graph(cudnn, handle, q, k, v, dynamic, cache):
    B, Lq, H, D = q.shape
    dt = cudnn.data_type.HALF if q.dtype == torch.float16 else cudnn.data_type.BFLOAT16
    kw = dict(io_data_type=dt, intermediate_data_type=cudnn.data_type.FLOAT,
              compute_data_type=cudnn.data_type.FLOAT, handle=handle)
    if dynamic:
        kw.update(is_dynamic_shape_enabled=True, kernel_cache=cache)
    g = cudnn.pygraph(**kw)

    def bhld(name, t):
        return g.tensor(name=name, dim=[t.shape[0], t.shape[2], t.shape[1], t.shape[3]],
                        stride=[t.stride(0), t.stride(2), t.stride(1), t.stride(3)], data_type=dt)

    tq, tk, tv = bhld("q", q), bhld("k", k), bhld("v", v)
    o, _ = g.sdpa(q=tq, k=tk, v=tv, is_inference=True, attn_scale=D ** -0.5)
    o.set_output(True).set_dim([B, H, Lq, D]).set_stride([Lq * H * D, D, H * D, 1]).set_data_type(dt)
    g.validate()
    g.build_operation_graph()
    g.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    g.check_support()
    g.build_plans()
    return g, (tq, tk, tv, o)


def fe_run(cudnn, handle, built, q, k, v, out, ws):
    g, tensors = built
    cudnn.set_stream(handle, torch.cuda.current_stream().cuda_stream)
    g.execute(dict(zip(tensors, (q, k, v, out))), ws, handle=handle)


def timed_wall(fn):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    r = fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0, r


def steady_us(fn, n=50):
    """us per call of fn, replayed from one CUDA graph of n calls (host cost excluded): one
    warm-up call on a side stream, the median of 5 timed replays."""
    return time_us(fn, warmup=1, iters=5, graph_reps=n)


VARIANTS = ("dynamic-cache", "dynamic", "static")
THREAD_MODES = ("fe-serial", "fe-threads", "torch-serial", "torch-threads")


def probe_threads(args, cudnn, dtype, shapes_of) -> list:
    """Per size: all its shapes built in one mode (THREAD_MODES in turn); wall time of the group
    and each build's own time."""
    import concurrent.futures

    sizes = [int(s) for s in args.sizes.split(",")]
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=16)
    handles = [cudnn.create_handle() for _ in range(16)]
    rows = []
    for i, size in enumerate(sizes):
        mode = THREAD_MODES[i % len(THREAD_MODES)]
        shapes = shapes_of([size])
        inputs = [make_qkv(B, Lq, Lk, H, D, packed, dtype) for (_, B, Lq, Lk, H, D, packed) in shapes]
        torch.cuda.synchronize()

        def build(j):
            t0 = time.perf_counter()
            if mode.startswith("fe"):
                r = fe_graph(cudnn, handles[j], *inputs[j], False, None)
            else:
                r = torch_sdpa(*inputs[j])
                torch.cuda.current_stream().synchronize()
            return time.perf_counter() - t0, r

        t0 = time.perf_counter()
        if mode.endswith("threads"):
            got = list(pool.map(build, range(len(shapes))))
        else:
            got = [build(j) for j in range(len(shapes))]
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        diffs = []
        if mode.startswith("fe"):
            for (q, k, v), (_, built) in zip(inputs, got):
                out = torch.empty_like(q)
                ws = torch.empty(max(built[0].get_workspace_size(), 1), dtype=torch.uint8, device="cuda")
                fe_run(cudnn, handles[0], built, q, k, v, out, ws)
                diffs.append((out.float() - torch_sdpa(q, k, v).float()).abs().max().item())
        row = {"variant": "threads", "mode": mode, "size": size, "shapes": [s[0] for s in shapes],
               "wall_ms": round(wall * 1e3, 2), "build_ms": [round(t * 1e3, 2) for t, _ in got],
               "max_abs_diff_vs_torch": diffs, "gpu": torch.cuda.get_device_name(),
               "cudnn_backend": cudnn.backend_version(), "dtype": args.dtype}
        rows.append(row)
        print("== " + json.dumps(row), flush=True)
    return rows


def run_variants(args) -> list:
    """Each variant in a process of its own; a crashed one is a row saying so."""
    rows = []
    for variant in VARIANTS:
        cmd = [sys.executable, os.path.abspath(__file__), "--dtype", args.dtype, "--sizes", args.sizes,
               "--variant", variant, "--model", args.model, "--tuning-between", args.tuning_between] + \
            (["--cross"] if args.cross else [])
        proc = subprocess.run(cmd, capture_output=True, text=True)
        got = [json.loads(line[3:]) for line in proc.stdout.splitlines() if line.startswith("== ")]
        rows += got
        print(proc.stdout, end="", flush=True)
        if proc.returncode:
            rows.append({"variant": variant, "error": proc.stderr.strip().splitlines()[-1:] or ["?"],
                         "rc": proc.returncode, "shapes_done": len(got)})
            print("== " + json.dumps(rows[-1]), flush=True)
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", default="fp16", choices=("fp16", "bf16"))
    p.add_argument("--sizes", default="1024,768,512")
    p.add_argument("--variant", default="all", choices=("all", *VARIANTS, "threads"))
    p.add_argument("--model", default="sdxl", choices=("sdxl", "sd15"))
    p.add_argument("--cross", action="store_true", help="sd15: also level 1's cross-attention")
    p.add_argument("--tuning-between", default="none", choices=("none", "gemm", "gated"),
                   help="before each shape, a timed GEMM of a new shape (see tuning_between)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    rows = run_variants(args) if args.variant == "all" else probe(args)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


def tuning_between(kind: str, i: int, dtype) -> None:
    """Before shape i's builds, what lyra's warm-up does at a new size (session 25, run D: with
    it, 3 of 9 SD1.5 builds took 370-618 ms instead of ~40): "gemm" = a lyra::linear of a new K
    (so a new plan that is timed, never reused) with gemm_autotune 8; "gated" = a GEGLU linear of
    a new K that gated_gemm times (its paths captured as CUDA graphs and replayed); "none"."""
    if kind == "none":
        return
    k = 1280 + 8 * (i + 1)
    x = torch.randn(8192, k, device="cuda", dtype=dtype)
    with config.patch(gemm_autotune=8, gated_gemm="auto"):
        if kind == "gemm":
            w = torch.randn(1536, k, device="cuda", dtype=dtype)
            torch.ops.lyra.linear(x, w, None, "none", False, None, None)
        else:
            w = torch.randn(2 * 1280, k, device="cuda", dtype=dtype)
            torch.ops.lyra.linear(x, w, None, "gelu", True, None, None)


def probe(args) -> list:
    dtype = torch.float16 if args.dtype == "fp16" else torch.bfloat16
    cudnn = cudnn_attention._load_frontend()
    if cudnn is None:
        raise SystemExit(f"cuDNN frontend unavailable: {cudnn_attention._frontend['reason']}")
    handle = cudnn_attention._handle(cudnn, torch.device("cuda"))
    dynamic, cache = args.variant != "static", None
    if args.variant == "dynamic-cache":
        cache = cudnn.create_kernel_cache()
    torch.manual_seed(0)
    warm = make_qkv(1, 192, 192, 2, 64, True, dtype)  # library loads and handles, off the clock
    torch_sdpa(*warm)
    fe_graph(cudnn, handle, *warm, False, None)
    if args.variant == "threads":
        return probe_threads(args, cudnn, dtype, lambda sz: sd15_shapes(sz, args.cross)
                             if args.model == "sd15" else sdxl_shapes(sz))
    rows = []
    sizes = [int(s) for s in args.sizes.split(",")]
    shapes = sd15_shapes(sizes, args.cross) if args.model == "sd15" else sdxl_shapes(sizes)
    for i, (name, B, Lq, Lk, H, D, packed) in enumerate(shapes):
        q, k, v = make_qkv(B, Lq, Lk, H, D, packed, dtype)
        t_tuning = timed_wall(lambda: tuning_between(args.tuning_between, i, dtype))[0]
        t_torch_first, ref = timed_wall(lambda: torch_sdpa(q, k, v))
        t_flash_first, flash_out = timed_wall(lambda: torch_sdpa(q, k, v, SDPBackend.FLASH_ATTENTION))
        t_build, built = timed_wall(lambda: fe_graph(cudnn, handle, q, k, v, dynamic, cache))
        ws = torch.empty(max(built[0].get_workspace_size(), 1), dtype=torch.uint8, device="cuda")
        out = torch.empty(B, Lq, H, D, device="cuda", dtype=dtype)
        fe_run(cudnn, handle, built, q, k, v, out, ws)
        torch.cuda.synchronize()
        diff = (out.float() - ref.float()).abs().max().item()
        row = {"variant": args.variant, "shape": name, "B": B, "Lq": Lq, "Lk": Lk, "H": H, "D": D,
               "packed_qkv": packed, "tuning_between": args.tuning_between,
               "tuning_ms": round(t_tuning * 1e3, 2), "torch_first_call_ms": round(t_torch_first * 1e3, 2),
               "fe_build_ms": round(t_build * 1e3, 2),
               "torch_steady_us": round(steady_us(lambda: torch_sdpa(q, k, v)), 2),
               "flash_first_call_ms": round(t_flash_first * 1e3, 2),
               "flash_steady_us": round(steady_us(lambda: torch_sdpa(q, k, v, SDPBackend.FLASH_ATTENTION)), 2),
               "flash_max_abs_diff_vs_torch": (flash_out.float() - ref.float()).abs().max().item(),
               "fe_steady_us": round(steady_us(lambda: fe_run(cudnn, handle, built, q, k, v, out, ws)), 2),
               "max_abs_diff_vs_torch": diff, "workspace_bytes": ws.numel(),
               "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
               "cudnn_backend": cudnn.backend_version(), "dtype": args.dtype}
        rows.append(row)
        print("== " + json.dumps(row), flush=True)
    return rows


if __name__ == "__main__":
    main()
