// The one TORCH_LIBRARY of segops: every schema lives here. Backend files (csrc/cpu/*.cpp,
// csrc/cuda/*.cu) only register implementations with TORCH_LIBRARY_IMPL(segops, CPU|CUDA, m);
// autograd and fake (meta) kernels are registered in Python (segops/ops/*.py).
#include <Python.h>
#include <torch/library.h>

#include <atomic>
#include <string>

#include "segops/parallel.h"

namespace segops {
std::string cuda_build_info();  // csrc/cuda/build_info.cu, or the stub below without CUDA
}

#ifndef SEGOPS_WITH_CUDA
std::string segops::cuda_build_info() { return ""; }
#endif

namespace {

#define SEGOPS_STR2(x) #x
#define SEGOPS_STR(x) SEGOPS_STR2(x)

// "key=value;..." facts about this binary, parsed by segops.info().
std::string build_info() {
  std::string s = "cuda=";
#ifdef SEGOPS_WITH_CUDA
  s += "1;";
#else
  s += "0;";
#endif
#ifdef SEGOPS_CUDA_SKIPPED  // why setup.py left the CUDA kernels out (segops/info.py names the codes)
  s += "cuda_skipped=" SEGOPS_STR(SEGOPS_CUDA_SKIPPED) ";";
#endif
#ifdef _OPENMP
  s += "openmp=" SEGOPS_STR(_OPENMP) ";";
#else
  s += "openmp=0;";
#endif
  s += "compiler=" __VERSION__ ";";
  s += segops::cuda_build_info();
  return s;
}

// How many distinct threads cpu_parallel_for used for n items: proves OpenMP is really on
// (at::parallel_for silently runs serially when the extension is compiled without -fopenmp).
int64_t parallel_threads(int64_t n) {
  std::atomic<uint64_t> seen{0};
  segops::cpu_parallel_for(n, [&](segops::index_t) {
    seen.fetch_or(uint64_t(1) << (at::get_thread_num() % 64), std::memory_order_relaxed);
  }, /*grain=*/1);
  return __builtin_popcountll(seen.load());
}

}  // namespace

