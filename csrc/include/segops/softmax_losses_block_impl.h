// Body of the CPU blocked paths of the softmax losses (see softmax_losses_block.h). Included once per instruction
// set, each time inside its own namespace (generic, avx2, avx512) and under the matching target options, so that
// the same source is compiled for each and the launcher picks one at run time. No include guard: by design.
// Uses kChunk, kStage and kStreamBytes of the enclosing namespace.

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

// Writes n elements of a gradient row: with `nt`, non-temporal 16-byte stores where aligned and plain stores
// at the unaligned ends (callers then issue store_fence() before their task ends); else plain stores.
template <typename T>
inline void stream_row(T* dst, const T* src, index_t n, bool nt) {
  static_assert(16 % sizeof(T) == 0, "element size must divide 16");
  char* d = reinterpret_cast<char*>(dst);
  const char* s = reinterpret_cast<const char*>(src);
  const size_t bytes = static_cast<size_t>(n) * sizeof(T);
  if (!nt) {
    std::memcpy(d, s, bytes);
    return;
  }
#if defined(__SSE2__)
  size_t head = (16 - (reinterpret_cast<uintptr_t>(d) & 15)) & 15;
  if (head > bytes) head = bytes;
  std::memcpy(d, s, head);
  size_t i = head;
  for (; i + 16 <= bytes; i += 16)
    _mm_stream_si128(reinterpret_cast<__m128i*>(d + i), _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i)));
  std::memcpy(d + i, s + i, bytes - i);
#else
  std::memcpy(d, s, bytes);
#endif
}

inline void store_fence() {
#if defined(__SSE2__)
  _mm_sfence();  // non-temporal stores are weakly ordered: publish them before the task counts as done
#endif
}

// The pixels of a chunk a loop visits, as lanes: lane j is pixel j (dense: idx == nullptr) or pixel idx[j]
// (sparse: the labelled / counted pixels only, fewer than a quarter of the chunk).
inline bool use_sparse(int visited, int n) { return visited * 4 < n; }
inline int pixel_of(const int32_t* idx, int j) { return idx ? idx[j] : j; }

// xs[(k - k0) * L + j] = logit of class k in [k0, k0 + kb) at lane j0 + j, for j in [0, L).
template <typename scalar_t>
inline void stage(const scalar_t* px, index_t sk, index_t k0, index_t kb, const int32_t* idx, int j0, int L,
                  float* xs) {
  for (index_t k = 0; k < kb; ++k) {
    const scalar_t* row = px + (k0 + k) * sk;
    float* dst = xs + k * L;
    if (idx) {
      for (int j = 0; j < L; ++j) dst[j] = static_cast<float>(row[idx[j0 + j]]);
    } else {
#pragma omp simd
      for (int j = 0; j < L; ++j) dst[j] = static_cast<float>(row[j0 + j]);
    }
  }
}

// Lanes per staging group when all K classes of a lane are staged together (the forward's passes need them all).
inline int lanes_per_group(index_t K, int L) {
  return static_cast<int>(std::min<index_t>(L, std::max<index_t>(1, kStage / K)));
}

// mx[j] = max over the K classes of lane j; row_of(k) points at class k's L lanes (contiguous). A NaN logit is
// never the max, and then makes the lane's sum of exponentials NaN.
template <typename RowOf>
inline void lane_max(const RowOf& row_of, index_t K, int L, float* mx) {
  const auto* first = row_of(0);
  for (int j = 0; j < L; ++j) mx[j] = static_cast<float>(first[j]);
  for (index_t k = 1; k < K; ++k) {
    const auto* row = row_of(k);
#pragma omp simd
    for (int j = 0; j < L; ++j) {
      const float xv = static_cast<float>(row[j]);
      mx[j] = xv > mx[j] ? xv : mx[j];
    }
  }
}

