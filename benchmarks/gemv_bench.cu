// The batch-1 GEMV alone, in shapes of work per warp: the engine's linear_gemv (one warp per
// weight row, 4 warps per block, 8 16-byte loads in flight per lane) against variants that split a
// row's K range over KS warps (partial sums added through shared memory), use WARPS warps per
// block, or keep U loads in flight per lane. On an H100 the o (4096 x 4096) and down (4096 x 11008)
// GEMVs, whose 1,024 blocks fit the GPU in one pass, stream 2.55-2.71 TB/s where gate_up
// (22016 x 4096) streams 3.05: this measures whether more, shorter warps close that gap.
//
//   nvcc -std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a -I include benchmarks/gemv_bench.cu -o /tmp/gemv_bench
//   /tmp/gemv_bench
//
// Weights are cycled through copies worth more than the L2 so every call streams from HBM; each
// variant's output is checked against the engine kernel's (float32 sums in another order: 1e-3).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <vector>

#include "afs/kernels/cuda/linear.cuh"

using namespace afs::cuda;
using T = __nv_bfloat16;

namespace {

#define CK(x)                                                                                 \
  do {                                                                                        \
    cudaError_t e_ = (x);                                                                     \
    if (e_ != cudaSuccess) {                                                                  \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_)); \
      std::exit(2);                                                                           \
    }                                                                                         \
  } while (0)

__global__ void fill(T* p, size_t n, uint32_t seed) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    uint32_t h = static_cast<uint32_t>(i) * 2654435761u ^ seed;
    h ^= h >> 15, h *= 2246822519u, h ^= h >> 13;
    p[i] = __float2bfloat16((h & 0xFFFF) / 32768.f - 1.f);
  }
}

// Row r of y is the sum of KS warps' dot products over consecutive K ranges.
template <int KS, int WARPS, int U>
__global__ void __launch_bounds__(WARPS * 32) gemv_split(const T* __restrict__ x, const T* __restrict__ w, int N, int K,
                                                         float* __restrict__ y) {
  static_assert(WARPS % KS == 0, "whole rows per block");
  constexpr int kRows = WARPS / KS;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int row = blockIdx.x * kRows + warp / KS, part = warp % KS;
  const int chunks = K / 8, per = (chunks + KS - 1) / KS;
  const int c1 = min(chunks, (part + 1) * per);
  float acc = 0.f;
  if (row < N) {
    const uint4* wr = reinterpret_cast<const uint4*>(w + static_cast<size_t>(row) * K);
    gemv_stream<T, 1, U>(wr, x, K, part * per + lane, c1, &acc);
  }
  acc = warp_sum(acc);
  if constexpr (KS == 1) {
    if (lane == 0 && row < N) y[row] = acc;
  } else {
    __shared__ float parts[WARPS];
    if (lane == 0) parts[warp] = acc;
    __syncthreads();
    const int r = blockIdx.x * kRows + threadIdx.x;
    if (threadIdx.x < kRows && r < N) {
      float s = 0.f;
#pragma unroll
      for (int k = 0; k < KS; ++k) s += parts[threadIdx.x * KS + k];
      y[r] = s;
    }
  }
}

struct Shape {
  const char* name;
  int N, K;
};

struct Variant {
  const char* name;
  void (*launch)(const T*, const T*, int, int, float*, cudaStream_t);
};

template <int KS, int WARPS, int U>
void launch_split(const T* x, const T* w, int N, int K, float* y, cudaStream_t s) {
  constexpr int kRows = WARPS / KS;
  gemv_split<KS, WARPS, U><<<(N + kRows - 1) / kRows, WARPS * 32, 0, s>>>(x, w, N, K, y);
}

void launch_engine(const T* x, const T* w, int N, int K, float* y, cudaStream_t s) {
  linear_gemv_launch<T, kStore>(x, 1, K, w, N, y, N, nullptr, s);
}

