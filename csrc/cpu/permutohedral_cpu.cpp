// CPU backend of the permutohedral lattice: the shared glue and math run over at::parallel_for.
// The CPU splat is deterministic and atomic-free, with the same bits for any number of threads (see "the CPU
// splat" below).
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include "segops/cpu_isa.h"
#include "segops/cpu_v8.h"
#include "segops/permutohedral_host.h"

namespace segops {
namespace {

using lattice::SplatArgs;

// A splat's points go in blocks of kBlockPoints (within one image): a block's values are first copied into a
// point-major buffer (reading the C planes of one point at a stride of N values defeats the hardware prefetchers
// and maps every load of that point to one cache set); float planes through 8 x 8 register transposes. Rows
// are `block_stride` floats: 8-float columns for the transposes.
constexpr int64_t kBlockPoints = 256;
inline int64_t block_stride(int64_t Cg) { return (Cg + 7) / 8 * 8; }

// Points b N + n0 .. + np of image b, as rows of buf: the values (times the prescale), then the extra channel.
template <typename scalar_t, typename acc>
SEGOPS_LATTICE_INLINE void load_block(const SplatArgs<scalar_t, acc>& args, int64_t b, int64_t n0, int64_t np,
                                      acc* buf) {
  const int64_t C = args.C, N = args.N, stride = block_stride(args.Cg), i0 = b * N + n0;
  const scalar_t* planes = args.values + b * args.vsb + n0 * args.vsn;
  bool copied = false;
  if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<acc, float>) {
    if (args.vsn == 1 && args.vsc == N) {
      cpu::planes_to_rows(planes, buf, C, N, stride, np);
      copied = true;
    }
  }
  if (!copied) {
    for (int64_t c = 0; c < C; ++c)
      for (int64_t p = 0; p < np; ++p) buf[p * stride + c] = static_cast<acc>(planes[c * args.vsc + p * args.vsn]);
  }
  if (args.prescale) {
    for (int64_t p = 0; p < np; ++p)
      for (int64_t c = 0; c < C; ++c) buf[p * stride + c] *= args.prescale[i0 + p];
  }
  if (args.has_extra) {
    for (int64_t p = 0; p < np; ++p) buf[p * stride + C] = args.extra_value(b, n0 + p);
  }
}

// ---- the CPU splat ----------------------------------------------------------------------------------------
// Deterministic and atomic-free, with the same bits for any number of threads. The points [0, B N) are cut into
// S fixed chunks (splat_chunks: from the sizes, never from the thread count); chunk 0 splats into the output
// grid, chunks 1 .. S-1 into zeroed grids of their own, each vertex adding its entries of the chunk in entry
// order (point, then the point's vertex slot); then the grids are added into the output in chunk order. So
// vertex v holds ((s_0 + s_1) + ...) + s_{S-1}, s_c the entry-order sum of its entries in chunk c. The chunks
// run in parallel; with more threads than chunks, each chunk's vertices are also split into ranges, one task
// per range, each walking the chunk's points and adding only the entries in its range (any split of the ids
// gives the same sums).

// Chunks of the points: 2 where the one extra grid (zeroed and added: 2 M Cg values) costs under a tenth of the
// splat's B N (d+1) rows of Cg and each chunk has at least 2^14 points, else 1. More chunks would let more
// threads splat without splitting the ids, but every chunk's grid costs one thread as much as the others: on the
// 2-core VM (a 512x512 photo, the CRF loss's forward lattice op: splat, blur, dots) one thread took 6.6 ms with
// 1 chunk, 0.04-0.1 ms more with 2, 0.3 ms more with 4; two threads 4.5 ms with 1 chunk (ids split in two),
// 3.5 ms with 2.
constexpr int64_t kMaxSplatChunks = 2;
inline int64_t splat_chunks(int64_t points, int64_t V, int64_t M) {
  const int64_t by_cost = 1 + points * V / std::max<int64_t>(1, 10 * 2 * M);
  return std::max<int64_t>(1, std::min<int64_t>({kMaxSplatChunks, by_cost, points >> 14}));
}

// A block's np points (rows of W 8-float pieces in buf) into the grid's rows of W pieces: each point's values
// loaded once, then each of its vertex rows updated piece by piece, row += w x: axpy_row's operations in its
// order, without its loop over a run-time width.
template <int W>
SEGOPS_LATTICE_INLINE void scatter_pieces(float* grid, const float* buf, const int32_t* ids, const float* bary,
                                          int64_t np, int64_t V, int64_t v0, uint32_t span, bool whole) {
  for (int64_t p = 0; p < np; ++p) {
    cpu::v8 x[W];
    for (int j = 0; j < W; ++j) x[j] = cpu::load8(buf + (p * W + j) * 8);
    for (int64_t k = 0; k < V; ++k) {
      const int32_t v = ids[p * V + k];
      if (!whole && static_cast<uint32_t>(v - v0) >= span) continue;
      const cpu::v8 w = cpu::splat8(bary[p * V + k]);
      float* row = grid + static_cast<int64_t>(v) * (W * 8);
      for (int j = 0; j < W; ++j) cpu::store8(row + 8 * j, cpu::load8(row + 8 * j) + w * x[j]);
    }
  }
}

// Points [p0, p1) (of the batch's B N) into `grid`, the entries whose vertex ids are in [v0, v1) (all of them
// when `whole`). A block none of whose entries is in range is skipped.
template <typename scalar_t, typename acc>
SEGOPS_LATTICE_INLINE void scatter_range(const SplatArgs<scalar_t, acc>& args, acc* grid, int64_t p0, int64_t p1,
                                         int64_t v0, int64_t v1, bool whole) {
  const int64_t V = args.V, Cs = args.Cg, N = args.N, stride = block_stride(Cs);
  std::vector<acc> buf(static_cast<size_t>(kBlockPoints * stride));
  const uint32_t span = static_cast<uint32_t>(v1 - v0);
  for (int64_t i = p0; i < p1;) {
    const int64_t b = i / N, n0 = i - b * N;
    const int64_t np = std::min({kBlockPoints, N - n0, p1 - i});
    const int32_t* ids = args.vertex + i * V;
    const acc* bary = args.bary + i * V;
    if (!whole) {
      uint32_t hits = 0;
      for (int64_t e = 0; e < np * V; ++e) hits |= static_cast<uint32_t>(ids[e] - v0) < span;
      if (!hits) {
        i += np;
        continue;
      }
    }
    load_block(args, b, n0, np, buf.data());
    if constexpr (std::is_same_v<acc, float>) {
      switch (Cs % 8 == 0 ? Cs / 8 : 0) {  // rows of whole 8-float pieces: the point's values in registers
        case 1: scatter_pieces<1>(grid, buf.data(), ids, bary, np, V, v0, span, whole); i += np; continue;
        case 2: scatter_pieces<2>(grid, buf.data(), ids, bary, np, V, v0, span, whole); i += np; continue;
        case 3: scatter_pieces<3>(grid, buf.data(), ids, bary, np, V, v0, span, whole); i += np; continue;
        case 4: scatter_pieces<4>(grid, buf.data(), ids, bary, np, V, v0, span, whole); i += np; continue;
        default: break;
      }
    }
    for (int64_t p = 0; p < np; ++p) {
      const acc* __restrict x = buf.data() + p * stride;
      for (int64_t k = 0; k < V; ++k) {
        const int32_t v = ids[p * V + k];
        if (!whole && static_cast<uint32_t>(v - v0) >= span) continue;
        lattice::axpy_row(grid + static_cast<int64_t>(v) * Cs, x, bary[p * V + k], Cs);
      }
    }
    i += np;
  }
}

// The hot loops run in an AVX2 clone where the CPU has AVX2 (the baseline x86-64 build targets SSE2 only).
// Only the vector width differs: every lane does the same multiplies and adds in the same order (no FMA),
// so both versions give bitwise identical results.
#if defined(__x86_64__) && defined(__GNUC__)
#define SEGOPS_LATTICE_AVX2 1
// A functor with a run_range_wide(begin, end) has a loop that is only worth its vector form under AVX2.
// (A C++17 detection trait, not a concept: torch < 2.10 builds extensions as C++17.)
template <typename F, typename = void>
struct HasWideRange : std::false_type {};
template <typename F>
struct HasWideRange<F, std::void_t<decltype(std::declval<const F&>().run_range_wide(int64_t(0), int64_t(0)))>>
    : std::true_type {};

template <typename F>
__attribute__((target("avx2"))) void run_range_avx2(const F& f, int64_t begin, int64_t end) {
  if constexpr (HasWideRange<F>::value)
    f.run_range_wide(begin, end);
  else
    f.run_range(begin, end);
}
template <typename scalar_t, typename acc>
__attribute__((target("avx2"))) void scatter_range_avx2(const SplatArgs<scalar_t, acc>& args, acc* grid, int64_t p0,
                                                        int64_t p1, int64_t v0, int64_t v1, bool whole) {
  scatter_range(args, grid, p0, p1, v0, v1, whole);
}
#endif

template <typename F>
void run_range_best(const F& f, int64_t begin, int64_t end) {
#if defined(SEGOPS_LATTICE_AVX2)
  if (block::avx2_clones()) return run_range_avx2(f, begin, end);
#endif
  f.run_range(begin, end);
}

template <typename scalar_t, typename acc>
void scatter_range_best(const SplatArgs<scalar_t, acc>& args, acc* grid, int64_t p0, int64_t p1, int64_t v0,
                        int64_t v1, bool whole) {
#if defined(SEGOPS_LATTICE_AVX2)
  if (block::avx2_clones()) return scatter_range_avx2(args, grid, p0, p1, v0, v1, whole);
#endif
  scatter_range(args, grid, p0, p1, v0, v1, whole);
}

// Vertex ranges [bounds[t], bounds[t + 1]) for the tasks that share a chunk of entries, with about equal numbers
// of its entries: equal ranges of ids can be far apart (on a 512x512 photo the lower half of the ids held 67% of
// the entries: vertices touched first, near the top of the image, gather more points), and the largest task sets
// the splat's time. The counts come from a sample of ~2^16 entries, binned into 4096 id buckets. Any partition
// gives the same sums: this only balances the work.
inline std::vector<int64_t> balanced_ranges(const int32_t* vertex, int64_t entries, int64_t M, int64_t tasks) {
  std::vector<int64_t> bounds(static_cast<size_t>(tasks) + 1);
  for (int64_t t = 0; t <= tasks; ++t) bounds[t] = M * t / tasks;
  if (tasks < 2 || M < 2 * tasks) return bounds;
  constexpr int64_t kBuckets = 4096;
  const int64_t buckets = std::min(kBuckets, M);
  std::vector<int64_t> hist(static_cast<size_t>(buckets) + 1, 0);
  const int64_t step = std::max<int64_t>(1, entries >> 16);
  int64_t sampled = 0;
  for (int64_t e = 0; e < entries; e += step) {
    const int64_t v = vertex[e];
    if (v < 0 || v >= M) continue;  // (ids are in range; never trust a sample to index out of bounds)
    ++hist[v * buckets / M + 1];
    ++sampled;
  }
  for (int64_t k = 0; k < buckets; ++k) hist[k + 1] += hist[k];
  // bucket k holds ids [ceil(k M / buckets), ceil((k + 1) M / buckets)): split at the bucket edge where the
  // cumulative sample count first reaches t / tasks of it
  int64_t k = 0;
  for (int64_t t = 1; t < tasks; ++t) {
    while (k < buckets && hist[k] * tasks < sampled * t) ++k;
    bounds[t] = std::max(bounds[t - 1], std::min(M, (k * M + buckets - 1) / buckets));
  }
  return bounds;
}

// ---- the CPU's build with packed keys: one hash table per range of points, merged in range order ----------
// The shared build (CUDA's) inserts every entry into one table of 1.25 entries' slots, then finds each key's
// first entry (mark, scan, assign: three more passes over the entries) to number the vertices in order of first
// appearance. On the CPU each thread takes one contiguous range of points and numbers the keys it meets in its own
// small table, in the order it meets them: the numbering of first appearance within the range. Merging the
// ranges' key lists in range order (a range's keys that an earlier range already has take that range's id, the
// others the next free ids) gives the numbering of first appearance over the whole batch, so the vertex ids, the
// neighbours and every sum downstream are those of the shared build, for any number of threads; then each entry's
// range-local id is mapped to its id (nothing to map for the first range, the only one on one thread).

// Packed codes numbered in order of first appearance (code -> id), in an open-addressing table of (code, id) slots
// (a probe reads one slot; load <= 1/2, doubling as keys arrive): one per range of points, and the merged one of
// the batch.
class KeyIds {
 public:
  explicit KeyIds(int64_t expected = 2048) { reserve(expected); }

