// segops::cpu::sgemm (segops/cpu_gemm.h): a packed, cache-blocked single-precision GEMM with an AVX-512
// register kernel, in the usual three-level blocking:
//   for each panel of NC columns of B, for each block of KC rows of it: pack B[KC x NC] into slivers of NR
//   columns (k-major); for each block of MC rows of A: pack A[MC x KC] into slivers of MR rows (k-major); then
//   the register kernel over every (MR x NR) tile of C: MR x NR accumulators, per k one broadcast of each of
//   the MR values of A and two vector loads of B.
// Sizes for a 48 KiB L1 / 1 MiB L2 core: a B sliver (KC x NR floats, 32 KiB) stays in L1 while the A block
// (MC x KC, 192 KiB) streams from L2; the B panel (2 MiB) lives in L3.
#include "segops/cpu_gemm.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include <c10/util/Exception.h>

#include "segops/cpu_isa.h"
#include "segops/parallel.h"

#if defined(SEGOPS_CPU_MULTI_ISA)
#include <immintrin.h>
// GCC 12's AVX-512 shuffle intrinsics pass _mm512_undefined_ps() as the unused merge source, which its
// -Wmaybe-uninitialized reports once inlined (a known false positive).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace segops {
namespace cpu {

bool sgemm_enabled() {
#if defined(SEGOPS_CPU_MULTI_ISA)
  if (block::cpu_isa() != block::Isa::kAvx512) return false;
  const char* v = std::getenv("SEGOPS_CPU_GEMM");
  if (v && std::strcmp(v, "segops") == 0) return true;
  if (v && std::strcmp(v, "aten") == 0) return false;
  static const bool amd = [] {
    __builtin_cpu_init();
    return __builtin_cpu_is("amd") != 0;
  }();
  return amd;
#else
  return false;
#endif
}

#if defined(SEGOPS_CPU_MULTI_ISA)
namespace {

constexpr int64_t MR = 12;  // 24 accumulators + 2 B vectors + 1 broadcast: 27 of the 32 zmm registers
constexpr int64_t NR = 32;  // two 16-float vectors
constexpr int64_t KC = 256;
constexpr int64_t MC = MR * 16;
constexpr int64_t NC = NR * 64;

// One thread's packing buffers, kept for its next call (64-byte aligned: the kernel's B loads are aligned).
struct PackBuffers {
  float* a = nullptr;
  float* b = nullptr;
  PackBuffers() {
    if (posix_memalign(reinterpret_cast<void**>(&a), 64, sizeof(float) * MC * KC) != 0) a = nullptr;
    if (posix_memalign(reinterpret_cast<void**>(&b), 64, sizeof(float) * KC * NC) != 0) b = nullptr;
  }
  ~PackBuffers() {
    std::free(a);
    std::free(b);
  }
};

// c[i * ldc + j] (+)= sum over k < kc of a[k * MR + i] b[k * NR + j] for i < R, j < 16 V (the full tile: R = MR,
// V = 2): per element one chain of fused multiply-adds in k order, then (accumulate) added to what C held. Edge
// tiles use the smallest R (a multiple of 4) and V that cover them: the same chain per element, less wasted work.
template <int R, int V>
__attribute__((target("avx512f"))) void kernel_tile(int64_t kc, const float* __restrict a,
                                                    const float* __restrict b, float* c, int64_t ldc,
                                                    bool accumulate) {
  __m512 r[R][V];
#pragma GCC unroll 12
  for (int i = 0; i < R; ++i)
    for (int v = 0; v < V; ++v) r[i][v] = _mm512_setzero_ps();
  for (int64_t k = 0; k < kc; ++k) {
    __m512 bv[V];
    for (int v = 0; v < V; ++v) bv[v] = _mm512_load_ps(b + 16 * v);
#pragma GCC unroll 12
    for (int i = 0; i < R; ++i) {
      const __m512 ai = _mm512_set1_ps(a[i]);
      for (int v = 0; v < V; ++v) r[i][v] = _mm512_fmadd_ps(ai, bv[v], r[i][v]);
    }
    a += MR;
    b += NR;
  }
#pragma GCC unroll 12
  for (int i = 0; i < R; ++i) {
    float* ci = c + i * ldc;
    for (int v = 0; v < V; ++v) {
      if (accumulate) r[i][v] = _mm512_add_ps(_mm512_loadu_ps(ci + 16 * v), r[i][v]);
      _mm512_storeu_ps(ci + 16 * v, r[i][v]);
    }
  }
}

// An m x n edge tile (m <= MR, n <= NR) into tile (ldc NR, overwritten).
void kernel_edge(int64_t m, int64_t n, int64_t kc, const float* a, const float* b, float* tile) {
  const bool narrow = n <= 16;
  if (m <= 4) {
    narrow ? kernel_tile<4, 1>(kc, a, b, tile, NR, false) : kernel_tile<4, 2>(kc, a, b, tile, NR, false);
  } else if (m <= 8) {
    narrow ? kernel_tile<8, 1>(kc, a, b, tile, NR, false) : kernel_tile<8, 2>(kc, a, b, tile, NR, false);
  } else {
    narrow ? kernel_tile<MR, 1>(kc, a, b, tile, NR, false) : kernel_tile<MR, 2>(kc, a, b, tile, NR, false);
  }
}

// The packing routines move O(K (M + N)) floats for O(M N K) multiply-adds, but a scalar element-by-element copy
// of a transposed operand (the weight gradient's B, the forward's weight rows) cost 10-30% of the products; these
// move 16 floats per instruction, transposing 16 x 16 blocks in registers where the source runs along k.

// r[0..15] <- its transpose (r[i] lane j <- r[j] lane i).
__attribute__((target("avx512f"), always_inline)) inline void transpose16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    r[4 * i] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
    r[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
    r[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    r[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
  }
  for (int h = 0; h < 2; ++h)
    for (int i = 0; i < 4; ++i) {
      t[8 * h + i] = _mm512_shuffle_f32x4(r[8 * h + i], r[8 * h + i + 4], 0x88);
      t[8 * h + i + 4] = _mm512_shuffle_f32x4(r[8 * h + i], r[8 * h + i + 4], 0xDD);
    }
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xDD);
  }
}

__attribute__((target("avx512f"), always_inline)) inline __mmask16 first(int64_t n) {
  return static_cast<__mmask16>(n >= 16 ? 0xFFFF : (1u << n) - 1u);
}

// dst[k * ld + j] = src(j, k) for j < rows (<= 16; zero for j in [rows, 16) where width allows) and k < kc, the
// source running along k (src(j, k) = src[j * stride + k]); `width` lanes of each destination row are written.
__attribute__((target("avx512f"))) void transpose_rows(const float* src, int64_t stride, int64_t rows, int64_t kc,
                                                       float* dst, int64_t ld, int width) {
  const __mmask16 out = first(width);
  for (int64_t k0 = 0; k0 < kc; k0 += 16) {
    const __mmask16 in = first(kc - k0);
    __m512 r[16];
    for (int64_t j = 0; j < 16; ++j)
      r[j] = j < rows ? _mm512_maskz_loadu_ps(in, src + j * stride + k0) : _mm512_setzero_ps();
    transpose16(r);
    const int64_t kk = std::min<int64_t>(16, kc - k0);
    for (int64_t k = 0; k < kk; ++k) _mm512_mask_storeu_ps(dst + (k0 + k) * ld, out, r[k]);
  }
}

// A block (mc x kc at A) -> slivers of MR rows, [k][i], zero rows past mc.
__attribute__((target("avx512f"))) void pack_a(const float* A, int64_t rsA, int64_t csA, int64_t mc, int64_t kc,
                                               float* dst) {
  for (int64_t s = 0; s < mc; s += MR) {
    const int64_t m = std::min(MR, mc - s);
    float* d = dst + s * kc;
    const float* a = A + s * rsA;
    if (rsA == 1) {  // the sliver's column k is contiguous: one masked copy per k
      const __mmask16 in = first(m);
      for (int64_t k = 0; k < kc; ++k)
        _mm512_mask_storeu_ps(d + k * MR, first(MR), _mm512_maskz_loadu_ps(in, a + k * csA));
    } else if (csA == 1) {  // rows run along k: transposed in 16 x 16 blocks, MR of the 16 lanes kept
      transpose_rows(a, rsA, m, kc, d, MR, MR);
    } else {
      for (int64_t i = 0; i < MR; ++i)
        for (int64_t k = 0; k < kc; ++k) d[k * MR + i] = i < m ? a[i * rsA + k * csA] : 0.f;
    }
  }
}

// B panel (kc x nc at B) -> slivers of NR columns, [k][j], zero columns past nc.
__attribute__((target("avx512f"))) void pack_b(const float* B, int64_t rsB, int64_t csB, int64_t kc, int64_t nc,
                                               float* dst) {
  for (int64_t t = 0; t < nc; t += NR) {
    const int64_t n = std::min(NR, nc - t);
    float* d = dst + t * kc;
    if (csB == 1) {  // rows of B are contiguous: two masked 16-float copies per k
      const __mmask16 lo = first(n), hi = first(std::max<int64_t>(0, n - 16));
      for (int64_t k = 0; k < kc; ++k) {
        const float* b = B + k * rsB + t;
        _mm512_store_ps(d + k * NR, _mm512_maskz_loadu_ps(lo, b));
        _mm512_store_ps(d + k * NR + 16, _mm512_maskz_loadu_ps(hi, b + 16));
      }
    } else if (rsB == 1) {  // columns run along k: transposed in 16 x 16 blocks
      for (int64_t h = 0; h < NR; h += 16)
        transpose_rows(B + (t + h) * csB, csB, std::max<int64_t>(0, std::min<int64_t>(16, n - h)), kc, d + h, NR,
                       16);
    } else {
      for (int64_t j = 0; j < NR; ++j)
        for (int64_t k = 0; k < kc; ++k) d[k * NR + j] = j < n ? B[k * rsB + (t + j) * csB] : 0.f;
    }
  }
}

// The whole blocked product of one task's part of C, on this thread.
void gemm_serial(int64_t M, int64_t N, int64_t K, const float* A, int64_t rsA, int64_t csA, const float* B,
                 int64_t rsB, int64_t csB, float* C, int64_t rsC, int64_t csC, bool accumulate) {
  static thread_local PackBuffers buf;
  TORCH_CHECK(buf.a != nullptr && buf.b != nullptr, "segops sgemm: could not allocate its packing buffers");
  alignas(64) float tile[MR * NR];
  for (int64_t jc = 0; jc < N; jc += NC) {
    const int64_t nc = std::min(NC, N - jc);
    for (int64_t pc = 0; pc < K; pc += KC) {
      const int64_t kc = std::min(KC, K - pc);
      const bool acc = accumulate || pc > 0;
      pack_b(B + pc * rsB + jc * csB, rsB, csB, kc, nc, buf.b);
      for (int64_t ic = 0; ic < M; ic += MC) {
        const int64_t mc = std::min(MC, M - ic);
        pack_a(A + ic * rsA + pc * csA, rsA, csA, mc, kc, buf.a);
        for (int64_t jr = 0; jr < nc; jr += NR) {
          const int64_t n = std::min(NR, nc - jr);
          for (int64_t ir = 0; ir < mc; ir += MR) {
            const int64_t m = std::min(MR, mc - ir);
            float* c = C + (ic + ir) * rsC + (jc + jr) * csC;
            if (m == MR && n == NR && csC == 1) {
              kernel_tile<MR, 2>(kc, buf.a + ir * kc, buf.b + jr * kc, c, rsC, acc);
              continue;
            }
            // edge tile or strided C: the same arithmetic into a tile, then copied
            kernel_edge(m, n, kc, buf.a + ir * kc, buf.b + jr * kc, tile);
            for (int64_t i = 0; i < m; ++i)
              for (int64_t j = 0; j < n; ++j) {
                float& dst = c[i * rsC + j * csC];
                dst = acc ? dst + tile[i * NR + j] : tile[i * NR + j];
              }
          }
        }
      }
    }
  }
}

}  // namespace
#endif

