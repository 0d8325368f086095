"""Bringing observations nobody here wrote: rank 2, dicts, scaling, one-hot."""
import dm_env
from dm_env import specs
import numpy as np
import pytest

from ald_jax import envs
from ald_jax.envs import specs as specs_lib
from ald_jax.envs.specs import AdaptObservation
from ald_jax.envs.specs import EnvInfo
from ald_jax.envs.specs import UnsupportedEnvironmentError
from ald_jax.envs.specs import validate_environment

gymnasium = pytest.importorskip("gymnasium")

from ald_jax.envs.gymnasium_adapter import gymnasium_env_factory  # pylint: disable=g-import-not-at-top
from ald_jax.envs.gymnasium_adapter import GymnasiumEnv  # pylint: disable=g-import-not-at-top

spaces = gymnasium.spaces


class CountingEnv(dm_env.Environment):
  """Observation at step t is `make_obs(t)`; episodes end after 3 actions."""

  def __init__(self, seed, obs_spec, make_obs):
    del seed
    self._spec, self._make, self.t = obs_spec, make_obs, 0

  def reset(self):
    self.t = 0
    return dm_env.restart(self._make(0))

  def step(self, action):
    self.t += 1
    if self.t == 3:
      return dm_env.termination(1.0, self._make(self.t))
    return dm_env.transition(0.0, self._make(self.t))

  def observation_spec(self):
    return self._spec

  def action_spec(self):
    return specs.DiscreteArray(2)

  def episode_success(self):
    return True if self.t == 3 else None


# -- rank 2 --------------------------------------------------------------------


def test_rank_2_observations_are_flattened_and_logged(caplog):
  specs_lib._LOGGED.clear()  # pylint: disable=protected-access
  row = lambda t: np.array([[t, 10 + t, 20 + t]], np.int32)
  factory = lambda seed: CountingEnv(seed, specs.Array((1, 3), np.int32), row)
  with caplog.at_level("INFO"):
    assert validate_environment(factory(0)) == EnvInfo((3,), 2)
    batched = envs.BatchedEnv(factory, 2, seed=0)
  assert batched.obs_shape == (3,)
  np.testing.assert_array_equal(batched.reset().observation,
                                [[0, 10, 20], [0, 10, 20]])
  np.testing.assert_array_equal(batched.step(np.zeros(2, np.int64)).observation,
                                [[1, 11, 21], [1, 11, 21]])
  flattened = [r.getMessage() for r in caplog.records if "(1, 3)" in
               r.getMessage()]
  assert flattened == ["observation spec shape (1, 3) (rank 2) is flattened "
                       "to (3,) for the torso"]  # once, for 3 environments


def test_rank_2_flattening_is_row_major():
  grid = lambda t: np.arange(6, dtype=np.float32).reshape(2, 3) + t
  batched = envs.BatchedEnv(
      lambda seed: CountingEnv(seed, specs.Array((2, 3), np.float32), grid),
      1, seed=0)
  np.testing.assert_array_equal(batched.reset().observation[0],
                                [0, 1, 2, 3, 4, 5])


def test_batched_env_rejects_observations_off_their_rank_2_spec():
  wrong = lambda t: np.zeros((3, 2), np.float32)  # same size, other shape
  batched = envs.BatchedEnv(
      lambda seed: CountingEnv(seed, specs.Array((2, 3), np.float32), wrong),
      1, seed=0)
  with pytest.raises(ValueError, match=r"\(3, 2\).*\(2, 3\)"):
    batched.reset()


# -- dm_env dict observations ---------------------------------------------------


def _minigrid_like_dm_env(seed=0):
  spec = {"image": specs.BoundedArray((7, 7, 3), np.uint8, 0, 255),
          "direction": specs.DiscreteArray(4),
          "mission": specs.Array((), np.str_)}
  def obs(t):
    return {"image": np.full((7, 7, 3), t + 2, np.uint8),
            "direction": np.int64(t % 4), "mission": np.str_("get the key")}
  return CountingEnv(seed, spec, obs)


def test_dm_env_dict_refusal_names_keys_and_only_workable_options():
  with pytest.raises(UnsupportedEnvironmentError) as error:
    validate_environment(_minigrid_like_dm_env())
  message = str(error.value)
  assert "['direction', 'image', 'mission']" in message
  assert "AdaptObservation(env, observation_key=K)" in message
  assert "FlattenObservation" not in message  # the string cannot be flattened
  numeric = CountingEnv(0, {"a": specs.Array((2,), np.float32)},
                        lambda t: {"a": np.zeros(2, np.float32)})
  with pytest.raises(UnsupportedEnvironmentError, match="FlattenObservation"):
    validate_environment(numeric)


