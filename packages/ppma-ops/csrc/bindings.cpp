// Python module ppma_ops._C. Importing it loads this shared library, whose static
// initialisers register the torch.ops.ppma.* schemas and kernels.
#include <ATen/Parallel.h>
#include <pybind11/pybind11.h>

#include "common.h"

namespace py = pybind11;

namespace ppma {
int polyline_attention_parallel_threads_used();  // polyline_attention.cpp
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "Native kernels of ppma_ops (registered as torch.ops.ppma.*)";
  m.def(
      "build_info",
      [] {
        py::dict info;
        info["cpu_isa"] = ppma::cpu_isa_name(ppma::selected_cpu_isa());
        info["compiled_cpu_isas"] = ppma::compiled_cpu_isas();
#if defined(PPMA_HAVE_BLAS)
        info["tile_gemm"] = "blas";
#else
        info["tile_gemm"] = "portable";
#endif
#if defined(_OPENMP)
        info["openmp"] = true;
#else
        info["openmp"] = false;
#endif
        info["parallel_info"] = at::get_parallel_info();
#if defined(PPMA_WITH_CUDA)
        info["cuda"] = true;
#else
        info["cuda"] = false;
#endif
        return info;
      },
      "How this library was built and which CPU kernels it runs (ISA, tile GEMM, OpenMP).");
  m.def("parallel_threads_used", &ppma::polyline_attention_parallel_threads_used,
        "Threads that ran a chunk of an at::parallel_for inside the selected kernel library "
        "(equals torch.get_num_threads() when OpenMP is linked).");
}