bool sgemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t rsA, int64_t csA, const float* B, int64_t rsB,
           int64_t csB, float* C, int64_t rsC, int64_t csC, bool accumulate) {
#if defined(SEGOPS_CPU_MULTI_ISA)
  if (!sgemm_enabled()) return false;
  if (M <= 0 || N <= 0) return true;
  if (K <= 0) {
    if (!accumulate)
      for (int64_t i = 0; i < M; ++i)
        for (int64_t j = 0; j < N; ++j) C[i * rsC + j * csC] = 0.f;
    return true;
  }
  // Tasks split C into column ranges (whole NR slivers) or, when C is narrow, row ranges (whole MR slivers):
  // no element is shared, so the split changes no bit. One task per thread when each has >= 2^22 flops.
  const double flops = 2.0 * double(M) * double(N) * double(K);
  const int64_t threads = at::in_parallel_region() ? 1 : at::get_num_threads();
  const int64_t tasks = std::max<int64_t>(1, std::min<int64_t>(threads, int64_t(flops / double(int64_t(1) << 22))));
  const int64_t col_slivers = (N + NR - 1) / NR, row_slivers = (M + MR - 1) / MR;
  const bool by_cols = col_slivers >= 2 * tasks || col_slivers >= row_slivers;
  const int64_t slivers = by_cols ? col_slivers : row_slivers;
  const int64_t parts = std::min(tasks, slivers);
  if (parts <= 1) {
    gemm_serial(M, N, K, A, rsA, csA, B, rsB, csB, C, rsC, csC, accumulate);
    return true;
  }
  omp_parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t s0 = slivers * p / parts, s1 = slivers * (p + 1) / parts;
      if (by_cols) {
        const int64_t j0 = s0 * NR, j1 = std::min(N, s1 * NR);
        gemm_serial(M, j1 - j0, K, A, rsA, csA, B + j0 * csB, rsB, csB, C + j0 * csC, rsC, csC, accumulate);
      } else {
        const int64_t i0 = s0 * MR, i1 = std::min(M, s1 * MR);
        gemm_serial(i1 - i0, N, K, A + i0 * rsA, rsA, csA, B, rsB, csB, C + i0 * rsC, rsC, csC, accumulate);
      }
    }
  });
  return true;
#else
  (void)M, (void)N, (void)K, (void)A, (void)rsA, (void)csA, (void)B, (void)rsB, (void)csB, (void)C, (void)rsC,
      (void)csC, (void)accumulate;
  return false;
#endif
}

}  // namespace cpu
}  // namespace segops