  // Room for `expected` keys without growing (never shrinks).
  void reserve(int64_t expected) {
    if (static_cast<size_t>(expected) > codes_.capacity()) set_capacity(static_cast<size_t>(expected));
    const size_t size = static_cast<size_t>(lattice::next_pow2(2 * std::max<int64_t>(expected, 2048)));
    if (size > slots_.size()) rehash(size);
  }

  // The id of `code` (mixed = mix64(code)), numbering it when new.
  SEGOPS_LATTICE_INLINE int32_t id(int64_t code, uint64_t mixed) {
    for (uint64_t h = mixed & mask_;; h = (h + 1) & mask_) {
      Slot& slot = slots_[h];
      if (slot.code == code) return slot.id;
      if (slot.code == -1) {
        const int32_t id = static_cast<int32_t>(codes_.size());
        slot.code = code;
        slot.id = id;
        if (codes_.size() == codes_.capacity()) grow_codes();
        codes_.push_back(code);
        if (2 * codes_.size() > slots_.size()) rehash(2 * slots_.size());  // load <= 1/2: short probes
        return id;
      }
    }
  }
  // The id of `code`, or -1.
  SEGOPS_LATTICE_INLINE int32_t find(int64_t code) const {
    for (uint64_t h = home(code);; h = (h + 1) & mask_) {
      const Slot& s = slots_[h];
      if (s.code == code) return s.id;
      if (s.code == -1) return -1;
    }
  }
  SEGOPS_LATTICE_INLINE void prefetch(int64_t code) const { __builtin_prefetch(&slots_[home(code)]); }
  const std::vector<int64_t>& codes() const { return codes_; }
  // The codes' storage, for another thread that reads codes()[0 .. n) with n published after they were stored
  // (RangeProgress): a grown list keeps its old storage until the table is destroyed, so a pointer read
  // before a growth stays valid, and one read after it holds every code of the old one.
  const int64_t* published_codes() const { return data_.load(std::memory_order_acquire); }

