// Fresh outputs and scratch buffers: large CPU ones on transparent huge pages.
//
// A gradient or filtered map the size of the logits (tens of MB) is written once, into memory the allocator
// has just mapped: with 4 KiB pages the first touch costs one page fault per 4 KiB, which for a fresh 44 MB
// tensor is ~20 ms, 5x the time it takes to write the bytes (measured with ATen's allocator on a 2-core EPYC,
// Linux 6.18). On memory advised MADV_HUGEPAGE the kernel faults in 2 MiB pages: ~4 ms for the same 44 MB.
// Where the kernel has no transparent huge pages (or THP is "never") the advice is a no-op and the cost is
// ATen's again. The pages are faulted in here, by the calling thread in address order: faulting them from
// several threads at once was slower than from one (the mean-field pass: 30 ms more at two threads with
// THP defrag "madvise"). CUDA tensors and CPU tensors under 2 MiB come from at::empty. (The bound was 8 MiB,
// on the assumption that malloc reuses mid-size blocks without new faults; it does not always: the CRF loss at
// scale 0.5, whose resize output and gradient are 5.5 MB each, took 2.5-3% less time per step on one thread and
// 2-3% less on two with the bound at 2 MiB, 512x512, the 2-core VM; scale 1 and inference unchanged. A block is
// a whole number of 2 MiB pages, so a 2-4 MiB tensor holds up to twice its size.) SEGOPS_HUGE_PAGES=0 in the environment (read at
// each allocation, so a benchmark can compare both in one process) turns this off: at::empty everywhere.
// Faulting the pages from both threads, each its own half, measured no faster (PCE backward, 44 MB).
// On a virtual machine a fresh huge page can cost far more when the host backs it only on first touch: the
// mean-field pass's 25 MB scratch took 1-80 ms to fault in across calls on the 2-core EPYC VM; the whole
// inference was still as fast as with 4 KiB pages (medians 149 vs 156 ms at one thread, 77 vs 78 at two).
//
// Freed blocks are kept for reuse (HugeBlockCache, up to SEGOPS_CPU_BLOCK_CACHE_MB, default 256 MiB; 0 turns it
// off): a training loop frees and re-requests outputs of the same sizes every step, and a reused block is
// already mapped and faulted in. Without the cache each step maps a fresh block (the page faults above, ~1.1 ms
// for a 22 MB gradient, on the calling thread alone) and unmaps the old one; an unmap of memory the process's
// other threads have touched interrupts their CPUs to flush TLBs, which on the 2-core VM cost the two-thread CRF
// loss ~1.5 ms per step outside any op.
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

// Bytes of freed huge-page blocks kept for reuse (SEGOPS_CPU_BLOCK_CACHE_MB, read whenever a block is freed).
inline size_t block_cache_limit() {
  const char* v = std::getenv("SEGOPS_CPU_BLOCK_CACHE_MB");
  if (v == nullptr || v[0] == '\0') return size_t(256) << 20;
  char* end = nullptr;
  const long long mb = std::strtoll(v, &end, 10);
  return mb > 0 && end != v ? static_cast<size_t>(mb) << 20 : 0;
}

// Freed blocks of empty_output (2 MiB-aligned, sizes a multiple of 2 MiB, advised for huge pages and faulted in),
// by exact size; the most recently freed block of the requested size first (its pages are the likeliest to be
// in cache). Over the limit, the oldest blocks are released. Never destroyed: tensors can be freed during static
// destruction.
class HugeBlockCache {
 public:
  static HugeBlockCache& instance() {
    static HugeBlockCache* c = new HugeBlockCache();
    return *c;
  }
  void* take(size_t size) {
    const std::lock_guard<std::mutex> guard(lock_);
    for (size_t i = blocks_.size(); i-- > 0;) {
      if (blocks_[i].second != size) continue;
      void* p = blocks_[i].first;
      blocks_.erase(blocks_.begin() + static_cast<std::ptrdiff_t>(i));
      cached_ -= size;
      return p;
    }
    return nullptr;
  }
  void give(void* p, size_t size) {
    const size_t limit = block_cache_limit();
    std::vector<void*> release;
    {
      const std::lock_guard<std::mutex> guard(lock_);
      if (size > limit) {
        release.push_back(p);
      } else {
        blocks_.emplace_back(p, size);
        cached_ += size;
      }
      size_t drop = 0;
      while (cached_ > limit && drop < blocks_.size()) {
        cached_ -= blocks_[drop].second;
        release.push_back(blocks_[drop++].first);
      }
      blocks_.erase(blocks_.begin(), blocks_.begin() + static_cast<std::ptrdiff_t>(drop));
    }
    for (void* q : release) std::free(q);  // outside the lock: unmapping can take a while
  }
  void release_all() {
    std::vector<std::pair<void*, size_t>> blocks;
    {
      const std::lock_guard<std::mutex> guard(lock_);
      blocks.swap(blocks_);
      cached_ = 0;
    }
    for (const auto& b : blocks) std::free(b.first);
  }
  size_t cached_bytes() {
    const std::lock_guard<std::mutex> guard(lock_);
    return cached_;
  }

 private:
  std::mutex lock_;
  std::vector<std::pair<void*, size_t>> blocks_;  // oldest first
  size_t cached_ = 0;
};

inline at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options,
                               at::MemoryFormat format = at::MemoryFormat::Contiguous) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr size_t kHuge = size_t(2) << 20;
  if (options.device().is_cpu() && !options.pinned_memory() && huge_pages_enabled()) {
    size_t numel = 1;
    for (const int64_t s : sizes) numel *= static_cast<size_t>(s);
    const size_t bytes = numel * at::elementSize(at::typeMetaToScalarType(options.dtype()));
    if (bytes >= kHuge) {
      const size_t size = (bytes + kHuge - 1) / kHuge * kHuge;
      void* p = HugeBlockCache::instance().take(size);
      if (p == nullptr && posix_memalign(&p, kHuge, size) == 0) {
        madvise(p, size, MADV_HUGEPAGE);
        for (size_t at = 0; at < size; at += kHuge) static_cast<volatile char*>(p)[at] = 0;
      }
      if (p != nullptr) {
        std::vector<int64_t> strides;
        if (format == at::MemoryFormat::ChannelsLast && sizes.size() == 4) {
          strides = c10::get_channels_last_strides_2d(sizes);
        } else if (format == at::MemoryFormat::ChannelsLast3d && sizes.size() == 5) {
          strides = c10::get_channels_last_strides_3d(sizes);
        } else {
          const c10::DimVector contiguous = c10::contiguous_strides(sizes);
          strides.assign(contiguous.begin(), contiguous.end());
        }
        return at::from_blob(p, sizes, strides, [size](void* q) { HugeBlockCache::instance().give(q, size); }, options);
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
