"""Actor threads: pinned CPU acting, unroll building, T_actor measurement.

One `ActorThread` owns E environments (a batched env built *inside* the
thread, so construction errors take the same error path as stepping errors),
pins itself to its core set, runs the jitted actor step on the CPU device and
pushes unrolls (`types.Batch` with leading dimension E) into a bounded queue.

Unroll layout (types.py): each row holds C context steps, T unroll steps and
one bootstrap step. Unroll k of a stream covers stream steps
[k*T - C, k*T + T]; consecutive unrolls overlap, the bootstrap step of unroll k
being the first unroll step of unroll k+1. Context steps before the stream's
first step are zeros with step_type MID. `actor_state` is the actor's recorded
recurrent state *before the row's first step* (position 0, stream step
k*T - C; the initial state where that is before the stream started), so the
learner can re-run the actor over the whole row. Each row also carries its
`stream_id` (stream_offset + env index) and `unroll_index` k.

Parameters are refreshed at unroll boundaries, before acting on the shared
step that is the bootstrap step of unroll k and step 0 of unroll k+1: all T
loss-covered steps of an unroll are acted with one parameter version (only
the bootstrap step's action, which no loss uses, comes from the next). The
behaviour logits record what was used either way. Version lag, reported per
unroll when it is pushed, is the learner's latest version minus the version
the unroll was acted with.

Pinning: `os.sched_setaffinity(0, cores)` pins the calling thread on Linux.
JAX's CPU client dispatches asynchronously by default, so the actual compute
would run on JAX's own (unpinned) threads; with
`jax.config.update("jax_cpu_enable_async_dispatch", False)` (set process-wide
by the run module, never here) the call runs on the calling thread and
pinning the thread pins the work. Large ops may still use XLA's intra-op
thread pool; a small LSTM step does not.
"""
from __future__ import annotations

import collections
import threading
import time
import queue as queue_lib
import weakref
from typing import Any, Callable, Collection, NamedTuple, Sequence

from absl import logging
import chex
import jax
import numpy as np

from ald_jax import learner as learner_lib  # ActorCore, the actor contract
from ald_jax import types
from ald_jax.envs import specs as specs_lib
from ald_jax.system import affinity
from ald_jax.system import errors as errors_lib
from ald_jax.system import params as params_lib
from ald_jax.system import timing

Params = Any


class Episode(NamedTuple):
  """A finished episode as reported by the batched environment."""
  episode_return: float
  success: float  # NaN when the environment does not report success
  length: int


class ActorStats(NamedTuple):
  """A snapshot of one actor's counters (read from any thread)."""
  actor_id: int
  env_steps: int        # environment transitions (E per actor step)
  actor_steps: int      # jitted actor calls
  unrolls: int          # unrolls pushed to the queue
  episodes: int         # finished episodes seen
  active_s: float       # acting time: loop time minus the waits below
  wait_queue_s: float   # blocked on a full unroll queue
  wait_params_s: float  # waiting for / transferring parameters
  params_version: int   # version used for the latest unroll
  version_lag: int      # learner version - used version at the latest unroll
  max_version_lag: int
  mean_version_lag: float
  affinity: frozenset[int] | None
  nonfinite_obs_steps: int  # env steps whose non-finite observation was masked

  @property
  def actor_sps(self) -> float:
    """Env steps per second of acting time (waits excluded)."""
    return self.env_steps / self.active_s if self.active_s > 0 else 0.0


_ACT_FNS: "weakref.WeakKeyDictionary[Callable, Callable]" = (
    weakref.WeakKeyDictionary())
_ACT_FNS_LOCK = threading.Lock()


def make_act_fn(core_step: Callable[..., Any]) -> Callable[..., Any]:
  """Jitted acting step: splits the key inside the same call.

  act(params, observation, step_type, state, key)
    -> (action [E] int32, logits [E, A], new_state, next_key)
  One jitted call per step (a separate `jax.random.split` dispatch would cost
  about as much as a small LSTM step). One jitted function per core step, so
  the calibration's compilation serves every actor thread of the process.
  """
  with _ACT_FNS_LOCK:
    act_fn = _ACT_FNS.get(core_step)
    if act_fn is None:
      def act(params, observation, step_type, state, key):
        key, step_key = jax.random.split(key)
        action, logits, new_state = core_step(params, observation, step_type,
                                              state, step_key)
        return action, logits, new_state, key
      act_fn = _ACT_FNS[core_step] = jax.jit(act)
    return act_fn


