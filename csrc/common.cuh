// common.cuh: shared helpers for the torch-free CUDA kernels of lyradynamo._C.
//
// - dtype codes and a dispatch macro (0 = float32, 1 = float16, 2 = bfloat16)
// - argument / launch error helpers that throw C++ exceptions; pybind11 maps
//   std::invalid_argument -> ValueError and std::runtime_error -> RuntimeError
// - float <-> storage conversions and 16-byte vector load/store helpers
// - warp / block reductions
//
// All math is done in fp32; storage types are only touched at load/store.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <mutex>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>

namespace lyra {

enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// ---------------------------------------------------------------------------
// Host-side error helpers
// ---------------------------------------------------------------------------

// Throws std::invalid_argument("<func>: <msg>") when cond is false. Used for
// bad sizes / arguments so that Python sees a ValueError naming the argument.
#define LYRA_CHECK_ARG(cond, func, msg)                                     \
  do {                                                                      \
    if (!(cond)) {                                                          \
      throw std::invalid_argument(std::string(func) + ": " + (msg));        \
    }                                                                       \
  } while (0)

// Checks the result of a CUDA runtime call (or cudaGetLastError after a
// launch) and throws std::runtime_error naming the function and the error.
#define LYRA_CUDA_CHECK(expr, func)                                          \
  do {                                                                       \
    cudaError_t lyra_err_ = (expr);                                          \
    if (lyra_err_ != cudaSuccess) {                                          \
      throw std::runtime_error(std::string(func) + ": CUDA error " +         \
                               cudaGetErrorName(lyra_err_) + " (" +          \
                               cudaGetErrorString(lyra_err_) + ")");         \
    }                                                                        \
  } while (0)

// Every kernel launch is followed by this (launch-config errors show up here;
// asynchronous faults surface at the caller's next synchronizing call).
#define LYRA_CHECK_LAUNCH(func) LYRA_CUDA_CHECK(cudaGetLastError(), func)

inline cudaStream_t as_stream(uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

template <typename T>
inline T* as_ptr(uintptr_t p) { return reinterpret_cast<T*>(p); }

inline const char* dtype_name(int dtype) {
  switch (dtype) {
    case kFloat32: return "float32";
    case kFloat16: return "float16";
    case kBFloat16: return "bfloat16";
    default: return "unknown";
  }
}

inline size_t dtype_size(int dtype) { return dtype == kFloat32 ? 4 : 2; }

// Dispatches on a dtype code; inside the body `scalar_t` is the storage type.
#define LYRA_DISPATCH_DTYPE(dtype, func, ...)                                \
  [&] {                                                                      \
    switch (dtype) {                                                         \
      case ::lyra::kFloat32: { using scalar_t = float; return __VA_ARGS__(); }        \
      case ::lyra::kFloat16: { using scalar_t = __half; return __VA_ARGS__(); }       \
      case ::lyra::kBFloat16: { using scalar_t = __nv_bfloat16; return __VA_ARGS__(); } \
      default:                                                               \
        throw std::invalid_argument(std::string(func) +                      \
                                    ": dtype must be 0 (float32), 1 (float16) or 2 (bfloat16), got " + \
                                    std::to_string(dtype));                  \
    }                                                                        \
  }()

// True when every pointer (as integer) is a multiple of `bytes`.
inline bool aligned_to(uintptr_t p, size_t bytes) { return (p % bytes) == 0; }

// The group-norm kernels' two optional pre-bias rows (pointer, elements between samples):
// each bstride must be 0 (one row for every sample) or >= C with its pointer. A lone second
// pre-bias moves to the first slot, so the kernels read pb2 only where pb is set.
inline void check_pre_biases(uintptr_t& pb, int64_t& pb_bstride, uintptr_t& pb2,
                             int64_t& pb2_bstride, int64_t C, const char* fn) {
  LYRA_CHECK_ARG(pb_bstride == 0 || (pb != 0 && pb_bstride >= C), fn,
                 "pre_bias_bstride must be 0 (one row for all samples) or >= C with a pre_bias, "
                 "got " + std::to_string(pb_bstride));
  LYRA_CHECK_ARG(pb2_bstride == 0 || (pb2 != 0 && pb2_bstride >= C), fn,
                 "pre_bias2_bstride must be 0 (one row for all samples) or >= C with a pre_bias2, "
                 "got " + std::to_string(pb2_bstride));
  if (!pb) {
    std::swap(pb, pb2);
    std::swap(pb_bstride, pb2_bstride);
  }
}

// SM count and compute-capability major of the current device, cached per
// device ordinal (attribute queries do no stream work, so they are also safe
// under graph capture; the cache just keeps them off the launch path).
struct DeviceInfo {
  int device = 0;
  int sm_count = 0;
  int cc_major = 0;
};

inline DeviceInfo current_device_info(const char* func) {
  constexpr int kMaxDevices = 64;
  static DeviceInfo cache[kMaxDevices];  // sm_count == 0 means "not filled"
  static std::mutex mu;
  int dev = 0;
  LYRA_CUDA_CHECK(cudaGetDevice(&dev), func);
  std::lock_guard<std::mutex> lock(mu);
  if (dev >= 0 && dev < kMaxDevices && cache[dev].sm_count > 0) return cache[dev];
  DeviceInfo info;
  info.device = dev;
  LYRA_CUDA_CHECK(cudaDeviceGetAttribute(&info.sm_count, cudaDevAttrMultiProcessorCount, dev), func);
  LYRA_CUDA_CHECK(cudaDeviceGetAttribute(&info.cc_major, cudaDevAttrComputeCapabilityMajor, dev), func);
  if (dev >= 0 && dev < kMaxDevices) cache[dev] = info;
  return info;
}

// ---------------------------------------------------------------------------
// Device-side conversions
// ---------------------------------------------------------------------------

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// v * sigmoid(t) with the hardware exp2 / reciprocal (MUFU): ~1e-6 relative error,
// far below fp16/bf16 rounding and the 1e-5 fp32 budget, at a third of the
// instructions of expf + IEEE division (--use_fast_math stays off everywhere else).
// For t -> -inf the denominator overflows to inf and the result is (-)0, the limit.
__device__ __forceinline__ float mul_sigmoid_fast(float v, float t) {
  return __fdividef(v, 1.f + __expf(-t));
}
__device__ __forceinline__ float silu_fast(float t) { return mul_sigmoid_fast(t, t); }

// Round an fp32 value through the storage type (used to mimic eager PyTorch,
// which materialises intermediates in the storage dtype).
template <typename T>
__device__ __forceinline__ float round_to(float v) { return to_float(from_float<T>(v)); }

// Two values rounded through the storage type with one conversion instruction
// (cvt.rn.{bf16,f16}x2.f32; float -> 16-bit conversions issue at a quarter of the FP32
// rate on sm90, so a pass that rounds several times per element spends fewer issue
// slots). Same result as round_to<T> on each.
template <typename T>
__device__ __forceinline__ void round_pair(float& a, float& b) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    const float2 r = __bfloat1622float2(__floats2bfloat162_rn(a, b));
    a = r.x;
    b = r.y;
  } else if constexpr (std::is_same_v<T, __half>) {
    const float2 r = __half22float2(__floats2half2_rn(a, b));
    a = r.x;
    b = r.y;
  }
}

