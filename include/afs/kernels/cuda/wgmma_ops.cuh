// The sm90a warpgroup matrix instructions the Hopper GEMM (gemm_sm90.cuh) issues:
// wgmma.mma_async m64nNk16 with float32 accumulators, A and B both read from shared memory through
// matrix descriptors, both K-major (no transpose). D += A . B^T for a 64 x 16 A tile and an
// N x 16 B tile; the accumulator is N / 2 floats per thread of the warpgroup.
// Two more forms for the Hopper attention kernel (attention_sm90.cuh):
//  * wgmma_ss_init: as wgmma_ss, but D = A . B^T (scale-d = 0: the accumulator's old values are
//    ignored), the first k-step of a fresh product (wgmma_ss with scale_d = 0);
//  * wgmma_rs_mn: D += A . B with A from registers (the m64k16 fragment: four 32-bit registers of
//    16-bit pairs per thread, laid out like the accumulator, see attention_sm90.cuh) and B from
//    shared memory MN-major (imm-trans-b = 1: B[k][n] with n contiguous, e.g. V[key][d]).
//
// Inline assembly cannot build an operand list in a loop: the operand lists are spelled out once
// per accumulator size (AFS_WGMMA_ACC*, AFS_WGMMA_OPS*) and each (type, N) form is stamped from
// one macro per instruction form.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace afs::cuda::sm90 {

// scale_d: 1 adds to d, 0 overwrites it.
template <class T, int N>
__device__ __forceinline__ void wgmma_ss(float* d, uint64_t a, uint64_t b, int scale_d = 1);
template <class T, int N>
__device__ __forceinline__ void wgmma_ss_init(float* d, uint64_t a, uint64_t b) {
  wgmma_ss<T, N>(d, a, b, 0);
}
template <class T, int N>
__device__ __forceinline__ void wgmma_rs_mn(float* d, const uint32_t* a, uint64_t b);

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
// The accumulator: N / 2 floats per thread as "+f" operands %0 .. %(N/2 - 1).
#define AFS_WGMMA_ACC8(i)                                                                                    \
  "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), "+f"(d[i + 6]), \
      "+f"(d[i + 7])
#define AFS_WGMMA_ACC32 AFS_WGMMA_ACC8(0), AFS_WGMMA_ACC8(8), AFS_WGMMA_ACC8(16), AFS_WGMMA_ACC8(24)
#define AFS_WGMMA_ACC64 AFS_WGMMA_ACC32, AFS_WGMMA_ACC8(32), AFS_WGMMA_ACC8(40), AFS_WGMMA_ACC8(48), AFS_WGMMA_ACC8(56)
#define AFS_WGMMA_ACC96                                                                                      \
  AFS_WGMMA_ACC64, AFS_WGMMA_ACC8(64), AFS_WGMMA_ACC8(72), AFS_WGMMA_ACC8(80), AFS_WGMMA_ACC8(88)
#define AFS_WGMMA_ACC128                                                                                       \
  AFS_WGMMA_ACC64, AFS_WGMMA_ACC8(64), AFS_WGMMA_ACC8(72), AFS_WGMMA_ACC8(80), AFS_WGMMA_ACC8(88),            \
      AFS_WGMMA_ACC8(96), AFS_WGMMA_ACC8(104), AFS_WGMMA_ACC8(112), AFS_WGMMA_ACC8(120)
// The same operands in the instruction text.
#define AFS_WGMMA_OPS32                                                             \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "          \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
#define AFS_WGMMA_OPS64                                                               \
  AFS_WGMMA_OPS32 ", "                                                                \
  "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "  \
  "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
#define AFS_WGMMA_OPS96                                                                \
  AFS_WGMMA_OPS64 ", "                                                                 \
  "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, "   \
  "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95"
#define AFS_WGMMA_OPS128                                                                            \
  AFS_WGMMA_OPS64 ", "                                                                              \
  "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, "                \
  "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, "                \
  "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, "    \
  "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127"