// Runs lanes_fn(j0, Lg, row_of) over the lanes [0, L) of a chunk in groups: dense lanes in one group whose rows
// are the chunk's own (read in place: each pass streams the K rows), sparse lanes staged, lanes_per_group at a
// time, with all K classes (the forward's passes need them all).
template <typename scalar_t, typename LanesFn>
inline void for_lane_groups(const View3<const scalar_t>& x, index_t b, index_t s0, index_t K, int L,
                            const int32_t* idx, const LanesFn& lanes_fn) {
  const scalar_t* px = x.pixel(b, s0);
  if (!idx) {
    lanes_fn(0, L, [&](index_t k) { return px + k * x.sk; });
    return;
  }
  float xs[kStage];
  const int G = lanes_per_group(K, L);
  for (int j0 = 0; j0 < L; j0 += G) {
    const int Lg = std::min(G, L - j0);
    stage(px, x.sk, 0, K, idx, j0, Lg, xs);
    lanes_fn(j0, Lg, [&](index_t k) -> const float* { return xs + k * Lg; });
  }
}

// Writes the gradient rows of a chunk, class by class, each row once: row_fn(k, xr, vals) computes the L lanes'
// values of class k from their logits xr[0..L), and pixels outside the lanes (sparse) get zeros. Dense lanes read
// each logit once, straight from the chunk's rows, and their rows go out through stream_row. Sparse lanes are
// staged, kStage logits at a time; their row segment is zeroed in place and the few values stored into it while
// its lines are still in L1 (measured: ~7% faster than assembling the row aside and streaming it out, on a
// gradient whose pages are faulted in by these very stores).
template <typename scalar_t, typename RowFn>
void write_gradient_rows(const View3<const scalar_t>& x, const View3<scalar_t>& gx, index_t K, index_t b, index_t s0,
                         int n, int L, const int32_t* idx, bool nt, const RowFn& row_fn) {
  const scalar_t* px = x.pixel(b, s0);
  scalar_t* pg = gx.pixel(b, s0);
  scalar_t out[kChunk];
  float vals[kChunk];
  if (!idx) {
    for (index_t k = 0; k < K; ++k) {
      row_fn(k, px + k * x.sk, vals);
      if constexpr (std::is_same<scalar_t, float>::value) {
        stream_row(pg + k * gx.sk, vals, n, nt);
      } else {
        for (int v = 0; v < n; ++v) out[v] = static_cast<scalar_t>(vals[v]);
        stream_row(pg + k * gx.sk, out, n, nt);
      }
    }
    store_fence();
    return;
  }
  float xs[kStage];
  const index_t group = std::max<index_t>(1, kStage / std::max(L, 1));
  for (index_t k0 = 0; k0 < K; k0 += group) {
    const index_t kb = std::min<index_t>(group, K - k0);
    stage(px, x.sk, k0, kb, idx, 0, L, xs);
    for (index_t k = k0; k < k0 + kb; ++k) {
      row_fn(k, xs + (k - k0) * L, vals);
      scalar_t* gr = pg + k * gx.sk;
      std::memset(static_cast<void*>(gr), 0, sizeof(scalar_t) * n);
      for (int j = 0; j < L; ++j) gr[idx[j]] = static_cast<scalar_t>(vals[j]);
    }
  }
  store_fence();
}

// ---- partial cross-entropy ------------------------------------------------------------------------

template <typename F>
float weight_sum(const F& f) {
  float w = 0.0f;
  for (index_t k = 0; k < f.K; ++k) w += f.class_weight(k);
  return w;
}

// The chunk's share of the loss over lanes [0, L), t[v]: pixel v's class or -1. Sums in pixel order.
template <typename scalar_t, typename target_t>
LossSum<float> pce_forward_lanes(const PceForward<scalar_t, target_t>& f, index_t b, index_t s0, int L,
                                 const int32_t* idx, const int32_t* t) {
  const index_t K = f.K, i0 = b * f.S + s0;
  const float sum_w = f.eps != 0.0f ? weight_sum(f) : 0.0f;
  LossSum<float> sum{};
  for_lane_groups(f.x, b, s0, K, L, idx, [&](int j0, int Lg, const auto& row_of) {
    float mx[kChunk], se[kChunk], swx[kChunk];
    lane_max(row_of, K, Lg, mx);
    for (int j = 0; j < Lg; ++j) se[j] = swx[j] = 0.0f;
    for (index_t k = 0; k < K; ++k) {
      const auto* row = row_of(k);
#pragma omp simd
      for (int j = 0; j < Lg; ++j) se[j] += exp_poly(static_cast<float>(row[j]) - mx[j]);
    }
    if (f.eps != 0.0f) {  // label smoothing needs sum_k w_k x_k as well
      for (index_t k = 0; k < K; ++k) {
        const auto* row = row_of(k);
        const float w = f.class_weight(k);
#pragma omp simd
        for (int j = 0; j < Lg; ++j) swx[j] += w * static_cast<float>(row[j]);
      }
    }
    for (int j = 0; j < Lg; ++j) {  // pixel order: the fixed order of the chunk's share
      const int v = pixel_of(idx, j0 + j);
      if (t[v] < 0) continue;  // dense lanes include the unlabelled pixels, already stored
      const float l = mx[j] + std::log(se[j]), w_t = f.class_weight(t[v]);
      const float x_t = static_cast<float>(row_of(t[v])[j]);
      sum = sum + f.store(i0 + v, l, f.pixel_loss(l, x_t, w_t, sum_w, swx[j]), w_t);
    }
  });
  return sum;
}

