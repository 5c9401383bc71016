// Per-pixel math of the fused partial cross-entropy and entropy ops (write-once: CPU and CUDA run it).
//
// Logits are read through a (B, K, S) strided view (S = flattened spatial size), so NCHW, channels_last
// and (B, K) inputs need no copy. One functor call handles one pixel i = b * S + s and loops over the K
// classes of that pixel with an online (streaming) max / log-sum-exp: one read of each logit, one exp.
#pragma once

#include "segops/hd.h"
#include "segops/parallel.h"

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
// Outputs per pixel: lse (saved for backward), and either the final per-pixel loss (reduction none) or
// the terms the host reduces: nll_i = w_t (lse - x_t), smooth_i = sum_k w_k (lse - x_k), wt_i = w_t.
template <typename scalar_t, typename target_t>
struct PceForward {
  using acc = acc_t<scalar_t>;
  View3<const scalar_t> x;
  View2<const target_t> target;
  const scalar_t* weight;  // (K,) or nullptr
  index_t K, S;
  int64_t ignore_index;
  acc eps;            // label smoothing
  acc* lse;           // (B*S,)
  scalar_t* loss;     // (B*S,) when reduction == none, else nullptr
  acc* nll;           // (B*S,) when reduction != none
  acc* smooth;        // (B*S,) when reduction != none and eps > 0
  acc* wt;            // (B*S,) when reduction == mean
  int64_t* bad;       // first pixel whose label is out of range, -1 if none

  SEGOPS_HD void operator()(index_t i) const {
    const index_t b = i / S, s = i - b * S;
    const int64_t t = static_cast<int64_t>(target.at(b, s));
    const bool valid = t >= 0 && t < K;
    if (t == ignore_index || !valid) {
      if (t != ignore_index) atomic_cas(bad, int64_t(-1), static_cast<int64_t>(i));
      lse[i] = acc(0);
      if (loss) loss[i] = scalar_t(0);
      if (nll) nll[i] = acc(0);
      if (smooth) smooth[i] = acc(0);
      if (wt) wt[i] = acc(0);
      return;
    }
    const scalar_t* px = x.pixel(b, s);
    OnlineLse<acc> st;
    st.init(static_cast<acc>(px[0]));
    acc sum_wx = weight ? static_cast<acc>(weight[0]) * static_cast<acc>(px[0]) : static_cast<acc>(px[0]);
    acc sum_w = weight ? static_cast<acc>(weight[0]) : acc(1);
    for (index_t k = 1; k < K; ++k) {
      const acc v = static_cast<acc>(px[k * x.sk]);
      st.push(v);
      if (eps != acc(0)) {
        const acc w = weight ? static_cast<acc>(weight[k]) : acc(1);
        sum_wx += w * v;
        sum_w += w;
      }
    }
    const acc l = st.lse();
    const acc w_t = weight ? static_cast<acc>(weight[t]) : acc(1);
    const acc nll_i = w_t * (l - static_cast<acc>(px[t * x.sk]));
    const acc smooth_i = eps != acc(0) ? sum_w * l - sum_wx : acc(0);
    lse[i] = l;
    if (loss) loss[i] = static_cast<scalar_t>((acc(1) - eps) * nll_i + eps / acc(K) * smooth_i);
    if (nll) nll[i] = nll_i;
    if (smooth) smooth[i] = smooth_i;
    if (wt) wt[i] = w_t;
  }
};

