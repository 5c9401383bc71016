// Per-pixel math of the dense CRF mean-field update (write-once: the CPU and CUDA backends run it).
//
// One update of Kraehenbuehl & Koltun's mean-field inference, after the lattice has filtered the marginals:
//   logit_k = -unary_k + sum_j weight_j * scale_j * message_jk        (j = 0 .. terms-1)
//   Q_k     = exp(logit_k - max_l logit_l) / sum_l exp(logit_l - max_l logit_l)
// with message_j a (B, K, N) tensor (a filtered kernel, or a compatibility already applied to one),
// scale_j an optional (B, N) per-pixel factor (the kernel's normalisation after filtering) and weight_j a
// number (a Potts weight, or -1 for a message that is subtracted as it is). Tensors are contiguous
// (B, K, N): class k of pixel n of image b at (b K + k) N + n. The backward of the softmax is
//   dlogit_k = Q_k (g_k - sum_l g_l Q_l).
#pragma once

#include "segops/hd.h"
#include "segops/parallel.h"

namespace segops {
namespace meanfield {

constexpr int kMaxTerms = 8;

template <typename scalar_t>
struct Terms {
  using acc = acc_t<scalar_t>;
  const scalar_t* message[kMaxTerms];
  const scalar_t* scale[kMaxTerms];  // (B, N) or nullptr
  acc weight[kMaxTerms];
  int count;

  // term j at element e = (b K + k) N + n of pixel p = b N + n: weight_j scale_j[p] message_j[e]
  SEGOPS_HD_INLINE acc term(int j, index_t e, index_t p) const {
    const acc w = scale[j] ? weight[j] * static_cast<acc>(scale[j][p]) : weight[j];
    return w * static_cast<acc>(message[j][e]);
  }
};

// Q for pixel i = b N + n. Three passes over the pixel's K classes: logits (stored in out when the output
// type holds them exactly, else recomputed) and their max, exponentials and their sum, the division.
template <typename scalar_t>
struct Forward {
  using acc = acc_t<scalar_t>;
  static constexpr bool kStoreLogits = sizeof(scalar_t) == sizeof(acc);
  const scalar_t* unary;
  Terms<scalar_t> terms;
  scalar_t* out;
  index_t K, N;

  // -unary + term_0 + term_1 + ..., in that order (the CPU's blocked path adds in the same order)
  SEGOPS_HD_INLINE acc logit(index_t e, index_t p) const {
    acc l = -static_cast<acc>(unary[e]);
    for (int j = 0; j < terms.count; ++j) l += terms.term(j, e, p);
    return l;
  }

  SEGOPS_HD void operator()(index_t p) const {
    const index_t b = p / N, n = p - b * N;
    const index_t base = b * K * N + n;
    acc m = acc(-INFINITY);
    for (index_t k = 0; k < K; ++k) {
      const acc l = logit(base + k * N, p);
      if (kStoreLogits) out[base + k * N] = static_cast<scalar_t>(l);
      m = hd_max(m, l);
    }
    acc s = acc(0);
    for (index_t k = 0; k < K; ++k) {
      const index_t e = base + k * N;
      const acc x = hd_exp((kStoreLogits ? static_cast<acc>(out[e]) : logit(e, p)) - m);
      out[e] = static_cast<scalar_t>(x);
      s += x;
    }
    const acc inv = acc(1) / s;
    for (index_t k = 0; k < K; ++k) {
      const index_t e = base + k * N;
      out[e] = static_cast<scalar_t>(static_cast<acc>(out[e]) * inv);
    }
  }
};

// dlogit = Q (g - <g, Q>) for pixel i; grad and q are (B, K, N) contiguous.
template <typename scalar_t>
struct Backward {
  using acc = acc_t<scalar_t>;
  const scalar_t* grad;
  const scalar_t* q;
  scalar_t* out;
  index_t K, N;

  SEGOPS_HD void operator()(index_t p) const {
    const index_t b = p / N, n = p - b * N;
    const index_t base = b * K * N + n;
    acc dot = acc(0);
    for (index_t k = 0; k < K; ++k) {
      const index_t e = base + k * N;
      dot += static_cast<acc>(grad[e]) * static_cast<acc>(q[e]);
    }
    for (index_t k = 0; k < K; ++k) {
      const index_t e = base + k * N;
      out[e] = static_cast<scalar_t>(static_cast<acc>(q[e]) * (static_cast<acc>(grad[e]) - dot));
    }
  }
};

}  // namespace meanfield
}  // namespace segops
