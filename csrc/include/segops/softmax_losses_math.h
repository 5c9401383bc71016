// Per-pixel math of the fused partial cross-entropy and entropy ops (write-once: CPU and CUDA run it).
//
// Logits are read through a (B, K, S) strided view (S = flattened spatial size), so NCHW, channels_last
// and (B, K) inputs need no copy. One functor call handles one pixel i = b * S + s and loops over the K
// classes of that pixel with an online (streaming) max / log-sum-exp: one read of each logit, one exp.
//
// A forward functor returns the pixel's share of the reduction (LossSum); the launcher sums the shares in a
// fixed order and hands the total to LossFinalize, which writes the reduced loss and the mean's denominator,
// so a forward call is one launch whatever the reduction. A backward functor writes every gradient element of
// its pixel, zeros included: no separate fill.
#pragma once

#include "segops/hd.h"
#include "segops/parallel.h"

#if defined(__CUDACC__)
#include <c10/macros/Macros.h>  // CUDA_KERNEL_ASSERT

#include <cstdio>
#endif

namespace segops {

enum Reduction : int { kNone = 0, kMean = 1, kSum = 2 };

// Strided (B, K, S) view of a tensor, plus the (B, S) view of a per-pixel tensor.
template <typename T>
struct View3 {
  T* data;
  index_t sb, sk, ss;
  SEGOPS_HD_INLINE T* pixel(index_t b, index_t s) const { return data + b * sb + s * ss; }
};
template <typename T>
struct View2 {
  T* data;
  index_t sb, ss;
  SEGOPS_HD_INLINE T& at(index_t b, index_t s) const { return data[b * sb + s * ss]; }
};

// A pixel's share of a reduction: its loss and its weight in the mean's denominator (partial cross-entropy:
// the target class's weight, 1 when unweighted; entropy: 1 for a counted pixel). An aggregate: LossSum{} = 0.
template <typename acc>
struct LossSum {
  acc value;
  acc weight;
};
template <typename acc>
SEGOPS_HD_INLINE LossSum<acc> operator+(const LossSum<acc>& a, const LossSum<acc>& b) {
  return LossSum<acc>{a.value + b.value, a.weight + b.weight};
}

// Writes the reduced loss and the denominator the backward pass divides by. 'mean' is F.cross_entropy's:
// sum of losses / sum of weights; with nothing to average (no labelled or counted pixel) the loss is 0
// (PyTorch: NaN) and the denominator 1, so the gradient is 0 as well.
template <typename scalar_t>
struct LossFinalize {
  using acc = acc_t<scalar_t>;
  int reduction;
  scalar_t* out;  // the 0-dim loss; nullptr for reduction 'none' (the functor wrote per-pixel losses)
  acc* denom;     // (1,)

