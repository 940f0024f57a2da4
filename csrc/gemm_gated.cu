// gemm_gated.cu: a DiT's gated residual linear as one GEMM (CUTLASS sm90: TMA loads,
// wgmma, warp-specialised persistent cooperative kernel, epilogue visitor tree).
//
//   out[b, t, n] = residual[b, t, n] + gate[b, n] * (sum_k a[b, t, k] w[n, k] + bias[n])
//
// a: (L * M, K) row-major with row stride lda; batch l is rows [l M, (l + 1) M).
// w: (N, K) row-major with row stride ldb >= K (a linear's weight, or a column slice of one). bias: (N,) or 0. gate: rows of N with batch
// stride gate_bstride (0: one row for every batch). residual, out: (L * M, N)
// contiguous; out may not alias a or w (it may alias residual: each element is read once,
// by the thread that writes it). fp16 / bf16 in and out, fp32 accumulation, one rounding
// at the end.
//
// cuBLASLt has no epilogue for this in 16-bit (an alpha vector with a bias epilogue is
// NOT_SUPPORTED on the H100), so lyra::linear ran the GEMM + bias, then a separate kernel
// for the gate and the residual: one more write and two more reads of an (M, N) tensor
// (FLUX: 155 launches, 3.4 ms per step). Here the epilogue does it while the tile is
// still in registers.
//
// Requirements (checked; ValueError names the one that fails): SM90 (Hopper) and a library
// built for sm_90a with the CUTLASS headers; K, N, lda, ldb and gate_bstride multiples of 8;
// a, w, bias, gate, residual and out 16-byte aligned.
#include "common.cuh"

#include <cstdint>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#if defined(LYRA_HAVE_CUTLASS)
#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/fusion/sm90_callbacks_tma_warpspecialized.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#endif

namespace lyra {

#if defined(LYRA_HAVE_CUTLASS)
namespace {

using namespace cute;
namespace fusion = cutlass::epilogue::fusion;

constexpr int kAlign = 8;  // elements per 16-byte access (fp16 / bf16)

// 128 x 256 x 64 tiles, a 2 x 1 cluster (the two CTAs of a cluster share w's tile through
// TMA multicast), cooperative schedule; two tile schedulers (the `variant` argument):
//   0 persistent: whole output tiles, as many CTAs as SMs;
//   1 stream-K: the K loop of the last wave's tiles is shared out between CTAs and the
//     partial sums reduced through the workspace, so a tile count just above a multiple
//     of the SM count (FLUX at 4608 tokens: 432 tiles on 132 SMs, 3.27 waves) does not
//     leave most SMs idle in the last wave.
template <typename T, typename Scheduler>
struct GatedGemm {
  using Layout = cutlass::layout::RowMajor;
  using LayoutW = cutlass::layout::ColumnMajor;  // w (N, K) row-major is B (K, N) column-major
  using TileShape = Shape<_128, _256, _64>;
  using ClusterShape = Shape<_2, _1, _1>;
  static constexpr auto kRound = cutlass::FloatRoundStyle::round_to_nearest;

  // A per-column vector (bias, or the gate with a batch stride); a null pointer reads 0.
  using ColumnVector = fusion::Sm90RowBroadcast<0, TileShape, T, float, Stride<_0, _1, int64_t>, kAlign>;
  using AccPlusBias = fusion::Sm90EVT<fusion::Sm90Compute<cutlass::plus, float, float, kRound>,
                                      fusion::Sm90AccFetch, ColumnVector>;
  // gate * (acc + bias) + residual, rounded once to T.
  using Fusion = fusion::Sm90EVT<fusion::Sm90Compute<cutlass::homogeneous_multiply_add, T, float, kRound>,
                                 ColumnVector, AccPlusBias, fusion::Sm90SrcFetch<T>>;

  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, T, Layout, kAlign, T, Layout,
      kAlign, cutlass::epilogue::TmaWarpSpecializedCooperative, Fusion>::CollectiveOp;
  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, T, Layout, kAlign, T, LayoutW, kAlign,
      float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename Epilogue::SharedStorage))>,
      cutlass::gemm::KernelTmaWarpSpecializedCooperative>::CollectiveOp;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, Mainloop, Epilogue, Scheduler>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
};

