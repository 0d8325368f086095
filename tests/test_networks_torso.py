"""Torso: shapes for vector and grid observations, batch folding, values."""
import jax
import numpy as np
import pytest

from ald_jax.config import TorsoConfig
from ald_jax.networks.torso import Torso

CONFIG = TorsoConfig(conv_channels=(4, 5), mlp_sizes=(8, 6))


def init_apply(torso, obs):
  params = jax.jit(torso.init)(jax.random.PRNGKey(0), obs)
  return params, jax.jit(torso.apply)(params, obs)


def test_vector_observation_values_and_shapes():
  torso = Torso(TorsoConfig(mlp_sizes=(3,)), obs_ndim=1)
  obs = np.random.default_rng(0).normal(size=(2, 5, 7)).astype(np.float32)
  params, out = init_apply(torso, obs)
  assert out.shape == (2, 5, 3)
  dense = params["params"]["Dense_0"]
  expected = np.maximum(obs @ np.asarray(dense["kernel"])
                        + np.asarray(dense["bias"]), 0)
  np.testing.assert_allclose(out, expected, atol=1e-6)
  # Conv layers are for grids only.
  assert set(params["params"]) == {"Dense_0"}


@pytest.mark.parametrize("leading", [(), (3,), (2, 4)])
def test_any_leading_batch_dims(leading):
  torso = Torso(CONFIG, obs_ndim=1)
  obs = np.random.default_rng(1).normal(size=(*leading, 9)).astype(np.float32)
  _, out = init_apply(torso, obs)
  assert out.shape == (*leading, 6)


def test_grid_observation_shapes_and_batch_folding():
  torso = Torso(CONFIG, obs_ndim=3)
  obs = np.random.default_rng(2).integers(
      0, 3, size=(2, 3, 5, 4, 2)).astype(np.uint8)  # integer grids are cast
  params, out = init_apply(torso, obs)
  assert out.shape == (2, 3, 6)
  p = params["params"]
  assert p["Conv_0"]["kernel"].shape == (3, 3, 2, 4)
  assert p["Conv_1"]["kernel"].shape == (3, 3, 4, 5)
  # SAME padding keeps the 5x4 grid: the MLP sees 5 * 4 * 5 features.
  assert p["Dense_0"]["kernel"].shape == (5 * 4 * 5, 8)
  # Folding [B, T] into one batch gives the same result per step.
  single = jax.jit(torso.apply)(params, obs[1, 2])
  np.testing.assert_allclose(single, out[1, 2], atol=1e-5)
  assert float(np.abs(np.asarray(out)).max()) > 0


def test_bad_obs_ndim_is_a_clear_error():
  with pytest.raises(ValueError, match="obs_ndim"):
    Torso(CONFIG, obs_ndim=2).init(jax.random.PRNGKey(0), np.zeros((2, 3, 4)))
  with pytest.raises(ValueError, match="at least 3 dims"):
    Torso(CONFIG, obs_ndim=3).init(jax.random.PRNGKey(0), np.zeros((2, 3)))
