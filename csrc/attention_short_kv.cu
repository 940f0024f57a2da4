// attention_short_kv.cu: attention over few keys (cross-attention on a text encoder's tokens,
// Lk <= 128), with its output written in 16 bits or already quantised per row.
//
//   q (B, Lq, H, D), k / v (B, Lk, H, D): row (token) strides and batch strides are free,
//   heads are D apart and D is unit-stride (the projections' own layout, "blhd").
//   out (B, Lq, H * D) contiguous: 16-bit (kind = -1), or bytes quantised per row (kind 0
//   fp8 e4m3, 1 int8) with out_scale (B * Lq) float32, exactly numerics.quantize_rows of the
//   16-bit output the same call writes with kind = -1 (optionally times inv_smooth (H * D)).
//
// A block takes R = 16 * MT query rows of one batch and every head (a row's scale needs all of
// them); each warp takes heads warp, warp + nwarps, ... For one head it copies K and V (all Lk
// rows, zero-filled to a multiple of 16) into its own shared-memory buffers with 16-byte
// cp.async (one L2 round trip per head, Q's fragments loaded meanwhile), then computes
// S = Q K^T with ldmatrix + mma.sync m16n8k16 (all keys at once: no online softmax), the softmax
// in fp32 (exp2), P in the storage type, O = P V (V's fragments by ldmatrix.trans), divides by
// the row sums and stages O rounded to T in shared memory. After a barrier each warp copies or
// quantises whole rows from the stage (16-byte accesses).
// (Session 19 run B: a first form read K / V fragments with 2- and 4-byte global loads; it was
// 1.2-3x slower than cuDNN, every warp waiting an L2 round trip per few loads.)
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <atomic>
#include <cmath>
#include <type_traits>

#include "common.cuh"
#include "quant.cuh"

namespace lyra {
namespace {

constexpr int kSkvMaxKeys = 128;
constexpr int kSkvMaxWarps = 8;

struct SkvParams {
  const uint16_t* q;
  const uint16_t* k;
  const uint16_t* v;
  void* out;
  float* out_scale;
  const float* inv_smooth;
  int64_t q_bs, q_rs, k_bs, k_rs, v_bs, v_rs;  // element strides: batch, row (token)
  int Lq, Lk, H, HD;
  float scale_log2;  // softmax scale * log2(e)
  int kind;          // -1: 16-bit out; kQuantFp8 / kQuantInt8
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

// One head for the block's R rows: S, softmax, P V, O / l staged (rounded to T).
// Fragment layouts (PTX mma.m16n8k16): lane = 4 g + t; A: (g, 2t..2t+1), (g+8, ..),
// (g, 2t+8..), (g+8, 2t+8..); B: (k 2t..2t+1, n g), (k 2t+8.., n g); C: (g, 2t..2t+1), (g+8, ..).
// Row stride (elements) of a warp's K / V buffers: 16 bytes of padding put the 8 rows of an
// ldmatrix 8x8 load in 8 different bank quads.
template <int D>
__host__ __device__ constexpr int kv_ld() { return D + 8; }

template <int D, int KCH>
__host__ __device__ constexpr int kv_warp_elems() { return 2 * KCH * 16 * kv_ld<D>(); }  // K then V

template <typename T, int D, int KCH, int MT>
__device__ __forceinline__ void one_head(const SkvParams& p, const uint16_t* qb, const uint16_t* kb,
                                         const uint16_t* vb, int h, int row0, T* stage, int ld,
                                         uint16_t* ks_buf) {
  constexpr int KS = (D + 15) / 16;  // k-steps of Q K^T (a last half step is zero-filled)
  constexpr int NT = 2 * KCH;        // 8-key tiles of S
  constexpr int ND = D / 8;          // 8-column tiles of O
  const int lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;

  constexpr int LDK = kv_ld<D>();
  constexpr int KROWS = KCH * 16;
  constexpr int CPR = D / 8;  // 16-byte chunks per row
  uint16_t* ks_s = ks_buf;                 // K rows: KROWS x LDK
  uint16_t* vs_s = ks_buf + KROWS * LDK;   // V rows: KROWS x LDK
  // K and V of head h: rows past Lk zero-filled (their scores are masked; V's must be finite)
  for (int i = lane; i < KROWS * CPR; i += 32) {
    const int row = i / CPR, ch = i % CPR;
    const bool ok = row < p.Lk;
    const int64_t src_row = ok ? row : 0;
    cp_async16(ks_s + row * LDK + ch * 8, kb + src_row * p.k_rs + h * D + ch * 8, ok);
    cp_async16(vs_s + row * LDK + ch * 8, vb + src_row * p.v_rs + h * D + ch * 8, ok);
  }
  // Q's fragments meanwhile (straight from global: each is used once)
  uint32_t a[MT][KS][4];
#pragma unroll
  for (int ks = 0; ks < KS; ++ks) {
    const int c0 = ks * 16 + 2 * t;
    const bool hi_ok = ks * 16 + 8 < D;  // the step's upper 8 columns exist (D % 16 == 8: not on the last)
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      const int r = row0 + mt * 16 + g;
      const uint16_t* q0 = qb + static_cast<int64_t>(r) * p.q_rs + h * D + c0;
      const uint16_t* q1 = q0 + 8 * p.q_rs;
      const bool ok0 = r < p.Lq, ok1 = r + 8 < p.Lq;
      a[mt][ks][0] = ok0 ? ld_pair(q0) : 0u;
      a[mt][ks][1] = ok1 ? ld_pair(q1) : 0u;
      a[mt][ks][2] = ok0 && hi_ok ? ld_pair(q0 + 8) : 0u;
      a[mt][ks][3] = ok1 && hi_ok ? ld_pair(q1 + 8) : 0u;
    }
  }
  cp_async_wait_all();
  __syncwarp();

