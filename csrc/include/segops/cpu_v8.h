// Eight-float vectors for the CPU kernels' hand-written loops (GCC vector types: two SSE registers at the baseline
// flags, one YMM register in the AVX2 / AVX-512 clones), and the 8 x 8 transpose that turns channel planes into
// point-major rows and back.
#pragma once

#include <cstdint>

#include "segops/hd.h"

namespace segops {
namespace cpu {

typedef float v8 __attribute__((vector_size(32)));

SEGOPS_LATTICE_INLINE v8 load8(const float* p) {
  v8 r;
  __builtin_memcpy(&r, p, sizeof(v8));
  return r;
}
SEGOPS_LATTICE_INLINE void store8(float* p, v8 r) { __builtin_memcpy(p, &r, sizeof(v8)); }
// (v8{x, ..., x} compiled to four inserts and a lane insert in the AVX2 clones; a shuffle of lane 0 is one
// broadcast, and keeps a -0.0 as it is, which v8{} + x would not)
SEGOPS_LATTICE_INLINE v8 splat8(float x) {
  const v8 r = {x};
  return __builtin_shufflevector(r, r, 0, 0, 0, 0, 0, 0, 0, 0);
}

// r[i][j] -> r[j][i] (class-major <-> point-major tiles), three rounds of two-input shuffles.
SEGOPS_LATTICE_INLINE void transpose8(v8* r) {
  v8 t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = __builtin_shufflevector(r[i], r[i + 1], 0, 8, 1, 9, 4, 12, 5, 13);
    t[i + 1] = __builtin_shufflevector(r[i], r[i + 1], 2, 10, 3, 11, 6, 14, 7, 15);
  }
  for (int i = 0; i < 8; i += 4) {
    u[i] = __builtin_shufflevector(t[i], t[i + 2], 0, 1, 8, 9, 4, 5, 12, 13);
    u[i + 1] = __builtin_shufflevector(t[i], t[i + 2], 2, 3, 10, 11, 6, 7, 14, 15);
    u[i + 2] = __builtin_shufflevector(t[i + 1], t[i + 3], 0, 1, 8, 9, 4, 5, 12, 13);
    u[i + 3] = __builtin_shufflevector(t[i + 1], t[i + 3], 2, 3, 10, 11, 6, 7, 14, 15);
  }
  for (int j = 0; j < 4; ++j) {
    r[j] = __builtin_shufflevector(u[j], u[j + 4], 0, 1, 2, 3, 8, 9, 10, 11);
    r[j + 4] = __builtin_shufflevector(u[j], u[j + 4], 4, 5, 6, 7, 12, 13, 14, 15);
  }
}

// Points [0, np) of C planes N floats apart (plane c at src + c N) -> rows of `stride` floats (stride a multiple
// of 8 >= C), columns C .. round_up(C, 8) - 1 zero: 8 x 8 tiles through registers, the last np % 8 points one value
// at a time.
SEGOPS_LATTICE_INLINE void planes_to_rows(const float* src, float* dst, int64_t C, int64_t N, int64_t stride,
                                          int64_t np) {
  int64_t p = 0;
  for (; p + 8 <= np; p += 8) {
    for (int64_t c = 0; c < C; c += 8) {
      v8 r[8];
      for (int64_t i = 0; i < 8; ++i) r[i] = c + i < C ? load8(src + (c + i) * N + p) : splat8(0.f);
      transpose8(r);
      for (int64_t j = 0; j < 8; ++j) store8(dst + (p + j) * stride + c, r[j]);
    }
  }
  const int64_t Cp = (C + 7) / 8 * 8;
  for (; p < np; ++p)
    for (int64_t k = 0; k < Cp; ++k) dst[p * stride + k] = k < C ? src[k * N + p] : 0.f;
}

}  // namespace cpu
}  // namespace segops
