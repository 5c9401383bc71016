// Host glue of atrous_conv2d / conv_transpose2d and their backward ops, shared by the CPU and CUDA
// backends: argument checks, buffers, and the matrix products (ATen: BLAS on the CPU, cuBLAS on CUDA).
// A backend supplies `launch(n, functor)` and `fine` (true: one element per work item, for GPUs; false:
// one row per work item, for CPUs). Everything is computed in the accumulation type (float for
// half / bfloat16 / float, double for double) and cast once at the end.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Optional.h>

#include <algorithm>
#include <array>
#include <tuple>

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

// Runs f over n work items of about `cost` elements each. On the CPU the grain keeps ~32k elements per
// task, so small problems (gradcheck, 1x1 maps) stay on one thread instead of paying OpenMP wake-ups.
template <typename Launch, typename F>
void run(const Launch& launch, index_t n, const F& f, index_t /*cost*/) {
  launch(n, f);
}
#if !defined(__CUDACC__)
template <typename F>
void run(const CpuLaunch&, index_t n, const F& f, index_t cost) {
  cpu_parallel_for(n, f, std::max<index_t>(1, (index_t(1) << 15) / std::max<index_t>(cost, 1)));
}
#endif

// The kj table of fill_kj_table for the row-granular CPU path (whole rows: seg = full width); the
// element-granular CUDA path computes ranges inline and gets nullptr.
struct KjTable {
  Tensor t;
  const index_t* ptr = nullptr;
  KjTable(const Geom& g, bool fine) {
    if (fine) return;
    t = at::empty({2 * g.kw}, at::TensorOptions().dtype(at::kLong));
    fill_kj_table(g, t.data_ptr<int64_t>());
    ptr = t.data_ptr<int64_t>();
  }
};

// Samples per im2col buffer in the general path. The GPU batches samples into one matrix product per group
// (few large GEMMs; the col buffer is capped at 2^28 elements = 1 GiB in float); the CPU does one sample at a
// time (a cache-sized buffer) unless the whole batch's buffer is tiny (small maps: fewer BLAS calls).
inline int64_t samples_per_chunk(int64_t N, int64_t rows, int64_t L, bool fine) {
  const int64_t per = std::max<int64_t>(1, rows * L);
  const int64_t budget = fine ? (int64_t(1) << 28) : (int64_t(1) << 16);
  const int64_t nb = std::max<int64_t>(1, std::min<int64_t>(N, budget / per));
  return fine || nb == N ? nb : 1;
}

// CPU, one sample at a time: im2col and its product go by blocks of output rows, so the col block stays
// cache-sized (~8 MB) instead of streaming a Cig*K x Ho*Wo buffer through memory. A block of rows
// [oh0, oh0 + Hc) is itself a geometry: Ho = Hc, ph shifted by oh0 * sh.
inline int64_t rows_per_block(int64_t rows, const Geom& g, bool fine) {
  if (fine) return g.Ho;
  const int64_t per_row = std::max<int64_t>(1, rows * g.Wo);
  return std::max<int64_t>(1, std::min<int64_t>(g.Ho, (int64_t(1) << 21) / per_row));
}
inline Geom row_block(const Geom& g, int64_t oh0, int64_t hc) {
  Geom b = g;
  b.Ho = hc;
  b.ph = g.ph - oh0 * g.sh;
  return b;
}

// ---- the three primitives --------------------------------------------------------------------------

