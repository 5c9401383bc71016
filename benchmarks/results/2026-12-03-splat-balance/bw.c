#include <stdio.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>
// Read bandwidth (sum of floats, AVX-512 via -O3) per thread, 1 and 2 threads, for per-thread buffers of several sizes.
#include <immintrin.h>
__attribute__((noinline)) static float sum(const float* a, long n) { __m512 s[8]; for (int j = 0; j < 8; ++j) s[j] = _mm512_setzero_ps(); for (long i = 0; i < n; i += 128) for (int j = 0; j < 8; ++j) s[j] = _mm512_add_ps(s[j], _mm512_load_ps(a + i + 16 * j)); for (int j = 1; j < 8; ++j) s[0] = _mm512_add_ps(s[0], s[j]); return _mm512_reduce_add_ps(s[0]); }
int main() {
  long sizes[] = {1L<<20, 4L<<20, 12L<<20, 128L<<20};  // bytes per thread
  float* buf[2]; for (int t = 0; t < 2; ++t) { buf[t] = aligned_alloc(64, 128L<<20); memset(buf[t], 1, 128L<<20); }
  volatile float sink = 0;
  for (int round = 0; round < 2; ++round)
  for (int si = 0; si < 4; ++si) {
    long bytes = sizes[si], n = bytes / 4; long reps = (1L<<31) / bytes; if (reps < 2) reps = 2;
    double gbs[3];
    for (int th = 1; th <= 2; ++th) {
      double t0 = omp_get_wtime();
      #pragma omp parallel num_threads(th)
      { int t = omp_get_thread_num(); float s = 0; for (long r = 0; r < reps; ++r) { __asm__ volatile("" : : "r"(buf[t]) : "memory"); s += sum(buf[t], n); }
        #pragma omp atomic
        sink += s; }
      double dt = omp_get_wtime() - t0;
      gbs[th] = th * (double)bytes * reps / dt / 1e9;
    }
    printf("round %d per-thread %4ld MB: 1 thread %.1f GB/s, 2 threads %.1f GB/s (%.2fx)\n", round, bytes >> 20, gbs[1], gbs[2], gbs[2] / gbs[1]);
  }
}
