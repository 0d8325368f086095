"""Actor thread tests with a fake batched env and a fake (linear) actor core."""
import os
import queue
import threading
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ald_jax import types
from ald_jax.envs import specs as specs_lib
from ald_jax.system import actor as actor_lib
from ald_jax.system import affinity
from ald_jax.system import params as params_lib
from ald_jax.system import errors as errors_lib
from ald_jax.system import timing

NUM_ACTIONS = 3
OBS_DIM = 3  # [env index, stream step, step within episode]
JOIN_S = 10.0


class FakeTimeStep(NamedTuple):
  step_type: np.ndarray
  reward: np.ndarray
  discount: np.ndarray
  observation: np.ndarray
  episode_return: np.ndarray
  episode_success: np.ndarray
  episode_length: np.ndarray


class CounterEnv:
  """Batched env of fixed per-env episode lengths; auto-resets after LAST.

  Observation of env i at stream step s: [i, s, k] with k the step within the
  episode (0 at FIRST). Reward 1 on every non-FIRST step; discount 0 at LAST.
  Env 0 reports success 1.0, the others do not report success (NaN).
  """

  def __init__(self, episode_lengths, raise_after: int | None = None,
               on_step: Callable[[int], None] | None = None):
    self.episode_lengths = np.asarray(episode_lengths)
    self.num_envs = len(episode_lengths)
    self.obs_shape = (OBS_DIM,)
    self.num_actions = NUM_ACTIONS
    self.raise_after = raise_after
    self.on_step = on_step
    self.steps = 0
    self.closed = False
    self.actions = []

  def _timestep(self, step_type):
    e = self.num_envs
    last = step_type == types.LAST
    obs = np.stack([np.arange(e), self._stream, self._k], -1).astype(np.float32)
    return FakeTimeStep(
        step_type=step_type.astype(np.int32),
        reward=np.where(step_type == types.FIRST, 0.0, 1.0).astype(np.float32),
        discount=np.where(last, 0.0, 1.0).astype(np.float32),
        observation=obs,
        episode_return=np.where(last, self._k, np.nan).astype(np.float32),
        episode_success=np.where(last & (np.arange(e) == 0), 1.0,
                                 np.nan).astype(np.float32),
        episode_length=np.where(last, self._k, 0).astype(np.int32))

  def reset(self):
    self._stream = np.zeros(self.num_envs, np.int64)
    self._k = np.zeros(self.num_envs, np.int64)
    self._last_type = np.full(self.num_envs, types.FIRST)
    return self._timestep(self._last_type)

  def step(self, actions):
    if self.raise_after is not None and self.steps >= self.raise_after:
      raise RuntimeError(f"fake env exploded at step {self.steps}")
    self.steps += 1
    self.actions.append(np.array(actions))
    was_last = self._last_type == types.LAST
    self._stream += 1
    self._k = np.where(was_last, 0, self._k + 1)
    step_type = np.where(
        was_last, types.FIRST,
        np.where(self._k >= self.episode_lengths, types.LAST, types.MID))
    self._last_type = step_type
    if self.on_step is not None:
      self.on_step(self.steps)
    return self._timestep(step_type)

  def close(self):
    self.closed = True


class FakeCore(NamedTuple):
  """Linear policy; the state counts steps since the stream started."""
  initial_state: Callable[[int], Any]
  step: Callable[..., Any]
  recorded_state: Callable[[Any], Any]


def _step(params, observation, step_type, state, key):
  del step_type
  logits = observation @ params["w"]
  action = jax.random.categorical(key, logits).astype(jnp.int32)
  return action, logits, state + 1


FAKE_CORE = FakeCore(
    initial_state=lambda b: jnp.zeros((b,), jnp.int32),
    step=_step,
    recorded_state=lambda state: state)


def _params(scale):
  w = scale * np.arange(OBS_DIM * NUM_ACTIONS, dtype=np.float32).reshape(
      OBS_DIM, NUM_ACTIONS) / 10.0
  return {"w": w}


class Harness(NamedTuple):
  actor: actor_lib.ActorThread
  slot: params_lib.ParamsSlot
  queue: queue.Queue
  stop: threading.Event
  errors: errors_lib.ErrorHolder


