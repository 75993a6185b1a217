// Linear-layer kernels alone on the GPU: every configuration of include/afs/kernels/cuda/linear.cuh
// on the OLMo-2-7B projection shapes, for a range of token counts M. Prints time, weight
// bandwidth and math rate per (shape, M, config), checked against a float32 reference first.
//
//   nvcc -std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a -I include benchmarks/linear_bench.cu \
//        -lcublas -o /tmp/linear_bench
//   /tmp/linear_bench check      correctness only (tests/test_gpu_kernels.py): every kernel and every
//                                sm90a tile shape x split, both epilogues, odd and 7B shapes, M = 1-777;
//                                exit status 1 on any mismatch (add -DAFS_NO_CUBLAS to build without cuBLAS)
//   /tmp/linear_bench [M ...] [candidates] [plans]
//     candidates: other mma.sync prefill tilings too
//     plans: every sm90a tile shape x K split for each (shape, M), fastest first (tunes sm90::plan)
//   /tmp/linear_bench profile SHAPE M   the launches benchmarks/profile_linear.sh profiles
//
// Weights are cycled through several copies (more bytes than L2 holds) so each call streams from
// HBM, as in a real forward pass. cuBLAS (bf16 in, float32 out, float32 accumulation) runs on the
// same shapes in the same process as the peer; the output is poisoned (NaN) before every check.
// For gate_up the SwiGLU epilogue is checked too (against silu(gate) * up of the reference).
#if __has_include(<cublas_v2.h>) && !defined(AFS_NO_CUBLAS)
#include <cublas_v2.h>
#define HAVE_CUBLAS 1
#endif

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "afs/kernels/cuda/linear.cuh"

using namespace afs::cuda;
using T = __nv_bfloat16;

namespace {

__global__ void fill(T* p, size_t n, uint32_t seed, float scale) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    uint32_t h = static_cast<uint32_t>(i) * 2654435761u ^ seed;
    h ^= h >> 15, h *= 2246822519u, h ^= h >> 13;
    p[i] = __float2bfloat16(scale * ((h & 0xFFFF) / 32768.f - 1.f));
  }
}

__global__ void reference(const T* x, const T* w, int M, int N, int K, float* y) {
  const int n = blockIdx.x * blockDim.x + threadIdx.x, m = blockIdx.y;
  if (n >= N) return;
  float acc = 0.f;
  for (int k = 0; k < K; ++k) acc += __bfloat162float(x[size_t(m) * K + k]) * __bfloat162float(w[size_t(n) * K + k]);
  y[size_t(m) * N + n] = acc;
}

// Other tilings of the prefill GEMM, measured beside the one linear() uses (`candidates` argument).
using GemmFn = void (*)(const T*, const T*, int, int, int, int, float*, int, T*);
struct Candidate {
  const char* name;
  GemmFn kernel;
  int bm, bn, threads, smem;
  bool skinny;  // for <= 64 rows, else for >= 256
};
using afs::cuda::gemm::kSmemBytes;
const Candidate kCandidates[] = {
    {"128x128x32s4", linear_gemm_mma<T, 128, 128, 32, 2, 4, 4, kStore>, 128, 128, 256, kSmemBytes<128, 128, 32, 4>, false},
    {"128x256x32s3", linear_gemm_mma<T, 128, 256, 32, 2, 4, 3, kStore>, 128, 256, 256, kSmemBytes<128, 256, 32, 3>, false},
    {"256x128x32s3", linear_gemm_mma<T, 256, 128, 32, 4, 2, 3, kStore>, 256, 128, 256, kSmemBytes<256, 128, 32, 3>, false},
    {"128x128x64s3", linear_gemm_mma<T, 128, 128, 64, 2, 4, 3, kStore>, 128, 128, 256, kSmemBytes<128, 128, 64, 3>, false},
    {"16x128x64s4", linear_gemm_mma<T, 16, 128, 64, 1, 4, 4, kStore>, 16, 128, 128, kSmemBytes<16, 128, 64, 4>, true},
    {"32x128x64s4", linear_gemm_mma<T, 32, 128, 64, 2, 2, 4, kStore>, 32, 128, 128, kSmemBytes<32, 128, 64, 4>, true},
    {"64x128x64s3", linear_gemm_mma<T, 64, 128, 64, 2, 2, 3, kStore>, 64, 128, 128, kSmemBytes<64, 128, 64, 3>, true},
};
constexpr int kNumCandidates = sizeof(kCandidates) / sizeof(kCandidates[0]);