  float s[MT][NT][4];
  zero_tiles(s);

  // ldmatrix.x4 for tiles (j, j + 1) of k-step ks: lanes 0-7 / 8-15 / 16-23 / 24-31 address rows
  // 8j + r of columns 16ks / 16ks + 8, then rows 8j + 8 + r of the same: b0, b1 of j, then of j + 1
  const int k_lrow = (lane & 7) + ((lane >> 4) << 3);
  const int k_lcol = ((lane >> 3) & 1) * 8;
#pragma unroll
  for (int ks = 0; ks < KS; ++ks) {
#pragma unroll
    for (int j = 0; j < NT; j += 2) {
      uint32_t b[4];
      if (ks * 16 + 8 < D) {
        ldsm_x4(b, ks_s + (j * 8 + k_lrow) * LDK + ks * 16 + k_lcol);
      } else {  // D % 16 == 8, last step: the upper half is zero (Q's is too)
        ldsm_x4(b, ks_s + (j * 8 + k_lrow) * LDK + ks * 16);
        b[1] = 0u;
        b[3] = 0u;
      }
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        mma16816<T>(s[mt][j], a[mt][ks], b[0], b[1]);
        mma16816<T>(s[mt][j + 1], a[mt][ks], b[2], b[3]);
      }
    }
  }

  // softmax over the Lk keys (masked past Lk), P unnormalised in T; row sums in fp32
  uint32_t pa[MT][KCH][4];
  float inv_l[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    float m0 = -INFINITY, m1 = -INFINITY;
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        if (j * 8 + 2 * t + e >= p.Lk) {
          s[mt][j][e] = -INFINITY;
          s[mt][j][e + 2] = -INFINITY;
        }
        m0 = fmaxf(m0, s[mt][j][e]);
        m1 = fmaxf(m1, s[mt][j][e + 2]);
      }
    m0 = quad_max(m0) * p.scale_log2;
    m1 = quad_max(m1) * p.scale_log2;
    float l0 = 0.f, l1 = 0.f;
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        s[mt][j][e] = exp2f(fmaf(s[mt][j][e], p.scale_log2, -m0));
        s[mt][j][e + 2] = exp2f(fmaf(s[mt][j][e + 2], p.scale_log2, -m1));
        l0 += s[mt][j][e];
        l1 += s[mt][j][e + 2];
      }
    inv_l[mt][0] = 1.f / quad_sum(l0);
    inv_l[mt][1] = 1.f / quad_sum(l1);
#pragma unroll
    for (int c = 0; c < KCH; ++c) {
      pa[mt][c][0] = pack2<T>(s[mt][2 * c][0], s[mt][2 * c][1]);
      pa[mt][c][1] = pack2<T>(s[mt][2 * c][2], s[mt][2 * c][3]);
      pa[mt][c][2] = pack2<T>(s[mt][2 * c + 1][0], s[mt][2 * c + 1][1]);
      pa[mt][c][3] = pack2<T>(s[mt][2 * c + 1][2], s[mt][2 * c + 1][3]);
    }
  }

  float o[MT][ND][4];
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
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) mma16816<T>(o[mt][n], pa[mt][c], b0, b1);
    }
  }
  __syncwarp();  // every lane is done with K / V before the next head's copy overwrites them

