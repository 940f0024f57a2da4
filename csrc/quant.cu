// quant.cu: per-row (per-token) dynamic quantisation of activations to fp8 e4m3
// or int8, with optional SmoothQuant smoothing (W8A8).
//
//   x (M, K) row-major, row stride ld_x (elements), fp32 / fp16 / bf16
//   inv_smooth (K,) fp32 or 0;  xs = fp32(x) * inv_smooth   (one fp32 multiply)
//   scale[m] = max(max_k |xs[m, k]| / QMAX, 1e-12)          (M,) fp32
//   q[m, k]  = quant(xs[m, k] * (1 / scale[m]))             (M, K) contiguous, 1 byte
// kind 0: fp8 e4m3 (QMAX 448, round to nearest even, saturating);
// kind 1: int8 (QMAX 127, round half to even, clamp to [-127, 127]).
// Bit-exact with lyradynamo.quant.numerics.quantize_rows (quant.cuh).
//
// Mapping: a row is handled by `tpr` threads (one to sixteen warps, blockDim.x),
// each keeping R vectors of V elements (16-byte loads when aligned, else
// V = 1) in registers between the amax pass and the quantise pass, so x is
// read once for rows up to 512 * R * V elements (16384 fp16/bf16 values) and
// re-read from L2 beyond that. Short rows share a block (blockDim.y rows) so
// blocks keep >= 128 threads.
#include "quant.cuh"

namespace lyra {
namespace {

constexpr int kQuantMaxTpr = 512;

struct QRParams {
  int64_t M;
  int64_t ld_x;
  int K;
  int nvec;  // K / V
  int kind;
};

template <typename T, int V, int R>
__global__ void __launch_bounds__(kQuantMaxTpr)
quantize_rows_kernel(const T* __restrict__ x, const float* __restrict__ inv_smooth,
                     uint8_t* __restrict__ q, float* __restrict__ scale, QRParams p) {
  __shared__ float s_red[kQuantMaxTpr / 32];
  const RowGroup rg = row_group(p.M);
  const T* xr = x + (rg.valid ? rg.row : 0) * p.ld_x;
  auto prod = [&](int i, float (&v)[V]) {
    load_vec<V>(xr + static_cast<int64_t>(i) * V, v);
    smooth<V>(inv_smooth ? inv_smooth + static_cast<int64_t>(i) * V : nullptr, v);
  };
  quantize_row<V, R>(prod, p.nvec, rg.tpr, threadIdx.x, s_red + threadIdx.y * rg.wpr, rg.warp_in_row, rg.wpr,
                     rg.valid, q + (rg.valid ? rg.row : 0) * p.K, scale + (rg.valid ? rg.row : 0), p.kind);
}

template <typename T, int V, int R>
void launch_qr(const T* x, const float* inv, uint8_t* q, float* scale, QRParams p,
               cudaStream_t s) {
  p.nvec = p.K / V;
  const RowLaunch l = row_launch(p.M, p.nvec, R, kQuantMaxTpr, "quantize_rows");
  quantize_rows_kernel<T, V, R><<<l.grid, l.block, 0, s>>>(x, inv, q, scale, p);
  LYRA_CHECK_LAUNCH("quantize_rows");
}

}  // namespace

void quantize_rows(uintptr_t x, uintptr_t inv_smooth, uintptr_t q, uintptr_t scale, int64_t M,
                   int64_t K, int64_t ld_x, int dtype, int kind, uintptr_t stream) {
  const char* fn = "quantize_rows";
  LYRA_CHECK_ARG(x != 0, fn, "x must be a non-null device pointer");
  check_quant_out(fn, q, scale, inv_smooth);
  LYRA_CHECK_ARG(M > 0, fn, "M must be positive, got " + std::to_string(M));
  LYRA_CHECK_ARG(K > 0 && K < (1ll << 30), fn, "K must be in [1, 2^30), got " + std::to_string(K));
  LYRA_CHECK_ARG(ld_x >= K, fn,
                 "ld_x must be >= K, got ld_x=" + std::to_string(ld_x) + " K=" + std::to_string(K));
  check_quant_kind(kind, fn);

  QRParams p;
  p.M = M;
  p.ld_x = ld_x;
  p.K = static_cast<int>(K);
  p.nvec = p.K;
  p.kind = kind;

  const size_t vb = 16;
  const cudaStream_t s = as_stream(stream);
  LYRA_DISPATCH_DTYPE(dtype, fn, [&] {
    constexpr int V = vec16<scalar_t>();
    const bool vec_ok = K % V == 0 && ld_x % V == 0 && aligned_to(x, vb) && aligned_to(q, vb) &&
                        aligned_to(inv_smooth, vb);
    auto* xp = as_ptr<const scalar_t>(x);
    auto* ip = as_ptr<const float>(inv_smooth);
    auto* qp = as_ptr<uint8_t>(q);
    auto* sp = as_ptr<float>(scale);
    if (vec_ok) {
      launch_qr<scalar_t, V, 4>(xp, ip, qp, sp, p, s);
    } else {
      launch_qr<scalar_t, 1, 8>(xp, ip, qp, sp, p, s);
    }
  });
}

}  // namespace lyra