struct Shape {
  const char* name;
  int N, K;
};

double max_rel(const std::vector<float>& a, const std::vector<float>& b) {
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) num += (a[i] - b[i]) * double(a[i] - b[i]), den += double(b[i]) * b[i];
  return std::sqrt(num / (den + 1e-30));
}

// Runs f with the TMA-store epilogues on or off (on: the SwiGLU one at every row count, whatever
// the engine's dispatch rule), then restores the settings.
template <class F>
void with_tma_store(bool on, F&& f) {
  const bool was = tma_store_enabled(), all_rows = swiglu_tma_all_rows();
  tma_store_enabled() = on;
  swiglu_tma_all_rows() = on;
  f();
  tma_store_enabled() = was;
  swiglu_tma_all_rows() = all_rows;
}

// Correctness of every path linear() can take, against the float32 reference, with outputs
// poisoned (NaN) before each run. Returns the number of mismatches.
int check_all(cudaStream_t s) {
  // The TMA-store epilogue is checked whatever AFS_CUDA_GEMM_TMA_STORE says (where it can run).
  const bool tma_store_available = tma_store_fits();
  tma_store_enabled() = false;
  struct CheckShape {
    const char* name;
    int N, K;
    std::vector<int> Ms;
  };
  const std::vector<int> odd = {1, 2, 3, 4, 5, 7, 8, 9, 16, 33, 64, 65, 127, 128, 129, 300, 777};
  const std::vector<int> big = {1, 5, 8, 9, 64, 65, 300};
  const CheckShape shapes[] = {
      {"768x256", 768, 256, odd},     {"256x200", 256, 200, odd},  // K not a multiple of 64
      {"400x256", 400, 256, odd},     {"448x320", 448, 320, odd},  // N not a multiple of 64
      {"qkv", 12288, 4096, big},      {"down", 4096, 11008, big},  {"lm_head", 100352, 4096, {1, 8, 9, 130}},
  };
  int checks = 0, failed = 0;
  for (const CheckShape& sh : shapes) {
    int max_m = 0;
    for (int m : sh.Ms) max_m = std::max(max_m, m);
    T *w, *x, *act;
    float *y, *yref;
    AFS_CUDA_CHECK(cudaMalloc(&w, size_t(sh.N) * sh.K * 2));
    AFS_CUDA_CHECK(cudaMalloc(&x, size_t(max_m) * sh.K * 2));
    AFS_CUDA_CHECK(cudaMalloc(&y, size_t(max_m) * sh.N * 4 * 4));  // room for 4 K-split planes
    AFS_CUDA_CHECK(cudaMalloc(&yref, size_t(max_m) * sh.N * 4));
    AFS_CUDA_CHECK(cudaMalloc(&act, size_t(max_m) * sh.N));
    fill<<<1024, 256, 0, s>>>(w, size_t(sh.N) * sh.K, 7u, 0.05f);
    fill<<<1024, 256, 0, s>>>(x, size_t(max_m) * sh.K, 11u, 1.f);
    for (int M : sh.Ms) {
      reference<<<dim3((sh.N + 255) / 256, M), 256, 0, s>>>(x, w, M, sh.N, sh.K, yref);
      std::vector<float> ref(size_t(M) * sh.N), got(ref.size());
      AFS_CUDA_CHECK(cudaMemcpy(ref.data(), yref, ref.size() * 4, cudaMemcpyDeviceToHost));
      const int I = sh.N / 2;
      std::vector<float> ref_act(size_t(M) * I), got_act(ref_act.size());
      for (int m = 0; m < M; ++m)
        for (int j = 0; j < I; ++j) {
          const float g = ref[size_t(m) * sh.N + 2 * j], u = ref[size_t(m) * sh.N + 2 * j + 1];
          ref_act[size_t(m) * I + j] = g / (1.f + std::exp(-g)) * u;
        }
      // kind 0: y float32; 1: SwiGLU into act; 2: y in the 16-bit type (y's memory read as T);
      // 3: y float32 in n_planes K-split planes of M x N, summed here.
      int n_planes = 1;
      // same_as_last: the output must also equal the previous check's bit for bit (an epilogue
      // that only moves the same values differently).
      std::vector<float> last;
      auto verify = [&](const std::string& name, int kind, auto&& run, bool same_as_last = false) {
        const bool swiglu = kind == 1;
        AFS_CUDA_CHECK(cudaMemsetAsync(y, 0xFF, size_t(M) * sh.N * 4 * 4, s));
        AFS_CUDA_CHECK(cudaMemsetAsync(act, 0xFF, size_t(M) * I * 2, s));
        run();
        AFS_CUDA_CHECK(cudaStreamSynchronize(s));
        double err;
        if (kind == 3) {
          std::vector<float> all(got.size() * n_planes);
          AFS_CUDA_CHECK(cudaMemcpy(all.data(), y, all.size() * 4, cudaMemcpyDeviceToHost));
          for (size_t i = 0; i < got.size(); ++i) {
            got[i] = 0.f;
            for (int p = 0; p < n_planes; ++p) got[i] += all[p * got.size() + i];
          }
          err = max_rel(got, ref);
        } else if (kind == 2) {
          std::vector<T> a(got.size());
          AFS_CUDA_CHECK(cudaMemcpy(a.data(), y, a.size() * 2, cudaMemcpyDeviceToHost));
          for (size_t i = 0; i < a.size(); ++i) got[i] = __bfloat162float(a[i]);
          err = max_rel(got, ref);
        } else if (swiglu) {
          std::vector<T> a(got_act.size());
          AFS_CUDA_CHECK(cudaMemcpy(a.data(), act, a.size() * 2, cudaMemcpyDeviceToHost));
          for (size_t i = 0; i < a.size(); ++i) got_act[i] = __bfloat162float(a[i]);
          err = max_rel(got_act, ref_act);
        } else {
          AFS_CUDA_CHECK(cudaMemcpy(got.data(), y, got.size() * 4, cudaMemcpyDeviceToHost));
          err = max_rel(got, ref);
        }
        const std::vector<float>& out = swiglu ? got_act : got;
        if (same_as_last && !(out.size() == last.size() &&
                              std::memcmp(out.data(), last.data(), out.size() * sizeof(float)) == 0)) {
          ++checks, ++failed;
          std::printf("WRONG %-8s M=%-4d %-28s differs from the check before it\n", sh.name, M, name.c_str());
          return;
        }
        last = out;
        ++checks;
        // float32 accumulation: ~1e-5; the SwiGLU and 16-bit outputs are rounded to bf16: ~2e-3.
        const double tol = kind != 0 ? 1e-2 : 1e-4;
        if (!(err <= tol)) {
          ++failed;
          std::printf("WRONG %-8s M=%-4d %-28s rel err %.2e (tolerance %.0e)\n", sh.name, M, name.c_str(), err, tol);
        }
      };
      verify("linear()", false, [&] { linear<T>(x, M, sh.K, w, sh.N, y, sh.N, s); });
      verify("linear() 16-bit out", 2, [&] { linear<T>(x, M, sh.K, w, sh.N, reinterpret_cast<T*>(y), sh.N, s); });
      verify("linear_planes()", 3, [&] {
        n_planes = linear_planes<T>(x, M, sh.K, w, sh.N, y, long(M) * sh.N, 4, s);
      });
      if (sh.N % 2 == 0) verify("linear_swiglu()", true, [&] { linear_swiglu<T>(x, M, sh.K, w, I, act, s); });
      if (M <= kGemvMaxRows) {
        verify("gemv", false, [&] { linear_gemv_launch<T, kStore>(x, M, sh.K, w, sh.N, y, sh.N, act, s); });
        // each row split over 1, 2 and 4 warps, whatever gemv_k_split picks for this shape
        verify("gemv KS1", false, [&] { linear_gemv_launch_ks<T, kStore, 1>(x, M, sh.K, w, sh.N, y, sh.N, act, s); });
        verify("gemv KS2", false, [&] { linear_gemv_launch_ks<T, kStore, 2>(x, M, sh.K, w, sh.N, y, sh.N, act, s); });
        verify("gemv KS4", false, [&] { linear_gemv_launch_ks<T, kStore, 4>(x, M, sh.K, w, sh.N, y, sh.N, act, s); });
      }
      verify("mma 64x64", false, [&] {
        launch(gemm_small<T, kStore>, dim3((sh.N + 63) / 64, (M + 63) / 64, 1), dim3(128), kSmallSmem, s, x, w, M,
               sh.N, sh.K, sh.K, y, sh.N, act);
      });
      verify("mma 64x64 16-bit out", 2, [&] {
        launch(gemm_small<T, kStore, T>, dim3((sh.N + 63) / 64, (M + 63) / 64, 1), dim3(128), kSmallSmem, s, x, w, M,
               sh.N, sh.K, sh.K, reinterpret_cast<T*>(y), sh.N, act);
      });
      if (large_tiles_fit())
        verify("mma 128x128", false, [&] {
          launch(gemm_large<T, kStore>, dim3((sh.N + 127) / 128, (M + 127) / 128, 1), dim3(256), kLargeSmem, s, x,
                 w, M, sh.N, sh.K, sh.K, y, sh.N, act);
        });
      if (!wgmma_enabled()) continue;
      for (const sm90::TileShape& ts : sm90::kTileShapes)
        for (int splits : {1, 2, 3}) {
          const sm90::Plan p = sm90::make_plan(ts.bm, ts.bn, splits, sh.K);
          if (p.splits != splits) continue;
          const std::string name = "wgmma " + std::to_string(ts.bm) + "x" + std::to_string(ts.bn) + " split " +
                                   std::to_string(splits);
          verify(name, false, [&] { linear_wgmma_plan<T, kStore>(p, x, M, sh.K, w, sh.N, y, sh.N, nullptr, s); });
          if (splits > 1) {
            n_planes = splits;
            verify(name + " planes", 3, [&] {
              linear_wgmma_plan<T, kStore>(p, x, M, sh.K, w, sh.N, y, sh.N, nullptr, s, long(M) * sh.N);
            });
          }
          if (splits == 1) {
            auto out16 = [&] {
              linear_wgmma_plan<T, kStore>(p, x, M, sh.K, w, sh.N, reinterpret_cast<T*>(y), sh.N, nullptr, s);
            };
            verify(name + " 16-bit out", 2, out16);
            if (tma_store_available)
              with_tma_store(true, [&] { verify(name + " 16-bit out TMA store", 2, out16, true); });
          }
          if (splits == 1 && sh.N % 2 == 0) {
            auto swiglu = [&] {
              linear_wgmma_plan<T, kSwiGLU>(p, x, M, sh.K, w, sh.N, static_cast<float*>(nullptr), I, act, s);
            };
            verify(name + " swiglu", true, swiglu);
            if (tma_store_available && ts.bn >= 128)
              with_tma_store(true, [&] { verify(name + " swiglu TMA store", true, swiglu, true); });
          }
        }
    }
    cudaFree(w), cudaFree(x), cudaFree(y), cudaFree(yref), cudaFree(act);
  }
  std::printf("%d checks, %d failed (sm90a GEMM %s)\n", checks, failed, wgmma_enabled() ? "on" : "off");
  return failed;
}

}  // namespace

