// gemm_qk_norm_rope.cu: an attention's q / k / v projection as one GEMM whose epilogue applies
// the per-head q / k RMSNorm and RoPE of FLUX-style attention (CUTLASS sm90, sm90_evt_gemm.cuh).
//
//   y[b, t, n]   = sum_k a[b, t, k] w[n, k] + bias[n], rounded to T    (n < N = 3 H D)
//   q, k heads   (n < qk_cols, head = 128 columns): RMSNorm over the head (fp32 statistics,
//                rounded to T, times the norm weight, rounded), then RoPE of the column pairs
//                (2i, 2i+1) at position t + pos_offset, in fp32 with unfused products, rounded;
//   v            (qk_cols <= n < N): y as is.
//
// The math is qkv_quant.cu's (lyra::qk_norm_rope3): only the order of the fp32 sum of squares
// differs. Those passes read and wrote q and k (and copied v for a joint attention) after the
// GEMM had written them: FLUX, 7.5 GB per step. Here the tile is still in registers.
//
// out: rows of N = 3 H D with sample stride out_batch_stride, so that the parts of a joint
// attention (FLUX's text and image tokens, two GEMMs) write adjacent rows of one buffer and
// attention reads q, k, v from it without a cat.
//
// How the epilogue sees a head: the cooperative kernel's 128 x 256 tile is stored in 128 x 128
// sub-tiles, one head each (heads start at multiples of 128 columns). In a sub-tile each of the
// 256 threads holds two rows (r, r + 8) x 32 columns of the wgmma accumulator, the four lanes of
// a quad sharing the rows: 64 values per thread, one visit per sub-tile, and a head's sum of
// squares is the thread's sum plus two xor shuffles. Adjacent values (2i, 2i + 1) of the
// fragment are adjacent columns of one row: RoPE's pairs stay in one thread.
//
// Requirements (checked; ValueError names the one that fails): SM90 and a build with the CUTLASS
// headers; head dim 128 and N = 3 * heads * 128 (q, k, v in this order); K, lda, ldb multiples
// of 8; 16-byte aligned operands; cos / sin (rope_len, 128) float32 tables or none. a: L samples
// of M rows (sm90_evt_gemm.cuh's layout); bias (N,) or 0.
#include "sm90_evt_gemm.cuh"

#include <type_traits>

namespace lyra {

#if defined(LYRA_HAVE_CUTLASS)
namespace sm90 {
namespace {

constexpr int kHeadDim = 128;

// Cooperative 128 x 256 tiles stored as 128 x 128 sub-tiles (one head each); no source operand.
struct CooperativeHeads : Cooperative {
  using EpilogueTile = Shape<_128, _128>;
  static constexpr bool kReadsSource = false;
};

inline __device__ float round_to_t(float x, cutlass::half_t*) { return float(cutlass::half_t(x)); }
inline __device__ float round_to_t(float x, cutlass::bfloat16_t*) { return float(cutlass::bfloat16_t(x)); }
template <typename T>
__device__ float rnd(float x) {
  return round_to_t(x, static_cast<T*>(nullptr));
}

// The root of the epilogue tree: takes acc + bias (float) and writes T.
template <typename T>
struct HeadRmsNormRope {
  struct SharedStorage {};
  struct Arguments {
    const T* q_weight = nullptr;  // (128,) RMSNorm weights of q's and k's heads
    const T* k_weight = nullptr;
    const float* cos = nullptr;   // (rope_len, 128) float32; null: no RoPE
    const float* sin = nullptr;
    int q_cols = 0;               // columns [0, q_cols): q heads; [q_cols, qk_cols): k heads
    int qk_cols = 0;
    int pos_offset = 0;           // RoPE position of row t of a sample: t + pos_offset
    int rope_len = 0;
    float eps = 0.f;
  };
  using Params = Arguments;

  template <class ProblemShape>
  static constexpr Params to_underlying_arguments(ProblemShape const&, Arguments const& args, void*) {
    return args;
  }
  template <class ProblemShape>
  static bool can_implement(ProblemShape const&, Arguments const&) {
    return true;
  }
  template <class ProblemShape>
  static size_t get_workspace_size(ProblemShape const&, Arguments const&) {
    return 0;
  }
  template <class ProblemShape>
  static cutlass::Status initialize_workspace(ProblemShape const&, Arguments const&, void*, cudaStream_t,
                                              cutlass::CudaHostAdapter* = nullptr) {
    return cutlass::Status::kSuccess;
  }

  CUTLASS_HOST_DEVICE HeadRmsNormRope() {}
  CUTLASS_HOST_DEVICE HeadRmsNormRope(Params const& p, SharedStorage const&) : params(p) {}
  Params params;

  CUTLASS_DEVICE bool is_producer_load_needed() const { return false; }
  CUTLASS_DEVICE bool is_C_load_needed() const { return false; }

  template <class... Args>
  CUTLASS_DEVICE auto get_producer_load_callbacks(fusion::ProducerLoadArgs<Args...> const&) {
    return fusion::EmptyProducerLoadCallbacks{};
  }

