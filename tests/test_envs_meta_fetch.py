"""Meta-Fetch: dm_env conformance, fetch rules, hidden order, oracles."""
import collections

from absl.testing import absltest
import dm_env
from dm_env import test_utils
import numpy as np
import pytest

from ald_jax.envs import meta_fetch
from ald_jax.envs.meta_fetch import MetaFetch

MOVES = ((-1, 0), (1, 0), (0, -1), (0, 1))  # up, down, left, right


def path_action(env: MetaFetch, target: int) -> int:
  """First move of a shortest path to object `target` around other objects."""
  size = env.grid_size
  goal = env.object_positions[target]
  blocked = {p for k, p in enumerate(env.object_positions)
             if p is not None and k != target}
  prev = {env.agent_position: None}
  queue = collections.deque([env.agent_position])
  while queue and goal not in prev:
    cell = queue.popleft()
    for action, (dr, dc) in enumerate(MOVES):
      nxt = (cell[0] + dr, cell[1] + dc)
      if (0 <= nxt[0] < size and 0 <= nxt[1] < size and nxt not in prev
          and nxt not in blocked):
        prev[nxt] = (cell, action)
        queue.append(nxt)
  if goal not in prev:
    return 0  # Walled in by other objects (rare): any move.
  cell, action = goal, None
  while prev[cell] is not None:
    cell, action = prev[cell]
  return action


class KnowingOracle:
  """Reads the hidden order: the upper bound on reward."""

  def reset(self):
    pass

  def act(self, env):
    return path_action(env, env.order[env.progress])

  def observe(self, progress_before, entered, correct, trial_done):
    pass


class SearchingOracle:
  """Finds the order by systematic trial and error, from rewards only.

  With `forget=True` it forgets what it learnt at every respawn (memory
  within a trial only); with `forget=False` it finds the order once.
  """

  def __init__(self, forget: bool):
    self.forget = forget

  def reset(self):
    self.known = []         # order[:len(known)], verified
    self.excluded = set()   # objects known not to be order[len(known)]

  def act(self, env):
    if env.progress < len(self.known):
      return path_action(env, self.known[env.progress])
    untried = [k for k in range(env.num_objects)
               if k not in self.known and k not in self.excluded]
    return path_action(env, untried[0])

  def observe(self, progress_before, entered, correct, trial_done):
    if entered is not None and progress_before == len(self.known):
      if correct:
        self.known.append(entered)
        self.excluded = set()
      else:
        self.excluded.add(entered)
    if trial_done and self.forget:
      self.reset()


def play(env: MetaFetch, policy, rng) -> float:
  """One episode; `policy` None is uniformly random. Returns the return."""
  step = env.reset()
  if policy is not None:
    policy.reset()
  total = 0.0
  while not step.last():
    if policy is None:
      step = env.step(rng.integers(4))
      total += step.reward
      continue
    cells = {p: k for k, p in enumerate(env.object_positions) if p is not None}
    progress, trials, position = (env.progress, env.trials_completed,
                                  env.agent_position)
    step = env.step(policy.act(env))
    total += step.reward
    entered = (cells.get(env.agent_position)
               if env.agent_position != position else None)
    trial_done = env.trials_completed > trials
    policy.observe(progress, entered, trial_done or env.progress > progress,
                   trial_done)
  return total


def render(env: MetaFetch, last_reward: float) -> np.ndarray:
  """The observation rebuilt from visible state only (no order)."""
  k = env.num_objects
  grid = np.zeros((env.grid_size, env.grid_size, k + 2), np.float32)
  grid[env.agent_position + (0,)] = 1.0
  for obj, position in enumerate(env.object_positions):
    if position is not None:
      grid[position + (1 + obj,)] = 1.0
  grid[:, :, k + 1] = last_reward
  return grid


class MetaFetchConformanceTest(test_utils.EnvironmentTestMixin,
                               absltest.TestCase):

  def make_object_under_test(self):
    return MetaFetch(seed=3, time_limit=25)

  def make_action_sequence(self):
    yield from np.random.default_rng(0).integers(4, size=80).tolist()


class MetaFetchFlatConformanceTest(test_utils.EnvironmentTestMixin,
                                   absltest.TestCase):

  def make_object_under_test(self):
    return MetaFetch(seed=4, grid_size=4, num_objects=2, time_limit=10,
                     flat_obs=True)

  def make_action_sequence(self):
    yield from np.random.default_rng(1).integers(4, size=40).tolist()


def test_observation_is_a_function_of_visible_state_only():
  # Agent, uncollected objects and the last reward: the order never shows.
  env = MetaFetch(seed=0, time_limit=60)
  rng = np.random.default_rng(0)
  for policy in (KnowingOracle(), None):
    step = env.reset()
    np.testing.assert_array_equal(step.observation, render(env, 0.0))
    while not step.last():
      action = rng.integers(4) if policy is None else policy.act(env)
      step = env.step(action)
      np.testing.assert_array_equal(step.observation, render(env, step.reward))
  assert env.observation_spec().shape == (5, 5, 5)


