// CUDA backend of the permutohedral lattice: the shared glue and math (permutohedral_math.h) run in
// grid-stride kernels on the current stream; memory comes from PyTorch's caching allocator.
// Deterministic: the build inserts into one hash table with atomicCAS / atomicMin, but vertex ids follow the
// first appearance of each key (not the insertion order); the splat gathers, per vertex, over its entries
// sorted stably by vertex (ascending entry order, in pieces of at most 128 entries, then the pieces in order);
// blur, slice and the quadratic forms are gathers or fixed-order sums. Results are bitwise identical from run
// to run.
#include <torch/library.h>

#include <ATen/ops/cumsum.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>

#include "segops/parallel_cuda.cuh"
#include "segops/permutohedral_host.h"

namespace segops {
namespace {

struct CudaBackend {
  static constexpr bool kGatherReadsChannelsLast = true;  // a point's channels in one or two cache lines
  static bool blur_per_channel() { return true; }  // one thread per (vertex, channel): coalesced rows
  static constexpr bool kRangeBuild = false;  // the shared build (one table, first entries by scan)
  static constexpr bool kPadRows = false;     // a thread per (point, channel): no row loops
  static constexpr bool kSliceUpsamples = false;  // the losses resize on their own (half_resolution)

  template <typename F>
  static void launch(index_t n, const F& f, index_t /*grain*/) {
    cuda_parallel_for(n, f, 256);
  }

  template <typename F>
  static void ranged(index_t n, const F& f, index_t /*grain*/) {
    cuda_parallel_for(n, f, 128);
  }

  static at::Tensor inclusive_scan(const at::Tensor& flag) { return at::cumsum(flag, 0, at::kInt); }

  static std::pair<at::Tensor, at::Tensor> feature_bounds(const at::Tensor& feats) {
    return {at::amin(feats, {0, 2}), at::amax(feats, {0, 2})};
  }

  // The build's one device-to-host read (vertex count and error flags: the host needs the count to allocate
  // the neighbour table). It is exempt from torch.cuda.set_sync_debug_mode, which then flags every OTHER
  // synchronisation of a lattice call: the mode is set to "disabled" for this one read and restored after.
  static int64_t read_status(const at::Tensor& status) {
    struct Relax {
      c10::cuda::SyncDebugMode previous = c10::cuda::warning_state().get_sync_debug_mode();
      Relax() { c10::cuda::warning_state().set_sync_debug_mode(c10::cuda::SyncDebugMode::L_DISABLED); }
      ~Relax() { c10::cuda::warning_state().set_sync_debug_mode(previous); }
    } relax;
    return status.item<int64_t>();
  }

  template <typename scalar_t, typename acc>
  static void splat(const lattice::SplatArgs<scalar_t, acc>& args, int64_t /*B*/, int64_t M, const at::Tensor& vertex,
                    const at::Tensor& plan) {
    lattice::gather_splat<CudaBackend>(args, M, vertex, plan);
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> permutohedral_lattice_cuda(const at::Tensor& features) {
  const c10::cuda::CUDAGuard guard(features.device());
  return lattice::lattice_forward<CudaBackend>(features);
}

at::Tensor permutohedral_apply_cuda(const at::Tensor& values, const at::Tensor& vertex, const at::Tensor& bary,
                                    const at::Tensor& neighbors, bool transposed,
                                    const std::optional<at::Tensor>& splat_plan) {
  const c10::cuda::CUDAGuard guard(values.device());
  return lattice::apply_forward<CudaBackend>(values, vertex, bary, neighbors, transposed, splat_plan);
}

at::Tensor permutohedral_splat_plan_cuda(const at::Tensor& vertex, const at::Tensor& neighbors) {
  const c10::cuda::CUDAGuard guard(vertex.device());
  return lattice::splat_plan_forward<CudaBackend>(vertex, neighbors);
}

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

std::tuple<at::Tensor, at::Tensor, at::Tensor> quadratic_forms_cuda(const at::Tensor& x,
                                                                    const std::optional<at::Tensor>& roi,
                                                                    const at::Tensor& vertex, const at::Tensor& bary,
                                                                    const at::Tensor& neighbors, bool degree,
                                                                   bool /*exact: for the autograd*/) {
  const c10::cuda::CUDAGuard guard(x.device());
  return lattice::quadratic_forms<CudaBackend>(x, roi, vertex, bary, neighbors, degree);
}

at::Tensor quadratic_forms_backward_cuda(const at::Tensor& grad_forms, const at::Tensor& splatted,
                                         const at::Tensor& blurred, const at::Tensor& vertex, const at::Tensor& bary,
                                         const at::Tensor& neighbors, bool exact, at::ScalarType dtype,
                                         at::OptionalIntArrayRef full_size, const std::optional<at::Tensor>& mask) {
  const c10::cuda::CUDAGuard guard(grad_forms.device());
  return lattice::quadratic_forms_backward<CudaBackend>(grad_forms, splatted, blurred, vertex, bary, neighbors,
                                                        exact, dtype, full_size, mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(segops, CUDA, m) {
  m.impl("permutohedral_lattice", &permutohedral_lattice_cuda);
  m.impl("permutohedral_apply", &permutohedral_apply_cuda);
  m.impl("_permutohedral_splat_plan", &permutohedral_splat_plan_cuda);
  m.impl("permutohedral_filter", &permutohedral_filter_cuda);
  m.impl("_permutohedral_filter_backward", &permutohedral_filter_backward_cuda);
  m.impl("_lattice_quadratic_forms", &quadratic_forms_cuda);
  m.impl("_lattice_quadratic_forms_backward", &quadratic_forms_backward_cuda);
}

}  // namespace segops
