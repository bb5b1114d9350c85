#!/usr/bin/env bash
# The project's GPU self-test: everything a GPU must prove, in one command of at most 8 minutes on a
# 16-core H100/H200 machine. Also the users' GPU self-test (README, "GPU self-test").
#
#   bash tools/gpu_selftest.sh                    # every step
#   bash tools/gpu_selftest.sh --steps test,bench # a subset (env always runs first: it sets up the wheels)
#   bash tools/gpu_selftest.sh --dry-run          # on a machine without a GPU: check, build, rehearse, plan
#
# Steps, in order, each stopped at its budget (the script then moves on):
#   env        nvidia-smi, clocks, driver, versions, copy bandwidth; installs .whl/ (tools/gpu_wheels.sh)
#   build      the extension against this torch, sm_90 only, MAX_JOBS = cores, in the background (its C++
#              CPU op is the long pole, minutes on one core), then moved in place; fused-ssim from its
#              source in .whl/ beside it; once built, the static kernel report (bench/kernel_report.py)
#   test       pytest: the triton backend on CUDA tensors while the extension builds (it needs none),
#              then the cuda backend; values, gradients, torch.compile fullgraph, hypothesis
#   sanitizer  compute-sanitizer memcheck, racecheck, initcheck, synccheck over tools/gpu_selftest_driver.py
#              fuzz, one process per tool and backend, all at once; meanwhile, without the sanitizer,
#              fwd+bwd above 2^31 elements and on non-default streams
#   bench      bench_ssim retinanet (fwd, fwd+bwd; float32, bfloat16; every candidate), image (fused-ssim's
#              case), bench_train_step at 800x1333 batch 2, ncu metrics of the fused kernels if time is left
# Results are written as they come: the summary (tools/gpu_selftest_summary.py: every GPU target with its
# figure, pass or fail) and the details tarball are rewritten after every step, so a cut run still returns
# what it measured. Output, at most 8 files: $OUT when set, else bench/results/gpu-selftest-<time>/
# (a --dry-run: a temporary folder):
#   selftest-summary.json  selftest.log  bench-retinanet.json (float32 and bfloat16)  bench-image-float32.json
#   bench-train-step.json  selftest-details.tar.gz (sanitizer logs, pytest junit, build logs, ncu CSV, kernel
#   report, env JSON)
#
# Environment: PYTHON (default python3), SELFTEST_TOTAL_S (default 480: the whole run's cap),
# SELFTEST_BUDGETS (e.g. "sanitizer=300,bench=240": other step budgets, for a longer rerun of a subset),
# SELFTEST_XDIST (pytest workers; default min(8, cores)).
set -uo pipefail  # no -e: a failed step is recorded and the next one runs
cd "$(dirname "$0")/.."
ROOT=$PWD

