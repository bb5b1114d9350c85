// C++ test of csrc/ssim_math.h, on the host, in double:
//  - every SSIM partial against central finite differences, default and general exponents;
//  - the backward coefficients against finite differences of S through the raw moments;
//  - fold_reflect against the rule's definition, and transposed_tap against the explicit transpose of
//    the padded 1-D blur operator, for every padding and plane sizes 1..24 (smaller than the window too).
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "ssim_math.h"

using namespace ssimkd;

namespace {

int failures = 0;

void expect_near(double got, double want, double tol, const char* what, int index) {
  const double err = std::fabs(got - want);
  if (!(err <= tol * (1.0 + std::fabs(want)))) {
    std::printf("FAIL %s [%d]: got %.12g want %.12g (err %.3g)\n", what, index, got, want, err);
    ++failures;
  }
}

SsimParams<double> params(double a, double b, double g) {
  SsimParams<double> p;
  p.c1 = 1e-4;
  p.c2 = 9e-4;
  p.alpha = a;
  p.beta = b;
  p.gamma = g;
  p.closed_form = b == 1 && g == 1 && (a == 0 || a == 1);
  p.luminance = a != 0;
  p.clamp = true;
  p.eps_sigma = kEpsSigma;
  return p;
}

void test_partials() {
  std::mt19937 rng(7);
  std::uniform_real_distribution<double> mu(0.05, 0.95), var(0.002, 0.1), corr(-0.9, 0.9);
  const double exps[][3] = {{1, 1, 1}, {0, 0, 1}, {0, 1, 1}, {0.5, 1.0, 2.0}, {2, 0.5, 1}};
  int index = 0;
  for (const auto& e : exps) {
    const SsimParams<double> p = params(e[0], e[1], e[2]);
    for (int trial = 0; trial < 200; ++trial, ++index) {
      Moments<double> m{mu(rng), mu(rng), var(rng), var(rng), 0.0};
      m.cov_xy = corr(rng) * std::sqrt(m.var_x * m.var_y);
      const SsimPartials<double> g = ssim_partials(m, p);
      expect_near(g.S, ssim_value(m, p), 1e-12, "S", index);
      const double h = 1e-6;
      double* fields[] = {&m.mu_x, &m.mu_y, &m.var_x, &m.var_y, &m.cov_xy};
      const double analytic[] = {g.dS_dmu_x, g.dS_dmu_y, g.dS_dvar_x, g.dS_dvar_y, g.dS_dcov};
      for (int f = 0; f < 5; ++f) {
        const double keep = *fields[f];
        *fields[f] = keep + h;
        const double up = ssim_value(m, p);
        *fields[f] = keep - h;
        const double down = ssim_value(m, p);
        *fields[f] = keep;
        expect_near(analytic[f], (up - down) / (2 * h), 1e-6, "dS", index * 5 + f);
      }
    }
  }
}

// The closed forms (alpha 0 or 1, beta = gamma = 1) equal the general path's l^alpha c s, values and
// partials, also where rounding left a variance negative (the general path's clamp).
void test_closed_forms() {
  std::mt19937 rng(11);
  std::uniform_real_distribution<double> mu(-0.5, 0.95), var(-1e-9, 0.1), corr(-0.9, 0.9);
  int index = 0;
  for (double alpha : {0.0, 1.0}) {
    const SsimParams<double> closed = params(alpha, 1, 1);
    SsimParams<double> general = closed;
    general.closed_form = false;
    for (int trial = 0; trial < 200; ++trial, ++index) {
      Moments<double> m{mu(rng), mu(rng), var(rng), var(rng), 0.0};
      m.cov_xy = corr(rng) * std::sqrt(std::fabs(m.var_x * m.var_y));
      const SsimPartials<double> a = ssim_partials(m, closed), b = ssim_partials(m, general);
      const double got[] = {a.S, a.dS_dmu_x, a.dS_dmu_y, a.dS_dvar_x, a.dS_dvar_y, a.dS_dcov};
      const double want[] = {b.S, b.dS_dmu_x, b.dS_dmu_y, b.dS_dvar_x, b.dS_dvar_y, b.dS_dcov};
      for (int f = 0; f < 6; ++f) expect_near(got[f], want[f], 1e-9, "closed form", index * 6 + f);
      expect_near(ssim_value(m, closed), b.S, 1e-12, "closed form S", index);
    }
  }
}

// S as a function of one pixel's raw values through the moments of a single-tap "blur" (W = identity
// on a 1-pixel plane): the coefficients must give dS/dx = a_x + 2 x' b_x + y' c for any centring shift.
void test_backward_coeffs() {
  const SsimParams<double> p = params(1, 1, 1);
  // Moments of a 2-pixel plane with weights (w, 1 - w), so var and cov are not zero.
  const double w = 0.3, x1 = 0.2, y1 = 0.7, shift_x = 0.45, shift_y = -0.2;
  auto moments = [&](double x0, double y0) {
    const double bx = w * (x0 - shift_x) + (1 - w) * (x1 - shift_x);
    const double by = w * (y0 - shift_y) + (1 - w) * (y1 - shift_y);
    const double bxx = w * (x0 - shift_x) * (x0 - shift_x) + (1 - w) * (x1 - shift_x) * (x1 - shift_x);
    const double byy = w * (y0 - shift_y) * (y0 - shift_y) + (1 - w) * (y1 - shift_y) * (y1 - shift_y);
    const double bxy = w * (x0 - shift_x) * (y0 - shift_y) + (1 - w) * (x1 - shift_x) * (y1 - shift_y);
    return std::vector<double>{bx, by, bxx, byy, bxy};
  };
  const double x0 = 0.55, y0 = 0.4;
  const auto b = moments(x0, y0);
  const Moments<double> m = moments_from_blurred(b[0], b[1], b[2], b[3], b[4], shift_x, shift_y);
  const BackwardCoeffs<double> bc = backward_coeffs(ssim_partials(m, p), 1.0, b[0], b[1]);
  // W^T of the single output at this pixel is w.
  const double dx = w * bc.a_x + 2 * (x0 - shift_x) * w * bc.b_x + (y0 - shift_y) * w * bc.c;
  const double dy = w * bc.a_y + 2 * (y0 - shift_y) * w * bc.b_y + (x0 - shift_x) * w * bc.c;
  const double h = 1e-6;
  auto S = [&](double xa, double ya) {
    const auto v = moments(xa, ya);
    return ssim_value(moments_from_blurred(v[0], v[1], v[2], v[3], v[4], shift_x, shift_y), p);
  };
  expect_near(dx, (S(x0 + h, y0) - S(x0 - h, y0)) / (2 * h), 1e-6, "dS/dx", 0);
  expect_near(dy, (S(x0, y0 + h) - S(x0, y0 - h)) / (2 * h), 1e-6, "dS/dy", 0);
}

void test_fold_and_transpose() {
  for (int window = kMinWindow; window <= kMaxWindow; window += 2) {
    const int r = window / 2;
    double taps[kMaxWindow];
    gaussian_taps(window, 1.5, taps);
    for (int n = 1; n <= 24; ++n) {
      for (int i = -3 * r; i < n + 3 * r; ++i) {
        const int64_t f = fold_reflect(i, n);
        if (f < 0 || f >= n) {
          std::printf("FAIL fold_reflect(%d, %d) = %lld\n", i, n, (long long)f);
          ++failures;
        }
        if (i >= 0 && i < n && f != i) ++failures;
      }
      for (int padding : {int(kReflect), int(kZero), int(kValid)}) {
        if (padding == kValid && n < window) continue;
        // Forward operator B[p][q]: weight of input q in output centre p.
        std::vector<double> B(size_t(n) * n, 0.0);
        for (int p = 0; p < n; ++p) {
          if (!is_output(p, n, r, padding)) continue;
          for (int k = -r; k <= r; ++k) {
            const int64_t q = source_index(p + k, n, padding);
            if (q >= 0) B[size_t(p) * n + q] += taps[k + r];
          }
        }
        for (int q = 0; q < n; ++q)
          for (int p = 0; p < n; ++p) {
            const double t = (p - q >= -r && p - q <= r) ? transposed_tap<double>(q, p, n, r, padding, taps) : 0.0;
            expect_near(t, B[size_t(p) * n + q], 1e-15, "transposed_tap", (window * 100 + n) * 10 + padding);
          }
      }
    }
  }
}

}  // namespace

int main() {
  test_partials();
  test_closed_forms();
  test_backward_coeffs();
  test_fold_and_transpose();
  if (failures) {
    std::printf("%d failures\n", failures);
    return 1;
  }
  std::printf("ssim_math: all checks passed\n");
  return 0;
}
