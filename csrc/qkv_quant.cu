// qkv_quant.cu: q, k and v of one attention quantised to e4m3 in one pass
// (FP8 attention; with inv = 0 the same pass writes the dtype, lyra::qk_norm_rope3
// of bf16 / fp16 attention): per head, q and k get qk_norm_rope.cu's math (RMSNorm over
// D with fp32 statistics, rounded to the dtype, times the weight, rounded;
// RoPE in fp32 with unfused products, rounded), v is copied; each value then
// leaves as e4m3(value * inv_t), inv_t = scales[24 + t] (attention_fp8.cu).
//
// A block of H * D / V threads (V = 16-byte vector of the dtype) handles one token
// (b, l) of a part at a time, walking the tokens with a grid-sized stride: thread
// (h, c) holds elements [cV, cV + V) of head h of q, k and v (loaded one token ahead,
// see the kernel), normalises, rotates and stores them in turn, the D / V threads of a
// head reducing with warp shuffles; q and k each read the token's cos / sin row (k's from
// L1). Every access is a 16-byte load or a V-byte store (qk_norm_rope.cu, a warp per token
// and four heads with 4-byte accesses, was L1-bound). FLUX's pass (q, k in place, bf16)
// reaches ~2.2 TB/s on an H100, bound by latency and instruction issue rather than DRAM
// (the kernel's comment).
#include <cuda_fp8.h>

#include <algorithm>
#include <map>
#include <mutex>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common.cuh"
#include "quant.cuh"

