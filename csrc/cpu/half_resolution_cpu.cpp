// CPU backend of the CRF losses' half-resolution resize: the shared glue over at::parallel_for, a whole output
// row (forward) or input row (backward) per work item, run in an AVX2 clone where the CPU has AVX2.
#include <torch/library.h>

#include "segops/cpu_isa.h"
#include "segops/half_resolution_host.h"

namespace segops {
namespace {

#if defined(SEGOPS_CPU_MULTI_ISA)
// The rows compiled for AVX2: the forward's pairs of columns are split into even and odd lanes by shuffles, 8
// outputs per iteration instead of the baseline build's 4. Each lane adds and multiplies as the scalar code
// does (no FMA: nothing to contract in a sum followed by one product), so both give the same bits.
template <typename F>
__attribute__((target("avx2"))) void items_avx2(const F& f, int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i) f(i);
}
#endif

// CpuLaunch with the items run by items_avx2 where the CPU has it. The ECCV'18 segmentation at 512^2, K = 21,
// caches flushed before each call: forward 1.93-2.02 -> 1.73-1.78 ms on one thread, 1.03-1.04 -> 0.94-0.95 on
// two (it reads 22 MB); the backward, which only writes, unchanged.
struct RowLaunch : CpuLaunch {
  template <typename F>
  void operator()(index_t n, const F& f, index_t cost) const {
    omp_parallel_for(0, n, grain_for(cost), [&](int64_t begin, int64_t end) {
#if defined(SEGOPS_CPU_MULTI_ISA)
      if (block::avx2_clones()) return items_avx2(f, begin, end);
#endif
      for (int64_t i = begin; i < end; ++i) f(i);
    });
  }
};

at::Tensor forward_cpu(const at::Tensor& x) { return half_resolution::forward(x, RowLaunch{}); }

at::Tensor backward_cpu(const at::Tensor& grad, at::IntArrayRef size) {
  return half_resolution::backward(grad, size, RowLaunch{});
}

}  // namespace

TORCH_LIBRARY_IMPL(segops, CPU, m) {
  m.impl("_half_resolution", &forward_cpu);
  m.impl("_half_resolution_backward", &backward_cpu);
}

}  // namespace segops
