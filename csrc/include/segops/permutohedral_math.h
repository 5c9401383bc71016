// Per-element math of the permutohedral lattice (write-once: the CPU and CUDA backends run it).
//
// Semantics (docs/lattice.md, "The contract"): elevation with inv_std_dev = sqrt(2/3)(d+1) and per-axis
// scale inv_std_dev / sqrt((i+1)(i+2)); the enclosing simplex by rounding to multiples of d+1 and ranking
// the remainders (ties: lower index, lower rank); barycentric weights; d+1 vertices keyed by their first d
// coordinates; splat; blur along directions j = 0..d with weights 1/2, 1, 1/2 (absent neighbour = 0,
// double-buffered); slice times alpha = 1 / (1 + 2^-d). No normalisation unless asked for.
//
// Data layout. A batch of B images of N points has T = B N (d+1) "entries" (image b, point n, vertex k ->
// entry (b N + n)(d+1) + k), all ids int32. One hash table serves the whole batch: keys carry the image
// index, the capacity is T + T/4 + 1 slots (enough for every entry to hold a distinct key, so an insert
// always finds its key or an empty slot) and a hash is mapped to a slot by a multiply-shift, not a mask,
// so no power-of-two rounding is needed. Per slot the table keeps the key (packed into one int64 code, or
// for key ranges too wide to pack, the id of an entry whose key is stored) and the smallest entry id that
// carries the key (atomic min). Vertex ids are then assigned in order of first appearance (an entry is
// its vertex's "owner" when it is that smallest id; a prefix sum over owner flags numbers them), which is
// deterministic whatever the thread count, the insertion order or the device, and makes every image's
// vertices a contiguous id range that starts at its first point's vertex 0.
#pragma once

#include "segops/hd.h"
#include "segops/parallel.h"
#if !defined(__CUDACC__)
#include "segops/cpu_v8.h"
#endif

#if !defined(__CUDACC__)
#include <algorithm>
#include <type_traits>
#if defined(__SSE__)
#include <immintrin.h>
#endif
#include <vector>
#endif

namespace segops {
namespace lattice {

constexpr int kMaxD = 16;
// Elevated coordinates beyond this magnitude are rejected (keys are int32, neighbours add +-d).
constexpr double kMaxElevated = 1.0e9;
// Bits of the status word read back once per build: the vertex count in the low bits, flags above.
constexpr int64_t kStatusBadFeatures = int64_t(1) << 40;
constexpr int64_t kStatusNotPacked = int64_t(1) << 41;
constexpr int64_t kStatusCountMask = (int64_t(1) << 40) - 1;
constexpr int32_t kNoOwner = 0x7fffffff;

// Arithmetic that nvcc must not contract into FMAs: the simplex choice depends on exact rounding, and
// CPU (no contraction at the default -O3 x86-64 flags), CUDA and the pure-PyTorch reference must agree.
SEGOPS_HD_INLINE float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
SEGOPS_HD_INLINE double mul_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}
SEGOPS_HD_INLINE float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
SEGOPS_HD_INLINE double add_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dadd_rn(a, b);
#else
  return a + b;
#endif
}
SEGOPS_HD_INLINE float sub_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}
SEGOPS_HD_INLINE double sub_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dsub_rn(a, b);
#else
  return a - b;
#endif
}
// Round half to even (torch.round's rule; the contract allows any tie rule). On the host the classic
// add-and-subtract-2^23 (2^52) trick, which rounds in the current (nearest-even) mode without a library
// call (std::nearbyint is not inlined at the baseline x86-64 flags); without -ffast-math the compiler
// may not fold (a + big) - big. Values that large are integers already.
SEGOPS_HD_INLINE float round_even(float x) {
#if defined(__CUDA_ARCH__)
  return rintf(x);
#else
  const float big = 8388608.0f;  // 2^23
  const float a = std::fabs(x);
  if (!(a < big)) return x;
  const float t = a + big;
  return std::copysign(t - big, x);
#endif
}
SEGOPS_HD_INLINE double round_even(double x) {
#if defined(__CUDA_ARCH__)
  return rint(x);
#else
  const double big = 4503599627370496.0;  // 2^52
  const double a = std::fabs(x);
  if (!(a < big)) return x;
  const double t = a + big;
  return std::copysign(t - big, x);
#endif
}

// ---- atomics the lattice needs beyond parallel.h ------------------------------------------------------