// Per-device workspace for the tile scheduler (stream-K's partial sums and flags), allocated
// outside capture (the runner's warm-up call comes first). A larger problem gets a larger
// buffer; the smaller one is kept, never freed: CUDA graphs captured earlier still use it.
// Like gemm.cu's cuBLASLt workspace, it is shared by all streams of a device: gemm_gated
// calls must not run concurrently on different streams of one device.
constexpr int kMaxDevices = 64;
struct Workspace {
  void* ptr = nullptr;
  size_t bytes = 0;
  std::vector<void*> retired;
};
std::mutex g_mu;
Workspace g_workspace[kMaxDevices];

template <typename T, typename Scheduler>
void run_gated(const char* fn, const DeviceInfo& dev, uintptr_t a, uintptr_t w, uintptr_t bias,
               uintptr_t gate, uintptr_t residual, uintptr_t out, int64_t M, int64_t L, int64_t N,
               int64_t K, int64_t lda, int64_t ldb, int64_t gate_bstride, cudaStream_t s) {
  using G = GatedGemm<T, Scheduler>;
  using Gemm = typename G::Gemm;
  using StrideA = typename Gemm::GemmKernel::StrideA;
  using StrideB = typename Gemm::GemmKernel::StrideB;
  using StrideC = typename Gemm::GemmKernel::StrideC;
  using StrideD = typename Gemm::GemmKernel::StrideD;

  LYRA_CHECK_ARG(dev.device >= 0 && dev.device < kMaxDevices, fn, "device ordinal out of range");
  typename Gemm::Arguments args{
      cutlass::gemm::GemmUniversalMode::kGemm,
      {static_cast<int>(M), static_cast<int>(N), static_cast<int>(K), static_cast<int>(L)},
      {reinterpret_cast<const T*>(a), StrideA{lda, Int<1>{}, M * lda},
       reinterpret_cast<const T*>(w), StrideB{ldb, Int<1>{}, int64_t(0)}},
      {{},
       reinterpret_cast<const T*>(residual), StrideC{N, Int<1>{}, M * N},
       reinterpret_cast<T*>(out), StrideD{N, Int<1>{}, M * N}}};
  args.epilogue.thread = {
      {reinterpret_cast<const T*>(gate), T(0), {_0{}, _1{}, gate_bstride}},  // gate
      {{}, {reinterpret_cast<const T*>(bias), T(0), {_0{}, _1{}, int64_t(0)}}, {}},  // acc + bias
      {},                                                                             // residual
      {}};

  args.hw_info.device_id = dev.device;
  args.hw_info.sm_count = dev.sm_count;

  cutlass::Status st = Gemm::can_implement(args);
  LYRA_CHECK_ARG(st == cutlass::Status::kSuccess, fn,
                 std::string("CUTLASS cannot run this problem: ") + cutlassGetStatusString(st) +
                     " (M=" + std::to_string(M) + " N=" + std::to_string(N) + " K=" + std::to_string(K) +
                     " L=" + std::to_string(L) + ")");
  const size_t ws = Gemm::get_workspace_size(args);
  std::lock_guard<std::mutex> lock(g_mu);
  Workspace& buf = g_workspace[dev.device];
  if (ws > buf.bytes) {
    cudaStreamCaptureStatus cap = cudaStreamCaptureStatusNone;
    LYRA_CUDA_CHECK(cudaStreamIsCapturing(s, &cap), fn);
    if (cap != cudaStreamCaptureStatusNone) {
      throw std::runtime_error(std::string(fn) + ": needs a " + std::to_string(ws) +
                               "-byte workspace; the first call of a shape must run outside CUDA-graph capture");
    }
    void* fresh = nullptr;
    LYRA_CUDA_CHECK(cudaMalloc(&fresh, ws), fn);
    if (buf.ptr) buf.retired.push_back(buf.ptr);
    buf.ptr = fresh;
    buf.bytes = ws;
  }
  Gemm gemm;
  st = gemm.initialize(args, buf.ptr, s);
  if (st != cutlass::Status::kSuccess) {
    throw std::runtime_error(std::string(fn) + ": CUTLASS initialize failed: " + cutlassGetStatusString(st));
  }
  st = gemm.run(s);
  if (st != cutlass::Status::kSuccess) {
    throw std::runtime_error(std::string(fn) + ": CUTLASS run failed: " + cutlassGetStatusString(st));
  }
  LYRA_CHECK_LAUNCH(fn);
}

