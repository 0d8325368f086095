"""BatchedEnv: equals stepping one by one, auto-reset, episode statistics."""
import dm_env
from dm_env import specs
import numpy as np
import pytest

from ald_jax import types
from ald_jax.envs.batched import BatchedEnv
from ald_jax.envs.batched import derive_seeds
from ald_jax.envs.imaze import IMaze
from ald_jax.envs.imaze import LEFT, RIGHT, UP
from ald_jax.envs.meta_fetch import MetaFetch
from ald_jax.envs.specs import UnsupportedEnvironmentError


def imaze_factory(seed):
  return IMaze(seed=seed, corridor_length=2, time_limit=5)


def meta_fetch_factory(seed):
  return MetaFetch(seed=seed, grid_size=3, num_objects=2, time_limit=7)


class Counter(dm_env.Environment):
  """Rewards 1, 2, 3, ... ; ends after `length` steps; no success method."""

  def __init__(self, seed, length=3, obs_shape=(2,)):
    self.seed, self.length, self.obs_shape = seed, length, obs_shape

  def reset(self):
    self.t = 0
    return dm_env.restart(np.full(self.obs_shape, self.seed % 1000, np.float64))

  def step(self, action):
    self.t += 1
    obs = np.full(self.obs_shape, self.t, np.float64)
    if self.t == self.length:
      return dm_env.termination(float(self.t), obs)
    return dm_env.transition(float(self.t), obs, discount=0.5)

  def observation_spec(self):
    return specs.Array(self.obs_shape, np.float64)

  def action_spec(self):
    return specs.DiscreteArray(2)


def reference_steps(factory, seeds, actions):
  """Steps envs one by one with explicit dm_env auto-reset bookkeeping."""
  envs = [factory(s) for s in seeds]
  out = []
  last = [None] * len(envs)
  returns = [0.0] * len(envs)
  lengths = [0] * len(envs)
  for t, row in enumerate(actions):
    fields = {k: [] for k in ("step_type", "reward", "discount", "observation",
                              "episode_return", "episode_success",
                              "episode_length")}
    for i, env in enumerate(envs):
      if t == 0 or last[i]:
        step = env.reset()
        returns[i], lengths[i] = 0.0, 0
      else:
        step = env.step(int(row[i]))
        returns[i] += step.reward
        lengths[i] += 1
      last[i] = step.last()
      fields["step_type"].append(int(step.step_type))
      fields["reward"].append(0.0 if step.first() else step.reward)
      fields["discount"].append(1.0 if step.first() else step.discount)
      fields["observation"].append(step.observation)
      fields["episode_return"].append(returns[i] if step.last() else np.nan)
      success = env.episode_success() if step.last() else None
      fields["episode_success"].append(np.nan if success is None else success)
      fields["episode_length"].append(lengths[i] if step.last() else 0)
    out.append(fields)
  return out


@pytest.mark.parametrize("factory", [imaze_factory, meta_fetch_factory])
def test_batched_equals_one_by_one(factory):
  num_envs, num_steps = 5, 120
  batched = BatchedEnv(factory, num_envs, seed=42)
  actions = np.random.default_rng(0).integers(4, size=(num_steps, num_envs))
  expected = reference_steps(factory, batched.seeds, actions)
  saw_last = 0
  for t in range(num_steps):
    got = batched.reset() if t == 0 else batched.step(actions[t])
    for name, values in expected[t].items():
      want = np.array(values)
      np.testing.assert_array_equal(getattr(got, name), want, err_msg=name)
    saw_last += int(np.sum(got.step_type == types.LAST))
  assert saw_last > 20  # Auto-reset was exercised many times.


def test_output_dtypes_and_shapes():
  batched = BatchedEnv(meta_fetch_factory, 3, seed=0)
  step = batched.reset()
  assert step.step_type.dtype == np.int32 and step.step_type.shape == (3,)
  for name in ("reward", "discount", "episode_return", "episode_success"):
    assert getattr(step, name).dtype == np.float32, name
  assert step.episode_length.dtype == np.int32
  assert step.observation.dtype == np.float32
  assert step.observation.shape == (3, 3, 3, 4)
  assert batched.obs_shape == (3, 3, 4) and batched.num_actions == 4
  assert batched.num_envs == 3
  assert batched.observation_spec().shape == (3, 3, 4)
  assert batched.action_spec().num_values == 4


