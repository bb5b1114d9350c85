# Two commands do all set-up on a fresh machine: `make test` and `make demo` (both run `make setup`).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# pytest workers; CI machines have 2 cores.
JOBS ?= 2

.PHONY: setup setup-mmdet build dist lint format test demo bench info cmake-test clean

setup: $(VENV)/.installed

# The venv, the pinned requirements, then the editable install with the extension built ahead, in
# place, against the venv's torch (SSIMKD_BUILD_EXT=1: CPU always; CUDA kernels too where nvcc is
# found, setup.py locates the toolkit). A plain `pip install .` builds no extension (it compiles on
# first use instead).
$(VENV)/.installed: pyproject.toml setup.py ssimkd_kernels/_build.py requirements/runtime.txt requirements/dev.txt $(wildcard csrc/*.h csrc/*.cpp csrc/*.cu)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -r requirements/dev.txt
	SSIMKD_BUILD_EXT=1 $(PIP) install --quiet --no-build-isolation --no-deps -e .
	touch $@

build: setup

# The sdist and the pure-Python wheel (py3-none-any), in dist/.
dist: setup
	$(PY) -m build --outdir dist .

# The mmdetection integration's stack (requirements/mmdet.txt): mmengine, mmcv with its CPU ops built
# from source (the wheel is cached, so only the first build on a machine is slow), mmdet.
setup-mmdet: $(VENV)/.mmdet-installed

$(VENV)/.mmdet-installed: $(VENV)/.installed requirements/mmdet.txt tools/setup_mmdet.sh
	VENV=$(VENV) bash tools/setup_mmdet.sh
	touch $@

# Lint: ruff's checks and format (pyproject.toml) over the Python, clang-format (.clang-format) over csrc/. CI runs it
# first, as part of `make test`. `make format` applies both formatters' fixes.
CXX_SOURCES = $(wildcard csrc/*.h csrc/*.cpp csrc/*.cu csrc/tests/*.cpp)
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/clang-format --dry-run --Werror $(CXX_SOURCES)

format: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .
	$(VENV)/bin/clang-format -i $(CXX_SOURCES)

# The whole suite. Exit code 5 (nothing collected) is a failure here: an empty run proves nothing.
test: setup setup-mmdet lint
	@$(PY) -m pytest python_tests -q -n $(JOBS) --durations=15; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 1; fi; exit $$rc

demo: setup
	$(VENV)/bin/ssimkd demo

bench: setup
	$(PY) bench/bench_ssim.py --workload small --device cpu

info: setup
	$(VENV)/bin/ssimkd info

# The C++ test of csrc/ssim_math.h (finite differences in double), through CMake and ctest.
cmake-test:
	cmake -S . -B cmake-build -DSSIMKD_BUILD_TORCH_LIB=OFF >/dev/null
	cmake --build cmake-build -j 2
	ctest --test-dir cmake-build --output-on-failure

clean:
	rm -rf build dist cmake-build *.egg-info ssimkd_kernels/_C*.so ssimkd_kernels/_C*.so.json