def _make_actor(make_env, *, unroll=4, context=3, maxsize=8, cores=None,
                publish=True, budget_ms=None, actor_id=0) -> Harness:
  slot = params_lib.ParamsSlot()
  if publish:
    slot.publish(_params(1.0))
  q = queue.Queue(maxsize=maxsize)
  stop = threading.Event()
  errors = errors_lib.ErrorHolder(stop)
  actor = actor_lib.ActorThread(
      actor_id, make_env, FAKE_CORE, slot, q, stop, errors,
      unroll_length=unroll, context_length=context, seed=7, cores=cores,
      t_actor_budget_ms=budget_ms, poll_s=0.02)
  return Harness(actor, slot, q, stop, errors)


@pytest.fixture(autouse=True)
def _stop_leftover_actors():
  """Stops and joins any actor a failing test left running."""
  yield
  for thread in threading.enumerate():
    if isinstance(thread, actor_lib.ActorThread):
      thread._stop_event.set()  # pylint: disable=protected-access
      thread.join(JOIN_S)


def _collect(h: Harness, n: int) -> list[types.Batch]:
  out = []
  for _ in range(n):
    item = h.queue.get(timeout=JOIN_S)
    out.append(item)
  return out


def _finish(*harnesses: Harness):
  for h in harnesses:
    h.stop.set()
  for h in harnesses:
    h.actor.join(JOIN_S)
    assert not h.actor.is_alive()
  assert not [t for t in threading.enumerate() if t.name.startswith("actor-")]


def test_unroll_layout_padding_overlap_and_state():
  lengths = (5, 7)
  env = CounterEnv(lengths)
  unroll, context = 4, 3
  h = _make_actor(lambda: env, unroll=unroll, context=context)
  h.actor.start()
  unrolls = _collect(h, 4)
  _finish(h)
  assert h.errors.error is None
  assert env.closed
  e, length = len(lengths), context + unroll + 1
  w = _params(1.0)["w"]
  for k, b in enumerate(unrolls):
    b.validate(context=context, unroll=unroll, num_actions=NUM_ACTIONS,
               obs_shape=(OBS_DIM,))
    assert b.batch_size == e
    # Recorded state before the row's first step = steps acted before stream
    # step k*T - C (the initial 0 before the stream started).
    np.testing.assert_array_equal(b.actor_state,
                                  np.full(e, max(0, k * unroll - context)))
    np.testing.assert_array_equal(b.stream_id, np.arange(e))
    np.testing.assert_array_equal(b.unroll_index, np.full(e, k))
    for p in range(length):
      s = k * unroll - context + p  # stream step of position p
      if s < 0:  # zero padding with step_type MID before the stream
        np.testing.assert_array_equal(b.step_type[:, p], types.MID)
        for field in (b.observation, b.action, b.reward, b.discount,
                      b.behaviour_logits):
          assert not np.any(field[:, p])
        continue
      np.testing.assert_array_equal(b.observation[:, p, 0], np.arange(e))
      np.testing.assert_array_equal(b.observation[:, p, 1], s)
      # Step type of env i at stream step s with episodes of length n_i:
      # FIRST every n_i + 1 steps, LAST n_i steps after FIRST.
      for i, n in enumerate(lengths):
        k_in = s % (n + 1)
        expected = (types.FIRST if k_in == 0 else
                    types.LAST if k_in == n else types.MID)
        assert b.step_type[i, p] == expected, (k, p, i)
        assert b.observation[i, p, 2] == k_in
        assert b.discount[i, p] == (0.0 if expected == types.LAST else 1.0)
      np.testing.assert_allclose(b.behaviour_logits[:, p],
                                 b.observation[:, p] @ w, rtol=1e-6)
    assert b.action.min() >= 0 and b.action.max() < NUM_ACTIONS
  # Overlap: the last C+1 steps of unroll k are the first C+1 of unroll k+1,
  # in particular its bootstrap step is unroll k+1's first unroll step.
  for prev, nxt in zip(unrolls, unrolls[1:]):
    for name in ("observation", "action", "reward", "discount", "step_type",
                 "behaviour_logits"):
      np.testing.assert_array_equal(getattr(prev, name)[:, unroll:],
                                    getattr(nxt, name)[:, :context + 1])
  # Actions in unrolls are the ones the env received (stream step s -> call s).
  first = unrolls[0]
  for p in range(context, context + unroll):
    np.testing.assert_array_equal(first.action[:, p], env.actions[p - context])


def test_zero_context_and_unroll_of_one():
  env = CounterEnv((3,))
  h = _make_actor(lambda: env, unroll=1, context=0)
  h.actor.start()
  unrolls = _collect(h, 3)
  _finish(h)
  for k, b in enumerate(unrolls):
    assert b.observation.shape == (1, 2, OBS_DIM)
    np.testing.assert_array_equal(b.observation[0, :, 1], [k, k + 1])