namespace lyra {
namespace {

struct QKVParams {
  const void* src[3];
  int64_t sb[3], sl[3], sh[3];  // source strides (elements)
  const void* w[2];             // RMSNorm weights of q, k (nullptr: no norm)
  void* dst[3];
  int64_t db, dl, dh;           // output strides (elements)
  const float* cosp;
  const float* sinp;
  const float* inv;             // inv_q, inv_k, inv_v (nullptr: outputs in T, not quantised)
  int L, H, D;
  int rope_off, rope_len;
  float eps;
};

// OutT = uint8_t: e4m3 bytes (value * inv[t]); OutT = T: the values themselves
// (lyra::qk_norm_rope3, the bf16 / fp16 form of the same pass).
//
// A block walks tokens b * L + l = blockIdx.x, + gridDim.x, ... (the grid is what fits on the
// SMs at once) and loads the next token's q, k, v while it processes the current one, so the
// loads stay in flight through the math and the stores. (Alone, this did not make the pass
// faster than one block per token, session 12 run 1: the pass was bound by its instructions,
// below.)
//
// LANES = D / V threads per head when it is a compile-time constant (8 or 16: D = 64 or 128
// in 16-bit types), else 0 (read from D): with a constant the head's shuffles unroll and the
// address arithmetic simplifies (the pass issues ~600 instructions per thread and token and
// is bound by issue and latency, not DRAM: ncu, session 12). At most 56 registers: three
// 384-thread blocks per SM instead of two (FLUX's pass 60 -> 52 us on an H100; 48 registers
// spill and lose it again, 40 take 95 us).
template <typename T, typename OutT, int V, int LANES>
__global__ void __maxnreg__(56) qkv_quant_kernel(QKVParams p, unsigned ntok) {
  using Raw = Pack<T, V>;
  const int lanes = LANES > 0 ? LANES : p.D / V;  // threads per head: a power of two <= 32
  const int D = lanes * V;
  const int h = threadIdx.x / lanes;
  const bool active = h < p.H;  // the block is whole warps: the rest only join the shuffles
  const int c = (threadIdx.x % lanes) * V;
  auto src_of = [&](int t, unsigned tok) {  // B * L < 2^31 (host check): 32-bit division
    const unsigned b = tok / static_cast<unsigned>(p.L);
    const unsigned l = tok - b * static_cast<unsigned>(p.L);
    return static_cast<const T*>(p.src[t]) + b * p.sb[t] + l * p.sl[t] + h * p.sh[t] + c;
  };
  // buf[t] holds part t (q, k, v) of the token being processed; as soon as it is unpacked, the
  // same registers take the next token's part, whose load then stays in flight through this
  // token's math and stores. In place (dst = src) stays correct: tokens do not overlap, and a
  // token's values are read before they are written.
  Raw buf[3] = {};
  unsigned tok = blockIdx.x;
#pragma unroll
  for (int t = 0; t < 3; ++t)
    if (p.src[t] != nullptr && active && tok < ntok) buf[t] = load_raw<V>(src_of(t, tok));
  for (; tok < ntok; tok += gridDim.x) {
    const unsigned nt = tok + gridDim.x;
    const unsigned b = tok / static_cast<unsigned>(p.L);
    const int l = static_cast<int>(tok - b * static_cast<unsigned>(p.L));
    const int pos = l - p.rope_off;
    const bool rotate = p.cosp != nullptr && pos >= 0 && pos < p.rope_len;
#pragma unroll
    for (int t = 0; t < 3; ++t) {
      if (p.src[t] == nullptr) continue;  // uniform: no v to copy
      float v[V];
      unpack<V>(buf[t], v);
      if (active && nt < ntok) buf[t] = load_raw<V>(src_of(t, nt));
      // Roundings through T two values at a time (round_pair: one conversion instruction per
      // pair instead of two).
      if (t < 2 && p.w[t] != nullptr) {
        float ss = 0.f;
#pragma unroll
        for (int e = 0; e < V; ++e) ss += v[e] * v[e];
#pragma unroll
        for (int o = lanes >> 1; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
        // D is a power of two: ss * (1 / D) is ss / D exactly, without a division's instructions
        const float rstd = rsqrtf(ss * (1.f / static_cast<float>(D)) + p.eps);
        float w[V] = {};
        if (active) load_vec<V>(static_cast<const T*>(p.w[t]) + c, w);
#pragma unroll
        for (int e = 0; e < V; e += 2) {
          v[e] *= rstd;
          v[e + 1] *= rstd;
          round_pair<T>(v[e], v[e + 1]);
          v[e] *= w[e];
          v[e + 1] *= w[e + 1];
          round_pair<T>(v[e], v[e + 1]);
        }
      }
      if (t < 2 && rotate && active) {  // k reloads cos / sin from L1 rather than keep 2V registers
        float cs[V], sn[V];
        load_f32<V>(p.cosp + pos * D + c, cs);  // the table has < 2^31 / D rows (host check)
        load_f32<V>(p.sinp + pos * D + c, sn);
#pragma unroll
        for (int e = 0; e < V; e += 2) {
          const float ev = v[e], od = v[e + 1];
          v[e] = __fsub_rn(__fmul_rn(ev, cs[e]), __fmul_rn(od, sn[e]));
          v[e + 1] = __fadd_rn(__fmul_rn(od, cs[e + 1]), __fmul_rn(ev, sn[e + 1]));
          if constexpr (!std::is_same_v<OutT, T>) round_pair<T>(v[e], v[e + 1]);  // the e4m3 path
          // quantises the rounded value; the T path's store below rounds it the same way
        }
      }
      if (!active) continue;
      OutT* y = static_cast<OutT*>(p.dst[t]) + b * p.db + static_cast<int64_t>(l) * p.dl + h * p.dh + c;
      if constexpr (std::is_same_v<OutT, uint8_t>) {
        quant_store<V>(y, v, p.inv[t], kQuantFp8);
      } else {
        store_vec_pairs<V>(y, v);
      }
    }
  }
}

// Blocks of `threads` threads of `kernel` that fit on the device at once (cached per kernel,
// device and block size: an attribute query, safe under graph capture).
int64_t resident_blocks(const void* kernel, int threads, const char* fn) {
  const DeviceInfo info = current_device_info(fn);
  static std::map<std::tuple<const void*, int, int>, int> cache;
  static std::mutex mu;
  std::lock_guard<std::mutex> lock(mu);
  int& per_sm = cache[{kernel, info.device, threads}];
  if (per_sm == 0) {
    LYRA_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, 0), fn);
    per_sm = std::max(per_sm, 1);
  }
  return static_cast<int64_t>(per_sm) * info.sm_count;
}

}  // namespace

