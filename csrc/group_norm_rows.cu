// group_norm_rows.cu: NHWC GroupNorm (+ SiLU, + pre-bias) over whole rows, for groups whose
// channel run is narrow (under a 128-byte line: a VAE's 4-16 fp32 channels per group, a
// UNet's 10-40 fp16 ones).
//
// group_norm.cu gives each (sample, group) its own blocks, which in NHWC read a run of
// C/groups channels every C elements: with runs under a cache line, most of each fetched
// sector belongs to another group's blocks (measured: ~1.5 TB/s on the SDXL VAE decoder).
// Here a block reads whole rows (all C channels of a span of positions: coalesced) and keeps
// the statistics of every group it touches. Three launches, no cluster, any batch:
//   1. stats:    grid (nblk, N); each thread owns one V-channel vector of a row (so one group)
//                and walks its rows with shifted sums; the block merges them per group
//                (Chan, fixed order) and writes (n, mean, m2) per group to the workspace.
//   2. finalize: grid N; one warp per group merges the nblk partials, then per channel
//                scale = w * rstd, shift = b - mean * scale (+ pre_bias * scale): the apply
//                pass reads two floats per channel and never the pre-bias. Two pre-biases
//                (pb, pb2) are read as their fp32 sum, x + (pb + pb2), as in group_norm.cu.
//   3. apply:    grid (nblk, N), the same rows as pass 1: y = x * scale + shift (+ SiLU).
// Traffic: x read twice, y written once, as in group_norm.cu; the workspace (partials + 2 x
// N x C floats) comes from the caller (under CUDA graphs: the graph's pool).
#include <algorithm>

#include "common.cuh"

namespace lyra {
namespace {

constexpr int kRowsThreads = 512;  // threads per block at most, rounded down to whole rows
// Rows loaded before any is used, per thread: 4 rows of 8-16-byte vectors, 8 of narrower ones
// (more bytes in flight for them; 16 rows spilled or took 80 registers in some variants).
template <typename T, int V>
__host__ __device__ constexpr int rows_in_flight() {
  return V * static_cast<int>(sizeof(T)) >= 8 ? 4 : 8;
}
constexpr int kFinalizeThreads = 256;

struct RowsParams {
  int C, HW, groups, cpg;
  int tr;    // threads per row: C / V
  int k;     // rows per block step: blockDim / tr
  int nblk;  // blocks per sample
  int silu;
  int64_t pb_bstride;
  int64_t pb2_bstride;
  float eps;
};

// Rows [r0, r1) of block `blk`: an even split of HW over nblk.
__device__ __forceinline__ void block_rows(const RowsParams& p, int blk, int& r0, int& r1) {
  r0 = static_cast<int>(static_cast<int64_t>(p.HW) * blk / p.nblk);
  r1 = static_cast<int>(static_cast<int64_t>(p.HW) * (blk + 1) / p.nblk);
}

template <typename T, int V, bool PB>
__global__ void __launch_bounds__(kRowsThreads)
gn_rows_stats(const T* __restrict__ x, const T* __restrict__ pb, const T* __restrict__ pb2,
              float* __restrict__ part, RowsParams p) {
  __shared__ float s_n[kRowsThreads], s_mean[kRowsThreads], s_m2[kRowsThreads];
  const int n = blockIdx.y, blk = blockIdx.x;
  const int tc = threadIdx.x % p.tr, slot = threadIdx.x / p.tr;
  const bool active = slot < p.k;  // threads past the last whole row only take part in the merge
  const int c = tc * V;
  int r0, r1;
  block_rows(p, blk, r0, r1);
  const T* xs = x + static_cast<int64_t>(n) * p.HW * p.C + c;
  float bias[V];
#pragma unroll
  for (int e = 0; e < V; ++e) bias[e] = 0.f;
  if constexpr (PB) {
    load_vec<V>(pb + static_cast<int64_t>(n) * p.pb_bstride + c, bias);
    if (pb2) {
      const T* r2 = pb2 + static_cast<int64_t>(n) * p.pb2_bstride + c;
#pragma unroll
      for (int e = 0; e < V; ++e) bias[e] += to_float(r2[e]);
    }
  }

  // Shifted sums (shift = the thread's first value): no division per element, and exact
  // enough while the shift is near the mean, which any value of the group is at these sizes.
  float shift = 0.f, s = 0.f, q = 0.f;
  int cnt = 0;
  bool first = true;
  constexpr int kU = rows_in_flight<T, V>();
  if (active) {
    for (int r = r0 + slot; r < r1; r += kU * p.k) {
      Pack<T, V> raw[kU];
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        const int ru = r + u * p.k;
        if (ru < r1) raw[u] = load_raw<V>(xs + static_cast<int64_t>(ru) * p.C);
      }
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        if (r + u * p.k >= r1) break;
        float v[V];
        unpack(raw[u], v);
        if (first) { shift = v[0] + bias[0]; first = false; }
#pragma unroll
        for (int e = 0; e < V; ++e) {
          const float d = v[e] + bias[e] - shift;
          s += d;
          q = fmaf(d, d, q);
        }
        cnt += V;
      }
    }
  }
  const float fn = static_cast<float>(cnt);
  s_n[threadIdx.x] = fn;
  s_mean[threadIdx.x] = cnt ? shift + s / fn : 0.f;
  s_m2[threadIdx.x] = cnt ? fmaxf(q - s * s / fn, 0.f) : 0.f;
  __syncthreads();
  // Per group: its vectors (cpg / V per row slot) in every row slot, merged in a fixed order.
  const int vpg = p.cpg / V;
  for (int g = threadIdx.x; g < p.groups; g += blockDim.x) {
    Welford acc;
    for (int j = 0; j < p.k; ++j) {
      for (int t = 0; t < vpg; ++t) {
        const int i = j * p.tr + g * vpg + t;
        acc.merge(s_n[i], s_mean[i], s_m2[i]);
      }
    }
    float* out = part + ((static_cast<int64_t>(n) * p.nblk + blk) * p.groups + g) * 3;
    out[0] = acc.n;
    out[1] = acc.mean;
    out[2] = acc.m2;
  }
}

