// Write-once math of atrous (dilated) and transposed convolution, shared by the CPU and CUDA backends.
//
// One geometry serves both directions. The "image" side is the big map (the input of an atrous conv,
// the output of a transposed conv), the "col" side the small one (atrous output, transposed input):
//
//   image row of col row oh under kernel row ki:   h = oh * sh - ph + ki * dh     (same for w)
//
// Three primitives cover forward and backward of both ops:
//   correlate (image -> col):  col[co, oh, ow] = sum_{ci, ki, kj} W[co, ci, ki, kj] image[ci, h, w]
//       = atrous forward, and the input-gradient of a transposed conv;
//   adjoint   (col -> image):  its exact transpose = transposed-conv forward, atrous input-gradient;
//   weight gradient:           dW[co, ci, ki, kj] = sum_{n, oh, ow} col[co, oh, ow] image[ci, h, w].
// The weight layout is (C_col, C_image / groups, kh, kw) in both ops (that is torch's conv2d weight and
// torch's conv_transpose2d weight).
//
// Every functor writes only the elements it owns (a row segment), so results never depend on thread
// scheduling: no atomics anywhere, bit-reproducible forward and backward ("gather" formulation; the
// adjoint enumerates, for each image pixel it owns, the col entries that reach it).
// A functor's unit of work is a row segment [x0, x0 + seg) of one output row: the CPU launcher gives a
// whole row to a thread (tight, vectorisable inner loops), the CUDA launcher one element (seg = 1).
// Functors take their index type I: int32_t where the host has checked that every offset fits (the division
// and modulo of the per-element index math are several times cheaper on a GPU), int64_t otherwise.
#pragma once

#include "segops/hd.h"

namespace segops {
namespace conv {

template <typename I>
struct GeomT {
  I H, W;    // image side
  I Ho, Wo;  // col side
  I kh, kw;
  I sh, sw, ph, pw, dh, dw;

