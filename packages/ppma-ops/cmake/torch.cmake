# How ppma_ops finds torch. Sets TORCH_LIBRARIES, TORCH_INSTALL_PREFIX, Torch_VERSION,
# CMAKE_CXX_STANDARD and PPMA_CUDA (ON/OFF: whether csrc/cuda/*.cu are compiled).
#
# PPMA_CUDA=AUTO (the default) builds the CUDA kernels when the installed torch is a CUDA build,
# a CUDA compiler is found, and there is a GPU to use them or TORCH_CUDA_ARCH_LIST names the
# GPUs to build for (the usual way to build on a machine without one). ON insists, OFF skips.
#
# A CUDA torch's own CMake config (find_package(Torch)) needs the full CUDA toolkit even when
# nothing is compiled for the GPU, so the CPU-only build describes torch itself, from what the
# interpreter reports, as torch.utils.cpp_extension does; only CUDA builds use the config.

set(PPMA_CUDA AUTO CACHE STRING "Build the CUDA kernels: AUTO, ON or OFF")
set_property(CACHE PPMA_CUDA PROPERTY STRINGS AUTO ON OFF)

execute_process(
  COMMAND "${Python_EXECUTABLE}" -c [=[
import os, torch, torch.utils.cpp_extension as ext
print(torch.__version__.split("+")[0])
print(int(torch.version.cuda is not None))
print(int(torch.cuda.is_available()))
print(int(torch._C._GLIBCXX_USE_CXX11_ABI))
print(torch.utils.cmake_prefix_path)
print(os.path.dirname(torch.__file__))
print(";".join(ext.include_paths()))
]=]
  OUTPUT_VARIABLE _ppma_torch_info OUTPUT_STRIP_TRAILING_WHITESPACE COMMAND_ERROR_IS_FATAL ANY)
string(REPLACE "\n" ";" _ppma_torch_info "${_ppma_torch_info}")
list(GET _ppma_torch_info 0 Torch_VERSION)
list(GET _ppma_torch_info 1 TORCH_HAS_CUDA)
list(GET _ppma_torch_info 2 _ppma_gpu_visible)
list(GET _ppma_torch_info 3 _ppma_cxx11_abi)
list(GET _ppma_torch_info 4 _ppma_torch_cmake_prefix)
list(GET _ppma_torch_info 5 TORCH_INSTALL_PREFIX)
list(SUBLIST _ppma_torch_info 6 -1 _ppma_torch_includes)

# torch >= 2.14 headers use C++20 (requires-clauses) in every translation unit that includes them.
set(CMAKE_CXX_STANDARD 17)
if(Torch_VERSION VERSION_GREATER_EQUAL 2.14)
  set(CMAKE_CXX_STANDARD 20)
endif()

set(_ppma_want_cuda OFF)
if(PPMA_CUDA STREQUAL "ON")
  set(_ppma_want_cuda ON)
elseif(PPMA_CUDA STREQUAL "AUTO" AND TORCH_HAS_CUDA)
  if(_ppma_gpu_visible OR DEFINED ENV{TORCH_CUDA_ARCH_LIST})
    include(CheckLanguage)
    check_language(CUDA)
    if(CMAKE_CUDA_COMPILER)
      set(_ppma_want_cuda ON)
    endif()
  endif()
endif()
if(_ppma_want_cuda AND NOT TORCH_HAS_CUDA)
  message(FATAL_ERROR "PPMA_CUDA=ON, but the installed torch ${Torch_VERSION} is not a CUDA build")
endif()
set(PPMA_CUDA ${_ppma_want_cuda})

if(PPMA_CUDA)
  list(APPEND CMAKE_PREFIX_PATH "${_ppma_torch_cmake_prefix}")
  find_package(Torch REQUIRED)
else()
  add_library(ppma_torch INTERFACE)
  target_include_directories(ppma_torch INTERFACE ${_ppma_torch_includes})
  target_compile_definitions(ppma_torch INTERFACE _GLIBCXX_USE_CXX11_ABI=${_ppma_cxx11_abi})
  foreach(lib torch torch_cpu c10)
    find_library(_ppma_lib_${lib} ${lib} PATHS "${TORCH_INSTALL_PREFIX}/lib" NO_DEFAULT_PATH REQUIRED)
    target_link_libraries(ppma_torch INTERFACE "${_ppma_lib_${lib}}")
  endforeach()
  set(TORCH_LIBRARIES ppma_torch)
endif()
message(STATUS "ppma_ops: torch ${Torch_VERSION} (C++${CMAKE_CXX_STANDARD}), CUDA kernels: ${PPMA_CUDA}")
