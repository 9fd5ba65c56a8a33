# Two commands on a fresh machine with Python 3 and make: `make demo` and `make test`.
# Both create .venv and install the project into it on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install test coverage demo bench clean gpu-wheels

install: $(VENV)/.installed-test

# What a step installs and about how long it takes is said before it starts; pip then shows its
# own progress. make demo installs only what the demo runs (the project: TensorFlow, Keras,
# scikit-learn, ...); make test adds the test and Ray extras. PYTHONWARNINGS keeps setuptools'
# "Editable installation" warning block (folders named like the package may shadow it: here
# they are the package) out of the output.
PIP_INSTALL := PYTHONWARNINGS="ignore:Editable installation" $(BIN)/pip install

$(BIN)/python:
	@echo "make: creating $(VENV) and updating its pip (5 s)"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed-core: pyproject.toml | $(BIN)/python
	@echo "make: installing the project and what it runs (TensorFlow, Keras, scikit-learn, ...: about 2.4 GB; 47 s here from a fast mirror, plus the download on yours)"
	$(PIP_INSTALL) -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed-core
	@echo "make: installing the test and Ray extras (pytest, JAX, Ray, pyarrow, moto, ...: about 1 GB more; 158 s here)"
	$(PIP_INSTALL) -e '.[test,ray]'
	touch $@

# Two workers, a test file each at a time (module fixtures, a Ray cluster, built once per file):
# 10-12 min on two cores (docs/testing.md).
test: install
	$(BIN)/pytest -q -n 2 --dist loadfile

# Line and branch coverage of extract/ and classify/, subprocesses and forked commands included.
coverage: install
	$(BIN)/pytest -q -n 2 --dist loadfile --cov --cov-report=term

demo: $(VENV)/.installed-core
	$(BIN)/python -m demo.run

# Wheels of what Keras needs on a GPU machine that has JAX or PyTorch but no TensorFlow and no
# network (Python 3.12, x86-64): Keras itself, namex and optree, at the versions tested here.
# bench/gpu_check.sh installs them from .whl/ (git-ignored).
GPU_PYTHON ?= 3.12
gpu-wheels: $(VENV)/.installed-core
	$(BIN)/pip download --quiet --no-deps --only-binary=:all: --python-version $(GPU_PYTHON) --implementation cp \
	    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	    -d .whl $$($(BIN)/python -c 'from importlib.metadata import version as v; print(*(f"{n}=={v(n)}" for n in ("keras", "namex", "optree")))')
	ls -l .whl

# What make and make demo wrote: the environment, the demo's images, cache and heads.
clean:
	rm -rf $(VENV) cache/demo.h5* data/demo heads/demo