#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    T* r0 = stage + (mt * 16 + g) * ld + h * D + 2 * t;
    T* r1 = r0 + 8 * ld;
#pragma unroll
    for (int n = 0; n < ND; ++n) {
      *reinterpret_cast<uint32_t*>(r0 + n * 8) = pack2<T>(o[mt][n][0] * inv_l[mt][0], o[mt][n][1] * inv_l[mt][0]);
      *reinterpret_cast<uint32_t*>(r1 + n * 8) = pack2<T>(o[mt][n][2] * inv_l[mt][1], o[mt][n][3] * inv_l[mt][1]);
    }
  }
}

template <typename T, int D, int KCH, int MT>
__global__ void __launch_bounds__(kSkvMaxWarps * 32) short_kv_kernel(SkvParams p) {
  extern __shared__ __align__(16) unsigned char skv_smem[];
  T* stage = reinterpret_cast<T*>(skv_smem);
  constexpr int R = 16 * MT;
  const int ld = p.HD + 8;  // staged row stride (elements): 8 rows x 4 lanes hit 32 banks
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nw = blockDim.x >> 5;
  const int b = blockIdx.y;
  const int row0 = blockIdx.x * R;
  const uint16_t* qb = p.q + b * p.q_bs;
  const uint16_t* kb = p.k + b * p.k_bs;
  const uint16_t* vb = p.v + b * p.v_bs;

  uint16_t* kv = reinterpret_cast<uint16_t*>(skv_smem) + R * ld + warp * kv_warp_elems<D, KCH>();
  for (int h = warp; h < p.H; h += nw) one_head<T, D, KCH, MT>(p, qb, kb, vb, h, row0, stage, ld, kv);
  __syncthreads();

  const int nvec = p.HD / 8;
  for (int r = warp; r < R; r += nw) {
    const int row = row0 + r;
    if (row >= p.Lq) break;  // rows past Lq: none after this one either (no barrier below)
    const int64_t orow = static_cast<int64_t>(b) * p.Lq + row;
    const T* src = stage + r * ld;
    if (p.kind < 0) {
      T* dst = static_cast<T*>(p.out) + orow * p.HD;
      for (int i = lane; i < nvec; i += 32)
        *reinterpret_cast<uint4*>(dst + i * 8) = *reinterpret_cast<const uint4*>(src + i * 8);
      continue;
    }
    // numerics.quantize_rows of the staged (T-rounded) row: amax, scale, quantise
    float amax = 0.f;
    for (int i = lane; i < nvec; i += 32) {
      float v[8];
      load_vec<8>(src + i * 8, v);
      smooth<8>(p.inv_smooth ? p.inv_smooth + i * 8 : nullptr, v);
#pragma unroll
      for (int e = 0; e < 8; ++e) amax = nan_max(amax, fabsf(v[e]));
    }
    amax = warp_max(amax);
    const float sc = quant_row_scale(amax, p.kind);
    const float inv = quant_inv_scale(sc);
    if (lane == 0) p.out_scale[orow] = sc;
    uint8_t* dst = static_cast<uint8_t*>(p.out) + orow * p.HD;
    for (int i = lane; i < nvec; i += 32) {
      float v[8];
      load_vec<8>(src + i * 8, v);
      smooth<8>(p.inv_smooth ? p.inv_smooth + i * 8 : nullptr, v);
      quant_store<8>(dst + i * 8, v, inv, p.kind);
    }
  }
}