def test_episodes_latency_and_counters():
  env = CounterEnv((2, 3))
  h = _make_actor(lambda: env, unroll=6, context=0, budget_ms=1e6)
  h.actor.start()
  _collect(h, 2)
  _finish(h)
  stats = h.actor.stats()
  # Every env.step call moves both envs.
  assert stats.env_steps == 2 * env.steps
  assert stats.actor_steps >= 12
  # The first (compiling) call is not a T_actor sample.
  assert h.actor.latency.count == stats.actor_steps - 1
  assert h.actor.latency.over_budget == 0
  assert stats.active_s > 0
  episodes = h.actor.drain_episodes()
  assert len(episodes) == stats.episodes > 0
  for ep in episodes:
    assert ep.length in (2, 3) and ep.episode_return == ep.length
  # Env 0 (length 2) reports success; env 1 (length 3) reports NaN.
  assert all(ep.success == 1.0 for ep in episodes if ep.length == 2)
  assert all(np.isnan(ep.success) for ep in episodes if ep.length == 3)
  assert h.actor.drain_episodes() == []


def test_params_refresh_between_unrolls_and_version_lag():
  unroll = 4
  holder = {}

  def on_step(n):  # runs in the actor thread, mid unroll 0
    if n == 2:
      holder["slot"].publish(_params(2.0))
      holder["slot"].publish(_params(3.0))

  env = CounterEnv((50,), on_step=on_step)
  h = _make_actor(lambda: env, unroll=unroll, context=0)
  holder["slot"] = h.slot
  h.actor.start()
  u0, u1 = _collect(h, 2)
  _finish(h)
  w1, w3 = _params(1.0)["w"], _params(3.0)["w"]
  # All T loss-covered steps of an unroll use one version.
  np.testing.assert_allclose(u0.behaviour_logits[:, :unroll],
                             u0.observation[:, :unroll] @ w1, rtol=1e-6)
  np.testing.assert_allclose(u1.behaviour_logits[:, :unroll],
                             u1.observation[:, :unroll] @ w3, rtol=1e-6)
  stats = h.actor.stats()
  # Unroll 0 acted with v1 while the learner reached v3: lag 2; unroll 1 lag 0.
  assert stats.max_version_lag == 2
  assert stats.params_version == 3 and stats.version_lag == 0


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"),
                    reason="needs Linux affinity")
def test_affinity_inside_thread_is_assigned_set():
  main_affinity = os.sched_getaffinity(0)
  assigned = frozenset({min(main_affinity)})
  seen = {}

  class ProbeEnv(CounterEnv):
    def reset(self):
      seen["in_thread"] = frozenset(os.sched_getaffinity(0))
      return super().reset()

  h = _make_actor(lambda: ProbeEnv((4,)), cores=assigned)
  h.actor.start()
  _collect(h, 1)
  _finish(h)
  assert h.errors.error is None
  assert h.actor.affinity == assigned
  assert seen["in_thread"] == assigned
  assert os.sched_getaffinity(0) == main_affinity  # only the thread moved


def test_env_exception_stops_with_cause_and_no_leftover_threads():
  h = _make_actor(lambda: CounterEnv((5,), raise_after=9))
  h.actor.start()
  assert h.stop.wait(JOIN_S), "the error must set the shared stop event"
  h.actor.join(JOIN_S)
  assert not h.actor.is_alive()
  assert isinstance(h.errors.error, RuntimeError)
  assert "fake env exploded at step 9" in str(h.errors.error)
  assert h.errors.where == "actor 0"
  assert "in step" in h.errors.traceback  # the raising frame is kept
  assert not [t for t in threading.enumerate() if t.name.startswith("actor-")]
  with pytest.raises(RuntimeError, match="fake env exploded"):
    h.errors.raise_if_error()


def test_env_construction_error_takes_the_same_path():
  def make_env():
    raise ValueError("no such level")

  h = _make_actor(make_env)
  h.actor.start()
  h.actor.join(JOIN_S)
  assert not h.actor.is_alive()
  assert isinstance(h.errors.error, ValueError) and h.stop.is_set()


class _WatchedQueue(queue.Queue):
  """A queue that reports each put attempt that found it full."""

  def __init__(self, maxsize):
    super().__init__(maxsize)
    self.full_attempts = threading.Semaphore(0)

  def put(self, item, block=True, timeout=None):
    try:
      super().put(item, block, timeout)
    except queue.Full:
      self.full_attempts.release()
      raise


