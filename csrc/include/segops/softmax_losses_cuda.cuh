// CUDA launch policy of softmax_losses_host.h: the forward functors run under the one-launch deterministic
// reduction of parallel_cuda.cuh (loss sum and denominator finished by the grid's last block), the backward
// functors under a grid-stride loop that writes every gradient element. Same functors as the CPU's, plus one
// CUDA-only fast path for sparse labels:
//
// Warp-cooperative partial cross-entropy. With one pixel per thread, a warp of 32 consecutive pixels with one
// labelled pixel (3% labelled) leaves 31 lanes idle while the 32nd walks the K classes of its pixel one
// dependent load at a time, K memory latencies in a row (the profile of the per-pixel kernel on an H200 showed
// the forward and backward far from the memory bandwidth). So a warp with at most kCoopMax labelled pixels takes
// them one after another with all 32 lanes, lane j loading class j, j + 32, ...: one memory latency per
// labelled pixel, and warp shuffles for the max and the sums (fixed butterflies: deterministic). A warp with
// more labelled pixels runs the shared per-pixel functor on each lane: K loads of 32 neighbouring pixels are
// then coalesced. Same math (pixel_loss, store, skip of PceForward; coefficients of PceBackward); a parity test
// checks both paths against the CPU.
#pragma once

#include "segops/parallel_cuda.cuh"
#include "segops/softmax_losses_math.h"

namespace segops {
namespace cuda_losses {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kCoopMax = 8;  // a quarter of the warp, as the CPU's sparse threshold

template <typename acc>
__device__ __forceinline__ acc warp_max(acc v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const acc u = __shfl_xor_sync(kFullMask, v, o);
    v = u > v ? u : v;  // NaN is never the max (it reaches the sum of exponentials instead)
  }
  return v;
}

template <typename acc>
__device__ __forceinline__ acc warp_sum(acc v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);  // a + b == b + a: all lanes agree
  return v;
}

// A lane's pixel (b, s) and label t (ignore_index past the end), whether it is labelled, and the warp's ballot.
struct WarpLabels {
  index_t b, s;
  int64_t t;
  bool lab;
  unsigned mask;
};
template <typename F>
__device__ __forceinline__ WarpLabels warp_labels(const F& f, index_t i, bool valid) {
  WarpLabels w;
  w.b = valid ? i / f.S : 0;
  w.s = valid ? i - w.b * f.S : 0;
  w.t = valid ? static_cast<int64_t>(f.target.at(w.b, w.s)) : f.ignore_index;
  w.lab = valid && f.labelled(w.t);
  w.mask = __ballot_sync(kFullMask, w.lab);
  return w;
}

template <typename scalar_t, typename target_t>
struct PceForwardWarp {
  static constexpr bool kWarpCooperative = true;
  using acc = acc_t<scalar_t>;
  using Sum = LossSum<acc>;
  PceForward<scalar_t, target_t> f;

  __device__ Sum warp(index_t i, bool valid) const {
    const WarpLabels w = warp_labels(f, i, valid);
    const int64_t t = w.t;
    unsigned mask = w.mask;
    if (__popc(mask) > kCoopMax) return valid ? f(i) : Sum{};
    Sum mine = valid && !w.lab ? f.skip(i, t) : Sum{};
    const int lane = threadIdx.x & 31;
    while (mask) {
      const int src = __ffs(mask) - 1;
      mask &= mask - 1;
      const index_t ip = __shfl_sync(kFullMask, i, src);
      const index_t bp = ip / f.S, sp = ip - bp * f.S;
      const scalar_t* px = f.x.pixel(bp, sp);
      acc m = acc(-INFINITY);
      for (index_t k = lane; k < f.K; k += 32) {
        const acc v = static_cast<acc>(px[k * f.x.sk]);
        m = v > m ? v : m;
      }
      m = warp_max(m);
      acc se = acc(0), swx = acc(0), sw = acc(0);
      for (index_t k = lane; k < f.K; k += 32) {
        const acc v = static_cast<acc>(px[k * f.x.sk]);
        // as OnlineLse: p = 0 for a masked-out class (even when m = -inf), exp(0) = 1 at the max (even m = +inf)
        se += v == acc(-INFINITY) ? acc(0) : (v == m ? acc(1) : hd_exp(v - m));
        if (f.eps != acc(0)) {
          swx += f.class_weight(k) * v;
          sw += f.class_weight(k);
        }
      }
      se = warp_sum(se);
      if (f.eps != acc(0)) {
        swx = warp_sum(swx);
        sw = warp_sum(sw);
      }
      if (lane == src) {
        const acc l = m + hd_log(se), w_t = f.class_weight(t);
        mine = mine + f.store(ip, l, f.pixel_loss(l, static_cast<acc>(px[t * f.x.sk]), w_t, sw, swx), w_t);
      }
    }
    return mine;
  }
};

