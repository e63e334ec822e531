# make test  : create .venv, install torch + build deps, build attnkit, run pytest
# make bench : same set-up, then python -m attnkit.bench
# PYTHON=python3 make test : skip the venv and use that interpreter's torch (e.g. on a GPU box).

PYTHON ?=
VENV   := .venv
JOBS   ?= $(shell nproc 2>/dev/null || echo 2)
TORCH_SPEC ?= torch>=2.10,<2.15
BUILD_DEPS := "scikit-build-core>=0.10" ninja "cmake>=3.26" pytest hypothesis numpy expecttest pytest-benchmark matplotlib rich "transformers>=5,<6"

ifeq ($(strip $(PYTHON)),)
PY    := $(VENV)/bin/python
SETUP := $(VENV)/.attnkit-setup
else
PY    := $(PYTHON)
SETUP :=
endif

export CMAKE_BUILD_PARALLEL_LEVEL := $(JOBS)
export MAX_JOBS := $(JOBS)

.PHONY: all build test bench clean info dev devtest

all: build

$(VENV)/.attnkit-setup: pyproject.toml Makefile
	test -x $(VENV)/bin/python || python3 -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q "$(TORCH_SPEC)" $(BUILD_DEPS)
	touch $@

build: $(SETUP)
	$(PY) -m pip install -q --no-build-isolation --no-deps .

# The test suite also exercises the test-only ops (ATTNKIT_TEST_OPS); a plain build leaves them out.
test dev devtest: export ATTNKIT_TEST_OPS := 1

# slow tests (e.g. the emulator's planted-bug checks) run only on request: pytest -m slow
test: build
	$(PY) -m pytest -q tests -m "not slow"

bench: build
	$(PY) -m attnkit.bench

info: build
	$(PY) -m attnkit.info

# Developer loop: build in build/dev and drop _C next to the sources; run with PYTHONPATH=python.
# ATTNKIT_CUDA=off make dev  skips the (slow) CUDA compile while iterating on CPU code.
dev: $(SETUP)
	$(PY) -m cmake -S . -B build/dev -G Ninja -DCMAKE_BUILD_TYPE=Release -DPython_EXECUTABLE=$$($(PY) -c 'import sys; print(sys.executable)') \
	  -DATTNKIT_CUDA=$${ATTNKIT_CUDA:-auto} -DATTNKIT_CUDA_ARCHS="$${ATTNKIT_CUDA_ARCHS:-8.0;9.0}" \
	  -DATTNKIT_TEST_OPS=$${ATTNKIT_TEST_OPS:-OFF}
	$(PY) -m cmake --build build/dev -j $(JOBS)
	cp build/dev/_C*.so python/attnkit/

devtest: dev
	PYTHONPATH=python $(PY) -m pytest -q tests -m "not slow" $(PYTEST_ARGS)

clean:
	rm -rf build dist bench-results
