// Large buffers that a CPU kernel fills right after allocating them (outputs, saved softmax
// tiles, backward scratch).
//
// A fresh multi-megabyte allocation is fresh anonymous memory, and every 4 KiB page of it
// faults on its first write: under a hypervisor each fault is a VM exit, and for the
// criss-cross op at 56×56 (≈110 MB written per forward+backward) the faults cost more than a
// tenth of the run. Advising transparent huge pages before the first touch lets the kernel back
// the buffer with 2 MiB pages, 512× fewer faults. It is advice: where THP is off, the
// call fails, or the platform is not Linux, nothing changes.
#pragma once

#include <ATen/ATen.h>

#include <cstddef>
#include <cstdint>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace ppma {

// Advise huge pages for the whole 2 MiB pages inside [data, data + bytes).
inline void advise_huge_pages(void* data, std::size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr std::uintptr_t kHuge = std::uintptr_t(1) << 21;
  const auto begin = (reinterpret_cast<std::uintptr_t>(data) + kHuge - 1) & ~(kHuge - 1);
  const auto end = (reinterpret_cast<std::uintptr_t>(data) + bytes) & ~(kHuge - 1);
  if (end > begin) {
    (void)madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
  }
#else
  (void)data;
  (void)bytes;
#endif
}

// at::empty for a CPU buffer that is about to be written in full.
inline at::Tensor empty_for_write(at::IntArrayRef shape, const at::TensorOptions& options) {
  at::Tensor t = at::empty(shape, options);
  if (t.device().is_cpu() && t.nbytes() >= (std::size_t(4) << 20)) {
    advise_huge_pages(t.data_ptr(), t.nbytes());
  }
  return t;
}

}  // namespace ppma
