// sm90_evt_gemm.cuh: what the CUTLASS sm90 GEMMs with a fused epilogue share (gemm_gated.cu,
// gemm_glu.cu, gemm_qk_norm_rope.cu, gemm_fp8_res.cu, gemm_int8_scaled.cu): the kernel type for an epilogue visitor tree (EVT), the
// argument checks, the tile-scheduler workspace and the launch.
//
// The GEMM: out (L * M, N) = epilogue(acc = a @ w^T, src), a (L * M, K) row-major with row
// stride lda, batch l being rows [l M, (l + 1) M); w (N, K) row-major with row stride ldb >= K
// (a linear's weight, or a column / row slice of one); src and out rows of N, sample l at
// l * out_batch_stride (default M * N: (L * M, N) contiguous); a configuration whose
// kReadsSource is false has no src (C = void: no C buffers in shared memory). fp16 /
// bf16 in and out, fp32 accumulation, one rounding at the end. TMA loads, wgmma,
// warp-specialised persistent kernels with a 2 x 1 cluster (the two CTAs of a cluster share
// w's tile through TMA multicast). Three variants (Cooperative / PingPong below):
//   0 cooperative 128 x 256 tiles, whole output tiles, as many CTAs as SMs;
//   1 the same with stream-K: the K loop of the last wave's tiles is shared out between CTAs
//     and the partial sums reduced through the workspace, so a tile count just above a
//     multiple of the SM count (FLUX at 4608 tokens: 432 tiles on 132 SMs, 3.27 waves) does
//     not leave most SMs idle in the last wave;
//   2 ping-pong 128 x 128 tiles.
#pragma once

#include "common.cuh"

#include <cstdint>
#include <initializer_list>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>

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

// The checks every entry point makes before any CUDA call (ValueError names the rule that
// fails): sizes, strides and pointers the kernel's TMA descriptors accept, the dtype, the variant.
inline void check_evt_gemm_args(const char* fn, int64_t M, int64_t L, int64_t N, int64_t K, int64_t lda,
                                int64_t ldb, int dtype, int variant,
                                std::initializer_list<uintptr_t> aligned_pointers) {
  LYRA_CHECK_ARG(variant >= 0 && variant <= 2, fn,
                 "variant must be 0 (persistent), 1 (stream-K) or 2 (ping-pong), got " + std::to_string(variant));
  LYRA_CHECK_ARG(M > 0 && L > 0 && N > 0 && K > 0, fn,
                 "M, L, N and K must be positive, got M=" + std::to_string(M) + " L=" + std::to_string(L) +
                     " N=" + std::to_string(N) + " K=" + std::to_string(K));
  LYRA_CHECK_ARG(M * L <= INT32_MAX && N <= INT32_MAX && K <= INT32_MAX, fn, "sizes must fit in 32 bits");
  LYRA_CHECK_ARG(lda >= K && ldb >= K, fn,
                 "lda and ldb must be >= K, got lda=" + std::to_string(lda) + " ldb=" + std::to_string(ldb) +
                     " K=" + std::to_string(K));
  LYRA_CHECK_ARG(K % 8 == 0 && N % 8 == 0 && lda % 8 == 0 && ldb % 8 == 0, fn,
                 "K, N, lda and ldb must be multiples of 8, got K=" + std::to_string(K) + " N=" + std::to_string(N) +
                     " lda=" + std::to_string(lda) + " ldb=" + std::to_string(ldb));
  for (uintptr_t p : aligned_pointers) {
    LYRA_CHECK_ARG(aligned_to(p, 16), fn, "every operand pointer must be 16-byte aligned");
  }
  LYRA_CHECK_ARG(dtype == kFloat16 || dtype == kBFloat16, fn,
                 std::string("dtype must be float16 or bfloat16, got ") + dtype_name(dtype));
}

// The W8A8 GEMMs' (gemm_fp8_res, gemm_int8_scaled) checks beyond check_evt_gemm_args: variant 0 or
// 2 only, 16-byte rows of 1-byte inputs, 16-byte aligned float scales. `inputs` names them.
inline void check_w8a8_gemm_args(const char* fn, const char* inputs, int64_t M, int64_t N, int64_t K,
                                 int64_t lda, int64_t ldb, int dtype, int variant, uintptr_t a_scale,
                                 uintptr_t b_scale, std::initializer_list<uintptr_t> aligned_pointers) {
  LYRA_CHECK_ARG(variant == 0 || variant == 2, fn,
                 "variant must be 0 (cooperative) or 2 (ping-pong), got " + std::to_string(variant));
  check_evt_gemm_args(fn, M, 1, N, K, lda, ldb, dtype, variant, aligned_pointers);
  LYRA_CHECK_ARG(K % 16 == 0 && lda % 16 == 0 && ldb % 16 == 0, fn,
                 "K, lda and ldb must be multiples of 16 (16-byte " + std::string(inputs) + " rows), got K=" +
                     std::to_string(K) + " lda=" + std::to_string(lda) + " ldb=" + std::to_string(ldb));
  LYRA_CHECK_ARG(aligned_to(a_scale, 16) && aligned_to(b_scale, 16), fn,
                 "a_scale and b_scale must be 16-byte aligned");
}

