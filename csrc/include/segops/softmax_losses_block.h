// CPU launch policy of the softmax losses, with a fast path for unit pixel stride (NCHW float / half /
// bfloat16 logits): a task is a chunk of kChunk consecutive pixels of one image, and its loops run over the
// K class rows of the chunk with the pixels innermost, so that reads are row-sequential and the compiler
// vectorises across pixels (the per-pixel functors loop over classes at stride S, which it cannot). A chunk
// visits either all its pixels ("dense" lanes: contiguous loads) or, when fewer than a quarter are labelled
// (scribbles), only the labelled ones ("sparse" lanes: gathers), so unlabelled logits are never read. The
// gradient is written once, row by row, zeros included (no fill first); large dense rows with non-temporal stores.
// The loops are compiled for SSE2, AVX2 and AVX-512 and run with the widest this CPU has.
//
// Same math as the functors in softmax_losses_math.h (they share pixel_loss / store / skip), which remain the
// path for other layouts, double precision and the GPU; tests/test_losses.py compares the two paths.
//
// Determinism: a task's loss share is summed in pixel order, and cpu_parallel_reduce combines the shares by a
// fixed tree, so the bits do not depend on the thread count.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <utility>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <immintrin.h>
#endif

#include "segops/cpu_isa.h"
#include "segops/softmax_losses_math.h"

namespace segops {
namespace block {

constexpr int kChunk = 256;  // pixels per task: also the fixed unit of the loss reduction

// Gradients at least this large are written with non-temporal stores: they cannot stay in the caches anyway,
// and the op never reads them back, so they should neither evict the logits nor be read for ownership first.
// Smaller ones are written normally: their consumer (autograd, the optimizer) finds them in the cache.
constexpr size_t kStreamBytes = size_t(16) << 20;

// Staging buffer: the logits a chunk's loops work on, as float, class-major (xs[k * L + j]). Loading them in one
// tight loop and computing from the copy matters twice over: the K rows of a chunk lie S elements apart, so for
// the usual power-of-two S they all map to the same L1 and L2 cache sets and evict each other between passes
// (max, then sum of exponentials); and a labelled pixel's K logits lie in K cache lines that no hardware
// prefetcher guesses, so only a loop of independent loads keeps enough of those misses in flight.
constexpr int kStage = 8192;

// ---- one body per instruction set --------------------------------------------------------------------------
// The blocked loops are written for the compiler to vectorise across pixels; the baseline build may only use
// SSE2 (4 floats), so the body is compiled again for AVX2 + FMA (8) and AVX-512 (16) and chosen at run time.

namespace generic {
#include "segops/softmax_losses_block_impl.h"
}  // namespace generic
// block::exp_poly for other blocked CPU loops (the dense-CRF mean-field update), which pick their instruction
// set themselves: the baseline copy, inlined into their per-target clones.
using generic::exp_poly;

#if defined(SEGOPS_CPU_MULTI_ISA)
#define SEGOPS_LOSSES_MULTI_ISA 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
#include "segops/softmax_losses_block_impl.h"
}  // namespace avx2
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx2,fma,avx512f,avx512bw,avx512vl,avx512dq")
namespace avx512 {
#include "segops/softmax_losses_block_impl.h"
}  // namespace avx512
#pragma GCC pop_options
#endif

// forward_chunk / backward_chunk of the body compiled for `isa`. float logits only: half and bfloat16 convert
// element by element, which the wider builds hardly speed up, so they keep one (generic) copy.
template <typename F>
constexpr bool kFloatLogits =
    std::is_same<std::remove_const_t<std::remove_pointer_t<decltype(std::declval<F>().x.data)>>, float>::value;

template <typename F, typename... Args>
inline auto forward_chunk_isa(Isa isa, const F& f, Args... args) {
#if defined(SEGOPS_LOSSES_MULTI_ISA)
  if constexpr (kFloatLogits<F>) {
    if (isa == Isa::kAvx512) return avx512::forward_chunk(f, args...);
    if (isa == Isa::kAvx2) return avx2::forward_chunk(f, args...);
  }
#endif
  (void)isa;
  return generic::forward_chunk(f, args...);
}
template <typename F, typename... Args>
inline void backward_chunk_isa(Isa isa, const F& f, Args... args) {
#if defined(SEGOPS_LOSSES_MULTI_ISA)
  if constexpr (kFloatLogits<F>) {
    if (isa == Isa::kAvx512) return avx512::backward_chunk(f, args...);
    if (isa == Isa::kAvx2) return avx2::backward_chunk(f, args...);
  }
#endif
  (void)isa;
  generic::backward_chunk(f, args...);
}

// ---- launcher ---------------------------------------------------------------------------------------------

// The blocked paths compute in float: for float, half and bfloat16 logits (double takes the functors), with
// unit pixel stride and a staging buffer that holds one lane's K classes.
template <typename F>
constexpr bool kBlockable = std::is_same<typename F::acc, float>::value;

template <typename F>
bool blocked_layout(const F& f) {
  return f.x.ss == 1 && f.K <= kStage;
}

// The CPU policy of softmax_losses_host.h: tasks of kChunk pixels, blocked when the layout allows it, per-pixel
// functors otherwise.
struct CpuLossLaunch {
  static constexpr bool kHostMemory = true;

  template <typename Sum, typename F, typename Fin>
  void reduce(index_t n, const F& f, const Fin& fin) const {
    Sum total{};
    bool done = n <= 0;
    if constexpr (kBlockable<F>) {
      if (!done && blocked_layout(f)) {
        const Isa isa = cpu_isa();
        const index_t per_image = (f.S + kChunk - 1) / kChunk;
        total = cpu_parallel_reduce<Sum>(n / f.S * per_image, [&](index_t task) {
          const index_t b = task / per_image, s0 = (task - b * per_image) * kChunk;
          return forward_chunk_isa(isa, f, b, s0, static_cast<int>(std::min<index_t>(kChunk, f.S - s0)));
        });
        done = true;
      }
    }
    if (!done) {
      total = cpu_parallel_reduce<Sum>((n + kChunk - 1) / kChunk, [&](index_t task) {
        Sum s{};
        for (index_t i = task * kChunk, end = std::min<index_t>(n, i + kChunk); i < end; ++i) s = s + f(i);
        return s;
      });
    }
    fin(total);
  }

  template <typename F>
  void for_each(index_t n, const F& f) const {
    if constexpr (kBlockable<F>) {
      if (n > 0 && blocked_layout(f) && f.gx.ss == 1) {
        const index_t per_image = (f.S + kChunk - 1) / kChunk;
        const bool nt = static_cast<size_t>(n) * f.K * sizeof(*f.gx.data) >= kStreamBytes;
        const Isa isa = cpu_isa();
        cpu_parallel_for(n / f.S * per_image, [&](index_t task) {
          const index_t b = task / per_image, s0 = (task - b * per_image) * kChunk;
          backward_chunk_isa(isa, f, b, s0, static_cast<int>(std::min<index_t>(kChunk, f.S - s0)), nt);
        }, 1);
        return;
      }
    }
    cpu_parallel_for(n, f, kChunk);
  }
};

}  // namespace block
}  // namespace segops