// The shared memory the sm90a GEMM's timing-only variants (no stores, loads only) need, for every
// tile shape (linear_setup does this for the engine's own variants).
void allow_bench_variants() {
  for (const auto& ts : sm90::kTileShapes)
    sm90::with_config(ts.bm, ts.bn, [&](auto c) {
      using C = decltype(c);
      AFS_CUDA_CHECK(cudaFuncSetAttribute(sm90::gemm_wgmma<T, C::kBM, C::kBN, C::kStages, kBenchNoStore>,
                                          cudaFuncAttributeMaxDynamicSharedMemorySize, C::kSmem));
      AFS_CUDA_CHECK(cudaFuncSetAttribute(sm90::gemm_wgmma<T, C::kBM, C::kBN, C::kStages, kBenchLoadsOnly>,
                                          cudaFuncAttributeMaxDynamicSharedMemorySize, C::kSmem));
    });
}

// Nothing checked or timed: the launches a profiler attaches to (benchmarks/profile_linear.sh). For
// the projection `shape` at M rows, plan()'s configuration as the engine runs it at 16-bit outputs
// (TMA-store epilogue; SwiGLU for gate_up), then without the epilogue's stores, then the loads
// alone: each twice, the first on a cold weight copy, the second on another.
int profile_linear(const std::string& shape, int M) {
  const struct { const char* name; int N, K; } shapes[] = {
      {"qkv", 12288, 4096}, {"o_proj", 4096, 4096}, {"gate_up", 22016, 4096}, {"down", 4096, 11008}};
  int N = 0, K = 0;
  for (const auto& sh : shapes)
    if (shape == sh.name) N = sh.N, K = sh.K;
  if (N == 0 || M < 1) {
    std::fprintf(stderr, "profile: shape is one of qkv, o_proj, gate_up, down; M >= 1\n");
    return 2;
  }
  linear_setup<T>();
  if (!wgmma_enabled()) {
    std::fprintf(stderr, "profile: no sm90a GEMM on this GPU\n");
    return 1;
  }
  allow_bench_variants();
  cudaStream_t s;
  AFS_CUDA_CHECK(cudaStreamCreate(&s));
  T *w[2], *x, *y, *act;
  for (auto& p : w) {
    AFS_CUDA_CHECK(cudaMalloc(&p, size_t(N) * K * 2));
    fill<<<1024, 256, 0, s>>>(p, size_t(N) * K, 7u, 0.05f);
  }
  AFS_CUDA_CHECK(cudaMalloc(&x, size_t(M) * K * 2));
  AFS_CUDA_CHECK(cudaMalloc(&y, size_t(M) * N * 2));
  AFS_CUDA_CHECK(cudaMalloc(&act, size_t(M) * N));
  fill<<<1024, 256, 0, s>>>(x, size_t(M) * K, 11u, 1.f);
  const bool swiglu = shape == "gate_up";
  const sm90::Plan p = sm90::plan(M, N, K, false, sm_count());
  for (int variant = 0; variant < 3; ++variant)
    for (int rep = 0; rep < 2; ++rep) {
      if (variant == 0 && swiglu)
        with_tma_store(true, [&] {
          linear_wgmma_plan<T, kSwiGLU>(p, x, M, K, w[rep], N, static_cast<float*>(nullptr), N / 2, act, s);
        });
      else if (variant == 0)
        with_tma_store(true, [&] { linear_wgmma_plan<T, kStore>(p, x, M, K, w[rep], N, y, N, nullptr, s); });
      else if (variant == 1)
        linear_wgmma_plan<T, kBenchNoStore>(p, x, M, K, w[rep], N, reinterpret_cast<float*>(y), N, nullptr, s);
      else
        linear_wgmma_plan<T, kBenchLoadsOnly>(p, x, M, K, w[rep], N, reinterpret_cast<float*>(y), N, nullptr, s);
      AFS_CUDA_CHECK(cudaStreamSynchronize(s));
    }
  std::printf("profiled %s at %d rows: %d x %d tiles, %d split(s); launches: %s, no stores, loads only (x2 each)\n",
              shape.c_str(), M, p.bm, p.bn, p.splits, swiglu ? "SwiGLU TMA" : "16-bit TMA");
  return 0;
}