template <typename T>
void run_variant(const char* fn, int variant, const DeviceInfo& dev, uintptr_t a, uintptr_t w,
                 uintptr_t bias, uintptr_t gate, uintptr_t residual, uintptr_t out, int64_t M,
                 int64_t L, int64_t N, int64_t K, int64_t lda, int64_t ldb, int64_t gate_bstride,
                 cudaStream_t s) {
  if (variant == 0) {
    run_gated<T, cutlass::gemm::PersistentScheduler>(fn, dev, a, w, bias, gate, residual, out, M, L, N, K,
                                                     lda, ldb, gate_bstride, s);
  } else {
    run_gated<T, cutlass::gemm::StreamKScheduler>(fn, dev, a, w, bias, gate, residual, out, M, L, N, K,
                                                  lda, ldb, gate_bstride, s);
  }
}

}  // namespace

bool gemm_gated_available() { return true; }
#else
bool gemm_gated_available() { return false; }
#endif

void gemm_gated(uintptr_t a, uintptr_t w, uintptr_t bias, uintptr_t gate, uintptr_t residual,
                uintptr_t out, int64_t M, int64_t L, int64_t N, int64_t K, int64_t lda, int64_t ldb,
                int64_t gate_bstride, int dtype, int variant, uintptr_t stream) {
  const char* fn = "gemm_gated";
  LYRA_CHECK_ARG(variant == 0 || variant == 1, fn,
                 "variant must be 0 (persistent) or 1 (stream-K), got " + std::to_string(variant));
  LYRA_CHECK_ARG(a != 0 && w != 0 && gate != 0 && residual != 0 && out != 0, fn,
                 "a, w, gate, residual and out must be non-null device pointers");
  LYRA_CHECK_ARG(M > 0 && L > 0 && N > 0 && K > 0, fn,
                 "M, L, N and K must be positive, got M=" + std::to_string(M) + " L=" + std::to_string(L) +
                     " N=" + std::to_string(N) + " K=" + std::to_string(K));
  LYRA_CHECK_ARG(M * L <= INT32_MAX && N <= INT32_MAX && K <= INT32_MAX, fn, "sizes must fit in 32 bits");
  LYRA_CHECK_ARG(lda >= K && ldb >= K, fn,
                 "lda and ldb must be >= K, got lda=" + std::to_string(lda) + " ldb=" + std::to_string(ldb) +
                     " K=" + std::to_string(K));
  LYRA_CHECK_ARG(K % 8 == 0 && N % 8 == 0 && lda % 8 == 0 && ldb % 8 == 0 && gate_bstride % 8 == 0, fn,
                 "K, N, lda, ldb and gate_bstride must be multiples of 8, got K=" + std::to_string(K) +
                     " N=" + std::to_string(N) + " lda=" + std::to_string(lda) + " ldb=" + std::to_string(ldb) +
                     " gate_bstride=" + std::to_string(gate_bstride));
  LYRA_CHECK_ARG(gate_bstride >= 0, fn, "gate_bstride must be >= 0");
  for (uintptr_t p : {a, w, bias, gate, residual, out}) {
    LYRA_CHECK_ARG(aligned_to(p, 16), fn, "a, w, bias, gate, residual and out must be 16-byte aligned");
  }
  LYRA_CHECK_ARG(dtype == kFloat16 || dtype == kBFloat16, fn,
                 std::string("dtype must be float16 or bfloat16, got ") + dtype_name(dtype));
#if defined(LYRA_HAVE_CUTLASS)
  const DeviceInfo dev = current_device_info(fn);
  LYRA_CHECK_ARG(dev.cc_major == 9, fn,
                 "needs an SM90 (Hopper) GPU, this one is SM" + std::to_string(dev.cc_major) + "x");
  cudaStream_t s = as_stream(stream);
  if (dtype == kFloat16) {
    run_variant<cutlass::half_t>(fn, variant, dev, a, w, bias, gate, residual, out, M, L, N, K, lda, ldb,
                                 gate_bstride, s);
  } else {
    run_variant<cutlass::bfloat16_t>(fn, variant, dev, a, w, bias, gate, residual, out, M, L, N, K, lda, ldb,
                                     gate_bstride, s);
  }
#else
  (void)stream;
  throw std::invalid_argument(std::string(fn) + ": this build has no CUTLASS kernels (configure with "
                              "LYRA_CUTLASS_DIR or `pip install nvidia-cutlass`)");
#endif
}

}  // namespace lyra