def test_fetch_rules_by_hand():
  env = MetaFetch(seed=5, grid_size=5, num_objects=3, correct_reward=1.0,
                  wrong_reward=-0.5, time_limit=500)
  env.reset()
  first, second, third = env.order
  start_positions = env.object_positions
  # Collect the first object: +1, it disappears, progress 1.
  step = None
  while env.progress == 0:
    step = env.step(path_action(env, first))
  assert step.reward == 1.0
  assert env.object_positions[first] is None
  assert env.agent_position == start_positions[first]
  assert step.observation[start_positions[first] + (1 + first,)] == 0.0
  # Enter the wrong object (the third): wrong reward, progress resets and
  # the collected first object reappears where it was.
  while env.agent_position != start_positions[third]:
    step = env.step(path_action(env, third))
  assert step.reward == -0.5 and env.progress == 0
  assert env.object_positions == start_positions
  assert np.all(step.observation[:, :, -1] == -0.5)
  # Now the full order: a respawn at new cells, with the same order.
  oracle = KnowingOracle()
  rewards = []
  while env.trials_completed == 0:
    step = env.step(oracle.act(env))
    rewards.append(step.reward)
  assert sum(r == 1.0 for r in rewards) == 3
  assert env.order == (first, second, third)
  assert env.progress == 0
  new_positions = env.object_positions
  assert None not in new_positions
  assert env.agent_position not in new_positions
  assert len(set(new_positions)) == 3
  assert np.all(step.observation[:, :, -1] == 1.0)


def test_no_retrigger_without_entering():
  # A no-op move (into the border) while standing on a wrong object pays
  # nothing: objects trigger on entering their cell only.
  checked = 0
  for seed in range(10):
    env = MetaFetch(seed=seed, grid_size=3, num_objects=2, wrong_reward=-1.0,
                    time_limit=500)
    env.reset()
    wrong = env.order[1]
    step = None
    while env.agent_position != env.object_positions[wrong]:
      step = env.step(path_action(env, wrong))
    assert step.reward == -1.0 and env.progress == 0
    r, c = env.agent_position
    blocked = [a for a, (dr, dc) in enumerate(MOVES)
               if not (0 <= r + dr < 3 and 0 <= c + dc < 3)]
    for action in blocked:
      step = env.step(action)
      assert step.reward == 0.0 and env.agent_position == (r, c)
      assert np.all(step.observation[:, :, -1] == 0.0)
      checked += 1
  assert checked > 0


def test_knowing_oracle_beats_forgetting_oracle_and_random():
  env = MetaFetch(seed=1)
  rng = np.random.default_rng(0)
  episodes = 40
  returns = {name: np.mean([play(env, policy, rng) for _ in range(episodes)])
             for name, policy in [("knowing", KnowingOracle()),
                                  ("remembering", SearchingOracle(False)),
                                  ("forgetting", SearchingOracle(True)),
                                  ("random", None)]}
  # Measured (seed 1, 40 episodes): ~29, ~28, ~21, ~2.
  assert returns["knowing"] > 1.2 * returns["forgetting"]
  assert returns["knowing"] > 5 * returns["random"]
  # Finding the order once and recalling it recovers most of the gap.
  assert returns["remembering"] > returns["forgetting"] + 0.5 * (
      returns["knowing"] - returns["forgetting"])


def test_order_fixed_within_episode_and_changes_across_episodes():
  env = MetaFetch(seed=7, time_limit=80)
  oracle = KnowingOracle()
  orders = []
  for _ in range(20):
    step = env.reset()
    order = env.order
    orders.append(order)
    assert sorted(order) == [0, 1, 2]
    while not step.last():
      step = env.step(oracle.act(env))
      assert env.order == order
    assert env.trials_completed >= 2  # the order survived respawns
  assert len(set(orders)) > 1


def test_episode_ends_at_time_limit_with_configured_discount():
  for discount in (1.0, 0.0):
    env = MetaFetch(seed=0, time_limit=9, time_limit_discount=discount)
    step = env.reset()
    steps = 0
    while not step.last():
      step = env.step(0)
      steps += 1
    assert steps == 9 and step.discount == discount
    assert env.episode_success() is None
    assert env.step(0).first()


def _trajectory(seed):
  env = MetaFetch(seed=seed, time_limit=20)
  actions = np.random.default_rng(0).integers(4, size=200)
  out = [env.reset()]
  for a in actions:
    out.append(env.step(a))
  return out


def test_same_seed_same_trajectory_different_seed_differs():
  a, b, c = _trajectory(3), _trajectory(3), _trajectory(4)
  for x, y in zip(a, b):
    assert x.step_type == y.step_type and x.reward == y.reward
    np.testing.assert_array_equal(x.observation, y.observation)
  assert any(not np.array_equal(x.observation, y.observation)
             for x, y in zip(a, c))


def test_observation_is_a_copy():
  env = MetaFetch(seed=0)
  first = env.reset().observation
  kept = first.copy()
  env.step(0)
  env.step(1)
  np.testing.assert_array_equal(first, kept)


@pytest.mark.parametrize("kwargs, name", [
    (dict(grid_size=1), "grid_size"),
    (dict(num_objects=1), "num_objects"),
    (dict(grid_size=2, num_objects=4), "num_objects"),
    (dict(time_limit=0), "time_limit"),
    (dict(correct_reward=float("inf")), "correct_reward"),
    (dict(time_limit_discount=-0.1), "time_limit_discount"),
])
def test_bad_arguments_name_the_argument(kwargs, name):
  with pytest.raises(ValueError, match=name):
    MetaFetch(**kwargs)


def test_action_spec_and_bad_action():
  env = MetaFetch(seed=0)
  assert env.action_spec().num_values == meta_fetch.NUM_ACTIONS == 4
  env.reset()
  with pytest.raises(ValueError, match="action"):
    env.step(-1)
  assert isinstance(env.reset(), dm_env.TimeStep)
