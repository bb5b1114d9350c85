"""Named constants of SSIM-KD, each with the reason it has its value (SPEC section 2).

Every backend takes these from here (Python) or from csrc/ssim_math.h (C++/CUDA), never retyped.
"""

# Gaussian window of the paper (and of Wang et al. 2004): 11 taps, sigma 1.5.
DEFAULT_WINDOW = 11
DEFAULT_SIGMA = 1.5
# The paper ablates the patch size; kernels specialise on the size, so it is bounded.
MIN_WINDOW = 3
MAX_WINDOW = 15

# Stabilisers of Wang et al.: C1 = (k1 R)^2, C2 = (k2 R)^2, C3 = C2 / 2.
DEFAULT_K1 = 0.01
DEFAULT_K2 = 0.03
DEFAULT_DATA_RANGE = 1.0

# Added to (max - min) in the min-max normalisation psi, so a constant plane maps to 0, not NaN.
NORM_EPS = 1e-6
# Added under the square root of the variance in the general-exponent path: keeps d sigma / d sigma^2
# finite (<= 1 / (2 sqrt(EPS_SIGMA)) = 5e3) on flat planes. Must equal kEpsSigma in csrc/ssim_math.h.
EPS_SIGMA = 1e-8

# Padding codes, mirrored by the Padding enum of csrc/ssim_math.h and the PADDING constexpr of the
# Triton kernels.
PADDING_CODES = {"reflect": 0, "zero": 1, "valid": 2}
NORMALIZE_MODES = ("sample", "level", "plane", "none")
# The (N, C, H, W) dims each min-max normalisation takes its min and max over.
NORMALIZE_DIMS = {"sample": (1, 2, 3), "level": (0, 1, 2, 3), "plane": (2, 3)}
BACKENDS = ("reference", "cpu", "triton", "cuda")
# ssim's reductions of the SSIM map: the mean, the sum, one mean per sample.
REDUCTIONS = ("mean", "sum", "none")
# How ssim_kd_loss treats a student level whose (H, W) differs from its teacher's: None = an error,
# "student" = resize the student to the teacher's size (bilinear).
RESIZE_MODES = (None, "student")

# Levels handled by one launch of a fused kernel; more levels run in several launches of this many.
# Bounded so the C++ level table (~330 B a level) fits in the classic 4 KiB of CUDA kernel parameters.
MAX_LEVELS_PER_LAUNCH = 8

# The oldest triton the Triton kernels run on: 3.0 and 3.1 (paired with torch 2.4 and 2.5) reject their
# non-constexpr tl.arange bounds. Older installs report the backend unavailable; "auto" then skips it.
MIN_TRITON_VERSION = (3, 2)

# MS-SSIM's weights of its five scales (Wang, Simoncelli & Bovik 2003), as pytorch-msssim and
# torchmetrics use them.
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
