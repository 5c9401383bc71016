// The instruction set the CPU kernels' run-time clones use: one choice for the loss kernels (generic / AVX2 /
// AVX-512 builds of their blocked loops) and the lattice and mean-field loops (AVX2 clones).
#pragma once

#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SEGOPS_CPU_MULTI_ISA 1
#endif

namespace segops {
namespace block {

enum class Isa : int { kGeneric = 0, kAvx2 = 1, kAvx512 = 2 };

// The widest instruction set this CPU runs, capped like ATen's own kernels by ATEN_CPU_CAPABILITY
// ("default", "avx2", "avx512"; read once per process), so that one setting pins both for a comparison.
inline Isa cpu_isa() {
  static const Isa isa = [] {
#if defined(SEGOPS_CPU_MULTI_ISA)
    __builtin_cpu_init();
    Isa best = Isa::kGeneric;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = Isa::kAvx2;
    if (best == Isa::kAvx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
      best = Isa::kAvx512;
    const char* cap = std::getenv("ATEN_CPU_CAPABILITY");
    if (cap && std::strcmp(cap, "default") == 0) best = Isa::kGeneric;
    if (cap && std::strcmp(cap, "avx2") == 0 && best == Isa::kAvx512) best = Isa::kAvx2;
    return best;
#else
    return Isa::kGeneric;
#endif
  }();
  return isa;
}

// Whether the loops compiled a second time with target("avx2") run (the lattice's and the update op's use no FMA:
// the same roundings as the baseline build; the one-op mean-field pass contracts into FMAs).
inline bool avx2_clones() { return cpu_isa() != Isa::kGeneric; }

}  // namespace block
}  // namespace segops
