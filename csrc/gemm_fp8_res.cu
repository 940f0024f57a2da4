// gemm_fp8_res.cu: a W8A8 (fp8 e4m3) linear with its residual added in the GEMM's epilogue,
// one CUTLASS sm90 GEMM (sm90_evt_gemm.cuh).
//
//   out[m, n] = a_scale[m] * b_scale[n] * sum_k a[m, k] w[n, k] + bias[n] + residual[m, n]
//
// in fp32, rounded once to T (fp16 / bf16). a: (M, K) e4m3 rows of stride lda; w: (N, K) e4m3
// rows of stride ldb (the quantised weight); a_scale (M,), b_scale (N,) float32; bias (N,) of T
// or 0; residual and out (M, N) contiguous (out may alias residual: each element is read once,
// by the thread that writes it). Fast fp8 accumulation (as config.quant_fast_accum's cuBLASLt
// path).
//
// Why: cuBLASLt adds a residual through C (beta = 1), and at SDXL's shapes that cost 3.5-6.6 us
// more per call than the same GEMM without it, where reading it should cost ~1.7 us
// (benchmarks/NOTES.md, session 15; 210 such calls per SDXL step). CUTLASS's TMA warp-specialised
// epilogue loads the residual tile while the mainloop runs.
//
// variant: 0 cooperative 128 x 256 x 128 tiles, 2 ping-pong 128 x 128 x 128 tiles, both
// persistent with a 2 x 1 cluster (1, stream-K, is not built for fp8).
// Requirements (checked; ValueError names the one that fails): SM90 and a build with the CUTLASS
// headers; K, lda, ldb multiples of 16; N a multiple of 8; pointers 16-byte aligned.
#include "sm90_evt_gemm.cuh"

#include <type_traits>

namespace lyra {

#if defined(LYRA_HAVE_CUTLASS)
namespace sm90 {
namespace {

template <typename T>
void run_fp8_res(const char* fn, int variant, const DeviceInfo& dev, uintptr_t a, uintptr_t w,
                 uintptr_t a_scale, uintptr_t b_scale, uintptr_t bias, uintptr_t residual, uintptr_t out,
                 int64_t M, int64_t N, int64_t K, int64_t lda, int64_t ldb, cudaStream_t s) {
  auto thread = [=](auto* fusion) {
    using Fusion = std::remove_pointer_t<decltype(fusion)>;
    return typename Fusion::Arguments{scaled_plus_bias_args<T, FirstChildArgs<Fusion>>(a_scale, b_scale, bias),
                                      {},  // + residual (C)
                                      {}};
  };
  using cutlass::gemm::PersistentScheduler;
  if (variant == 0) {
    run_evt<T, CooperativeFp8, PersistentScheduler, ScaledResidual>(fn, dev, a, w, residual, out, M, 1, N, K,
                                                                    lda, ldb, thread, s);
  } else {
    run_evt<T, PingPongFp8, PersistentScheduler, ScaledResidual>(fn, dev, a, w, residual, out, M, 1, N, K,
                                                                 lda, ldb, thread, s);
  }
}

}  // namespace
}  // namespace sm90
#endif

void gemm_fp8_res(uintptr_t a, uintptr_t w, uintptr_t a_scale, uintptr_t b_scale, uintptr_t bias,
                  uintptr_t residual, uintptr_t out, int64_t M, int64_t N, int64_t K, int64_t lda,
                  int64_t ldb, int dtype, int variant, uintptr_t stream) {
  const char* fn = "gemm_fp8_res";
  LYRA_CHECK_ARG(a != 0 && w != 0 && a_scale != 0 && b_scale != 0 && residual != 0 && out != 0, fn,
                 "a, w, a_scale, b_scale, residual and out must be non-null device pointers");
  check_w8a8_gemm_args(fn, "fp8", M, N, K, lda, ldb, dtype, variant, a_scale, b_scale,
                       {a, w, bias, residual, out});
#if defined(LYRA_HAVE_CUTLASS)
  const DeviceInfo dev = sm90::sm90_device(fn);
  cudaStream_t s = as_stream(stream);
  if (dtype == kFloat16) {
    sm90::run_fp8_res<cutlass::half_t>(fn, variant, dev, a, w, a_scale, b_scale, bias, residual, out, M, N, K,
                                       lda, ldb, s);
  } else {
    sm90::run_fp8_res<cutlass::bfloat16_t>(fn, variant, dev, a, w, a_scale, b_scale, bias, residual, out, M, N,
                                           K, lda, ldb, s);
  }
#else
  (void)stream;
  throw_no_cutlass(fn);
#endif
}

}  // namespace lyra