 private:
  struct Slot {
    int64_t code = -1;  // packed codes are >= 0
    int32_t id = 0;
  };
  SEGOPS_LATTICE_INLINE uint64_t home(int64_t code) const {
    return lattice::mix64(static_cast<uint64_t>(code)) & mask_;
  }
  void rehash(size_t size) {
    slots_.assign(size, Slot{});
    mask_ = size - 1;
    for (size_t k = 0; k < codes_.size(); ++k) {
      uint64_t h = home(codes_[k]);
      while (slots_[h].code != -1) h = (h + 1) & mask_;
      slots_[h] = Slot{codes_[k], static_cast<int32_t>(k)};
    }
  }
  __attribute__((noinline)) void grow_codes() { set_capacity(std::max<size_t>(2 * codes_.capacity(), 2048)); }
  void set_capacity(size_t capacity) {
    std::vector<int64_t> bigger;
    bigger.reserve(capacity);
    bigger.assign(codes_.begin(), codes_.end());
    retired_.push_back(std::move(codes_));
    codes_ = std::move(bigger);
    data_.store(codes_.data(), std::memory_order_release);
  }
  std::vector<Slot> slots_;
  std::vector<int64_t> codes_;
  std::vector<std::vector<int64_t>> retired_;  // grown-out code lists (see published_codes)
  std::atomic<const int64_t*> data_{nullptr};
  uint64_t mask_ = 0;
};

// How far the numbering of a range has got, for the thread that merges and remaps behind it (see build_ranges):
// the points [begin, points) have their entries' range-local ids written, and the keys [0, keys) of the range's
// table are published (both stored with release after what they count). state: 0 = not started, 1 = numbering,
// 2 = done (after the last publication).
struct alignas(64) RangeProgress {
  std::atomic<int64_t> points{0};
  std::atomic<int64_t> keys{0};
  std::atomic<int> state{0};
};
// Points per publication: the follower's lag behind the numbering (at most this many points' work after it).
constexpr int64_t kPublishPoints = 2048;

// After each block of points: publishes the range's progress, when a follower may read it.
struct Publish {
  RangeProgress* progress;  // nullptr: nobody follows this range
  const KeyIds* keys;
  void operator()(int64_t points_done) const {
    if (progress == nullptr) return;
    progress->keys.store(static_cast<int64_t>(keys->codes().size()), std::memory_order_release);
    progress->points.store(points_done, std::memory_order_release);
  }
};

// Points [begin, end): weights and range-local vertex ids per entry (written into the build's slot array), keys
// met into `keys`; a direct-mapped cache code -> id in front of the table (neighbouring pixels share most
// vertices, so most lookups end there). In blocks of kPublishPoints, each followed by publish(end of block).
template <int D, typename T, bool kWide>
SEGOPS_LATTICE_INLINE void number_range(const lattice::BuildPacked<D, T>& build, int64_t begin, int64_t end,
                                        KeyIds& keys, const Publish& publish) {
  constexpr int kCacheBits = 14;
  std::vector<int64_t> cache_code(1 << kCacheBits, int64_t(-1));
  std::vector<int32_t> cache_id(1 << kCacheBits);
  const lattice::PackPlan p = *build.plan;
  int32_t* slot = build.slot;
  auto number = [&](index_t entry, int64_t code) SEGOPS_LAMBDA_INLINE {
    // the cache's index: one multiply (Fibonacci hashing), its top bits
    const int c = static_cast<int>((static_cast<uint64_t>(code) * 0x9e3779b97f4a7c15ull) >> (64 - kCacheBits));
    int32_t id;
    if (cache_code[c] == code) {
      id = cache_id[c];
    } else {
      id = keys.id(code, lattice::mix64(static_cast<uint64_t>(code)));
      cache_code[c] = code;
      cache_id[c] = id;
    }
    slot[entry] = id;
  };
  // 8 points' codes in int64 lanes (BuildPacked::vertex_codes lane-wise: vertex 0 packs rem0; each next vertex adds
  // 1 to every coordinate and subtracts d+1 from the one ranked d - k), then numbered in entry order.
  typedef int64_t l8 __attribute__((vector_size(64)));
  typedef int32_t i8 __attribute__((vector_size(32)));
  auto visit8 = [&](const int32_t (*rem0)[8], const int32_t (*rank)[8], index_t b, index_t i) SEGOPS_LAMBDA_INLINE {
    int64_t codes[D + 1][8];
    l8 code = l8{} + static_cast<int64_t>(static_cast<uint64_t>(b) << p.image_shift);
    for (int c = 0; c < D; ++c) {
      i8 r;
      __builtin_memcpy(&r, rem0[c], sizeof(r));
      code += (__builtin_convertvector(r, l8) - p.lo[c]) << p.shift[c];
    }
    for (int k = 0; k <= D; ++k) {
      __builtin_memcpy(codes[k], &code, sizeof(code));
      if (k == D) break;
      l8 wrap = l8{};
      for (int c = 0; c < D; ++c) {
        i8 r;
        __builtin_memcpy(&r, rank[c], sizeof(r));
        wrap += __builtin_convertvector(r == D - k, l8) & (int64_t(D + 1) << p.shift[c]);
      }
      code += p.ones - wrap;
    }
    for (int q = 0; q < 8; ++q)
      for (int k = 0; k <= D; ++k) number((i + q) * (D + 1) + k, codes[k][q]);
  };
  for (int64_t s0 = begin; s0 < end; s0 += kPublishPoints) {
    const int64_t s1 = std::min(end, s0 + kPublishPoints);
    build.template for_each_simplex<kWide>(
        s0, s1,
        [&](const lattice::Simplex<D, T>& s, index_t b, index_t i) SEGOPS_LAMBDA_INLINE {
          build.vertex_codes(p, s, b,
                             [&](int k, int64_t code) SEGOPS_LAMBDA_INLINE { number(i * (D + 1) + k, code); });
        },
        visit8);
    publish(s1);
  }
}
#if defined(__x86_64__) && defined(__GNUC__)
template <int D, typename T>
__attribute__((target("avx2"))) void number_range_avx2(const lattice::BuildPacked<D, T>& build, int64_t begin,
                                                       int64_t end, KeyIds& keys, const Publish& publish) {
  number_range<D, T, true>(build, begin, end, keys, publish);
}
// The same with 512-bit vectors (8 points' int64 codes in one register instead of two): the lattice op (512²
// photo, 5-d features, one thread) took 0.97x the time (medians of 55 in-process alternations, 3 runs); the float
// steps are the same operations, uncontracted, so the same bits (tested against the AVX2 and portable builds).
template <int D, typename T>
__attribute__((target("avx512f,avx512vl,avx512bw,avx512dq"), optimize("fp-contract=off"))) void number_range_avx512(
    const lattice::BuildPacked<D, T>& build, int64_t begin, int64_t end, KeyIds& keys, const Publish& publish) {
  number_range<D, T, true>(build, begin, end, keys, publish);
}
#endif

// neighbors[v][j] = (the vertex one step back along direction j, one step forward), -1 where absent: the
// shared build's FindNeighborCodes. Each pair is found once: when u = v + step_j exists, u is v's forward
// neighbour and v is u's backward one (written by v alone: u - step_j is v), so half the lookups. The lookups
// of vertex v + 8 are prefetched while v's run (the table is ~1 MB at 512^2: its slots come from L2 / L3).
template <int D>
void find_neighbors(const KeyIds& table, const lattice::PackPlan& p, int32_t* neighbors) {
  const std::vector<int64_t>& codes = table.codes();
  const int64_t M = static_cast<int64_t>(codes.size());
  int64_t step[D + 1];
  for (int j = 0; j <= D; ++j) step[j] = lattice::direction_step<D>(p, j);
  std::fill(neighbors, neighbors + M * (D + 1) * 2, -1);
  constexpr int64_t kAhead = 8;
  omp_parallel_for(0, M, 1024, [&](int64_t v0, int64_t v1) {
    for (int64_t v = v0; v < v1; ++v) {
      if (v + kAhead < v1)
        for (int j = 0; j <= D; ++j) table.prefetch(codes[v + kAhead] + step[j]);
      for (int j = 0; j <= D; ++j) {
        const int32_t u = table.find(codes[v] + step[j]);
        if (u < 0) continue;
        neighbors[(v * (D + 1) + j) * 2 + 1] = u;
        neighbors[(static_cast<int64_t>(u) * (D + 1) + j) * 2] = static_cast<int32_t>(v);
      }
    }
  });
}

// ids[l] = the id of codes[l] in `table` (numbering it when new), for l = ids.size() .. n - 1, in order; the table's
// slot of the code 8 ahead prefetched (a range's new keys hit the table at random: ~18 ns per key without).
inline void merge_keys(KeyIds& table, const int64_t* codes, int64_t n, std::vector<int32_t>& ids) {
  constexpr int64_t kAhead = 8;
  for (int64_t l = static_cast<int64_t>(ids.size()); l < n; ++l) {
    if (l + kAhead < n) table.prefetch(codes[l + kAhead]);
    ids.push_back(table.id(codes[l], lattice::mix64(static_cast<uint64_t>(codes[l]))));
  }
}

// Run by the thread of range 0 once its range is numbered, while range 1's thread is still numbering: range 1's
// keys merged into range 0's table (ids, in range 1's order, as the merge after the build would) and its entries'
// local ids replaced by vertex ids, as far as range 1's thread has published them, until it is done. Returns the
// first point of range 1 whose entries are not remapped (range 1's end). This is the work that would otherwise
// follow the build with the other thread idle: the ECCV'18 photo's lower half has 50% more keys than its upper
// half, so range 0's thread used to wait ~0.25 ms for range 1's and then merge (0.14 ms) while that one waited.
template <int D, typename T>
int64_t follow_range(const lattice::BuildPacked<D, T>& build, KeyIds& table, const KeyIds& range, RangeProgress& progress,
                     int64_t begin, std::vector<int32_t>& ids) {
  int64_t done = begin;
  for (;;) {
    const int state = progress.state.load(std::memory_order_acquire);  // before the counts: 2 = they are final
    const int64_t points = progress.points.load(std::memory_order_acquire);
    const int64_t keys = progress.keys.load(std::memory_order_acquire);  // >= the keys of those points
    const bool fresh = points > done || keys > static_cast<int64_t>(ids.size());  // (before the merge below)
    merge_keys(table, range.published_codes(), keys, ids);  // those not merged yet
    if (state == 2) return done;  // the rest of the remap is shared by all threads after the build
    // a bounded step, so that the state is seen soon after range 1's thread is done: from then on it would wait
    // for this one (which had 90% of range 1 still to remap when both ranges ended within 0.05 ms)
    const int64_t merged = static_cast<int64_t>(ids.size()), upto = std::min(points, done + kPublishPoints);
    for (int64_t e = done * (D + 1); e < upto * (D + 1); ++e) {
      const int32_t l = build.slot[e];
      build.slot[e] = l < merged ? ids[l] : 0;  // (l >= merged only for a point with bad features: slot 0)
    }
    done = std::max(done, upto);
    if (!fresh) {
#if defined(__x86_64__) || defined(__i386__)
      _mm_pause();
#endif
    }
  }
}

// The minimum and maximum of x[0 .. n) (NaN values skipped; returns whether there was one), in 32-byte vectors.
template <typename T>
SEGOPS_LATTICE_INLINE bool minmax_run_impl(const T* __restrict x, int64_t n, T& lo, T& hi) {
  typedef T vec __attribute__((vector_size(32)));
  typedef decltype(vec{} < vec{}) mask;
  constexpr int L = 32 / sizeof(T);
  vec a = vec{} + std::numeric_limits<T>::infinity(), z = vec{} - std::numeric_limits<T>::infinity();
  mask nan = mask{};
  int64_t i = 0;
  for (; i + L <= n; i += L) {
    vec v;
    __builtin_memcpy(&v, x + i, sizeof(vec));
    nan |= v != v;
    a = v < a ? v : a;
    z = v > z ? v : z;
  }
  bool any = false;
  lo = a[0];
  hi = z[0];
  for (int j = 0; j < L; ++j) {
    any = any || nan[j] != 0;
    lo = a[j] < lo ? a[j] : lo;
    hi = z[j] > hi ? z[j] : hi;
  }
  for (; i < n; ++i) {
    const T v = x[i];
    any = any || v != v;
    lo = v < lo ? v : lo;
    hi = v > hi ? v : hi;
  }
  return any;
}
#if defined(SEGOPS_LATTICE_AVX2)
template <typename T>
__attribute__((target("avx2"))) bool minmax_run_avx2(const T* x, int64_t n, T& lo, T& hi) {
  return minmax_run_impl(x, n, lo, hi);
}
#endif
template <typename T>
bool minmax_run(const T* x, int64_t n, T& lo, T& hi) {
#if defined(SEGOPS_LATTICE_AVX2)
  if (block::avx2_clones()) return minmax_run_avx2(x, n, lo, hi);
#endif
  return minmax_run_impl(x, n, lo, hi);
}

struct CpuBackend {
  static constexpr bool kGatherReadsChannelsLast = false;  // the scatter reads channel planes in runs
  static constexpr bool kPadRows = true;
  static constexpr bool kSliceUpsamples = true;  // Slice::write_up (the resize's backward fused into the slice)
  // A row per call (vectorised over channels); CUDA's mapping under SEGOPS_LATTICE_GATHER_SPLAT (tests).
  static bool blur_per_channel() { return std::getenv("SEGOPS_LATTICE_GATHER_SPLAT") != nullptr; }

