// attention_short_kv.cu: attention over few keys (cross-attention on a text encoder's tokens,
// Lk <= 128), its output in the inputs' 16-bit type.
//
//   q (B, Lq, H, D), k / v (B, Lk, H, D): row (token) strides and batch strides are free, heads
//   are D apart and D is unit-stride (the projections' own layout, "blhd").
//   out (B, Lq, H * D), contiguous.
//
// One block per (64 query rows, one head, one batch), 4 warps of 16 rows: K and V of the head
// are copied once into shared memory with 16-byte cp.async (zero-filled to a multiple of 16
// keys); each warp computes S = Q K^T with ldmatrix + mma.sync m16n8k16 (all keys at once: no
// online softmax), the softmax in fp32 (exp2), P in the storage type, O = P V (V by
// ldmatrix.trans), O / l rounded to T, written out. No workspace, no memset: one launch.
// (Session 19: a first form kept every head of a row in one block and read K / V with 2- and
// 4-byte global loads, a second staged K / V per warp; 1.2-3x and 1.4-2.1x slower than cuDNN.
// This split, the one cuDNN uses, measured at cuDNN's speed or better at five of six SD / SDXL
// cross-attention shapes: benchmarks/NOTES.md, session 19 run F.)
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <atomic>
#include <cmath>
#include <type_traits>

#include "common.cuh"

namespace lyra {
namespace {

constexpr int kSkvMaxKeys = 128;
constexpr int kSkvRows = 64;  // query rows per block: 4 warps of 16
constexpr int kSkvThreads = 128;

struct SkvParams {
  const uint16_t* q;
  const uint16_t* k;
  const uint16_t* v;
  uint16_t* out;
  int64_t q_bs, q_rs, k_bs, k_rs, v_bs, v_rs;  // element strides: batch, row (token)
  int Lq, Lk, HD;
  float scale_log2;  // softmax scale * log2(e)
};

template <typename T>
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1) {
  if constexpr (std::is_same_v<T, __half>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// Two consecutive 16-bit values (4-byte aligned), through the read-only path.
__device__ __forceinline__ uint32_t ld_pair(const uint16_t* p) {
  return __ldg(reinterpret_cast<const unsigned int*>(p));
}

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared, zero-filled when !valid (nothing is read then).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_wait_all() {
  asm volatile("cp.async.commit_group;\ncp.async.wait_group 0;\n" ::: "memory");
}

__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p))
               : "memory");
}
__device__ __forceinline__ void ldsm_x2_trans(uint32_t& r0, uint32_t& r1, const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n"
               : "=r"(r0), "=r"(r1)
               : "r"(smem_addr(p))
               : "memory");
}

// (a, b) rounded to T, a in the low half (the mma operand order).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float a, float b) {
  if constexpr (std::is_same_v<T, __half>) {
    const __half2 h = __floats2half2_rn(a, b);
    return *reinterpret_cast<const uint32_t*>(&h);
  } else {
    const __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
    return *reinterpret_cast<const uint32_t*>(&h);
  }
}

template <int A, int B>
__device__ __forceinline__ void zero_tiles(float (&acc)[A][B][4]) {
#pragma unroll
  for (int a = 0; a < A; ++a)
#pragma unroll
    for (int b = 0; b < B; ++b)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[a][b][e] = 0.f;
}

__device__ __forceinline__ float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
  return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}
__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

// Row stride (elements) of the K / V buffers: 16 bytes of padding put the 8 rows of an
// ldmatrix 8x8 load in different bank quads.
template <int D>
__host__ __device__ constexpr int kv_ld() { return D + 8; }

template <int D, int KCH>
__host__ __device__ constexpr int kv_elems() { return 2 * KCH * 16 * kv_ld<D>(); }  // K then V

