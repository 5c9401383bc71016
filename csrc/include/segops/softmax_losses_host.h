// Host-side glue of the partial cross-entropy and entropy ops, shared by the CPU and CUDA backends: argument
// checks, strided views and the output allocations. Each call is ONE launch of the backend's policy:
//   launch.reduce<Sum>(n, functor, finalize)  forward: per-pixel outputs, the loss reduced in a fixed order
//                                             and finalize(total) writing the loss and its denominator;
//   launch.for_each(n, functor)               backward: every gradient element written once.
// Launch::kHostMemory says whether the kernels can write host memory (the CPU's label check needs no buffer).
// Besides the launch a call only allocates (no fills, reductions or copies for the usual layouts), and on CUDA
// it never waits for the device unless the caller asked for the synchronous label check.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <c10/core/ScalarType.h>

#include <limits>
#include <tuple>
#include <vector>

#include "segops/cpu_alloc.h"
#include "segops/softmax_losses_math.h"

namespace segops {
namespace losses {

using at::IntArrayRef;
using at::Tensor;

// Whether the dims [first, t.dim()) of t collapse into one stride (contiguous, channels_last, expanded, sliced
// batches...); if so *ss is that stride. Size-1 dims do not matter. No ATen op: a view costs a dispatch.
inline bool collapse_spatial(const Tensor& t, int64_t first, int64_t* ss) {
  int64_t stride = 1, expected = -1;
  for (int64_t d = t.dim() - 1; d >= first; --d) {
    if (t.size(d) == 1) continue;
    if (expected >= 0 && t.stride(d) != expected) return false;
    if (expected < 0) stride = t.stride(d);
    expected = t.stride(d) * t.size(d);
  }
  *ss = stride;
  return true;
}

// t itself when its dims from `first` on collapse into one stride, else a contiguous copy (rare layouts such
// as a transposed image).
inline Tensor collapsible(const Tensor& t, int64_t first) {
  int64_t ss = 0;
  return collapse_spatial(t, first, &ss) ? t : t.contiguous();
}

inline int64_t spatial_size(const Tensor& logits) {
  int64_t S = 1;
  for (int64_t d = 2; d < logits.dim(); ++d) S *= logits.size(d);
  return S;
}

// A fresh tensor shaped like t whose spatial dims collapse: t's own layout when it is contiguous or
// channels_last, else contiguous (empty_like would keep e.g. a transposed layout).
inline Tensor empty_bks_like(const Tensor& t) {
  auto fmt = at::MemoryFormat::Contiguous;
  if (!t.is_contiguous()) {
    if (t.dim() == 4 && t.is_contiguous(at::MemoryFormat::ChannelsLast)) fmt = at::MemoryFormat::ChannelsLast;
    if (t.dim() == 5 && t.is_contiguous(at::MemoryFormat::ChannelsLast3d)) fmt = at::MemoryFormat::ChannelsLast3d;
  }
  return empty_output(t.sizes(), t.options(), fmt);
}

inline at::ScalarType acc_dtype(const Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_logits(const char* op, const Tensor& logits) {
  TORCH_CHECK(logits.dim() >= 2, op, ": logits must have shape (B, K) or (B, K, *spatial), got ",
              logits.dim(), " dims ", logits.sizes());
  TORCH_CHECK(at::isFloatingType(logits.scalar_type()), op,
              ": logits must be float32, float64, float16 or bfloat16, got ", logits.scalar_type());
  TORCH_CHECK(logits.size(1) > 0, op, ": logits must have at least one class (K = logits.size(1) = 0)");
}

// target (B, *spatial) int64 / uint8 (also int32 / int16 / int8), same device as logits.
inline void check_target(const char* op, const Tensor& logits, const Tensor& target) {
  TORCH_CHECK(target.device() == logits.device(), op, ": target is on ", target.device(),
              " but logits are on ", logits.device());
  TORCH_CHECK(at::isIntegralType(target.scalar_type(), /*includeBool=*/false), op,
              ": target must hold integer class indices (int64 or uint8), got ", target.scalar_type());
  bool ok = target.dim() == logits.dim() - 1 && target.size(0) == logits.size(0);
  for (int64_t d = 2; ok && d < logits.dim(); ++d) ok = target.size(d - 1) == logits.size(d);
  TORCH_CHECK(ok, op, ": target must have shape (B, *spatial) = logits.shape without dim 1; logits ",
              logits.sizes(), ", target ", target.sizes());
}

inline void check_weight(const char* op, const Tensor& logits, const c10::optional<Tensor>& weight) {
  if (!weight.has_value()) return;
  const Tensor& w = *weight;
  TORCH_CHECK(w.dim() == 1 && w.size(0) == logits.size(1), op, ": weight must have shape (K,) = (",
              logits.size(1), ",), got ", w.sizes());
  TORCH_CHECK(w.device() == logits.device(), op, ": weight is on ", w.device(), " but logits are on ",
              logits.device());
  TORCH_CHECK(w.scalar_type() == logits.scalar_type(), op, ": weight dtype ", w.scalar_type(),
              " must equal the logits dtype ", logits.scalar_type());
}

inline void check_reduction(const char* op, int64_t reduction) {
  TORCH_CHECK(reduction >= 0 && reduction <= 2, op, ": reduction must be 0 (none), 1 (mean) or 2 (sum), got ",
              reduction);
}

template <typename T>
View3<T> view3(const Tensor& t) {  // t: (B, K, *spatial) with collapsible spatial dims
  int64_t ss = 1;
  collapse_spatial(t, 2, &ss);
  return View3<T>{static_cast<T*>(t.data_ptr()), t.stride(0), t.stride(1), ss};
}
template <typename T>
View2<T> view2(const Tensor& t) {  // t: (B, *spatial) with collapsible spatial dims
  int64_t ss = 1;
  collapse_spatial(t, 1, &ss);
  return View2<T>{static_cast<T*>(t.data_ptr()), t.dim() > 0 ? t.stride(0) : 0, ss};
}

// Calls f(target_t{}) with the C++ type of the target's dtype.
template <typename F>
void dispatch_target(const Tensor& target, const F& f) {
  switch (target.scalar_type()) {
    case at::kLong: f(int64_t{}); break;
    case at::kInt: f(int32_t{}); break;
    case at::kShort: f(int16_t{}); break;
    case at::kChar: f(int8_t{}); break;
    case at::kByte: f(uint8_t{}); break;
    default: TORCH_CHECK(false, "unsupported target dtype ", target.scalar_type());
  }
}

// ---- partial cross-entropy -------------------------------------------------------------------------

constexpr int64_t kNoBadLabel = std::numeric_limits<int64_t>::max();

template <typename Launch>
std::tuple<Tensor, Tensor, Tensor> pce_forward(const Tensor& logits, const Tensor& target,
                                               const c10::optional<Tensor>& weight, int64_t reduction,
                                               int64_t ignore_index, double label_smoothing, bool check_labels,
                                               const Launch& launch) {
  const char* op = "partial_cross_entropy";
  check_logits(op, logits);
  check_target(op, logits, target);
  check_weight(op, logits, weight);
  check_reduction(op, reduction);
  TORCH_CHECK(label_smoothing >= 0.0 && label_smoothing <= 1.0, op,
              ": label_smoothing must be in [0, 1], got ", label_smoothing);
  const int64_t B = logits.size(0), K = logits.size(1), S = spatial_size(logits), N = B * S;
  const auto fopt = logits.options().dtype(acc_dtype(logits));
  const Tensor x = collapsible(logits, 2), t = collapsible(target, 1);
  const Tensor w = weight.has_value() ? weight->contiguous() : Tensor();
  Tensor lse = at::empty({N}, fopt);
  Tensor loss = reduction == kNone ? at::empty(target.sizes(), logits.options()) : at::empty({}, logits.options());
  Tensor denom = at::empty({1}, fopt);
  // Out-of-range labels: the CPU kernel records the lowest such pixel in host memory; CUDA asserts on the
  // device, or, under check_labels, records it in a device buffer read back below (the one sync of the call).
  int64_t host_bad = kNoBadLabel;
  Tensor device_bad;
  int64_t* bad = nullptr;
  if (Launch::kHostMemory) {
    bad = &host_bad;
  } else if (check_labels) {
    device_bad = at::full({1}, kNoBadLabel, logits.options().dtype(at::kLong));
    bad = device_bad.data_ptr<int64_t>();
  }

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "partial_cross_entropy", [&] {
    using accT = acc_t<scalar_t>;
    dispatch_target(t, [&](auto tag) {
      using target_t = decltype(tag);
      const PceForward<scalar_t, target_t> f{view3<const scalar_t>(x),
                                             view2<const target_t>(t),
                                             w.defined() ? w.data_ptr<scalar_t>() : nullptr,
                                             K,
                                             S,
                                             ignore_index,
                                             static_cast<accT>(label_smoothing),
                                             lse.data_ptr<accT>(),
                                             reduction == kNone ? loss.data_ptr<scalar_t>() : nullptr,
                                             bad};
      const LossFinalize<scalar_t> fin{static_cast<int>(reduction),
                                       reduction == kNone ? nullptr : loss.data_ptr<scalar_t>(),
                                       denom.data_ptr<accT>()};
      launch.template reduce<LossSum<accT>>(N, f, fin);
    });
  });

  const int64_t bad_i = device_bad.defined() ? device_bad.item<int64_t>() : host_bad;
  if (bad_i != kNoBadLabel) {
    const int64_t b = bad_i / S, s = bad_i - b * S;
    int64_t ss = 1;
    collapse_spatial(t, 1, &ss);
    const int64_t value =
        t.as_strided({}, {}, t.storage_offset() + b * (t.dim() > 0 ? t.stride(0) : 0) + s * ss).item<int64_t>();
    TORCH_CHECK_INDEX(false, op, ": target value ", value, " at flat pixel ", bad_i, " (batch ", b, ", pixel ", s,
                      ") is outside [0, K) = [0, ", K, ") and is not ignore_index (", ignore_index, ")");
  }
  return std::make_tuple(loss, lse, denom);
}

// The upstream gradient as a (B, S) view of the loss's shape: per pixel for reduction 'none', else the one
// scalar read by every pixel (strides 0). Converted only if its dtype differs.
inline Tensor prepare_grad(const char* op, const Tensor& grad, const Tensor& logits, IntArrayRef pixel_shape,
                           int64_t reduction, int64_t N) {
  TORCH_CHECK(reduction == kNone ? grad.numel() == N : grad.numel() == 1, op, ": grad has ", grad.numel(),
              " elements, expected ", reduction == kNone ? N : 1);
  TORCH_CHECK(grad.device() == logits.device(), op, ": grad is on ", grad.device(), " but logits are on ",
              logits.device());
  Tensor g = grad.scalar_type() == logits.scalar_type() ? grad : grad.to(logits.scalar_type());
  if (reduction != kNone) return g;
  if (g.sizes() != pixel_shape) g = g.reshape(pixel_shape);
  return collapsible(g, 1);
}

template <typename T>
View2<const T> grad_view(const Tensor& g, int64_t reduction) {
  if (reduction != kNone) return View2<const T>{static_cast<const T*>(g.data_ptr()), 0, 0};
  return view2<const T>(g);
}

template <typename Launch>
Tensor pce_backward(const Tensor& grad, const Tensor& logits, const Tensor& target,
                    const c10::optional<Tensor>& weight, const Tensor& lse, const Tensor& denom,
                    int64_t reduction, int64_t ignore_index, double label_smoothing, const Launch& launch) {
  const char* op = "_partial_cross_entropy_backward";
  check_logits(op, logits);
  check_target(op, logits, target);
  check_weight(op, logits, weight);
  check_reduction(op, reduction);
  const int64_t B = logits.size(0), K = logits.size(1), S = spatial_size(logits), N = B * S;
  const auto acc = acc_dtype(logits);
  TORCH_CHECK(lse.numel() == N && lse.scalar_type() == acc, op, ": lse must be (", N, ",) ", acc);
  TORCH_CHECK(denom.numel() == 1 && denom.scalar_type() == acc, op, ": denom must be (1,) ", acc);
  const Tensor g = prepare_grad(op, grad, logits, target.sizes(), reduction, N);
  const Tensor x = collapsible(logits, 2), t = collapsible(target, 1);
  const Tensor w = weight.has_value() ? weight->contiguous() : Tensor();
  const Tensor lse_c = lse.contiguous();  // as saved by the forward: no copy
  Tensor grad_logits = empty_bks_like(logits);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "segops_loss", [&] {
    using accT = acc_t<scalar_t>;
    dispatch_target(t, [&](auto tag) {
      using target_t = decltype(tag);
      const PceBackward<scalar_t, target_t> f{view3<const scalar_t>(x),
                                              view2<const target_t>(t),
                                              w.defined() ? w.data_ptr<scalar_t>() : nullptr,
                                              K,
                                              S,
                                              ignore_index,
                                              static_cast<accT>(label_smoothing),
                                              lse_c.data_ptr<accT>(),
                                              grad_view<scalar_t>(g, reduction),
                                              reduction == kMean ? denom.data_ptr<accT>() : nullptr,
                                              view3<scalar_t>(grad_logits)};
      launch.for_each(N, f);
    });
  });
  return grad_logits;
}

// ---- entropy -------------------------------------------------------------------------------------------

inline Tensor prepare_mask(const char* op, const Tensor& logits, const c10::optional<Tensor>& mask) {
  if (!mask.has_value()) return Tensor();
  const Tensor& m = *mask;
  TORCH_CHECK(m.device() == logits.device(), op, ": mask is on ", m.device(), " but logits are on ",
              logits.device());
  TORCH_CHECK(m.scalar_type() == at::kBool, op, ": mask must be a bool tensor, got ", m.scalar_type());
  bool ok = m.dim() == logits.dim() - 1 && m.size(0) == logits.size(0);
  for (int64_t d = 2; ok && d < logits.dim(); ++d) ok = m.size(d - 1) == logits.size(d);
  TORCH_CHECK(ok, op, ": mask must have shape (B, *spatial) = logits.shape without dim 1; logits ",
              logits.sizes(), ", mask ", m.sizes());
  return collapsible(m, 1);
}

inline std::vector<int64_t> pixel_shape(const Tensor& logits) {  // (B, *spatial)
  std::vector<int64_t> shape(logits.sizes().begin(), logits.sizes().end());
  shape.erase(shape.begin() + 1);
  return shape;
}

template <typename Launch>
std::tuple<Tensor, Tensor, Tensor, Tensor> entropy_forward(const Tensor& logits, const c10::optional<Tensor>& mask,
                                                           int64_t reduction, const Launch& launch) {
  const char* op = "entropy";
  check_logits(op, logits);
  check_reduction(op, reduction);
  const int64_t B = logits.size(0), S = spatial_size(logits), K = logits.size(1), N = B * S;
  const auto fopt = logits.options().dtype(acc_dtype(logits));
  const Tensor x = collapsible(logits, 2), m = prepare_mask(op, logits, mask);
  Tensor lse = at::empty({N}, fopt), ex = at::empty({N}, fopt);
  Tensor out = reduction == kNone ? at::empty(pixel_shape(logits), logits.options()) : at::empty({}, logits.options());
  Tensor denom = at::empty({1}, fopt);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "segops_loss", [&] {
    using accT = acc_t<scalar_t>;
    const EntropyForward<scalar_t> f{view3<const scalar_t>(x),
                                     m.defined() ? view2<const bool>(m) : View2<const bool>{nullptr, 0, 0},
                                     K,
                                     S,
                                     lse.data_ptr<accT>(),
                                     ex.data_ptr<accT>(),
                                     reduction == kNone ? out.data_ptr<scalar_t>() : nullptr};
    const LossFinalize<scalar_t> fin{static_cast<int>(reduction),
                                     reduction == kNone ? nullptr : out.data_ptr<scalar_t>(),
                                     denom.data_ptr<accT>()};
    launch.template reduce<LossSum<accT>>(N, f, fin);
  });
  return std::make_tuple(out, lse, ex, denom);
}

