// Host-side glue of the dense CRF mean-field update, shared by the CPU and CUDA backends: argument checks,
// contiguous (B, K, N) views and the dtype dispatch are device-agnostic ATen code; a backend supplies
// `launch(n, functor)`.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/core/ScalarType.h>
#include <c10/util/ArrayRef.h>

#include <cmath>
#include <vector>

#include "segops/cpu_alloc.h"
#include "segops/crf_meanfield_math.h"

namespace segops {
namespace meanfield {

using at::Tensor;

inline bool same_spatial(const Tensor& a, const Tensor& b) {
  if (a.dim() != b.dim() || a.size(0) != b.size(0)) return false;
  for (int64_t d = 2; d < a.dim(); ++d)
    if (a.size(d) != b.size(d)) return false;
  return true;
}

inline void check_like(const char* op, const char* what, const Tensor& t, const Tensor& unary) {
  TORCH_CHECK(t.device() == unary.device(), op, ": ", what, " is on ", t.device(), " but unary is on ",
              unary.device());
  TORCH_CHECK(t.scalar_type() == unary.scalar_type(), op, ": ", what, " dtype ", t.scalar_type(),
              " must equal the unary dtype ", unary.scalar_type());
}

// unary (B, K, *spatial); messages[j] like unary; scales[j] (B, 1, *spatial) or empty (no scale).
inline void check_inputs(const char* op, const Tensor& unary, at::TensorList messages, at::TensorList scales,
                         at::ArrayRef<double> weights) {
  TORCH_CHECK(unary.dim() >= 2, op, ": unary must have shape (B, K, *spatial), got ", unary.sizes());
  TORCH_CHECK(at::isFloatingType(unary.scalar_type()), op,
              ": unary must be float32, float64, float16 or bfloat16, got ", unary.scalar_type());
  TORCH_CHECK(unary.size(1) > 0, op, ": unary must have at least one class (K = unary.size(1) = 0)");
  const size_t n = messages.size();
  TORCH_CHECK(scales.size() == n && weights.size() == n, op, ": messages, scales and weights must have the same ",
              "length, got ", n, ", ", scales.size(), " and ", weights.size());
  TORCH_CHECK(n <= size_t(kMaxTerms), op, ": at most ", kMaxTerms, " messages, got ", n);
  for (size_t j = 0; j < n; ++j) {
    TORCH_CHECK(messages[j].sizes() == unary.sizes(), op, ": messages[", j, "] must have the unary's shape ",
                unary.sizes(), ", got ", messages[j].sizes());
    check_like(op, "messages[j]", messages[j], unary);
    TORCH_CHECK(std::isfinite(weights[j]), op, ": weights[", j, "] must be finite, got ", weights[j]);
    if (scales[j].numel() == 0) continue;
    TORCH_CHECK(same_spatial(scales[j], unary) && scales[j].size(1) == 1, op, ": scales[", j,
                "] must be empty or (B, 1, *spatial) for unary ", unary.sizes(), ", got ", scales[j].sizes());
    check_like(op, "scales[j]", scales[j], unary);
  }
}

inline int64_t spatial_size(const Tensor& t) {
  int64_t s = 1;
  for (int64_t d = 2; d < t.dim(); ++d) s *= t.size(d);
  return s;
}

// Writes Q = softmax_K(-unary + sum_j weights_j scales_j messages_j) into out (contiguous, unary's shape and
// dtype, overlapping no input: the blocked CPU path writes a row of out before it reads the messages' row).
template <typename Launch>
at::Tensor& forward_into(const Tensor& unary_in, at::TensorList messages_in, at::TensorList scales_in,
                         at::ArrayRef<double> weights, at::Tensor& out, const Launch& launch) {
  const char* op = "crf_mean_field_update";
  check_inputs(op, unary_in, messages_in, scales_in, weights);
  TORCH_CHECK(out.sizes() == unary_in.sizes() && out.is_contiguous(), op, ": out must be a contiguous tensor of ",
              "the unary's shape ", unary_in.sizes(), ", got ", out.sizes(), out.is_contiguous() ? "" : " (strided)");
  check_like(op, "out", out, unary_in);
  auto check_apart = [&](const char* what, const Tensor& t) {
    // (a non-dense input, "too hard" to tell, is copied by .contiguous() below before anything is written)
    const auto status = t.numel() == 0 ? at::MemOverlapStatus::No : at::get_overlap_status(out, t);
    TORCH_CHECK(status == at::MemOverlapStatus::No || status == at::MemOverlapStatus::TooHard, op,
                ": out shares memory with ", what, "; pass a separate buffer");
  };
  check_apart("unary", unary_in);
  for (size_t j = 0; j < messages_in.size(); ++j) {
    check_apart("messages[j]", messages_in[j]);
    check_apart("scales[j]", scales_in[j]);
  }
  const Tensor unary = unary_in.contiguous();
  std::vector<Tensor> messages, scales;  // keep the contiguous copies alive during the launch
  for (size_t j = 0; j < messages_in.size(); ++j) {
    messages.push_back(messages_in[j].contiguous());
    scales.push_back(scales_in[j].numel() ? scales_in[j].contiguous() : Tensor());
  }
  const int64_t B = unary.size(0), K = unary.size(1), N = spatial_size(unary);
  if (B * N == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, unary.scalar_type(), "crf_mean_field_update", [&] {
    using acc = acc_t<scalar_t>;
    Forward<scalar_t> f{};
    f.unary = unary.const_data_ptr<scalar_t>();
    f.out = out.mutable_data_ptr<scalar_t>();
    f.K = K;
    f.N = N;
    f.terms.count = static_cast<int>(messages.size());
    for (size_t j = 0; j < messages.size(); ++j) {
      f.terms.message[j] = messages[j].const_data_ptr<scalar_t>();
      f.terms.scale[j] = scales[j].defined() ? scales[j].const_data_ptr<scalar_t>() : nullptr;
      f.terms.weight[j] = static_cast<acc>(weights[j]);
    }
    launch(B * N, f);
  });
  return out;
}

template <typename Launch>
Tensor forward(const Tensor& unary, at::TensorList messages, at::TensorList scales, at::ArrayRef<double> weights,
               const Launch& launch) {
  check_inputs("crf_mean_field_update", unary, messages, scales, weights);
  Tensor out = empty_output(unary.sizes(), unary.options());
  return forward_into(unary, messages, scales, weights, out, launch);
}

// dlogits = Q (grad - <grad, Q>_K) per pixel; contiguous, Q's dtype.
template <typename Launch>
Tensor backward(const Tensor& grad_in, const Tensor& q_in, const Launch& launch) {
  const char* op = "_crf_mean_field_update_backward";
  TORCH_CHECK(q_in.dim() >= 2 && at::isFloatingType(q_in.scalar_type()), op,
              ": q must be floating point (B, K, *spatial), got ", q_in.scalar_type(), " ", q_in.sizes());
  TORCH_CHECK(grad_in.sizes() == q_in.sizes(), op, ": grad must have q's shape ", q_in.sizes(), ", got ",
              grad_in.sizes());
  TORCH_CHECK(grad_in.device() == q_in.device() && grad_in.scalar_type() == q_in.scalar_type(), op,
              ": grad (", grad_in.scalar_type(), " on ", grad_in.device(), ") must match q (", q_in.scalar_type(),
              " on ", q_in.device(), ")");
  const Tensor grad = grad_in.contiguous(), q = q_in.contiguous();
  Tensor out = empty_output(q.sizes(), q.options());
  const int64_t B = q.size(0), K = q.size(1), N = spatial_size(q);
  if (B * N == 0 || K == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "_crf_mean_field_update_backward", [&] {
    Backward<scalar_t> f{grad.const_data_ptr<scalar_t>(), q.const_data_ptr<scalar_t>(),
                         out.mutable_data_ptr<scalar_t>(), K, N};
    launch(B * N, f);
  });
  return out;
}

}  // namespace meanfield
}  // namespace segops
