// gemm.cu: out(M, N) = a(M, K) @ b(N, K)^T (+ bias[N]) through cuBLASLt.
//
// Row-major trick: a row-major (M, K) matrix with row stride lda is the same
// memory as a column-major (K, M) matrix with leading dimension lda. So we ask
// cuBLASLt (column-major) for
//     out^T (N, M; ld = ldo) = b_cm^T (N, K) * a_cm (K, M)
// where b_cm is b viewed column-major as (K, N; ld = K) and transposed (op T),
// and a_cm is a viewed as (K, M; ld = lda) (op N). CUBLASLT_EPILOGUE_BIAS adds
// a vector along the rows of out^T, i.e. bias[n] per output feature.
//
// Numerics: CUBLAS_COMPUTE_32F for every dtype (fp32 accumulation; for fp32
// inputs this also means *no TF32*, matching PyTorch's fp32 default), and
// split-K reductions in the output type are filtered out.
//
// State (per device, created lazily on the first call, which the caller must
// make before any CUDA-graph capture): a cublasLt handle and a 32 MiB
// workspace (the one cudaMalloc of this library). If the first call happens
// while the stream is capturing, the workspace is not allocated and that
// call runs with no workspace instead of breaking the capture.
// The workspace is shared by all streams of a device: do not run two gemm
// calls concurrently on different streams of the same device.
// Descriptors + heuristic choice are cached per problem key (small map).
// Workspace and memsets: on Hopper, cuBLASLt's algorithms that take the workspace
// (nvjet kernels with a dynamic tile scheduler) zero a counter in it with a memset
// before every kernel. Under CUDA-graph replay that memset costs ~1 us plus a gap of
// 2-4 us on each side (measured, benchmarks/NOTES.md session 10), and the same tile
// without the workspace ("ssched", a static schedule) was as fast or faster at most
// of FLUX's and SDXL's shapes. So an untuned plan takes the heuristic's first
// workspace-free algorithm (one that needs the workspace only if none is free); a
// tuned plan times both kinds. set_gemm_workspace(bytes) caps the workspace offered
// (0: workspace-free algorithms only); the cap is part of the plan key.
// Autotuning (set_gemm_autotune(n), n > 1): for a problem of at least
// kAutotuneMinMacs multiply-adds the heuristic is asked for up to n algorithms
// without workspace and up to n with it (the union, duplicates dropped);
// the first call of the problem that is not being captured times each of them on
// the call's own operands (1 warm-up + 3 timed runs, CUDA events, one host sync
// for all of them) and keeps the fastest for the plan. Smaller problems take the
// heuristic's first choice: their runs are short, so the 4 n runs and the sync
// would cost more (on every new input shape) than a better algorithm can save.
// A call under capture uses the heuristic's first choice and leaves tuning to a
// later call. A new problem that differs from an already timed one only in M, by at
// most kReuseMaxRatio either way (a new image size: M is batch * tokens), takes that
// problem's winner instead of timing again, when cuBLASLt's algorithm check accepts
// it for the new M (the nearest such M wins); the 4 n runs and the host sync were a
// visible part of a new size's first call (benchmarks/NOTES.md, session 25).
// gemm_tuning_counts() says how many plans were timed and how many reused.
// Calls whose residual is the output (C aliases D) are not tuned: repeated runs
// would accumulate.
//
// Quantised (W8A8) variants, same TN row-major trick and the same state/cache
// (the plan key carries the variant):
//   gemm_fp8:          out(M, N) = (a @ b^T) * a_scale[m] * b_scale[n] (+ bias[n])
//                      a (M, K; row stride lda), b (N, K) fp8 e4m3; a_scale (M,),
//                      b_scale (N,) fp32 applied by cuBLASLt's OUTER_VEC_32F scale
//                      mode (Lt's A is our b, so Lt's A scale is b_scale, Lt's B
//                      scale is a_scale); out fp16 / bf16 / fp32, bias in out dtype
//                      (fp16 / bf16 outputs only: cuBLASLt wants a bf16 bias for
//                      fp32 outputs). fp32 accumulation (no fast accumulation).
//   gemm_fp8_ex:       gemm_fp8 (fp16 / bf16 out) + residual (M, N; row stride ldo)
//                      added through C with beta = 1, or a GELU(tanh) epilogue, and
//                      optionally Hopper's fast fp8 accumulation. A gated residual
//                      r + g * (x W^T + b) is b_scale' = b_scale * g, bias' = g * b,
//                      residual = r.
//   gemm_fp8_unscaled: out_f32(M, N) = a @ b^T in fp32 (no scales): the fallback
//                      where OUTER_VEC is not available; scaled_epilogue
//                      (epilogue.cu) then applies scales and bias.
//   gemm_int8:         out_i32(M, N) = a @ b^T, int8 inputs, exact int32 sums
//                      (CUBLAS_COMPUTE_32I).
//
// Fused epilogues for the float GEMM (gemm_ex), all inside cuBLASLt's epilogue:
//   out = epi(alpha[n] * (a @ b^T)[m, n] + residual[m, n] + bias[n])
//   epi: 0 none, 1 GELU (tanh approximation, cuBLASLt's GELU); alpha (N,) fp32 per
//   output column (CUBLASLT_POINTER_MODE_ALPHA_DEVICE_VECTOR_BETA_HOST) or 1;
//   residual (M, N; row stride ldo, may not alias out) added through C with beta = 1;
//   b may be a column slice of a wider weight (row stride ldb >= K).
//   A DiT's gated residual  r + g * (x W^T + b)  is alpha = g, bias = g * b.
// fp8 needs K % 16 == 0, lda % 16 == 0, a 16-byte multiple row pitch of out and
// 16-byte aligned pointers; int8 needs K % 4 == 0, lda % 4 == 0 and 4-byte
// aligned a / b. gemm_fp8_supported_outer_vec(device) runs one small scaled
// GEMM per device (first call only; must not be made during graph capture: it
// allocates) and says whether gemm_fp8 works there, checking the numbers.
// Measured: cuBLAS 13.1 on H200 runs OUTER_VEC for fp16 / bf16 / fp32 output,
// but its heuristic answers CUBLAS_STATUS_INVALID_VALUE unless the A/B scale
// pointers are set on the descriptor first (make_plan sets them).
#include <cublasLt.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>
#include <vector>
#include <mutex>
#include <tuple>
#include <utility>