TORCH_LIBRARY(segops, m) {
  m.def("_build_info() -> str", &build_info);
  m.def("_parallel_threads(int n) -> int", &parallel_threads);

  // ---- losses (issue: foundation) -----------------------------------------------------------------
  // reduction: 0 = none, 1 = mean, 2 = sum. Returns (loss, lse, denom): lse is the per-pixel
  // log-sum-exp (the only per-pixel state kept for backward), denom the mean's denominator.
  // check_labels: on CUDA, raise IndexError for an out-of-range target (one host sync) instead of the
  // default device-side assertion; the CPU always raises it.
  m.def(
      "partial_cross_entropy(Tensor logits, Tensor target, Tensor? weight, int reduction, "
      "int ignore_index, float label_smoothing, bool check_labels=False) -> (Tensor, Tensor, Tensor)");
  m.def(
      "_partial_cross_entropy_backward(Tensor grad, Tensor logits, Tensor target, Tensor? weight, "
      "Tensor lse, Tensor denom, int reduction, int ignore_index, float label_smoothing) -> Tensor");
  // Returns (entropy, lse, expectation, denom): per-pixel lse and E_p[x] are kept for backward.
  m.def("entropy(Tensor logits, Tensor? mask, int reduction) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "_entropy_backward(Tensor grad, Tensor logits, Tensor? mask, Tensor lse, Tensor expectation, "
      "Tensor denom, int reduction) -> Tensor");

  // ---- permutohedral lattice, dense CRF / normalized-cut losses (issue: lattice) -----------------
  // values (B, C, *spatial), features (B, d, *spatial), d in [1, 16]. Returns (out, vertex, bary,
  // neighbors, norm): out = W values (or (W values) / (W 1) when normalize); the lattice (vertex (B, N, d+1)
  // int64 ids, bary (B, N, d+1) weights, neighbors (M, d+1, 2) int64) and norm = W 1 ((B, N), or (0,)
  // without normalize) are kept for the backward op, which reuses them instead of rebuilding.
  // _backward: transposed -> W^T grad (W^T (grad / norm) when normalize), the gradient; otherwise
  // W grad (/ norm), its own gradient (double backward).
  m.def("permutohedral_filter(Tensor values, Tensor features, bool normalize) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "_permutohedral_filter_backward(Tensor grad, Tensor vertex, Tensor bary, Tensor neighbors, Tensor norm, "
      "bool normalize, bool transposed) -> Tensor");

  // ---- transposed / atrous convolution (issue: conv) ---------------------------------------------
  // Same argument meaning, weight layout and results as F.conv2d / F.conv_transpose2d. Backward ops return
  // (grad_input, grad_weight, grad_bias); output_mask selects which are computed (the others are empty (0,) tensors).
  m.def(
      "atrous_conv2d(Tensor input, Tensor weight, Tensor? bias, int[2] stride, int[2] padding, int[2] dilation, "
      "int groups) -> Tensor");
  m.def(
      "_atrous_conv2d_backward(Tensor grad_output, Tensor input, Tensor weight, int[2] stride, int[2] padding, "
      "int[2] dilation, int groups, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
  m.def(
      "conv_transpose2d(Tensor input, Tensor weight, Tensor? bias, int[2] stride, int[2] padding, "
      "int[2] output_padding, int groups, int[2] dilation) -> Tensor");
  m.def(
      "_conv_transpose2d_backward(Tensor grad_output, Tensor input, Tensor weight, int[2] stride, int[2] padding, "
      "int[2] output_padding, int groups, int[2] dilation, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
}

#ifndef SEGOPS_WITH_CUDA
// A build without CUDA kernels still answers every op called on CUDA tensors with what happened and what
// to do, instead of the dispatcher's "could not run ... with arguments from the 'CUDA' backend". One boxed
// kernel serves every op: it is registered for each segops op that takes tensors, found in the dispatcher.
// The TORCH_LIBRARY block above is in this file, so C++'s in-order static initialisation of one translation
// unit guarantees every schema is defined by the time this block runs.
namespace {

void no_cuda_kernels(const c10::OperatorHandle& op, torch::jit::Stack* /*stack*/) {
  TORCH_CHECK(false, "segops was built without CUDA kernels, so ", op.schema().name(),
              " cannot run on CUDA tensors. Either move the inputs to the CPU, or rebuild segops with CUDA: "
              "a CUDA build of torch plus the CUDA toolkit (nvcc on PATH, or CUDA_HOME set), then "
              "`SEGOPS_CUDA=1 pip install --no-build-isolation -e .` in the segops source folder (SEGOPS_CUDA=1 "
              "stops the build instead of silently leaving CUDA out). `segops info` shows what this build contains.");
}

bool takes_tensors(const c10::FunctionSchema& schema) {
  for (const c10::Argument& arg : schema.arguments()) {
    if (arg.type()->isSubtypeOf(*c10::OptionalType::ofTensor()) || arg.type()->isSubtypeOf(*c10::ListType::ofTensors())) {
      return true;
    }
  }
  return false;
}

}  // namespace

TORCH_LIBRARY_IMPL(segops, CUDA, m) {
  auto& dispatcher = c10::Dispatcher::singleton();
  for (const c10::OperatorName& name : dispatcher.getAllOpNames()) {
    if (name.name.rfind("segops::", 0) != 0) continue;
    auto handle = dispatcher.findSchema(name);
    if (!handle || !takes_tensors(handle->schema())) continue;
    const std::string qualified = name.overload_name.empty() ? name.name : name.name + "." + name.overload_name;
    m.impl(qualified.c_str(), torch::CppFunction::makeFromBoxedFunction<&no_cuda_kernels>());
  }
}
#endif  // SEGOPS_WITH_CUDA

// A pybind-free module: importing segops._C runs the static TORCH_LIBRARY registrations above.
// PyMODINIT_FUNC exports the symbol despite -fvisibility=hidden.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