// What an entry point of a build without the CUTLASS headers does.
[[noreturn]] inline void throw_no_cutlass(const char* fn) {
  throw std::invalid_argument(std::string(fn) + ": this build has no CUTLASS kernels (configure with "
                              "LYRA_CUTLASS_DIR or `pip install nvidia-cutlass`)");
}

#if defined(LYRA_HAVE_CUTLASS)
namespace sm90 {

using namespace cute;
namespace fusion = cutlass::epilogue::fusion;

constexpr int kAlign = 8;  // elements per 16-byte access (fp16 / bf16)
constexpr auto kRound = cutlass::FloatRoundStyle::round_to_nearest;
using ClusterShape = Shape<_2, _1, _1>;

// The kernel configurations (`variant`):
//   0 cooperative 128 x 256 tiles, persistent: both consumer warp groups on one tile;
//   1 the same tiles, stream-K (see the top of this file);
//   2 ping-pong 128 x 128 tiles, persistent: the two consumer warp groups take turns on two
//     tiles, so one's epilogue (loading src, storing out) overlaps the other's mainloop:
//     for short K loops (SDXL's GEGLU at K 640-1280) the epilogue is a large part of a tile.
// Input: the element type of a and w (void: the output's type T); Acc: the accumulator (fp32,
// or int32 for int8 inputs: exact sums, converted to fp32 by the epilogue's first node); the
// epilogue reads src (C).
template <typename In, typename TileShape, typename Kernel, typename Epi, typename Acc = float>
struct EvtConfig {
  using Input = In;
  using Accumulator = Acc;
  using Tile = TileShape;
  using KernelSchedule = Kernel;
  using EpilogueSchedule = Epi;
  using EpilogueTile = cutlass::epilogue::collective::EpilogueTileAuto;
  static constexpr bool kReadsSource = true;  // src (C) is an operand of the epilogue
};
// The same configuration without src (C = void: no C buffers in shared memory).
template <typename Config>
struct NoSource : Config {
  static constexpr bool kReadsSource = false;
};
using Cooperative = EvtConfig<void, Shape<_128, _256, _64>, cutlass::gemm::KernelTmaWarpSpecializedCooperative,
                              cutlass::epilogue::TmaWarpSpecializedCooperative>;
using PingPong = EvtConfig<void, Shape<_128, _128, _64>, cutlass::gemm::KernelTmaWarpSpecializedPingpong,
                           cutlass::epilogue::TmaWarpSpecialized>;
// fp8 (e4m3) a and w with Hopper's fast fp8 accumulation, 128-deep K tiles (gemm_fp8_res.cu).
using CooperativeFp8 = EvtConfig<cutlass::float_e4m3_t, Shape<_128, _256, _128>,
                                 cutlass::gemm::KernelTmaWarpSpecializedCooperativeFP8FastAccum,
                                 cutlass::epilogue::TmaWarpSpecializedCooperative>;
using PingPongFp8 = EvtConfig<cutlass::float_e4m3_t, Shape<_128, _128, _128>,
                              cutlass::gemm::KernelTmaWarpSpecializedPingpongFP8FastAccum,
                              cutlass::epilogue::TmaWarpSpecialized>;
// int8 a and w, exact int32 accumulation, 128-deep K tiles (gemm_int8_scaled.cu).
using CooperativeInt8 = EvtConfig<int8_t, Shape<_128, _256, _128>, cutlass::gemm::KernelTmaWarpSpecializedCooperative,
                                  cutlass::epilogue::TmaWarpSpecializedCooperative, int32_t>;
using PingPongInt8 = EvtConfig<int8_t, Shape<_128, _128, _128>, cutlass::gemm::KernelTmaWarpSpecializedPingpong,
                               cutlass::epilogue::TmaWarpSpecialized, int32_t>;

// A per-column vector (bias, or a gate with a batch stride) of T read as float; null reads 0.
template <typename T, typename Tile>
using ColumnVector = fusion::Sm90RowBroadcast<0, Tile, T, float, Stride<_0, _1, int64_t>, kAlign>;
// acc + bias, in float.
template <typename T, typename Tile>
using AccPlusBias = fusion::Sm90EVT<fusion::Sm90Compute<cutlass::plus, float, float, kRound>,
                                    fusion::Sm90AccFetch, ColumnVector<T, Tile>>;

// W8A8 (fp8 or int8) scales: a_scale[m] (a column broadcast: one value per row of out) and
// b_scale[n] (a row broadcast: one value per column), float32.
template <typename Tile>
using RowScale = fusion::Sm90ColBroadcast<0, Tile, float, float, Stride<_1, _0, int64_t>, 4>;
template <typename Tile>
using ColScale = fusion::Sm90RowBroadcast<0, Tile, float, float, Stride<_0, _1, int64_t>, 4>;
// (acc * a_scale[m]) * b_scale[n] + bias[n], in float (an int32 acc converted exactly first).
template <typename T, typename Tile>
using ScaledPlusBias = fusion::Sm90EVT<
    fusion::Sm90Compute<cutlass::plus, float, float, kRound>,
    fusion::Sm90EVT<fusion::Sm90Compute<cutlass::multiplies, float, float, kRound>,
                    fusion::Sm90EVT<fusion::Sm90Compute<cutlass::multiplies, float, float, kRound>,
                                    fusion::Sm90AccFetch, RowScale<Tile>>,
                    ColScale<Tile>>,
    ColumnVector<T, Tile>>;
// ScaledPlusBias rounded to T (no src).
template <typename T, typename Tile>
using ScaledOut = fusion::Sm90EVT<fusion::Sm90Compute<cutlass::epilogue::thread::Identity, T, float, kRound>,
                                  ScaledPlusBias<T, Tile>>;
// ScaledPlusBias + residual (src), rounded once to T.
template <typename T, typename Tile>
using ScaledResidual = fusion::Sm90EVT<fusion::Sm90Compute<cutlass::plus, T, float, kRound>,
                                       ScaledPlusBias<T, Tile>, fusion::Sm90SrcFetch<T>>;

// The arguments of a ScaledPlusBias subtree (pointers as uintptr_t; a null bias reads 0). Args:
// its Arguments type, that of the first child of the tree above it (FirstChildArgs).
template <typename Fusion>
using FirstChildArgs = decltype(std::declval<typename Fusion::Arguments>().op_0);
template <typename T, typename Args>
Args scaled_plus_bias_args(uintptr_t a_scale, uintptr_t b_scale, uintptr_t bias) {
  return Args{
      {                                                                                  // scaled
       {{}, {reinterpret_cast<const float*>(a_scale), 0.f, {_1{}, _0{}, int64_t(0)}}, {}},  // acc * a_scale
       {reinterpret_cast<const float*>(b_scale), 0.f, {_0{}, _1{}, int64_t(0)}},          // * b_scale
       {}},
      {reinterpret_cast<const T*>(bias), T(0), {_0{}, _1{}, int64_t(0)}},  // + bias (null: 0)
      {}};
}

// The element type of a and w: the configuration's Input, or T.
template <typename T, typename Config>
using InputOf = std::conditional_t<std::is_void_v<typename Config::Input>, T, typename Config::Input>;

template <typename T, typename Config, typename Scheduler, typename Fusion>
struct EvtGemm {
  using Layout = cutlass::layout::RowMajor;
  using LayoutW = cutlass::layout::ColumnMajor;  // w (N, K) row-major is B (K, N) column-major
  using Tile = typename Config::Tile;
  using ElementC = std::conditional_t<Config::kReadsSource, T, void>;  // void: no C buffers in smem
  using Acc = typename Config::Accumulator;
  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Tile, ClusterShape,
      typename Config::EpilogueTile, Acc, float, ElementC, Layout, kAlign, T, Layout,
      kAlign, typename Config::EpilogueSchedule, Fusion>::CollectiveOp;
  using TIn = InputOf<T, Config>;
  static constexpr int kAlignIn = 16 / static_cast<int>(sizeof(TIn));  // 16-byte TMA rows
  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TIn, Layout, kAlignIn, TIn, LayoutW, kAlignIn,
      Acc, Tile, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename Epilogue::SharedStorage))>,
      typename Config::KernelSchedule>::CollectiveOp;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, Mainloop, Epilogue, Scheduler>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
};

