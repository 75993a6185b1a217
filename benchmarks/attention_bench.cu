// Attention kernels alone on the GPU (include/afs/kernels/cuda/attention.cuh) on the OLMo-2-7B
// shape: 32 query heads, 32 kv heads, head_dim 128, bf16 paged KV cache with 16-slot blocks.
// Checks decode (attention_decode + attention_decode_combine) and causal prefill
// (attention_prefill) against a plain float32 reference first, then times them: decode over a
// sweep of (batch, context) in GB/s of K/V read and % of a device-to-device copy measured in the
// same run, prefill in TFLOP/s.
// The sm90a prefill candidate (sm90::attention_prefill_wgmma, attention_sm90.cuh: TMA + wgmma,
// 128-row tiles) is checked and timed beside attention_prefill in the prefill table (columns
// "sm90(S,pp)": S stages, pp = ping-pong on), and checked once more on a step of several
// sequences with chunks after cached keys (pos0 > 0), GQA 40/8 and NaN in the cache slots past
// each sequence's end ("check prefill chunks", attention_prefill run beside it as the control).
// It runs only where the binary has sm_90a code for the GPU (else its columns read "n/a").
//
//   nvcc -std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a -I include benchmarks/attention_bench.cu \
//        -o /tmp/attn_bench
//   /tmp/attn_bench
//
// Same-run baseline (optional): the kernels of an earlier commit, renamed into a namespace, are
// timed beside the current ones when their header is on the include path:
//   mkdir -p /tmp/afs_attn_base && git show 0ac4da4:include/afs/kernels/cuda/attention.cuh |
//     sed 's/^namespace afs::cuda {$/namespace afs::cuda::baseline {/' >/tmp/afs_attn_base/attention_baseline.cuh
//   and add -I /tmp/afs_attn_base to the nvcc line.
//
// The decode launch mirrors model_cuda.cuh (Model::attention): the split count is computed
// from max_context (4096, the OLMo-2 default, or the context when larger), not from the actual
// context, exactly as the engine does so that a captured graph fits every position. Launches go
// through afs::cuda::launch with programmatic dependent launch on, captured in a CUDA graph of
// many calls; the K/V of consecutive calls come from different pool copies (more bytes than L2
// holds), as consecutive layers do in the engine. Outputs and partial buffers are poisoned (NaN)
// before every check; inputs are random, never zeros.
//
// Columns: "base" (when built with the baseline header), "new" (the header's default tilings),
// new(U,S) other DecodeTiling rows, new(M,Bc,B) other PrefillTiling rows. "%copy" is against the
// best plain-kernel copy of the run (2.81-2.84 TB/s on the H100 of 2026-11-27; ANCHORS.md's torch
// copy measured 3.02 TB/s, and decode attention's read-mostly stream reaches ~3.04 TB/s).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <cstdio>
#include <cstdlib>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "afs/kernels/cuda/attention.cuh"
#include "afs/kernels/cuda/attention_sm90.cuh"
#if __has_include("attention_baseline.cuh")
#include "attention_baseline.cuh"
#define HAVE_BASELINE 1
#else
#define HAVE_BASELINE 0
#endif

using namespace afs::cuda;
using T = __nv_bfloat16;

namespace {

constexpr int D = 128, kBlock = 16, kBlockLog2 = 4;

#define CK(expr)                                                                                     \
  do {                                                                                               \
    cudaError_t e_ = (expr);                                                                         \
    if (e_ != cudaSuccess) {                                                                         \
      std::fprintf(stderr, "CUDA error %s at %s:%d: %s\n", #expr, __FILE__, __LINE__, cudaGetErrorString(e_)); \
      std::exit(1);                                                                                  \
    }                                                                                                \
  } while (0)

__global__ void fill(T* p, size_t n, uint32_t seed, float scale) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    uint32_t h = static_cast<uint32_t>(i) * 2654435761u ^ seed ^ static_cast<uint32_t>(i >> 32) * 40503u;
    h ^= h >> 15, h *= 2246822519u, h ^= h >> 13, h *= 3266489917u, h ^= h >> 16;
    p[i] = __float2bfloat16(scale * ((h & 0xFFFF) / 32768.f - 1.f));
  }
}

void fill_random(T* p, size_t n, uint32_t seed, float scale) {
  fill<<<1024, 256>>>(p, n, seed, scale);
  CK(cudaGetLastError());
}

// An fp8 (e4m3) copy of a pool, and the pool rewritten with the values the copy holds (exact in
// bf16): the bf16 kernels and the reference then see what the fp8 kernels see.
__global__ void to_fp8_and_back(T* p, kv_fp8* p8, size_t n) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    const kv_fp8 v(__bfloat162float(p[i]));  // round to nearest even, saturating (satfinite)
    p8[i] = v;
    p[i] = __float2bfloat16(float(v));
  }
}

// One reference output row: query row q_row attends keys 0 .. n_keys-1 of the block table at bt_off.
struct RefRow {
  int q_row, n_keys, bt_off, pad;
};

// grid (rows, n_heads), 128 threads, n_keys floats of dynamic shared memory. Plain softmax in
// float32: scores, max, exp, sum, weighted V.
__global__ void reference_attention(const T* q, const T* kpool, const T* vpool, const int* bt, const RefRow* rows,
                                    int n_heads, int n_kv, float scale, float* out) {
  extern __shared__ float sc[];
  __shared__ float qv[D], red[32];
  const RefRow r = rows[blockIdx.x];
  const int h = blockIdx.y, kvh = h / (n_heads / n_kv);
  const int* table = bt + r.bt_off;
  for (int d = threadIdx.x; d < D; d += blockDim.x)
    qv[d] = __bfloat162float(q[size_t(r.q_row) * n_heads * D + h * D + d]);
  __syncthreads();
  auto slot = [&](int k) { return size_t(table[k / kBlock]) * kBlock + k % kBlock; };
  float mx = -INFINITY;
  for (int k = threadIdx.x; k < r.n_keys; k += blockDim.x) {
    const uint4* kr = reinterpret_cast<const uint4*>(kpool + slot(k) * n_kv * D + kvh * D);
    float dot = 0.f;
    for (int c = 0; c < D / 8; ++c) {
      float f[8];
      unpack8<T>(kr[c], f);
      for (int e = 0; e < 8; ++e) dot += qv[c * 8 + e] * f[e];
    }
    sc[k] = dot * scale;
    mx = fmaxf(mx, sc[k]);
  }
  mx = block_max(mx, red);
  float sum = 0.f;
  for (int k = threadIdx.x; k < r.n_keys; k += blockDim.x) {
    sc[k] = expf(sc[k] - mx);
    sum += sc[k];
  }
  sum = block_sum(sum, red);
  __syncthreads();
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float acc = 0.f;
    for (int k = 0; k < r.n_keys; ++k) acc += sc[k] * __bfloat162float(vpool[slot(k) * n_kv * D + kvh * D + d]);
    out[(size_t(blockIdx.x) * n_heads + h) * D + d] = acc / sum;
  }
}

