// Per-element math of the permutohedral lattice filter (write-once: the CPU and CUDA backends run it).
//
// The semantics are the compatibility contract of shared/DESIGN.md ("Lattice semantics"): elevation
// with inv_std_dev = sqrt(2/3)(d+1) and per-axis scale inv_std_dev / sqrt((i+1)(i+2)); the enclosing
// simplex by rounding to multiples of d+1 and ranking the remainders (ties: lower index, lower rank);
// barycentric weights; d+1 vertices keyed by their first d coordinates; splat; blur along directions
// j = 0..d with weights 1/2, 1, 1/2 (absent neighbour = 0, double-buffered); slice times
// alpha = 1 / (1 + 2^-d). No normalisation unless asked for.
//
// Data layout. E = N (d+1) "entries" per image (point n, vertex k -> entry n (d+1) + k). Each image has
// its own open-addressing hash table of int32 slots holding the image-local entry id of the entry that
// first inserted a key (-1 = empty). Keys are stored per entry (d int32 each) and written before the
// slot is published with atomic_cas. The capacity is a power of two larger than E, so an insert always
// finds its key or an empty slot: overflow is impossible. Vertices get dense int64 ids (prefix sum over
// the "entry won its slot" flags, image-major), so a vertex's C channel values are one contiguous row
// [vertex][channel].
#pragma once

#include "segops/hd.h"
#include "segops/parallel.h"

#if !defined(__CUDACC__)
#include <algorithm>
#include <vector>
#endif

namespace segops {
namespace lattice {

constexpr int kMaxD = 16;
// Elevated coordinates beyond this magnitude are rejected (keys are int32, neighbours add +-d).
constexpr double kMaxElevated = 1.0e9;

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
// add-and-subtract-2^23 (2^52) trick, which rounds in the current (nearest-even) mode without the cost
// of std::nearbyint's floating-point environment handling; values that large are integers already.
SEGOPS_HD_INLINE float round_even(float x) {
#if defined(__CUDA_ARCH__)
  return rintf(x);
#else
  const float big = 8388608.0f;  // 2^23
  const float a = std::fabs(x);
  if (!(a < big)) return x;
  volatile float t = a + big;  // volatile: keep the two roundings apart
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
  volatile double t = a + big;
  return std::copysign(t - big, x);
#endif
}

// Orders the key stores of an entry before the atomic_cas that publishes it (the host CAS is acq_rel).
SEGOPS_HD_INLINE void publish_fence() {
#if defined(__CUDA_ARCH__)
  __threadfence();
#endif
}

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
  T sm = T(0);
  for (int j = D; j >= 1; --j) {  // e_j = sum_{i>=j} c_i - j c_{j-1}, accumulated from the top (step 1)
    const T cf = mul_rn(f[(j - 1) * fs], scale[j - 1]);
    e[j] = sub_rn(sm, mul_rn(T(j), cf));
    sm = add_rn(sm, cf);
  }
  e[0] = sm;
  const T down = T(1.0 / (D + 1));
  int32_t sum = 0;
  T r[D + 1];
  for (int i = 0; i <= D; ++i) {
    if (!(e[i] < T(kMaxElevated) && e[i] > T(-kMaxElevated))) return false;  // also catches NaN
    const int32_t q = static_cast<int32_t>(round_even(mul_rn(e[i], down)));
    s.rem0[i] = q * (D + 1);
    sum += q;
    r[i] = sub_rn(e[i], T(s.rem0[i]));
    s.rank[i] = 0;
  }
  // rank_i = #{j : r_j > r_i} + #{j < i : r_j == r_i}  (step 2)
  for (int i = 0; i < D; ++i) {
    for (int j = i + 1; j <= D; ++j) {
      if (r[i] < r[j]) {
        ++s.rank[i];
      } else {
        ++s.rank[j];
      }
    }
  }
  for (int i = 0; i <= D; ++i) {
    s.rank[i] += sum;
    if (s.rank[i] < 0) {
      s.rank[i] += D + 1;
      s.rem0[i] += D + 1;
    } else if (s.rank[i] > D) {
      s.rank[i] -= D + 1;
      s.rem0[i] -= D + 1;
    }
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
  return h ^ (h >> 31);
}

// Inserts the key (hash = hash_key<D>(key)) of image-local entry `entry` (already stored at
// keys[entry * D], before this call) into the table; returns the entry id that owns the key (entry itself when it was new).
template <int D>
SEGOPS_HD_INLINE int32_t table_insert(int32_t* table, uint64_t mask, const int32_t* keys, int32_t entry,
                                      const int32_t* key, uint64_t hash) {
  uint64_t h = hash & mask;
  while (true) {
    int32_t cur = atomic_load(table + h);
    if (cur < 0) {
      cur = atomic_cas(table + h, int32_t(-1), entry);
      if (cur < 0) return entry;
    }
    if (published_key_equals<D>(keys + static_cast<index_t>(cur) * D, key)) return cur;
    h = (h + 1) & mask;
  }
}

// Read-only lookup after the build: the owning entry of `key`, or -1.
template <int D>
SEGOPS_HD_INLINE int32_t table_find(const int32_t* table, uint64_t mask, const int32_t* keys, const int32_t* key) {
  uint64_t h = hash_key<D>(key) & mask;
  while (true) {
    const int32_t cur = table[h];
    if (cur < 0) return -1;
    if (keys_equal<D>(keys + static_cast<index_t>(cur) * D, key)) return cur;
    h = (h + 1) & mask;
  }
}

// ---- phase 1: simplex + hash insert, one point per call -------------------------------------------------
// Writes bary[(b N + n)(D+1) + k] and owner[b E + n (D+1) + k] (image-local owning entry id). Keys of
// entries served by the CPU thread-local cache are never stored nor read.
// State and simplex step shared by both build functors (general keys and packed keys).
template <int D, typename T>
struct BuildBase {
  const T* feats;  // (B, D, N) strided view
  index_t fsb, fsd, fsn;
  T scale[kMaxD];
  index_t N;
  uint64_t mask;   // cap - 1
  int32_t* owner;  // (B E)
  T* bary;         // (B N, D+1)
  int32_t* bad;    // set to 1 on NaN / Inf / huge features

