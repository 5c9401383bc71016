// Host glue of atrous_conv2d / conv_transpose2d and their backward ops, shared by the CPU and CUDA backends:
// argument checks, buffers, the choice among segops' kernels, the vendor (ATen) convolution, and the matrix
// products (the launcher's own GEMM where it has one: segops' AVX-512 GEMM on some CPUs, cpu_gemm.h; otherwise
// ATen: BLAS on the CPU, cuBLAS on CUDA). A backend supplies its launcher (parallel.h: CpuLaunch,
// parallel_cuda.cuh: CudaLaunch), which answers every hardware-dependent question; nothing here branches on the
// device. Everything is computed in the accumulation type (float for half / bfloat16 / float, double for double)
// and cast once at the end.
//
// segops' kernels, by geometry (segops/ops/conv_choice.py names them the same way; so do the profiler ranges):
//   depthwise   (groups = C_image = C_col, one channel per group): direct gather kernels, no matrix product;
//   gemm-1x1    (1x1, stride 1, no padding): one matrix product per sample and group over the image itself;
//   gemm-rows   (vertical stride 1): the image is unfolded along the width only (one shifted copy per tap, over
//               the output columns the tap reaches inside the image, instead of im2col's kh * kw full copies),
//               and kernel row ki is one matrix product per tap group over the rows it reaches: neither rows nor
//               columns that only meet zero padding are ever multiplied (the geometry section below);
//   gemm-im2col (otherwise): im2col by blocks of output rows, matrix products, col2im.
// The products accumulate into their destination in a fixed order (bias first), so every path is deterministic.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/baddbmm.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/convolution.h>
#include <ATen/ops/convolution_backward.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <ATen/record_function.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Optional.h>

#include <algorithm>
#include <array>
#include <initializer_list>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "segops/conv_math.h"
#include "segops/parallel.h"

