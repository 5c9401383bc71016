// CPU backend of the dense CRF mean-field update: the shared glue over at::parallel_for, with a blocked
// path for float32 (kPixels consecutive pixels of one image per task, the pixel loop innermost so that the
// compiler vectorises across pixels; the per-pixel functor loops over classes at stride N, which it cannot).
// Same terms in the same order as meanfield::Forward; exp is block::exp_poly (~1 ulp) instead of std::exp.
// tests/test_crf_inference.py compares the two paths (float32 vs float64 inputs, tails, shapes).
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "segops/crf_meanfield_host.h"
#include "segops/softmax_losses_block.h"

// On x86-64 the blocked update is compiled twice, for AVX2 and the baseline, and the loader picks one per
// machine (GCC/Clang function multi-versioning). No FMA: both versions round every operation identically, so
// results do not depend on the machine.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__SANITIZE_THREAD__) && !defined(__SANITIZE_ADDRESS__)
#define SEGOPS_TARGET_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define SEGOPS_TARGET_CLONES
#endif

namespace segops {
namespace {

constexpr index_t kPixels = 64;

// Pixels [n0, n0 + np) of image b. The logits go to buf (K x kPixels, contiguous) rather than to out: the rows
// of one block in out are N floats apart, and N is often a power of two (512 x 512), which maps all K rows
// to the same cache sets; out is written once, at the end.
SEGOPS_TARGET_CLONES
void forward_block(const meanfield::Forward<float>& f, index_t b, index_t n0, index_t np, float* buf) {
  const index_t K = f.K, N = f.N;
  const index_t base = b * K * N + n0, p0 = b * N + n0;
  float m[kPixels], s[kPixels];
  for (index_t v = 0; v < np; ++v) {
    m[v] = -INFINITY;
    s[v] = 0.0f;
  }
  for (index_t k = 0; k < K; ++k) {
    const index_t e0 = base + k * N;
    float* l = buf + k * kPixels;
    const float* u = f.unary + e0;
#pragma omp simd
    for (index_t v = 0; v < np; ++v) l[v] = -u[v];
    for (int j = 0; j < f.terms.count; ++j) {
#pragma omp simd
      for (index_t v = 0; v < np; ++v) l[v] += f.terms.term(j, e0 + v, p0 + v);
    }
#pragma omp simd
    for (index_t v = 0; v < np; ++v) m[v] = std::max(m[v], l[v]);
  }
  for (index_t k = 0; k < K; ++k) {
    float* l = buf + k * kPixels;
#pragma omp simd
    for (index_t v = 0; v < np; ++v) {
      const float x = block::exp_poly(l[v] - m[v]);
      l[v] = x;
      s[v] += x;
    }
  }
  for (index_t v = 0; v < np; ++v) s[v] = 1.0f / s[v];
  for (index_t k = 0; k < K; ++k) {
    const float* l = buf + k * kPixels;
    float* o = f.out + base + k * N;
#pragma omp simd
    for (index_t v = 0; v < np; ++v) o[v] = l[v] * s[v];
  }
}

struct CpuMeanFieldLaunch {
  void operator()(index_t n, const meanfield::Forward<float>& f) const {
    const index_t per_image = (f.N + kPixels - 1) / kPixels;
    omp_parallel_for(0, n / f.N * per_image, 16, [&](int64_t t0, int64_t t1) {
      std::vector<float> buf(static_cast<size_t>(f.K * kPixels));
      for (int64_t task = t0; task < t1; ++task) {
        const index_t b = task / per_image, n0 = (task - b * per_image) * kPixels;
        forward_block(f, b, n0, std::min<index_t>(kPixels, f.N - n0), buf.data());
      }
    });
  }
  template <typename F>
  void operator()(index_t n, const F& f) const { cpu_parallel_for(n, f, 256); }
};

at::Tensor forward_cpu(const at::Tensor& unary, at::TensorList messages, at::TensorList scales,
                       at::ArrayRef<double> weights) {
  return meanfield::forward(unary, messages, scales, weights, CpuMeanFieldLaunch{});
}

void forward_out_cpu(const at::Tensor& unary, at::TensorList messages, at::TensorList scales,
                           at::ArrayRef<double> weights, at::Tensor& out) {
  meanfield::forward_into(unary, messages, scales, weights, out, CpuMeanFieldLaunch{});
}

at::Tensor backward_cpu(const at::Tensor& grad, const at::Tensor& q) {
  return meanfield::backward(grad, q, CpuMeanFieldLaunch{});
}

}  // namespace

TORCH_LIBRARY_IMPL(segops, CPU, m) {
  m.impl("crf_mean_field_update", &forward_cpu);
  m.impl("_crf_mean_field_update_out", &forward_out_cpu);
  m.impl("_crf_mean_field_update_backward", &backward_cpu);
}

}  // namespace segops
