// cuda_device.h: the vocabulary the CUDA kernels' block code (ssim_cuda_blocks.h, minmax_cuda_blocks.h)
// is written in, defined twice:
//   - under nvcc, as plain CUDA: shared and global memory through raw pointers, __syncthreads();
//   - in the host emulation (SSIMKD_CUDA_EMULATION, ssim_cuda_emulated.cpp), as checked accessors and a
//     barrier that all kThreads logical threads of a block meet (cuda_emulator.h), which report races,
//     out-of-bounds accesses, uninitialised shared reads and barrier divergence.
// Block code takes its thread's place (Thread) explicitly, synchronises only through SSIMKD_SYNC(),
// names its stages with SSIMKD_STAGE("...") (for the emulation's messages) and reaches memory only
// through the types below: Shared<T> (a named shared-memory buffer carved from the block's
// SharedMemory<T>), GlobalPlane<T> (one (n, c) plane of a strided tensor, indexed (h, w)) and
// GlobalArray<T> (flat).
#pragma once

#include <cstdint>

namespace ssimkd {
namespace cuda_detail {

constexpr int kThreads = 256;  // threads per block (a power of two: the tree reductions need it)

// The calling thread's place in its block.
struct Thread {
  int tid, nthreads;
};

}  // namespace cuda_detail
}  // namespace ssimkd

#ifdef SSIMKD_CUDA_EMULATION
#include "cuda_emulator.h"
#else
#include <cuda_runtime.h>

#define SSIMKD_DEVICE __device__ __forceinline__
#define SSIMKD_SYNC() __syncthreads()
#define SSIMKD_STAGE(name) ((void)0)
#define SSIMKD_UNROLL _Pragma("unroll")  // constant indices keep small arrays in registers
// A bug the emulation's tests plant at run time (cuda_emulator.h, PlantedBug); never in the CUDA build.
#define SSIMKD_PLANTED(bug) 0

namespace ssimkd {
namespace cuda_detail {

template <typename T>
using Shared = T*;
template <typename T>
using SharedMemory = T*;  // the block's dynamic (or static) shared memory
template <typename T>
using GlobalArray = T*;

// Plane (n, c) of a tensor: element (h, w) at ptr[h * row + w * col].
template <typename T>
struct GlobalPlane {
  T* ptr;
  int64_t row, col;
  SSIMKD_DEVICE T& operator()(int64_t h, int64_t w) const { return ptr[h * row + w * col]; }
  SSIMKD_DEVICE explicit operator bool() const { return ptr != nullptr; }
};

// Buffer [begin, end) of the block's shared memory, in elements; `name` is the emulation's.
template <typename T>
SSIMKD_DEVICE Shared<T> carve(SharedMemory<T> smem, int begin, int /*end*/, const char* /*name*/) {
  return smem + begin;
}

template <typename T>
SSIMKD_DEVICE GlobalArray<T> global_array(const void* ptr) {
  return static_cast<T*>(const_cast<void*>(ptr));
}

// Plane (n, c) of an (N, C, H, W) tensor with element strides `stride`; null stays null.
template <typename T>
SSIMKD_DEVICE GlobalPlane<T> strided_plane(const void* ptr, const int64_t* stride, int64_t n, int64_t c) {
  T* base = static_cast<T*>(const_cast<void*>(ptr));
  return {base == nullptr ? nullptr : base + n * stride[0] + c * stride[1], stride[2], stride[3]};
}

// Plane `plane` (= n * C + c) of a contiguous (N, C, H, W) tensor; null stays null.
template <typename T>
SSIMKD_DEVICE GlobalPlane<T> contiguous_plane(const void* ptr, int64_t plane, int64_t H, int64_t W) {
  T* base = static_cast<T*>(const_cast<void*>(ptr));
  return {base == nullptr ? nullptr : base + plane * H * W, W, 1};
}

// Integer atomics: exact, so a count does not depend on the order of arrival.
SSIMKD_DEVICE void atomic_add(GlobalArray<unsigned long long> at, unsigned long long value) {
  atomicAdd(at, value);
}

}  // namespace cuda_detail
}  // namespace ssimkd
#endif
