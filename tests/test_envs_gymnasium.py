"""The gymnasium adapter on small gymnasium environments."""
import sys

from absl.testing import absltest
import dm_env
from dm_env import test_utils
import numpy as np
import pytest

gymnasium = pytest.importorskip("gymnasium")

from ald_jax import envs  # pylint: disable=g-import-not-at-top
from ald_jax.envs.gymnasium_adapter import gymnasium_env_factory
from ald_jax.envs.gymnasium_adapter import GymnasiumEnv
from ald_jax.envs.specs import UnsupportedEnvironmentError
from ald_jax.envs.specs import validate_environment

spaces = gymnasium.spaces


class Walk(gymnasium.Env):
  """A 1-D walk: actions {1: left, 2: right} (Discrete(2, start=1)).

  Terminates at position +3 (info is_success True) or -3 (False);
  observation Box(2,) float64 = (position, steps).
  """

  def __init__(self, obs_space=None, act_space=None):
    self.observation_space = obs_space or spaces.Box(-10, 10, (2,), np.float64)
    self.action_space = act_space or spaces.Discrete(2, start=1)
    self.actions = []

  def reset(self, *, seed=None, options=None):
    super().reset(seed=seed)
    self.pos = int(self.np_random.integers(-1, 2))
    self.t = 0
    return np.array([self.pos, self.t], np.float64), {}

  def step(self, action):
    self.actions.append(action)
    self.pos += -1 if action == 1 else 1
    self.t += 1
    done = abs(self.pos) == 3
    info = {"is_success": self.pos == 3} if done else {}
    return np.array([self.pos, self.t], np.float64), 0.5, done, False, info


class CartPoleConformanceTest(test_utils.EnvironmentTestMixin,
                              absltest.TestCase):

  def make_object_under_test(self):
    return GymnasiumEnv(gymnasium.make("CartPole-v1", max_episode_steps=8),
                        seed=0)

  def make_action_sequence(self):
    yield from [0, 1] * 30


def test_cartpole_termination_discount_zero():
  env = GymnasiumEnv(gymnasium.make("CartPole-v1"), seed=0)
  assert validate_environment(env) == envs.EnvInfo((4,), 2)
  step = env.reset()
  assert step.observation.dtype == np.float32
  steps = 0
  while not step.last():
    step = env.step(1)  # Always push right: the pole falls quickly.
    steps += 1
  assert steps < 50 and step.discount == 0.0 and step.reward == 1.0
  assert env.episode_success() is None  # CartPole reports no is_success.
  assert env.step(0).first()


def test_cartpole_truncation_discount_one():
  env = GymnasiumEnv(gymnasium.make("CartPole-v1", max_episode_steps=3),
                     seed=0)
  env.reset()
  steps = [env.step(a) for a in (0, 1, 0)]
  assert [s.step_type for s in steps] == [
      dm_env.StepType.MID, dm_env.StepType.MID, dm_env.StepType.LAST]
  assert steps[-1].discount == 1.0


def test_seeding_same_and_different():
  def observations(seed):
    env = GymnasiumEnv(gymnasium.make("CartPole-v1"), seed=seed)
    out = []
    for _ in range(3):  # Later resets continue the env's seeded RNG.
      step = env.reset()
      out.append(step.observation)
      for a in (0, 1, 1):
        out.append(env.step(a).observation)
    return np.stack(out)
  np.testing.assert_array_equal(observations(3), observations(3))
  assert not np.array_equal(observations(3), observations(4))
  first_episode, second_episode = observations(3)[0], observations(3)[4]
  assert not np.array_equal(first_episode, second_episode)


def test_discrete_action_start_success_and_float32_copy():
  walk = Walk()
  env = GymnasiumEnv(walk, seed=0)
  assert env.action_spec().num_values == 2
  step = env.reset()
  start = int(step.observation[0])
  while not step.last():
    step = env.step(1)  # dm_env action 1 -> gymnasium action 2 (right).
    assert step.reward == 0.5
  assert set(walk.actions) == {2}
  assert step.observation[0] == 3.0 and step.discount == 0.0
  assert step.observation.dtype == np.float32
  assert env.episode_success() is True
  assert len(walk.actions) == 3 - start
  step = env.step(0)  # Auto-reset after LAST.
  assert step.first() and env.episode_success() is None
  while not step.last():
    step = env.step(0)
  assert env.episode_success() is False


def test_discrete_observations_are_one_hot():
  env = GymnasiumEnv(gymnasium.make("FrozenLake-v1", is_slippery=False),
                     seed=0)
  assert validate_environment(env) == envs.EnvInfo((16,), 4)
  step = env.reset()
  np.testing.assert_array_equal(step.observation, np.eye(16)[0])
  step = env.step(2)  # Right: state 1.
  np.testing.assert_array_equal(step.observation, np.eye(16)[1])


@pytest.mark.parametrize("kwargs, message", [
    (dict(act_space=spaces.Box(-1, 1, (1,))), "action space Box"),
    (dict(obs_space=spaces.Dict({"x": spaces.Box(0, 1, (2,))})),
     "gymnasium.wrappers.FlattenObservation"),
    (dict(obs_space=spaces.MultiBinary(3)), "MultiBinary"),
])
def test_unsupported_spaces_are_named(kwargs, message):
  with pytest.raises(UnsupportedEnvironmentError, match=message):
    GymnasiumEnv(Walk(**kwargs))


def test_factory_from_id_and_callable_in_batched_env():
  factory = gymnasium_env_factory("CartPole-v1", max_episode_steps=4)
  assert "CartPole-v1" in repr(factory)
  batched = envs.BatchedEnv(factory, 3, seed=0)
  assert batched.obs_shape == (4,) and batched.num_actions == 2
  first = batched.reset()
  assert len({tuple(o) for o in first.observation}) == 3  # distinct seeds
  last = [batched.step(np.zeros(3, np.int64)) for _ in range(4)][-1]
  assert np.all(last.step_type == 2)
  np.testing.assert_array_equal(last.episode_return, [4.0] * 3)
  np.testing.assert_array_equal(last.episode_length, [4] * 3)
  walk = envs.BatchedEnv(gymnasium_env_factory(Walk), 2, seed=1)
  rows = [walk.step(np.ones(2, np.int64)) for _ in range(6)]
  success = np.concatenate([r.episode_success[r.step_type == 2] for r in rows])
  assert len(success) >= 2 and np.all(success == 1.0)


def test_factory_errors_early():
  with pytest.raises(UnsupportedEnvironmentError, match="Box"):
    gymnasium_env_factory(lambda: Walk(act_space=spaces.Box(-1, 1, (1,))))
  with pytest.raises(Exception, match="NoSuchEnv"):
    gymnasium_env_factory("NoSuchEnv-v0")


def test_missing_gymnasium_gives_install_hint(monkeypatch):
  monkeypatch.setitem(sys.modules, "gymnasium", None)  # import now fails
  with pytest.raises(ImportError, match=r"pip install 'ald_jax\[gymnasium\]'"):
    gymnasium_env_factory("CartPole-v1")