def _cpu_device() -> jax.Device:
  return jax.devices("cpu")[0]


class _Window:
  """Numpy ring of the last C+T+1 steps of E streams (the next unroll)."""

  def __init__(self, num_envs: int, context: int, unroll: int,
               observation: np.ndarray, logits: np.ndarray):
    e, length = num_envs, context + unroll + 1
    self.context, self.unroll = context, unroll
    # Zeros with step_type MID: the padding before a stream starts.
    self.observation = np.zeros((e, length, *observation.shape[1:]),
                                np.float32)
    self.action = np.zeros((e, length), np.int32)
    self.reward = np.zeros((e, length), np.float32)
    self.discount = np.zeros((e, length), np.float32)
    self.step_type = np.full((e, length), types.MID, np.int32)
    self.behaviour_logits = np.zeros((e, length, logits.shape[-1]), np.float32)

  def write(self, j: int, timestep: Any, action: np.ndarray,
            logits: np.ndarray) -> None:
    """Writes unroll step j (0..T) for every env."""
    t = self.context + j
    self.observation[:, t] = timestep.observation
    self.reward[:, t] = timestep.reward
    self.discount[:, t] = timestep.discount
    self.step_type[:, t] = timestep.step_type
    self.action[:, t] = action
    self.behaviour_logits[:, t] = logits

  def emit(self, actor_state: Any, stream_id: np.ndarray,
           unroll_index: int) -> types.Batch:
    return types.Batch(
        observation=self.observation.copy(), action=self.action.copy(),
        reward=self.reward.copy(), discount=self.discount.copy(),
        step_type=self.step_type.copy(),
        behaviour_logits=self.behaviour_logits.copy(),
        actor_state=actor_state, stream_id=stream_id.copy(),
        unroll_index=np.full(stream_id.shape, unroll_index, np.int32))

  def shift(self) -> None:
    """Keeps the last C+1 steps as the next unroll's context + step 0."""
    for array in (self.observation, self.action, self.reward, self.discount,
                  self.step_type, self.behaviour_logits):
      array[:, :self.context + 1] = array[:, self.unroll:].copy()


def close_quietly(env: Any, who: str) -> None:
  """Closes `env` in a `finally`: a failing close is logged, never raised,
  so it cannot replace the error that ended the loop."""
  try:
    env.close()
  except Exception as error:  # pylint: disable=broad-except
    logging.warning("%s: env.close() failed: %r", who, error)


