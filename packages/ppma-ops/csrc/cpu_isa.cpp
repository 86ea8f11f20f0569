// Run-time choice of the instruction set for the per-ISA kernels (see common.h).
#include "common.h"

#include <ATen/Version.h>

namespace ppma {

CpuIsa selected_cpu_isa() {
  // ATen's answer already combines cpuinfo with the ATEN_CPU_CAPABILITY override.
  static const CpuIsa isa = [] {
    const std::string capability = at::get_cpu_capability();  // "DEFAULT", "AVX2", "AVX512"
    CpuIsa best = CpuIsa::Default;
#if defined(PPMA_BUILT_AVX2)
    if (capability == "AVX2" || capability == "AVX512") best = CpuIsa::Avx2;
#endif
#if defined(PPMA_BUILT_AVX512)
    if (capability == "AVX512") best = CpuIsa::Avx512;
#endif
    (void)capability;
    return best;
  }();
  return isa;
}

const char* cpu_isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::Avx512:
      return "AVX512";
    case CpuIsa::Avx2:
      return "AVX2";
    default:
      return "DEFAULT";
  }
}

std::string compiled_cpu_isas() {
  std::string names = "DEFAULT";
#if defined(PPMA_BUILT_AVX2)
  names += " AVX2";
#endif
#if defined(PPMA_BUILT_AVX512)
  names += " AVX512";
#endif
  return names;
}

}  // namespace ppma