#include "common.cuh"

namespace lyra {
namespace {

constexpr size_t kWorkspaceBytes = 32u << 20;
constexpr size_t kMaxCacheEntries = 512;
constexpr int kMaxDevices = 64;

#define LYRA_LT_CHECK(expr)                                                          \
  do {                                                                               \
    cublasStatus_t st_ = (expr);                                                     \
    if (st_ != CUBLAS_STATUS_SUCCESS) {                                              \
      throw std::runtime_error(std::string("gemm: cuBLASLt error ") +                \
                               std::to_string(static_cast<int>(st_)) + " in " #expr); \
    }                                                                                \
  } while (0)

// Which GEMM a plan is for (part of the plan key).
enum Variant : int {
  kVarFloat = 0,        // gemm: fp32/fp16/bf16 in and out
  kVarFp8Scaled = 1,    // gemm_fp8: e4m3 in, OUTER_VEC scales, dtype = out dtype
  kVarFp8Unscaled = 2,  // gemm_fp8_unscaled: e4m3 in, fp32 out
  kVarInt8 = 3,         // gemm_int8: int8 in, int32 out
  // gemm_ex: kVarEx | epi (bit 0: GELU) | 2 (alpha vector) | 4 (residual through C)
  kVarEx = 16,
  // gemm_fp8_ex: kVarFp8Ex | 1 (fast accumulation) | 2 (GELU tanh epilogue) | 4 (residual
  // through C); else as gemm_fp8
  kVarFp8Ex = 32,
};

bool is_float_ex(int v) { return v >= kVarEx && v < kVarFp8Ex; }
bool is_fp8_scaled(int v) { return v == kVarFp8Scaled || v >= kVarFp8Ex; }

const char* variant_name(int variant) {
  switch (variant) {
    case kVarFp8Scaled: return "gemm_fp8";
    case kVarFp8Unscaled: return "gemm_fp8_unscaled";
    case kVarInt8: return "gemm_int8";
    default: return variant >= kVarFp8Ex ? "gemm_fp8_ex" : variant >= kVarEx ? "gemm_ex" : "gemm";
  }
}

struct DeviceState {
  cublasLtHandle_t handle = nullptr;
  void* workspace = nullptr;
};

// An algorithm and the workspace it was offered (0: none, the pointer passed is null).
struct Candidate {
  cublasLtMatmulAlgo_t algo;
  size_t ws_bytes = 0;
};

// Everything cuBLASLt needs for one problem shape, minus the data pointers.
struct Plan {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t la = nullptr, lb = nullptr, lc = nullptr;
  Candidate best;
  std::vector<Candidate> untimed;  // heuristic candidates not yet timed (autotune)
  bool timed = false;              // best won a timing on this problem (reuse_timed_sibling's source)
  void destroy() {
    if (op) cublasLtMatmulDescDestroy(op);
    if (la) cublasLtMatrixLayoutDestroy(la);
    if (lb) cublasLtMatrixLayoutDestroy(lb);
    if (lc) cublasLtMatrixLayoutDestroy(lc);
    op = nullptr; la = lb = lc = nullptr;
  }
};

// (device, M, N, K, lda, ldo, dtype, has_bias, alignment bits, workspace bytes, variant, ldb)
using PlanKey =
    std::tuple<int, int64_t, int64_t, int64_t, int64_t, int64_t, int, bool, uint32_t, size_t, int, int64_t>;

std::mutex g_mu;  // guards g_dev and g_plans (and the bias-pointer attribute)
DeviceState g_dev[kMaxDevices];
int g_autotune = 0;  // algorithms to time per new plan (<= 1: the heuristic's first)
size_t g_ws_limit = kWorkspaceBytes;  // workspace new plans may use (set_gemm_workspace)
constexpr int kMaxAutotune = 16;
// 2^33 multiply-adds: ~25 us on an H100 in 16-bit, where a few percent of the run
// is worth 4 n extra runs once per shape (SDXL's feed-forward GEMMs at 1024 and
// FLUX's are tuned; attention projections at SDXL sizes and GEMVs are not).
constexpr double kAutotuneMinMacs = 8589934592.0;
std::map<PlanKey, Plan> g_plans;
// A tuned problem whose M is within this factor of a timed one reuses its winner.
constexpr int64_t kReuseMaxRatio = 4;
int64_t g_plans_timed = 0, g_plans_reused = 0;  // gemm_tuning_counts()

// Largest power of two (<= 256) dividing the address: cuBLASLt preference
// for the minimal alignment an algorithm may assume.
uint32_t ptr_alignment(uintptr_t p) {
  uint32_t a = 256;
  while (a > 1 && (p % a) != 0) a >>= 1;
  return a;
}

cudaDataType_t lt_type(int dtype) {
  switch (dtype) {
    case kFloat32: return CUDA_R_32F;
    case kFloat16: return CUDA_R_16F;
    default: return CUDA_R_16BF;
  }
}

Plan make_plan(cublasLtHandle_t h, int variant, int64_t M, int64_t N, int64_t K, int64_t lda,
               int64_t ldb, int64_t ldo, int dtype, bool has_bias, uint32_t al_a, uint32_t al_b, uint32_t al_o,
               uint32_t al_bias, size_t ws_bytes, uintptr_t a_scale, uintptr_t b_scale) {
  Plan p;
  // Input (A, B) and output (C, D) types, compute and alpha/beta types.
  cudaDataType_t t_in = lt_type(dtype), t_out = lt_type(dtype), t_scale = CUDA_R_32F;
  cublasComputeType_t compute = CUBLAS_COMPUTE_32F;
  if (is_fp8_scaled(variant)) t_in = CUDA_R_8F_E4M3;
  switch (variant) {
    case kVarFp8Unscaled: t_in = CUDA_R_8F_E4M3; t_out = CUDA_R_32F; break;
    case kVarInt8:
      t_in = CUDA_R_8I; t_out = CUDA_R_32I; t_scale = CUDA_R_32I; compute = CUBLAS_COMPUTE_32I;
      break;
    default: break;
  }
  try {
    LYRA_LT_CHECK(cublasLtMatmulDescCreate(&p.op, compute, t_scale));
    const cublasOperation_t opT = CUBLAS_OP_T, opN = CUBLAS_OP_N;
    LYRA_LT_CHECK(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_TRANSA, &opT, sizeof(opT)));
    LYRA_LT_CHECK(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_TRANSB, &opN, sizeof(opN)));
    const bool gelu = (is_float_ex(variant) && (variant & 1)) || (variant >= kVarFp8Ex && (variant & 2));
    const cublasLtEpilogue_t epi = gelu ? (has_bias ? CUBLASLT_EPILOGUE_GELU_BIAS : CUBLASLT_EPILOGUE_GELU)
                                        : (has_bias ? CUBLASLT_EPILOGUE_BIAS : CUBLASLT_EPILOGUE_DEFAULT);
    LYRA_LT_CHECK(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_EPILOGUE, &epi, sizeof(epi)));
    if (is_float_ex(variant) && (variant & 2)) {
      const int32_t pm = CUBLASLT_POINTER_MODE_ALPHA_DEVICE_VECTOR_BETA_HOST;
      LYRA_LT_CHECK(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_POINTER_MODE, &pm, sizeof(pm)));
    }
    if (variant >= kVarFp8Ex && (variant & 1)) {
      const int8_t fast = 1;  // Hopper: no periodic promotion of the fp8 partial sums
      LYRA_LT_CHECK(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_FAST_ACCUM, &fast, sizeof(fast)));
    }
    if (is_fp8_scaled(variant)) {
      // Per-row scale vectors: Lt's A (our b) gets N values, Lt's B (our a) M.
      const int32_t mode = CUBLASLT_MATMUL_MATRIX_SCALE_OUTER_VEC_32F;
      LYRA_LT_CHECK(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_A_SCALE_MODE, &mode, sizeof(mode)));
      LYRA_LT_CHECK(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_B_SCALE_MODE, &mode, sizeof(mode)));
      // The heuristic rejects OUTER_VEC (CUBLAS_STATUS_INVALID_VALUE, seen with
      // cuBLAS 13.1 on H200) unless the scale pointers are already set: set this
      // call's (every call sets its own before cublasLtMatmul).
      const void* lt_a_scale = reinterpret_cast<const void*>(b_scale);
      const void* lt_b_scale = reinterpret_cast<const void*>(a_scale);
      LYRA_LT_CHECK(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &lt_a_scale, sizeof(lt_a_scale)));
      LYRA_LT_CHECK(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &lt_b_scale, sizeof(lt_b_scale)));
    }
    // Lt's A = b buffer viewed (K, N) col-major; B = a buffer (K, M; ld lda);
    // C = D = out (N, M; ld ldo).
    LYRA_LT_CHECK(cublasLtMatrixLayoutCreate(&p.la, t_in, K, N, ldb));
    LYRA_LT_CHECK(cublasLtMatrixLayoutCreate(&p.lb, t_in, K, M, lda));
    LYRA_LT_CHECK(cublasLtMatrixLayoutCreate(&p.lc, t_out, N, M, ldo));

    // Keep fp32 accumulation end to end: no split-K reduction in fp16/bf16.
    const uint32_t scheme = CUBLASLT_REDUCTION_SCHEME_MASK & ~CUBLASLT_REDUCTION_SCHEME_OUTPUT_TYPE;
    auto query = [&](uint64_t ws, int wanted, cublasLtMatmulHeuristicResult_t* res, int* found) {
      cublasLtMatmulPreference_t pref = nullptr;
      LYRA_LT_CHECK(cublasLtMatmulPreferenceCreate(&pref));
      cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws));
      cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK, &scheme, sizeof(scheme));
      cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &al_b, sizeof(al_b));
      cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &al_a, sizeof(al_a));
      cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &al_o, sizeof(al_o));
      cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &al_o, sizeof(al_o));
      *found = 0;
      const cublasStatus_t st =
          cublasLtMatmulAlgoGetHeuristic(h, p.op, p.la, p.lb, p.lc, p.lc, pref, wanted, res, found);
      cublasLtMatmulPreferenceDestroy(pref);
      if (st != CUBLAS_STATUS_SUCCESS) *found = 0;
      return st;
    };
    (void)al_bias;  // bias alignment is part of the cache key only
    const bool tune = g_autotune > 1 && static_cast<double>(M) * N * K >= kAutotuneMinMacs;
    const int wanted = tune ? std::min(g_autotune, kMaxAutotune) : 1;
    // Workspace-free algorithms first (see the header: no memset per launch), then, for a
    // tuned shape or where none is free, those that use the workspace.
    std::vector<Candidate> cands;
    auto add = [&](const cublasLtMatmulHeuristicResult_t* res, int found) {
      for (int i = 0; i < found; ++i) {
        if (res[i].state != CUBLAS_STATUS_SUCCESS) continue;
        const Candidate cand{res[i].algo, res[i].workspaceSize > 0 ? ws_bytes : 0};
        bool seen = false;
        for (const Candidate& c : cands) {
          seen = seen || (c.ws_bytes == cand.ws_bytes && std::memcmp(&c.algo, &cand.algo, sizeof(cand.algo)) == 0);
        }
        if (!seen) cands.push_back(cand);
      }
    };
    cublasLtMatmulHeuristicResult_t res[kMaxAutotune];
    int found = 0;
    cublasStatus_t st = query(0, wanted, res, &found);
    add(res, found);
    if (ws_bytes > 0 && (tune || cands.empty())) {
      const cublasStatus_t st_ws = query(ws_bytes, wanted, res, &found);
      if (cands.empty()) st = st_ws;
      add(res, found);
    }
    if (cands.empty()) {
      throw std::runtime_error(std::string(variant_name(variant)) +
                               ": cuBLASLt found no algorithm for M=" + std::to_string(M) +
                               " N=" + std::to_string(N) + " K=" + std::to_string(K) +
                               " lda=" + std::to_string(lda) + " ldo=" + std::to_string(ldo) +
                               " dtype=" + dtype_name(dtype) + " (status " +
                               std::to_string(static_cast<int>(st)) + ")");
    }
    p.best = cands[0];
    p.untimed.assign(cands.begin() + 1, cands.end());
  } catch (...) {
    p.destroy();
    throw;
  }
  return p;
}

