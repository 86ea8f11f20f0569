# CUDA kernels of ppma_ops (csrc/cuda/*.cu), included by CMakeLists.txt once the _C target
# exists, when cmake/torch.cmake decided PPMA_CUDA=ON.
#
# A CUDA torch enables CUDA inside find_package(Torch) (Caffe2/public/cuda.cmake), so the
# toolkit must be visible then: its bin/ first on PATH (or CUDACXX=<nvcc>), and, where libnvrtc
# is not inside the toolkit, -DCUDA_nvrtc_LIBRARY=<path to libnvrtc.so*>. torch's config
# ignores CMAKE_CUDA_ARCHITECTURES and takes the GPU architectures from the TORCH_CUDA_ARCH_LIST
# environment variable (e.g. "8.0;9.0"); without it torch picks a list itself.
# `nox -s cuda_build` sets all of this up.

file(GLOB PPMA_CUDA_SOURCES CONFIGURE_DEPENDS "${CMAKE_CURRENT_SOURCE_DIR}/csrc/cuda/*.cu")
if(PPMA_CUDA AND PPMA_CUDA_SOURCES)
  enable_language(CUDA)
  target_sources(_C PRIVATE ${PPMA_CUDA_SOURCES})
  target_compile_definitions(_C PRIVATE PPMA_WITH_CUDA=1)
  # CMake < 3.26 knows no C++20 flag for nvcc (which has accepted -std=c++20 since 12.0).
  if(NOT DEFINED CMAKE_CUDA20_STANDARD_COMPILE_OPTION)
    set(CMAKE_CUDA20_STANDARD_COMPILE_OPTION "-std=c++20")
    set(CMAKE_CUDA20_EXTENSION_COMPILE_OPTION "-std=c++20")
  endif()
  set_target_properties(_C PROPERTIES
    CUDA_STANDARD ${CMAKE_CXX_STANDARD} CUDA_STANDARD_REQUIRED ON CUDA_EXTENSIONS OFF)
endif()
