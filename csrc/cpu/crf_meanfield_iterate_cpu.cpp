// CPU schedule of no-grad dense CRF mean-field inference with Potts kernels: all iterations in one op.
//
// The op-by-op schedule (splat -> blur -> slice per kernel, then the update) streams the (B, K, N)
// marginals and messages through memory five times per iteration, each read as K planes N floats apart.
// Here one pass over the points does, per point and all in registers: the point's unary row, the slice of
// every kernel's blurred vertex values, the softmax, and the splat of the new marginals (times the kernel's
// pre-scale) into each kernel's next vertex grid. The unary is transposed once to point-major rows; only
// the last pass writes marginals to memory.
//
// The operations are the op-by-op schedule's, element by element (same products and sums in the same order,
// exp_poly), except that the slice's factor alpha is folded into the kernel's weight (one scalar product per
// point instead of K vector lanes), the AVX2 and AVX-512 builds fuse each multiply and the add it feeds into one
// FMA (one rounding instead of two: ~10% less time), and for two kinds of sums: the softmax's max (exact in any
// order) and denominator, taken as a tree over 8-lane pieces (so the AVX-512 clone, with 16-lane vectors, gives
// the AVX2 clone's bits), and, for large inputs, the splats: the points are split into S fixed
// chunks of blocks per image (S = 1..4 from the input's sizes, never from the number of threads), chunk c of
// every image splats into grid c in point order, and the grids are added in chunk order. So results do not
// depend on the number of threads; the B S chunks run in parallel. Denormal values are flushed to zero (FlushDenormals).
#include <torch/library.h>

#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
#endif
#include <vector>

#include "segops/cpu_alloc.h"
#include "segops/crf_iterate_shared.h"
#include "segops/cpu_v8.h"
#include "segops/crf_meanfield_math.h"
#include "segops/permutohedral_host.h"
#include "segops/softmax_losses_block.h"

namespace segops {
namespace {

using at::Tensor;

// Classes are processed in pieces of 8 floats; rows (unary, vertex values, marginals) hold Kp = 8 C8 floats
// with zero pad columns. C8 <= kMaxPieces, i.e. K <= 64 (more classes use the op-by-op schedule).
constexpr int kMaxPieces = 8;
static_assert(8 * kMaxPieces == meanfield::kIterateMaxClasses, "the pass's pieces cover the op's class limit");
constexpr int64_t kPoints = 128;  // points per block (one image's consecutive pixels)
constexpr int kGroup = 4;         // points whose marginals are computed together
constexpr int kMaxChunks = 4;     // splat chunks (see iterate_cpu)
// Every pass streams the unary's point-major rows from memory (25 MB at 512², K = 21: more than the caches keep
// from one pass to the next). The hardware prefetchers alone left the pass waiting on them, so each group of
// points requests the rows kAhead points on. On the 2-core VM, 512², K = 21, 5 iterations, one thread: 7% less
// time when its memory was fast, 23% when slow. (Prefetching the vertex ids and weights as well, or the grid rows
// the points gather and splat, gained nothing more.)
constexpr int64_t kAhead = 32;

using cpu::load8;
using cpu::splat8;
using cpu::store8;
using cpu::transpose8;
using cpu::v8;
typedef int32_t vi8 __attribute__((vector_size(32)));

// block::exp_poly on the lanes of V (8 or 16 floats; VI the int32 vector of the same width) for arguments <= 88:
// the same operations, so the same values lane by lane.
template <typename V, typename VI>
SEGOPS_LATTICE_INLINE V exp_lanes(V x) {
  const auto c = [](float v) { return V{} + v; };
  // The pass's arguments l - max(l) are <= 0 (or NaN, which passes through either way): only the lower clamp.
  // The upper clamp never applied, so dropping it changes no value; together with alpha folded into the weight,
  // the iterate op took 0.962x the time (median of 5 alternated pairs).
  x = x < c(-87.0f) ? c(-87.0f) : x;
  const V magic = c(12582912.0f);
  const V t = x * c(1.44269504088896341f) + magic;
  const V n = t - magic;
  const V r = (x - n * c(0.693145751953125f)) - n * c(1.428606765330187045e-06f);
  V p = c(1.0f / 720.0f);
  p = p * r + c(1.0f / 120.0f);
  p = p * r + c(1.0f / 24.0f);
  p = p * r + c(1.0f / 6.0f);
  p = p * r + c(0.5f);
  p = p * r + c(1.0f);
  p = p * r + c(1.0f);
  const VI bits = (__builtin_convertvector(n, VI) + 127) << 23;
  V scale;
  __builtin_memcpy(&scale, &bits, sizeof(V));
  return p * scale;
}
SEGOPS_LATTICE_INLINE v8 exp8(v8 x) { return exp_lanes<v8, vi8>(x); }

// The max / the sum of the 8 lanes as a fixed tree: lanes i and i + 4, then pairs 2 apart, then neighbours
// (written on 4-lane halves: cheap shuffles on SSE2 and AVX2 alike). The same result every call.
typedef float v4 __attribute__((vector_size(16)));
typedef int32_t vi4 __attribute__((vector_size(16)));
SEGOPS_LATTICE_INLINE void halves(v8 x, v4& lo, v4& hi) {
  __builtin_memcpy(&lo, &x, sizeof(v4));
  __builtin_memcpy(&hi, reinterpret_cast<const char*>(&x) + sizeof(v4), sizeof(v4));
}
SEGOPS_LATTICE_INLINE float hmax8(v8 x) {
  v4 a, b;
  halves(x, a, b);
  a = a > b ? a : b;
  b = __builtin_shuffle(a, vi4{2, 3, 0, 1});
  a = a > b ? a : b;
  b = __builtin_shuffle(a, vi4{1, 0, 3, 2});
  a = a > b ? a : b;
  return a[0];
}
SEGOPS_LATTICE_INLINE float hsum8(v8 x) {
  v4 a, b;
  halves(x, a, b);
  a = a + b;
  a = a + __builtin_shuffle(a, vi4{2, 3, 0, 1});
  a = a + __builtin_shuffle(a, vi4{1, 0, 3, 2});
  return a[0];
}

struct BlurLaunch {
  template <typename F>
  static void launch(index_t n, const F& f, index_t grain) {
    cpu_parallel_for(n, f, grain);
  }
  template <typename F>
  static void ranged(index_t n, const F& f, index_t grain) {  // the degrees' one-channel blur: no clone needed
    cpu_parallel_for(n, f, grain);
  }
  static bool blur_per_channel() { return false; }
};

// The unary's point-major rows, the op's largest buffer (25 MB at 512², K = 21), sit on transparent huge pages
// (segops/cpu_alloc.h), which also makes the passes read them with fewer TLB misses (the one-thread pass: 74 vs
// 83 ms at 512², K = 21), and are kept for the next call (CachedScratch: faulting a fresh buffer in took 1-89 ms
// per call on the 2-core VM, next to ~100 ms for the whole inference).
struct UnaryRowsTag {};
using RowsCache = CachedScratch<UnaryRowsTag>;

// One Potts kernel: its lattice, normalisation scales and weight; the grids of the current pass.
struct Term {
  const int32_t* vertex;  // (Bt N V), Bt = B or 1 (shared: one lattice for every image)
  const float* bary;      // (Bt N V)
  int64_t V = 0, M = 0, Cg = 0;
  bool shared = false;  // grid columns (B Kp): image b's classes at column b Kp
  const float* pre = nullptr;   // (Bt N): multiplies the marginals before the splat, or null
  const float* post = nullptr;  // (Bt N): multiplies the filtered marginals, or null
  float weight = 0.f;
  float alpha = 0.f;               // the lattice's slice factor 1 / (1 + 2^-d)
  const float* blurred = nullptr;  // (M, Cg): W's vertex values of the previous marginals
  float* grid = nullptr;           // (M, Cg), zeroed: the splat of this pass's marginals (chunk 0)
  float* extra[kMaxChunks - 1] = {};  // the same for chunks 1 .. S-1, added into grid after the pass
  // The vertex rows [lo, hi) that chunk c's points touch in any image (ids number vertices in order of first
  // appearance, so a chunk of an image's rows touches about one band of them: 52% of the rows of chunks 1 .. 3
  // on a 512² photo). Only these rows of extra grid c are ever nonzero: zeroed and added.
  int64_t extra_lo[kMaxChunks - 1] = {}, extra_hi[kMaxChunks - 1] = {};

