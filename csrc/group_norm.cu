// group_norm.cu: GroupNorm (+ optional fused SiLU) for NCHW and NHWC tensors.
//
// y = (x - mean_g) * rstd_g * weight[c] + bias[c], then SiLU when requested,
// statistics per (sample, group) over (C/groups channels x HW positions).
// With pre-biases pb and pb2 (each C per sample, or one row for all samples;
// either may be absent), x is read as x + (pb[n, c] + pb2[n, c]) in fp32
// (statistics included): a convolution's bias and a time-embedding add folded
// into the norm instead of passes over x and over the (N, C) sum. Each block
// stages its group's fp32 sum in shared memory once (C/groups floats).
//
// Scheme: one kernel, read-stats-then-apply. A (sample, group) is split over a
// thread-block *cluster* of K blocks (K in {1,2,4,8}); each block computes
// Welford partial statistics of its slice, the partials are combined through
// distributed shared memory (DSMEM), and each block then normalises its own
// slice (the second read mostly hits L2). K is the largest size whose
// clusters all fit in one wave (occupancy query), so SD shapes (N=2,
// groups=32 -> 64 groups) still fill the GPU. No global workspace: graph-
// capture safe and re-entrant across streams. Clusters need sm_90; on older
// GPUs (or when groups alone fill the GPU) K is 1, one block per group.
//
// A group is viewed as R rows x W columns with row stride S (elements):
//   NCHW (N, C, HW):  R = C/groups (channels), W = HW,  S = HW;  channel = row
//   NHWC (N, HW, C):  R = HW,  W = C/groups, S = C;            channel = column
// Vectors of V elements never cross a row (V divides W and S).
#include <cooperative_groups.h>

#include <array>

#include "common.cuh"