// image (N, C_img, H, W) -> col (N, C_col, Ho, Wo), weight (C_col, C_img / groups, kh, kw).
template <typename Launch>
Tensor correlate(const Tensor& img, const Tensor& weight, const Tensor& bias_acc, const Geom& g, int64_t groups,
                 const Launch& launch, bool fine) {
  const int64_t N = img.size(0), Ci = img.size(1), Co = weight.size(0);
  const auto acc = acc_dtype(img);
  Tensor out = at::empty({N, Co, g.Ho, g.Wo}, img.options().dtype(acc));
  if (out.numel() == 0) return out.to(img.scalar_type());
  Tensor w = weight.to(acc).contiguous();
  const bool dw = is_depthwise(Ci, Co, groups, weight);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, img.scalar_type(), "segops_conv_correlate", [&] {
    using A = acc_t<scalar_t>;
    const index_t seg = fine ? 1 : g.Wo;
    const index_t nseg = n_segments(g.Wo, seg);
    if (dw) {
      const KjTable kjt(g, fine);
      DwCorrelate<scalar_t, A> f{img.data_ptr<scalar_t>(), img.stride(0), img.stride(1), img.stride(2),
                                 img.stride(3), w.data_ptr<A>(), ptr_or_null<A>(bias_acc), out.data_ptr<A>(),
                                 Ci, g, seg, kjt.ptr};
      run(launch, N * Ci * g.Ho * nseg, f, seg * g.kh * g.kw);
      return;
    }
    const int64_t Cig = Ci / groups, Cog = Co / groups, K = g.kh * g.kw, L = g.Ho * g.Wo;
    Tensor w2 = w.view({groups, Cog, Cig * K});
    const int64_t nb = samples_per_chunk(N, Cig * K, L, fine);
    const int64_t hb = rows_per_block(Cig * K, g, fine);
    Tensor col = at::empty({Cig * K, nb == 1 && !fine ? hb * g.Wo : nb * L}, out.options());
    Tensor tmp = nb > 1 ? at::empty({Cog, nb * L}, out.options()) : Tensor();
    Tensor o4 = out.view({N, groups, Cog, L});
    for (int64_t n0 = 0; n0 < N; n0 += nb) {
      const int64_t nc = std::min<int64_t>(nb, N - n0);
      for (int64_t gi = 0; gi < groups; ++gi) {
        const scalar_t* src = img.data_ptr<scalar_t>() + n0 * img.stride(0) + gi * Cig * img.stride(1);
        if (fine || nb > 1) {
          Im2Col<scalar_t, A> f{src, img.stride(0), img.stride(1), img.stride(2), img.stride(3), col.data_ptr<A>(),
                                nc, Cig, g, seg};
          run(launch, Cig * K * nc * g.Ho * nseg, f, seg);
        }
        // the functor packs (Cig K, nc, L) at the start of the buffer
        Tensor c2 = fine || nb > 1 ? col.view({-1}).narrow(0, 0, Cig * K * nc * L).view({Cig * K, nc * L}) : Tensor();
        if (nb == 1 && !fine) {  // CPU: blocks of output rows (the Im2Col above was skipped)
          Tensor dst = o4.select(0, n0).select(0, gi);
          for (int64_t oh0 = 0; oh0 < g.Ho; oh0 += hb) {
            const int64_t hc = std::min<int64_t>(hb, g.Ho - oh0);
            const Geom gb = row_block(g, oh0, hc);
            Im2Col<scalar_t, A> fb{src, img.stride(0), img.stride(1), img.stride(2), img.stride(3),
                                   col.data_ptr<A>(), 1, Cig, gb, seg};
            run(launch, Cig * K * hc * nseg, fb, seg);
            Tensor cb = col.view({-1}).narrow(0, 0, Cig * K * hc * g.Wo).view({Cig * K, hc * g.Wo});
            Tensor db = dst.narrow(1, oh0 * g.Wo, hc * g.Wo);
            at::mm_out(db, w2.select(0, gi), cb);
          }
        } else if (nb == 1) {
          Tensor dst = o4.select(0, n0).select(0, gi);
          at::mm_out(dst, w2.select(0, gi), c2);
        } else {
          Tensor t = tmp.view({-1}).narrow(0, 0, Cog * nc * L).view({Cog, nc * L});
          at::mm_out(t, w2.select(0, gi), c2);
          o4.narrow(0, n0, nc).select(1, gi).copy_(t.view({Cog, nc, L}).permute({1, 0, 2}));
        }
      }
    }
    if (bias_acc.defined()) out.add_(bias_acc.view({1, Co, 1, 1}));
  });
  return out.to(img.scalar_type());
}