// D (+)= A . B^T, A and B K-major in shared memory; operands after the accumulator: A, B, scale-d.
#define AFS_WGMMA_SS(T, PTX_T, N, OPS, ACC, A, B, SCALE)                                                  \
  template <>                                                                                          \
  __device__ __forceinline__ void wgmma_ss<T, N>(float* d, uint64_t a, uint64_t b, int scale_d) {     \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " SCALE ", 0;\n"                                    \
                 "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." PTX_T "." PTX_T " {" OPS "}, " A ", " B \
                 ", p, 1, 1, 0, 0;\n}\n"                                                                 \
                 : ACC                                                                                 \
                 : "l"(a), "l"(b), "r"(scale_d));                                                      \
  }
// D += A . B, A from registers (4 x 32 bits), B MN-major in shared memory; operands after the
// accumulator: the four A registers, B, scale-d.
#define AFS_WGMMA_RS_MN(T, PTX_T, N, OPS, ACC, A, B, SCALE)                                                \
  template <>                                                                                           \
  __device__ __forceinline__ void wgmma_rs_mn<T, N>(float* d, const uint32_t* a, uint64_t b) {         \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " SCALE ", 0;\n"                                     \
                 "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." PTX_T "." PTX_T " {" OPS "}, " A ", " B  \
                 ", p, 1, 1, 1;\n}\n"                                                                     \
                 : ACC                                                                                  \
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(1));                        \
  }

AFS_WGMMA_SS(__nv_bfloat16, "bf16", 64, AFS_WGMMA_OPS32, AFS_WGMMA_ACC32, "%32", "%33", "%34")
AFS_WGMMA_SS(__half, "f16", 64, AFS_WGMMA_OPS32, AFS_WGMMA_ACC32, "%32", "%33", "%34")
AFS_WGMMA_SS(__nv_bfloat16, "bf16", 128, AFS_WGMMA_OPS64, AFS_WGMMA_ACC64, "%64", "%65", "%66")
AFS_WGMMA_SS(__half, "f16", 128, AFS_WGMMA_OPS64, AFS_WGMMA_ACC64, "%64", "%65", "%66")
AFS_WGMMA_SS(__nv_bfloat16, "bf16", 192, AFS_WGMMA_OPS96, AFS_WGMMA_ACC96, "%96", "%97", "%98")
AFS_WGMMA_SS(__half, "f16", 192, AFS_WGMMA_OPS96, AFS_WGMMA_ACC96, "%96", "%97", "%98")
AFS_WGMMA_SS(__nv_bfloat16, "bf16", 256, AFS_WGMMA_OPS128, AFS_WGMMA_ACC128, "%128", "%129", "%130")
AFS_WGMMA_SS(__half, "f16", 256, AFS_WGMMA_OPS128, AFS_WGMMA_ACC128, "%128", "%129", "%130")
AFS_WGMMA_RS_MN(__nv_bfloat16, "bf16", 64, AFS_WGMMA_OPS32, AFS_WGMMA_ACC32, "{%32, %33, %34, %35}", "%36", "%37")
AFS_WGMMA_RS_MN(__half, "f16", 64, AFS_WGMMA_OPS32, AFS_WGMMA_ACC32, "{%32, %33, %34, %35}", "%36", "%37")
AFS_WGMMA_RS_MN(__nv_bfloat16, "bf16", 128, AFS_WGMMA_OPS64, AFS_WGMMA_ACC64, "{%64, %65, %66, %67}", "%68", "%69")
AFS_WGMMA_RS_MN(__half, "f16", 128, AFS_WGMMA_OPS64, AFS_WGMMA_ACC64, "{%64, %65, %66, %67}", "%68", "%69")

#undef AFS_WGMMA_RS_MN
#undef AFS_WGMMA_SS
#undef AFS_WGMMA_OPS128
#undef AFS_WGMMA_OPS96
#undef AFS_WGMMA_OPS64
#undef AFS_WGMMA_OPS32
#undef AFS_WGMMA_ACC128
#undef AFS_WGMMA_ACC96
#undef AFS_WGMMA_ACC64
#undef AFS_WGMMA_ACC32
#undef AFS_WGMMA_ACC8
#endif  // sm90a

}  // namespace afs::cuda::sm90
