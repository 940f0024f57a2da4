// norm_modulate.cu: LayerNorm / RMSNorm over the last dim with fused affine
// and adaLN modulation (DiT / FLUX / SD3 "norm1(x) * (1 + scale) + shift").
//
// For row r of x (rows, D), b = r / rows_per_batch:
//   n = (x - mean) * rsqrt(var + eps)          (LayerNorm, biased var)   or
//   n = x * rsqrt(mean(x^2) + eps)             (RMSNorm, rms = true)
//   n = n * weight[d] + bias[d]                (each optional)
//   m = mul[b*mul_bstride + d]                 or, with mul_offset != 0,
//   m = round_to_dtype(mul_offset + mul[..])   (DiT's `1 + scale`: the caller
//       passes scale and 1; rounded once to T, the value eager's aten add stores)
//   y = n * m + add[b*add_bstride + d]         (mul, add each optional)
// Everything else is fp32 from the load to the single final rounding, so y is
// at least as accurate as eager PyTorch, which rounds after every op.
// The parameter vectors (weight, bias, mul, add) are of x's type T or, with
// param_dtype = float32 and x 16-bit, all float32 (P below): Wan-style blocks
// compute `(norm(x.float()) * (1 + scale) + shift).type_as(x)` with fp32 scale
// and shift; here that is one pass, x read in T and y written in T, the
// arithmetic the same fp32 eager does (mul_offset + mul is then rounded to
// float32, i.e. not at all).
//
// Mapping: a row is handled by `tpr` threads (a multiple of 32: one or more
// warps, blockDim.x) and a block holds blockDim.y rows. Each thread caches up
// to kMaxVec vectors of V elements in registers, so x is read exactly once;
// mean and variance are an exact two-pass over those registers.
// Every fp32 op is an explicit intrinsic (__fmul_rn, __fadd_rn, __fmaf_rn): the
// compiler cannot contract differently in the two instantiations below, so
// norm_modulate_quant sees bit for bit the values norm_modulate stores.
//
// x's rows may be strided (x_row_stride >= D, default D): a column slice of a wider matrix, as
// q and k are of a fused q/k/v projection's output, is read in place (no contiguous copy).
//
// norm_modulate_quant: the same row computation, but instead of y it writes the
// W8A8 activation of the next (quantised) linear (see quant.cuh / quant.cu):
//   yr = round_to_dtype(y)                    exactly norm_modulate's output value
//   xs = yr * inv_smooth                      (fp32, if inv_smooth)
//   scale[r] = max(max_d |xs| / QMAX, 1e-12)  (rows,) fp32
//   q[r, d]  = quant(xs * (1 / scale[r]))     (rows, D) contiguous, 1 byte
// so q == numerics.quantize_rows(norm_modulate(...)) bit for bit; y itself is
// never written. Both entry points share the kernel below (kQuant template).
#include <type_traits>

#include "quant.cuh"

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
  int64_t ldx;  // x's row stride (elements): D, or more for a column slice of a wider matrix
  int D;
  int nvec;  // D / V
  int rms;
  float eps;
  float mul_offset;  // added to mul (then rounded to T) when != 0
};

// Quantised output of norm_modulate_quant (unused by norm_modulate).
struct NMQuantOut {
  const float* inv_smooth;
  uint8_t* q;
  float* scale;
  int kind;
};

// V parameter values from p: one 16-byte access per 16 bytes (V floats may span two).
template <int V, typename P>
__device__ __forceinline__ void load_param(const P* p, float (&out)[V]) {
  if constexpr (std::is_same_v<P, float>) {
    load_f32<V>(p, out);
  } else {
    load_vec<V>(p, out);
  }
}

