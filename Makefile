# Quick start: `make train` and `make test`. Both create and reuse .venv/.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: train test test-all test-slow bench clean-venv

$(STAMP): setup.py constraints.txt
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "ald_jax needs Python 3.11+, found " + sys.version' 
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test,ray]'
	@touch $(STAMP)

# Default ALD run (GTrXL learner distilled into an LSTM actor) on I-Maze.
train: $(STAMP)
	$(PY) -m ald_jax.train $(ARGS)

# The test suite CI runs (slow runs are marked and skipped here). Two
# pytest-xdist workers: most of the time is XLA compiling, one core each.
test: $(STAMP)
	$(PY) -m pytest -q -m "not slow" -n 2 tests

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow -n 2 tests

test-all: $(STAMP)
	$(PY) -m pytest -q -n 2 tests

bench: $(STAMP)
	$(PY) experiments/bench_learner_step.py
	$(PY) experiments/bench_envs.py
	$(PY) experiments/bench_system.py

clean-venv:
	rm -rf $(VENV)