template <typename scalar_t, typename target_t>
LossSum<float> forward_chunk(const PceForward<scalar_t, target_t>& f, index_t b, index_t s0, int n) {
  int32_t t[kChunk], idx[kChunk];
  int m = 0, odd = 0;
  const index_t i0 = b * f.S + s0;
  for (int v = 0; v < n; ++v) {  // branch-free: most pixels of a scribble batch are unlabelled
    const int64_t tv = static_cast<int64_t>(f.target.at(b, s0 + v));
    const bool lab = f.labelled(tv);
    t[v] = lab ? static_cast<int32_t>(tv) : -1;
    idx[m] = v;
    m += lab;
    odd += !lab && tv != f.ignore_index;
  }
  // every pixel's lse (and per-pixel loss) is 0 unless it is labelled: one store pass, the labelled overwrite it
  std::memset(static_cast<void*>(f.lse + i0), 0, sizeof(float) * n);
  if (f.loss) std::memset(static_cast<void*>(f.loss + i0), 0, sizeof(scalar_t) * n);
  for (int v = 0; odd > 0 && v < n; ++v) {  // out-of-range labels: flagged for the host's IndexError
    const int64_t tv = static_cast<int64_t>(f.target.at(b, s0 + v));
    if (t[v] < 0 && tv != f.ignore_index) f.skip(i0 + v, tv);
  }
  if (m == 0) return LossSum<float>{};
  if (use_sparse(m, n)) return pce_forward_lanes(f, b, s0, m, idx, t);
  return pce_forward_lanes(f, b, s0, n, nullptr, t);
}

template <typename scalar_t, typename target_t>
void pce_backward_lanes(const PceBackward<scalar_t, target_t>& f, index_t b, index_t s0, int n, int L,
                        const int32_t* idx, const int32_t* t, bool nt) {
  float a[kChunk], c[kChunk], l[kChunk];
  int32_t tk[kChunk], on[kChunk];  // int32 like the float lanes, so the selects below vectorise
  const float sum_w = f.eps != 0.0f ? weight_sum(f) : 0.0f;
  const index_t i0 = b * f.S + s0;
  for (int j = 0; j < L; ++j) {
    const int v = pixel_of(idx, j);
    on[j] = t[v] >= 0;
    const float g = on[j] ? f.scaled_grad(b, s0 + v) : 0.0f;
    a[j] = on[j] ? g * (1.0f - f.eps) * f.class_weight(t[v]) : 0.0f;
    c[j] = g * f.eps / static_cast<float>(f.K);
    l[j] = on[j] ? f.lse[i0 + v] : 0.0f;
    tk[j] = t[v];
  }
  write_gradient_rows(f.x, f.gx, f.K, b, s0, n, L, idx, nt, [&](index_t k, const auto* xr, float* vals) {
    const float wk = f.class_weight(k);
    const int32_t kk = static_cast<int32_t>(k);
#pragma omp simd
    for (int j = 0; j < L; ++j) {
      const float p = exp_poly(static_cast<float>(xr[j]) - l[j]);
      const float val = a[j] * (p - (tk[j] == kk ? 1.0f : 0.0f)) + c[j] * (sum_w * p - wk);
      vals[j] = on[j] ? val : 0.0f;  // select: unlabelled logits may be NaN
    }
  });
}

