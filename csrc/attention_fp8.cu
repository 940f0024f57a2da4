// attention_fp8.cu: the per-tensor scales of FP8 attention (cuDNN's fp8 SDPA
// takes q, k, v in e4m3 with one scale each).
//
// For each of q, k, v (tensor t = 0, 1, 2) the bound b_t of |values| is either
//   - the amax over its parts: 4-D views (B, L, H, D), unit stride along D
//     (slices of a projection output; several parts = their concatenation), or
//   - sqrt(D) * max|w| over its RMSNorm weights, when the tensor is an RMS-
//     normalised head vector times w (then rotated pairwise by RoPE, which keeps
//     each pair's norm): |x_i| / rms(x) <= sqrt(D), so no pass over the data.
// Then, as quant.cuh does per row (IEEE fp32, numerics.py is the reference):
//   descale_t = max(b_t / 448, 1e-12),  inv_t = 1 / descale_t
//
// out: 32 float32, each scalar cuDNN reads 16-byte aligned:
//   [0] descale_q  [4] descale_k  [8] descale_v  [12] descale_s = 1/448
//   [16] scale_s = 448  [20] scale_o = inv_v (O leaves in v's scale: every O
//   row is a convex combination of v rows, |O| <= amax(v))
//   [24..26] inv_q, inv_k, inv_v (for the quantising producers)
//   [28..30] amax accumulators (float bits as int), [31] block counter: they
//   must be zero at the call (out zeroed); the last block to finish writes the
//   scales and zeroes them again.
#include <vector>

#include "common.cuh"
#include "quant.cuh"

