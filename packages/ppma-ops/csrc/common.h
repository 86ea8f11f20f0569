// Shared by every ppma_ops source: host/device annotation for tile math, the CPU instruction
// set chosen at run time, and the tile GEMM used by the CPU kernels.
#pragma once

#include <cstdint>
#include <string>

// Tile math is written once as small inline functions and compiled for the CPU kernels and,
// under nvcc, for the CUDA kernels.
#if defined(__CUDACC__) || defined(__HIPCC__)
#define PPMA_HOST_DEVICE __host__ __device__
#else
#define PPMA_HOST_DEVICE
#endif

namespace ppma {

// Instruction sets the hot kernels are compiled for (csrc/cpu/*.cpp, once per ISA).
enum class CpuIsa { Default = 0, Avx2 = 1, Avx512 = 2 };

// The ISA to run: the best one that was compiled in, that this CPU supports and that ATen
// would use (so ATEN_CPU_CAPABILITY=avx2 / default also restricts ppma_ops).
CpuIsa selected_cpu_isa();
const char* cpu_isa_name(CpuIsa isa);
// Space-separated list of the ISAs compiled into this library.
std::string compiled_cpu_isas();

}  // namespace ppma