template <typename T, typename P, int V, bool kQuant>
__global__ void __launch_bounds__(max_tpr<V>(), 1)
norm_modulate_kernel(const T* x, const P* __restrict__ w, const P* __restrict__ bias,
                     const P* __restrict__ mul, const P* __restrict__ add, T* y, NMQuantOut qo,
                     NMParams p) {
  // x / y are not __restrict__: in-place (y == x) is fine, the whole row is in
  // registers before the first store.
  __shared__ float s_red[32];  // one slot per warp of the block
  const int tpr = blockDim.x;
  const int wpr = tpr >> 5;                       // warps per row
  const int warp_in_row = threadIdx.x >> 5;
  float* red = s_red + threadIdx.y * wpr;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  const bool valid = row < p.rows;  // no early return: all threads join the barriers
  const T* xr = x + row * p.ldx;

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
    for (int e = 0; e < V; ++e) s = p.rms ? __fmaf_rn(v[k][e], v[k][e], s) : __fadd_rn(s, v[k][e]);
  }
  s = group_sum(s, red, warp_in_row, wpr);

  float mean = 0.f, rstd;
  const float inv_d = 1.f / static_cast<float>(p.D);
  if (p.rms) {
    rstd = rsqrtf(__fmaf_rn(s, inv_d, p.eps));
  } else {
    mean = __fmul_rn(s, inv_d);
    float q = 0.f;  // second pass from registers: exact, no E[x^2]-E[x]^2 cancellation
#pragma unroll
    for (int k = 0; k < kMaxVec; ++k) {
      const int i = threadIdx.x + k * tpr;
      if (i < p.nvec) {
#pragma unroll
        for (int e = 0; e < V; ++e) {
          const float dv = __fsub_rn(v[k][e], mean);
          q = __fmaf_rn(dv, dv, q);
        }
      }
    }
    q = group_sum(q, red, warp_in_row, wpr);
    rstd = rsqrtf(__fmaf_rn(q, inv_d, p.eps));
  }
  const int64_t b = row / p.rows_per_batch;
  const P* mulr = mul ? mul + b * p.mul_bstride : nullptr;
  const P* addr = add ? add + b * p.add_bstride : nullptr;
  // The normalised + modulated fp32 values of cached vector k (element d = i * V).
  auto finish = [&](int k, int d, float (&o)[V]) {
    float t[V];
#pragma unroll
    for (int e = 0; e < V; ++e) o[e] = __fmul_rn(__fsub_rn(v[k][e], mean), rstd);
    if (w) {
      load_param<V>(w + d, t);
#pragma unroll
      for (int e = 0; e < V; ++e) o[e] = __fmul_rn(o[e], t[e]);
    }
    if (bias) {
      load_param<V>(bias + d, t);
#pragma unroll
      for (int e = 0; e < V; ++e) o[e] = __fadd_rn(o[e], t[e]);
    }
    if (mulr) {
      load_param<V>(mulr + d, t);
      if (p.mul_offset != 0.f) {
#pragma unroll
        for (int e = 0; e < V; ++e) t[e] = round_to<P>(__fadd_rn(p.mul_offset, t[e]));
      }
#pragma unroll
      for (int e = 0; e < V; ++e) o[e] = __fmul_rn(o[e], t[e]);
    }
    if (addr) {
      load_param<V>(addr + d, t);
#pragma unroll
      for (int e = 0; e < V; ++e) o[e] = __fadd_rn(o[e], t[e]);
    }
  };

  if constexpr (!kQuant) {
    if (!valid) return;  // past the last barrier
    T* yr = y + row * p.D;
#pragma unroll
    for (int k = 0; k < kMaxVec; ++k) {
      const int i = threadIdx.x + k * tpr;
      if (i >= p.nvec) continue;
      const int d = i * V;
      float o[V];
      finish(k, d, o);
      store_vec<V>(yr + d, o);
    }
  } else {
    // Round to T (the value norm_modulate stores), smooth, keep in v for pass 2.
    float amax = 0.f;
#pragma unroll
    for (int k = 0; k < kMaxVec; ++k) {
      const int i = threadIdx.x + k * tpr;
      if (!valid || i >= p.nvec) continue;
      const int d = i * V;
      float o[V];
      finish(k, d, o);
#pragma unroll
      for (int e = 0; e < V; ++e) o[e] = round_to<T>(o[e]);
      smooth<V>(qo.inv_smooth ? qo.inv_smooth + d : nullptr, o);
#pragma unroll
      for (int e = 0; e < V; ++e) {
        v[k][e] = o[e];
        amax = nan_max(amax, fabsf(o[e]));
      }
    }
    amax = group_max(amax, red, warp_in_row, wpr);
    if (!valid) return;  // past the last barrier
    const float sc = quant_row_scale(amax, qo.kind);
    const float inv = quant_inv_scale(sc);
    if (threadIdx.x == 0) qo.scale[row] = sc;
    uint8_t* qr = qo.q + row * p.D;
#pragma unroll
    for (int k = 0; k < kMaxVec; ++k) {
      const int i = threadIdx.x + k * tpr;
      if (i < p.nvec) quant_store<V>(qr + i * V, v[k], inv, qo.kind);
    }
  }
}