constexpr size_t kSkvSmemBudget = 200 * 1024;  // of the H100's 227 KB per block

// Warps per block: the largest divisor of H (every warp gets the same number of heads) up to
// kSkvMaxWarps whose K / V buffers fit next to the stage, else the most that fit; 0 if none.
int warps_for_heads(int H, size_t stage_bytes, size_t warp_bytes) {
  int fit = 0;
  for (int w = kSkvMaxWarps; w >= 1; --w) {
    if (stage_bytes + w * warp_bytes > kSkvSmemBudget) continue;
    if (fit == 0) fit = w < H ? w : H;
    if (H % w == 0) return w;
  }
  return fit;
}

template <typename T, int D, int KCH, int MT>
void launch_skv(const SkvParams& p, int B, cudaStream_t s, const char* fn) {
  constexpr int R = 16 * MT;
  const size_t stage = static_cast<size_t>(R) * (p.HD + 8) * sizeof(T);
  const size_t per_warp = kv_warp_elems<D, KCH>() * sizeof(uint16_t);
  const int warps = warps_for_heads(p.H, stage, per_warp);
  LYRA_CHECK_ARG(warps > 0, fn, "H * D = " + std::to_string(p.HD) + " leaves no shared memory for K / V");
  const size_t smem = stage + warps * per_warp;
  auto* kernel = short_kv_kernel<T, D, KCH, MT>;
  static std::atomic<size_t> opted{48 * 1024};  // dynamic shared memory this instance may use
  if (smem > opted.load()) {
    LYRA_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(smem)), fn);
    opted.store(smem);
  }
  const dim3 grid((p.Lq + R - 1) / R, B);
  kernel<<<grid, warps * 32, smem, s>>>(p);
  LYRA_CHECK_LAUNCH(fn);
}

template <typename T, int D>
void dispatch_keys(const SkvParams& p, int B, bool two_tiles, cudaStream_t s, const char* fn) {
  // two m-tiles per warp halve the K / V reads per query row; only where the registers allow
  // (D <= 64 and Lk <= 80: 244-255 registers without spills; larger tiles spill)
  if constexpr (D <= 64) {
    if (two_tiles && p.Lk <= 80) return launch_skv<T, D, 5, 2>(p, B, s, fn);
  }
  if (p.Lk <= 80) return launch_skv<T, D, 5, 1>(p, B, s, fn);
  return launch_skv<T, D, 8, 1>(p, B, s, fn);
}

}  // namespace

bool attention_short_kv_head_dim_ok(int64_t D) {
  return D == 40 || D == 64 || D == 80 || D == 128 || D == 160;
}

int64_t attention_short_kv_max_keys() { return kSkvMaxKeys; }

