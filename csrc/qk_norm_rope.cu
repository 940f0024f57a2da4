// qk_norm_rope.cu: per-head RMSNorm (q/k norm) + rotary embedding, as in
// diffusers' FLUX attention processor:
//   x = attn.norm_q(x)                     (RMSNorm over head_dim D)
//   x = apply_rotary_emb(x, (cos, sin))    (use_real=True, unbind_dim=-1)
//
// x[b, l, h, 0:D] (unit stride along D, other strides in elements, so x can
// be a slice of a fused (B, L, 3*H*D) QKV projection)          // (B, L, H, D)
// Rotation of pair i = (x[2i], x[2i+1]) at position p = l - rope_l_offset:
//   out[2i]   = x[2i]   * cos[p, 2i]   - x[2i+1] * sin[p, 2i]
//   out[2i+1] = x[2i+1] * cos[p, 2i+1] + x[2i]   * sin[p, 2i+1]
// cos / sin: float32 (rope_len, D). Positions outside [0, rope_len) are only
// normalised.
//
// Numerics follow diffusers exactly (cheap: two conversions): RMSNorm computes
// x * rsqrt(mean(x^2) + eps) in fp32, rounds to the dtype, multiplies by the
// weight in the dtype (rounded again); rope then runs in fp32 on those values
// and rounds once. For fp32 the roundings are no-ops.
//
// Mappings (y may equal x: every load of a head vector precedes its stores):
// - vector path (fp16/bf16, D in {8, 16, ..., 256}, 16-byte aligned heads): a
//   lane holds 8 consecutive elements (one 16-byte access), a head is D/8 lanes,
//   a warp covers 32/(D/8) heads per pass and kVecHeads heads of one (b, l);
//   the q/k norm's sum of squares is a shuffle reduction inside the head's lanes.
//   FLUX (D = 128): 16 lanes per head, 8 heads per warp, cos/sin loaded once for
//   them; ~4x fewer load/store instructions than the pair path.
// - pair path (anything else): one warp per (b, l) and group of kHeadsPerWarp
//   heads; lane handles pairs lane + 32*k, k < 4 (D <= 256).
#include <type_traits>

#include "common.cuh"