void qkv_quant(const std::vector<int64_t>& src, const std::vector<int64_t>& dst, uintptr_t q_weight,
               uintptr_t k_weight, uintptr_t cos, uintptr_t sin, uintptr_t inv, int64_t B, int64_t L,
               int64_t H, int64_t D, int64_t rope_l_offset, int64_t rope_len, double eps, int dtype,
               uintptr_t stream) {
  const char* fn = "qkv_quant";
  LYRA_CHECK_ARG(src.size() == 12, fn, "src must hold (ptr, stride_b, stride_l, stride_h) for q, k, v");
  LYRA_CHECK_ARG(dst.size() == 6, fn, "dst must hold q, k, v pointers and stride_b, stride_l, stride_h");
  LYRA_CHECK_ARG(aligned_to(inv, 4), fn, "inv must be a 4-byte aligned device pointer (or 0)");
  LYRA_CHECK_ARG(cos == 0 || sin != 0, fn, "sin must be non-null when cos is given");
  LYRA_CHECK_ARG(B >= 0 && L >= 0 && B * L < (1ll << 31), fn, "B * L must be in [0, 2^31)");
  LYRA_CHECK_ARG(cos == 0 || (rope_len >= 0 && rope_len * D < (1ll << 31)), fn,
                 "the cos / sin tables must have fewer than 2^31 values");
  const int64_t V = 16 / static_cast<int64_t>(dtype_size(dtype));
  const int64_t lanes = D / V;
  LYRA_CHECK_ARG(D % V == 0 && lanes >= 1 && lanes <= 32 && (lanes & (lanes - 1)) == 0, fn,
                 "D / (16-byte vector) must be a power of two <= 32, got D=" + std::to_string(D));
  LYRA_CHECK_ARG(H >= 1 && (H * lanes + 31) / 32 * 32 <= 1024, fn,
                 "H * D / vector must be <= 1024 threads");
  LYRA_CHECK_ARG(eps >= 0, fn, "eps must be >= 0");
  QKVParams p{};
  const size_t es = dtype_size(dtype);
  const size_t out_vec = inv ? static_cast<size_t>(V) : 16;  // bytes of one output vector
  for (int t = 0; t < 3; ++t) {
    const uintptr_t s = static_cast<uintptr_t>(src[4 * t]);
    const uintptr_t d = static_cast<uintptr_t>(dst[t]);
    LYRA_CHECK_ARG((s != 0 && d != 0) || (t == 2 && s == 0 && d == 0), fn,
                   "q, k pointers must be non-null (v's may both be 0: no v)");
    LYRA_CHECK_ARG(aligned_to(s, 16) && aligned_to(d, out_vec), fn,
                   "sources must be 16-byte aligned, outputs aligned to the vector");
    for (int j = 1; j < 4; ++j)
      LYRA_CHECK_ARG((src[4 * t + j] * static_cast<int64_t>(es)) % 16 == 0, fn,
                     "source strides must be multiples of 16 bytes");
    p.src[t] = reinterpret_cast<const void*>(s);
    p.sb[t] = src[4 * t + 1];
    p.sl[t] = src[4 * t + 2];
    p.sh[t] = src[4 * t + 3];
    p.dst[t] = as_ptr<void>(d);
  }
  for (int j = 3; j < 6; ++j)
    LYRA_CHECK_ARG(dst[j] % V == 0, fn, "output strides must be multiples of the vector");
  LYRA_CHECK_ARG(aligned_to(q_weight, 16) && aligned_to(k_weight, 16) && aligned_to(cos, 16) &&
                     aligned_to(sin, 16),
                 fn, "weights and cos / sin must be 16-byte aligned");
  p.db = dst[3];
  p.dl = dst[4];
  p.dh = dst[5];
  p.w[0] = reinterpret_cast<const void*>(q_weight);
  p.w[1] = reinterpret_cast<const void*>(k_weight);
  p.cosp = as_ptr<const float>(cos);
  p.sinp = as_ptr<const float>(sin);
  p.inv = as_ptr<const float>(inv);
  p.L = static_cast<int>(L);
  p.H = static_cast<int>(H);
  p.D = static_cast<int>(D);
  p.rope_off = static_cast<int>(rope_l_offset);
  p.rope_len = cos ? static_cast<int>(rope_len) : 0;
  p.eps = static_cast<float>(eps);
  if (B * L == 0) return;
  const int threads = static_cast<int>((H * lanes + 31) / 32 * 32);
  const int64_t ntok = B * L;
  cudaStream_t s = as_stream(stream);
  auto launch = [&](auto kernel) {
    const unsigned grid = static_cast<unsigned>(std::min(ntok, resident_blocks(reinterpret_cast<const void*>(kernel), threads, fn)));
    kernel<<<grid, threads, 0, s>>>(p, static_cast<unsigned>(ntok));
  };
  auto by_lanes = [&](auto out_tag, auto scalar_tag) {
    using O = decltype(out_tag);
    using S = decltype(scalar_tag);
    constexpr int V = vec16<S>();
    if (lanes == 16) {
      launch(qkv_quant_kernel<S, O, V, 16>);
    } else if (lanes == 8) {
      launch(qkv_quant_kernel<S, O, V, 8>);
    } else {
      launch(qkv_quant_kernel<S, O, V, 0>);
    }
  };
  LYRA_DISPATCH_DTYPE(dtype, fn, [&] {
    if (inv) {
      by_lanes(uint8_t{}, scalar_t{});
    } else {
      by_lanes(scalar_t{}, scalar_t{});
    }
    LYRA_CHECK_LAUNCH(fn);
  });
}

}  // namespace lyra
