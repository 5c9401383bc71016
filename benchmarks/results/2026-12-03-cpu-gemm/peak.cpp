#include <immintrin.h>
#include <chrono>
#include <cstdio>
#include <algorithm>
__attribute__((target("avx512f"))) float run(long n) {
  __m512 r[24]; for (int i = 0; i < 24; ++i) r[i] = _mm512_set1_ps(i * 0.001f);
  const __m512 a = _mm512_set1_ps(0.9999f), b = _mm512_set1_ps(0.0001f);
  for (long k = 0; k < n; ++k) {
#pragma GCC unroll 24
    for (int i = 0; i < 24; ++i) r[i] = _mm512_fmadd_ps(r[i], a, b);
  }
  __m512 s = r[0]; for (int i = 1; i < 24; ++i) s = _mm512_add_ps(s, r[i]);
  return _mm512_reduce_add_ps(s);
}
int main() {
  long n = 20000000; double best = 1e9; float x = 0;
  for (int rep = 0; rep < 5; ++rep) { auto t0 = std::chrono::steady_clock::now(); x += run(n); best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count()); }
  printf("peak %.0f GFLOP/s (%g)\n", 24.0 * 16 * 2 * n / best / 1e9, x);
}
