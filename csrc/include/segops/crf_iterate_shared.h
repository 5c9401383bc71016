// The shared schedule of no-grad dense CRF mean-field inference with Potts kernels (`_crf_mean_field_iterate`):
// CUDA's, and the CPU's under SEGOPS_MEANFIELD_SHARED=1 (tests; the CPU's own schedule is
// csrc/cpu/crf_meanfield_iterate_cpu.cpp). Per iteration and kernel: the deterministic gather splat of the
// marginals (times the kernel's pre-scale) and the blur, then ONE pass over the points that slices every
// kernel, adds the messages to -unary and takes the softmax. The marginals stay in point-major rows between
// passes, laid out (N, B, K) so that a lattice shared by the batch (batch-1 features, e.g. positions) splats
// the B images' K values of a point as one row of B K channels; only the last pass writes (B, K, N) planes.
// Against the op-by-op schedule (splat -> blur -> slice -> update, each through memory) this drops the update's
// and the slice's (B, K, N) round trips, the pre-scaling and the splat's transposing copy.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/ArrayRef.h>

#include <cmath>
#include <vector>

#include "segops/cpu_alloc.h"
#include "segops/crf_meanfield_math.h"
#include "segops/permutohedral_host.h"

namespace segops {
namespace meanfield {

// pydensecrf's NormalizationType codes (NO_NORMALIZATION, _BEFORE, _AFTER, _SYMMETRIC).
enum IterateNormalization : int64_t { kNormNone = 0, kNormBefore = 1, kNormAfter = 2, kNormSymmetric = 3 };
constexpr int64_t kIterateMaxClasses = 64;

// The op's argument checks (both schedules): unary float32 (B, K, *spatial) with 1..64 classes; per kernel a
// lattice of B (or 1, shared by the batch) images of the unary's N points.
inline void check_iterate_args(const char* op, const at::Tensor& unary, at::TensorList vertex, at::TensorList bary,
                               at::TensorList neighbors, at::IntArrayRef normalization, at::ArrayRef<double> weights,
                               int64_t iterations) {
  TORCH_CHECK(unary.dim() >= 3 && unary.scalar_type() == at::kFloat, op,
              ": unary must be float32 (B, K, *spatial), got ", unary.scalar_type(), " ", unary.sizes());
  TORCH_CHECK(unary.size(1) > 0 && unary.size(1) <= kIterateMaxClasses, op,
              ": unary must have 1 to 64 classes (more use the op-by-op schedule), got ", unary.sizes());
  TORCH_CHECK(iterations >= 1, op, ": iterations must be >= 1, got ", iterations);
  const size_t count = vertex.size();
  TORCH_CHECK(count >= 1 && count <= size_t(kMaxTerms), op, ": 1 to ", kMaxTerms, " kernels, got ", count);
  TORCH_CHECK(bary.size() == count && neighbors.size() == count && normalization.size() == count &&
                  weights.size() == count,
              op, ": vertex, bary, neighbors, normalization and weights must have one entry per kernel");
  const int64_t B = unary.size(0), N = lattice::spatial_numel(unary);
  for (size_t j = 0; j < count; ++j) {
    const at::Tensor& vx = vertex[j];
    TORCH_CHECK(vx.dim() == 3 && vx.scalar_type() == at::kInt && bary[j].sizes() == vx.sizes() &&
                    bary[j].scalar_type() == at::kFloat,
                op, ": vertex[", j, "] (int32) and bary[", j, "] (float32) must be (B or 1, N, d+1), got ", vx.sizes(),
                " ", vx.scalar_type(), " and ", bary[j].sizes(), " ", bary[j].scalar_type());
    TORCH_CHECK((vx.size(0) == B || vx.size(0) == 1) && vx.size(1) == N, op, ": the lattice of kernel ", j, " has ",
                vx.size(0), " images of ", vx.size(1), " points; the unary ", unary.sizes(), " needs ", B,
                " (or 1) of ", N);
    const int64_t d = vx.size(2) - 1;
    TORCH_CHECK(d >= 1 && d <= lattice::kMaxD, op, ": the lattice of kernel ", j, " has d = ", d, ", expected 1..16");
    TORCH_CHECK(neighbors[j].dim() == 3 && neighbors[j].size(1) == d + 1 && neighbors[j].size(2) == 2 &&
                    neighbors[j].scalar_type() == at::kInt,
                op, ": neighbors[", j, "] must be (M, d+1, 2) int32, got ", neighbors[j].sizes(), " ",
                neighbors[j].scalar_type());
    TORCH_CHECK(neighbors[j].size(0) > 0 || B * N == 0, op, ": the lattice of kernel ", j,
                " has no vertices (neighbors[", j, "] is (0, d+1, 2)) for ", B * N, " points");
    TORCH_CHECK(std::isfinite(weights[j]), op, ": weights[", j, "] must be finite, got ", weights[j]);
    TORCH_CHECK(normalization[j] >= kNormNone && normalization[j] <= kNormSymmetric, op, ": normalization[", j,
                "] must be 0 (none), 1 (before), 2 (after) or 3 (symmetric), got ", normalization[j]);
    for (const at::Tensor& t : {vx, bary[j], neighbors[j]})
      TORCH_CHECK(t.device() == unary.device(), op, ": kernel ", j, "'s lattice is on ", t.device(),
                  " but the unary is on ", unary.device());
  }
}

// A kernel's normalisation scale at each of its lattice's points p: pydensecrf's DenseKernel norm
// 1 / (W 1 + 1e-20) (its square root for "symmetric"), W 1 = alpha * the slice of the blurred splat of ones.
struct DegreeScales {
  const float* blurred;  // (M): the blurred splat of ones
  const int32_t* vertex;
  const float* bary;
  float alpha;
  index_t V;
  bool symmetric;
  float* scale;  // (points)
  SEGOPS_HD_INLINE void operator()(index_t p) const {
    float s = 0.f;
    for (index_t v = 0; v < V; ++v) s += bary[p * V + v] * blurred[vertex[p * V + v]];
    const float w1 = s * alpha + 1e-20f;
    scale[p] = symmetric ? 1.0f / ::sqrtf(w1) : 1.0f / w1;
  }
};

// One kernel as the slice-and-update pass sees it.
struct IterateTerm {
  const float* grid;     // (M, Cg): the blurred splat of this pass's marginals
  const int32_t* vertex; // (Bt N, V)
  const float* bary;     // (Bt N, V)
  const float* post;     // (Bt N) or nullptr: multiplies the sliced values
  float weight;          // the Potts weight
  float alpha;           // the slice's factor
  index_t V, Cg;
  bool shared;           // one lattice (Bt = 1) for the B images: image b's values at columns b K .. b K + K - 1
};

// Point i = b N + n: logit_k = -unary_k + sum_j weight_j * post_j * alpha_j * sum_v bary_jv grid_j[vertex_jv, k]
// (the op-by-op schedule's update of the sliced message, the same products in the same order), the softmax over
// k, written to rows[(n B + b) K + k] or, on the last pass, to planes[(b K + k) N + n]. The destination holds
// the logits in between (like meanfield::Forward): kernel by kernel, each kernel's vertex ids and weights read
// once (in registers for 3 and 6 vertices, the lattices of positions and of positions + colours), then every
// class. count = 0: softmax(-unary).
struct SliceUpdate {
  const float* unary;  // (B, K, N)
  IterateTerm terms[kMaxTerms];
  int count;
  float* rows;    // (N, B, K), or nullptr
  float* planes;  // (B, K, N), or nullptr
  index_t B, K, N;

