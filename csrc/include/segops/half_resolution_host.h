// The CRF losses' half-resolution resize: F.interpolate(x, scale_factor=0.5, mode="bilinear",
// align_corners=False) of x (B, C, H, W). At exactly one half the bilinear source coordinate of output (i, j) is
// (2i + 0.5, 2j + 0.5): both weights are 1/2 in each direction, so every output is the mean of one 2x2 block
// and a trailing odd row / column is never read. The forward reads x once; the backward writes each element of
// the input gradient once (a quarter of the output gradient in each block, 0 on a trailing odd row / column)
// instead of ATen's zero fill plus scatter-add. Sums in acc_t (float for half / bfloat16) as
// 0.25 * ((x00 + x01) + (x10 + x11)): ATen's order for large outputs (bitwise its values at 512²); for small
// outputs and odd sizes ATen adds the four weighted terms in sequence, a last-bit difference.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>

#include <algorithm>

#include "segops/cpu_alloc.h"
#include "segops/parallel.h"

namespace segops {
namespace half_resolution {

// What the two directions share: the tensors, sizes and the work item's place. Item k covers positions
// [j0, j1) (output columns, or input column pairs) of row `row` = plane * rows_per_plane + r.
template <typename scalar_t, typename idx_t>
struct RowItems {
  const scalar_t* src;
  scalar_t* dst;
  idx_t H, W, Ho, Wo, seg, per_row;
  struct Place {
    idx_t row, j0, j1, plane, r;
  };
  SEGOPS_HD_INLINE Place place(index_t item, idx_t rows_per_plane) const {
    const idx_t i = static_cast<idx_t>(item);
    const idx_t row = i / per_row, j0 = (i - row * per_row) * seg, plane = row / rows_per_plane;
    return Place{row, j0, hd_min<idx_t>(j0 + seg, Wo), plane, row - plane * rows_per_plane};
  }
};

// Forward: outputs [j0, j1) of one output row (a whole row on the CPU, one output on CUDA).
template <typename scalar_t, typename idx_t>
struct Down : RowItems<scalar_t, idx_t> {
  SEGOPS_HD_INLINE void operator()(index_t item) const {
    using A = acc_t<scalar_t>;
    const auto p = this->place(item, this->Ho);
    const scalar_t* x0 = this->src + (p.plane * this->H + 2 * p.r) * this->W;
    const scalar_t* x1 = x0 + this->W;
    scalar_t* out = this->dst + p.row * this->Wo;
    for (idx_t j = p.j0; j < p.j1; ++j) {
      const A top = static_cast<A>(x0[2 * j]) + static_cast<A>(x0[2 * j + 1]);
      const A bottom = static_cast<A>(x1[2 * j]) + static_cast<A>(x1[2 * j + 1]);
      out[j] = static_cast<scalar_t>(A(0.25) * (top + bottom));
    }
  }
};

// Backward: column pairs [j0, j1) of one input row; the row's last item also writes the zero of a trailing odd
// column, and a trailing odd row is all zeros.
template <typename scalar_t, typename idx_t>
struct Up : RowItems<scalar_t, idx_t> {
  SEGOPS_HD_INLINE void operator()(index_t item) const {
    using A = acc_t<scalar_t>;
    const auto p = this->place(item, this->H);
    const idx_t W = this->W, Ho = this->Ho, Wo = this->Wo, j0 = p.j0, j1 = p.j1;
    scalar_t* out = this->dst + p.row * W;
    if (p.r >= 2 * Ho) {
      for (idx_t j = 2 * j0; j < (j1 == Wo ? W : 2 * j1); ++j) out[j] = scalar_t(0);
      return;
    }
    const scalar_t* src = this->src + (p.plane * Ho + p.r / 2) * Wo;
    for (idx_t j = j0; j < j1; ++j) {
      const scalar_t v = static_cast<scalar_t>(A(0.25) * static_cast<A>(src[j]));
      out[2 * j] = v;
      out[2 * j + 1] = v;
    }
    if (j1 == Wo)
      for (idx_t j = 2 * Wo; j < W; ++j) out[j] = scalar_t(0);
  }
};

inline void check_dtype(const char* op, const char* arg, const at::Tensor& t) {
  const auto s = t.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kDouble || s == at::kHalf || s == at::kBFloat16, op, ": ", arg,
              " must be float32, float64, float16 or bfloat16, got ", s);
}

// Body (Down or Up) over `rows` rows of the full-resolution (H, W) grid's outputs: work items of
// launch.segment(W / 2) outputs or column pairs (at least one item per row), 32-bit indices where they fit.
template <template <typename, typename> class Body, typename Launch>
void run_rows(const Launch& launch, const at::Tensor& src, const at::Tensor& dst, int64_t rows, int64_t H,
              int64_t W) {
  const int64_t Wo = W / 2, seg = launch.segment(Wo), per_row = Wo > 0 ? (Wo + seg - 1) / seg : 1;
  const bool fits32 = std::max(src.numel(), dst.numel()) < (int64_t(1) << 31) && rows * per_row < (int64_t(1) << 31);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "_half_resolution", [&] {
    const scalar_t* sp = src.data_ptr<scalar_t>();
    scalar_t* dp = dst.data_ptr<scalar_t>();
    launch.with_index(fits32, [&](auto tag) {
      using idx_t = decltype(tag);
      const Body<scalar_t, idx_t> body{
          {sp, dp, idx_t(H), idx_t(W), idx_t(H / 2), idx_t(Wo), idx_t(seg), idx_t(per_row)}};
      launch(rows * per_row, body, seg * 4);
    });
  });
}

template <typename Launch>
at::Tensor forward(const at::Tensor& x_in, const Launch& launch) {
  const char* op = "_half_resolution";
  TORCH_CHECK(x_in.dim() == 4, op, ": x must be (B, C, H, W), got ", x_in.dim(), " dimensions");
  check_dtype(op, "x", x_in);
  const at::Tensor x = x_in.contiguous();
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), Ho = H / 2, Wo = W / 2;
  at::Tensor y = empty_output({B, C, Ho, Wo}, x.options());
  if (y.numel() == 0) return y;
  run_rows<Down>(launch, x, y, B * C * Ho, H, W);
  return y;
}

template <typename Launch>
at::Tensor backward(const at::Tensor& grad_in, at::IntArrayRef size, const Launch& launch) {
  const char* op = "_half_resolution_backward";
  TORCH_CHECK(grad_in.dim() == 4, op, ": grad must be (B, C, H / 2, W / 2), got ", grad_in.dim(), " dimensions");
  check_dtype(op, "grad", grad_in);
  TORCH_CHECK(size.size() == 2 && size[0] >= 0 && size[1] >= 0, op, ": size must be the input's [H, W], got ",
              size);
  const int64_t B = grad_in.size(0), C = grad_in.size(1), H = size[0], W = size[1], Ho = H / 2, Wo = W / 2;
  TORCH_CHECK(grad_in.size(2) == Ho && grad_in.size(3) == Wo, op, ": grad must be (B, C, H / 2, W / 2) = (", B,
              ", ", C, ", ", Ho, ", ", Wo, ") for size ", size, ", got ", grad_in.sizes());
  const at::Tensor g = grad_in.contiguous();
  at::Tensor gx = empty_output({B, C, H, W}, g.options());
  if (gx.numel() == 0) return gx;
  run_rows<Up>(launch, g, gx, B * C * H, H, W);
  return gx;
}

}  // namespace half_resolution
}  // namespace segops