  SEGOPS_HD void operator()(const LossSum<acc>& total) const {
    acc d = acc(1), loss = total.value;
    if (reduction == kMean) {
      const bool any = total.weight > acc(0);
      d = any ? total.weight : acc(1);
      loss = any ? total.value / d : acc(0);
    }
    denom[0] = d;
    if (out) out[0] = static_cast<scalar_t>(loss);
  }
};

// ---- out-of-range labels ----------------------------------------------------------------------------------
// The CPU, and CUDA when the caller asked for the synchronous check, record the lowest such pixel in *bad
// (the host then raises IndexError naming value and pixel). By default CUDA has bad == nullptr and stops the
// kernel with a device-side assertion, as PyTorch's own nll_loss does: the error surfaces at the next
// synchronisation and no call waits for the device to learn that the labels were fine.
SEGOPS_HD_INLINE void report_bad_label(int64_t* bad, index_t i, int64_t value, index_t K, int64_t ignore_index) {
#if defined(__CUDA_ARCH__)
  if (bad == nullptr) {
    printf("segops partial_cross_entropy: target value %lld at flat pixel %lld is outside [0, K) = [0, %lld) "
           "and is not ignore_index (%lld)\n",
           static_cast<long long>(value), static_cast<long long>(i), static_cast<long long>(K),
           static_cast<long long>(ignore_index));
    const bool target_in_0_K_or_ignore_index = false;
    CUDA_KERNEL_ASSERT(target_in_0_K_or_ignore_index);
    return;
  }
#else
  (void)value;
  (void)K;
  (void)ignore_index;
#endif
  atomic_min(bad, i);
}

// Online log-sum-exp state: m = running max, s = sum exp(x - m), t = sum exp(x - m) * x.
template <typename acc>
struct OnlineLse {
  acc m, s, t;
  // A logit of -inf (a class masked out) has p = 0 and adds nothing to s and t: computed, it would give
  // exp(-inf - -inf) = NaN or 0 * -inf = NaN (found by tests/test_fuzz.py). NaN still propagates.
  SEGOPS_HD_INLINE void init(acc x) {
    m = x;
    s = x == acc(-INFINITY) ? acc(0) : acc(1);
    t = x == acc(-INFINITY) ? acc(0) : x;
  }
  SEGOPS_HD_INLINE void push(acc x) {
    if (x > m) {  // rescale the running sums to the new max: still one exp per element
      const acc r = hd_exp(m - x);
      s = s * r + acc(1);
      t = t * r + x;
      m = x;
    } else if (x != acc(-INFINITY)) {
      const acc e = hd_exp(x - m);
      s += e;
      t += e * x;
    }
  }
  SEGOPS_HD_INLINE acc lse() const { return m + hd_log(s); }
  SEGOPS_HD_INLINE acc mean_x() const { return t / s; }  // E_p[x] under p = softmax(x)
};

// ---- partial cross-entropy ------------------------------------------------------------------------
// loss_i = (1-eps) * w_t (lse - x_t) + eps/K * sum_k w_k (lse - x_k) for a labelled pixel, 0 otherwise.
template <typename scalar_t, typename target_t>
struct PceForward {
  using acc = acc_t<scalar_t>;
  using Sum = LossSum<acc>;
  View3<const scalar_t> x;
  View2<const target_t> target;
  const scalar_t* weight;  // (K,) or nullptr
  index_t K, S;
  int64_t ignore_index;
  acc eps;         // label smoothing
  acc* lse;        // (B*S,): log-sum-exp at labelled pixels, 0 elsewhere (the state kept for backward)
  scalar_t* loss;  // (B*S,) per-pixel losses when reduction == none, else nullptr
  int64_t* bad;    // see report_bad_label

  SEGOPS_HD_INLINE bool labelled(int64_t t) const { return t != ignore_index && t >= 0 && t < K; }
  SEGOPS_HD_INLINE acc class_weight(index_t k) const {
    return weight ? static_cast<acc>(weight[k]) : acc(1);
  }
  // The pixel's loss from its log-sum-exp l, target logit x_t, and (label smoothing) sum_w = sum_k w_k,
  // sum_wx = sum_k w_k x_k. Shared by this functor and the CPU's blocked paths.
  SEGOPS_HD_INLINE acc pixel_loss(acc l, acc x_t, acc w_t, acc sum_w, acc sum_wx) const {
    const acc nll = w_t * (l - x_t);
    if (eps == acc(0)) return nll;
    return (acc(1) - eps) * nll + eps / acc(K) * (sum_w * l - sum_wx);
  }
  // Stores the results of pixel i (labelled or not) and returns its share of the reduction.
  SEGOPS_HD_INLINE Sum store(index_t i, acc l, acc loss_i, acc w_t) const {
    lse[i] = l;
    if (loss) loss[i] = static_cast<scalar_t>(loss_i);
    return Sum{loss_i, w_t};
  }
  // The unlabelled (or out-of-range) pixel i with target value t.
  SEGOPS_HD_INLINE Sum skip(index_t i, int64_t t) const {
    if (t != ignore_index) report_bad_label(bad, i, t, K, ignore_index);
    return store(i, acc(0), acc(0), acc(0));
  }