// Autotuning: times plan.best and plan.untimed on this call's operands and keeps
// the fastest in plan.best (the heuristic's choice on any error). All candidates
// are enqueued with their own event pair; one host sync at the end.
template <typename Launch>
void time_candidates(Plan& plan, Launch& launch, cudaStream_t s) {
  std::vector<Candidate> cands{plan.best};
  cands.insert(cands.end(), plan.untimed.begin(), plan.untimed.end());
  plan.untimed.clear();
  const size_t n = cands.size();
  std::vector<cudaEvent_t> ev(2 * n, nullptr);
  std::vector<char> ran(n, 0);
  bool events_ok = true;
  for (auto& e : ev) events_ok = events_ok && cudaEventCreate(&e) == cudaSuccess;
  cudaEvent_t last = nullptr;
  for (size_t i = 0; events_ok && i < n; ++i) {
    if (launch(&cands[i]) != CUBLAS_STATUS_SUCCESS) continue;  // warm-up; unsupported: skip
    bool ok = cudaEventRecord(ev[2 * i], s) == cudaSuccess;
    for (int r = 0; ok && r < 3; ++r) ok = launch(&cands[i]) == CUBLAS_STATUS_SUCCESS;
    ok = ok && cudaEventRecord(ev[2 * i + 1], s) == cudaSuccess;
    ran[i] = ok;
    if (ok) last = ev[2 * i + 1];
  }
  float best = 0.f;
  size_t best_i = 0;
  bool any = false;
  if (last != nullptr && cudaEventSynchronize(last) == cudaSuccess) {
    for (size_t i = 0; i < n; ++i) {
      float ms = 0.f;
      if (ran[i] && cudaEventElapsedTime(&ms, ev[2 * i], ev[2 * i + 1]) == cudaSuccess &&
          (!any || ms < best)) {
        best = ms;
        best_i = i;
        any = true;
      }
    }
  }
  cudaGetLastError();  // a refused candidate must not surface at the next launch check
  for (auto& e : ev) {
    if (e) cudaEventDestroy(e);
  }
  plan.best = cands[any ? best_i : 0];
  plan.timed = any;
}

