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
// Every fp32 op is an explicit intrinsic (no FMA contraction left to the
// compiler), so all entry points below compute bit-identical values.
// out may alias y (non-glu) or residual: each thread reads its own elements
// before it writes them, so no pointer is __restrict__.
//
// Mapping: 2D grid, x over column vectors of V elements (16 B), y over rows
// with a grid-stride loop, so there is no per-element division.
//
// scaled_epilogue: the same chain after a quantised (W8A8) GEMM whose raw
// accumulators acc (M, N_y) are fp32 (acc_dtype 0, fp8 GEMM without scales) or
// int32 (acc_dtype 3, int8 GEMM):
//   y[m, c] = fp32(acc[m, c]) * a_scale[m] * b_scale[c] (+ bias[c])
// (each op rounded in fp32, in this order, no FMA contraction; with glu the two
// halves use their own columns c = j and c = j + N_out of b_scale and bias),
// then act / glu / gate / residual as above, written in out_dtype.
// a_scale (M,), b_scale (N_y,) fp32; bias (N_y,), gate, residual, out in out_dtype.
//
// linear_epilogue_quant: the chain of linear_epilogue (acc_dtype = out_dtype,
// fp16 / bf16 / fp32, no scales) or of scaled_epilogue (fp32 / int32 acc with
// scales; fp32 acc may also come without scales), but the result row is
// rounded to out_dtype and quantised for the next W8A8 linear instead of
// being stored (see quant.cuh):
//   xs = round_to_out_dtype(v) * inv_smooth     (inv_smooth (N_out,) fp32 or 0)
//   scale[m] = max(max_j |xs| / QMAX, 1e-12),  q[m, j] = quant(xs * (1 / scale[m]))
// so (q, scale) == numerics.quantize_rows(<the other entry's out>) bit for bit.
// Mapping: one row per group of tpr threads (one to sixteen warps) with the
// row's values in registers between the amax and the quantise pass (rows
// longer than 512 * 4 vectors are recomputed in the second pass).
#include "quant.cuh"

namespace lyra {
namespace {

enum Act : int { kActNone = 0, kActGelu = 1, kActGeluTanh = 2, kActSilu = 3 };
constexpr int kAccInt32 = 3;  // acc_dtype code of int32 accumulators
constexpr int kEpiQuantMaxTpr = 512;

struct EpiParams {
  int64_t M;
  int64_t rows_per_batch;
  int64_t gate_bstride;
  int n_out;
  int ncv;  // N_out / V column vectors per row
  int act;
  int glu;
};

// GELU(tanh) as v * sigmoid(2 * inner) (= 0.5 v (1 + tanh(inner))) and SiLU as
// v * sigmoid(v) through mul_sigmoid_fast (common.cuh): a few instructions where
// tanhf / expf + an IEEE division took dozens; the fused quantising epilogue was
// instruction-bound at FLUX's MLP width (4608 x 12288).
// GELU(erf) = 0.5 v (1 + erf(v / sqrt 2)) through erfc(x), x = |v| / sqrt 2, in the
// Abramowitz-Stegun 7.1.26 form erfc(x) = t (a1 + t (a2 + ... + t a5)) exp(-x^2),
// t = 1 / (1 + p x), with the hardware exp2 / reciprocal: ~14 instructions where
// libdevice's erff took ~30 (the GEGLU + quantise pass was issue-bound, NOTES
// session 14). v >= 0: 0.5 v (2 - erfc); v < 0: 0.5 v erfc (no cancellation in the
// negative tail). Max |error| 4.2e-7 against float64 GELU (torch's fp32 GELU: 1.3e-6).
__device__ __forceinline__ float gelu_erf_fast(float v) {
  const float x = __fmul_rn(fabsf(v), 0.70710678118654752f);
  const float t = __fdividef(1.f, fmaf(0.3275911f, x, 1.f));
  float p = fmaf(1.061405429f, t, -1.453152027f);
  p = fmaf(p, t, 1.421413741f);
  p = fmaf(p, t, -0.284496736f);
  p = fmaf(p, t, 0.254829592f);
  const float erfc = __fmul_rn(__fmul_rn(p, t), __expf(__fmul_rn(-x, x)));
  return __fmul_rn(__fmul_rn(0.5f, v), v >= 0.f ? __fsub_rn(2.f, erfc) : erfc);
}

__device__ __forceinline__ float activate(float v, int act) {
  switch (act) {
    case kActGelu: return gelu_erf_fast(v);
    case kActGeluTanh: {
      const float cube = __fmul_rn(__fmul_rn(__fmul_rn(0.044715f, v), v), v);
      const float inner = __fmul_rn(0.7978845608028654f, __fadd_rn(v, cube));
      return mul_sigmoid_fast(v, 2.f * inner);
    }
    case kActSilu: return silu_fast(v);
    default: return v;
  }
}

// V accumulators as fp32: storage types through to_float, int32 rounded to nearest.
template <int V, typename TA>
__device__ __forceinline__ void load_acc(const TA* p, float (&out)[V]) {
  load_vec<V>(p, out);
}
template <int V>
__device__ __forceinline__ void load_acc(const int32_t* p, float (&out)[V]) {
  const Pack<int32_t, V> pk = *reinterpret_cast<const Pack<int32_t, V>*>(p);
#pragma unroll
  for (int e = 0; e < V; ++e) out[e] = __int2float_rn(pk.v[e]);
}

// The fused chain for V consecutive outputs of row m (shared by every entry
// point, so they compute identical fp32 values). Without scales and bias it is
// exactly the original linear_epilogue chain.
template <typename TA, typename TO, int V>
struct EpiChain {
  const TA* y;
  const float* a_scale;  // (M,) or null; b_scale is then non-null
  const float* b_scale;  // (N_y,)
  const TO* bias;        // (N_y,) or null
  const TO* gate;
  const TO* residual;