namespace lyra {
namespace {

constexpr int kGNThreads = 256;
constexpr int kGNMaxCluster = 8;
// Vectors in flight per thread (loads issued before any is used): 3 x 16 B
// for 8-wide vectors, else 4 or 8 so a thread has >= 8 elements in flight.
// With __launch_bounds__(256, 4) (<= 64 registers, 4 blocks per SM) these
// are the largest counts that compile without spills (sm_90a, nvcc 13.0),
// except with a pre-bias (PB): there 2-wide vectors keep 4 in flight (8
// spill).
template <int V, bool PB>
__host__ __device__ constexpr int unroll() { return V >= 8 ? 3 : (V >= 4 || PB ? 4 : 8); }
// Largest C/groups with a pre-bias: the staged row is cpg floats of dynamic
// shared memory, which with the kernel's own 128 static bytes stays under the
// 48 KB every launch may take without opt-in (ops/group_norm.py: MAX_PRE_BIAS_CPG).
constexpr int kGNMaxPreBiasCpg = 12000;

// silu_fast (common.cuh): this pass is instruction-bound, not memory-bound, at SD shapes.

struct GNParams {
  int64_t sample_stride;  // C*HW
  int64_t row_stride;     // S
  int rows;               // R
  int wv;                 // W / V (vectors per row)
  int cpg;                // channels per group
  int groups;
  int cluster;            // K, blocks per (sample, group)
  int nhwc;
  int silu;
  int64_t pb_bstride;     // pre-bias elements between samples (0: one row for all)
  int64_t pb2_bstride;    // the same for the second pre-bias
  float eps;
};

// v += the staged pre-bias (s_pb: the group's channels, fp32) of the vector at
// (row r, column-vector cv) of the group's view: V consecutive channels (NHWC)
// or one channel for the whole vector (NCHW).
template <int V>
__device__ __forceinline__ void add_pre_bias(float (&v)[V], const float* s_pb, int nhwc, int r,
                                             int cv) {
  if (nhwc) {
    if constexpr (V % 4 == 0) {  // 16-byte shared loads (s_pb is 16-byte aligned, cv * V % 4 == 0)
#pragma unroll
      for (int e = 0; e < V; e += 4) {
        const float4 t = *reinterpret_cast<const float4*>(s_pb + cv * V + e);
        v[e] += t.x; v[e + 1] += t.y; v[e + 2] += t.z; v[e + 3] += t.w;
      }
    } else {
#pragma unroll
      for (int e = 0; e < V; ++e) v[e] += s_pb[cv * V + e];
    }
  } else {
    const float t = s_pb[r];
#pragma unroll
    for (int e = 0; e < V; ++e) v[e] += t;
  }
}

template <typename T, int V, bool PB>
__global__ void __launch_bounds__(kGNThreads, 4)
group_norm_kernel(const T* x, const T* __restrict__ w, const T* __restrict__ b,
                  const T* __restrict__ pre_bias, const T* __restrict__ pre_bias2, T* y,
                  GNParams p) {
  // x and y are not __restrict__: in-place (y == x) is allowed, since every
  // element is read before it is written, by the same thread.
  constexpr int kU = unroll<V, PB>();
  __shared__ float s_warp[3][kGNThreads / 32];
  __shared__ float s_part[3];   // this block's (n, mean, m2): read by cluster peers
  __shared__ float s_stats[2];  // (mean, rstd) of the whole group
  extern __shared__ __align__(16) float s_pb[];  // PB: the group's pre-bias sum (cpg floats)

  const int K = p.cluster;
  const int rank = blockIdx.x % K;
  const int ng = blockIdx.x / K;  // n * groups + g
  const int g = ng % p.groups;
  const int n = ng / p.groups;

  const int64_t base = static_cast<int64_t>(n) * p.sample_stride +
                       (p.nhwc ? static_cast<int64_t>(g) * p.cpg
                               : static_cast<int64_t>(g) * p.cpg * p.row_stride);
  const T* xg = x + base;
  T* yg = y + base;
  const int c0 = g * p.cpg;
  if constexpr (PB) {
    // This sample's pre-bias rows, summed in fp32 (pb alone: x + pb, as before pb2 existed).
    const T* r1 = pre_bias + static_cast<int64_t>(n) * p.pb_bstride + c0;
    const T* r2 = pre_bias2 ? pre_bias2 + static_cast<int64_t>(n) * p.pb2_bstride + c0 : nullptr;
    for (int j = threadIdx.x; j < p.cpg; j += blockDim.x) {
      float t = to_float(r1[j]);
      if (r2) t += to_float(r2[j]);
      s_pb[j] = t;
    }
    __syncthreads();
  }

  // This block's slice [v0, v1) of the group's R*wv vectors.
  const int64_t nv = static_cast<int64_t>(p.rows) * p.wv;
  const int v0 = static_cast<int>(nv * rank / K);
  const int v1 = static_cast<int>(nv * (rank + 1) / K);
  // Strided walk over the slice with (row, col-vector) updated incrementally,
  // avoiding a division per vector (W/V can be as small as 1). kU
  // vectors are loaded before any is used, for memory-level parallelism.
  const int bs = blockDim.x;
  const int step_r = bs / p.wv, step_c = bs % p.wv;
  const int i_start = v0 + static_cast<int>(threadIdx.x);
  const int r_start = i_start / p.wv, c_start = i_start % p.wv;
  auto advance = [&](int& r, int& cv) {
    r += step_r;
    cv += step_c;
    if (cv >= p.wv) { cv -= p.wv; ++r; }
  };

  // ---- pass 1: Welford statistics of the slice --------------------------
  Welford wf;
  {
    int r = r_start, cv = c_start;
    for (int i = i_start; i < v1; i += kU * bs) {
      Pack<T, V> raw[kU];
      // Positions for the pre-bias: walked again from this step's start (two
      // registers, not 2 x kU: the PB kernels spill otherwise).
      [[maybe_unused]] int pr = r, pc = cv;
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        if (i + u * bs < v1) raw[u] = load_raw<V>(xg + r * p.row_stride + cv * V);
        advance(r, cv);
      }
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        if (i + u * bs < v1) {
          float v[V];
          unpack(raw[u], v);
          if constexpr (PB) {
            add_pre_bias<V>(v, s_pb, p.nhwc, pr, pc);
            advance(pr, pc);
          }
          wf.add_batch<V>(v);
        }
      }
    }
  }
  wf.warp_reduce();
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nwarps = bs >> 5;
  if (lane == 0) { s_warp[0][warp] = wf.n; s_warp[1][warp] = wf.mean; s_warp[2][warp] = wf.m2; }
  __syncthreads();
  if (threadIdx.x == 0) {
    Welford acc;
    for (int k = 0; k < nwarps; ++k) acc.merge(s_warp[0][k], s_warp[1][k], s_warp[2][k]);
    s_part[0] = acc.n; s_part[1] = acc.mean; s_part[2] = acc.m2;
  }

