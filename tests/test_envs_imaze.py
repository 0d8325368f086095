"""I-Maze: dm_env conformance, hand-computed views, oracles, memory need."""
from absl.testing import absltest
import dm_env
from dm_env import test_utils
import numpy as np
import pytest

from ald_jax.envs import imaze
from ald_jax.envs.imaze import DOWN, LEFT, RIGHT, UP
from ald_jax.envs.imaze import IMaze


def oracle_actions(env: IMaze) -> list[int]:
  """Reads the true indicator: straight up, then towards the paying goal."""
  return [UP] * env.corridor_length + [LEFT if env.indicator == 0 else RIGHT]


def run_episode(env: IMaze, actions) -> list[dm_env.TimeStep]:
  """Resets, then plays `actions` (a list, or a function of the reset env)."""
  steps = [env.reset()]
  if callable(actions):
    actions = actions(env)
  for a in actions:
    steps.append(env.step(a))
    if steps[-1].last():
      break
  return steps


class IMazeConformanceTest(test_utils.EnvironmentTestMixin, absltest.TestCase):

  def make_object_under_test(self):
    return IMaze(seed=3, corridor_length=3)

  def make_action_sequence(self):
    # Ends episodes at the goals, by timeout and mid-way, then random moves.
    rng = np.random.default_rng(0)
    for _ in range(3):
      yield from [UP, UP, UP, LEFT, UP, UP, UP, RIGHT]
    yield from rng.integers(4, size=60).tolist()


class IMazeGridConformanceTest(test_utils.EnvironmentTestMixin,
                               absltest.TestCase):

  def make_object_under_test(self):
    return IMaze(seed=4, corridor_length=2, time_limit=5, flat_obs=False)

  def make_action_sequence(self):
    yield from [DOWN] * 12 + [UP, UP, RIGHT]


def test_start_and_junction_views_are_hand_computed():
  env = IMaze(seed=0, corridor_length=3, flat_obs=False)
  first = env.reset()
  wall = np.zeros(4, np.float32)
  wall[imaze.WALL] = 1
  goal = np.zeros(4, np.float32)
  goal[imaze.GOAL] = 1
  floor = np.zeros(4, np.float32)
  indicator = np.zeros(4, np.float32)
  indicator[imaze.INDICATOR_0 + env.indicator] = 1
  expected_start = np.array([[wall, floor, wall],
                             [wall, floor, wall],
                             [wall, indicator, wall]])
  np.testing.assert_array_equal(first.observation, expected_start)
  assert env.agent_position == (3, 1)
  for _ in range(3):
    step = env.step(UP)
  expected_junction = np.array([[wall, wall, wall],
                                [goal, floor, goal],
                                [wall, floor, wall]])
  assert env.agent_position == (0, 1)
  assert step.step_type == dm_env.StepType.MID
  np.testing.assert_array_equal(step.observation, expected_junction)
  # The flat observation is the same view, raveled.
  flat = IMaze(seed=0, corridor_length=3)
  np.testing.assert_array_equal(flat.reset().observation,
                                expected_start.reshape(-1))
  assert flat.observation_spec().shape == (36,)


def test_walls_block_moves():
  env = IMaze(seed=0, corridor_length=2)
  env.reset()
  for action in (DOWN, LEFT, RIGHT):
    step = env.step(action)
    assert env.agent_position == (2, 1)
    assert step.mid()
  env.step(UP)
  env.step(UP)
  env.step(UP)  # Wall above the junction.
  assert env.agent_position == (0, 1)


@pytest.mark.parametrize("corridor_length", [1, 4, 9])
def test_oracle_reading_indicator_always_succeeds(corridor_length):
  env = IMaze(seed=1, corridor_length=corridor_length)
  colours = []
  for _ in range(200):
    steps = run_episode(env, oracle_actions)
    colours.append(env.indicator)
    assert steps[-1].last() and steps[-1].reward == 1.0
    assert steps[-1].discount == 0.0
    assert len(steps) == corridor_length + 2  # FIRST + N ups + 1 side step
    assert env.episode_success() is True
  assert 0 < np.mean(colours) < 1


def test_indicator_ignoring_policy_succeeds_half_the_time():
  # The best a memoryless policy can do: reach the junction, guess a side.
  env = IMaze(seed=2)
  rng = np.random.default_rng(7)
  episodes = 2000
  guessed, always_left = [], []
  for _ in range(episodes):
    run_episode(env, [UP] * env.corridor_length + [rng.choice([LEFT, RIGHT])])
    guessed.append(env.episode_success())
    run_episode(env, [UP] * env.corridor_length + [LEFT])
    always_left.append(env.episode_success())
  # Binomial std at n=2000 is 0.011: +-0.05 is a 4.5-sigma band.
  assert abs(np.mean(guessed) - 0.5) < 0.05
  assert abs(np.mean(always_left) - 0.5) < 0.05


