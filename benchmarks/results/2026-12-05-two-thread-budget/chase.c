#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>
#include <omp.h>
int main(int argc, char** argv) {
  int T = atoi(argv[1]); long kb = atol(argv[2]);
  long n = kb * 1024 / 8;
  double best = 1e9;
  uint64_t** bufs = malloc(sizeof(void*) * 2);
  for (int t = 0; t < 2; t++) {
    uint64_t* b = aligned_alloc(64, n * 8);
    // random cyclic permutation (pointer chase)
    long* perm = malloc(n * sizeof(long));
    for (long i = 0; i < n; i++) perm[i] = i;
    srand(1 + t); for (long i = n - 1; i > 0; i--) { long j = rand() % (i + 1); long x = perm[i]; perm[i] = perm[j]; perm[j] = x; }
    for (long i = 0; i < n; i++) b[perm[i]] = perm[(i + 1) % n];
    free(perm); bufs[t] = b;
  }
  for (int r = 0; r < 5; r++) {
    double t0 = omp_get_wtime();
    #pragma omp parallel num_threads(T)
    {
      uint64_t* b = bufs[omp_get_thread_num()]; uint64_t p = 0;
      for (long i = 0; i < 20000000L; i++) p = b[p];
      if (p == 12345678) printf("x");
    }
    double t = omp_get_wtime() - t0; if (t < best) best = t;
  }
  printf("chase %ld KB per thread, T=%d: %.2f ns/load\n", kb, T, best / 20000000 * 1e9);
}