def test_dm_env_dict_observation_key_selects_entry():
  env = AdaptObservation(_minigrid_like_dm_env(), observation_key="image")
  assert validate_environment(env) == EnvInfo((7, 7, 3), 2)
  first = env.reset()
  assert first.observation.dtype == np.float32
  np.testing.assert_array_equal(first.observation, np.full((7, 7, 3), 2.0))
  steps = [env.step(0) for _ in range(3)]
  assert steps[-1].last() and env.episode_success() is True
  np.testing.assert_array_equal(steps[-1].observation, np.full((7, 7, 3), 5.0))
  batched = envs.BatchedEnv(lambda seed: AdaptObservation(
      _minigrid_like_dm_env(seed), observation_key="image"), 2, seed=0)
  assert batched.reset().observation.shape == (2, 7, 7, 3)


def test_adapt_observation_errors_name_the_option():
  with pytest.raises(UnsupportedEnvironmentError,
                     match=r"'img'.*\['direction', 'image', 'mission'\]"):
    AdaptObservation(_minigrid_like_dm_env(), observation_key="img")
  with pytest.raises(UnsupportedEnvironmentError, match="'mission'.*numeric"):
    AdaptObservation(_minigrid_like_dm_env(), observation_key="mission")
  with pytest.raises(ValueError, match="observation_scale"):
    AdaptObservation(_minigrid_like_dm_env(), "image", observation_scale=0)
  with pytest.raises(ValueError, match="observation_key"):
    AdaptObservation(_minigrid_like_dm_env(), observation_key=1.5)


def test_adapt_observation_scales_and_logs_the_choice(caplog):
  specs_lib._LOGGED.clear()  # pylint: disable=protected-access
  with caplog.at_level("INFO"):
    raw = AdaptObservation(_minigrid_like_dm_env(), observation_key="image")
    env = AdaptObservation(_minigrid_like_dm_env(), observation_key="image",
                           observation_scale=1 / 255)
  np.testing.assert_array_equal(raw.reset().observation, 2.0)
  np.testing.assert_allclose(env.reset().observation, 2 / 255, rtol=1e-6)
  messages = [r.getMessage() for r in caplog.records]
  assert any("observation_scale=1/255" in m and m.endswith("scaled by 1")
             for m in messages)
  assert any(m.endswith("scaled by 0.00392157") for m in messages)


# -- gymnasium: MiniGrid-style Dict observations -----------------------------


class MissionSpace(gymnasium.Space):
  """Like MiniGrid's mission space: a string gymnasium cannot flatten."""

  def __init__(self):
    super().__init__(None, None)

  def contains(self, x):
    return isinstance(x, str)

  def sample(self, mask=None, probability=None):
    return "get the key"


class FakeMiniGrid(gymnasium.Env):
  """Dict observation like MiniGrid's: `image` uint8 [7, 7, 3] of small
  integer codes, `direction` Discrete(4), `mission` a string. Reaching t = 4
  succeeds (info is_success)."""

  def __init__(self):
    self.observation_space = spaces.Dict({
        "image": spaces.Box(0, 255, (7, 7, 3), np.uint8),
        "direction": spaces.Discrete(4),
        "mission": MissionSpace()})
    self.action_space = spaces.Discrete(3)

  def _obs(self):
    image = np.zeros((7, 7, 3), np.uint8)
    image[3, 6] = (10, 0, self.t)  # agent code 10, colour 0, state t
    return {"image": image, "direction": self.t % 4, "mission": "get the key"}

  def reset(self, *, seed=None, options=None):
    super().reset(seed=seed)
    self.t = 0
    return self._obs(), {}

  def step(self, action):
    self.t += 1
    done = self.t == 4
    return (self._obs(), float(done), done, False,
            {"is_success": True} if done else {})


def test_minigrid_like_dict_works_through_observation_key():
  factory = gymnasium_env_factory(FakeMiniGrid, observation_key="image")
  assert "observation_key='image'" in repr(factory)
  batched = envs.BatchedEnv(factory, 2, seed=0)
  assert batched.obs_shape == (7, 7, 3) and batched.num_actions == 3
  first = batched.reset()
  np.testing.assert_array_equal(first.observation[:, 3, 6], [[10, 0, 0]] * 2)
  rows = [batched.step(np.zeros(2, np.int64)) for _ in range(4)]
  # Unscaled by default: MiniGrid's codes reach the torso as they are.
  np.testing.assert_array_equal(rows[2].observation[:, 3, 6], [[10, 0, 3]] * 2)
  assert np.all(rows[-1].last())
  np.testing.assert_array_equal(rows[-1].episode_success, [1.0, 1.0])
  direction = GymnasiumEnv(FakeMiniGrid(), observation_key="direction")
  np.testing.assert_array_equal(direction.reset().observation, [1, 0, 0, 0])
  np.testing.assert_array_equal(direction.step(0).observation, [0, 1, 0, 0])


