// Device choice of the host code: PPMA_DISPATCH_DEVICE(device, NAME, args...) calls
// NAME_cpu(args...) for CPU tensors and NAME_cuda(args...) for CUDA tensors (built with
// PPMA_WITH_CUDA). The ops are registered for those two dispatch keys only, so no other device
// reaches a host function.
#pragma once

#include <c10/util/Exception.h>

#define PPMA_DISPATCH_DEVICE(DEVICE, NAME, ...) \
  do {                                          \
    if ((DEVICE).is_cpu()) {                    \
      NAME##_cpu(__VA_ARGS__);                  \
    } else {                                    \
      PPMA_CALL_CUDA(NAME, __VA_ARGS__)         \
    }                                           \
  } while (false)

#if defined(PPMA_WITH_CUDA)
#define PPMA_CALL_CUDA(NAME, ...) NAME##_cuda(__VA_ARGS__);
#else
#define PPMA_CALL_CUDA(NAME, ...) \
  TORCH_CHECK(false, "ppma_ops: " #NAME " has no kernel for this device (built without CUDA)");
#endif