// One head for the block's 64 rows: S, softmax, P V, O / l rounded to T and stored.
// Fragment layouts (PTX mma.m16n8k16): lane = 4 g + t; A: (g, 2t..2t+1), (g+8, ..),
// (g, 2t+8..), (g+8, 2t+8..); B: (k 2t..2t+1, n g), (k 2t+8.., n g); C: (g, 2t..2t+1), (g+8, ..).
// KCH: 16-key chunks held (Lk <= 16 KCH).
template <typename T, int D, int KCH>
__global__ void __launch_bounds__(kSkvThreads) short_kv_kernel(SkvParams p) {
  constexpr int KS = (D + 15) / 16;  // k-steps of Q K^T (a last half step is zero-filled)
  constexpr int NT = 2 * KCH;        // 8-key tiles of S
  constexpr int ND = D / 8;          // 8-column tiles of O
  constexpr int LDK = kv_ld<D>();
  constexpr int KROWS = KCH * 16;
  constexpr int CPR = D / 8;  // 16-byte chunks per K / V row
  extern __shared__ __align__(16) unsigned char skv_smem[];
  uint16_t* ks_s = reinterpret_cast<uint16_t*>(skv_smem);  // K rows: KROWS x LDK
  uint16_t* vs_s = ks_s + KROWS * LDK;                      // V rows: KROWS x LDK

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;
  const int h = blockIdx.y, b = blockIdx.z;
  const int row0 = blockIdx.x * kSkvRows + warp * 16;
  const uint16_t* qb = p.q + b * p.q_bs;
  const uint16_t* kb = p.k + b * p.k_bs;
  const uint16_t* vb = p.v + b * p.v_bs;

  // K and V of head h: rows past Lk zero-filled (their scores are masked; V's must be finite)
  for (int i = threadIdx.x; i < KROWS * CPR; i += kSkvThreads) {
    const int row = i / CPR, ch = i % CPR;
    const bool ok = row < p.Lk;
    const int64_t src_row = ok ? row : 0;
    cp_async16(ks_s + row * LDK + ch * 8, kb + src_row * p.k_rs + h * D + ch * 8, ok);
    cp_async16(vs_s + row * LDK + ch * 8, vb + src_row * p.v_rs + h * D + ch * 8, ok);
  }
  // Q's fragments meanwhile (straight from global: each is used once)
  uint32_t a[KS][4];
  const int r_lo = row0 + g, r_hi = r_lo + 8;
  const bool ok_lo = r_lo < p.Lq, ok_hi = r_hi < p.Lq;
#pragma unroll
  for (int ks = 0; ks < KS; ++ks) {
    const bool hi_ok = ks * 16 + 8 < D;  // the step's upper 8 columns exist (D % 16 == 8: not on the last)
    const uint16_t* q0 = qb + static_cast<int64_t>(r_lo) * p.q_rs + h * D + ks * 16 + 2 * t;
    const uint16_t* q1 = q0 + 8 * p.q_rs;
    a[ks][0] = ok_lo ? ld_pair(q0) : 0u;
    a[ks][1] = ok_hi ? ld_pair(q1) : 0u;
    a[ks][2] = ok_lo && hi_ok ? ld_pair(q0 + 8) : 0u;
    a[ks][3] = ok_hi && hi_ok ? ld_pair(q1 + 8) : 0u;
  }
  cp_async_wait_all();
  __syncthreads();

  float s[1][NT][4];
  zero_tiles(s);
  // ldmatrix.x4 for tiles (j, j + 1) of k-step ks: lanes 0-7 / 8-15 / 16-23 / 24-31 address rows
  // 8j + r of columns 16ks / 16ks + 8, then rows 8j + 8 + r of the same: b0, b1 of j, then of j + 1
  const int k_lrow = (lane & 7) + ((lane >> 4) << 3);
  const int k_lcol = ((lane >> 3) & 1) * 8;
#pragma unroll
  for (int ks = 0; ks < KS; ++ks) {
#pragma unroll
    for (int j = 0; j < NT; j += 2) {
      uint32_t bk[4];
      if (ks * 16 + 8 < D) {
        ldsm_x4(bk, ks_s + (j * 8 + k_lrow) * LDK + ks * 16 + k_lcol);
      } else {  // D % 16 == 8, last step: the upper half is zero (Q's is too)
        ldsm_x4(bk, ks_s + (j * 8 + k_lrow) * LDK + ks * 16);
        bk[1] = 0u;
        bk[3] = 0u;
      }
      mma16816<T>(s[0][j], a[ks], bk[0], bk[1]);
      mma16816<T>(s[0][j + 1], a[ks], bk[2], bk[3]);
    }
  }

  // softmax over the Lk keys (masked past Lk), P unnormalised in T; row sums in fp32
  float m0 = -INFINITY, m1 = -INFINITY;
#pragma unroll
  for (int j = 0; j < NT; ++j)
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      if (j * 8 + 2 * t + e >= p.Lk) {
        s[0][j][e] = -INFINITY;
        s[0][j][e + 2] = -INFINITY;
      }
      m0 = fmaxf(m0, s[0][j][e]);
      m1 = fmaxf(m1, s[0][j][e + 2]);
    }
  m0 = quad_max(m0) * p.scale_log2;
  m1 = quad_max(m1) * p.scale_log2;
  float l0 = 0.f, l1 = 0.f;