// col (N, C_col, Ho, Wo) -> image (N, C_img, H, W): the exact transpose of correlate.
template <typename Launch>
Tensor adjoint(const Tensor& col, const Tensor& weight, const Tensor& bias_acc, const Geom& g, int64_t groups,
               const Launch& launch, bool fine) {
  const int64_t N = col.size(0), Co = col.size(1), Cig = weight.size(1), Ci = Cig * groups;
  const auto acc = acc_dtype(col);
  Tensor out = at::empty({N, Ci, g.H, g.W}, col.options().dtype(acc));
  if (out.numel() == 0) return out.to(col.scalar_type());
  Tensor w = weight.to(acc).contiguous();
  const bool dw = is_depthwise(Ci, Co, groups, weight);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, col.scalar_type(), "segops_conv_adjoint", [&] {
    using A = acc_t<scalar_t>;
    const index_t seg = fine ? 1 : g.W;
    const index_t nseg = n_segments(g.W, seg);
    const KjTable kjt(g, fine);
    if (dw) {
      DwAdjoint<scalar_t, A> f{col.data_ptr<scalar_t>(), col.stride(0), col.stride(1), col.stride(2),
                               col.stride(3), w.data_ptr<A>(), ptr_or_null<A>(bias_acc), out.data_ptr<A>(),
                               Ci, g, seg, kjt.ptr};
      run(launch, N * Ci * g.H * nseg, f, seg * g.kh * g.kw);
      return;
    }
    const int64_t Cog = Co / groups, K = g.kh * g.kw, L = g.Ho * g.Wo;
    Tensor w2 = w.view({groups, Cog, Cig * K});
    Tensor c4 = col.to(acc).contiguous().view({N, groups, Cog, L});
    const int64_t nb = samples_per_chunk(N, Cig * K, L, fine);
    Tensor buf = at::empty({Cig * K * nb * L}, out.options());
    for (int64_t n0 = 0; n0 < N; n0 += nb) {
      const int64_t nc = std::min<int64_t>(nb, N - n0);
      for (int64_t gi = 0; gi < groups; ++gi) {
        Tensor b2 = buf.narrow(0, 0, Cig * K * nc * L).view({Cig * K, nc * L});
        Tensor rhs = nc == 1 ? c4.select(0, n0).select(0, gi)
                             : c4.narrow(0, n0, nc).select(1, gi).permute({1, 0, 2}).reshape({Cog, nc * L});
        at::mm_out(b2, w2.select(0, gi).t(), rhs);
        A* dst = out.data_ptr<A>() + (n0 * Ci + gi * Cig) * g.H * g.W;
        const A* b = bias_acc.defined() ? bias_acc.data_ptr<A>() + gi * Cig : nullptr;
        Col2Im<A> f{b2.data_ptr<A>(), dst, Ci * g.H * g.W, g.H * g.W, b, nc, Cig, g, seg, kjt.ptr};
        run(launch, nc * Cig * g.H * nseg, f, seg * g.kh * g.kw);
      }
    }
  });
  return out.to(col.scalar_type());
}

