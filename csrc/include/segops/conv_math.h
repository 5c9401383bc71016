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
#pragma once

#include "segops/hd.h"

namespace segops {
namespace conv {

struct Geom {
  index_t H, W;    // image side
  index_t Ho, Wo;  // col side
  index_t kh, kw;
  index_t sh, sw, ph, pw, dh, dw;
};

// Smallest integer >= a / b for b > 0 (any sign of a).
SEGOPS_HD_INLINE index_t ceil_div(index_t a, index_t b) {
  return a >= 0 ? (a + b - 1) / b : -((-a) / b);
}

// col positions o in [0, n_col) whose image position o * s + off lies in [lo, hi): returns [*b, *e).
SEGOPS_HD_INLINE void col_range(index_t off, index_t s, index_t lo, index_t hi, index_t n_col, index_t* b,
                                index_t* e) {
  index_t bb = ceil_div(lo - off, s), ee = ceil_div(hi - off, s);
  bb = hd_max<index_t>(bb, 0);
  ee = hd_min<index_t>(ee, n_col);
  *b = bb;
  *e = ee > bb ? ee : bb;
}

// Full-row table for the CPU path: tab[2 kj], tab[2 kj + 1] = the col range [b, e) whose image positions
// o * sw + kj * dw - pw lie in [0, W) (the same for every row, so computed once per call, not per row).
inline void fill_kj_table(const Geom& g, index_t* tab) {
  for (index_t kj = 0; kj < g.kw; ++kj) col_range(kj * g.dw - g.pw, g.sw, 0, g.W, g.Wo, &tab[2 * kj], &tab[2 * kj + 1]);
}

// Number of segments of length seg covering n (seg >= 1).
SEGOPS_HD_INLINE index_t n_segments(index_t n, index_t seg) { return (n + seg - 1) / seg; }

// Work item i of a grid (outer, row < rows, segment of a row of `width` in pieces of `seg`), segment fastest:
// the decomposition every per-row kernel below shares.
struct RowSegment {
  index_t outer, row, lo, hi;  // the segment covers [lo, hi) of the row
};
SEGOPS_HD_INLINE RowSegment row_segment(index_t i, index_t rows, index_t width, index_t seg) {
  const index_t nseg = n_segments(width, seg);
  const index_t t = i / nseg, lo = (i % nseg) * seg;
  return RowSegment{t / rows, t % rows, lo, hd_min<index_t>(lo + seg, width)};
}

// ---- general path: im2col / col2im around ATen matrix products --------------------------------------

// col (C * kh * kw, Nb, Ho * Wo), contiguous, from Nb samples of an image slice of C channels (any
// strides). Work item: (row r = (c, ki, kj), n, oh, segment of ow).
template <typename T, typename A>
struct Im2Col {
  const T* img;
  index_t sN, sC, sH, sW;
  A* col;
  index_t Nb, C;
  Geom g;
  index_t seg;
  SEGOPS_HD void operator()(index_t i) const {
    const RowSegment it = row_segment(i, g.Ho, g.Wo, seg);
    const index_t oh = it.row, n = it.outer % Nb, r = it.outer / Nb;
    const index_t kj = r % g.kw;
    const index_t ki = (r / g.kw) % g.kh;
    const index_t c = r / (g.kw * g.kh);
    const index_t o0 = it.lo, o1 = it.hi;
    A* out = col + ((r * Nb + n) * g.Ho + oh) * g.Wo;
    const index_t h = oh * g.sh - g.ph + ki * g.dh;
    if (h < 0 || h >= g.H) {
      for (index_t o = o0; o < o1; ++o) out[o] = A(0);
      return;
    }
    const index_t off = kj * g.dw - g.pw;
    index_t b, e;
    col_range(off, g.sw, 0, g.W, g.Wo, &b, &e);
    b = hd_max(b, o0);
    e = hd_min(e, o1);
    if (e < b) e = b;
    const T* src = img + n * sN + c * sC + h * sH;
    for (index_t o = o0; o < hd_min(b, o1); ++o) out[o] = A(0);
    for (index_t o = b; o < e; ++o) out[o] = static_cast<A>(src[(o * g.sw + off) * sW]);
    for (index_t o = hd_max(e, o0); o < o1; ++o) out[o] = A(0);
  }
};

// image (Nb, C, H, W) slice (acc type; sample stride sN, channel stride sC, rows of W contiguous) = sum over
// the col entries (C * kh * kw, Nb, Ho * Wo) reaching each pixel, plus bias[c] when bias != nullptr.
// Work item: (n, c, h, segment of w).
template <typename A>
struct Col2Im {
  const A* col;
  A* img;
  index_t sN, sC;
  const A* bias;
  index_t Nb, C;
  Geom g;
  index_t seg;
  const index_t* kjr;  // optional full-row table of col_range per kj (CPU), or nullptr
  SEGOPS_HD void operator()(index_t i) const {
    const RowSegment it = row_segment(i, g.H, g.W, seg);
    const index_t h = it.row, c = it.outer % C, n = it.outer / C;
    const index_t w0 = it.lo, w1 = it.hi;
    A* out = img + n * sN + c * sC + h * g.W;
    const index_t L = g.Ho * g.Wo, plane = Nb * L;  // col row (c, ki, kj) holds Nb planes of L
    const A b0 = bias != nullptr ? bias[c] : A(0);
    if (seg == 1) {  // one pixel: accumulate in a register
      A acc = b0;
      // dilation 1: only every sh-th kernel row / sw-th column can reach this pixel
      const index_t ki0 = g.dh == 1 ? (h + g.ph) % g.sh : 0, kis = g.dh == 1 ? g.sh : 1;
      const index_t kj0 = g.dw == 1 ? (w0 + g.pw) % g.sw : 0, kjs = g.dw == 1 ? g.sw : 1;
      for (index_t ki = ki0; ki < g.kh; ki += kis) {
        const index_t th = h + g.ph - ki * g.dh;
        if (th < 0 || th % g.sh != 0) continue;
        const index_t oh = th / g.sh;
        if (oh >= g.Ho) continue;
        for (index_t kj = kj0; kj < g.kw; kj += kjs) {
          const index_t tw = w0 + g.pw - kj * g.dw;
          if (tw < 0 || tw % g.sw != 0) continue;
          const index_t ow = tw / g.sw;
          if (ow >= g.Wo) continue;
          acc += col[((c * g.kh + ki) * g.kw + kj) * plane + n * L + oh * g.Wo + ow];
        }
      }
      out[w0] = acc;
      return;
    }
    for (index_t w = w0; w < w1; ++w) out[w] = b0;
    // dilation 1: the kernel rows that hit a col row are ki = (h + ph) mod sh, then every sh-th one
    const index_t ki0 = g.dh == 1 ? (h + g.ph) % g.sh : 0, kstep = g.dh == 1 ? g.sh : 1;
    for (index_t ki = ki0; ki < g.kh; ki += kstep) {
      const index_t th = h + g.ph - ki * g.dh;
      if (th < 0 || th % g.sh != 0) continue;
      const index_t oh = th / g.sh;
      if (oh >= g.Ho) continue;
      for (index_t kj = 0; kj < g.kw; ++kj) {
        const index_t off = kj * g.dw - g.pw;  // w = ow * sw + off
        index_t b, e;
        if (kjr != nullptr) {
          b = kjr[2 * kj];
          e = kjr[2 * kj + 1];
        } else {
          col_range(off, g.sw, w0, w1, g.Wo, &b, &e);
        }
        const A* src = col + ((c * g.kh + ki) * g.kw + kj) * plane + n * L + oh * g.Wo;
        for (index_t ow = b; ow < e; ++ow) out[ow * g.sw + off] += src[ow];
      }
    }
  }
};

// ---- depthwise path (groups = C_image = C_col): direct kernels, no GEMM ------------------------------

// col[n, c, oh, ow] (acc, contiguous NCHW) = bias[c] + sum_k W[c, k] image[n, c, h, w].
// Work item: (n, c, oh, segment of ow).
template <typename T, typename A>
struct DwCorrelate {
  const T* img;
  index_t sN, sC, sH, sW;
  const A* weight;  // (C, kh * kw)
  const A* bias;
  A* out;
  index_t C;
  Geom g;
  index_t seg;
  const index_t* kjr;  // optional full-row table of col_range per kj (CPU), or nullptr
  SEGOPS_HD void operator()(index_t i) const {
    const RowSegment it = row_segment(i, g.Ho, g.Wo, seg);
    const index_t oh = it.row, c = it.outer % C, n = it.outer / C;
    const index_t o0 = it.lo, o1 = it.hi;
    A* dst = out + ((n * C + c) * g.Ho + oh) * g.Wo;
    const A* wc = weight + c * g.kh * g.kw;
    const T* src_c = img + n * sN + c * sC;
    const A b0 = bias != nullptr ? bias[c] : A(0);
    if (seg == 1) {
      A acc = b0;
      for (index_t ki = 0; ki < g.kh; ++ki) {
        const index_t h = oh * g.sh - g.ph + ki * g.dh;
        if (h < 0 || h >= g.H) continue;
        for (index_t kj = 0; kj < g.kw; ++kj) {
          const index_t w = o0 * g.sw - g.pw + kj * g.dw;
          if (w < 0 || w >= g.W) continue;
          acc += wc[ki * g.kw + kj] * static_cast<A>(src_c[h * sH + w * sW]);
        }
      }
      dst[o0] = acc;
      return;
    }
    for (index_t o = o0; o < o1; ++o) dst[o] = b0;
    for (index_t ki = 0; ki < g.kh; ++ki) {
      const index_t h = oh * g.sh - g.ph + ki * g.dh;
      if (h < 0 || h >= g.H) continue;
      const T* src = src_c + h * sH;
      if (g.dw == 1 && g.kw >= 8) {  // wide kernels (upsampling adjoints): contiguous dot product per output
        const A* wr = wc + ki * g.kw;
        for (index_t o = o0; o < o1; ++o) {
          const index_t base = o * g.sw - g.pw;
          const index_t kb = hd_max<index_t>(0, -base), ke = hd_min<index_t>(g.kw, g.W - base);
          A acc = A(0);
          for (index_t kj = kb; kj < ke; ++kj) acc += wr[kj] * static_cast<A>(src[(base + kj) * sW]);
          dst[o] += acc;
        }
        continue;
      }
      for (index_t kj = 0; kj < g.kw; ++kj) {
        const A wv = wc[ki * g.kw + kj];
        const index_t off = kj * g.dw - g.pw;
        index_t b, e;
        if (kjr != nullptr) {
          b = kjr[2 * kj];
          e = kjr[2 * kj + 1];
        } else {
          col_range(off, g.sw, 0, g.W, g.Wo, &b, &e);
        }
        b = hd_max(b, o0);
        e = hd_min(e, o1);
        for (index_t o = b; o < e; ++o) dst[o] += wv * static_cast<A>(src[(o * g.sw + off) * sW]);
      }
    }
  }
};

// image[n, c, h, w] (acc, contiguous NCHW) = bias[c] + sum over (k, oh, ow) reaching (h, w) of
// W[c, k] col[n, c, oh, ow]. Work item: (n, c, h, segment of w).
template <typename T, typename A>
struct DwAdjoint {
  const T* col;
  index_t sN, sC, sH, sW;
  const A* weight;
  const A* bias;
  A* out;
  index_t C;
  Geom g;
  index_t seg;
  const index_t* kjr;  // optional full-row table of col_range per kj (CPU), or nullptr
  SEGOPS_HD void operator()(index_t i) const {
    const RowSegment it = row_segment(i, g.H, g.W, seg);
    const index_t h = it.row, c = it.outer % C, n = it.outer / C;
    const index_t w0 = it.lo, w1 = it.hi;
    A* dst = out + ((n * C + c) * g.H + h) * g.W;
    const A* wc = weight + c * g.kh * g.kw;
    const T* src_c = col + n * sN + c * sC;
    const A b0 = bias != nullptr ? bias[c] : A(0);
    if (seg == 1) {
      A acc = b0;
      // dilation 1: only every sh-th kernel row / sw-th column can reach this pixel
      const index_t ki0 = g.dh == 1 ? (h + g.ph) % g.sh : 0, kis = g.dh == 1 ? g.sh : 1;
      const index_t kj0 = g.dw == 1 ? (w0 + g.pw) % g.sw : 0, kjs = g.dw == 1 ? g.sw : 1;
      for (index_t ki = ki0; ki < g.kh; ki += kis) {
        const index_t th = h + g.ph - ki * g.dh;
        if (th < 0 || th % g.sh != 0) continue;
        const index_t oh = th / g.sh;
        if (oh >= g.Ho) continue;
        for (index_t kj = kj0; kj < g.kw; kj += kjs) {
          const index_t tw = w0 + g.pw - kj * g.dw;
          if (tw < 0 || tw % g.sw != 0) continue;
          const index_t ow = tw / g.sw;
          if (ow >= g.Wo) continue;
          acc += wc[ki * g.kw + kj] * static_cast<A>(src_c[oh * sH + ow * sW]);
        }
      }
      dst[w0] = acc;
      return;
    }
    for (index_t w = w0; w < w1; ++w) dst[w] = b0;
    // dilation 1: the kernel rows that hit a col row are ki = (h + ph) mod sh, then every sh-th one
    const index_t ki0 = g.dh == 1 ? (h + g.ph) % g.sh : 0, kstep = g.dh == 1 ? g.sh : 1;
    for (index_t ki = ki0; ki < g.kh; ki += kstep) {
      const index_t th = h + g.ph - ki * g.dh;
      if (th < 0 || th % g.sh != 0) continue;
      const index_t oh = th / g.sh;
      if (oh >= g.Ho) continue;
      const T* src = src_c + oh * sH;
      if (g.dw == 1 && g.kw >= 8) {  // wide kernels (upsampling): each col pixel adds a contiguous kw-long run
        const A* wr = wc + ki * g.kw;
        for (index_t ow = 0; ow < g.Wo; ++ow) {
          const index_t base = ow * g.sw - g.pw;
          const index_t kb = hd_max<index_t>(0, w0 - base), ke = hd_min<index_t>(g.kw, w1 - base);
          if (kb >= ke) continue;
          const A v = static_cast<A>(src[ow * sW]);
          A* d = dst + base;
          for (index_t kj = kb; kj < ke; ++kj) d[kj] += wr[kj] * v;
        }
        continue;
      }
      for (index_t kj = 0; kj < g.kw; ++kj) {
        const A wv = wc[ki * g.kw + kj];
        const index_t off = kj * g.dw - g.pw;
        index_t b, e;
        if (kjr != nullptr) {
          b = kjr[2 * kj];
          e = kjr[2 * kj + 1];
        } else {
          col_range(off, g.sw, w0, w1, g.Wo, &b, &e);
        }
        for (index_t ow = b; ow < e; ++ow) dst[ow * g.sw + off] += wv * static_cast<A>(src[ow * sW]);
      }
    }
  }
};

// Depthwise weight gradient, partial sums: part[(c * kh * kw + k) * nchunk + q] = sum over the col rows
// (n, oh) of chunk q (rows_per_chunk consecutive rows of the N * Ho rows) of col * image. The host sums
// the chunks (a fixed-order ATen reduction), so the result is deterministic.
template <typename T, typename A>
struct DwWeightGrad {
  const T* img;
  index_t iN, iC, iH, iW;
  const T* col;
  index_t cN, cC, cH, cW;
  A* part;
  index_t N, C;
  Geom g;
  index_t rows_per_chunk, nchunk;
  SEGOPS_HD void operator()(index_t i) const {
    const index_t q = i % nchunk;
    index_t t = i / nchunk;
    const index_t k = t % (g.kh * g.kw);
    const index_t c = t / (g.kh * g.kw);
    const index_t ki = k / g.kw, kj = k % g.kw;
    const index_t r0 = q * rows_per_chunk, r1 = hd_min<index_t>(r0 + rows_per_chunk, N * g.Ho);
    const index_t off = kj * g.dw - g.pw;
    index_t b, e;
    col_range(off, g.sw, 0, g.W, g.Wo, &b, &e);
    A acc = A(0);
    for (index_t r = r0; r < r1; ++r) {
      const index_t n = r / g.Ho, oh = r % g.Ho;
      const index_t h = oh * g.sh - g.ph + ki * g.dh;
      if (h < 0 || h >= g.H) continue;
      const T* a = col + n * cN + c * cC + oh * cH;
      const T* x = img + n * iN + c * iC + h * iH;
      for (index_t o = b; o < e; ++o) acc += static_cast<A>(a[o * cW]) * static_cast<A>(x[(o * g.sw + off) * iW]);
    }
    part[i] = acc;
  }
};

// Depthwise weight gradient for the CPU row path with dilation 1 along w: one work item per (c, ki) keeps
// kw accumulators and walks the rows once; for each col pixel the kw image pixels it meets are contiguous,
// so the inner loop is a vectorisable axpy. part[(c * kh + ki) * kw + kj] gets the full sum (no chunks).
template <typename T, typename A>
struct DwWeightGradRows {
  static constexpr index_t kMaxKw = 256;
  const T* img;
  index_t iN, iC, iH, iW;
  const T* col;
  index_t cN, cC, cH, cW;
  A* part;
  index_t N, C;
  Geom g;
  SEGOPS_HD void operator()(index_t i) const {
    const index_t ki = i % g.kh, c = i / g.kh;
    A acc[kMaxKw];
    for (index_t kj = 0; kj < g.kw; ++kj) acc[kj] = A(0);
    for (index_t r = 0; r < N * g.Ho; ++r) {
      const index_t n = r / g.Ho, oh = r % g.Ho;
      const index_t h = oh * g.sh - g.ph + ki * g.dh;
      if (h < 0 || h >= g.H) continue;
      const T* a = col + n * cN + c * cC + oh * cH;
      const T* x = img + n * iN + c * iC + h * iH;
      for (index_t o = 0; o < g.Wo; ++o) {
        const A av = static_cast<A>(a[o * cW]);
        const index_t base = o * g.sw - g.pw;
        const index_t kb = hd_max<index_t>(0, -base), ke = hd_min<index_t>(g.kw, g.W - base);
        for (index_t kj = kb; kj < ke; ++kj) acc[kj] += av * static_cast<A>(x[(base + kj) * iW]);
      }
    }
    A* out = part + (c * g.kh + ki) * g.kw;
    for (index_t kj = 0; kj < g.kw; ++kj) out[kj] = acc[kj];
  }
};

}  // namespace conv
}  // namespace segops