void attention_short_kv(uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t out, uintptr_t out_scale,
                        uintptr_t inv_smooth, int64_t B, int64_t Lq, int64_t Lk, int64_t H,
                        int64_t D, int64_t q_bs, int64_t q_rs, int64_t k_bs, int64_t k_rs,
                        int64_t v_bs, int64_t v_rs, double scale, int dtype, int kind,
                        uintptr_t stream) {
  const char* fn = "attention_short_kv";
  LYRA_CHECK_ARG(dtype == kFloat16 || dtype == kBFloat16, fn,
                 std::string("dtype must be 1 (float16) or 2 (bfloat16), got ") + dtype_name(dtype));
  LYRA_CHECK_ARG(kind == -1 || kind == kQuantFp8 || kind == kQuantInt8, fn,
                 "kind must be -1 (16-bit output), 0 (fp8 e4m3) or 1 (int8), got " + std::to_string(kind));
  LYRA_CHECK_ARG(attention_short_kv_head_dim_ok(D), fn,
                 "head dim must be one of 40, 64, 80, 128, 160, got " + std::to_string(D));
  LYRA_CHECK_ARG(Lk >= 1 && Lk <= kSkvMaxKeys, fn,
                 "Lk (keys) must be in [1, " + std::to_string(kSkvMaxKeys) + "], got " + std::to_string(Lk));
  LYRA_CHECK_ARG(B >= 1 && B <= 65535, fn, "B must be in [1, 65535], got " + std::to_string(B));
  LYRA_CHECK_ARG(Lq >= 1 && Lq < (1ll << 30), fn, "Lq must be in [1, 2^30), got " + std::to_string(Lq));
  LYRA_CHECK_ARG(H >= 1 && H * D <= 3072, fn,
                 "H * D must be in [D, 3072] (the staged rows live in shared memory), got H=" + std::to_string(H) + " D=" + std::to_string(D));
  LYRA_CHECK_ARG(q && k && v && out, fn, "q, k, v and out must be non-null device pointers");
  LYRA_CHECK_ARG(aligned_to(q, 4) && aligned_to(k, 16) && aligned_to(v, 16), fn,
                 "q must be 4-byte aligned, k and v 16-byte aligned (they are copied in 16-byte pieces)");
  for (int64_t st : {k_bs, k_rs, v_bs, v_rs})
    LYRA_CHECK_ARG(st % 8 == 0, fn, "k / v strides must be multiples of 8 elements, got " + std::to_string(st));
  LYRA_CHECK_ARG(aligned_to(out, 16), fn, "out must be 16-byte aligned");
  for (int64_t st : {q_bs, q_rs, k_bs, k_rs, v_bs, v_rs})
    LYRA_CHECK_ARG(st % 2 == 0 && st >= 0, fn, "batch and row strides must be even and >= 0, got " + std::to_string(st));
  LYRA_CHECK_ARG(q_rs >= H * D && k_rs >= H * D && v_rs >= H * D, fn,
                 "row strides must be at least H * D (heads D apart, D unit-stride)");
  if (kind >= 0) {
    check_quant_out(fn, out, out_scale, inv_smooth);
    LYRA_CHECK_ARG(aligned_to(inv_smooth, 16), fn, "inv_smooth must be 16-byte aligned");
  } else {
    LYRA_CHECK_ARG(inv_smooth == 0, fn, "inv_smooth is only taken with a quantised output");
  }
  SkvParams p;
  p.q = as_ptr<const uint16_t>(q);
  p.k = as_ptr<const uint16_t>(k);
  p.v = as_ptr<const uint16_t>(v);
  p.out = as_ptr<void>(out);
  p.out_scale = as_ptr<float>(out_scale);
  p.inv_smooth = as_ptr<const float>(inv_smooth);
  p.q_bs = q_bs; p.q_rs = q_rs; p.k_bs = k_bs; p.k_rs = k_rs; p.v_bs = v_bs; p.v_rs = v_rs;
  p.Lq = static_cast<int>(Lq);
  p.Lk = static_cast<int>(Lk);
  p.H = static_cast<int>(H);
  p.HD = static_cast<int>(H * D);
  p.scale_log2 = static_cast<float>(scale * 1.4426950408889634);
  p.kind = kind;
  const int sms = current_device_info(fn).sm_count;
  const bool two_tiles = B * ((Lq + 31) / 32) >= sms;
  const cudaStream_t s = as_stream(stream);
  auto by_dim = [&](auto tag) {
    using T = decltype(tag);
    switch (D) {
      case 40: return dispatch_keys<T, 40>(p, static_cast<int>(B), two_tiles, s, fn);
      case 64: return dispatch_keys<T, 64>(p, static_cast<int>(B), two_tiles, s, fn);
      case 80: return dispatch_keys<T, 80>(p, static_cast<int>(B), two_tiles, s, fn);
      case 128: return dispatch_keys<T, 128>(p, static_cast<int>(B), two_tiles, s, fn);
      default: return dispatch_keys<T, 160>(p, static_cast<int>(B), two_tiles, s, fn);
    }
  };
  if (dtype == kFloat16) by_dim(__half{});
  else by_dim(__nv_bfloat16{});
}

}  // namespace lyra