// dW (C_col, C_img / groups, kh, kw) = sum_n col[n] (x) im2col(image[n]), in `out_dtype`.
template <typename Launch>
Tensor weight_grad(const Tensor& img, const Tensor& col, int64_t kh, int64_t kw, const Geom& g, int64_t groups,
                   const Launch& launch, bool fine) {
  const int64_t N = img.size(0), Ci = img.size(1), Co = col.size(1), Cig = Ci / groups, Cog = Co / groups;
  const auto acc = acc_dtype(img);
  const int64_t K = kh * kw;
  const bool dw = groups == Ci && groups == Co;
  Tensor gw;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, img.scalar_type(), "segops_conv_weight_grad", [&] {
    using A = acc_t<scalar_t>;
#if !defined(__CUDACC__)
    if (dw && !fine && g.dw == 1 && kw <= DwWeightGradRows<scalar_t, A>::kMaxKw) {
      Tensor part = at::empty({Ci, 1, kh, kw}, img.options().dtype(acc));
      DwWeightGradRows<scalar_t, A> f{img.data_ptr<scalar_t>(), img.stride(0), img.stride(1), img.stride(2),
                                      img.stride(3), col.data_ptr<scalar_t>(), col.stride(0), col.stride(1),
                                      col.stride(2), col.stride(3), part.data_ptr<A>(), N, Ci, g};
      run(launch, Ci * kh, f, N * g.Ho * g.Wo * kw);
      gw = part;
      return;
    }
#endif
    if (dw) {
      const int64_t rows = N * g.Ho;
      const int64_t work = Ci * K;
      // CPU: one chunk per (c, k) unless that leaves threads idle; CUDA: ~2048 products per work item.
      int64_t rpc = fine ? std::max<int64_t>(1, 2048 / std::max<int64_t>(g.Wo, 1))
                         : (work >= 64 ? rows : std::max<int64_t>(1, rows * work / 64));
      rpc = std::max<int64_t>(1, std::min<int64_t>(rpc, std::max<int64_t>(rows, 1)));
      const int64_t nchunk = std::max<int64_t>(1, (rows + rpc - 1) / rpc);
      Tensor part = at::empty({Ci, K, nchunk}, img.options().dtype(acc));
      DwWeightGrad<scalar_t, A> f{img.data_ptr<scalar_t>(), img.stride(0), img.stride(1), img.stride(2),
                                  img.stride(3), col.data_ptr<scalar_t>(), col.stride(0), col.stride(1),
                                  col.stride(2), col.stride(3), part.data_ptr<A>(), N, Ci, g, rpc, nchunk};
      run(launch, Ci * K * nchunk, f, rpc * g.Wo);
      gw = nchunk == 1 ? part.view({Ci, 1, kh, kw}) : at::sum(part, {2}).view({Ci, 1, kh, kw});
      return;
    }
    const index_t seg = fine ? 1 : g.Wo;
    const index_t nseg = n_segments(g.Wo, seg);
    const int64_t L = g.Ho * g.Wo;
    gw = at::zeros({groups, Cog, Cig * K}, img.options().dtype(acc));
    Tensor c4 = col.to(acc).contiguous().view({N, groups, Cog, L});
    const int64_t nb = samples_per_chunk(N, Cig * K, L, fine);
    const int64_t hb = rows_per_block(Cig * K, g, fine);
    const bool blocks = nb == 1 && !fine;
    Tensor buf = at::empty({Cig * K * (blocks ? hb * g.Wo : nb * L)}, img.options().dtype(acc));
    for (int64_t n0 = 0; n0 < N; n0 += nb) {
      const int64_t nc = std::min<int64_t>(nb, N - n0);
      for (int64_t gi = 0; gi < groups; ++gi) {
        const scalar_t* src = img.data_ptr<scalar_t>() + n0 * img.stride(0) + gi * Cig * img.stride(1);
        if (blocks) {  // CPU: blocks of output rows, as in correlate
          Tensor lhs = c4.select(0, n0).select(0, gi);
          Tensor dst = gw.select(0, gi);
          for (int64_t oh0 = 0; oh0 < g.Ho; oh0 += hb) {
            const int64_t hc = std::min<int64_t>(hb, g.Ho - oh0);
            const Geom gb = row_block(g, oh0, hc);
            Im2Col<scalar_t, A> fb{src, img.stride(0), img.stride(1), img.stride(2), img.stride(3),
                                   buf.data_ptr<A>(), 1, Cig, gb, seg};
            run(launch, Cig * K * hc * nseg, fb, seg);
            Tensor cb = buf.narrow(0, 0, Cig * K * hc * g.Wo).view({Cig * K, hc * g.Wo});
            dst.addmm_(lhs.narrow(1, oh0 * g.Wo, hc * g.Wo), cb.t());
          }
          continue;
        }
        Im2Col<scalar_t, A> f{src, img.stride(0), img.stride(1), img.stride(2), img.stride(3), buf.data_ptr<A>(),
                              nc, Cig, g, seg};
        run(launch, Cig * K * nc * g.Ho * nseg, f, seg);
        Tensor b2 = buf.narrow(0, 0, Cig * K * nc * L).view({Cig * K, nc * L});
        Tensor lhs = nc == 1 ? c4.select(0, n0).select(0, gi)
                             : c4.narrow(0, n0, nc).select(1, gi).permute({1, 0, 2}).reshape({Cog, nc * L});
        Tensor dst = gw.select(0, gi);
        dst.addmm_(lhs, b2.t());
      }
    }
    gw = gw.view({Co, Cig, kh, kw});
  });
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

