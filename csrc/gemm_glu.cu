// gemm_glu.cu: the gate half of a GLU linear (diffusers' GEGLU) as one GEMM whose epilogue
// finishes the GLU (CUTLASS sm90, sm90_evt_gemm.cuh).
//
//   out[t, n] = src[t, n] * act(sum_k a[t, k] w[n, k] + bias[n])
//
// GEGLU computes y = x W^T + b with 2N columns, then y[:, :N] * gelu(y[:, N:]). lyra::linear
// runs the first half (src = x W[:N]^T + b[:N]) through cuBLASLt and the second half here with
// w = W[N:], bias = b[N:]: the (M, 2N) GEMM output is never written and the GLU needs no pass
// of its own (the csrc epilogue kernel read 2N columns and wrote N).
//
// act: 1 gelu (erf), the only one built (SDXL's and SD1.5's GEGLU); others are refused with a
// ValueError and lyra::linear keeps GEMM + epilogue kernel for them. src and out: (M, N)
// contiguous; out may alias src (each element is read once, by the thread that writes it).
// Requirements as gemm_gated.cu's: SM90, K, N, lda and ldb multiples of 8, 16-byte aligned
// pointers.
#include "sm90_evt_gemm.cuh"

#include <type_traits>

#if defined(LYRA_HAVE_CUTLASS)
#include "cutlass/epilogue/thread/activation.h"
#endif

namespace lyra {

#if defined(LYRA_HAVE_CUTLASS)
namespace sm90 {
namespace {
// src * gelu(acc + bias): the GELU in float on the unrounded sum, one rounding at the end.
template <typename T, typename Tile>
using GeluGlu = fusion::Sm90EVT<
    fusion::Sm90Compute<cutlass::multiplies, T, float, kRound>, fusion::Sm90SrcFetch<T>,
    fusion::Sm90EVT<fusion::Sm90Compute<cutlass::epilogue::thread::GELU, float, float, kRound>,
                    AccPlusBias<T, Tile>>>;

template <typename T>
void run_glu(const char* fn, int variant, const DeviceInfo& dev, uintptr_t a, uintptr_t w, uintptr_t bias,
             uintptr_t src, uintptr_t out, int64_t M, int64_t N, int64_t K, int64_t lda, int64_t ldb,
             cudaStream_t s) {
  auto thread = [=](auto* fusion) {
    using Fusion = std::remove_pointer_t<decltype(fusion)>;
    return typename Fusion::Arguments{
        {},                                                                                   // src
        {{{}, {reinterpret_cast<const T*>(bias), T(0), {_0{}, _1{}, int64_t(0)}}, {}}, {}},  // gelu(acc + bias)
        {}};
  };
  run_evt_variant<T, GeluGlu>(fn, variant, dev, a, w, src, out, M, 1, N, K, lda, ldb, thread, s);
}
}  // namespace
}  // namespace sm90
#endif

void gemm_glu(uintptr_t a, uintptr_t w, uintptr_t bias, uintptr_t src, uintptr_t out, int64_t M, int64_t N,
              int64_t K, int64_t lda, int64_t ldb, int act, int dtype, int variant, uintptr_t stream) {
  const char* fn = "gemm_glu";
  LYRA_CHECK_ARG(a != 0 && w != 0 && src != 0 && out != 0, fn,
                 "a, w, src and out must be non-null device pointers");
  LYRA_CHECK_ARG(act == 1, fn, "act must be 1 (gelu): the only GLU activation built, got " + std::to_string(act));
  check_evt_gemm_args(fn, M, 1, N, K, lda, ldb, dtype, variant, {a, w, bias, src, out});
#if defined(LYRA_HAVE_CUTLASS)
  const DeviceInfo dev = sm90::sm90_device(fn);
  cudaStream_t s = as_stream(stream);
  if (dtype == kFloat16) {
    sm90::run_glu<cutlass::half_t>(fn, variant, dev, a, w, bias, src, out, M, N, K, lda, ldb, s);
  } else {
    sm90::run_glu<cutlass::bfloat16_t>(fn, variant, dev, a, w, bias, src, out, M, N, K, lda, ldb, s);
  }
#else
  (void)stream;
  throw_no_cutlass(fn);
#endif
}

}  // namespace lyra
