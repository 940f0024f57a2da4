// quant.cuh: device helpers of the W8A8 row quantisation, shared by the
// kernels that produce quantised activations (quant.cu: quantize_rows;
// norm_modulate.cu: norm_modulate_quant; epilogue.cu: linear_epilogue_quant).
//
// Scheme (lyradynamo/quant/numerics.py is the reference, bit for bit):
//   amax  = max_k |xs[k]|                       xs: fp32 row, already smoothed
//   scale = max(amax / QMAX, 1e-12)             IEEE fp32 division (no fast math)
//   inv   = 1 / scale                           IEEE fp32 reciprocal, once per row
//   q[k]  = fp8 e4m3: cvt_rn_satfinite(xs[k] * inv)         QMAX 448
//           int8    : clamp(rint(xs[k] * inv), -127, 127)   QMAX 127
// (a multiply per element, not a division: the IEEE division was most of the
// instructions of these memory-bound passes)
// NaN propagates through amax and scale like torch.amax / clamp_min do.
#pragma once

#include <cuda_fp8.h>

#include "common.cuh"

namespace lyra {

enum QuantKind : int { kQuantFp8 = 0, kQuantInt8 = 1 };

constexpr float kQuantScaleEps = 1e-12f;

inline void check_quant_kind(int kind, const char* fn) {
  LYRA_CHECK_ARG(kind == kQuantFp8 || kind == kQuantInt8, fn,
                 "kind must be 0 (fp8 e4m3) or 1 (int8), got " + std::to_string(kind));
}

// Argument checks of a kernel writing quantised rows: q (bytes) and scale
// (float32 per row) non-null, scale and the optional inv_smooth 4-byte aligned.
inline void check_quant_out(const char* fn, uintptr_t q, uintptr_t scale, uintptr_t inv_smooth) {
  LYRA_CHECK_ARG(q != 0, fn, "q must be a non-null device pointer");
  LYRA_CHECK_ARG(scale != 0, fn, "scale must be a non-null device pointer");
  LYRA_CHECK_ARG(aligned_to(scale, 4), fn, "scale must be 4-byte aligned (float32)");
  LYRA_CHECK_ARG(inv_smooth == 0 || aligned_to(inv_smooth, 4), fn,
                 "inv_smooth must be 4-byte aligned (float32)");
}

// max that keeps a NaN from either side (fmaxf would drop it).
__device__ __forceinline__ float nan_max(float a, float b) { return (a > b || a != a) ? a : b; }

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = nan_max(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Max over a group of `nwarps` consecutive warps sharing `scratch` (same
// contract as group_sum in common.cuh: every thread of the group calls it).
__device__ __forceinline__ float group_max(float v, float* scratch, int warp_in_group,
                                           int nwarps) {
  v = warp_max(v);
  if (nwarps == 1) return v;
  const int lane = threadIdx.x & 31;
  if (lane == 0) scratch[warp_in_group] = v;
  __syncthreads();
  float t = scratch[0];
  for (int w = 1; w < nwarps; ++w) t = nan_max(t, scratch[w]);
  __syncthreads();
  return t;
}

__device__ __forceinline__ float quant_qmax(int kind) { return kind == kQuantFp8 ? 448.f : 127.f; }

// scale = max(amax / QMAX, 1e-12); written so that a NaN amax stays NaN.
__device__ __forceinline__ float quant_row_scale(float amax, int kind) {
  const float s = __fdiv_rn(amax, quant_qmax(kind));
  return s < kQuantScaleEps ? kQuantScaleEps : s;
}

// 1 / scale, correctly rounded (the reference's torch.reciprocal).
__device__ __forceinline__ float quant_inv_scale(float scale) { return __frcp_rn(scale); }

// One value -> one byte (fp8 e4m3 bits or two's-complement int8).
__device__ __forceinline__ uint8_t quant_one(float x, float inv_scale, int kind) {
  const float v = __fmul_rn(x, inv_scale);  // the reference multiplies by the same fp32 reciprocal
  if (kind == kQuantFp8) {
    return static_cast<uint8_t>(__nv_cvt_float_to_fp8(v, __NV_SATFINITE, __NV_E4M3));
  }
  int i = __float2int_rn(v);  // round half to even, like torch.round
  i = i < -127 ? -127 : (i > 127 ? 127 : i);
  return static_cast<uint8_t>(static_cast<int8_t>(i));
}

// v[e] *= inv_smooth[e] (IEEE fp32 products, as the reference) when inv_smooth
// is set; inv_smooth points at the V factors of these columns.
template <int V>
__device__ __forceinline__ void smooth(const float* inv_smooth, float (&v)[V]) {
  if (!inv_smooth) return;
  float t[V];
  load_f32<V>(inv_smooth, t);
#pragma unroll
  for (int e = 0; e < V; ++e) v[e] = __fmul_rn(v[e], t[e]);
}

// Quantises V values and stores the V bytes as one access (p aligned to V).
// fp8 pairs go through one cvt.rn.satfinite.e4m3x2.f32 (the same rounding and
// saturation as quant_one's single conversion, half the conversion instructions).
template <int V>
__device__ __forceinline__ void quant_store(uint8_t* p, const float (&v)[V], float inv_scale,
                                            int kind) {
  Pack<uint8_t, V> pk;
  if (kind == kQuantFp8 && V % 2 == 0) {
#pragma unroll
    for (int e = 0; e + 1 < V; e += 2) {
      const float2 pair = make_float2(__fmul_rn(v[e], inv_scale), __fmul_rn(v[e + 1], inv_scale));
      const __nv_fp8x2_storage_t two = __nv_cvt_float2_to_fp8x2(pair, __NV_SATFINITE, __NV_E4M3);
      pk.v[e] = static_cast<uint8_t>(two & 0xffu);  // .x in the low byte
      pk.v[e + 1] = static_cast<uint8_t>(two >> 8);
    }
  } else {
#pragma unroll
    for (int e = 0; e < V; ++e) pk.v[e] = quant_one(v[e], inv_scale, kind);
  }
  *reinterpret_cast<Pack<uint8_t, V>*>(p) = pk;
}

// Where a thread of a row-quantising kernel sits: blockDim.x threads (whole warps) per row,
// blockDim.y rows per block; valid is false past the last of `rows` (the thread still joins
// the row's barriers).
struct RowGroup {
  int tpr;          // threads per row
  int wpr;          // warps per row
  int warp_in_row;
  int64_t row;
  bool valid;
};

__device__ __forceinline__ RowGroup row_group(int64_t rows) {
  RowGroup g;
  g.tpr = blockDim.x;
  g.wpr = g.tpr >> 5;
  g.warp_in_row = threadIdx.x >> 5;
  g.row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  g.valid = g.row < rows;
  return g;
}

// quantize_row_stored after its first step: c[k] already holds vector tid + k * tpr of the
// row (for the k where that is < nvec and the row is valid), produced by the caller, which may
// issue every load of those vectors before any arithmetic (linear_epilogue_quant's act / GLU
// path). prod and post as for quantize_row_stored.
template <int V, int R, typename S, typename Prod, typename Post>
__device__ __forceinline__ void quantize_row_cached(Pack<S, V> (&c)[R], Prod& prod, Post& post,
                                                    int nvec, int tpr, int tid, float* red,
                                                    int warp_in_row, int wpr, bool valid,
                                                    uint8_t* qrow, float* scale_out, int kind) {
  float amax = 0.f;
  auto amax_of = [&](int i, const Pack<S, V>& pk) {
    float v[V];
#pragma unroll
    for (int e = 0; e < V; ++e) v[e] = to_float(pk.v[e]);
    post(i, v);
#pragma unroll
    for (int e = 0; e < V; ++e) amax = nan_max(amax, fabsf(v[e]));
  };
#pragma unroll
  for (int k = 0; k < R; ++k) {
    const int i = tid + k * tpr;
    if (valid && i < nvec) amax_of(i, c[k]);
  }
  if (valid) {
    for (int i = tid + R * tpr; i < nvec; i += tpr) {
      Pack<S, V> t;
      prod(i, t);
      amax_of(i, t);
    }
  }
  amax = group_max(amax, red, warp_in_row, wpr);
  if (!valid) return;  // past the last barrier
  const float s = quant_row_scale(amax, kind);
  const float inv = quant_inv_scale(s);
  if (tid == 0) *scale_out = s;
  auto store = [&](int i, const Pack<S, V>& pk) {
    float v[V];
#pragma unroll
    for (int e = 0; e < V; ++e) v[e] = to_float(pk.v[e]);
    post(i, v);
    quant_store<V>(qrow + static_cast<int64_t>(i) * V, v, inv, kind);
  };
#pragma unroll
  for (int k = 0; k < R; ++k) {
    const int i = tid + k * tpr;
    if (i < nvec) store(i, c[k]);
  }
  for (int i = tid + R * tpr; i < nvec; i += tpr) {
    Pack<S, V> t;
    prod(i, t);
    store(i, t);
  }
}

// Quantises one row of nvec vectors (V values each) handled by the `tpr`
// threads of a row group (tid = thread index in the group, a multiple of 32
// threads; `red` = wpr floats of shared scratch for the group).
//
// prod(i, pk) writes vector i as V values of the storage type S; post(i, v)
// turns them (as fp32) into the final values (the smoothing, or nothing). The
// first R vectors of every thread stay in registers as S between the amax pass
// and the quantise pass, and post runs again on them there (the same fp32
// products); vectors beyond R * tpr are produced again in the second pass (same
// code, same values) instead of spilling, so any row length works. A 16-bit S
// (linear_epilogue_quant with a 16-bit out_dtype, whose values are rounded to it
// before smoothing) keeps the cache at half the registers of fp32: 32 fp32
// registers spilled at 64 registers a thread.
//
// Every thread of the group must call this (it holds barriers); `valid` is
// false for a group past the last row (it joins the barriers, writes nothing).
template <int V, int R, typename S, typename Prod, typename Post>
__device__ __forceinline__ void quantize_row_stored(Prod& prod, Post& post, int nvec, int tpr,
                                                    int tid, float* red, int warp_in_row, int wpr,
                                                    bool valid, uint8_t* qrow, float* scale_out,
                                                    int kind) {
  Pack<S, V> c[R];
#pragma unroll
  for (int k = 0; k < R; ++k) {
    const int i = tid + k * tpr;
    if (valid && i < nvec) prod(i, c[k]);
  }
  quantize_row_cached<V, R, S>(c, prod, post, nvec, tpr, tid, red, warp_in_row, wpr, valid, qrow,
                               scale_out, kind);
}

// quantize_row_stored with the row cached as fp32 and nothing after prod:
// prod(i, v) writes the final fp32 values of vector i.
template <int V, int R, typename Prod>
__device__ __forceinline__ void quantize_row(Prod& prod, int nvec, int tpr, int tid, float* red,
                                             int warp_in_row, int wpr, bool valid, uint8_t* qrow,
                                             float* scale_out, int kind) {
  auto prod_f32 = [&](int i, Pack<float, V>& pk) { prod(i, pk.v); };
  auto none = [](int, float (&)[V]) {};
  quantize_row_stored<V, R, float>(prod_f32, none, nvec, tpr, tid, red, warp_in_row, wpr, valid,
                                   qrow, scale_out, kind);
}

// Threads per row for a row of nvec vectors with R cached per thread: enough
// warps to cover the row from registers, at most max_tpr (longer rows use the
// recompute loop of quantize_row).
inline int quant_threads_per_row(int64_t nvec, int R, int max_tpr) {
  int64_t tpr = (nvec + R - 1) / R;
  tpr = ((tpr + 31) / 32) * 32;
  if (tpr > max_tpr) tpr = max_tpr;
  if (tpr < 32) tpr = 32;
  return static_cast<int>(tpr);
}

// The launch shape of the row-quantising kernels (row_group's layout): quant_threads_per_row
// threads a row, rows packed into blocks of 128 threads where a row takes fewer.
struct RowLaunch {
  dim3 grid, block;
};

inline RowLaunch row_launch(int64_t rows, int64_t nvec, int R, int max_tpr, const char* fn) {
  const int tpr = quant_threads_per_row(nvec, R, max_tpr);
  const int rows_blk = tpr >= 128 ? 1 : 128 / tpr;
  const int64_t grid = (rows + rows_blk - 1) / rows_blk;
  LYRA_CHECK_ARG(grid < (1ll << 31), fn, "M too large");
  return {dim3(static_cast<unsigned>(grid)), dim3(tpr, rows_blk)};
}

}  // namespace lyra
