// gemm_gated.cu: a DiT's gated residual linear as one GEMM (CUTLASS sm90, sm90_evt_gemm.cuh).
//
//   out[b, t, n] = residual[b, t, n] + gate[b, n] * (sum_k a[b, t, k] w[n, k] + bias[n])
//
// a: L samples of M rows (sm90_evt_gemm.cuh's layout); bias: (N,) or 0; gate: rows of N with
// batch stride gate_bstride (0: one row for every sample); residual, out: (L * M, N)
// contiguous; out may not alias a or w (it may alias residual: each element is read once, by
// the thread that writes it).
//
// cuBLASLt has no epilogue for this in 16-bit (an alpha vector with a bias epilogue is
// NOT_SUPPORTED on the H100), so lyra::linear ran the GEMM + bias, then a separate kernel
// for the gate and the residual: one more write and two more reads of an (M, N) tensor
// (FLUX: 155 launches, 3.4 ms per step). Here the epilogue does it while the tile is
// still in registers.
//
// Requirements (checked; ValueError names the one that fails): SM90 (Hopper) and a library
// built for sm_90a with the CUTLASS headers; K, N, lda, ldb and gate_bstride multiples of 8;
// every pointer 16-byte aligned.
#include "sm90_evt_gemm.cuh"

#include <mutex>
#include <type_traits>
#include <vector>

namespace lyra {

#if defined(LYRA_HAVE_CUTLASS)
namespace sm90 {

namespace {
constexpr int kMaxDevices = 64;
struct Workspace {
  void* ptr = nullptr;
  size_t bytes = 0;
  std::vector<void*> retired;  // smaller buffers that earlier captures may still use
};
std::mutex g_mu;
Workspace g_workspace[kMaxDevices];
}  // namespace

void* scheduler_workspace(const char* fn, int device, size_t bytes, cudaStream_t s) {
  LYRA_CHECK_ARG(device >= 0 && device < kMaxDevices, fn, "device ordinal out of range");
  std::lock_guard<std::mutex> lock(g_mu);
  Workspace& buf = g_workspace[device];
  if (bytes > buf.bytes) {
    cudaStreamCaptureStatus cap = cudaStreamCaptureStatusNone;
    LYRA_CUDA_CHECK(cudaStreamIsCapturing(s, &cap), fn);
    if (cap != cudaStreamCaptureStatusNone) {
      throw std::runtime_error(std::string(fn) + ": needs a " + std::to_string(bytes) +
                               "-byte workspace; the first call of a shape must run outside CUDA-graph capture");
    }
    void* fresh = nullptr;
    LYRA_CUDA_CHECK(cudaMalloc(&fresh, bytes), fn);
    if (buf.ptr) buf.retired.push_back(buf.ptr);
    buf.ptr = fresh;
    buf.bytes = bytes;
  }
  return buf.ptr;
}

namespace {
// gate * (acc + bias) + residual, rounded once to T.
template <typename T, typename Tile>
using GatedResidual = fusion::Sm90EVT<fusion::Sm90Compute<cutlass::homogeneous_multiply_add, T, float, kRound>,
                                      ColumnVector<T, Tile>, AccPlusBias<T, Tile>, fusion::Sm90SrcFetch<T>>;

template <typename T>
void run_gated(const char* fn, int variant, const DeviceInfo& dev, uintptr_t a, uintptr_t w, uintptr_t bias,
               uintptr_t gate, uintptr_t residual, uintptr_t out, int64_t M, int64_t L, int64_t N, int64_t K,
               int64_t lda, int64_t ldb, int64_t gate_bstride, cudaStream_t s) {
  auto thread = [=](auto* fusion) {
    using Fusion = std::remove_pointer_t<decltype(fusion)>;
    return typename Fusion::Arguments{
        {reinterpret_cast<const T*>(gate), T(0), {_0{}, _1{}, gate_bstride}},          // gate
        {{}, {reinterpret_cast<const T*>(bias), T(0), {_0{}, _1{}, int64_t(0)}}, {}},  // acc + bias
        {},                                                                             // residual
        {}};
  };
  run_evt_variant<T, GatedResidual>(fn, variant, dev, a, w, residual, out, M, L, N, K, lda, ldb, thread, s);
}
}  // namespace

}  // namespace sm90

bool gemm_gated_available() { return true; }
#else
bool gemm_gated_available() { return false; }
#endif

void gemm_gated(uintptr_t a, uintptr_t w, uintptr_t bias, uintptr_t gate, uintptr_t residual,
                uintptr_t out, int64_t M, int64_t L, int64_t N, int64_t K, int64_t lda, int64_t ldb,
                int64_t gate_bstride, int dtype, int variant, uintptr_t stream) {
  const char* fn = "gemm_gated";
  LYRA_CHECK_ARG(a != 0 && w != 0 && gate != 0 && residual != 0 && out != 0, fn,
                 "a, w, gate, residual and out must be non-null device pointers");
  check_evt_gemm_args(fn, M, L, N, K, lda, ldb, dtype, variant, {a, w, bias, gate, residual, out});
  LYRA_CHECK_ARG(gate_bstride >= 0 && gate_bstride % 8 == 0, fn,
                 "gate_bstride must be a non-negative multiple of 8, got " + std::to_string(gate_bstride));
#if defined(LYRA_HAVE_CUTLASS)
  const DeviceInfo dev = sm90::sm90_device(fn);
  cudaStream_t s = as_stream(stream);
  if (dtype == kFloat16) {
    sm90::run_gated<cutlass::half_t>(fn, variant, dev, a, w, bias, gate, residual, out, M, L, N, K, lda, ldb,
                                     gate_bstride, s);
  } else {
    sm90::run_gated<cutlass::bfloat16_t>(fn, variant, dev, a, w, bias, gate, residual, out, M, L, N, K, lda,
                                         ldb, gate_bstride, s);
  }
#else
  (void)stream;
  throw_no_cutlass(fn);
#endif
}

}  // namespace lyra
