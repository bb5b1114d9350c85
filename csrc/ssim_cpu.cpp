// ssim_cpu.cpp: the fused SSIM-KD forward and backward on the CPU, the tiled algorithm of SPEC
// section 4 over at::parallel_for. Per-pixel math comes from ssim_math.h, shared with the CUDA kernels.
//
// One task owns one tile of one plane of one level (tiles of all levels in one parallel loop):
//  forward:  load the plane rows and columns the tile's windows read; blur x, y, x^2, y^2, xy along
//            each loaded row (the products formed in registers); per centre row, the vertical blur
//            of the five rows and SSIM, in registers; write only the tile's sum of m (and, for
//            ssim_map, the map). A fixed-order second stage adds the tile sums per level.
//  backward: the same statistics on the centres within r of the tile (a 2r halo of inputs); per
//            centre row the coefficient maps a, b, c, formed in registers and at once blurred back
//            along the row with the true transpose of the padded blur; per target row the vertical
//            transpose, then dL/dx (and dL/dy) and the tile's sums for the per-plane affine gradient.
//            Three passes over the tile; the coefficient maps are never stored whole.
// Nothing is saved between the two: the backward recomputes from the inputs.
//
// The padding is an index map per axis, never a padded copy: a tile loads each plane row and column
// it needs once, and the windows that cross a border gather through the map (forward), while the
// transpose collects the folded taps in per-target weights (backward). So a tile that spans a whole
// plane (every FPN level up to 64x64) has no halo at all, and a plane smaller than the window costs
// what its pixels cost. Both per-axis maps (AxisPlan) are built once per level, not per tile.
//
// Speed: the radius is a template constant, so each tap loop unrolls; every row loop runs over whole
// vectors of N columns, computing a few unused lanes at the end of a row rather than a scalar tail.
// N is the width of the instruction set the tile functions are compiled for: each is compiled for
// AVX-512 (16 floats), AVX2 + FMA (8) and baseline x86-64 (4), and a launch picks the best one the
// CPU has (cpu_isa; SSIMKD_CPU_ISA caps it). Blur taps are explicit fused multiply-adds (multiply,
// add on baseline x86-64, which has no FMA), sums are taken in 16 fixed lanes and added in a fixed
// order, and a lane's value never depends on N: the AVX2 and AVX-512 functions do the same
// operations on every pixel.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <new>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#ifdef SSIMKD_CPU_PHASE_TIMERS
#include <x86intrin.h>

#include <cstdio>
#endif

#include "cpu_common.h"
#include "ssim_params.h"

namespace ssimkd {
namespace {

// ------------------------------------------------------------------------------------------------
// Instruction sets
// ------------------------------------------------------------------------------------------------

enum class Isa : int { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };

// Bytes of one vector register: baseline x86-64 (SSE2) 16, AVX2 32, AVX-512 64.
constexpr int vector_bytes(Isa isa) {
  return isa == Isa::kAvx512 ? 64 : (isa == Isa::kAvx2 ? 32 : 16);
}

Isa best_isa() {
#if SSIMKD_X86_DISPATCH
  __builtin_cpu_init();
  if (__builtin_cpu_supports("x86-64-v4")) return Isa::kAvx512;
  if (__builtin_cpu_supports("x86-64-v3")) return Isa::kAvx2;
#endif
  return Isa::kBaseline;
}

const char* isa_name(Isa isa) {
  return isa == Isa::kAvx512 ? "avx512" : (isa == Isa::kAvx2 ? "avx2" : "baseline");
}

// The instruction set of the tile functions: the best this CPU has, capped by the environment
// variable SSIMKD_CPU_ISA (avx512, avx2 or baseline). Read at every launch, so tests and benchmarks
// can compare the paths in one process.
Isa cpu_isa() {
  static const Isa best = best_isa();
  const char* cap = std::getenv("SSIMKD_CPU_ISA");
  if (cap == nullptr || *cap == '\0') return best;
  for (Isa isa : {Isa::kBaseline, Isa::kAvx2, Isa::kAvx512}) {
    if (std::strcmp(cap, isa_name(isa)) == 0) return std::min(best, isa);
  }
  throw std::invalid_argument(std::string("ssimkd: SSIMKD_CPU_ISA must be avx512, avx2 or baseline, got '") + cap +
                              "'");
}

// ------------------------------------------------------------------------------------------------
// SIMD vectors: N lanes of T as a GCC vector, with the operators ssim_math.h's functions use
// ------------------------------------------------------------------------------------------------

template <typename T, int N>
struct Vec;

// Whether a vector of N lanes of T is one AVX-512 register, whose comparisons give bit masks: GCC
// lowers a comparison that yields a 64-byte integer vector lane by lane, so those use the
// compare-into-mask and blend instructions directly.
template <typename T, int N>
constexpr bool kBitMask = SSIMKD_X86_DISPATCH && N * sizeof(T) == 64;

// A lane-wise comparison's result: a bit per lane (AVX-512), or an integer vector of all-ones lanes.
// (Spelled by specialisation: GCC drops a vector type's attribute when it is a template argument.)
template <bool kBits, typename Lane, int kBytes>
struct MaskBits {
  typedef Lane type __attribute__((vector_size(kBytes)));
};
template <typename Lane, int kBytes>
struct MaskBits<true, Lane, kBytes> {
  typedef uint16_t type;
};

template <typename T, int N>
struct Mask {
  typedef
      typename MaskBits<kBitMask<T, N>, std::conditional_t<sizeof(T) == 4, int32_t, int64_t>, int(N * sizeof(T))>::type
          Raw;
  Raw m;
  friend SSIMKD_INLINE Mask operator&&(Mask a, Mask b) { return {Raw(a.m & b.m)}; }
};

template <typename T, int N>
struct Vec {
  typedef T Raw __attribute__((vector_size(N * sizeof(T))));
  Raw v;

  Vec() = default;
  SSIMKD_INLINE Vec(Raw r) : v(r) {}
  template <typename S, typename = std::enable_if_t<std::is_arithmetic_v<S>>>
  SSIMKD_INLINE Vec(S s) : v(Raw{} + T(s)) {}  // every lane s

  static SSIMKD_INLINE Vec load(const T* p) {
    Vec r;
    __builtin_memcpy(&r.v, p, sizeof(Raw));
    return r;
  }
  SSIMKD_INLINE void store(T* p) const { __builtin_memcpy(p, &v, sizeof(Raw)); }
  static SSIMKD_INLINE Vec iota() {  // lane l holds l
    Raw r;
    for (int l = 0; l < N; ++l) r[l] = T(l);
    return r;
  }

  friend SSIMKD_INLINE Vec operator+(Vec a, Vec b) { return a.v + b.v; }
  friend SSIMKD_INLINE Vec operator-(Vec a, Vec b) { return a.v - b.v; }
  friend SSIMKD_INLINE Vec operator*(Vec a, Vec b) { return a.v * b.v; }
  friend SSIMKD_INLINE Vec operator/(Vec a, Vec b) { return a.v / b.v; }
  friend SSIMKD_INLINE Vec operator-(Vec a) { return -a.v; }
  SSIMKD_INLINE Vec& operator+=(Vec b) { return *this = *this + b; }
  // The predicates are the ordered ones (false for NaN), as C++'s comparisons.
  friend SSIMKD_INLINE Mask<T, N> operator<(Vec a, Vec b) { return compare<1 /* _CMP_LT_OS */>(a, b); }
  friend SSIMKD_INLINE Mask<T, N> operator<=(Vec a, Vec b) { return compare<2 /* _CMP_LE_OS */>(a, b); }
  friend SSIMKD_INLINE Mask<T, N> operator>(Vec a, Vec b) { return compare<1>(b, a); }
  friend SSIMKD_INLINE Mask<T, N> operator>=(Vec a, Vec b) { return compare<2>(b, a); }