// A plan about to be timed: if a plan of the same problem but another M (within
// kReuseMaxRatio) exists whose winner was timed there (not itself reused: no
// drift), and cuBLASLt accepts that winner at this plan's M, take it and skip the
// timing. Caller holds g_mu.
void reuse_timed_sibling(cublasLtHandle_t h, Plan& plan, const PlanKey& key) {
  const int64_t M = std::get<1>(key);
  const Plan* nearest = nullptr;
  double nearest_ratio = 0.0;
  for (const auto& kv : g_plans) {
    PlanKey other = kv.first;
    const int64_t m2 = std::get<1>(other);
    std::get<1>(other) = M;
    if (other != key || !kv.second.timed) continue;  // another problem, or not timed itself
    const double ratio = m2 > M ? static_cast<double>(m2) / M : static_cast<double>(M) / m2;
    if (ratio > kReuseMaxRatio || (nearest != nullptr && ratio >= nearest_ratio)) continue;
    nearest = &kv.second;
    nearest_ratio = ratio;
  }
  if (nearest == nullptr) return;
  cublasLtMatmulHeuristicResult_t check{};
  if (cublasLtMatmulAlgoCheck(h, plan.op, plan.la, plan.lb, plan.lc, plan.lc, &nearest->best.algo, &check) !=
          CUBLAS_STATUS_SUCCESS ||
      check.state != CUBLAS_STATUS_SUCCESS || check.workspaceSize > nearest->best.ws_bytes) {
    return;  // not valid at this M: time as usual
  }
  plan.best = nearest->best;
  plan.untimed.clear();
  ++g_plans_reused;
}

// Pointers of one call; the *_scale ones are our a / b scales (fp8 scaled only).
struct GemmArgs {
  uintptr_t a, b, bias, out, a_scale, b_scale;
  uintptr_t residual = 0, alpha_vec = 0;  // gemm_ex only
  int64_t ldb = 0;                        // row stride of b; 0 = K (contiguous)
};

