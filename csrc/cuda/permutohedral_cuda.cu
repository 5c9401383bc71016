// CUDA backend of the permutohedral filter: the shared glue and math (permutohedral_math.h) run in
// grid-stride kernels on the current stream; memory comes from PyTorch's caching allocator.
// Lattice construction inserts into per-image hash tables with atomicCAS; the splat uses float atomicAdd,
// so the rounding of a vertex's sum depends on the order the threads arrive in (results are
// reproducible to float rounding, not bitwise). Blur and slice are gathers (deterministic).
#include <torch/library.h>

#include <c10/cuda/CUDAGuard.h>

#include "segops/parallel_cuda.cuh"
#include "segops/permutohedral_host.h"

namespace segops {
namespace {

struct CudaBackend {
  template <typename F>
  static void launch(index_t n, const F& f, index_t /*grain*/) {
    cuda_parallel_for(n, f, 256);
  }

  template <typename F>
  static void ranged(index_t n, const F& f, index_t /*grain*/) {
    cuda_parallel_for(n, f, 128);
  }

  static at::Tensor inclusive_scan(const at::Tensor& flag) { return at::cumsum(flag, 0, at::kLong); }

  template <typename scalar_t, typename acc>
  static void splat(const lattice::SplatAtomic<scalar_t, acc>& p, index_t BN, index_t /*M*/,
                    const int64_t* /*image_lo*/, const int64_t* /*image_hi*/) {
    cuda_parallel_for(BN, p, 256);
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> permutohedral_filter_cuda(
    const at::Tensor& values, const at::Tensor& features, bool normalize) {
  const c10::cuda::CUDAGuard guard(values.device());
  return lattice::filter_forward<CudaBackend>(values, features, normalize);
}

at::Tensor permutohedral_filter_backward_cuda(const at::Tensor& grad, const at::Tensor& vertex,
                                              const at::Tensor& bary, const at::Tensor& neighbors,
                                              const at::Tensor& norm, bool normalize, bool transposed) {
  const c10::cuda::CUDAGuard guard(grad.device());
  return lattice::filter_backward<CudaBackend>(grad, vertex, bary, neighbors, norm, normalize, transposed);
}

}  // namespace

TORCH_LIBRARY_IMPL(segops, CUDA, m) {
  m.impl("permutohedral_filter", &permutohedral_filter_cuda);
  m.impl("_permutohedral_filter_backward", &permutohedral_filter_backward_cuda);
}

}  // namespace segops