 private:
  template <int kPredicate>
  static SSIMKD_INLINE Mask<T, N> compare(Vec a, Vec b) {
#if SSIMKD_X86_DISPATCH
    if constexpr (kBitMask<T, N> && std::is_same_v<T, float>) {
      return {uint16_t(__builtin_ia32_cmpps512_mask(a.v, b.v, kPredicate, uint16_t(-1), 4))};
    } else if constexpr (kBitMask<T, N>) {
      return {uint16_t(__builtin_ia32_cmppd512_mask(a.v, b.v, kPredicate, uint8_t(-1), 4))};
    }
#endif
    Mask<T, N> r;
    if constexpr (!kBitMask<T, N> && kPredicate == 1) r.m = a.v < b.v;
    if constexpr (!kBitMask<T, N> && kPredicate == 2) r.m = a.v <= b.v;
    return r;
  }
};

template <typename T, int N>
SSIMKD_INLINE Vec<T, N> where(Mask<T, N> c, Vec<T, N> a, Vec<T, N> b) {
#if SSIMKD_X86_DISPATCH
  if constexpr (kBitMask<T, N> && std::is_same_v<T, float>) {
    return __builtin_ia32_blendmps_512_mask(b.v, a.v, c.m);
  } else if constexpr (kBitMask<T, N>) {
    return __builtin_ia32_blendmpd_512_mask(b.v, a.v, uint8_t(c.m));
  }
#endif
  if constexpr (!kBitMask<T, N>) return c.m ? a.v : b.v;
}

// a * b + c, rounded once where the instruction set has FMA (the blurs' every tap).
template <typename T, int N>
SSIMKD_INLINE Vec<T, N> fmadd(Vec<T, N> a, Vec<T, N> b, Vec<T, N> c) {
#if SSIMKD_X86_DISPATCH
  if constexpr (std::is_same_v<T, float> && N == 8) {
    return __builtin_ia32_vfmaddps256(a.v, b.v, c.v);
  } else if constexpr (std::is_same_v<T, float> && N == 16) {
    return __builtin_ia32_vfmaddps512_mask(a.v, b.v, c.v, -1, 4 /* current rounding */);
  } else if constexpr (std::is_same_v<T, double> && N == 4) {
    return __builtin_ia32_vfmaddpd256(a.v, b.v, c.v);
  } else if constexpr (std::is_same_v<T, double> && N == 8) {
    return __builtin_ia32_vfmaddpd512_mask(a.v, b.v, c.v, -1, 4);
  }
#endif
  return a * b + c;
}

// One lane's a * b + c as fmadd computes it in vectors of N lanes: fused where they are, so a value
// comes out the same whether a vector or a row's scalar tail computed it.
template <int N, typename T>
SSIMKD_INLINE T fmadd_lane(T a, T b, T c) {
#if SSIMKD_X86_DISPATCH
  if constexpr (N * sizeof(T) > 16) return __builtin_fma(a, b, c);
#endif
  return a * b + c;
}

// ssim_math.h's options with every scalar as a vector.
template <int N, typename T>
SSIMKD_INLINE SsimParams<Vec<T, N>> lanes_of(const SsimParams<T>& p) {
  SsimParams<Vec<T, N>> v;
  v.c1 = p.c1;
  v.c2 = p.c2;
  v.alpha = p.alpha;
  v.beta = p.beta;
  v.gamma = p.gamma;
  v.closed_form = p.closed_form;
  v.luminance = p.luminance;
  v.clamp = p.clamp;
  v.eps_sigma = p.eps_sigma;
  return v;
}

// Output tile of one task. 64 x 64 covers every level of an FPN up to 64x64 in one tile (no halo);
// the backward's buffers for it (~350 KiB of float) stay in L2.
constexpr int kTileH = 64;
constexpr int kTileW = 64;
constexpr int kMaps = 5;  // blurred maps: x, y, x^2, y^2, xy

SSIMKD_INLINE int blocks_of(int64_t n, int lanes) {
  return int((n + lanes - 1) / lanes);
}

// Per-lane running sums over kLanes lanes: the lane of a value is its column's place in a block of
// kLanes columns of its row. Added in a fixed order at the end.
template <typename T, int N>
struct LaneSums {
  static_assert(kLanes % N == 0, "a vector must fit the sum's lanes");
  static constexpr int kParts = kLanes / N;
  Vec<T, N> part[kParts];  // part[i]: lanes [i N, (i + 1) N)

  SSIMKD_INLINE LaneSums() {
    for (auto& p : part) p = Vec<T, N>(T(0));
  }
  // Adds v, the values of columns [b N, b N + N) of a row, of which the first `valid` count.
  SSIMKD_INLINE void add(int b, Vec<T, N> v, int valid) { keep(b, part[b % kParts] + v, valid); }
  // Adds u * v likewise.
  SSIMKD_INLINE void add_product(int b, Vec<T, N> u, Vec<T, N> v, int valid) {
    keep(b, fmadd(u, v, part[b % kParts]), valid);
  }
  SSIMKD_INLINE T total() const {
    T lanes[kLanes];
    for (int i = 0; i < kParts; ++i) part[i].store(lanes + i * N);
    T t = T(0);
    for (int l = 0; l < kLanes; ++l) t += lanes[l];
    return t;
  }

 private:
  SSIMKD_INLINE void keep(int b, Vec<T, N> sum, int valid) {
    Vec<T, N>& p = part[b % kParts];
    p = valid >= N ? sum : where(Vec<T, N>::iota() < Vec<T, N>(valid), sum, p);
  }
};

// ------------------------------------------------------------------------------------------------
// Per-phase cycle counts (a development aid: build with -DSSIMKD_CPU_PHASE_TIMERS; printed at exit)
// ------------------------------------------------------------------------------------------------

enum Phase : int { kPhaseLoad, kPhaseHorizontal, kPhaseRows, kPhaseTargets, kPhaseCount };

#ifdef SSIMKD_CPU_PHASE_TIMERS
// Time stamp counter ticks per phase, all threads; per launch, and the least per phase over launches
// (the least is what a quiet machine gives, even when other work shares this one).
struct PhaseClock {
  std::atomic<uint64_t> launch[2][kPhaseCount] = {};  // [forward, backward][phase]
  uint64_t least[2][kPhaseCount];
  int launches[2] = {0, 0};
  // Call once a launch is done, from one thread.
  void end_launch(bool backward) {
    const int d = backward ? 1 : 0;
    for (int p = 0; p < kPhaseCount; ++p) {
      const uint64_t t = launch[d][p].exchange(0);
      least[d][p] = launches[d] == 0 ? t : std::min(least[d][p], t);
    }
    ++launches[d];
  }
  ~PhaseClock() {
    static const char* names[kPhaseCount] = {"load", "horizontal", "rows", "targets"};
    for (int d = 0; d < 2; ++d) {
      if (launches[d] == 0) continue;
      std::fprintf(stderr, "ssimkd %s, least ticks per launch of %d (thousands):", d ? "backward" : "forward",
                   launches[d]);
      for (int p = 0; p < kPhaseCount; ++p) std::fprintf(stderr, " %s %.0f", names[p], least[d][p] / 1e3);
      std::fprintf(stderr, "\n");
    }
  }
};
PhaseClock phase_clock;

// Adds the ticks since the last lap to a phase.
struct PhaseTimer {
  int direction;
  uint64_t last = __rdtsc();
  explicit PhaseTimer(bool backward) : direction(backward ? 1 : 0) {}
  SSIMKD_INLINE void lap(Phase p) {
    const uint64_t now = __rdtsc();
    phase_clock.launch[direction][p].fetch_add(now - last, std::memory_order_relaxed);
    last = now;
  }
};
inline void end_phase_launch(bool backward) {
  phase_clock.end_launch(backward);
}
#else
struct PhaseTimer {
  explicit PhaseTimer(bool) {}
  SSIMKD_INLINE void lap(Phase) {}
};
inline void end_phase_launch(bool) {}
#endif

// ------------------------------------------------------------------------------------------------
// Per-axis plans: which centres a tile computes, which plane positions they read, the transpose
// ------------------------------------------------------------------------------------------------

// One axis (rows or columns) of one tile row or column of a level, for vectors of `lanes` columns.
template <typename T>
struct AxisPlan {
  int64_t t0 = 0, t1 = 0;  // the tile: forward outputs, backward gradient targets (plane coordinates)
  int64_t c0 = 0, c1 = 0;  // window centres whose statistics the tile computes (empty: c0 == c1)
  int64_t s0 = 0, s1 = 0;  // the plane positions those windows read
  bool pad = false;        // some window reads zero padding
  int lanes = 1;           // columns per vector
  int blocks = 0;          // vectors over the centres
  // Plane position read at c0 - R + j, j < blocks * lanes + 2R, or -1 for zero padding. Positions
  // past c1 + R (the last vector's unused lanes) read the plane too, so every lane is a finite value.
  std::vector<int64_t> source;
  int run_begin = 0, run_end = 0;  // the longest run of consecutive plane positions in `source`
  // The positions outside that run: zero padding, and the others (folds at the borders, unused lanes,
  // tile interiors), each read from the plane on its own.
  std::vector<int> zeros, reads;
  // Backward: weight[k * target_stride + q] is the weight with which centre t0 + q + k - R feeds
  // target t0 + q (the true transpose of the padded blur, folds included; 0 off the centres).
  int target_blocks = 0;
  int64_t target_stride = 0;
  std::vector<T> weight;
  // Per target vector: the weights of its group of kLanes targets are all the plain taps. Decided
  // per kLanes, not per vector, so that every vector width takes the same path (the same bits).
  std::vector<uint8_t> plain_block;
  int64_t width() const { return int64_t(blocks) * lanes; }
};

template <typename T>
AxisPlan<T> plan_axis(int64_t t0, int64_t t1, int64_t n, int radius, int padding, bool backward, const T* taps,
                      int lanes) {
  AxisPlan<T> p;
  p.t0 = t0;
  p.t1 = t1;
  p.lanes = lanes;
  const int64_t lo = padding == kValid ? radius : 0, hi = padding == kValid ? n - radius : n;
  const int64_t reach = backward ? radius : 0;  // the backward needs every centre within r of a target
  p.c0 = std::max(lo, t0 - reach);
  p.c1 = std::max(p.c0, std::min(hi, t1 + reach));
  if (p.c1 > p.c0) {
    p.blocks = blocks_of(p.c1 - p.c0, lanes);
    const int64_t span = p.width() + 2 * radius;
    p.source.resize(span);
    p.s0 = n;
    p.s1 = 0;
    for (int64_t j = 0; j < span; ++j) {
      const int64_t pos = p.c0 - radius + j;
      int64_t src = source_index(pos, n, padding);
      if (pos < p.c1 + radius) {  // read by a window
        if (src < 0) {
          p.pad = true;
        } else {
          p.s0 = std::min(p.s0, src);
          p.s1 = std::max(p.s1, src + 1);
        }
      } else if (src < 0) {
        src = n - 1;  // an unused lane: any plane position
      }
      p.source[j] = src;
    }
    for (int64_t j = 0; j < span; ++j) {
      if (p.source[j] < 0) continue;
      int64_t e = j + 1;
      while (e < span && p.source[e] == p.source[e - 1] + 1) ++e;
      if (e - j > p.run_end - p.run_begin) {
        p.run_begin = int(j);
        p.run_end = int(e);
      }
      j = e - 1;
    }
    for (int j = 0; j < int(span); ++j) {
      if (j >= p.run_begin && j < p.run_end) continue;
      (p.source[j] < 0 ? p.zeros : p.reads).push_back(j);
    }
  }
  if (backward) {
    const int k_count = 2 * radius + 1;
    p.target_blocks = blocks_of(t1 - t0, lanes);
    p.target_stride = int64_t(p.target_blocks) * lanes;
    p.weight.assign(size_t(k_count * p.target_stride), T(0));
    std::vector<uint8_t> plain_group(size_t(blocks_of(t1 - t0, kLanes)), 1);
    for (int64_t q = 0; q < t1 - t0; ++q) {
      for (int k = 0; k < k_count; ++k) {
        const T w = transposed_tap<T>(t0 + q, t0 + q + k - radius, n, radius, padding, taps);
        p.weight[k * p.target_stride + q] = w;
        if (w != taps[k]) plain_group[q / kLanes] = 0;  // g is symmetric: plain means w = g[k]
      }
    }
    p.plain_block.resize(size_t(p.target_blocks));
    for (int b = 0; b < p.target_blocks; ++b) p.plain_block[b] = plain_group[b * lanes / kLanes];
  }
  return p;
}

// The plans of every tile row and tile column of every level of a launch.
template <typename T>
struct LaunchPlans {
  std::vector<std::vector<AxisPlan<T>>> rows, cols;  // [level][tile row], [level][tile column]
};

template <typename T>
LaunchPlans<T> plan_launch(const FusedArgs& a, bool backward, const T* taps, int lanes) {
  LaunchPlans<T> plans;
  plans.rows.resize(a.num_levels);
  plans.cols.resize(a.num_levels);
  for (int l = 0; l < a.num_levels; ++l) {
    const LevelDesc& lv = a.levels[l];
    for (int64_t t = 0; t < lv.tiles_h; ++t)
      plans.rows[l].push_back(plan_axis(t * a.tile_h, std::min<int64_t>(lv.H, (t + 1) * a.tile_h), lv.H, a.radius,
                                        a.padding, backward, taps, lanes));
    for (int64_t t = 0; t < lv.tiles_w; ++t)
      plans.cols[l].push_back(plan_axis(t * a.tile_w, std::min<int64_t>(lv.W, (t + 1) * a.tile_w), lv.W, a.radius,
                                        a.padding, backward, taps, lanes));
  }
  return plans;
}

// ------------------------------------------------------------------------------------------------
// Workspace
// ------------------------------------------------------------------------------------------------

// Buffer geometry of one (radius, vector width) instance, at compile time: every row a blur reads
// then lies at a constant offset from one pointer.
template <int R, int N>
struct Geometry {
  static constexpr int kCentres = (kTileW + 2 * R + N - 1) / N * N;  // widest row of window centres (the
                                                                     // backward's: the tile plus r each side)
  static constexpr int kLoadedRows = kTileH + 4 * R + 1;             // plane rows the centres read, + the zero row
  static constexpr int kLoaded = kCentres + 2 * R;                   // widest loaded row
  static constexpr int kWindowRows = kTileH + 4 * R;                 // rows of the centres' windows (padded positions)
  static constexpr int kTargets = (kTileW + N - 1) / N * N;          // widest row of targets
  static constexpr int kTargetWindowRows = kTileH + 2 * R;           // centre rows a tile's targets read
  // A coefficient row holds centre column t0 - R + u at u: the centres start up to 2r into it (valid
  // padding) and the transposed pass reads 2r past the targets.
  static constexpr int kCoeffs = kCentres + 2 * R;
  static constexpr int64_t kHorizontalMap = int64_t(kWindowRows) * kCentres;  // between maps
  static constexpr int64_t kTransposedMap = int64_t(kTargetWindowRows) * kTargets;
  static constexpr int kSpare = 2 * (N + 2 * R);  // whole-vector reads past the last loaded row's columns
};

// Cache-line aligned storage: the buffers' rows are whole vectors long, so the loads of a blur
// across rows never straddle two lines.
template <typename T>
struct CacheLineAllocator {
  using value_type = T;
  CacheLineAllocator() = default;
  template <typename U>
  CacheLineAllocator(const CacheLineAllocator<U>&) {}
  T* allocate(size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(64))); }
  void deallocate(T* p, size_t) { ::operator delete(p, std::align_val_t(64)); }
  friend bool operator==(const CacheLineAllocator&, const CacheLineAllocator&) { return true; }
  friend bool operator!=(const CacheLineAllocator&, const CacheLineAllocator&) { return false; }
};
template <typename T>
using Buffer = std::vector<T, CacheLineAllocator<T>>;