  // dst[k step] += w * (alpha * sum_v bary_v grid[vertex_v, k]) for every k; VC: the vertex count when fixed
  template <int VC>
  SEGOPS_HD_INLINE void add_term(const IterateTerm& t, index_t p, const float* g, float w, float* dst,
                                 index_t step) const {
    constexpr int kHeld = VC > 0 ? VC : 1;
    const float* rows_of[kHeld];
    float by[kHeld];
    if (VC > 0) {
      for (int v = 0; v < VC; ++v) {
        rows_of[v] = g + static_cast<index_t>(t.vertex[p * VC + v]) * t.Cg;
        by[v] = t.bary[p * VC + v];
      }
    }
    for (index_t k = 0; k < K; ++k) {
      float s = 0.f;
      if (VC > 0) {
        for (int v = 0; v < VC; ++v) s += by[v] * rows_of[v][k];
      } else {
        for (index_t v = 0; v < t.V; ++v) s += t.bary[p * t.V + v] * g[static_cast<index_t>(t.vertex[p * t.V + v]) * t.Cg + k];
      }
      dst[k * step] += w * (s * t.alpha);
    }
  }

  SEGOPS_HD void operator()(index_t i) const {
    const index_t b = i / N, n = i - b * N;
    float* dst = rows ? rows + (n * B + b) * K : planes + b * K * N + n;
    const index_t step = rows ? 1 : N;
    for (index_t k = 0; k < K; ++k) dst[k * step] = -unary[(b * K + k) * N + n];
    for (int j = 0; j < count; ++j) {
      const IterateTerm& t = terms[j];
      const index_t p = t.shared ? n : i;
      const float* g = t.grid + (t.shared ? b * K : 0);
      const float w = t.post ? t.weight * t.post[p] : t.weight;
      if (t.V == 6) {
        add_term<6>(t, p, g, w, dst, step);
      } else if (t.V == 3) {
        add_term<3>(t, p, g, w, dst, step);
      } else {
        add_term<0>(t, p, g, w, dst, step);
      }
    }
    float m = -INFINITY;
    for (index_t k = 0; k < K; ++k) m = hd_max(m, dst[k * step]);
    float sum = 0.f;
    for (index_t k = 0; k < K; ++k) {
      const float x = hd_exp(dst[k * step] - m);
      dst[k * step] = x;
      sum += x;
    }
    const float inv = 1.f / sum;
    for (index_t k = 0; k < K; ++k) dst[k * step] *= inv;
  }
};

// The lattice's splat for a launcher (launch, blur_per_channel): the deterministic gather splat.
template <typename Launch>
struct GatherSplatBackend : Launch {
  static constexpr bool kGatherReadsChannelsLast = true;
  template <typename scalar_t, typename acc>
  static void splat(const lattice::SplatArgs<scalar_t, acc>& args, int64_t /*B*/, int64_t M, const at::Tensor& vertex,
                    const at::Tensor& plan) {
    lattice::gather_splat<Launch>(args, M, vertex, plan);
  }
};

// A kernel's lattice and scales on the host side of iterate_shared.
struct IterateKernel {
  at::Tensor vflat, bary, nbrs, plan, pre, post;
  int64_t Bt = 0, M = 0, d = 0;
};

// The whole inference: `iterations` updates after softmax(-unary). Backend: the lattice's launch(n, functor,
// grain), blur_per_channel() and kGatherReadsChannelsLast, and a splat(args, B, M, vertex, plan) that runs
// lattice::gather_splat (GatherSplatBackend).
template <typename Backend>
at::Tensor iterate_shared(const at::Tensor& unary_in, at::TensorList vertex, at::TensorList bary,
                          at::TensorList neighbors, at::IntArrayRef normalization, at::ArrayRef<double> weights,
                          int64_t iterations) {
  const char* op = "_crf_mean_field_iterate";
  check_iterate_args(op, unary_in, vertex, bary, neighbors, normalization, weights, iterations);
  const at::Tensor unary = unary_in.contiguous();
  const int64_t B = unary.size(0), K = unary.size(1), N = lattice::spatial_numel(unary);
  at::Tensor out = empty_output(unary.sizes(), unary.options());
  if (B * N == 0) return out;
  const auto fopt = unary.options();
  const size_t count = vertex.size();

  std::vector<IterateKernel> ks(count);
  SliceUpdate su;
  su.unary = unary.data_ptr<float>();
  su.B = B;
  su.K = K;
  su.N = N;
  for (size_t j = 0; j < count; ++j) {
    IterateKernel& k = ks[j];
    k.Bt = vertex[j].size(0);
    k.d = vertex[j].size(2) - 1;
    k.M = neighbors[j].size(0);
    k.vflat = vertex[j].contiguous().view({-1});
    k.bary = bary[j].contiguous().view({-1});
    k.nbrs = neighbors[j].contiguous();
    k.plan = lattice::splat_plan<Backend>(k.vflat, k.M);  // sorted once, used by every splat
    const int64_t V = k.d + 1, points = k.Bt * N;
    const float alpha = static_cast<float>(lattice::slice_alpha(k.d));
    if (normalization[j] != kNormNone && k.M > 0) {
      // W 1: the splat of ones (the extra channel alone), blurred, sliced at every point
      const at::Tensor none = at::empty({k.Bt, 0, N}, fopt);
      const at::Tensor ones = lattice::splat<Backend>(none, k.vflat, k.bary, k.M, V, at::Tensor(), /*has_extra=*/true,
                                                      at::Tensor(), k.plan);
      const at::Tensor blurred = lattice::blur<Backend>(ones, k.nbrs, k.d, /*adjoint=*/false, /*keep_input=*/false);
      at::Tensor scale = at::empty({points}, fopt);
      Backend::launch(points,
                      DegreeScales{blurred.data_ptr<float>(), k.vflat.data_ptr<int32_t>(), k.bary.data_ptr<float>(),
                                   alpha, V, normalization[j] == kNormSymmetric, scale.data_ptr<float>()},
                      4096);
      if (normalization[j] != kNormAfter) k.pre = scale;
      if (normalization[j] == kNormSymmetric || normalization[j] == kNormAfter) k.post = scale;
    }
    IterateTerm& t = su.terms[j];
    t.vertex = k.vflat.data_ptr<int32_t>();
    t.bary = k.bary.data_ptr<float>();
    t.post = k.post.defined() ? k.post.data_ptr<float>() : nullptr;
    t.weight = static_cast<float>(weights[j]);
    t.alpha = alpha;
    t.V = V;
    t.shared = k.Bt == 1 && B > 1;
    t.Cg = t.shared ? B * K : K;
    t.grid = nullptr;
  }

  // softmax(-unary) into the rows
  at::Tensor rows = at::empty({N, B, K}, fopt);
  su.count = 0;
  su.rows = rows.data_ptr<float>();
  su.planes = nullptr;
  Backend::launch(B * N, su, 1024);

  std::vector<at::Tensor> blurred(count);
  for (int64_t it = 0; it < iterations; ++it) {
    for (size_t j = 0; j < count; ++j) {
      IterateKernel& k = ks[j];
      IterateTerm& t = su.terms[j];
      // the rows as (Bt, Cg, N) values: image b's (b, k, n) at (n B + b) K + k, or for a lattice shared by the
      // batch point n's channel c = b K + k at n B K + c; channels contiguous, so the splat copies nothing
      const at::Tensor values = t.shared ? rows.view({N, B * K}).t().unsqueeze(0) : rows.permute({1, 2, 0});
      at::Tensor grid = lattice::splat<Backend>(values, k.vflat, k.bary, k.M, t.V, k.pre, /*has_extra=*/false,
                                                at::Tensor(), k.plan);
      grid = lattice::blur<Backend>(grid, k.nbrs, k.d, /*adjoint=*/false, /*keep_input=*/false);
      blurred[j] = grid;
      t.grid = grid.data_ptr<float>();
    }
    const bool last = it == iterations - 1;
    su.count = static_cast<int>(count);
    su.rows = last ? nullptr : rows.data_ptr<float>();  // the splats have read the rows: overwritten in place
    su.planes = last ? out.data_ptr<float>() : nullptr;
    Backend::launch(B * N, su, 1024);
  }
  return out;
}

}  // namespace meanfield
}  // namespace segops