// Finds (or builds) the plan for this problem and enqueues the matmul on
// `stream`. Holds g_mu for the whole call: the cached descriptors' pointer
// attributes (bias, scales) are per call.
void run_gemm(const char* fn, int variant, const GemmArgs& g, int64_t M, int64_t N, int64_t K,
              int64_t lda, int64_t ldo, int dtype, cudaStream_t s) {
  int dev = 0;
  LYRA_CUDA_CHECK(cudaGetDevice(&dev), fn);
  LYRA_CHECK_ARG(dev >= 0 && dev < kMaxDevices, fn, "device ordinal out of range");

  std::lock_guard<std::mutex> lock(g_mu);
  DeviceState& ds = g_dev[dev];
  if (ds.handle == nullptr) LYRA_LT_CHECK(cublasLtCreate(&ds.handle));
  if (ds.workspace == nullptr) {
    // Lazy one-time allocation; skipped (workspace-free algos) under capture.
    cudaStreamCaptureStatus cap = cudaStreamCaptureStatusNone;
    LYRA_CUDA_CHECK(cudaStreamIsCapturing(s, &cap), fn);
    if (cap == cudaStreamCaptureStatusNone) {
      LYRA_CUDA_CHECK(cudaMalloc(&ds.workspace, kWorkspaceBytes), fn);
    }
  }
  const size_t ws_bytes = ds.workspace != nullptr ? g_ws_limit : 0;

  const uint32_t al_a = ptr_alignment(g.a), al_b = ptr_alignment(g.b), al_o = ptr_alignment(g.out);
  const uint32_t al_bias = g.bias ? ptr_alignment(g.bias) : 256;
  // Pack the four alignments (each a power of two <= 256 -> log2 fits in 4 bits).
  auto lg = [](uint32_t v) { uint32_t l = 0; while (v > 1) { v >>= 1; ++l; } return l; };
  const uint32_t al_bits = lg(al_a) | (lg(al_b) << 4) | (lg(al_o) << 8) | (lg(al_bias) << 12);
  const int64_t ldb = g.ldb ? g.ldb : K;
  const PlanKey key{dev, M, N, K, lda, ldo, dtype, g.bias != 0, al_bits, ws_bytes, variant, ldb};

  auto it = g_plans.find(key);
  if (it == g_plans.end()) {
    if (g_plans.size() >= kMaxCacheEntries) {  // bounded: drop everything (host-side only)
      for (auto& kv : g_plans) kv.second.destroy();
      g_plans.clear();
    }
    Plan plan = make_plan(ds.handle, variant, M, N, K, lda, ldb, ldo, dtype, g.bias != 0, al_a, al_b,
                          al_o, al_bias, ws_bytes, g.a_scale, g.b_scale);
    if (!plan.untimed.empty()) reuse_timed_sibling(ds.handle, plan, key);
    it = g_plans.emplace(key, plan).first;
  }
  Plan& plan = it->second;
  if (g.bias) {
    const void* bp = reinterpret_cast<const void*>(g.bias);
    LYRA_LT_CHECK(cublasLtMatmulDescSetAttribute(plan.op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bp, sizeof(bp)));
  }
  if (is_fp8_scaled(variant)) {
    // Row-major trick: Lt's A is our b (N rows of op(A)), Lt's B is our a.
    const void* lt_a_scale = reinterpret_cast<const void*>(g.b_scale);
    const void* lt_b_scale = reinterpret_cast<const void*>(g.a_scale);
    LYRA_LT_CHECK(cublasLtMatmulDescSetAttribute(plan.op, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER,
                                                 &lt_a_scale, sizeof(lt_a_scale)));
    LYRA_LT_CHECK(cublasLtMatmulDescSetAttribute(plan.op, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER,
                                                 &lt_b_scale, sizeof(lt_b_scale)));
  }
  const float alpha_f = 1.f, beta_f = g.residual ? 1.f : 0.f;
  const int32_t alpha_i = 1, beta_i = 0;
  const void* alpha = variant == kVarInt8 ? static_cast<const void*>(&alpha_i)
                      : g.alpha_vec      ? reinterpret_cast<const void*>(g.alpha_vec)
                                         : &alpha_f;
  const void* beta = variant == kVarInt8 ? static_cast<const void*>(&beta_i) : &beta_f;
  void* o = reinterpret_cast<void*>(g.out);
  const void* c = g.residual ? reinterpret_cast<const void*>(g.residual) : o;
  auto launch = [&](const Candidate* cand) {
    return cublasLtMatmul(ds.handle, plan.op, alpha, reinterpret_cast<const void*>(g.b), plan.la,
                          reinterpret_cast<const void*>(g.a), plan.lb, beta, c, plan.lc, o, plan.lc,
                          &cand->algo, cand->ws_bytes ? ds.workspace : nullptr, cand->ws_bytes, s);
  };
  if (!plan.untimed.empty() && g.residual != g.out) {
    cudaStreamCaptureStatus cap = cudaStreamCaptureStatusNone;
    if (cudaStreamIsCapturing(s, &cap) == cudaSuccess && cap == cudaStreamCaptureStatusNone) {
      time_candidates(plan, launch, s);
      ++g_plans_timed;
    }
  }
  LYRA_LT_CHECK(launch(&plan.best));
  LYRA_CHECK_LAUNCH(fn);
}

// Checks shared by every variant.
void check_sizes(const char* fn, uintptr_t a, uintptr_t b, uintptr_t out, const char* out_name,
                 int64_t M, int64_t N, int64_t K, int64_t lda, int64_t ldo) {
  LYRA_CHECK_ARG(a != 0 && b != 0 && out != 0, fn,
                 std::string("a, b and ") + out_name + " must be non-null device pointers");
  LYRA_CHECK_ARG(M > 0, fn, "M must be positive, got " + std::to_string(M));
  LYRA_CHECK_ARG(N > 0, fn, "N must be positive, got " + std::to_string(N));
  LYRA_CHECK_ARG(K > 0, fn, "K must be positive, got " + std::to_string(K));
  LYRA_CHECK_ARG(lda >= K, fn, "lda must be >= K, got lda=" + std::to_string(lda) + " K=" + std::to_string(K));
  LYRA_CHECK_ARG(ldo >= N, fn, "ldo must be >= N, got ldo=" + std::to_string(ldo) + " N=" + std::to_string(N));
}