  // Returns false (and flags `bad`) when the features are unusable; `s` is then undefined.
  SEGOPS_HD_INLINE bool simplex(index_t i, index_t b, index_t n, Simplex<D, T>& s) const {
    if (!find_simplex<D, T>(feats + b * fsb + n * fsn, fsd, scale, s)) {
      *bad = 1;
      for (int k = 0; k <= D; ++k) {
        bary[i * (D + 1) + k] = T(0);
        owner[i * (D + 1) + k] = 0;  // any valid entry: the call errors out after the build
      }
      return false;
    }
    for (int k = 0; k <= D; ++k) bary[i * (D + 1) + k] = s.bary[k];
    return true;
  }
};

template <int D, typename T>
struct BuildPoints : BuildBase<D, T> {
  using Base = BuildBase<D, T>;
  using Base::N;
  using Base::mask;
  using Base::owner;
  using Base::simplex;
  int32_t* tables;  // (B, cap)
  int32_t* keys;    // (B E, D)

  SEGOPS_HD_INLINE void insert(index_t i, int k, const int32_t* key, uint64_t h) const {
    const index_t b = i / N, n = i - b * N;
    const index_t E = N * (D + 1);
    const int32_t entry = static_cast<int32_t>(n * (D + 1) + k);
    int32_t* image_keys = keys + b * E * D;
    for (int c = 0; c < D; ++c) image_keys[static_cast<index_t>(entry) * D + c] = key[c];
    publish_fence();
    owner[i * (D + 1) + k] =
        table_insert<D>(tables + b * (static_cast<index_t>(mask) + 1), mask, image_keys, entry, key, h);
  }