def test_back_pressure_full_queue_then_stop():
  env = CounterEnv((5,))
  unroll = 4
  h = _make_actor(lambda: env, unroll=unroll, maxsize=1)
  watched = _WatchedQueue(1)
  h.actor._queue = watched  # pylint: disable=protected-access
  h.actor.start()
  # Unroll 0 is pushed when acting on stream step T; unroll 1 is complete
  # when acting on step 2T, after 2T env steps, and cannot be pushed. Two
  # failed put attempts prove the actor is blocked there, not acting.
  assert watched.full_attempts.acquire(timeout=JOIN_S)
  assert watched.full_attempts.acquire(timeout=JOIN_S)
  assert env.steps == 2 * unroll
  assert watched.qsize() == 1 and h.actor.stats().unrolls == 1
  _finish(h)
  assert h.errors.error is None


def test_stop_before_first_params_exits_cleanly():
  env = CounterEnv((5,))
  h = _make_actor(lambda: env, publish=False)
  h.actor.start()
  _finish(h)
  assert h.errors.error is None and env.steps == 0 and env.closed


def test_assign_cores_rules():
  spread = affinity.assign_cores(2, reserve_for_learner=1, cores=[0, 1, 2, 3])
  assert spread.learner == {0}
  assert spread.actors == [{1, 2}, {3}] and not spread.shared
  two_core = affinity.assign_cores(2, reserve_for_learner=1, cores=[0, 1])
  assert two_core.learner == {0}
  assert two_core.actors == [{1}, {1}] and two_core.shared
  no_reserve = affinity.assign_cores(2, reserve_for_learner=0, cores=[0, 1])
  assert no_reserve.actors == [{0}, {1}] and no_reserve.learner == {0, 1}
  one_core = affinity.assign_cores(3, reserve_for_learner=1, cores=[5])
  assert one_core.actors == [{5}] * 3 and one_core.learner == {5}
  with pytest.raises(ValueError, match="num_actors"):
    affinity.assign_cores(0)


def test_spread_threads_gives_distinct_cores_while_there_are_enough():
  assert affinity.spread_threads([4, 6, 5], 2) == [{4}, {5}]
  assert affinity.spread_threads([4, 5, 6], 2, offset=2) == [{6}, {4}]
  assert affinity.spread_threads([7], 3) == [{7}] * 3  # shared round-robin
  assert affinity.spread_threads(None, 2) == [None, None]
  with pytest.raises(ValueError, match="num_threads"):
    affinity.spread_threads([0], 0)
  with pytest.raises(ValueError, match="no cores"):
    affinity.spread_threads([], 1)


def test_calibrate_core_refuses_impossible_budget_and_warns():
  params = _params(1.0)
  with pytest.raises(timing.TActorBudgetError) as info:
    actor_lib.calibrate_core(FAKE_CORE, params, (OBS_DIM,), 2,
                             budget_ms=1e-4, policy="refuse", num_calls=20)
  message = str(info.value)
  assert f"{info.value.p99_ms:.4g} ms" in message
  assert "budget of 0.0001 ms" in message
  summary = actor_lib.calibrate_core(FAKE_CORE, params, (OBS_DIM,), 2,
                                     budget_ms=1e-4, policy="warn",
                                     num_calls=20)
  assert summary.window == 20 and summary.over_budget == 20


def test_error_holder_keeps_the_first_error_and_stops_the_run():
  stop = threading.Event()
  errors = errors_lib.ErrorHolder(stop)
  assert errors.message() == "" and not stop.is_set()
  for where, error in (("actor 1", KeyError("first")),
                       ("learner", ValueError("second"))):
    try:
      raise error
    except Exception as e:  # pylint: disable=broad-except
      errors.record(e, where)
  assert stop.is_set() and errors.num_errors == 2
  assert errors.message() == "actor 1: KeyError: 'first'"


