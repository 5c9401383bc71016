// CUDA launch policy of softmax_losses_host.h: the forward functors run under the one-launch deterministic
// reduction of parallel_cuda.cuh (loss sum and denominator finished by the grid's last block), the backward
// functors under a grid-stride loop that writes every gradient element. Same functors as the CPU's.
#pragma once

#include "segops/parallel_cuda.cuh"
#include "segops/softmax_losses_math.h"

namespace segops {

struct CudaLossLaunch {
  static constexpr bool kHostMemory = false;

  template <typename Sum, typename F, typename Fin>
  void reduce(index_t n, const F& f, const Fin& fin) const {
    cuda_parallel_reduce<Sum>(n, f, fin);
  }
  template <typename F>
  void for_each(index_t n, const F& f) const {
    cuda_parallel_for(n, f);
  }
};

}  // namespace segops