  SEGOPS_HD_INLINE void operator()(index_t i) const {
    Simplex<D, T> s;
    const index_t b = i / N;
    if (!simplex(i, b, i - b * N, s)) return;
    int32_t key[D];
    for (int k = 0; k <= D; ++k) {
      vertex_key<D, T>(s, k, key);
      insert(i, k, key, hash_key<D>(key));
    }
  }

#if !defined(__CUDACC__)
  // CPU: points [begin, end) in order, with a small direct-mapped thread-local cache key -> owner in
  // front of the shared table (neighbouring pixels share most vertices): a hit costs no table probe,
  // no key store and no atomic. The owners come from the table either way, so results are unchanged.
  void run_range(index_t begin, index_t end) const {
    constexpr int kCache = 4096;
    struct Slot {
      int32_t owner;
      int32_t key[D];
    };
    std::vector<Slot> cache_storage(kCache);
    Slot* cache = cache_storage.data();
    Simplex<D, T> s;
    int32_t key[D];
    index_t cache_b = -1;
    index_t b = begin / N, n = begin - b * N;
    for (index_t i = begin; i < end; ++i, ++n) {
      if (n == N) {
        n = 0;
        ++b;
      }
      if (b != cache_b) {  // owners are image-local
        for (int c = 0; c < kCache; ++c) cache[c].owner = -1;
        cache_b = b;
      }
      if (!simplex(i, b, n, s)) continue;
      for (int k = 0; k <= D; ++k) {
        vertex_key<D, T>(s, k, key);
        const uint64_t h = hash_key<D>(key);
        Slot& slot = cache[(h >> 40) & (kCache - 1)];
        if (slot.owner >= 0 && keys_equal<D>(slot.key, key)) {
          owner[i * (D + 1) + k] = slot.owner;
          continue;
        }
        insert(i, k, key, h);
        slot.owner = owner[i * (D + 1) + k];
        for (int c = 0; c < D; ++c) slot.key[c] = key[c];
      }
    }
  }
#endif
};

// ---- phase 1, packed variant: keys packed into one int64 ---------------------------------------------
// When the host's bound on the key coordinates (from the feature ranges) fits in 63 bits, a key is one
// int64 code = sum_i (key_i - lo_i) << shift_i, stored in the table slot itself (-1 = empty): no key
// array, one compare per probe. A vertex is then identified by its slot; owner[g] = slot index.
template <int D>
struct KeyPacking {
  int32_t lo[kMaxD];
  int32_t shift[kMaxD];
  int32_t bits[kMaxD];
  SEGOPS_HD_INLINE int64_t pack(const int32_t* key) const {
    uint64_t code = 0;
    for (int i = 0; i < D; ++i) code |= static_cast<uint64_t>(key[i] - lo[i]) << shift[i];
    return static_cast<int64_t>(code);
  }
  SEGOPS_HD_INLINE void unpack(int64_t code, int32_t* key) const {
    const uint64_t c = static_cast<uint64_t>(code);
    for (int i = 0; i < D; ++i)
      key[i] = static_cast<int32_t>((c >> shift[i]) & ((uint64_t(1) << bits[i]) - 1)) + lo[i];
  }
};

SEGOPS_HD_INLINE uint64_t hash_code(int64_t code) {
  uint64_t h = static_cast<uint64_t>(code) * 0x9E3779B97F4A7C15ull;
  return h ^ (h >> 29);
}

// Returns the slot holding `code` (inserting it when absent). The capacity exceeds the number of
// entries, so a free slot always exists.
SEGOPS_HD_INLINE int32_t packed_insert(int64_t* table, uint64_t mask, int64_t code, uint64_t hash) {
  uint64_t h = hash & mask;
  while (true) {
    int64_t cur = atomic_load(table + h);
    if (cur == -1) {
      cur = atomic_cas(table + h, int64_t(-1), code);
      if (cur == -1) return static_cast<int32_t>(h);
    }
    if (cur == code) return static_cast<int32_t>(h);
    h = (h + 1) & mask;
  }
}

template <int D, typename T>
struct BuildPacked : BuildBase<D, T> {  // owner holds the slot of each entry's vertex
  using Base = BuildBase<D, T>;
  using Base::N;
  using Base::mask;
  using Base::owner;
  using Base::simplex;
  KeyPacking<D> pk;
  int64_t* tables;  // (B, cap)