// One warp per (sample, group): the group's partial statistics merged (lane-strided, then the
// shuffle tree; lane 0's result, as a block per sample did), then the scale and shift of the
// group's channels. A block per sample whose warps took the groups in turn left N blocks on the
// GPU (2 at SDXL's batch 2, 1 in the VAE), each lane a chain of dependent partial loads: ~13 us
// a call (profile, NOTES session 15). Same merges in the same order: the same bits.
template <typename T>
__global__ void __launch_bounds__(kFinalizeThreads)
gn_rows_finalize(const float* __restrict__ part, const T* __restrict__ w, const T* __restrict__ b,
                 const T* __restrict__ pb, const T* __restrict__ pb2, float* __restrict__ scale,
                 float* __restrict__ shift, RowsParams p) {
  const int n = blockIdx.y;
  const int lane = threadIdx.x & 31;
  const int g = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (g >= p.groups) return;  // whole warps; no barrier follows
  Welford acc;
#pragma unroll 4
  for (int i = lane; i < p.nblk; i += 32) {
    const float* q = part + ((static_cast<int64_t>(n) * p.nblk + i) * p.groups + g) * 3;
    acc.merge(q[0], q[1], q[2]);
  }
  acc.warp_reduce();
  const float mean = __shfl_sync(0xffffffffu, acc.mean, 0);
  const float rstd = __shfl_sync(0xffffffffu, rsqrtf(acc.m2 / acc.n + p.eps), 0);
  for (int c = g * p.cpg + lane; c < (g + 1) * p.cpg; c += 32) {
    const float a = (w ? to_float(w[c]) : 1.f) * rstd;
    float sh = (b ? to_float(b[c]) : 0.f) - mean * a;
    if (pb) {
      float t = to_float(pb[static_cast<int64_t>(n) * p.pb_bstride + c]);
      if (pb2) t += to_float(pb2[static_cast<int64_t>(n) * p.pb2_bstride + c]);
      sh = fmaf(t, a, sh);
    }
    scale[static_cast<int64_t>(n) * p.C + c] = a;
    shift[static_cast<int64_t>(n) * p.C + c] = sh;
  }
}