// fp8 (e4m3) operand rules of cuBLASLt: K and lda multiples of 16, 16-byte
// aligned pointers and output row pitch.
void check_fp8(const char* fn, uintptr_t a, uintptr_t b, uintptr_t out, int64_t K, int64_t lda,
               int64_t ldo, size_t out_es) {
  LYRA_CHECK_ARG(K % 16 == 0, fn, "K must be a multiple of 16 for fp8, got K=" + std::to_string(K));
  LYRA_CHECK_ARG(lda % 16 == 0, fn, "lda must be a multiple of 16 for fp8, got lda=" + std::to_string(lda));
  LYRA_CHECK_ARG((ldo * static_cast<int64_t>(out_es)) % 16 == 0, fn,
                 "the output row pitch (ldo * element size) must be a multiple of 16 bytes for fp8, "
                 "got ldo=" + std::to_string(ldo));
  LYRA_CHECK_ARG(aligned_to(a, 16) && aligned_to(b, 16) && aligned_to(out, 16), fn,
                 "a, b and the output must be 16-byte aligned for fp8");
}

// Per-device result of the OUTER_VEC probe, per output dtype: 0 unknown, 1 yes, 2 no.
std::mutex g_probe_mu;
int8_t g_outer_vec_ok[kMaxDevices][3] = {};

// One 16 x 32 x 32 scaled fp8 GEMM on `dev` (+ bias if asked), checked against
// the closed form. All ones in a and b, a_scale[m] = m + 1, b_scale[n] =
// 2^-(n % 4), bias[n] = n / 4: out[m, n] = 32 (m + 1) 2^-(n % 4) + bias[n].
// Asymmetric on purpose: swapped or ignored scales give other numbers.
bool probe_outer_vec(int out_dtype, bool with_bias) {
  const char* fn = "gemm_fp8_supported_outer_vec";
  constexpr int M = 16, N = 32, K = 32;
  const size_t es = dtype_size(out_dtype);
  unsigned char h_ab[(M + N) * K];
  for (auto& v : h_ab) v = 0x38;  // 1.0 in e4m3
  float h_sc[M + N];
  for (int m = 0; m < M; ++m) h_sc[m] = static_cast<float>(m + 1);
  for (int n = 0; n < N; ++n) h_sc[M + n] = 1.f / static_cast<float>(1 << (n % 4));
  // bias in the output dtype (exact small multiples of 1/4)
  uint16_t h_bias16[N];
  float h_bias32[N];
  for (int n = 0; n < N; ++n) {
    const float bv = 0.25f * static_cast<float>(n);
    h_bias32[n] = bv;
    if (out_dtype == kFloat16) {
      const __half hv = __float2half_rn(bv);
      std::memcpy(&h_bias16[n], &hv, 2);
    } else {
      const __nv_bfloat16 bh = __float2bfloat16_rn(bv);
      std::memcpy(&h_bias16[n], &bh, 2);
    }
  }
  void* d_ab = nullptr;
  void* d_sc = nullptr;
  void* d_bias = nullptr;
  void* d_out = nullptr;
  cudaStream_t st = nullptr;
  bool ok = false;
  try {
    LYRA_CUDA_CHECK(cudaMalloc(&d_ab, sizeof(h_ab)), fn);
    LYRA_CUDA_CHECK(cudaMalloc(&d_sc, sizeof(h_sc)), fn);
    LYRA_CUDA_CHECK(cudaMalloc(&d_bias, sizeof(h_bias32)), fn);
    LYRA_CUDA_CHECK(cudaMalloc(&d_out, M * N * es), fn);
    LYRA_CUDA_CHECK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking), fn);
    LYRA_CUDA_CHECK(cudaMemcpy(d_ab, h_ab, sizeof(h_ab), cudaMemcpyHostToDevice), fn);
    LYRA_CUDA_CHECK(cudaMemcpy(d_sc, h_sc, sizeof(h_sc), cudaMemcpyHostToDevice), fn);
    if (out_dtype == kFloat32) {
      LYRA_CUDA_CHECK(cudaMemcpy(d_bias, h_bias32, sizeof(h_bias32), cudaMemcpyHostToDevice), fn);
    } else {
      LYRA_CUDA_CHECK(cudaMemcpy(d_bias, h_bias16, sizeof(h_bias16), cudaMemcpyHostToDevice), fn);
    }
    // Pageable copies may still be in flight; st does not order after them.
    LYRA_CUDA_CHECK(cudaDeviceSynchronize(), fn);
    const uintptr_t a = reinterpret_cast<uintptr_t>(d_ab);
    const uintptr_t b = a + M * K;
    const uintptr_t sa = reinterpret_cast<uintptr_t>(d_sc);
    const uintptr_t sb = sa + M * sizeof(float);
    const GemmArgs g{a, b, with_bias ? reinterpret_cast<uintptr_t>(d_bias) : 0,
                     reinterpret_cast<uintptr_t>(d_out), sa, sb};
    run_gemm(fn, kVarFp8Scaled, g, M, N, K, K, N, out_dtype, st);
    LYRA_CUDA_CHECK(cudaStreamSynchronize(st), fn);
    std::vector<unsigned char> h_out(M * N * es);
    LYRA_CUDA_CHECK(cudaMemcpy(h_out.data(), d_out, h_out.size(), cudaMemcpyDeviceToHost), fn);
    ok = true;
    for (int m = 0; m < M && ok; ++m) {
      for (int n = 0; n < N; ++n) {
        float got;
        const unsigned char* src = h_out.data() + (m * N + n) * es;
        if (out_dtype == kFloat32) {
          std::memcpy(&got, src, 4);
        } else if (out_dtype == kFloat16) {
          __half hv;
          std::memcpy(&hv, src, 2);
          got = __half2float(hv);
        } else {
          __nv_bfloat16 bh;
          std::memcpy(&bh, src, 2);
          got = __bfloat162float(bh);
        }
        const float want = 32.f * h_sc[m] * h_sc[M + n] + (with_bias ? h_bias32[n] : 0.f);
        if (!(std::fabs(got - want) <= 1e-2f * std::fabs(want))) {
          ok = false;
          break;
        }
      }
    }
  } catch (const std::exception&) {
    ok = false;  // no algorithm / refused attribute / launch error: not supported
  }
  if (st) cudaStreamDestroy(st);
  cudaFree(d_ab);
  cudaFree(d_sc);
  cudaFree(d_bias);
  cudaFree(d_out);
  cudaGetLastError();  // a refused call must not leave an error behind
  return ok;
}

}  // namespace

