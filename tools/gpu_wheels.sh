#!/usr/bin/env bash
# Fetches into .whl/ (git-ignored) what the GPU self-test needs and a bare GPU machine lacks: cp312
# manylinux x86-64 wheels of the bench peers and the trainer's small dependencies, and fused-ssim's source
# (not published on PyPI; the self-test builds it there). tools/gpu_selftest.sh installs the wheels with
# `pip install --no-index --no-deps --target` and builds fused-ssim from the tarball.
#
#   bash tools/gpu_wheels.sh                      # fused-ssim cloned from its GitHub repository
#   FUSED_SSIM_SRC=<git dir, checkout or .tar.gz> bash tools/gpu_wheels.sh     # where there is no network to it
#
# The GPU machine (see the README's "GPU self-test") has Python 3.12 with torch, triton, torchvision,
# torchmetrics, scikit-image, hypothesis, pytest-xdist, pillow, matplotlib, tqdm and numpy. What travels
# with the working tree to it is limited to 64 MiB in all, so this script fails if .whl/ and the tree
# together pass WHEEL_BUDGET_MB (default 56: room for bench results committed later).
# Environment: PYTHON (runs pip; default python3).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
DEST=.whl
BUDGET_MB=${WHEEL_BUDGET_MB:-56}
# One version of each (two versions of one package stop the install there). Their own dependencies that
# the machine lacks are listed too: --no-deps fetches none.
WHEELS=(
    pytorch-msssim==1.0.0   # bench peer; test_reference's independent truth
    kornia==0.9.0           # bench peer
    kornia_rs==0.2.0        # kornia's compiled core
    fussim==0.3.15          # bench peer (a prebuilt CUDA extension: it may not load on another torch)
    tomli-w==1.2.0          # the trainer's config writer (bench_train_step imports the trainer)
    faster-coco-eval==1.8.0 # the trainer's mAP
)
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
FUSED_SSIM_REPO=https://github.com/rahul-goel/fused-ssim
# fused-ssim's build needs only these; its images and timing scripts stay behind.
FUSED_SSIM_EXCLUDE=(':(exclude)images' ':(exclude)tests')

mkdir -p "$DEST"
git check-ignore -q "$DEST/x.whl" || { echo "$DEST/ is not git-ignored: add /$DEST/ to .gitignore"; exit 1; }

# ---- wheels ------------------------------------------------------------------------------------------
for spec in "${WHEELS[@]}"; do
    name=${spec%%==*}
    file_prefix=$(echo "$name" | tr '-' '_')
    rm -f "$DEST/$file_prefix"-*.whl "$DEST/$name"-*.whl
    # The constraint file some machines set must not apply: these wheels are for another machine.
    PIP_CONSTRAINT= "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp "${PLATFORMS[@]}" -d "$DEST" "$spec"
done

# ---- fused-ssim's source ---------------------------------------------------------------------------
rm -f "$DEST"/fused-ssim-*.tar.gz
src=${FUSED_SSIM_SRC:-}
cleanup=""
if [ -z "$src" ]; then
    src=$(mktemp -d)
    cleanup=$src
    git clone --quiet --depth 1 "$FUSED_SSIM_REPO" "$src"
fi
if [ -f "$src" ]; then  # a tarball already
    cp "$src" "$DEST/fused-ssim-$(basename "$src" | sed 's/^fused-ssim-//; s/\.tar\.gz$//').tar.gz"
else
    if git -C "$src" rev-parse --git-dir >/dev/null 2>&1; then
        git_args=(-C "$src")
    else  # a bare repository (a mirror)
        git_args=(--git-dir "$src")
    fi
    rev=$(git "${git_args[@]}" rev-parse --short=12 HEAD)
    git "${git_args[@]}" archive --format=tar.gz --prefix=fused-ssim/ -o "$(pwd)/$DEST/fused-ssim-$rev.tar.gz" HEAD \
        -- . "${FUSED_SSIM_EXCLUDE[@]}"
fi
[ -n "$cleanup" ] && rm -rf "$cleanup"
grep -qx 'fused-ssim/setup.py' <(tar -tzf "$DEST"/fused-ssim-*.tar.gz) \
    || { echo "the fused-ssim tarball holds no fused-ssim/setup.py"; exit 1; }

# ---- sizes -----------------------------------------------------------------------------------------
echo "fetched into $DEST/:"
ls -l "$DEST" | awk 'NR > 1 {printf "  %8.2f MiB  %s\n", $5 / 1048576, $9}'
wheels_bytes=$(du -cb "$DEST"/* | tail -1 | cut -f1)
tree_bytes=$( (git ls-files -z; git ls-files -z --others --exclude-standard) | xargs -0 -r du -cb 2>/dev/null \
              | awk '$2 == "total" {s += $1} END {print s + 0}')
total_mb=$(( (wheels_bytes + tree_bytes + 1048575) / 1048576 ))
awk -v w="$wheels_bytes" -v t="$tree_bytes" -v all="$total_mb" -v budget="$BUDGET_MB" -v dest="$DEST" 'BEGIN {
    printf "%s: %.1f MiB; working tree: %.1f MiB; together %d MiB of the %d MiB allowed here (64 MiB travel)\n",
        dest, w / 1048576, t / 1048576, all, budget }'
[ "$total_mb" -le "$BUDGET_MB" ] || { echo "too large: drop a wheel or raise WHEEL_BUDGET_MB"; exit 1; }