// ||out - ref|| / ||ref|| over the reference rows; NaN (unwritten or broken) gives +inf.
double rel_error(const std::vector<T>& out, const std::vector<float>& ref, const std::vector<RefRow>& rows,
                 const std::vector<int>& out_rows, int n_heads) {
  double num = 0, den = 0;
  for (size_t i = 0; i < rows.size(); ++i)
    for (int c = 0; c < n_heads * D; ++c) {
      const double o = __bfloat162float(out[size_t(out_rows[i]) * n_heads * D + c]);
      const double r = ref[i * n_heads * D + c];
      if (!std::isfinite(o)) return INFINITY;
      num += (o - r) * (o - r), den += r * r;
    }
  return std::sqrt(num / den);
}

std::vector<float> run_reference(const T* q, const T* kpool, const T* vpool, const int* bt,
                                 const std::vector<RefRow>& rows, int n_heads, int n_kv) {
  RefRow* rows_d;
  float* out_d;
  CK(cudaMalloc(&rows_d, rows.size() * sizeof(RefRow)));
  CK(cudaMalloc(&out_d, rows.size() * n_heads * D * sizeof(float)));
  CK(cudaMemcpy(rows_d, rows.data(), rows.size() * sizeof(RefRow), cudaMemcpyHostToDevice));
  int max_keys = 0;
  for (auto& r : rows) max_keys = std::max(max_keys, r.n_keys);
  const size_t smem = size_t(max_keys) * sizeof(float);
  CK(cudaFuncSetAttribute(reference_attention, cudaFuncAttributeMaxDynamicSharedMemorySize, 200 * 1024));
  reference_attention<<<dim3(rows.size(), n_heads), 128, smem>>>(q, kpool, vpool, bt, rows_d, n_heads, n_kv,
                                                                  1.f / std::sqrt(float(D)), out_d);
  CK(cudaGetLastError());
  std::vector<float> ref(rows.size() * n_heads * D);
  CK(cudaMemcpy(ref.data(), out_d, ref.size() * sizeof(float), cudaMemcpyDeviceToHost));
  CK(cudaFree(rows_d));
  CK(cudaFree(out_d));
  return ref;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// Median time of one call, in seconds: `calls` calls captured in one graph, replayed.
template <class F>
double time_graph(F&& body, int calls, int reps = 15) {
  cudaStream_t st;
  CK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
  cudaGraph_t g;
  cudaGraphExec_t ge;
  CK(cudaStreamBeginCapture(st, cudaStreamCaptureModeThreadLocal));
  for (int i = 0; i < calls; ++i) body(i, st);
  CK(cudaStreamEndCapture(st, &g));
  CK(cudaGraphInstantiate(&ge, g, 0));
  cudaEvent_t a, b;
  CK(cudaEventCreate(&a));
  CK(cudaEventCreate(&b));
  for (int i = 0; i < 3; ++i) CK(cudaGraphLaunch(ge, st));
  std::vector<double> ts;
  for (int r = 0; r < reps; ++r) {
    CK(cudaEventRecord(a, st));
    CK(cudaGraphLaunch(ge, st));
    CK(cudaEventRecord(b, st));
    CK(cudaEventSynchronize(b));
    float ms;
    CK(cudaEventElapsedTime(&ms, a, b));
    ts.push_back(ms * 1e-3 / calls);
  }
  CK(cudaGetLastError());
  CK(cudaGraphExecDestroy(ge));
  CK(cudaGraphDestroy(g));
  CK(cudaEventDestroy(a));
  CK(cudaEventDestroy(b));
  CK(cudaStreamDestroy(st));
  return median(ts);
}

// Device-to-device copy by a plain kernel (16-byte loads, UNR in flight per thread), the way torch's
// copy_ measured 3.02 TB/s in ANCHORS.md (the best of a few launch shapes is kept); a graph memcpy
// node (copy engine) is printed beside it.
template <int UNR>
__global__ void copy_kernel(const uint4* __restrict__ src, uint4* __restrict__ dst, size_t n) {
  const size_t stride = size_t(gridDim.x) * blockDim.x;
  size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x;
  for (; i + (UNR - 1) * stride < n; i += UNR * stride) {
    uint4 v[UNR];
#pragma unroll
    for (int u = 0; u < UNR; ++u) v[u] = src[i + u * stride];
#pragma unroll
    for (int u = 0; u < UNR; ++u) dst[i + u * stride] = v[u];
  }
  for (; i < n; i += stride) dst[i] = src[i];
}

double copy_bandwidth(double* memcpy_bw) {
  const size_t n = size_t(1) << 30;
  void *src, *dst;
  CK(cudaMalloc(&src, n));
  CK(cudaMalloc(&dst, n));
  CK(cudaMemset(src, 1, n));
  *memcpy_bw = 2.0 * n / time_graph([&](int, cudaStream_t st) {
    CK(cudaMemcpyAsync(dst, src, n, cudaMemcpyDeviceToDevice, st));
  }, 4, 10);
  const auto* s16 = static_cast<const uint4*>(src);
  auto* d16 = static_cast<uint4*>(dst);
  double t = 1e30;
  for (int blocks : {4, 8, 16}) {
    t = std::min(t, time_graph([&](int, cudaStream_t st) {
      copy_kernel<4><<<sm_count() * blocks, 256, 0, st>>>(s16, d16, n / 16);
    }, 4, 10));
    t = std::min(t, time_graph([&](int, cudaStream_t st) {
      copy_kernel<8><<<sm_count() * blocks, 256, 0, st>>>(s16, d16, n / 16);
    }, 4, 10));
  }
  CK(cudaFree(src));
  CK(cudaFree(dst));
  return 2.0 * n / t;
}

// ------------------------------------------------------------------------------ decode
// new(U, S): DecodeTiling<U, S> (keys per thread per stage, stages in the ring); "new" is the default.
// +c: attention_decode combining its own splits (the engine's default; (U4,S2) is the engine's
// tiling at batch 1-2) instead of attention_decode_combine after it. It must give the bits of its
// tiling without it.
// fp8: the same kernels over the fp8 copy of the pools (K/V bytes halved); the bf16 pools hold
// exactly its values, so they must give the bits of their bf16 tiling.
// fp8(U8,S3): the same bytes in flight per thread as the bf16 (U4,S3) ring (checked against the
// reference only: its keys group differently).
enum DecodeVariant {
  kBase, kNew, kNewU2S5, kNewU4S2, kNewFused, kNewU4S2Fused, kFp8, kFp8Fused, kFp8U8, kDecodeVariants
};
const char* kDecodeNames[] = {"base",         "new(U4,S3)",   "new(U2,S5)",   "new(U4,S2)", "new(U4,S3)+c",
                              "new(U4,S2)+c", "fp8(U4,S3)",   "fp8(U4,S3)+c", "fp8(U8,S3)+c"};
bool decode_is_fp8(int v) { return v == kFp8 || v == kFp8Fused || v == kFp8U8; }
// The variant whose bits a combining (or fp8) variant must reproduce (-1: none).
int decode_bits_of(int v) {
  return v == kNewFused || v == kFp8 || v == kFp8Fused ? kNew : v == kNewU4S2Fused ? kNewU4S2 : -1;
}

struct DecodeSetup {
  int B = 0, n_heads = 0, n_kv = 0, max_ctx = 0, copies = 0, bps = 0;
  int grid_splits = 0, split_keys = 0;
  std::vector<int> ctx;  // keys per sequence (pos0 + 1)
  T *kpool = nullptr, *vpool = nullptr, *q = nullptr, *out = nullptr;
  kv_fp8 *kpool8 = nullptr, *vpool8 = nullptr;  // the pools in fp8 (to_fp8_and_back)
  float *part_ml = nullptr, *part_acc = nullptr;
  SeqMeta* seqs = nullptr;  // [copies][B]
  int *dec = nullptr, *bt = nullptr;
  int* done = nullptr;  // attention_decode's combine counters, B * n_kv
  size_t kv_bytes = 0, part_floats = 0;  // K/V bytes one call reads; partial buffer size
  std::vector<SeqMeta> seqs_h;
  std::vector<int> bt_h, dec_h;

  void free_all() {
    for (void* p : {(void*)kpool, (void*)vpool, (void*)kpool8, (void*)vpool8, (void*)q, (void*)out, (void*)part_ml,
                    (void*)part_acc, (void*)seqs, (void*)dec, (void*)bt, (void*)done})
      CK(cudaFree(p));
  }
};

DecodeSetup make_decode(const std::vector<int>& ctx, int max_ctx, int n_heads, int n_kv, uint32_t seed) {
  DecodeSetup s;
  s.B = int(ctx.size()), s.n_heads = n_heads, s.n_kv = n_kv, s.max_ctx = max_ctx, s.ctx = ctx;
  for (int c : ctx) s.kv_bytes += size_t(c) * n_kv * D * sizeof(T) * 2;
  s.bps = (max_ctx + kBlock - 1) / kBlock;
  s.copies = int(std::clamp<size_t>((size_t(192) << 20) / s.kv_bytes + 1, 2, 64));
  // The engine's split choice (model_cuda.cuh, Model::attention), with the engine's n_splits_.
  const int n_splits_cap = (max_ctx + kDecodeSplitAlign - 1) / kDecodeSplitAlign;
  const int want = (2 * sm_count() + n_kv * s.B - 1) / (n_kv * s.B);
  const int splits = std::clamp(want, 1, n_splits_cap);
  const int per = (max_ctx + splits - 1) / splits;
  s.split_keys = (per + kDecodeSplitAlign - 1) / kDecodeSplitAlign * kDecodeSplitAlign;
  s.grid_splits = (max_ctx + s.split_keys - 1) / s.split_keys;

  // Every sequence of every copy gets its own blocks, in shuffled order.
  int used_blocks = 0;
  for (int c : ctx) used_blocks += (c + kBlock - 1) / kBlock;
  const size_t n_blocks = size_t(s.copies) * used_blocks;
  std::vector<int> perm(n_blocks);
  std::iota(perm.begin(), perm.end(), 0);
  std::mt19937 rng(seed);
  std::shuffle(perm.begin(), perm.end(), rng);
  s.bt_h.assign(size_t(s.copies) * s.B * s.bps, -1);
  size_t next = 0;
  for (int c = 0; c < s.copies; ++c)
    for (int j = 0; j < s.B; ++j) {
      const int nb = (ctx[j] + kBlock - 1) / kBlock;
      for (int i = 0; i < nb; ++i) s.bt_h[(size_t(c) * s.B + j) * s.bps + i] = perm[next++];
      // Entries past the context point far away: a kernel that reads them faults or shows up wrong.
      for (int i = nb; i < s.bps; ++i) s.bt_h[(size_t(c) * s.B + j) * s.bps + i] = 1 << 28;
    }
  // Sequence i's token is query row i; the decode list walks them in reverse (an indirection
  // the kernels must follow).
  for (int c = 0; c < s.copies; ++c)
    for (int i = 0; i < s.B; ++i) s.seqs_h.push_back(SeqMeta{i, 1, ctx[i] - 1, (c * s.B + i) * s.bps});
  for (int j = 0; j < s.B; ++j) s.dec_h.push_back(s.B - 1 - j);

  const size_t pool_elems = n_blocks * kBlock * n_kv * D;
  CK(cudaMalloc(&s.kpool, pool_elems * sizeof(T)));
  CK(cudaMalloc(&s.vpool, pool_elems * sizeof(T)));
  CK(cudaMalloc(&s.q, size_t(s.B) * n_heads * D * sizeof(T)));
  CK(cudaMalloc(&s.out, size_t(s.B) * n_heads * D * sizeof(T)));
  s.part_floats = size_t(s.B) * n_heads * s.grid_splits;
  CK(cudaMalloc(&s.part_ml, s.part_floats * 2 * sizeof(float)));
  CK(cudaMalloc(&s.part_acc, s.part_floats * D * sizeof(float)));
  CK(cudaMalloc(&s.seqs, s.seqs_h.size() * sizeof(SeqMeta)));
  CK(cudaMalloc(&s.dec, s.B * sizeof(int)));
  CK(cudaMalloc(&s.done, size_t(s.B) * n_kv * sizeof(int)));
  CK(cudaMemset(s.done, 0, size_t(s.B) * n_kv * sizeof(int)));
  CK(cudaMalloc(&s.bt, s.bt_h.size() * sizeof(int)));
  CK(cudaMemcpy(s.seqs, s.seqs_h.data(), s.seqs_h.size() * sizeof(SeqMeta), cudaMemcpyHostToDevice));
  CK(cudaMemcpy(s.dec, s.dec_h.data(), s.B * sizeof(int), cudaMemcpyHostToDevice));
  CK(cudaMemcpy(s.bt, s.bt_h.data(), s.bt_h.size() * sizeof(int), cudaMemcpyHostToDevice));
  // q larger than K so the softmax is peaked enough to test the running max.
  fill_random(s.kpool, pool_elems, seed * 3 + 1, 1.f);
  fill_random(s.vpool, pool_elems, seed * 3 + 2, 1.f);
  CK(cudaMalloc(&s.kpool8, pool_elems));
  CK(cudaMalloc(&s.vpool8, pool_elems));
  to_fp8_and_back<<<1024, 256>>>(s.kpool, s.kpool8, pool_elems);
  to_fp8_and_back<<<1024, 256>>>(s.vpool, s.vpool8, pool_elems);
  CK(cudaGetLastError());
  fill_random(s.q, size_t(s.B) * n_heads * D, seed * 3 + 3, 3.f);
  CK(cudaDeviceSynchronize());
  return s;
}

template <int G>
void launch_decode(int v, const DecodeSetup& s, int copy, cudaStream_t st) {
  const float scale_log2 = 1.4426950408889634f / std::sqrt(float(D));
  const SeqMeta* seqs = s.seqs + size_t(copy) * s.B;
  const dim3 grid(s.grid_splits, s.n_kv, s.B), cgrid(s.B, s.n_heads);
  auto run = [&](auto kernel, auto* kp, auto* vp, bool fused_combine) {
    launch(kernel, grid, dim3(kDecodeThreads), 0, st, s.q, kp, vp, seqs, s.dec, s.bt, kBlockLog2, s.n_kv,
           s.split_keys, scale_log2, s.part_ml, s.part_acc, DecodeQk{}, fused_combine ? s.done : nullptr, s.out);
    if (!fused_combine)
      launch(attention_decode_combine<T, D>, cgrid, dim3(D), 0, st, s.part_ml, s.part_acc, seqs, s.dec, s.grid_splits,
             s.split_keys, s.out);
  };
  auto current = [&](auto kernel, bool fused_combine = false) { run(kernel, s.kpool, s.vpool, fused_combine); };
  auto current8 = [&](auto kernel, bool fused_combine = false) { run(kernel, s.kpool8, s.vpool8, fused_combine); };
  switch (v) {
    case kBase: {
#if HAVE_BASELINE
      const auto* bseqs = reinterpret_cast<const baseline::SeqMeta*>(seqs);
      launch(baseline::attention_decode<T, D, G>, grid, dim3(baseline::kDecodeThreads), 0, st, s.q, s.kpool, s.vpool,
             bseqs, s.dec, s.bt, kBlockLog2, s.n_kv, s.split_keys, scale_log2, s.part_ml, s.part_acc);
      launch(baseline::attention_decode_combine<T, D>, cgrid, dim3(D), 0, st, s.part_ml, s.part_acc, bseqs, s.dec,
             s.grid_splits, s.split_keys, s.out);
#endif
      break;
    }
    case kNew: current(attention_decode<T, D, G>); break;
    case kNewU2S5: current(attention_decode<T, D, G, DecodeTiling<2, 5>>); break;
    case kNewU4S2: current(attention_decode<T, D, G, DecodeTiling<4, 2>>); break;
    case kNewFused: current(attention_decode<T, D, G>, true); break;
    case kNewU4S2Fused: current(attention_decode<T, D, G, DecodeTiling<4, 2>>, true); break;
    case kFp8: current8(attention_decode<T, D, G, DecodeTilingH100, false, kv_fp8>); break;
    case kFp8Fused: current8(attention_decode<T, D, G, DecodeTilingH100, false, kv_fp8>, true); break;
    case kFp8U8: current8(attention_decode<T, D, G, DecodeTiling<8, 3>, false, kv_fp8>, true); break;
  }
}

bool variant_available(int v) { return v != kBase || HAVE_BASELINE; }

// Checks every variant on copy 0 against the reference; returns the worst relative error.
template <int G>
double check_decode(const DecodeSetup& s, const char* label, bool all_variants) {
  std::vector<RefRow> rows;
  std::vector<int> out_rows;
  for (int j = 0; j < s.B; ++j) rows.push_back(RefRow{j, s.ctx[j], j * s.bps, 0}), out_rows.push_back(j);
  const std::vector<float> ref = run_reference(s.q, s.kpool, s.vpool, s.bt, rows, s.n_heads, s.n_kv);
  double worst = 0;
  bool same_bits = true;  // a combining variant must give its tiling's bits (decode_bits_of)
  std::vector<T> outs[kDecodeVariants];
  std::printf("check decode %-28s", label);
  for (int v = 0; v < kDecodeVariants; ++v) {
    if (!variant_available(v) || (!all_variants && v != kNew && v != kNewFused && !decode_is_fp8(v))) continue;
    CK(cudaMemset(s.out, 0xFF, size_t(s.B) * s.n_heads * D * sizeof(T)));
    CK(cudaMemset(s.part_ml, 0xFF, s.part_floats * 2 * sizeof(float)));
    CK(cudaMemset(s.part_acc, 0xFF, s.part_floats * D * sizeof(float)));
    launch_decode<G>(v, s, 0, 0);
    CK(cudaGetLastError());
    CK(cudaDeviceSynchronize());
    std::vector<T> out(size_t(s.B) * s.n_heads * D);
    CK(cudaMemcpy(out.data(), s.out, out.size() * sizeof(T), cudaMemcpyDeviceToHost));
    const double e = rel_error(out, ref, rows, out_rows, s.n_heads);
    std::printf("  %s %.2e", kDecodeNames[v], e);
    worst = std::max(worst, e);
    const int ref_v = decode_bits_of(v);
    if (ref_v >= 0) {
      const bool same = std::memcmp(out.data(), outs[ref_v].data(), out.size() * sizeof(T)) == 0;
      same_bits = same_bits && same;
      std::printf(same ? " (=)" : " (DIFFERS from %s)", kDecodeNames[ref_v]);
    }
    outs[v] = std::move(out);
  }
  std::printf("%s\n", worst < 1e-2 && same_bits ? "  ok" : "  FAIL");
  return same_bits ? worst : 1.0;
}

// attention_decode with q/k norm + RoPE + the K/V write and the combine folded in (kQk, DecodeQk,
// done) against qk_norm_rope_kv, attention_decode and attention_decode_combine, both from the same float32 qkv rows (in `planes`
// planes) on copy 0, on separate copies of the pools: the outputs and the pools must be
// bit-identical. Both tilings the engine launches. Returns whether they are.
// KV = kv_fp8: the same over the fp8 pools, and the new K/V bytes also within e4m3 rounding of the
// bf16 write's values.
template <int G, class Tiling, class KV = T>
bool check_decode_qk_tiling(const DecodeSetup& s, int planes, const char* tiling) {
  constexpr bool fp8 = kIsFp8Kv<KV>;
  const int QD = s.n_heads * D, KVD = s.n_kv * D, QKV = QD + 2 * KVD;
  const float scale_log2 = 1.4426950408889634f / std::sqrt(float(D));
  std::mt19937 rng(77 + planes);
  std::normal_distribution<float> nd(0.f, 1.f);
  const long plane = long(s.B) * QKV;
  std::vector<float> qkv_h(size_t(planes) * plane), qn_h(QD), kn_h(KVD);
  for (float& x : qkv_h) x = nd(rng) / planes;
  for (float& x : qn_h) x = 1.f + 0.1f * nd(rng);
  for (float& x : kn_h) x = 1.f + 0.1f * nd(rng);
  std::vector<float2> rope_h(size_t(s.max_ctx) * (D / 2));
  for (int p = 0; p < s.max_ctx; ++p)
    for (int i = 0; i < D / 2; ++i) {
      const float a = float(p) * (1.f / std::pow(500000.f, float(2 * i) / D));
      rope_h[size_t(p) * (D / 2) + i] = make_float2(std::cos(a), std::sin(a));
    }
  std::vector<int> pos_h(s.B), slot_h(s.B);
  for (int i = 0; i < s.B; ++i) {
    const SeqMeta& m = s.seqs_h[i];  // copy 0; token row i
    pos_h[m.q_start] = m.pos0;
    slot_h[m.q_start] = (s.bt_h[m.bt_off + (m.pos0 >> kBlockLog2)] << kBlockLog2) + (m.pos0 & (kBlock - 1));
  }
  size_t pool_elems = 0;
  for (int c : s.ctx) pool_elems += size_t((c + kBlock - 1) / kBlock);
  pool_elems *= size_t(s.copies) * kBlock * s.n_kv * D;
  float *qkv, *qn, *kn;
  float2* rope;
  int *pos, *slot;
  T *q, *out[2], *k16 = nullptr, *v16 = nullptr, *ks = nullptr, *vs = nullptr;
  KV *kp[2], *vp[2];
  const KV* src_k = fp8 ? reinterpret_cast<const KV*>(s.kpool8) : reinterpret_cast<const KV*>(s.kpool);
  const KV* src_v = fp8 ? reinterpret_cast<const KV*>(s.vpool8) : reinterpret_cast<const KV*>(s.vpool);
  CK(cudaMalloc(&qkv, qkv_h.size() * 4));
  CK(cudaMalloc(&qn, QD * 4));
  CK(cudaMalloc(&kn, KVD * 4));
  CK(cudaMalloc(&rope, rope_h.size() * sizeof(float2)));
  CK(cudaMalloc(&pos, s.B * 4));
  CK(cudaMalloc(&slot, s.B * 4));
  CK(cudaMalloc(&q, size_t(s.B) * QD * sizeof(T)));
  for (int i = 0; i < 2; ++i) {
    CK(cudaMalloc(&kp[i], pool_elems * sizeof(KV)));
    CK(cudaMalloc(&vp[i], pool_elems * sizeof(KV)));
    CK(cudaMalloc(&out[i], size_t(s.B) * QD * sizeof(T)));
    CK(cudaMemcpy(kp[i], src_k, pool_elems * sizeof(KV), cudaMemcpyDeviceToDevice));
    CK(cudaMemcpy(vp[i], src_v, pool_elems * sizeof(KV), cudaMemcpyDeviceToDevice));
    CK(cudaMemset(out[i], 0xFF, size_t(s.B) * QD * sizeof(T)));
  }
  CK(cudaMemcpy(qkv, qkv_h.data(), qkv_h.size() * 4, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(qn, qn_h.data(), QD * 4, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(kn, kn_h.data(), KVD * 4, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(rope, rope_h.data(), rope_h.size() * sizeof(float2), cudaMemcpyHostToDevice));
  CK(cudaMemcpy(pos, pos_h.data(), s.B * 4, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(slot, slot_h.data(), s.B * 4, cudaMemcpyHostToDevice));
  const dim3 grid(s.grid_splits, s.n_kv, s.B), cgrid(s.B, s.n_heads);
  // Unfused: one head per qk block, as the engine's decode steps run it.
  if constexpr (fp8) {  // the bf16 write of the same rows, for the rounding check below
    CK(cudaMalloc(&k16, pool_elems * sizeof(T)));
    CK(cudaMalloc(&v16, pool_elems * sizeof(T)));
    launch(qk_norm_rope_kv<T, D, float>, dim3(s.B, s.n_heads + s.n_kv), dim3(kQkThreads), 0, 0,
           static_cast<const float*>(qkv), planes, plane, s.n_heads, s.n_kv, 1, static_cast<const float*>(qn),
           static_cast<const float*>(kn), static_cast<const float2*>(rope), 1e-6f, static_cast<const int*>(pos),
           static_cast<const int*>(slot), q, k16, v16, static_cast<const int*>(nullptr), static_cast<T*>(nullptr),
           static_cast<T*>(nullptr));
    // The prefill staging write (16-bit copies of the stored e4m3 values), here at the pool's slots.
    CK(cudaMalloc(&ks, pool_elems * sizeof(T)));
    CK(cudaMalloc(&vs, pool_elems * sizeof(T)));
  }
  launch(qk_norm_rope_kv<T, D, float, KV>, dim3(s.B, s.n_heads + s.n_kv), dim3(kQkThreads), 0, 0,
         static_cast<const float*>(qkv), planes, plane, s.n_heads, s.n_kv, 1, static_cast<const float*>(qn),
         static_cast<const float*>(kn), static_cast<const float2*>(rope), 1e-6f, static_cast<const int*>(pos),
         static_cast<const int*>(slot), q, kp[0], vp[0], static_cast<const int*>(fp8 ? slot : nullptr), ks, vs);
  launch(attention_decode<T, D, G, Tiling, false, KV>, grid, dim3(kDecodeThreads), 0, 0, static_cast<const T*>(q), kp[0], vp[0],
         static_cast<const SeqMeta*>(s.seqs), static_cast<const int*>(s.dec), static_cast<const int*>(s.bt),
         kBlockLog2, s.n_kv, s.split_keys, scale_log2, s.part_ml, s.part_acc, DecodeQk{}, static_cast<int*>(nullptr),
         static_cast<T*>(nullptr));
  launch(attention_decode_combine<T, D>, cgrid, dim3(D), 0, 0, static_cast<const float*>(s.part_ml),
         static_cast<const float*>(s.part_acc), static_cast<const SeqMeta*>(s.seqs), static_cast<const int*>(s.dec),
         s.grid_splits, s.split_keys, out[0]);
  // Fused, as the engine runs it by default: the attention combines its own splits too.
  const DecodeQk dq{qkv, planes, plane, qn, kn, rope, 1e-6f, pos, slot};
  launch(attention_decode<T, D, G, Tiling, true, KV>, grid, dim3(kDecodeThreads), 0, 0, static_cast<const T*>(nullptr),
         kp[1], vp[1], static_cast<const SeqMeta*>(s.seqs), static_cast<const int*>(s.dec),
         static_cast<const int*>(s.bt), kBlockLog2, s.n_kv, s.split_keys, scale_log2, s.part_ml, s.part_acc, dq, s.done,
         out[1]);
  CK(cudaGetLastError());
  CK(cudaDeviceSynchronize());
  auto same = [&](const auto* a, const auto* b, size_t n) {
    const size_t bytes = n * sizeof(*a);
    std::vector<unsigned char> x(bytes), y(bytes);
    CK(cudaMemcpy(x.data(), a, bytes, cudaMemcpyDeviceToHost));
    CK(cudaMemcpy(y.data(), b, bytes, cudaMemcpyDeviceToHost));
    return std::memcmp(x.data(), y.data(), bytes) == 0;
  };
  bool ok = same(out[0], out[1], size_t(s.B) * QD);
  bool pools = true;
  for (int i = 0; i < s.B; ++i)
    pools = pools && same(kp[0] + size_t(slot_h[i]) * KVD, kp[1] + size_t(slot_h[i]) * KVD, KVD) &&
            same(vp[0] + size_t(slot_h[i]) * KVD, vp[1] + size_t(slot_h[i]) * KVD, KVD);
  bool rounded = true;  // fp8: each new K/V value within e4m3 rounding of the bf16 write's
  bool staged = true;   // fp8: the staging copy holds exactly the stored e4m3 values
  if constexpr (fp8) {
    for (int i = 0; i < s.B; ++i)
      for (int kv = 0; kv < 2; ++kv) {
        std::vector<kv_fp8> a(KVD);
        std::vector<T> b(KVD);
        CK(cudaMemcpy(a.data(), (kv ? vp[0] : kp[0]) + size_t(slot_h[i]) * KVD, KVD, cudaMemcpyDeviceToHost));
        CK(cudaMemcpy(b.data(), (kv ? v16 : k16) + size_t(slot_h[i]) * KVD, KVD * sizeof(T), cudaMemcpyDeviceToHost));
        std::vector<T> c(KVD);
        CK(cudaMemcpy(c.data(), (kv ? vs : ks) + size_t(slot_h[i]) * KVD, KVD * sizeof(T), cudaMemcpyDeviceToHost));
        for (int e = 0; e < KVD; ++e) {
          const float x = float(a[e]), y = __bfloat162float(b[e]);
          rounded = rounded && std::fabs(x - y) <= 0.07f * std::fabs(y) + 0x1p-9f;
          staged = staged && __bfloat162float(c[e]) == x;
        }
      }
  }
  std::printf("  qk-fused%s %s planes %d: output %s, new K/V %s%s%s", fp8 ? " fp8" : "", tiling, planes,
              ok ? "identical" : "DIFFERS", pools ? "identical" : "DIFFER",
              fp8 ? (rounded ? ", e4m3 of bf16's" : ", NOT e4m3 of bf16's") : "",
              fp8 ? (staged ? ", staging exact" : ", staging DIFFERS") : "");
  for (void* p : {(void*)qkv, (void*)qn, (void*)kn, (void*)rope, (void*)pos, (void*)slot, (void*)q, (void*)kp[0],
                  (void*)kp[1], (void*)vp[0], (void*)vp[1], (void*)out[0], (void*)out[1], (void*)k16, (void*)v16,
                  (void*)ks, (void*)vs})
    CK(cudaFree(p));
  return ok && pools && rounded && staged;
}

template <int G>
bool check_decode_qk(const DecodeSetup& s, const char* label) {
  std::printf("check decode qk-fused %-21s", label);
  bool ok = true;
  for (int planes : {1, 2}) {
    ok &= check_decode_qk_tiling<G, DecodeTilingH100>(s, planes, "<4,3>");
    ok &= check_decode_qk_tiling<G, DecodeTiling<4, 2>>(s, planes, "<4,2>");
    ok &= check_decode_qk_tiling<G, DecodeTilingH100, kv_fp8>(s, planes, "<4,3>");
    ok &= check_decode_qk_tiling<G, DecodeTiling<4, 2>, kv_fp8>(s, planes, "<4,2>");
  }
  std::printf("%s\n", ok ? "  ok" : "  FAIL");
  return ok;
}

// ------------------------------------------------------------------------------ prefill
// new(M, Bc, B): M m16 row tiles per warp, Bc-key tiles, registers for B blocks per SM.
// sm90(S, pp): the sm90a kernel with S K/V stages, pp = consumer ping-pong (sm90::AttnTiling).
enum PrefillVariant {
  kPrefillBase, kPrefillNew, kPrefillM2, kPrefillM2B1, kPrefillSm90, kPrefillSm90NoPP, kPrefillSm90S3,
  kPrefillSm90HeadOrder, kPrefillVariants
};
// sm90(2,h): the engine's tiling with the blocks started head by head (kLongestFirst off).
const char* kPrefillNames[] = {"base",       "new(1,64,3)", "new(2,32,2)", "new(2,32,1)",
                               "sm90(2,pp)", "sm90(2)",     "sm90(3)",     "sm90(2,h)"};
constexpr int kPrefillRows[] = {64, attn::kBr, 128, 128, sm90::kAttnRows, sm90::kAttnRows, sm90::kAttnRows,
                                sm90::kAttnRows};

// Whether this binary runs the sm90a kernels on this GPU (set in main).
bool& sm90_ok() {
  static bool ok = false;
  return ok;
}
bool prefill_available(int v) {
  if (v == kPrefillBase) return HAVE_BASELINE;
  if (v >= kPrefillSm90) return sm90_ok();
  return true;
}

// Launches prefill variant v (the kernels of the header, not the baseline) over the given tiles.
void launch_prefill(int v, const T* q, const T* kp, const T* vp, size_t pool_slots, const SeqMeta* seqs,
                    const int2* tiles, int n_tiles, const int* bt, int H, int KV, float scale_log2, T* out,
                    cudaStream_t st) {
  const dim3 grid(H, n_tiles);
  const auto sm90_prefill = [&](auto tiling) {  // tiling: an sm90::AttnTiling
    sm90::attention_prefill_sm90<T, D, decltype(tiling)>(q, kp, vp, pool_slots, seqs, tiles, n_tiles, bt, kBlockLog2,
                                                         H, KV, scale_log2, out, st);
  };
  switch (v) {
    case kPrefillNew:
      launch(attention_prefill<T, D>, grid, dim3(128), 0, st, q, kp, vp, seqs, tiles, bt, kBlockLog2, H, KV,
             scale_log2, out);
      break;
    case kPrefillM2:
      launch(attention_prefill<T, D, attn::PrefillTiling<2, 32, 2>>, grid, dim3(128), 0, st, q, kp, vp, seqs, tiles,
             bt, kBlockLog2, H, KV, scale_log2, out);
      break;
    case kPrefillM2B1:
      launch(attention_prefill<T, D, attn::PrefillTiling<2, 32, 1>>, grid, dim3(128), 0, st, q, kp, vp, seqs, tiles,
             bt, kBlockLog2, H, KV, scale_log2, out);
      break;
    case kPrefillSm90: return sm90_prefill(sm90::AttnTiling<2, true>{});
    case kPrefillSm90NoPP: return sm90_prefill(sm90::AttnTiling<2, false>{});
    case kPrefillSm90S3: return sm90_prefill(sm90::AttnTiling<3, false>{});
    case kPrefillSm90HeadOrder: return sm90_prefill(sm90::AttnTiling<2, false, false>{});
  }
}

struct PrefillResult {
  double err[kPrefillVariants] = {}, tflops[kPrefillVariants] = {};
};

// One prefill step on the device: sequence chunks (n tokens after pos0 cached keys) with their
// blocks in one shuffled block table, random K/V pools and queries (seeds seed + 1, + 2, + 3).
struct PrefillCase {
  struct Chunk {
    int n, pos0;
  };
  int H, KV, tokens = 0, n_blocks = 0;
  std::vector<SeqMeta> seqs_h;
  std::vector<int> bt_h;
  size_t slots = 0, qn = 0;
  T *kp = nullptr, *vp = nullptr, *q = nullptr, *out = nullptr;
  SeqMeta* seqs = nullptr;
  int* bt = nullptr;

  PrefillCase(const std::vector<Chunk>& chunks, int H_, int KV_, uint32_t seed) : H(H_), KV(KV_) {
    for (const Chunk& c : chunks) {
      seqs_h.push_back(SeqMeta{tokens, c.n, c.pos0, n_blocks});
      tokens += c.n, n_blocks += (c.pos0 + c.n + kBlock - 1) / kBlock;
    }
    bt_h.resize(n_blocks);
    std::iota(bt_h.begin(), bt_h.end(), 0);
    std::mt19937 rng(seed);
    std::shuffle(bt_h.begin(), bt_h.end(), rng);
    slots = size_t(n_blocks) * kBlock, qn = size_t(tokens) * H * D;
    const size_t pool = slots * KV * D;
    CK(cudaMalloc(&kp, pool * sizeof(T)));
    CK(cudaMalloc(&vp, pool * sizeof(T)));
    CK(cudaMalloc(&q, qn * sizeof(T)));
    CK(cudaMalloc(&out, qn * sizeof(T)));
    CK(cudaMalloc(&seqs, seqs_h.size() * sizeof(SeqMeta)));
    CK(cudaMalloc(&bt, bt_h.size() * sizeof(int)));
    CK(cudaMemcpy(seqs, seqs_h.data(), seqs_h.size() * sizeof(SeqMeta), cudaMemcpyHostToDevice));
    CK(cudaMemcpy(bt, bt_h.data(), bt_h.size() * sizeof(int), cudaMemcpyHostToDevice));
    fill_random(kp, pool, seed + 1, 1.f);
    fill_random(vp, pool, seed + 2, 1.f);
    fill_random(q, qn, seed + 3, 3.f);
  }
  ~PrefillCase() {
    for (void* p : {(void*)kp, (void*)vp, (void*)q, (void*)out, (void*)seqs, (void*)bt}) cudaFree(p);
  }

  // Tiles of `rows` query rows over every chunk, as model_cuda.cuh builds them (device copy).
  int2* tiles(int rows, int* n_tiles) const {
    std::vector<int2> th;
    for (int sq = 0; sq < int(seqs_h.size()); ++sq)
      for (int q0 = 0; q0 < seqs_h[sq].n; q0 += rows) th.push_back(make_int2(sq, q0));
    int2* d;
    CK(cudaMalloc(&d, th.size() * sizeof(int2)));
    CK(cudaMemcpy(d, th.data(), th.size() * sizeof(int2), cudaMemcpyHostToDevice));
    *n_tiles = int(th.size());
    return d;
  }

  // Error of run()'s output against ref on `rows`, the output poisoned (NaN) first.
  template <class F>
  double error(F&& run, const std::vector<float>& ref, const std::vector<RefRow>& rows,
               const std::vector<int>& out_rows) const {
    CK(cudaMemset(out, 0xFF, qn * sizeof(T)));
    run();
    CK(cudaGetLastError());
    CK(cudaDeviceSynchronize());
    std::vector<T> o(qn);
    CK(cudaMemcpy(o.data(), out, qn * sizeof(T), cudaMemcpyDeviceToHost));
    return rel_error(o, ref, rows, out_rows, H);
  }
};

PrefillResult run_prefill(int Tn, bool timed, uint32_t seed) {
  const PrefillCase c({{Tn, 0}}, 32, 32, seed);
  const int H = c.H, KV = c.KV;
  int2* tiles[kPrefillVariants];
  int n_tiles[kPrefillVariants];
  for (int v = 0; v < kPrefillVariants; ++v) tiles[v] = c.tiles(kPrefillRows[v], &n_tiles[v]);
  CK(cudaDeviceSynchronize());
  const float scale_log2 = 1.4426950408889634f / std::sqrt(float(D));
  auto run = [&](int v, cudaStream_t st) {
    if (v == kPrefillBase) {
#if HAVE_BASELINE
      launch(baseline::attention_prefill<T, D>, dim3(n_tiles[v], H), dim3(128), 0, st, c.q, c.kp, c.vp,
             reinterpret_cast<const baseline::SeqMeta*>(c.seqs), tiles[v], c.bt, kBlockLog2, H, KV, scale_log2,
             c.out);
#endif
      return;
    }
    launch_prefill(v, c.q, c.kp, c.vp, c.slots, c.seqs, tiles[v], n_tiles[v], c.bt, H, KV, scale_log2, c.out, st);
  };
  // Reference rows: all of them up to 2048 tokens, else every 29th row and the last 64.
  std::vector<RefRow> rows;
  std::vector<int> out_rows;
  for (int r = 0; r < Tn; ++r)
    if (Tn <= 2048 || r % 29 == 0 || r >= Tn - 64) rows.push_back(RefRow{r, r + 1, 0, 0}), out_rows.push_back(r);
  const std::vector<float> ref = run_reference(c.q, c.kp, c.vp, c.bt, rows, H, KV);
  PrefillResult res;
  const double flop = 4.0 * Tn * double(Tn) * D * H / 2;
  for (int v = 0; v < kPrefillVariants; ++v) {
    if (!prefill_available(v)) continue;
    res.err[v] = c.error([&] { run(v, 0); }, ref, rows, out_rows);
    if (timed) res.tflops[v] = flop / time_graph([&](int, cudaStream_t st) { run(v, st); }, 5, 10) * 1e-12;
  }
  for (int2* t : tiles) CK(cudaFree(t));
  return res;
}

// A step of several sequences: chunks after cached keys (pos0 > 0), one-token and page-edge
// lengths, GQA 40/8. The cache slots past each sequence's last key (to the end of its last block)
// hold NaN: keys there must be masked and their V rows kept out of P V. Every variant of the
// header runs on it; attention_prefill is the control for the test itself.
bool check_prefill_chunks(uint32_t seed) {
  const PrefillCase c({{1, 0}, {300, 0}, {77, 1000}, {129, 37}, {128, 128}, {200, 3999}, {64, 17}, {16, 16}}, 40,
                      8, seed);
  const int H = c.H, KV = c.KV;
  CK(cudaDeviceSynchronize());
  for (const SeqMeta& m : c.seqs_h) {
    const int keys = m.pos0 + m.n, nb = (keys + kBlock - 1) / kBlock;
    for (int pos = keys; pos < nb * kBlock; ++pos) {
      const size_t slot = size_t(c.bt_h[m.bt_off + pos / kBlock]) * kBlock + pos % kBlock;
      CK(cudaMemset(c.kp + slot * KV * D, 0xFF, KV * D * sizeof(T)));  // 0xFFFF: a bf16 NaN
      CK(cudaMemset(c.vp + slot * KV * D, 0xFF, KV * D * sizeof(T)));
    }
  }
  std::vector<RefRow> rows;
  std::vector<int> out_rows;
  for (const SeqMeta& m : c.seqs_h)
    for (int i = 0; i < m.n; ++i)
      rows.push_back(RefRow{m.q_start + i, m.pos0 + i + 1, m.bt_off, 0}), out_rows.push_back(m.q_start + i);
  const std::vector<float> ref = run_reference(c.q, c.kp, c.vp, c.bt, rows, H, KV);
  const float scale_log2 = 1.4426950408889634f / std::sqrt(float(D));
  bool ok = true;
  std::printf("check prefill chunks (8 sequences, pos0 > 0, gqa 40/8, NaN past the ends)");
  for (int v = 0; v < kPrefillVariants; ++v) {
    if (v == kPrefillBase || !prefill_available(v)) continue;
    int n_tiles;
    int2* tiles = c.tiles(kPrefillRows[v], &n_tiles);
    const double e = c.error(
        [&] {
          launch_prefill(v, c.q, c.kp, c.vp, c.slots, c.seqs, tiles, n_tiles, c.bt, H, KV, scale_log2, c.out, 0);
        },
        ref, rows, out_rows);
    std::printf("  %s %.2e", kPrefillNames[v], e);
    ok &= e < 1e-2;
    CK(cudaFree(tiles));
  }
  std::printf("%s\n", ok ? "  ok" : "  FAIL");
  return ok;
}

}  // namespace

// One launch of each sm90a prefill variant on one sequence of `tokens` (after one warm-up launch),
// nothing checked or timed: the run a profiler attaches to (benchmarks/profile_attention.sh).
int profile_prefill(int tokens) {
  const PrefillCase c({{tokens, 0}}, 32, 32, 7 + tokens);
  const float scale_log2 = 1.4426950408889634f / std::sqrt(float(D));
  for (int v = kPrefillSm90; v < kPrefillVariants; ++v) {
    int n_tiles = 0;
    int2* tiles = c.tiles(kPrefillRows[v], &n_tiles);
    for (int rep = 0; rep < 2; ++rep)
      launch_prefill(v, c.q, c.kp, c.vp, c.slots, c.seqs, tiles, n_tiles, c.bt, c.H, c.KV, scale_log2, c.out, 0);
    CK(cudaDeviceSynchronize());
    std::printf("profiled %s at %d tokens\n", kPrefillNames[v], tokens);
    CK(cudaFree(tiles));
  }
  return 0;
}

// argv[1] == "prefill": the prefill checks and timings only; "profile" [tokens]: profile_prefill.
int main(int argc, char** argv) {
  const bool prefill_only = argc > 1 && std::strcmp(argv[1], "prefill") == 0;
  const bool profile = argc > 1 && std::strcmp(argv[1], "profile") == 0;
  int dev = 0;
  CK(cudaSetDevice(dev));
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, dev));
  sm_count() = prop.multiProcessorCount;
  pdl_enabled() = prop.major >= 9;
  sm90_ok() = prop.major == 9 && prop.minor == 0 && sm90::probe_wgmma_code();
  if (profile) return sm90_ok() ? profile_prefill(argc > 2 ? std::atoi(argv[2]) : 4096) : 1;
  std::printf("device %s, %d SMs, L2 %d MB, PDL %s, baseline %s, sm90a prefill %s\n", prop.name,
              prop.multiProcessorCount, prop.l2CacheSize >> 20, pdl_enabled() ? "on" : "off",
              HAVE_BASELINE ? "0ac4da4" : "absent", sm90_ok() ? "on" : "n/a");
  double memcpy_bw = 0;
  const double copy_bw = copy_bandwidth(&memcpy_bw);
  std::printf("device-to-device copy (bytes read + written): kernel %.0f GB/s, cudaMemcpyAsync %.0f GB/s\n",
              copy_bw * 1e-9, memcpy_bw * 1e-9);

  bool ok = true;
  // Correctness beyond the timed shapes: ragged contexts (1 key, page edges, long) at batch 6, and
  // GQA groups of 5 (OLMo-2-32B: 40 query heads on 8 kv heads).
  if (!prefill_only) {
    DecodeSetup s = make_decode({1, 15, 16, 17, 700, 2049}, 4096, 32, 32, 11);
    ok &= check_decode<1>(s, "ragged b6 max_ctx 4096", true) < 1e-2;
    ok &= check_decode_qk<1>(s, "ragged b6");
    s.free_all();
    DecodeSetup s2 = make_decode({3, 333, 4096, 1000}, 4096, 40, 8, 12);
    ok &= check_decode<5>(s2, "gqa5 b4 ragged", true) < 1e-2;
    ok &= check_decode_qk<5>(s2, "gqa5 b4 ragged");
    s2.free_all();
    DecodeSetup s3 = make_decode({37}, 4096, 40, 8, 13);
    ok &= check_decode<5>(s3, "gqa5 b1 ctx 37", true) < 1e-2;
    ok &= check_decode_qk<5>(s3, "gqa5 b1 ctx 37");
    s3.free_all();
    DecodeSetup s4 = make_decode({128}, 4096, 32, 32, 14);
    ok &= check_decode_qk<1>(s4, "b1 ctx 128");
    s4.free_all();
    // Enough sequences for one split each: the fused combine writes the output directly.
    DecodeSetup s5 = make_decode({5, 64, 300, 17, 1000, 2, 129, 40, 700, 1, 33, 256, 511, 90, 12, 3}, 4096, 32, 32, 15);
    ok &= check_decode<1>(s5, "ragged b16 one split", true) < 1e-2;
    ok &= check_decode_qk<1>(s5, "ragged b16 one split");
    s5.free_all();
  }

  struct Case {
    int B, ctx;
  };
  const Case cases[] = {{1, 128}, {1, 512}, {1, 4096}, {8, 4096}, {32, 1024}, {64, 512},
                        {64, 1024}, {64, 4096}, {128, 2048}, {16, 16384}};
  struct Row {
    Case c;
    int max_ctx, grid_splits, split_keys, copies;
    double gb, us[kDecodeVariants];
  };
  std::vector<Row> table;
  for (const Case& c : cases) {
    if (prefill_only) break;
    const int max_ctx = std::max(4096, c.ctx);
    DecodeSetup s = make_decode(std::vector<int>(c.B, c.ctx), max_ctx, 32, 32, 100 + c.B * 7 + c.ctx);
    char label[64];
    std::snprintf(label, sizeof label, "b%d ctx %d", c.B, c.ctx);
    ok &= check_decode<1>(s, label, true) < 1e-2;
    Row r{c, max_ctx, s.grid_splits, s.split_keys, s.copies, s.kv_bytes * 1e-9, {}};
    const double est = s.kv_bytes / 2.5e12 + 5e-6;
    int calls = std::max(s.copies, int(std::ceil(3e-3 / est)));
    calls = std::min((calls + s.copies - 1) / s.copies * s.copies, 4000);
    for (int v = 0; v < kDecodeVariants; ++v) {
      r.us[v] = NAN;
      if (!variant_available(v)) continue;
      r.us[v] = 1e6 * time_graph([&](int i, cudaStream_t st) { launch_decode<1>(v, s, i % s.copies, st); }, calls);
    }
    table.push_back(r);
    s.free_all();
  }

  ok &= check_prefill_chunks(21);

  std::printf("\nprefill (causal, one sequence, 32 heads, hd 128)\n");
  std::printf("%6s |", "tokens");
  for (int v = 0; v < kPrefillVariants; ++v) std::printf(" %-16s err, TFLOP/s |", kPrefillNames[v]);
  std::printf("\n");
  for (int Tn : {2048, 4096, 8192}) {
    const PrefillResult p = run_prefill(Tn, true, 7 + Tn);
    std::printf("%6d |", Tn);
    for (int v = 0; v < kPrefillVariants; ++v) {
      if (v != kPrefillBase && !prefill_available(v))
        std::printf("     %8s %8s        |", "n/a", "n/a");
      else
        std::printf("     %.2e %8.1f        |", p.err[v], p.tflops[v]);
      ok &= !prefill_available(v) || p.err[v] < 1e-2;
    }
    std::printf("\n");
  }

  if (prefill_only) {
    std::printf("\n%s\n", ok ? "all checks passed" : "SOME CHECKS FAILED");
    return ok ? 0 : 1;
  }
  std::printf("\ndecode (q = 1 row per sequence, 32/32 heads, hd 128, bf16 paged KV (fp8: e4m3, half the MB), 16-slot blocks); copy %.0f GB/s\n",
              copy_bw * 1e-9);
  std::printf("%5s %6s %6s %5s %6s %7s |", "batch", "ctx", "maxctx", "grid", "split", "KV MB");
  for (int v = 0; v < kDecodeVariants; ++v) std::printf(" %-22s|", kDecodeNames[v]);
  std::printf("\n%44s|", "");
  for (int v = 0; v < kDecodeVariants; ++v) std::printf(" %7s %6s %6s |", "us", "GB/s", "%copy");
  std::printf("\n");
  for (const Row& r : table) {
    std::printf("%5d %6d %6d %5d %6d %7.1f |", r.c.B, r.c.ctx, r.max_ctx, r.grid_splits, r.split_keys, r.gb * 1e3);
    for (int v = 0; v < kDecodeVariants; ++v) {
      const double gbs = (decode_is_fp8(v) ? r.gb / 2 : r.gb) / (r.us[v] * 1e-6);
      std::printf(" %7.2f %6.0f %5.1f%% |", r.us[v], gbs, 100 * gbs / (copy_bw * 1e-9));
    }
    std::printf("\n");
  }
  std::printf("\n%s\n", ok ? "all checks passed" : "SOME CHECKS FAILED");
  return ok ? 0 : 1;
}
