// correctness of sgemm against a double reference for all stride layouts
#include "segops/cpu_gemm.h"
#include <cstdio>
#include <cstdlib>
#include <cmath>
#include <vector>
#include <ATen/Parallel.h>
int main() {
  setenv("SEGOPS_CPU_GEMM", "segops", 1);
  int bad = 0, runs = 0;
  for (int64_t M : {1, 5, 12, 13, 40, 200}) for (int64_t N : {1, 7, 16, 17, 33, 70}) for (int64_t K : {1, 3, 16, 17, 300}) {
    for (int la = 0; la < 3; ++la) for (int lb = 0; lb < 3; ++lb) for (int lc = 0; lc < 3; ++lc) {
      // layouts: 0 row-major, 1 column-major, 2 padded general strides
      auto strides = [](int l, int64_t R, int64_t C, int64_t& rs, int64_t& cs, int64_t& size) {
        if (l == 0) { rs = C; cs = 1; size = R * C; }
        else if (l == 1) { rs = 1; cs = R; size = R * C; }
        else { rs = 3 * C + 1; cs = 3; size = R * rs; }
      };
      int64_t rsA, csA, sA, rsB, csB, sB, rsC, csC, sC;
      strides(la, M, K, rsA, csA, sA); strides(lb, K, N, rsB, csB, sB); strides(lc, M, N, rsC, csC, sC);
      std::vector<float> A(sA), B(sB), C(sC), C0;
      for (auto& v : A) v = rand() / float(RAND_MAX) - 0.5f;
      for (auto& v : B) v = rand() / float(RAND_MAX) - 0.5f;
      for (auto& v : C) v = rand() / float(RAND_MAX) - 0.5f;
      C0 = C;
      bool acc = (M + N + K) % 2;
      segops::cpu::sgemm(M, N, K, A.data(), rsA, csA, B.data(), rsB, csB, C.data(), rsC, csC, acc);
      ++runs;
      for (int64_t i = 0; i < M; ++i) for (int64_t j = 0; j < N; ++j) {
        double ref = acc ? C0[i * rsC + j * csC] : 0.0, mag = std::fabs(ref);
        for (int64_t k = 0; k < K; ++k) { double p = double(A[i * rsA + k * csA]) * B[k * rsB + j * csB]; ref += p; mag += std::fabs(p); }
        if (std::fabs(C[i * rsC + j * csC] - ref) > (K + 2) * 6e-8 * mag + 1e-30) { if (bad++ < 5) printf("bad M%ld N%ld K%ld la%d lb%d lc%d i%ld j%ld %g vs %g\n", M, N, K, la, lb, lc, i, j, C[i*rsC+j*csC], ref); }
      }
      // elements of C outside the matrix untouched (padded layout)
      std::vector<char> in(sC, 0);
      for (int64_t i = 0; i < M; ++i) for (int64_t j = 0; j < N; ++j) in[i * rsC + j * csC] = 1;
      for (int64_t e = 0; e < sC; ++e) if (!in[e] && C[e] != C0[e]) { if (bad++ < 5) printf("wrote outside at %ld\n", e); }
    }
  }
  printf("%d runs, %d bad\n", runs, bad);
}