  SEGOPS_HD Sum operator()(index_t i) const {
    const index_t b = i / S, s = i - b * S;
    const int64_t t = static_cast<int64_t>(target.at(b, s));
    if (!labelled(t)) return skip(i, t);
    const scalar_t* px = x.pixel(b, s);
    OnlineLse<acc> st;
    st.init(static_cast<acc>(px[0]));
    acc sum_wx = class_weight(0) * static_cast<acc>(px[0]), sum_w = class_weight(0);
    for (index_t k = 1; k < K; ++k) {
      const acc v = static_cast<acc>(px[k * x.sk]);
      st.push(v);
      if (eps != acc(0)) {
        const acc w = class_weight(k);
        sum_wx += w * v;
        sum_w += w;
      }
    }
    const acc l = st.lse(), w_t = class_weight(t);
    return store(i, l, pixel_loss(l, static_cast<acc>(px[t * x.sk]), w_t, sum_w, sum_wx), w_t);
  }
};

// d loss / d x_k for one pixel: g / D * [(1-eps) w_t (p_k - [k==t]) + eps/K * (W p_k - w_k)],
// W = sum_k w_k; D = the mean's denominator (1 for sum / none). Unlabelled pixels get zeros.
template <typename scalar_t, typename target_t>
struct PceBackward {
  using acc = acc_t<scalar_t>;
  View3<const scalar_t> x;
  View2<const target_t> target;
  const scalar_t* weight;
  index_t K, S;
  int64_t ignore_index;
  acc eps;
  const acc* lse;
  View2<const scalar_t> grad;  // (B, S) upstream gradient (reduction none), or the 0-dim one (strides 0)
  const acc* denom;            // (1,): the mean's denominator; nullptr for sum / none
  View3<scalar_t> gx;

  SEGOPS_HD_INLINE bool labelled(int64_t t) const { return t != ignore_index && t >= 0 && t < K; }
  SEGOPS_HD_INLINE acc class_weight(index_t k) const {
    return weight ? static_cast<acc>(weight[k]) : acc(1);
  }
  SEGOPS_HD_INLINE acc weight_sum() const {  // W, needed with label smoothing only
    if (!weight) return acc(K);
    acc w = acc(0);
    for (index_t k = 0; k < K; ++k) w += static_cast<acc>(weight[k]);
    return w;
  }
  // The upstream gradient of pixel (b, s) divided by the denominator.
  SEGOPS_HD_INLINE acc scaled_grad(index_t b, index_t s) const {
    const acc g = static_cast<acc>(grad.at(b, s));
    return denom ? g / denom[0] : g;
  }

  SEGOPS_HD void operator()(index_t i) const {
    const index_t b = i / S, s = i - b * S;
    const int64_t t = static_cast<int64_t>(target.at(b, s));
    scalar_t* pg = gx.pixel(b, s);
    if (!labelled(t)) {
      for (index_t k = 0; k < K; ++k) pg[k * gx.sk] = scalar_t(0);
      return;
    }
    const acc g = scaled_grad(b, s);
    const acc a = g * (acc(1) - eps) * class_weight(t);
    const acc c = eps != acc(0) ? g * eps / acc(K) : acc(0);
    const acc sum_w = eps != acc(0) ? weight_sum() : acc(K);
    const scalar_t* px = x.pixel(b, s);
    const acc l = lse[i];
    for (index_t k = 0; k < K; ++k) {
      const acc p = hd_exp(static_cast<acc>(px[k * x.sk]) - l);
      acc v = a * (k == t ? p - acc(1) : p);
      if (eps != acc(0)) v += c * (sum_w * p - class_weight(k));
      pg[k * gx.sk] = static_cast<scalar_t>(v);
    }
  }
};

// ---- entropy ----------------------------------------------------------------------------------------
// H_i = -sum_k p_k log p_k = lse - E_p[x]. Masked-out pixels: H = 0 and zero gradient.
template <typename scalar_t>
struct EntropyForward {
  using acc = acc_t<scalar_t>;
  using Sum = LossSum<acc>;
  View3<const scalar_t> x;
  View2<const bool> mask;  // data == nullptr: every pixel counts
  index_t K, S;
  acc* lse;       // (B*S,)
  acc* ex;        // (B*S,) E_p[x]
  scalar_t* ent;  // (B*S,) per-pixel entropy (reduction none) or nullptr

