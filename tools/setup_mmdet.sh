#!/usr/bin/env bash
# Installs the mmdetection stack of requirements/mmdet.txt into the project's venv (`make setup-mmdet`).
#
# mmengine and mmdet are plain wheels. mmcv 2.1.0 (the newest mmcv that mmdet 3.3.0 accepts) ships no
# wheel for torch 2.14, so it is built here from its sdist, with its compiled ops, for the CPU:
#   - torch 2.14's headers need C++20, and mmcv's setup.py hardcodes -std=c++14/-std=c++17: the
#     unpacked copy in build/mmcv (git-ignored) is patched with sed; nothing of mmcv enters the repo;
#   - CUDA ops are never compiled: FORCE_CUDA=0, and an empty CUDA_VISIBLE_DEVICES, so that a CUDA
#     build of torch on a GPU machine does not make mmcv pick CUDAExtension;
#   - MAX_JOBS=2 (the CI machines' cores; override from the environment), -g0 (no debug info: a faster
#     build and a much smaller library).
# The wheel is cached outside the work tree (SSIMKD_WHEEL_CACHE, default ~/.cache/ssimkd-kernels/wheels,
# one folder per torch version), so a fresh clone on the same machine installs it without a rebuild.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PY="$VENV/bin/python"
PIP="$PY -m pip"
BUILD=build/mmcv
REQS=requirements/mmdet.txt

pin() { sed -n "s/^\($1[=<>!][^ #]*\).*/\1/p" "$REQS"; }
mmcv_version=$(pin mmcv | sed 's/^mmcv==//')
torch_version=$("$PY" -c 'import torch; print(torch.__version__.split("+")[0])')
cache="${SSIMKD_WHEEL_CACHE:-${XDG_CACHE_HOME:-${HOME:-$PWD/build}/.cache}/ssimkd-kernels/wheels}/torch-$torch_version"

if "$PY" - "$mmcv_version" "$(pin mmdet)" "$(pin mmengine)" 2>/dev/null <<'PYEOF'
import sys
from importlib.metadata import version
import mmcv.ops, mmdet  # noqa: E401,F401  (mmcv.ops loads the compiled ops)
wanted = {"mmcv": sys.argv[1], "mmdet": sys.argv[2].split("==")[1], "mmengine": sys.argv[3].split("==")[1]}
sys.exit(any(version(name) != v for name, v in wanted.items()))
PYEOF
then
    echo "setup-mmdet: mmengine, mmcv (with its ops) and mmdet are installed"
    exit 0
fi

# setuptools < 81 first: mmcv's setup.py needs its pkg_resources (so does mmengine at run time).
$PIP install --quiet "$(pin setuptools)" "$(pin mmengine)"

wheel=$(ls "$cache"/mmcv-"$mmcv_version"-*.whl 2>/dev/null | head -n 1 || true)
if [ -z "$wheel" ]; then
    echo "setup-mmdet: building mmcv $mmcv_version from source (CPU ops, C++20), once per torch version"
    start=$(date +%s)
    rm -rf "$BUILD"
    mkdir -p "$BUILD" "$cache"
    export MMCV_WITH_OPS=1 FORCE_CUDA=0 CUDA_VISIBLE_DEVICES="" MAX_JOBS="${MAX_JOBS:-2}"
    export CFLAGS="${CFLAGS:-} -g0" CXXFLAGS="${CXXFLAGS:-} -g0"
    $PIP download --quiet --no-deps --no-binary :all: --no-build-isolation -d "$BUILD" "mmcv==$mmcv_version"
    tar -xzf "$BUILD/mmcv-$mmcv_version.tar.gz" -C "$BUILD"
    src="$BUILD/mmcv-$mmcv_version"
    sed -i 's/-std=c++1[47]/-std=c++20/g' "$src/setup.py"
    grep -q -- "-std=c++20" "$src/setup.py" || { echo "setup-mmdet: could not patch mmcv's C++ standard" >&2; exit 1; }
    $PIP wheel --quiet --no-build-isolation --no-deps -w "$BUILD/dist" "$src"
    cp "$BUILD"/dist/mmcv-"$mmcv_version"-*.whl "$cache"/   # into the cache only once complete
    wheel=$(ls "$cache"/mmcv-"$mmcv_version"-*.whl | head -n 1)
    echo "setup-mmdet: built $(basename "$wheel") in $(( $(date +%s) - start )) s"
fi

# The built wheel first (so that pip never tries mmcv's sdist), then every pin and its dependencies.
$PIP install --quiet --no-deps "$wheel"
$PIP install --quiet -r "$REQS"
"$PY" -c 'import mmcv.ops, mmdet; print("setup-mmdet: mmcv", mmcv.__version__, "(ops loaded), mmdet", mmdet.__version__)'
