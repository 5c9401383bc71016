// segops' own single-precision matrix product for the CPU convolutions, for CPUs where ATen's BLAS leaves
// the vector units half idle: MKL runs its AVX2 code on AMD processors, so on an AVX-512 AMD CPU
// (Zen 4 / Zen 5) a float GEMM through at::mm reaches about half of what oneDNN's convolutions (AVX-512)
// reach on the same core. This is a packed, cache-blocked GEMM with an AVX-512 register kernel.
//
// Results do not depend on the number of threads: every element of C is computed by one thread, as
// C + S_0 + S_1 + ... over fixed blocks of 256 along K, each S_p a chain of fused multiply-adds in k order.
#pragma once

#include <cstdint>

namespace segops {
namespace cpu {

// Whether sgemm below runs (it returns false otherwise): the CPU has AVX-512 (F, BW, VL, DQ; capped by
// ATEN_CPU_CAPABILITY like ATen's kernels) and SEGOPS_CPU_GEMM says so: "segops" (always), "aten" (never),
// unset or "auto" (on AMD processors only; Intel's MKL has AVX-512 kernels of its own). Read at each call,
// so that one process can compare both.
bool sgemm_enabled();

// C (M x N) = [C +] A (M x K) . B (K x N), every matrix given by its first element and its row and column
// strides (in elements, any layout: a transpose is a swap of strides). accumulate = false overwrites C
// (C is never read then). Runs on ATen's thread pool, or inline when called from inside a parallel region.
// Returns false, touching nothing, when sgemm_enabled() is false.
bool sgemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t rsA, int64_t csA, const float* B, int64_t rsB,
           int64_t csB, float* C, int64_t rsC, int64_t csC, bool accumulate);

}  // namespace cpu
}  // namespace segops