// ---- ops ---------------------------------------------------------------------------------------------

template <typename Launch>
Tensor atrous_forward(const Tensor& input, const Tensor& weight, const c10::optional<Tensor>& bias,
                      at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                      const Launch& launch, bool fine) {
  const char* op = "atrous_conv2d";
  const int64_t zero[2] = {0, 0};
  Args a = make_args(op, stride, padding, dilation, at::IntArrayRef(zero, 2), groups);
  check_tensors(op, input, weight, bias, weight.size(0), "out_channels");
  Geom g = atrous_geom(op, input, weight, a);
  return correlate(input, weight, opt_acc(bias, acc_dtype(input)), g, groups, launch, fine);
}

template <typename Launch>
std::tuple<Tensor, Tensor, Tensor> atrous_backward(const Tensor& grad_out, const Tensor& input, const Tensor& weight,
                                                   at::IntArrayRef stride, at::IntArrayRef padding,
                                                   at::IntArrayRef dilation, int64_t groups,
                                                   std::array<bool, 3> mask, const Launch& launch, bool fine) {
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
  Tensor gi, gw, gb;
  if (mask[0]) gi = adjoint(go, weight, Tensor(), g, groups, launch, fine);
  if (mask[1]) gw = weight_grad(input, go, g.kh, g.kw, g, groups, launch, fine);
  if (mask[2]) gb = bias_grad(go);
  return masked(gi, gw, gb, input);
}

template <typename Launch>
Tensor transpose_forward(const Tensor& input, const Tensor& weight, const c10::optional<Tensor>& bias,
                         at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef output_padding,
                         int64_t groups, at::IntArrayRef dilation, const Launch& launch, bool fine) {
  const char* op = "conv_transpose2d";
  Args a = make_args(op, stride, padding, dilation, output_padding, groups);
  check_tensors(op, input, weight, bias, weight.dim() == 4 ? weight.size(1) * groups : 0, "out_channels");
  Geom g = transpose_geom(op, input, weight, a);
  return adjoint(input, weight, opt_acc(bias, acc_dtype(input)), g, groups, launch, fine);
}

template <typename Launch>
std::tuple<Tensor, Tensor, Tensor> transpose_backward(const Tensor& grad_out, const Tensor& input,
                                                      const Tensor& weight, at::IntArrayRef stride,
                                                      at::IntArrayRef padding, at::IntArrayRef output_padding,
                                                      int64_t groups, at::IntArrayRef dilation,
                                                      std::array<bool, 3> mask, const Launch& launch, bool fine) {
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
  Tensor gi, gw, gb;
  if (mask[0]) gi = correlate(go, weight, Tensor(), g, groups, launch, fine);
  if (mask[1]) gw = weight_grad(go, input, g.kh, g.kw, g, groups, launch, fine);
  if (mask[2]) gb = bias_grad(go);
  return masked(gi, gw, gb, input);
}

}  // namespace conv
}  // namespace segops