@pytest.mark.parametrize("goal_action", [LEFT, RIGHT])
def test_only_the_start_view_depends_on_the_indicator(goal_action):
  # Visits every cell type: the whole corridor twice and a goal. The colours'
  # views differ only at the start cell, so no reactive policy can tell the
  # colours apart anywhere else: memoryless success is at most 50%.
  n = 4
  path = [UP] * n + [DOWN] * n + [UP] * n + [goal_action]
  views = {}
  env = IMaze(seed=0, corridor_length=n)
  while len(views) < 2:
    steps = run_episode(env, path)
    views[env.indicator] = [s.observation for s in steps]
  start_steps = {0, 2 * n}
  assert len(views[0]) == len(views[1]) == len(path) + 1
  for t, (v0, v1) in enumerate(zip(views[0], views[1])):
    if t in start_steps:
      assert not np.array_equal(v0, v1)
    else:
      np.testing.assert_array_equal(v0, v1)


def test_random_policy_reaches_a_goal_often_at_defaults():
  # The documented exploration claim behind the default N and time limit.
  env = IMaze(seed=3)
  rng = np.random.default_rng(0)
  reached = []
  for _ in range(1000):
    steps = run_episode(env, rng.integers(4, size=env.time_limit).tolist())
    reached.append(steps[-1].discount == 0.0)
  assert env.corridor_length == 4 and env.time_limit == 28
  assert 0.30 < np.mean(reached) < 0.45  # measured ~0.37; std 0.015


def test_wrong_goal_pays_wrong_reward_and_ends():
  env = IMaze(seed=5, corridor_length=2, wrong_reward=-0.5)
  steps = run_episode(
      env, lambda e: [UP, UP, RIGHT if e.indicator == 0 else LEFT])
  assert steps[-1].last() and steps[-1].reward == -0.5
  assert steps[-1].discount == 0.0
  assert env.episode_success() is False
  assert env.step(UP).first()  # Auto-reset after LAST.
  assert env.episode_success() is None


def test_timeout_truncates_with_configured_discount():
  for discount in (1.0, 0.0):
    env = IMaze(seed=0, corridor_length=3, time_limit=7,
                time_limit_discount=discount)
    steps = run_episode(env, [DOWN] * 100)
    assert len(steps) == 8
    assert [s.step_type for s in steps[1:-1]] == [dm_env.StepType.MID] * 6
    assert steps[-1].last() and steps[-1].reward == 0.0
    assert steps[-1].discount == discount
    assert env.episode_success() is False


def test_time_limit_grows_with_corridor_length():
  limits = [IMaze(corridor_length=n).time_limit for n in range(1, 20)]
  assert all(b > a for a, b in zip(limits, limits[1:]))
  assert all(limit >= 2 * (n + 1) for n, limit in enumerate(limits, 1))


def _trajectory(seed, episodes=30):
  env = IMaze(seed=seed, corridor_length=2, time_limit=6)
  actions = np.random.default_rng(0).integers(4, size=episodes * 6)
  out = [env.reset()]
  for a in actions:
    out.append(env.step(a))
  return out


def test_same_seed_same_trajectory_different_seed_differs():
  a, b, c = _trajectory(11), _trajectory(11), _trajectory(12)
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.step_type == y.step_type and x.reward == y.reward
    np.testing.assert_array_equal(x.observation, y.observation)
  assert any(not np.array_equal(x.observation, y.observation)
             for x, y in zip(a, c))


def test_observations_are_read_only():
  env = IMaze(seed=0)
  obs = env.reset().observation
  with pytest.raises(ValueError):
    obs[0] = 5.0


@pytest.mark.parametrize("kwargs, name", [
    (dict(corridor_length=0), "corridor_length"),
    (dict(corridor_length=2.5), "corridor_length"),
    (dict(corridor_length=4, time_limit=4), "time_limit"),
    (dict(wrong_reward=float("nan")), "wrong_reward"),
    (dict(time_limit_discount=1.5), "time_limit_discount"),
    (dict(flat_obs="yes"), "flat_obs"),
])
def test_bad_arguments_name_the_argument(kwargs, name):
  with pytest.raises(ValueError, match=name):
    IMaze(**kwargs)


def test_out_of_range_action_raises():
  env = IMaze(seed=0)
  env.reset()
  with pytest.raises(ValueError, match="action"):
    env.step(4)