template <typename scalar_t, typename target_t>
void backward_chunk(const PceBackward<scalar_t, target_t>& f, index_t b, index_t s0, int n, bool nt) {
  int32_t t[kChunk], idx[kChunk];
  int m = 0;
  for (int v = 0; v < n; ++v) {
    const int64_t tv = static_cast<int64_t>(f.target.at(b, s0 + v));
    t[v] = f.labelled(tv) ? static_cast<int32_t>(tv) : -1;
    idx[m] = v;
    m += t[v] >= 0;
  }
  pce_backward_lanes(f, b, s0, n, use_sparse(m, n) ? m : n, use_sparse(m, n) ? idx : nullptr, t, nt);
}

// ---- entropy ----------------------------------------------------------------------------------------------

template <typename scalar_t>
LossSum<float> entropy_forward_lanes(const EntropyForward<scalar_t>& f, index_t b, index_t s0, int L,
                                     const int32_t* idx, const int32_t* on) {
  const index_t K = f.K, i0 = b * f.S + s0;
  LossSum<float> sum{};
  for_lane_groups(f.x, b, s0, K, L, idx, [&](int j0, int Lg, const auto& row_of) {
    float mx[kChunk], se[kChunk], tx[kChunk];
    lane_max(row_of, K, Lg, mx);
    for (int j = 0; j < Lg; ++j) se[j] = tx[j] = 0.0f;
    for (index_t k = 0; k < K; ++k) {
      const auto* row = row_of(k);
#pragma omp simd
      for (int j = 0; j < Lg; ++j) {
        const float xv = static_cast<float>(row[j]);
        const float e = exp_poly(xv - mx[j]);
        se[j] += e;
        tx[j] += xv == -INFINITY ? 0.0f : e * xv;  // p = 0 at -inf (exp_poly clamps it to 1.6e-38)
      }
    }
    for (int j = 0; j < Lg; ++j) {
      const int v = pixel_of(idx, j0 + j);
      if (!on[v]) continue;
      sum = sum + f.store(i0 + v, mx[j] + std::log(se[j]), tx[j] / se[j]);
    }
  });
  return sum;
}

template <typename scalar_t>
LossSum<float> forward_chunk(const EntropyForward<scalar_t>& f, index_t b, index_t s0, int n) {
  int32_t on[kChunk], idx[kChunk];
  int m = 0;
  const index_t i0 = b * f.S + s0;
  for (int v = 0; v < n; ++v) {
    on[v] = f.counted(b, s0 + v);
    if (on[v])
      idx[m++] = v;
    else
      f.skip(i0 + v);
  }
  if (m == 0) return LossSum<float>{};
  if (use_sparse(m, n)) return entropy_forward_lanes(f, b, s0, m, idx, on);
  return entropy_forward_lanes(f, b, s0, n, nullptr, on);
}

template <typename scalar_t>
void entropy_backward_lanes(const EntropyBackward<scalar_t>& f, index_t b, index_t s0, int n, int L,
                            const int32_t* idx, const int32_t* counted, bool nt) {
  float g[kChunk], l[kChunk], e[kChunk];
  int32_t on[kChunk];
  const index_t i0 = b * f.S + s0;
  for (int j = 0; j < L; ++j) {
    const int v = pixel_of(idx, j);
    on[j] = counted[v];
    g[j] = on[j] ? f.scaled_grad(b, s0 + v) : 0.0f;
    l[j] = f.lse[i0 + v];
    e[j] = f.ex[i0 + v];
  }
  write_gradient_rows(f.x, f.gx, f.K, b, s0, n, L, idx, nt, [&](index_t, const auto* xr, float* vals) {
#pragma omp simd
    for (int j = 0; j < L; ++j) {
      const float xv = static_cast<float>(xr[j]);
      const float val = -g[j] * exp_poly(xv - l[j]) * (xv - e[j]);
      vals[j] = on[j] && xv != -INFINITY ? val : 0.0f;
    }
  });
}

template <typename scalar_t>
void backward_chunk(const EntropyBackward<scalar_t>& f, index_t b, index_t s0, int n, bool nt) {
  int32_t on[kChunk], idx[kChunk];
  int m = 0;
  for (int v = 0; v < n; ++v) {
    on[v] = f.counted(b, s0 + v);
    idx[m] = v;
    m += on[v] ? 1 : 0;
  }
  entropy_backward_lanes(f, b, s0, n, use_sparse(m, n) ? m : n, use_sparse(m, n) ? idx : nullptr, on, nt);
}
