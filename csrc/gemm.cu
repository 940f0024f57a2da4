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
#include <cublasLt.h>

#include <cstring>
#include <map>
#include <mutex>
#include <tuple>

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

struct DeviceState {
  cublasLtHandle_t handle = nullptr;
  void* workspace = nullptr;
};

// Everything cuBLASLt needs for one problem shape, minus the data pointers.
struct Plan {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t la = nullptr, lb = nullptr, lc = nullptr;
  cublasLtMatmulAlgo_t algo;
  size_t ws_bytes = 0;
  void destroy() {
    if (op) cublasLtMatmulDescDestroy(op);
    if (la) cublasLtMatrixLayoutDestroy(la);
    if (lb) cublasLtMatrixLayoutDestroy(lb);
    if (lc) cublasLtMatrixLayoutDestroy(lc);
    op = nullptr; la = lb = lc = nullptr;
  }
};

// (device, M, N, K, lda, ldo, dtype, has_bias, alignment bits, workspace?)
using PlanKey = std::tuple<int, int64_t, int64_t, int64_t, int64_t, int64_t, int, bool, uint32_t, bool>;

std::mutex g_mu;  // guards g_dev and g_plans (and the bias-pointer attribute)
DeviceState g_dev[kMaxDevices];
std::map<PlanKey, Plan> g_plans;

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

Plan make_plan(cublasLtHandle_t h, int64_t M, int64_t N, int64_t K, int64_t lda, int64_t ldo,
               int dtype, bool has_bias, uint32_t al_a, uint32_t al_b, uint32_t al_o,
               uint32_t al_bias, size_t ws_bytes) {
  Plan p;
  const cudaDataType_t t = lt_type(dtype);
  try {
    LYRA_LT_CHECK(cublasLtMatmulDescCreate(&p.op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    const cublasOperation_t opT = CUBLAS_OP_T, opN = CUBLAS_OP_N;
    LYRA_LT_CHECK(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_TRANSA, &opT, sizeof(opT)));
    LYRA_LT_CHECK(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_TRANSB, &opN, sizeof(opN)));
    const cublasLtEpilogue_t epi = has_bias ? CUBLASLT_EPILOGUE_BIAS : CUBLASLT_EPILOGUE_DEFAULT;
    LYRA_LT_CHECK(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_EPILOGUE, &epi, sizeof(epi)));
    // Lt's A = b buffer viewed (K, N) col-major; B = a buffer (K, M; ld lda);
    // C = D = out (N, M; ld ldo).
    LYRA_LT_CHECK(cublasLtMatrixLayoutCreate(&p.la, t, K, N, K));
    LYRA_LT_CHECK(cublasLtMatrixLayoutCreate(&p.lb, t, K, M, lda));
    LYRA_LT_CHECK(cublasLtMatrixLayoutCreate(&p.lc, t, N, M, ldo));

    cublasLtMatmulPreference_t pref = nullptr;
    LYRA_LT_CHECK(cublasLtMatmulPreferenceCreate(&pref));
    cublasLtMatmulHeuristicResult_t res;
    int found = 0;
    cublasStatus_t st;
    {
      const uint64_t ws = ws_bytes;
      // Keep fp32 accumulation end to end: no split-K reduction in fp16/bf16.
      const uint32_t scheme = CUBLASLT_REDUCTION_SCHEME_MASK & ~CUBLASLT_REDUCTION_SCHEME_OUTPUT_TYPE;
      cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws));
      cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK, &scheme, sizeof(scheme));
      cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &al_b, sizeof(al_b));
      cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &al_a, sizeof(al_a));
      cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &al_o, sizeof(al_o));
      cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &al_o, sizeof(al_o));
      (void)al_bias;  // bias alignment is part of the cache key only
      st = cublasLtMatmulAlgoGetHeuristic(h, p.op, p.la, p.lb, p.lc, p.lc, pref, 1, &res, &found);
      cublasLtMatmulPreferenceDestroy(pref);
    }
    if (st != CUBLAS_STATUS_SUCCESS || found == 0) {
      throw std::runtime_error("gemm: cuBLASLt found no algorithm for M=" + std::to_string(M) +
                               " N=" + std::to_string(N) + " K=" + std::to_string(K) +
                               " lda=" + std::to_string(lda) + " ldo=" + std::to_string(ldo) +
                               " dtype=" + dtype_name(dtype) + " (status " +
                               std::to_string(static_cast<int>(st)) + ")");
    }
    p.algo = res.algo;
    p.ws_bytes = ws_bytes;
  } catch (...) {
    p.destroy();
    throw;
  }
  return p;
}

}  // namespace

