# Everything a fresh machine needs: Python 3 and make.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= runs/linear_regression

.PHONY: run test lint format bench clean

$(VENV)/.installed: pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

# The default experiment: the classic unscaled regression that returns NaN in
# plain TensorFlow; safetrain rolls back and lowers the learning rate until it
# trains. A fresh workdir each time, so you see the recovery happen.
run: $(VENV)/.installed
	rm -rf $(WORKDIR)
	$(VENV)/bin/safetrain --config=experiments/linear_regression.py --workdir=$(WORKDIR)
	$(VENV)/bin/safetrain report $(WORKDIR)

lint: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check safetrain experiments tests benchmarks
	$(VENV)/bin/ruff format --check safetrain experiments tests benchmarks

format: $(VENV)/.installed-dev
	$(VENV)/bin/ruff format safetrain experiments tests benchmarks
	$(VENV)/bin/ruff check --fix safetrain experiments tests benchmarks

test: lint
	$(PY) -m pytest -m "not slow" -n 2 --dist loadfile --durations=15

bench: $(VENV)/.installed
	$(PY) benchmarks/bench_step.py

clean:
	rm -rf $(VENV) runs