// Per-task scratch, sized once per parallel chunk for the largest tile.
template <typename T>
struct Workspace {
  Buffer<T> x, y;        // loaded plane rows (s1 - s0 of them, then the zero-padding row), gathered
  Buffer<T> horizontal;  // kMaps maps after the horizontal pass, one row per window row position
  Buffer<T> values;      // forward: SSIM per centre of a row; backward: dL/dS of the map, a row
  Buffer<T> weights;     // the per-pixel weights of m (a mask) of a row of centres
  Buffer<T> coeffs;      // backward: a_x, b_x, c, a_y, b_y of one centre row, 0 off the centres
  Buffer<T> transposed;  // backward: coefficient rows after the horizontal transposed pass
  Buffer<T> grad_hat;    // backward: dL/dx-hat and dL/dy-hat of one target row
  Buffer<T> raw;         // backward: the raw inputs of one target row, minus their offsets
};

template <int R, int N, typename T>
void reserve(Workspace<T>& ws) {
  using G = Geometry<R, N>;
  ws.x.resize(size_t(G::kLoadedRows) * G::kLoaded + G::kSpare);
  ws.y.resize(size_t(G::kLoadedRows) * G::kLoaded + G::kSpare);
  ws.horizontal.resize(kMaps * size_t(G::kHorizontalMap));
  ws.values.resize(G::kCentres);
  ws.weights.resize(G::kCentres);
  ws.coeffs.resize(kMaps * size_t(G::kCoeffs));
  ws.transposed.resize(kMaps * size_t(G::kTransposedMap));
  ws.grad_hat.resize(2 * G::kTargets);
  ws.raw.resize(2 * G::kTargets);
}

// ------------------------------------------------------------------------------------------------
// Loading
// ------------------------------------------------------------------------------------------------

// The centring shift of one input's tile: the normalised mean of the plane positions its windows
// read (rows [rows.s0, rows.s1), columns [cols.s0, cols.s1)), summed in kLanes fixed lanes.
// Any shift keeps the math exact (ssim_math.h, moments_from_blurred); one close to every window's
// mean is what keeps the float32 variances from cancelling.
template <int N, typename scalar_t, typename T>
SSIMKD_INLINE T centring_shift(const scalar_t* plane, const int64_t* stride, T scale, T offset, const AxisPlan<T>& rows,
                               const AxisPlan<T>& cols) {
  constexpr int kParts = kLanes / N;
  Vec<T, N> part[kParts];  // the whole blocks of kLanes columns
  for (auto& p : part) p = Vec<T, N>(T(0));
  T tail[kLanes] = {};  // the rest of each row
  const int64_t n = cols.s1 - cols.s0, step = stride[3];
  for (int64_t r = rows.s0; r < rows.s1; ++r) {
    const scalar_t* src = plane + r * stride[2] + cols.s0 * step;
    int64_t j = 0;
    if constexpr (std::is_same_v<scalar_t, T>) {
      if (step == 1) {
        for (; j + kLanes <= n; j += kLanes)
          for (int i = 0; i < kParts; ++i) part[i] += Vec<T, N>::load(src + j + i * N);
      }
    }
    for (; j + kLanes <= n; j += kLanes) {
      T v[kLanes];
      for (int l = 0; l < kLanes; ++l) v[l] = static_cast<T>(src[(j + l) * step]);
      for (int i = 0; i < kParts; ++i) part[i] += Vec<T, N>::load(v + i * N);
    }
    for (int l = 0; j + l < n; ++l) tail[l] += static_cast<T>(src[(j + l) * step]);
  }
  T lanes[kLanes];
  for (int i = 0; i < kParts; ++i) part[i].store(lanes + i * N);
  T total = T(0);
  for (int l = 0; l < kLanes; ++l) total += lanes[l] + tail[l];
  return scale * (total / T((rows.s1 - rows.s0) * n) - offset);
}

