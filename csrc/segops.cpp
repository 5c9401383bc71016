// The one TORCH_LIBRARY of segops: every schema lives here. Backend files (csrc/cpu/*.cpp,
// csrc/cuda/*.cu) only register implementations with TORCH_LIBRARY_IMPL(segops, CPU|CUDA, m);
// autograd and fake (meta) kernels are registered in Python (segops/ops/*.py).
#include <Python.h>
#include <torch/library.h>

#include <atomic>
#include <string>

#include "segops/cpu_alloc.h"
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

// Whether the CPU convolutions' float matrix products run segops' AVX-512 GEMM (segops/cpu_gemm.h) rather than
// ATen's BLAS, under the current environment (SEGOPS_CPU_GEMM, ATEN_CPU_CAPABILITY).
bool cpu_gemm_enabled() { return segops::cpu::sgemm_enabled(); }

// Bytes of freed large CPU blocks segops keeps for reuse (segops/cpu_alloc.h), after handing them all back to the
// system when `release`.
int64_t cpu_block_cache(bool release) {
  if (release) segops::HugeBlockCache::instance().release_all();
  return static_cast<int64_t>(segops::HugeBlockCache::instance().cached_bytes());
}

}  // namespace

TORCH_LIBRARY(segops, m) {
  m.def("_build_info() -> str", &build_info);
  m.def("_parallel_threads(int n) -> int", &parallel_threads);
  m.def("_cpu_gemm_enabled() -> bool", &cpu_gemm_enabled);
  m.def("_cpu_block_cache(bool release) -> int", &cpu_block_cache);

  // ---- losses ---------------------------------------------------------------------------------
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

  // ---- permutohedral lattice, dense CRF / normalized-cut losses ---------------------------------------
  // A lattice (docs/lattice.md) of features (B, d, *spatial), d in [1, 16]: vertex (B, N, d+1) int32 vertex
  // ids (image-major, in order of first appearance), bary (B, N, d+1) barycentric weights (float64 for
  // float64 features, else float32), neighbors (M, d+1, 2) int32 blur neighbours (-1 = absent).
  m.def("permutohedral_lattice(Tensor features) -> (Tensor, Tensor, Tensor)");
  // W values, or W^T values when transposed, on a built lattice; values (B, C, *spatial) with N points.
  // splat_plan: the gather splat's sorted entries for these vertex ids (_permutohedral_splat_plan), which CUDA
  // otherwise sorts on every call; the CPU's scatter has no use for it. Lattice.filter passes one on CUDA.
  m.def(
      "permutohedral_apply(Tensor values, Tensor vertex, Tensor bary, Tensor neighbors, bool transposed, "
      "Tensor? splat_plan=None) -> Tensor");
  // (B, N, d+1) vertex ids, (M, d+1, 2) neighbours -> int64 (B N (d+1) + 3 M + 1,): the entries sorted by vertex
  // and per-vertex offsets (permutohedral_host.h, splat_plan).
  m.def("_permutohedral_splat_plan(Tensor vertex, Tensor neighbors) -> Tensor");
  // values (B, C, *spatial), features (B, d, *spatial). Returns (out, vertex, bary, neighbors, norm):
  // out = W values (or (W values) / (W 1) when normalize); the lattice and norm = W 1 ((B, N), or (0,)
  // without normalize) are kept for the backward op, which reuses them instead of rebuilding.
  // _backward: transposed -> W^T grad (W^T (grad / norm) when normalize), the gradient; otherwise
  // W grad (/ norm), its own gradient (double backward).
  m.def("permutohedral_filter(Tensor values, Tensor features, bool normalize) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "_permutohedral_filter_backward(Tensor grad, Tensor vertex, Tensor bary, Tensor neighbors, Tensor norm, "
      "bool normalize, bool transposed) -> Tensor");
  // The losses' quadratic forms on a built lattice, x (B, K, *spatial): forms (B, K, 2) float64 with
  // [..., 0] = <x_k, W x_k> and, when degree, [..., 1] = <x_k, W r> (r = roi (B, 1, *spatial), or ones);
  // plus the splatted and blurred vertex values (M, K [+1]) kept for the backward, which returns
  // d(sum grad_forms * forms)/dx (B, K, N) in `dtype`: exact (W + W^T) x, or the ECCV'18 2 W x (`exact` is
  // the forward's, so that its autograd knows which). With full_size = [H, W] (CPU only), x was
  // _half_resolution(s) [* mask] for s (B, K, H, W), and the backward returns the gradient of s (B, K, H, W).
  m.def(
      "_lattice_quadratic_forms(Tensor x, Tensor? roi, Tensor vertex, Tensor bary, Tensor neighbors, bool degree, "
      "bool exact) -> (Tensor, Tensor, Tensor)");
  m.def(
      "_lattice_quadratic_forms_backward(Tensor grad_forms, Tensor splatted, Tensor blurred, Tensor vertex, "
      "Tensor bary, Tensor neighbors, bool exact, ScalarType dtype, int[]? full_size=None, Tensor? mask=None) -> "
      "Tensor");
  // The losses' scale_factor = 0.5 resize: F.interpolate(x, scale_factor=0.5, mode="bilinear",
  // align_corners=False) of x (B, C, H, W), i.e. the mean of each 2x2 block, (B, C, H // 2, W // 2); _backward
  // returns the gradient (B, C, size[0], size[1]) of x.
  m.def("_half_resolution(Tensor x) -> Tensor");
  m.def("_half_resolution_backward(Tensor grad, SymInt[2] size) -> Tensor");

  // ---- transposed / atrous convolution --------------------------------------------------------------
  // Same argument meaning, weight layout and results as F.conv2d / F.conv_transpose2d. Backward ops return
  // (grad_input, grad_weight, grad_bias); output_mask selects which are computed (the others are empty (0,) tensors).
  // route: which side runs (not named `kernel`: inductor's fallback kernels take a keyword of that name). Forward
  // ops: bit 0 = the vendor's forward (ATen convolution), bit 1 = the vendor's backward (read by the autograd
  // formula, which passes it on); backward ops: 1 = the vendor's backward. 0: segops.
  m.def(
      "atrous_conv2d(Tensor input, Tensor weight, Tensor? bias, int[2] stride, int[2] padding, int[2] dilation, "
      "int groups, int route=0) -> Tensor");
  m.def(
      "_atrous_conv2d_backward(Tensor grad_output, Tensor input, Tensor weight, int[2] stride, int[2] padding, "
      "int[2] dilation, int groups, bool[3] output_mask, int route=0) -> (Tensor, Tensor, Tensor)");
  m.def(
      "conv_transpose2d(Tensor input, Tensor weight, Tensor? bias, int[2] stride, int[2] padding, "
      "int[2] output_padding, int groups, int[2] dilation, int route=0) -> Tensor");
  m.def(
      "_conv_transpose2d_backward(Tensor grad_output, Tensor input, Tensor weight, int[2] stride, int[2] padding, "
      "int[2] output_padding, int groups, int[2] dilation, bool[3] output_mask, int route=0) -> "
      "(Tensor, Tensor, Tensor)");

  // ---- dense CRF mean-field inference ----------------------------------------------------------------
  // One update: softmax over dim 1 of (-unary + sum_j weights[j] * scales[j] * messages[j]); unary and
  // messages[j] (B, K, *spatial), scales[j] (B, 1, *spatial) or empty (no scale), at most 8 terms. Returns
  // the marginals (contiguous). Non-finite inputs propagate (the Python layer checks the unary). _out writes
  // them into a contiguous `out` that overlaps no input (buffer reuse in no-grad inference).
  // _backward: grad_logits = q * (grad - sum_k grad_k q_k) (the softmax's gradient; the rest is linear).
  m.def("crf_mean_field_update(Tensor unary, Tensor[] messages, Tensor[] scales, float[] weights) -> Tensor");
  m.def(
      "_crf_mean_field_update_out(Tensor unary, Tensor[] messages, Tensor[] scales, float[] weights, "
      "Tensor(a!) out) -> ()");
  m.def("_crf_mean_field_update_backward(Tensor grad, Tensor q) -> Tensor");
  // No-grad inference with Potts kernels, CPU and CUDA, K <= 64: softmax(-unary), then `iterations` updates,
  // in one op (one pass over the points per iteration). Kernel j: a lattice (vertex, bary (B or 1, N, d+1),
  // neighbors), pydensecrf's normalisation codes (0 none, 1 before, 2 after, 3 symmetric; the degrees W 1 are
  // computed here) and the Potts weight. Returns the marginals (contiguous float32).
  m.def(
      "_crf_mean_field_iterate(Tensor unary, Tensor[] vertex, Tensor[] bary, Tensor[] neighbors, "
      "int[] normalization, float[] weights, int iterations) -> Tensor");
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