// The device's tile-scheduler workspace (stream-K's partial sums and flags), at least `bytes`
// large (gemm_gated.cu). Allocated outside capture (the runner's warm-up call comes first); a
// larger problem gets a larger buffer and the smaller one is kept, never freed: CUDA graphs
// captured earlier still use it. Like gemm.cu's cuBLASLt workspace it is shared by all streams
// of a device: these GEMMs must not run concurrently on different streams of one device.
void* scheduler_workspace(const char* fn, int device, size_t bytes, cudaStream_t s);

// Runs one EVT GEMM; FusionOf<T, Tile> is the epilogue tree for the configuration's tile, and
// make_thread(type tag) its arguments. out_batch_stride: elements between the samples of out
// (and src); 0 means M * N (contiguous).
template <typename T, typename Config, typename Scheduler, template <typename, typename> class FusionOf,
          typename MakeThread>
void run_evt(const char* fn, const DeviceInfo& dev, uintptr_t a, uintptr_t w, uintptr_t src, uintptr_t out,
             int64_t M, int64_t L, int64_t N, int64_t K, int64_t lda, int64_t ldb, MakeThread make_thread,
             cudaStream_t s, int64_t out_batch_stride = 0) {
  using Fusion = FusionOf<T, typename Config::Tile>;
  using Gemm = typename EvtGemm<T, Config, Scheduler, Fusion>::Gemm;
  using StrideA = typename Gemm::GemmKernel::StrideA;
  using StrideB = typename Gemm::GemmKernel::StrideB;
  using StrideC = typename Gemm::GemmKernel::StrideC;
  using StrideD = typename Gemm::GemmKernel::StrideD;
  using ElementC = typename EvtGemm<T, Config, Scheduler, Fusion>::ElementC;
  const int64_t ldd_batch = out_batch_stride ? out_batch_stride : M * N;

  typename Gemm::Arguments args{
      cutlass::gemm::GemmUniversalMode::kGemm,
      {static_cast<int>(M), static_cast<int>(N), static_cast<int>(K), static_cast<int>(L)},
      {reinterpret_cast<const InputOf<T, Config>*>(a), StrideA{lda, Int<1>{}, M * lda},
       reinterpret_cast<const InputOf<T, Config>*>(w), StrideB{ldb, Int<1>{}, int64_t(0)}},
      {make_thread(static_cast<Fusion*>(nullptr)),
       reinterpret_cast<const ElementC*>(src), StrideC{N, Int<1>{}, ldd_batch},
       reinterpret_cast<T*>(out), StrideD{N, Int<1>{}, ldd_batch}}};
  args.hw_info.device_id = dev.device;
  args.hw_info.sm_count = dev.sm_count;

  cutlass::Status st = Gemm::can_implement(args);
  LYRA_CHECK_ARG(st == cutlass::Status::kSuccess, fn,
                 std::string("CUTLASS cannot run this problem: ") + cutlassGetStatusString(st) +
                     " (M=" + std::to_string(M) + " N=" + std::to_string(N) + " K=" + std::to_string(K) +
                     " L=" + std::to_string(L) + ")");
  void* ws = scheduler_workspace(fn, dev.device, Gemm::get_workspace_size(args), s);
  Gemm gemm;
  st = gemm.initialize(args, ws, s);
  if (st != cutlass::Status::kSuccess) {
    throw std::runtime_error(std::string(fn) + ": CUTLASS initialize failed: " + cutlassGetStatusString(st));
  }
  st = gemm.run(s);
  if (st != cutlass::Status::kSuccess) {
    throw std::runtime_error(std::string(fn) + ": CUTLASS run failed: " + cutlassGetStatusString(st));
  }
  LYRA_CHECK_LAUNCH(fn);
}

