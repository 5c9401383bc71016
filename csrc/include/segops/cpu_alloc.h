// Fresh outputs and scratch buffers: large CPU ones on transparent huge pages.
//
// A gradient or filtered map the size of the logits (tens of MB) is written once, into memory the allocator
// has just mapped: with 4 KiB pages the first touch costs one page fault per 4 KiB, which for a fresh 44 MB
// tensor is ~20 ms, 5x the time it takes to write the bytes (measured with ATen's allocator on a 2-core EPYC,
// Linux 6.18). On memory advised MADV_HUGEPAGE the kernel faults in 2 MiB pages: ~4 ms for the same 44 MB.
// Where the kernel has no transparent huge pages (or THP is "never") the advice is a no-op and the cost is
// ATen's again. The pages are faulted in here, by the calling thread in address order: faulting them from
// several threads at once was slower than from one (the mean-field pass: 30 ms more at two threads with
// THP defrag "madvise"). CUDA tensors and CPU tensors under 8 MiB come from at::empty (the caching
// allocator / malloc's reuse already avoid the faults there). SEGOPS_HUGE_PAGES=0 in the environment (read at
// each allocation, so a benchmark can compare both in one process) turns this off: at::empty everywhere.
// Faulting the pages from both threads, each its own half, measured no faster (PCE backward, 44 MB).
// On a virtual machine a fresh huge page can cost far more when the host backs it only on first touch: the
// mean-field pass's 25 MB scratch took 1-80 ms to fault in across calls on the 2-core EPYC VM; the whole
// inference was still as fast as with 4 KiB pages (medians 149 vs 156 ms at one thread, 77 vs 78 at two).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <c10/core/MemoryFormat.h>
#include <c10/util/strides.h>

#include <cstdlib>
#include <mutex>
#include <utility>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace segops {

inline bool huge_pages_enabled() {
  const char* v = std::getenv("SEGOPS_HUGE_PAGES");
  return v == nullptr || v[0] != '0';
}

inline at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options,
                               at::MemoryFormat format = at::MemoryFormat::Contiguous) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr size_t kHuge = size_t(2) << 20;
  if (options.device().is_cpu() && !options.pinned_memory() && huge_pages_enabled()) {
    size_t numel = 1;
    for (const int64_t s : sizes) numel *= static_cast<size_t>(s);
    const size_t bytes = numel * at::elementSize(at::typeMetaToScalarType(options.dtype()));
    if (bytes >= 4 * kHuge) {
      const size_t size = (bytes + kHuge - 1) / kHuge * kHuge;
      void* p = nullptr;
      if (posix_memalign(&p, kHuge, size) == 0) {
        madvise(p, size, MADV_HUGEPAGE);
        for (size_t at = 0; at < size; at += kHuge) static_cast<volatile char*>(p)[at] = 0;
        std::vector<int64_t> strides;
        if (format == at::MemoryFormat::ChannelsLast && sizes.size() == 4) {
          strides = c10::get_channels_last_strides_2d(sizes);
        } else if (format == at::MemoryFormat::ChannelsLast3d && sizes.size() == 5) {
          strides = c10::get_channels_last_strides_3d(sizes);
        } else {
          const c10::DimVector contiguous = c10::contiguous_strides(sizes);
          strides.assign(contiguous.begin(), contiguous.end());
        }
        return at::from_blob(p, sizes, strides, [](void* q) { std::free(q); }, options);
      }
    }
  }
#endif
  return at::empty(sizes, options.memory_format(format));
}

// A large CPU scratch buffer kept from one call of an op to the next, so that it is faulted in once instead of at
// every call (on the project's 2-core VM, faulting in a fresh 25 MB one took 1-89 ms per call: the hypervisor
// backs huge pages on first touch). One cached buffer per `Tag` (one per call site), of at most kMaxBytes; a
// call takes it while it runs (a concurrent call allocates its own) and the lease gives it back. Its contents
// are whatever the last call left: the caller writes every element it reads.
template <typename Tag>
class CachedScratch {
 public:
  static constexpr int64_t kMaxBytes = int64_t(64) << 20;
  struct Lease {
    explicit Lease(at::Tensor t) : buffer(std::move(t)) {}
    Lease(const Lease&) = delete;
    Lease& operator=(const Lease&) = delete;
    ~Lease() { instance().give(std::move(buffer)); }
    at::Tensor buffer;
  };
  // At least n elements of `dtype` (a 1-D CPU tensor, possibly longer than n), given back when the lease ends.
  static Lease take(int64_t n, at::ScalarType dtype) {
    CachedScratch& c = instance();
    {
      const std::lock_guard<std::mutex> guard(c.lock_);
      if (c.buffer_.defined() && c.buffer_.scalar_type() == dtype && c.buffer_.numel() >= n)
        return Lease(std::move(c.buffer_));
    }
    return Lease(empty_output({n}, at::TensorOptions().dtype(dtype)));
  }

 private:
  static CachedScratch& instance() {
    static CachedScratch* c = new CachedScratch();  // never destroyed: leases may end during static destruction
    return *c;
  }
  void give(at::Tensor t) {
    if (!t.defined() || t.numel() * static_cast<int64_t>(t.element_size()) > kMaxBytes) return;
    const std::lock_guard<std::mutex> guard(lock_);
    if (!buffer_.defined() || buffer_.numel() * buffer_.element_size() < t.numel() * t.element_size())
      buffer_ = std::move(t);
  }
  std::mutex lock_;
  at::Tensor buffer_;
};

}  // namespace segops