  template <typename F>
  static void launch(index_t n, const F& f, index_t grain) {
    cpu_parallel_for(n, f, grain);
  }

  template <typename F>
  static void ranged(index_t n, const F& f, index_t grain) {
    omp_parallel_for(0, n, grain, [&](int64_t begin, int64_t end) { run_range_best(f, begin, end); });
  }

  // Per feature (dim 1 of (B, D, N)) its minimum and maximum over the batch, NaN where any value is NaN (as
  // at::amin / at::amax give them), in one pass over the features instead of two: the lattice op's set-up
  // (bounds, plan, allocations) on the ECCV'18 features at 512^2 took 0.24-0.35 -> 0.18-0.19 ms on one thread,
  // 0.14-0.22 -> 0.09-0.11 on two (SEGOPS_LATTICE_PROFILE, two process pairs).
  static std::pair<at::Tensor, at::Tensor> feature_bounds(const at::Tensor& feats) {
    if (feats.stride(2) != 1 || feats.size(2) == 0 || feats.size(0) == 0) {
      return {at::amin(feats, {0, 2}), at::amax(feats, {0, 2})};
    }
    const int64_t B = feats.size(0), D = feats.size(1), N = feats.size(2);
    at::Tensor lo = at::empty({D}, feats.options()), hi = at::empty({D}, feats.options());
    AT_DISPATCH_FLOATING_TYPES(feats.scalar_type(), "feature_bounds", [&] {
      using T = scalar_t;
      constexpr int64_t kChunk = 1 << 15;
      const int64_t chunks = (N + kChunk - 1) / kChunk, items = B * D * chunks;
      std::vector<T> plo(static_cast<size_t>(items)), phi(static_cast<size_t>(items));
      std::vector<uint8_t> pnan(static_cast<size_t>(items));
      const T* f = feats.data_ptr<T>();
      omp_parallel_for(0, items, 1, [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i) {
          const int64_t c = i % chunks, bd = i / chunks, b = bd / D, d = bd % D;
          const T* x = f + b * feats.stride(0) + d * feats.stride(1) + c * kChunk;
          const int64_t n = std::min(kChunk, N - c * kChunk);
          pnan[i] = minmax_run(x, n, plo[i], phi[i]);
        }
      });
      T* l = lo.data_ptr<T>();
      T* h = hi.data_ptr<T>();
      for (int64_t d = 0; d < D; ++d) {
        bool nan = false;
        T a = std::numeric_limits<T>::infinity(), z = -std::numeric_limits<T>::infinity();
        for (int64_t b = 0; b < B; ++b)
          for (int64_t c = 0; c < chunks; ++c) {
            const int64_t i = (b * D + d) * chunks + c;
            nan = nan || pnan[i];
            a = std::min(a, plo[i]);
            z = std::max(z, phi[i]);
          }
        l[d] = nan ? std::numeric_limits<T>::quiet_NaN() : a;
        h[d] = nan ? std::numeric_limits<T>::quiet_NaN() : z;
      }
    });
    return {lo, hi};
  }