int main(int argc, char** argv) {
  if (argc > 1 && std::string(argv[1]) == "profile")
    return profile_linear(argc > 2 ? argv[2] : "qkv", argc > 3 ? std::atoi(argv[3]) : 384);
  if (argc > 1 && std::string(argv[1]) == "check") {
    linear_setup<T>();
    planes_enabled() = true;  // check linear_planes' own choices too, whatever AFS_CUDA_GEMM_PLANES says
    cudaStream_t s;
    AFS_CUDA_CHECK(cudaStreamCreate(&s));
    return check_all(s) ? 1 : 0;
  }
  std::vector<int> Ms = {1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 2048};
  bool candidates = false, plans = false;
  if (argc > 1) {
    Ms.clear();
    for (int i = 1; i < argc; ++i) {
      if (std::string(argv[i]) == "candidates") candidates = true;
      else if (std::string(argv[i]) == "plans") plans = true;
      else Ms.push_back(std::atoi(argv[i]));
    }
    if (Ms.empty()) Ms = {256, 512, 2048};
  }
  const Shape shapes[] = {{"qkv", 12288, 4096}, {"o_proj", 4096, 4096}, {"gate_up", 22016, 4096},
                          {"down", 4096, 11008}, {"lm_head", 100352, 4096}};
  linear_setup<T>();
  if (wgmma_enabled()) allow_bench_variants();
  for (const Candidate& c : kCandidates)
    AFS_CUDA_CHECK(cudaFuncSetAttribute(c.kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, c.smem));
  cudaStream_t s;
  AFS_CUDA_CHECK(cudaStreamCreate(&s));
#ifdef HAVE_CUBLAS
  cublasHandle_t blas;
  if (cublasCreate(&blas) != CUBLAS_STATUS_SUCCESS) return 1;
  cublasSetStream(blas, s);
#endif
  int max_m = 0;
  for (int m : Ms) max_m = std::max(max_m, m);
  cudaDeviceProp prop;
  AFS_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  std::printf("%s, %d SMs, L2 %d MB; programmatic launch %s\n", prop.name, prop.multiProcessorCount,
              prop.l2CacheSize >> 20, pdl_enabled() ? "on" : "off");
  std::printf("%-8s %5s %-12s %9s %8s %9s %9s\n", "shape", "M", "config", "us", "TB/s", "TFLOP/s", "rel err");
  for (const Shape& sh : shapes) {
    const size_t wn = size_t(sh.N) * sh.K;
    const int copies = std::max<int>(2, int((200ull << 20) / (wn * 2)) + 1);  // > 200 MB cycled
    std::vector<T*> ws(copies);
    for (auto& w : ws) {
      AFS_CUDA_CHECK(cudaMalloc(&w, wn * 2));
      fill<<<1024, 256, 0, s>>>(w, wn, 7u, 0.05f);
    }
    T* x;
    float *y, *yref;
    T* act;
    AFS_CUDA_CHECK(cudaMalloc(&x, size_t(max_m) * sh.K * 2));
    AFS_CUDA_CHECK(cudaMalloc(&y, size_t(max_m) * sh.N * 4));
    AFS_CUDA_CHECK(cudaMalloc(&yref, size_t(max_m) * sh.N * 4));
    AFS_CUDA_CHECK(cudaMalloc(&act, size_t(max_m) * sh.N));
    fill<<<1024, 256, 0, s>>>(x, size_t(max_m) * sh.K, 11u, 1.f);
    for (int M : Ms) {
      reference<<<dim3((sh.N + 255) / 256, M), 256, 0, s>>>(x, ws[0], M, sh.N, sh.K, yref);
      std::vector<float> ref(size_t(M) * sh.N), got(ref.size());
      AFS_CUDA_CHECK(cudaMemcpy(ref.data(), yref, ref.size() * 4, cudaMemcpyDeviceToHost));
      // run(w)'s error against the reference (the output poisoned with NaN first, so unwritten
      // outputs fail), then its time in us: a pass over every weight copy, then 20 timed calls.
      auto check_and_time = [&](auto&& run) {
        AFS_CUDA_CHECK(cudaMemsetAsync(y, 0xFF, size_t(M) * sh.N * 4, s));
        run(ws[0]);
        AFS_CUDA_CHECK(cudaStreamSynchronize(s));
        AFS_CUDA_CHECK(cudaMemcpy(got.data(), y, got.size() * 4, cudaMemcpyDeviceToHost));
        const double err = max_rel(got, ref);
        constexpr int reps = 20;
        cudaEvent_t a, b;
        AFS_CUDA_CHECK(cudaEventCreate(&a));
        AFS_CUDA_CHECK(cudaEventCreate(&b));
        for (int i = 0; i < copies; ++i) run(ws[i]);
        AFS_CUDA_CHECK(cudaEventRecord(a, s));
        for (int i = 0; i < reps; ++i) run(ws[i % copies]);
        AFS_CUDA_CHECK(cudaEventRecord(b, s));
        AFS_CUDA_CHECK(cudaEventSynchronize(b));
        float ms = 0;
        AFS_CUDA_CHECK(cudaEventElapsedTime(&ms, a, b));
        cudaEventDestroy(a), cudaEventDestroy(b);
        return std::pair<double, double>(err, 1e3 * ms / reps);
      };
      struct Cfg {
        const char* name;
        int kind;  // 0 gemv, 1 small, 2 large, 3 dispatch (linear()), -1 wgmma, -2 cuBLAS,
                   // -3 / -4 / -5 / -6 / -7 / -8 wgmma (plan()'s choice) without stores / loads only /
                   // 16-bit out / 16-bit out through TMA stores / SwiGLU / SwiGLU through TMA stores
      };
      std::vector<Cfg> cfgs = {Cfg{"gemv", 0}, Cfg{"small", 1}, Cfg{"large", 2}};
#ifdef HAVE_CUBLAS
      cfgs.insert(cfgs.begin(), Cfg{"cublas", -2});
#endif
      if (wgmma_enabled()) cfgs.push_back(Cfg{"wgmma", -1});
      // Where the sm90a GEMM's time goes (timings only, nothing is stored): its 16-bit output
      // (the prefill steps' qkv, o and down), no epilogue stores, and the TMA pipeline alone.
      if (wgmma_enabled() && M >= 128) {
        cfgs.push_back(Cfg{"wgmma 16-bit", -5});
        cfgs.push_back(Cfg{"wgmma 16b TMA", -6});
        cfgs.push_back(Cfg{"wgmma nostore", -3});
        cfgs.push_back(Cfg{"wgmma loads", -4});
        if (std::string(sh.name) == "gate_up") {  // the SwiGLU epilogue (prefill's gate_up), stored directly / by TMA
          cfgs.push_back(Cfg{"wgmma swiglu", -7});
          cfgs.push_back(Cfg{"wgmma swiglu TMA", -8});
        }
      }
      cfgs.push_back(Cfg{"linear()", 3});
      for (int c = 0; c < kNumCandidates; ++c) cfgs.push_back(Cfg{kCandidates[c].name, 4 + c});
      for (Cfg cfg : cfgs) {
        if (cfg.kind == 0 && M > kGemvMaxRows) continue;
        if (cfg.kind == 1 && M > 512) continue;
        if (cfg.kind >= 4 && (!candidates || (kCandidates[cfg.kind - 4].skinny ? M > 64 : M < 256))) continue;
        auto run = [&](const T* w) {
          if (cfg.kind == -2) {
#ifdef HAVE_CUBLAS
            // y^T[N, M] = W[N, K] . x^T: column-major, W is K x N transposed, x is K x M.
            const float one = 1.f, zero = 0.f;
            const cublasStatus_t st = cublasGemmEx(blas, CUBLAS_OP_T, CUBLAS_OP_N, sh.N, M, sh.K, &one, w, CUDA_R_16BF,
                                                   sh.K, x, CUDA_R_16BF, sh.K, &zero, y, CUDA_R_32F, sh.N,
                                                   CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
            if (st != CUBLAS_STATUS_SUCCESS) std::printf("cublasGemmEx failed: %d\n", int(st));
#endif
          } else if (cfg.kind == -1) {
            linear_wgmma<T, kStore>(x, M, sh.K, w, sh.N, y, sh.N, nullptr, s);
          } else if (cfg.kind <= -3) {
            const sm90::Plan p = sm90::plan(M, sh.N, sh.K, cfg.kind > -5, sm_count());
            if (cfg.kind == -7 || cfg.kind == -8)
              with_tma_store(cfg.kind == -8, [&] {
                linear_wgmma_plan<T, kSwiGLU>(p, x, M, sh.K, w, sh.N, static_cast<float*>(nullptr), sh.N / 2, act, s);
              });
            else if (cfg.kind == -5 || cfg.kind == -6)
              with_tma_store(cfg.kind == -6, [&] {
                linear_wgmma_plan<T, kStore>(p, x, M, sh.K, w, sh.N, reinterpret_cast<T*>(y), sh.N, nullptr, s);
              });
            else if (cfg.kind == -3)
              linear_wgmma_plan<T, kBenchNoStore>(p, x, M, sh.K, w, sh.N, y, sh.N, nullptr, s);
            else
              linear_wgmma_plan<T, kBenchLoadsOnly>(p, x, M, sh.K, w, sh.N, y, sh.N, nullptr, s);
          } else if (cfg.kind == 3) {
            linear<T>(x, M, sh.K, w, sh.N, y, sh.N, s);
          } else if (cfg.kind == 0) {
            linear_gemv_launch<T, kStore>(x, M, sh.K, w, sh.N, y, sh.N, act, s);
          } else if (cfg.kind == 1) {
            launch(gemm_small<T, kStore>, dim3((sh.N + 63) / 64, (M + 63) / 64, 1), dim3(128), kSmallSmem, s, x, w, M,
                   sh.N, sh.K, sh.K, y, sh.N, act);
          } else if (cfg.kind == 2) {
            launch(gemm_large<T, kStore>, dim3((sh.N + 127) / 128, (M + 127) / 128, 1), dim3(256), kLargeSmem, s, x, w,
                   M, sh.N, sh.K, sh.K, y, sh.N, act);
          } else {
            const Candidate& c = kCandidates[cfg.kind - 4];
            launch(c.kernel, dim3((sh.N + c.bn - 1) / c.bn, (M + c.bm - 1) / c.bm, 1), dim3(c.threads), c.smem, s, x, w, M,
                   sh.N, sh.K, sh.K, y, sh.N, act);
          }
        };
        const auto [err, us] = check_and_time(run);
        if (cfg.kind <= -3) {  // timings only: y is not (or not as float32) written
          std::printf("%-8s %5d %-12s %9.1f %8.2f %9.1f %9s\n", sh.name, M, cfg.name, us, wn * 2 / us / 1e6,
                      2.0 * M * wn / us / 1e6, "-");
          continue;
        }
        std::printf("%-8s %5d %-12s %9.1f %8.2f %9.1f %9.1e%s\n", sh.name, M, cfg.name, us, wn * 2 / us / 1e6,
                    2.0 * M * wn / us / 1e6, err, err > 1e-2 || !(err == err) ? "  WRONG" : "");
      }
      if (plans && wgmma_enabled()) {
        // Every tile shape and split, timed like the configurations above; the five fastest and
        // the one sm90::plan picks.
        struct Timed {
          sm90::Plan p;
          double us, err;
        };
        std::vector<Timed> all;
        const sm90::Plan chosen = sm90::plan(M, sh.N, sh.K, true, sm_count());
        for (const sm90::TileShape& ts : sm90::kTileShapes)
          for (int splits : {1, 2, 3, 4, 6, 8}) {
            if (ts.bm == 128 && M <= 32) continue;
            const sm90::Plan p = sm90::make_plan(ts.bm, ts.bn, splits, sh.K);
            if (p.splits != splits) continue;
            const auto [err, us] = check_and_time(
                [&](const T* w) { linear_wgmma_plan<T, kStore>(p, x, M, sh.K, w, sh.N, y, sh.N, nullptr, s); });
            all.push_back(Timed{p, us, err});
          }
        std::sort(all.begin(), all.end(), [](const Timed& a, const Timed& b) { return a.us < b.us; });
        for (size_t i = 0; i < all.size(); ++i) {
          const Timed& t = all[i];
          const bool is_chosen = t.p.bm == chosen.bm && t.p.bn == chosen.bn && t.p.splits == chosen.splits;
          if (i >= 5 && !is_chosen) continue;
          std::printf("plan %-8s %5d %3dx%-3d s%d %9.1f %8.2f %9.1f %9.1e%s%s\n", sh.name, M, t.p.bm, t.p.bn, t.p.splits,
                      t.us, wn * 2 / t.us / 1e6, 2.0 * M * wn / t.us / 1e6, t.err, is_chosen ? "  <- plan()" : "",
                      t.err > 1e-2 || !(t.err == t.err) ? "  WRONG" : "");
        }
      }
      if (std::string(sh.name) == "gate_up") {
        // linear_swiglu over the same weights read as interleaved (gate j, up j) rows.
        const int I = sh.N / 2;
        AFS_CUDA_CHECK(cudaMemsetAsync(act, 0xFF, size_t(M) * I * 2, s));
        linear_swiglu<T>(x, M, sh.K, ws[0], I, act, s);
        std::vector<T> got_act(size_t(M) * I);
        AFS_CUDA_CHECK(cudaMemcpy(got_act.data(), act, got_act.size() * 2, cudaMemcpyDeviceToHost));
        std::vector<float> a(got_act.size()), r(got_act.size());
        for (int m = 0; m < M; ++m)
          for (int j = 0; j < I; ++j) {
            const float g = ref[size_t(m) * sh.N + 2 * j], u = ref[size_t(m) * sh.N + 2 * j + 1];
            r[size_t(m) * I + j] = g / (1.f + std::exp(-g)) * u;
            a[size_t(m) * I + j] = __bfloat162float(got_act[size_t(m) * I + j]);
          }
        const double err = max_rel(a, r);
        std::printf("%-8s %5d %-12s %9s %8s %9s %9.1e%s\n", "swiglu", M, "linear()", "-", "-", "-", err,
                    err > 1e-2 || !(err == err) ? "  WRONG" : "");
      }
    }
    for (auto w : ws) cudaFree(w);
    cudaFree(x), cudaFree(y), cudaFree(yref), cudaFree(act);
  }
  return 0;
}