  // ---- combine the K partials of the cluster (DSMEM) ---------------------
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (K > 1) {
    namespace cg = cooperative_groups;
    cg::cluster_group cluster = cg::this_cluster();
    cluster.sync();  // every block's s_part is written and visible
    if (threadIdx.x == 0) {
      Welford acc;  // same merge order in every block -> identical stats
      for (int k = 0; k < K; ++k) {
        const float* peer = cluster.map_shared_rank(s_part, k);
        acc.merge(peer[0], peer[1], peer[2]);
      }
      s_stats[0] = acc.mean;
      s_stats[1] = rsqrtf(acc.m2 / acc.n + p.eps);
    }
    cluster.sync();  // no block may exit while a peer still reads its s_part
  } else
#else
  if (K > 1) __trap();  // unreachable: the host picks K > 1 only on sm_90+
#endif
  {
    if (threadIdx.x == 0) {
      s_stats[0] = s_part[1];
      s_stats[1] = rsqrtf(s_part[2] / s_part[0] + p.eps);
    }
  }
  __syncthreads();
  const float mean = s_stats[0], rstd = s_stats[1];

  // ---- pass 2: normalise + affine (+ SiLU) --------------------------------
  int r = r_start, cv = c_start;
  for (int i = i_start; i < v1; i += kU * bs) {
    Pack<T, V> raw[kU];
    int rr[kU], cc[kU];
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      rr[u] = r;
      cc[u] = cv;
      if (i + u * bs < v1) raw[u] = load_raw<V>(xg + r * p.row_stride + cv * V);
      advance(r, cv);
    }
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      if (i + u * bs >= v1) break;
      float v[V], sc[V], sh[V];
      unpack(raw[u], v);
      if constexpr (PB) add_pre_bias<V>(v, s_pb, p.nhwc, rr[u], cc[u]);
      if (p.nhwc) {  // channel = column: V consecutive channels
        const int c = c0 + cc[u] * V;
        if (w) { load_vec<V>(w + c, sc); } else {
#pragma unroll
          for (int e = 0; e < V; ++e) sc[e] = 1.f;
        }
        if (b) { load_vec<V>(b + c, sh); } else {
#pragma unroll
          for (int e = 0; e < V; ++e) sh[e] = 0.f;
        }
#pragma unroll
        for (int e = 0; e < V; ++e) sc[e] *= rstd;
      } else {  // channel = row: one channel for the whole vector
        const int c = c0 + rr[u];
        const float a = (w ? to_float(w[c]) : 1.f) * rstd;
        const float bc = b ? to_float(b[c]) : 0.f;
#pragma unroll
        for (int e = 0; e < V; ++e) { sc[e] = a; sh[e] = bc; }
      }
#pragma unroll
      for (int e = 0; e < V; ++e) v[e] = (v[e] - mean) * sc[e] + sh[e];
      if (p.silu) {
#pragma unroll
        for (int e = 0; e < V; ++e) v[e] = silu_fast(v[e]);
      }
      store_vec<V>(yg + rr[u] * p.row_stride + cc[u] * V, v);
    }
  }
}

cudaLaunchConfig_t cluster_config(unsigned grid, int K, size_t smem, cudaStream_t stream,
                                  cudaLaunchAttribute* attr) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(grid);
  cfg.blockDim = dim3(kGNThreads);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  attr->id = cudaLaunchAttributeClusterDimension;
  attr->val.clusterDim.x = K;
  attr->val.clusterDim.y = 1;
  attr->val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  return cfg;
}

