"""JAX's persistent compilation cache, as a run uses it.

A run's step variants take tens of seconds to compile on a CPU (~20-25 s on
an H200's host); with the cache on, a second run or a `--resume` with the
same shapes and versions loads the executables from disk instead. The cache
directory is `--compilation_cache_dir`, else `$ALD_JAX_CACHE_DIR`, else JAX's
own `$JAX_COMPILATION_CACHE_DIR`, else `~/.cache/ald_jax/xla` (under
`$XDG_CACHE_HOME` when that is set). Entries
are keyed by the program, the JAX/XLA versions and the device, so a stale
entry is never used; deleting the directory is always safe.

The cache is trusted code: keep it in a directory only you can write.
"""
from __future__ import annotations

import os

import jax
from jax.experimental.compilation_cache import compilation_cache

ENV_VAR = "ALD_JAX_CACHE_DIR"
# Programs that compile faster than this are not worth a disk entry.
MIN_COMPILE_TIME_S = 0.1


# As the process started: `enable` sets JAX's variable for the processes a
# run spawns, which must not move the default of the next run.
_STARTING_ENV = {name: os.environ.get(name, "")
                 for name in (ENV_VAR, "JAX_COMPILATION_CACHE_DIR")}


def default_dir() -> str:
  """Where the cache lives when no directory is given."""
  for variable in (ENV_VAR, "JAX_COMPILATION_CACHE_DIR"):
    value = os.environ.get(variable) if variable == ENV_VAR else (
        _STARTING_ENV[variable])
    if value:
      return value
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(
      os.path.expanduser("~"), ".cache")
  return os.path.join(base, "ald_jax", "xla")


def enable(path: str = "") -> str:
  """Turns the cache on at `path` (default: `default_dir()`); returns the
  absolute directory. Processes spawned afterwards (actor processes) use it
  too, through JAX's environment variable."""
  path = os.path.abspath(os.path.expanduser(path or default_dir()))
  os.makedirs(path, exist_ok=True)
  if jax.config.jax_compilation_cache_dir != path:
    compilation_cache.set_cache_dir(path)
    compilation_cache.reset_cache()  # JAX opens its cache once per directory
  jax.config.update("jax_persistent_cache_min_compile_time_secs",
                    MIN_COMPILE_TIME_S)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = path
  return path


def disable() -> None:
  """Turns the cache off for this process (processes it spawns follow
  `$JAX_COMPILATION_CACHE_DIR` if the environment sets it)."""
  if jax.config.jax_compilation_cache_dir is not None:
    compilation_cache.set_cache_dir(None)
    compilation_cache.reset_cache()