def test_imaze_oracle_batch_statistics_by_hand():
  batched = BatchedEnv(lambda s: IMaze(seed=s, corridor_length=2), 4, seed=1)
  step = batched.reset()
  np.testing.assert_array_equal(step.step_type, [types.FIRST] * 4)
  np.testing.assert_array_equal(step.reward, np.zeros(4))
  np.testing.assert_array_equal(step.discount, np.ones(4))
  assert np.all(np.isnan(step.episode_return))
  # Env 0 goes the right way, the others the wrong way.
  goals = [LEFT if env.indicator == 0 else RIGHT for env in batched.envs]
  wrong = [RIGHT if g == LEFT else LEFT for g in goals]
  decision = np.array([goals[0]] + wrong[1:])
  for _ in range(2):
    step = batched.step(np.full(4, UP))
    np.testing.assert_array_equal(step.step_type, [types.MID] * 4)
    assert np.all(np.isnan(step.episode_success))
    np.testing.assert_array_equal(step.episode_length, np.zeros(4))
  step = batched.step(decision)
  np.testing.assert_array_equal(step.step_type, [types.LAST] * 4)
  np.testing.assert_array_equal(step.reward, [1, -1, -1, -1])
  np.testing.assert_array_equal(step.discount, np.zeros(4))
  np.testing.assert_array_equal(step.episode_return, [1, -1, -1, -1])
  np.testing.assert_array_equal(step.episode_success, [1, 0, 0, 0])
  np.testing.assert_array_equal(step.episode_length, [3, 3, 3, 3])
  # Auto-reset: actions ignored, FIRST with reward 0 and discount 1.
  step = batched.step(np.full(4, LEFT))
  np.testing.assert_array_equal(step.step_type, [types.FIRST] * 4)
  np.testing.assert_array_equal(step.reward, np.zeros(4))
  np.testing.assert_array_equal(step.discount, np.ones(4))
  assert all(env.agent_position == (2, 1) for env in batched.envs)


def test_staggered_episodes_and_no_success_method():
  # Episode lengths 2 and 3: LASTs at different calls; returns 1+2, 1+2+3.
  lengths = {}
  def factory(seed):
    lengths[seed] = 2 + len(lengths)
    return Counter(seed, length=lengths[seed])
  batched = BatchedEnv(factory, 2, seed=0)
  batched.reset()
  rows = [batched.step(np.zeros(2, np.int64)) for _ in range(6)]
  step_types = np.stack([r.step_type for r in rows])
  np.testing.assert_array_equal(step_types[:, 0], [1, 2, 0, 1, 2, 0])
  np.testing.assert_array_equal(step_types[:, 1], [1, 1, 2, 0, 1, 1])
  np.testing.assert_array_equal(rows[1].episode_return, [3, np.nan])
  np.testing.assert_array_equal(rows[2].episode_return, [np.nan, 6])
  np.testing.assert_array_equal(rows[2].episode_length, [0, 3])
  np.testing.assert_array_equal(rows[0].discount, [0.5, 0.5])
  # Counter has no episode_success(): NaN even at LAST.
  assert np.isnan(rows[1].episode_success[0])
  # Observations cast to float32.
  assert rows[0].observation.dtype == np.float32
  np.testing.assert_array_equal(rows[2].observation[0],
                                np.full(2, batched.seeds[0] % 1000))


def test_step_before_reset_resets():
  batched = BatchedEnv(imaze_factory, 3, seed=0)
  step = batched.step(np.zeros(3, np.int32))
  np.testing.assert_array_equal(step.step_type, [types.FIRST] * 3)
  step = batched.step(np.zeros(3, np.int32))
  np.testing.assert_array_equal(step.step_type, [types.MID] * 3)


def test_outputs_are_not_overwritten_by_later_steps():
  batched = BatchedEnv(meta_fetch_factory, 2, seed=0)
  first = batched.reset()
  kept = first.observation.copy()
  for _ in range(5):
    batched.step(np.ones(2, np.int32))
  np.testing.assert_array_equal(first.observation, kept)


def test_seeds_distinct_deterministic_and_seed_dependent():
  assert derive_seeds(0, 64) == derive_seeds(0, 64)
  assert len(set(derive_seeds(0, 64))) == 64
  assert derive_seeds(0, 8) != derive_seeds(1, 8)
  a = BatchedEnv(imaze_factory, 8, seed=3)
  b = BatchedEnv(imaze_factory, 8, seed=3)
  c = BatchedEnv(imaze_factory, 8, seed=4)
  actions = np.random.default_rng(0).integers(4, size=(40, 8))
  obs = {k: [] for k in "abc"}
  for k, env in zip("abc", (a, b, c)):
    obs[k].append(env.reset().observation)
    for row in actions:
      obs[k].append(env.step(row).observation)
  np.testing.assert_array_equal(np.stack(obs["a"]), np.stack(obs["b"]))
  assert not np.array_equal(np.stack(obs["a"]), np.stack(obs["c"]))


def test_bad_inputs():
  batched = BatchedEnv(imaze_factory, 3, seed=0)
  batched.reset()
  with pytest.raises(ValueError, match="shape"):
    batched.step(np.zeros(2, np.int32))
  with pytest.raises(ValueError, match="integers"):
    batched.step(np.zeros(3, np.float32))
  with pytest.raises(ValueError, match="num_envs"):
    BatchedEnv(imaze_factory, 0, seed=0)


def test_mismatched_specs_rejected():
  shapes = iter([(2,), (3,)])
  with pytest.raises(UnsupportedEnvironmentError, match="different specs"):
    BatchedEnv(lambda s: Counter(s, obs_shape=next(shapes)), 2, seed=0)


def test_close_closes_every_env():
  closed = []
  class Closing(Counter):
    def close(self):
      closed.append(self.seed)
  with BatchedEnv(Closing, 3, seed=0) as batched:
    seeds = batched.seeds
  assert sorted(closed) == sorted(seeds)


def test_observation_not_matching_spec_rejected():
  class Liar(Counter):
    def observation_spec(self):
      return specs.Array((5,), np.float64)
  batched = BatchedEnv(Liar, 2, seed=0)
  with pytest.raises(ValueError, match="observation spec shape"):
    batched.reset()