  float* grid_of(int chunk) const { return chunk == 0 ? grid : extra[chunk - 1]; }
};

struct Pass {
  const float* unary = nullptr;  // (B N, Kp) point-major, pad columns 0
  float* out = nullptr;          // (B, K, N), last pass only
  int64_t B = 0, K = 0, N = 0, Kp = 0;
  Term terms[meanfield::kMaxTerms];
  int count = 0;
  int chunks = 1;      // S
  bool slice = false;  // false in the first pass: softmax(-unary)
  bool last = false;

  int64_t point(const Term& t, int64_t b, int64_t n) const { return (t.shared ? 0 : b * N) + n; }
  int64_t entry(const Term& t, int64_t b, int64_t n) const { return point(t, b, n) * t.V; }
  int64_t column(const Term& t, int64_t b) const { return t.shared ? b * Kp : 0; }
};

// A point's K marginals (Kp = 8 C8 floats, zero pad lanes) in registers, and the per-lane operations of the pass
// on them, in two layouts with the same arithmetic lane by lane: Pieces8 (C8 vectors of 8 floats: the baseline and
// AVX2 builds) and, in the AVX-512 clone, Pieces16 ((C8 + 1) / 2 vectors of 16; when C8 is odd the last one
// moves only its low 8 lanes to and from memory). Every horizontal step is written on the 8-lane pieces in the same order in both
// (the max is exact in any order; the denominator adds the 8-lane pieces in order, then the fixed hsum8 tree),
// so the two layouts give the same bits.
template <int C8>
struct Pieces8 {
  struct Q {
    v8 p[C8];
  };
  static SEGOPS_LATTICE_INLINE void load_neg(const float* src, Q& q) {
    for (int c = 0; c < C8; ++c) q.p[c] = -load8(src + 8 * c);
  }
  static SEGOPS_LATTICE_INLINE void zero(Q& q) {
    for (int c = 0; c < C8; ++c) q.p[c] = splat8(0.f);
  }
  static SEGOPS_LATTICE_INLINE void add_scaled_row(Q& s, float w, const float* row) {  // s += w * row
    for (int c = 0; c < C8; ++c) s.p[c] += w * load8(row + 8 * c);
  }
  static SEGOPS_LATTICE_INLINE void add_term(Q& l, float w, const Q& s) {  // l += w s
    for (int c = 0; c < C8; ++c) l.p[c] += w * s.p[c];
  }
  // pad lanes (>= K) to -inf; the lane-wise max of every piece as one 8-lane vector
  static SEGOPS_LATTICE_INLINE v8 mask_and_max(Q& l, int64_t K) {
    const vi8 lane = {0, 1, 2, 3, 4, 5, 6, 7};
    const vi8 live = lane < static_cast<int>(K - 8 * (C8 - 1));
    l.p[C8 - 1] = live ? l.p[C8 - 1] : splat8(-INFINITY);
    v8 mv = l.p[0];
    for (int c = 1; c < C8; ++c) mv = mv > l.p[c] ? mv : l.p[c];
    return mv;
  }
  // q = exp8(l - m) with pad lanes 0; returns the pieces' sum in order
  static SEGOPS_LATTICE_INLINE v8 exp_and_sum(const Q& l, float m, int64_t K, Q& q) {
    const vi8 lane = {0, 1, 2, 3, 4, 5, 6, 7};
    const vi8 live = lane < static_cast<int>(K - 8 * (C8 - 1));
    v8 sv = splat8(0.f);
    for (int c = 0; c < C8; ++c) {
      q.p[c] = exp8(l.p[c] - splat8(m));
      if (c == C8 - 1) q.p[c] = live ? q.p[c] : splat8(0.f);
      sv += q.p[c];
    }
    return sv;
  }
  // exp_and_sum for points g and g + 1 (their sums' hsum8 into total[0], total[1])
  static SEGOPS_LATTICE_INLINE void exp_and_sum_pair(const Q* l, const float* m, int64_t K, Q* q, float* total) {
    for (int g = 0; g < 2; ++g) total[g] = hsum8(exp_and_sum(l[g], m[g], K, q[g]));
  }
  static SEGOPS_LATTICE_INLINE void scale(Q& q, float s) {
    for (int c = 0; c < C8; ++c) q.p[c] *= splat8(s);
  }
  static SEGOPS_LATTICE_INLINE void add_row_scaled(float* row, float w, const Q& x) {  // row += w * x
    for (int c = 0; c < C8; ++c) store8(row + 8 * c, load8(row + 8 * c) + w * x.p[c]);
  }
  static SEGOPS_LATTICE_INLINE void store(float* dst, const Q& q) {
    for (int c = 0; c < C8; ++c) store8(dst + 8 * c, q.p[c]);
  }
};

#if defined(SEGOPS_CPU_MULTI_ISA)
typedef float v16 __attribute__((vector_size(64)));
typedef int32_t vi16 __attribute__((vector_size(64)));

template <int C8>
struct Pieces16 {
  static constexpr int H = (C8 + 1) / 2;     // 16-lane vectors
  static constexpr bool kHalf = C8 % 2 == 1;  // the last one holds 8 lanes of the row, the rest 0
  struct Q {
    v16 p[H];
  };
  static SEGOPS_LATTICE_INLINE v8 piece(v16 v, int half) {  // lanes 8 half .. 8 half + 7
    return half == 0 ? __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7)
                     : __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  }
  // The half vector moves only its 8 row lanes (in registers: a 256-bit load zero-extends), so nothing past the
  // row is touched.
  static SEGOPS_LATTICE_INLINE v16 load16(const float* p, int h) {
    if (kHalf && h == H - 1) {
      const v8 zero = {};
      return __builtin_shufflevector(load8(p), zero, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    }
    v16 r;
    __builtin_memcpy(&r, p, sizeof(v16));
    return r;
  }
  static SEGOPS_LATTICE_INLINE void store16(float* p, int h, v16 v) {
    if (kHalf && h == H - 1) {
      store8(p, piece(v, 0));
    } else {
      __builtin_memcpy(p, &v, sizeof(v16));
    }
  }
  static SEGOPS_LATTICE_INLINE v16 splat16(float x) { return v16{} + x; }
  static SEGOPS_LATTICE_INLINE vi16 live_lanes(int64_t K) {  // lanes of the last vector below K
    const vi16 lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    return lane < static_cast<int>(K - 16 * (H - 1));
  }
  static SEGOPS_LATTICE_INLINE void load_neg(const float* src, Q& q) {
    for (int h = 0; h < H; ++h) q.p[h] = -load16(src + 16 * h, h);
  }
  static SEGOPS_LATTICE_INLINE void zero(Q& q) {
    for (int h = 0; h < H; ++h) q.p[h] = splat16(0.f);
  }
  static SEGOPS_LATTICE_INLINE void add_scaled_row(Q& s, float w, const float* row) {
    for (int h = 0; h < H; ++h) s.p[h] += w * load16(row + 16 * h, h);
  }
  static SEGOPS_LATTICE_INLINE void add_term(Q& l, float w, const Q& s) {
    for (int h = 0; h < H; ++h) l.p[h] += w * s.p[h];
  }
  static SEGOPS_LATTICE_INLINE v8 mask_and_max(Q& l, int64_t K) {
    l.p[H - 1] = live_lanes(K) ? l.p[H - 1] : splat16(-INFINITY);
    v8 mv = piece(l.p[0], 0);  // the 8-lane pieces in Pieces8's order (the same result for NaN inputs too)
    for (int c = 1; c < C8; ++c) {
      const v8 x = piece(l.p[c / 2], c % 2);
      mv = mv > x ? mv : x;
    }
    return mv;
  }
  static SEGOPS_LATTICE_INLINE v8 exp_and_sum(const Q& l, float m, int64_t K, Q& q) {
    for (int h = 0; h < H; ++h) q.p[h] = exp16(l.p[h] - splat16(m));
    q.p[H - 1] = live_lanes(K) ? q.p[H - 1] : splat16(0.f);
    v8 sv = splat8(0.f);
    for (int c = 0; c < C8; ++c) sv += piece(q.p[c / 2], c % 2);  // the 8-lane pieces in order
    return sv;
  }
  // Two points at once: when C8 is odd, the 8 row lanes of their last vectors share one exp16 (the same lane
  // operations as exp_and_sum's, so the same bits), a quarter less exp work at K = 17 .. 24 (the iterate op at
  // 512², K = 21: 0.987x the time, medians of 37 in-process alternations, 3 runs).
  static SEGOPS_LATTICE_INLINE void exp_and_sum_pair(const Q* l, const float* m, int64_t K, Q* q, float* total) {
    if constexpr (!kHalf) {
      for (int g = 0; g < 2; ++g) total[g] = hsum8(exp_and_sum(l[g], m[g], K, q[g]));
    } else {
      for (int g = 0; g < 2; ++g)
        for (int h = 0; h < H - 1; ++h) q[g].p[h] = exp16(l[g].p[h] - splat16(m[g]));
      const v16 both = __builtin_shufflevector(l[0].p[H - 1], l[1].p[H - 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19,
                                               20, 21, 22, 23);
      const v16 ms = __builtin_shufflevector(splat16(m[0]), splat16(m[1]), 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19,
                                             20, 21, 22, 23);
      const v16 e = exp16(both - ms);
      const v16 zero = {};
      q[0].p[H - 1] = __builtin_shufflevector(e, zero, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23);
      q[1].p[H - 1] = __builtin_shufflevector(e, zero, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23);
      for (int g = 0; g < 2; ++g) {
        q[g].p[H - 1] = live_lanes(K) ? q[g].p[H - 1] : splat16(0.f);
        v8 sv = splat8(0.f);
        for (int c = 0; c < C8; ++c) sv += piece(q[g].p[c / 2], c % 2);
        total[g] = hsum8(sv);
      }
    }
  }
  static SEGOPS_LATTICE_INLINE void scale(Q& q, float s) {
    for (int h = 0; h < H; ++h) q.p[h] *= splat16(s);
  }
  static SEGOPS_LATTICE_INLINE void add_row_scaled(float* row, float w, const Q& x) {
    for (int h = 0; h < H; ++h) store16(row + 16 * h, h, load16(row + 16 * h, h) + w * x.p[h]);
  }
  static SEGOPS_LATTICE_INLINE void store(float* dst, const Q& q) {
    for (int h = 0; h < H; ++h) store16(dst + 16 * h, h, q.p[h]);
  }
  static SEGOPS_LATTICE_INLINE v16 exp16(v16 x) { return exp_lanes<v16, vi16>(x); }
};
#endif

template <typename L>
struct PointMath {
  using Q = typename L::Q;
  // The marginals of points n .. n+G-1 of image b (G interleaved chains: one point's max -> exp -> sum ->
  // divide is a chain of dependent operations; G independent ones keep the pipelines busy):
  // l = -u, l += (weight post alpha) s per kernel in order with s = sum over the point's vertices (in order)
  // of bary * blurred[vertex] (alpha, the slice's factor, in the scalar weight: one product per point, not K);
  // softmax with exp8.
  template <int G>
  static SEGOPS_LATTICE_INLINE void marginals(const Pass& P, int64_t b, int64_t n, Q* q) {
    static_assert(G <= 4, "the reciprocals of at most 4 points per division");
    const int64_t i = b * P.N + n;
    if (i + kAhead + G <= P.B * P.N) {  // the unary rows kAhead points on (see kAhead)
      const char* next = reinterpret_cast<const char*>(P.unary + (i + kAhead) * P.Kp);
      for (int64_t o = 0; o < G * P.Kp * static_cast<int64_t>(sizeof(float)); o += 64) __builtin_prefetch(next + o);
    }
    Q l[G];
    for (int g = 0; g < G; ++g) L::load_neg(P.unary + (i + g) * P.Kp, l[g]);
    if (P.slice) {
      for (int j = 0; j < P.count; ++j) {
        const Term& t = P.terms[j];
        const int64_t e = P.entry(t, b, n);
        const float* base = t.blurred + P.column(t, b);
        for (int g = 0; g < G; ++g) {
          Q s;
          switch (t.V) {  // the lattices of 2-d (positions) and 5-d (positions, colours) features: unrolled
            case 3: gather<3>(t.vertex + e + g * t.V, t.bary + e + g * t.V, base, t.Cg, t.V, s); break;
            case 6: gather<6>(t.vertex + e + g * t.V, t.bary + e + g * t.V, base, t.Cg, t.V, s); break;
            default: gather<0>(t.vertex + e + g * t.V, t.bary + e + g * t.V, base, t.Cg, t.V, s);
          }
          const float w = (t.post ? t.weight * t.post[P.point(t, b, n + g)] : t.weight) * t.alpha;
          L::add_term(l[g], w, s);
        }
      }
    }
    float m[G];
    for (int g = 0; g < G; ++g) m[g] = hmax8(L::mask_and_max(l[g], P.K));
    v4 total = {1.f, 1.f, 1.f, 1.f};
    if (G % 2 == 0) {  // in pairs: see exp_and_sum_pair
      for (int g = 0; g < G; g += 2) {
        float t2[2];
        L::exp_and_sum_pair(l + g, m + g, P.K, q + g, t2);
        total[g] = t2[0];
        total[g + 1] = t2[1];
      }
    } else {
      for (int g = 0; g < G; ++g) total[g] = hsum8(L::exp_and_sum(l[g], m[g], P.K, q[g]));
    }
    // the G reciprocals in one division (each lane correctly rounded: the bits of G scalar divisions)
    const v4 inv = v4{1.f, 1.f, 1.f, 1.f} / total;
    for (int g = 0; g < G; ++g) L::scale(q[g], inv[g]);
  }

  // rows of the point's vertices (in order) += bary * x, in the grid of chunk `chunk`, with x = q times the
  // kernel's pre-scale (as the op-by-op schedule's torch.mul(q, pre)).
  static SEGOPS_LATTICE_INLINE void scatter(const Pass& P, const Term& t, int chunk, int64_t b, int64_t n,
                                            const Q& q) {
    Q x = q;
    if (t.pre) L::scale(x, t.pre[P.point(t, b, n)]);
    const int64_t e = P.entry(t, b, n);
    float* base = t.grid_of(chunk) + P.column(t, b);
    switch (t.V) {
      case 3: return scatter_rows<3>(t.vertex + e, t.bary + e, base, t.Cg, t.V, x);
      case 6: return scatter_rows<6>(t.vertex + e, t.bary + e, base, t.Cg, t.V, x);
      default: return scatter_rows<0>(t.vertex + e, t.bary + e, base, t.Cg, t.V, x);
    }
  }

  // s = sum over the point's vertices, in order, of bary * row (VC: the vertex count when fixed at compile time;
  // the arguments are locals, so the rows' stores elsewhere cannot make the compiler reload them)
  template <int VC>
  static SEGOPS_LATTICE_INLINE void gather(const int32_t* vx, const float* by, const float* base, int64_t Cg,
                                           int64_t V, Q& s) {
    if (VC > 0) V = VC;
    L::zero(s);
    for (int64_t v = 0; v < V; ++v) L::add_scaled_row(s, by[v], base + static_cast<int64_t>(vx[v]) * Cg);
  }
  // rows of the point's vertices (in order) += bary * x
  template <int VC>
  static SEGOPS_LATTICE_INLINE void scatter_rows(const int32_t* vx, const float* by, float* base, int64_t Cg,
                                                 int64_t V, const Q& x) {
    if (VC > 0) V = VC;
    for (int64_t v = 0; v < V; ++v) L::add_row_scaled(base + static_cast<int64_t>(vx[v]) * Cg, by[v], x);
  }

  // Points n0 + p .. n0 + p + G - 1: their marginals, then (in point order) their splats, or their rows.
  template <int G>
  static SEGOPS_LATTICE_INLINE void point_group(const Pass& P, int chunk, int64_t b, int64_t n0, int64_t p,
                                                float* rows) {
    Q q[G];
    marginals<G>(P, b, n0 + p, q);
    for (int g = 0; g < G; ++g) {
      if (P.last) {
        L::store(rows + (p + g) * P.Kp, q[g]);
        continue;
      }
      for (int j = 0; j < P.count; ++j) scatter(P, P.terms[j], chunk, b, n0 + p + g, q[g]);
    }
  }

  // Blocks [blk0, blk1) of kPoints points (block = image b, points n0 ..), in order: each point's marginals
  // are splatted into chunk `chunk`'s grids as soon as they are known; the last pass writes them out.
  static SEGOPS_LATTICE_INLINE void fused_blocks(const Pass& P, int64_t blk0, int64_t blk1, int chunk) {
    const int64_t per_image = (P.N + kPoints - 1) / kPoints;
    std::vector<float> rows(P.last ? static_cast<size_t>(kPoints * P.Kp) : 0);
    for (int64_t blk = blk0; blk < blk1; ++blk) {
      const int64_t b = blk / per_image, n0 = (blk - b * per_image) * kPoints;
      const int64_t np = std::min(kPoints, P.N - n0);
      int64_t p = 0;
      for (; p + kGroup <= np; p += kGroup) point_group<kGroup>(P, chunk, b, n0, p, rows.data());
      for (; p < np; ++p) point_group<1>(P, chunk, b, n0, p, rows.data());
      if (P.last) write_block(P, b, n0, np, rows.data());
    }
  }

  // The block's point-major rows written as K runs of np values, one per class plane: 8 x 8 tiles through
  // registers (the pad classes are not written), the last np % 8 points one value at a time.
  static SEGOPS_LATTICE_INLINE void write_block(const Pass& P, int64_t b, int64_t n0, int64_t np, const float* rows) {
    float* o = P.out + b * P.K * P.N + n0;
    int64_t p = 0;
    for (; p + 8 <= np; p += 8) {
      for (int64_t c = 0; c < P.Kp; c += 8) {
        v8 r[8];
        for (int64_t j = 0; j < 8; ++j) r[j] = load8(rows + (p + j) * P.Kp + c);
        transpose8(r);
        for (int64_t i = 0; i < 8 && c + i < P.K; ++i) store8(o + (c + i) * P.N + p, r[i]);
      }
    }
    for (; p < np; ++p)
      for (int64_t k = 0; k < P.K; ++k) o[k * P.N + p] = rows[p * P.Kp + k];
  }
};

// The pass's loop for one C8: the baseline build (x86-64's baseline has no FMA: a * b + c rounds twice), an AVX2
// clone and an AVX-512 clone (16-lane pieces). The clones contract every a * b + c of the same source into an FMA
// alike, so they give the same bits (tested); the baseline build differs from them by rounding only, and runs only
// when the op is called directly (inference takes the separate ops on CPUs without AVX2). With FMA the iterate op
// (512², K = 21, one thread, builds alternated by process) took 0.905x the time (median of 7 pairs, 0.87-0.98;
// the AVX2 clone 0.88-0.93x in 3 pairs).
template <int C8>
struct Loops {
  static void blocks(const Pass& P, int64_t b0, int64_t b1, int chunk) {
    PointMath<Pieces8<C8>>::fused_blocks(P, b0, b1, chunk);
  }
#if defined(SEGOPS_CPU_MULTI_ISA)
  __attribute__((target("avx2,fma"), optimize("fp-contract=fast"))) static void
  blocks_avx2(const Pass& P, int64_t b0, int64_t b1, int chunk) {
    PointMath<Pieces8<C8>>::fused_blocks(P, b0, b1, chunk);
  }
  __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,fma"), optimize("fp-contract=fast"))) static void
  blocks_avx512(const Pass& P, int64_t b0, int64_t b1, int chunk) {
    PointMath<Pieces16<C8>>::fused_blocks(P, b0, b1, chunk);
  }
#endif
};

// The pass, the chunk sums and the blur run with denormal floats flushed to zero (FTZ) and read as zero (DAZ), as
// torch.set_flush_denormal(True) would, on each worker thread while in scope; the caller's mode is restored.
// Without normalisation, or with large weights, the softmax leaves marginals below 1.2e-38 (the smallest normal
// float) that every later product and sum touches: each such operation took a slow path on the 2-core VM (the
// one-kernel, 5-iteration inference at 512² without normalisation: 65.7 -> 51.4 ms). Only values below 1.2e-38
// change (to 0), in every build, thread count and ISA alike. x86 only; elsewhere nothing changes.
class FlushDenormals {
 public:
  FlushDenormals() {
#if defined(__x86_64__) || defined(__i386__)
    saved_ = _mm_getcsr();
    _mm_setcsr(saved_ | 0x8040u);  // FTZ (bit 15) | DAZ (bit 6)
#endif
  }
  ~FlushDenormals() {
#if defined(__x86_64__) || defined(__i386__)
    _mm_setcsr(saved_);
#endif
  }
  FlushDenormals(const FlushDenormals&) = delete;
  FlushDenormals& operator=(const FlushDenormals&) = delete;

 private:
  unsigned saved_ = 0;
};

// grid += extra[0] + extra[1] + ... (in chunk order) for kernel t, rows in parallel; each extra grid is zeroed as it
// is read (in cache), ready for the next pass's splat.
// Only the rows that chunk s touches (extra_lo .. extra_hi) are read: the others are 0, whose sum would change no
// value.
void add_chunks(const Pass& P, const Term& t) {
  if (P.chunks == 1) return;
  int64_t lo = t.M, hi = 0;
  for (int s = 1; s < P.chunks; ++s) {
    lo = std::min(lo, t.extra_lo[s - 1]);
    hi = std::max(hi, t.extra_hi[s - 1]);
  }
  if (lo >= hi) return;
  omp_parallel_for(lo * t.Cg, hi * t.Cg, int64_t(1) << 14, [&](int64_t i0, int64_t i1) {
    FlushDenormals ftz;
    for (int s = 1; s < P.chunks; ++s) {
      float* e = t.extra[s - 1];
      const int64_t a = std::max(i0, t.extra_lo[s - 1] * t.Cg), b = std::min(i1, t.extra_hi[s - 1] * t.Cg);
      for (int64_t i = a; i < b; ++i) {
        t.grid[i] += e[i];
        e[i] = 0.f;
      }
    }
  });
}

template <int C8>
void run_pass_c8(const Pass& P) {
  auto blocks = &Loops<C8>::blocks;
#if defined(SEGOPS_CPU_MULTI_ISA)
  if (block::cpu_isa() == block::Isa::kAvx512) {
    blocks = &Loops<C8>::blocks_avx512;
  } else if (block::avx2_clones()) {
    blocks = &Loops<C8>::blocks_avx2;
  }
#endif
  // B S tasks: chunk c of image b is blocks [b nb + nb c / S, b nb + nb (c + 1) / S) of the image's nb. Images
  // never share a grid cell (a lattice of its own, or its own columns of a shared one), so every chunk c of every
  // image splats into grid c.
  const int64_t nb = (P.N + kPoints - 1) / kPoints;
  const int64_t S = P.chunks;
  omp_parallel_for(0, P.B * S, 1, [&](int64_t t0, int64_t t1) {
    FlushDenormals ftz;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / S, c = t - b * S;
      blocks(P, b * nb + nb * c / S, b * nb + nb * (c + 1) / S, static_cast<int>(c));
    }
  });
  if (P.last) return;
  for (int j = 0; j < P.count; ++j) add_chunks(P, P.terms[j]);
}

void run_pass(const Pass& P) {
  RECORD_USER_SCOPE("segops_kernel::meanfield_pass");
  switch (P.Kp / 8) {
    case 1: return run_pass_c8<1>(P);
    case 2: return run_pass_c8<2>(P);
    case 3: return run_pass_c8<3>(P);
    case 4: return run_pass_c8<4>(P);
    case 5: return run_pass_c8<5>(P);
    case 6: return run_pass_c8<6>(P);
    case 7: return run_pass_c8<7>(P);
    case 8: return run_pass_c8<8>(P);
    default: TORCH_CHECK(false, "_crf_mean_field_iterate: K = ", P.K, " classes; at most ", 8 * kMaxPieces);
  }
}

#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("avx2"))) void point_major_block_avx2(const float* u, float* dst, int64_t K, int64_t N,
                                                            int64_t Kp, int64_t np) {
  cpu::planes_to_rows(u, dst, K, N, Kp, np);
}
#endif

// (B, K, N) planes -> (B N, Kp) rows with zero pad columns, in blocks of kPoints points.
void point_major(const Tensor& unary, int64_t B, int64_t K, int64_t N, int64_t Kp, const Tensor& rows) {
  RECORD_USER_SCOPE("segops_kernel::point_major");
  const float* u = unary.data_ptr<float>();
  float* r = rows.data_ptr<float>();
  const int64_t per_image = (N + kPoints - 1) / kPoints;
  omp_parallel_for(0, B * per_image, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t b = task / per_image, n0 = (task - b * per_image) * kPoints;
      const int64_t np = std::min(kPoints, N - n0);
      const float* src = u + b * K * N + n0;
      float* dst = r + (b * N + n0) * Kp;
#if defined(__x86_64__) && defined(__GNUC__)
      if (block::avx2_clones()) {
        point_major_block_avx2(src, dst, K, N, Kp, np);
        continue;
      }
#endif
      cpu::planes_to_rows(src, dst, K, N, Kp, np);
    }
  });
}