// *address = min(*address, value).
SEGOPS_HD_INLINE void atomic_min_i32(int32_t* address, int32_t value) {
#if defined(__CUDA_ARCH__)
  atomicMin(address, value);
#else
  int32_t cur = __atomic_load_n(address, __ATOMIC_RELAXED);
  while (value < cur &&
         !__atomic_compare_exchange_n(address, &cur, value, /*weak=*/true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
  }
#endif
}

// Raises a flag that several threads may raise at once.
SEGOPS_HD_INLINE void raise_flag(int32_t* flag) {
#if defined(__CUDA_ARCH__)
  *reinterpret_cast<volatile int32_t*>(flag) = 1;
#else
  __atomic_store_n(flag, 1, __ATOMIC_RELAXED);
#endif
}

// Orders the key stores of an entry before the atomic that publishes it (the host CAS is acq_rel).
SEGOPS_HD_INLINE void publish_fence() {
#if defined(__CUDA_ARCH__)
  __threadfence();
#endif
}

// A hash mapped onto [0, cap) by a multiply-shift (uniform for any cap, no power of two needed).
SEGOPS_HD_INLINE uint64_t slot_of(uint64_t hash, uint64_t cap) {
#if defined(__CUDA_ARCH__)
  return __umul64hi(hash, cap);
#else
  return static_cast<uint64_t>((static_cast<unsigned __int128>(hash) * cap) >> 64);
#endif
}

SEGOPS_HD_INLINE uint64_t mix64(uint64_t x) {  // splitmix64's finaliser
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ull;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// ---- steps 1-4: simplex, weights, vertex keys ------------------------------------------------------------

// The enclosing simplex of one point: remainder-0 coordinates, ranks and barycentric weights b[0..d].
template <int D, typename T>
struct Simplex {
  int32_t rem0[D + 1];
  int32_t rank[D + 1];
  T bary[D + 2];
};

// Steps 1-3 of the contract for the point with features f[0], f[fs], ..., f[(D-1) fs]; scale[i] =
// sqrt(2/3) (D+1) / sqrt((i+1)(i+2)) rounded to T. Returns false for NaN / Inf / huge features.
template <int D, typename T>
SEGOPS_HD_INLINE bool find_simplex(const T* f, index_t fs, const T* scale, Simplex<D, T>& s) {
  T e[D + 1];
  T sum_above = T(0);  // sum_{i >= j} c_i
  for (int j = D; j >= 1; --j) {  // e_j = sum_{i>=j} c_i - j c_{j-1}, accumulated from the top (step 1)
    const T c = mul_rn(f[(j - 1) * fs], scale[j - 1]);  // c_{j-1} of the contract
    e[j] = sub_rn(sum_above, mul_rn(T(j), c));
    sum_above = add_rn(sum_above, c);
  }
  e[0] = sum_above;
  const T down = T(1.0 / (D + 1));
  int32_t sum = 0;
  T r[D + 1];
  bool finite = true;
  for (int i = 0; i <= D; ++i) {
    finite = finite && (e[i] < T(kMaxElevated) && e[i] > T(-kMaxElevated));  // also catches NaN
    const T q = finite ? round_even(mul_rn(e[i], down)) : T(0);
    const int32_t qi = static_cast<int32_t>(q);
    s.rem0[i] = qi * (D + 1);
    sum += qi;
    r[i] = sub_rn(e[i], T(s.rem0[i]));
    s.rank[i] = 0;
  }
  if (!finite) return false;
  // rank_i = #{j : r_j > r_i} + #{j < i : r_j == r_i}  (step 2); branch-free: the comparisons are
  // unpredictable and a mispredicted branch costs more than both increments
  for (int i = 0; i < D; ++i) {
    for (int j = i + 1; j <= D; ++j) {
      const int32_t lt = r[i] < r[j] ? 1 : 0;
      s.rank[i] += lt;
      s.rank[j] += 1 - lt;
    }
  }
  for (int i = 0; i <= D; ++i) {
    int32_t rk = s.rank[i] + sum;
    const int32_t under = rk < 0 ? 1 : 0, over = rk > D ? 1 : 0;
    rk += (under - over) * (D + 1);
    s.rank[i] = rk;
    s.rem0[i] += (under - over) * (D + 1);
  }
  // step 3
  for (int i = 0; i < D + 2; ++i) s.bary[i] = T(0);
  for (int i = 0; i <= D; ++i) {
    const T v = mul_rn(sub_rn(e[i], T(s.rem0[i])), down);
    s.bary[D - s.rank[i]] += v;
    s.bary[D - s.rank[i] + 1] -= v;
  }
  s.bary[0] += T(1) + s.bary[D + 1];
  return true;
}

// Step 4: the first D coordinates of vertex k of the simplex.
template <int D, typename T>
SEGOPS_HD_INLINE void vertex_key(const Simplex<D, T>& s, int k, int32_t* key) {
  for (int i = 0; i < D; ++i) key[i] = s.rem0[i] + k - (s.rank[i] > D - k ? D + 1 : 0);
}

template <int D>
SEGOPS_HD_INLINE bool keys_equal(const int32_t* a, const int32_t* b) {
  for (int i = 0; i < D; ++i)
    if (a[i] != b[i]) return false;
  return true;
}

// A published key, read with acquire / volatile loads (another thread may have just written it).
template <int D>
SEGOPS_HD_INLINE bool published_key_equals(const int32_t* stored, const int32_t* key) {
  for (int i = 0; i < D; ++i)
    if (atomic_load(stored + i) != key[i]) return false;
  return true;
}

template <int D>
SEGOPS_HD_INLINE uint64_t hash_key(const int32_t* key) {
  uint64_t h = 0;
  for (int i = 0; i < D; ++i) h = (h + static_cast<uint32_t>(key[i])) * 0x9E3779B97F4A7C15ull;
  return mix64(h);
}

#if !defined(__CUDACC__)
// ---- steps 1-3 for 8 consecutive float32 points at once (CPU) ---------------------------------------------
// The same operations as find_simplex, lane by lane and in the same order (GCC vector extensions), so every
// lane's result is bitwise the scalar one. Used only inside the AVX2 clones: at the SSE2 baseline GCC
// scalarises the lane selects and the search is slower than the scalar one.
namespace simd8 {
typedef float f8 __attribute__((vector_size(32)));
typedef int32_t i8 __attribute__((vector_size(32)));

SEGOPS_LATTICE_INLINE f8 splat(float x) { return f8{x, x, x, x, x, x, x, x}; }
SEGOPS_LATTICE_INLINE i8 splat(int32_t x) { return i8{x, x, x, x, x, x, x, x}; }
SEGOPS_LATTICE_INLINE f8 as_f8(i8 x) {
  f8 r;
  __builtin_memcpy(&r, &x, sizeof(r));
  return r;
}
SEGOPS_LATTICE_INLINE i8 as_i8(f8 x) {
  i8 r;
  __builtin_memcpy(&r, &x, sizeof(r));
  return r;
}
// round_even(float) on 8 lanes: |x| + 2^23 - 2^23 with x's sign where |x| < 2^23, x itself elsewhere.
SEGOPS_LATTICE_INLINE f8 round_even(f8 x) {
  const f8 big = splat(8388608.0f);
  const i8 sign = as_i8(x) & splat(int32_t(0x80000000u));
  const f8 a = as_f8(as_i8(x) & splat(int32_t(0x7fffffff)));
  const f8 t = (a + big) - big;
  const f8 signed_t = as_f8(as_i8(t) | sign);
  return a < big ? signed_t : x;
}
}  // namespace simd8

// find_simplex for the 8 points at f[0..7], f[fs + 0..7], ... (feature j of point p at f[j fs + p]).
// Returns false, with nothing written, when a lane's features are unusable (the caller then takes the
// scalar path, which flags them). On success: rem0[i][p], rank[i][p] and bary[p (D+1) + k].
template <int D>
SEGOPS_LATTICE_INLINE bool find_simplex8(const float* f, index_t fs, const float* scale, int32_t (*rem0)[8],
                                         int32_t (*rank)[8], float* bary) {
  using simd8::f8;
  using simd8::i8;
  using simd8::splat;
  f8 e[D + 1];
  f8 sum_above = splat(0.0f);
  for (int j = D; j >= 1; --j) {
    f8 x;
    __builtin_memcpy(&x, f + (j - 1) * fs, sizeof(x));
    const f8 c = x * scale[j - 1];
    e[j] = sum_above - splat(float(j)) * c;
    sum_above = sum_above + c;
  }
  e[0] = sum_above;
  i8 finite = splat(int32_t(-1));
  for (int i = 0; i <= D; ++i) finite &= (e[i] < splat(float(kMaxElevated))) & (e[i] > splat(float(-kMaxElevated)));
  for (int p = 0; p < 8; ++p)
    if (!finite[p]) return false;
  const float down = float(1.0 / (D + 1));
  i8 r0[D + 1], rk[D + 1];
  f8 r[D + 1];
  i8 sum = splat(int32_t(0));
  for (int i = 0; i <= D; ++i) {
    const i8 qi = __builtin_convertvector(simd8::round_even(e[i] * down), i8);
    r0[i] = qi * (D + 1);
    sum += qi;
    r[i] = e[i] - __builtin_convertvector(r0[i], f8);
    rk[i] = splat(int32_t(0));
  }
  for (int i = 0; i < D; ++i) {
    for (int j = i + 1; j <= D; ++j) {
      const i8 lt = r[i] < r[j];  // -1 where r_i < r_j
      rk[i] -= lt;
      rk[j] += 1 + lt;
    }
  }
  for (int i = 0; i <= D; ++i) {
    i8 k = rk[i] + sum;
    const i8 shift = ((k > D) - (k < 0)) * (D + 1);  // masks are -1: (under - over) (D + 1)
    rk[i] = k + shift;
    r0[i] += shift;
  }
  // step 3, the scalar loop's adds and subtracts lane by lane in its order
  f8 b[D + 2];
  for (int t = 0; t < D + 2; ++t) b[t] = splat(0.0f);
  for (int i = 0; i <= D; ++i) {
    const f8 v = (e[i] - __builtin_convertvector(r0[i], f8)) * down;
    const i8 lo = D - rk[i];
    for (int t = 0; t <= D; ++t) b[t] = lo == t ? b[t] + v : b[t];
    for (int t = 1; t < D + 2; ++t) b[t] = lo + 1 == t ? b[t] - v : b[t];
  }
  b[0] = b[0] + (splat(1.0f) + b[D + 1]);
  for (int i = 0; i <= D; ++i) {
    __builtin_memcpy(rem0[i], &r0[i], sizeof(r0[i]));
    __builtin_memcpy(rank[i], &rk[i], sizeof(rk[i]));
  }
  for (int p = 0; p < 8; ++p)
    for (int k = 0; k <= D; ++k) bary[p * (D + 1) + k] = b[k][p];
  return true;
}
#endif

// ---- packed keys -------------------------------------------------------------------------------------------
// When the bound on the key coordinates (from the feature ranges) fits, a vertex key plus its image index
// is one int64 code = sum_i (key_i - lo_i) << shift_i + image << image_shift, stored in the slot itself.
// The plan lives in device memory (computed there from amin / amax of the features), so no host read is
// needed to choose it; when the range is too wide the build flags kStatusNotPacked and the host reruns it
// with stored keys.
struct PackPlan {
  int32_t ok;
  int32_t image_shift;
  int32_t lo[kMaxD];
  int32_t shift[kMaxD];
  int32_t bits[kMaxD];
  int64_t ones;  // sum_i 1 << shift_i: adds 1 to every coordinate of a code
};
constexpr int kPackPlanWords = (sizeof(PackPlan) + 7) / 8;  // int64 words of the device buffer

// Bounds every key coordinate from the feature ranges lo[i], hi[i] (interval arithmetic over the
// elevation, +-(D+1) for the rounding / plane correction / vertex offsets, plus a safety margin) and packs
// when the bit widths plus the image bits sum to at most 63.
template <int D, typename T>
SEGOPS_HD_INLINE void plan_packing(const T* lo, const T* hi, const T* scale, int64_t B, PackPlan& p) {
  p.ok = 0;
  p.image_shift = 0;
  p.ones = 0;
  for (int j = 0; j < kMaxD; ++j) p.lo[j] = p.shift[j] = p.bits[j] = 0;
  double clo[kMaxD], chi[kMaxD];
  for (int i = 0; i < D; ++i) {
    const double l = static_cast<double>(lo[i]), h = static_cast<double>(hi[i]);
    if (!(l > -1e300 && l < 1e300 && h > -1e300 && h < 1e300)) return;  // NaN / Inf: the build reports it
    clo[i] = l * static_cast<double>(scale[i]);
    chi[i] = h * static_cast<double>(scale[i]);
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
    const double margin = 2.0 + 1e-5 * (::fabs(elo) + ::fabs(ehi));
    elo -= margin;
    ehi += margin;
    if (!(elo > -kMaxElevated && ehi < kMaxElevated)) return;
    const double klo = (D + 1) * ::floor(elo / (D + 1)) - 2.0 * (D + 1);
    const double khi = (D + 1) * ::ceil(ehi / (D + 1)) + 2.0 * (D + 1) + D;
    const double span = khi - klo + 1;
    int bits = 0;
    while (bits < 63 && ::ldexp(1.0, bits) < span) ++bits;
    p.lo[j] = static_cast<int32_t>(klo);
    p.bits[j] = bits;
    p.shift[j] = total;
    total += bits;
    if (total > 63) return;
  }
  int image_bits = 0;
  while ((int64_t(1) << image_bits) < B) ++image_bits;
  if (total + image_bits > 63) return;
  p.image_shift = total;
  for (int j = 0; j < D; ++j) p.ones += int64_t(1) << p.shift[j];
  p.ok = 1;
}

// The code difference between a vertex and its neighbour one step forward along blur direction j (0..D): +1 on
// every coordinate, -(D+1) on coordinate j (none for j = D). Also the step from simplex vertex k to k + 1, with j the
// coordinate ranked D - k.
template <int D>
SEGOPS_HD_INLINE int64_t direction_step(const PackPlan& p, int j) {
  return p.ones - (j < D ? int64_t(D + 1) << p.shift[j] : int64_t(0));
}

template <int D>
SEGOPS_HD_INLINE int64_t pack_key(const PackPlan& p, const int32_t* key, int64_t image) {
  uint64_t code = static_cast<uint64_t>(image) << p.image_shift;
  for (int i = 0; i < D; ++i) code += static_cast<uint64_t>(key[i] - p.lo[i]) << p.shift[i];
  return static_cast<int64_t>(code);
}

// Plans the packing from the per-axis feature minima / maxima (device memory); one call.
template <int D, typename T>
struct PlanPacking {
  const T* lo;
  const T* hi;
  T scale[kMaxD];
  int64_t B;
  PackPlan* plan;
  SEGOPS_HD_INLINE void operator()(index_t) const { plan_packing<D, T>(lo, hi, scale, B, *plan); }
};

// ---- phase 1: simplex + hash insert, one point per call -----------------------------------------------------
// Writes per entry its barycentric weight and the table slot of its key, and keeps per slot the smallest
// entry id with that key (owner). A point with unusable features raises `flags[0]` and gets dummy entries
// (slot 0, weight 0); the call then fails after the build.
template <int D, typename T>
struct BuildBase {
  const T* feats;  // (B, D, N) strided view
  index_t fsb, fsd, fsn;
  T scale[kMaxD];
  index_t N;
  uint64_t cap;
  int32_t* owner;  // (cap) smallest entry id per slot, kNoOwner = none
  int32_t* slot;   // (T) per entry
  T* bary;         // (T)
  int32_t* flags;  // [bad features, not packed]

  // Returns false (and flags the features) when they are unusable; `s` is then undefined.
  SEGOPS_HD_INLINE bool simplex(index_t i, index_t b, index_t n, Simplex<D, T>& s) const {
    if (!find_simplex<D, T>(feats + b * fsb + n * fsn, fsd, scale, s)) {
      raise_flag(flags);
      dummy(i);
      return false;
    }
    for (int k = 0; k <= D; ++k) bary[i * (D + 1) + k] = s.bary[k];
    return true;
  }
  SEGOPS_HD_INLINE void dummy(index_t i) const {
    for (int k = 0; k <= D; ++k) {
      bary[i * (D + 1) + k] = T(0);
      slot[i * (D + 1) + k] = 0;
    }
  }
  SEGOPS_HD_INLINE void claim(int32_t h, int32_t entry) const {
    if (atomic_load(owner + h) > entry) atomic_min_i32(owner + h, entry);
  }
};

// The slot holding `code` (inserting it when absent); the capacity exceeds the number of entries, so a
// free slot always exists.
SEGOPS_HD_INLINE int32_t packed_insert(int64_t* codes, uint64_t cap, int64_t code) {
  uint64_t h = slot_of(mix64(static_cast<uint64_t>(code)), cap);
  while (true) {
    int64_t cur = atomic_load(codes + h);
    if (cur == -1) {
      cur = atomic_cas(codes + h, int64_t(-1), code);
      if (cur == -1) return static_cast<int32_t>(h);
    }
    if (cur == code) return static_cast<int32_t>(h);
    h = h + 1 == cap ? 0 : h + 1;
  }
}

template <int D, typename T>
struct BuildPacked : BuildBase<D, T> {
  using Base = BuildBase<D, T>;
  using Base::N;
  using Base::cap;
  using Base::claim;
  using Base::flags;
  using Base::simplex;
  using Base::slot;
  const PackPlan* plan;
  int64_t* codes;  // (cap) -1 = empty

  // Codes of the d+1 vertices: vertex 0 is rem0; each next vertex adds 1 to every coordinate and
  // subtracts d+1 from the one whose rank says it wraps (rank d - k for vertex k + 1).
  template <typename Visit>
  SEGOPS_HD_INLINE void vertex_codes(const PackPlan& p, const Simplex<D, T>& s, index_t b, Visit&& visit) const {
    int32_t by_rank[D + 1];
    for (int i = 0; i <= D; ++i) by_rank[s.rank[i]] = i;
    int64_t code = pack_key<D>(p, s.rem0, b);
    for (int k = 0; k <= D; ++k) {
      visit(k, code);
      const int wrap = by_rank[D - k];
      code += direction_step<D>(p, wrap);
    }
  }

  SEGOPS_HD_INLINE void operator()(index_t i) const {
    Simplex<D, T> s;
    const index_t b = i / N;
    if (!simplex(i, b, i - b * N, s)) return;
    const PackPlan p = *plan;
    if (!p.ok) {
      raise_flag(flags + 1);
      this->dummy(i);
      return;
    }
    vertex_codes(p, s, b, [&](int k, int64_t code) {
      const int32_t h = packed_insert(codes, cap, code);
      const int32_t entry = static_cast<int32_t>(i * (D + 1) + k);
      slot[entry] = h;
      claim(h, entry);
    });
  }

#if !defined(__CUDACC__)
  // CPU: points [begin, end) in order, with a small direct-mapped thread-local cache code -> slot in front
  // of the shared table (neighbouring pixels share most vertices): a hit costs no table probe and no
  // atomic. The owners stay right: a chunk meets each key first at its smallest entry id, which always
  // misses the cache and claims the slot.
  void run_range(index_t begin, index_t end) const { run_points<false>(begin, end); }
  // The AVX2 clone's entry (see the CPU backend): the 8-lane simplex search pays off only where its vector
  // types map to AVX2 registers; at the SSE2 baseline GCC splits them and scalarises the selects, which
  // made the build 3.5x slower than the scalar search on an EPYC.
  SEGOPS_LATTICE_INLINE void run_range_wide(index_t begin, index_t end) const { run_points<true>(begin, end); }

  template <bool kWide>
  SEGOPS_LATTICE_INLINE void run_points(index_t begin, index_t end) const {
    const PackPlan p = *plan;
    std::vector<int64_t> cache_code(kCache, int64_t(-1));
    std::vector<int32_t> cache_slot(kCache);
    for_each_simplex<kWide>(begin, end, [&](const Simplex<D, T>& s, index_t b, index_t i) {
      insert_vertices(p, s, b, i, cache_code.data(), cache_slot.data());
    });
  }

  // Points [begin, end) in order: each point's simplex and weights (8 points at once where the features allow),
  // then visit(simplex, image, point) in point order. A point with unusable features is flagged and skipped (its
  // entries are dummies); so is every point when the key ranges do not pack.
  template <bool kWide, typename Visit>
  SEGOPS_LATTICE_INLINE void for_each_simplex(index_t begin, index_t end, Visit&& visit) const {
    Simplex<D, T> s;
    for_each_simplex<kWide>(begin, end, visit, [&](const int32_t (*rem0)[8], const int32_t (*rank)[8], index_t b,
                                                   index_t i) {
      for (int q = 0; q < 8; ++q) {
        for (int c = 0; c <= D; ++c) {
          s.rem0[c] = rem0[c][q];
          s.rank[c] = rank[c][q];
        }
        visit(s, b, i + q);
      }
    });
  }
  // The same with the 8-point simplices handed over together: visit8(rem0, rank, image, first point), lanes q =
  // points i .. i + 7 (all of image b).
  template <bool kWide, typename Visit, typename Visit8>
  SEGOPS_LATTICE_INLINE void for_each_simplex(index_t begin, index_t end, Visit&& visit, Visit8&& visit8) const {
    const PackPlan p = *plan;
    Simplex<D, T> s;
    index_t b = begin / N, n = begin - b * N;
    for (index_t i = begin; i < end; ++i, ++n) {
      if (n == N) {
        n = 0;
        ++b;
      }
      // float32 with points contiguous: 8 points' simplices at once, then their vertices in point order
      if constexpr (kWide && std::is_same<T, float>::value) {
        int32_t rem0[D + 1][8], rank[D + 1][8];
        if (this->fsn == 1 && p.ok && n + 8 <= N && i + 8 <= end &&
            find_simplex8<D>(this->feats + b * this->fsb + n, this->fsd, this->scale, rem0, rank,
                             this->bary + i * (D + 1))) {
          visit8(rem0, rank, b, i);
          i += 7;
          n += 7;
          continue;
        }
      }
      if (!simplex(i, b, n, s)) continue;
      if (!p.ok) {
        raise_flag(flags + 1);
        this->dummy(i);
        continue;
      }
      visit(s, b, i);
    }
  }

  static constexpr int kCache = 16384;  // ~1% misses on 512^2 photos at the ECCV'18 settings (4096: ~4%)

  // The slots of point i's vertices, through the thread's cache.
  SEGOPS_LATTICE_INLINE void insert_vertices(const PackPlan& p, const Simplex<D, T>& s, index_t b, index_t i,
                                             int64_t* cache_code, int32_t* cache_slot) const {
    vertex_codes(p, s, b, [&](int k, int64_t code) {
      const uint64_t mixed = mix64(static_cast<uint64_t>(code));
      const int c = static_cast<int>(mixed >> 50) & (kCache - 1);
      const int32_t entry = static_cast<int32_t>(i * (D + 1) + k);
      if (cache_code[c] == code) {
        slot[entry] = cache_slot[c];
        return;
      }
      const int32_t h = packed_insert(codes, cap, code);
      slot[entry] = h;
      claim(h, entry);
      cache_code[c] = code;
      cache_slot[c] = h;
    });
  }
#endif
};

// ---- phase 1, stored keys: key ranges too wide to pack ------------------------------------------------------
// Each entry that reaches the table first stores its key [image, key...] (D+1 int32) at keys[entry]; a slot
// holds the id of an entry whose key is stored there (the owner itself: inserts publish with a CAS, later
// smaller entries with the same key lower it with an atomic min).
template <int D, typename T>
struct BuildStored : BuildBase<D, T> {
  using Base = BuildBase<D, T>;
  using Base::N;
  using Base::cap;
  using Base::owner;
  using Base::simplex;
  using Base::slot;
  int32_t* keys;  // (T, D+1)

  SEGOPS_HD_INLINE int32_t insert(int32_t entry, const int32_t* key) const {
    for (int c = 0; c <= D; ++c) keys[static_cast<index_t>(entry) * (D + 1) + c] = key[c];
    publish_fence();
    uint64_t h = slot_of(hash_key<D + 1>(key), cap);
    while (true) {
      int32_t cur = atomic_load(owner + h);
      if (cur == kNoOwner) {
        cur = atomic_cas(owner + h, kNoOwner, entry);
        if (cur == kNoOwner) return static_cast<int32_t>(h);
      }
      if (published_key_equals<D + 1>(keys + static_cast<index_t>(cur) * (D + 1), key)) {
        if (entry < cur) atomic_min_i32(owner + h, entry);
        return static_cast<int32_t>(h);
      }
      h = h + 1 == cap ? 0 : h + 1;
    }
  }

  SEGOPS_HD_INLINE void operator()(index_t i) const {
    Simplex<D, T> s;
    const index_t b = i / N;
    if (!simplex(i, b, i - b * N, s)) return;
    int32_t key[D + 1];
    key[0] = static_cast<int32_t>(b);
    for (int k = 0; k <= D; ++k) {
      vertex_key<D, T>(s, k, key + 1);
      const int32_t entry = static_cast<int32_t>(i * (D + 1) + k);
      slot[entry] = insert(entry, key);
    }
  }

#if !defined(__CUDACC__)
  // CPU: as BuildPacked::run_range, with a thread-local direct-mapped cache key -> slot.
  void run_range(index_t begin, index_t end) const {
    constexpr int kCache = 16384;
    struct Cached {
      int32_t slot;
      int32_t key[D + 1];
    };
    std::vector<Cached> cache(kCache);
    for (auto& c : cache) c.slot = -1;
    Simplex<D, T> s;
    int32_t key[D + 1];
    index_t b = begin / N, n = begin - b * N;
    for (index_t i = begin; i < end; ++i, ++n) {
      if (n == N) {
        n = 0;
        ++b;
      }
      if (!simplex(i, b, n, s)) continue;
      key[0] = static_cast<int32_t>(b);
      for (int k = 0; k <= D; ++k) {
        vertex_key<D, T>(s, k, key + 1);
        const int32_t entry = static_cast<int32_t>(i * (D + 1) + k);
        Cached& c = cache[(hash_key<D + 1>(key) >> 50) & (kCache - 1)];
        if (c.slot >= 0 && keys_equal<D + 1>(c.key, key)) {
          slot[entry] = c.slot;
          continue;
        }
        c.slot = slot[entry] = insert(entry, key);
        for (int j = 0; j <= D; ++j) c.key[j] = key[j];
      }
    }
  }
#endif
};

// ---- phase 2: vertex ids in order of first appearance ---------------------------------------------------------

// owner_flag[e] = 1 when entry e is the smallest entry with its key.
struct MarkOwners {
  const int32_t* slot;
  const int32_t* owner;
  uint8_t* owner_flag;
  SEGOPS_HD_INLINE void operator()(index_t e) const { owner_flag[e] = owner[slot[e]] == e ? 1 : 0; }
};

// The one word the host reads back: the vertex count (last prefix sum) and the flags.
struct FinishStatus {
  const int32_t* owners_so_far;  // inclusive prefix sum of the owner flags, T entries
  index_t T;
  const int32_t* flags;
  int64_t* status;
  SEGOPS_HD_INLINE void operator()(index_t) const {
    int64_t s = T > 0 ? static_cast<int64_t>(owners_so_far[T - 1]) : 0;
    if (flags[0]) s |= kStatusBadFeatures;
    if (flags[1]) s |= kStatusNotPacked;
    *status = s;
  }
};

// vertex[e] = id of e's vertex (written over the slot array: each entry reads only its own slot); each
// owner also records its vertex's key: the packed code (vertex_codes (M)) or the stored [image, key...] row
// (vertex_keys (M, D+1)).
template <int D>
struct AssignVertices {
  int32_t* slot_then_vertex;     // (T)
  const int32_t* owner;          // (cap)
  const int32_t* owners_so_far;  // (T) inclusive prefix sum of the owner flags
  const int64_t* codes;          // (cap) packed keys, or nullptr
  int64_t* vertex_codes;         // (M), with codes
  const int32_t* keys;           // (T, D+1) stored keys, or nullptr
  int32_t* vertex_keys;          // (M, D+1), with keys
  SEGOPS_HD_INLINE void operator()(index_t e) const {
    const int32_t h = slot_then_vertex[e];
    const int32_t o = owner[h];
    const int32_t v = owners_so_far[o] - 1;
    slot_then_vertex[e] = v;
    if (o != e) return;
    if (codes) {
      vertex_codes[v] = codes[h];
    } else {
      int32_t* key_row = vertex_keys + static_cast<index_t>(v) * (D + 1);
      for (int c = 0; c <= D; ++c) key_row[c] = keys[e * (D + 1) + c];
    }
  }
};

// The compact vertex table for packed keys: code -> vertex id (one int64 compare per probe).
struct InsertVertexCodes {
  int32_t* table;
  uint64_t cap;
  const int64_t* vertex_codes;  // (M)
  SEGOPS_HD_INLINE void operator()(index_t v) const {
    uint64_t h = slot_of(mix64(static_cast<uint64_t>(vertex_codes[v])), cap);
    while (atomic_cas(table + h, int32_t(-1), static_cast<int32_t>(v)) != -1) h = h + 1 == cap ? 0 : h + 1;
  }
};

SEGOPS_HD_INLINE int32_t find_vertex_code(const int32_t* table, uint64_t cap, const int64_t* vertex_codes,
                                          int64_t code) {
  uint64_t h = slot_of(mix64(static_cast<uint64_t>(code)), cap);
  while (true) {
    const int32_t cur = table[h];
    if (cur < 0 || vertex_codes[cur] == code) return cur;
    h = h + 1 == cap ? 0 : h + 1;
  }
}

// FindNeighbors for packed keys: a neighbour's code is the vertex's code plus a per-direction offset (the
// packing leaves a margin of 2 (D+1) around every vertex key, so neighbour keys stay in their fields).
template <int D>
struct FindNeighborCodes {
  const int32_t* table;
  uint64_t cap;
  const int64_t* vertex_codes;  // (M)
  const PackPlan* plan;
  int32_t* neighbors;  // (M, D+1, 2)
  SEGOPS_HD_INLINE void operator()(index_t v) const {
    const PackPlan& p = *plan;
    const int64_t code = vertex_codes[v];
    for (int j = 0; j <= D; ++j) {
      const int64_t step = direction_step<D>(p, j);
      neighbors[(v * (D + 1) + j) * 2 + 0] = find_vertex_code(table, cap, vertex_codes, code - step);
      neighbors[(v * (D + 1) + j) * 2 + 1] = find_vertex_code(table, cap, vertex_codes, code + step);
    }
  }
};

// The compact vertex table: [image, key] -> vertex id, all keys distinct; small enough to stay in cache for
// the neighbour search (the build table has room for every entry, this one for the M vertices).
template <int D>
struct InsertVertices {
  int32_t* table;
  uint64_t cap;
  const int32_t* vertex_keys;  // (M, D+1)
  SEGOPS_HD_INLINE void operator()(index_t v) const {
    const int32_t* key = vertex_keys + v * (D + 1);
    uint64_t h = slot_of(hash_key<D + 1>(key), cap);
    while (atomic_cas(table + h, int32_t(-1), static_cast<int32_t>(v)) != -1) h = h + 1 == cap ? 0 : h + 1;
  }
};

template <int D>
SEGOPS_HD_INLINE int32_t find_vertex(const int32_t* table, uint64_t cap, const int32_t* vertex_keys, const int32_t* key) {
  uint64_t h = slot_of(hash_key<D + 1>(key), cap);
  while (true) {
    const int32_t cur = table[h];
    if (cur < 0) return -1;
    if (keys_equal<D + 1>(vertex_keys + static_cast<index_t>(cur) * (D + 1), key)) return cur;
    h = h + 1 == cap ? 0 : h + 1;
  }
}

// ---- phase 3: blur neighbours, one vertex per call ---------------------------------------------------------
// neighbors[(v (D+1) + j) 2 + 0] = vertex at key - 1 (+ D + 1 in coordinate j), [.. + 1] = key + 1 (- D - 1
// in coordinate j); -1 when absent. For j = D only the implicit last coordinate takes the +-(D+1).
template <int D>
struct FindNeighbors {
  const int32_t* table;
  uint64_t cap;
  const int32_t* vertex_keys;  // (M, D+1)
  int32_t* neighbors;    // (M, D+1, 2)
  SEGOPS_HD_INLINE void operator()(index_t v) const {
    const int32_t* key = vertex_keys + v * (D + 1);
    int32_t lo[D + 1], hi[D + 1];
    lo[0] = hi[0] = key[0];
    for (int i = 1; i <= D; ++i) {
      lo[i] = key[i] - 1;
      hi[i] = key[i] + 1;
    }
    for (int j = 0; j <= D; ++j) {
      if (j < D) {
        lo[j + 1] = key[j + 1] + D;
        hi[j + 1] = key[j + 1] - D;
      }
      neighbors[(v * (D + 1) + j) * 2 + 0] = find_vertex<D>(table, cap, vertex_keys, lo);
      neighbors[(v * (D + 1) + j) * 2 + 1] = find_vertex<D>(table, cap, vertex_keys, hi);
      if (j < D) {
        lo[j + 1] = key[j + 1] - 1;
        hi[j + 1] = key[j + 1] + 1;
      }
    }
  }
};

// image_start[b] = first vertex id of image b (its first point's vertex 0, an owner), image_start[B] = M.
struct ImageStarts {
  const int32_t* vertex;  // (B N (d+1))
  index_t entries_per_image;
  index_t B;
  int32_t M;
  int32_t* image_start;  // (B+1)
  SEGOPS_HD_INLINE void operator()(index_t b) const {
    image_start[b] = b < B ? vertex[b * entries_per_image] : M;
  }
};

// ---- splat / blur / slice over channels --------------------------------------------------------------------
// Vertex values: (M, Cg) rows ("grid"). Point values: (B, C, N) strided.

// row[0..n) += w * x[0..n) in 32-byte and 16-byte pieces, then single values: a runtime-length loop leaves
// the vectoriser's peeling and remainder code, which costs more than the arithmetic at n ~ 20. On the host
// the pieces are GCC vector types (two SSE registers each at the baseline flags, one in the AVX2 clone).
template <typename acc>
SEGOPS_LATTICE_INLINE void axpy_row(acc* __restrict row, const acc* __restrict x, acc w, index_t n) {
  index_t c = 0;
#if !defined(__CUDACC__) && defined(__GNUC__)
  typedef acc wide __attribute__((vector_size(32)));
  typedef acc half __attribute__((vector_size(16)));
  constexpr index_t kWide = 32 / sizeof(acc), kHalf = 16 / sizeof(acc);
  for (; c + kWide <= n; c += kWide) {
    wide r, v;
    __builtin_memcpy(&r, row + c, sizeof(wide));
    __builtin_memcpy(&v, x + c, sizeof(wide));
    r += w * v;
    __builtin_memcpy(row + c, &r, sizeof(wide));
  }
  for (; c + kHalf <= n; c += kHalf) {
    half r, v;
    __builtin_memcpy(&r, row + c, sizeof(half));
    __builtin_memcpy(&v, x + c, sizeof(half));
    r += w * v;
    __builtin_memcpy(row + c, &r, sizeof(half));
  }
  switch (n - c) {  // at most 3 left: straight-line code, no loop for the vectoriser to dress up
    case 3:
      row[c + 2] += w * x[c + 2];
      [[fallthrough]];
    case 2:
      row[c + 1] += w * x[c + 1];
      [[fallthrough]];
    case 1:
      row[c] += w * x[c];
      [[fallthrough]];
    default:
      return;
  }
#else
  for (; c < n; ++c) row[c] += w * x[c];
#endif
}

// What the splat reads: x = values * prescale over C channels, plus optionally one extra channel (index C
// of the grid) holding `extra` (a (B, N) strided tensor) or 1 when `extra` is null.
template <typename scalar_t, typename acc>
struct SplatArgs {
  const scalar_t* values;
  index_t vsb, vsc, vsn;
  const acc* prescale;  // (B N) or nullptr
  bool has_extra;
  const scalar_t* extra;  // (B, N) strided, or nullptr for ones
  index_t esb, esn;
  index_t N, C, Cg, V;
  const int32_t* vertex;  // (B N V)
  const acc* bary;        // (B N V)
  acc* grid;              // (M, Cg)

  SEGOPS_LATTICE_INLINE acc value(index_t b, index_t n, index_t i, index_t c) const {
    const acc ps = prescale ? prescale[i] : acc(1);
    return static_cast<acc>(values[b * vsb + c * vsc + n * vsn]) * ps;
  }
  SEGOPS_LATTICE_INLINE acc extra_value(index_t b, index_t n) const {
    return extra ? static_cast<acc>(extra[b * esb + n * esn]) : acc(1);
  }
};

// Deterministic gather splat (CUDA's, also runnable on the CPU): the entries sorted (stably) by vertex, each
// vertex's run of entries cut into pieces of at most kSplatPiece entries. Pass 1 sums every piece (one call per
// (piece, channel), entries in ascending order); pass 2 sums each vertex's pieces in ascending order. The
// grouping depends only on the data, so the bits are the same from run to run; and no thread walks more than
// kSplatPiece entries plus one vertex's piece count: a photo's flat regions send thousands of entries to one
// vertex, which a single ordered sum per vertex walked alone (the whole splat waited on that one thread).
constexpr int64_t kSplatPiece = 128;

// pieces[v] = number of pieces of vertex v = ceil(entries / kSplatPiece) (>= 1: a vertex exists because an
// entry touched it); multi[v] = pieces[v] where that is more than one, else 0 (only those pieces are stored).
struct SplatPieceCounts {
  const int64_t* start;  // (M+1)
  int64_t* pieces;       // (M)
  int64_t* multi;        // (M)
  SEGOPS_HD_INLINE void operator()(index_t v) const {
    const int64_t n = (start[v + 1] - start[v] + kSplatPiece - 1) / kSplatPiece;
    pieces[v] = n;
    multi[v] = n > 1 ? n : 0;
  }
};

template <typename scalar_t, typename acc>
struct SplatGather {
  SplatArgs<scalar_t, acc> args;
  const int64_t* order;      // (T) entry ids sorted by vertex
  const int64_t* start;      // (M+1) first position of each vertex in `order`
  const int64_t* piece_end;  // (M) inclusive scan of the pieces per vertex
  const int64_t* multi_end;  // (M) inclusive scan of the stored pieces (those of multi-piece vertices)
  acc* partial;              // (stored pieces, Cs)
  index_t M;
  index_t Cs;                // channels splatted: C (+1 with the extra channel)
  // Pass 1, one call per (piece, channel); calls past the last piece (the launch is sized by a bound, so that
  // the host need not read the piece count) return at once.
  SEGOPS_HD_INLINE void operator()(index_t i) const {
    const index_t q = i / Cs, c = i - q * Cs;
    if (q >= piece_end[M - 1]) return;
    index_t lo = 0, hi = M - 1;  // the vertex: the first v with piece_end[v] > q
    while (lo < hi) {
      const index_t mid = lo + (hi - lo) / 2;
      if (piece_end[mid] > q) hi = mid; else lo = mid + 1;
    }
    const index_t v = lo;
    const index_t first = v == 0 ? 0 : piece_end[v - 1];
    const index_t count = piece_end[v] - first;
    const index_t j0 = start[v] + (q - first) * kSplatPiece;
    const index_t j1 = j0 + kSplatPiece < start[v + 1] ? j0 + kSplatPiece : start[v + 1];
    acc sum = acc(0);
    for (index_t j = j0; j < j1; ++j) {
      const index_t e = order[j];
      const index_t p = e / args.V, b = p / args.N, n = p - b * args.N;
      const acc x = c < args.C ? args.value(b, n, p, c) : args.extra_value(b, n);
      sum += args.bary[e] * x;
    }
    if (count == 1) {
      args.grid[v * args.Cg + c] = sum;  // a one-piece vertex: its sum is final
    } else {
      partial[(multi_end[v] - count + (q - first)) * Cs + c] = sum;
    }
  }
};

// Pass 2, one call per (vertex, channel) of the vertices with more than one piece: their pieces in order.
template <typename scalar_t, typename acc>
struct SplatSumPieces {
  const int64_t* multi_end;  // (M)
  const acc* partial;        // (stored pieces, Cs)
  acc* grid;                 // (M, Cg)
  index_t Cs, Cg;
  SEGOPS_HD_INLINE void operator()(index_t i) const {
    const index_t v = i / Cs, c = i - v * Cs;
    const index_t first = v == 0 ? 0 : multi_end[v - 1];
    if (multi_end[v] == first) return;  // a one-piece vertex, written by pass 1
    acc sum = acc(0);
    for (index_t q = first; q < multi_end[v]; ++q) sum += partial[q * Cs + c];
    grid[v * Cg + c] = sum;
  }
};

// start[v] = first position of vertex v in the sorted vertex ids (ids in [0, M)); start[M] = T. A vertex with no
// entries (not from segops' builds, which number only the vertices they meet, but from a lattice's ids paired
// with a larger lattice's M) starts where the next vertex does: every slot is written, by exactly one position.
struct SegmentStarts {
  const int32_t* sorted;  // (T)
  index_t T;
  int64_t* start;  // (M+1)
  int32_t M;
  SEGOPS_HD_INLINE int32_t id(index_t j) const { return sorted[j] < M ? sorted[j] : M - 1; }
  SEGOPS_HD_INLINE void operator()(index_t j) const {
    const int32_t v = id(j);
    if (j == 0 || sorted[j] != sorted[j - 1])
      for (int32_t u = j == 0 ? 0 : id(j - 1) + 1; u <= v; ++u) start[u] = j;
    if (j == T - 1)
      for (int32_t u = v + 1; u <= M; ++u) start[u] = T;
  }
};

// Blur along direction j: out[v] = in[v] + 1/2 (in[v-] + in[v+]); one vertex per call.
template <typename acc>
struct BlurDirection {
  const acc* in;
  acc* out;
  const int32_t* neighbors;
  index_t Cg, V, j;
  SEGOPS_HD_INLINE void operator()(index_t v) const {
    const int32_t a = neighbors[(v * V + j) * 2 + 0], c = neighbors[(v * V + j) * 2 + 1];
    const acc* self = in + v * Cg;
    acc* o = out + v * Cg;
    const acc half = acc(0.5);
    if (a >= 0 && c >= 0) {
      const acc* pa = in + a * Cg;
      const acc* pc = in + c * Cg;
      for (index_t ch = 0; ch < Cg; ++ch) o[ch] = self[ch] + half * (pa[ch] + pc[ch]);
    } else if (a >= 0) {
      const acc* pa = in + static_cast<index_t>(a) * Cg;
      for (index_t ch = 0; ch < Cg; ++ch) o[ch] = self[ch] + half * pa[ch];
    } else if (c >= 0) {
      const acc* pc = in + static_cast<index_t>(c) * Cg;
      for (index_t ch = 0; ch < Cg; ++ch) o[ch] = self[ch] + half * pc[ch];
    } else {
      for (index_t ch = 0; ch < Cg; ++ch) o[ch] = self[ch];
    }
  }
#if !defined(__CUDACC__)
  // CPU: a range of vertices (Backend::ranged runs it in the AVX2 clone where the CPU has AVX2).
  SEGOPS_LATTICE_INLINE void run_range(index_t begin, index_t end) const {
    for (index_t v = begin; v < end; ++v) (*this)(v);
  }
#endif
};

// The same blur, one call per (vertex, channel): CUDA's mapping (adjacent threads read adjacent channels of the
// rows, which a row per thread would read one row per thread apart), without branches on the neighbours: a
// missing one adds a zero, so the values are BlurDirection's (up to the sign of a zero).
template <typename acc>
struct BlurDirectionChannels : BlurDirection<acc> {
  SEGOPS_HD_INLINE void operator()(index_t i) const {
    const acc* in = this->in;
    const index_t Cg = this->Cg, v = i / Cg, ch = i - v * Cg;
    const int32_t* nb = this->neighbors + (v * this->V + this->j) * 2;
    const acc na = nb[0] >= 0 ? in[static_cast<index_t>(nb[0]) * Cg + ch] : acc(0);
    const acc nc = nb[1] >= 0 ? in[static_cast<index_t>(nb[1]) * Cg + ch] : acc(0);
    this->out[i] = in[i] + acc(0.5) * (na + nc);
  }
};

// out[v, c] += in[v, c] for c < C, out[v, c] = in[v, c] for C <= c < Cg: the exact gradient's (B + B^T)
// on the vertex values of the C channels, the forward blur on the extra channel.
template <typename acc>
struct AddRows {
  const acc* in;
  acc* out;
  index_t Cg, C;
  SEGOPS_HD_INLINE void operator()(index_t v) const {
    for (index_t c = 0; c < C; ++c) out[v * Cg + c] += in[v * Cg + c];
    for (index_t c = C; c < Cg; ++c) out[v * Cg + c] = in[v * Cg + c];
  }
};

constexpr int kChannelBlock = 8;

enum class SliceMode : int32_t {
  kPlain = 0,      // out = alpha s
  kNormalize = 1,  // out = s / s_extra, norm = alpha s_extra
  kAffine = 2,     // out[b, c] = alpha (scale coef[b, c, 0] s + coef[b, c, 1] s_extra)
};

// Slice one point: s[c] = sum_k b_k grid[v_k][c] over the C output channels (s_extra over grid channel C).
template <typename scalar_t, typename acc>
struct Slice {
  const acc* grid;
  index_t N, C, Cg, V;
  SliceMode mode;
  acc alpha;
  const int32_t* vertex;
  const acc* bary;
  scalar_t* out;  // (B, C, N) strided
  index_t osb, osc, osn;
  acc* norm;           // (B N), kNormalize
  const double* coef;  // (B, C, 2), kAffine
  bool coef_extra;     // kAffine: the extra channel (grid channel C) enters with coef[b, c, 1]
  double scale_a;      // kAffine
  bool stream = false;  // CPU, kAffine, float: whole aligned runs of the output written with non-temporal stores
  // CPU, kAffine: when up_w > 0 the points are the pixels of a half-resolution resize of an (up_h, up_w) grid
  // (N = (up_h / 2) (up_w / 2)) and `out` is the gradient of the full-resolution input, (B, C, up_h, up_w)
  // contiguous: each point's value v, times mask[b N + n] where a mask is given, goes to its 2 x 2 block as
  // 0.25 v -- the resize's backward, fused so that its 4x larger output is written once, by the slice. A
  // trailing odd row / column gets zeros.
  index_t up_h = 0, up_w = 0;
  const scalar_t* mask = nullptr;

  SEGOPS_LATTICE_INLINE acc gather_one(index_t i, index_t c) const {
    acc t = acc(0);
    for (index_t k = 0; k < V; ++k) t += bary[i * V + k] * grid[static_cast<index_t>(vertex[i * V + k]) * Cg + c];
    return t;
  }
  // Sums of channels [c0, c0 + kChannelBlock) with a fixed trip count: the 8 sums stay in registers.
  SEGOPS_LATTICE_INLINE void gather_block(index_t i, index_t c0, acc* sums) const {
    acc t[kChannelBlock];  // a local array (not `sums`, which may alias the grid): kept in registers
    for (int c = 0; c < kChannelBlock; ++c) t[c] = acc(0);
    for (index_t k = 0; k < V; ++k) {
      const acc wk = bary[i * V + k];
      const acc* row = grid + static_cast<index_t>(vertex[i * V + k]) * Cg + c0;
      for (int c = 0; c < kChannelBlock; ++c) t[c] += wk * row[c];
    }
    for (int c = 0; c < kChannelBlock; ++c) sums[c] = t[c];
  }
  // The same for the last nc < kChannelBlock channels (one pass over the point's vertices, not nc).
  SEGOPS_LATTICE_INLINE void gather_tail(index_t i, index_t c0, index_t nc, acc* sums) const {
    acc t[kChannelBlock];
    for (int c = 0; c < kChannelBlock; ++c) t[c] = acc(0);
    for (index_t k = 0; k < V; ++k)
      axpy_row(t, grid + static_cast<index_t>(vertex[i * V + k]) * Cg + c0, bary[i * V + k], nc);
    for (index_t c = 0; c < nc; ++c) sums[c] = t[c];
  }
  // Per point: the extra-channel sum and the multiplier of channel sums (kNormalize: 1 / s_extra).
  SEGOPS_LATTICE_INLINE acc prologue(index_t i, acc& s_extra) const {
    s_extra = acc(0);
    if (mode == SliceMode::kNormalize) {
      s_extra = gather_one(i, C);
      norm[i] = alpha * s_extra;
      return acc(1) / s_extra;  // > 0: every point's own splat reaches its vertices with positive mass
    }
    if (mode == SliceMode::kAffine && coef_extra) s_extra = gather_one(i, C);
    return alpha;
  }
  // kAffine: out = on_sum s + on_extra s_extra, on_sum = alpha scale_a coef[b, c, 0], on_extra = alpha coef[b, c, 1].
  SEGOPS_LATTICE_INLINE void affine(index_t b, index_t c, acc& on_sum, acc& on_extra) const {
    const double* bc = coef + (b * C + c) * 2;
    on_sum = static_cast<acc>(static_cast<double>(alpha) * scale_a * bc[0]);
    on_extra = coef_extra ? static_cast<acc>(static_cast<double>(alpha) * bc[1]) : acc(0);
  }
  SEGOPS_LATTICE_INLINE scalar_t finish(index_t b, index_t c, acc s, acc mul, acc s_extra) const {
    if (mode != SliceMode::kAffine) return static_cast<scalar_t>(s * mul);
    acc on_sum, on_extra;
    affine(b, c, on_sum, on_extra);
    return static_cast<scalar_t>(on_sum * s + on_extra * s_extra);
  }

  SEGOPS_LATTICE_INLINE void operator()(index_t i) const {
    const index_t b = i / N, n = i - b * N;
    acc s_extra;
    const acc mul = prologue(i, s_extra);
    scalar_t* o = out + b * osb + n * osn;
    index_t c0 = 0;
    for (; c0 + kChannelBlock <= C; c0 += kChannelBlock) {
      acc sums[kChannelBlock];
      gather_block(i, c0, sums);
      for (int c = 0; c < kChannelBlock; ++c) o[(c0 + c) * osc] = finish(b, c0 + c, sums[c], mul, s_extra);
    }
    if (c0 < C) {
      acc sums[kChannelBlock];
      gather_tail(i, c0, C - c0, sums);
      for (index_t c = 0; c0 + c < C; ++c) o[(c0 + c) * osc] = finish(b, c0 + c, sums[c], mul, s_extra);
    }
  }

#if !defined(__CUDACC__)
  // Point i's sums over its vertices of W 8-float pieces of their rows, in registers, then stored to `row`:
  // the same products and sums in the same order as axpy_row into a zeroed row (whose read-modify-writes of
  // the row, one per vertex, chained each point's sums through store-to-load forwarding: 58% of the slice's
  // samples sat on that store).
  template <int W>
  SEGOPS_LATTICE_INLINE void gather_pieces(index_t i, float* row) const {
    cpu::v8 t[W];
    for (int j = 0; j < W; ++j) t[j] = cpu::splat8(0.f);
    for (index_t k = 0; k < V; ++k) {
      const cpu::v8 w = cpu::splat8(bary[i * V + k]);
      const float* g = reinterpret_cast<const float*>(grid) + static_cast<index_t>(vertex[i * V + k]) * Cg;
      for (int j = 0; j < W; ++j) t[j] += w * cpu::load8(g + 8 * j);
    }
    for (int j = 0; j < W; ++j) cpu::store8(row + 8 * j, t[j]);
  }

  // up_w > 0: the block's points n0 .. n0 + np of image b, channel c (values on_sum col[p Cpad] + on_extra
  // extras[p]), written to their 2 x 2 blocks of the full-resolution plane. Per value the operations of the
  // separate ops it replaces, in their order: the slice's value in scalar_t, times the mask (the multiply's
  // backward), then scalar_t(acc(0.25) * v) (the resize's backward): the same bits.
  SEGOPS_LATTICE_INLINE void write_up(index_t b, index_t c, index_t n0, index_t np, const acc* col, index_t Cpad,
                                      acc on_sum, acc on_extra, const acc* extras) const {
    const index_t Wo = up_w / 2, Ho = up_h / 2;
    scalar_t* plane = out + b * osb + c * osc;
    const scalar_t* m = mask != nullptr ? mask + b * N : nullptr;
    auto value = [&](index_t p) SEGOPS_LAMBDA_INLINE {
      scalar_t v = static_cast<scalar_t>(on_sum * col[p * Cpad] + on_extra * extras[p]);
      if (m != nullptr) v = v * m[n0 + p];
      return static_cast<scalar_t>(acc(0.25) * static_cast<acc>(v));
    };
    for (index_t p = 0; p < np;) {
      const index_t n = n0 + p, i = n / Wo, j0 = n - i * Wo, run = std::min(np - p, Wo - j0);
      scalar_t* r0 = plane + 2 * i * up_w;
      scalar_t* r1 = r0 + up_w;
      index_t q = 0;
#if defined(__SSE__)
      if constexpr (std::is_same_v<scalar_t, float>) {
        // rows of a multiple of 4 floats: an even column's pair of points fills 16 aligned bytes of both rows
        if (stream && up_w % 4 == 0 && (reinterpret_cast<uintptr_t>(plane) & 15) == 0) {
          if (j0 % 2 == 1 && run > 0) {
            const float e = value(p);
            r0[2 * j0] = r0[2 * j0 + 1] = r1[2 * j0] = r1[2 * j0 + 1] = e;
            q = 1;
          }
          for (; q + 2 <= run; q += 2) {
            const float e0 = value(p + q), e1 = value(p + q + 1);
            const __m128 v = _mm_setr_ps(e0, e0, e1, e1);
            _mm_stream_ps(r0 + 2 * (j0 + q), v);
            _mm_stream_ps(r1 + 2 * (j0 + q), v);
          }
        }
      }
#endif
      for (; q < run; ++q) {
        const index_t j = j0 + q;
        const scalar_t e = value(p + q);
        r0[2 * j] = e;
        r0[2 * j + 1] = e;
        r1[2 * j] = e;
        r1[2 * j + 1] = e;
      }
      if (j0 + run == Wo && up_w % 2 == 1) r0[up_w - 1] = r1[up_w - 1] = scalar_t(0);
      if (i == Ho - 1 && up_h % 2 == 1) {  // the trailing odd row under this run (and its odd column)
        scalar_t* z = r1 + up_w;
        for (index_t k = 2 * j0; k < 2 * (j0 + run); ++k) z[k] = scalar_t(0);
        if (j0 + run == Wo && up_w % 2 == 1) z[up_w - 1] = scalar_t(0);
      }
      p += run;
    }
  }

  // CPU: blocks of kPoints points; the sums of a block go through a small buffer so that the output is
  // written one channel plane at a time, in runs of kPoints values (writing the C planes of one point at a
  // stride of N values defeats the hardware prefetchers and maps every store of a point to one cache set).
  SEGOPS_LATTICE_INLINE void run_range(index_t begin, index_t end) const {
    constexpr index_t kPoints = 256;
    const index_t Cpad = (C + kChannelBlock - 1) / kChannelBlock * kChannelBlock;
    // columns per grid row read: all Cpad of a buffer row where the grid's rows are that wide (the columns past
    // C land in buffer columns that are never written out), else C
    const index_t Cw = Cpad <= Cg ? Cpad : C;
    std::vector<acc> buf(static_cast<size_t>(kPoints * Cpad));
    std::vector<acc> muls(kPoints), extras(kPoints);
    for (index_t i0 = begin; i0 < end;) {
      const index_t b = i0 / N, n0 = i0 - b * N;
      const index_t np = std::min<index_t>({kPoints, end - i0, N - n0});  // a block stays in one image
      for (index_t p = 0; p < np; ++p) {
        const index_t i = i0 + p;
        muls[p] = prologue(i, extras[p]);
        acc* row = buf.data() + p * Cpad;  // the same sums as gather_block, all C channels per vertex row
        if constexpr (std::is_same_v<acc, float>) {
          switch (Cw % 8 == 0 ? Cw / 8 : 0) {  // whole 8-float pieces: the sums in registers
            case 1: gather_pieces<1>(i, row); continue;
            case 2: gather_pieces<2>(i, row); continue;
            case 3: gather_pieces<3>(i, row); continue;
            case 4: gather_pieces<4>(i, row); continue;
            default: break;
          }
        }
        for (index_t c = 0; c < Cw; ++c) row[c] = acc(0);
        for (index_t k = 0; k < V; ++k)
          axpy_row(row, grid + static_cast<index_t>(vertex[i * V + k]) * Cg, bary[i * V + k], Cw);
      }
      for (index_t c = 0; c < C; ++c) {
        scalar_t* o = out + b * osb + c * osc + n0 * osn;
        const acc* col = buf.data() + c;
        if (mode == SliceMode::kAffine) {
          acc on_sum, on_extra;
          affine(b, c, on_sum, on_extra);
          if (up_w > 0) {
            write_up(b, c, n0, np, col, Cpad, on_sum, on_extra, extras.data());
            continue;
          }
#if defined(__SSE__)
          if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<acc, float>) {
            if (stream && osn == 1 && np % 4 == 0 && (reinterpret_cast<uintptr_t>(o) & 15) == 0) {
              // The same value per point as the loop below, four at a time past the caches (no read of the
              // output's lines before they are written)
              for (index_t p = 0; p < np; p += 4) {
                float v[4];
                for (int q = 0; q < 4; ++q) v[q] = on_sum * col[(p + q) * Cpad] + on_extra * extras[p + q];
                _mm_stream_ps(o + p, _mm_loadu_ps(v));
              }
              continue;
            }
          }
#endif
          for (index_t p = 0; p < np; ++p)
            o[p * osn] = static_cast<scalar_t>(on_sum * col[p * Cpad] + on_extra * extras[p]);
        } else {
          for (index_t p = 0; p < np; ++p) o[p * osn] = static_cast<scalar_t>(col[p * Cpad] * muls[p]);
        }
      }
      i0 += np;
    }
#if defined(__SSE__)
    if (stream) _mm_sfence();  // the streamed lines are visible before the range counts as done
#endif
  }
#endif
};

// Rows of Cg floats into rows of Cp >= Cg, the padding zero (one row per item).
struct PadRows {
  const float* src;
  float* dst;
  index_t Cg, Cp;
  SEGOPS_HD_INLINE void operator()(index_t v) const {
    for (index_t c = 0; c < Cp; ++c) dst[v * Cp + c] = c < Cg ? src[v * Cg + c] : 0.f;
  }
};

// ---- vertex-domain quadratic forms ----------------------------------------------------------------------
// For x = S^T... in the vertex domain: <x_k, W y> = alpha <G_k, blur(G_y)> with G the splatted values, since
// the slice is alpha times the splat's transpose. Per (image b, channel k, chunk of kDotChunk vertices of
// image b): partial[((b K + k) 2 + q) nchunk + chunk] = sum_v G[v, k] Y[v, k or C], q = 0 / 1; summed in
// double, in vertex order, then over chunks in chunk order: deterministic.
constexpr index_t kDotChunk = 1024;

template <typename acc>
struct VertexDots {
  const acc* G;
  const acc* Y;
  index_t Cg, K;
  bool degree;  // q = 1: against the extra channel (index K)
  const int32_t* image_start;  // (B+1)
  index_t nchunk;
  double* partial;  // (B, K, 2, nchunk)
  SEGOPS_HD_INLINE void operator()(index_t i) const {
    const index_t chunk = i % nchunk, bk = i / nchunk, b = bk / K, k = bk - b * K;
    const index_t v0 = image_start[b] + chunk * kDotChunk;
    const index_t v1 = hd_min<index_t>(static_cast<index_t>(image_start[b + 1]), v0 + kDotChunk);
    double s0 = 0, s1 = 0;
    for (index_t v = v0; v < v1; ++v) {
      const double g = static_cast<double>(G[v * Cg + k]);
      s0 += g * static_cast<double>(Y[v * Cg + k]);
      if (degree) s1 += g * static_cast<double>(Y[v * Cg + K]);
    }
    partial[(bk * 2 + 0) * nchunk + chunk] = s0;
    partial[(bk * 2 + 1) * nchunk + chunk] = s1;
  }
};

struct SumChunks {
  const double* partial;  // (n, nchunk)
  index_t nchunk;
  double alpha;
  double* out;  // (n)
  SEGOPS_HD_INLINE void operator()(index_t i) const {
    double s = 0;
    for (index_t c = 0; c < nchunk; ++c) s += partial[i * nchunk + c];
    out[i] = alpha * s;
  }
};

}  // namespace lattice
}  // namespace segops
