"""Suite-wide settings: a persistent XLA cache so repeated configs compile once."""
import jax
import pytest


@pytest.fixture(scope="session", autouse=True)
def _compilation_cache(tmp_path_factory):
  jax.config.update("jax_compilation_cache_dir",
                    str(tmp_path_factory.mktemp("xla_cache")))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  yield
