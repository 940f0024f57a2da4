// bindings.cpp: pybind11 module lyradynamo._C (torch-free).
//
// Every function takes device pointers as Python ints (0 = absent for the
// nullable ones), sizes, a dtype code (0 = float32, 1 = float16, 2 = bfloat16)
// and a cudaStream_t as a Python int, and only enqueues work on that stream.
// Errors: std::invalid_argument -> ValueError (bad argument, named in the
// message), std::runtime_error -> RuntimeError (CUDA / cuBLASLt failure).
// The GIL is released while a call enqueues its work.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <vector>

namespace py = pybind11;

// Definitions live in the .cu files; the signatures must match exactly (a
// mismatch is a link error, not a silent bug).
namespace lyra {
void group_norm(uintptr_t x, uintptr_t weight, uintptr_t bias, uintptr_t y, int64_t N, int64_t C,
                int64_t HW, int64_t groups, double eps, bool silu, bool channels_last, int dtype,
                uintptr_t stream, uintptr_t pre_bias, int64_t pre_bias_bstride,
                uintptr_t pre_bias2, int64_t pre_bias2_bstride);
int64_t group_norm_rows_workspace(int64_t N, int64_t C, int64_t HW, int64_t groups, int dtype,
                                  uintptr_t x, uintptr_t y, uintptr_t weight, uintptr_t bias,
                                  uintptr_t pre_bias, int64_t pre_bias_bstride,
                                  uintptr_t pre_bias2, int64_t pre_bias2_bstride);
void group_norm_rows(uintptr_t x, uintptr_t weight, uintptr_t bias, uintptr_t y, int64_t N,
                     int64_t C, int64_t HW, int64_t groups, double eps, bool silu, int dtype,
                     uintptr_t stream, uintptr_t pre_bias, int64_t pre_bias_bstride,
                     uintptr_t workspace, int64_t workspace_floats, uintptr_t pre_bias2,
                     int64_t pre_bias2_bstride);
void bias_residual(uintptr_t y, uintptr_t bias, uintptr_t residual, uintptr_t out, int64_t N,
                   int64_t C, int64_t HW, bool channels_last, double scale, int dtype,
                   uintptr_t stream);
void norm_modulate(uintptr_t x, uintptr_t weight, uintptr_t bias, uintptr_t mul, uintptr_t add,
                   uintptr_t y, int64_t rows, int64_t D, int64_t rows_per_batch,
                   int64_t mul_bstride, int64_t add_bstride, double eps, bool rms, int dtype,
                   uintptr_t stream, double mul_offset, int param_dtype,
                   int64_t x_row_stride);
void gemm(uintptr_t a, uintptr_t b, uintptr_t bias, uintptr_t out, int64_t M, int64_t N,
          int64_t K, int64_t lda, int64_t ldo, int dtype, uintptr_t stream);
void set_gemm_autotune(int candidates);
int gemm_autotune();
std::pair<int64_t, int64_t> gemm_tuning_counts();
void set_gemm_workspace(int64_t bytes);
int64_t gemm_workspace();
void gemm_ex(uintptr_t a, uintptr_t b, uintptr_t bias, uintptr_t residual, uintptr_t alpha_vec,
             uintptr_t out, int64_t M, int64_t N, int64_t K, int64_t lda, int64_t ldb, int64_t ldo,
             int dtype, int epi, uintptr_t stream);
void gemm_gated(uintptr_t a, uintptr_t w, uintptr_t bias, uintptr_t gate, uintptr_t residual,
                uintptr_t out, int64_t M, int64_t L, int64_t N, int64_t K, int64_t lda, int64_t ldb,
                int64_t gate_bstride, int dtype, int variant, uintptr_t stream);
void gemm_fp8_res(uintptr_t a, uintptr_t w, uintptr_t a_scale, uintptr_t b_scale, uintptr_t bias,
                  uintptr_t residual, uintptr_t out, int64_t M, int64_t N, int64_t K, int64_t lda,
                  int64_t ldb, int dtype, int variant, uintptr_t stream);
void gemm_int8_scaled(uintptr_t a, uintptr_t w, uintptr_t a_scale, uintptr_t b_scale, uintptr_t bias,
                      uintptr_t residual, uintptr_t out, int64_t M, int64_t N, int64_t K, int64_t lda,
                      int64_t ldb, int dtype, int variant, uintptr_t stream);
bool gemm_gated_available();
void gemm_glu(uintptr_t a, uintptr_t w, uintptr_t bias, uintptr_t src, uintptr_t out, int64_t M, int64_t N,
              int64_t K, int64_t lda, int64_t ldb, int act, int dtype, int variant, uintptr_t stream);
void gemm_qk_norm_rope(uintptr_t a, uintptr_t w, uintptr_t bias, uintptr_t out, uintptr_t q_weight,
                       uintptr_t k_weight, uintptr_t cos, uintptr_t sin, int64_t M, int64_t L, int64_t N,
                       int64_t K, int64_t lda, int64_t ldb, int64_t out_batch_stride, int64_t heads,
                       int64_t head_dim, int64_t pos_offset, int64_t rope_len, double eps, int dtype,
                       uintptr_t stream);
void linear_epilogue(uintptr_t y, uintptr_t gate, uintptr_t residual, uintptr_t out, int64_t M,
                     int64_t N_out, int act, bool glu, int64_t rows_per_batch,
                     int64_t gate_bstride, int dtype, uintptr_t stream);
void qk_norm_rope(uintptr_t x, uintptr_t weight, uintptr_t cos, uintptr_t sin, uintptr_t y,
                  int64_t B, int64_t L, int64_t H, int64_t D, int64_t x_stride_b,
                  int64_t x_stride_l, int64_t x_stride_h, int64_t y_stride_b, int64_t y_stride_l,
                  int64_t y_stride_h, double eps, bool has_norm, int64_t rope_l_offset,
                  int64_t rope_len, int dtype, uintptr_t out_inv_scale, uintptr_t stream);

// Attention over few keys, 16-bit output (attention_short_kv.cu).
bool attention_short_kv_head_dim_ok(int64_t D);
int64_t attention_short_kv_max_keys();
void attention_short_kv(uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t out, int64_t B, int64_t Lq,
                        int64_t Lk, int64_t H, int64_t D, int64_t q_bs, int64_t q_rs, int64_t k_bs,
                        int64_t k_rs, int64_t v_bs, int64_t v_rs, double scale, int dtype,
                        uintptr_t stream);

// W8A8 quantisation (quant.cu, norm_modulate.cu, epilogue.cu, gemm.cu).
void quantize_rows(uintptr_t x, uintptr_t inv_smooth, uintptr_t q, uintptr_t scale, int64_t M,
                   int64_t K, int64_t ld_x, int dtype, int kind, uintptr_t stream);
void norm_modulate_quant(uintptr_t x, uintptr_t weight, uintptr_t bias, uintptr_t mul,
                         uintptr_t add, uintptr_t inv_smooth, uintptr_t q, uintptr_t scale,
                         int64_t rows, int64_t D, int64_t rows_per_batch, int64_t mul_bstride,
                         int64_t add_bstride, double eps, bool rms, int kind, int dtype,
                         uintptr_t stream, double mul_offset);
void gemm_fp8(uintptr_t a, uintptr_t b, uintptr_t a_scale, uintptr_t b_scale, uintptr_t bias,
              uintptr_t out, int64_t M, int64_t N, int64_t K, int64_t lda, int64_t ldo,
              int out_dtype, uintptr_t stream);
void gemm_fp8_ex(uintptr_t a, uintptr_t b, uintptr_t a_scale, uintptr_t b_scale, uintptr_t bias,
                 uintptr_t residual, uintptr_t out, int64_t M, int64_t N, int64_t K, int64_t lda,
                 int64_t ldo, int out_dtype, bool fast_accum, uintptr_t stream, int epi);
void gemm_fp8_unscaled(uintptr_t a, uintptr_t b, uintptr_t out_f32, int64_t M, int64_t N,
                       int64_t K, int64_t lda, uintptr_t stream);
void gemm_int8(uintptr_t a, uintptr_t b, uintptr_t out_i32, int64_t M, int64_t N, int64_t K,
               int64_t lda, uintptr_t stream);
bool gemm_fp8_supported_outer_vec(int device, int out_dtype);
void qkv_quant(const std::vector<int64_t>& src, const std::vector<int64_t>& dst, uintptr_t q_weight,
               uintptr_t k_weight, uintptr_t cos, uintptr_t sin, uintptr_t inv, int64_t B, int64_t L,
               int64_t H, int64_t D, int64_t rope_l_offset, int64_t rope_len, double eps, int dtype,
               uintptr_t stream);
void attention_fp8_scales(const std::vector<int64_t>& parts, const std::vector<int64_t>& weights,
                          int64_t D, uintptr_t out, int dtype, uintptr_t stream);
void scaled_epilogue(uintptr_t acc, int acc_dtype, uintptr_t a_scale, uintptr_t b_scale,
                     uintptr_t bias, uintptr_t gate, uintptr_t residual, uintptr_t out, int64_t M,
                     int64_t N_out, int act, bool glu, int64_t rows_per_batch,
                     int64_t gate_bstride, int out_dtype, uintptr_t stream);
bool set_act_quant_kernel(bool enabled);
void linear_epilogue_quant(uintptr_t acc, int acc_dtype, uintptr_t a_scale, uintptr_t b_scale,
                           uintptr_t bias, uintptr_t gate, uintptr_t residual,
                           uintptr_t inv_smooth, uintptr_t q, uintptr_t scale, int64_t M,
                           int64_t N_out, int act, bool glu, int64_t rows_per_batch,
                           int64_t gate_bstride, int out_dtype, int kind, uintptr_t stream);
}  // namespace lyra

