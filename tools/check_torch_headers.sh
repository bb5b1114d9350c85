#!/usr/bin/env bash
# Compiles every csrc/*.cpp and csrc/*.cu against another torch release's headers, without installing
# that torch: proof, before a GPU run, that the extension builds on a machine with that torch.
#
#   bash tools/check_torch_headers.sh [TORCH_VERSION]       # default 2.11.0 (the GPU machine's torch)
#
# The torch wheel (cp312, manylinux x86-64) is downloaded once, only its include/ folder is unpacked to
# $TORCH_HEADERS_CACHE/torch-<version>/include (default under ${TMPDIR:-/tmp}), and the wheel is deleted.
# Each source is compiled with -c (no link) with the build's own flags (ssimkd_kernels/_build.py) and the defines
# torch's extension builder adds: .cpp with the host compiler (both with and without SSIMKD_WITH_CUDA:
# the CUDA build and the CPU-only build), .cu with nvcc for $ARCH (default sm_90), whose ptxas report
# (registers, spills) is printed. Rerun it after csrc/ changes: it compiles whatever csrc holds.
#
# Environment: PYTHON (runs pip and reads the build recipe; default python3), CXX (default c++), NVCC (default
# nvcc), ARCH (default 90), PYTHON_INCLUDE (Python.h's folder; default: python3.12's if installed, else
# PYTHON's), JOBS (parallel compiles; default 1: the checks are for correctness, not speed),
# LOG_DIR (default $TORCH_HEADERS_CACHE/logs-<version>).
# Exit status: 0 when every file compiles, 1 when any fails (the failing files and their logs are named).
set -uo pipefail
cd "$(dirname "$0")/.."

VERSION=${1:-2.11.0}
PYTHON=${PYTHON:-python3}
CXX=${CXX:-c++}
NVCC=${NVCC:-nvcc}
ARCH=${ARCH:-90}
JOBS=${JOBS:-1}
CACHE=${TORCH_HEADERS_CACHE:-${TMPDIR:-/tmp}/ssimkd-torch-headers}
HEADERS="$CACHE/torch-$VERSION"
LOG_DIR=${LOG_DIR:-$CACHE/logs-$VERSION}
mkdir -p "$CACHE" "$LOG_DIR"

# ---- 1. torch's headers: download the wheel, keep include/ only ---------------------------------------
if [ ! -f "$HEADERS/include/torch/library.h" ]; then
    wheel_dir=$(mktemp -d "$CACHE/wheel.XXXXXX")
    echo "downloading torch==$VERSION (cp312, manylinux x86-64) to unpack its headers"
    # --no-deps: only torch itself; the constraint file some machines set must not cap this version.
    if ! PIP_CONSTRAINT= "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
            --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
            --platform manylinux2014_x86_64 -d "$wheel_dir" "torch==$VERSION"; then
        echo "FAILED: pip could not download torch==$VERSION"
        rm -rf "$wheel_dir"
        exit 1
    fi
    wheel=$(ls "$wheel_dir"/torch-*.whl)
    echo "unpacking torch/include/ of $(basename "$wheel") ($(du -h "$wheel" | cut -f1))"
    rm -rf "$HEADERS" && mkdir -p "$HEADERS"
    unzip -q "$wheel" 'torch/include/*' -d "$HEADERS/unpacked"
    mv "$HEADERS/unpacked/torch/include" "$HEADERS/include"
    rm -rf "$HEADERS/unpacked" "$wheel_dir"
fi
INC="$HEADERS/include"

