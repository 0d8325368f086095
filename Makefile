# Quick start: `make train` and `make test`. Both create and reuse .venv/.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: train test test-all test-slow bench docs cli-docs clean-venv

$(STAMP): setup.py constraints.txt
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "ald_jax needs Python 3.11+, found " + sys.version' 
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test,ray]'
	@touch $(STAMP)

# Default ALD run (GTrXL learner distilled into an LSTM actor) on I-Maze, its
# actors in their own processes: faster and inside the T_actor budget where
# actor threads are not (docs/wall_clock.md). ARGS=--actors=threads for threads.
train: $(STAMP)
	$(PY) -m ald_jax.train --actors=processes $(ARGS)

# The test suite CI runs (slow runs are marked and skipped here). Two
# pytest-xdist workers: most of the time is XLA compiling, one core each.
# The 25 slowest tests are listed at the end, to keep the suite's time in view.
test: $(STAMP)
	$(PY) -m pytest -q -m "not slow" -n 2 --durations=25 tests

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow -n 2 tests

test-all: $(STAMP)
	$(PY) -m pytest -q -n 2 tests

# The documentation site (mkdocs-material) in site/; strict: a broken link,
# a missing page or a stale docs/cli.md fails.
DOCS_STAMP := $(VENV)/.docs-installed
$(DOCS_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -c constraints.txt -e '.[docs]'
	@touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	$(PY) scripts/make_cli_reference.py --check
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --site-dir site

# Rewrites docs/cli.md from the flag table (after changing a flag).
cli-docs: $(STAMP)
	$(PY) scripts/make_cli_reference.py

bench: $(STAMP)
	$(PY) experiments/bench_learner_step.py
	$(PY) experiments/bench_envs.py
	$(PY) experiments/bench_system.py

clean-venv:
	rm -rf $(VENV)