namespace lyra {
namespace {

constexpr int kScaleThreads = 256;
constexpr int kMaxParts = 6;    // up to 2 parts each for q, k, v
constexpr int kMaxWeights = 4;  // up to 2 RMSNorm weights each for q, k

struct ScaleParams {
  const void* ptr[kMaxParts];
  int64_t sb[kMaxParts], sl[kMaxParts], sh[kMaxParts];
  int64_t L[kMaxParts], H[kMaxParts];
  int64_t begin[kMaxParts + 1];  // first vector of each part; begin[nparts] = total
  int tensor[kMaxParts];
  int nparts;
  const void* w[kMaxWeights];
  int wtensor[kMaxWeights];
  int nw;
  int D;
  int vecs_per_row;  // D / V
};

// Locates vector g (< total < 2^31: 32-bit index math) and loads its V values.
template <typename T, int V>
__device__ __forceinline__ int load_part_vec(const ScaleParams& p, int g, float (&v)[V]) {
  int q = 0;
  while (g >= p.begin[q + 1]) ++q;
  const int local = g - static_cast<int>(p.begin[q]);
  const int row = local / p.vecs_per_row;
  const int c = (local - row * p.vecs_per_row) * V;
  const int H = static_cast<int>(p.H[q]), L = static_cast<int>(p.L[q]);
  const int t = row / H;
  const int h = row - t * H;
  const int b = t / L;
  const int l = t - b * L;
  const T* src = static_cast<const T*>(p.ptr[q]) + b * p.sb[q] + l * p.sl[q] + h * p.sh[q] + c;
  if constexpr (V > 1) {
    load_vec<V>(src, v);
  } else {
    v[0] = to_float(src[0]);
  }
  return p.tensor[q];
}

constexpr int kScaleUnroll = 4;  // vectors in flight per thread

template <typename T, int V>
__global__ void __launch_bounds__(kScaleThreads)
attention_fp8_scales_kernel(ScaleParams p, float* out) {
  float m[3] = {0.f, 0.f, 0.f};
  const int total = static_cast<int>(p.begin[p.nparts]);
  const int stride = gridDim.x * kScaleThreads;
  for (int g0 = blockIdx.x * kScaleThreads + threadIdx.x; g0 < total; g0 += stride * kScaleUnroll) {
    float v[kScaleUnroll][V];
    int ti[kScaleUnroll];
#pragma unroll
    for (int u = 0; u < kScaleUnroll; ++u) {  // every load issued before any is used
      const int g = g0 + u * stride;
      ti[u] = g < total ? load_part_vec<T, V>(p, g, v[u]) : -1;
    }
#pragma unroll
    for (int u = 0; u < kScaleUnroll; ++u) {
      float a = 0.f;
#pragma unroll
      for (int e = 0; e < V; ++e) a = nan_max(a, fabsf(v[u][e]));
      m[0] = ti[u] == 0 ? nan_max(m[0], a) : m[0];
      m[1] = ti[u] == 1 ? nan_max(m[1], a) : m[1];
      m[2] = ti[u] == 2 ? nan_max(m[2], a) : m[2];
    }
  }
  __shared__ float red[3][kScaleThreads / 32];
  __shared__ bool last;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int t = 0; t < 3; ++t) {
    const float r = warp_max(m[t]);
    if (lane == 0) red[t][warp] = r;
  }
  __syncthreads();
  int* acc = reinterpret_cast<int*>(out + 28);
  if (threadIdx.x < 3) {
    float r = red[threadIdx.x][0];
    for (int w = 1; w < kScaleThreads / 32; ++w) r = nan_max(r, red[threadIdx.x][w]);
    // |x| >= 0 (a NaN has its sign cleared): int order = float order, NaN above inf
    if (r != 0.f) atomicMax(acc + threadIdx.x, __float_as_int(r));
  }
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) {
    unsigned* counter = reinterpret_cast<unsigned*>(out + 31);
    last = atomicAdd(counter, 1u) == gridDim.x - 1;
  }
  __syncthreads();
  if (!last || warp != 0) return;
  // The last block: weight bounds (warp 0), then the scales (lane 0).
  float wmax[2] = {0.f, 0.f};
  for (int j = 0; j < p.nw; ++j) {
    const T* w = static_cast<const T*>(p.w[j]);
    float a = 0.f;
    for (int i = lane; i < p.D; i += 32) a = nan_max(a, fabsf(to_float(w[i])));
    a = warp_max(a);
    wmax[p.wtensor[j]] = nan_max(wmax[p.wtensor[j]], a);
  }
  if (lane != 0) return;
  bool has_w[2] = {false, false};
  for (int j = 0; j < p.nw; ++j) has_w[p.wtensor[j]] = true;
  const float sqrt_d = sqrtf(static_cast<float>(p.D));
#pragma unroll
  for (int t = 0; t < 3; ++t) {
    const float bound = (t < 2 && has_w[t]) ? __fmul_rn(wmax[t], sqrt_d)
                                            : __int_as_float(atomicAdd(acc + t, 0));
    const float descale = quant_row_scale(bound, kQuantFp8);
    out[4 * t] = descale;
    out[24 + t] = quant_inv_scale(descale);
  }
  out[12] = quant_inv_scale(448.f);
  out[16] = 448.f;
  out[20] = out[26];
  // leave the accumulators and the counter zeroed: out is exactly the reference's
  for (int t = 0; t < 4; ++t) reinterpret_cast<int*>(out)[28 + t] = 0;
}

}  // namespace