const Variant kVariants[] = {
    {"engine (KS1 W4 U8)", launch_engine},
    {"KS1 W4 U16", launch_split<1, 4, 16>},
    {"KS1 W8 U8", launch_split<1, 8, 8>},
    {"KS2 W4 U8", launch_split<2, 4, 8>},
    {"KS2 W8 U8", launch_split<2, 8, 8>},
    {"KS4 W8 U8", launch_split<4, 8, 8>},
    {"KS2 W8 U4", launch_split<2, 8, 4>},
    {"KS4 W16 U4", launch_split<4, 16, 4>},
};

}  // namespace

int main() {
  const Shape shapes[] = {{"qkv", 12288, 4096}, {"o", 4096, 4096}, {"gate_up", 22016, 4096}, {"down", 4096, 11008}};
  cudaDeviceProp prop{};
  CK(cudaGetDeviceProperties(&prop, 0));
  std::printf("%s, %d SMs, L2 %d MB\n", prop.name, prop.multiProcessorCount, prop.l2CacheSize >> 20);
  cudaStream_t st;
  CK(cudaStreamCreate(&st));
  cudaEvent_t e0, e1;
  CK(cudaEventCreate(&e0));
  CK(cudaEventCreate(&e1));
  int failures = 0;
  std::printf("%-8s %-20s %9s %8s %9s\n", "shape", "variant", "us/call", "GB/s", "err");
  for (const Shape& sh : shapes) {
    const size_t elems = size_t(sh.N) * sh.K, bytes = elems * sizeof(T);
    const int copies = static_cast<int>(std::max<size_t>(2, (size_t(prop.l2CacheSize) * 4 + bytes - 1) / bytes));
    T *w = nullptr, *x = nullptr;
    float *y = nullptr, *y_ref = nullptr;
    CK(cudaMalloc(&w, bytes * copies));
    CK(cudaMalloc(&x, sh.K * sizeof(T)));
    CK(cudaMalloc(&y, sh.N * sizeof(float)));
    CK(cudaMalloc(&y_ref, sh.N * sizeof(float)));
    fill<<<1024, 256>>>(w, elems * copies, 7);
    fill<<<64, 256>>>(x, sh.K, 11);
    CK(cudaDeviceSynchronize());
    launch_engine(x, w, sh.N, sh.K, y_ref, st);
    CK(cudaStreamSynchronize(st));
    std::vector<float> ref(sh.N), got(sh.N);
    CK(cudaMemcpy(ref.data(), y_ref, sh.N * sizeof(float), cudaMemcpyDeviceToHost));
    double scale = 0;
    for (float v : ref) scale = std::max(scale, double(std::fabs(v)));
    for (const Variant& v : kVariants) {
      CK(cudaMemset(y, 0xFF, sh.N * sizeof(float)));  // NaN: a row left unwritten shows
      v.launch(x, w, sh.N, sh.K, y, st);
      CK(cudaGetLastError());
      CK(cudaStreamSynchronize(st));
      CK(cudaMemcpy(got.data(), y, sh.N * sizeof(float), cudaMemcpyDeviceToHost));
      double err = 0;
      for (int i = 0; i < sh.N; ++i) {
        const double d = std::fabs(double(got[i]) - ref[i]);
        err = std::isnan(d) ? INFINITY : std::max(err, d / scale);
      }
      const int reps = 200;
      for (int i = 0; i < 20; ++i) v.launch(x, w + elems * (i % copies), sh.N, sh.K, y, st);
      CK(cudaEventRecord(e0, st));
      for (int i = 0; i < reps; ++i) v.launch(x, w + elems * (i % copies), sh.N, sh.K, y, st);
      CK(cudaEventRecord(e1, st));
      CK(cudaEventSynchronize(e1));
      float ms = 0;
      CK(cudaEventElapsedTime(&ms, e0, e1));
      const double us = 1e3 * ms / reps;
      const bool ok = err < 1e-3;
      failures += !ok;
      std::printf("%-8s %-20s %9.2f %8.0f %9.1e%s\n", sh.name, v.name, us, bytes / us / 1e3, err, ok ? "" : "  WRONG");
    }
    CK(cudaFree(w));
    CK(cudaFree(x));
    CK(cudaFree(y));
    CK(cudaFree(y_ref));
  }
  std::printf("%s\n", failures ? "some variants WRONG" : "all variants match the engine kernel");
  return failures ? 1 : 0;
}
