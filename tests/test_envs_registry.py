"""Registry, spec validation and FlattenObservation: plugging in any dm_env."""
import subprocess
import sys

import dm_env
from dm_env import specs
import numpy as np
import pytest

from ald_jax import envs
from ald_jax.envs import registry
from ald_jax.envs.specs import EnvInfo
from ald_jax.envs.specs import FlattenObservation
from ald_jax.envs.specs import UnsupportedEnvironmentError
from ald_jax.envs.specs import validate_environment


class SpecEnv(dm_env.Environment):
  """A configurable dm_env whose observations follow `obs_spec`."""

  def __init__(self, seed=0, obs_spec=None, act_spec=None):
    self._obs_spec = obs_spec if obs_spec is not None else specs.Array(
        (3,), np.float32)
    self._act_spec = act_spec if act_spec is not None else (
        specs.DiscreteArray(2))
    self._rng = np.random.default_rng(seed)
    self.t = 0

  def _obs(self):
    def leaf(spec):
      return self._rng.integers(0, 5, size=spec.shape).astype(spec.dtype)
    def build(spec):
      if isinstance(spec, dict):
        return {k: build(v) for k, v in spec.items()}
      if isinstance(spec, (list, tuple)):
        return type(spec)(build(v) for v in spec)
      return leaf(spec)
    return build(self._obs_spec)

  def reset(self):
    self.t = 0
    return dm_env.restart(self._obs())

  def step(self, action):
    self.t += 1
    if self.t == 4:
      return dm_env.termination(1.0, self._obs())
    return dm_env.transition(0.0, self._obs())

  def observation_spec(self):
    return self._obs_spec

  def action_spec(self):
    return self._act_spec

  def episode_success(self):
    return self.t == 4


# -- registry ----------------------------------------------------------------


def test_builtins_are_registered():
  assert {"imaze", "meta_fetch"} <= set(envs.available_envs())


def test_factory_builds_configured_seeded_envs():
  factory = envs.make_env_factory("imaze", corridor_length=3, time_limit=9)
  env = factory(5)
  assert isinstance(env, envs.IMaze)
  assert env.corridor_length == 3 and env.time_limit == 9
  assert "corridor_length=3" in repr(factory)
  indicators = []
  for seed in (5, 5, 6):
    env = factory(seed)
    indicators.append([(env.reset(), env.indicator)[1] for _ in range(30)])
  assert indicators[0] == indicators[1] != indicators[2]
  mf = envs.make_env_factory("meta_fetch", grid_size=4, num_objects=2)(0)
  assert mf.observation_spec().shape == (4, 4, 4)


def test_unknown_name_lists_available():
  with pytest.raises(ValueError, match=r"'nope'.*imaze.*meta_fetch"):
    envs.make_env_factory("nope")


def test_unknown_kwarg_is_named():
  with pytest.raises(ValueError, match="corridor"):
    envs.make_env_factory("imaze", corridor=4)


def test_bad_kwarg_value_is_named_at_setup_time():
  with pytest.raises(ValueError, match="num_objects"):
    envs.make_env_factory("meta_fetch", num_objects=0)


def test_seed_kwarg_rejected():
  with pytest.raises(ValueError, match="seed"):
    envs.make_env_factory("imaze", seed=3)


def test_register_custom_env_and_errors():
  name = "test_spec_env"
  envs.register(name, SpecEnv)
  try:
    assert name in envs.available_envs()
    with pytest.raises(ValueError, match="already registered"):
      envs.register(name, SpecEnv)
    envs.register(name, SpecEnv, overwrite=True)
    batched = envs.BatchedEnv(envs.make_env_factory(name), 2, seed=0)
    assert batched.obs_shape == (3,) and batched.num_actions == 2
    # An unsupported spec fails at factory creation, naming the problem.
    with pytest.raises(UnsupportedEnvironmentError, match="continuous"):
      envs.make_env_factory(
          name, act_spec=specs.BoundedArray((), np.float32, -1.0, 1.0))
  finally:
    envs.unregister(name)
  assert name not in envs.available_envs()


def test_register_rejects_bad_constructors():
  with pytest.raises(TypeError):
    envs.register("x", 3)
  with pytest.raises(ValueError):
    envs.register("", SpecEnv)
  def no_seed(corridor_length=3):
    return envs.IMaze(corridor_length=corridor_length)
  envs.register("no_seed_env", no_seed)
  try:
    with pytest.raises(TypeError, match="seed"):
      envs.make_env_factory("no_seed_env")
  finally:
    envs.unregister("no_seed_env")