// How far ahead the blur prefetches its neighbour rows. A large lattice's rows are far apart (DeepLab's bilateral
// kernel at 512²: 84 673 vertices, 8 MB of rows, a median of 2558 rows between neighbours) and come from L3: 24
// vertices ahead, the blur took 0.78-0.85x the time there (16: 0.85x, 8: no gain) and the whole inference
// 0.97x; at the bench's 21 740 vertices the iterate op took 0.99x. (Prefetching the passes' gather and splat
// rows the same way made them slower: 1.15x at 21 740 vertices, 1.03x at DeepLab's.)
constexpr int64_t kBlurAhead = 24;

// One blur direction j over vertices [v0, v1) of rows of Cg floats (Cg a multiple of 8):
// out[v] = in[v] + 1/2 (in[v-] + in[v+]), the lattice's BlurDirection in 8-float pieces. `nbrs` are the lattice's
// neighbours with every absent one (-1) replaced by M, the grids' zero row (see blur_neighbors): no branch on a
// neighbour's presence, which has no pattern a predictor could learn. A missing neighbour adds a zero, so the
// values are BlurDirection's up to the sign of a zero.
SEGOPS_LATTICE_INLINE void blur_range(const float* in, float* out, const int32_t* nbrs, int64_t V, int64_t j,
                                      int64_t Cg, int64_t v0, int64_t v1) {
  const float half = 0.5f;
  const int64_t bytes = Cg * static_cast<int64_t>(sizeof(float));
  for (int64_t v = v0; v < v1; ++v) {
    if (v + kBlurAhead < v1) {  // the neighbour rows of vertex v + kBlurAhead (see kBlurAhead)
      const int32_t* nb = nbrs + ((v + kBlurAhead) * V + j) * 2;
      const char* ra = reinterpret_cast<const char*>(in + static_cast<int64_t>(nb[0]) * Cg);
      const char* rc = reinterpret_cast<const char*>(in + static_cast<int64_t>(nb[1]) * Cg);
      for (int64_t o = 0; o < bytes; o += 64) {
        __builtin_prefetch(ra + o);
        __builtin_prefetch(rc + o);
      }
      __builtin_prefetch(ra + bytes - 1);
      __builtin_prefetch(rc + bytes - 1);
    }
    const int32_t a = nbrs[(v * V + j) * 2], c = nbrs[(v * V + j) * 2 + 1];
    const float* self = in + v * Cg;
    float* o = out + v * Cg;
    const float* pa = in + static_cast<int64_t>(a) * Cg;
    const float* pc = in + static_cast<int64_t>(c) * Cg;
    for (int64_t x = 0; x < Cg; x += 8) store8(o + x, load8(self + x) + half * (load8(pa + x) + load8(pc + x)));
  }
}
#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("avx2"))) void blur_range_avx2(const float* in, float* out, const int32_t* nbrs, int64_t V,
                                                     int64_t j, int64_t Cg, int64_t v0, int64_t v1) {
  blur_range(in, out, nbrs, V, j, Cg, v0, v1);
}
#endif
void blur_range_best(const float* in, float* out, const int32_t* nbrs, int64_t V, int64_t j, int64_t Cg, int64_t v0,
                     int64_t v1) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (block::avx2_clones()) return blur_range_avx2(in, out, nbrs, V, j, Cg, v0, v1);