void attention_fp8_scales(const std::vector<int64_t>& parts, const std::vector<int64_t>& weights,
                          int64_t D, uintptr_t out, int dtype, uintptr_t stream) {
  const char* fn = "attention_fp8_scales";
  LYRA_CHECK_ARG(out != 0 && aligned_to(out, 16), fn, "out must be a 16-byte aligned device pointer");
  LYRA_CHECK_ARG(D > 0 && D <= 1024, fn, "D must be in [1, 1024], got " + std::to_string(D));
  LYRA_CHECK_ARG(parts.size() % 8 == 0 && parts.size() / 8 <= kMaxParts, fn,
                 "parts must hold 8 values (tensor, ptr, B, L, H, stride_b, stride_l, stride_h) "
                 "per part, at most " + std::to_string(kMaxParts) + " parts");
  LYRA_CHECK_ARG(weights.size() % 2 == 0 && weights.size() / 2 <= kMaxWeights, fn,
                 "weights must hold 2 values (tensor, ptr) per weight, at most " +
                     std::to_string(kMaxWeights));
  ScaleParams p{};
  p.D = static_cast<int>(D);
  p.nparts = static_cast<int>(parts.size() / 8);
  p.nw = static_cast<int>(weights.size() / 2);
  bool covered[3] = {false, false, false};
  const size_t es = dtype_size(dtype);
  bool vec_ok = (D * static_cast<int64_t>(es)) % 16 == 0;
  p.begin[0] = 0;
  for (int i = 0; i < p.nparts; ++i) {
    const int64_t* d = parts.data() + 8 * i;
    LYRA_CHECK_ARG(d[0] >= 0 && d[0] <= 2, fn, "part tensor index must be 0 (q), 1 (k) or 2 (v)");
    LYRA_CHECK_ARG(d[1] != 0 || d[2] * d[3] * d[4] == 0, fn, "part pointers must be non-null");
    LYRA_CHECK_ARG(d[2] >= 0 && d[3] >= 0 && d[4] > 0, fn, "part sizes must be B, L >= 0, H > 0");
    p.tensor[i] = static_cast<int>(d[0]);
    p.ptr[i] = reinterpret_cast<const void*>(static_cast<uintptr_t>(d[1]));
    p.L[i] = d[3] > 0 ? d[3] : 1;
    p.H[i] = d[4];
    p.sb[i] = d[5];
    p.sl[i] = d[6];
    p.sh[i] = d[7];
    p.begin[i + 1] = p.begin[i] + d[2] * d[3] * d[4] * D;  // elements for now
    covered[d[0]] = true;
    vec_ok = vec_ok && (d[2] * d[3] == 0 || aligned_to(static_cast<uintptr_t>(d[1]), 16)) &&
             (d[5] * static_cast<int64_t>(es)) % 16 == 0 && (d[6] * static_cast<int64_t>(es)) % 16 == 0 &&
             (d[7] * static_cast<int64_t>(es)) % 16 == 0;
  }
  for (int j = 0; j < p.nw; ++j) {
    const int64_t t = weights[2 * j];
    LYRA_CHECK_ARG(t == 0 || t == 1, fn, "weight tensor index must be 0 (q) or 1 (k)");
    LYRA_CHECK_ARG(weights[2 * j + 1] != 0, fn, "weight pointers must be non-null");
    p.wtensor[j] = static_cast<int>(t);
    p.w[j] = reinterpret_cast<const void*>(static_cast<uintptr_t>(weights[2 * j + 1]));
    covered[t] = true;
  }
  LYRA_CHECK_ARG(covered[0] && covered[1] && covered[2], fn,
                 "q, k and v each need parts or (q, k) RMSNorm weights");
  const int V = vec_ok ? static_cast<int>(16 / es) : 1;
  p.vecs_per_row = static_cast<int>(D / V);
  for (int i = 0; i <= p.nparts; ++i) p.begin[i] /= V;
  LYRA_CHECK_ARG(p.begin[p.nparts] < (1ll << 31) - 2ll * 1024 * kScaleThreads * kScaleUnroll, fn,
                 "too many elements (the kernel indexes vectors with 32-bit integers)");
  const DeviceInfo dev = current_device_info(fn);
  const int64_t want = (p.begin[p.nparts] + kScaleThreads - 1) / kScaleThreads;
  const int64_t cap = static_cast<int64_t>(dev.sm_count) * 4;
  const unsigned grid = static_cast<unsigned>(want < 1 ? 1 : (want > cap ? cap : want));
  cudaStream_t s = as_stream(stream);
  float* o = as_ptr<float>(out);
  LYRA_DISPATCH_DTYPE(dtype, fn, [&] {
    if (V > 1) {
      attention_fp8_scales_kernel<scalar_t, vec16<scalar_t>()><<<grid, kScaleThreads, 0, s>>>(p, o);
    } else {
      attention_fp8_scales_kernel<scalar_t, 1><<<grid, kScaleThreads, 0, s>>>(p, o);
    }
    LYRA_CHECK_LAUNCH(fn);
  });
}

}  // namespace lyra
