# CUDA kernels of ppma_ops (csrc/cuda/*.cu), included by CMakeLists.txt once the _C target
# exists. They are compiled only when the installed torch is a CUDA build *and* a CUDA compiler
# is found; a CPU-only torch never reaches enable_language(CUDA), so CPU builds need no toolkit.
#
# A CUDA torch already enables CUDA inside find_package(Torch) (Caffe2/public/cuda.cmake), so
# the toolkit must be visible then: its bin/ first on PATH (or CUDACXX=<nvcc>), and, where
# libnvrtc is not inside the toolkit, -DCUDA_nvrtc_LIBRARY=<path to libnvrtc.so*>. torch's
# config ignores CMAKE_CUDA_ARCHITECTURES and takes the GPU architectures from the
# TORCH_CUDA_ARCH_LIST environment variable (e.g. "8.0;9.0"); without it torch picks a list
# itself. `nox -s cuda_build` sets all of this up.

file(GLOB PPMA_CUDA_SOURCES CONFIGURE_DEPENDS "${CMAKE_CURRENT_SOURCE_DIR}/csrc/cuda/*.cu")
set(PPMA_WITH_CUDA OFF)
if(TORCH_HAS_CUDA AND PPMA_CUDA_SOURCES)
  include(CheckLanguage)
  check_language(CUDA)
  if(CMAKE_CUDA_COMPILER)
    enable_language(CUDA)
    set(PPMA_WITH_CUDA ON)
    target_sources(_C PRIVATE ${PPMA_CUDA_SOURCES})
    target_compile_definitions(_C PRIVATE PPMA_WITH_CUDA=1)
    # torch >= 2.14 headers use C++20 (requires-clauses) in every translation unit that
    # includes them, host and device alike.
    set(PPMA_TORCH_CXX_STANDARD 17)
    if(Torch_VERSION VERSION_GREATER_EQUAL 2.14)
      set(PPMA_TORCH_CXX_STANDARD 20)
    endif()
    # CMake < 3.26 knows no C++20 flag for nvcc (which has accepted -std=c++20 since 12.0).
    if(NOT DEFINED CMAKE_CUDA20_STANDARD_COMPILE_OPTION)
      set(CMAKE_CUDA20_STANDARD_COMPILE_OPTION "-std=c++20")
      set(CMAKE_CUDA20_EXTENSION_COMPILE_OPTION "-std=c++20")
    endif()
    set_target_properties(_C PROPERTIES
      CUDA_STANDARD ${PPMA_TORCH_CXX_STANDARD} CUDA_STANDARD_REQUIRED ON CUDA_EXTENSIONS OFF
      CXX_STANDARD ${PPMA_TORCH_CXX_STANDARD})
    foreach(isa IN LISTS PPMA_ISAS)
      set_target_properties(ppma_kernels_${isa} PROPERTIES CXX_STANDARD ${PPMA_TORCH_CXX_STANDARD})
    endforeach()
  endif()
endif()
message(STATUS "ppma_ops: CUDA kernels: ${PPMA_WITH_CUDA}")
