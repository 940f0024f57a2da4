// bias_residual.cu: out = (y + bias[c] + residual) * scale on NCHW or NHWC tensors.
//
// A convolution's bias add (aten adds a (1, C, 1, 1) tensor: a broadcast that
// TensorIterator does not vectorise), a ResNet block's residual add and its output
// scale, in one vectorised pass. fp32 math in eager's order ((y + bias) + residual)
// * scale, one rounding at the store. bias and residual are each optional.
//
// Elements are walked in memory order; element i has channel (i / HW) % C (NCHW)
// or i % C (NHWC). A vector of V elements (<= 16 bytes) never crosses a channel
// run: V divides HW (NCHW) or C (NHWC), so it has one bias (NCHW) or V
// consecutive biases (NHWC).
#include <climits>

#include "common.cuh"

namespace lyra {
namespace {

constexpr int kBRThreads = 256;
constexpr int kBRUnroll = 2;  // vectors in flight per thread (loads before use)

template <typename T, int V, bool NHWC, typename I>
__global__ void __launch_bounds__(kBRThreads)
bias_residual_kernel(const T* y, const T* __restrict__ bias, const T* res, T* out, I nvec,
                     I C, I HW, float scale) {
  // y, res and out are not __restrict__: out may alias y or res (each element is
  // read before it is written, by the same thread).
  const I stride = static_cast<I>(gridDim.x) * kBRThreads;
  for (I j = static_cast<I>(blockIdx.x) * kBRThreads + threadIdx.x; j < nvec;
       j += kBRUnroll * stride) {
    Pack<T, V> a[kBRUnroll], r[kBRUnroll];
#pragma unroll
    for (int u = 0; u < kBRUnroll; ++u) {
      const I k = j + u * stride;
      if (k < nvec) {
        a[u] = load_raw<V>(y + k * V);
        if (res) r[u] = load_raw<V>(res + k * V);
      }
    }
#pragma unroll
    for (int u = 0; u < kBRUnroll; ++u) {
      const I k = j + u * stride;
      if (k >= nvec) continue;
      float v[V];
      unpack(a[u], v);
      if (bias) {
        const I i = k * V;
        if constexpr (NHWC) {
          float b[V];
          load_vec<V>(bias + i % C, b);
#pragma unroll
          for (int e = 0; e < V; ++e) v[e] += b[e];
        } else {
          const float b = to_float(bias[(i / HW) % C]);
#pragma unroll
          for (int e = 0; e < V; ++e) v[e] += b;
        }
      }
      if (res) {
        float t[V];
        unpack(r[u], t);
#pragma unroll
        for (int e = 0; e < V; ++e) v[e] += t[e];
      }
#pragma unroll
      for (int e = 0; e < V; ++e) v[e] *= scale;
      store_vec<V>(out + k * V, v);
    }
  }
}

template <typename T, int V, bool NHWC>
void launch_br(const T* y, const T* bias, const T* res, T* out, int64_t total, int64_t C,
               int64_t HW, float scale, const DeviceInfo& dev, cudaStream_t stream) {
  const int64_t nvec = total / V;
  // Enough blocks to fill every SM (8 x 256 threads each), not more: the loop strides.
  const int64_t want = (nvec + kBRThreads * kBRUnroll - 1) / (kBRThreads * kBRUnroll);
  const int64_t cap = static_cast<int64_t>(dev.sm_count) * 8;
  const unsigned grid = static_cast<unsigned>(want < cap ? want : cap);
  // 32-bit index math when every index (+ one grid stride per unrolled step) fits.
  if (total <= INT_MAX / 2) {
    bias_residual_kernel<T, V, NHWC, int><<<grid, kBRThreads, 0, stream>>>(
        y, bias, res, out, static_cast<int>(nvec), static_cast<int>(C), static_cast<int>(HW),
        scale);
  } else {
    bias_residual_kernel<T, V, NHWC, int64_t><<<grid, kBRThreads, 0, stream>>>(
        y, bias, res, out, nvec, C, HW, scale);
  }
  LYRA_CHECK_LAUNCH("bias_residual");
}

template <typename T, int V>
void launch_layout(bool nhwc, const T* y, const T* bias, const T* res, T* out, int64_t total,
                   int64_t C, int64_t HW, float scale, const DeviceInfo& dev, cudaStream_t s) {
  if (nhwc) return launch_br<T, V, true>(y, bias, res, out, total, C, HW, scale, dev, s);
  launch_br<T, V, false>(y, bias, res, out, total, C, HW, scale, dev, s);
}

// Picks the instantiation for the runtime vector width v (a power of two,
// <= 16 bytes); `if constexpr` keeps 8-wide fp32 from being instantiated.
template <typename T>
void dispatch_br(int v, bool nhwc, const T* y, const T* bias, const T* res, T* out,
                 int64_t total, int64_t C, int64_t HW, float scale, const DeviceInfo& dev,
                 cudaStream_t s) {
  if constexpr (vec16<T>() >= 8) {
    if (v == 8) return launch_layout<T, 8>(nhwc, y, bias, res, out, total, C, HW, scale, dev, s);
  }
  if (v == 4) return launch_layout<T, 4>(nhwc, y, bias, res, out, total, C, HW, scale, dev, s);
  if (v == 2) return launch_layout<T, 2>(nhwc, y, bias, res, out, total, C, HW, scale, dev, s);
  launch_layout<T, 1>(nhwc, y, bias, res, out, total, C, HW, scale, dev, s);
}

}  // namespace

void bias_residual(uintptr_t y, uintptr_t bias, uintptr_t residual, uintptr_t out, int64_t N,
                   int64_t C, int64_t HW, bool channels_last, double scale, int dtype,
                   uintptr_t stream) {
  const char* fn = "bias_residual";
  LYRA_CHECK_ARG(y != 0, fn, "y must be a non-null device pointer");
  LYRA_CHECK_ARG(out != 0, fn, "out must be a non-null device pointer");
  LYRA_CHECK_ARG(N > 0, fn, "N must be positive, got " + std::to_string(N));
  LYRA_CHECK_ARG(C > 0, fn, "C must be positive, got " + std::to_string(C));
  LYRA_CHECK_ARG(HW > 0, fn, "HW must be positive, got " + std::to_string(HW));
  LYRA_CHECK_ARG(N <= LLONG_MAX / C / HW, fn, "N*C*HW overflows");

  const int64_t total = N * C * HW;
  const int64_t run = channels_last ? C : HW;  // elements of one channel run
  const size_t es = dtype_size(dtype);
  const DeviceInfo dev = current_device_info(fn);
  // Largest V (<= 16 B) that keeps every vector in one channel run and every
  // access aligned; down to V = 1.
  auto pick_v = [&](int vmax) {
    for (int v = vmax; v > 1; v /= 2) {
      const size_t bytes = es * v;
      bool ok = run % v == 0 && aligned_to(y, bytes) && aligned_to(out, bytes) &&
                aligned_to(residual, bytes);
      if (channels_last) ok = ok && aligned_to(bias, bytes);
      if (ok) return v;
    }
    return 1;
  };

  LYRA_DISPATCH_DTYPE(dtype, fn, [&] {
    dispatch_br<scalar_t>(pick_v(vec16<scalar_t>()), channels_last, as_ptr<const scalar_t>(y),
                          as_ptr<const scalar_t>(bias), as_ptr<const scalar_t>(residual),
                          as_ptr<scalar_t>(out), total, C, HW, static_cast<float>(scale), dev,
                          as_stream(stream));
  });
}

}  // namespace lyra