// ---------------------------------------------------------------------------
// Vector loads: N elements of T packed in one aligned access (16 B max).
// ---------------------------------------------------------------------------

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// Loads N consecutive elements as one access; `p` must be aligned to
// sizeof(T)*N (callers check alignment on the host and fall back to N = 1).
template <int N, typename T>
__device__ __forceinline__ void load_vec(const T* p, float (&out)[N]) {
  Pack<T, N> pk = *reinterpret_cast<const Pack<T, N>*>(p);
#pragma unroll
  for (int i = 0; i < N; ++i) out[i] = to_float(pk.v[i]);
}

template <int N, typename T>
__device__ __forceinline__ void store_vec(T* p, const float (&in)[N]) {
  Pack<T, N> pk;
#pragma unroll
  for (int i = 0; i < N; ++i) pk.v[i] = from_float<T>(in[i]);
  *reinterpret_cast<Pack<T, N>*>(p) = pk;
}

// store_vec with the conversions done two at a time (see round_pair); N even.
template <int N, typename T>
__device__ __forceinline__ void store_vec_pairs(T* p, const float (&in)[N]) {
  static_assert(N % 2 == 0, "store_vec_pairs takes pairs");
  if constexpr (std::is_same_v<T, __nv_bfloat16> || std::is_same_v<T, __half>) {
    Pack<uint32_t, N / 2> pk;  // 32-bit words: one vector store (a pack of the x2 types is split)
#pragma unroll
    for (int i = 0; i < N / 2; ++i) {
      if constexpr (std::is_same_v<T, __nv_bfloat16>) {
        const __nv_bfloat162 h = __floats2bfloat162_rn(in[2 * i], in[2 * i + 1]);
        pk.v[i] = *reinterpret_cast<const uint32_t*>(&h);
      } else {
        const __half2 h = __floats2half2_rn(in[2 * i], in[2 * i + 1]);
        pk.v[i] = *reinterpret_cast<const uint32_t*>(&h);
      }
    }
    // One vector store, stated (__stwb: st.global.wb.v4): left to itself the compiler split it
    // into 32-bit stores where the address arithmetic let it infer a smaller alignment.
    if constexpr (N == 8) {
      __stwb(reinterpret_cast<uint4*>(p), make_uint4(pk.v[0], pk.v[1], pk.v[2], pk.v[3]));
    } else if constexpr (N == 4) {
      __stwb(reinterpret_cast<uint2*>(p), make_uint2(pk.v[0], pk.v[1]));
    } else {
      *reinterpret_cast<Pack<uint32_t, N / 2>*>(p) = pk;
    }
  } else if constexpr (std::is_same_v<T, float> && N == 4) {
    __stwb(reinterpret_cast<float4*>(p), make_float4(in[0], in[1], in[2], in[3]));
  } else {
    store_vec<N>(p, in);
  }
}