def test_nested_space_without_key_is_refused_naming_keys():
  with pytest.raises(UnsupportedEnvironmentError) as error:
    gymnasium_env_factory(FakeMiniGrid)
  message = str(error.value)
  assert "['direction', 'image', 'mission']" in message
  assert "observation_key" in message
  # gymnasium cannot flatten the mission string: not suggested.
  assert "FlattenObservation" not in message


def test_flattenable_nested_space_also_suggests_flattening():
  class BoxAndDiscrete(FakeMiniGrid):
    def __init__(self):
      super().__init__()
      self.observation_space = spaces.Dict({
          "image": self.observation_space["image"],
          "direction": spaces.Discrete(4)})
  with pytest.raises(UnsupportedEnvironmentError,
                     match=r"observation_key.*gymnasium.wrappers."
                     r"FlattenObservation"):
    GymnasiumEnv(BoxAndDiscrete())


def test_bad_observation_key_names_the_keys():
  with pytest.raises(UnsupportedEnvironmentError,
                     match=r"'pixels'.*\['direction', 'image', 'mission'\]"):
    gymnasium_env_factory(FakeMiniGrid, observation_key="pixels")
  with pytest.raises(UnsupportedEnvironmentError, match="not a Dict or Tuple"):
    gymnasium_env_factory("CartPole-v1", observation_key="image")
  with pytest.raises(UnsupportedEnvironmentError, match="'mission'"):
    gymnasium_env_factory(FakeMiniGrid, observation_key="mission")


def test_tuple_space_selected_by_index():
  class TupleObs(FakeMiniGrid):
    def __init__(self):
      super().__init__()
      self.observation_space = spaces.Tuple((spaces.Discrete(4),
                                             MissionSpace()))
    def _obs(self):
      return (self.t % 4, "get the key")
  env = GymnasiumEnv(TupleObs(), observation_key=0)
  np.testing.assert_array_equal(env.reset().observation, [1, 0, 0, 0])


# -- gymnasium: scaling and one-hot ---------------------------------------------


class Pixels(gymnasium.Env):
  """uint8 0-255 pixels: value 51 * t at step t."""

  def __init__(self):
    self.observation_space = spaces.Box(0, 255, (2, 2, 1), np.uint8)
    self.action_space = spaces.Discrete(2)

  def reset(self, *, seed=None, options=None):
    super().reset(seed=seed)
    self.t = 0
    return np.zeros((2, 2, 1), np.uint8), {}

  def step(self, action):
    self.t += 1
    return np.full((2, 2, 1), 51 * self.t, np.uint8), 0.0, self.t == 5, False, {}


def test_uint8_observations_unscaled_by_default_and_scaled_on_request(caplog):
  specs_lib._LOGGED.clear()  # pylint: disable=protected-access
  with caplog.at_level("INFO"):
    raw = GymnasiumEnv(Pixels())
    scaled = GymnasiumEnv(Pixels(), observation_scale=1 / 255)
  raw.reset()
  scaled.reset()
  for t in range(1, 6):
    np.testing.assert_array_equal(raw.step(0).observation, 51.0 * t)
    np.testing.assert_allclose(scaled.step(0).observation, 0.2 * t, rtol=1e-6)
  messages = [r.getMessage() for r in caplog.records]
  assert any("scaled by 1 " in m or m.endswith("scaled by 1") for m in messages)
  assert any("observation_scale=1/255" in m for m in messages)
  assert any("scaled by 0.00392157" in m for m in messages)


def test_bad_observation_scale_names_the_option():
  for bad in (0, -1.0, float("nan"), "1/255", True):
    with pytest.raises(ValueError, match="observation_scale"):
      gymnasium_env_factory(Pixels, observation_scale=bad)


@pytest.mark.parametrize("start", [0, 3, -2])
def test_discrete_observation_one_hot_with_any_start(start):
  class Counter(Pixels):
    def __init__(self):
      super().__init__()
      self.observation_space = spaces.Discrete(5, start=start)
    def reset(self, *, seed=None, options=None):
      self.t = 0
      return start, {}
    def step(self, action):
      self.t += 1
      return start + self.t, 0.0, self.t == 4, False, {}
  env = GymnasiumEnv(Counter())
  assert validate_environment(env) == EnvInfo((5,), 2)
  observations = [env.reset().observation] + [
      env.step(0).observation for _ in range(4)]
  np.testing.assert_array_equal(np.stack(observations), np.eye(5))