template <typename T, int V>
__global__ void __launch_bounds__(kRowsThreads)
gn_rows_apply(const T* x, const float* __restrict__ scale, const float* __restrict__ shift, T* y,
              RowsParams p) {
  // x and y may alias (in place): each element is read, then written, by one thread.
  const int n = blockIdx.y, blk = blockIdx.x;
  const int tc = threadIdx.x % p.tr, slot = threadIdx.x / p.tr;
  if (slot >= p.k) return;
  const int c = tc * V;
  int r0, r1;
  block_rows(p, blk, r0, r1);
  const int64_t base = static_cast<int64_t>(n) * p.HW * p.C + c;
  float a[V], sh[V];
#pragma unroll
  for (int e = 0; e < V; ++e) {
    a[e] = scale[static_cast<int64_t>(n) * p.C + c + e];
    sh[e] = shift[static_cast<int64_t>(n) * p.C + c + e];
  }
  constexpr int kU = rows_in_flight<T, V>();
  for (int r = r0 + slot; r < r1; r += kU * p.k) {
    Pack<T, V> raw[kU];
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      const int ru = r + u * p.k;
      if (ru < r1) raw[u] = load_raw<V>(x + base + static_cast<int64_t>(ru) * p.C);
    }
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      const int ru = r + u * p.k;
      if (ru >= r1) break;
      float v[V];
      unpack(raw[u], v);
#pragma unroll
      for (int e = 0; e < V; ++e) v[e] = fmaf(v[e], a[e], sh[e]);
      if (p.silu) {
#pragma unroll
        for (int e = 0; e < V; ++e) v[e] = silu_fast(v[e]);
      }
      store_vec<V>(y + base + static_cast<int64_t>(ru) * p.C, v);
    }
  }
}

// The launch geometry, the same on the host for the workspace size and for the launch.
struct RowsPlan {
  int v = 0;  // 0: this shape is not supported here
  RowsParams p{};
  int threads = 0;
  int64_t part_floats = 0;
  int64_t workspace_floats = 0;  // partials + scale / shift: what the caller must provide
};

RowsPlan plan_rows(int64_t N, int64_t C, int64_t HW, int64_t groups, int dtype, uintptr_t x,
                   uintptr_t y, uintptr_t w, uintptr_t b, uintptr_t pb, int64_t pb_bstride,
                   uintptr_t pb2, int64_t pb2_bstride, const char* fn) {
  RowsPlan plan;
  if (N <= 0 || C <= 0 || HW <= 0 || groups <= 0 || C % groups) return plan;
  if (C * HW >= (1ll << 31) || N > 65535) return plan;  // N: the grids' y
  const size_t es = dtype_size(dtype);
  const int64_t cpg = C / groups;
  int v = static_cast<int>(16 / es);
  for (; v > 1; v /= 2) {
    const size_t bytes = es * v;
    if (cpg % v == 0 && aligned_to(x, bytes) && aligned_to(y, bytes) && aligned_to(w, bytes) &&
        aligned_to(b, bytes) && aligned_to(pb, bytes) && pb_bstride % v == 0 &&
        aligned_to(pb2, bytes) && pb2_bstride % v == 0)
      break;
  }
  const int64_t tr = C / v;
  if (tr > kRowsThreads) return plan;  // a row wider than a block: group_norm.cu's path
  plan.v = v;
  RowsParams& p = plan.p;
  p.C = static_cast<int>(C);
  p.HW = static_cast<int>(HW);
  p.groups = static_cast<int>(groups);
  p.cpg = static_cast<int>(cpg);
  p.tr = static_cast<int>(tr);
  p.k = static_cast<int>(kRowsThreads / tr);
  plan.threads = p.tr * p.k;
  // One wave of blocks over the GPU, counting 1024 resident threads per SM (up to 64
  // registers a thread: the largest variant uses 64), at least ~8 rows per thread.
  const int64_t per_sm = std::max<int64_t>(1, 1024 / plan.threads);
  const int64_t want = std::max<int64_t>(1, current_device_info(fn).sm_count * per_sm / N);
  const int64_t by_rows = std::max<int64_t>(1, HW / (8 * static_cast<int64_t>(p.k)));
  p.nblk = static_cast<int>(std::min<int64_t>({want, by_rows, 65535}));
  plan.part_floats = N * p.nblk * groups * 3;
  plan.workspace_floats = plan.part_floats + 2 * N * C;
  return plan;
}

template <typename T, int V>
void launch_rows(const RowsPlan& plan, int64_t N, const T* x, const T* w, const T* b, const T* pb,
                 const T* pb2, T* y, float* ws, cudaStream_t stream) {
  const RowsParams& p = plan.p;
  float* part = ws;
  float* scale = ws + plan.part_floats;
  float* shift = scale + N * p.C;
  const dim3 grid(static_cast<unsigned>(p.nblk), static_cast<unsigned>(N));
  if (pb) {
    gn_rows_stats<T, V, true><<<grid, plan.threads, 0, stream>>>(x, pb, pb2, part, p);
  } else {
    gn_rows_stats<T, V, false><<<grid, plan.threads, 0, stream>>>(x, pb, pb2, part, p);
  }
  LYRA_CHECK_LAUNCH("group_norm_rows");
  constexpr int kWarps = kFinalizeThreads / 32;  // groups per block
  const dim3 fgrid(static_cast<unsigned>((p.groups + kWarps - 1) / kWarps), static_cast<unsigned>(N));
  gn_rows_finalize<T><<<fgrid, kFinalizeThreads, 0, stream>>>(part, w, b, pb, pb2, scale, shift, p);
  LYRA_CHECK_LAUNCH("group_norm_rows");
  gn_rows_apply<T, V><<<grid, plan.threads, 0, stream>>>(x, scale, shift, y, p);
  LYRA_CHECK_LAUNCH("group_norm_rows");
}

}  // namespace

