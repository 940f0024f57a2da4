// epilogue.cu: fused elementwise pass after a Linear GEMM.
//
//   y (M, N_y) contiguous, N_y = 2*N_out if glu else N_out       // (B*L, N_y)
//   v = act(y[m, j])                          (glu = false)
//   v = y[m, j] * act(y[m, j + N_out])        (glu: GEGLU / SwiGLU, diffusers'
//                                              "hidden, gate = proj(x).chunk(2)")
//   v = v * gate[(m / rows_per_batch) * gate_bstride + j]    (if gate; adaLN gate)
//   v = residual[m, j] + v                                   (if residual)
//   out (M, N_out) contiguous.
// act: 0 none, 1 gelu (erf), 2 gelu (tanh approximation), 3 silu.
//
// One fp32 chain and a single rounding (eager PyTorch rounds after each op).
// out may alias y (non-glu) or residual: each thread reads its own elements
// before it writes them, so no pointer is __restrict__.
//
// Mapping: 2D grid, x over column vectors of V elements (16 B), y over rows
// with a grid-stride loop, so there is no per-element division.
#include "common.cuh"

namespace lyra {
namespace {

enum Act : int { kActNone = 0, kActGelu = 1, kActGeluTanh = 2, kActSilu = 3 };

struct EpiParams {
  int64_t M;
  int64_t rows_per_batch;
  int64_t gate_bstride;
  int n_out;
  int ncv;  // N_out / V column vectors per row
  int act;
  int glu;
};

__device__ __forceinline__ float activate(float v, int act) {
  switch (act) {
    case kActGelu: return 0.5f * v * (1.f + erff(v * 0.70710678118654752f));
    case kActGeluTanh: {
      const float inner = 0.7978845608028654f * (v + 0.044715f * v * v * v);
      return 0.5f * v * (1.f + tanhf(inner));
    }
    case kActSilu: return v / (1.f + expf(-v));
    default: return v;
  }
}

template <typename T, int V>
__global__ void __launch_bounds__(256)
linear_epilogue_kernel(const T* y, const T* gate, const T* residual, T* out, EpiParams p) {
  const int cvec = blockIdx.x * blockDim.x + threadIdx.x;
  if (cvec >= p.ncv) return;
  const int j = cvec * V;
  const int64_t ny = p.glu ? 2ll * p.n_out : p.n_out;
  for (int64_t m = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y; m < p.M;
       m += static_cast<int64_t>(gridDim.y) * blockDim.y) {
    float v[V], t[V];
    load_vec<V>(y + m * ny + j, v);
    if (p.glu) {
      load_vec<V>(y + m * ny + p.n_out + j, t);
#pragma unroll
      for (int e = 0; e < V; ++e) v[e] = v[e] * activate(t[e], p.act);
    } else {
#pragma unroll
      for (int e = 0; e < V; ++e) v[e] = activate(v[e], p.act);
    }
    if (gate) {
      load_vec<V>(gate + (m / p.rows_per_batch) * p.gate_bstride + j, t);
#pragma unroll
      for (int e = 0; e < V; ++e) v[e] *= t[e];
    }
    if (residual) {
      load_vec<V>(residual + m * p.n_out + j, t);
#pragma unroll
      for (int e = 0; e < V; ++e) v[e] = t[e] + v[e];
    }
    store_vec<V>(out + m * p.n_out + j, v);
  }
}

template <typename T, int V>
void launch_epi(const T* y, const T* gate, const T* res, T* out, EpiParams p, cudaStream_t s) {
  p.ncv = p.n_out / V;
  // Block: bx threads across column vectors (power of two <= 256), the rest
  // across rows, so narrow outputs (N_out = 24) still use full blocks.
  int bx = 1;
  while (bx < p.ncv && bx < 256) bx *= 2;
  const int by = 256 / bx;
  const unsigned gx = static_cast<unsigned>((p.ncv + bx - 1) / bx);
  const int64_t gy_needed = (p.M + by - 1) / by;
  const unsigned gy = static_cast<unsigned>(gy_needed < 65535 ? gy_needed : 65535);
  linear_epilogue_kernel<T, V><<<dim3(gx, gy), dim3(bx, by), 0, s>>>(y, gate, res, out, p);
  LYRA_CHECK_LAUNCH("linear_epilogue");
}

}  // namespace

void linear_epilogue(uintptr_t y, uintptr_t gate, uintptr_t residual, uintptr_t out, int64_t M,
                     int64_t N_out, int act, bool glu, int64_t rows_per_batch,
                     int64_t gate_bstride, int dtype, uintptr_t stream) {
  const char* fn = "linear_epilogue";
  LYRA_CHECK_ARG(y != 0, fn, "y must be a non-null device pointer");
  LYRA_CHECK_ARG(out != 0, fn, "out must be a non-null device pointer");
  LYRA_CHECK_ARG(M > 0, fn, "M must be positive, got " + std::to_string(M));
  LYRA_CHECK_ARG(N_out > 0 && N_out < (1ll << 30), fn,
                 "N_out must be positive, got " + std::to_string(N_out));
  LYRA_CHECK_ARG(act >= 0 && act <= 3, fn,
                 "act must be 0 (none), 1 (gelu), 2 (gelu_tanh) or 3 (silu), got " + std::to_string(act));
  LYRA_CHECK_ARG(rows_per_batch > 0, fn,
                 "rows_per_batch must be positive, got " + std::to_string(rows_per_batch));
  LYRA_CHECK_ARG(gate_bstride >= 0, fn, "gate_bstride must be >= 0");
  const size_t es = dtype_size(dtype);
  // With glu, out row m (N_out wide) overlaps y rows m/2.. (2*N_out wide): another
  // thread may still need the y elements we overwrite.
  if (glu) {
    const uintptr_t y_end = y + static_cast<uintptr_t>(M * 2 * N_out) * es;
    const uintptr_t o_end = out + static_cast<uintptr_t>(M * N_out) * es;
    LYRA_CHECK_ARG(out >= y_end || o_end <= y, fn, "out must not overlap y when glu=True");
  }

  EpiParams p;
  p.M = M;
  p.rows_per_batch = rows_per_batch;
  p.gate_bstride = gate_bstride;
  p.n_out = static_cast<int>(N_out);
  p.ncv = p.n_out;
  p.act = act;
  p.glu = glu ? 1 : 0;

  const int vmax = static_cast<int>(16 / es);
  const size_t vb = 16;
  const bool vec_ok = N_out % vmax == 0 && gate_bstride % vmax == 0 && aligned_to(y, vb) &&
                      aligned_to(gate, vb) && aligned_to(residual, vb) && aligned_to(out, vb);
  cudaStream_t s = as_stream(stream);
  LYRA_DISPATCH_DTYPE(dtype, fn, [&] {
    auto* yp = as_ptr<const scalar_t>(y);
    auto* gp = as_ptr<const scalar_t>(gate);
    auto* rp = as_ptr<const scalar_t>(residual);
    auto* op = as_ptr<scalar_t>(out);
    if (vec_ok) {
      launch_epi<scalar_t, vec16<scalar_t>()>(yp, gp, rp, op, p, s);
    } else {
      launch_epi<scalar_t, 1>(yp, gp, rp, op, p, s);
    }
  });
}

}  // namespace lyra