def test_registry_module_names_match_package_exports():
  assert envs.make_env_factory is registry.make_env_factory


# -- validate_environment ----------------------------------------------------


def test_validate_builtins():
  assert validate_environment(envs.IMaze()) == EnvInfo((36,), 4)
  assert validate_environment(envs.MetaFetch()) == EnvInfo((5, 5, 5), 4)


def test_validate_integer_bounded_action_spec():
  env = SpecEnv(act_spec=specs.BoundedArray((), np.int64, 0, 4))
  assert validate_environment(env).num_actions == 5
  env = SpecEnv(act_spec=specs.BoundedArray((), np.int64, 1, 4))
  with pytest.raises(UnsupportedEnvironmentError, match="minimum 1"):
    validate_environment(env)


@pytest.mark.parametrize("act_spec, message", [
    (specs.BoundedArray((), np.float32, -1.0, 1.0), "continuous"),
    (specs.Array((), np.float64), "continuous"),
    (specs.BoundedArray((2,), np.int32, 0, 3), "multi-dimensional"),
    (specs.Array((), np.int32), "without bounds"),
    ({"move": specs.DiscreteArray(3)}, "nested"),
])
def test_validate_rejects_action_specs(act_spec, message):
  with pytest.raises(UnsupportedEnvironmentError, match=message):
    validate_environment(SpecEnv(act_spec=act_spec))


@pytest.mark.parametrize("obs_spec, message", [
    ({"a": specs.Array((2,), np.float32)}, "FlattenObservation"),
    ((specs.Array((2,), np.float32),), "nested"),
    (specs.Array((2,), np.str_), "not numeric"),
    (specs.Array((2, 2, 2, 2), np.float32), "rank 4"),
    (specs.Array((), np.float32), "rank 0"),
    (specs.Array((0,), np.float32), "empty"),
])
def test_validate_rejects_observation_specs(obs_spec, message):
  assert issubclass(UnsupportedEnvironmentError, ValueError)
  with pytest.raises(UnsupportedEnvironmentError, match=message):
    validate_environment(SpecEnv(obs_spec=obs_spec))


def test_validate_rejects_non_environments():
  with pytest.raises(UnsupportedEnvironmentError,
                     match="not a dm_env.Environment: no reset"):
    validate_environment(object())


# -- FlattenObservation ------------------------------------------------------


def test_flatten_observation_orders_by_sorted_key():
  obs_spec = {"b": specs.Array((2, 2), np.int32),
              "a": [specs.Array((), np.uint8), specs.Array((3,), np.float64)]}
  inner = SpecEnv(seed=1, obs_spec=obs_spec)
  env = FlattenObservation(inner)
  assert validate_environment(env) == EnvInfo((8,), 2)
  reference = SpecEnv(seed=1, obs_spec=obs_spec)
  got, want = env.reset().observation, reference.reset().observation
  expected = np.concatenate([[want["a"][0]], want["a"][1],
                             want["b"].reshape(-1)]).astype(np.float32)
  assert got.dtype == np.float32
  np.testing.assert_array_equal(got, expected)
  for _ in range(3):
    step = env.step(0)
  step = env.step(0)
  assert step.last() and env.episode_success() is True


def test_flatten_observation_makes_rank_2_usable_in_batched_env():
  factory = lambda seed: FlattenObservation(
      SpecEnv(seed, obs_spec=specs.Array((2, 3), np.int8)))
  batched = envs.BatchedEnv(factory, 2, seed=0)
  assert batched.obs_shape == (6,)
  assert batched.reset().observation.shape == (2, 6)


def test_flatten_observation_rejects_non_numeric_leaf():
  with pytest.raises(UnsupportedEnvironmentError, match="obs/x|observation/x"):
    FlattenObservation(SpecEnv(obs_spec={"x": specs.Array((1,), np.str_)}))


def test_the_environments_import_without_jax():
  """ald_jax.envs is numpy-only: actor-side and user code that only builds
  environments does not pay for importing JAX and Flax."""
  code = ("import sys, ald_jax.envs, ald_jax.envs.imaze, ald_jax.envs.batched;"
          "print(sorted(m for m in ('jax', 'flax', 'chex') if m in sys.modules))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True,
                       text=True, check=True)
  assert out.stdout.strip() == "[]", out.stdout