int64_t group_norm_rows_workspace(int64_t N, int64_t C, int64_t HW, int64_t groups, int dtype,
                                  uintptr_t x, uintptr_t y, uintptr_t weight, uintptr_t bias,
                                  uintptr_t pre_bias, int64_t pre_bias_bstride,
                                  uintptr_t pre_bias2, int64_t pre_bias2_bstride) {
  return plan_rows(N, C, HW, groups, dtype, x, y, weight, bias, pre_bias, pre_bias_bstride,
                   pre_bias2, pre_bias2_bstride, "group_norm_rows_workspace")
      .workspace_floats;
}

void group_norm_rows(uintptr_t x, uintptr_t weight, uintptr_t bias, uintptr_t y, int64_t N,
                     int64_t C, int64_t HW, int64_t groups, double eps, bool silu, int dtype,
                     uintptr_t stream, uintptr_t pre_bias, int64_t pre_bias_bstride,
                     uintptr_t workspace, int64_t workspace_floats, uintptr_t pre_bias2,
                     int64_t pre_bias2_bstride) {
  const char* fn = "group_norm_rows";
  LYRA_CHECK_ARG(x != 0 && y != 0, fn, "x and y must be non-null device pointers");
  LYRA_CHECK_ARG(eps >= 0, fn, "eps must be >= 0");
  check_pre_biases(pre_bias, pre_bias_bstride, pre_bias2, pre_bias2_bstride, C, fn);
  RowsPlan plan = plan_rows(N, C, HW, groups, dtype, x, y, weight, bias, pre_bias,
                            pre_bias_bstride, pre_bias2, pre_bias2_bstride, fn);
  const int64_t need = plan.workspace_floats;
  LYRA_CHECK_ARG(need > 0, fn,
                 "shape not supported by the rows path (N=" + std::to_string(N) + " C=" +
                     std::to_string(C) + " HW=" + std::to_string(HW) + " groups=" +
                     std::to_string(groups) + "): ask group_norm_rows_workspace first");
  LYRA_CHECK_ARG(workspace != 0 && aligned_to(workspace, 16) && workspace_floats >= need, fn,
                 "workspace must be a 16-byte aligned float32 buffer of >= " +
                     std::to_string(need) + " elements, got " + std::to_string(workspace_floats));
  plan.p.silu = silu ? 1 : 0;
  plan.p.pb_bstride = pre_bias_bstride;
  plan.p.pb2_bstride = pre_bias2_bstride;
  plan.p.eps = static_cast<float>(eps);
  float* ws = as_ptr<float>(workspace);
  LYRA_DISPATCH_DTYPE(dtype, fn, [&] {
    const auto* xp = as_ptr<const scalar_t>(x);
    const auto* wp = as_ptr<const scalar_t>(weight);
    const auto* bp = as_ptr<const scalar_t>(bias);
    const auto* pbp = as_ptr<const scalar_t>(pre_bias);
    const auto* pb2p = as_ptr<const scalar_t>(pre_bias2);
    auto* yp = as_ptr<scalar_t>(y);
    cudaStream_t s = as_stream(stream);
    switch (plan.v) {
      case 8:
        if constexpr (vec16<scalar_t>() >= 8) return launch_rows<scalar_t, 8>(plan, N, xp, wp, bp, pbp, pb2p, yp, ws, s);
        break;
      case 4: return launch_rows<scalar_t, 4>(plan, N, xp, wp, bp, pbp, pb2p, yp, ws, s);
      case 2: return launch_rows<scalar_t, 2>(plan, N, xp, wp, bp, pbp, pb2p, yp, ws, s);
      default: return launch_rows<scalar_t, 1>(plan, N, xp, wp, bp, pbp, pb2p, yp, ws, s);
    }
  });
}

}  // namespace lyra
