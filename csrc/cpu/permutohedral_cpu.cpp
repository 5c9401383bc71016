// CPU backend of the permutohedral filter: the shared glue and math run over at::parallel_for.
// The CPU splat is deterministic and atomic-free: each thread owns a contiguous range of vertex ids and
// accumulates, in point order, the contributions that land in its range (results do not depend on the
// thread count).
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "segops/permutohedral_host.h"

namespace segops {
namespace {

struct CpuBackend {
  template <typename F>
  static void launch(index_t n, const F& f, index_t grain) {
    cpu_parallel_for(n, f, grain);
  }

  template <typename F>
  static void ranged(index_t n, const F& f, index_t grain) {
    omp_parallel_for(0, n, grain, [&](int64_t begin, int64_t end) { f.run_range(begin, end); });
  }

  // Two-pass chunked prefix sum (one chunk per thread).
  static at::Tensor inclusive_scan(const at::Tensor& flag) {
    const int64_t n = flag.numel();
    at::Tensor out = at::empty({n}, flag.options().dtype(at::kLong));
    const int32_t* f = flag.data_ptr<int32_t>();
    int64_t* o = out.data_ptr<int64_t>();
    const int64_t T = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n / 65536 + 1));
    const int64_t chunk = (n + T - 1) / T;
    std::vector<int64_t> sums(static_cast<size_t>(T) + 1, 0);
    omp_parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        int64_t s = 0;
        for (int64_t i = t * chunk, e = std::min(n, (t + 1) * chunk); i < e; ++i) s += f[i];
        sums[t + 1] = s;
      }
    });
    for (int64_t t = 0; t < T; ++t) sums[t + 1] += sums[t];
    omp_parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        int64_t s = sums[t];
        for (int64_t i = t * chunk, e = std::min(n, (t + 1) * chunk); i < e; ++i) o[i] = (s += f[i]);
      }
    });
    return out;
  }

  template <typename scalar_t, typename acc>
  static void splat(const lattice::SplatAtomic<scalar_t, acc>& p, index_t BN, index_t M, const int64_t* image_lo,
                    const int64_t* image_hi) {
    const int64_t grain = BN * p.V * p.Cv < (int64_t(1) << 17) ? M : 1;  // small splats: one thread
    omp_parallel_for(0, M, grain, [&](int64_t v0, int64_t v1) {
      std::vector<acc> buf(static_cast<size_t>(p.C));
      const index_t V = p.V;
      for (index_t i = 0, b = 0, n = 0; i < BN; ++i, ++n) {
        if (n == p.N) {
          n = 0;
          ++b;
        }
        if (image_hi[b] < v0 || image_lo[b] >= v1) {  // no vertex of this image in [v0, v1): skip it
          i = (b + 1) * p.N - 1;
          n = p.N - 1;
          continue;
        }
        const int64_t* vp = p.vertex + i * V;
        bool any = false;
        for (index_t k = 0; k < V; ++k) any = any || (vp[k] >= v0 && vp[k] < v1);
        if (!any) continue;
        const scalar_t* x = p.values + b * p.vsb + n * p.vsn;
        const acc ps = p.prescale ? p.prescale[i] : acc(1);
        for (index_t c = 0; c < p.C; ++c) buf[c] = static_cast<acc>(x[c * p.vsc]) * ps;
        const acc* w = p.bary + i * V;
        for (index_t k = 0; k < V; ++k) {
          const int64_t v = vp[k];
          if (v < v0 || v >= v1) continue;
          acc* row = p.grid + v * p.Cv;
          const acc wk = w[k];
          for (index_t c = 0; c < p.C; ++c) row[c] += wk * buf[c];
          if (p.ones) row[p.C] += wk;
        }
      }
    });
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> permutohedral_filter_cpu(
    const at::Tensor& values, const at::Tensor& features, bool normalize) {
  return lattice::filter_forward<CpuBackend>(values, features, normalize);
}

at::Tensor permutohedral_filter_backward_cpu(const at::Tensor& grad, const at::Tensor& vertex, const at::Tensor& bary,
                                             const at::Tensor& neighbors, const at::Tensor& norm, bool normalize, bool transposed) {
  return lattice::filter_backward<CpuBackend>(grad, vertex, bary, neighbors, norm, normalize, transposed);
}

}  // namespace

TORCH_LIBRARY_IMPL(segops, CPU, m) {
  m.impl("permutohedral_filter", &permutohedral_filter_cpu);
  m.impl("_permutohedral_filter_backward", &permutohedral_filter_backward_cpu);
}

}  // namespace segops