// d loss / d x_k for one pixel: g / D * [(1-eps) w_t (p_k - [k==t]) + eps/K * (W p_k - w_k)],
// W = sum_k w_k; D = the mean's denominator sum_i w_t(i) (1 for sum / none). Unlabelled pixels are
// zeroed here when write_zeros is set (GPU: coalesced across the warp, saves a separate memset pass), else
// skipped because the caller zero-filled gx (CPU: one memset beats K strided stores per pixel).
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
  const scalar_t* grad;   // (B*S,) per-pixel upstream gradient, or a single scalar
  bool grad_per_pixel;
  const acc* denom;       // [D] for mean, nullptr otherwise
  View3<scalar_t> gx;
  bool write_zeros;       // write the zeros of unlabelled pixels (else gx arrives zero-filled)

  SEGOPS_HD void operator()(index_t i) const {
    const index_t b = i / S, s = i - b * S;
    const int64_t t = static_cast<int64_t>(target.at(b, s));
    scalar_t* pg = gx.pixel(b, s);
    if (t == ignore_index || t < 0 || t >= K) {
      if (write_zeros)
        for (index_t k = 0; k < K; ++k) pg[k * gx.sk] = scalar_t(0);
      return;
    }
    acc g = static_cast<acc>(grad_per_pixel ? grad[i] : grad[0]);
    if (denom) g /= denom[0];
    const acc w_t = weight ? static_cast<acc>(weight[t]) : acc(1);
    const acc a = g * (acc(1) - eps) * w_t;
    acc c = acc(0), sum_w = acc(K);
    if (eps != acc(0)) {
      c = g * eps / acc(K);
      if (weight) {
        sum_w = acc(0);
        for (index_t k = 0; k < K; ++k) sum_w += static_cast<acc>(weight[k]);
      }
    }
    const scalar_t* px = x.pixel(b, s);
    const acc l = lse[i];
    for (index_t k = 0; k < K; ++k) {
      const acc p = hd_exp(static_cast<acc>(px[k * x.sk]) - l);
      acc v = a * (k == t ? p - acc(1) : p);
      if (eps != acc(0)) v += c * (sum_w * p - (weight ? static_cast<acc>(weight[k]) : acc(1)));
      pg[k * gx.sk] = static_cast<scalar_t>(v);
    }
  }
};

// ---- entropy ----------------------------------------------------------------------------------------
// H_i = -sum_k p_k log p_k = lse - E_p[x]. Masked-out pixels: H = 0 and zero gradient.
template <typename scalar_t>
struct EntropyForward {
  using acc = acc_t<scalar_t>;
  View3<const scalar_t> x;
  View2<const bool> mask;  // data == nullptr: every pixel counts
  index_t K, S;
  acc* lse;       // (B*S,)
  acc* ex;        // (B*S,) E_p[x]
  scalar_t* ent;  // (B*S,) per-pixel entropy in the input dtype (reduction none) or nullptr
  acc* ent_acc;   // (B*S,) per-pixel entropy in acc dtype for the host reduction, or nullptr

  SEGOPS_HD void operator()(index_t i) const {
    const index_t b = i / S, s = i - b * S;
    if (mask.data && !mask.at(b, s)) {
      lse[i] = acc(0);
      ex[i] = acc(0);
      if (ent) ent[i] = scalar_t(0);
      if (ent_acc) ent_acc[i] = acc(0);
      return;
    }
    const scalar_t* px = x.pixel(b, s);
    OnlineLse<acc> st;
    st.init(static_cast<acc>(px[0]));
    for (index_t k = 1; k < K; ++k) st.push(static_cast<acc>(px[k * x.sk]));
    const acc l = st.lse(), e = st.mean_x();
    // lse - E >= 0 mathematically; clamp the rounding of a one-hot softmax (H ~ 1e-8) at 0. Written so
    // that NaN (NaN / Inf logits) passes through: max(NaN, 0) would return 0 (found by tests/test_fuzz.py).
    const acc d = l - e;
    const acc h = d < acc(0) ? acc(0) : d;
    lse[i] = l;
    ex[i] = e;
    if (ent) ent[i] = static_cast<scalar_t>(h);
    if (ent_acc) ent_acc[i] = h;
  }
};

// dH/dx_k = -p_k (x_k - E_p[x]). Masked-out pixels get zeros, written here or by the caller (as above).
template <typename scalar_t>
struct EntropyBackward {
  using acc = acc_t<scalar_t>;
  View3<const scalar_t> x;
  View2<const bool> mask;
  index_t K, S;
  const acc* lse;
  const acc* ex;
  const scalar_t* grad;
  bool grad_per_pixel;
  const acc* denom;  // [count] for mean, nullptr otherwise
  View3<scalar_t> gx;
  bool write_zeros;

  SEGOPS_HD void operator()(index_t i) const {
    const index_t b = i / S, s = i - b * S;
    scalar_t* pg = gx.pixel(b, s);
    if (mask.data && !mask.at(b, s)) {
      if (write_zeros)
        for (index_t k = 0; k < K; ++k) pg[k * gx.sk] = scalar_t(0);
      return;
    }
    acc g = static_cast<acc>(grad_per_pixel ? grad[i] : grad[0]);
    if (denom) g /= denom[0];
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
