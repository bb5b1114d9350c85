// ssim_cuda.cu: the fused SSIM-KD forward and backward kernels and their launchers. The block code
// and shared-memory layouts are in ssim_cuda_blocks.h, which the host emulation
// (ssim_cuda_emulated.cpp) runs too, every thread of every block, checking each access: that is how
// CI, without a GPU, tests this code against the reference.
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include "ssim_cuda_blocks.h"
#include "static_switch.h"

namespace ssimkd {
namespace cuda_detail {

// Resident blocks per SM the forward is compiled for. Without a minimum, ptxas squeezes it into 64
// registers on sm_80 (80 on sm_90, at R = 7) and spills; with 2 it keeps 80-113 registers and no spills
// (3 would spill float64). Its shared memory holds an A100 to 3 blocks of float32 tiles anyway.
constexpr int kForwardMinBlocks = 2;

template <typename scalar_t, int R>
__global__ void __launch_bounds__(kThreads, kForwardMinBlocks) ssim_fwd_kernel(const __grid_constant__ FusedArgs args) {
  extern __shared__ unsigned char smem_raw[];
  using T = AccType<scalar_t>;
  forward_block<scalar_t, R>(Thread{int(threadIdx.x), int(blockDim.x)}, args, int64_t(blockIdx.x),
                             reinterpret_cast<T*>(smem_raw));
}

template <typename scalar_t, int R>
__global__ void __launch_bounds__(kThreads) ssim_bwd_kernel(const __grid_constant__ FusedArgs args) {
  extern __shared__ unsigned char smem_raw[];
  using T = AccType<scalar_t>;
  backward_block<scalar_t, R>(Thread{int(threadIdx.x), int(blockDim.x)}, args, int64_t(blockIdx.x),
                              reinterpret_cast<T*>(smem_raw));
}

template <typename T>
__global__ void __launch_bounds__(kThreads) level_sum_kernel(const __grid_constant__ FusedArgs args) {
  __shared__ SecondStageSum scratch[2 * kThreads];
  level_sum_block<T>(Thread{int(threadIdx.x), int(blockDim.x)}, args, int(blockIdx.x), scratch);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) plane_sum_kernel(const __grid_constant__ FusedArgs args, int level) {
  plane_sum_thread<T>(Thread{int(threadIdx.x), int(blockDim.x)}, args, level, int64_t(blockIdx.x));
}

template <typename Kernel>
void launch_tiles(Kernel kernel, const FusedArgs& args, int64_t smem, cudaStream_t stream) {
  // Above 48 KiB of dynamic shared memory a kernel must opt in (H100: up to 227 KiB a block).
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  kernel<<<unsigned(args.total_tiles), kThreads, size_t(smem), stream>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cuda_detail

TileShape cuda_tile_shape(DType dtype) {
  const int side = cuda_detail::tile_side_for(dtype);
  return {side, side};
}

void ssim_fwd_cuda(const FusedArgs& args, void* stream_ptr) {
  using namespace cuda_detail;
  if (args.total_tiles == 0) return;
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  dtype_radius_switch(args.dtype, args.radius, [&]<typename scalar_t, int R>() {
    using T = AccType<scalar_t>;
    launch_tiles(ssim_fwd_kernel<scalar_t, R>, args, tile_smem_bytes<T, R>(false), stream);
    level_sum_kernel<T><<<unsigned(args.num_levels), kThreads, 0, stream>>>(args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void ssim_bwd_cuda(const FusedArgs& args, void* stream_ptr) {
  using namespace cuda_detail;
  if (args.total_tiles == 0) return;
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  dtype_radius_switch(args.dtype, args.radius, [&]<typename scalar_t, int R>() {
    using T = AccType<scalar_t>;
    launch_tiles(ssim_bwd_kernel<scalar_t, R>, args, tile_smem_bytes<T, R>(true), stream);
    for (int l = 0; l < args.num_levels; ++l) {
      const LevelDesc& lv = args.levels[l];
      if (lv.g_x_affine == nullptr && lv.g_y_affine == nullptr) continue;
      plane_sum_kernel<T><<<unsigned(plane_sum_blocks(lv)), kThreads, 0, stream>>>(args, l);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

}  // namespace ssimkd