#endif
  blur_range(in, out, nbrs, V, j, Cg, v0, v1);
}

// The lattice's (M, V, 2) neighbours with each absent one (-1) replaced by M: blur_range's zero row.
Tensor blur_neighbors(const Tensor& nbrs, int64_t M) {
  Tensor out = at::empty_like(nbrs);
  const int32_t* in = nbrs.data_ptr<int32_t>();
  int32_t* o = out.data_ptr<int32_t>();
  const int32_t zero_row = static_cast<int32_t>(M);
  omp_parallel_for(0, nbrs.numel(), int64_t(1) << 16, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) o[i] = in[i] >= 0 ? in[i] : zero_row;
  });
  return out;
}

// The d+1 blur directions of kernel t's grid g[src], ping-ponging with g[1 - src] (both (M + 1, Cg), row M zero;
// `nbrs` from blur_neighbors); returns the index holding the result.
int blur_grid(const Term& t, const int32_t* nbrs, Tensor* g, int src) {
  RECORD_USER_SCOPE("segops_kernel::blur");
  for (int64_t j = 0; j < t.V; ++j, src = 1 - src) {
    const float* in = g[src].data_ptr<float>();
    float* out = g[1 - src].data_ptr<float>();
    omp_parallel_for(0, t.M, 2048, [&](int64_t v0, int64_t v1) {
      FlushDenormals ftz;
      blur_range_best(in, out, nbrs, t.V, j, t.Cg, v0, v1);
    });
  }
  return src;
}