# ---- arguments -----------------------------------------------------------------------------------------
ALL_STEPS=(env build test sanitizer bench)
# Seconds per step on the GPU machine (16 cores), summing to the total cap. Each step's limit is its
# budget's share of the time left (see begin_step): unused time flows to the later steps. The build is
# the exception: it runs beside the test step (whose budget covers waiting for it), under its own limit.
declare -A BUDGET=([env]=20 [build]=240 [test]=230 [sanitizer]=85 [bench]=145)
DRY_RUN=0
STEPS=$(IFS=,; echo "${ALL_STEPS[*]}")
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY_RUN=1 ;;
        --steps) STEPS=$2; shift ;;
        --steps=*) STEPS=${1#--steps=} ;;
        -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown argument: $1 (see --help)"; exit 2 ;;
    esac
    shift
done
for s in ${STEPS//,/ }; do
    [ -n "${BUDGET[$s]:-}" ] || { echo "unknown step '$s': choose from ${ALL_STEPS[*]}"; exit 2; }
done
want() { [[ ",$STEPS," == *",$1,"* ]]; }

PY=${PYTHON:-python3}
CORES=$(nproc)
XDIST=${SELFTEST_XDIST:-$(( CORES < 8 ? CORES : 8 ))}
TOTAL=${SELFTEST_TOTAL_S:-480}
for kv in $(echo "${SELFTEST_BUDGETS:-}" | tr , " "); do
    [ -n "${BUDGET[${kv%%=*}]:-}" ] && [[ ${kv#*=} =~ ^[0-9]+$ ]] || { echo "SELFTEST_BUDGETS: bad entry '$kv'"; exit 2; }
    BUDGET[${kv%%=*}]=${kv#*=}
done
if [ $DRY_RUN = 1 ]; then
    # This machine is not the GPU machine: its budgets do not apply to a CPU-only rehearsal (a 2-core
    # build alone takes ~10 minutes), so the rehearsal gets generous fixed limits instead.
    TOTAL=${SELFTEST_TOTAL_S:-5400}
    BUDGET=([env]=120 [build]=2400 [test]=300 [sanitizer]=900 [bench]=1500)
fi

# ---- output ------------------------------------------------------------------------------------------
STAMP=$(date +%Y%m%d-%H%M%S)
if [ -n "${OUT:-}" ]; then
    RESULTS=$OUT
elif [ $DRY_RUN = 1 ]; then
    RESULTS=$(mktemp -d "${TMPDIR:-/tmp}/ssimkd-selftest-dry-run.XXXXXX")
else
    RESULTS=bench/results/gpu-selftest-$STAMP
fi
mkdir -p "$RESULTS"
RESULTS=$(cd "$RESULTS" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/ssimkd-selftest.XXXXXX")  # scratch: wheels, fused-ssim build, details
DETAILS=$WORK/details
mkdir -p "$DETAILS/sanitizer" "$WORK/bench"
exec > >(tee -a "$RESULTS/selftest.log") 2>&1
TEE_PID=$!
START=$(date +%s)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 MAX_JOBS=$CORES
# The build step builds the extension in place; no other process may start a first-use build of its own.
export SSIMKD_NO_JIT=1

say() { printf '\n=== [%4ds] %s\n' "$(( $(date +%s) - START ))" "$*"; }
left() { echo $(( TOTAL - ($(date +%s) - START) )); }
# record STEP STATUS RC SECONDS BUDGET [NOTE]: one JSON line per (sub)step for the summary.
record() {
    local note=${6:-}
    note=${note//\\/\/}; note=${note//\"/\'}
    printf '{"step": "%s", "status": "%s", "rc": %s, "seconds": %s, "budget_s": %s, "note": "%s"}\n' \
        "$1" "$2" "$3" "$4" "$5" "$note" >> "$WORK/steps.jsonl"
}
# timed NAME LIMIT CMD...: runs CMD under `timeout`, records it; returns CMD's status (124: cut).
# TIMED_SIGNAL=INT lets a program stop cleanly at its limit (pytest then still writes its report).
timed() {
    local name=$1 limit=$2 rc t0 t1 status
    shift 2
    if [ "$limit" -lt 5 ]; then
        echo "skip $name: no time left"
        record "$name" skipped 0 0 "$limit" "no time left"
        return 124
    fi
    t0=$(date +%s.%N)
    timeout -s "${TIMED_SIGNAL:-TERM}" -k 10 "$limit" "$@"
    rc=$?
    t1=$(date +%s.%N)
    case $rc in 0) status=ok ;; 124|137) status=timeout ;; *) status=failed ;; esac
    # A program stopped by SIGINT may exit with its own code; the clock says whether the limit came.
    [ $status = failed ] && [ "$(awk -v a="$t0" -v b="$t1" -v l="$limit" 'BEGIN {print (b - a >= l)}')" = 1 ] && status=timeout
    record "$name" "$status" "$rc" "$(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.1f", b - a}')" "$limit"
    [ $status = timeout ] && echo "!!! $name stopped at its limit of $limit s"
    return $rc
}
# begin_step NAME sets STEP_LIMIT and STEP_DEADLINE: the step's budget's share of the time left, shared
# with the selected steps after it in proportion to their budgets. A step that ends early so leaves its
# time to the later ones, and one that takes all of its time takes none of theirs. (Dry run: the budget.)
STEP_LIMIT=0
STEP_DEADLINE=$START
begin_step() {
    local weights=0 counting=0 rest s
    for s in "${ALL_STEPS[@]}"; do
        [ "$s" = "$1" ] && counting=1
        [ "$s" = build ] && [ "$1" != build ] && continue  # it runs beside the others, not before them
        if [ $counting = 1 ] && { [ "$s" = env ] || want "$s"; }; then weights=$(( weights + BUDGET[$s] )); fi
    done
    rest=$(left)
    STEP_LIMIT=$(( DRY_RUN == 1 ? BUDGET[$1] : rest * BUDGET[$1] / weights ))
    [ $STEP_LIMIT -gt $rest ] && STEP_LIMIT=$rest
    [ $STEP_LIMIT -lt 0 ] && STEP_LIMIT=0
    STEP_DEADLINE=$(( $(date +%s) + STEP_LIMIT ))
}
step_left() { local l=$(( STEP_DEADLINE - $(date +%s) )); echo $(( l > 0 ? l : 0 )); }
finish_step() {  # rewrite the summary and the details tarball: a cut run still returns both
    "$PY" tools/gpu_selftest_summary.py --work "$WORK" --results "$RESULTS" $([ $DRY_RUN = 1 ] && echo --dry-run) \
        > "$WORK/summary.out" 2>&1 || { echo "summary failed:"; cat "$WORK/summary.out"; }
    tar -czf "$WORK/details.tar.gz" -C "$WORK" details && mv -f "$WORK/details.tar.gz" "$RESULTS/selftest-details.tar.gz"
}
has_gpu() { command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; }

# ---- the plan ------------------------------------------------------------------------------------
say "GPU self-test$([ $DRY_RUN = 1 ] && echo ' (dry run)'): steps $STEPS; results in $RESULTS"
printf '  %-10s %8s\n' step "budget s"
for s in "${ALL_STEPS[@]}"; do
    { [ "$s" = env ] || want "$s"; } && printf '  %-10s %8d%s\n' "$s" "${BUDGET[$s]}" \
        "$([ "$s" = build ] && [ $DRY_RUN = 0 ] && echo '  (its own limit, beside the test step)')"
done
printf '  %-10s %8d  (cap; %d cores, pytest -n %d, MAX_JOBS=%d)\n' total "$TOTAL" "$CORES" "$XDIST" "$CORES"
if [ $DRY_RUN = 0 ] && ! has_gpu; then
    echo "no GPU here (nvidia-smi finds none): use --dry-run on a machine without a GPU"
    exit 2
fi

# ---- env (always: later steps need its wheels) ------------------------------------------------------
SITE=$WORK/site
FUSED_SSIM_DIR=build/fused-ssim  # git-ignored; kept, so that a later --steps bench on the same machine reuses it
step_env() {
    local limit
    begin_step env
    limit=$STEP_LIMIT
    say "env (limit ${limit} s)"
    if has_gpu; then
        nvidia-smi | tee "$DETAILS/nvidia-smi.txt"
        nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,clocks.max.mem,power.draw,power.limit,temperature.gpu,pstate \
            --format=csv | tee "$DETAILS/clocks.csv"
    else
        echo "nvidia-smi: no GPU on this machine"
    fi
    # Files the run needs.
    local missing=()
    for f in setup.py bench/bench_ssim.py bench/bench_train_step.py bench/workloads.py bench/peers.py \
             tools/gpu_selftest_driver.py tools/gpu_selftest_summary.py python_tests/conftest.py \
             python_tests/test_backends.py python_tests/test_ops.py python_tests/test_cuda.py \
             python_tests/test_properties.py; do
        [ -f "$f" ] || missing+=("$f")
    done
    [ -f bench/kernel_report.py ] || echo "note: bench/kernel_report.py is absent: no static estimate this run"
    local wheels=(.whl/*.whl) fused_src=(.whl/fused-ssim-*.tar.gz)
    [ -e "${wheels[0]}" ] || missing+=(".whl/*.whl (run tools/gpu_wheels.sh here first)")
    if [ -e "${fused_src[0]}" ]; then
        grep -qx 'fused-ssim/setup.py' <(tar -tzf "${fused_src[0]}") || missing+=("${fused_src[0]} holding fused-ssim/setup.py")
    else
        missing+=(".whl/fused-ssim-*.tar.gz (tools/gpu_wheels.sh)")
    fi
    # Python modules the image has (KINDS.md); the carried wheels add the rest.
    "$PY" -c "import torch, triton, numpy, pytest, xdist, hypothesis, torchvision, PIL, setuptools" \
        || missing+=("python modules: torch triton numpy pytest xdist hypothesis torchvision PIL setuptools")
    for tool in nvcc compute-sanitizer ncu; do
        command -v $tool >/dev/null || echo "note: $tool not found$([ $DRY_RUN = 1 ] && echo ' (needed on the GPU machine only)')"
    done
    if [ -e "${wheels[0]}" ]; then
        echo "installing $(ls .whl/*.whl | wc -l) wheels from .whl/ ($(du -ch .whl/*.whl | tail -1 | cut -f1)) into a scratch site"
        if [ $DRY_RUN = 1 ]; then  # another Python here: check the wheels' tags against the GPU machine's
            "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" \
                --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
                --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 .whl/*.whl \
                || missing+=("wheels that install for cp312 manylinux x86-64")
        else
            "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
                && export PYTHONPATH="$PYTHONPATH:$SITE" || missing+=("wheels that install here")
        fi
    fi
    timed env.versions "$limit" "$PY" tools/gpu_selftest_driver.py env --json "$DETAILS/env.json"
    if [ ${#missing[@]} -gt 0 ]; then
        printf 'MISSING: %s\n' "${missing[@]}"
        record env.check failed 1 0 "$limit" "missing: ${missing[*]}"
        return 1
    fi
    record env.check ok 0 0 "$limit" "everything the run needs is present"
}

# ---- build ---------------------------------------------------------------------------------------
FUSED_SSIM_PID=""
REPORT_PID=""
start_kernel_report() {  # the static report (issue 14's bench/kernel_report.py), when it exists
    if [ ! -f bench/kernel_report.py ]; then
        echo "static kernel report: bench/kernel_report.py is absent in this checkout: skipped"
        echo "bench/kernel_report.py is absent in this checkout" > "$DETAILS/kernel-report.note"
        return
    fi
    local limit=$1
    echo "static kernel report: bench/kernel_report.py --json (limit ${limit} s)"
    ( timeout -k 5 "$limit" nice -n 10 "$PY" bench/kernel_report.py --arch 90 --json "$DETAILS/kernel-report.json" \
        > "$DETAILS/kernel-report.log" 2>&1; echo $? > "$WORK/kernel-report.rc" ) &
    REPORT_PID=$!
}
fused_ssim_built() { ls "$FUSED_SSIM_DIR"/fused_ssim_cuda*.so >/dev/null 2>&1; }
start_fused_ssim_build() {  # fused-ssim (a bench peer) from its source in .whl/, in the background; $1: limit
    local src=(.whl/fused-ssim-*.tar.gz)
    [ -e "${src[0]}" ] || { echo "no fused-ssim source in .whl/"; return; }
    rm -rf "$FUSED_SSIM_DIR" && mkdir -p "$FUSED_SSIM_DIR" && tar -xzf "${src[0]}" -C "$FUSED_SSIM_DIR" --strip-components=1
    echo "fused-ssim: building $(basename "${src[0]}") in the background (limit $1 s)"
    ( cd "$FUSED_SSIM_DIR" && CUDA_ARCHITECTURES=90 timeout -k 5 "$1" "$PY" setup.py build_ext --inplace \
        > "$DETAILS/fused-ssim-build.log" 2>&1; echo $? > "$WORK/fused-ssim.rc" ) &
    FUSED_SSIM_PID=$!
}
BUILD_PID=""
start_extension_build() {  # $1: limit. Built into build/selftest-lib, then moved in place in one rename,
    # so that a test process never loads a half-copied library. ninja recompiles every source whose
    # dependencies changed since the last build here (on a fresh machine: all of them); --force relinks.
    # CFLAGS -g0 overrides the -g of Python's own flags: no host debug information, a much shorter build.
    echo "extension: building (limit $1 s; log: build.log in the details)"
    BUILD_LIMIT=$1
    date +%s.%N > "$WORK/build.start"
    ( timeout -k 10 "$1" env -u SSIMKD_NO_CUDA SSIMKD_BUILD_EXT=1 TORCH_CUDA_ARCH_LIST=9.0 CFLAGS="${CFLAGS:-} -g0" \
          "$PY" setup.py build_ext --build-lib build/selftest-lib --force > "$DETAILS/build.log" 2>&1
      rc=$?
      if [ $rc = 0 ]; then mv -f build/selftest-lib/ssimkd_kernels/_C*.so* ssimkd_kernels/ || rc=1; fi  # the library and its record
      date +%s.%N > "$WORK/build.end"
      echo $rc > "$WORK/build.rc" ) &
    BUILD_PID=$!
}
await_build() {  # wait for the background build (under its own limit), record it, check what loads
    [ -z "$BUILD_PID" ] && return 0
    wait "$BUILD_PID"
    BUILD_PID=""
    local rc status seconds
    rc=$(cat "$WORK/build.rc" 2>/dev/null || echo 1)
    case $rc in 0) status=ok ;; 124|137) status=timeout ;; *) status=failed ;; esac
    seconds=$(awk -v a="$(cat "$WORK/build.start")" -v b="$(cat "$WORK/build.end" 2>/dev/null || date +%s.%N)" \
              'BEGIN {printf "%.1f", b - a}')
    record build.extension "$status" "$rc" "$seconds" "$BUILD_LIMIT"
    say "extension build: $status after $seconds s"
    tail -n 3 "$DETAILS/build.log" | cut -c1-300
    [ "$rc" != 0 ] && { echo "the build's errors:"; grep -m 20 -E "error|Error" "$DETAILS/build.log"; }
    "$PY" -m ssimkd_kernels info --json > "$DETAILS/info.json" 2>"$DETAILS/info.err" && cat "$DETAILS/info.json"
    if [ $DRY_RUN = 1 ]; then
        # The one other step that needs no GPU: the static report, here in the foreground.
        start_kernel_report "${BUDGET[bench]}"
        if [ -n "$REPORT_PID" ]; then
            wait "$REPORT_PID"
            REPORT_PID=""
            local report_rc
            report_rc=$(cat "$WORK/kernel-report.rc")
            record build.kernel_report "$([ "$report_rc" = 0 ] && echo ok || echo failed)" "$report_rc" 0 \
                "${BUDGET[bench]}" "bench/kernel_report.py --json"
            tail -n 15 "$DETAILS/kernel-report.log"
            [ "$report_rc" = 0 ] || rc=1
        fi
    else  # in the background, niced, on the cores the tests leave idle; collected before the bench step
        start_kernel_report "$(left)"  # stopped when the bench step begins, if still running
    fi
    return $([ "$rc" = 0 ] && echo 0 || echo 1)
}
step_build() {
    local limit=${BUDGET[build]}
    [ $DRY_RUN = 0 ] && [ "$(left)" -lt "$limit" ] && limit=$(left)
    say "build (limit ${limit} s): the extension, TORCH_CUDA_ARCH_LIST=9.0, MAX_JOBS=$CORES$(
        [ $DRY_RUN = 0 ] && want test && echo ', in the background beside the test step')"
    [ $DRY_RUN = 0 ] && want bench && start_fused_ssim_build "$limit"
    start_extension_build "$limit"
    # Nothing to overlap with: wait here.
    if [ $DRY_RUN = 1 ] || ! want test; then await_build; return $?; fi
    return 0
}

# ---- test ----------------------------------------------------------------------------------------
TEST_FILES=(python_tests/test_backends.py python_tests/test_ops.py python_tests/test_cuda.py python_tests/test_properties.py)
declare -A TEST_SELECT=([triton]="triton" [cuda]="cuda and not cuda_emulated")
run_pytest() {  # $1: backend, $2: limit
    TIMED_SIGNAL=INT timed "test.pytest.$1" "$2" "$PY" -m pytest "${TEST_FILES[@]}" -k "${TEST_SELECT[$1]}" \
        -n "$XDIST" -q -rfE -p no:cacheprovider --durations=5 --junitxml="$DETAILS/pytest-junit-$1.xml"
}
step_test() {
    local limit rc=0 backend
    begin_step test
    limit=$STEP_LIMIT
    say "test (limit ${limit} s): ${TEST_FILES[*]}, -k '${TEST_SELECT[triton]}' then -k '${TEST_SELECT[cuda]}'"
    if [ $DRY_RUN = 1 ]; then  # no GPU: each selection must at least collect its tests
        local out
        for backend in triton cuda; do
            out=$("$PY" -m pytest "${TEST_FILES[@]}" -k "${TEST_SELECT[$backend]}" --collect-only -q -p no:cacheprovider 2>&1)
            rc=$?
            echo "$backend: $(echo "$out" | tail -n 1)"
            if [ $rc -ne 0 ] || ! echo "$out" | grep -qE "^[1-9][0-9]*(/[0-9]+)? tests? collected"; then
                record "test.collect.$backend" failed 1 0 "$limit" "collect-only: $(echo "$out" | tail -n 1)"
                return 1
            fi
            record "test.collect.$backend" ok 0 0 "$limit" "collect-only: $(echo "$out" | tail -n 1)"
        done
        return 0
    fi
    # The triton backend needs no extension: its tests run while the build goes on (SSIMKD_NO_JIT: no
    # process compiles the extension on its own meanwhile). Then the cuda backend's, once it is built.
    SSIMKD_NO_JIT=1 run_pytest triton $(( limit / 2 )) || rc=1
    await_build || rc=1
    local cuda_limit
    cuda_limit=$(step_left)
    [ "$cuda_limit" -lt 30 ] && cuda_limit=30  # taken from the later steps' share: the build ran long
    run_pytest cuda "$cuda_limit" || rc=1
    return $rc
}

# ---- sanitizer -------------------------------------------------------------------------------------
step_sanitizer() {
    local limit
    begin_step sanitizer
    limit=$STEP_LIMIT
    say "sanitizer (limit ${limit} s)"
    if [ $DRY_RUN = 1 ]; then  # rehearse the driver's logic on the CPU backends (no sanitizer, no GPU)
        command -v compute-sanitizer >/dev/null || echo "note: compute-sanitizer absent here (GPU machine only)"
        timed sanitizer.rehearse_fuzz "$limit" "$PY" tools/gpu_selftest_driver.py fuzz --device cpu \
            --backends cpu,cuda_emulated --json "$DETAILS/sanitizer/rehearsal-driver.json"
        timed sanitizer.rehearse_large "$(step_left)" "$PY" tools/gpu_selftest_driver.py large --device cpu \
            --backends cpu,cuda_emulated --shape 1,9,16,16 --allow-small --chunk-planes 4 --json "$DETAILS/rehearsal-large.json"
        "$PY" tools/gpu_selftest_driver.py streams --help > /dev/null && echo "streams: needs a GPU (parses)"
        return
    fi
    local rc=0 pids=() tool backend
    if command -v compute-sanitizer >/dev/null; then
        # One process per tool and backend, all at once (they are CPU-bound; an error that poisons one
        # CUDA context cannot hide the other backend's result). memcheck and initcheck run without
        # torch's caching allocator: every allocation is then exactly its tensor, and an overrun cannot
        # land unseen in a cached neighbour.
        for tool in memcheck racecheck initcheck synccheck; do
            local uncached=()
            [[ $tool == memcheck || $tool == initcheck ]] && uncached=(env PYTORCH_NO_CUDA_MEMORY_CACHING=1)
            for backend in cuda triton; do
                TIMED_SIGNAL=INT timed "sanitizer.$tool.$backend" $(( limit - 5 )) "${uncached[@]}" \
                    compute-sanitizer --tool "$tool" --error-exitcode 86 --print-limit 100 \
                    --log-file "$DETAILS/sanitizer/$tool-$backend.log" \
                    "$PY" tools/gpu_selftest_driver.py fuzz --backends "$backend" \
                    --json "$DETAILS/sanitizer/$tool-$backend-driver.json" > "$DETAILS/sanitizer/$tool-$backend.out" 2>&1 &
                pids+=($!)
            done
        done
    else
        echo "compute-sanitizer not found: sanitizer tools skipped"
        record sanitizer.tools skipped 0 0 "$limit" "compute-sanitizer not found"
    fi
    # Meanwhile, without the sanitizer, one process per check and backend: > 2^31 elements, streams.
    for backend in cuda triton; do
        timed "sanitizer.large.$backend" "$(step_left)" "$PY" tools/gpu_selftest_driver.py large \
            --backends "$backend" --json "$DETAILS/large-$backend.json" || rc=1
        timed "sanitizer.streams.$backend" "$(step_left)" "$PY" tools/gpu_selftest_driver.py streams \
            --backends "$backend" --json "$DETAILS/streams-$backend.json" || rc=1
    done
    for p in "${pids[@]}"; do wait "$p" || rc=1; done
    for f in "$DETAILS"/sanitizer/*.log; do
        [ -e "$f" ] || continue
        printf '%-20s %s | %s\n' "$(basename "$f" .log)" \
            "$(grep -hE 'ERROR SUMMARY|RACECHECK SUMMARY' "$f" | tail -1 | sed 's/^=* *//')" \
            "$(tail -n 1 "${f%.log}.out" 2>/dev/null)"
    done
    return $rc
}

# ---- bench ---------------------------------------------------------------------------------------
# bench_ssim NAME LIMIT ARGS...: one bench_ssim run, its JSON copied to $RESULTS/bench-NAME.json.
bench_ssim() {
    local name=$1 limit=$2 out="$WORK/bench/$1"
    shift 2
    mkdir -p "$out"
    timed "bench.$name" "$limit" "$PY" bench/bench_ssim.py --device cuda --no-png --out "$out" "$@"
    local rc=$? json
    json=$(ls "$out"/*.json 2>/dev/null | head -1)
    [ -n "$json" ] && cp "$json" "$RESULTS/bench-$name.json"
    finish_step
    return $rc
}
step_bench() {
    local limit end
    begin_step bench
    limit=$STEP_LIMIT
    end=$(( $(date +%s) + limit ))
    say "bench (limit ${limit} s)"
    if [ $DRY_RUN = 1 ]; then  # rehearse the scripts on the CPU at toy sizes (no timing is meaningful)
        timed bench.rehearse_ssim 300 "$PY" bench/bench_ssim.py --workload small --device cpu \
            --candidates reference,cpu --warmup 0 --repeats 1 --no-png --out "$WORK/bench/rehearsal"
        timed bench.rehearse_train_step 300 "$PY" bench/bench_train_step.py --device cpu --size 64,86 \
            --fpn-channels 16 --teacher-depth 18 --steps 1 --warmup 0 --modes l2,ssim-fused --out "$WORK/bench/rehearsal"
        command -v ncu >/dev/null || echo "note: ncu absent here (GPU machine only)"
        return
    fi
    # fused-ssim: the build step's background build, an earlier run's, or now.
    [ -z "$FUSED_SSIM_PID" ] && ! fused_ssim_built && start_fused_ssim_build $(( limit * 30 / 100 ))
    if [ -n "$FUSED_SSIM_PID" ]; then
        wait "$FUSED_SSIM_PID"
        FUSED_SSIM_PID=""
        record bench.fused_ssim_build "$(fused_ssim_built && echo ok || echo failed)" \
            "$(cat "$WORK/fused-ssim.rc" 2>/dev/null || echo 1)" 0 0 "from the source in .whl/"
    fi
    if fused_ssim_built; then
        export PYTHONPATH="$PYTHONPATH:$ROOT/$FUSED_SSIM_DIR"
    else
        echo "fused-ssim is not built: $(tail -n 3 "$DETAILS/fused-ssim-build.log" 2>/dev/null)"
    fi
    # --incremental: the JSON is rewritten after every row, so a run stopped at its limit keeps its rows.
    local common=(--warmup 5 --repeats 30 --incremental)
    # Every candidate that imports, float32 first (most targets), then bfloat16.
    bench_ssim retinanet $(( (end - $(date +%s)) * 60 / 100 )) --workload retinanet --dtype float32,bfloat16 "${common[@]}"
    bench_ssim image-float32 $(( (end - $(date +%s)) * 25 / 100 )) --workload image --dtype float32 --modes fwd+bwd \
        --candidates cuda,triton,reference,fused-ssim,fussim,pytorch_msssim "${common[@]}"
    local train="$WORK/bench/train"
    mkdir -p "$train"
    timed bench.train_step $(( (end - $(date +%s)) * 75 / 100 )) "$PY" bench/bench_train_step.py --device cuda \
        --size 800,1333 --batch 2 --steps 15 --warmup 3 --modes none,l2,ssim-reference,ssim-fused --out "$train"
    local json
    json=$(ls "$train"/*.json 2>/dev/null | head -1)
    [ -n "$json" ] && cp "$json" "$RESULTS/bench-train-step.json"
    finish_step
    if command -v ncu >/dev/null && [ $(( end - $(date +%s) )) -ge 30 ]; then
        # Three counters of the fused kernels (kernel names holding "ssim"): DRAM and SM throughput, achieved
        # occupancy; --clock-control none leaves the clocks as found.
        local metrics=dram__throughput.avg.pct_of_peak_sustained_elapsed,sm__throughput.avg.pct_of_peak_sustained_elapsed
        metrics+=,sm__warps_active.avg.pct_of_peak_sustained_active,gpu__time_duration.sum,launch__registers_per_thread
        timed bench.ncu $(( end - $(date +%s) - 5 )) ncu --clock-control none --kernel-name regex:ssim --csv \
            --metrics "$metrics" --log-file "$DETAILS/ncu.csv" "$PY" tools/gpu_selftest_driver.py profile --backends cuda,triton \
            > "$DETAILS/ncu.out" 2>&1
    else
        record bench.ncu skipped 0 0 0 "$(command -v ncu >/dev/null && echo 'under 30 s left' || echo 'ncu not found')"
    fi
}

collect_kernel_report() {  # $1: the most seconds to wait for it; then it is stopped
    [ -z "$REPORT_PID" ] && return
    local wait_s=$1
    while kill -0 "$REPORT_PID" 2>/dev/null && [ "$wait_s" -gt 0 ]; do sleep 1; wait_s=$((wait_s - 1)); done
    if kill -0 "$REPORT_PID" 2>/dev/null; then
        pkill -P "$REPORT_PID" 2>/dev/null; kill "$REPORT_PID" 2>/dev/null
        echo "bench/kernel_report.py was still running: stopped" > "$DETAILS/kernel-report.note"
        record kernel_report timeout 124 0 0 "still running when the timings began: stopped"
    elif [ -f "$WORK/kernel-report.rc" ]; then
        local rc
        rc=$(cat "$WORK/kernel-report.rc")
        record kernel_report "$([ "$rc" = 0 ] && echo ok || echo failed)" "$rc" 0 0 "bench/kernel_report.py (background)"
        [ "$rc" = 0 ] || tail -n 5 "$DETAILS/kernel-report.log"
    fi
    REPORT_PID=""
}

# ---- run -----------------------------------------------------------------------------------------
overall=0
step_env || overall=1
finish_step
for s in build test sanitizer bench; do
    want "$s" || continue
    # The test step waits for the build itself, after the triton tests; later steps need it first.
    [ "$s" = sanitizer ] || [ "$s" = bench ] && { await_build || overall=1; }
    [ "$s" = bench ] && collect_kernel_report 15  # no compiling beside the timings
    "step_$s" || overall=1
    finish_step
done
collect_kernel_report $(( $(left) - 10 ))
finish_step
[ -n "$FUSED_SSIM_PID" ] && kill "$FUSED_SSIM_PID" 2>/dev/null
say "done in $(( $(date +%s) - START )) s; results in $RESULTS"
cat "$WORK/summary.out"
if [ $DRY_RUN = 1 ]; then
    if [ $overall = 0 ]; then
        echo "DRY RUN PASSED: everything the GPU run needs is here, and the steps that need no GPU ran"
    else
        echo "DRY RUN FAILED: see the steps marked failed above"
    fi
fi
ls -l "$RESULTS"
rm -rf "$WORK"
exec >&- 2>&-
wait "$TEE_PID" 2>/dev/null
exit $overall