#pragma unroll
  for (int j = 0; j < NT; ++j)
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      s[0][j][e] = exp2f(fmaf(s[0][j][e], p.scale_log2, -m0));
      s[0][j][e + 2] = exp2f(fmaf(s[0][j][e + 2], p.scale_log2, -m1));
      l0 += s[0][j][e];
      l1 += s[0][j][e + 2];
    }
  const float inv_l0 = 1.f / quad_sum(l0), inv_l1 = 1.f / quad_sum(l1);
  uint32_t pa[KCH][4];
#pragma unroll
  for (int c = 0; c < KCH; ++c) {
    pa[c][0] = pack2<T>(s[0][2 * c][0], s[0][2 * c][1]);
    pa[c][1] = pack2<T>(s[0][2 * c][2], s[0][2 * c][3]);
    pa[c][2] = pack2<T>(s[0][2 * c + 1][0], s[0][2 * c + 1][1]);
    pa[c][3] = pack2<T>(s[0][2 * c + 1][2], s[0][2 * c + 1][3]);
  }

  float o[1][ND][4];
  zero_tiles(o);
  // V as B (k = key, n = dim) by ldmatrix.trans: lanes 0-7 address keys 16c + r, lanes 8-15 keys
  // 16c + 8 + r, at dims 8n: b0 = (V[16c + 2t][8n + g], V[16c + 2t + 1][..]), b1 the same 8 keys on
  const int v_lrow = lane & 15;
#pragma unroll
  for (int c = 0; c < KCH; ++c) {
#pragma unroll
    for (int n = 0; n < ND; ++n) {
      uint32_t b0, b1;
      ldsm_x2_trans(b0, b1, vs_s + (c * 16 + v_lrow) * LDK + n * 8);
      mma16816<T>(o[0][n], pa[c], b0, b1);
    }
  }

  // O / l rounded to T
  const int64_t orow_lo = static_cast<int64_t>(b) * p.Lq + r_lo, orow_hi = orow_lo + 8;
  uint16_t* out_lo = p.out + orow_lo * p.HD + h * D + 2 * t;
  uint16_t* out_hi = p.out + orow_hi * p.HD + h * D + 2 * t;
#pragma unroll
  for (int n = 0; n < ND; ++n) {
    const uint32_t lo = pack2<T>(o[0][n][0] * inv_l0, o[0][n][1] * inv_l0);
    const uint32_t hi = pack2<T>(o[0][n][2] * inv_l1, o[0][n][3] * inv_l1);
    if (ok_lo) *reinterpret_cast<uint32_t*>(out_lo + n * 8) = lo;
    if (ok_hi) *reinterpret_cast<uint32_t*>(out_hi + n * 8) = hi;
  }
}

// Launch on stream s. Shared memory past the default 48 KB (d 128 / 160 with more than 80 keys)
// is opted into once per device for each instance (the attribute is per device; no stream work).
template <typename T, int D, int KCH>
void launch_skv(const SkvParams& p, int B, int H, cudaStream_t s, const char* fn) {
  constexpr size_t smem = kv_elems<D, KCH>() * sizeof(uint16_t);
  auto* kernel = short_kv_kernel<T, D, KCH>;
  if constexpr (smem > 48 * 1024) {
    static std::atomic<uint64_t> opted{0};  // bit d: done on device d (devices 0..63)
    const int dev = current_device_info(fn).device;
    const uint64_t bit = dev < 64 ? (uint64_t{1} << dev) : 0;
    if (!bit || !(opted.load() & bit)) {
      LYRA_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           static_cast<int>(smem)), fn);
      opted.fetch_or(bit);
    }
  }
  const dim3 grid(static_cast<unsigned>((p.Lq + kSkvRows - 1) / kSkvRows), static_cast<unsigned>(H),
                  static_cast<unsigned>(B));
  kernel<<<grid, kSkvThreads, smem, s>>>(p);
  LYRA_CHECK_LAUNCH(fn);
}

template <typename T, int D>
void dispatch_keys(const SkvParams& p, int B, int H, cudaStream_t s, const char* fn) {
  if (p.Lk <= 80) return launch_skv<T, D, 5>(p, B, H, s, fn);
  return launch_skv<T, D, 8>(p, B, H, s, fn);
}

}  // namespace

