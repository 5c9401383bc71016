#include "segops/cpu_gemm.h"
#include <chrono>
#include <cstdio>
#include <vector>
#include <cstdlib>
#include <ATen/Parallel.h>
// layouts: fwd (A row-major MxK, B row-major KxN), wgrad (A row-major MxK, B^T: B stored NxK), adj (A = W^T: stored KxM)
int main(int argc, char** argv) {
  at::set_num_threads(1);
  setenv("SEGOPS_CPU_GEMM", "segops", 1);
  int64_t M = atoi(argv[1]), N = atoi(argv[2]), K = atoi(argv[3]); int layout = atoi(argv[4]);
  std::vector<float> A(M*K), B(K*N), C(M*N);
  for (auto& v : A) v = rand() / float(RAND_MAX); for (auto& v : B) v = rand() / float(RAND_MAX);
  int64_t rsA = K, csA = 1, rsB = N, csB = 1;
  if (layout == 1) { rsB = 1; csB = K; }
  if (layout == 2) { rsA = 1; csA = M; }
  double best = 1e9;
  for (int rep = 0; rep < 20; ++rep) {
    auto t0 = std::chrono::steady_clock::now();
    segops::cpu::sgemm(M, N, K, A.data(), rsA, csA, B.data(), rsB, csB, C.data(), N, 1, true);
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  printf("%.0f ", 2.0*M*N*K/best/1e9);
}
