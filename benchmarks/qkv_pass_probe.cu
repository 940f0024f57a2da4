// Standalone timing of csrc qkv_quant in place over FLUX's joint q / k / v buffer (L 4608, H 24,
// D 128, bf16): 50 launches between CUDA events, then ncu can profile one launch. Builds one
// version of the kernel's source per binary, so versions are compared in one call:
//   nvcc -std=c++17 -O3 -DNDEBUG -gencode=arch=compute_90a,code=sm_90a -I. -Icsrc \
//        -DQKV_SRC='"csrc/qkv_quant.cu"' benchmarks/qkv_pass_probe.cu -o probe && ./probe
//   ncu --clock-control none -k regex:qkv_quant -c 1 -s 5 --section SpeedOfLight ./probe
#ifndef QKV_SRC
#define QKV_SRC "qkv_quant.cu"
#endif
#include QKV_SRC
#include <cstdio>
#include <vector>
int main() {
  const int64_t L = 4608, H = 24, D = 128, W = 3 * H * D;
  void *joint, *w, *cs, *sn;
  cudaMalloc(&joint, L * W * 2); cudaMalloc(&w, D * 2);
  cudaMalloc(&cs, L * D * 4); cudaMalloc(&sn, L * D * 4);
  cudaMemset(joint, 0x3c, L * W * 2); cudaMemset(w, 0x3c, D * 2);
  cudaMemset(cs, 0, L * D * 4); cudaMemset(sn, 0, L * D * 4);
  const int64_t q = reinterpret_cast<int64_t>(joint), k = q + H * D * 2;
  std::vector<int64_t> src = {q, L * W, W, D, k, L * W, W, D, 0, 0, 0, 0};
  std::vector<int64_t> dst = {q, k, 0, L * W, W, D};
  cudaEvent_t a, b; cudaEventCreate(&a); cudaEventCreate(&b);
  for (int i = 0; i < 3; ++i)
    lyra::qkv_quant(src, dst, (uintptr_t)w, (uintptr_t)w, (uintptr_t)cs, (uintptr_t)sn, 0, 1, L, H, D, 0, L, 1e-6, 2, 0);
  cudaEventRecord(a);
  for (int i = 0; i < 50; ++i)
    lyra::qkv_quant(src, dst, (uintptr_t)w, (uintptr_t)w, (uintptr_t)cs, (uintptr_t)sn, 0, 1, L, H, D, 0, L, 1e-6, 2, 0);
  cudaEventRecord(b); cudaEventSynchronize(b);
  float ms; cudaEventElapsedTime(&ms, a, b);
  printf("%s: %.2f us per pass (%.2f TB/s)\n", QKV_SRC, ms * 1000 / 50, 4.0 * L * H * D * 2 / (ms / 50 * 1e-3) / 1e12);
  printf("err %s\n", cudaGetErrorString(cudaDeviceSynchronize()));
}