  // Two-pass chunked prefix sum of uint8 flags into int32 (one chunk per thread).
  static at::Tensor inclusive_scan(const at::Tensor& flag) {
    const int64_t n = flag.numel();
    at::Tensor out = at::empty({n}, flag.options().dtype(at::kInt));
    const uint8_t* f = flag.data_ptr<uint8_t>();
    int32_t* o = out.data_ptr<int32_t>();
    const int64_t T = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n / 65536 + 1));
    const int64_t chunk = (n + T - 1) / T;
    std::vector<int64_t> sums(static_cast<size_t>(T) + 1, 0);
    omp_parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        int32_t s = 0;
        for (int64_t i = t * chunk, e = std::min(n, (t + 1) * chunk); i < e; ++i) s += f[i];
        sums[t + 1] = s;
      }
    });
    for (int64_t t = 0; t < T; ++t) sums[t + 1] += sums[t];
    omp_parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        int32_t s = static_cast<int32_t>(sums[t]);
        for (int64_t i = t * chunk, e = std::min(n, (t + 1) * chunk); i < e; ++i) o[i] = (s += f[i]);
      }
    });
    return out;
  }

  static int64_t read_status(const at::Tensor& status) { return status.item<int64_t>(); }

  // The build with packed keys (see KeyIds and the section's comment): vertex ids into build.slot, weights into build.bary, and the
  // neighbours; or bad = true when a point's features are unusable (flags[0]).
  static constexpr bool kRangeBuild = true;
  template <int D, typename T>
  static lattice::RangeBuilt build_ranges(const lattice::BuildPacked<D, T>& build, int64_t points) {
    const int64_t R = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), points / 8192));
    std::vector<KeyIds> keys(static_cast<size_t>(R));
    auto first = [&](int64_t r) { return points * r / R; };
    // ids[r][l]: the vertex id of range r's local key l (r >= 1), for the first ids[r].size() of its keys;
    // remapped[r]: range r's entries before this point hold vertex ids (r >= 1)
    std::vector<std::vector<int32_t>> ids(static_cast<size_t>(R));
    std::vector<int64_t> remapped(static_cast<size_t>(R));
    for (int64_t r = 0; r < R; ++r) remapped[r] = first(r);
    RangeProgress progress;  // range 1's, when the thread of range 0 follows it
    const bool follow = R > 1 && lattice::follow_enabled();
    {
      SEGOPS_LATTICE_KERNEL("build");
      omp_parallel_for(0, R, 1, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          // Room for a key per 8 points (the ECCV'18 photo at 512^2 has one per 15), so that the usual lattice's
          // tables never grow: growing from 2048 keys re-inserted ~1.8 keys per key (perf: 4% of the numbering's
          // samples on one thread). The first range's table becomes the merged one: room for the whole batch's.
          // And room for at least 32768 keys in the merged table, 16384 in the others (at most one per 2
          // points): the keys follow the image's extent in lattice units (size / sigma_xy, 255 / sigma_rgb), not
          // its pixel count. At scale 0.5 the photo has 13 342 keys for 65 536 points: with room for a key per
          // 8 points the tables grew on the critical path, and the merged one ran at load 0.41 (lattice op
          // 2.47-2.53 -> 2.00-2.06 ms on one thread, 1.39-1.56 -> 1.17-1.42 on two; scale 1 unchanged).
          const int64_t n = r == 0 ? points : first(r + 1) - first(r);
          keys[r].reserve(std::max<int64_t>(n / 8, std::min<int64_t>(n / 2, r == 0 ? 32768 : 16384)));
          const bool followed = follow && r == 1;
          if (followed) progress.state.store(1, std::memory_order_release);
          const Publish publish{followed ? &progress : nullptr, &keys[r]};
#if defined(SEGOPS_LATTICE_AVX2)
          if (block::cpu_isa() == block::Isa::kAvx512) {
            number_range_avx512<D, T>(build, first(r), first(r + 1), keys[r], publish);
          } else if (block::avx2_clones()) {
            number_range_avx2<D, T>(build, first(r), first(r + 1), keys[r], publish);
          } else
#endif
          {
            number_range<D, T, false>(build, first(r), first(r + 1), keys[r], publish);
          }
          if (followed) progress.state.store(2, std::memory_order_release);
          // range 0's thread, when range 1 is another thread's and still being numbered
          if (follow && r == 0 && r1 == 1 && progress.state.load(std::memory_order_acquire) == 1)
            remapped[1] = follow_range<D>(build, keys[0], keys[1], progress, first(1), ids[1]);
        }
      });
    }
    lattice::RangeBuilt out;
    if (build.flags[0]) {
      out.bad = true;
      return out;
    }
    // merge: the later ranges' keys not merged yet, in range order, into the first range's table (whose keys
    // already have their ids). Building a fresh table from all ranges' keys instead re-inserted the first
    // range's 40% of them.
    KeyIds& table = keys[0];
    if (R > 1) {
      SEGOPS_LATTICE_KERNEL("merge");
      int64_t upper = 0;
      for (const KeyIds& k : keys) upper += static_cast<int64_t>(k.codes().size());
      table.reserve(upper);
      for (int64_t r = 1; r < R; ++r)
        merge_keys(table, keys[r].codes().data(), static_cast<int64_t>(keys[r].codes().size()), ids[r]);
      // the entries not remapped yet (remapped[r] .. first(r + 1) of each range r >= 1), split evenly over the
      // threads (not by range)
      std::vector<int64_t> from(static_cast<size_t>(R));  // entry offset of range r's first entry to remap
      int64_t todo = 0;
      for (int64_t r = 1; r < R; ++r) {
        from[r] = todo;
        todo += (first(r + 1) - remapped[r]) * (D + 1);
      }
      omp_parallel_for(0, todo, lattice::kGrainCheap, [&](int64_t t0, int64_t t1) {
        int64_t r = 1;
        while (r + 1 < R && from[r + 1] <= t0) ++r;
        for (int64_t t = t0; t < t1; ++r) {
          const int64_t end = std::min(t1, r + 1 < R ? from[r + 1] : todo);
          const int32_t* map = ids[r].data();
          int32_t* slot = build.slot + remapped[r] * (D + 1);  // the entry of position t: slot[t - from[r]]
          for (; t < end; ++t) slot[t - from[r]] = map[slot[t - from[r]]];
        }
      });
    }
    out.M = static_cast<int64_t>(table.codes().size());
    out.neighbors = empty_output({out.M, D + 1, 2}, at::TensorOptions().dtype(at::kInt));
    SEGOPS_LATTICE_KERNEL("neighbors");
    find_neighbors<D>(table, *build.plan, out.neighbors.data_ptr<int32_t>());
    return out;
  }

  template <typename scalar_t, typename acc>
  // The CPU's splat needs no plan; a given one is used by the gather alone.
  static void splat(const SplatArgs<scalar_t, acc>& args, int64_t B, int64_t M, const at::Tensor& vertex,
                    const at::Tensor& plan) {
    if (std::getenv("SEGOPS_LATTICE_GATHER_SPLAT")) {  // tests: CUDA's splat (and blur) algorithms on the CPU
      lattice::gather_splat<CpuBackend>(args, M, vertex, plan);
      return;
    }
    const int64_t P = B * args.N, V = args.V;
    // Float rows of Cg % 8 != 0 values are splatted into rows padded to whole 8-float vectors (zero columns
    // from the block buffer), then copied out: the same sums for the Cg real columns. The CRF loss's splat of
    // 21 channels at 512^2 (one thread): 5.5-5.8 ms against 6.0-6.3 in rows of 21. Not where the grid has more
    // rows than points (the copy would cost more than it saves).
    SplatArgs<scalar_t, acc> a = args;
    at::Tensor padded;
    const int64_t Cp = block_stride(args.Cg);
    const bool pad = std::is_same_v<acc, float> && Cp != args.Cg && M <= P && lattice::pad_rows_enabled();
    if (pad) {
      padded = empty_output({M, Cp}, at::TensorOptions().dtype(c10::CppTypeToScalarType<acc>::value));
      acc* z = padded.data_ptr<acc>();
      omp_parallel_for(0, M * Cp, 1 << 16, [&](int64_t e0, int64_t e1) { std::fill(z + e0, z + e1, acc(0)); });
      a.grid = z;
      a.Cg = Cp;
    }
    const int64_t Cg = a.Cg;
    const int64_t threads = P * V * Cg < (int64_t(1) << 17) ? 1 : at::get_num_threads();
    const int64_t S = splat_chunks(P, V, M);
    auto first = [&](int64_t c) { return P * c / S; };
    // grids of chunks 1 .. S-1, zeroed in parallel (each thread its own rows)
    at::Tensor extra;
    if (S > 1) {
      extra = empty_output({(S - 1) * M * Cg}, at::TensorOptions().dtype(c10::CppTypeToScalarType<acc>::value));
      acc* e = extra.data_ptr<acc>();
      omp_parallel_for(0, (S - 1) * M * Cg, 1 << 16, [&](int64_t e0, int64_t e1) { std::fill(e + e0, e + e1, acc(0)); });
    }
    auto grid_of = [&](int64_t c) { return c == 0 ? a.grid : extra.data_ptr<acc>() + (c - 1) * M * Cg; };
    // u tasks per chunk, each a range of its vertex ids
    const int64_t u = std::max<int64_t>(1, std::min<int64_t>(threads / S, M));
    std::vector<std::vector<int64_t>> bounds(static_cast<size_t>(S));
    for (int64_t c = 0; c < S; ++c)
      bounds[c] = balanced_ranges(a.vertex + first(c) * V, (first(c + 1) - first(c)) * V, M, u);
    omp_parallel_for(0, S * u, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t c = t / u, j = t % u;
        scatter_range_best(a, grid_of(c), first(c), first(c + 1), bounds[c][j], bounds[c][j + 1], u == 1);
      }
    });
    if (S > 1) {  // add the chunks' grids in chunk order
      omp_parallel_for(0, M * Cg, 1 << 14, [&](int64_t e0, int64_t e1) {
        acc* g = a.grid;
        for (int64_t c = 1; c < S; ++c) {
          const acc* x = grid_of(c);
          for (int64_t e = e0; e < e1; ++e) g[e] += x[e];
        }
      });
    }
    if (pad) {
      const acc* src = a.grid;
      acc* dst = args.grid;
      const int64_t Cg0 = args.Cg;
      omp_parallel_for(0, M, 4096, [&](int64_t v0, int64_t v1) {
        for (int64_t v = v0; v < v1; ++v) std::copy(src + v * Cp, src + v * Cp + Cg0, dst + v * Cg0);
      });
    }
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> permutohedral_lattice_cpu(const at::Tensor& features) {
  return lattice::lattice_forward<CpuBackend>(features);
}