// Raw (still packed) vector load, to keep loads in flight with half the
// registers of the fp32 form; unpack() converts when the data is used.
template <int N, typename T>
__device__ __forceinline__ Pack<T, N> load_raw(const T* p) {
  return *reinterpret_cast<const Pack<T, N>*>(p);
}

template <int N, typename T>
__device__ __forceinline__ void unpack(const Pack<T, N>& pk, float (&out)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) out[i] = to_float(pk.v[i]);
}

// Number of elements of T in a 16-byte vector.
template <typename T>
__host__ __device__ constexpr int vec16() { return 16 / static_cast<int>(sizeof(T)); }

// ---------------------------------------------------------------------------
// Reductions
// ---------------------------------------------------------------------------

// V fp32 values from p (16-byte aligned when V % 4 == 0).
template <int V>
__device__ __forceinline__ void load_f32(const float* p, float (&out)[V]) {
  if constexpr (V % 4 == 0) {
#pragma unroll
    for (int c = 0; c < V / 4; ++c) {
      float t[4];
      load_vec<4>(p + 4 * c, t);
#pragma unroll
      for (int e = 0; e < 4; ++e) out[4 * c + e] = t[e];
    }
  } else {
#pragma unroll
    for (int e = 0; e < V; ++e) out[e] = p[e];
  }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sum over a group of `nwarps` consecutive warps sharing `scratch` (>= nwarps
// floats). All threads of those warps must call it; all get the result.
// `warp_in_group` is the warp index within the group.
__device__ __forceinline__ float group_sum(float v, float* scratch, int warp_in_group,
                                           int nwarps) {
  v = warp_sum(v);
  if (nwarps == 1) return v;
  const int lane = threadIdx.x & 31;
  if (lane == 0) scratch[warp_in_group] = v;
  __syncthreads();
  float t = 0.f;
  for (int w = 0; w < nwarps; ++w) t += scratch[w];  // same order in every thread
  __syncthreads();  // scratch may be reused right after
  return t;
}

// Welford / Chan running statistics: count, mean and M2 (sum of squared
// deviations). Merging is order-dependent only in rounding.
struct Welford {
  float n = 0.f, mean = 0.f, m2 = 0.f;

  __device__ __forceinline__ void merge(float nb, float meanb, float m2b) {
    const float nn = n + nb;
    if (nn == 0.f) return;
    const float delta = meanb - mean;
    const float rb = nb / nn;
    mean += delta * rb;
    m2 += m2b + delta * delta * n * rb;
    n = nn;
  }
  __device__ __forceinline__ void merge(const Welford& o) { merge(o.n, o.mean, o.m2); }

  // Adds a small batch of K values: exact two-pass mean/M2 of the batch in
  // registers, then one Chan merge (one division per batch, not per element).
  template <int K>
  __device__ __forceinline__ void add_batch(const float (&v)[K]) {
    float s = 0.f;
#pragma unroll
    for (int i = 0; i < K; ++i) s += v[i];
    const float bm = s * (1.f / K);
    float q = 0.f;
#pragma unroll
    for (int i = 0; i < K; ++i) q += (v[i] - bm) * (v[i] - bm);
    merge(static_cast<float>(K), bm, q);
  }

  __device__ __forceinline__ void warp_reduce() {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const float nb = __shfl_xor_sync(0xffffffffu, n, o);
      const float mb = __shfl_xor_sync(0xffffffffu, mean, o);
      const float qb = __shfl_xor_sync(0xffffffffu, m2, o);
      merge(nb, mb, qb);
    }
  }
};

}  // namespace lyra