using meanfield::kNormAfter;
using meanfield::kNormNone;
using meanfield::kNormSymmetric;

// The kernel's scales from its degrees W 1 at the lattice's Bt N points (pydensecrf's DenseKernel: norm =
// 1 / (W 1 + 1e-20), its square root for "symmetric"): pre multiplies the marginals before the filter, post
// the filtered ones. W 1 is the filter of ones: the vertices' sums of their entries' weights, the blur, and the
// slice times alpha. The sums are split like the passes' splats: each of the lattice's Bt images in `chunks`
// fixed ranges of points (from the sizes, never the thread count), range c of every image summed in entry order
// into grid c (images have vertices of their own), in parallel; the grids are added in range order.
// The same scan of the entries, one task per (image, chunk), also finds the vertex rows each chunk touches
// (t.extra_lo / extra_hi), with or without normalisation.
void normalization_scales(Term& t, int64_t images, int64_t N, int chunks, const Tensor& nbrs, int64_t d,
                          int64_t mode, Tensor& pre, Tensor& post) {
  const int64_t M = t.M, V = t.V, points = images * N, tasks = images * chunks;
  Tensor grids = mode == kNormNone ? Tensor() : at::zeros({chunks, M}, at::kFloat);
  float* g = mode == kNormNone ? nullptr : grids.data_ptr<float>();
  std::vector<int64_t> lo(static_cast<size_t>(tasks)), hi(static_cast<size_t>(tasks));
  omp_parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t b = task / chunks, c = task - b * chunks;
      int32_t first = std::numeric_limits<int32_t>::max(), last = -1;
      const int64_t e0 = (b * N + N * c / chunks) * V, e1 = (b * N + N * (c + 1) / chunks) * V;
      float* gc = g == nullptr ? nullptr : g + c * M;
      for (int64_t e = e0; e < e1; ++e) {
        const int32_t v = t.vertex[e];
        first = std::min(first, v);
        last = std::max(last, v);
        if (gc != nullptr) gc[v] += t.bary[e];
      }
      lo[task] = first;
      hi[task] = last + 1;
    }
  });
  for (int c = 1; c < chunks; ++c) {
    t.extra_lo[c - 1] = M;
    t.extra_hi[c - 1] = 0;
    for (int64_t b = 0; b < images; ++b) {
      if (lo[b * chunks + c] >= hi[b * chunks + c]) continue;  // (a chunk without points)
      t.extra_lo[c - 1] = std::min(t.extra_lo[c - 1], lo[b * chunks + c]);
      t.extra_hi[c - 1] = std::max(t.extra_hi[c - 1], hi[b * chunks + c]);
    }
  }
  if (mode == kNormNone) return;
  for (int c = 1; c < chunks; ++c)
    for (int64_t v = 0; v < M; ++v) g[v] += g[c * M + v];
  const Tensor grid = grids.narrow(0, 0, 1).view({M, 1});
  const Tensor blurred = lattice::blur<BlurLaunch>(grid, nbrs, d, /*adjoint=*/false, /*keep_input=*/false);
  const float* bl = blurred.data_ptr<float>();
  Tensor scale = empty_output({points}, at::TensorOptions().dtype(at::kFloat));
  float* sc = scale.data_ptr<float>();
  BlurLaunch::launch(points, meanfield::DegreeScales{bl, t.vertex, t.bary, t.alpha, V, mode == kNormSymmetric, sc}, 4096);
  if (mode != kNormAfter) {
    pre = scale;
    t.pre = sc;
  }
  if (mode == kNormSymmetric || mode == kNormAfter) {
    post = scale;
    t.post = sc;
  }
}

