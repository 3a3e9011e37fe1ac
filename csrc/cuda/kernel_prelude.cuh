// What a CUDA kernel header starts with: the CUDA runtime (tests/cuda_emulation's host shim
// provides its own stand-ins instead) and CK_DYNAMIC_SMEM(name), the kernel's dynamic shared
// memory as bytes.
#pragma once

#ifndef CK_CUDA_HOST_EMULATION
#include <cuda_runtime.h>
#endif
#ifndef CK_DYNAMIC_SMEM
#define CK_DYNAMIC_SMEM(name) extern __shared__ __align__(128) unsigned char name[]
#endif
