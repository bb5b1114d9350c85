// ssim_cuda_emulated.cpp: ssim_cuda.cu's block functions compiled as host C++, run one block at a
// time with one thread (see ssim_cuda.cu's header comment). Registered as the test-only ops
// ssimkd::fused_ssim_{fwd,bwd}_cuda_emulated, so CI on CPU-only machines checks the CUDA kernels' code
// against the reference.
#define SSIMKD_CUDA_EMULATION
#include "ssim_cuda.cu"
