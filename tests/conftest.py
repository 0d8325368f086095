"""Suite-wide settings: one persistent XLA cache for the whole test run (so a
config compiled by one xdist worker, or by a test's subprocess, compiles
once), and cheaper LLVM compiles (tests compile many small learner variants).
"""
import os
import shutil
import tempfile

# Read when JAX's CPU backend starts (lazily, after this import); subprocesses
# started by tests inherit it. Measured on 2 cores: a tiny asymmetric V-MPO
# learner step compiled in ~26 s instead of ~38 s, run time unchanged.
if "xla_llvm_disable_expensive_passes" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_llvm_disable_expensive_passes=true").strip()

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