at::Tensor permutohedral_apply_cpu(const at::Tensor& values, const at::Tensor& vertex, const at::Tensor& bary,
                                   const at::Tensor& neighbors, bool transposed,
                                   const std::optional<at::Tensor>& splat_plan) {
  return lattice::apply_forward<CpuBackend>(values, vertex, bary, neighbors, transposed, splat_plan);
}

at::Tensor permutohedral_splat_plan_cpu(const at::Tensor& vertex, const at::Tensor& neighbors) {
  return lattice::splat_plan_forward<CpuBackend>(vertex, neighbors);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> permutohedral_filter_cpu(
    const at::Tensor& values, const at::Tensor& features, bool normalize) {
  return lattice::filter_forward<CpuBackend>(values, features, normalize);
}

at::Tensor permutohedral_filter_backward_cpu(const at::Tensor& grad, const at::Tensor& vertex, const at::Tensor& bary,
                                             const at::Tensor& neighbors, const at::Tensor& norm, bool normalize,
                                             bool transposed) {
  return lattice::filter_backward<CpuBackend>(grad, vertex, bary, neighbors, norm, normalize, transposed);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quadratic_forms_cpu(const at::Tensor& x,
                                                                   const std::optional<at::Tensor>& roi,
                                                                   const at::Tensor& vertex, const at::Tensor& bary,
                                                                   const at::Tensor& neighbors, bool degree,
                                                                   bool /*exact: for the autograd*/) {
  return lattice::quadratic_forms<CpuBackend>(x, roi, vertex, bary, neighbors, degree);
}

at::Tensor quadratic_forms_backward_cpu(const at::Tensor& grad_forms, const at::Tensor& splatted,
                                        const at::Tensor& blurred, const at::Tensor& vertex, const at::Tensor& bary,
                                        const at::Tensor& neighbors, bool exact, at::ScalarType dtype,
                                        at::OptionalIntArrayRef full_size, const std::optional<at::Tensor>& mask) {
  return lattice::quadratic_forms_backward<CpuBackend>(grad_forms, splatted, blurred, vertex, bary, neighbors, exact,
                                                       dtype, full_size, mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(segops, CPU, m) {
  m.impl("permutohedral_lattice", &permutohedral_lattice_cpu);
  m.impl("permutohedral_apply", &permutohedral_apply_cpu);
  m.impl("_permutohedral_splat_plan", &permutohedral_splat_plan_cpu);
  m.impl("permutohedral_filter", &permutohedral_filter_cpu);
  m.impl("_permutohedral_filter_backward", &permutohedral_filter_backward_cpu);
  m.impl("_lattice_quadratic_forms", &quadratic_forms_cpu);
  m.impl("_lattice_quadratic_forms_backward", &quadratic_forms_backward_cpu);
}

}  // namespace segops