// The variant's configuration and tile scheduler (0, 1, 2: see Cooperative / PingPong).
template <typename T, template <typename, typename> class FusionOf, typename MakeThread>
void run_evt_variant(const char* fn, int variant, const DeviceInfo& dev, uintptr_t a, uintptr_t w,
                     uintptr_t src, uintptr_t out, int64_t M, int64_t L, int64_t N, int64_t K, int64_t lda,
                     int64_t ldb, MakeThread make_thread, cudaStream_t s) {
  using cutlass::gemm::PersistentScheduler;
  using cutlass::gemm::StreamKScheduler;
  if (variant == 0) {
    run_evt<T, Cooperative, PersistentScheduler, FusionOf>(fn, dev, a, w, src, out, M, L, N, K, lda, ldb,
                                                            make_thread, s);
  } else if (variant == 1) {
    run_evt<T, Cooperative, StreamKScheduler, FusionOf>(fn, dev, a, w, src, out, M, L, N, K, lda, ldb,
                                                         make_thread, s);
  } else {
    run_evt<T, PingPong, PersistentScheduler, FusionOf>(fn, dev, a, w, src, out, M, L, N, K, lda, ldb,
                                                         make_thread, s);
  }
}

// The device the kernels run on: SM90 only (wgmma, TMA).
inline DeviceInfo sm90_device(const char* fn) {
  const DeviceInfo dev = current_device_info(fn);
  LYRA_CHECK_ARG(dev.cc_major == 9, fn, "needs an SM90 (Hopper) GPU, this one is SM" + std::to_string(dev.cc_major) + "x");
  LYRA_CHECK_ARG(dev.device >= 0, fn, "no current CUDA device");
  return dev;
}

}  // namespace sm90
#endif

}  // namespace lyra
