// norm_modulate.cu: LayerNorm / RMSNorm over the last dim with fused affine
// and adaLN modulation (DiT / FLUX / SD3 "norm1(x) * (1 + scale) + shift").
//
// For row r of x (rows, D), b = r / rows_per_batch:
//   n = (x - mean) * rsqrt(var + eps)          (LayerNorm, biased var)   or
//   n = x * rsqrt(mean(x^2) + eps)             (RMSNorm, rms = true)
//   n = n * weight[d] + bias[d]                (each optional)
//   y = n * mul[b*mul_bstride + d] + add[b*add_bstride + d]   (each optional)
// The caller passes mul = 1 + scale. Everything is fp32 from the load to the
// single final rounding, so y is at least as accurate as eager PyTorch, which
// rounds after every op.
//
// Mapping: a row is handled by `tpr` threads (a multiple of 32: one or more
// warps, blockDim.x) and a block holds blockDim.y rows. Each thread caches up
// to kMaxVec vectors of V elements in registers, so x is read exactly once;
// mean and variance are an exact two-pass over those registers.
#include "common.cuh"

namespace lyra {
namespace {

constexpr int kMaxVec = 4;
// Max threads per row: 1024 for the scalar path (D <= 4096); 512 for the
// vector paths, which keeps them at <= 128 registers (no spills) and still
// covers D <= 16384 (fp16/bf16) / 8192 (fp32).
template <int V>
constexpr int max_tpr() { return V == 1 ? 1024 : 512; }

struct NMParams {
  int64_t rows;
  int64_t rows_per_batch;
  int64_t mul_bstride;
  int64_t add_bstride;
  int D;
  int nvec;  // D / V
  int rms;
  float eps;
};

template <typename T, int V>
__global__ void __launch_bounds__(max_tpr<V>(), 1)
norm_modulate_kernel(const T* x, const T* __restrict__ w, const T* __restrict__ bias,
                     const T* __restrict__ mul, const T* __restrict__ add, T* y, NMParams p) {
  // x / y are not __restrict__: in-place (y == x) is fine, the whole row is in
  // registers before the first store.
  __shared__ float s_red[32];  // one slot per warp of the block
  const int tpr = blockDim.x;
  const int wpr = tpr >> 5;                       // warps per row
  const int warp_in_row = threadIdx.x >> 5;
  float* red = s_red + threadIdx.y * wpr;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  const bool valid = row < p.rows;  // no early return: all threads join the barriers
  const T* xr = x + row * p.D;

  // ---- load the row into registers: (kMaxVec, V) per thread -------------
  float v[kMaxVec][V];
  float s = 0.f;
#pragma unroll
  for (int k = 0; k < kMaxVec; ++k) {
    const int i = threadIdx.x + k * tpr;
    if (valid && i < p.nvec) {
      load_vec<V>(xr + i * V, v[k]);
    } else {
#pragma unroll
      for (int e = 0; e < V; ++e) v[k][e] = 0.f;
    }
#pragma unroll
    for (int e = 0; e < V; ++e) s += p.rms ? v[k][e] * v[k][e] : v[k][e];
  }
  s = group_sum(s, red, warp_in_row, wpr);

  float mean = 0.f, rstd;
  const float inv_d = 1.f / static_cast<float>(p.D);
  if (p.rms) {
    rstd = rsqrtf(s * inv_d + p.eps);
  } else {
    mean = s * inv_d;
    float q = 0.f;  // second pass from registers: exact, no E[x^2]-E[x]^2 cancellation
#pragma unroll
    for (int k = 0; k < kMaxVec; ++k) {
      const int i = threadIdx.x + k * tpr;
      if (i < p.nvec) {
#pragma unroll
        for (int e = 0; e < V; ++e) q += (v[k][e] - mean) * (v[k][e] - mean);
      }
    }
    q = group_sum(q, red, warp_in_row, wpr);
    rstd = rsqrtf(q * inv_d + p.eps);
  }
  if (!valid) return;  // past the last barrier

  const int64_t b = row / p.rows_per_batch;
  const T* mulr = mul ? mul + b * p.mul_bstride : nullptr;
  const T* addr = add ? add + b * p.add_bstride : nullptr;
  T* yr = y + row * p.D;
#pragma unroll
  for (int k = 0; k < kMaxVec; ++k) {
    const int i = threadIdx.x + k * tpr;
    if (i >= p.nvec) continue;
    const int d = i * V;
    float o[V], t[V];
#pragma unroll
    for (int e = 0; e < V; ++e) o[e] = (v[k][e] - mean) * rstd;
    if (w) {
      load_vec<V>(w + d, t);
#pragma unroll
      for (int e = 0; e < V; ++e) o[e] *= t[e];
    }
    if (bias) {
      load_vec<V>(bias + d, t);
#pragma unroll
      for (int e = 0; e < V; ++e) o[e] += t[e];
    }
    if (mulr) {
      load_vec<V>(mulr + d, t);
#pragma unroll
      for (int e = 0; e < V; ++e) o[e] *= t[e];
    }
    if (addr) {
      load_vec<V>(addr + d, t);
#pragma unroll
      for (int e = 0; e < V; ++e) o[e] += t[e];
    }
    store_vec<V>(yr + d, o);
  }
}

template <typename T, int V>
void launch_nm(const T* x, const T* w, const T* b, const T* mul, const T* add, T* y,
               NMParams p, cudaStream_t stream) {
  p.nvec = p.D / V;
  // Threads per row: enough warps that kMaxVec vectors per thread cover D.
  int tpr = (p.nvec + kMaxVec - 1) / kMaxVec;
  tpr = ((tpr + 31) / 32) * 32;
  if (tpr > max_tpr<V>() || p.nvec > tpr * kMaxVec) {
    throw std::invalid_argument("norm_modulate: D=" + std::to_string(p.D) +
                                " too large (max " + std::to_string(max_tpr<V>() * kMaxVec * V) +
                                " for this dtype/alignment)");
  }
  // Several rows per block for small D, so blocks have >= 128 threads.
  const int rows_blk = tpr >= 128 ? 1 : 128 / tpr;
  const int64_t grid = (p.rows + rows_blk - 1) / rows_blk;
  LYRA_CHECK_ARG(grid < (1ll << 31), "norm_modulate", "rows too large");
  norm_modulate_kernel<T, V><<<static_cast<unsigned>(grid), dim3(tpr, rows_blk), 0, stream>>>(
      x, w, b, mul, add, y, p);
  LYRA_CHECK_LAUNCH("norm_modulate");
}

}  // namespace

void norm_modulate(uintptr_t x, uintptr_t weight, uintptr_t bias, uintptr_t mul, uintptr_t add,
                   uintptr_t y, int64_t rows, int64_t D, int64_t rows_per_batch,
                   int64_t mul_bstride, int64_t add_bstride, double eps, bool rms, int dtype,
                   uintptr_t stream) {
  const char* fn = "norm_modulate";
  LYRA_CHECK_ARG(x != 0, fn, "x must be a non-null device pointer");
  LYRA_CHECK_ARG(y != 0, fn, "y must be a non-null device pointer");
  LYRA_CHECK_ARG(rows > 0, fn, "rows must be positive, got " + std::to_string(rows));
  LYRA_CHECK_ARG(D > 0 && D < (1 << 30), fn, "D must be positive, got " + std::to_string(D));
  LYRA_CHECK_ARG(rows_per_batch > 0, fn,
                 "rows_per_batch must be positive, got " + std::to_string(rows_per_batch));
  LYRA_CHECK_ARG(mul_bstride >= 0, fn, "mul_bstride must be >= 0");
  LYRA_CHECK_ARG(add_bstride >= 0, fn, "add_bstride must be >= 0");
  LYRA_CHECK_ARG(eps >= 0, fn, "eps must be >= 0");

  NMParams p;
  p.rows = rows;
  p.rows_per_batch = rows_per_batch;
  p.mul_bstride = mul_bstride;
  p.add_bstride = add_bstride;
  p.D = static_cast<int>(D);
  p.nvec = p.D;
  p.rms = rms ? 1 : 0;
  p.eps = static_cast<float>(eps);

  const size_t es = dtype_size(dtype);
  const size_t vbytes = 16;
  const int vmax = static_cast<int>(vbytes / es);
  // 16-byte path only when every row / batch offset and pointer is aligned.
  const bool vec_ok = D % vmax == 0 && mul_bstride % vmax == 0 && add_bstride % vmax == 0 &&
                      aligned_to(x, vbytes) && aligned_to(y, vbytes) &&
                      aligned_to(weight, vbytes) && aligned_to(bias, vbytes) &&
                      aligned_to(mul, vbytes) && aligned_to(add, vbytes);
  cudaStream_t s = as_stream(stream);
  LYRA_DISPATCH_DTYPE(dtype, fn, [&] {
    auto* xp = as_ptr<const scalar_t>(x);
    auto* wp = as_ptr<const scalar_t>(weight);
    auto* bp = as_ptr<const scalar_t>(bias);
    auto* mp = as_ptr<const scalar_t>(mul);
    auto* ap = as_ptr<const scalar_t>(add);
    auto* yp = as_ptr<scalar_t>(y);
    if (vec_ok) {
      launch_nm<scalar_t, vec16<scalar_t>()>(xp, wp, bp, mp, ap, yp, p, s);
    } else {
      launch_nm<scalar_t, 1>(xp, wp, bp, mp, ap, yp, p, s);
    }
  });
}

}  // namespace lyra
