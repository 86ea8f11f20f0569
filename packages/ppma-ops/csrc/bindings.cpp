// Python module ppma_ops._C. Importing it loads this shared library, whose static
// initialisers register the torch.ops.ppma.* schemas and kernels.
#include <pybind11/pybind11.h>

PYBIND11_MODULE(_C, m) {
  m.doc() = "Native kernels of ppma_ops (registered as torch.ops.ppma.*)";
}