// dst[j] = scale * (src[j * step] - offset) - shift for j < n: normalised and centred.
template <int N, typename scalar_t, typename T>
SSIMKD_INLINE void normalise(const scalar_t* __restrict src, int64_t step, int n, T scale, T offset, T shift,
                             T* __restrict dst) {
  using V = Vec<T, N>;
  int j = 0;
  if constexpr (std::is_same_v<scalar_t, T>) {
    if (step == 1) {
      const V vs(scale), vo(offset), vn(-shift);
      for (; j + N <= n; j += N) fmadd(vs, V::load(src + j) - vo, vn).store(dst + j);
    }
  }
  for (; j < n; ++j) dst[j] = fmadd_lane<N>(scale, static_cast<T>(src[j * step]) - offset, -shift);
}

// Load the plane rows [rows.s0, rows.s1) of one input, each gathered at the column plan's positions,
// normalised and centred: scale * (x - offset) - shift; then a row of zero padding (-shift) when the
// rows read one. Returns the shift. The longest run of consecutive plane columns is read as one (a
// whole row in the interior); the other columns are read one by one from the plane (not copied from
// the run just stored: a scalar load from a vector store still in flight stalls until it retires).
template <typename scalar_t, typename T, int R, int N>
SSIMKD_INLINE T load_input(const void* base, const int64_t* stride, T scale, T offset, const TileCoord& tc,
                           const AxisPlan<T>& rows, const AxisPlan<T>& cols, T* __restrict out) {
  const scalar_t* plane = static_cast<const scalar_t*>(base) + tc.n * stride[0] + tc.c * stride[1];
  const T shift = centring_shift<N>(plane, stride, scale, offset, rows, cols);
  const int width = int(cols.width()) + 2 * R;
  const int64_t step = stride[3];
  const int r0 = cols.run_begin, r1 = cols.run_end;
  const int64_t* src_col = cols.source.data();
  const int64_t count = rows.s1 - rows.s0;
  for (int64_t i = 0; i < count; ++i) {
    T* dst = out + i * width;
    const scalar_t* src = plane + (rows.s0 + i) * stride[2];
    normalise<N>(src + src_col[r0] * step, step, r1 - r0, scale, offset, shift, dst + r0);
    for (const int j : cols.zeros) dst[j] = -shift;
    for (const int j : cols.reads)
      dst[j] = fmadd_lane<N>(scale, static_cast<T>(src[src_col[j] * step]) - offset, -shift);
  }
  if (rows.pad) std::fill(out + count * width, out + (count + 1) * width, -shift);
  return shift;
}

// A tile's per-plane normalisation (scale, offset) of x and y, and its centring shifts cx, cy.
template <typename T>
struct TileInputs {
  T x_scale, x_offset, y_scale, y_offset, cx, cy;
};

template <typename scalar_t, typename T, int R, int N>
SSIMKD_INLINE TileInputs<T> load_tile(const LevelDesc& lv, const TileCoord& tc, const AxisPlan<T>& rows,
                                      const AxisPlan<T>& cols, Workspace<T>& ws) {
  TileInputs<T> in;
  plane_affine(lv.x_affine, lv.x_affine_stride, tc.n, tc.c, &in.x_scale, &in.x_offset);
  plane_affine(lv.y_affine, lv.y_affine_stride, tc.n, tc.c, &in.y_scale, &in.y_offset);
  in.cx = load_input<scalar_t, T, R, N>(lv.x, lv.x_stride, in.x_scale, in.x_offset, tc, rows, cols, ws.x.data());
  in.cy = load_input<scalar_t, T, R, N>(lv.y, lv.y_stride, in.y_scale, in.y_offset, tc, rows, cols, ws.y.data());
  return in;
}

// ------------------------------------------------------------------------------------------------
// The blurs
// ------------------------------------------------------------------------------------------------

// The taps as vectors, once per tile (in registers or on the stack; never reloaded through a pointer
// that the stores to the buffers might alias).
template <int R, int N, typename T>
SSIMKD_INLINE void broadcast_taps(const T* taps, Vec<T, N>* g) {
  for (int k = 0; k <= 2 * R; ++k) g[k] = Vec<T, N>(taps[k]);
}

// sum_k g[k] p[k * kStride] for the symmetric taps g (g[k] = g[2R - k]): pairs added first, one
// multiply-add per pair.
template <int R, int kStride, int N, typename T>
SSIMKD_INLINE Vec<T, N> symmetric_blur(const T* p, const Vec<T, N>* g) {
  using V = Vec<T, N>;
  V acc = g[R] * V::load(p + R * kStride);
#pragma GCC unroll 8
  for (int k = 0; k < R; ++k) acc = fmadd(g[k], V::load(p + k * kStride) + V::load(p + (2 * R - k) * kStride), acc);
  return acc;
}

// sum_k w[k] p[k * kStride] for any weights (vectors: per lane, or one weight in every lane).
template <int R, int kStride, int N, typename T>
SSIMKD_INLINE Vec<T, N> weighted_blur(const T* p, const Vec<T, N>* w) {
  using V = Vec<T, N>;
  V acc = w[0] * V::load(p);
#pragma GCC unroll 16
  for (int k = 1; k <= 2 * R; ++k) acc = fmadd(w[k], V::load(p + k * kStride), acc);
  return acc;
}

// Horizontal pass: the rows of the centres' windows (padded positions c0 - R + j), each a loaded row
// of x and y blurred onto the centre columns as the five maps x, y, x^2, y^2, xy (the products
// formed in registers: fewer loads than blurring stored products, which this pass is bound by), into
// ws.horizontal (map m, window row j at m * kHorizontalMap + j * kCentres). A loaded row that several
// positions read (reflected borders, the zero row) is blurred once and copied.
template <int R, int N, typename T>
SSIMKD_INLINE void horizontal_pass(Workspace<T>& ws, const AxisPlan<T>& rows, const AxisPlan<T>& cols,
                                   const Vec<T, N>* g) {
  using V = Vec<T, N>;
  using G = Geometry<R, N>;
  const int64_t width = cols.width() + 2 * R;
  const int window_rows = int(rows.c1 - rows.c0) + 2 * R;
  const int64_t pad_row = rows.s1 - rows.s0;
  int blurred_at[G::kLoadedRows];  // window row where each loaded row was blurred, or -1
  std::fill(blurred_at, blurred_at + pad_row + 1, -1);
  T* horizontal = ws.horizontal.data();
  for (int j = 0; j < window_rows; ++j) {
    const int64_t s = rows.source[j];
    const int64_t li = s < 0 ? pad_row : s - rows.s0;
    T* out = horizontal + int64_t(j) * G::kCentres;
    if (blurred_at[li] >= 0) {
      const T* from = horizontal + int64_t(blurred_at[li]) * G::kCentres;
      for (int m = 0; m < kMaps; ++m)
        std::copy(from + m * G::kHorizontalMap, from + m * G::kHorizontalMap + cols.width(),
                  out + m * G::kHorizontalMap);
      continue;
    }
    blurred_at[li] = j;
    for (int b = 0; b < cols.blocks; ++b) {
      const T* x = ws.x.data() + li * width + b * N;
      const T* y = ws.y.data() + li * width + b * N;
      V xv = V::load(x), yv = V::load(y);
      V gx = g[0] * xv, gy = g[0] * yv;
      V sx = gx, sy = gy, sxx = gx * xv, sxy = gx * yv, syy = gy * yv;
#pragma GCC unroll 16
      for (int k = 1; k <= 2 * R; ++k) {
        const V gk = g[k <= R ? k : 2 * R - k];  // the same R + 1 taps twice: fewer registers
        xv = V::load(x + k);
        yv = V::load(y + k);
        gx = gk * xv;
        gy = gk * yv;
        sx += gx;
        sy += gy;
        sxx = fmadd(gx, xv, sxx);
        sxy = fmadd(gx, yv, sxy);
        syy = fmadd(gy, yv, syy);
      }
      sx.store(out + b * N);
      sy.store(out + G::kHorizontalMap + b * N);
      sxx.store(out + 2 * G::kHorizontalMap + b * N);
      syy.store(out + 3 * G::kHorizontalMap + b * N);
      sxy.store(out + 4 * G::kHorizontalMap + b * N);
    }
  }
}

// The five statistics at a vector of centres: the vertical blur of the window rows from p (map 0,
// the window's first row).
template <int R, int N, typename T>
SSIMKD_INLINE void vertical_stats(const T* p, const Vec<T, N>* g, Vec<T, N>* s) {
  using G = Geometry<R, N>;
#pragma GCC unroll 5
  for (int m = 0; m < kMaps; ++m) s[m] = symmetric_blur<R, G::kCentres>(p + m * G::kHorizontalMap, g);
}

// ------------------------------------------------------------------------------------------------
// Per-pixel math over a vector of centres (ssim_math.h with vector lanes; the general exponents'
// powers and square roots lane by lane)
// ------------------------------------------------------------------------------------------------