  template <class CoordTensor>
  struct ConsumerStoreCallbacks : fusion::EmptyConsumerStoreCallbacks {
    CUTLASS_DEVICE ConsumerStoreCallbacks(CoordTensor coords, int m0, int n0, int tile_n0, int rows,
                                          Params const& params)
        : coords(coords), m0(m0), n0(n0), tile_n0(tile_n0), rows(rows), params(params) {}
    // (CPY, CPY_M, CPY_N, EPI_M, EPI_N) -> (m, n) relative to the thread's first value: CUTLASS's
    // coordinate tensors drop the thread's own offset (its residue is relative to it too)
    CoordTensor coords;
    int m0, n0;    // row (within a sample) and column of the thread's first value
    int tile_n0;   // the CTA tile's first column
    int rows;      // M: rows of a sample
    Params const& params;

    template <typename ElementAccumulator, typename ElementInput, int F>
    CUTLASS_DEVICE cutlass::Array<T, F> visit(cutlass::Array<ElementAccumulator, F> const&, int epi_v, int epi_m,
                                              int epi_n, cutlass::Array<ElementInput, F> const& frg_in) {
      static_assert(F == 64, "one visit per 128 x 128 sub-tile: 2 rows x 32 columns per thread");
      auto c = coords(_, _, _, epi_m, epi_n);
      float y[F];
      CUTLASS_PRAGMA_UNROLL
      for (int i = 0; i < F; ++i) y[i] = rnd<T>(static_cast<float>(frg_in[i]));  // the linear's output
      cutlass::Array<T, F> out;
      const int col0 = tile_n0 + epi_n * kHeadDim;  // this sub-tile is the head at columns [col0, col0 + 128)
      if (col0 >= params.qk_cols) {                 // v: uniform over the sub-tile (and the warp)
        CUTLASS_PRAGMA_UNROLL
        for (int i = 0; i < F; ++i) out[i] = T(y[i]);
        return out;
      }
      // The thread's two rows: row slot 0 is the row of value 0, slot 1 the other one.
      const int r0 = get<0>(c(epi_v * F));
      float ss[2] = {0.f, 0.f};
      CUTLASS_PRAGMA_UNROLL
      for (int i = 0; i < F; ++i) ss[get<0>(c(epi_v * F + i)) == r0 ? 0 : 1] += y[i] * y[i];
      CUTLASS_PRAGMA_UNROLL
      for (int j = 0; j < 2; ++j) {
        ss[j] += __shfl_xor_sync(0xffffffffu, ss[j], 1);
        ss[j] += __shfl_xor_sync(0xffffffffu, ss[j], 2);
      }
      float rstd[2];
      CUTLASS_PRAGMA_UNROLL
      for (int j = 0; j < 2; ++j) rstd[j] = rsqrtf(ss[j] / static_cast<float>(kHeadDim) + params.eps);
      const T* w = col0 < params.q_cols ? params.q_weight : params.k_weight;
      CUTLASS_PRAGMA_UNROLL
      for (int i = 0; i < F; i += 2) {
        const auto mn = c(epi_v * F + i);
        const int slot = get<0>(mn) == r0 ? 0 : 1;
        const int col = (n0 + get<1>(mn)) & (kHeadDim - 1);  // even: the pair (col, col + 1)
        float ev = rnd<T>(rnd<T>(y[i] * rstd[slot]) * static_cast<float>(w[col]));
        float od = rnd<T>(rnd<T>(y[i + 1] * rstd[slot]) * static_cast<float>(w[col + 1]));
        const int m = m0 + get<0>(mn);
        const int pos = m + params.pos_offset;
        if (params.cos != nullptr && m < rows && pos >= 0 && pos < params.rope_len) {
          const int64_t at = static_cast<int64_t>(pos) * kHeadDim + col;
          const float2 cs = *reinterpret_cast<const float2*>(params.cos + at);
          const float2 sn = *reinterpret_cast<const float2*>(params.sin + at);
          const float e = ev, o = od;
          ev = rnd<T>(__fsub_rn(__fmul_rn(e, cs.x), __fmul_rn(o, sn.x)));
          od = rnd<T>(__fadd_rn(__fmul_rn(o, cs.y), __fmul_rn(e, sn.y)));
        }
        out[i] = T(ev);
        out[i + 1] = T(od);
      }
      return out;
    }
  };