class ActorThread(threading.Thread):
  """One actor: E envs, jitted CPU acting, unrolls into a bounded queue.

  Args:
    actor_id: index used in names, logs and errors.
    make_env: zero-argument callable returning a batched env (BatchedEnv
      interface: reset(), step(actions), close(), num_envs); called inside
      the thread.
    core: learner_lib.ActorCore (initial_state, step, recorded_state).
    params_slot: where the learner publishes actor parameters.
    unroll_queue: bounded queue receiving `types.Batch` unrolls [E, C+T+1].
    stop_event: shared; set by anyone to stop, set by this thread on error.
    errors: shared ErrorHolder receiving this thread's exception.
    unroll_length: T. context_length: C.
    seed: seeds this actor's action-sampling key.
    cores: core set to pin to (None: no pinning).
    t_actor_budget_ms: budget for the overrun count (None: no budget).
    stream_offset: stream id of this actor's env 0 (None: actor_id * E).
    params_timeout_s: how long to wait for the first parameters.
    env_info: the probed EnvInfo; the actor's environments must match it.
    nonfinite_obs: "error" stops with an error naming the env and step on a
      NaN/inf observation; "mask" zeroes the non-finite values and counts.

  `last_progress` (time.monotonic) moves on every env step and while the
  actor waits on a full queue or for parameters: a stall watchdog compares
  it with the clock.
  """

  def __init__(self, actor_id: int, make_env: Callable[[], Any],
               core: learner_lib.ActorCore,
               params_slot: params_lib.ParamsSlot,
               unroll_queue: queue_lib.Queue, stop_event: threading.Event,
               errors: errors_lib.ErrorHolder, *, unroll_length: int,
               context_length: int, seed: int,
               cores: Collection[int] | None = None,
               t_actor_budget_ms: float | None = None,
               stream_offset: int | None = None,
               params_timeout_s: float = 600.0, poll_s: float = 0.1,
               latency_capacity: int = 1 << 16,
               max_pending_episodes: int = 100_000,
               env_info: specs_lib.EnvInfo | None = None,
               nonfinite_obs: str = "error"):
    super().__init__(name=f"actor-{actor_id}", daemon=True)
    if unroll_length <= 0:
      raise ValueError(f"unroll_length must be > 0, got {unroll_length}")
    if context_length < 0:
      raise ValueError(f"context_length must be >= 0, got {context_length}")
    if nonfinite_obs not in ("error", "mask"):
      raise ValueError(f"nonfinite_obs must be 'error' or 'mask', got "
                       f"{nonfinite_obs!r}")
    self.actor_id = actor_id
    self._make_env = make_env
    self._core = core
    self._slot = params_slot
    self._queue = unroll_queue
    self._stop_event = stop_event
    self._errors = errors
    self._unroll = unroll_length
    self._context = context_length
    self._seed = seed
    self._stream_offset = stream_offset
    self.cores = None if cores is None else frozenset(cores)
    self._params_timeout_s = params_timeout_s
    self._poll_s = poll_s
    self._env_info = env_info
    self._nonfinite_obs = nonfinite_obs
    self._nonfinite_obs_steps = 0
    self.last_progress = time.monotonic()
    self.latency = timing.LatencyRecorder(t_actor_budget_ms, latency_capacity)
    # Finished episodes, drained by the reporting thread (deque ops are
    # thread-safe; the bound caps memory if nobody drains).
    self._episodes: collections.deque[Episode] = collections.deque(
        maxlen=max_pending_episodes)
    self.affinity: frozenset[int] | None = None  # as seen inside the thread
    self.ready = threading.Event()  # set once acting has started
    # Counters: written by this thread only.
    self._env_steps = 0
    self._actor_steps = 0
    self._unrolls = 0
    self._episodes_seen = 0
    self._wait_queue_s = 0.0
    self._wait_params_s = 0.0
    self._loop_start: float | None = None
    self._loop_end: float | None = None
    self.first_params_wait_s = 0.0
    self._params_version = 0   # latest version picked up
    self._unroll_version = 0   # version the latest pushed unroll acted with
    self._lag_last = 0
    self._lag_max = 0
    self._lag_sum = 0

  # ---- read from other threads ----

  def stats(self) -> ActorStats:
    if self._loop_start is None:
      active = 0.0
    else:
      end = (self._loop_end if self._loop_end is not None
             else time.perf_counter())
      active = max(0.0, end - self._loop_start - self._wait_queue_s
                   - self._wait_params_s)
    unrolls = self._unrolls
    return ActorStats(
        actor_id=self.actor_id, env_steps=self._env_steps,
        actor_steps=self._actor_steps, unrolls=unrolls,
        episodes=self._episodes_seen, active_s=active,
        wait_queue_s=self._wait_queue_s, wait_params_s=self._wait_params_s,
        params_version=self._unroll_version, version_lag=self._lag_last,
        max_version_lag=self._lag_max,
        mean_version_lag=self._lag_sum / unrolls if unrolls else 0.0,
        affinity=self.affinity, nonfinite_obs_steps=self._nonfinite_obs_steps)

  def drain_episodes(self) -> list[Episode]:
    out = []
    while True:
      try:
        out.append(self._episodes.popleft())
      except IndexError:
        return out

  # ---- the thread ----

  def run(self) -> None:
    try:
      # First: pin, so everything below (env, compilation) runs on our cores.
      self.affinity = affinity.pin_current_thread(self.cores)
      with jax.default_device(_cpu_device()):
        self._act_loop()
    except BaseException as error:  # pylint: disable=broad-except
      logging.error("actor %d failed: %r", self.actor_id, error)
      self._errors.record(error, f"actor {self.actor_id}")
    finally:
      if self._loop_start is not None:
        self._loop_end = time.perf_counter()

  def _refresh_params(self, params: Params, cpu: jax.Device) -> Params:
    start = time.perf_counter()
    newer = self._slot.get_if_newer(self._params_version)
    if newer is not None:
      self._params_version, params = newer
      params = jax.device_put(params, cpu)
    self._wait_params_s += time.perf_counter() - start
    return params

  def _push(self, unroll: types.Batch, unroll_version: int) -> bool:
    # Lag of the version this unroll's steps were acted with.
    lag = self._slot.version - unroll_version
    self._unroll_version = unroll_version
    self._lag_last = lag
    self._lag_max = max(self._lag_max, lag)
    self._lag_sum += lag
    start = time.perf_counter()
    pushed = False
    while not self._stop_event.is_set():
      try:
        self._queue.put(unroll, timeout=self._poll_s)
        pushed = True
        break
      except queue_lib.Full:
        self.last_progress = time.monotonic()  # waiting on the learner
    self._wait_queue_s += time.perf_counter() - start
    if pushed:
      self._unrolls += 1
    return pushed

  def _record_episodes(self, timestep: Any) -> None:
    for i in np.flatnonzero(np.asarray(timestep.step_type) == types.LAST):
      self._episodes.append(Episode(float(timestep.episode_return[i]),
                                    float(timestep.episode_success[i]),
                                    int(timestep.episode_length[i])))
      self._episodes_seen += 1

  def _check_env(self, env: Any) -> None:
    """The actor's environments must match the probed specs."""
    if self._env_info is None:
      return
    got = specs_lib.EnvInfo(tuple(env.obs_shape), int(env.num_actions))
    if got != self._env_info:
      raise specs_lib.UnsupportedEnvironmentError(
          f"actor {self.actor_id}: its environments have observation shape "
          f"{got.obs_shape} and {got.num_actions} actions, but the probed "
          f"environment had {self._env_info.obs_shape} and "
          f"{self._env_info.num_actions}; every environment the factory "
          "builds must have the same specs")

  def _check_observation(self, timestep: Any, stream_id: np.ndarray,
                         step: int) -> Any:
    """Stops (or masks and counts) on a NaN/inf observation.

    `step`: n after the n-th `env.step` call, 0 after the reset.
    """
    observation = np.asarray(timestep.observation)
    finite = np.isfinite(observation)
    if finite.all():
      return timestep
    bad_envs = np.flatnonzero(~finite.reshape(len(observation), -1).all(-1))
    if self._nonfinite_obs == "error":
      env_index = int(bad_envs[0])
      raise errors_lib.NonFiniteObservationError(
          f"actor {self.actor_id}: environment {env_index} (stream "
          f"{int(stream_id[env_index])}) returned a non-finite observation at "
          f"its step {step} (nonfinite_obs="
          "error; --nonfinite_obs=mask zeroes and counts them instead)")
    self._nonfinite_obs_steps += int(bad_envs.size)
    return timestep._replace(
        observation=np.where(finite, observation, 0).astype(observation.dtype))

  def _act_loop(self) -> None:
    cpu = _cpu_device()
    env = self._make_env()
    try:
      self._check_env(env)
      self._act_with(env, cpu)
    finally:
      close_quietly(env, f"actor {self.actor_id}")

  def _act_with(self, env: Any, cpu: jax.Device) -> None:
    wait_start = time.perf_counter()
    first = self._slot.wait_for_first(self._params_timeout_s,
                                      self._stop_event, self._poll_s)
    self.last_progress = time.monotonic()
    if first is None:
      return  # stopped before any parameters arrived
    self._params_version, params = first
    params = jax.device_put(params, cpu)
    first_wait_s = time.perf_counter() - wait_start

    act = make_act_fn(self._core.step)
    core = self._core
    num_envs = env.num_envs
    state = jax.device_put(core.initial_state(num_envs), cpu)
    key = jax.device_put(jax.random.key(self._seed), cpu)
    stream_id = (np.arange(num_envs, dtype=np.int32) +
                 (self.actor_id * num_envs if self._stream_offset is None
                  else self._stream_offset))
    timestep = self._check_observation(env.reset(), stream_id, 0)
    window = None
    unroll_version = 0
    unroll_index = 0
    # States before each of the last C+T+1 steps (device arrays, no copies):
    # the oldest is the state before the next row's first step. Positions
    # before the stream started hold the initial state.
    states_before = collections.deque([state] * self._context,
                                      maxlen=self._context + self._unroll + 1)
    j = 0  # index in the current unroll of the step about to be acted on
    # Acting time starts after the first (compiling) call; the wait for the
    # first parameters is kept apart (startup, not acting).
    self.first_params_wait_s = first_wait_s

    while not self._stop_event.is_set():
      boundary = j == 0 or j == self._unroll
      if boundary:
        params = self._refresh_params(params, cpu)
        boundary_version = self._params_version
      states_before.append(state)

      start_ns = time.perf_counter_ns()
      out = act(params, timestep.observation, timestep.step_type, state, key)
      jax.block_until_ready(out)
      duration_ns = time.perf_counter_ns() - start_ns
      action, logits, state, key = out
      action = np.asarray(action)
      logits = np.asarray(logits)

      if window is None:  # first call: compiled; not a T_actor sample
        chex.assert_shape(action, (num_envs,))
        chex.assert_rank(logits, 2)
        window = _Window(num_envs, self._context, self._unroll,
                         np.asarray(timestep.observation), logits)
        self._loop_start = time.perf_counter()
        self._wait_params_s = 0.0
        self.ready.set()
      else:
        self.latency.record(duration_ns)
      self._actor_steps += 1

      window.write(j, timestep, action, logits)
      if j == self._unroll:
        row_start_state = jax.device_get(core.recorded_state(
            states_before[0]))
        unroll = window.emit(row_start_state, stream_id, unroll_index)
        if not self._push(unroll, unroll_version):
          return  # stopped while the queue was full
        unroll_index += 1
        window.shift()
      if boundary:
        unroll_version = boundary_version
        j = 1
      else:
        j += 1

      timestep = self._check_observation(
          env.step(action), stream_id, self._env_steps // num_envs + 1)
      self._env_steps += num_envs
      self.last_progress = time.monotonic()
      self._record_episodes(timestep)


def calibrate_core(core: learner_lib.ActorCore, params: Params,
                   obs_shape: Sequence[int], num_envs: int, *,
                   budget_ms: float | None,
                   policy: str = "refuse", num_calls: int = 200,
                   cores: Collection[int] | None = None,
                   seed: int = 0) -> timing.LatencySummary:
  """Calibrates the jitted actor step on dummy inputs, like an actor runs it.

  Runs in a short-lived thread pinned to `cores` (an actor's core set) on the
  CPU device, then applies `policy` (raises timing.TActorBudgetError for
  "refuse" when p99 > budget).
  """
  result: dict[str, Any] = {}

  def calibrate():
    try:
      affinity.pin_current_thread(cores)
      cpu = _cpu_device()
      with jax.default_device(cpu):
        act = make_act_fn(core.step)
        args = (jax.device_put(params, cpu),
                np.zeros((num_envs, *obs_shape), np.float32),
                np.full((num_envs,), types.MID, np.int32),
                jax.device_put(core.initial_state(num_envs), cpu),
                jax.device_put(jax.random.key(seed), cpu))
        result["summary"] = timing.calibrate_actor_step(
            act, args, num_calls=num_calls, budget_ms=budget_ms,
            policy=policy)
        # What an actor thread computes besides the step (compiled here,
        # before any actor starts).
        jax.device_get(core.recorded_state(args[3]))
    except BaseException as error:  # pylint: disable=broad-except
      result["error"] = error

  thread = threading.Thread(target=calibrate, name="t-actor-calibration",
                            daemon=True)
  thread.start()
  thread.join()
  if "error" in result:
    raise result["error"]
  return result["summary"]


def summarize_actors(actors: Sequence[ActorThread],
                     per_actor: bool = False) -> dict[str, float]:
  """Metric-row fields over all actors (see metrics.py for the key names).

  `actor_sps` sums each actor's env steps per second of its own acting time
  (actors act in parallel); T_actor fields merge every actor's recorder.
  """
  stats = [a.stats() for a in actors]
  row: dict[str, float] = {
      "env_steps": sum(s.env_steps for s in stats),
      "actor_sps": sum(s.actor_sps for s in stats),
      "unrolls": sum(s.unrolls for s in stats),
      "version_lag": (float(np.mean([s.version_lag for s in stats]))
                      if stats else 0.0),
      "max_version_lag": max((s.max_version_lag for s in stats), default=0),
      # The oldest parameter version an actor's latest unroll acted with.
      "params_version_oldest": min((s.params_version for s in stats),
                                   default=0),
      "actor_wait_queue_s": sum(s.wait_queue_s for s in stats),
      "actor_wait_params_s": sum(s.wait_params_s for s in stats),
      "actor_active_s": sum(s.active_s for s in stats),
      "nonfinite_obs_masked": sum(s.nonfinite_obs_steps for s in stats),
  }
  row.update(timing.merge_latency(a.latency for a in actors).as_dict())
  if per_actor:
    for actor, s in zip(actors, stats):
      row.update(actor.latency.summary().as_dict(f"actor{s.actor_id}_t_actor_"))
      row[f"actor{s.actor_id}_sps"] = s.actor_sps
  return row