namespace segops {
namespace conv {

using at::Tensor;

struct Args {
  int64_t sh, sw, ph, pw, dh, dw, oph, opw, groups;
};

inline at::ScalarType acc_dtype(const Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline Args make_args(const char* op, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                      at::IntArrayRef output_padding, int64_t groups) {
  TORCH_CHECK(stride.size() == 2, op, ": stride must have 2 values, got ", stride);
  TORCH_CHECK(padding.size() == 2, op, ": padding must have 2 values, got ", padding);
  TORCH_CHECK(dilation.size() == 2, op, ": dilation must have 2 values, got ", dilation);
  TORCH_CHECK(output_padding.size() == 2, op, ": output_padding must have 2 values, got ", output_padding);
  TORCH_CHECK(stride[0] > 0 && stride[1] > 0, op, ": stride must be positive, got ", stride);
  TORCH_CHECK(padding[0] >= 0 && padding[1] >= 0, op, ": padding must be non-negative, got ", padding);
  TORCH_CHECK(dilation[0] > 0 && dilation[1] > 0, op, ": dilation must be positive, got ", dilation);
  TORCH_CHECK(output_padding[0] >= 0 && output_padding[1] >= 0, op,
              ": output_padding must be non-negative, got ", output_padding);
  for (int d = 0; d < 2; ++d) {
    TORCH_CHECK(output_padding[d] < std::max(stride[d], dilation[d]), op, ": output_padding (", output_padding,
                ") must be smaller than either stride (", stride, ") or dilation (", dilation, ")");
  }
  TORCH_CHECK(groups > 0, op, ": groups must be positive, got ", groups);
  return Args{stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
              output_padding[0], output_padding[1], groups};
}

inline void check_tensors(const char* op, const Tensor& input, const Tensor& weight,
                          const c10::optional<Tensor>& bias, int64_t c_out, const char* out_name) {
  TORCH_CHECK(input.dim() == 4, op, ": input must be 4-D (N, C, H, W), got ", input.dim(), "-D ", input.sizes());
  TORCH_CHECK(weight.dim() == 4, op, ": weight must be 4-D (C_out, C_in / groups, kH, kW) for atrous_conv2d or "
              "(C_in, C_out / groups, kH, kW) for conv_transpose2d, got ", weight.dim(), "-D ", weight.sizes());
  TORCH_CHECK(at::isFloatingType(input.scalar_type()), op,
              ": input must be float32, float64, float16 or bfloat16, got ", input.scalar_type());
  TORCH_CHECK(weight.scalar_type() == input.scalar_type(), op, ": weight dtype ", weight.scalar_type(),
              " must equal the input dtype ", input.scalar_type());
  TORCH_CHECK(weight.device() == input.device(), op, ": weight is on ", weight.device(), " but input is on ",
              input.device());
  TORCH_CHECK(weight.size(2) > 0 && weight.size(3) > 0, op, ": kernel size must be positive, got weight ",
              weight.sizes());
  if (bias.has_value() && bias->defined()) {
    const Tensor& b = *bias;
    TORCH_CHECK(b.dim() == 1 && b.size(0) == c_out, op, ": bias must have shape (", out_name, ",) = (", c_out,
                ",), got ", b.sizes());
    TORCH_CHECK(b.scalar_type() == input.scalar_type(), op, ": bias dtype ", b.scalar_type(),
                " must equal the input dtype ", input.scalar_type());
    TORCH_CHECK(b.device() == input.device(), op, ": bias is on ", b.device(), " but input is on ",
                input.device());
  }
}

// atrous: input (N, C_in, H, W), weight (C_out, C_in / g, kh, kw). Returns the geometry (col side = output).
inline Geom atrous_geom(const char* op, const Tensor& input, const Tensor& weight, const Args& a) {
  const int64_t cin = input.size(1), cout = weight.size(0);
  TORCH_CHECK(cout % a.groups == 0, op, ": out_channels (weight.size(0) = ", cout,
              ") must be divisible by groups (", a.groups, ")");
  TORCH_CHECK(cin == weight.size(1) * a.groups, op, ": input has ", cin,
              " channels but weight expects in_channels = weight.size(1) * groups = ", weight.size(1), " * ",
              a.groups, " = ", weight.size(1) * a.groups);
  Geom g{};
  g.H = input.size(2);
  g.W = input.size(3);
  g.kh = weight.size(2);
  g.kw = weight.size(3);
  g.sh = a.sh; g.sw = a.sw; g.ph = a.ph; g.pw = a.pw; g.dh = a.dh; g.dw = a.dw;
  const int64_t eh = g.dh * (g.kh - 1) + 1, ew = g.dw * (g.kw - 1) + 1;
  TORCH_CHECK(g.H + 2 * g.ph >= eh && g.W + 2 * g.pw >= ew, op, ": padded input (", g.H + 2 * g.ph, " x ",
              g.W + 2 * g.pw, ") is smaller than the dilated kernel (", eh, " x ", ew, ")");
  g.Ho = (g.H + 2 * g.ph - eh) / g.sh + 1;
  g.Wo = (g.W + 2 * g.pw - ew) / g.sw + 1;
  return g;
}

// transposed: input (N, C_in, Hi, Wi) = col side, weight (C_in, C_out / g, kh, kw); image = output.
inline Geom transpose_geom(const char* op, const Tensor& input, const Tensor& weight, const Args& a) {
  const int64_t cin = input.size(1);
  TORCH_CHECK(weight.size(0) == cin, op, ": input has ", cin, " channels but weight.size(0) (in_channels) is ",
              weight.size(0));
  TORCH_CHECK(cin % a.groups == 0, op, ": in_channels (", cin, ") must be divisible by groups (", a.groups, ")");
  Geom g{};
  g.Ho = input.size(2);
  g.Wo = input.size(3);
  g.kh = weight.size(2);
  g.kw = weight.size(3);
  g.sh = a.sh; g.sw = a.sw; g.ph = a.ph; g.pw = a.pw; g.dh = a.dh; g.dw = a.dw;
  g.H = (g.Ho - 1) * g.sh - 2 * g.ph + g.dh * (g.kh - 1) + a.oph + 1;
  g.W = (g.Wo - 1) * g.sw - 2 * g.pw + g.dw * (g.kw - 1) + a.opw + 1;
  TORCH_CHECK(g.H > 0 && g.W > 0, op, ": the output size (", g.H, " x ", g.W,
              ") would not be positive; reduce padding (", g.ph, ", ", g.pw, ")");
  TORCH_CHECK(g.Ho > 0 && g.Wo > 0, op, ": input spatial size must be positive, got ", input.sizes());
  return g;
}

inline bool is_depthwise(int64_t c_img, int64_t c_col, int64_t groups, const Tensor& weight) {
  return groups == c_img && groups == c_col && weight.size(1) == 1;
}

inline Tensor opt_acc(const c10::optional<Tensor>& t, at::ScalarType acc) {
  if (!t.has_value() || !t->defined()) return Tensor();
  return t->to(acc).contiguous();
}

template <typename A>
inline const A* ptr_or_null(const Tensor& t) { return t.defined() ? t.data_ptr<A>() : nullptr; }

// ---- which segops kernel, and its profiler range -------------------------------------------------------

enum class Family { Depthwise, Gemm1x1, GemmRows, GemmIm2col };

inline Family family_of(const Geom& g, bool depthwise) {
  if (depthwise) return Family::Depthwise;
  if (g.kh == 1 && g.kw == 1 && g.sh == 1 && g.sw == 1 && g.ph == 0 && g.pw == 0) return Family::Gemm1x1;
  return g.sh == 1 ? Family::GemmRows : Family::GemmIm2col;
}

inline const char* range_name(Family f) {
  switch (f) {
    case Family::Depthwise: return "segops::conv/depthwise";
    case Family::Gemm1x1: return "segops::conv/gemm-1x1";
    case Family::GemmRows: return "segops::conv/gemm-rows";
    default: return "segops::conv/gemm-im2col";
  }
}

#define SEGOPS_CONV_RANGE(name) RECORD_FUNCTION((name), c10::ArrayRef<const c10::IValue>{})

// Runs the kernel of `family` for `dtype` inside its profiler range: each kernel is a generic lambda called with a
// value of the storage type T and one of the accumulation type A (tags for template arguments).
template <typename Depthwise, typename Im2col, typename Rows>
void by_family(Family family, at::ScalarType dtype, const Depthwise& depthwise, const Im2col& im2col,
               const Rows& rows) {
  SEGOPS_CONV_RANGE(range_name(family));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "segops_conv", [&] {
    using A = acc_t<scalar_t>;
    if (family == Family::Depthwise) {
      depthwise(scalar_t{}, A{});
    } else if (family == Family::GemmIm2col) {
      im2col(scalar_t{}, A{});
    } else {
      rows(scalar_t{}, A{});
    }
  });
}

// Whether every offset below `extents` (element counts / largest offsets of the buffers a kernel touches, and its
// number of work items) fits a 32-bit index.
inline bool fits_int32(std::initializer_list<int64_t> extents) {
  for (int64_t e : extents) {
    if (e >= int64_t(std::numeric_limits<int32_t>::max())) return false;
  }
  return true;
}

// One past the largest element offset of a tensor (its storage extent as seen through its strides).
inline int64_t extent(const Tensor& t) {
  int64_t e = 1;
  for (int64_t d = 0; d < t.dim(); ++d) e += (t.size(d) - 1) * t.stride(d);
  return t.numel() == 0 ? 0 : e;
}

// ---- matrix views of NCHW-like tensors -------------------------------------------------------------------

// Stride between consecutive pixels of a row-major (h, w) walk of t (N, C, H, W), or -1 when (h, w) do not
// flatten to one stride (a slice). Contiguous NCHW: 1; channels_last: C.
inline int64_t pixel_stride(const Tensor& t) {
  const int64_t H = t.size(2), W = t.size(3);
  if (W == 1) return H == 1 ? 1 : t.stride(2);
  if (H == 1 || t.stride(2) == W * t.stride(3)) return t.stride(3);
  return -1;
}

// Rows [h0, h0 + rows) of channels [c0, c0 + C) of samples [n0, n0 + samples) of t as a batch of (C, rows * W)
// matrices (t must have a pixel_stride).
inline Tensor rows_matrices(const Tensor& t, int64_t n0, int64_t samples, int64_t c0, int64_t C, int64_t h0,
                            int64_t rows) {
  const int64_t W = t.size(3);
  return t.as_strided({samples, C, rows * W}, {t.stride(0), t.stride(1), pixel_stride(t)},
                      t.storage_offset() + n0 * t.stride(0) + c0 * t.stride(1) + h0 * t.stride(2));
}

// The col-side tensor in the accumulation type with flattenable pixels (a copy only when needed).
inline Tensor col_operand(const Tensor& col, at::ScalarType acc) {
  Tensor c = col.to(acc);
  return pixel_stride(c) < 0 ? c.contiguous() : c;
}

// C (M, N) (+)= A (M, K) B (K, N): the launcher's own float GEMM where it has one (the CPU's AVX-512 kernel,
// cpu_gemm.h), else ATen's (BLAS on the CPU, cuBLAS on CUDA).
template <typename Launch>
inline void matmul_into(Tensor C, const Tensor& A, const Tensor& B, bool accumulate, const Launch& launch) {
  if (C.scalar_type() == at::kFloat && A.scalar_type() == at::kFloat && B.scalar_type() == at::kFloat &&
      launch.sgemm(C.size(0), C.size(1), A.size(1), A.data_ptr<float>(), A.stride(0), A.stride(1),
                   B.data_ptr<float>(), B.stride(0), B.stride(1), C.data_ptr<float>(), C.stride(0), C.stride(1),
                   accumulate))
    return;
  if (accumulate) {
    C.addmm_(A, B);
  } else {
    at::mm_out(C, A, B);
  }
}

// C[n] += A B[n] for the matrices of C (samples, M, N) and B (samples, K, N), one shared A (M, K): one product
// per matrix when samples == 1 (the CPU's case), one batched product otherwise (a fixed number of launches on CUDA).
template <typename Launch>
inline void add_products(Tensor C, const Tensor& A, const Tensor& B, const Launch& launch) {
  if (C.size(0) == 1) {
    matmul_into(C.select(0, 0), A, B.select(0, 0), true, launch);
  } else {
    C.baddbmm_(A.unsqueeze(0).expand({C.size(0), A.size(0), A.size(1)}), B);
  }
}

// C[n] = A B[n] (C contiguous).
template <typename Launch>
inline void set_products(Tensor C, const Tensor& A, const Tensor& B, const Launch& launch) {
  if (C.size(0) == 1) {
    matmul_into(C.select(0, 0), A, B.select(0, 0), false, launch);
  } else {
    at::bmm_out(C, A.unsqueeze(0).expand({C.size(0), A.size(0), A.size(1)}), B);
  }
}

// out (N, C, H, W), acc type: every element = bias[c], or 0 without a bias.
inline void fill_bias(Tensor& out, const Tensor& bias_acc) {
  if (bias_acc.defined()) {
    out.copy_(bias_acc.view({1, -1, 1, 1}).expand_as(out));
  } else {
    out.zero_();
  }
}

// Weight rearranged for the per-kernel-row products: (groups, kh, Cog, kw * Cig) with
// [gi][ki][o][kj * Cig + c] = W[gi * Cog + o, c, ki, kj]: a run of taps [k0, k1) is the column block
// [k0 Cig, k1 Cig).
inline Tensor weight_by_kernel_row(const Tensor& w, int64_t groups) {
  const int64_t Co = w.size(0), Cig = w.size(1), kh = w.size(2), kw = w.size(3);
  return w.view({groups, Co / groups, Cig, kh, kw}).permute({0, 3, 1, 4, 2}).contiguous().view(
      {groups, kh, Co / groups, kw * Cig});
}

// ---- gemm-rows / gemm-1x1 geometry ----------------------------------------------------------------------
// With vertical stride 1, col row oh under kernel row ki reads image row h = oh - ph + ki * dh, and tap kj reads
// image column ow * sw + kj * dw - pw, which lies inside the image for the col columns [b, e) of col_range.
// Consecutive taps with the same [b, e) form a tap group. For each group the image rows are unfolded over those
// columns only: U[(kj - k0, c), r, o] = image[c, r, (b + o) sw + kj dw - pw], n = e - b columns, so the
// contribution of kernel row ki to col rows [oa, ob) is  W_ki,group (Cog x taps Cig) . U[:, rows oa - ph + ki dh
// ...] over (ob - oa) * n contiguous columns, and neither vertical nor horizontal zero padding is ever multiplied
// (a 3x3 rate-12 kernel on a 33-wide map: the side taps reach 21 of the 33 columns). A group over all Wo columns
// writes the col rows in place; a narrower one accumulates into an (n)-column buffer added to its columns. A
// single tap reading column ow itself (the centre tap of a "same" padded kernel, every 1x1) reads the image in
// place: no unfold.

struct TapGroup {
  int64_t k0, k1;  // taps [k0, k1)
  int64_t b, e;    // col columns [b, e), never empty
  int64_t taps() const { return k1 - k0; }
  int64_t n() const { return e - b; }
  int64_t offset(int64_t kj, const Geom& g) const { return b * g.sw + kj * g.dw - g.pw; }  // image column of b
  bool full(const Geom& g) const { return b == 0 && e == g.Wo; }
  // the unfold is the image itself (rows of W = Wo pixels)
  bool in_place(const Geom& g) const {
    return taps() == 1 && full(g) && g.sw == 1 && offset(k0, g) == 0 && g.W == g.Wo;
  }
};

inline std::vector<TapGroup> tap_groups(const Geom& g) {
  std::vector<TapGroup> groups;
  for (int64_t kj = 0; kj < g.kw; ++kj) {
    int64_t b, e;
    col_range<int64_t>(kj * g.dw - g.pw, g.sw, 0, g.W, g.Wo, &b, &e);
    if (e <= b) continue;  // a tap that only meets zero padding
    if (!groups.empty() && groups.back().k1 == kj && groups.back().b == b && groups.back().e == e) {
      groups.back().k1 = kj + 1;
    } else {
      groups.push_back(TapGroup{kj, kj + 1, b, e});
    }
  }
  return groups;
}

// Col rows of kernel row ki that read image rows inside [0, H), intersected with [a, b).
inline std::pair<int64_t, int64_t> tap_rows(const Geom& g, int64_t ki, int64_t a, int64_t b) {
  const int64_t lo = std::max(a, g.ph - ki * g.dh), hi = std::min(b, g.H + g.ph - ki * g.dh);
  return {lo, std::max(lo, hi)};
}

// Image rows [r0, r1) that col rows [a, b) read through any kernel row (clipped to the image).
inline std::pair<int64_t, int64_t> image_rows(const Geom& g, int64_t a, int64_t b) {
  const int64_t r0 = std::max<int64_t>(0, a - g.ph), r1 = std::min(g.H, b - 1 - g.ph + (g.kh - 1) * g.dh + 1);
  return {r0, std::max(r0, r1)};
}

// Col rows [c0, c1) that image rows [a, b) are reached from through any kernel row (clipped to the col).
inline std::pair<int64_t, int64_t> col_rows(const Geom& g, int64_t a, int64_t b) {
  const int64_t c0 = std::max<int64_t>(0, a + g.ph - (g.kh - 1) * g.dh), c1 = std::min(g.Ho, b + g.ph);
  return {c0, std::max(c0, c1)};
}

// The group's unfold of image rows [r0, r1) of samples [n0, n0 + samples), channels [c0, c0 + Cig) into
// U (taps Cig, samples, R n), cast to the accumulation type.
inline void unfold_group(const Tensor& img, int64_t n0, int64_t samples, int64_t c0, int64_t Cig, const Geom& g,
                         const TapGroup& grp, int64_t r0, int64_t r1, const Tensor& U) {
  const int64_t R = r1 - r0, n = grp.n(), plane = Cig * samples * R * n;
  const Tensor rows = img.narrow(0, n0, samples).narrow(1, c0, Cig).narrow(2, r0, R);
  for (int64_t kj = grp.k0; kj < grp.k1; ++kj) {
    const int64_t first = grp.offset(kj, g);
    U.narrow(0, (kj - grp.k0) * plane, plane)
        .view({Cig, samples, R, n})
        .transpose(0, 1)
        .copy_(rows.slice(3, first, first + (n - 1) * g.sw + 1, g.sw));
  }
}

// Columns [b, e) of col rows [r0, r1) of samples [n0, n0 + samples), channels [c0, c0 + C) into
// D (samples, C, R n).
inline void gather_columns(const Tensor& col, int64_t n0, int64_t samples, int64_t c0, int64_t C,
                           const TapGroup& grp, int64_t r0, int64_t r1, const Tensor& D) {
  D.narrow(0, 0, samples * C * (r1 - r0) * grp.n())
      .view({samples, C, r1 - r0, grp.n()})
      .copy_(col.narrow(0, n0, samples).narrow(1, c0, C).narrow(2, r0, r1 - r0).narrow(3, grp.b, grp.n()));
}

// Rows [j0, j0 + rows) of a buffer laid out (samples, C, R n) as the batch of (C, rows n) matrices.
inline Tensor buffer_matrices(const Tensor& D, int64_t samples, int64_t C, int64_t R, int64_t n, int64_t j0,
                              int64_t rows) {
  return D.as_strided({samples, C, rows * n}, {C * R * n, R * n, 1}, D.storage_offset() + j0 * n);
}

// U (taps Cig, samples, R n) as the batch of (taps Cig, rows n) matrices starting at its row j0.
inline Tensor unfold_matrices(const Tensor& U, int64_t samples, int64_t KC, int64_t R, int64_t n, int64_t j0,
                              int64_t rows) {
  return U.as_strided({samples, KC, rows * n}, {R * n, samples * R * n, 1}, U.storage_offset() + j0 * n);
}

// Rows per block, so that `per_row` scratch elements for each of the block's rows and its `halo` rows fit the
// launcher's scratch; every row in one block when nothing needs scratch. At least as many rows as the halo, so
// that no row is unfolded more than twice.
template <typename Launch>
int64_t rows_per_block(int64_t per_row, int64_t halo, int64_t total_rows, const Launch& launch) {
  if (per_row == 0) return std::max<int64_t>(total_rows, 1);
  const int64_t fit = launch.scratch_elements() / per_row;
  return std::min(std::max<int64_t>({fit - halo, halo, 1}), std::max<int64_t>(total_rows, 1));
}

// The blocking of a gemm-rows pass that reads image rows through the tap groups (correlate, weight gradient):
// which groups read the image in place, the scratch per row (unfolds with their halo; an n-column col-side
// buffer for each group narrower than the output), samples per chunk, col rows per block, and the flops of a chunk.
struct RowsPass {
  std::vector<TapGroup> tg;
  std::vector<char> in_place;
  int64_t halo = 0, chunk_samples = 1, block = 1;
  double work = 0;
};

template <typename T, typename A, typename Launch>
RowsPass image_rows_pass(const Tensor& img, const Geom& g, int64_t Cig, int64_t Cog, const Launch& launch) {
  RowsPass r;
  r.tg = tap_groups(g);
  r.in_place.resize(r.tg.size());
  r.halo = (g.kh - 1) * g.dh;
  const bool img_flat = std::is_same<T, A>::value && pixel_stride(img) >= 0;
  int64_t unfold_row = 0, col_row = 0;  // scratch elements per row and sample
  for (size_t i = 0; i < r.tg.size(); ++i) {
    r.in_place[i] = img_flat && r.tg[i].in_place(g);
    if (!r.in_place[i]) unfold_row += r.tg[i].taps() * Cig * r.tg[i].n();
    if (!r.tg[i].full(g)) col_row += Cog * r.tg[i].n();
  }
  const int64_t per_sample = unfold_row * (g.Ho + r.halo) + col_row * g.Ho;
  r.chunk_samples = launch.batch(img.size(0), std::max<int64_t>(per_sample, 1));
  r.block = rows_per_block((unfold_row + col_row) * r.chunk_samples, r.halo, g.Ho, launch);
  for (const TapGroup& grp : r.tg) r.work += 2.0 * r.chunk_samples * Cog * grp.taps() * Cig * g.kh * g.Ho * grp.n();
  return r;
}

// ---- correlate: image (N, C_img, H, W) -> col (N, C_col, Ho, Wo), weight (C_col, C_img / groups, kh, kw) ----

template <typename T, typename A, typename Launch>
void correlate_rows(const Tensor& img, const Tensor& w, const Tensor& bias_acc, Tensor& out, const Geom& g,
                    int64_t groups, const Launch& launch) {
  const int64_t N = img.size(0), Ci = img.size(1), Co = w.size(0), Cig = Ci / groups, Cog = Co / groups;
  const Tensor wr = weight_by_kernel_row(w, groups);
  const RowsPass rp = image_rows_pass<T, A>(img, g, Cig, Cog, launch);
  const std::vector<TapGroup>& tg = rp.tg;
  const std::vector<char>& in_place = rp.in_place;
  const int64_t halo = rp.halo, chunk_samples = rp.chunk_samples, block = rp.block;
  fill_bias(out, bias_acc);
  const int64_t chunks = (N + chunk_samples - 1) / chunk_samples;
  launch.over_items(chunks, rp.work * groups, [&](int64_t q0, int64_t q1) {
    std::vector<Tensor> U(tg.size()), acc(tg.size());
    for (size_t i = 0; i < tg.size(); ++i) {
      if (!in_place[i])
        U[i] = at::empty({tg[i].taps() * Cig * chunk_samples * (block + halo) * tg[i].n()}, out.options());
      if (!tg[i].full(g)) acc[i] = at::empty({chunk_samples * Cog * block * tg[i].n()}, out.options());
    }
    for (int64_t q = q0; q < q1; ++q) {
      const int64_t n0 = q * chunk_samples, samples = std::min(chunk_samples, N - n0);
      for (int64_t gi = 0; gi < groups; ++gi) {
        for (int64_t a = 0; a < g.Ho; a += block) {
          const int64_t b = std::min(g.Ho, a + block), R = b - a;
          const auto [r0, r1] = image_rows(g, a, b);
          if (r1 <= r0) continue;  // these col rows only meet zero padding: the bias
          for (size_t i = 0; i < tg.size(); ++i) {
            const TapGroup& grp = tg[i];
            const int64_t n = grp.n(), KC = grp.taps() * Cig;
            if (!in_place[i]) unfold_group(img, n0, samples, gi * Cig, Cig, g, grp, r0, r1, U[i]);
            Tensor acc_b;  // (samples, Cog, R n): this block's sum over the kernel rows, for the group's columns
            if (!grp.full(g)) {
              acc_b = acc[i].narrow(0, 0, samples * Cog * R * n);
              acc_b.zero_();
            }
            const Tensor wg = wr[gi].narrow(2, grp.k0 * Cig, KC);
            for (int64_t ki = 0; ki < g.kh; ++ki) {
              const auto [oa, ob] = tap_rows(g, ki, a, b);
              if (ob <= oa) continue;
              const int64_t h0 = oa - g.ph + ki * g.dh;
              Tensor C = grp.full(g) ? rows_matrices(out, n0, samples, gi * Cog, Cog, oa, ob - oa)
                                     : buffer_matrices(acc_b, samples, Cog, R, n, oa - a, ob - oa);
              Tensor B = in_place[i] ? rows_matrices(img, n0, samples, gi * Cig, Cig, h0, ob - oa)
                                     : unfold_matrices(U[i], samples, KC, r1 - r0, n, h0 - r0, ob - oa);
              add_products(C, wg[ki], B, launch);
            }
            if (!grp.full(g)) {
              out.narrow(0, n0, samples).narrow(1, gi * Cog, Cog).narrow(2, a, R).narrow(3, grp.b, n).add_(
                  acc_b.view({samples, Cog, R, n}));
            }
          }
        }
      }
    }
  });
}

template <typename T, typename A, typename Launch>
void correlate_im2col(const Tensor& img, const Tensor& w, const Tensor& bias_acc, Tensor& out, const Geom& g,
                      int64_t groups, const Launch& launch) {
  const int64_t N = img.size(0), Ci = img.size(1), Co = w.size(0), Cig = Ci / groups, Cog = Co / groups;
  const int64_t K = g.kh * g.kw, L = g.Ho * g.Wo;
  const Tensor weight_mat = w.view({groups, Cog, Cig * K});
  const int64_t chunk_samples = launch.batch(N, Cig * K * L);
  const int64_t block_rows = std::max<int64_t>(
      1, std::min<int64_t>(g.Ho, launch.scratch_elements() / std::max<int64_t>(1, Cig * K * g.Wo * chunk_samples)));
  fill_bias(out, bias_acc);
  const int64_t chunks = (N + chunk_samples - 1) / chunk_samples;
  launch.over_items(chunks, 2.0 * chunk_samples * Co * Cig * K * L, [&](int64_t q0, int64_t q1) {
    Tensor col = at::empty({Cig * K * chunk_samples * block_rows * g.Wo}, out.options());
    for (int64_t q = q0; q < q1; ++q) {
      const int64_t n0 = q * chunk_samples, samples = std::min(chunk_samples, N - n0);
      for (int64_t gi = 0; gi < groups; ++gi) {
        for (int64_t a = 0; a < g.Ho; a += block_rows) {
          const int64_t rows = std::min(block_rows, g.Ho - a);
          Geom gb = g;  // col rows [a, a + rows) are the correlation with ph shifted by a * sh
          gb.Ho = rows;
          gb.ph = g.ph - a * g.sh;
          const int64_t items = Cig * K * samples * rows;
          launch.with_index(fits_int32({extent(img), col.numel(), items * g.Wo}), [&](auto index) {
            using I = decltype(index);
            const I seg = static_cast<I>(launch.segment(g.Wo));
            Im2Col<T, A, I> f{img.data_ptr<T>() + n0 * img.stride(0) + gi * Cig * img.stride(1),
                              I(img.stride(0)), I(img.stride(1)), I(img.stride(2)), I(img.stride(3)),
                              col.data_ptr<A>(), I(samples), I(Cig), gb.as<I>(), seg};
            launch(items * n_segments<int64_t>(g.Wo, seg), f, seg);
          });
          Tensor B = col.as_strided({samples, Cig * K, rows * g.Wo}, {rows * g.Wo, samples * rows * g.Wo, 1});
          add_products(rows_matrices(out, n0, samples, gi * Cog, Cog, a, rows), weight_mat[gi], B, launch);
        }
      }
    }
  });
}

template <typename T, typename A, typename Launch>
void depthwise_correlate(const Tensor& img, const Tensor& w, const Tensor& bias_acc, Tensor& out, const Geom& g,
                         const Launch& launch) {
  const int64_t N = img.size(0), C = img.size(1);
  const int64_t items = N * C * g.Ho;
  launch.with_index(fits_int32({extent(img), out.numel(), items * g.Wo}), [&](auto index) {
    using I = decltype(index);
    const I seg = static_cast<I>(launch.segment(g.Wo));
    const GeomT<I> gi = g.as<I>();
    DwCorrelate<T, A, I> f{img.data_ptr<T>(), I(img.stride(0)), I(img.stride(1)), I(img.stride(2)),
                           I(img.stride(3)), w.data_ptr<A>(), ptr_or_null<A>(bias_acc), out.data_ptr<A>(),
                           I(C), gi, seg};
    launch(items * n_segments<int64_t>(g.Wo, seg), f, seg * g.kh * g.kw);
  });
}

template <typename Launch>
Tensor correlate(const Tensor& img, const Tensor& weight, const Tensor& bias_acc, const Geom& g, int64_t groups,
                 const Launch& launch) {
  const int64_t N = img.size(0), Ci = img.size(1), Co = weight.size(0);
  const auto acc = acc_dtype(img);
  Tensor out = at::empty({N, Co, g.Ho, g.Wo}, img.options().dtype(acc));
  if (out.numel() == 0) return out.to(img.scalar_type());
  const Tensor w = weight.to(acc).contiguous();
  by_family(
      family_of(g, is_depthwise(Ci, Co, groups, weight)), img.scalar_type(),
      [&](auto t, auto a) { depthwise_correlate<decltype(t), decltype(a)>(img, w, bias_acc, out, g, launch); },
      [&](auto t, auto a) { correlate_im2col<decltype(t), decltype(a)>(img, w, bias_acc, out, g, groups, launch); },
      [&](auto t, auto a) { correlate_rows<decltype(t), decltype(a)>(img, w, bias_acc, out, g, groups, launch); });
  return out.to(img.scalar_type());
}

// ---- adjoint: col (N, C_col, Ho, Wo) -> image (N, C_img, H, W), the exact transpose of correlate ---------------

template <typename T, typename A, typename Launch>
void adjoint_rows(const Tensor& col, const Tensor& w, const Tensor& bias_acc, Tensor& out, const Geom& g,
                  int64_t groups, const Launch& launch) {
  const int64_t N = col.size(0), Co = col.size(1), Cig = w.size(1), Cog = Co / groups;
  const Tensor wr = weight_by_kernel_row(w, groups);
  const Tensor colA = col_operand(col, out.scalar_type());
  const std::vector<TapGroup> tg = tap_groups(g);
  // Blocks run over image rows [a, b); a group's products for them read col rows col_rows(a, b) (a halo of
  // (kh - 1) dh rows) and write V (taps Cig, R n) -- the image rows themselves for an in-place group -- which is
  // then added to the image columns its taps reach.
  const int64_t halo = (g.kh - 1) * g.dh;
  int64_t v_row = 0, gather_row = 0;  // scratch elements per row and sample
  for (const TapGroup& grp : tg) {
    if (!grp.in_place(g)) v_row += grp.taps() * Cig * grp.n();
    if (!grp.full(g)) gather_row += Cog * grp.n();
  }
  const int64_t per_sample = v_row * g.H + gather_row * (g.H + halo);
  const int64_t chunk_samples = launch.batch(N, std::max<int64_t>(per_sample, 1));
  const int64_t block = rows_per_block((v_row + gather_row) * chunk_samples, halo, g.H, launch);
  fill_bias(out, bias_acc);
  const int64_t chunks = (N + chunk_samples - 1) / chunk_samples;
  double work = 0;
  for (const TapGroup& grp : tg) work += 2.0 * chunk_samples * Co * grp.taps() * Cig * g.kh * g.Ho * grp.n();
  launch.over_items(chunks, work, [&](int64_t q0, int64_t q1) {
    std::vector<Tensor> V(tg.size()), D(tg.size());
    for (size_t i = 0; i < tg.size(); ++i) {
      if (!tg[i].in_place(g)) V[i] = at::empty({chunk_samples * tg[i].taps() * Cig * block * tg[i].n()}, out.options());
      if (!tg[i].full(g)) D[i] = at::empty({chunk_samples * Cog * (block + halo) * tg[i].n()}, out.options());
    }
    for (int64_t q = q0; q < q1; ++q) {
      const int64_t n0 = q * chunk_samples, samples = std::min(chunk_samples, N - n0);
      for (int64_t gi = 0; gi < groups; ++gi) {
        for (int64_t a = 0; a < g.H; a += block) {
          const int64_t b = std::min(g.H, a + block), R = b - a;
          const auto [c0, c1] = col_rows(g, a, b);
          if (c1 <= c0) continue;  // no col row reaches these image rows: the bias
          for (size_t i = 0; i < tg.size(); ++i) {
            const TapGroup& grp = tg[i];
            const int64_t n = grp.n(), KC = grp.taps() * Cig;
            if (!grp.full(g)) gather_columns(colA, n0, samples, gi * Cog, Cog, grp, c0, c1, D[i]);
            Tensor Vb;  // (samples, taps Cig, R n)
            if (!grp.in_place(g)) {
              Vb = V[i].narrow(0, 0, samples * KC * R * n);
              Vb.zero_();
            }
            const Tensor wg = wr[gi].narrow(2, grp.k0 * Cig, KC);
            for (int64_t ki = 0; ki < g.kh; ++ki) {
              // image rows h in [a, b) that col row oh = h + ph - ki dh (inside [0, Ho)) reaches
              const int64_t h_lo = std::max(a, ki * g.dh - g.ph), h_hi = std::min(b, g.Ho + ki * g.dh - g.ph);
              if (h_hi <= h_lo) continue;
              const int64_t oh0 = h_lo + g.ph - ki * g.dh;
              Tensor B = grp.full(g) ? rows_matrices(colA, n0, samples, gi * Cog, Cog, oh0, h_hi - h_lo)
                                     : buffer_matrices(D[i], samples, Cog, c1 - c0, n, oh0 - c0, h_hi - h_lo);
              Tensor C = grp.in_place(g) ? rows_matrices(out, n0, samples, gi * Cig, Cig, h_lo, h_hi - h_lo)
                                         : buffer_matrices(Vb, samples, KC, R, n, h_lo - a, h_hi - h_lo);
              add_products(C, wg[ki].t(), B, launch);
            }
            if (grp.in_place(g)) continue;
            const Tensor Vt = Vb.view({samples, KC, R, n});
            const Tensor rows = out.narrow(0, n0, samples).narrow(1, gi * Cig, Cig).narrow(2, a, R);
            for (int64_t kj = grp.k0; kj < grp.k1; ++kj) {
              const int64_t first = grp.offset(kj, g);
              rows.slice(3, first, first + (n - 1) * g.sw + 1, g.sw).add_(Vt.narrow(1, (kj - grp.k0) * Cig, Cig));
            }
          }
        }
      }
    }
  });
}

template <typename T, typename A, typename Launch>
void adjoint_im2col(const Tensor& col, const Tensor& w, const Tensor& bias_acc, Tensor& out, const Geom& g,
                    int64_t groups, const Launch& launch) {
  const int64_t N = col.size(0), Co = col.size(1), Cig = w.size(1), Ci = Cig * groups, Cog = Co / groups;
  const int64_t K = g.kh * g.kw, L = g.Ho * g.Wo;
  const Tensor weight_mat = w.view({groups, Cog, Cig * K});
  const Tensor colA = col_operand(col, out.scalar_type());
  const int64_t chunk_samples = launch.batch(N, Cig * K * L);
  const int64_t chunks = (N + chunk_samples - 1) / chunk_samples;
  launch.over_items(chunks, 2.0 * chunk_samples * Co * Cig * K * L, [&](int64_t q0, int64_t q1) {
    Tensor buf = at::empty({chunk_samples * Cig * K * L}, out.options());
    for (int64_t q = q0; q < q1; ++q) {
      const int64_t n0 = q * chunk_samples, samples = std::min(chunk_samples, N - n0);
      for (int64_t gi = 0; gi < groups; ++gi) {
        // buf (samples, Cig K, L) = W_g^T col[n, g]: written sample-major, read by Col2Im at those strides
        Tensor C = buf.narrow(0, 0, samples * Cig * K * L).view({samples, Cig * K, L});
        set_products(C, weight_mat[gi].t(), rows_matrices(colA, n0, samples, gi * Cog, Cog, 0, g.Ho), launch);
        const int64_t items = samples * Cig * g.H;
        launch.with_index(fits_int32({buf.numel(), out.numel(), items * g.W}), [&](auto index) {
          using I = decltype(index);
          const I seg = static_cast<I>(launch.segment(g.W));
          const GeomT<I> gi32 = g.as<I>();
          Col2Im<A, I> f{C.data_ptr<A>(), I(L), I(Cig * K * L), out.data_ptr<A>() + (n0 * Ci + gi * Cig) * g.H * g.W,
                         I(Ci * g.H * g.W), I(g.H * g.W),
                         bias_acc.defined() ? bias_acc.data_ptr<A>() + gi * Cig : nullptr, I(Cig), gi32, seg};
          launch(items * n_segments<int64_t>(g.W, seg), f, seg * g.kh * g.kw);
        });
      }
    }
  });
}

template <typename T, typename A, typename Launch>
void depthwise_adjoint(const Tensor& col, const Tensor& w, const Tensor& bias_acc, Tensor& out, const Geom& g,
                       const Launch& launch) {
  const int64_t N = col.size(0), C = out.size(1);
  const int64_t items = N * C * g.H;
  launch.with_index(fits_int32({extent(col), out.numel(), items * g.W}), [&](auto index) {
    using I = decltype(index);
    const I seg = static_cast<I>(launch.segment(g.W));
    const GeomT<I> gi = g.as<I>();
    DwAdjoint<T, A, I> f{col.data_ptr<T>(), I(col.stride(0)), I(col.stride(1)), I(col.stride(2)),
                         I(col.stride(3)), w.data_ptr<A>(), ptr_or_null<A>(bias_acc), out.data_ptr<A>(), I(C), gi,
                         seg};
    launch(items * n_segments<int64_t>(g.W, seg), f, seg * g.kh * g.kw);
  });
}

template <typename Launch>
Tensor adjoint(const Tensor& col, const Tensor& weight, const Tensor& bias_acc, const Geom& g, int64_t groups,
               const Launch& launch) {
  const int64_t N = col.size(0), Co = col.size(1), Cig = weight.size(1), Ci = Cig * groups;
  const auto acc = acc_dtype(col);
  Tensor out = at::empty({N, Ci, g.H, g.W}, col.options().dtype(acc));
  if (out.numel() == 0) return out.to(col.scalar_type());
  const Tensor w = weight.to(acc).contiguous();
  by_family(
      family_of(g, is_depthwise(Ci, Co, groups, weight)), col.scalar_type(),
      [&](auto t, auto a) { depthwise_adjoint<decltype(t), decltype(a)>(col, w, bias_acc, out, g, launch); },
      [&](auto t, auto a) { adjoint_im2col<decltype(t), decltype(a)>(col, w, bias_acc, out, g, groups, launch); },
      [&](auto t, auto a) { adjoint_rows<decltype(t), decltype(a)>(col, w, bias_acc, out, g, groups, launch); });
  return out.to(col.scalar_type());
}

// ---- weight gradient: dW (C_col, C_img / groups, kh, kw) = sum_n col[n] (x) unfold(image[n]) ------------------

// Runs body(q, dW_part) over the sample chunks q of a weight gradient, adding every chunk's contribution to dW in
// chunk order: chunks that may run in parallel (launch.over_items) each fill a part of their own, summed in chunk
// order afterwards, so the result does not depend on which chunks ran on which thread. Whether parts are used
// depends on the shapes only.
template <typename Launch, typename Body>
void accumulate_chunks(Tensor& dW, int64_t chunks, double flops, const Launch& launch, const Body& body) {
  // one part per chunk when that is affordable; otherwise the chunks run one after the other into dW
  const bool parts = chunks > 1 && chunks * dW.numel() <= launch.scratch_elements();
  if (!parts) {
    for (int64_t q = 0; q < chunks; ++q) body(q, dW);
    return;
  }
  Tensor part = at::zeros({chunks, dW.numel()}, dW.options());
  launch.over_items(chunks, flops, [&](int64_t q0, int64_t q1) {
    for (int64_t q = q0; q < q1; ++q) {
      Tensor p = part[q].view(dW.sizes());
      body(q, p);
    }
  });
  dW.add_(part.sum(0).view(dW.sizes()));
}

// dst (M, K) += sum_n C[n] B[n]^T over the matrices of C (samples, M, N) and B (samples, K, N).
template <typename Launch>
inline void add_gram(Tensor dst, const Tensor& C, const Tensor& B, const Launch& launch) {
  if (C.size(0) == 1) {
    matmul_into(dst, C.select(0, 0), B.select(0, 0).t(), true, launch);
  } else {
    dst.add_(at::bmm(C, B.transpose(1, 2)).sum(0));
  }
}

template <typename T, typename A, typename Launch>
Tensor weight_grad_rows(const Tensor& img, const Tensor& col, const Geom& g, int64_t groups, const Launch& launch) {
  const int64_t N = img.size(0), Ci = img.size(1), Co = col.size(1), Cig = Ci / groups, Cog = Co / groups;
  const auto acc = c10::CppTypeToScalarType<A>::value;
  const Tensor colA = col_operand(col, acc);
  const RowsPass rp = image_rows_pass<T, A>(img, g, Cig, Cog, launch);
  const std::vector<TapGroup>& tg = rp.tg;
  const std::vector<char>& in_place = rp.in_place;
  const int64_t halo = rp.halo, chunk_samples = rp.chunk_samples, block = rp.block;
  Tensor dwr = at::zeros({groups, g.kh, Cog, g.kw * Cig}, img.options().dtype(acc));
  const int64_t chunks = (N + chunk_samples - 1) / chunk_samples;
  accumulate_chunks(dwr, chunks, rp.work * groups, launch, [&](int64_t q, Tensor& dst) {
    std::vector<Tensor> U(tg.size()), D(tg.size());
    for (size_t i = 0; i < tg.size(); ++i) {
      if (!in_place[i])
        U[i] = at::empty({tg[i].taps() * Cig * chunk_samples * (block + halo) * tg[i].n()}, dst.options());
      if (!tg[i].full(g)) D[i] = at::empty({chunk_samples * Cog * block * tg[i].n()}, dst.options());
    }
    const int64_t n0 = q * chunk_samples, samples = std::min(chunk_samples, N - n0);
    for (int64_t gi = 0; gi < groups; ++gi) {
      for (int64_t a = 0; a < g.Ho; a += block) {
        const int64_t b = std::min(g.Ho, a + block), R = b - a;
        const auto [r0, r1] = image_rows(g, a, b);
        if (r1 <= r0) continue;
        for (size_t i = 0; i < tg.size(); ++i) {
          const TapGroup& grp = tg[i];
          const int64_t n = grp.n(), KC = grp.taps() * Cig;
          if (!in_place[i]) unfold_group(img, n0, samples, gi * Cig, Cig, g, grp, r0, r1, U[i]);
          if (!grp.full(g)) gather_columns(colA, n0, samples, gi * Cog, Cog, grp, a, b, D[i]);
          for (int64_t ki = 0; ki < g.kh; ++ki) {
            const auto [oa, ob] = tap_rows(g, ki, a, b);
            if (ob <= oa) continue;
            const int64_t h0 = oa - g.ph + ki * g.dh;
            Tensor Cm = grp.full(g) ? rows_matrices(colA, n0, samples, gi * Cog, Cog, oa, ob - oa)
                                    : buffer_matrices(D[i], samples, Cog, R, n, oa - a, ob - oa);
            Tensor B = in_place[i] ? rows_matrices(img, n0, samples, gi * Cig, Cig, h0, ob - oa)
                                   : unfold_matrices(U[i], samples, KC, r1 - r0, n, h0 - r0, ob - oa);
            add_gram(dst[gi][ki].narrow(1, grp.k0 * Cig, KC), Cm, B, launch);
          }
        }
      }
    }
  });
  // (groups, kh, Cog, kw, Cig) -> (Co, Cig, kh, kw)
  return dwr.view({groups, g.kh, Cog, g.kw, Cig}).permute({0, 2, 4, 1, 3}).contiguous().view({Co, Cig, g.kh, g.kw});
}

template <typename T, typename A, typename Launch>
Tensor weight_grad_im2col(const Tensor& img, const Tensor& col, const Geom& g, int64_t groups, const Launch& launch) {
  const int64_t N = img.size(0), Ci = img.size(1), Co = col.size(1), Cig = Ci / groups, Cog = Co / groups;
  const int64_t K = g.kh * g.kw, L = g.Ho * g.Wo;
  const auto acc = c10::CppTypeToScalarType<A>::value;
  const Tensor colA = col_operand(col, acc);
  const int64_t chunk_samples = launch.batch(N, Cig * K * L);
  const int64_t block_rows = std::max<int64_t>(
      1, std::min<int64_t>(g.Ho, launch.scratch_elements() / std::max<int64_t>(1, Cig * K * g.Wo * chunk_samples)));
  Tensor gw = at::zeros({groups, Cog, Cig * K}, img.options().dtype(acc));
  const int64_t chunks = (N + chunk_samples - 1) / chunk_samples;
  accumulate_chunks(gw, chunks, 2.0 * chunk_samples * Co * Cig * K * L, launch, [&](int64_t q, Tensor& dst) {
    Tensor buf = at::empty({Cig * K * chunk_samples * block_rows * g.Wo}, dst.options());
    const int64_t n0 = q * chunk_samples, samples = std::min(chunk_samples, N - n0);
    for (int64_t gi = 0; gi < groups; ++gi) {
      for (int64_t a = 0; a < g.Ho; a += block_rows) {
        const int64_t rows = std::min(block_rows, g.Ho - a);
        Geom gb = g;
        gb.Ho = rows;
        gb.ph = g.ph - a * g.sh;
        const int64_t items = Cig * K * samples * rows;
        launch.with_index(fits_int32({extent(img), buf.numel(), items * g.Wo}), [&](auto index) {
          using I = decltype(index);
          const I seg = static_cast<I>(launch.segment(g.Wo));
          Im2Col<T, A, I> f{img.data_ptr<T>() + n0 * img.stride(0) + gi * Cig * img.stride(1), I(img.stride(0)),
                            I(img.stride(1)), I(img.stride(2)), I(img.stride(3)), buf.data_ptr<A>(), I(samples), I(Cig),
                            gb.as<I>(), seg};
          launch(items * n_segments<int64_t>(g.Wo, seg), f, seg);
        });
        Tensor B = buf.as_strided({samples, Cig * K, rows * g.Wo}, {rows * g.Wo, samples * rows * g.Wo, 1});
        add_gram(dst[gi], rows_matrices(colA, n0, samples, gi * Cog, Cog, a, rows), B, launch);
      }
    }
  });
  return gw.view({Co, Cig, g.kh, g.kw});
}

template <typename T, typename A, typename Launch>
Tensor depthwise_weight_grad(const Tensor& img, const Tensor& col, const Geom& g, const Launch& launch) {
  const int64_t N = img.size(0), C = img.size(1), K = g.kh * g.kw;
  const auto acc = c10::CppTypeToScalarType<A>::value;
  const int64_t seg = launch.segment(g.Wo);
  if (seg == g.Wo && g.dw == 1 && g.kw <= DwWeightGradRows<T, A, int64_t>::kMaxKw) {
    // whole-row work items: one per (c, ki), kw accumulators, one pass over the rows (contiguous image runs)
    Tensor part = at::empty({C, 1, g.kh, g.kw}, img.options().dtype(acc));
    DwWeightGradRows<T, A, int64_t> f{img.data_ptr<T>(), img.stride(0), img.stride(1), img.stride(2),
                                      img.stride(3), col.data_ptr<T>(), col.stride(0), col.stride(1),
                                      col.stride(2), col.stride(3), part.data_ptr<A>(), N, C, g};
    launch(C * g.kh, f, N * g.Ho * g.Wo * g.kw);
    return part;
  }
  const int64_t rows = N * g.Ho, work = C * K;
  // whole-row items: one chunk per (c, k) unless that leaves threads idle; element items: ~2048 products each
  int64_t rows_per_chunk = seg == g.Wo ? (work >= 64 ? rows : std::max<int64_t>(1, rows * work / 64))
                                       : std::max<int64_t>(1, 2048 / std::max<int64_t>(g.Wo, 1));
  rows_per_chunk = std::max<int64_t>(1, std::min<int64_t>(rows_per_chunk, std::max<int64_t>(rows, 1)));
  const int64_t nchunk = std::max<int64_t>(1, (rows + rows_per_chunk - 1) / rows_per_chunk);
  Tensor part = at::empty({C, K, nchunk}, img.options().dtype(acc));
  launch.with_index(fits_int32({extent(img), extent(col), part.numel()}), [&](auto index) {
    using I = decltype(index);
    DwWeightGrad<T, A, I> f{img.data_ptr<T>(), I(img.stride(0)), I(img.stride(1)), I(img.stride(2)),
                            I(img.stride(3)), col.data_ptr<T>(), I(col.stride(0)), I(col.stride(1)),
                            I(col.stride(2)), I(col.stride(3)), part.data_ptr<A>(), I(N), I(C), g.as<I>(),
                            I(rows_per_chunk), I(nchunk)};
    launch(C * K * nchunk, f, rows_per_chunk * g.Wo);
  });
  return nchunk == 1 ? part.view({C, 1, g.kh, g.kw}) : at::sum(part, {2}).view({C, 1, g.kh, g.kw});
}

// dW (C_col, C_img / groups, kh, kw) = sum_n col[n] (x) im2col(image[n]), in the input dtype.
template <typename Launch>
Tensor weight_grad(const Tensor& img, const Tensor& col, const Geom& g, int64_t groups, const Launch& launch) {
  const int64_t Ci = img.size(1), Co = col.size(1);
  const bool dw = groups == Ci && groups == Co;
  Tensor gw;
  by_family(
      family_of(g, dw), img.scalar_type(),
      [&](auto t, auto a) { gw = depthwise_weight_grad<decltype(t), decltype(a)>(img, col, g, launch); },
      [&](auto t, auto a) { gw = weight_grad_im2col<decltype(t), decltype(a)>(img, col, g, groups, launch); },
      [&](auto t, auto a) { gw = weight_grad_rows<decltype(t), decltype(a)>(img, col, g, groups, launch); });
  return gw.to(img.scalar_type());
}

inline Tensor bias_grad(const Tensor& grad_out) {
  return at::sum(grad_out, {0, 2, 3}, false, acc_dtype(grad_out)).to(grad_out.scalar_type());
}

// Gradients not asked for come back as empty (0,) tensors (the schema returns three Tensors).
inline std::tuple<Tensor, Tensor, Tensor> masked(const Tensor& gi, const Tensor& gw, const Tensor& gb,
                                                 const Tensor& like) {
  auto e = [&](const Tensor& t) { return t.defined() ? t : at::empty({0}, like.options()); };
  return std::make_tuple(e(gi), e(gw), e(gb));
}

// ---- the vendor's convolution (ATen: oneDNN / native kernels on the CPU, cuDNN on CUDA) ------------------------
// The ops' `route` argument: forward op bit 0 = vendor forward (bit 1, vendor backward, is for the autograd
// formula in Python); backward op 1 = vendor backward. Results are made contiguous, as segops' kernels return them.

inline bool vendor_forward(int64_t kernel) { return (kernel & 1) != 0; }
inline bool vendor_backward(int64_t kernel) { return kernel == 1; }

inline Tensor vendor_convolution(const Tensor& input, const Tensor& weight, const c10::optional<Tensor>& bias,
                                 const Args& a, bool transposed) {
  SEGOPS_CONV_RANGE("segops::conv/vendor");
  const int64_t stride[2] = {a.sh, a.sw}, padding[2] = {a.ph, a.pw}, dilation[2] = {a.dh, a.dw};
  const int64_t output_padding[2] = {a.oph, a.opw};
  return at::convolution(input, weight, bias, stride, padding, dilation, transposed, output_padding, a.groups)
      .contiguous();
}

inline std::tuple<Tensor, Tensor, Tensor> vendor_convolution_backward(const Tensor& grad, const Tensor& input,
                                                                      const Tensor& weight, const Args& a,
                                                                      bool transposed, int64_t n_bias,
                                                                      std::array<bool, 3> mask) {
  SEGOPS_CONV_RANGE("segops::conv/vendor");
  const int64_t stride[2] = {a.sh, a.sw}, padding[2] = {a.ph, a.pw}, dilation[2] = {a.dh, a.dw};
  const int64_t output_padding[2] = {a.oph, a.opw}, bias_sizes[1] = {n_bias};
  auto [gi, gw, gb] = at::convolution_backward(grad, input, weight, at::IntArrayRef(bias_sizes, 1), stride, padding,
                                               dilation, transposed, output_padding, a.groups, mask);
  return masked(mask[0] ? gi.contiguous() : Tensor(), mask[1] ? gw.contiguous() : Tensor(),
                mask[2] ? gb : Tensor(), input);
}

// ---- ops ---------------------------------------------------------------------------------------------

template <typename Launch>
Tensor atrous_forward(const Tensor& input, const Tensor& weight, const c10::optional<Tensor>& bias,
                      at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                      int64_t kernel, const Launch& launch) {
  const char* op = "atrous_conv2d";
  const int64_t zero[2] = {0, 0};
  Args a = make_args(op, stride, padding, dilation, at::IntArrayRef(zero, 2), groups);
  check_tensors(op, input, weight, bias, weight.size(0), "out_channels");
  Geom g = atrous_geom(op, input, weight, a);
  if (vendor_forward(kernel) && input.numel() > 0 && weight.numel() > 0) {
    return vendor_convolution(input, weight, bias, a, false);
  }
  return correlate(input, weight, opt_acc(bias, acc_dtype(input)), g, groups, launch);
}

template <typename Launch>
std::tuple<Tensor, Tensor, Tensor> atrous_backward(const Tensor& grad_out, const Tensor& input, const Tensor& weight,
                                                   at::IntArrayRef stride, at::IntArrayRef padding,
                                                   at::IntArrayRef dilation, int64_t groups,
                                                   std::array<bool, 3> mask, int64_t kernel, const Launch& launch) {
  const char* op = "_atrous_conv2d_backward";
  const int64_t zero[2] = {0, 0};
  Args a = make_args(op, stride, padding, dilation, at::IntArrayRef(zero, 2), groups);
  check_tensors(op, input, weight, c10::nullopt, 0, "");
  Geom g = atrous_geom(op, input, weight, a);
  TORCH_CHECK(grad_out.dim() == 4 && grad_out.size(0) == input.size(0) && grad_out.size(1) == weight.size(0) &&
                  grad_out.size(2) == g.Ho && grad_out.size(3) == g.Wo,
              op, ": grad_output must have shape (", input.size(0), ", ", weight.size(0), ", ", g.Ho, ", ", g.Wo,
              "), got ", grad_out.sizes());
  Tensor go = grad_out.to(input.scalar_type());
  if (vendor_backward(kernel) && input.numel() > 0 && weight.numel() > 0) {
    return vendor_convolution_backward(go, input, weight, a, false, weight.size(0), mask);
  }
  Tensor gi, gw, gb;
  if (mask[0]) gi = adjoint(go, weight, Tensor(), g, groups, launch);
  if (mask[1]) gw = weight_grad(input, go, g, groups, launch);
  if (mask[2]) gb = bias_grad(go);
  return masked(gi, gw, gb, input);
}

template <typename Launch>
Tensor transpose_forward(const Tensor& input, const Tensor& weight, const c10::optional<Tensor>& bias,
                         at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef output_padding,
                         int64_t groups, at::IntArrayRef dilation, int64_t kernel, const Launch& launch) {
  const char* op = "conv_transpose2d";
  Args a = make_args(op, stride, padding, dilation, output_padding, groups);
  check_tensors(op, input, weight, bias, weight.dim() == 4 ? weight.size(1) * groups : 0, "out_channels");
  Geom g = transpose_geom(op, input, weight, a);
  if (vendor_forward(kernel) && input.numel() > 0 && weight.numel() > 0) {
    return vendor_convolution(input, weight, bias, a, true);
  }
  return adjoint(input, weight, opt_acc(bias, acc_dtype(input)), g, groups, launch);
}

template <typename Launch>
std::tuple<Tensor, Tensor, Tensor> transpose_backward(const Tensor& grad_out, const Tensor& input,
                                                      const Tensor& weight, at::IntArrayRef stride,
                                                      at::IntArrayRef padding, at::IntArrayRef output_padding,
                                                      int64_t groups, at::IntArrayRef dilation,
                                                      std::array<bool, 3> mask, int64_t kernel,
                                                      const Launch& launch) {
  const char* op = "_conv_transpose2d_backward";
  Args a = make_args(op, stride, padding, dilation, output_padding, groups);
  check_tensors(op, input, weight, c10::nullopt, 0, "");
  Geom g = transpose_geom(op, input, weight, a);
  const int64_t cout = weight.size(1) * groups;
  TORCH_CHECK(grad_out.dim() == 4 && grad_out.size(0) == input.size(0) && grad_out.size(1) == cout &&
                  grad_out.size(2) == g.H && grad_out.size(3) == g.W,
              op, ": grad_output must have shape (", input.size(0), ", ", cout, ", ", g.H, ", ", g.W, "), got ",
              grad_out.sizes());
  Tensor go = grad_out.to(input.scalar_type());
  if (vendor_backward(kernel) && input.numel() > 0 && weight.numel() > 0) {
    return vendor_convolution_backward(go, input, weight, a, true, cout, mask);
  }
  Tensor gi, gw, gb;
  if (mask[0]) gi = correlate(go, weight, Tensor(), g, groups, launch);
  if (mask[1]) gw = weight_grad(go, input, g, groups, launch);
  if (mask[2]) gb = bias_grad(go);
  return masked(gi, gw, gb, input);
}

}  // namespace conv
}  // namespace segops