def test_error_holder_never_shows_an_error_without_its_traceback(monkeypatch):
  """A poll reply read while a thread is failing gets message and traceback
  together (formatting the traceback is slowed here to widen the window)."""
  format_exception = errors_lib.traceback.format_exception

  def slow_format(*args, **kwargs):
    time.sleep(0.2)
    return format_exception(*args, **kwargs)

  monkeypatch.setattr(errors_lib.traceback, "format_exception", slow_format)
  errors = errors_lib.ErrorHolder()
  seen = []
  done = threading.Event()

  def poll():
    while not done.is_set():
      seen.append(errors.first())

  reader = threading.Thread(target=poll)
  reader.start()
  try:
    raise RuntimeError("env exploded")
  except RuntimeError as e:
    errors.record(e, "actor 0")
  done.set()
  reader.join(JOIN_S)
  assert seen and seen[-1][0] == "actor 0: RuntimeError: env exploded"
  assert all(tb is not None for message, tb in seen if message is not None)


def test_summarize_actors_sums_counters_and_merges_latency():
  envs = [CounterEnv((4,)), CounterEnv((4, 4))]
  harnesses = []
  for i, env in enumerate(envs):
    harnesses.append(_make_actor(lambda env=env: env, unroll=3, context=1,
                                 actor_id=i))
  for h in harnesses:
    h.actor.start()
  for h in harnesses:
    _collect(h, 2)
  _finish(*harnesses)
  actors = [h.actor for h in harnesses]
  row = actor_lib.summarize_actors(actors, per_actor=True)
  assert row["env_steps"] == envs[0].steps * 1 + envs[1].steps * 2
  assert row["t_actor_count"] == sum(a.latency.count for a in actors)
  assert row["actor_sps"] == pytest.approx(
      sum(a.stats().actor_sps for a in actors))
  assert row["actor1_t_actor_count"] == actors[1].latency.count
  assert row["version_lag"] == 0


def _make_actor_with(make_env, **kwargs) -> Harness:
  slot = params_lib.ParamsSlot()
  slot.publish(_params(1.0))
  q = queue.Queue(maxsize=8)
  stop = threading.Event()
  errors = errors_lib.ErrorHolder(stop)
  actor = actor_lib.ActorThread(
      0, make_env, FAKE_CORE, slot, q, stop, errors, unroll_length=4,
      context_length=0, seed=7, poll_s=0.02, **kwargs)
  return Harness(actor, slot, q, stop, errors)


def test_env_not_matching_the_probed_specs_is_refused():
  probed = specs_lib.EnvInfo(obs_shape=(OBS_DIM + 1,), num_actions=NUM_ACTIONS)
  h = _make_actor_with(lambda: CounterEnv((5,)), env_info=probed)
  h.actor.start()
  h.actor.join(JOIN_S)
  assert isinstance(h.errors.error, specs_lib.UnsupportedEnvironmentError)
  assert "actor 0: its environments have observation shape (3,)" in str(
      h.errors.error)


class NaNObsEnv(CounterEnv):
  """Env 1's observation is NaN at env.step call 3 (its step 3)."""

  def step(self, actions):
    timestep = super().step(actions)
    if self.steps == 3:
      observation = timestep.observation.copy()
      observation[1, 2] = np.nan
      timestep = timestep._replace(observation=observation)
    return timestep


def test_nonfinite_observation_error_names_env_stream_and_step():
  h = _make_actor_with(lambda: NaNObsEnv((50, 50)), stream_offset=10)
  h.actor.start()
  h.actor.join(JOIN_S)
  assert str(h.errors.error).startswith(
      "actor 0: environment 1 (stream 11) returned a non-finite observation "
      "at its step 3")


def test_nonfinite_observation_masked_and_counted():
  h = _make_actor_with(lambda: NaNObsEnv((50, 50)), nonfinite_obs="mask")
  h.actor.start()
  unrolls = _collect(h, 1)
  _finish(h)
  assert h.errors.error is None
  # Stream step 3 is unroll 0's position 3: zeroed where it was NaN.
  assert unrolls[0].observation[1, 3, 2] == 0.0
  assert np.all(np.isfinite(unrolls[0].observation))
  assert h.actor.stats().nonfinite_obs_steps == 1


def test_progress_moves_while_blocked_on_a_full_queue():
  h = _make_actor(lambda: CounterEnv((5,)), unroll=4, maxsize=1)
  watched = _WatchedQueue(1)
  h.actor._queue = watched  # pylint: disable=protected-access
  h.actor.start()
  assert watched.full_attempts.acquire(timeout=JOIN_S)
  before = h.actor.last_progress
  assert watched.full_attempts.acquire(timeout=JOIN_S)
  assert watched.full_attempts.acquire(timeout=JOIN_S)
  # No env step happened, yet waiting on the learner counts as progress.
  assert h.actor.last_progress > before
  _finish(h)
