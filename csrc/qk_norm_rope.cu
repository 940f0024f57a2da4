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
// FP8 output (out_inv_scale != 0, FP8 attention): y is e4m3 bytes, each value
// the dtype-rounded result above times *out_inv_scale (one per-tensor scale,
// written on the device by attention_fp8_scales), saturating: the reference is
// quantize_tensor(qk_norm_rope(x)) of lyradynamo/ops/attention_fp8.py.
//
// Mapping: one warp per (b, l) and group of kHeadsPerWarp heads; lane handles
// pairs lane + 32*k, k < 4 (D <= 256). y may equal x: every load of a head
// vector precedes its stores.
#include <type_traits>

#include "common.cuh"
#include "quant.cuh"

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

// Stores out[2] at yv: in T, or (OutT = uint8_t) as two e4m3 bytes of the
// T-rounded values times inv.
template <typename T, typename OutT, bool kPair>
__device__ __forceinline__ void store_pair(OutT* yv, const float (&o)[2], float inv) {
  if constexpr (std::is_same_v<OutT, uint8_t>) {
    const float r[2] = {round_to<T>(o[0]), round_to<T>(o[1])};
    if constexpr (kPair) {
      quant_store<2>(yv, r, inv, kQuantFp8);
    } else {
      yv[0] = quant_one(r[0], inv, kQuantFp8);
      yv[1] = quant_one(r[1], inv, kQuantFp8);
    }
  } else if constexpr (kPair) {
    store_vec<2>(yv, o);
  } else {
    yv[0] = from_float<T>(o[0]);
    yv[1] = from_float<T>(o[1]);
  }
}

template <typename T, typename OutT, bool kPair>
__global__ void __launch_bounds__(kQKThreads)
qk_norm_rope_kernel(const T* x, const T* __restrict__ w, const float* __restrict__ cosp,
                    const float* __restrict__ sinp, OutT* y, const float* __restrict__ out_inv,
                    QKParams p) {
  const int64_t wid = static_cast<int64_t>(blockIdx.x) * (kQKThreads / 32) + (threadIdx.x >> 5);
  if (wid >= p.total) return;  // uniform per warp
  const int lane = threadIdx.x & 31;
  const int hg = static_cast<int>(wid % p.hgroups);
  const int64_t t = wid / p.hgroups;
  const int l = static_cast<int>(t % p.L);
  const int64_t b = t / p.L;
  const int h0 = hg * kHeadsPerWarp;
  const T* xl = x + b * p.sxb + l * p.sxl;
  OutT* yl = y + b * p.syb + l * p.syl;
  const float inv = out_inv ? *out_inv : 1.f;
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
    OutT* yv = yl + (h0 + j) * p.syh;
#pragma unroll
    for (int k = 0; k < kMaxPairsPerLane; ++k) {
      const int i = lane + 32 * k;
      if (i >= npairs) continue;
      float o[2] = {ev[j][k], od[j][k]};
      if (rotate) {  // products rounded on their own (no FMA), as eager's x * cos + rot * sin
        o[0] = __fsub_rn(__fmul_rn(ev[j][k], c0[k]), __fmul_rn(od[j][k], s0[k]));
        o[1] = __fadd_rn(__fmul_rn(od[j][k], c1[k]), __fmul_rn(ev[j][k], s1[k]));
      }
      store_pair<T, OutT, kPair>(yv + 2 * i, o, inv);
    }
  }
}

}  // namespace

void qk_norm_rope(uintptr_t x, uintptr_t weight, uintptr_t cos, uintptr_t sin, uintptr_t y,
                  int64_t B, int64_t L, int64_t H, int64_t D, int64_t x_stride_b,
                  int64_t x_stride_l, int64_t x_stride_h, int64_t y_stride_b, int64_t y_stride_l,
                  int64_t y_stride_h, double eps, bool has_norm, int64_t rope_l_offset,
                  int64_t rope_len, int dtype, uintptr_t out_inv_scale, uintptr_t stream) {
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
  LYRA_CHECK_ARG(aligned_to(out_inv_scale, 4), fn, "out_inv_scale must be 4-byte aligned (float32)");
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

  // Pair (2-element) accesses need every head-vector start 2-element aligned.
  const size_t es = dtype_size(dtype);
  const size_t out_es = out_inv_scale ? 1 : es;  // fp8 output: one byte per value
  const bool pair_ok = x_stride_b % 2 == 0 && x_stride_l % 2 == 0 && x_stride_h % 2 == 0 &&
                       y_stride_b % 2 == 0 && y_stride_l % 2 == 0 && y_stride_h % 2 == 0 &&
                       aligned_to(x, 2 * es) && aligned_to(y, 2 * out_es) &&
                       aligned_to(weight, 2 * es) && aligned_to(cos, 8) && aligned_to(sin, 8);
  cudaStream_t s = as_stream(stream);
  const unsigned grid = static_cast<unsigned>(blocks);
  LYRA_DISPATCH_DTYPE(dtype, fn, [&] {
    auto* xp = as_ptr<const scalar_t>(x);
    auto* wp = has_norm ? as_ptr<const scalar_t>(weight) : nullptr;
    auto* cp = as_ptr<const float>(cos);
    auto* sp = as_ptr<const float>(sin);
    auto launch = [&](auto* yp, const float* inv) {
      using OutT = std::remove_pointer_t<decltype(yp)>;
      if (pair_ok) {
        qk_norm_rope_kernel<scalar_t, OutT, true><<<grid, kQKThreads, 0, s>>>(xp, wp, cp, sp, yp, inv, p);
      } else {
        qk_norm_rope_kernel<scalar_t, OutT, false><<<grid, kQKThreads, 0, s>>>(xp, wp, cp, sp, yp, inv, p);
      }
    };
    if (out_inv_scale) {
      launch(as_ptr<uint8_t>(y), as_ptr<const float>(out_inv_scale));
    } else {
      launch(as_ptr<scalar_t>(y), nullptr);
    }
    LYRA_CHECK_LAUNCH(fn);
  });
}

}  // namespace lyra