  // acc * a_scale[m] * b_scale[c] + bias[c] for columns c .. c + V - 1.
  __device__ __forceinline__ void gemm_out(int64_t m, int64_t ny, int c, float (&v)[V]) const {
    load_acc<V>(y + m * ny + c, v);
    if (a_scale) {
      const float sa = a_scale[m];
      float sb[V];
      load_f32<V>(b_scale + c, sb);
#pragma unroll
      for (int e = 0; e < V; ++e) v[e] = __fmul_rn(__fmul_rn(v[e], sa), sb[e]);
    }
    if (bias) {
      float t[V];
      load_vec<V>(bias + c, t);
#pragma unroll
      for (int e = 0; e < V; ++e) v[e] = __fadd_rn(v[e], t[e]);
    }
  }

  __device__ __forceinline__ void operator()(const EpiParams& p, int64_t m, int j,
                                             float (&v)[V]) const {
    const int64_t ny = p.glu ? 2ll * p.n_out : p.n_out;
    float t[V];
    gemm_out(m, ny, j, v);
    if (p.glu) {
      gemm_out(m, ny, p.n_out + j, t);
#pragma unroll
      for (int e = 0; e < V; ++e) v[e] = __fmul_rn(v[e], activate(t[e], p.act));
    } else {
#pragma unroll
      for (int e = 0; e < V; ++e) v[e] = activate(v[e], p.act);
    }
    if (gate) {
      load_vec<V>(gate + (m / p.rows_per_batch) * p.gate_bstride + j, t);
#pragma unroll
      for (int e = 0; e < V; ++e) v[e] = __fmul_rn(v[e], t[e]);
    }
    if (residual) {
      load_vec<V>(residual + m * p.n_out + j, t);
#pragma unroll
      for (int e = 0; e < V; ++e) v[e] = __fadd_rn(t[e], v[e]);
    }
  }
};

template <typename TA, typename TO, int V>
__global__ void __launch_bounds__(256)
linear_epilogue_kernel(EpiChain<TA, TO, V> chain, TO* out, EpiParams p) {
  const int cvec = blockIdx.x * blockDim.x + threadIdx.x;
  if (cvec >= p.ncv) return;
  const int j = cvec * V;
  for (int64_t m = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y; m < p.M;
       m += static_cast<int64_t>(gridDim.y) * blockDim.y) {
    float v[V];
    chain(p, m, j, v);
    store_vec<V>(out + m * p.n_out + j, v);
  }
}

template <typename TA, typename TO, int V>
void launch_epi(const EpiChain<TA, TO, V>& chain, TO* out, EpiParams p, cudaStream_t s,
                const char* fn) {
  p.ncv = p.n_out / V;
  // Block: bx threads across column vectors (power of two <= 256), the rest
  // across rows, so narrow outputs (N_out = 24) still use full blocks.
  int bx = 1;
  while (bx < p.ncv && bx < 256) bx *= 2;
  const int by = 256 / bx;
  const unsigned gx = static_cast<unsigned>((p.ncv + bx - 1) / bx);
  const int64_t gy_needed = (p.M + by - 1) / by;
  const unsigned gy = static_cast<unsigned>(gy_needed < 65535 ? gy_needed : 65535);
  linear_epilogue_kernel<TA, TO, V><<<dim3(gx, gy), dim3(bx, by), 0, s>>>(chain, out, p);
  LYRA_CHECK_LAUNCH(fn);
}

// Two blocks per SM at least (<= 64 registers): at 94 registers one 384-thread block
// filled an SM and the pass reached 21% of DRAM bandwidth (ncu, FLUX's MLP width).
template <typename TA, typename TO, int V, int R>
__global__ void __launch_bounds__(kEpiQuantMaxTpr, 2)
linear_epilogue_quant_kernel(EpiChain<TA, TO, V> chain, const float* __restrict__ inv_smooth,
                             uint8_t* __restrict__ q, float* __restrict__ scale, EpiParams p,
                             int kind) {
  __shared__ float s_red[kEpiQuantMaxTpr / 32];
  const RowGroup rg = row_group(p.M);
  auto post = [&](int i, float (&v)[V]) {
    smooth<V>(inv_smooth ? inv_smooth + static_cast<int64_t>(i) * V : nullptr, v);
  };
  uint8_t* qrow = q + (rg.valid ? rg.row : 0) * p.n_out;
  float* srow = scale + (rg.valid ? rg.row : 0);
  if constexpr (sizeof(TO) == 2 && V % 2 == 0) {
    // the row cached as TO (the value is rounded to TO before smoothing anyway)
    auto prod = [&](int i, Pack<TO, V>& pk) {
      float v[V];
      chain(p, rg.row, i * V, v);
#pragma unroll
      for (int e = 0; e < V; e += 2) {
        round_pair<TO>(v[e], v[e + 1]);
        pk.v[e] = from_float<TO>(v[e]);  // exact: already rounded
        pk.v[e + 1] = from_float<TO>(v[e + 1]);
      }
    };
    quantize_row_stored<V, R, TO>(prod, post, p.ncv, rg.tpr, threadIdx.x, s_red + threadIdx.y * rg.wpr,
                                  rg.warp_in_row, rg.wpr, rg.valid, qrow, srow, kind);
  } else {
    auto prod = [&](int i, float (&v)[V]) {
      chain(p, rg.row, i * V, v);
#pragma unroll
      for (int e = 0; e < V; ++e) v[e] = round_to<TO>(v[e]);
      post(i, v);
    };
    quantize_row<V, R>(prod, p.ncv, rg.tpr, threadIdx.x, s_red + threadIdx.y * rg.wpr, rg.warp_in_row, rg.wpr,
                       rg.valid, qrow, srow, kind);
  }
}

// linear_epilogue_quant where the accumulator is the GEMM's own 16-bit output (scales and
// bias already applied by cuBLASLt's fp8 epilogue) and there is no gate or residual: SDXL /
// SD's GEGLU, a GELU MLP. The activation and GLU are template parameters and every thread
// issues the loads of all its R cached vectors (value and gate halves) before any arithmetic.
// The generic kernel above branches on the chain's pointers and act at run time for every
// vector, so its loads of vector k + 1 waited for vector k's arithmetic: ~1.6 TB/s at SDXL's
// GEGLU (M 2048, 2 x 5120 wide; NOTES, session 15). Same fp32 operations in the same order
// as EpiChain, so q and scale are bit for bit the generic kernel's.
template <typename T, int V, int R, int kAct, bool kGlu>
__global__ void __launch_bounds__(kEpiQuantMaxTpr, 2)
act_quant_kernel(const T* __restrict__ y, const float* __restrict__ inv_smooth,
                 uint8_t* __restrict__ q, float* __restrict__ scale, EpiParams p, int kind) {
  __shared__ float s_red[kEpiQuantMaxTpr / 32];
  const RowGroup rg = row_group(p.M);
  const int64_t ny = kGlu ? 2ll * p.n_out : p.n_out;
  const T* yr = y + (rg.valid ? rg.row : 0) * ny;
  auto load = [&](int i, Pack<T, V>& a, Pack<T, V>& g) {
    a = *reinterpret_cast<const Pack<T, V>*>(yr + static_cast<int64_t>(i) * V);
    if constexpr (kGlu) g = *reinterpret_cast<const Pack<T, V>*>(yr + p.n_out + static_cast<int64_t>(i) * V);
  };
  // EpiChain's values (gemm_out without scales or bias, then act or GLU), rounded to T.
  auto make = [&](const Pack<T, V>& a, const Pack<T, V>& g, Pack<T, V>& out) {
    float v[V];
#pragma unroll
    for (int e = 0; e < V; ++e) v[e] = to_float(a.v[e]);
    if constexpr (kGlu) {
#pragma unroll
      for (int e = 0; e < V; ++e) v[e] = __fmul_rn(v[e], activate(to_float(g.v[e]), kAct));
    } else {
#pragma unroll
      for (int e = 0; e < V; ++e) v[e] = activate(v[e], kAct);
    }
#pragma unroll
    for (int e = 0; e < V; e += 2) {
      round_pair<T>(v[e], v[e + 1]);
      out.v[e] = from_float<T>(v[e]);  // exact: already rounded
      out.v[e + 1] = from_float<T>(v[e + 1]);
    }
  };
  auto prod = [&](int i, Pack<T, V>& out) {
    Pack<T, V> a, g;
    load(i, a, g);
    make(a, g, out);
  };
  auto post = [&](int i, float (&v)[V]) {
    smooth<V>(inv_smooth ? inv_smooth + static_cast<int64_t>(i) * V : nullptr, v);
  };
  Pack<T, V> c[R];
  {
    Pack<T, V> g[R];
#pragma unroll
    for (int k = 0; k < R; ++k) {
      const int i = threadIdx.x + k * rg.tpr;
      if (rg.valid && i < p.ncv) load(i, c[k], g[k]);
    }
#pragma unroll
    for (int k = 0; k < R; ++k) {
      const int i = threadIdx.x + k * rg.tpr;
      if (rg.valid && i < p.ncv) make(c[k], g[k], c[k]);
    }
  }
  quantize_row_cached<V, R, T>(c, prod, post, p.ncv, rg.tpr, threadIdx.x, s_red + threadIdx.y * rg.wpr,
                               rg.warp_in_row, rg.wpr, rg.valid, q + (rg.valid ? rg.row : 0) * p.n_out,
                               scale + (rg.valid ? rg.row : 0), kind);
}

// Process-wide switch for linear_epilogue_quant's act / GLU kernel (on by default); off runs
// the generic kernel for every call. For the GPU tests (bit-exact comparison of the two) and
// kernels_bench (both kernels timed on the same tensors).
bool g_act_quant_kernel = true;

template <typename T, int V>
void launch_act_quant(const T* y, const float* inv, uint8_t* q, float* scale, EpiParams p, int kind,
                      cudaStream_t s, const char* fn) {
  constexpr int R = 4;
  p.ncv = p.n_out / V;
  const RowLaunch l = row_launch(p.M, p.ncv, R, kEpiQuantMaxTpr, fn);
  auto go = [&](auto act, auto glu) {
    constexpr int kAct = decltype(act)::value;
    constexpr bool kGlu = decltype(glu)::value;
    act_quant_kernel<T, V, R, kAct, kGlu><<<l.grid, l.block, 0, s>>>(y, inv, q, scale, p, kind);
  };
  using G0 = std::false_type;
  using G1 = std::true_type;
  switch (p.act * 2 + p.glu) {
    case 0: go(std::integral_constant<int, 0>{}, G0{}); break;
    case 1: go(std::integral_constant<int, 0>{}, G1{}); break;
    case 2: go(std::integral_constant<int, 1>{}, G0{}); break;
    case 3: go(std::integral_constant<int, 1>{}, G1{}); break;
    case 4: go(std::integral_constant<int, 2>{}, G0{}); break;
    case 5: go(std::integral_constant<int, 2>{}, G1{}); break;
    case 6: go(std::integral_constant<int, 3>{}, G0{}); break;
    default: go(std::integral_constant<int, 3>{}, G1{}); break;
  }
  LYRA_CHECK_LAUNCH(fn);
}

template <typename TA, typename TO, int V>
void launch_epi_quant(const EpiChain<TA, TO, V>& chain, const float* inv, uint8_t* q,
                      float* scale, EpiParams p, int kind, cudaStream_t s, const char* fn) {
  constexpr int R = V == 1 ? 8 : 4;
  p.ncv = p.n_out / V;
  const RowLaunch l = row_launch(p.M, p.ncv, R, kEpiQuantMaxTpr, fn);
  linear_epilogue_quant_kernel<TA, TO, V, R><<<l.grid, l.block, 0, s>>>(chain, inv, q, scale, p, kind);
  LYRA_CHECK_LAUNCH(fn);
}

// Checks shared by every entry point; returns the parameters.
EpiParams epi_params(const char* fn, const char* y_name, uintptr_t y, int64_t M, int64_t N_out,
                     int act, int64_t rows_per_batch, int64_t gate_bstride, bool glu) {
  LYRA_CHECK_ARG(y != 0, fn, std::string(y_name) + " must be a non-null device pointer");
  LYRA_CHECK_ARG(M > 0, fn, "M must be positive, got " + std::to_string(M));
  LYRA_CHECK_ARG(N_out > 0 && N_out < (1ll << 30), fn,
                 "N_out must be positive, got " + std::to_string(N_out));
  LYRA_CHECK_ARG(act >= 0 && act <= 3, fn,
                 "act must be 0 (none), 1 (gelu), 2 (gelu_tanh) or 3 (silu), got " + std::to_string(act));
  LYRA_CHECK_ARG(rows_per_batch > 0, fn,
                 "rows_per_batch must be positive, got " + std::to_string(rows_per_batch));
  LYRA_CHECK_ARG(gate_bstride >= 0, fn, "gate_bstride must be >= 0");
  EpiParams p;
  p.M = M;
  p.rows_per_batch = rows_per_batch;
  p.gate_bstride = gate_bstride;
  p.n_out = static_cast<int>(N_out);
  p.ncv = p.n_out;
  p.act = act;
  p.glu = glu ? 1 : 0;
  return p;
}

// Scale arguments of the quantised entries: both or neither; required for int32.
void check_scales(const char* fn, int acc_dtype, uintptr_t a_scale, uintptr_t b_scale,
                  bool required) {
  LYRA_CHECK_ARG((a_scale == 0) == (b_scale == 0), fn,
                 "a_scale and b_scale must be given together (both 0 or both pointers)");
  if (required || acc_dtype == kAccInt32) {
    LYRA_CHECK_ARG(a_scale != 0, fn, "a_scale and b_scale are required for this acc_dtype");
  }
  LYRA_CHECK_ARG(aligned_to(a_scale, 4) && aligned_to(b_scale, 4), fn,
                 "a_scale and b_scale must be 4-byte aligned (float32)");
}

template <typename T>
struct TypeTag {
  using type = T;
};

// Calls body(TypeTag<TA>, TypeTag<TO>) for the accumulator / output storage pair.
template <typename Body>
void dispatch_acc_out(const char* fn, int acc_dtype, int out_dtype, Body&& body) {
  LYRA_CHECK_ARG(out_dtype >= 0 && out_dtype <= 2, fn,
                 "out_dtype must be 0 (float32), 1 (float16) or 2 (bfloat16), got " +
                     std::to_string(out_dtype));
  if (acc_dtype == kFloat32 || acc_dtype == kAccInt32) {
    LYRA_DISPATCH_DTYPE(out_dtype, fn, [&] {
      if (acc_dtype == kFloat32) {
        body(TypeTag<float>{}, TypeTag<scalar_t>{});
      } else {
        body(TypeTag<int32_t>{}, TypeTag<scalar_t>{});
      }
    });
    return;
  }
  LYRA_CHECK_ARG(acc_dtype == out_dtype, fn,
                 "acc_dtype must be 0 (float32), 3 (int32) or equal to out_dtype, got acc_dtype=" +
                     std::to_string(acc_dtype) + " out_dtype=" + std::to_string(out_dtype));
  LYRA_DISPATCH_DTYPE(out_dtype, fn, [&] { body(TypeTag<scalar_t>{}, TypeTag<scalar_t>{}); });
}

size_t acc_size(int acc_dtype) { return acc_dtype == kAccInt32 ? 4 : dtype_size(acc_dtype); }

}  // namespace

void linear_epilogue(uintptr_t y, uintptr_t gate, uintptr_t residual, uintptr_t out, int64_t M,
                     int64_t N_out, int act, bool glu, int64_t rows_per_batch,
                     int64_t gate_bstride, int dtype, uintptr_t stream) {
  const char* fn = "linear_epilogue";
  LYRA_CHECK_ARG(out != 0, fn, "out must be a non-null device pointer");
  const EpiParams p = epi_params(fn, "y", y, M, N_out, act, rows_per_batch, gate_bstride, glu);
  const size_t es = dtype_size(dtype);
  // With glu, out row m (N_out wide) overlaps y rows m/2.. (2*N_out wide): another
  // thread may still need the y elements we overwrite.
  if (glu) {
    const uintptr_t y_end = y + static_cast<uintptr_t>(M * 2 * N_out) * es;
    const uintptr_t o_end = out + static_cast<uintptr_t>(M * N_out) * es;
    LYRA_CHECK_ARG(out >= y_end || o_end <= y, fn, "out must not overlap y when glu=True");
  }

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
      constexpr int V = vec16<scalar_t>();
      launch_epi<scalar_t, scalar_t, V>({yp, nullptr, nullptr, nullptr, gp, rp}, op, p, s, fn);
    } else {
      launch_epi<scalar_t, scalar_t, 1>({yp, nullptr, nullptr, nullptr, gp, rp}, op, p, s, fn);
    }
  });
}