void set_gemm_autotune(int candidates) {
  LYRA_CHECK_ARG(candidates >= 0, "set_gemm_autotune", "candidates must be >= 0");
  std::lock_guard<std::mutex> lock(g_mu);
  g_autotune = std::min(candidates, kMaxAutotune);
}

int gemm_autotune() {
  std::lock_guard<std::mutex> lock(g_mu);
  return g_autotune;
}

std::pair<int64_t, int64_t> gemm_tuning_counts() {
  std::lock_guard<std::mutex> lock(g_mu);
  return {g_plans_timed, g_plans_reused};
}

void set_gemm_workspace(int64_t bytes) {
  LYRA_CHECK_ARG(bytes >= 0 && static_cast<size_t>(bytes) <= kWorkspaceBytes, "set_gemm_workspace",
                 "bytes must be in [0, " + std::to_string(kWorkspaceBytes) + "], got " + std::to_string(bytes));
  std::lock_guard<std::mutex> lock(g_mu);
  g_ws_limit = static_cast<size_t>(bytes);
}

int64_t gemm_workspace() {
  std::lock_guard<std::mutex> lock(g_mu);
  return static_cast<int64_t>(g_ws_limit);
}

void gemm(uintptr_t a, uintptr_t b, uintptr_t bias, uintptr_t out, int64_t M, int64_t N,
          int64_t K, int64_t lda, int64_t ldo, int dtype, uintptr_t stream) {
  const char* fn = "gemm";
  check_sizes(fn, a, b, out, "out", M, N, K, lda, ldo);
  LYRA_CHECK_ARG(dtype >= 0 && dtype <= 2, fn, "dtype must be 0, 1 or 2, got " + std::to_string(dtype));
  run_gemm(fn, kVarFloat, GemmArgs{a, b, bias, out, 0, 0}, M, N, K, lda, ldo, dtype,
           as_stream(stream));
}

void gemm_ex(uintptr_t a, uintptr_t b, uintptr_t bias, uintptr_t residual, uintptr_t alpha_vec,
             uintptr_t out, int64_t M, int64_t N, int64_t K, int64_t lda, int64_t ldb, int64_t ldo,
             int dtype, int epi, uintptr_t stream) {
  const char* fn = "gemm_ex";
  check_sizes(fn, a, b, out, "out", M, N, K, lda, ldo);
  LYRA_CHECK_ARG(ldb >= K, fn, "ldb must be >= K, got ldb=" + std::to_string(ldb) + " K=" + std::to_string(K));
  LYRA_CHECK_ARG(dtype == kFloat16 || dtype == kFloat32 || dtype == kBFloat16, fn,
                 "dtype must be 0, 1 or 2, got " + std::to_string(dtype));
  LYRA_CHECK_ARG(epi == 0 || epi == 1, fn, "epi must be 0 (none) or 1 (gelu tanh), got " + std::to_string(epi));
  LYRA_CHECK_ARG(residual != out || residual == 0, fn, "residual must not alias out");
  LYRA_CHECK_ARG(alpha_vec == 0 || aligned_to(alpha_vec, 4), fn, "alpha_vec must be 4-byte aligned (float32)");
  const int variant = kVarEx | epi | (alpha_vec ? 2 : 0) | (residual ? 4 : 0);
  GemmArgs g{a, b, bias, out, 0, 0};
  g.residual = residual;
  g.alpha_vec = alpha_vec;
  g.ldb = ldb;
  run_gemm(fn, variant, g, M, N, K, lda, ldo, dtype, as_stream(stream));
}

void gemm_fp8(uintptr_t a, uintptr_t b, uintptr_t a_scale, uintptr_t b_scale, uintptr_t bias,
              uintptr_t out, int64_t M, int64_t N, int64_t K, int64_t lda, int64_t ldo,
              int out_dtype, uintptr_t stream) {
  const char* fn = "gemm_fp8";
  check_sizes(fn, a, b, out, "out", M, N, K, lda, ldo);
  LYRA_CHECK_ARG(out_dtype >= 0 && out_dtype <= 2, fn,
                 "out_dtype must be 0 (float32), 1 (float16) or 2 (bfloat16), got " +
                     std::to_string(out_dtype));
  LYRA_CHECK_ARG(a_scale != 0 && b_scale != 0, fn,
                 "a_scale and b_scale must be non-null device pointers (float32)");
  LYRA_CHECK_ARG(aligned_to(a_scale, 4) && aligned_to(b_scale, 4), fn,
                 "a_scale and b_scale must be 4-byte aligned (float32)");
  LYRA_CHECK_ARG(!(bias != 0 && out_dtype == kFloat32), fn,
                 "bias is not supported with out_dtype float32 (cuBLASLt fp8 takes a bf16 bias "
                 "there): pass bias=0 and add it in scaled_epilogue / linear_epilogue");
  check_fp8(fn, a, b, out, K, lda, ldo, dtype_size(out_dtype));
  run_gemm(fn, kVarFp8Scaled, GemmArgs{a, b, bias, out, a_scale, b_scale}, M, N, K, lda, ldo,
           out_dtype, as_stream(stream));
}

