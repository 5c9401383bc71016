#include <stdio.h>
#include <stdlib.h>
#include <omp.h>
#include <immintrin.h>
int main(int argc, char** argv) {
  int T = atoi(argv[1]);
  double best = 1e9;
  for (int r = 0; r < 5; r++) {
    double t = omp_get_wtime();
    #pragma omp parallel num_threads(T)
    {
      __m512 a0 = _mm512_set1_ps(1.0f), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
      __m512 m = _mm512_set1_ps(0.9999f), c = _mm512_set1_ps(0.0001f);
      for (long i = 0; i < 50000000L; i++) {
        a0 = _mm512_fmadd_ps(a0, m, c); a1 = _mm512_fmadd_ps(a1, m, c); a2 = _mm512_fmadd_ps(a2, m, c); a3 = _mm512_fmadd_ps(a3, m, c);
        a4 = _mm512_fmadd_ps(a4, m, c); a5 = _mm512_fmadd_ps(a5, m, c); a6 = _mm512_fmadd_ps(a6, m, c); a7 = _mm512_fmadd_ps(a7, m, c);
      }
      __m512 s = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)), _mm512_add_ps(_mm512_add_ps(a4, a5), _mm512_add_ps(a6, a7)));
      if (_mm512_reduce_add_ps(s) == 42.f) printf("x");
    }
    t = omp_get_wtime() - t; if (t < best) best = t;
  }
  printf("FMA throughput T=%d: %.3f s\n", T, best);
}
