// minmax_cuda.cu: the kernels and launcher of the normalisation's min/max gradient (MinMaxGradArgs);
// thread code in minmax_cuda_blocks.h, which the host emulation (ssim_cuda_emulated.cpp) runs too.
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include "minmax_cuda_blocks.h"
#include "static_switch.h"

namespace ssimkd {
namespace cuda_detail {

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) minmax_count_kernel(const MinMaxGradArgs a, int64_t first_plane) {
  minmax_count_thread<scalar_t>(Thread{int(threadIdx.x), int(blockDim.x)}, a, first_plane + blockIdx.y,
                                int64_t(blockIdx.x), int64_t(gridDim.x));
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) minmax_write_kernel(const MinMaxGradArgs a) {
  minmax_write_thread<scalar_t>(Thread{int(threadIdx.x), int(blockDim.x)}, a, int64_t(blockIdx.x), int64_t(gridDim.x));
}

}  // namespace cuda_detail

void minmax_grad_cuda(const MinMaxGradArgs& args, void* stream_ptr) {
  using namespace cuda_detail;
  if (args.N * args.C * args.H * args.W == 0) return;
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  dtype_switch(args.dtype, [&]<typename scalar_t>() {
    // counts were zeroed by the caller
    const int64_t planes = args.N * args.C;
    const unsigned chunks = unsigned(minmax_count_chunks(args));
    for (int64_t first = 0; first < planes; first += kMaxGridRows) {
      const unsigned rows = unsigned(std::min<int64_t>(kMaxGridRows, planes - first));
      minmax_count_kernel<scalar_t><<<dim3(chunks, rows), kThreads, 0, stream>>>(args, first);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    minmax_write_kernel<scalar_t><<<unsigned(minmax_write_blocks(args)), kThreads, 0, stream>>>(args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace ssimkd
