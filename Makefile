# Two commands on a fresh machine with Python 3 and make: `make demo` and `make test`.
# Both create .venv and install the project into it on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install test coverage demo bench clean gpu-wheels

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,ray]'
	touch $@

# Two workers, a test file each at a time (module fixtures, a Ray cluster, built once per file):
# 9 min on two cores (docs/testing.md).
test: install
	$(BIN)/pytest -q -n 2 --dist loadfile

# Line and branch coverage of extract/ and classify/, subprocesses and forked commands included.
coverage: install
	$(BIN)/pytest -q -n 2 --dist loadfile --cov --cov-report=term

demo: install
	$(BIN)/python -m demo.run

# Wheels of what Keras needs on a GPU machine that has JAX or PyTorch but no TensorFlow and no
# network (Python 3.12, x86-64): Keras itself, namex and optree, at the versions tested here.
# bench/gpu_check.sh installs them from .whl/ (git-ignored).
GPU_PYTHON ?= 3.12
gpu-wheels: install
	$(BIN)/pip download --quiet --no-deps --only-binary=:all: --python-version $(GPU_PYTHON) --implementation cp \
	    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	    -d .whl $$($(BIN)/python -c 'from importlib.metadata import version as v; print(*(f"{n}=={v(n)}" for n in ("keras", "namex", "optree")))')
	ls -l .whl

clean:
	rm -rf $(VENV) cache/demo.h5* data/demo