template <typename T, typename P, int V, bool kQuant>
void launch_nm(const T* x, const P* w, const P* b, const P* mul, const P* add, T* y,
               NMQuantOut qo, NMParams p, cudaStream_t stream, const char* fn) {
  p.nvec = p.D / V;
  // Threads per row: enough warps that kMaxVec vectors per thread cover D.
  int tpr = (p.nvec + kMaxVec - 1) / kMaxVec;
  tpr = ((tpr + 31) / 32) * 32;
  if (tpr > max_tpr<V>() || p.nvec > tpr * kMaxVec) {
    throw std::invalid_argument(std::string(fn) + ": D=" + std::to_string(p.D) +
                                " too large (max " + std::to_string(max_tpr<V>() * kMaxVec * V) +
                                " for this dtype/alignment)");
  }
  // Several rows per block for small D, so blocks have >= 128 threads.
  const int rows_blk = tpr >= 128 ? 1 : 128 / tpr;
  const int64_t grid = (p.rows + rows_blk - 1) / rows_blk;
  LYRA_CHECK_ARG(grid < (1ll << 31), fn, "rows too large");
  norm_modulate_kernel<T, P, V, kQuant>
      <<<static_cast<unsigned>(grid), dim3(tpr, rows_blk), 0, stream>>>(x, w, b, mul, add, y, qo, p);
  LYRA_CHECK_LAUNCH(fn);
}

}  // namespace

namespace {

// Argument checks and parameters shared by norm_modulate and norm_modulate_quant.
NMParams nm_params(const char* fn, uintptr_t x, uintptr_t mul, int64_t rows, int64_t D,
                   int64_t rows_per_batch, int64_t mul_bstride, int64_t add_bstride, double eps,
                   bool rms, double mul_offset) {
  LYRA_CHECK_ARG(x != 0, fn, "x must be a non-null device pointer");
  LYRA_CHECK_ARG(mul != 0 || mul_offset == 0, fn,
                 "mul_offset=" + std::to_string(mul_offset) + " needs mul (it is added to mul)");
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
  p.ldx = D;
  p.nvec = p.D;
  p.rms = rms ? 1 : 0;
  p.eps = static_cast<float>(eps);
  p.mul_offset = static_cast<float>(mul_offset);  // eager's add also takes the scalar as fp32
  return p;
}

// 16-byte path only when every row / batch offset and input pointer is
// aligned. The same rule (plus the output's alignment) for both entry points,
// so they reduce in the same order and norm_modulate_quant quantises exactly
// norm_modulate's values whenever both outputs are 16-byte aligned.
bool nm_vec_ok(int dtype, int64_t D, int64_t mul_bstride, int64_t add_bstride, uintptr_t x,
               uintptr_t weight, uintptr_t bias, uintptr_t mul, uintptr_t add) {
  const size_t vbytes = 16;
  const int vmax = static_cast<int>(vbytes / dtype_size(dtype));
  return D % vmax == 0 && mul_bstride % vmax == 0 && add_bstride % vmax == 0 &&
         aligned_to(x, vbytes) && aligned_to(weight, vbytes) && aligned_to(bias, vbytes) &&
         aligned_to(mul, vbytes) && aligned_to(add, vbytes);
}

}  // namespace