void gemm(uintptr_t a, uintptr_t b, uintptr_t bias, uintptr_t out, int64_t M, int64_t N,
          int64_t K, int64_t lda, int64_t ldo, int dtype, uintptr_t stream) {
  const char* fn = "gemm";
  LYRA_CHECK_ARG(a != 0 && b != 0 && out != 0, fn, "a, b and out must be non-null device pointers");
  LYRA_CHECK_ARG(M > 0, fn, "M must be positive, got " + std::to_string(M));
  LYRA_CHECK_ARG(N > 0, fn, "N must be positive, got " + std::to_string(N));
  LYRA_CHECK_ARG(K > 0, fn, "K must be positive, got " + std::to_string(K));
  LYRA_CHECK_ARG(lda >= K, fn, "lda must be >= K, got lda=" + std::to_string(lda) + " K=" + std::to_string(K));
  LYRA_CHECK_ARG(ldo >= N, fn, "ldo must be >= N, got ldo=" + std::to_string(ldo) + " N=" + std::to_string(N));
  LYRA_CHECK_ARG(dtype >= 0 && dtype <= 2, fn, "dtype must be 0, 1 or 2, got " + std::to_string(dtype));

  const cudaStream_t s = as_stream(stream);
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
  const bool has_ws = ds.workspace != nullptr;

  const uint32_t al_a = ptr_alignment(a), al_b = ptr_alignment(b), al_o = ptr_alignment(out);
  const uint32_t al_bias = bias ? ptr_alignment(bias) : 256;
  // Pack the four alignments (each a power of two <= 256 -> log2 fits in 4 bits).
  auto lg = [](uint32_t v) { uint32_t l = 0; while (v > 1) { v >>= 1; ++l; } return l; };
  const uint32_t al_bits = lg(al_a) | (lg(al_b) << 4) | (lg(al_o) << 8) | (lg(al_bias) << 12);
  const PlanKey key{dev, M, N, K, lda, ldo, dtype, bias != 0, al_bits, has_ws};

  auto it = g_plans.find(key);
  if (it == g_plans.end()) {
    if (g_plans.size() >= kMaxCacheEntries) {  // bounded: drop everything (host-side only)
      for (auto& kv : g_plans) kv.second.destroy();
      g_plans.clear();
    }
    Plan plan = make_plan(ds.handle, M, N, K, lda, ldo, dtype, bias != 0, al_a, al_b, al_o,
                          al_bias, has_ws ? kWorkspaceBytes : 0);
    it = g_plans.emplace(key, plan).first;
  }
  Plan& plan = it->second;
  if (bias) {
    const void* bp = reinterpret_cast<const void*>(bias);
    LYRA_LT_CHECK(cublasLtMatmulDescSetAttribute(plan.op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bp, sizeof(bp)));
  }
  const float alpha = 1.f, beta = 0.f;
  void* o = reinterpret_cast<void*>(out);
  LYRA_LT_CHECK(cublasLtMatmul(ds.handle, plan.op, &alpha, reinterpret_cast<const void*>(b), plan.la,
                               reinterpret_cast<const void*>(a), plan.lb, &beta, o, plan.lc, o, plan.lc,
                               &plan.algo, has_ws ? ds.workspace : nullptr, plan.ws_bytes, s));
  LYRA_CHECK_LAUNCH(fn);
}

}  // namespace lyra