void scaled_epilogue(uintptr_t acc, int acc_dtype, uintptr_t a_scale, uintptr_t b_scale,
                     uintptr_t bias, uintptr_t gate, uintptr_t residual, uintptr_t out, int64_t M,
                     int64_t N_out, int act, bool glu, int64_t rows_per_batch,
                     int64_t gate_bstride, int out_dtype, uintptr_t stream) {
  const char* fn = "scaled_epilogue";
  LYRA_CHECK_ARG(out != 0, fn, "out must be a non-null device pointer");
  LYRA_CHECK_ARG(acc_dtype == kFloat32 || acc_dtype == kAccInt32, fn,
                 "acc_dtype must be 0 (float32) or 3 (int32), got " + std::to_string(acc_dtype));
  check_scales(fn, acc_dtype, a_scale, b_scale, /*required=*/true);
  const EpiParams p = epi_params(fn, "acc", acc, M, N_out, act, rows_per_batch, gate_bstride, glu);
  LYRA_CHECK_ARG(out_dtype >= 0 && out_dtype <= 2, fn,
                 "out_dtype must be 0 (float32), 1 (float16) or 2 (bfloat16), got " +
                     std::to_string(out_dtype));
  // out may alias acc only element for element (same size, no glu); residual
  // may alias out (each thread reads its elements before writing them).
  {
    const int64_t ny = glu ? 2 * N_out : N_out;
    const uintptr_t a_end = acc + static_cast<uintptr_t>(M * ny) * acc_size(acc_dtype);
    const uintptr_t o_end = out + static_cast<uintptr_t>(M * N_out) * dtype_size(out_dtype);
    const bool same_layout = !glu && acc_size(acc_dtype) == dtype_size(out_dtype);
    LYRA_CHECK_ARG(out == acc ? same_layout : (out >= a_end || o_end <= acc), fn,
                   "out must not overlap acc (except out == acc with equal element sizes and "
                   "glu=False)");
  }
  constexpr int V = 4;  // 16-byte fp32 / int32 accumulator loads
  const size_t vb = 16;
  const bool vec_ok = N_out % V == 0 && gate_bstride % V == 0 && aligned_to(acc, vb) &&
                      aligned_to(b_scale, vb) && aligned_to(bias, vb) && aligned_to(gate, vb) &&
                      aligned_to(residual, vb) && aligned_to(out, vb);
  cudaStream_t s = as_stream(stream);
  dispatch_acc_out(fn, acc_dtype, out_dtype, [&](auto ta, auto to) {
    using TA = typename decltype(ta)::type;
    using TO = typename decltype(to)::type;
    auto* ap = as_ptr<const TA>(acc);
    auto* sa = as_ptr<const float>(a_scale);
    auto* sb = as_ptr<const float>(b_scale);
    auto* bp = as_ptr<const TO>(bias);
    auto* gp = as_ptr<const TO>(gate);
    auto* rp = as_ptr<const TO>(residual);
    auto* op = as_ptr<TO>(out);
    if (vec_ok) {
      launch_epi<TA, TO, V>({ap, sa, sb, bp, gp, rp}, op, p, s, fn);
    } else {
      launch_epi<TA, TO, 1>({ap, sa, sb, bp, gp, rp}, op, p, s, fn);
    }
  });
}