template <typename Launch>
Tensor entropy_backward(const Tensor& grad, const Tensor& logits, const c10::optional<Tensor>& mask,
                        const Tensor& lse, const Tensor& ex, const Tensor& denom, int64_t reduction,
                        const Launch& launch) {
  const char* op = "_entropy_backward";
  check_logits(op, logits);
  check_reduction(op, reduction);
  const int64_t B = logits.size(0), S = spatial_size(logits), K = logits.size(1), N = B * S;
  const auto acc = acc_dtype(logits);
  TORCH_CHECK(lse.numel() == N && ex.numel() == N && lse.scalar_type() == acc && ex.scalar_type() == acc, op,
              ": lse and expectation must be (", N, ",) ", acc);
  TORCH_CHECK(denom.numel() == 1 && denom.scalar_type() == acc, op, ": denom must be (1,) ", acc);
  const Tensor g = prepare_grad(op, grad, logits, pixel_shape(logits), reduction, N);
  const Tensor x = collapsible(logits, 2), m = prepare_mask(op, logits, mask);
  const Tensor lse_c = lse.contiguous(), ex_c = ex.contiguous();  // as saved by the forward: no copy
  Tensor grad_logits = empty_bks_like(logits);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "segops_loss", [&] {
    using accT = acc_t<scalar_t>;
    const EntropyBackward<scalar_t> f{view3<const scalar_t>(x),
                                      m.defined() ? view2<const bool>(m) : View2<const bool>{nullptr, 0, 0},
                                      K,
                                      S,
                                      lse_c.data_ptr<accT>(),
                                      ex_c.data_ptr<accT>(),
                                      grad_view<scalar_t>(g, reduction),
                                      reduction == kMean ? denom.data_ptr<accT>() : nullptr,
                                      view3<scalar_t>(grad_logits)};
    launch.for_each(N, f);
  });
  return grad_logits;
}

}  // namespace losses
}  // namespace segops
