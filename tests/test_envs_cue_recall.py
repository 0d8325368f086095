"""Cue Recall: dm_env conformance, the timeline, oracles, memory need."""
from absl.testing import absltest
import dm_env
from dm_env import test_utils
import numpy as np
import pytest

from ald_jax import envs
from ald_jax.envs.cue_recall import CueRecall


def run_episode(env: CueRecall, policy) -> list[dm_env.TimeStep]:
  """Resets, then acts with `policy(observation) -> action` until LAST."""
  steps = [env.reset()]
  while not steps[-1].last():
    steps.append(env.step(policy(steps[-1].observation)))
  return steps


class RememberingOracle:
  """Stores the cue from the first observation, answers it at the decision."""

  def __init__(self, num_cues: int):
    self.num_cues = num_cues
    self.memory = None

  def __call__(self, obs: np.ndarray) -> int:
    cue = obs[:self.num_cues]
    if cue.any():
      self.memory = int(np.argmax(cue))
    return self.memory if obs[self.num_cues] == 1.0 else 0


class CueRecallConformanceTest(test_utils.EnvironmentTestMixin,
                               absltest.TestCase):

  def make_object_under_test(self):
    return CueRecall(seed=3, span=3, num_distractors=2)

  def make_action_sequence(self):
    yield from np.random.default_rng(0).integers(2, size=60).tolist()


def test_hand_computed_timeline_span_2():
  env = CueRecall(seed=0, span=2, num_cues=3)
  steps = run_episode(env, lambda obs: env.cue)
  cue = np.eye(3, dtype=np.float32)[env.cue]
  expected = [
      np.concatenate([cue, [0.0, 0 / 3]]),         # t=0: cue
      np.array([0, 0, 0, 0.0, 1 / 3], np.float32),  # t=1: delay
      np.array([0, 0, 0, 1.0, 2 / 3], np.float32),  # t=2: decision flag
      np.array([0, 0, 0, 0.0, 3 / 3], np.float32),  # t=3: LAST
  ]
  assert [s.step_type for s in steps] == [
      dm_env.StepType.FIRST, dm_env.StepType.MID, dm_env.StepType.MID,
      dm_env.StepType.LAST]
  for step, obs in zip(steps, expected):
    np.testing.assert_allclose(step.observation, obs, rtol=1e-6)
    assert step.observation.dtype == np.float32
  assert [s.reward for s in steps[1:]] == [0.0, 0.0, 1.0]
  assert steps[-1].discount == 0.0
  assert env.observation_spec().shape == (5,)
  assert env.action_spec().num_values == 3


@pytest.mark.parametrize("span", [1, 8, 16, 32, 64])
def test_episode_takes_span_plus_one_actions_and_oracle_always_succeeds(span):
  env = CueRecall(seed=span, span=span)
  cues = []
  for _ in range(100):
    steps = run_episode(env, RememberingOracle(2))
    cues.append(env.cue)
    # span + 1 actions: the cue at t=0, the decision flag at t=span.
    assert len(steps) == span + 2
    assert steps[0].observation[:2].any()
    assert steps[span].observation[2] == 1.0
    assert sum(s.observation[2] for s in steps) == 1.0
    assert steps[-1].reward == 1.0 and env.episode_success() is True
  assert 0 < np.mean(cues) < 1


def test_batched_episode_length_is_span_plus_one():
  batched = envs.BatchedEnv(envs.make_env_factory("cue_recall", span=8), 3,
                            seed=0)
  batched.reset()
  rows = [batched.step(np.zeros(3, np.int64)) for _ in range(9)]
  assert np.all(rows[-1].last()) and not any(r.last().any() for r in rows[:-1])
  np.testing.assert_array_equal(rows[-1].episode_length, [9, 9, 9])