template <typename scalar_t, typename target_t>
struct PceBackwardWarp {
  static constexpr bool kWarpCooperative = true;
  using acc = acc_t<scalar_t>;
  PceBackward<scalar_t, target_t> f;

  __device__ void warp(index_t i, bool valid) const {
    const WarpLabels w = warp_labels(f, i, valid);
    const int64_t t = w.t;
    unsigned mask = w.mask;
    if (__popc(mask) > kCoopMax) {
      if (valid) f(i);
      return;
    }
    if (valid && !w.lab) {  // zeros of this lane's pixel: 32 neighbouring pixels per row, coalesced
      scalar_t* pg = f.gx.pixel(w.b, w.s);
      for (index_t k = 0; k < f.K; ++k) pg[k * f.gx.sk] = scalar_t(0);
    }
    if (!mask) return;
    const acc sum_w = f.eps != acc(0) ? f.weight_sum() : acc(f.K);
    const int lane = threadIdx.x & 31;
    while (mask) {
      const int src = __ffs(mask) - 1;
      mask &= mask - 1;
      const index_t ip = __shfl_sync(kFullMask, i, src);
      const int64_t tp = __shfl_sync(kFullMask, t, src);
      const index_t bp = ip / f.S, sp = ip - bp * f.S;
      const acc g = f.scaled_grad(bp, sp);
      const acc a = g * (acc(1) - f.eps) * f.class_weight(tp);
      const acc c = f.eps != acc(0) ? g * f.eps / acc(f.K) : acc(0);
      const acc l = f.lse[ip];
      const scalar_t* px = f.x.pixel(bp, sp);
      scalar_t* pg = f.gx.pixel(bp, sp);
      for (index_t k = lane; k < f.K; k += 32) {
        const acc p = hd_exp(static_cast<acc>(px[k * f.x.sk]) - l);
        acc v = a * (k == tp ? p - acc(1) : p);
        if (f.eps != acc(0)) v += c * (sum_w * p - f.class_weight(k));
        pg[k * f.gx.sk] = static_cast<scalar_t>(v);
      }
    }
  }
};

}  // namespace cuda_losses

struct CudaLossLaunch {
  static constexpr bool kHostMemory = false;

  template <typename Sum, typename F, typename Fin>
  void reduce(index_t n, const F& f, const Fin& fin) const {
    cuda_parallel_reduce<Sum>(n, f, fin);
  }
  template <typename Sum, typename S, typename T, typename Fin>
  void reduce(index_t n, const PceForward<S, T>& f, const Fin& fin) const {
    cuda_parallel_reduce<Sum>(n, cuda_losses::PceForwardWarp<S, T>{f}, fin);
  }
  template <typename F>
  void for_each(index_t n, const F& f) const {
    cuda_parallel_for(n, f);
  }
  template <typename S, typename T>
  void for_each(index_t n, const PceBackward<S, T>& f) const {
    cuda_parallel_for_warps(n, cuda_losses::PceBackwardWarp<S, T>{f});
  }
};

}  // namespace segops
