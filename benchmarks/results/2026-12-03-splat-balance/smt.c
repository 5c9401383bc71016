#include <stdio.h>
#include <omp.h>
#include <immintrin.h>
#include <stdlib.h>
// Compute-only (FMA chains in registers) and L2-resident-memory work per thread; time with 1 and 2 threads.
static double fma_work(long iters) {
  __m512 a[8]; for (int i = 0; i < 8; ++i) a[i] = _mm512_set1_ps(1.0f + i * 1e-3f);
  const __m512 m = _mm512_set1_ps(0.999999f), c = _mm512_set1_ps(1e-7f);
  for (long k = 0; k < iters; ++k) for (int i = 0; i < 8; ++i) a[i] = _mm512_fmadd_ps(a[i], m, c);
  float s = 0; for (int i = 0; i < 8; ++i) s += _mm512_reduce_add_ps(a[i]); return s;
}
static double scalar_work(long iters) { unsigned long x = 1; for (long k = 0; k < iters; ++k) x = x * 6364136223846793005UL + 1442695040888963407UL ^ (x >> 7); return (double)x; }
static double mem_work(float* buf, long n, int reps) { double s = 0; for (int r = 0; r < reps; ++r) for (long i = 0; i < n; i += 16) { s += buf[i]; buf[i] += 1; } return s; }
int main() {
  long n = 256 * 1024; // 1 MB floats per thread: L2
  float* bufs[2]; for (int t = 0; t < 2; ++t) { bufs[t] = calloc(n, 4); }
  long big = 8L << 20; float* L3[2]; for (int t = 0; t < 2; ++t) L3[t] = calloc(big, 4); // 32 MB each: DRAM-ish
  volatile double sink = 0;
  for (int round = 0; round < 3; ++round) for (int kind = 0; kind < 4; ++kind) for (int th = 1; th <= 2; ++th) {
    double t0 = omp_get_wtime();
    #pragma omp parallel num_threads(th)
    { int t = omp_get_thread_num(); double s = 0;
      if (kind == 0) s = fma_work(50000000);
      else if (kind == 1) s = scalar_work(300000000);
      else if (kind == 2) s = mem_work(bufs[t], n, 2000);
      else s = mem_work(L3[t], big, 20);
      #pragma omp atomic
      sink += s; }
    double dt = omp_get_wtime() - t0;
    printf("round %d %-7s threads %d: %.3f s per thread-unit\n", round, (const char*[]){"fma","scalar","L2mem","bigmem"}[kind], th, dt);
  }
  return 0;
}