template <bool kClosedForm, int N, typename T>
SSIMKD_INLINE Vec<T, N> ssim_lanes(const Vec<T, N>* s, const SsimParams<Vec<T, N>>& vp, const SsimParams<T>& p, T cx,
                                   T cy) {
  using V = Vec<T, N>;
  if constexpr (kClosedForm) {
    return ssim_closed_form(moments_from_blurred(s[0], s[1], s[2], s[3], s[4], V(cx), V(cy)), vp);
  } else {
    T lanes[kMaps][N], out[N];
    for (int m = 0; m < kMaps; ++m) s[m].store(lanes[m]);
    for (int l = 0; l < N; ++l)
      out[l] = ssim_partials_general(
                   moments_from_blurred(lanes[0][l], lanes[1][l], lanes[2][l], lanes[3][l], lanes[4][l], cx, cy), p)
                   .S;
    return V::load(out);
  }
}

// The coefficient maps a_x, b_x, c, a_y, b_y (SPEC section 2) of a vector of centres from the
// statistics s of the centred inputs, with d = grad_scale * dm/dS + g (the map's own gradient);
// grad_scale per centre: dL/d level loss * loss_scale, times the pixel's weight where there are weights.
template <bool kClosedForm, int N, typename T>
SSIMKD_INLINE void coefficient_lanes(const Vec<T, N>* s, const SsimParams<Vec<T, N>>& vp, const SsimParams<T>& p, T cx,
                                     T cy, Vec<T, N> grad_scale, Vec<T, N> g, Vec<T, N>* coef) {
  using V = Vec<T, N>;
  if constexpr (kClosedForm) {
    const SsimPartials<V> part =
        ssim_partials_closed_form(moments_from_blurred(s[0], s[1], s[2], s[3], s[4], V(cx), V(cy)), vp);
    const V d = grad_scale * pixel_loss_grad(part.S, p.clamp) + g;
    const BackwardCoeffs<V> bc = backward_coeffs(part, d, s[0], s[1]);
    coef[0] = bc.a_x;
    coef[1] = bc.b_x;
    coef[2] = bc.c;
    coef[3] = bc.a_y;
    coef[4] = bc.b_y;
  } else {
    T lanes[kMaps][N], gl[N], scale[N], out[kMaps][N];
    for (int m = 0; m < kMaps; ++m) s[m].store(lanes[m]);
    g.store(gl);
    grad_scale.store(scale);
    for (int l = 0; l < N; ++l) {
      const SsimPartials<T> part = ssim_partials_general(
          moments_from_blurred(lanes[0][l], lanes[1][l], lanes[2][l], lanes[3][l], lanes[4][l], cx, cy), p);
      const T d = scale[l] * pixel_loss_grad(part.S, p.clamp) + gl[l];
      const BackwardCoeffs<T> bc = backward_coeffs(part, d, lanes[0][l], lanes[1][l]);
      out[0][l] = bc.a_x;
      out[1][l] = bc.b_x;
      out[2][l] = bc.c;
      out[3][l] = bc.a_y;
      out[4][l] = bc.b_y;
    }
    for (int m = 0; m < kMaps; ++m) coef[m] = V::load(out[m]);
  }
}

// ------------------------------------------------------------------------------------------------
// Rows of the backward's outputs
// ------------------------------------------------------------------------------------------------

// A row of the raw input minus the plane's offset, in the accumulation type; 0 in [n, n_padded).
template <typename scalar_t, typename T>
SSIMKD_INLINE void read_row(const scalar_t* __restrict src, int64_t step, int n, int n_padded, T offset,
                            T* __restrict dst) {
  if (step == 1) {
    for (int k = 0; k < n; ++k) dst[k] = static_cast<T>(src[k]) - offset;
  } else {
    for (int k = 0; k < n; ++k) dst[k] = static_cast<T>(src[k * step]) - offset;
  }
  for (int k = n; k < n_padded; ++k) dst[k] = T(0);
}

// dst[k * step] = scale * g[k], in the input dtype.
template <typename scalar_t, typename T>
SSIMKD_INLINE void write_row(const T* __restrict g, T scale, int n, scalar_t* __restrict dst, int64_t step) {
  if (step == 1) {
    for (int k = 0; k < n; ++k) dst[k] = static_cast<scalar_t>(scale * g[k]);
  } else {
    for (int k = 0; k < n; ++k) dst[k * step] = static_cast<scalar_t>(scale * g[k]);
  }
}

template <typename scalar_t>
SSIMKD_INLINE void zero_row(scalar_t* dst, int n, int64_t step) {
  for (int k = 0; k < n; ++k) dst[k * step] = scalar_t(0);
}

// The level's per-pixel weights of m (lv.weight, not null) at map row i, columns [j, j + n) of plane
// (tc.n, tc.c), into dst; 0 in [n, n_padded).
template <typename T>
SSIMKD_INLINE void read_weight_row(const LevelDesc& lv, const TileCoord& tc, int64_t i, int64_t j, int n, int n_padded,
                                   T* __restrict dst) {
  const int64_t* stride = lv.weight_stride;
  const T* src = static_cast<const T*>(lv.weight) + tc.n * stride[0] + tc.c * stride[1] + i * stride[2] + j * stride[3];
  read_row(src, stride[3], n, n_padded, T(0), dst);
}

// ------------------------------------------------------------------------------------------------
// Forward: one tile -> its sums of m and of the L1 term (and its part of the SSIM map)
// ------------------------------------------------------------------------------------------------

// |v|, lane-wise (NaN stays NaN).
template <typename T, int N>
SSIMKD_INLINE Vec<T, N> abs_lanes(Vec<T, N> v) {
  return where(v < Vec<T, N>(T(0)), -v, v);
}

// The L1 term of one tile: the sum of |x-hat - y-hat| over its pixels [t0, t1) x [t0, t1) (the tiles of a
// plane hold each pixel once, whatever the padding), x-hat = scale * (x - offset) as everywhere. Read
// from the planes, as the tile's load then reads them again (from cache): a valid-padding tile without
// window centres loads nothing else. Summed in kLanes fixed lanes: every vector width gives the same bits.
template <typename scalar_t, int N>
SSIMKD_INLINE AccType<scalar_t> l1_tile_sum(const LevelDesc& lv, const TileCoord& tc,
                                            const AxisPlan<AccType<scalar_t>>& rows,
                                            const AxisPlan<AccType<scalar_t>>& cols, Workspace<AccType<scalar_t>>& ws) {
  using T = AccType<scalar_t>;
  using V = Vec<T, N>;
  T x_scale, x_offset, y_scale, y_offset;
  plane_affine(lv.x_affine, lv.x_affine_stride, tc.n, tc.c, &x_scale, &x_offset);
  plane_affine(lv.y_affine, lv.y_affine_stride, tc.n, tc.c, &y_scale, &y_offset);
  const scalar_t* x_plane = static_cast<const scalar_t*>(lv.x) + tc.n * lv.x_stride[0] + tc.c * lv.x_stride[1];
  const scalar_t* y_plane = static_cast<const scalar_t*>(lv.y) + tc.n * lv.y_stride[0] + tc.c * lv.y_stride[1];
  const int ow = int(cols.t1 - cols.t0), blocks = blocks_of(ow, N);
  const int64_t x_step = lv.x_stride[3], y_step = lv.y_stride[3];
  // Whole vectors straight from contiguous rows of the accumulation type; the rest through a copy.
  const bool direct = std::is_same_v<scalar_t, T> && x_step == 1 && y_step == 1;
  const int direct_blocks = direct ? ow / N : 0;
  T* x_rel = ws.raw.data();
  T* y_rel = x_rel + blocks * N;
  const V vxs(x_scale), vys(y_scale), vxo(x_offset), vyo(y_offset);
  LaneSums<T, N> sum;
  for (int64_t h = rows.t0; h < rows.t1; ++h) {
    const scalar_t* x_row = x_plane + h * lv.x_stride[2] + cols.t0 * x_step;
    const scalar_t* y_row = y_plane + h * lv.y_stride[2] + cols.t0 * y_step;
    int b = 0;
    if constexpr (std::is_same_v<scalar_t, T>) {
      for (; b < direct_blocks; ++b)
        sum.add(b, abs_lanes(vxs * (V::load(x_row + b * N) - vxo) - vys * (V::load(y_row + b * N) - vyo)), N);
    }
    if (b == blocks) continue;
    const int n = ow - b * N;
    read_row(x_row + b * N * x_step, x_step, n, (blocks - b) * N, x_offset, x_rel);
    read_row(y_row + b * N * y_step, y_step, n, (blocks - b) * N, y_offset, y_rel);
    for (int k = 0; b < blocks; ++b, ++k)
      sum.add(b, abs_lanes(vxs * V::load(x_rel + k * N) - vys * V::load(y_rel + k * N)), ow - b * N);
  }
  return sum.total();
}

