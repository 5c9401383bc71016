// CUDA launcher for the write-once kernel bodies of parallel.h: one grid-stride kernel per functor.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>

#include "segops/parallel.h"

namespace segops {

template <typename F>
__global__ void grid_stride_kernel(index_t n, F f) {
  const index_t stride = static_cast<index_t>(blockDim.x) * gridDim.x;
  for (index_t i = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) f(i);
}

// Runs f(i) for i in [0, n) on the current stream of the current device.
template <typename F>
inline void cuda_parallel_for(index_t n, const F& f, int threads = 256) {
  if (n <= 0) return;
  const index_t max_blocks = index_t(1) << 20;  // grid-stride covers the rest; keeps launches cheap
  const index_t blocks = std::min<index_t>((n + threads - 1) / threads, max_blocks);
  grid_stride_kernel<F><<<static_cast<unsigned>(blocks), threads, 0, c10::cuda::getCurrentCUDAStream()>>>(n, f);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The CUDA launcher: the members and their meaning are listed in parallel.h ("launchers").
struct CudaLaunch {
  int threads = 256;

  template <typename F>
  bool functor_writes_zeros(const F&) const { return true; }
  template <typename F>
  bool writes_every_gradient(const F&) const { return false; }
  template <typename F>
  void operator()(index_t n, const F& f) const { cuda_parallel_for(n, f, threads); }
  template <typename F>
  void operator()(index_t n, const F& f, index_t /*cost*/) const { cuda_parallel_for(n, f, threads); }
  index_t segment(index_t /*width*/) const { return 1; }
  int64_t scratch_elements() const { return int64_t(1) << 28; }  // 1 GiB of float
  int64_t batch(int64_t n, int64_t per_item) const {
    const int64_t fit = scratch_elements() / (per_item > 1 ? per_item : 1);
    return std::max<int64_t>(1, std::min<int64_t>(n, fit));
  }
  template <typename F>
  void over_items(int64_t n, double /*flops*/, const F& body) const {
    if (n > 0) body(0, n);
  }
  template <typename F>
  void with_index(bool fits32, const F& f) const {
    if (fits32) {
      f(int32_t{});
    } else {
      f(int64_t{});
    }
  }
  bool sgemm(int64_t, int64_t, int64_t, const float*, int64_t, int64_t, const float*, int64_t, int64_t, float*, int64_t,
             int64_t, bool) const {
    return false;  // cuBLAS through ATen
  }
};

}  // namespace segops

// ---- deterministic one-launch reductions ---------------------------------------------------------------
// cuda_parallel_reduce(n, f, fin): sums f(i) over i in [0, n) and calls fin(total) on the device, all in ONE
// kernel launch and without float atomics: each block sums its grid-stride share in a fixed order, reduces
// it by a fixed shared-memory tree and writes one partial; the last block to finish (a completion ticket)
// sums the partials in a fixed order and runs fin. The result's bits depend only on the inputs and the grid
// size, which depends only on n and the device.
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>

#include <map>
#include <mutex>
#include <type_traits>
#include <utility>

namespace segops {

// A functor opts into warp-cooperative calls with `static constexpr bool kWarpCooperative = true` and a member
// `warp(i, valid)`: the loops below then keep each warp's 32 lanes together on 32 consecutive items and call
// warp(i, i < n) on every lane, so that the functor may use __ballot_sync / __shfl_sync with the full mask.
template <typename F, typename = void>
struct is_warp_cooperative : std::false_type {};
template <typename F>
struct is_warp_cooperative<F, std::void_t<decltype(F::kWarpCooperative)>> : std::bool_constant<F::kWarpCooperative> {};

template <typename F>
__global__ void warp_stride_kernel(index_t n, F f) {
  const index_t stride = static_cast<index_t>(blockDim.x) * gridDim.x, lane = threadIdx.x & 31;
  for (index_t base = static_cast<index_t>(blockIdx.x) * blockDim.x + (threadIdx.x - lane); base < n; base += stride)
    f.warp(base + lane, base + lane < n);
}

// cuda_parallel_for for warp-cooperative functors: f.warp(i, i < n) on every lane, warps on 32 consecutive i.
template <typename F>
inline void cuda_parallel_for_warps(index_t n, const F& f, int threads = 256) {
  if (n <= 0) return;
  const index_t max_blocks = index_t(1) << 20;
  const index_t blocks = std::min<index_t>((n + threads - 1) / threads, max_blocks);
  warp_stride_kernel<F><<<static_cast<unsigned>(blocks), threads, 0, c10::cuda::getCurrentCUDAStream()>>>(n, f);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

namespace reduce_detail {

constexpr int kTicketSlots = 1024;
// Completion tickets, one per stream: zero when the module is loaded, and every launch's last block leaves its
// slot at zero again (atomicInc wraps at gridDim.x - 1), so no launch needs a memset first. Launches on one
// stream run one after another, hence never share a ticket. `static`: one array per translation unit (and per
// device), matched by the per-unit slot table of ticket_slot().
static __device__ unsigned int tickets[kTicketSlots];

// The ticket slot of `stream`, or -1 while the stream captures a CUDA graph (replays run on other streams,
// possibly beside eager launches on this one) or once every slot is taken: the launch then brings its own
// ticket, zeroed by a memset before the kernel.
static int ticket_slot(int device, cudaStream_t stream) {
  cudaStreamCaptureStatus status;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &status));
  if (status != cudaStreamCaptureStatusNone) return -1;
  static std::mutex lock;
  static std::map<std::pair<int, cudaStream_t>, int> slots;
  const std::lock_guard<std::mutex> guard(lock);
  const auto key = std::make_pair(device, stream);
  const auto it = slots.find(key);
  if (it != slots.end()) return it->second;
  if (static_cast<int>(slots.size()) >= kTicketSlots) return -1;
  const int slot = static_cast<int>(slots.size());
  slots.emplace(key, slot);
  return slot;
}

// Reads a partial another block wrote, bypassing L1 (the writer's __threadfence makes it visible in L2).
template <typename Sum>
__device__ __forceinline__ Sum load_cg(const Sum* p) {
  static_assert(sizeof(Sum) % sizeof(unsigned) == 0, "Sum must be a whole number of 32-bit words");
  Sum out;
  const unsigned* src = reinterpret_cast<const unsigned*>(p);
  unsigned* dst = reinterpret_cast<unsigned*>(&out);
#pragma unroll
  for (int w = 0; w < static_cast<int>(sizeof(Sum) / sizeof(unsigned)); ++w) dst[w] = __ldcg(src + w);
  return out;
}

// Fixed shared-memory tree over one value per thread; the total is valid in thread 0.
template <typename Sum, int kThreads>
__device__ __forceinline__ Sum block_sum(Sum* tree, Sum v) {
  tree[threadIdx.x] = v;
  __syncthreads();
#pragma unroll
  for (int w = kThreads / 2; w > 0; w >>= 1) {
    if (static_cast<int>(threadIdx.x) < w) tree[threadIdx.x] = tree[threadIdx.x] + tree[threadIdx.x + w];
    __syncthreads();
  }
  return tree[0];
}

template <typename Sum, int kThreads, typename F, typename Fin>
__global__ void __launch_bounds__(kThreads)
    reduce_kernel(index_t n, F f, Fin fin, Sum* partial, int slot, unsigned int* own_ticket) {
  __shared__ Sum tree[kThreads];
  __shared__ bool is_last;
  Sum s = Sum{};
  const index_t stride = static_cast<index_t>(kThreads) * gridDim.x;
  if constexpr (is_warp_cooperative<F>::value) {
    const index_t lane = threadIdx.x & 31;
    for (index_t base = static_cast<index_t>(blockIdx.x) * kThreads + (threadIdx.x - lane); base < n; base += stride)
      s = s + f.warp(base + lane, base + lane < n);
  } else {
    for (index_t i = static_cast<index_t>(blockIdx.x) * kThreads + threadIdx.x; i < n; i += stride) s = s + f(i);
  }
  s = block_sum<Sum, kThreads>(tree, s);
  if (threadIdx.x == 0) {
    partial[blockIdx.x] = s;
    __threadfence();  // the partial is visible device-wide before the ticket is taken
    unsigned int* ticket = slot >= 0 ? &tickets[slot] : own_ticket;
    is_last = atomicInc(ticket, gridDim.x - 1) == gridDim.x - 1;
  }
  __syncthreads();
  if (!is_last) return;
  __threadfence();
  Sum t = Sum{};
  for (unsigned j = threadIdx.x; j < gridDim.x; j += kThreads) t = t + load_cg(partial + j);
  t = block_sum<Sum, kThreads>(tree, t);
  if (threadIdx.x == 0) fin(t);
}

}  // namespace reduce_detail

// One launch on the current stream: total = sum of f(i) for i in [0, n) (Sum{} when n == 0), then fin(total)
// on the device. Sum: an aggregate of 32-bit or 64-bit fields with operator+ and Sum{} as zero. Partials come
// from the caching allocator (stream-ordered, no launch); the grid fills the device once (occupancy).
template <typename Sum, typename F, typename Fin>
inline void cuda_parallel_reduce(index_t n, const F& f, const Fin& fin) {
  constexpr int kThreads = 256;
  const auto kernel = reduce_detail::reduce_kernel<Sum, kThreads, F, Fin>;
  const int device = c10::cuda::current_device();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  static int blocks_per_sm = 0;  // per instantiation; the first device's occupancy (same arch assumed)
  if (blocks_per_sm == 0) {
    int b = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&b, kernel, kThreads, 0));
    blocks_per_sm = std::max(b, 1);
  }
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const index_t max_blocks = static_cast<index_t>(sms) * blocks_per_sm;
  const index_t blocks = std::max<index_t>(1, std::min<index_t>((n + kThreads - 1) / kThreads, max_blocks));
  const int slot = reduce_detail::ticket_slot(device, stream);
  const size_t ticket_bytes = 16;  // keeps the partials 16-byte aligned after the ticket
  c10::DataPtr scratch = c10::cuda::CUDACachingAllocator::get()->allocate(ticket_bytes + blocks * sizeof(Sum));
  auto* own_ticket = static_cast<unsigned int*>(scratch.get());
  auto* partial = reinterpret_cast<Sum*>(static_cast<char*>(scratch.get()) + ticket_bytes);
  if (slot < 0) C10_CUDA_CHECK(cudaMemsetAsync(own_ticket, 0, sizeof(unsigned int), stream));
  kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(n, f, fin, partial, slot, own_ticket);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace segops