void gemm_fp8_ex(uintptr_t a, uintptr_t b, uintptr_t a_scale, uintptr_t b_scale, uintptr_t bias,
                 uintptr_t residual, uintptr_t out, int64_t M, int64_t N, int64_t K, int64_t lda,
                 int64_t ldo, int out_dtype, bool fast_accum, uintptr_t stream, int epi) {
  const char* fn = "gemm_fp8_ex";
  LYRA_CHECK_ARG(epi == 0 || epi == 1, fn, "epi must be 0 (none) or 1 (gelu tanh), got " + std::to_string(epi));
  LYRA_CHECK_ARG(epi == 0 || residual == 0, fn, "epi = 1 (gelu) takes no residual");
  check_sizes(fn, a, b, out, "out", M, N, K, lda, ldo);
  LYRA_CHECK_ARG(out_dtype == kFloat16 || out_dtype == kBFloat16, fn,
                 "out_dtype must be 1 (float16) or 2 (bfloat16), got " + std::to_string(out_dtype));
  LYRA_CHECK_ARG(a_scale != 0 && b_scale != 0, fn,
                 "a_scale and b_scale must be non-null device pointers (float32)");
  LYRA_CHECK_ARG(aligned_to(a_scale, 4) && aligned_to(b_scale, 4), fn,
                 "a_scale and b_scale must be 4-byte aligned (float32)");
  LYRA_CHECK_ARG(residual != out || residual == 0, fn, "residual must not alias out");
  LYRA_CHECK_ARG(residual == 0 || aligned_to(residual, 16), fn, "residual must be 16-byte aligned");
  check_fp8(fn, a, b, out, K, lda, ldo, dtype_size(out_dtype));
  GemmArgs g{a, b, bias, out, a_scale, b_scale};
  g.residual = residual;
  const int variant = kVarFp8Ex | (fast_accum ? 1 : 0) | (epi ? 2 : 0) | (residual ? 4 : 0);
  run_gemm(fn, variant, g, M, N, K, lda, ldo, out_dtype, as_stream(stream));
}

void gemm_fp8_unscaled(uintptr_t a, uintptr_t b, uintptr_t out_f32, int64_t M, int64_t N,
                       int64_t K, int64_t lda, uintptr_t stream) {
  const char* fn = "gemm_fp8_unscaled";
  check_sizes(fn, a, b, out_f32, "out_f32", M, N, K, lda, N);
  check_fp8(fn, a, b, out_f32, K, lda, N, 4);
  run_gemm(fn, kVarFp8Unscaled, GemmArgs{a, b, 0, out_f32, 0, 0}, M, N, K, lda, N, kFloat32,
           as_stream(stream));
}

void gemm_int8(uintptr_t a, uintptr_t b, uintptr_t out_i32, int64_t M, int64_t N, int64_t K,
               int64_t lda, uintptr_t stream) {
  const char* fn = "gemm_int8";
  check_sizes(fn, a, b, out_i32, "out_i32", M, N, K, lda, N);
  LYRA_CHECK_ARG(K % 4 == 0, fn, "K must be a multiple of 4 for int8, got K=" + std::to_string(K));
  LYRA_CHECK_ARG(lda % 4 == 0, fn, "lda must be a multiple of 4 for int8, got lda=" + std::to_string(lda));
  LYRA_CHECK_ARG(aligned_to(a, 4) && aligned_to(b, 4) && aligned_to(out_i32, 4), fn,
                 "a, b and out_i32 must be 4-byte aligned for int8");
  // dtype slot of the key: the (fixed) int32 output.
  run_gemm(fn, kVarInt8, GemmArgs{a, b, 0, out_i32, 0, 0}, M, N, K, lda, N, kFloat32,
           as_stream(stream));
}

bool gemm_fp8_supported_outer_vec(int device, int out_dtype) {
  const char* fn = "gemm_fp8_supported_outer_vec";
  LYRA_CHECK_ARG(device >= 0 && device < kMaxDevices, fn,
                 "device must be a CUDA device ordinal, got " + std::to_string(device));
  LYRA_CHECK_ARG(out_dtype >= -1 && out_dtype <= 2, fn,
                 "out_dtype must be -1 (float16 and bfloat16), 0, 1 or 2, got " +
                     std::to_string(out_dtype));
  if (out_dtype == -1) {
    return gemm_fp8_supported_outer_vec(device, kFloat16) &&
           gemm_fp8_supported_outer_vec(device, kBFloat16);
  }
  std::lock_guard<std::mutex> lock(g_probe_mu);
  int8_t& cached = g_outer_vec_ok[device][out_dtype];
  if (cached != 0) return cached == 1;
  int prev = 0;
  LYRA_CUDA_CHECK(cudaGetDevice(&prev), fn);
  LYRA_CUDA_CHECK(cudaSetDevice(device), fn);
  int cc_major = 0;
  LYRA_CUDA_CHECK(cudaDeviceGetAttribute(&cc_major, cudaDevAttrComputeCapabilityMajor, device), fn);
  bool ok = cc_major >= 9;  // probed on Hopper and newer only; older: reported False
  if (ok) ok = probe_outer_vec(out_dtype, false);
  if (ok && out_dtype != kFloat32) ok = probe_outer_vec(out_dtype, true);
  LYRA_CUDA_CHECK(cudaSetDevice(prev), fn);
  cached = ok ? 1 : 2;
  return ok;
}

}  // namespace lyra