void linear_epilogue_quant(uintptr_t acc, int acc_dtype, uintptr_t a_scale, uintptr_t b_scale,
                           uintptr_t bias, uintptr_t gate, uintptr_t residual,
                           uintptr_t inv_smooth, uintptr_t q, uintptr_t scale, int64_t M,
                           int64_t N_out, int act, bool glu, int64_t rows_per_batch,
                           int64_t gate_bstride, int out_dtype, int kind, uintptr_t stream) {
  const char* fn = "linear_epilogue_quant";
  check_quant_out(fn, q, scale, inv_smooth);
  check_quant_kind(kind, fn);
  LYRA_CHECK_ARG(acc_dtype >= 0 && acc_dtype <= 3, fn,
                 "acc_dtype must be 0 (float32), 1 (float16), 2 (bfloat16) or 3 (int32), got " +
                     std::to_string(acc_dtype));
  check_scales(fn, acc_dtype, a_scale, b_scale, /*required=*/false);
  LYRA_CHECK_ARG(a_scale == 0 || acc_dtype == kFloat32 || acc_dtype == kAccInt32, fn,
                 "a_scale / b_scale need float32 or int32 accumulators (acc_dtype 0 or 3)");
  const EpiParams p = epi_params(fn, "acc", acc, M, N_out, act, rows_per_batch, gate_bstride, glu);
  const size_t vb = 16;
  cudaStream_t s = as_stream(stream);
  dispatch_acc_out(fn, acc_dtype, out_dtype, [&](auto ta, auto to) {
    using TA = typename decltype(ta)::type;
    using TO = typename decltype(to)::type;
    constexpr int V = vec16<TA>() < 4 ? 4 : vec16<TA>();  // 16-byte accumulator loads
    const bool vec_ok = N_out % V == 0 && gate_bstride % V == 0 && aligned_to(acc, vb) &&
                        aligned_to(b_scale, vb) && aligned_to(bias, vb) &&
                        aligned_to(gate, vb) && aligned_to(residual, vb) &&
                        aligned_to(inv_smooth, vb) && aligned_to(q, vb);
    auto* ap = as_ptr<const TA>(acc);
    auto* sa = as_ptr<const float>(a_scale);
    auto* sb = as_ptr<const float>(b_scale);
    auto* bp = as_ptr<const TO>(bias);
    auto* gp = as_ptr<const TO>(gate);
    auto* rp = as_ptr<const TO>(residual);
    auto* ip = as_ptr<const float>(inv_smooth);
    auto* qp = as_ptr<uint8_t>(q);
    auto* scp = as_ptr<float>(scale);
    if constexpr (std::is_same_v<TA, TO> && sizeof(TO) == 2) {
      if (vec_ok && g_act_quant_kernel && !sa && !bp && !gp && !rp) {
        launch_act_quant<TO, V>(ap, ip, qp, scp, p, kind, s, fn);
        return;
      }
    }
    if (vec_ok) {
      launch_epi_quant<TA, TO, V>({ap, sa, sb, bp, gp, rp}, ip, qp, scp, p, kind, s, fn);
    } else {
      launch_epi_quant<TA, TO, 1>({ap, sa, sb, bp, gp, rp}, ip, qp, scp, p, kind, s, fn);
    }
  });
}

bool set_act_quant_kernel(bool enabled) {
  const bool previous = g_act_quant_kernel;
  g_act_quant_kernel = enabled;
  return previous;
}

}  // namespace lyra
