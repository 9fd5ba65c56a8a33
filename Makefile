# Two commands on a fresh machine with Python 3 and make: `make demo` and `make test`.
# Both create .venv and install the project into it on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install test demo bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,ray]'
	touch $@

test: install
	$(BIN)/pytest -q

demo: install
	$(BIN)/python -m demo.run

clean:
	rm -rf $(VENV) cache/demo.h5* data/demo
