// gemm_int8_scaled.cu: a W8A8 int8 linear with its scales, bias and (optionally) residual in the
// GEMM's epilogue, one CUTLASS sm90 GEMM (sm90_evt_gemm.cuh).
//
//   out[m, n] = a_scale[m] * b_scale[n] * sum_k a[m, k] w[n, k] + bias[n] (+ residual[m, n])
//
// The sums are exact int32 (wgmma s8 x s8), converted to fp32 in the epilogue and rounded once
// to T (fp16 / bf16). a: (M, K) int8 rows of stride lda; w: (N, K) int8 rows of stride ldb (the
// quantised weight); a_scale (M,), b_scale (N,) float32; bias (N,) of T or 0; residual 0 or
// (M, N) contiguous, out (M, N) contiguous (out may alias residual: each element is read once,
// by the thread that writes it).
//
// Why: gemm.cu's cuBLASLt int8 GEMM writes int32 sums that a second kernel scales (4 bytes per
// output element written and read again): on SDXL that made lyra-int8 slower than the 16-bit
// path (benchmarks/NOTES.md, session 17: 0.799 against 0.672 s per image).
//
// variant: 0 cooperative 128 x 256 x 128 tiles, 2 ping-pong 128 x 128 x 128 tiles, both
// persistent with a 2 x 1 cluster.
// Requirements (checked; ValueError names the one that fails): SM90 and a build with the CUTLASS
// headers; K, lda, ldb multiples of 16; N a multiple of 8; pointers 16-byte aligned.
#include "sm90_evt_gemm.cuh"

#include <type_traits>

namespace lyra {

#if defined(LYRA_HAVE_CUTLASS)
namespace sm90 {
namespace {

template <typename T, typename Config, template <typename, typename> class FusionOf>
void run_int8(const char* fn, const DeviceInfo& dev, uintptr_t a, uintptr_t w, uintptr_t a_scale,
              uintptr_t b_scale, uintptr_t bias, uintptr_t residual, uintptr_t out, int64_t M, int64_t N,
              int64_t K, int64_t lda, int64_t ldb, cudaStream_t s) {
  auto thread = [=](auto* fusion) {
    using Fusion = std::remove_pointer_t<decltype(fusion)>;
    auto scaled = scaled_plus_bias_args<T, FirstChildArgs<Fusion>>(a_scale, b_scale, bias);
    if constexpr (Config::kReadsSource) {
      return typename Fusion::Arguments{scaled, {}, {}};  // + residual (C), rounded to T
    } else {
      return typename Fusion::Arguments{scaled, {}};  // rounded to T
    }
  };
  run_evt<T, Config, cutlass::gemm::PersistentScheduler, FusionOf>(fn, dev, a, w, residual, out, M, 1, N, K, lda,
                                                                  ldb, thread, s);
}

template <typename T>
void run_int8_variant(const char* fn, int variant, const DeviceInfo& dev, uintptr_t a, uintptr_t w,
                      uintptr_t a_scale, uintptr_t b_scale, uintptr_t bias, uintptr_t residual, uintptr_t out,
                      int64_t M, int64_t N, int64_t K, int64_t lda, int64_t ldb, cudaStream_t s) {
  if (residual != 0) {
    if (variant == 0) {
      run_int8<T, CooperativeInt8, ScaledResidual>(fn, dev, a, w, a_scale, b_scale, bias, residual, out, M, N, K,
                                                   lda, ldb, s);
    } else {
      run_int8<T, PingPongInt8, ScaledResidual>(fn, dev, a, w, a_scale, b_scale, bias, residual, out, M, N, K,
                                                lda, ldb, s);
    }
  } else if (variant == 0) {
    run_int8<T, NoSource<CooperativeInt8>, ScaledOut>(fn, dev, a, w, a_scale, b_scale, bias, 0, out, M, N, K,
                                                      lda, ldb, s);
  } else {
    run_int8<T, NoSource<PingPongInt8>, ScaledOut>(fn, dev, a, w, a_scale, b_scale, bias, 0, out, M, N, K, lda,
                                                   ldb, s);
  }
}

}  // namespace
}  // namespace sm90
#endif

void gemm_int8_scaled(uintptr_t a, uintptr_t w, uintptr_t a_scale, uintptr_t b_scale, uintptr_t bias,
                      uintptr_t residual, uintptr_t out, int64_t M, int64_t N, int64_t K, int64_t lda,
                      int64_t ldb, int dtype, int variant, uintptr_t stream) {
  const char* fn = "gemm_int8_scaled";
  LYRA_CHECK_ARG(a != 0 && w != 0 && a_scale != 0 && b_scale != 0 && out != 0, fn,
                 "a, w, a_scale, b_scale and out must be non-null device pointers");
  check_w8a8_gemm_args(fn, "int8", M, N, K, lda, ldb, dtype, variant, a_scale, b_scale,
                       {a, w, bias, residual, out});
#if defined(LYRA_HAVE_CUTLASS)
  const DeviceInfo dev = sm90::sm90_device(fn);
  cudaStream_t s = as_stream(stream);
  if (dtype == kFloat16) {
    sm90::run_int8_variant<cutlass::half_t>(fn, variant, dev, a, w, a_scale, b_scale, bias, residual, out, M, N,
                                            K, lda, ldb, s);
  } else {
    sm90::run_int8_variant<cutlass::bfloat16_t>(fn, variant, dev, a, w, a_scale, b_scale, bias, residual, out,
                                                M, N, K, lda, ldb, s);
  }
#else
  (void)stream;
  throw_no_cutlass(fn);
#endif
}

}  // namespace lyra