  SEGOPS_HD_INLINE bool counted(index_t b, index_t s) const { return !mask.data || mask.at(b, s); }
  // lse - E >= 0 mathematically; the rounding of a one-hot softmax (H ~ 1e-8) is clamped at 0. Written so
  // that NaN (NaN / Inf logits) passes through: max(NaN, 0) would return 0 (found by tests/test_fuzz.py).
  SEGOPS_HD_INLINE Sum store(index_t i, acc l, acc e) const {
    const acc d = l - e;
    const acc h = d < acc(0) ? acc(0) : d;
    lse[i] = l;
    ex[i] = e;
    if (ent) ent[i] = static_cast<scalar_t>(h);
    return Sum{h, acc(1)};
  }
  SEGOPS_HD_INLINE Sum skip(index_t i) const {
    lse[i] = acc(0);
    ex[i] = acc(0);
    if (ent) ent[i] = scalar_t(0);
    return Sum{acc(0), acc(0)};
  }

  SEGOPS_HD Sum operator()(index_t i) const {
    const index_t b = i / S, s = i - b * S;
    if (!counted(b, s)) return skip(i);
    const scalar_t* px = x.pixel(b, s);
    OnlineLse<acc> st;
    st.init(static_cast<acc>(px[0]));
    for (index_t k = 1; k < K; ++k) st.push(static_cast<acc>(px[k * x.sk]));
    return store(i, st.lse(), st.mean_x());
  }
};

// dH/dx_k = -p_k (x_k - E_p[x]). Masked-out pixels get zeros.
template <typename scalar_t>
struct EntropyBackward {
  using acc = acc_t<scalar_t>;
  View3<const scalar_t> x;
  View2<const bool> mask;
  index_t K, S;
  const acc* lse;
  const acc* ex;
  View2<const scalar_t> grad;  // as in PceBackward
  const acc* denom;            // (1,): the number of counted pixels for mean; nullptr otherwise
  View3<scalar_t> gx;

  SEGOPS_HD_INLINE bool counted(index_t b, index_t s) const { return !mask.data || mask.at(b, s); }
  SEGOPS_HD_INLINE acc scaled_grad(index_t b, index_t s) const {
    const acc g = static_cast<acc>(grad.at(b, s));
    return denom ? g / denom[0] : g;
  }

  SEGOPS_HD void operator()(index_t i) const {
    const index_t b = i / S, s = i - b * S;
    scalar_t* pg = gx.pixel(b, s);
    if (!counted(b, s)) {
      for (index_t k = 0; k < K; ++k) pg[k * gx.sk] = scalar_t(0);
      return;
    }
    const acc g = scaled_grad(b, s);
    const scalar_t* px = x.pixel(b, s);
    const acc l = lse[i], e = ex[i];
    for (index_t k = 0; k < K; ++k) {
      const acc v = static_cast<acc>(px[k * x.sk]);
      // p_k = 0 for x_k = -inf: gradient 0, not 0 * -inf = NaN
      pg[k * gx.sk] = static_cast<scalar_t>(v == acc(-INFINITY) ? acc(0) : -g * hd_exp(v - l) * (v - e));
    }
  }
};

}  // namespace segops
