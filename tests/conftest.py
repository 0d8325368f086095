"""Suite-wide settings: one persistent XLA cache for the whole test run (so a
config compiled by one xdist worker, or by a test's subprocess, compiles
once), and cheaper LLVM compiles (tests compile many small learner variants).
"""
import os
import shutil
import tempfile

# Read when JAX's CPU backend starts (lazily, after this import); subprocesses
# started by tests inherit it. Tests compile many small learner variants and
# run each for a few steps, so compile time dominates: LLVM's cheap passes at
# optimisation level 0: compiled code runs slower, compiles much faster. On
# the 2-core machine (pytest's own timings) `make test` went from 792 s to
# 656 s with it; the learning run, the one test that runs long, from 168 s to
# 203 s.
_TEST_XLA_FLAGS = ("--xla_llvm_disable_expensive_passes=true",
                   "--xla_backend_optimization_level=0")
_xla_flags = os.environ.get("XLA_FLAGS", "")
for _flag in _TEST_XLA_FLAGS:
  if _flag.split("=")[0] not in _xla_flags:
    _xla_flags = f"{_xla_flags} {_flag}".strip()
os.environ["XLA_FLAGS"] = _xla_flags

# The cache directory is made by the first process that imports this file
# (the xdist controller, or pytest alone) and reaches the workers and every
# subprocess through the environment, which JAX reads for its config. A
# fresh directory per test run: nothing is reused across runs. (JAX writes
# entries without a lock; a torn read is a warning and a recompile.)
_CACHE_ENV = "JAX_COMPILATION_CACHE_DIR"
_OWNED_CACHE = None
if _CACHE_ENV not in os.environ:
  _OWNED_CACHE = tempfile.mkdtemp(prefix="ald_jax_test_xla_cache_")
  os.environ[_CACHE_ENV] = _OWNED_CACHE
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")


def pytest_unconfigure(config):
  del config
  if _OWNED_CACHE is not None:
    shutil.rmtree(_OWNED_CACHE, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
  """Tests marked `first` start before the rest: xdist hands out tests in
  this order, so the longest run overlaps the many short tests instead of
  running alone at the end."""
  del config
  items.sort(key=lambda item: item.get_closest_marker("first") is None)