  SEGOPS_HD_INLINE int64_t code(const Simplex<D, T>& s, int k) const {
    int32_t key[D];
    vertex_key<D, T>(s, k, key);
    return pk.pack(key);
  }

  SEGOPS_HD_INLINE void operator()(index_t i) const {
    Simplex<D, T> s;
    const index_t b = i / N;
    if (!simplex(i, b, i - b * N, s)) return;
    int64_t* table = tables + b * (static_cast<index_t>(mask) + 1);
    for (int k = 0; k <= D; ++k) {
      const int64_t c = code(s, k);
      owner[i * (D + 1) + k] = packed_insert(table, mask, c, hash_code(c));
    }
  }

#if !defined(__CUDACC__)
  // CPU: as BuildPoints::run_range, with a thread-local direct-mapped cache code -> slot.
  void run_range(index_t begin, index_t end) const {
    constexpr int kCache = 4096;
    std::vector<int64_t> cache_code(kCache);
    std::vector<int32_t> cache_slot(kCache);
    Simplex<D, T> s;
    index_t cache_b = -1;
    int64_t* table = nullptr;
    index_t b = begin / N, n = begin - b * N;
    for (index_t i = begin; i < end; ++i, ++n) {
      if (n == N) {
        n = 0;
        ++b;
      }
      if (b != cache_b) {
        std::fill(cache_code.begin(), cache_code.end(), int64_t(-1));
        cache_b = b;
        table = tables + b * (static_cast<index_t>(mask) + 1);
      }
      if (!simplex(i, b, n, s)) continue;
      for (int k = 0; k <= D; ++k) {
        const int64_t c = code(s, k);
        const uint64_t h = hash_code(c);
        const int slot = static_cast<int>((h >> 40) & (kCache - 1));
        if (cache_code[slot] == c) {
          owner[i * (D + 1) + k] = cache_slot[slot];
          continue;
        }
        const int32_t o = packed_insert(table, mask, c, h);
        owner[i * (D + 1) + k] = o;
        cache_code[slot] = c;
        cache_slot[slot] = o;
      }
    }
  }
#endif
};

// Packed variant of phase 2: flags over the table slots (image's), then vertex ids and keys.
struct MarkSlots {
  const int64_t* table;
  int32_t* flag;
  SEGOPS_HD_INLINE void operator()(index_t h) const { flag[h] = table[h] != -1 ? 1 : 0; }
};

template <int D>
struct SlotKeys {
  const int64_t* table;  // image's (cap)
  const int64_t* incl;   // image's (cap)
  KeyPacking<D> pk;
  int32_t image;
  int32_t* vkeys;  // batch's (M, D+1)
  SEGOPS_HD_INLINE void operator()(index_t h) const {
    if (table[h] == -1) return;
    int32_t* vk = vkeys + (incl[h] - 1) * (D + 1);
    vk[0] = image;
    pk.unpack(table[h], vk + 1);
  }
};

struct AssignPacked {
  const int32_t* owner;  // image's (E): slot ids
  const int64_t* incl;   // image's (cap)
  int64_t* vertex;       // image's (E)
  SEGOPS_HD_INLINE void operator()(index_t l) const { vertex[l] = incl[owner[l]] - 1; }
};

// ---- phase 2: dense vertex ids (one image per launch: no index division) -------------------------------
// flag[l] = 1 when image-local entry l owns its key.
struct MarkOwners {
  const int32_t* owner;  // image's (E)
  int32_t* flag;         // image's (E)
  SEGOPS_HD_INLINE void operator()(index_t l) const { flag[l] = owner[l] == l ? 1 : 0; }
};

// With incl = inclusive prefix sum of the flags over the batch: vertex[l] = dense id of the owner of
// entry l; each owner also writes its vertex's key, prefixed by the image index, into vkeys (M, D+1).
template <int D>
struct AssignVertices {
  const int32_t* owner;  // image's (E)
  const int64_t* incl;   // image's (E)
  const int32_t* keys;   // image's (E, D)
  int32_t image;
  int64_t* vertex;  // image's (E)
  int32_t* vkeys;   // batch's (M, D+1)
  SEGOPS_HD_INLINE void operator()(index_t l) const {
    const int32_t o = owner[l];
    vertex[l] = incl[o] - 1;
    if (o == l) {
      int32_t* vk = vkeys + (incl[l] - 1) * (D + 1);
      vk[0] = image;
      for (int i = 0; i < D; ++i) vk[i + 1] = keys[l * D + i];
    }
  }
};

// The compact vertex table: (image, key) -> dense vertex id, all keys distinct; small enough to stay in
// cache for the neighbour search (the build table holds up to N (d+1) entries, this one M).
template <int D>
struct InsertVertices {
  int32_t* table;
  uint64_t mask;
  const int32_t* vkeys;  // (M, D+1), written before this launch
  SEGOPS_HD_INLINE void operator()(index_t v) const {
    const int32_t* key = vkeys + v * (D + 1);
    table_insert<D + 1>(table, mask, vkeys, static_cast<int32_t>(v), key, hash_key<D + 1>(key));
  }
};

// ---- phase 3: blur neighbours, one vertex per call -----------------------------------------------------
// nbr[(v (D+1) + j) 2 + 0] = vertex at key - 1 (+ D + 1 in coordinate j), [.. + 1] = key + 1 (- D - 1 in
// coordinate j); -1 when absent. For j = D only the implicit last coordinate takes the +-(D+1).
template <int D>
struct FindNeighbors {
  const int32_t* table;
  uint64_t mask;
  const int32_t* vkeys;  // (M, D+1)
  int64_t* nbr;          // (M, D+1, 2)
  SEGOPS_HD_INLINE void operator()(index_t v) const {
    const int32_t* key = vkeys + v * (D + 1);
    int32_t lo[D + 1], hi[D + 1];
    for (int j = 0; j <= D; ++j) {
      lo[0] = hi[0] = key[0];
      for (int i = 1; i <= D; ++i) {
        lo[i] = key[i] - 1;
        hi[i] = key[i] + 1;
      }
      if (j < D) {
        lo[j + 1] = key[j + 1] + D;
        hi[j + 1] = key[j + 1] - D;
      }
      nbr[(v * (D + 1) + j) * 2 + 0] = table_find<D + 1>(table, mask, vkeys, lo);
      nbr[(v * (D + 1) + j) * 2 + 1] = table_find<D + 1>(table, mask, vkeys, hi);
    }
  }
};

// ---- splat / blur / slice over C channels (+1 implicit "ones" channel when computing W 1) --------------
// Vertex values: (M, Cv) accumulators, Cv = C + has_ones. Points: values (B, C, N) strided.

constexpr int kChannelBlock = 8;

// CUDA splat: one point per call, float atomics (order-dependent rounding).
template <typename scalar_t, typename acc>
struct SplatAtomic {
  const scalar_t* values;
  index_t vsb, vsc, vsn;
  const acc* prescale;  // (B N) or nullptr: the value splatted is values * prescale
  index_t N, C, Cv, V;  // V = d+1 vertices per point
  bool ones;            // splat 1 into channel C
  const int64_t* vertex;
  const acc* bary;
  acc* grid;  // (M, Cv)
  SEGOPS_HD_INLINE void operator()(index_t i) const {
    const index_t b = i / N, n = i - b * N;
    const scalar_t* x = values + b * vsb + n * vsn;
    const acc ps = prescale ? prescale[i] : acc(1);
    for (index_t k = 0; k < V; ++k) {
      const acc w = bary[i * V + k];
      acc* row = grid + vertex[i * V + k] * Cv;
      for (index_t c = 0; c < C; ++c) atomic_add(row + c, w * (static_cast<acc>(x[c * vsc]) * ps));
      if (ones) atomic_add(row + C, w);
    }
  }
};

// Blur along direction j: out[v] = in[v] + 1/2 (in[v-] + in[v+]); one vertex per call.
template <typename acc>
struct BlurDirection {
  const acc* in;
  acc* out;
  const int64_t* nbr;
  index_t Cv, V, j;
  SEGOPS_HD_INLINE void operator()(index_t v) const {
    const int64_t a = nbr[(v * V + j) * 2 + 0], c = nbr[(v * V + j) * 2 + 1];
    const acc* self = in + v * Cv;
    acc* o = out + v * Cv;
    const acc half = acc(0.5);
    if (a >= 0 && c >= 0) {
      const acc* pa = in + a * Cv;
      const acc* pc = in + c * Cv;
      for (index_t ch = 0; ch < Cv; ++ch) o[ch] = self[ch] + half * (pa[ch] + pc[ch]);
    } else if (a >= 0) {
      const acc* pa = in + a * Cv;
      for (index_t ch = 0; ch < Cv; ++ch) o[ch] = self[ch] + half * pa[ch];
    } else if (c >= 0) {
      const acc* pc = in + c * Cv;
      for (index_t ch = 0; ch < Cv; ++ch) o[ch] = self[ch] + half * pc[ch];
    } else {
      for (index_t ch = 0; ch < Cv; ++ch) o[ch] = self[ch];
    }
  }
};

// Slice one point: out[c] = alpha sum_k b_k grid[v_k][c]; with `ones`, out[c] = (W x)_c / (W 1) and
// norm[i] = alpha sum_k b_k grid[v_k][C] (= W 1).
template <typename scalar_t, typename acc>
struct Slice {
  const acc* grid;
  index_t N, C, Cv, V;
  bool ones;
  acc alpha;
  const int64_t* vertex;
  const acc* bary;
  scalar_t* out;  // (B, C, N) strided
  index_t osb, osc, osn;
  acc* norm;  // (B N) when ones
  SEGOPS_HD_INLINE void operator()(index_t i) const {
    const index_t b = i / N;
    point(i, b, i - b * N);
  }
#if !defined(__CUDACC__)
  void run_range(index_t begin, index_t end) const {  // CPU: no index division per point
    index_t b = begin / N, n = begin - b * N;
    for (index_t i = begin; i < end; ++i, ++n) {
      if (n == N) {
        n = 0;
        ++b;
      }
      point(i, b, n);
    }
  }
#endif
  SEGOPS_HD_INLINE void point(index_t i, index_t b, index_t n) const {
    scalar_t* o = out + b * osb + n * osn;
    acc scale = alpha;
    if (ones) {
      acc t = acc(0);
      for (index_t k = 0; k < V; ++k) t += bary[i * V + k] * grid[vertex[i * V + k] * Cv + C];
      norm[i] = alpha * t;
      scale = acc(1) / t;  // t > 0: every point's own splat reaches its vertices with positive mass
    }
    const acc* w = bary + i * V;
    const int64_t* vi = vertex + i * V;
    // Blocks of 8 channels with a fixed trip count: the 8 sums stay in registers across the d+1 rows.
    index_t c0 = 0;
    for (; c0 + kChannelBlock <= C; c0 += kChannelBlock) {
      acc sums[kChannelBlock];
      for (int c = 0; c < kChannelBlock; ++c) sums[c] = acc(0);
      for (index_t k = 0; k < V; ++k) {
        const acc wk = w[k];
        const acc* row = grid + vi[k] * Cv + c0;
        for (int c = 0; c < kChannelBlock; ++c) sums[c] += wk * row[c];
      }
      for (int c = 0; c < kChannelBlock; ++c) o[(c0 + c) * osc] = static_cast<scalar_t>(sums[c] * scale);
    }
    for (; c0 < C; ++c0) {
      acc t = acc(0);
      for (index_t k = 0; k < V; ++k) t += w[k] * grid[vi[k] * Cv + c0];
      o[c0 * osc] = static_cast<scalar_t>(t * scale);
    }
  }
};

}  // namespace lattice
}  // namespace segops