def test_memoryless_policies_succeed_half_the_time():
  # Deterministic and random functions of the current observation alone.
  env = CueRecall(seed=2, span=8, num_distractors=3)
  rng = np.random.default_rng(7)
  episodes = 2000
  guessed, always_zero, thresholded = [], [], []
  for _ in range(episodes):
    run_episode(env, lambda obs: int(rng.integers(2)))
    guessed.append(env.episode_success())
    run_episode(env, lambda obs: 0)
    always_zero.append(env.episode_success())
    run_episode(env, lambda obs: int(obs[-1] > 0.5))  # reads a distractor
    thresholded.append(env.episode_success())
  # Binomial std at n=2000 is 0.011: +-0.05 is a 4.5-sigma band.
  for successes in (guessed, always_zero, thresholded):
    assert abs(np.mean(successes) - 0.5) < 0.05


def test_only_the_first_observation_depends_on_the_cue():
  env = CueRecall(seed=0, span=6)
  views = {}
  while len(views) < 2:
    steps = run_episode(env, lambda obs: 1)
    views[env.cue] = [s.observation for s in steps]
  assert not np.array_equal(views[0][0], views[1][0])
  for v0, v1 in zip(views[0][1:], views[1][1:]):
    np.testing.assert_array_equal(v0, v1)


def test_wrong_decision_pays_wrong_reward_and_auto_resets():
  env = CueRecall(seed=5, span=3, wrong_reward=-0.5, correct_reward=2.0)
  steps = run_episode(env, lambda obs: 1 - env.cue)
  assert steps[-1].reward == -0.5 and env.episode_success() is False
  assert env.step(0).first()
  assert env.episode_success() is None
  steps = run_episode(env, lambda obs: env.cue)
  assert steps[-1].reward == 2.0


def test_actions_before_the_decision_change_nothing():
  def observations(actions):
    env = CueRecall(seed=4, span=5, num_distractors=2)
    out = [env.reset()]
    out += [env.step(a) for a in actions]
    return out
  a, b = observations([0, 0, 0, 0, 0]), observations([1, 0, 1, 1, 0])
  for x, y in zip(a, b):
    assert x.reward == y.reward and x.step_type == y.step_type
    np.testing.assert_array_equal(x.observation, y.observation)


def test_distractors_are_noise_in_unit_interval():
  env = CueRecall(seed=1, span=4, num_distractors=3)
  steps = run_episode(env, lambda obs: 0)
  noise = np.stack([s.observation[4:] for s in steps])
  assert noise.shape == (6, 3)
  assert np.all((noise >= 0) & (noise < 1)) and len(np.unique(noise)) == 18


def _trajectory(seed):
  env = CueRecall(seed=seed, span=2, num_distractors=1)
  out = [env.reset()]
  for a in np.random.default_rng(0).integers(2, size=90):
    out.append(env.step(a))
  return out


def test_same_seed_same_trajectory_different_seed_differs():
  a, b, c = _trajectory(11), _trajectory(11), _trajectory(12)
  for x, y in zip(a, b):
    assert x.step_type == y.step_type and x.reward == y.reward
    np.testing.assert_array_equal(x.observation, y.observation)
  assert any(not np.array_equal(x.observation, y.observation)
             for x, y in zip(a, c))


def test_registered_by_name_with_defaults():
  assert "cue_recall" in envs.available_envs()
  env = envs.make_env_factory("cue_recall")(0)
  assert env.span == 16 and env.num_cues == 2
  assert envs.validate_environment(env) == envs.EnvInfo((4,), 2)


@pytest.mark.parametrize("kwargs, name", [
    (dict(span=0), "span"),
    (dict(span=8.0), "span"),
    (dict(num_cues=1), "num_cues"),
    (dict(correct_reward=float("inf")), "correct_reward"),
    (dict(wrong_reward="-1"), "wrong_reward"),
    (dict(num_distractors=-1), "num_distractors"),
])
def test_bad_arguments_name_the_argument(kwargs, name):
  with pytest.raises(ValueError, match=name):
    CueRecall(**kwargs)
  with pytest.raises(ValueError, match=name):
    envs.make_env_factory("cue_recall", **kwargs)


def test_out_of_range_action_raises():
  env = CueRecall(seed=0)
  env.reset()
  with pytest.raises(ValueError, match="action"):
    env.step(2)