  template <typename J>
  GeomT<J> as() const {
    return GeomT<J>{J(H), J(W), J(Ho), J(Wo), J(kh), J(kw), J(sh), J(sw), J(ph), J(pw), J(dh), J(dw)};
  }
};
using Geom = GeomT<index_t>;

// Smallest integer >= a / b for b > 0 (any sign of a).
template <typename I>
SEGOPS_HD_INLINE I ceil_div(I a, I b) {
  return a >= 0 ? (a + b - 1) / b : -((-a) / b);
}

// col positions o in [0, n_col) whose image position o * s + off lies in [lo, hi): returns [*b, *e).
template <typename I>
SEGOPS_HD_INLINE void col_range(I off, I s, I lo, I hi, I n_col, I* b, I* e) {
  I bb = ceil_div<I>(lo - off, s), ee = ceil_div<I>(hi - off, s);
  bb = hd_max<I>(bb, 0);
  ee = hd_min<I>(ee, n_col);
  *b = bb;
  *e = ee > bb ? ee : bb;
}

// Number of segments of length seg covering n (seg >= 1).
template <typename I>
SEGOPS_HD_INLINE I n_segments(I n, I seg) { return (n + seg - 1) / seg; }

// Work item i of a grid (outer, row < rows, segment of a row of `width` in pieces of `seg`), segment fastest:
// the decomposition every per-row kernel below shares.
template <typename I>
struct RowSegment {
  I outer, row, lo, hi;  // the segment covers [lo, hi) of the row
};
template <typename I>
SEGOPS_HD_INLINE RowSegment<I> row_segment(I i, I rows, I width, I seg) {
  if (seg == width) return RowSegment<I>{i / rows, i % rows, 0, width};  // whole rows: one division less
  const I nseg = n_segments<I>(width, seg);
  const I t = i / nseg, lo = (i % nseg) * seg;
  return RowSegment<I>{t / rows, t % rows, lo, hd_min<I>(lo + seg, width)};
}

// ---- general path: im2col / col2im around ATen matrix products --------------------------------------

// col (C * kh * kw, samples, Ho * Wo), contiguous, from that many samples of an image slice of C channels (any
// strides). Work item: (row r = (c, ki, kj), n, oh, segment of ow).
template <typename T, typename A, typename I>
struct Im2Col {
  const T* img;
  I sN, sC, sH, sW;
  A* col;
  I samples, C;
  GeomT<I> g;
  I seg;
  SEGOPS_HD void operator()(I i) const {
    const auto it = row_segment<I>(i, g.Ho, g.Wo, seg);
    const I oh = it.row, n = it.outer % samples, r = it.outer / samples;
    const I kj = r % g.kw;
    const I ki = (r / g.kw) % g.kh;
    const I c = r / (g.kw * g.kh);
    const I o0 = it.lo, o1 = it.hi;
    A* out = col + ((r * samples + n) * g.Ho + oh) * g.Wo;
    const I h = oh * g.sh - g.ph + ki * g.dh;
    if (h < 0 || h >= g.H) {
      for (I o = o0; o < o1; ++o) out[o] = A(0);
      return;
    }
    const I off = kj * g.dw - g.pw;
    I b, e;
    col_range<I>(off, g.sw, 0, g.W, g.Wo, &b, &e);
    b = hd_max(b, o0);
    e = hd_min(e, o1);
    if (e < b) e = b;
    const T* src = img + n * sN + c * sC + h * sH;
    for (I o = o0; o < hd_min(b, o1); ++o) out[o] = A(0);
    for (I o = b; o < e; ++o) out[o] = static_cast<A>(src[(o * g.sw + off) * sW]);
    for (I o = hd_max(e, o0); o < o1; ++o) out[o] = A(0);
  }
};

// image (samples, C, H, W) slice (acc type; sample stride sN, channel stride sC, rows of W contiguous) = sum over
// the col entries reaching each pixel, plus bias[c] when bias != nullptr. The col buffer holds, for col row
// r = (c, ki, kj) and sample n, a contiguous Ho x Wo plane at r * col_row_stride + n * col_sample_stride (the
// Im2Col layout (rows, samples, Ho Wo) and the batched-product layout (samples, rows, Ho Wo) are both such layouts).
// Work item: (n, c, h, segment of w).
template <typename A, typename I>
struct Col2Im {
  const A* col;
  I col_row_stride, col_sample_stride;
  A* img;
  I sN, sC;
  const A* bias;
  I C;
  GeomT<I> g;
  I seg;
  SEGOPS_HD void operator()(I i) const {
    const auto it = row_segment<I>(i, g.H, g.W, seg);
    const I h = it.row, c = it.outer % C, n = it.outer / C;
    const I w0 = it.lo, w1 = it.hi;
    A* out = img + n * sN + c * sC + h * g.W;
    const A* col_n = col + n * col_sample_stride;
    const A b0 = bias != nullptr ? bias[c] : A(0);
    if (seg == 1) {  // one pixel: accumulate in a register
      A acc = b0;
      // dilation 1: only every sh-th kernel row / sw-th column can reach this pixel
      const I ki0 = g.dh == 1 ? (h + g.ph) % g.sh : 0, kis = g.dh == 1 ? g.sh : 1;
      const I kj0 = g.dw == 1 ? (w0 + g.pw) % g.sw : 0, kjs = g.dw == 1 ? g.sw : 1;
      for (I ki = ki0; ki < g.kh; ki += kis) {
        const I th = h + g.ph - ki * g.dh;
        if (th < 0 || th % g.sh != 0) continue;
        const I oh = th / g.sh;
        if (oh >= g.Ho) continue;
        for (I kj = kj0; kj < g.kw; kj += kjs) {
          const I tw = w0 + g.pw - kj * g.dw;
          if (tw < 0 || tw % g.sw != 0) continue;
          const I ow = tw / g.sw;
          if (ow >= g.Wo) continue;
          acc += col_n[((c * g.kh + ki) * g.kw + kj) * col_row_stride + oh * g.Wo + ow];
        }
      }
      out[w0] = acc;
      return;
    }
    for (I w = w0; w < w1; ++w) out[w] = b0;
    // dilation 1: the kernel rows that hit a col row are ki = (h + ph) mod sh, then every sh-th one
    const I ki0 = g.dh == 1 ? (h + g.ph) % g.sh : 0, kstep = g.dh == 1 ? g.sh : 1;
    for (I ki = ki0; ki < g.kh; ki += kstep) {
      const I th = h + g.ph - ki * g.dh;
      if (th < 0 || th % g.sh != 0) continue;
      const I oh = th / g.sh;
      if (oh >= g.Ho) continue;
      for (I kj = 0; kj < g.kw; ++kj) {
        const I off = kj * g.dw - g.pw;  // w = ow * sw + off
        I b, e;
        col_range<I>(off, g.sw, w0, w1, g.Wo, &b, &e);
        const A* src = col_n + ((c * g.kh + ki) * g.kw + kj) * col_row_stride + oh * g.Wo;
        for (I ow = b; ow < e; ++ow) out[ow * g.sw + off] += src[ow];
      }
    }
  }
};

// ---- depthwise path (groups = C_image = C_col): direct kernels, no GEMM ------------------------------

// col[n, c, oh, ow] (acc, contiguous NCHW) = bias[c] + sum_k W[c, k] image[n, c, h, w].
// Work item: (n, c, oh, segment of ow).
template <typename T, typename A, typename I>
struct DwCorrelate {
  const T* img;
  I sN, sC, sH, sW;
  const A* weight;  // (C, kh * kw)
  const A* bias;
  A* out;
  I C;
  GeomT<I> g;
  I seg;
  SEGOPS_HD void operator()(I i) const {
    const auto it = row_segment<I>(i, g.Ho, g.Wo, seg);
    const I oh = it.row, c = it.outer % C, n = it.outer / C;
    const I o0 = it.lo, o1 = it.hi;
    A* dst = out + ((n * C + c) * g.Ho + oh) * g.Wo;
    const A* wc = weight + c * g.kh * g.kw;
    const T* src_c = img + n * sN + c * sC;
    const A b0 = bias != nullptr ? bias[c] : A(0);
    if (seg == 1) {
      A acc = b0;
      for (I ki = 0; ki < g.kh; ++ki) {
        const I h = oh * g.sh - g.ph + ki * g.dh;
        if (h < 0 || h >= g.H) continue;
        for (I kj = 0; kj < g.kw; ++kj) {
          const I w = o0 * g.sw - g.pw + kj * g.dw;
          if (w < 0 || w >= g.W) continue;
          acc += wc[ki * g.kw + kj] * static_cast<A>(src_c[h * sH + w * sW]);
        }
      }
      dst[o0] = acc;
      return;
    }
    for (I o = o0; o < o1; ++o) dst[o] = b0;
    for (I ki = 0; ki < g.kh; ++ki) {
      const I h = oh * g.sh - g.ph + ki * g.dh;
      if (h < 0 || h >= g.H) continue;
      const T* src = src_c + h * sH;
      if (g.dw == 1 && g.kw >= 8) {  // wide kernels (upsampling adjoints): contiguous dot product per output
        const A* wr = wc + ki * g.kw;
        for (I o = o0; o < o1; ++o) {
          const I base = o * g.sw - g.pw;
          const I kb = hd_max<I>(0, -base), ke = hd_min<I>(g.kw, g.W - base);
          A acc = A(0);
          for (I kj = kb; kj < ke; ++kj) acc += wr[kj] * static_cast<A>(src[(base + kj) * sW]);
          dst[o] += acc;
        }
        continue;
      }
      for (I kj = 0; kj < g.kw; ++kj) {
        const A wv = wc[ki * g.kw + kj];
        const I off = kj * g.dw - g.pw;
        I b, e;
        col_range<I>(off, g.sw, 0, g.W, g.Wo, &b, &e);
        b = hd_max(b, o0);
        e = hd_min(e, o1);
        for (I o = b; o < e; ++o) dst[o] += wv * static_cast<A>(src[(o * g.sw + off) * sW]);
      }
    }
  }
};

// image[n, c, h, w] (acc, contiguous NCHW) = bias[c] + sum over (k, oh, ow) reaching (h, w) of
// W[c, k] col[n, c, oh, ow]. Work item: (n, c, h, segment of w).
template <typename T, typename A, typename I>
struct DwAdjoint {
  const T* col;
  I sN, sC, sH, sW;
  const A* weight;
  const A* bias;
  A* out;
  I C;
  GeomT<I> g;
  I seg;
  SEGOPS_HD void operator()(I i) const {
    const auto it = row_segment<I>(i, g.H, g.W, seg);
    const I h = it.row, c = it.outer % C, n = it.outer / C;
    const I w0 = it.lo, w1 = it.hi;
    A* dst = out + ((n * C + c) * g.H + h) * g.W;
    const A* wc = weight + c * g.kh * g.kw;
    const T* src_c = col + n * sN + c * sC;
    const A b0 = bias != nullptr ? bias[c] : A(0);
    if (seg == 1) {
      A acc = b0;
      // dilation 1: only every sh-th kernel row / sw-th column can reach this pixel
      const I ki0 = g.dh == 1 ? (h + g.ph) % g.sh : 0, kis = g.dh == 1 ? g.sh : 1;
      const I kj0 = g.dw == 1 ? (w0 + g.pw) % g.sw : 0, kjs = g.dw == 1 ? g.sw : 1;
      for (I ki = ki0; ki < g.kh; ki += kis) {
        const I th = h + g.ph - ki * g.dh;
        if (th < 0 || th % g.sh != 0) continue;
        const I oh = th / g.sh;
        if (oh >= g.Ho) continue;
        for (I kj = kj0; kj < g.kw; kj += kjs) {
          const I tw = w0 + g.pw - kj * g.dw;
          if (tw < 0 || tw % g.sw != 0) continue;
          const I ow = tw / g.sw;
          if (ow >= g.Wo) continue;
          acc += wc[ki * g.kw + kj] * static_cast<A>(src_c[oh * sH + ow * sW]);
        }
      }
      dst[w0] = acc;
      return;
    }
    for (I w = w0; w < w1; ++w) dst[w] = b0;
    // dilation 1: the kernel rows that hit a col row are ki = (h + ph) mod sh, then every sh-th one
    const I ki0 = g.dh == 1 ? (h + g.ph) % g.sh : 0, kstep = g.dh == 1 ? g.sh : 1;
    for (I ki = ki0; ki < g.kh; ki += kstep) {
      const I th = h + g.ph - ki * g.dh;
      if (th < 0 || th % g.sh != 0) continue;
      const I oh = th / g.sh;
      if (oh >= g.Ho) continue;
      const T* src = src_c + oh * sH;
      if (g.dw == 1 && g.kw >= 8) {  // wide kernels (upsampling): each col pixel adds a contiguous kw-long run
        const A* wr = wc + ki * g.kw;
        for (I ow = 0; ow < g.Wo; ++ow) {
          const I base = ow * g.sw - g.pw;
          const I kb = hd_max<I>(0, w0 - base), ke = hd_min<I>(g.kw, w1 - base);
          if (kb >= ke) continue;
          const A v = static_cast<A>(src[ow * sW]);
          A* d = dst + base;
          for (I kj = kb; kj < ke; ++kj) d[kj] += wr[kj] * v;
        }
        continue;
      }
      for (I kj = 0; kj < g.kw; ++kj) {
        const A wv = wc[ki * g.kw + kj];
        const I off = kj * g.dw - g.pw;
        I b, e;
        col_range<I>(off, g.sw, w0, w1, g.Wo, &b, &e);
        for (I ow = b; ow < e; ++ow) dst[ow * g.sw + off] += wv * static_cast<A>(src[ow * sW]);
      }
    }
  }
};

// Depthwise weight gradient, partial sums: part[(c * kh * kw + k) * nchunk + q] = sum over the col rows
// (n, oh) of chunk q (rows_per_chunk consecutive rows of the N * Ho rows) of col * image. The host sums
// the chunks (a fixed-order ATen reduction), so the result is deterministic.
template <typename T, typename A, typename I>
struct DwWeightGrad {
  const T* img;
  I iN, iC, iH, iW;
  const T* col;
  I cN, cC, cH, cW;
  A* part;
  I N, C;
  GeomT<I> g;
  I rows_per_chunk, nchunk;
  SEGOPS_HD void operator()(I i) const {
    const I q = i % nchunk;
    I t = i / nchunk;
    const I k = t % (g.kh * g.kw);
    const I c = t / (g.kh * g.kw);
    const I ki = k / g.kw, kj = k % g.kw;
    const I r0 = q * rows_per_chunk, r1 = hd_min<I>(r0 + rows_per_chunk, N * g.Ho);
    const I off = kj * g.dw - g.pw;
    I b, e;
    col_range<I>(off, g.sw, 0, g.W, g.Wo, &b, &e);
    A acc = A(0);
    for (I r = r0; r < r1; ++r) {
      const I n = r / g.Ho, oh = r % g.Ho;
      const I h = oh * g.sh - g.ph + ki * g.dh;
      if (h < 0 || h >= g.H) continue;
      const T* a = col + n * cN + c * cC + oh * cH;
      const T* x = img + n * iN + c * iC + h * iH;
      for (I o = b; o < e; ++o) acc += static_cast<A>(a[o * cW]) * static_cast<A>(x[(o * g.sw + off) * iW]);
    }
    part[i] = acc;
  }
};

// Depthwise weight gradient for the CPU row path with dilation 1 along w: one work item per (c, ki) keeps
// kw accumulators and walks the rows once; for each col pixel the kw image pixels it meets are contiguous,
// so the inner loop is a vectorisable axpy. part[(c * kh + ki) * kw + kj] gets the full sum (no chunks).
template <typename T, typename A, typename I>
struct DwWeightGradRows {
  static constexpr int kMaxKw = 256;
  const T* img;
  I iN, iC, iH, iW;
  const T* col;
  I cN, cC, cH, cW;
  A* part;
  I N, C;
  GeomT<I> g;
  SEGOPS_HD void operator()(I i) const {
    const I ki = i % g.kh, c = i / g.kh;
    A acc[kMaxKw];
    for (I kj = 0; kj < g.kw; ++kj) acc[kj] = A(0);
    for (I r = 0; r < N * g.Ho; ++r) {
      const I n = r / g.Ho, oh = r % g.Ho;
      const I h = oh * g.sh - g.ph + ki * g.dh;
      if (h < 0 || h >= g.H) continue;
      const T* a = col + n * cN + c * cC + oh * cH;
      const T* x = img + n * iN + c * iC + h * iH;
      for (I o = 0; o < g.Wo; ++o) {
        const A av = static_cast<A>(a[o * cW]);
        const I base = o * g.sw - g.pw;
        const I kb = hd_max<I>(0, -base), ke = hd_min<I>(g.kw, g.W - base);
        for (I kj = kb; kj < ke; ++kj) acc[kj] += av * static_cast<A>(x[(base + kj) * iW]);
      }
    }
    A* out = part + (c * g.kh + ki) * g.kw;
    for (I kj = 0; kj < g.kw; ++kj) out[kj] = acc[kj];
  }
};

}  // namespace conv
}  // namespace segops