template <bool kClosedForm, typename scalar_t, int R, int N>
SSIMKD_INLINE void forward_rows(const FusedArgs& a, const LevelDesc& lv, const TileCoord& tc,
                                const AxisPlan<AccType<scalar_t>>& rows, const AxisPlan<AccType<scalar_t>>& cols,
                                Workspace<AccType<scalar_t>>& ws, const Vec<AccType<scalar_t>, N>* g,
                                const TileInputs<AccType<scalar_t>>& in, AccType<scalar_t>* tile_sum) {
  using T = AccType<scalar_t>;
  using V = Vec<T, N>;
  using G = Geometry<R, N>;
  const SsimParams<T> params = make_ssim_params<T>(a, lv);
  const SsimParams<V> vparams = lanes_of<N>(params);
  const int n_out = int(cols.c1 - cols.c0);
  const int64_t out_h = output_extent(lv.H, R, a.padding), out_w = output_extent(lv.W, R, a.padding);
  const int64_t offset = a.padding == kValid ? R : 0;  // plane centre -> map index
  T* map = static_cast<T*>(lv.map);
  T* __restrict s_row = ws.values.data();
  T* __restrict w_row = ws.weights.data();
  LaneSums<T, N> total;
  for (int64_t i = 0; i < rows.c1 - rows.c0; ++i) {
    const T* window = ws.horizontal.data() + i * G::kCentres;
    if (lv.weight != nullptr)
      read_weight_row(lv, tc, rows.c0 + i - offset, cols.c0 - offset, n_out, cols.blocks * N, w_row);
    for (int b = 0; b < cols.blocks; ++b) {
      V s[kMaps];
      vertical_stats<R>(window + b * N, g, s);
      const V S = ssim_lanes<kClosedForm, N>(s, vparams, params, in.cx, in.cy);
      if (map != nullptr) S.store(s_row + b * N);
      if (lv.weight != nullptr) {
        total.add_product(b, pixel_loss(S, params.clamp), V::load(w_row + b * N), n_out - b * N);
      } else {
        total.add(b, pixel_loss(S, params.clamp), n_out - b * N);
      }
    }
    if (map != nullptr) {
      T* dst = map + (tc.plane * out_h + rows.c0 + i - offset) * out_w + cols.c0 - offset;
      for (int j = 0; j < n_out; ++j) dst[j] = s_row[j];
    }
  }
  *tile_sum = total.total();
}

// tile_sums[0]: the tile's sum of w m; [1]: of |x-hat - y-hat| (0 without an L1 term).
template <typename scalar_t, int R, int N>
SSIMKD_INLINE void forward_tile(const FusedArgs& a, const LaunchPlans<AccType<scalar_t>>& plans, int64_t tile,
                                Workspace<AccType<scalar_t>>& ws, const AccType<scalar_t>* taps,
                                AccType<scalar_t>* tile_sums) {
  using T = AccType<scalar_t>;
  const TileCoord tc = locate_tile(a, tile);
  const LevelDesc& lv = a.levels[tc.level];
  const AxisPlan<T>& rows = plans.rows[tc.level][tc.th];
  const AxisPlan<T>& cols = plans.cols[tc.level][tc.tw];
  tile_sums[0] = T(0);
  tile_sums[1] = lv.l1_scale != 0.0 ? l1_tile_sum<scalar_t, N>(lv, tc, rows, cols, ws) : T(0);
  if (rows.c1 == rows.c0 || cols.c1 == cols.c0) return;  // valid padding: no window centre in this tile
  PhaseTimer timer(false);
  Vec<T, N> g[2 * R + 1];
  broadcast_taps<R>(taps, g);
  const TileInputs<T> in = load_tile<scalar_t, T, R, N>(lv, tc, rows, cols, ws);
  timer.lap(kPhaseLoad);
  horizontal_pass<R>(ws, rows, cols, g);
  timer.lap(kPhaseHorizontal);
  if (closed_form(lv)) {
    forward_rows<true, scalar_t, R, N>(a, lv, tc, rows, cols, ws, g, in, tile_sums);
  } else {
    forward_rows<false, scalar_t, R, N>(a, lv, tc, rows, cols, ws, g, in, tile_sums);
  }
  timer.lap(kPhaseRows);
}

// ------------------------------------------------------------------------------------------------
// Backward: one tile of dL/dx (and dL/dy), with its per-plane affine-gradient partial sums
// ------------------------------------------------------------------------------------------------

// Per centre row: the statistics, the coefficient maps, and at once their horizontal transposed pass
// (coefficient row -> target columns) into ws.transposed: map m, centre row p at m * kTransposedMap
// + (p - (t0 - R)) * kTargets, so that a target row's window rows are consecutive; the rows of that
// range that hold no centre are 0. Target vectors whose targets see only unfolded, unmasked windows
// use the taps (g is symmetric); border vectors use the plan's per-target weights.
template <bool kClosedForm, typename scalar_t, int R, int N>
SSIMKD_INLINE void backward_rows(const FusedArgs& a, const LevelDesc& lv, const TileCoord& tc,
                                 const AxisPlan<AccType<scalar_t>>& rows, const AxisPlan<AccType<scalar_t>>& cols,
                                 Workspace<AccType<scalar_t>>& ws, const Vec<AccType<scalar_t>, N>* g,
                                 const TileInputs<AccType<scalar_t>>& in, int n_coeff) {
  using T = AccType<scalar_t>;
  using V = Vec<T, N>;
  using G = Geometry<R, N>;
  const SsimParams<T> params = make_ssim_params<T>(a, lv);
  const SsimParams<V> vparams = lanes_of<N>(params);
  const int64_t centres = cols.width();
  const int n_centres = int(cols.c1 - cols.c0);
  const int64_t centre_rows = rows.c1 - rows.c0;
  const int64_t first_row = rows.c0 - (rows.t0 - R);  // transposed row of centre row c0
  const int64_t window_rows = (rows.t1 - rows.t0) + 2 * R;
  const int64_t u0 = cols.c0 - (cols.t0 - R);  // coefficient-row column of centre column c0
  T* __restrict coeffs = ws.coeffs.data();
  T* __restrict transposed = ws.transposed.data();
  for (int m = 0; m < n_coeff; ++m) {
    std::fill(coeffs + m * G::kCoeffs, coeffs + m * G::kCoeffs + u0, T(0));
    std::fill(coeffs + m * G::kCoeffs + u0 + centres, coeffs + (m + 1) * G::kCoeffs, T(0));
    T* map = transposed + m * G::kTransposedMap;
    std::fill(map, map + first_row * G::kTargets, T(0));
    std::fill(map + (first_row + centre_rows) * G::kTargets, map + window_rows * G::kTargets, T(0));
  }
  const T grad_scale = static_cast<const T*>(lv.grad_loss)[a.plane_sums ? tc.plane : 0] * T(lv.loss_scale);
  const T* grad_map = static_cast<const T*>(lv.grad_map);
  const int64_t out_h = output_extent(lv.H, R, a.padding), out_w = output_extent(lv.W, R, a.padding);
  const int64_t offset = a.padding == kValid ? R : 0;
  T* __restrict g_row = ws.values.data();
  T* __restrict w_row = ws.weights.data();
  if (grad_map == nullptr) std::fill(g_row, g_row + centres, T(0));
  const T* band = cols.weight.data();
  const int64_t band_stride = cols.target_stride;
  for (int64_t i = 0; i < centre_rows; ++i) {
    const int64_t p = rows.c0 + i;
    if (grad_map != nullptr) {
      const T* gm = grad_map + (tc.plane * out_h + p - offset) * out_w + cols.c0 - offset;
      std::copy(gm, gm + n_centres, g_row);
      std::fill(g_row + n_centres, g_row + centres, T(0));
    }
    if (lv.weight != nullptr) read_weight_row(lv, tc, p - offset, cols.c0 - offset, n_centres, int(centres), w_row);
    const T* window = ws.horizontal.data() + i * G::kCentres;
    for (int b = 0; b < cols.blocks; ++b) {
      V s[kMaps], coef[kMaps];
      vertical_stats<R>(window + b * N, g, s);
      const V scale = lv.weight != nullptr ? V(grad_scale) * V::load(w_row + b * N) : V(grad_scale);
      coefficient_lanes<kClosedForm, N>(s, vparams, params, in.cx, in.cy, scale, V::load(g_row + b * N), coef);
      const auto centre = V::iota() < V(n_centres - b * N);  // lanes past the last centre hold 0
      for (int m = 0; m < n_coeff; ++m) where(centre, coef[m], V(T(0))).store(coeffs + m * G::kCoeffs + u0 + b * N);
    }
    // Per target vector, every map: a border vector's weights are loaded once for all maps.
    T* dst = transposed + (first_row + i) * G::kTargets;
    for (int b = 0; b < cols.target_blocks; ++b) {
      if (cols.plain_block[b]) {
        for (int m = 0; m < n_coeff; ++m)
          symmetric_blur<R, 1>(coeffs + m * G::kCoeffs + b * N, g).store(dst + m * G::kTransposedMap + b * N);
      } else {
        V w[2 * R + 1];
        for (int k = 0; k <= 2 * R; ++k) w[k] = V::load(band + k * band_stride + b * N);
        for (int m = 0; m < n_coeff; ++m)
          weighted_blur<R, 1>(coeffs + m * G::kCoeffs + b * N, w).store(dst + m * G::kTransposedMap + b * N);
      }
    }
  }
}

// The L1 term's share of dL/dx-hat: grad * sign(x-hat - y-hat) (minus that in dL/dy-hat), where `on`.
template <typename T>
struct L1Gradient {
  bool on;
  T grad;  // dL/d(loss) * l1_scale
  T x_scale, y_scale;
};

