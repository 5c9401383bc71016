// Host glue of the permutohedral filter, shared by the CPU and CUDA backends: checks, buffers (from
// PyTorch's allocator, on the current stream), the dispatch on d = 1..16 and on dtypes, and the phase
// sequence build -> splat -> blur -> slice. A backend supplies a `Backend` type with
//   Backend::launch(n, functor, grain)            parallel for (at::parallel_for with that grain / grid-stride kernel)
//   Backend::ranged(n, functor, grain)            the same for functors with a CPU run_range(begin, end)
//                                                 (build, slice: point loops without index divisions)
//   Backend::splat(SplatAtomic<s, acc>, BN, M, image_lo, image_hi)   splat of all points
//   Backend::inclusive_scan(int32 tensor) -> int64 inclusive prefix sum
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/amax.h>
#include <ATen/ops/amin.h>
#include <ATen/ops/aminmax.h>
#include <ATen/ops/cumsum.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/full.h>
#include <ATen/ops/reciprocal.h>
#include <ATen/ops/zeros.h>
#include <c10/core/ScalarType.h>

#include <cmath>
#include <ctime>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <algorithm>
#include <tuple>
#include <utility>

#include "segops/permutohedral_math.h"

namespace segops {
namespace lattice {

using at::Tensor;

inline at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// The lattice of a batch: per point its d+1 vertex ids (int64, global over the batch) and barycentric
// weights, and per vertex its 2 (d+1) blur neighbours (-1 = absent).
struct Lattice {
  Tensor vertex;  // (B N (d+1)) int64
  Tensor bary;    // (B N (d+1)) acc
  Tensor nbr;     // (M, d+1, 2) int64
  int64_t M = 0;
};

// Smallest chunks worth waking a second CPU thread for (each parallel region costs a wake-up).
constexpr int64_t kGrainCheap = int64_t(1) << 15;

inline int64_t next_pow2(int64_t x) {
  int64_t p = 1;
  while (p < x) p <<= 1;
  return p;
}

struct PhaseTimer {
  bool on = std::getenv("SEGOPS_LATTICE_PROFILE") != nullptr;
  double t = now();
  static double now() {  // process CPU time: the machines are shared, wall time is noisy
    timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec * 1e-6;
  }
  void mark(const char* what) {
    if (!on) return;
    const double n = now();
    std::fprintf(stderr, "  %-10s %8.3f ms cpu\n", what, n - t);
    t = n;
  }
};

// Plans the packed-key variant: bounds every key coordinate from the feature ranges (interval
// arithmetic over the elevation, +-(d+1) for the rounding / plane correction / vertex offsets, plus a
// safety margin) and packs when the bit widths sum to at most 63. NaN / Inf / huge features: no packing
// (the general path reports them).
template <int D, typename T>
bool plan_packing(const Tensor& feats, const T* scale, KeyPacking<D>& pk) {
  Tensor lo_t = at::amin(feats, {0, 2}).to(at::kDouble).cpu();
  Tensor hi_t = at::amax(feats, {0, 2}).to(at::kDouble).cpu();
  const double* lo = lo_t.data_ptr<double>();
  const double* hi = hi_t.data_ptr<double>();
  double clo[kMaxD], chi[kMaxD];
  for (int i = 0; i < D; ++i) {
    if (!(std::isfinite(lo[i]) && std::isfinite(hi[i]))) return false;
    clo[i] = lo[i] * double(scale[i]);
    chi[i] = hi[i] * double(scale[i]);
  }
  int total = 0;
  for (int j = 0; j < D; ++j) {
    double elo = 0, ehi = 0;
    for (int i = j; i < D; ++i) {
      elo += clo[i];
      ehi += chi[i];
    }
    if (j > 0) {
      elo -= j * chi[j - 1];
      ehi -= j * clo[j - 1];
    }
    const double margin = 2.0 + 1e-5 * (std::fabs(elo) + std::fabs(ehi));
    elo -= margin;
    ehi += margin;
    if (!(elo > -kMaxElevated && ehi < kMaxElevated)) return false;
    const double klo = (D + 1) * std::floor(elo / (D + 1)) - 2.0 * (D + 1);
    const double khi = (D + 1) * std::ceil(ehi / (D + 1)) + 2.0 * (D + 1) + D;
    const double span = khi - klo + 1;
    int bits = 0;
    while (bits < 63 && std::ldexp(1.0, bits) < span) ++bits;
    pk.lo[j] = static_cast<int32_t>(klo);
    pk.bits[j] = bits;
    pk.shift[j] = total;
    total += bits;
    if (total > 63) return false;
  }
  for (int j = D; j < kMaxD; ++j) pk.lo[j] = pk.bits[j] = pk.shift[j] = 0;
  return true;
}

template <typename Backend, int D, typename T>
Lattice build_lattice_d(const Tensor& feats /* (B, D, N) of T */, int64_t B, int64_t N) {
  const int64_t E = N * (D + 1);
  // Image-local entry / slot ids are int32; the table capacity (> E) makes overflow impossible.
  TORCH_CHECK(E < (int64_t(1) << 30), "permutohedral_filter: an image of N = ", N, " points with d = ", D,
              " has N (d+1) = ", E, " lattice entries, more than the 2^30 supported per image");
  const int64_t cap = next_pow2(E + E / 4 + 1);
  const auto iopt = feats.options().dtype(at::kInt);
  const auto lopt = feats.options().dtype(at::kLong);
  PhaseTimer timer;
  T scale[kMaxD];
  const double inv_std_dev = std::sqrt(2.0 / 3.0) * (D + 1);
  for (int i = 0; i < kMaxD; ++i) scale[i] = i < D ? T(inv_std_dev / std::sqrt(double((i + 1) * (i + 2)))) : T(0);
  Tensor owner = at::empty({B * E}, iopt);
  Tensor bad = at::zeros({1}, iopt);
  Lattice lat;
  lat.bary = at::empty({B * E}, feats.options());
  lat.vertex = at::empty({B * E}, lopt);
  Tensor vkeys;
  const char* bad_msg =
      "permutohedral_filter: features contain NaN or Inf (or values so large that the elevated lattice "
      "coordinates exceed 1e9; features are expected to be O(1)-O(1e4) after scaling)";

  auto fill_base = [&](BuildBase<D, T>& build) {
    build.feats = feats.data_ptr<T>();
    build.fsb = feats.stride(0);
    build.fsd = feats.stride(1);
    build.fsn = feats.stride(2);
    for (int i = 0; i < kMaxD; ++i) build.scale[i] = scale[i];
    build.N = N;
    build.mask = static_cast<uint64_t>(cap - 1);
    build.owner = owner.data_ptr<int32_t>();
    build.bary = lat.bary.data_ptr<T>();
    build.bad = bad.data_ptr<int32_t>();
  };
  KeyPacking<D> pk;
  if (plan_packing<D, T>(feats, scale, pk)) {
    Tensor tables = at::full({B * cap}, -1, lopt);
    BuildPacked<D, T> build;
    fill_base(build);
    build.pk = pk;
    build.tables = tables.data_ptr<int64_t>();
    timer.mark("alloc");
    Backend::ranged(B * N, build, 8192);
    timer.mark("build");
    TORCH_CHECK(bad.item<int32_t>() == 0, bad_msg);  // one device sync on CUDA: features are user data
    Tensor flag = at::empty({B * cap}, iopt);
    for (int64_t b = 0; b < B; ++b)
      Backend::launch(cap, MarkSlots{build.tables + b * cap, flag.data_ptr<int32_t>() + b * cap}, kGrainCheap);
    timer.mark("mark");
    Tensor incl = Backend::inclusive_scan(flag);
    flag.reset();  // peak memory: the build's cap-sized arrays go as soon as they are consumed
    lat.M = incl[B * cap - 1].item<int64_t>();
    timer.mark("scan");
    vkeys = at::empty({lat.M * (D + 1)}, iopt);
    for (int64_t b = 0; b < B; ++b)
      Backend::launch(cap, SlotKeys<D>{build.tables + b * cap, incl.data_ptr<int64_t>() + b * cap, pk,
                                       static_cast<int32_t>(b), vkeys.data_ptr<int32_t>()},
                      kGrainCheap);
    tables.reset();  // the vertex ids below need only the owners' slots and the prefix sum
    for (int64_t b = 0; b < B; ++b)
      Backend::launch(E, AssignPacked{build.owner + b * E, incl.data_ptr<int64_t>() + b * cap,
                                      lat.vertex.data_ptr<int64_t>() + b * E},
                      kGrainCheap);
    timer.mark("assign");
  } else {
    Tensor tables = at::full({B * cap}, -1, iopt);
    Tensor keys = at::empty({B * E * D}, iopt);
    BuildPoints<D, T> build;
    fill_base(build);
    build.tables = tables.data_ptr<int32_t>();
    build.keys = keys.data_ptr<int32_t>();
    timer.mark("alloc");
    Backend::ranged(B * N, build, 8192);
    timer.mark("build");
    TORCH_CHECK(bad.item<int32_t>() == 0, bad_msg);
    Tensor flag = at::empty({B * E}, iopt);
    for (int64_t b = 0; b < B; ++b)
      Backend::launch(E, MarkOwners{build.owner + b * E, flag.data_ptr<int32_t>() + b * E}, kGrainCheap);
    timer.mark("mark");
    Tensor incl = Backend::inclusive_scan(flag);
    flag.reset();
    tables.reset();  // the owners now say everything the table did
    lat.M = incl[B * E - 1].item<int64_t>();
    timer.mark("scan");
    vkeys = at::empty({lat.M * (D + 1)}, iopt);
    for (int64_t b = 0; b < B; ++b) {
      Backend::launch(E, AssignVertices<D>{build.owner + b * E, incl.data_ptr<int64_t>() + b * E,
                                           build.keys + b * E * D, static_cast<int32_t>(b),
                                           lat.vertex.data_ptr<int64_t>() + b * E, vkeys.data_ptr<int32_t>()},
                      kGrainCheap);
    }
    timer.mark("assign");
  }
  owner.reset();  // the vertex ids are assigned
  TORCH_CHECK(lat.M < (int64_t(1) << 31), "permutohedral_filter: the batch has ", lat.M,
              " lattice vertices, more than the 2^31 supported; filter fewer images per call");
  const int64_t vcap = next_pow2(2 * lat.M + 1);
  Tensor vtable = at::full({vcap}, -1, iopt);
  Backend::launch(lat.M, InsertVertices<D>{vtable.data_ptr<int32_t>(), static_cast<uint64_t>(vcap - 1),
                                           vkeys.data_ptr<int32_t>()},
                  kGrainCheap / 4);
  lat.nbr = at::empty({lat.M, D + 1, 2}, lopt);
  Backend::launch(lat.M, FindNeighbors<D>{vtable.data_ptr<int32_t>(), static_cast<uint64_t>(vcap - 1),
                                          vkeys.data_ptr<int32_t>(), lat.nbr.data_ptr<int64_t>()},
                  1024);
  timer.mark("neighbors");
  return lat;
}

template <typename Backend, typename T>
Lattice build_lattice_t(const Tensor& feats, int64_t B, int64_t N, int64_t d) {
  switch (d) {
#define SEGOPS_LATTICE_CASE(DD) \
  case DD:                      \
    return build_lattice_d<Backend, DD, T>(feats, B, N);
    SEGOPS_LATTICE_CASE(1)
    SEGOPS_LATTICE_CASE(2)
    SEGOPS_LATTICE_CASE(3)
    SEGOPS_LATTICE_CASE(4)
    SEGOPS_LATTICE_CASE(5)
    SEGOPS_LATTICE_CASE(6)
    SEGOPS_LATTICE_CASE(7)
    SEGOPS_LATTICE_CASE(8)
    SEGOPS_LATTICE_CASE(9)
    SEGOPS_LATTICE_CASE(10)
    SEGOPS_LATTICE_CASE(11)
    SEGOPS_LATTICE_CASE(12)
    SEGOPS_LATTICE_CASE(13)
    SEGOPS_LATTICE_CASE(14)
    SEGOPS_LATTICE_CASE(15)
    SEGOPS_LATTICE_CASE(16)
#undef SEGOPS_LATTICE_CASE
    default:
      TORCH_CHECK(false, "permutohedral_filter: d = features.size(1) must be in [1, 16], got ", d);
  }
  return Lattice{};
}

// Splat (values * prescale) [+ a ones channel], blur, slice into `out` (B, C, N). Returns W 1 per point
// (B N) when `ones`, else an undefined tensor.
template <typename Backend>
Tensor apply_lattice(const Tensor& values /* (B, C, N) */, const Tensor& vertex, const Tensor& bary,
                     const Tensor& nbr, int64_t d, const Tensor& prescale, bool ones, bool adjoint,
                     const Tensor& out) {
  const int64_t B = values.size(0), C = values.size(1), N = values.size(2), M = nbr.size(0);
  const int64_t V = d + 1, Cv = C + (ones ? 1 : 0);
  const auto acc = acc_dtype(values.scalar_type());
  Tensor grid = at::zeros({M, Cv}, values.options().dtype(acc));
  Tensor norm = ones ? at::empty({B * N}, values.options().dtype(acc)) : Tensor();
  if (M == 0 || B * N == 0 || Cv == 0) return norm;
  // Per image the range of its vertex ids (they are image-major), for the CPU's owner-range splat.
  PhaseTimer timer;
  Tensor lo, hi;
  if (B == 1) {
    lo = at::zeros({1}, at::kLong);
    hi = at::full({1}, M - 1, at::TensorOptions().dtype(at::kLong));
  } else {
    std::tie(lo, hi) = at::aminmax(vertex.view({B, N * V}), 1);
    lo = lo.cpu();
    hi = hi.cpu();
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, values.scalar_type(), "permutohedral_filter", [&] {
    using accT = acc_t<scalar_t>;
    SplatAtomic<scalar_t, accT> sp;
    sp.values = values.data_ptr<scalar_t>();
    sp.vsb = values.stride(0);
    sp.vsc = values.stride(1);
    sp.vsn = values.stride(2);
    sp.prescale = prescale.defined() ? prescale.data_ptr<accT>() : nullptr;
    sp.N = N;
    sp.C = C;
    sp.Cv = Cv;
    sp.V = V;
    sp.ones = ones;
    sp.vertex = vertex.data_ptr<int64_t>();
    sp.bary = bary.data_ptr<accT>();
    sp.grid = grid.data_ptr<accT>();
    timer.mark("minmax");
    Backend::splat(sp, B * N, M, lo.data_ptr<int64_t>(), hi.data_ptr<int64_t>());
    timer.mark("splat");

    Tensor tmp = at::empty_like(grid);
    accT* a = grid.data_ptr<accT>();
    accT* b = tmp.data_ptr<accT>();
    for (int64_t step = 0; step <= d; ++step) {  // the adjoint W^T blurs in the reverse direction order
      const int64_t j = adjoint ? d - step : step;
      Backend::launch(M, BlurDirection<accT>{a, b, nbr.data_ptr<int64_t>(), Cv, V, j},
                      std::max<int64_t>(64, 16384 / Cv));
      std::swap(a, b);
    }
    timer.mark("blur");
    Slice<scalar_t, accT> sl;
    sl.grid = a;
    sl.N = N;
    sl.C = C;
    sl.Cv = Cv;
    sl.V = V;
    sl.ones = ones;
    sl.alpha = accT(1.0 / (1.0 + std::pow(2.0, -double(d))));
    sl.vertex = vertex.data_ptr<int64_t>();
    sl.bary = bary.data_ptr<accT>();
    sl.out = out.data_ptr<scalar_t>();
    sl.osb = out.stride(0);
    sl.osc = out.stride(1);
    sl.osn = out.stride(2);
    sl.norm = ones ? norm.data_ptr<accT>() : nullptr;
    Backend::ranged(B * N, sl, std::max<int64_t>(64, 8192 / Cv));
    timer.mark("slice");
  });
  return norm;
}

// (B, C, *spatial) -> (B, C, N) view (or copy when the spatial dims cannot be merged).
inline Tensor as_bcn(const Tensor& t) {
  if (t.dim() == 3) return t;
  return t.flatten(2);
}

inline void check_inputs(const char* op, const Tensor& values, const Tensor& features) {
  TORCH_CHECK(values.dim() >= 3, op, ": values must have shape (B, C, H, W) or (B, C, N), got ", values.sizes());
  TORCH_CHECK(features.dim() == values.dim(), op,
              ": features must have shape (B, d, *spatial) with the spatial shape of values; values ",
              values.sizes(), ", features ", features.sizes());
  bool same = features.size(0) == values.size(0);
  for (int64_t i = 2; i < values.dim(); ++i) same = same && features.size(i) == values.size(i);
  TORCH_CHECK(same, op, ": features (B, d, *spatial) must match values (B, C, *spatial) in B and the spatial "
              "dims; values ", values.sizes(), ", features ", features.sizes());
  TORCH_CHECK(features.size(1) >= 1 && features.size(1) <= kMaxD, op,
              ": d = features.size(1) must be in [1, 16], got ", features.size(1));
  TORCH_CHECK(at::isFloatingType(values.scalar_type()), op,
              ": values must be float32, float64, float16 or bfloat16, got ", values.scalar_type());
  TORCH_CHECK(at::isFloatingType(features.scalar_type()), op, ": features must be floating point, got ",
              features.scalar_type());
  TORCH_CHECK(values.device() == features.device(), op, ": values are on ", values.device(),
              " but features are on ", features.device());
}

template <typename Backend>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> filter_forward(const Tensor& values, const Tensor& features,
                                                                  bool normalize) {
  const char* op = "permutohedral_filter";
  check_inputs(op, values, features);
  const int64_t B = values.size(0), C = values.size(1), d = features.size(1);
  int64_t Np = 1;
  for (int64_t i = 2; i < values.dim(); ++i) Np *= values.size(i);
  const auto acc = acc_dtype(values.scalar_type());
  const auto fopt = values.options().dtype(acc);
  const auto lopt = values.options().dtype(at::kLong);
  Tensor out = at::empty(values.sizes(), values.options());
  Tensor vflat = as_bcn(values);
  Tensor oflat = out.view({B, C, Np});
  if (B * Np == 0) {
    return std::make_tuple(out, at::empty({B, Np, d + 1}, lopt), at::empty({B, Np, d + 1}, fopt),
                           at::empty({0, d + 1, 2}, lopt), normalize ? at::empty({B, Np}, fopt) : at::empty({0}, fopt));
  }
  Tensor feats = as_bcn(features.to(acc));
  Lattice lat;
  AT_DISPATCH_FLOATING_TYPES(acc, "permutohedral_filter", [&] { lat = build_lattice_t<Backend, scalar_t>(feats, B, Np, d); });
  Tensor norm = apply_lattice<Backend>(vflat, lat.vertex, lat.bary, lat.nbr, d, Tensor(), normalize, false, oflat);
  return std::make_tuple(out, lat.vertex.view({B, Np, d + 1}), lat.bary.view({B, Np, d + 1}), lat.nbr,
                         normalize ? norm.view({B, Np}) : at::empty({0}, fopt));
}

// transposed: grad_values = W^T grad; normalised filter: W^T (grad / (W 1)). W^T is W with the blur
// directions in reverse order (each direction's blur is symmetric, their product is not quite).
// Not transposed (the double backward): W grad, or (W grad) / (W 1).
template <typename Backend>
Tensor filter_backward(const Tensor& grad, const Tensor& vertex, const Tensor& bary, const Tensor& nbr,
                       const Tensor& norm, bool normalize, bool transposed) {
  const char* op = "_permutohedral_filter_backward";
  TORCH_CHECK(grad.dim() >= 3, op, ": grad must have shape (B, C, *spatial), got ", grad.sizes());
  TORCH_CHECK(vertex.dim() == 3 && bary.sizes() == vertex.sizes() && vertex.scalar_type() == at::kLong, op,
              ": vertex (int64) and bary must have shape (B, N, d+1); got ", vertex.sizes(), " and ", bary.sizes());
  const int64_t B = grad.size(0), C = grad.size(1), d = vertex.size(2) - 1;
  int64_t Np = 1;
  for (int64_t i = 2; i < grad.dim(); ++i) Np *= grad.size(i);
  TORCH_CHECK(vertex.size(0) == B && vertex.size(1) == Np, op, ": grad ", grad.sizes(),
              " does not match the lattice of ", vertex.size(0), " images of ", vertex.size(1), " points");
  TORCH_CHECK(nbr.dim() == 3 && nbr.size(1) == d + 1 && nbr.size(2) == 2, op, ": neighbors must be (M, d+1, 2)");
  TORCH_CHECK(at::isFloatingType(grad.scalar_type()), op, ": grad must be floating point");
  const auto acc = acc_dtype(grad.scalar_type());
  TORCH_CHECK(bary.scalar_type() == acc, op, ": bary must be ", acc, ", got ", bary.scalar_type());
  Tensor out = at::empty(grad.sizes(), grad.options());
  if (B * Np == 0) return out;
  Tensor prescale;
  if (normalize) {
    TORCH_CHECK(norm.numel() == B * Np && norm.scalar_type() == acc, op, ": norm must be (B, N) ", acc);
    if (transposed) prescale = at::reciprocal(norm.reshape({B * Np}));
  }
  apply_lattice<Backend>(as_bcn(grad), vertex.contiguous().view({-1}), bary.contiguous().view({-1}),
                         nbr.contiguous(), d, prescale, false, transposed, out.view({B, C, Np}));
  if (normalize && !transposed) out.view({B, C, Np}).div_(norm.reshape({B, 1, Np}));
  return out;
}

}  // namespace lattice
}  // namespace segops