// How many clusters of K = 2, 4, 8 blocks of this kernel can be resident at
// once (index log2 K); queried once per instantiation (first call, before
// any graph capture in practice; the queries enqueue nothing anyway). Asked
// without dynamic shared memory: the staged pre-bias is a few hundred bytes at
// UNet sizes (cpg <= 80), far from the 4 blocks per SM the registers allow.
template <typename T, int V, bool PB>
const int* cluster_capacity() {
  static const std::array<int, 4> caps = [] {
    std::array<int, 4> c{0, 0, 0, 0};
    for (int i = 1; i < 4; ++i) {
      cudaLaunchAttribute attr;
      cudaLaunchConfig_t cfg = cluster_config(1u << i, 1 << i, 0, nullptr, &attr);
      int n = 0;
      if (cudaOccupancyMaxActiveClusters(&n, group_norm_kernel<T, V, PB>, &cfg) != cudaSuccess) {
        (void)cudaGetLastError();  // not fatal: just no clusters of this size
        n = 0;
      }
      c[i] = n;
    }
    return c;
  }();
  return caps.data();
}

template <typename T, int V, bool PB>
void launch_gn(const T* x, const T* w, const T* b, const T* pb, const T* pb2, T* y, GNParams p,
               int64_t ng, const DeviceInfo& dev, cudaStream_t stream) {
  // Cluster size K: the largest of 8, 4, 2 whose ng clusters are all resident
  // in one wave (a partial second wave would cost a whole extra pass), with at
  // least ~2K elements per block; else one block per group.
  const int64_t group_elems = static_cast<int64_t>(p.rows) * p.wv;
  int K = 1;
  if (dev.cc_major >= 9) {
    const int* caps = cluster_capacity<T, V, PB>();
    for (int i = 3; i >= 1; --i) {
      if (ng <= caps[i] && group_elems / (1 << i) >= 2048) { K = 1 << i; break; }
    }
  }
  p.cluster = K;
  p.wv /= V;
  const unsigned grid = static_cast<unsigned>(ng * K);
  const size_t smem = PB ? static_cast<size_t>(p.cpg) * sizeof(float) : 0;
  if (K > 1) {
    cudaLaunchAttribute attr;
    cudaLaunchConfig_t cfg = cluster_config(grid, K, smem, stream, &attr);
    LYRA_CUDA_CHECK(cudaLaunchKernelEx(&cfg, group_norm_kernel<T, V, PB>, x, w, b, pb, pb2, y, p),
                    "group_norm");
  } else {
    group_norm_kernel<T, V, PB><<<grid, kGNThreads, smem, stream>>>(x, w, b, pb, pb2, y, p);
  }
  LYRA_CHECK_LAUNCH("group_norm");
}

// Picks the instantiation for the runtime vector width v (a power of two that
// is <= 16 bytes); `if constexpr` keeps 8-wide fp32 from being instantiated.
template <typename T, bool PB>
void dispatch_gn(int v, const T* x, const T* w, const T* b, const T* pb, const T* pb2, T* y,
                 GNParams p, int64_t ng, const DeviceInfo& dev, cudaStream_t s) {
  if constexpr (vec16<T>() >= 8) {
    if (v == 8) return launch_gn<T, 8, PB>(x, w, b, pb, pb2, y, p, ng, dev, s);
  }
  if (v == 4) return launch_gn<T, 4, PB>(x, w, b, pb, pb2, y, p, ng, dev, s);
  if (v == 2) return launch_gn<T, 2, PB>(x, w, b, pb, pb2, y, p, ng, dev, s);
  launch_gn<T, 1, PB>(x, w, b, pb, pb2, y, p, ng, dev, s);
}

}  // namespace