// One target row: the vertical transposed pass over its window rows (from p, map 0) with the
// taps (kPlain) or the row's weights w, then dL/dx-hat = W^T a_x + 2 x W^T b_x + y W^T c (and the
// mirror for y), and the per-lane sums for d scale and d offset.
template <bool kPlain, bool kNeedY, int R, int N, typename T>
SSIMKD_INLINE void target_row(const T* p, const Vec<T, N>* w, int blocks, int ow, const T* xh, const T* yh,
                              const T* x_raw, const T* y_raw, const L1Gradient<T>& l1, T* gx_hat, T* gy_hat,
                              LaneSums<T, N>* sums) {
  using V = Vec<T, N>;
  using G = Geometry<R, N>;
  constexpr int64_t kMap = G::kTransposedMap;
  for (int b = 0; b < blocks; ++b) {
    const T* at = p + b * N;
    const int valid = ow - b * N;
    V blurred[kMaps];
    for (int m = 0; m < (kNeedY ? 5 : 3); ++m)
      blurred[m] =
          kPlain ? symmetric_blur<R, G::kTargets>(at + m * kMap, w) : weighted_blur<R, G::kTargets>(at + m * kMap, w);
    const V xv = V::load(xh + b * N), yv = V::load(yh + b * N);
    V g_l1(T(0));
    if (l1.on) {  // l1.grad * sign(x-hat - y-hat), 0 where they are equal (compared: see l1_sign)
      const V x_hat = V(l1.x_scale) * V::load(x_raw + b * N), y_hat = V(l1.y_scale) * V::load(y_raw + b * N);
      g_l1 = where(x_hat > y_hat, V(l1.grad), where(x_hat < y_hat, V(-l1.grad), V(T(0))));
    }
    const V gxh = blurred[0] + V(T(2)) * xv * blurred[1] + yv * blurred[2] + g_l1;
    gxh.store(gx_hat + b * N);
    sums[0].add_product(b, gxh, V::load(x_raw + b * N), valid);
    sums[1].add(b, gxh, valid);
    if (kNeedY) {
      const V gyh = blurred[3] + V(T(2)) * yv * blurred[4] + xv * blurred[2] - g_l1;
      gyh.store(gy_hat + b * N);
      sums[2].add_product(b, gyh, V::load(y_raw + b * N), valid);
      sums[3].add(b, gyh, valid);
    }
  }
}

// Per target row: the vertical transposed pass (the plan's weights of that row; the taps where the
// row's windows neither fold nor leave the centres), then dL/dx-hat and dL/dx = scale * dL/dx-hat;
// per-plane sums for d scale and d offset (partial[0..3]: gx_hat * x, gx_hat, gy_hat * y, gy_hat).
template <typename scalar_t, int R, int N>
SSIMKD_INLINE void backward_targets(const LevelDesc& lv, const TileCoord& tc, const AxisPlan<AccType<scalar_t>>& rows,
                                    const AxisPlan<AccType<scalar_t>>& cols, Workspace<AccType<scalar_t>>& ws,
                                    const Vec<AccType<scalar_t>, N>* g, const AccType<scalar_t>* taps,
                                    const TileInputs<AccType<scalar_t>>& in, bool need_y,
                                    const L1Gradient<AccType<scalar_t>>& l1, scalar_t* gx, scalar_t* gy,
                                    AccType<scalar_t>* partial) {
  using T = AccType<scalar_t>;
  using V = Vec<T, N>;
  using G = Geometry<R, N>;
  const int oh = int(rows.t1 - rows.t0), ow = int(cols.t1 - cols.t0);
  const int ts = int(cols.target_stride);
  const scalar_t* x_plane = static_cast<const scalar_t*>(lv.x) + tc.n * lv.x_stride[0] + tc.c * lv.x_stride[1];
  const scalar_t* y_plane = static_cast<const scalar_t*>(lv.y) + tc.n * lv.y_stride[0] + tc.c * lv.y_stride[1];
  const int64_t width = cols.width() + 2 * R;
  const int64_t first_col = cols.t0 - (cols.c0 - R);  // loaded column of target column t0
  T* gx_hat = ws.grad_hat.data();
  T* gy_hat = gx_hat + G::kTargets;
  T* x_raw = ws.raw.data();
  T* y_raw = x_raw + G::kTargets;
  LaneSums<T, N> sums[4];
  for (int q = 0; q < oh; ++q) {
    const int64_t h = rows.t0 + q;
    bool plain = true;
    V w[2 * R + 1];
    for (int k = 0; k <= 2 * R; ++k) {
      const T wk = rows.weight[k * rows.target_stride + q];
      plain = plain && wk == taps[k];
      w[k] = V(wk);
    }
    read_row(x_plane + h * lv.x_stride[2] + cols.t0 * lv.x_stride[3], lv.x_stride[3], ow, ts, in.x_offset, x_raw);
    if (need_y || l1.on)
      read_row(y_plane + h * lv.y_stride[2] + cols.t0 * lv.y_stride[3], lv.y_stride[3], ow, ts, in.y_offset, y_raw);
    const T* window = ws.transposed.data() + int64_t(q) * G::kTargets;
    const int64_t loaded = (h - rows.s0) * width + first_col;
    const T* xh = ws.x.data() + loaded;
    const T* yh = ws.y.data() + loaded;
    const int blocks = cols.target_blocks;
    if (need_y) {
      if (plain) {
        target_row<true, true, R>(window, g, blocks, ow, xh, yh, x_raw, y_raw, l1, gx_hat, gy_hat, sums);
      } else {
        target_row<false, true, R>(window, w, blocks, ow, xh, yh, x_raw, y_raw, l1, gx_hat, gy_hat, sums);
      }
    } else if (plain) {
      target_row<true, false, R>(window, g, blocks, ow, xh, yh, x_raw, y_raw, l1, gx_hat, gy_hat, sums);
    } else {
      target_row<false, false, R>(window, w, blocks, ow, xh, yh, x_raw, y_raw, l1, gx_hat, gy_hat, sums);
    }
    if (gx) write_row(gx_hat, in.x_scale, ow, gx + h * lv.gx_stride[2] + cols.t0 * lv.gx_stride[3], lv.gx_stride[3]);
    if (gy) write_row(gy_hat, in.y_scale, ow, gy + h * lv.gy_stride[2] + cols.t0 * lv.gy_stride[3], lv.gy_stride[3]);
  }
  for (int k = 0; k < 4; ++k) partial[k] = sums[k].total();
}

template <typename scalar_t, int R, int N>
SSIMKD_INLINE void backward_tile(const FusedArgs& a, const LaunchPlans<AccType<scalar_t>>& plans, int64_t tile,
                                 Workspace<AccType<scalar_t>>& ws, const AccType<scalar_t>* taps,
                                 AccType<scalar_t>* partial) {
  using T = AccType<scalar_t>;
  const TileCoord tc = locate_tile(a, tile);
  const LevelDesc& lv = a.levels[tc.level];
  const AxisPlan<T>& rows = plans.rows[tc.level][tc.th];
  const AxisPlan<T>& cols = plans.cols[tc.level][tc.tw];
  const bool need_y = lv.gy != nullptr || lv.g_y_affine != nullptr;
  const int n_coeff = need_y ? 5 : 3;  // blurred back: a_x, b_x, c [, a_y, b_y]
  scalar_t* gx = lv.gx ? static_cast<scalar_t*>(lv.gx) + tc.n * lv.gx_stride[0] + tc.c * lv.gx_stride[1] : nullptr;
  scalar_t* gy = lv.gy ? static_cast<scalar_t*>(lv.gy) + tc.n * lv.gy_stride[0] + tc.c * lv.gy_stride[1] : nullptr;
  for (int k = 0; k < 4; ++k) partial[k] = T(0);
  // No window reaches this tile: a zero gradient. (A guard: a plane the op accepts always has centres
  // within r of every tile, so the L1 term, which this would miss, never meets it.)
  if (rows.c1 == rows.c0 || cols.c1 == cols.c0) {
    const int oh = int(rows.t1 - rows.t0), ow = int(cols.t1 - cols.t0);
    for (int q = 0; q < oh; ++q) {
      const int64_t h = rows.t0 + q;
      if (gx) zero_row(gx + h * lv.gx_stride[2] + cols.t0 * lv.gx_stride[3], ow, lv.gx_stride[3]);
      if (gy) zero_row(gy + h * lv.gy_stride[2] + cols.t0 * lv.gy_stride[3], ow, lv.gy_stride[3]);
    }
    return;
  }
  PhaseTimer timer(true);
  Vec<T, N> g[2 * R + 1];
  broadcast_taps<R>(taps, g);
  // Pass 1: load what the centres within r of the tile read (the tile plus a 2r halo, clipped to the
  // plane), and the statistics' horizontal pass.
  const TileInputs<T> in = load_tile<scalar_t, T, R, N>(lv, tc, rows, cols, ws);
  timer.lap(kPhaseLoad);
  horizontal_pass<R>(ws, rows, cols, g);
  timer.lap(kPhaseHorizontal);
  // Pass 2: per centre row, the statistics, the coefficients and their horizontal transposed pass.
  if (closed_form(lv)) {
    backward_rows<true, scalar_t, R, N>(a, lv, tc, rows, cols, ws, g, in, n_coeff);
  } else {
    backward_rows<false, scalar_t, R, N>(a, lv, tc, rows, cols, ws, g, in, n_coeff);
  }
  timer.lap(kPhaseRows);
  // Pass 3: per target row, the vertical transposed pass and the gradients (with the L1 term's).
  const T grad_loss = static_cast<const T*>(lv.grad_loss)[a.plane_sums ? tc.plane : 0];
  const L1Gradient<T> l1{lv.l1_scale != 0.0, grad_loss * T(lv.l1_scale), in.x_scale, in.y_scale};
  backward_targets<scalar_t, R, N>(lv, tc, rows, cols, ws, g, taps, in, need_y, l1, gx, gy, partial);
  timer.lap(kPhaseTargets);
}

