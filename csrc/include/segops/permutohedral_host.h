// Host glue of the permutohedral lattice, shared by the CPU and CUDA backends: checks, buffers (from
// PyTorch's allocator, on the current stream), the dispatch on d = 1..16 and on dtypes, and the phase
// sequences (build; splat -> blur -> slice; the quadratic forms of the losses). A backend supplies a
// `Backend` type with
//   Backend::launch(n, functor, grain)       parallel for (at::parallel_for with that grain / grid-stride kernel)
//   Backend::ranged(n, functor, grain)       the same for functors with a CPU run_range(begin, end)
//   Backend::splat(SplatArgs, B, M, vertex, plan)  splat of all points into a zeroed (M, Cg) grid (plan: a
//                                            splat_plan of the vertex ids, or undefined)
//   Backend::inclusive_scan(uint8 tensor)    -> int32 inclusive prefix sum
//   Backend::read_status(int64 tensor (1,))  -> its value on the host: the build's one read (Tensor::item)
//   Backend::kGatherReadsChannelsLast        the splat wants each point's channels contiguous (CUDA's gather)
//   Backend::blur_per_channel()              blur with one call per (vertex, channel) instead of per vertex
//   Backend::kPadRows                        the slice reads the grid from a copy whose rows are padded to a
//                                            multiple of 8 values (the CPU's whole-vector row loops)
//
// Every launch sits in a profiler scope named "segops_kernel::<phase>", so torch.profiler shows the launches
// of a call (their number does not depend on the batch size). The build reads ONE word back to the host
// (the vertex count with the error flags); nothing else in this file reads device memory on the host.
#pragma once

#include <sys/resource.h>

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/amax.h>
#include <ATen/ops/amin.h>
#include <ATen/ops/cumsum.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/full.h>
#include <ATen/ops/sort.h>
#include <ATen/ops/zeros.h>
#include <ATen/record_function.h>
#include <c10/core/ScalarType.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <tuple>
#include <utility>

#include "segops/cpu_alloc.h"
#include "segops/permutohedral_math.h"

#define SEGOPS_LATTICE_KERNEL(name) RECORD_USER_SCOPE("segops_kernel::" name)

