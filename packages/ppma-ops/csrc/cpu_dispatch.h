// Run-time choice among the per-ISA copies of a CPU kernel (csrc/cpu/*.cpp, compiled into
// ppma::DEFAULT / AVX2 / AVX512), shared by the op files so each ISA is handled in one place.
#pragma once

#include "common.h"

// PPMA_DISPATCH_CPU_ISA(FN, args...) calls ppma::<ISA>::FN(args...) for selected_cpu_isa();
// an ISA that was not built falls through to the next narrower one, down to DEFAULT.
#define PPMA_DISPATCH_CPU_ISA(FN, ...)           \
  switch (::ppma::selected_cpu_isa()) {          \
    case ::ppma::CpuIsa::Avx512:                 \
      PPMA_CALL_IF_BUILT_AVX512(FN, __VA_ARGS__) \
    case ::ppma::CpuIsa::Avx2:                   \
      PPMA_CALL_IF_BUILT_AVX2(FN, __VA_ARGS__)   \
    default:                                     \
      ::ppma::DEFAULT::FN(__VA_ARGS__);          \
  }

#if defined(PPMA_BUILT_AVX512)
#define PPMA_CALL_IF_BUILT_AVX512(FN, ...) \
  ::ppma::AVX512::FN(__VA_ARGS__);         \
  break;
#else
#define PPMA_CALL_IF_BUILT_AVX512(FN, ...) [[fallthrough]];
#endif
#if defined(PPMA_BUILT_AVX2)
#define PPMA_CALL_IF_BUILT_AVX2(FN, ...) \
  ::ppma::AVX2::FN(__VA_ARGS__);         \
  break;
#else
#define PPMA_CALL_IF_BUILT_AVX2(FN, ...) [[fallthrough]];
#endif