# ---- 2. flags: the build recipe's (ssimkd_kernels/_build.py, which setup.py uses), plus torch's --------
read_build_flags() {  # the list $1 of the recipe, space-separated (the recipe is stdlib-only: no torch needed)
    "$PYTHON" - "$1" <<'EOF'
import importlib.util, sys
spec = importlib.util.spec_from_file_location("_ssimkd_build", "ssimkd_kernels/_build.py")
recipe = importlib.util.module_from_spec(spec)
spec.loader.exec_module(recipe)
print(" ".join(getattr(recipe, sys.argv[1])))
EOF
}
CXX_FLAGS=$(read_build_flags CXX_FLAGS) || exit 1
NVCC_FLAGS=$(read_build_flags NVCC_FLAGS) || exit 1
if [ -z "${PYTHON_INCLUDE:-}" ]; then
    PYTHON_INCLUDE=$( (python3.12 -c 'import sysconfig; print(sysconfig.get_paths()["include"])' 2>/dev/null) \
                      || "$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
fi
CUDA_INCLUDE=$(dirname "$(dirname "$(readlink -f "$(command -v "$NVCC" 2>/dev/null || echo /nonexistent)")")")/include
# The wrapper-script case (nvcc on PATH is `exec <toolkit>/bin/nvcc`): ask nvcc for its include folder.
if [ ! -f "$CUDA_INCLUDE/cuda_runtime.h" ] && command -v "$NVCC" >/dev/null; then
    CUDA_INCLUDE=$("$NVCC" --dryrun -x cu -c /dev/null -o /dev/null 2>&1 | sed -n 's/.*INCLUDES="-I\([^"]*\)".*/\1/p' | head -1 | sed 's:/*$::')
fi
# What torch's builder adds to every extension source (torch.utils.cpp_extension).
TORCH_DEFINES="-DTORCH_API_INCLUDE_EXTENSION_H -DTORCH_EXTENSION_NAME=_C -D_GLIBCXX_USE_CXX11_ABI=1"
INCLUDES="-I$INC -I$INC/torch/csrc/api/include -I$PYTHON_INCLUDE -I$CUDA_INCLUDE"
NVCC_TORCH_FLAGS="-D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__ --expt-relaxed-constexpr"

echo "torch $VERSION headers: $INC"
echo "host compiler: $($CXX --version | head -1); flags: $CXX_FLAGS"
if command -v "$NVCC" >/dev/null; then
    echo "nvcc: $("$NVCC" --version | tail -2 | head -1); flags: $NVCC_FLAGS -arch=sm_$ARCH"
else
    echo "nvcc: not found (the .cu files cannot be checked here)"
fi
echo "Python.h: $PYTHON_INCLUDE"

# ptxas_table LOG: one line per kernel of nvcc's -Xptxas -v report (registers, stack frame, spills).
ptxas_table() {
    "$PYTHON" - "$1" <<'EOF'
import re, shutil, subprocess, sys
rows, name = [], None
for line in open(sys.argv[1]).read().splitlines():
    if m := re.search(r"Compiling entry function '([^']+)'", line):
        name, stack, spill = m.group(1), 0, 0
    elif name and (m := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)):
        stack, spill = int(m.group(1)), int(m.group(2)) + int(m.group(3))
    elif name and (m := re.search(r"Used (\d+) registers", line)):
        rows.append([name, int(m.group(1)), stack, spill])
        name = None
if shutil.which("c++filt") and rows:
    out = subprocess.run(["c++filt"], input="\n".join(r[0] for r in rows), capture_output=True, text=True).stdout
    for row, demangled in zip(rows, out.splitlines()):
        row[0] = re.sub(r"\(.*", "", demangled).replace("ssimkd::cuda_detail::", "")
print(f"        {len(rows)} kernels: registers up to {max((r[1] for r in rows), default=0)}, "
      f"{sum(r[3] for r in rows)} spill bytes in all, {sum(r[2] > 0 for r in rows)} with a stack frame")
for name, regs, stack, spill in sorted(rows):
    print(f"        {name:<58.58} {regs:>4} registers {stack:>4} B stack {spill:>4} B spills")
EOF
}

# ---- 3. compile each source ---------------------------------------------------------------------
compile_one() {  # $1 = source, $2 = variant (cuda | cpu-only)
    local src=$1 variant=$2 name log start rc
    name=$(basename "$src")
    log="$LOG_DIR/$name.$variant.log"
    start=$(date +%s)
    case "$src" in
        *.cu)
            # shellcheck disable=SC2086
            "$NVCC" -c $NVCC_FLAGS $NVCC_TORCH_FLAGS -arch=sm_$ARCH -Xptxas -v --compiler-options -fPIC \
                -DSSIMKD_WITH_CUDA $TORCH_DEFINES $INCLUDES "$src" -o /dev/null >"$log" 2>&1 ;;
        *)
            local define=""
            [ "$variant" = cuda ] && define="-DSSIMKD_WITH_CUDA"
            # shellcheck disable=SC2086
            "$CXX" -c $CXX_FLAGS -fPIC $define $TORCH_DEFINES $INCLUDES "$src" -o /dev/null >"$log" 2>&1 ;;
    esac
    rc=$?
    if [ $rc -eq 0 ]; then
        echo "ok      $name ($variant, $(( $(date +%s) - start )) s)"
    else
        echo "FAILED  $name ($variant, $(( $(date +%s) - start )) s): $log"
        grep -m 8 -E "error|Error" "$log" | sed 's/^/        /'
    fi
    if [[ "$src" == *.cu ]] && [ $rc -eq 0 ]; then ptxas_table "$log"; fi
    return $rc
}

sources=()
for src in csrc/*.cpp csrc/*.cu; do [ -f "$src" ] && sources+=("$src"); done
jobs_list=()
for src in "${sources[@]}"; do
    case "$src" in
        *.cu) command -v "$NVCC" >/dev/null && jobs_list+=("$src cuda") ;;
        *) jobs_list+=("$src cuda")
           grep -q SSIMKD_WITH_CUDA "$src" && jobs_list+=("$src cpu-only") ;;
    esac
done

failed=0
status_dir=$(mktemp -d)
i=0
for job in "${jobs_list[@]}"; do
    # shellcheck disable=SC2086
    ( compile_one $job > "$status_dir/$i.out"; echo $? > "$status_dir/$i.rc" ) &
    i=$((i + 1))
    while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n; done
done
wait
for ((k = 0; k < i; k++)); do
    cat "$status_dir/$k.out"
    [ "$(cat "$status_dir/$k.rc")" = 0 ] || failed=$((failed + 1))
done
rm -rf "$status_dir"
if ! command -v "$NVCC" >/dev/null; then echo "note: the .cu files were not compiled (no nvcc)"; fi
echo "$(( i - failed )) of $i compiles passed against torch $VERSION's headers (logs: $LOG_DIR)"
[ $failed -eq 0 ]
