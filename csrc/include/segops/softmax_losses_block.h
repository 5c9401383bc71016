// CPU fast path of the softmax losses for unit pixel stride (NCHW logits): kBlock consecutive pixels of
// one image per task with the pixel loop innermost, so that the compiler vectorises across pixels (the
// per-pixel functors loop over classes at stride S, which it cannot). Same math as the functors in
// softmax_losses_math.h, which remain the path for other layouts, double precision and the GPU; sparse
// blocks (scribbles: mostly unlabelled) fall back to them so unlabelled logits are still never read.
// tests/test_losses.py compares the two paths (contiguous vs channels_last inputs).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>

#include "segops/softmax_losses_math.h"

namespace segops {
namespace block {

constexpr int kBlock = 32;

// exp for x <= 88 with ~1 ulp error: Cody-Waite reduction x = n ln2 + r, degree-6 Taylor on |r| <= ln2/2
// (truncation r^7/7! < 1.2e-7 relative), 2^n by exponent bits. Branch-free, so loops over it vectorise.
// Inputs below -87 are clamped (exp(-87) = 1.6e-38 stands in for values that would underflow).
inline float exp_poly(float x) {
  x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer in the low mantissa bits
  const float t = x * 1.44269504088896341f + magic;
  const float n = t - magic;
  const float r = (x - n * 0.693145751953125f) - n * 1.428606765330187045e-06f;
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// Zeroes the gradient rows of pixels [s0, s0+n) of image b: the blocked launcher owns the whole
// gradient (no up-front memset), so sparse blocks clear their slice before the per-pixel pass.
template <typename scalar_t>
void zero_rows(const View3<scalar_t>& gx, index_t K, index_t b, index_t s0, index_t n) {
  scalar_t* pg = gx.pixel(b, s0);
  for (index_t k = 0; k < K; ++k) std::memset(static_cast<void*>(pg + k * gx.sk), 0, sizeof(scalar_t) * n);
}

// ---- partial cross-entropy ------------------------------------------------------------------------

// Reads the labels of pixels [s0, s0+n) of image b into t; returns how many are labelled and in range.
template <typename F>
int load_labels(const F& f, index_t b, index_t s0, index_t n, int64_t* t) {
  int count = 0;
  for (index_t v = 0; v < n; ++v) {
    t[v] = static_cast<int64_t>(f.target.at(b, s0 + v));
    count += t[v] != f.ignore_index && t[v] >= 0 && t[v] < f.K;
  }
  return count;
}

// Sparse (scribble) or ragged blocks go to the per-pixel functor, which reads only labelled pixels.
// m[v] = max over the K classes of the block's pixel v (px: the block's class-0 row, sk: the class stride).
template <typename scalar_t>
inline void block_max(const scalar_t* px, index_t sk, index_t K, float* m) {
  for (int v = 0; v < kBlock; ++v) m[v] = static_cast<float>(px[v]);
  for (index_t k = 1; k < K; ++k) {
    const scalar_t* row = px + k * sk;
#pragma omp simd
    for (int v = 0; v < kBlock; ++v) {
      const float xv = static_cast<float>(row[v]);
      m[v] = xv > m[v] ? xv : m[v];
    }
  }
}

inline bool use_per_pixel(index_t n, int count) { return n < kBlock || count * 4 < kBlock; }

template <typename scalar_t, typename target_t>
void pce_forward(const PceForward<scalar_t, target_t>& f, index_t b, index_t s0, index_t n) {
  using acc = float;
  int64_t t[kBlock];
  const int count = load_labels(f, b, s0, n, t);
  if (use_per_pixel(n, count)) {
    for (index_t v = 0; v < n; ++v) f(b * f.S + s0 + v);
    return;
  }
  const scalar_t* px = f.x.pixel(b, s0);
  const index_t sk = f.x.sk;
  acc m[kBlock], sum[kBlock], swx[kBlock];
  block_max(px, sk, f.K, m);
  for (int v = 0; v < kBlock; ++v) sum[v] = swx[v] = 0.0f;
  for (index_t k = 0; k < f.K; ++k) {
    const scalar_t* row = px + k * sk;
#pragma omp simd
    for (int v = 0; v < kBlock; ++v) sum[v] += exp_poly(static_cast<acc>(row[v]) - m[v]);
  }
  acc sum_w = 0.0f;
  if (f.eps != 0.0f) {  // label smoothing needs sum_k w_k x_k as well
    for (index_t k = 0; k < f.K; ++k) {
      const scalar_t* row = px + k * sk;
      const acc w = f.weight ? static_cast<acc>(f.weight[k]) : 1.0f;
      sum_w += w;
#pragma omp simd
      for (int v = 0; v < kBlock; ++v) swx[v] += w * static_cast<acc>(row[v]);
    }
  }
  for (int v = 0; v < kBlock; ++v) {
    const index_t i = b * f.S + s0 + v;
    if (t[v] == f.ignore_index || t[v] < 0 || t[v] >= f.K) {
      f(i);  // writes the zeros (and flags an out-of-range label)
      continue;
    }
    const acc l = m[v] + std::log(sum[v]);
    const acc w_t = f.weight ? static_cast<acc>(f.weight[t[v]]) : 1.0f;
    const acc nll_i = w_t * (l - static_cast<acc>(px[t[v] * sk + v]));
    const acc smooth_i = f.eps != 0.0f ? sum_w * l - swx[v] : 0.0f;
    f.lse[i] = l;
    if (f.loss) f.loss[i] = static_cast<scalar_t>((1.0f - f.eps) * nll_i + f.eps / acc(f.K) * smooth_i);
    if (f.nll) f.nll[i] = nll_i;
    if (f.smooth) f.smooth[i] = smooth_i;
    if (f.wt) f.wt[i] = w_t;
  }
}

template <typename scalar_t, typename target_t>
void pce_backward(const PceBackward<scalar_t, target_t>& f, index_t b, index_t s0, index_t n) {
  using acc = float;
  int64_t t[kBlock];
  const int count = load_labels(f, b, s0, n, t);
  if (use_per_pixel(n, count)) {
    zero_rows(f.gx, f.K, b, s0, n);
    for (index_t v = 0; v < n; ++v) f(b * f.S + s0 + v);
    return;
  }
  acc a[kBlock], c[kBlock], l[kBlock];
  int32_t tk[kBlock], on[kBlock];  // int32 like the float lanes, so the selects below vectorise
  acc sum_w = acc(f.K);
  if (f.eps != 0.0f && f.weight) {
    sum_w = 0.0f;
    for (index_t k = 0; k < f.K; ++k) sum_w += static_cast<acc>(f.weight[k]);
  }
  for (int v = 0; v < kBlock; ++v) {
    const index_t i = b * f.S + s0 + v;
    on[v] = t[v] != f.ignore_index && t[v] >= 0 && t[v] < f.K;
    acc g = on[v] ? static_cast<acc>(f.grad_per_pixel ? f.grad[i] : f.grad[0]) : 0.0f;
    if (f.denom) g /= f.denom[0];
    const acc w_t = on[v] && f.weight ? static_cast<acc>(f.weight[t[v]]) : 1.0f;
    a[v] = g * (1.0f - f.eps) * w_t;
    c[v] = g * f.eps / acc(f.K);
    l[v] = on[v] ? f.lse[i] : 0.0f;
    tk[v] = on[v] ? static_cast<int32_t>(t[v]) : -1;
  }
  const scalar_t* px = f.x.pixel(b, s0);
  scalar_t* pg = f.gx.pixel(b, s0);
  for (index_t k = 0; k < f.K; ++k) {
    const scalar_t* row = px + k * f.x.sk;
    scalar_t* grow = pg + k * f.gx.sk;
    const acc wk = f.weight ? static_cast<acc>(f.weight[k]) : 1.0f;
    const int32_t kk = static_cast<int32_t>(k);
#pragma omp simd
    for (int v = 0; v < kBlock; ++v) {
      const acc p = exp_poly(static_cast<acc>(row[v]) - l[v]);
      const acc val = a[v] * (p - (tk[v] == kk ? 1.0f : 0.0f)) + c[v] * (sum_w * p - wk);
      grow[v] = static_cast<scalar_t>(on[v] ? val : 0.0f);  // select: unlabelled logits may be NaN
    }
  }
}

// ---- entropy ----------------------------------------------------------------------------------------------

template <typename scalar_t>
void entropy_forward(const EntropyForward<scalar_t>& f, index_t b, index_t s0, index_t n) {
  using acc = float;
  int count = 0;
  for (index_t v = 0; v < n; ++v) count += !f.mask.data || f.mask.at(b, s0 + v);
  if (use_per_pixel(n, count)) {
    for (index_t v = 0; v < n; ++v) f(b * f.S + s0 + v);
    return;
  }
  const scalar_t* px = f.x.pixel(b, s0);
  acc m[kBlock], s[kBlock], tx[kBlock];
  block_max(px, f.x.sk, f.K, m);
  for (int v = 0; v < kBlock; ++v) s[v] = tx[v] = 0.0f;
  for (index_t k = 0; k < f.K; ++k) {
    const scalar_t* row = px + k * f.x.sk;
#pragma omp simd
    for (int v = 0; v < kBlock; ++v) {
      const acc xv = static_cast<acc>(row[v]);
      const acc e = exp_poly(xv - m[v]);
      s[v] += e;
      tx[v] += xv == -INFINITY ? 0.0f : e * xv;  // p = 0 at -inf (exp_poly clamps it to 1.6e-38)
    }
  }
  for (int v = 0; v < kBlock; ++v) {
    const index_t i = b * f.S + s0 + v;
    if (f.mask.data && !f.mask.at(b, s0 + v)) {
      f(i);
      continue;
    }
    const acc l = m[v] + std::log(s[v]), e = tx[v] / s[v];
    const acc h = l - e < 0.0f ? 0.0f : l - e;  // NaN passes through (as in EntropyForward)
    f.lse[i] = l;
    f.ex[i] = e;
    if (f.ent) f.ent[i] = static_cast<scalar_t>(h);
    if (f.ent_acc) f.ent_acc[i] = h;
  }
}

template <typename scalar_t>
void entropy_backward(const EntropyBackward<scalar_t>& f, index_t b, index_t s0, index_t n) {
  using acc = float;
  int count = 0;
  for (index_t v = 0; v < n; ++v) count += !f.mask.data || f.mask.at(b, s0 + v);
  if (use_per_pixel(n, count)) {
    zero_rows(f.gx, f.K, b, s0, n);
    for (index_t v = 0; v < n; ++v) f(b * f.S + s0 + v);
    return;
  }
  acc g[kBlock], l[kBlock], e[kBlock];
  int32_t on[kBlock];
  for (int v = 0; v < kBlock; ++v) {
    const index_t i = b * f.S + s0 + v;
    on[v] = !f.mask.data || f.mask.at(b, s0 + v);
    acc gv = static_cast<acc>(f.grad_per_pixel ? f.grad[i] : f.grad[0]);
    if (f.denom) gv /= f.denom[0];
    g[v] = on[v] ? gv : 0.0f;
    l[v] = f.lse[i];
    e[v] = f.ex[i];
  }
  const scalar_t* px = f.x.pixel(b, s0);
  scalar_t* pg = f.gx.pixel(b, s0);
  for (index_t k = 0; k < f.K; ++k) {
    const scalar_t* row = px + k * f.x.sk;
    scalar_t* grow = pg + k * f.gx.sk;
#pragma omp simd
    for (int v = 0; v < kBlock; ++v) {
      const acc xv = static_cast<acc>(row[v]);
      const acc val = -g[v] * exp_poly(xv - l[v]) * (xv - e[v]);
      grow[v] = static_cast<scalar_t>(on[v] && xv != -INFINITY ? val : 0.0f);
    }
  }
}

// ---- launcher ---------------------------------------------------------------------------------------------

template <typename F>
bool blockable(const F& f) {
  return std::is_same<typename F::acc, float>::value && f.x.ss == 1 && f.S >= kBlock;
}

// CpuLaunch for the softmax-loss functors: blocked when the layout allows it, per pixel otherwise.
struct CpuLossLaunch {
  // Whether launching f writes every gradient element itself (else the caller zero-fills first).
  template <typename F>
  bool writes_every_gradient(const F& f) const { return blockable(f); }
  template <typename F>
  bool functor_writes_zeros(const F& f) const {
    // channels_last: a pixel's K gradients are contiguous, writing its zeros inline beats a memset pass.
    // Blocked NCHW: sparse blocks zero their own rows first.
    return !blockable(f) && f.gx.sk == 1;
  }
  template <typename F, typename BlockFn>
  static void run(index_t n, const F& f, const BlockFn& block_fn) {
    if (!blockable(f)) return cpu_parallel_for(n, f, 256);
    const index_t per_image = (f.S + kBlock - 1) / kBlock;
    cpu_parallel_for(n / f.S * per_image, [&](index_t task) {
      const index_t b = task / per_image, s0 = (task - b * per_image) * kBlock;
      block_fn(f, b, s0, std::min<index_t>(kBlock, f.S - s0));
    }, 16);
  }
  template <typename S, typename T>
  void operator()(index_t n, const PceForward<S, T>& f) const { run(n, f, pce_forward<S, T>); }
  template <typename S, typename T>
  void operator()(index_t n, const PceBackward<S, T>& f) const { run(n, f, pce_backward<S, T>); }
  template <typename S>
  void operator()(index_t n, const EntropyForward<S>& f) const { run(n, f, entropy_forward<S>); }
  template <typename S>
  void operator()(index_t n, const EntropyBackward<S>& f) const { run(n, f, entropy_backward<S>); }
};

}  // namespace block
}  // namespace segops