  template <bool ReferenceSrc, class... Args>
  CUTLASS_DEVICE auto get_consumer_store_callbacks(fusion::ConsumerStoreArgs<Args...> const& args) {
    auto [m, n, k, l] = args.tile_coord_mnkl;
    const int tile_m0 = static_cast<int>(m) * static_cast<int>(size<0>(args.tile_shape_mnk));
    const int tile_n0 = static_cast<int>(n) * static_cast<int>(size<1>(args.tile_shape_mnk));
    // The thread's first value relative to the tile: both residues are (M, N) minus a corner,
    // the tile's (residue_cD) and the thread's first value's (residue_tCcD).
    const int dm = static_cast<int>(get<0>(args.residue_cD)) - static_cast<int>(get<0>(args.residue_tCcD));
    const int dn = static_cast<int>(get<1>(args.residue_cD)) - static_cast<int>(get<1>(args.residue_tCcD));
    const int rows = static_cast<int>(get<0>(args.problem_shape_mnkl));
    return ConsumerStoreCallbacks<decltype(args.tCcD)>(args.tCcD, tile_m0 + dm, tile_n0 + dn, tile_n0, rows,
                                                       params);
  }
};

template <typename T, typename Tile>
using QkNormRopeTree = fusion::Sm90EVT<HeadRmsNormRope<T>, AccPlusBias<T, Tile>>;

template <typename T>
void run(const char* fn, const DeviceInfo& dev, uintptr_t a, uintptr_t w, uintptr_t bias, uintptr_t out,
         int64_t M, int64_t L, int64_t N, int64_t K, int64_t lda, int64_t ldb, int64_t out_batch_stride,
         const typename HeadRmsNormRope<T>::Arguments& head, cudaStream_t s) {
  auto thread = [=](auto* fusion) {
    using Fusion = std::remove_pointer_t<decltype(fusion)>;
    return typename Fusion::Arguments{
        {{}, {reinterpret_cast<const T*>(bias), T(0), {_0{}, _1{}, int64_t(0)}}, {}},  // acc + bias
        head};
  };
  run_evt<T, CooperativeHeads, cutlass::gemm::PersistentScheduler, QkNormRopeTree>(
      fn, dev, a, w, 0, out, M, L, N, K, lda, ldb, thread, s, out_batch_stride);
}

}  // namespace
}  // namespace sm90
#endif

void gemm_qk_norm_rope(uintptr_t a, uintptr_t w, uintptr_t bias, uintptr_t out, uintptr_t q_weight,
                       uintptr_t k_weight, uintptr_t cos, uintptr_t sin, int64_t M, int64_t L, int64_t N,
                       int64_t K, int64_t lda, int64_t ldb, int64_t out_batch_stride, int64_t heads,
                       int64_t head_dim, int64_t pos_offset, int64_t rope_len, double eps, int dtype,
                       uintptr_t stream) {
  const char* fn = "gemm_qk_norm_rope";
  LYRA_CHECK_ARG(a != 0 && w != 0 && out != 0 && q_weight != 0 && k_weight != 0, fn,
                 "a, w, out and the q / k norm weights must be non-null device pointers");
  LYRA_CHECK_ARG(head_dim == 128, fn, "head_dim must be 128 (one 128-column sub-tile per head), got " +
                                          std::to_string(head_dim));
  LYRA_CHECK_ARG(heads >= 1 && N == 3 * heads * head_dim, fn,
                 "N must be 3 * heads * head_dim (q, k, v), got N=" + std::to_string(N) +
                     " heads=" + std::to_string(heads));
  LYRA_CHECK_ARG(out_batch_stride >= M * N && out_batch_stride % 8 == 0, fn,
                 "out_batch_stride must be >= M * N and a multiple of 8");
  LYRA_CHECK_ARG(cos == 0 || (sin != 0 && rope_len >= 0 && aligned_to(cos, 8) && aligned_to(sin, 8)), fn,
                 "cos and sin must both be given (8-byte aligned) with rope_len >= 0, or cos must be 0");
  LYRA_CHECK_ARG(eps >= 0, fn, "eps must be >= 0");
  LYRA_CHECK_ARG(pos_offset >= -(1ll << 30) && pos_offset < (1ll << 30) && rope_len < (1ll << 30), fn,
                 "pos_offset and rope_len must fit in 31 bits");
  check_evt_gemm_args(fn, M, L, N, K, lda, ldb, dtype, 0, {a, w, bias, out, q_weight, k_weight});
#if defined(LYRA_HAVE_CUTLASS)
  const DeviceInfo dev = sm90::sm90_device(fn);
  cudaStream_t s = as_stream(stream);
  const int q_cols = static_cast<int>(heads * head_dim);
  auto launch = [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    typename sm90::HeadRmsNormRope<T>::Arguments head;
    head.q_weight = reinterpret_cast<const T*>(q_weight);
    head.k_weight = reinterpret_cast<const T*>(k_weight);
    head.cos = reinterpret_cast<const float*>(cos);
    head.sin = reinterpret_cast<const float*>(sin);
    head.q_cols = q_cols;
    head.qk_cols = 2 * q_cols;
    head.pos_offset = static_cast<int>(pos_offset);
    head.rope_len = cos ? static_cast<int>(rope_len) : 0;
    head.eps = static_cast<float>(eps);
    sm90::run<T>(fn, dev, a, w, bias, out, M, L, N, K, lda, ldb, out_batch_stride, head, s);
  };
  if (dtype == kFloat16) {
    launch(static_cast<cutlass::half_t*>(nullptr));
  } else {
    launch(static_cast<cutlass::bfloat16_t*>(nullptr));
  }
#else
  (void)stream;
  throw_no_cutlass(fn);
#endif
}

}  // namespace lyra