namespace segops {
namespace lattice {

using at::Tensor;

inline at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// The lattice of a batch: per entry (point, vertex k) its vertex id and barycentric weight, per vertex its
// 2 (d+1) blur neighbours (-1 = absent). Vertex ids are int32, image-major, in order of first appearance.
struct Lattice {
  Tensor vertex;     // (B N (d+1)) int32
  Tensor bary;       // (B N (d+1)) acc
  Tensor neighbors;  // (M, d+1, 2) int32
  int64_t M = 0;
};

// What a backend's own build with packed keys returns (Backend::build_ranges, the CPU's): the vertex ids and
// weights are written into the build's arrays.
struct RangeBuilt {
  bool bad = false;  // a point's features are unusable
  int64_t M = 0;
  Tensor neighbors;  // (M, D+1, 2) int32, as FindNeighborCodes finds them
};

// SEGOPS_LATTICE_SHARED_BUILD=1 makes a backend with its own build run the shared one (tests compare the two).
// SEGOPS_LATTICE_PAD_ROWS=0 (tests): the CPU splats and slices float grids in rows of their own width instead of
// rows padded to whole 8-float vectors (the same bits, slower).
inline bool pad_rows_enabled() {
  const char* v = std::getenv("SEGOPS_LATTICE_PAD_ROWS");
  return v == nullptr || v[0] != '0';
}

// SEGOPS_LATTICE_FOLLOW=0 (tests): the CPU's build merges and remaps a range only after every range is numbered,
// instead of behind the numbering of range 1 (the same lattice).
inline bool follow_enabled() {
  const char* v = std::getenv("SEGOPS_LATTICE_FOLLOW");
  return v == nullptr || v[0] != '0';
}

// Outputs of at least this many bytes are sliced (kAffine, float, CPU) with non-temporal stores: such an output
// does not stay in the caches beside the slice's inputs, and a store that misses them first reads the line it
// overwrites. The CRF loss's backward at 512^2, K = 21 (22 MB): 0.4-0.5 ms faster per step on one and two
// threads; at half resolution (5.5 MB, read again at once by the resize's backward) 0.1 ms slower, hence the
// bound. SEGOPS_SLICE_STREAM_BYTES overrides it (tests: 0 streams every whole aligned run).
inline int64_t slice_stream_bytes() {
  const char* v = std::getenv("SEGOPS_SLICE_STREAM_BYTES");
  return v != nullptr && v[0] != '\0' ? std::strtoll(v, nullptr, 10) : (int64_t(16) << 20);
}

inline bool shared_build_forced() {
  const char* v = std::getenv("SEGOPS_LATTICE_SHARED_BUILD");
  return v != nullptr && v[0] != '\0' && v[0] != '0';
}

// Smallest chunks worth waking a second CPU thread for (each parallel region costs a wake-up).
constexpr int64_t kGrainCheap = int64_t(1) << 15;
// Entries per image / per call: ids are int32, and the build table holds 1.25x the entries.
constexpr int64_t kMaxEntriesPerImage = int64_t(1) << 30;
constexpr int64_t kMaxEntriesPerCall = int64_t(1) << 30;

inline int64_t next_pow2(int64_t x) {
  int64_t p = 1;
  while (p < x) p <<= 1;
  return p;
}

// SEGOPS_LATTICE_PROFILE=1 prints each phase's wall time, process CPU time (all threads, spinning OpenMP
// workers included) and page faults. Off, it reads no clock: one is constructed per op call.
struct PhaseTimer {
  bool on = std::getenv("SEGOPS_LATTICE_PROFILE") != nullptr;
  double t = 0, wall = 0;
  long faults = 0;
  PhaseTimer() {
    if (on) read(t, wall, faults);
  }
  static void read(double& cpu, double& mono, long& minflt) {
    timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    cpu = ts.tv_sec * 1e3 + ts.tv_nsec * 1e-6;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    mono = ts.tv_sec * 1e3 + ts.tv_nsec * 1e-6;
    rusage u;
    getrusage(RUSAGE_SELF, &u);
    minflt = u.ru_minflt;
  }
  void mark(const char* what) {
    if (!on) return;
    double n, w;
    long f;
    read(n, w, f);
    std::fprintf(stderr, "  %-10s %8.3f ms wall %8.3f ms cpu %6ld page faults\n", what, w - wall, n - t, f - faults);
    t = n;
    wall = w;
    faults = f;
  }
};

inline const char* bad_features_message() {
  return ": features contain NaN or Inf (or values so large that the elevated lattice coordinates exceed 1e9; "
         "features are expected to be O(1)-O(1e4) after scaling)";
}

// Build phases 1-2 with one key representation; returns the status word (the one host read).
template <typename Backend, int D, typename T, typename Build>
int64_t build_and_count(Build& build, int64_t B, int64_t N, const Tensor& owner_flag_buf, Tensor& owners_so_far,
                        const Tensor& flags, const Tensor& status, PhaseTimer& timer) {
  const int64_t total = B * N * (D + 1);
  {
    SEGOPS_LATTICE_KERNEL("build");
    Backend::ranged(B * N, build, 8192);
  }
  timer.mark("build");
  {
    SEGOPS_LATTICE_KERNEL("mark_owners");
    Backend::launch(total, MarkOwners{build.slot, build.owner, owner_flag_buf.data_ptr<uint8_t>()}, kGrainCheap);
  }
  {
    SEGOPS_LATTICE_KERNEL("scan");
    owners_so_far = Backend::inclusive_scan(owner_flag_buf);
  }
  {
    SEGOPS_LATTICE_KERNEL("status");
    Backend::launch(1, FinishStatus{owners_so_far.data_ptr<int32_t>(), total, flags.data_ptr<int32_t>(),
                                    status.data_ptr<int64_t>()}, 1);
  }
  timer.mark("scan");
  return Backend::read_status(status);  // the one device-to-host read of the build
}

template <typename Backend, int D, typename T>
Lattice build_lattice_d(const char* op, const Tensor& feats /* (B, D, N) of T */, int64_t B, int64_t N) {
  const int64_t E = N * (D + 1);
  TORCH_CHECK(E < kMaxEntriesPerImage, op, ": an image of N = ", N, " points with d = ", D, " has N (d+1) = ", E,
              " lattice entries, more than the 2^30 supported per image");
  const int64_t total = B * E;
  TORCH_CHECK(total < kMaxEntriesPerCall, op, ": the batch has B N (d+1) = ", total,
              " lattice entries, more than the 2^30 supported per call; filter fewer images per call");
  const int64_t cap = total + total / 4 + 1;
  const auto iopt = feats.options().dtype(at::kInt);
  const auto lopt = feats.options().dtype(at::kLong);
  PhaseTimer timer;
  T scale[kMaxD];
  const double inv_std_dev = std::sqrt(2.0 / 3.0) * (D + 1);
  for (int i = 0; i < kMaxD; ++i) scale[i] = i < D ? T(inv_std_dev / std::sqrt(double((i + 1) * (i + 2)))) : T(0);

  Tensor lo, hi;  // (D) of T: per feature its minimum and maximum over the batch (NaN where any is NaN)
  std::tie(lo, hi) = Backend::feature_bounds(feats);
  Tensor plan = at::empty({kPackPlanWords}, lopt);
  PlanPacking<D, T> planner;
  planner.lo = lo.data_ptr<T>();
  planner.hi = hi.data_ptr<T>();
  for (int i = 0; i < kMaxD; ++i) planner.scale[i] = scale[i];
  planner.B = B;
  planner.plan = reinterpret_cast<PackPlan*>(plan.data_ptr<int64_t>());
  {
    SEGOPS_LATTICE_KERNEL("plan_keys");
    Backend::launch(1, planner, 1);
  }
  Tensor flags = at::zeros({2}, iopt);
  // the outputs from empty_output: a loop of builds reuses the blocks already faulted in (with at::empty, 300-600
  // page faults per build of a 512^2 photo whenever glibc had returned the memory)
  Tensor slot = empty_output({total}, iopt);  // becomes the vertex ids
  Lattice lat;
  lat.bary = empty_output({total}, feats.options());
  timer.mark("alloc");

  auto fill_base = [&](BuildBase<D, T>& build) {
    build.feats = feats.data_ptr<T>();
    build.fsb = feats.stride(0);
    build.fsd = feats.stride(1);
    build.fsn = feats.stride(2);
    for (int i = 0; i < kMaxD; ++i) build.scale[i] = scale[i];
    build.N = N;
    build.cap = static_cast<uint64_t>(cap);
    build.owner = nullptr;
    build.slot = slot.data_ptr<int32_t>();
    build.bary = lat.bary.data_ptr<T>();
    build.flags = flags.data_ptr<int32_t>();
  };
  if constexpr (Backend::kRangeBuild) {  // the plan is in host memory: read it directly
    if (planner.plan->ok && !shared_build_forced()) {
      BuildPacked<D, T> packed;
      fill_base(packed);
      packed.plan = planner.plan;
      packed.codes = nullptr;
      const RangeBuilt built = Backend::template build_ranges<D, T>(packed, B * N);
      TORCH_CHECK(!built.bad, op, bad_features_message());
      timer.mark("build");
      lat.M = built.M;
      lat.vertex = slot;
      lat.neighbors = built.neighbors;
      return lat;
    }
  }

  Tensor status = at::empty({1}, lopt);
  Tensor owner = at::full({cap}, kNoOwner, iopt);
  Tensor owner_flag = at::empty({total}, feats.options().dtype(at::kByte));
  Tensor owners_so_far;
  auto fill_shared = [&](BuildBase<D, T>& build) {
    fill_base(build);
    build.owner = owner.data_ptr<int32_t>();
  };

  Tensor codes = at::full({cap}, -1, lopt);
  BuildPacked<D, T> packed;
  fill_shared(packed);
  packed.plan = planner.plan;
  packed.codes = codes.data_ptr<int64_t>();
  int64_t word = build_and_count<Backend, D, T>(packed, B, N, owner_flag, owners_so_far, flags, status, timer);
  TORCH_CHECK(!(word & kStatusBadFeatures), op, bad_features_message());
  Tensor keys;
  if (word & kStatusNotPacked) {  // key ranges too wide for one int64: store the keys (a second host read)
    codes.reset();
    owner.fill_(kNoOwner);
    flags.zero_();
    keys = at::empty({total * (D + 1)}, iopt);
    BuildStored<D, T> stored;
    fill_shared(stored);
    stored.keys = keys.data_ptr<int32_t>();
    word = build_and_count<Backend, D, T>(stored, B, N, owner_flag, owners_so_far, flags, status, timer);
    TORCH_CHECK(!(word & kStatusBadFeatures), op, bad_features_message());
  }
  owner_flag.reset();
  lat.M = word & kStatusCountMask;

  const bool packed_keys = codes.defined();
  Tensor vertex_codes = packed_keys ? at::empty({lat.M}, lopt) : Tensor();
  Tensor vertex_keys = packed_keys ? Tensor() : at::empty({lat.M * (D + 1)}, iopt);
  AssignVertices<D> assign;
  assign.slot_then_vertex = slot.data_ptr<int32_t>();
  assign.owner = owner.data_ptr<int32_t>();
  assign.owners_so_far = owners_so_far.data_ptr<int32_t>();
  assign.codes = packed_keys ? codes.data_ptr<int64_t>() : nullptr;
  assign.vertex_codes = packed_keys ? vertex_codes.data_ptr<int64_t>() : nullptr;
  assign.keys = packed_keys ? nullptr : keys.data_ptr<int32_t>();
  assign.vertex_keys = packed_keys ? nullptr : vertex_keys.data_ptr<int32_t>();
  {
    SEGOPS_LATTICE_KERNEL("assign");
    Backend::launch(total, assign, kGrainCheap);
  }
  lat.vertex = slot;
  codes.reset();
  owner.reset();
  keys.reset();
  owners_so_far.reset();
  timer.mark("assign");

  const int64_t vcap = next_pow2(2 * lat.M + 1);
  Tensor vtable = at::full({vcap}, -1, iopt);
  lat.neighbors = at::empty({lat.M, D + 1, 2}, iopt);
  if (packed_keys) {
    {
      SEGOPS_LATTICE_KERNEL("vertex_table");
      Backend::launch(lat.M, InsertVertexCodes{vtable.data_ptr<int32_t>(), static_cast<uint64_t>(vcap),
                                               vertex_codes.data_ptr<int64_t>()},
                      kGrainCheap / 4);
    }
    SEGOPS_LATTICE_KERNEL("neighbors");
    Backend::launch(lat.M, FindNeighborCodes<D>{vtable.data_ptr<int32_t>(), static_cast<uint64_t>(vcap),
                                                vertex_codes.data_ptr<int64_t>(), planner.plan,
                                                lat.neighbors.data_ptr<int32_t>()},
                    1024);
  } else {
    {
      SEGOPS_LATTICE_KERNEL("vertex_table");
      Backend::launch(lat.M, InsertVertices<D>{vtable.data_ptr<int32_t>(), static_cast<uint64_t>(vcap),
                                               vertex_keys.data_ptr<int32_t>()},
                      kGrainCheap / 4);
    }
    SEGOPS_LATTICE_KERNEL("neighbors");
    Backend::launch(lat.M, FindNeighbors<D>{vtable.data_ptr<int32_t>(), static_cast<uint64_t>(vcap),
                                            vertex_keys.data_ptr<int32_t>(), lat.neighbors.data_ptr<int32_t>()},
                    1024);
  }
  timer.mark("neighbors");
  return lat;
}

template <typename Backend, typename T>
Lattice build_lattice_t(const char* op, const Tensor& feats, int64_t B, int64_t N, int64_t d) {
  switch (d) {
#define SEGOPS_LATTICE_CASE(DD) \
  case DD:                      \
    return build_lattice_d<Backend, DD, T>(op, feats, B, N);
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
      TORCH_CHECK(false, op, ": d = features.size(1) must be in [1, 16], got ", d);
  }
  return Lattice{};
}

// (B, C, *spatial) -> (B, C, N) view (or copy when the spatial dims cannot be merged).
inline Tensor as_bcn(const Tensor& t) {
  if (t.dim() == 3) return t;
  return t.flatten(2);
}

inline int64_t spatial_numel(const Tensor& t) {
  int64_t n = 1;
  for (int64_t i = 2; i < t.dim(); ++i) n *= t.size(i);
  return n;
}

// Builds the lattice of features (B, d, *spatial) in dtype `acc` (a (B, d, N) copy when not already).
template <typename Backend>
Lattice build_lattice(const char* op, const Tensor& features, at::ScalarType acc) {
  const int64_t B = features.size(0), d = features.size(1), N = spatial_numel(features);
  Tensor feats = as_bcn(features.to(acc));
  Lattice lat;
  AT_DISPATCH_FLOATING_TYPES(acc, "permutohedral_lattice", [&] {
    lat = build_lattice_t<Backend, scalar_t>(op, feats, B, N, d);
  });
  return lat;
}

// ---- splat, blur, slice ----------------------------------------------------------------------------------

// Splat of values (B, C, N) [* prescale (B N)] [+ one extra channel: `extra` (B, N) or ones] -> (M, Cg) grid.
template <typename Backend>
Tensor splat(const Tensor& values, const Tensor& vertex, const Tensor& bary, int64_t M, int64_t V,
             const Tensor& prescale, bool has_extra, const Tensor& extra, const Tensor& plan = Tensor()) {
  const int64_t B = values.size(0), C = values.size(1), N = values.size(2);
  const int64_t Cg = C + (has_extra ? 1 : 0);
  const auto acc = acc_dtype(values.scalar_type());
  Tensor grid = at::zeros({M, Cg}, values.options().dtype(acc));
  if (M == 0 || B * N == 0 || Cg == 0) return grid;
  Tensor src = values;
  if (Backend::kGatherReadsChannelsLast && C > 1 && values.stride(1) != 1) {
    // the gather reads a point's C values together: one transposing copy makes them contiguous
    src = values.transpose(1, 2).contiguous().transpose(1, 2);
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, values.scalar_type(), "permutohedral_splat", [&] {
    using accT = acc_t<scalar_t>;
    SplatArgs<scalar_t, accT> args;
    args.values = src.data_ptr<scalar_t>();
    args.vsb = src.stride(0);
    args.vsc = src.stride(1);
    args.vsn = src.stride(2);
    args.prescale = prescale.defined() ? prescale.data_ptr<accT>() : nullptr;
    args.has_extra = has_extra;
    args.extra = extra.defined() ? extra.data_ptr<scalar_t>() : nullptr;
    args.esb = extra.defined() ? extra.stride(0) : 0;
    args.esn = extra.defined() ? extra.stride(1) : 0;
    args.N = N;
    args.C = C;
    args.Cg = Cg;
    args.V = V;
    args.vertex = vertex.data_ptr<int32_t>();
    args.bary = bary.data_ptr<accT>();
    args.grid = grid.data_ptr<accT>();
    SEGOPS_LATTICE_KERNEL("splat");
    Backend::splat(args, B, M, vertex, plan);
  });
  return grid;
}

// The gather splat's plan for the vertex ids (T) of a lattice of M vertices, packed into one int64 tensor
// [order (T) | start (M+1) | piece_end (M) | multi_end (M)]: the entries sorted by vertex, each vertex's first
// position in that order, and the inclusive scans of its pieces and of its stored pieces. It depends on the
// vertex ids alone, so a lattice filtered many times (mean-field inference) sorts once.
struct SplatPlanLayout {
  int64_t T, M;
  int64_t size() const { return T + 3 * M + 1; }
  int64_t start() const { return T; }
  int64_t piece_end() const { return T + M + 1; }
  int64_t multi_end() const { return T + 2 * M + 1; }
};

template <typename Backend>
Tensor splat_plan(const Tensor& vertex, int64_t M) {
  const int64_t T = vertex.numel();
  const SplatPlanLayout layout{T, M};
  Tensor plan = at::empty({layout.size()}, vertex.options().dtype(at::kLong));
  if (T == 0 || M == 0) {
    plan.zero_();
    return plan;
  }
  Tensor sorted = at::empty({T}, vertex.options());
  Tensor order = plan.narrow(0, 0, T);  // sorted into the plan directly
  at::sort_out(sorted, order, vertex.reshape({T}), /*stable=*/true, /*dim=*/0, /*descending=*/false);
  int64_t* start = plan.data_ptr<int64_t>() + layout.start();
  Backend::launch(T, SegmentStarts{sorted.data_ptr<int32_t>(), T, start, static_cast<int32_t>(M)}, kGrainCheap);
  Tensor counts = at::empty({2, M}, vertex.options().dtype(at::kLong));  // pieces, stored pieces
  Backend::launch(M, SplatPieceCounts{start, counts[0].data_ptr<int64_t>(), counts[1].data_ptr<int64_t>()},
                  kGrainCheap);
  Tensor ends = plan.narrow(0, layout.piece_end(), 2 * M).view({2, M});  // piece_end, then multi_end
  at::cumsum_out(ends, counts, 1);
  return plan;
}

// Checks a plan passed to an op against its lattice (its contents are trusted: made by splat_plan).
inline void check_splat_plan(const char* op, const Tensor& plan, const Tensor& vertex, int64_t M) {
  const int64_t size = SplatPlanLayout{vertex.numel(), M}.size();
  TORCH_CHECK(plan.dim() == 1 && plan.scalar_type() == at::kLong && plan.is_contiguous() && plan.numel() == size &&
                  plan.device() == vertex.device(),
              op, ": splat_plan must be the int64 tensor (", size, ",) that ",
              "_permutohedral_splat_plan made from this lattice's vertex ids, on ", vertex.device(), "; got ",
              plan.sizes(), " ", plan.scalar_type(), " on ", plan.device());
}

// The deterministic gather splat: entries sorted (stably) by vertex, each vertex's entries summed in pieces of at
// most kSplatPiece in ascending order, then its pieces in ascending order (permutohedral_math.h). CUDA's splat;
// the CPU runs it when SEGOPS_LATTICE_GATHER_SPLAT=1 (tests). Nothing is read back: pass 1's launch is sized by
// the bound sum_v ceil(n_v / L) <= T / L + M, and only multi-piece vertices store their pieces, at most
// sum over n_v > L of (n_v / L + 1) < 2 T / L of them (Cs floats each: 17 MB for 8 images of 512², K = 21).
// `plan`: splat_plan(vertex, M), or undefined to make it here.
template <typename Backend, typename scalar_t, typename acc>
void gather_splat(const SplatArgs<scalar_t, acc>& args, int64_t M, const Tensor& vertex, const Tensor& given_plan) {
  const int64_t T = vertex.numel();
  if (M == 0 || T == 0) return;
  const Tensor plan = given_plan.defined() ? given_plan : splat_plan<Backend>(vertex, M);
  const int64_t* p = plan.data_ptr<int64_t>();
  const int64_t Cs = args.Cg;
  const int64_t max_pieces = (T + kSplatPiece - 1) / kSplatPiece + M;
  const int64_t max_stored = 2 * ((T + kSplatPiece - 1) / kSplatPiece);
  Tensor partial = at::empty({max_stored, Cs}, at::TensorOptions().dtype(c10::CppTypeToScalarType<acc>::value)
                                                   .device(vertex.device()));
  SplatGather<scalar_t, acc> g;
  g.args = args;
  g.order = p;
  const SplatPlanLayout layout{T, M};
  g.start = p + layout.start();
  g.piece_end = p + layout.piece_end();
  g.multi_end = p + layout.multi_end();
  g.partial = partial.data_ptr<acc>();
  g.M = M;
  g.Cs = Cs;
  Backend::launch(max_pieces * Cs, g, 64);
  Backend::launch(M * Cs, SplatSumPieces<scalar_t, acc>{g.multi_end, partial.data_ptr<acc>(), args.grid, Cs, args.Cg},
                  64);
}

// d+1 blur passes (directions 0..d, or d..0 for the adjoint) over all Cg channels. Returns the blurred
// grid; `grid` itself is kept when `keep_input`, else reused as a buffer.
template <typename Backend>
Tensor blur(const Tensor& grid, const Tensor& neighbors, int64_t d, bool adjoint, bool keep_input) {
  const int64_t M = grid.size(0), Cg = grid.size(1), V = d + 1;
  if (M == 0 || Cg == 0) return keep_input ? grid.clone() : grid;
  Tensor src = grid, dst = at::empty_like(grid), spare;
  if (keep_input) spare = at::empty_like(grid);
  AT_DISPATCH_FLOATING_TYPES(grid.scalar_type(), "permutohedral_blur", [&] {
    for (int64_t step = 0; step <= d; ++step) {  // the adjoint W^T blurs in the reverse direction order
      const int64_t j = adjoint ? d - step : step;
      SEGOPS_LATTICE_KERNEL("blur");
      if (Backend::blur_per_channel()) {
        Backend::launch(M * Cg, BlurDirectionChannels<scalar_t>{{src.data_ptr<scalar_t>(), dst.data_ptr<scalar_t>(),
                                                                 neighbors.data_ptr<int32_t>(), Cg, V, j}},
                        16384);
      } else {
        Backend::ranged(M, BlurDirection<scalar_t>{src.data_ptr<scalar_t>(), dst.data_ptr<scalar_t>(),
                                                   neighbors.data_ptr<int32_t>(), Cg, V, j},
                        std::max<int64_t>(64, 16384 / Cg));
      }
      if (step == 0 && keep_input) {
        src = dst;
        dst = spare;
      } else {
        std::swap(src, dst);
      }
    }
  });
  return src;
}

// A float32 grid (M, Cg) as rows of Cp = round_up(Cg, 8) floats, the padding zero.
template <typename Backend>
Tensor padded_rows(const Tensor& grid, int64_t Cp) {
  const int64_t M = grid.size(0), Cg = grid.size(1);
  Tensor out = empty_output({M, Cp}, grid.options());
  SEGOPS_LATTICE_KERNEL("pad_rows");
  Backend::launch(M, PadRows{grid.data_ptr<float>(), out.data_ptr<float>(), Cg, Cp},
                  std::max<int64_t>(64, 16384 / std::max<int64_t>(Cp, 1)));
  return out;
}

// Slices `grid` (M, Cg) at every point into out (B, C, N) (strided view) per `mode`. With up = (H, W) (CPU,
// kAffine), the points are those of a half-resolution resize of (H, W) and out, (B, C, H W) contiguous,
// receives the resize's backward of the sliced values times `mask` ((B, N) of out's dtype, or undefined):
// see Slice::up_w.
template <typename Backend>
void slice(const Tensor& grid_in, const Tensor& vertex, const Tensor& bary, int64_t d, SliceMode mode,
           const Tensor& out, const Tensor& norm, const Tensor& coef, bool coef_extra, double scale_a,
           std::pair<int64_t, int64_t> up = {0, 0}, const Tensor& mask = Tensor()) {
  const int64_t B = out.size(0), C = out.size(1), N = up.second > 0 ? (up.first / 2) * (up.second / 2) : out.size(2);
  if (B * N == 0 || (C == 0 && mode != SliceMode::kNormalize)) return;
  Tensor grid = grid_in;
  if constexpr (Backend::kPadRows) {
    // In padded rows (whole 8-float vectors, 32-byte aligned) a point's sums stay in registers (Slice::
    // gather_pieces): the CRF loss's backward slice of 21 channels at 512^2 took 4.2 instead of 8.3 ms on one
    // thread. The copy costs M Cp values; where the lattice has more vertices than points it would cost more
    // than it saves.
    const int64_t Cp = (grid.size(1) + 7) / 8 * 8;
    if (grid.scalar_type() == at::kFloat && Cp != grid.size(1) && grid.size(0) <= B * N && pad_rows_enabled())
      grid = padded_rows<Backend>(grid, Cp);
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "permutohedral_slice", [&] {
    using accT = acc_t<scalar_t>;
    Slice<scalar_t, accT> slicer;
    slicer.grid = grid.data_ptr<accT>();
    slicer.N = N;
    slicer.C = C;
    slicer.Cg = grid.size(1);
    slicer.V = d + 1;
    slicer.mode = mode;
    slicer.alpha = accT(1.0 / (1.0 + std::pow(2.0, -double(d))));
    slicer.vertex = vertex.data_ptr<int32_t>();
    slicer.bary = bary.data_ptr<accT>();
    slicer.out = out.data_ptr<scalar_t>();
    slicer.osb = out.stride(0);
    slicer.osc = out.stride(1);
    slicer.osn = out.stride(2);
    slicer.norm = norm.defined() ? norm.data_ptr<accT>() : nullptr;
    slicer.coef = coef.defined() ? coef.data_ptr<double>() : nullptr;
    slicer.coef_extra = coef_extra;
    slicer.scale_a = scale_a;
    slicer.stream = out.numel() * static_cast<int64_t>(sizeof(scalar_t)) >= slice_stream_bytes();  // CPU only
    slicer.up_h = up.first;
    slicer.up_w = up.second;
    slicer.mask = mask.defined() ? mask.data_ptr<scalar_t>() : nullptr;
    SEGOPS_LATTICE_KERNEL("slice");
    Backend::ranged(B * N, slicer, std::max<int64_t>(64, 8192 / std::max<int64_t>(C, 1)));
  });
}

inline double slice_alpha(int64_t d) { return 1.0 / (1.0 + std::pow(2.0, -double(d))); }

// ---- checks -------------------------------------------------------------------------------------------------

inline void check_features(const char* op, const Tensor& features) {
  TORCH_CHECK(features.dim() >= 3, op, ": features must have shape (B, d, H, W) or (B, d, N), got ", features.sizes());
  TORCH_CHECK(features.size(1) >= 1 && features.size(1) <= kMaxD, op,
              ": d = features.size(1) must be in [1, 16], got ", features.size(1));
  TORCH_CHECK(at::isFloatingType(features.scalar_type()), op, ": features must be floating point, got ",
              features.scalar_type());
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

// The lattice tensors (vertex (B, N, d+1) int32, bary (B, N, d+1), neighbors (M, d+1, 2) int32) against a
// (B, C, *spatial) tensor of dtype `like`. Returns d.
inline int64_t check_lattice(const char* op, const char* what, const Tensor& x, const Tensor& vertex,
                             const Tensor& bary, const Tensor& neighbors) {
  TORCH_CHECK(x.dim() >= 3, op, ": ", what, " must have shape (B, C, *spatial), got ", x.sizes());
  TORCH_CHECK(vertex.dim() == 3 && vertex.scalar_type() == at::kInt && bary.sizes() == vertex.sizes(), op,
              ": vertex (int32) and bary must have shape (B, N, d+1) (a lattice from permutohedral_lattice); got ",
              vertex.sizes(), " ", vertex.scalar_type(), " and ", bary.sizes());
  const int64_t d = vertex.size(2) - 1;
  TORCH_CHECK(d >= 1 && d <= kMaxD, op, ": the lattice has d = ", d, ", expected 1..16");
  TORCH_CHECK(vertex.size(0) == x.size(0) && vertex.size(1) == spatial_numel(x), op, ": ", what, " ", x.sizes(),
              " does not match the lattice of ", vertex.size(0), " images of ", vertex.size(1), " points");
  TORCH_CHECK(neighbors.dim() == 3 && neighbors.size(1) == d + 1 && neighbors.size(2) == 2 &&
                  neighbors.scalar_type() == at::kInt,
              op, ": neighbors must be (M, d+1, 2) int32, got ", neighbors.sizes(), " ", neighbors.scalar_type());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), op, ": ", what, " must be floating point, got ", x.scalar_type());
  const auto acc = acc_dtype(x.scalar_type());
  TORCH_CHECK(bary.scalar_type() == acc, op, ": the lattice's weights are ", bary.scalar_type(), " but ", what,
              " of dtype ", x.scalar_type(), " need a ", acc, " lattice (build it from ", acc, " features)");
  TORCH_CHECK(vertex.device() == x.device() && bary.device() == x.device() && neighbors.device() == x.device(), op,
              ": ", what, " are on ", x.device(), " but the lattice is on ", vertex.device());
  return d;
}

// ---- ops ------------------------------------------------------------------------------------------------------

template <typename Backend>
std::tuple<Tensor, Tensor, Tensor> lattice_forward(const Tensor& features) {
  const char* op = "permutohedral_lattice";
  check_features(op, features);
  const int64_t B = features.size(0), d = features.size(1), N = spatial_numel(features);
  const auto acc = acc_dtype(features.scalar_type());
  if (B * N == 0) {
    return std::make_tuple(at::empty({B, N, d + 1}, features.options().dtype(at::kInt)),
                           at::empty({B, N, d + 1}, features.options().dtype(acc)),
                           at::empty({0, d + 1, 2}, features.options().dtype(at::kInt)));
  }
  Lattice lat = build_lattice<Backend>(op, features, acc);
  return std::make_tuple(lat.vertex.view({B, N, d + 1}), lat.bary.view({B, N, d + 1}), lat.neighbors);
}

// W values (or W^T values when transposed) on a built lattice.
template <typename Backend>
Tensor apply_forward(const Tensor& values, const Tensor& vertex, const Tensor& bary, const Tensor& neighbors,
                     bool transposed, const std::optional<Tensor>& plan) {
  const char* op = "permutohedral_apply";
  const int64_t d = check_lattice(op, "values", values, vertex, bary, neighbors);
  if (plan.has_value()) check_splat_plan(op, *plan, vertex, neighbors.size(0));
  const int64_t B = values.size(0), C = values.size(1), N = spatial_numel(values);
  Tensor out = empty_output(values.sizes(), values.options());
  if (B * N * C == 0) return out;
  const Tensor vflat = vertex.reshape({-1}), bflat = bary.reshape({-1});
  Tensor grid = splat<Backend>(as_bcn(values), vflat, bflat, neighbors.size(0), d + 1, Tensor(), false, Tensor(),
                               plan.has_value() ? *plan : Tensor());
  grid = blur<Backend>(grid, neighbors.contiguous(), d, transposed, false);
  slice<Backend>(grid, vflat, bflat, d, SliceMode::kPlain, out.view({B, C, N}), Tensor(), Tensor(), false, 1.0);
  return out;
}

template <typename Backend>
Tensor splat_plan_forward(const Tensor& vertex, const Tensor& neighbors) {
  const char* op = "_permutohedral_splat_plan";
  TORCH_CHECK(vertex.dim() == 3 && vertex.scalar_type() == at::kInt, op,
              ": vertex must be the (B, N, d+1) int32 ids of a lattice from permutohedral_lattice, got ",
              vertex.sizes(), " ", vertex.scalar_type());
  TORCH_CHECK(neighbors.dim() == 3 && neighbors.size(1) == vertex.size(2) && neighbors.size(2) == 2 &&
                  neighbors.scalar_type() == at::kInt && neighbors.device() == vertex.device(),
              op, ": neighbors must be the lattice's (M, d+1, 2) int32 tensor on ", vertex.device(), ", got ",
              neighbors.sizes(), " ", neighbors.scalar_type(), " on ", neighbors.device());
  return splat_plan<Backend>(vertex.contiguous(), neighbors.size(0));
}

template <typename Backend>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> filter_forward(const Tensor& values, const Tensor& features,
                                                                  bool normalize) {
  const char* op = "permutohedral_filter";
  check_inputs(op, values, features);
  const int64_t B = values.size(0), C = values.size(1), d = features.size(1), N = spatial_numel(values);
  const auto acc = acc_dtype(values.scalar_type());
  const auto fopt = values.options().dtype(acc);
  const auto iopt = values.options().dtype(at::kInt);
  Tensor out = empty_output(values.sizes(), values.options());
  if (B * N == 0) {
    return std::make_tuple(out, at::empty({B, N, d + 1}, iopt), at::empty({B, N, d + 1}, fopt),
                           at::empty({0, d + 1, 2}, iopt), normalize ? at::empty({B, N}, fopt) : at::empty({0}, fopt));
  }
  Lattice lat = build_lattice<Backend>(op, features, acc);
  Tensor norm = normalize ? at::empty({B * N}, fopt) : at::empty({0}, fopt);
  if (C > 0 || normalize) {
    Tensor grid = splat<Backend>(as_bcn(values), lat.vertex, lat.bary, lat.M, d + 1, Tensor(), normalize, Tensor());
    grid = blur<Backend>(grid, lat.neighbors, d, false, false);
    slice<Backend>(grid, lat.vertex, lat.bary, d, normalize ? SliceMode::kNormalize : SliceMode::kPlain,
                   out.view({B, C, N}), norm, Tensor(), false, 1.0);
  }
  return std::make_tuple(out, lat.vertex.view({B, N, d + 1}), lat.bary.view({B, N, d + 1}), lat.neighbors,
                         normalize ? norm.view({B, N}) : norm);
}

// transposed: grad_values = W^T grad; normalised filter: W^T (grad / (W 1)). W^T is W with the blur
// directions in reverse order (each direction's blur is symmetric, their product is not quite).
// Not transposed (the double backward): W grad, or (W grad) / (W 1).
template <typename Backend>
Tensor filter_backward(const Tensor& grad, const Tensor& vertex, const Tensor& bary, const Tensor& neighbors,
                       const Tensor& norm, bool normalize, bool transposed) {
  const char* op = "_permutohedral_filter_backward";
  const int64_t d = check_lattice(op, "grad", grad, vertex, bary, neighbors);
  const int64_t B = grad.size(0), C = grad.size(1), N = spatial_numel(grad);
  const auto acc = acc_dtype(grad.scalar_type());
  Tensor out = empty_output(grad.sizes(), grad.options());
  if (B * N == 0) return out;
  Tensor prescale;
  if (normalize) {
    TORCH_CHECK(norm.numel() == B * N && norm.scalar_type() == acc, op, ": norm must be (B, N) ", acc);
    if (transposed) prescale = norm.reshape({B * N}).reciprocal();
  }
  if (C > 0) {
    Tensor grid = splat<Backend>(as_bcn(grad), vertex.reshape({-1}), bary.reshape({-1}), neighbors.size(0), d + 1,
                                 prescale, false, Tensor());
    grid = blur<Backend>(grid, neighbors.contiguous(), d, transposed, false);
    slice<Backend>(grid, vertex.reshape({-1}), bary.reshape({-1}), d, SliceMode::kPlain, out.view({B, C, N}),
                   Tensor(), Tensor(), false, 1.0);
  }
  if (normalize && !transposed) out.view({B, C, N}).div_(norm.reshape({B, 1, N}));
  return out;
}

// ---- the losses' quadratic forms --------------------------------------------------------------------------
// forms[b, k, 0] = <x_bk, W_b x_bk>, forms[b, k, 1] = <x_bk, W_b r_b> (r = roi, or ones; only with
// `degree`), in float64, computed in the vertex domain: <x, W y> = alpha <S x, B S y> (the slice is alpha
// times the transposed splat), so no per-point output is formed. Returns (forms, splatted S [x, r],
// blurred B S [x, r]), the latter two (M, K [+1]) kept for the backward.

template <typename Backend>
Tensor image_starts(const Tensor& vertex, int64_t B, int64_t entries_per_image, int64_t M) {
  Tensor starts = at::empty({B + 1}, vertex.options().dtype(at::kInt));
  SEGOPS_LATTICE_KERNEL("image_starts");
  Backend::launch(B + 1, ImageStarts{vertex.data_ptr<int32_t>(), entries_per_image, B, static_cast<int32_t>(M),
                                     starts.data_ptr<int32_t>()},
                  kGrainCheap);
  return starts;
}

template <typename Backend>
std::tuple<Tensor, Tensor, Tensor> quadratic_forms(const Tensor& x, const std::optional<Tensor>& roi,
                                                   const Tensor& vertex, const Tensor& bary, const Tensor& neighbors,
                                                   bool degree) {
  const char* op = "_lattice_quadratic_forms";
  const int64_t d = check_lattice(op, "x", x, vertex, bary, neighbors);
  const int64_t B = x.size(0), K = x.size(1), N = spatial_numel(x), M = neighbors.size(0);
  const auto acc = acc_dtype(x.scalar_type());
  Tensor extra;
  if (roi.has_value() && roi->defined()) {
    TORCH_CHECK(degree, op, ": roi is only used with degree=True");
    TORCH_CHECK(roi->dim() == x.dim() && roi->size(0) == B && roi->size(1) == 1 && spatial_numel(*roi) == N &&
                    roi->scalar_type() == x.scalar_type() && roi->device() == x.device(),
                op, ": roi must be (B, 1, *spatial) like x, got ", roi->sizes(), " ", roi->scalar_type());
    extra = as_bcn(*roi).select(1, 0);
  }
  const int64_t Cg = K + (degree ? 1 : 0);
  if (B * N == 0 || K == 0 || M == 0) {
    return std::make_tuple(at::zeros({B, K, 2}, x.options().dtype(at::kDouble)),
                           at::zeros({M, Cg}, x.options().dtype(acc)), at::zeros({M, Cg}, x.options().dtype(acc)));
  }
  Tensor forms = at::empty({B, K, 2}, x.options().dtype(at::kDouble));  // every entry written by sum_chunks
  PhaseTimer timer;
  const Tensor vflat = vertex.reshape({-1});
  Tensor G = splat<Backend>(as_bcn(x), vflat, bary.reshape({-1}), M, d + 1, Tensor(), degree, extra);
  timer.mark("splat");
  Tensor Y = blur<Backend>(G, neighbors.contiguous(), d, false, true);
  timer.mark("blur");
  const int64_t nchunk = (M + kDotChunk - 1) / kDotChunk;
  Tensor starts = image_starts<Backend>(vflat, B, N * (d + 1), M);
  Tensor partial = at::empty({B * K * 2 * nchunk}, x.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES(acc, "lattice_quadratic_forms", [&] {
    SEGOPS_LATTICE_KERNEL("vertex_dots");
    Backend::launch(B * K * nchunk,
                    VertexDots<scalar_t>{G.data_ptr<scalar_t>(), Y.data_ptr<scalar_t>(), Cg, K, degree,
                                         starts.data_ptr<int32_t>(), nchunk, partial.data_ptr<double>()},
                    1);
  });
  timer.mark("dots");
  {
    SEGOPS_LATTICE_KERNEL("sum_chunks");
    Backend::launch(B * K * 2, SumChunks{partial.data_ptr<double>(), nchunk, slice_alpha(d), forms.data_ptr<double>()},
                    1024);
  }
  return std::make_tuple(forms, G, Y);
}

// grad_x (B, K, N) of sum grad_forms * forms: for forms[..., 0] the exact adjoint alpha S^T (B + B^T) S x
// (`exact`) or the ECCV'18 gradient 2 W x = 2 alpha S^T B S x (W taken as symmetric, `splatted` unused);
// for forms[..., 1] (with the degree channel) W r.
// With full_size = [H, W] (CPU): the points are the pixels of half_resolution(s) for an s of spatial size
// (H, W), x = half_resolution(s) * mask (mask (B, 1, H / 2, W / 2) of `dtype`, or none), and the result is the
// gradient of s, (B, K, H, W): the backward of the multiply and of the resize fused into the slice (the
// separate ops' values, bitwise).
template <typename Backend>
Tensor quadratic_forms_backward(const Tensor& grad_forms, const Tensor& splatted, const Tensor& blurred,
                                const Tensor& vertex, const Tensor& bary, const Tensor& neighbors, bool exact,
                                at::ScalarType dtype, at::OptionalIntArrayRef full_size = std::nullopt,
                                const std::optional<Tensor>& mask_in = std::nullopt) {
  const char* op = "_lattice_quadratic_forms_backward";
  TORCH_CHECK(vertex.dim() == 3 && vertex.scalar_type() == at::kInt, op, ": vertex must be (B, N, d+1) int32");
  const int64_t B = vertex.size(0), N = vertex.size(1), d = vertex.size(2) - 1;
  TORCH_CHECK(grad_forms.dim() == 3 && grad_forms.size(0) == B && grad_forms.size(2) == 2 &&
                  grad_forms.scalar_type() == at::kDouble,
              op, ": grad_forms must be (B, K, 2) float64, got ", grad_forms.sizes(), " ", grad_forms.scalar_type());
  const int64_t K = grad_forms.size(1), M = neighbors.size(0);
  TORCH_CHECK(blurred.dim() == 2 && blurred.size(0) == M && (blurred.size(1) == K || blurred.size(1) == K + 1), op,
              ": blurred must be (M, K [+1]), got ", blurred.sizes());
  const bool degree = blurred.size(1) == K + 1;
  std::pair<int64_t, int64_t> up{0, 0};
  Tensor mask;
  if (full_size.has_value()) {
    TORCH_CHECK(Backend::kSliceUpsamples, op, ": full_size is supported on the CPU only");
    const auto fs = *full_size;
    TORCH_CHECK(fs.size() == 2 && fs[0] >= 0 && fs[1] >= 0 && (fs[0] / 2) * (fs[1] / 2) == N, op,
                ": full_size must be [H, W] with (H // 2) (W // 2) = N = ", N, " points, got ", fs);
    up = {fs[0], fs[1]};
    if (mask_in.has_value()) {
      const Tensor& m = *mask_in;
      TORCH_CHECK(m.dim() == 4 && m.size(0) == B && m.size(1) == 1 && m.size(2) == fs[0] / 2 &&
                      m.size(3) == fs[1] / 2 && m.scalar_type() == dtype && m.device() == vertex.device(),
                  op, ": mask must be (B, 1, H // 2, W // 2) = (", B, ", 1, ", fs[0] / 2, ", ", fs[1] / 2, ") ",
                  dtype, " on ", vertex.device(), ", got ", m.sizes(), " ", m.scalar_type(), " on ", m.device());
      mask = m.contiguous();
    }
  } else {
    TORCH_CHECK(!mask_in.has_value(), op, ": mask needs full_size");
  }
  // (B, K, N), or (B, K, H W) sliced as such and returned as (B, K, H, W)
  Tensor out = empty_output({B, K, up.second > 0 ? up.first * up.second : N}, grad_forms.options().dtype(dtype));
  auto result = [&] { return up.second > 0 ? out.view({B, K, up.first, up.second}) : out; };
  if (B * N * K == 0) {  // with full_size, a grid with no half-resolution pixel: all trailing rows / columns
    out.zero_();
    return result();
  }
  Tensor coef = grad_forms.contiguous();
  Tensor grid = blurred;
  double scale_a = 2.0;
  if (exact) {
    TORCH_CHECK(splatted.sizes() == blurred.sizes(), op, ": splatted must be ", blurred.sizes(), " for exact=True");
    grid = blur<Backend>(splatted.contiguous(), neighbors.contiguous(), d, true, true);
    AT_DISPATCH_FLOATING_TYPES(grid.scalar_type(), "lattice_quadratic_forms_backward", [&] {
      SEGOPS_LATTICE_KERNEL("add_adjoint");
      Backend::launch(M, AddRows<scalar_t>{blurred.data_ptr<scalar_t>(), grid.data_ptr<scalar_t>(), blurred.size(1), K},
                      std::max<int64_t>(64, 16384 / std::max<int64_t>(K, 1)));
    });
    scale_a = 1.0;
  }
  PhaseTimer timer;
  slice<Backend>(grid, vertex.reshape({-1}), bary.reshape({-1}), d, SliceMode::kAffine, out, Tensor(), coef, degree,
                 scale_a, up, mask);
  timer.mark("slice");
  return result();
}

}  // namespace lattice
}  // namespace segops