Tensor iterate_cpu(const Tensor& unary_in, at::TensorList vertex, at::TensorList bary, at::TensorList neighbors,
                   at::IntArrayRef normalization, at::ArrayRef<double> weights, int64_t iterations) {
  const char* op = "_crf_mean_field_iterate";
  const char* shared = std::getenv("SEGOPS_MEANFIELD_SHARED");  // tests: CUDA's schedule on the CPU
  if (shared != nullptr && shared[0] != '\0' && shared[0] != '0')
    return meanfield::iterate_shared<meanfield::GatherSplatBackend<BlurLaunch>>(unary_in, vertex, bary, neighbors,
                                                                              normalization, weights, iterations);
  meanfield::check_iterate_args(op, unary_in, vertex, bary, neighbors, normalization, weights, iterations);
  const size_t count = vertex.size();
  const Tensor unary = unary_in.contiguous();
  const int64_t B = unary.size(0), K = unary.size(1), N = lattice::spatial_numel(unary);
  Tensor out = empty_output(unary.sizes(), unary.options());
  if (B * N == 0) return out;

  Pass P;
  P.B = B;
  P.K = K;
  P.N = N;
  P.Kp = (K + 7) / 8 * 8;
  const RowsCache::Lease unary_rows = RowsCache::take(B * N * P.Kp, at::kFloat);
  point_major(unary, B, K, N, P.Kp, unary_rows.buffer);
  P.unary = unary_rows.buffer.data_ptr<float>();
  P.count = static_cast<int>(count);

  std::vector<Tensor> keep;  // contiguous inputs and the grids, alive for the whole call
  std::vector<Tensor> grids(count), nbrs(count), blur_nbrs(count), pres(count), posts(count);
  std::vector<int64_t> dims(count);
  for (size_t j = 0; j < count; ++j) {
    const Tensor& vx = vertex[j];
    const int64_t d = vx.size(2) - 1;
    Term& t = P.terms[j];
    keep.push_back(vx.contiguous());
    t.vertex = keep.back().data_ptr<int32_t>();
    keep.push_back(bary[j].contiguous());
    t.bary = keep.back().data_ptr<float>();
    nbrs[j] = neighbors[j].contiguous();
    t.V = d + 1;
    t.M = neighbors[j].size(0);
    t.shared = vx.size(0) == 1 && B > 1;
    t.Cg = t.shared ? B * P.Kp : P.Kp;
    t.weight = static_cast<float>(weights[j]);
    t.alpha = static_cast<float>(lattice::slice_alpha(d));
    dims[j] = d;
    blur_nbrs[j] = blur_neighbors(nbrs[j], t.M);
    // grids and scratch from empty_output: reused blocks, already faulted in (with at::empty the chunk grids'
    // zeroing took 0.67-1.2 ms per call at 512^2 under torch.profiler, mostly page faults; 0.25 ms now)
    grids[j] = empty_output({t.M + 1, t.Cg}, unary.options()).zero_();  // row M: the blur's zero row, never written
    t.grid = grids[j].data_ptr<float>();
  }
  // Splat chunks: each extra one costs zeroing and adding the kernels' grids once per pass (~3 M Cg values),
  // next to the points' gathers and splats (2 B N (d+1) Kp): as many as keep that under a tenth, at most 4,
  // and one per 2^16 points of an image. Sizes only, never the thread count: the same sums for any number of
  // threads. The passes run B S tasks.
  {
    int64_t work = 0, per_chunk = 0;
    for (size_t j = 0; j < count; ++j) {
      work += 2 * B * N * P.terms[j].V;
      per_chunk += 3 * P.terms[j].M * (P.terms[j].Cg / P.Kp);
    }
    const int64_t by_cost = 1 + work / std::max<int64_t>(1, 10 * per_chunk);
    P.chunks = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>({kMaxChunks, by_cost, N >> 16})));
  }
  for (size_t j = 0; j < count; ++j) {
    RECORD_USER_SCOPE("segops_kernel::degrees");
    normalization_scales(P.terms[j], vertex[j].size(0), N, P.chunks, nbrs[j], dims[j], normalization[j], pres[j],
                         posts[j]);
  }
  // Per kernel two grids: the splat of the current pass and the blur's other buffer; the blurred values end
  // in one of them (after d+1 directions), and the next pass splats into the other, zeroed. Chunks 1 .. S-1
  // splat into grids of their own, zeroed before each pass and added into the first after it.
  std::vector<std::array<Tensor, 2>> g(count);
  std::vector<Tensor> extras(count);
  std::vector<int> target(count, 0);
  for (size_t j = 0; j < count; ++j) {
    Term& t = P.terms[j];
    g[j][0] = grids[j];
    g[j][1] = empty_output(grids[j].sizes(), grids[j].options());
    g[j][1][t.M].zero_();
    if (P.chunks > 1) {  // only the rows a chunk touches are zeroed (and ever read)
      extras[j] = empty_output({P.chunks - 1, t.M, t.Cg}, unary.options());
      for (int c = 1; c < P.chunks; ++c) {
        t.extra[c - 1] = extras[j][c - 1].data_ptr<float>();
        extras[j][c - 1].narrow(0, t.extra_lo[c - 1], std::max<int64_t>(0, t.extra_hi[c - 1] - t.extra_lo[c - 1])).zero_();
      }
    }
  }
  run_pass(P);  // softmax(-unary), splatted
  P.slice = true;
  for (int64_t it = 0; it < iterations; ++it) {
    P.last = it == iterations - 1;
    for (size_t j = 0; j < count; ++j) {
      Term& t = P.terms[j];
      const int r = blur_grid(t, blur_nbrs[j].data_ptr<int32_t>(), g[j].data(), target[j]);
      t.blurred = g[j][r].data_ptr<float>();
      target[j] = 1 - r;
      if (!P.last) {
        g[j][target[j]].zero_();
        t.grid = g[j][target[j]].data_ptr<float>();  // (the extra grids were zeroed by add_chunks)
      }
    }
    if (P.last) P.out = out.data_ptr<float>();
    run_pass(P);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(segops, CPU, m) { m.impl("_crf_mean_field_iterate", &iterate_cpu); }

}  // namespace segops