PYBIND11_MODULE(_C, m) {
  m.doc() =
      "lyradynamo CUDA kernels (torch-free). Pointers, streams are Python ints; dtype codes: "
      "0 float32, 1 float16, 2 bfloat16.";
  m.attr("DTYPE_FLOAT32") = 0;
  m.attr("DTYPE_FLOAT16") = 1;
  m.attr("DTYPE_BFLOAT16") = 2;
  m.attr("ACT_NONE") = 0;
  m.attr("ACT_GELU") = 1;
  m.attr("ACT_GELU_TANH") = 2;
  m.attr("ACT_SILU") = 3;
  m.attr("ACC_INT32") = 3;  // acc_dtype code of int32 accumulators
  m.attr("QUANT_FP8") = 0;  // kind codes (fp8 = float8 e4m3fn, QMAX 448)
  m.attr("QUANT_INT8") = 1;  // (int8, symmetric, QMAX 127)

  using release = py::call_guard<py::gil_scoped_release>;

  // pre_bias comes after stream (keyword arguments with defaults) so that the
  // positional form without it keeps working.
  m.def("group_norm", &lyra::group_norm, release(),
        "GroupNorm (+SiLU) over (C/groups x HW) per (sample, group); x, y are (N, C, HW) or, "
        "with channels_last, (N, HW, C). weight/bias (C,) may be 0. pre_bias (0 = none): "
        "normalise x + pre_bias[n * pre_bias_bstride + c] (fp32, statistics included); "
        "pre_bias_bstride 0 = one (C,) row for every sample. pre_bias2 (0 = none), the same "
        "way: x + (pre_bias + pre_bias2), the sum in fp32.",
        py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("y"), py::arg("N"), py::arg("C"),
        py::arg("HW"), py::arg("groups"), py::arg("eps"), py::arg("silu"),
        py::arg("channels_last"), py::arg("dtype"), py::arg("stream"), py::arg("pre_bias") = 0,
        py::arg("pre_bias_bstride") = 0, py::arg("pre_bias2") = 0, py::arg("pre_bias2_bstride") = 0);

  m.def("group_norm_rows_workspace", &lyra::group_norm_rows_workspace, release(),
        "float32 elements of workspace group_norm_rows needs for this channels_last shape and "
        "these pointers (their alignment picks the vector width), or 0 when the rows path does "
        "not take it (C / vector width over 512 threads, C*HW >= 2^31, N > 65535).",
        py::arg("N"), py::arg("C"), py::arg("HW"), py::arg("groups"), py::arg("dtype"), py::arg("x"),
        py::arg("y"), py::arg("weight"), py::arg("bias"), py::arg("pre_bias") = 0,
        py::arg("pre_bias_bstride") = 0, py::arg("pre_bias2") = 0, py::arg("pre_bias2_bstride") = 0);
  m.def("group_norm_rows", &lyra::group_norm_rows, release(),
        "group_norm for channels_last (N, HW, C) over whole rows (coalesced when a group's "
        "channel run is narrower than a cache line): statistics pass, finalize, apply pass; "
        "same arguments as group_norm (channels_last implied) plus a float32 workspace of "
        "group_norm_rows_workspace(...) elements.",
        py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("y"), py::arg("N"), py::arg("C"),
        py::arg("HW"), py::arg("groups"), py::arg("eps"), py::arg("silu"), py::arg("dtype"),
        py::arg("stream"), py::arg("pre_bias"), py::arg("pre_bias_bstride"), py::arg("workspace"),
        py::arg("workspace_floats"), py::arg("pre_bias2") = 0, py::arg("pre_bias2_bstride") = 0);

  m.def("bias_residual", &lyra::bias_residual, release(),
        "out = (y + bias[c] + residual) * scale, fp32 math, one rounding; y, residual, out "
        "(N, C, HW) or, with channels_last, (N, HW, C), all in that same layout; bias (C,) "
        "and residual may be 0; out may equal y or residual.",
        py::arg("y"), py::arg("bias"), py::arg("residual"), py::arg("out"), py::arg("N"),
        py::arg("C"), py::arg("HW"), py::arg("channels_last"), py::arg("scale"),
        py::arg("dtype"), py::arg("stream"));

  m.def("norm_modulate", &lyra::norm_modulate, release(),
        "LayerNorm (or RMSNorm if rms) over rows of length D, optional affine, then "
        "y = n * mul[b] + add[b] with b = row / rows_per_batch (adaLN modulation). mul_offset "
        "(after stream, default 0) != 0 multiplies by mul_offset + mul[b] rounded to dtype "
        "instead: eager's `1 + scale` (needs mul). param_dtype (default -1: dtype) = float32 "
        "with 16-bit x: weight, bias, mul and add are float32 (x and y stay dtype). x_row_stride "
        "(default -1: D) reads row r of x at x + r * x_row_stride (y stays contiguous).",
        py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("mul"), py::arg("add"),
        py::arg("y"), py::arg("rows"), py::arg("D"), py::arg("rows_per_batch"),
        py::arg("mul_bstride"), py::arg("add_bstride"), py::arg("eps"), py::arg("rms"),
        py::arg("dtype"), py::arg("stream"), py::arg("mul_offset") = 0.0,
        py::arg("param_dtype") = -1, py::arg("x_row_stride") = -1);

  m.def("set_gemm_autotune", &lyra::set_gemm_autotune, release(), py::arg("candidates"),
        "Algorithms every new GEMM plan times on its first call outside CUDA-graph capture (the "
        "fastest is kept); 0 or 1: the cuBLASLt heuristic's first choice. Plans made before keep "
        "their algorithm.");
  m.def("gemm_autotune", &lyra::gemm_autotune, release(), "The current set_gemm_autotune value.");
  m.def("gemm_tuning_counts", &lyra::gemm_tuning_counts, release(),
        "(plans timed, plans that took the winner of a timed plan of the same problem at an M within 4x) "
        "since the process started.");
  m.def("set_gemm_workspace", &lyra::set_gemm_workspace, release(), py::arg("bytes"),
        "Workspace bytes (0 .. 32 MiB) the cuBLASLt heuristic may give new GEMM plans; plans are "
        "cached per value, so a change takes effect for the next call of every shape.");
  m.def("gemm_workspace", &lyra::gemm_workspace, release(), "The current set_gemm_workspace value.");
  m.def("gemm", &lyra::gemm, release(),
        "out(M, N) = a(M, K) @ b(N, K)^T (+ bias[N]) via cuBLASLt, fp32 accumulation; row strides "
        "lda (a) and ldo (out) in elements. First call per device allocates a 32 MiB workspace.",
        py::arg("a"), py::arg("b"), py::arg("bias"), py::arg("out"), py::arg("M"), py::arg("N"),
        py::arg("K"), py::arg("lda"), py::arg("ldo"), py::arg("dtype"), py::arg("stream"));

  m.def("gemm_ex", &lyra::gemm_ex, release(),
        "out = epi(alpha[n] * (a @ b^T) + residual + bias[n]) in cuBLASLt's epilogue: epi 0 none, "
        "1 gelu (tanh approximation); alpha (N,) float32 or 0 (= 1); residual (M, N; row stride "
        "ldo) or 0, not aliasing out; b (N, K) with row stride ldb >= K. Same layouts and numerics "
        "as gemm.",
        py::arg("a"), py::arg("b"), py::arg("bias"), py::arg("residual"), py::arg("alpha_vec"),
        py::arg("out"), py::arg("M"), py::arg("N"), py::arg("K"), py::arg("lda"), py::arg("ldb"), py::arg("ldo"),
        py::arg("dtype"), py::arg("epi"), py::arg("stream"));

  m.def("gemm_gated", &lyra::gemm_gated, release(),
        "out = residual + gate * (a @ w^T + bias), one CUTLASS sm90 GEMM (gemm_gated.cu): L "
        "samples of M rows of a (row stride lda), w (N, K) with row stride ldb, gate rows of N "
        "at batch stride gate_bstride (0: one row for all), bias (N,) or 0, residual / out "
        "(L*M, N) contiguous; fp16 / bf16; K, N, lda, ldb, gate_bstride multiples of 8, "
        "pointers 16-byte aligned; SM90. variant: 0 persistent tiles, 1 stream-K, 2 ping-pong.",
        py::arg("a"), py::arg("w"), py::arg("bias"), py::arg("gate"), py::arg("residual"),
        py::arg("out"), py::arg("M"), py::arg("L"), py::arg("N"), py::arg("K"), py::arg("lda"),
        py::arg("ldb"), py::arg("gate_bstride"), py::arg("dtype"), py::arg("variant"), py::arg("stream"));
  m.def("gemm_int8_scaled", &lyra::gemm_int8_scaled, release(),
        "out (M, N) = a_scale[m] b_scale[n] (a @ w^T) + bias (+ residual), a / w int8 with exact int32 "
        "sums, scales, bias and residual in one CUTLASS sm90 GEMM's epilogue (gemm_int8_scaled.cu), "
        "rounded once to dtype (1 fp16, 2 bf16); residual 0: none. variant 0 cooperative "
        "128x256x128, 2 ping-pong 128x128x128. out may alias residual.",
        py::arg("a"), py::arg("w"), py::arg("a_scale"), py::arg("b_scale"), py::arg("bias"),
        py::arg("residual"), py::arg("out"), py::arg("M"), py::arg("N"), py::arg("K"), py::arg("lda"),
        py::arg("ldb"), py::arg("dtype"), py::arg("variant"), py::arg("stream"));
  m.def("gemm_fp8_res", &lyra::gemm_fp8_res, release(),
        "out (M, N) = a_scale[m] b_scale[n] (a @ w^T) + bias + residual, a / w fp8 e4m3, one CUTLASS "
        "sm90 GEMM with the residual in its TMA epilogue (gemm_fp8_res.cu), fast fp8 accumulation, "
        "rounded once to dtype (1 fp16, 2 bf16). variant 0 cooperative 128x256x128, 2 ping-pong "
        "128x128x128. out may alias residual.",
        py::arg("a"), py::arg("w"), py::arg("a_scale"), py::arg("b_scale"), py::arg("bias"),
        py::arg("residual"), py::arg("out"), py::arg("M"), py::arg("N"), py::arg("K"), py::arg("lda"),
        py::arg("ldb"), py::arg("dtype"), py::arg("variant"), py::arg("stream"));
  m.def("gemm_gated_available", &lyra::gemm_gated_available,
        "True when the library was built with the CUTLASS headers (gemm_gated and gemm_glu can run "
        "on SM90).");
  m.def("gemm_glu", &lyra::gemm_glu, release(),
        "out = src * act(a @ w^T + bias), one CUTLASS sm90 GEMM (gemm_glu.cu): the gate half of a "
        "GLU linear, src its other half. a (M, K) row stride lda, w (N, K) row stride ldb, bias "
        "(N,) or 0, src / out (M, N) contiguous (out may be src); act 1 gelu only; fp16 / bf16; K, "
        "N, lda, ldb multiples of 8, pointers 16-byte aligned; SM90. variant: 0 persistent tiles, "
        "1 stream-K, 2 ping-pong.",
        py::arg("a"), py::arg("w"), py::arg("bias"), py::arg("src"), py::arg("out"), py::arg("M"),
        py::arg("N"), py::arg("K"), py::arg("lda"), py::arg("ldb"), py::arg("act"), py::arg("dtype"),
        py::arg("variant"), py::arg("stream"));

  m.def("gemm_qk_norm_rope", &lyra::gemm_qk_norm_rope, release(),
        "An attention's q, k, v projection as one CUTLASS sm90 GEMM (gemm_qk_norm_rope.cu): y = "
        "a @ w^T + bias with w the (3 H D, K) q / k / v weights; the epilogue RMS-normalises each "
        "q and k head (weights q_weight / k_weight, eps) and applies RoPE at row position "
        "t + pos_offset from cos / sin (rope_len, D) float32 (or cos = 0: none). L samples of M "
        "rows of a (row stride lda); out rows of N with sample stride out_batch_stride. head_dim "
        "128; fp16 / bf16; SM90.",
        py::arg("a"), py::arg("w"), py::arg("bias"), py::arg("out"), py::arg("q_weight"),
        py::arg("k_weight"), py::arg("cos"), py::arg("sin"), py::arg("M"), py::arg("L"), py::arg("N"),
        py::arg("K"), py::arg("lda"), py::arg("ldb"), py::arg("out_batch_stride"), py::arg("heads"),
        py::arg("head_dim"), py::arg("pos_offset"), py::arg("rope_len"), py::arg("eps"),
        py::arg("dtype"), py::arg("stream"));

  m.def("linear_epilogue", &lyra::linear_epilogue, release(),
        "out = residual + gate * act(y) (or y[:, :N] * act(y[:, N:]) if glu); act 0 none, "
        "1 gelu, 2 gelu_tanh, 3 silu.",
        py::arg("y"), py::arg("gate"), py::arg("residual"), py::arg("out"), py::arg("M"),
        py::arg("N_out"), py::arg("act"), py::arg("glu"), py::arg("rows_per_batch"),
        py::arg("gate_bstride"), py::arg("dtype"), py::arg("stream"));

  m.def("qk_norm_rope", &lyra::qk_norm_rope, release(),
        "Per-head RMSNorm over D (if has_norm) then FLUX-style rotary embedding with fp32 "
        "cos/sin (rope_len, D) at position l - rope_l_offset; y may equal x. With "
        "out_inv_scale (a float32 device pointer) y is fp8 e4m3: the dtype-rounded result "
        "times *out_inv_scale, saturating.",
        py::arg("x"), py::arg("weight"), py::arg("cos"), py::arg("sin"), py::arg("y"),
        py::arg("B"), py::arg("L"), py::arg("H"), py::arg("D"), py::arg("x_stride_b"),
        py::arg("x_stride_l"), py::arg("x_stride_h"), py::arg("y_stride_b"),
        py::arg("y_stride_l"), py::arg("y_stride_h"), py::arg("eps"), py::arg("has_norm"),
        py::arg("rope_l_offset"), py::arg("rope_len"), py::arg("dtype"), py::arg("out_inv_scale"),
        py::arg("stream"));

  m.def("attention_fp8_scales", &lyra::attention_fp8_scales, release(),
        "Per-tensor scales of FP8 attention into out (32 float32, zeroed before the call): "
        "descale q/k/v at 0/4/8, descale_s 12, scale_s 16, scale_o 20, inv q/k/v at 24..26. "
        "parts: 8 ints per part (tensor 0 q / 1 k / 2 v, ptr, B, L, H, stride_b, stride_l, "
        "stride_h; (B, L, H, D) views with unit stride along D): amax over them; weights: 2 "
        "ints per RMSNorm weight (tensor 0 / 1, ptr; D values): bound sqrt(D) * max|w|.",
        py::arg("parts"), py::arg("weights"), py::arg("D"), py::arg("out"), py::arg("dtype"),
        py::arg("stream"));

  m.def("qkv_quant", &lyra::qkv_quant, release(),
        "q, k, v (B, L, H, D) of one attention to e4m3 in one pass: q and k RMSNorm'd (weight "
        "pointer non-zero) and rotated (cos / sin fp32 (rope_len, D), position l - rope_l_offset) "
        "as qk_norm_rope, v copied (v's pointers 0: none); value * inv[t] saturating to e4m3, or "
        "(inv 0) the values in dtype. src: (ptr, stride_b, stride_l, "
        "stride_h) x 3; dst: q, k, v pointers + stride_b, stride_l, stride_h (elements); 16-byte "
        "vectors, D / vector a power of two <= 32.",
        py::arg("src"), py::arg("dst"), py::arg("q_weight"), py::arg("k_weight"), py::arg("cos"),
        py::arg("sin"), py::arg("inv"), py::arg("B"), py::arg("L"), py::arg("H"), py::arg("D"),
        py::arg("rope_l_offset"), py::arg("rope_len"), py::arg("eps"), py::arg("dtype"),
        py::arg("stream"));

  m.def("attention_short_kv", &lyra::attention_short_kv, release(),
        "out = softmax(q k^T * scale) v over Lk <= attention_short_kv_max_keys() keys, fp32 scores "
        "and softmax, P and out rounded to dtype (1 fp16, 2 bf16); q (B, Lq, H, D), k / v (B, Lk, "
        "H, D) with element strides per batch (*_bs) and row (*_rs), heads D apart, D unit-stride; "
        "out (B, Lq, H * D) contiguous. One launch, no workspace.",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("B"), py::arg("Lq"),
        py::arg("Lk"), py::arg("H"), py::arg("D"), py::arg("q_bs"), py::arg("q_rs"), py::arg("k_bs"),
        py::arg("k_rs"), py::arg("v_bs"), py::arg("v_rs"), py::arg("scale"), py::arg("dtype"),
        py::arg("stream"));
  m.def("attention_short_kv_head_dim_ok", &lyra::attention_short_kv_head_dim_ok,
        "Whether attention_short_kv has a kernel for head dim D.", py::arg("D"));
  m.def("attention_short_kv_max_keys", &lyra::attention_short_kv_max_keys,
        "The most keys attention_short_kv takes.");

  m.def("quantize_rows", &lyra::quantize_rows, release(),
        "Per-row quantisation: xs = x * inv_smooth (if not 0), scale[m] = max(amax|xs[m]| / QMAX, "
        "1e-12), q[m, k] = quant(xs * (1 / scale[m])); kind 0 fp8 e4m3 (QMAX 448, RNE, saturating), "
        "1 int8 (QMAX 127, round half even). x (M, K) with row stride ld_x; q (M, K) "
        "contiguous bytes; scale (M,) and inv_smooth (K,) float32.",
        py::arg("x"), py::arg("inv_smooth"), py::arg("q"), py::arg("scale"), py::arg("M"),
        py::arg("K"), py::arg("ld_x"), py::arg("dtype"), py::arg("kind"), py::arg("stream"));

  m.def("norm_modulate_quant", &lyra::norm_modulate_quant, release(),
        "norm_modulate, rounded to dtype, then quantize_rows of that row into q (rows, D) + "
        "scale (rows,) (y is not written).",
        py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("mul"), py::arg("add"),
        py::arg("inv_smooth"), py::arg("q"), py::arg("scale"), py::arg("rows"), py::arg("D"),
        py::arg("rows_per_batch"), py::arg("mul_bstride"), py::arg("add_bstride"),
        py::arg("eps"), py::arg("rms"), py::arg("kind"), py::arg("dtype"), py::arg("stream"),
        py::arg("mul_offset") = 0.0);

  m.def("gemm_fp8", &lyra::gemm_fp8, release(),
        "out(M, N) = (a @ b^T) * a_scale[m] * b_scale[n] (+ bias[n]); a (M, K; row stride lda), "
        "b (N, K) fp8 e4m3, scales float32, bias in out_dtype (not with float32 out). cuBLASLt "
        "OUTER_VEC_32F scaling: check gemm_fp8_supported_outer_vec first. K, lda multiples of "
        "16, 16-byte aligned pointers and output row pitch.",
        py::arg("a"), py::arg("b"), py::arg("a_scale"), py::arg("b_scale"), py::arg("bias"),
        py::arg("out"), py::arg("M"), py::arg("N"), py::arg("K"), py::arg("lda"), py::arg("ldo"),
        py::arg("out_dtype"), py::arg("stream"));

  m.def("gemm_fp8_ex", &lyra::gemm_fp8_ex, release(),
        "gemm_fp8 with fp16/bf16 out + residual (M, N; row stride ldo, 0 = none) added through "
        "cuBLASLt's C (beta = 1), and optionally fast fp8 accumulation. A gated residual "
        "r + g * (x W^T + b) is b_scale * g, bias * g, residual r. epi = 1: GELU(tanh) of the "
        "scaled sum + bias in cuBLASLt's epilogue (no residual then); raises where cuBLASLt has "
        "no such fp8 algorithm.",
        py::arg("a"), py::arg("b"), py::arg("a_scale"), py::arg("b_scale"), py::arg("bias"),
        py::arg("residual"), py::arg("out"), py::arg("M"), py::arg("N"), py::arg("K"), py::arg("lda"),
        py::arg("ldo"), py::arg("out_dtype"), py::arg("fast_accum"), py::arg("stream"),
        py::arg("epi") = 0);

  m.def("gemm_fp8_unscaled", &lyra::gemm_fp8_unscaled, release(),
        "out_f32(M, N) = a @ b^T (fp8 e4m3 in, float32 out, no scales): the fallback where "
        "OUTER_VEC scaling is unavailable; apply scales with scaled_epilogue(acc_dtype=0).",
        py::arg("a"), py::arg("b"), py::arg("out_f32"), py::arg("M"), py::arg("N"), py::arg("K"),
        py::arg("lda"), py::arg("stream"));

  m.def("gemm_int8", &lyra::gemm_int8, release(),
        "out_i32(M, N) = a @ b^T with int8 a (M, K; row stride lda), b (N, K) and exact int32 "
        "sums; K and lda multiples of 4. Apply scales with scaled_epilogue(acc_dtype=3).",
        py::arg("a"), py::arg("b"), py::arg("out_i32"), py::arg("M"), py::arg("N"), py::arg("K"),
        py::arg("lda"), py::arg("stream"));

  m.def("gemm_fp8_supported_outer_vec", &lyra::gemm_fp8_supported_outer_vec, release(),
        "Whether gemm_fp8 (cuBLASLt OUTER_VEC_32F scales) works on this device for out_dtype "
        "(-1: both float16 and bfloat16), checked once per device by running a small GEMM and "
        "verifying its numbers; cached. Allocates on its first call: not during graph capture.",
        py::arg("device"), py::arg("out_dtype") = -1);

  m.def("scaled_epilogue", &lyra::scaled_epilogue, release(),
        "out = linear_epilogue chain of y = acc * a_scale[m] * b_scale[col] (+ bias[col]); acc "
        "(M, N_y) float32 (acc_dtype 0) or int32 (3); out, bias, gate, residual in out_dtype.",
        py::arg("acc"), py::arg("acc_dtype"), py::arg("a_scale"), py::arg("b_scale"),
        py::arg("bias"), py::arg("gate"), py::arg("residual"), py::arg("out"), py::arg("M"),
        py::arg("N_out"), py::arg("act"), py::arg("glu"), py::arg("rows_per_batch"),
        py::arg("gate_bstride"), py::arg("out_dtype"), py::arg("stream"));

  m.def("linear_epilogue_quant", &lyra::linear_epilogue_quant, release(),
        "linear_epilogue / scaled_epilogue chain rounded to out_dtype, then quantised per row "
        "(optional inv_smooth) into q (M, N_out) + scale (M,) instead of stored. acc_dtype 1/2 "
        "(== out_dtype, no scales), 0 (scales optional) or 3 (scales required).",
        py::arg("acc"), py::arg("acc_dtype"), py::arg("a_scale"), py::arg("b_scale"),
        py::arg("bias"), py::arg("gate"), py::arg("residual"), py::arg("inv_smooth"),
        py::arg("q"), py::arg("scale"), py::arg("M"), py::arg("N_out"), py::arg("act"),
        py::arg("glu"), py::arg("rows_per_batch"), py::arg("gate_bstride"),
        py::arg("out_dtype"), py::arg("kind"), py::arg("stream"));
  m.def("set_act_quant_kernel", &lyra::set_act_quant_kernel, py::arg("enabled"),
        "linear_epilogue_quant's kernel for a 16-bit accumulator without scales, bias, gate or "
        "residual (act / GLU as template parameters, loads first): on (default) or off (the "
        "generic kernel for every call; same bits). Process-wide; returns the previous setting. "
        "For tests and kernels_bench.");
}
