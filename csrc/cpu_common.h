// cpu_common.h: what the CPU op (ssim_cpu.cpp) and the min-max normalisation's CPU kernels
// (minmax_cpu.cpp) share: the per-instruction-set compile attributes, the fixed lane count of their
// per-lane sums, and the dynamically scheduled parallel loop.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

// x86-64 with GCC: the tile functions are compiled per instruction set (target attributes) and the
// min-max loops are cloned (target_clones). Helpers are forced inline, so that each compiles for the
// instruction set of the function it lands in.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <immintrin.h>  // declares the FMA builtins fmadd uses (the intrinsics would not inline into it)
#define SSIMKD_X86_DISPATCH 1
#define SSIMKD_TARGET_AVX512 __attribute__((target("arch=x86-64-v4")))
#define SSIMKD_TARGET_AVX2 __attribute__((target("arch=x86-64-v3")))
#define SSIMKD_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define SSIMKD_X86_DISPATCH 0
#define SSIMKD_TARGET_AVX512
#define SSIMKD_TARGET_AVX2
#define SSIMKD_CPU_CLONES
#endif
#define SSIMKD_INLINE inline __attribute__((always_inline))
// Vector values never cross a call (every helper that takes one is inlined), so the ABI notes GCC
// gives for wide vectors in functions of a narrower instruction set do not apply.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace ssimkd {

// Lanes of every per-lane sum (and the min-max loops' block of columns): fixed, whatever the vector
// width, so the sums add the same values in the same order on every instruction set.
constexpr int kLanes = 16;

// Run body(item, state) for items 0 .. count - 1 on every thread, each thread with its own state.
// Items differ in cost by 1000x (a 4x4 plane vs a full tile), and levels are laid out large to
// small, so a static split would leave one thread with all the large items: each thread takes the
// next item from a shared counter instead. Every item writes only its own outputs, so the result does
// not depend on which thread ran it.
template <typename State, typename Init, typename Body>
void for_each_item(int64_t count, const Init& init, const Body& body) {
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), count);
  at::parallel_for(0, workers, 1, [&](int64_t begin, int64_t end) {
    State state;
    init(state);
    for (int64_t w = begin; w < end; ++w) {
      for (int64_t i = next.fetch_add(1, std::memory_order_relaxed); i < count;
           i = next.fetch_add(1, std::memory_order_relaxed))
        body(i, state);
    }
  });
}

}  // namespace ssimkd