namespace lyra {
namespace {

constexpr int kQKThreads = 256;
constexpr int kMaxPairsPerLane = 4;  // D <= 256
// Heads of one (b, l) handled by a warp: cos/sin/weight are loaded once for
// all of them and their x loads are in flight together.
constexpr int kHeadsPerWarp = 4;

struct QKParams {
  int64_t total;  // warps: B * L * hgroups
  int hgroups;    // ceil(H / kHeadsPerWarp)
  int64_t sxb, sxl, sxh, syb, syl, syh;
  int L, H, D;
  int rope_off, rope_len;
  int has_norm;
  float eps;
};

template <bool kPair, typename T>
__device__ __forceinline__ void load_pair(const T* p, float& a, float& c) {
  if constexpr (kPair) {
    float v[2];
    load_vec<2>(p, v);
    a = v[0];
    c = v[1];
  } else {
    a = to_float(p[0]);
    c = to_float(p[1]);
  }
}

template <typename T, bool kPair>
__global__ void __launch_bounds__(kQKThreads)
qk_norm_rope_kernel(const T* x, const T* __restrict__ w, const float* __restrict__ cosp,
                    const float* __restrict__ sinp, T* y, QKParams p) {
  const int64_t wid = static_cast<int64_t>(blockIdx.x) * (kQKThreads / 32) + (threadIdx.x >> 5);
  if (wid >= p.total) return;  // uniform per warp
  const int lane = threadIdx.x & 31;
  const int hg = static_cast<int>(wid % p.hgroups);
  const int64_t t = wid / p.hgroups;
  const int l = static_cast<int>(t % p.L);
  const int64_t b = t / p.L;
  const int h0 = hg * kHeadsPerWarp;
  const T* xl = x + b * p.sxb + l * p.sxl;
  T* yl = y + b * p.syb + l * p.syl;
  const int npairs = p.D >> 1;

  // Issue every load up front (x of all heads, weight, cos/sin): they are
  // independent of the reduction, so their latencies overlap.
  float ev[kHeadsPerWarp][kMaxPairsPerLane], od[kHeadsPerWarp][kMaxPairsPerLane];  // x[2i], x[2i+1]
#pragma unroll
  for (int j = 0; j < kHeadsPerWarp; ++j) {
#pragma unroll
    for (int k = 0; k < kMaxPairsPerLane; ++k) {
      const int i = lane + 32 * k;
      ev[j][k] = od[j][k] = 0.f;
      if (h0 + j < p.H && i < npairs) load_pair<kPair>(xl + (h0 + j) * p.sxh + 2 * i, ev[j][k], od[j][k]);
    }
  }
  float w0[kMaxPairsPerLane], w1[kMaxPairsPerLane];
  float c0[kMaxPairsPerLane], c1[kMaxPairsPerLane], s0[kMaxPairsPerLane], s1[kMaxPairsPerLane];
  const int pos = l - p.rope_off;
  const bool rotate = cosp != nullptr && pos >= 0 && pos < p.rope_len;
  const float* cr = rotate ? cosp + static_cast<int64_t>(pos) * p.D : nullptr;
  const float* sr = rotate ? sinp + static_cast<int64_t>(pos) * p.D : nullptr;
#pragma unroll
  for (int k = 0; k < kMaxPairsPerLane; ++k) {
    const int i = lane + 32 * k;
    w0[k] = w1[k] = c0[k] = 1.f;
    c1[k] = 1.f;
    s0[k] = s1[k] = 0.f;
    if (i < npairs) {
      if (p.has_norm && w) load_pair<kPair>(w + 2 * i, w0[k], w1[k]);
      if (rotate) {
        load_pair<kPair>(cr + 2 * i, c0[k], c1[k]);
        load_pair<kPair>(sr + 2 * i, s0[k], s1[k]);
      }
    }
  }

#pragma unroll
  for (int j = 0; j < kHeadsPerWarp; ++j) {
    if (h0 + j >= p.H) break;
    if (p.has_norm) {
      float ss = 0.f;
#pragma unroll
      for (int k = 0; k < kMaxPairsPerLane; ++k) ss += ev[j][k] * ev[j][k] + od[j][k] * od[j][k];
      ss = warp_sum(ss);
      const float rstd = rsqrtf(ss / static_cast<float>(p.D) + p.eps);
#pragma unroll
      for (int k = 0; k < kMaxPairsPerLane; ++k) {
        ev[j][k] = round_to<T>(ev[j][k] * rstd);
        od[j][k] = round_to<T>(od[j][k] * rstd);
        if (w) {
          ev[j][k] = round_to<T>(ev[j][k] * w0[k]);
          od[j][k] = round_to<T>(od[j][k] * w1[k]);
        }
      }
    }
    T* yv = yl + (h0 + j) * p.syh;
#pragma unroll
    for (int k = 0; k < kMaxPairsPerLane; ++k) {
      const int i = lane + 32 * k;
      if (i >= npairs) continue;
      float o[2] = {ev[j][k], od[j][k]};
      if (rotate) {
        o[0] = ev[j][k] * c0[k] - od[j][k] * s0[k];
        o[1] = od[j][k] * c1[k] + ev[j][k] * s1[k];
      }
      if constexpr (kPair) {
        store_vec<2>(yv + 2 * i, o);
      } else {
        yv[2 * i] = from_float<T>(o[0]);
        yv[2 * i + 1] = from_float<T>(o[1]);
      }
    }
  }
}

constexpr int kVecElems = 8;  // elements per lane on the vector path (16 bytes)
constexpr int kVecHeads = 8;  // heads of one (b, l) per warp on the vector path (at least)

template <int LPH>
__host__ __device__ constexpr int vec_heads_per_warp() {
  return (32 / LPH) > kVecHeads ? (32 / LPH) : kVecHeads;
}

// LPH = D / 8 lanes per head (a power of two dividing 32).
template <typename T, int LPH>
__global__ void __launch_bounds__(kQKThreads)
qk_norm_rope_vec_kernel(const T* x, const T* __restrict__ w, const float* __restrict__ cosp,
                        const float* __restrict__ sinp, T* y, QKParams p) {
  constexpr int kHpp = 32 / LPH;  // heads per pass
  constexpr int kPasses = vec_heads_per_warp<LPH>() / kHpp;
  const int64_t wid = static_cast<int64_t>(blockIdx.x) * (kQKThreads / 32) + (threadIdx.x >> 5);
  if (wid >= p.total) return;  // uniform per warp
  const int lane = threadIdx.x & 31;
  const int hg = static_cast<int>(wid % p.hgroups);
  const int64_t t = wid / p.hgroups;
  const int l = static_cast<int>(t % p.L);
  const int64_t b = t / p.L;
  const int d0 = (lane % LPH) * kVecElems;
  const int hbase = hg * kHpp * kPasses + lane / LPH;
  const T* xl = x + b * p.sxb + l * p.sxl + d0;
  T* yl = y + b * p.syb + l * p.syl + d0;

  float v[kPasses][kVecElems];
#pragma unroll
  for (int j = 0; j < kPasses; ++j) {
    const int h = hbase + j * kHpp;
    if (h < p.H) {
      load_vec<kVecElems>(xl + h * p.sxh, v[j]);
    } else {
#pragma unroll
      for (int e = 0; e < kVecElems; ++e) v[j][e] = 0.f;
    }
  }
  float wv[kVecElems], c[kVecElems], sn[kVecElems];
#pragma unroll
  for (int e = 0; e < kVecElems; ++e) wv[e] = c[e] = 1.f, sn[e] = 0.f;
  if (p.has_norm && w) load_vec<kVecElems>(w + d0, wv);
  const int pos = l - p.rope_off;
  const bool rotate = cosp != nullptr && pos >= 0 && pos < p.rope_len;
  if (rotate) {
    load_f32<kVecElems>(cosp + static_cast<int64_t>(pos) * p.D + d0, c);
    load_f32<kVecElems>(sinp + static_cast<int64_t>(pos) * p.D + d0, sn);
  }
  const float inv_d = 1.f / static_cast<float>(p.D);
#pragma unroll
  for (int j = 0; j < kPasses; ++j) {
    const int h = hbase + j * kHpp;
    if (p.has_norm) {  // every lane joins the shuffles, also past the last head
      float ss = 0.f;
#pragma unroll
      for (int e = 0; e < kVecElems; ++e) ss += v[j][e] * v[j][e];
#pragma unroll
      for (int o = LPH / 2; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
      const float rstd = rsqrtf(ss * inv_d + p.eps);
#pragma unroll
      for (int e = 0; e < kVecElems; ++e) {
        v[j][e] = round_to<T>(v[j][e] * rstd);
        if (w) v[j][e] = round_to<T>(v[j][e] * wv[e]);
      }
    }
    if (h >= p.H) continue;
    float o[kVecElems];
#pragma unroll
    for (int e = 0; e < kVecElems; e += 2) {
      o[e] = v[j][e];
      o[e + 1] = v[j][e + 1];
      if (rotate) {
        o[e] = v[j][e] * c[e] - v[j][e + 1] * sn[e];
        o[e + 1] = v[j][e + 1] * c[e + 1] + v[j][e] * sn[e + 1];
      }
    }
    store_vec<kVecElems>(yl + h * p.syh, o);
  }
}

// Launches the vector path when it applies (returns false otherwise).
template <typename T>
bool launch_qk_vec(const T* x, const T* w, const float* c, const float* sn, T* y, QKParams p,
                   int64_t B, cudaStream_t s) {
  if (sizeof(T) != 2 || p.D % kVecElems) return false;
  const int lph = p.D / kVecElems;
  auto go = [&](auto lph_tag) {
    constexpr int LPH = decltype(lph_tag)::value;
    const int64_t heads = vec_heads_per_warp<LPH>();
    p.hgroups = static_cast<int>((p.H + heads - 1) / heads);
    p.total = B * p.L * p.hgroups;
    const int64_t blocks = (p.total + kQKThreads / 32 - 1) / (kQKThreads / 32);
    qk_norm_rope_vec_kernel<T, LPH><<<static_cast<unsigned>(blocks), kQKThreads, 0, s>>>(x, w, c, sn, y, p);
    return true;
  };
  switch (lph) {
    case 1: return go(std::integral_constant<int, 1>{});
    case 2: return go(std::integral_constant<int, 2>{});
    case 4: return go(std::integral_constant<int, 4>{});
    case 8: return go(std::integral_constant<int, 8>{});
    case 16: return go(std::integral_constant<int, 16>{});
    case 32: return go(std::integral_constant<int, 32>{});
    default: return false;
  }
}

}  // namespace

void qk_norm_rope(uintptr_t x, uintptr_t weight, uintptr_t cos, uintptr_t sin, uintptr_t y,
                  int64_t B, int64_t L, int64_t H, int64_t D, int64_t x_stride_b,
                  int64_t x_stride_l, int64_t x_stride_h, int64_t y_stride_b, int64_t y_stride_l,
                  int64_t y_stride_h, double eps, bool has_norm, int64_t rope_l_offset,
                  int64_t rope_len, int dtype, uintptr_t stream) {
  const char* fn = "qk_norm_rope";
  LYRA_CHECK_ARG(x != 0, fn, "x must be a non-null device pointer");
  LYRA_CHECK_ARG(y != 0, fn, "y must be a non-null device pointer");
  LYRA_CHECK_ARG(B > 0, fn, "B must be positive, got " + std::to_string(B));
  LYRA_CHECK_ARG(L > 0 && L < (1ll << 31), fn, "L must be positive, got " + std::to_string(L));
  LYRA_CHECK_ARG(H > 0 && H < (1ll << 31), fn, "H must be positive, got " + std::to_string(H));
  LYRA_CHECK_ARG(D > 0 && D % 2 == 0 && D <= 2 * 32 * kMaxPairsPerLane, fn,
                 "D must be even and in [2, 256], got D=" + std::to_string(D));
  LYRA_CHECK_ARG(cos == 0 || sin != 0, fn, "sin must be non-null when cos is given");
  LYRA_CHECK_ARG(cos == 0 || (rope_len >= 0 && rope_len < (1ll << 31)), fn,
                 "rope_len must be >= 0, got " + std::to_string(rope_len));
  LYRA_CHECK_ARG(rope_l_offset >= -(1ll << 30) && rope_l_offset < (1ll << 30), fn,
                 "rope_l_offset out of range");
  LYRA_CHECK_ARG(eps >= 0, fn, "eps must be >= 0");
  const int64_t hgroups = (H + kHeadsPerWarp - 1) / kHeadsPerWarp;
  const int64_t total = B * L * hgroups;
  const int64_t blocks = (total + kQKThreads / 32 - 1) / (kQKThreads / 32);
  LYRA_CHECK_ARG(blocks < (1ll << 31), fn, "B*L*H too large");

  QKParams p;
  p.total = total;
  p.hgroups = static_cast<int>(hgroups);
  p.sxb = x_stride_b; p.sxl = x_stride_l; p.sxh = x_stride_h;
  p.syb = y_stride_b; p.syl = y_stride_l; p.syh = y_stride_h;
  p.L = static_cast<int>(L);
  p.H = static_cast<int>(H);
  p.D = static_cast<int>(D);
  p.rope_off = static_cast<int>(rope_l_offset);
  p.rope_len = cos ? static_cast<int>(rope_len) : 0;
  p.has_norm = has_norm ? 1 : 0;
  p.eps = static_cast<float>(eps);

  // Vector (8-element) accesses need every head-vector start 16-byte aligned;
  // pair (2-element) accesses need it 2-element aligned.
  const size_t es = dtype_size(dtype);
  const bool vec_ok = x_stride_b % kVecElems == 0 && x_stride_l % kVecElems == 0 &&
                      x_stride_h % kVecElems == 0 && y_stride_b % kVecElems == 0 &&
                      y_stride_l % kVecElems == 0 && y_stride_h % kVecElems == 0 &&
                      aligned_to(x, 16) && aligned_to(y, 16) && aligned_to(weight, 16) &&
                      aligned_to(cos, 16) && aligned_to(sin, 16);
  const bool pair_ok = x_stride_b % 2 == 0 && x_stride_l % 2 == 0 && x_stride_h % 2 == 0 &&
                       y_stride_b % 2 == 0 && y_stride_l % 2 == 0 && y_stride_h % 2 == 0 &&
                       aligned_to(x, 2 * es) && aligned_to(y, 2 * es) &&
                       aligned_to(weight, 2 * es) && aligned_to(cos, 8) && aligned_to(sin, 8);
  cudaStream_t s = as_stream(stream);
  const unsigned grid = static_cast<unsigned>(blocks);
  LYRA_DISPATCH_DTYPE(dtype, fn, [&] {
    auto* xp = as_ptr<const scalar_t>(x);
    auto* wp = has_norm ? as_ptr<const scalar_t>(weight) : nullptr;
    auto* cp = as_ptr<const float>(cos);
    auto* sp = as_ptr<const float>(sin);
    auto* yp = as_ptr<scalar_t>(y);
    if (vec_ok && launch_qk_vec<scalar_t>(xp, wp, cp, sp, yp, p, B, s)) {
      // launched
    } else if (pair_ok) {
      qk_norm_rope_kernel<scalar_t, true><<<grid, kQKThreads, 0, s>>>(xp, wp, cp, sp, yp, p);
    } else {
      qk_norm_rope_kernel<scalar_t, false><<<grid, kQKThreads, 0, s>>>(xp, wp, cp, sp, yp, p);
    }
    LYRA_CHECK_LAUNCH(fn);
  });
}

}  // namespace lyra