bool attention_short_kv_head_dim_ok(int64_t D) {
  return D == 40 || D == 64 || D == 80 || D == 128 || D == 160;
}

int64_t attention_short_kv_max_keys() { return kSkvMaxKeys; }

void attention_short_kv(uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t out, int64_t B, int64_t Lq,
                        int64_t Lk, int64_t H, int64_t D, int64_t q_bs, int64_t q_rs, int64_t k_bs,
                        int64_t k_rs, int64_t v_bs, int64_t v_rs, double scale, int dtype,
                        uintptr_t stream) {
  const char* fn = "attention_short_kv";
  LYRA_CHECK_ARG(dtype == kFloat16 || dtype == kBFloat16, fn,
                 std::string("dtype must be 1 (float16) or 2 (bfloat16), got ") + dtype_name(dtype));
  LYRA_CHECK_ARG(attention_short_kv_head_dim_ok(D), fn,
                 "head dim must be one of 40, 64, 80, 128, 160, got " + std::to_string(D));
  LYRA_CHECK_ARG(Lk >= 1 && Lk <= kSkvMaxKeys, fn,
                 "Lk (keys) must be in [1, " + std::to_string(kSkvMaxKeys) + "], got " + std::to_string(Lk));
  LYRA_CHECK_ARG(B >= 1 && B <= 65535, fn, "B must be in [1, 65535], got " + std::to_string(B));
  LYRA_CHECK_ARG(Lq >= 1 && Lq < (1ll << 30), fn, "Lq must be in [1, 2^30), got " + std::to_string(Lq));
  LYRA_CHECK_ARG(H >= 1 && H <= 65535 && H * D < (1ll << 24), fn,
                 "H must be in [1, 65535] with H * D < 2^24, got H=" + std::to_string(H));
  LYRA_CHECK_ARG(q && k && v && out, fn, "q, k, v and out must be non-null device pointers");
  LYRA_CHECK_ARG(aligned_to(q, 4) && aligned_to(k, 16) && aligned_to(v, 16), fn,
                 "q must be 4-byte aligned, k and v 16-byte aligned (they are copied in 16-byte pieces)");
  LYRA_CHECK_ARG(aligned_to(out, 4), fn, "out must be 4-byte aligned");
  for (int64_t st : {q_bs, q_rs, k_bs, k_rs, v_bs, v_rs})
    LYRA_CHECK_ARG(st % 2 == 0 && st >= 0, fn,
                   "batch and row strides must be even and >= 0, got " + std::to_string(st));
  for (int64_t st : {k_bs, k_rs, v_bs, v_rs})
    LYRA_CHECK_ARG(st % 8 == 0, fn, "k / v strides must be multiples of 8 elements, got " + std::to_string(st));
  LYRA_CHECK_ARG(q_rs >= H * D && k_rs >= H * D && v_rs >= H * D, fn,
                 "row strides must be at least H * D (heads D apart, D unit-stride)");
  SkvParams p;
  p.q = as_ptr<const uint16_t>(q);
  p.k = as_ptr<const uint16_t>(k);
  p.v = as_ptr<const uint16_t>(v);
  p.out = as_ptr<uint16_t>(out);
  p.q_bs = q_bs; p.q_rs = q_rs; p.k_bs = k_bs; p.k_rs = k_rs; p.v_bs = v_bs; p.v_rs = v_rs;
  p.Lq = static_cast<int>(Lq);
  p.Lk = static_cast<int>(Lk);
  p.HD = static_cast<int>(H * D);
  p.scale_log2 = static_cast<float>(scale * 1.4426950408889634);
  const cudaStream_t s = as_stream(stream);
  const int b = static_cast<int>(B), h = static_cast<int>(H);
  auto by_dim = [&](auto tag) {
    using T = decltype(tag);
    switch (D) {
      case 40: return dispatch_keys<T, 40>(p, b, h, s, fn);
      case 64: return dispatch_keys<T, 64>(p, b, h, s, fn);
      case 80: return dispatch_keys<T, 80>(p, b, h, s, fn);
      case 128: return dispatch_keys<T, 128>(p, b, h, s, fn);
      default: return dispatch_keys<T, 160>(p, b, h, s, fn);
    }
  };
  if (dtype == kFloat16) by_dim(__half{});
  else by_dim(__nv_bfloat16{});
}

}  // namespace lyra