// The tile functions of each instruction set, at its vector width: the one place that names the
// target attributes. Everything they call is inlined into them.
template <Isa isa>
struct TileFunctions;

#define SSIMKD_TILE_FUNCTIONS(ISA, TARGET)                                                                     \
  template <>                                                                                                  \
  struct TileFunctions<ISA> {                                                                                  \
    template <typename T>                                                                                      \
    static constexpr int kWidth = vector_bytes(ISA) / int(sizeof(T));                                          \
    template <typename scalar_t, int R>                                                                        \
    TARGET static void forward(const FusedArgs& a, const LaunchPlans<AccType<scalar_t>>& plans, int64_t tile,  \
                               Workspace<AccType<scalar_t>>& ws, const AccType<scalar_t>* taps,                \
                               AccType<scalar_t>* out) {                                                       \
      forward_tile<scalar_t, R, kWidth<AccType<scalar_t>>>(a, plans, tile, ws, taps, out);                     \
    }                                                                                                          \
    template <typename scalar_t, int R>                                                                        \
    TARGET static void backward(const FusedArgs& a, const LaunchPlans<AccType<scalar_t>>& plans, int64_t tile, \
                                Workspace<AccType<scalar_t>>& ws, const AccType<scalar_t>* taps,               \
                                AccType<scalar_t>* out) {                                                      \
      backward_tile<scalar_t, R, kWidth<AccType<scalar_t>>>(a, plans, tile, ws, taps, out);                    \
    }                                                                                                          \
  };
SSIMKD_TILE_FUNCTIONS(Isa::kAvx512, SSIMKD_TARGET_AVX512)
SSIMKD_TILE_FUNCTIONS(Isa::kAvx2, SSIMKD_TARGET_AVX2)
SSIMKD_TILE_FUNCTIONS(Isa::kBaseline, )
#undef SSIMKD_TILE_FUNCTIONS

// ------------------------------------------------------------------------------------------------
// Launch over all tiles, then the fixed-order second stage
// ------------------------------------------------------------------------------------------------

template <typename T>
void taps_as(const FusedArgs& a, T* taps) {
  for (int k = 0; k < a.window; ++k) taps[k] = T(a.taps[k]);
}

// Every tile of a launch through the tile function `tile_fn` (forward or backward of one
// instruction set), `partials_per_tile` partial sums each.
template <typename T, int R, int N, typename TileFn>
void run_tiles(const FusedArgs& a, bool backward, int partials_per_tile, TileFn tile_fn) {
  T taps[kMaxWindow];
  taps_as(a, taps);
  const LaunchPlans<T> plans = plan_launch(a, backward, taps, N);
  T* partials = static_cast<T*>(a.tile_partials);
  for_each_item<Workspace<T>>(
      a.total_tiles, [&](Workspace<T>& ws) { reserve<R, N>(ws); },
      [&](int64_t t, Workspace<T>& ws) { tile_fn(a, plans, t, ws, taps, partials + partials_per_tile * t); });
  end_phase_launch(backward);
}

template <typename scalar_t, int R, Isa isa>
void run_tiles_on(const FusedArgs& a, bool backward) {
  using T = AccType<scalar_t>;
  using Fns = TileFunctions<isa>;
  constexpr int N = Fns::template kWidth<T>;
  if (backward) {
    run_tiles<T, R, N>(a, true, 4, &Fns::template backward<scalar_t, R>);
  } else {
    run_tiles<T, R, N>(a, false, 2, &Fns::template forward<scalar_t, R>);
  }
}

template <typename scalar_t, int R>
void run_tiles_dispatch(const FusedArgs& a, bool backward) {
  switch (cpu_isa()) {
    case Isa::kAvx512: return run_tiles_on<scalar_t, R, Isa::kAvx512>(a, backward);
    case Isa::kAvx2: return run_tiles_on<scalar_t, R, Isa::kAvx2>(a, backward);
    case Isa::kBaseline: return run_tiles_on<scalar_t, R, Isa::kBaseline>(a, backward);
  }
}

template <typename scalar_t, int R>
void forward_impl(const FusedArgs& a) {
  using T = AccType<scalar_t>;
  run_tiles_dispatch<scalar_t, R>(a, false);
  // The second stage (ssim_params.h): tiles of a level (or of a plane) in index order, in SecondStageSum.
  const T* partials = static_cast<const T*>(a.tile_partials);
  T* losses = static_cast<T*>(a.level_losses);
  for (int l = 0; l < a.num_levels; ++l) {
    const LevelDesc& lv = a.levels[l];
    const int64_t per_plane = lv.tiles_h * lv.tiles_w, planes = lv.N * lv.C;
    const int64_t sums = a.plane_sums ? planes : 1, per_sum = a.plane_sums ? per_plane : planes * per_plane;
    for (int64_t k = 0; k < sums; ++k) {
      SecondStageSum total[2] = {0.0, 0.0};
      const T* p = partials + 2 * (lv.tile_begin + k * per_sum);
      for (int64_t t = 0; t < per_sum; ++t)
        for (int j = 0; j < 2; ++j) total[j] += SecondStageSum(p[2 * t + j]);
      losses[lv.loss_begin + k] = T(level_loss(lv, total[0], total[1]));
    }
  }
}

template <typename scalar_t, int R>
void backward_impl(const FusedArgs& a) {
  using T = AccType<scalar_t>;
  run_tiles_dispatch<scalar_t, R>(a, true);
  // The second stage (ssim_params.h): per plane, its tiles in index order, in SecondStageSum; then
  // dL/d(scale, offset).
  const T* partials = static_cast<const T*>(a.tile_partials);
  for (int l = 0; l < a.num_levels; ++l) {
    const LevelDesc& lv = a.levels[l];
    const int64_t per_plane = lv.tiles_h * lv.tiles_w;
    for (int64_t plane = 0; plane < lv.N * lv.C; ++plane) {
      SecondStageSum s[4] = {0.0, 0.0, 0.0, 0.0};
      const T* p = partials + 4 * (lv.tile_begin + plane * per_plane);
      for (int64_t t = 0; t < per_plane; ++t)
        for (int k = 0; k < 4; ++k) s[k] += SecondStageSum(p[4 * t + k]);
      const int64_t n = plane / lv.C, c = plane % lv.C;
      T scale, offset;
      if (lv.g_x_affine) {
        plane_affine(lv.x_affine, lv.x_affine_stride, n, c, &scale, &offset);
        affine_gradient(scale, T(s[0]), T(s[1]), static_cast<T*>(lv.g_x_affine) + 2 * plane);
      }
      if (lv.g_y_affine) {
        plane_affine(lv.y_affine, lv.y_affine_stride, n, c, &scale, &offset);
        affine_gradient(scale, T(s[2]), T(s[3]), static_cast<T*>(lv.g_y_affine) + 2 * plane);
      }
    }
  }
}

// Runtime (dtype, radius) -> template instance.
template <template <typename, int> class Fn, typename scalar_t>
void dispatch_radius(const FusedArgs& a) {
  switch (a.radius) {
    case 1: return Fn<scalar_t, 1>::run(a);
    case 2: return Fn<scalar_t, 2>::run(a);
    case 3: return Fn<scalar_t, 3>::run(a);
    case 4: return Fn<scalar_t, 4>::run(a);
    case 5: return Fn<scalar_t, 5>::run(a);
    case 6: return Fn<scalar_t, 6>::run(a);
    case 7: return Fn<scalar_t, 7>::run(a);
  }
  throw std::invalid_argument("ssimkd: window radius out of range");
}

template <template <typename, int> class Fn>
void dispatch(const FusedArgs& a) {
  switch (a.dtype) {
    case DType::kFloat32: return dispatch_radius<Fn, float>(a);
    case DType::kFloat64: return dispatch_radius<Fn, double>(a);
    case DType::kFloat16: return dispatch_radius<Fn, c10::Half>(a);
    case DType::kBFloat16: return dispatch_radius<Fn, c10::BFloat16>(a);
  }
  throw std::invalid_argument("ssimkd: unsupported dtype");
}

template <typename scalar_t, int R>
struct ForwardFn {
  static void run(const FusedArgs& a) { forward_impl<scalar_t, R>(a); }
};
template <typename scalar_t, int R>
struct BackwardFn {
  static void run(const FusedArgs& a) { backward_impl<scalar_t, R>(a); }
};

}  // namespace

TileShape cpu_tile_shape(bool) {
  return {kTileH, kTileW};
}

const char* cpu_isa_name() {
  return isa_name(cpu_isa());
}

void ssim_fwd_cpu(const FusedArgs& args) {
  if (args.total_tiles > 0) dispatch<ForwardFn>(args);
}

void ssim_bwd_cpu(const FusedArgs& args) {
  if (args.total_tiles > 0) dispatch<BackwardFn>(args);
}

}  // namespace ssimkd