void group_norm(uintptr_t x, uintptr_t weight, uintptr_t bias, uintptr_t y, int64_t N,
                int64_t C, int64_t HW, int64_t groups, double eps, bool silu,
                bool channels_last, int dtype, uintptr_t stream, uintptr_t pre_bias,
                int64_t pre_bias_bstride, uintptr_t pre_bias2, int64_t pre_bias2_bstride) {
  const char* fn = "group_norm";
  LYRA_CHECK_ARG(x != 0, fn, "x must be a non-null device pointer");
  LYRA_CHECK_ARG(y != 0, fn, "y must be a non-null device pointer");
  LYRA_CHECK_ARG(N > 0, fn, "N must be positive, got " + std::to_string(N));
  LYRA_CHECK_ARG(C > 0, fn, "C must be positive, got " + std::to_string(C));
  LYRA_CHECK_ARG(HW > 0, fn, "HW must be positive, got " + std::to_string(HW));
  LYRA_CHECK_ARG(groups > 0 && C % groups == 0, fn,
                 "groups must be positive and divide C, got groups=" + std::to_string(groups) +
                     " C=" + std::to_string(C));
  LYRA_CHECK_ARG(eps >= 0, fn, "eps must be >= 0");
  LYRA_CHECK_ARG(N * groups <= (1ll << 31) / kGNMaxCluster, fn, "N*groups too large");
  LYRA_CHECK_ARG(C * HW < (1ll << 31), fn, "C*HW must be < 2^31 elements per sample");
  check_pre_biases(pre_bias, pre_bias_bstride, pre_bias2, pre_bias2_bstride, C, fn);
  LYRA_CHECK_ARG(!pre_bias || C / groups <= kGNMaxPreBiasCpg, fn,
                 "a pre_bias needs C/groups <= " + std::to_string(kGNMaxPreBiasCpg) + ", got " +
                     std::to_string(C / groups));

  GNParams p;
  p.cpg = static_cast<int>(C / groups);
  p.groups = static_cast<int>(groups);
  p.sample_stride = C * HW;
  p.nhwc = channels_last ? 1 : 0;
  p.rows = static_cast<int>(channels_last ? HW : p.cpg);
  const int W = static_cast<int>(channels_last ? p.cpg : HW);
  p.wv = W;
  p.row_stride = channels_last ? C : HW;
  p.silu = silu ? 1 : 0;
  p.pb_bstride = pre_bias_bstride;
  p.pb2_bstride = pre_bias2_bstride;
  p.eps = static_cast<float>(eps);

  const DeviceInfo dev = current_device_info(fn);
  const int64_t ng = N * groups;

  const size_t es = dtype_size(dtype);
  // Largest V (elements per access, <= 16 B) that keeps every vector inside
  // one row and every access aligned; falls back down to V = 1.
  auto pick_v = [&](int vmax) {
    for (int v = vmax; v > 1; v /= 2) {
      const size_t bytes = es * v;
      bool ok = W % v == 0 && p.row_stride % v == 0 && aligned_to(x, bytes) &&
                aligned_to(y, bytes);
      if (channels_last) ok = ok && aligned_to(weight, bytes) && aligned_to(bias, bytes);
      if (ok) return v;
    }
    return 1;
  };

  LYRA_DISPATCH_DTYPE(dtype, fn, [&] {
    const int v = pick_v(vec16<scalar_t>());
    const auto* xp = as_ptr<const scalar_t>(x);
    const auto* wp = as_ptr<const scalar_t>(weight);
    const auto* bp = as_ptr<const scalar_t>(bias);
    const auto* pbp = as_ptr<const scalar_t>(pre_bias);
    const auto* pb2p = as_ptr<const scalar_t>(pre_bias2);
    auto* yp = as_ptr<scalar_t>(y);
    if (pre_bias) {
      dispatch_gn<scalar_t, true>(v, xp, wp, bp, pbp, pb2p, yp, p, ng, dev, as_stream(stream));
    } else {
      dispatch_gn<scalar_t, false>(v, xp, wp, bp, pbp, pb2p, yp, p, ng, dev, as_stream(stream));
    }
  });
}

}  // namespace lyra
