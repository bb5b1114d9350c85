// ssim_math.h: the one home of SSIM-KD's per-pixel math (SPEC section 2), shared unchanged by the
// CPU op (ssim_cpu.cpp) and the CUDA kernels (ssim_cuda.cu). No torch includes: the host-side C++
// test (csrc/tests/test_ssim_math.cpp, built by CMake) checks every partial against finite differences.
//
// Notation follows the SPEC: mu_x = W x, var_x = W(x^2) - mu_x^2, cov_xy = W(xy) - mu_x mu_y,
//   A1 = 2 mu_x mu_y + C1, B1 = mu_x^2 + mu_y^2 + C1, A2 = 2 cov_xy + C2, B2 = var_x + var_y + C2,
//   default SSIM S = A1 A2 / (B1 B2); general S = l^alpha c^beta s^gamma.
#pragma once

#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define SSIMKD_HD __host__ __device__ __forceinline__
#else
#define SSIMKD_HD inline
#endif

namespace ssimkd {

// Border treatment of the window; mirrored by PADDING_CODES in ssimkd_kernels/_constants.py.
enum Padding : int { kReflect = 0, kZero = 1, kValid = 2 };

constexpr int kMinWindow = 3;
constexpr int kMaxWindow = 15;
constexpr int kMaxRadius = kMaxWindow / 2;
// Added under the sqrt of the variance in the general-exponent path (EPS_SIGMA in _constants.py).
constexpr double kEpsSigma = 1e-8;

// Scalar options of one SSIM evaluation, in the accumulation type T (float, or double for fp64 input).
template <typename T>
struct SsimParams {
  T c1;                  // (k1 * data_range)^2, stabilises the luminance term l
  T c2;                  // (k2 * data_range)^2, stabilises contrast c; c3 = c2 / 2 stabilises s
  T alpha, beta, gamma;  // exponents of l, c, s
  bool closed_form;      // beta = gamma = 1, alpha 0 or 1: S = (A1 / B1)^alpha A2 / B2, no square root
  bool luminance;        // alpha != 0: the closed form's A1 / B1 factor is present
  bool clamp;            // per-pixel loss m = (1 - S) / 2 clamped to [0, 1], gradient 0 where clamped
  T eps_sigma;           // kEpsSigma: sigma = sqrt(max(var, 0) + eps_sigma) in the general path
};

// ---------------------------------------------------------------------------------------------------
// Window and padding
// ---------------------------------------------------------------------------------------------------

// Reflect padding as an index map (d c b | a b c d), defined for every n >= 1 and every i, so planes
// smaller than the window work: fold(i, n) = 0 if n = 1, else with p = 2(n - 1): i = |i| mod p, then
// i if i < n else p - i.
SSIMKD_HD int64_t fold_reflect(int64_t i, int64_t n) {
  if (i >= 0 && i < n) return i;  // the common case, without a division
  if (n == 1) return 0;
  const int64_t period = 2 * (n - 1);
  i = (i < 0 ? -i : i) % period;
  return i < n ? i : period - i;
}

// Source index of position i of a plane of size n, or -1 where the padded value is 0 (zero padding
// outside the plane; valid padding never reads outside for an output it produces).
SSIMKD_HD int64_t source_index(int64_t i, int64_t n, int padding) {
  if (padding == kReflect) return fold_reflect(i, n);
  return (i >= 0 && i < n) ? i : -1;
}

// Whether window centre p (plane coordinates) produces an output: every p of the plane, except for
// valid padding, where the window must lie inside: radius <= p < n - radius.
SSIMKD_HD bool is_output(int64_t p, int64_t n, int radius, int padding) {
  if (padding == kValid) return p >= radius && p < n - radius;
  return p >= 0 && p < n;
}

// One axis of the TRUE transpose of the padded blur: the weight with which output centre p feeds
// input q, i.e. sum over taps k with source_index(p + k) == q of g[k]. For zero and valid padding
// this is g[q - p]; for reflect it also collects the taps that the fold maps onto q (border rows and
// planes smaller than the window). Nonzero only for |p - q| <= radius. `taps` is anything indexable
// whose elements convert to T: the CUDA kernels pass their parameter's double taps, as a local array
// indexed at run time would live in local memory.
template <typename T, typename Taps>
SSIMKD_HD T transposed_tap(int64_t q, int64_t p, int64_t n, int radius, int padding, const Taps& taps) {
  if (!is_output(p, n, radius, padding)) return T(0);
  const int64_t offset = q - p;
  if (p - radius >= 0 && p + radius < n) {  // window inside the plane: no fold
    return (offset >= -radius && offset <= radius) ? T(taps[offset + radius]) : T(0);
  }
  T weight = T(0);
  for (int k = -radius; k <= radius; ++k) {
    if (source_index(p + k, n, padding) == q) weight += T(taps[k + radius]);
  }
  return weight;
}

// Gaussian taps g[0..window-1] for offsets -r..r, normalised to sum 1, computed in double.
template <typename T>
inline void gaussian_taps(int window, double sigma, T* taps) {
  const int radius = window / 2;
  double values[kMaxWindow];
  double sum = 0.0;
  for (int k = 0; k < window; ++k) {
    const double offset = double(k - radius);
    values[k] = std::exp(-(offset * offset) / (2.0 * sigma * sigma));
    sum += values[k];
  }
  for (int k = 0; k < window; ++k) taps[k] = T(values[k] / sum);
}

// ---------------------------------------------------------------------------------------------------
// SSIM terms and their partials
// ---------------------------------------------------------------------------------------------------

// Local statistics at one window centre, formed from the five blurred maps.
template <typename T>
struct Moments {
  T mu_x, mu_y, var_x, var_y, cov_xy;
};

// Statistics from the blurs of x' = x - cx and y' = y - cy, where cx, cy are constants (a tile's
// centring shift; SPEC section 2 holds for any shift, as variance and covariance do not change).
// Centring keeps var = W(x'^2) - (W x')^2 from cancelling catastrophically in float32 when the local
// mean is large next to the local spread, and shrinks the terms of the gradient the same way.
template <typename T>
SSIMKD_HD Moments<T> moments_from_blurred(T blur_x, T blur_y, T blur_xx, T blur_yy, T blur_xy, T cx, T cy) {
  return {blur_x + cx, blur_y + cy, blur_xx - blur_x * blur_x, blur_yy - blur_y * blur_y, blur_xy - blur_x * blur_y};
}

// SSIM and its partials with respect to the five statistics (the moments held independent).
template <typename T>
struct SsimPartials {
  T S;
  T dS_dmu_x, dS_dmu_y, dS_dvar_x, dS_dvar_y, dS_dcov;
};

// v^e with e = 0 meaning "factor absent" (value 1, derivative 0) and e = 1 exact.
template <typename T>
SSIMKD_HD void power_and_derivative(T v, T e, T* value, T* derivative) {
  if (e == T(0)) {
    *value = T(1);
    *derivative = T(0);
  } else if (e == T(1)) {
    *value = v;
    *derivative = T(1);
  } else {
    *value = std::pow(v, e);
    *derivative = e * std::pow(v, e - T(1));
  }
}

// Closed forms, for beta = gamma = 1: with C3 = C2 / 2 and raw variances in c's denominator, c s =
// A2 / B2 exactly, whatever the square roots and the clamp of the general path give (their partials
// cancel too), so S = A1 A2 / (B1 B2) for alpha = 1 (the default) and S = A2 / B2 for alpha = 0
// (MS-SSIM's contrast-structure levels). Partials written without dividing by A1 or A2, which can be
// exactly 0 for signed, un-normalised features.
template <typename T>
SSIMKD_HD T ssim_closed_form(const Moments<T>& m, const SsimParams<T>& p) {
  const T A2 = T(2) * m.cov_xy + p.c2;
  const T B2 = m.var_x + m.var_y + p.c2;
  if (!p.luminance) return A2 / B2;
  const T A1 = T(2) * m.mu_x * m.mu_y + p.c1;
  const T B1 = m.mu_x * m.mu_x + m.mu_y * m.mu_y + p.c1;
  return (A1 * A2) / (B1 * B2);
}

template <typename T>
SSIMKD_HD SsimPartials<T> ssim_partials_closed_form(const Moments<T>& m, const SsimParams<T>& p) {
  SsimPartials<T> out;
  const T A2 = T(2) * m.cov_xy + p.c2;
  const T B2 = m.var_x + m.var_y + p.c2;
  if (!p.luminance) {
    const T inv_B2 = T(1) / B2;
    out.S = A2 * inv_B2;
    out.dS_dmu_x = T(0);
    out.dS_dmu_y = T(0);
    out.dS_dvar_x = -out.S * inv_B2;
    out.dS_dvar_y = out.dS_dvar_x;
    out.dS_dcov = T(2) * inv_B2;
    return out;
  }
  const T A1 = T(2) * m.mu_x * m.mu_y + p.c1;
  const T B1 = m.mu_x * m.mu_x + m.mu_y * m.mu_y + p.c1;
  const T inv_B1B2 = T(1) / (B1 * B2);
  out.S = A1 * A2 * inv_B1B2;
  out.dS_dmu_x = T(2) * m.mu_y * A2 * inv_B1B2 - T(2) * m.mu_x * out.S / B1;
  out.dS_dmu_y = T(2) * m.mu_x * A2 * inv_B1B2 - T(2) * m.mu_y * out.S / B1;
  out.dS_dvar_x = -out.S / B2;
  out.dS_dvar_y = out.dS_dvar_x;
  out.dS_dcov = T(2) * A1 * inv_B1B2;
  return out;
}

// General exponents: l = A1 / B1, c = (2 sx sy + C2) / B2, s = (cov + C3) / (sx sy + C3), with
// sigma = sqrt(max(var, 0) + eps); d max(var, 0) / d var = [var >= 0], as torch.clamp. Exponents with
// a closed form never come here (ssim_partials), but would agree with it up to rounding.
template <typename T>
SSIMKD_HD SsimPartials<T> ssim_partials_general(const Moments<T>& m, const SsimParams<T>& p) {
  SsimPartials<T> out;
  const T A1 = T(2) * m.mu_x * m.mu_y + p.c1;
  const T B1 = m.mu_x * m.mu_x + m.mu_y * m.mu_y + p.c1;
  const T B2 = m.var_x + m.var_y + p.c2;
  const T c3 = p.c2 / T(2);
  const T sigma_x = std::sqrt((m.var_x > T(0) ? m.var_x : T(0)) + p.eps_sigma);
  const T sigma_y = std::sqrt((m.var_y > T(0) ? m.var_y : T(0)) + p.eps_sigma);
  const T dsigma_x = m.var_x >= T(0) ? T(0.5) / sigma_x : T(0);  // d sigma_x / d var_x
  const T dsigma_y = m.var_y >= T(0) ? T(0.5) / sigma_y : T(0);
  const T sxy = sigma_x * sigma_y;

  const T l = A1 / B1;
  const T c = (T(2) * sxy + p.c2) / B2;
  const T s = (m.cov_xy + c3) / (sxy + c3);
  const T dl_dmu_x = (T(2) * m.mu_y - T(2) * m.mu_x * l) / B1;
  const T dl_dmu_y = (T(2) * m.mu_x - T(2) * m.mu_y * l) / B1;
  const T dc_dvar_x = (T(2) * sigma_y * dsigma_x - c) / B2;
  const T dc_dvar_y = (T(2) * sigma_x * dsigma_y - c) / B2;
  const T ds_dvar_x = -s * sigma_y * dsigma_x / (sxy + c3);
  const T ds_dvar_y = -s * sigma_x * dsigma_y / (sxy + c3);
  const T ds_dcov = T(1) / (sxy + c3);

  T L, dL, Cc, dC, Ss, dSs;
  power_and_derivative(l, p.alpha, &L, &dL);
  power_and_derivative(c, p.beta, &Cc, &dC);
  power_and_derivative(s, p.gamma, &Ss, &dSs);
  out.S = L * Cc * Ss;
  out.dS_dmu_x = dL * dl_dmu_x * Cc * Ss;
  out.dS_dmu_y = dL * dl_dmu_y * Cc * Ss;
  out.dS_dvar_x = L * (dC * dc_dvar_x * Ss + Cc * dSs * ds_dvar_x);
  out.dS_dvar_y = L * (dC * dc_dvar_y * Ss + Cc * dSs * ds_dvar_y);
  out.dS_dcov = L * Cc * dSs * ds_dcov;
  return out;
}

template <typename T>
SSIMKD_HD SsimPartials<T> ssim_partials(const Moments<T>& m, const SsimParams<T>& p) {
  return p.closed_form ? ssim_partials_closed_form(m, p) : ssim_partials_general(m, p);
}

template <typename T>
SSIMKD_HD T ssim_value(const Moments<T>& m, const SsimParams<T>& p) {
  return p.closed_form ? ssim_closed_form(m, p) : ssim_partials_general(m, p).S;
}

// c ? a : b. The CPU op's SIMD vectors overload it lane by lane (ssim_cpu.cpp), so the functions
// below that choose with it, like the branch-free ones above, serve scalars and vectors alike.
template <typename T>
SSIMKD_HD T where(bool c, T a, T b) {
  return c ? a : b;
}

// Per-pixel loss m = (1 - S) / 2, clamped to [0, 1] when asked. NaN stays NaN (comparisons are
// false for NaN; std::min/max would drop it).
template <typename T>
SSIMKD_HD T pixel_loss(T S, bool clamp) {
  const T m = (T(1) - S) * T(0.5);
  if (!clamp) return m;
  return where(m < T(0), T(0), where(m > T(1), T(1), m));
}

// d m / d S: -1/2, or 0 where the clamp is active (torch.clamp passes the gradient on the bounds).
template <typename T>
SSIMKD_HD T pixel_loss_grad(T S, bool clamp) {
  if (!clamp) return T(-0.5);
  const T m = (T(1) - S) * T(0.5);
  return where(m >= T(0) && m <= T(1), T(-0.5), T(0));
}

// The maps the backward blurs back with W^T (SPEC section 2), for d = dL/dS at this centre:
//   a_x = d (dS/dmu_x - 2 mu'_x dS/dvar_x - mu'_y dS/dcov), b_x = d dS/dvar_x, c = d dS/dcov,
//   and a_y, b_y with x and y swapped. Then dL/dx' = W^T a_x + 2 x' W^T b_x + y' W^T c, where
//   x' = x - cx is the centred input and mu'_x = W x' its blur (mu'_x = mu_x without centring).
template <typename T>
struct BackwardCoeffs {
  T a_x, b_x, a_y, b_y, c;
};

template <typename T>
SSIMKD_HD BackwardCoeffs<T> backward_coeffs(const SsimPartials<T>& g, T d, T centred_mu_x, T centred_mu_y) {
  BackwardCoeffs<T> out;
  out.c = d * g.dS_dcov;
  out.b_x = d * g.dS_dvar_x;
  out.b_y = d * g.dS_dvar_y;
  out.a_x = d * g.dS_dmu_x - T(2) * centred_mu_x * out.b_x - centred_mu_y * out.c;
  out.a_y = d * g.dS_dmu_y - T(2) * centred_mu_y * out.b_y - centred_mu_x * out.c;
  return out;
}

}  // namespace ssimkd
