// Host-side glue of the partial cross-entropy and entropy ops, shared by the CPU and CUDA backends:
// argument checks, strided views, buffers and the final reductions are device-agnostic ATen code; a
// backend only supplies `launch(n, functor)` (cpu_parallel_for or cuda_parallel_for).
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/TensorOperators.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/ones_like.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros_like.h>
#include <c10/core/ScalarType.h>

#include <tuple>

#include "segops/softmax_losses_math.h"

namespace segops {
namespace losses {

using at::Tensor;

// Logits of shape (B, K, *spatial) (or (B, K)) as a strided (B, K, S) view, without a copy when the
// spatial dims can be flattened (contiguous, channels_last, sliced batches).
inline Tensor as_bks(const Tensor& t) {
  const int64_t B = t.size(0), K = t.size(1);
  const int64_t S = t.dim() > 2 ? t.numel() / std::max<int64_t>(B * K, 1) : 1;
  std::vector<int64_t> shape{B, K, S};
  auto v = t.dim() == 2 ? t.unsqueeze(2) : t.flatten(2);  // flatten returns a view when it can
  return v.view(shape);
}

inline int64_t spatial_size(const Tensor& logits) {
  int64_t S = 1;
  for (int64_t d = 2; d < logits.dim(); ++d) S *= logits.size(d);
  return S;
}

// A fresh tensor shaped like t that is viewable as (B, K, S): t's own layout when it is contiguous or
// channels_last, else contiguous (empty_like would keep e.g. a transposed layout, whose (B, K, S) view
// does not exist and would silently become a copy).
inline Tensor empty_bks_like(const Tensor& t) {
  auto fmt = at::MemoryFormat::Contiguous;
  if (!t.is_contiguous()) {
    if (t.dim() == 4 && t.is_contiguous(at::MemoryFormat::ChannelsLast)) fmt = at::MemoryFormat::ChannelsLast;
    if (t.dim() == 5 && t.is_contiguous(at::MemoryFormat::ChannelsLast3d)) fmt = at::MemoryFormat::ChannelsLast3d;
  }
  return at::empty(t.sizes(), t.options().memory_format(fmt));
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
View3<T> view3(const Tensor& t) {  // t: (B, K, S)
  return View3<T>{static_cast<T*>(t.data_ptr()), t.stride(0), t.stride(1), t.stride(2)};
}
template <typename T>
View2<T> view2(const Tensor& t) {  // t: (B, S)
  return View2<T>{static_cast<T*>(t.data_ptr()), t.stride(0), t.stride(1)};
}

inline Tensor as_bs(const Tensor& t, int64_t B, int64_t S) { return t.reshape({B, S}); }

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

template <typename Launch>
std::tuple<Tensor, Tensor, Tensor> pce_forward(const Tensor& logits, const Tensor& target,
                                               const c10::optional<Tensor>& weight, int64_t reduction,
                                               int64_t ignore_index, double label_smoothing,
                                               const Launch& launch) {
  const char* op = "partial_cross_entropy";
  check_logits(op, logits);
  check_target(op, logits, target);
  check_weight(op, logits, weight);
  check_reduction(op, reduction);
  TORCH_CHECK(label_smoothing >= 0.0 && label_smoothing <= 1.0, op,
              ": label_smoothing must be in [0, 1], got ", label_smoothing);
  const int64_t B = logits.size(0), K = logits.size(1), S = spatial_size(logits), N = B * S;
  const auto acc = acc_dtype(logits);
  const auto fopt = logits.options().dtype(acc);
  Tensor x = as_bks(logits), t = as_bs(target, B, S);
  Tensor w = weight.has_value() ? weight->contiguous() : Tensor();
  Tensor lse = at::empty({N}, fopt);
  Tensor loss_none = reduction == kNone ? at::empty({N}, logits.options()) : Tensor();
  Tensor nll = reduction != kNone ? at::empty({N}, fopt) : Tensor();
  Tensor smooth = reduction != kNone && label_smoothing > 0 ? at::empty({N}, fopt) : Tensor();
  Tensor wt = reduction == kMean ? at::empty({N}, fopt) : Tensor();
  Tensor bad = at::full({1}, -1, logits.options().dtype(at::kLong));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "partial_cross_entropy", [&] {
    using accT = acc_t<scalar_t>;
    dispatch_target(t, [&](auto tag) {
      using target_t = decltype(tag);
      PceForward<scalar_t, target_t> f{view3<const scalar_t>(x),
                                       view2<const target_t>(t),
                                       w.defined() ? w.data_ptr<scalar_t>() : nullptr,
                                       K,
                                       S,
                                       ignore_index,
                                       static_cast<accT>(label_smoothing),
                                       lse.data_ptr<accT>(),
                                       loss_none.defined() ? loss_none.data_ptr<scalar_t>() : nullptr,
                                       nll.defined() ? nll.data_ptr<accT>() : nullptr,
                                       smooth.defined() ? smooth.data_ptr<accT>() : nullptr,
                                       wt.defined() ? wt.data_ptr<accT>() : nullptr,
                                       bad.data_ptr<int64_t>()};
      launch(N, f);
    });
  });

  const int64_t bad_i = N > 0 ? bad.item<int64_t>() : -1;  // one device sync on CUDA: labels are user data
  if (bad_i >= 0) {
    const int64_t value = t.reshape({N})[bad_i].item<int64_t>();
    TORCH_CHECK_INDEX(false, op, ": target value ", value, " at flat pixel ", bad_i,
                      " is outside [0, K) = [0, ", K, ") and is not ignore_index (", ignore_index, ")");
  }

  Tensor denom = at::ones({1}, fopt);
  Tensor out;
  const double eps = label_smoothing;
  if (reduction == kNone) {
    out = loss_none.view(target.sizes());
  } else {
    Tensor total = at::sum(nll) * (1.0 - eps);
    Tensor total_smooth = smooth.defined() ? at::sum(smooth) * (eps / K) : Tensor();
    if (reduction == kSum) {
      out = total_smooth.defined() ? total + total_smooth : total;
    } else {
      // F.cross_entropy's mean: both terms are divided by sum of w_t over the labelled pixels (the
      // count when unweighted). When nothing is labelled, the loss is 0 (PyTorch: NaN).
      Tensor d = at::sum(wt);
      Tensor any = d > 0;
      Tensor safe_d = at::where(any, d, at::ones_like(d));
      if (total_smooth.defined()) total = total + total_smooth;
      out = at::where(any, total / safe_d, at::zeros_like(d));
      denom = safe_d.reshape({1});
    }
    out = out.to(logits.scalar_type());
  }
  return std::make_tuple(out, lse, denom);
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
  TORCH_CHECK(reduction == kNone ? grad.numel() == N : grad.numel() == 1, op,
              ": grad has ", grad.numel(), " elements, expected ", reduction == kNone ? N : 1);
  Tensor x = as_bks(logits), t = as_bs(target, B, S);
  Tensor w = weight.has_value() ? weight->contiguous() : Tensor();
  Tensor g = grad.to(logits.scalar_type()).contiguous();
  Tensor lse_c = lse.contiguous(), denom_c = denom.contiguous();
  Tensor grad_logits = empty_bks_like(logits);
  Tensor gx = as_bks(grad_logits);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "segops_loss", [&] {
    using accT = acc_t<scalar_t>;
    dispatch_target(t, [&](auto tag) {
      using target_t = decltype(tag);
      PceBackward<scalar_t, target_t> f{view3<const scalar_t>(x),
                                        view2<const target_t>(t),
                                        w.defined() ? w.data_ptr<scalar_t>() : nullptr,
                                        K,
                                        S,
                                        ignore_index,
                                        static_cast<accT>(label_smoothing),
                                        lse_c.data_ptr<accT>(),
                                        g.data_ptr<scalar_t>(),
                                        reduction == kNone,
                                        reduction == kMean ? denom_c.data_ptr<accT>() : nullptr,
                                        view3<scalar_t>(gx),
                                        launch.functor_writes_zeros(f)};
      if (!f.write_zeros && !launch.writes_every_gradient(f)) grad_logits.zero_();
      launch(N, f);
    });
  });
  return grad_logits;
}

// ---- entropy -------------------------------------------------------------------------------------------

inline Tensor prepare_mask(const char* op, const Tensor& logits, const c10::optional<Tensor>& mask,
                           int64_t B, int64_t S) {
  if (!mask.has_value()) return Tensor();
  const Tensor& m = *mask;
  TORCH_CHECK(m.device() == logits.device(), op, ": mask is on ", m.device(), " but logits are on ",
              logits.device());
  TORCH_CHECK(m.scalar_type() == at::kBool, op, ": mask must be a bool tensor, got ", m.scalar_type());
  bool ok = m.dim() == logits.dim() - 1 && m.size(0) == logits.size(0);
  for (int64_t d = 2; ok && d < logits.dim(); ++d) ok = m.size(d - 1) == logits.size(d);
  TORCH_CHECK(ok, op, ": mask must have shape (B, *spatial) = logits.shape without dim 1; logits ",
              logits.sizes(), ", mask ", m.sizes());
  return m.reshape({B, S});
}

template <typename Launch>
std::tuple<Tensor, Tensor, Tensor, Tensor> entropy_forward(const Tensor& logits, const c10::optional<Tensor>& mask,
                                                           int64_t reduction, const Launch& launch) {
  const char* op = "entropy";
  check_logits(op, logits);
  check_reduction(op, reduction);
  const int64_t B = logits.size(0), S = spatial_size(logits), K = logits.size(1), N = B * S;
  const auto fopt = logits.options().dtype(acc_dtype(logits));
  Tensor x = as_bks(logits), m = prepare_mask(op, logits, mask, B, S);
  Tensor lse = at::empty({N}, fopt), ex = at::empty({N}, fopt);
  Tensor ent = reduction == kNone ? at::empty({N}, logits.options()) : Tensor();
  Tensor ent_acc = reduction != kNone ? at::empty({N}, fopt) : Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "segops_loss", [&] {
    using accT = acc_t<scalar_t>;
    EntropyForward<scalar_t> f{view3<const scalar_t>(x),
                               m.defined() ? view2<const bool>(m) : View2<const bool>{nullptr, 0, 0},
                               K,
                               S,
                               lse.data_ptr<accT>(),
                               ex.data_ptr<accT>(),
                               ent.defined() ? ent.data_ptr<scalar_t>() : nullptr,
                               ent_acc.defined() ? ent_acc.data_ptr<accT>() : nullptr};
    launch(N, f);
  });
  Tensor denom = at::ones({1}, fopt);
  Tensor out;
  if (reduction == kNone) {
    out = ent.view(logits.select(1, 0).sizes());
  } else {
    out = at::sum(ent_acc);
    if (reduction == kMean) {
      Tensor count = m.defined() ? m.sum(acc_dtype(logits)) : at::full({}, double(N), fopt);
      Tensor any = count > 0;
      Tensor safe = at::where(any, count, at::ones_like(count));
      out = at::where(any, out / safe, at::zeros_like(out));
      denom = safe.reshape({1});
    }
    out = out.to(logits.scalar_type());
  }
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
  TORCH_CHECK(reduction == kNone ? grad.numel() == N : grad.numel() == 1, op, ": grad has ", grad.numel(),
              " elements, expected ", reduction == kNone ? N : 1);
  Tensor x = as_bks(logits), m = prepare_mask(op, logits, mask, B, S);
  Tensor g = grad.to(logits.scalar_type()).contiguous();
  Tensor lse_c = lse.contiguous(), ex_c = ex.contiguous(), denom_c = denom.contiguous();
  Tensor grad_logits = empty_bks_like(logits);
  Tensor gx = as_bks(grad_logits);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "segops_loss", [&] {
    using accT = acc_t<scalar_t>;
    EntropyBackward<scalar_t> f{view3<const scalar_t>(x),
                                m.defined() ? view2<const bool>(m) : View2<const bool>{nullptr, 0, 0},
                                K,
                                S,
                                lse_c.data_ptr<accT>(),
                                ex_c.data_ptr<accT>(),
                                g.data_ptr<scalar_t>(),
                                reduction == kNone,
                                reduction == kMean ? denom_c.data_ptr<accT>() : nullptr,
                                view3<scalar_t>(gx),
                                launch.functor_writes_zeros(f)};
    if (!f.write_zeros && !launch.writes_every_gradient(f)) grad_logits.zero_();
    launch(N, f);
  });
  return grad_logits;
}

}  // namespace losses
}  // namespace segops