void norm_modulate(uintptr_t x, uintptr_t weight, uintptr_t bias, uintptr_t mul, uintptr_t add,
                   uintptr_t y, int64_t rows, int64_t D, int64_t rows_per_batch,
                   int64_t mul_bstride, int64_t add_bstride, double eps, bool rms, int dtype,
                   uintptr_t stream, double mul_offset, int param_dtype, int64_t x_row_stride) {
  const char* fn = "norm_modulate";
  LYRA_CHECK_ARG(y != 0, fn, "y must be a non-null device pointer");
  if (param_dtype < 0) param_dtype = dtype;
  LYRA_CHECK_ARG(param_dtype == dtype || (param_dtype == kFloat32 && dtype != kFloat32), fn,
                 "param_dtype must be dtype or float32 (with 16-bit x), got " +
                     std::to_string(param_dtype) + " for dtype " + std::to_string(dtype));
  NMParams p = nm_params(fn, x, mul, rows, D, rows_per_batch, mul_bstride, add_bstride, eps, rms,
                         mul_offset);
  if (x_row_stride >= 0) {
    LYRA_CHECK_ARG(x_row_stride >= D, fn,
                   "x_row_stride must be >= D, got " + std::to_string(x_row_stride));
    p.ldx = x_row_stride;
  }
  const int vmax = 16 / dtype_size(dtype);
  const bool vec_ok = nm_vec_ok(dtype, D, mul_bstride, add_bstride, x, weight, bias, mul, add) &&
                      aligned_to(y, 16) && p.ldx % vmax == 0;
  const NMQuantOut no_quant{nullptr, nullptr, nullptr, 0};
  cudaStream_t s = as_stream(stream);
  LYRA_DISPATCH_DTYPE(dtype, fn, [&] {
    auto launch = [&](auto* param_type) {
      using P = std::remove_const_t<std::remove_pointer_t<decltype(param_type)>>;
      auto* xp = as_ptr<const scalar_t>(x);
      auto* wp = as_ptr<const P>(weight);
      auto* bp = as_ptr<const P>(bias);
      auto* mp = as_ptr<const P>(mul);
      auto* ap = as_ptr<const P>(add);
      auto* yp = as_ptr<scalar_t>(y);
      if (vec_ok) {
        launch_nm<scalar_t, P, vec16<scalar_t>(), false>(xp, wp, bp, mp, ap, yp, no_quant, p, s, fn);
      } else {
        launch_nm<scalar_t, P, 1, false>(xp, wp, bp, mp, ap, yp, no_quant, p, s, fn);
      }
    };
    if constexpr (std::is_same_v<scalar_t, float>) {
      launch(static_cast<const float*>(nullptr));
    } else if (param_dtype == kFloat32) {
      launch(static_cast<const float*>(nullptr));
    } else {
      launch(static_cast<const scalar_t*>(nullptr));
    }
  });
}

void norm_modulate_quant(uintptr_t x, uintptr_t weight, uintptr_t bias, uintptr_t mul,
                         uintptr_t add, uintptr_t inv_smooth, uintptr_t q, uintptr_t scale,
                         int64_t rows, int64_t D, int64_t rows_per_batch, int64_t mul_bstride,
                         int64_t add_bstride, double eps, bool rms, int kind, int dtype,
                         uintptr_t stream, double mul_offset) {
  const char* fn = "norm_modulate_quant";
  check_quant_out(fn, q, scale, inv_smooth);
  check_quant_kind(kind, fn);
  const NMParams p = nm_params(fn, x, mul, rows, D, rows_per_batch, mul_bstride, add_bstride, eps,
                               rms, mul_offset);
  const bool vec_ok = nm_vec_ok(dtype, D, mul_bstride, add_bstride, x, weight, bias, mul, add) &&
                      aligned_to(q, 16) && aligned_to(inv_smooth, 16);
  const NMQuantOut qo{as_ptr<const float>(inv_smooth), as_ptr<uint8_t>(q), as_ptr<float>(scale),
                      kind};
  cudaStream_t s = as_stream(stream);
  LYRA_DISPATCH_DTYPE(dtype, fn, [&] {
    auto* xp = as_ptr<const scalar_t>(x);
    auto* wp = as_ptr<const scalar_t>(weight);
    auto* bp = as_ptr<const scalar_t>(bias);
    auto* mp = as_ptr<const scalar_t>(mul);
    auto* ap = as_ptr<const scalar_t>(add);
    if (vec_ok) {
      launch_nm<scalar_t, scalar_t, vec16<scalar_t>(), true>(xp, wp, bp, mp, ap, nullptr, qo, p, s, fn);
    } else {
      launch_nm<scalar_t, scalar_t, 1, true>(xp, wp, bp, mp, ap, nullptr, qo, p, s, fn);
    }
  });
}

}  // namespace lyra
