"""What every actor-process pool shares: the process side and the learner's
bookkeeping, with no process machinery (Ray or multiprocessing) in it.

Process side: an `ActorGroup` is the `threads_per_actor_process` pinned
`ActorThread`s one actor process runs; each poll of the process returns a
`PollReply` (the unrolls ready by then as numpy arrays, finished episodes,
each thread's counters, T_actor samples when asked, seconds since each
thread last progressed, the first error).

Learner side: a `ProcessSlot` is the learner's view of one actor process
over its incarnations; `ProcessPoolBase` takes replies (unrolls, episodes,
the stall rule), counts restarts against `max_actor_restarts` and builds the
metric-row fields, the same way for `ray_pool.RayActorPool` and
`process_pool.LocalProcessPool`. Process p hosts actors p*N .. p*N+N-1
(N: `threads_per_actor_process`).
"""
from __future__ import annotations

import os
import queue as queue_lib
import threading
import time
from typing import Any, NamedTuple, Sequence

from absl import logging
import numpy as np

from ald_jax import config as config_lib
from ald_jax import learner as learner_lib  # ActorCore, the actor contract
from ald_jax import types
from ald_jax.system import actor as actor_lib
from ald_jax.system import errors
from ald_jax.system import params as params_lib
from ald_jax.system import pool as pool_lib
from ald_jax.system import timing

# Actor processes act on their CPU (never grab the learner's accelerator).
ACTOR_PROCESS_ENV = {"JAX_PLATFORMS": "cpu"}
POLL_S = 0.5            # how long a process's poll waits for an unroll
# A process that has not answered yet is building its core and compiling:
# it gets this much longer than actor_stall_s before it counts as stuck.
STARTUP_GRACE_S = 60.0
LATENCY_SAMPLES = 4096  # T_actor samples a process sends per report
RESTART_SEED_STRIDE = 7919  # action seeds of incarnation k: seed + k * this


class LatencySnapshot(NamedTuple):
  """A process's T_actor record, shaped for `timing.merge_latency`."""
  values: np.ndarray
  count: int
  max_ns: int
  over_budget: int
  budget_ms: float | None

  def values_ns(self) -> np.ndarray:
    return self.values

  def summary(self) -> timing.LatencySummary:
    return timing.merge_latency([self])


class PollReply(NamedTuple):
  """What one poll of an actor process returns; lists are per thread, in
  actor-id order."""
  unrolls: list[types.Batch]
  episodes: list[actor_lib.Episode]
  stats: list[actor_lib.ActorStats]
  latency: list[LatencySnapshot] | None  # only when asked (report time)
  idle_s: list[float]             # seconds since each thread last progressed
  error: str | None               # "actor I: Type: message" of the failure
  error_traceback: str | None
  pid: int
  node_id: str                    # the Ray node the process runs on ("": none)


def snapshot(recorder: timing.LatencyRecorder) -> LatencySnapshot:
  return LatencySnapshot(recorder.latest_ns(LATENCY_SAMPLES),
                         recorder.count, recorder.max_ns,
                         recorder.over_budget, recorder.budget_ms)


class ActorGroup:
  """The actor threads of one actor process, run and reported as one unit.

  Thread k acts as actor `actor_ids[k]` (its envs, seed and stream ids are
  the ones that actor has in thread mode; a restarted process, `incarnation`
  > 0, asks `spec.make_env` for that incarnation's envs) pinned to
  `cores[k]`. The threads share one parameter slot, one unroll queue and one
  stop event: a thread that fails stops its siblings, and the error names
  the failing actor. Plain threads: a pool's process wraps it.
  """

  def __init__(self, actor_ids: Sequence[int], spec: pool_lib.ActorSpec,
               core: learner_lib.ActorCore, seeds: Sequence[int],
               cores: Sequence[frozenset[int] | None], queue_capacity: int,
               poll_s: float = 0.1, incarnation: int = 0):
    if not actor_ids or not len(actor_ids) == len(seeds) == len(cores):
      raise ValueError(f"one seed and one core set per actor id, got "
                       f"{len(actor_ids)} ids, {len(seeds)} seeds, "
                       f"{len(cores)} core sets")
    self._stop = threading.Event()
    self._errors = errors.ErrorHolder(self._stop)
    self._slot = params_lib.ParamsSlot()
    self._queue: queue_lib.Queue = queue_lib.Queue(
        maxsize=queue_capacity * len(actor_ids))

    def env_maker(actor_id: int):
      if incarnation:  # a restarted process: fresh environment seeds
        return lambda: spec.make_env(actor_id, incarnation)
      return lambda: spec.make_env(actor_id)

    self.threads = [
        actor_lib.ActorThread(
            actor_id, env_maker(actor_id), core, self._slot, self._queue,
            self._stop, self._errors,
            unroll_length=spec.unroll_length,
            context_length=spec.context_length, seed=seed, cores=thread_cores,
            t_actor_budget_ms=spec.t_actor_budget_ms,
            stream_offset=actor_id * spec.envs_per_actor,
            env_info=spec.env_info, nonfinite_obs=spec.nonfinite_obs,
            poll_s=poll_s)
        for actor_id, seed, thread_cores in zip(actor_ids, seeds, cores)]

  @property
  def params_version(self) -> int:
    return self._slot.version

  def start(self) -> None:
    """Starts every thread; they act once the first parameters arrive."""
    now = time.monotonic()
    for thread in self.threads:
      thread.last_progress = now
      thread.start()

  def publish(self, params: Any, version: int) -> None:
    self._slot.publish(params, copy_to_host=False, version=version)

  def take_unrolls(self, timeout_s: float) -> list[types.Batch]:
    """Waits up to `timeout_s` for one unroll, then takes all that are ready."""
    unrolls = []
    deadline = time.monotonic() + timeout_s
    while not unrolls or not self._queue.empty():
      try:
        unrolls.append(self._queue.get(
            timeout=max(0.0, deadline - time.monotonic())))
      except queue_lib.Empty:
        break
    return unrolls

  def report(self, unrolls: list[types.Batch], with_latency: bool,
             node_id: str = "") -> PollReply:
    now = time.monotonic()
    error, error_traceback = self._errors.first()
    return PollReply(
        unrolls, [e for t in self.threads for e in t.drain_episodes()],
        [t.stats() for t in self.threads],
        [snapshot(t.latency) for t in self.threads] if with_latency else None,
        [now - t.last_progress for t in self.threads],
        error, error_traceback, os.getpid(), node_id)

  def stop(self, timeout_s: float) -> bool:
    """Stops every thread within one deadline; True if all ended."""
    self._stop.set()
    deadline = time.monotonic() + timeout_s
    for thread in self.threads:
      if thread.ident is not None:
        thread.join(max(0.0, deadline - time.monotonic()))
    return not any(t.is_alive() for t in self.threads)


class ProcessSlot:
  """The learner's view of one actor process: its current incarnation and
  history. It hosts actors `actor_ids` (one thread each); `handle` and
  `pending` belong to the pool (a Ray actor and its poll's ObjectRef, or a
  child process and whether a poll is outstanding)."""

  def __init__(self, process_id: int, actor_ids: Sequence[int]):
    self.process_id = process_id
    self.actor_ids = list(actor_ids)
    self.handle: Any = None
    self.pending: Any = None          # the outstanding poll, if any
    self.pending_since = 0.0
    self.last: PollReply | None = None
    self.latency: list[LatencySnapshot] | None = None
    self.env_steps_before = 0         # env steps of earlier incarnations
    self.restarts = 0
    self.unrolls_received = 0
    self.last_failure = ""
    self.pids: list[int] = []
    self.node_ids: set[str] = set()

  @property
  def name(self) -> str:
    ids = self.actor_ids
    actors = (f"actor {ids[0]}" if len(ids) == 1
              else f"actors {ids[0]}-{ids[-1]}")
    return f"actor process {self.process_id} ({actors})"

  @property
  def env_steps(self) -> int:
    now = (sum(s.env_steps for s in self.last.stats)
           if self.last is not None else 0)
    return self.env_steps_before + now

  def seeds(self, spec: pool_lib.ActorSpec) -> list[int]:
    """Action seeds of this incarnation's threads (incarnation 0: thread
    mode's)."""
    return [spec.seed_for(i) + RESTART_SEED_STRIDE * self.restarts
            for i in self.actor_ids]


def reply_error(slot: ProcessSlot, reply: PollReply) -> errors.RunError:
  """The run's error for an actor failure a process reported."""
  return errors.RunError(
      f"run stopped by an error in {slot.name}, pid {reply.pid}: "
      f"{reply.error}", reply.error_traceback)


def make_slots(num_actors: int, per_process: int) -> list[ProcessSlot]:
  return [ProcessSlot(p, range(p * per_process, (p + 1) * per_process))
          for p in range(num_actors // per_process)]


class ProcessPoolBase:
  """Bookkeeping shared by the actor-process pools (see the module doc).

  A subclass sets up processes and implements `_collect(timeout_s)` (take
  the replies that are in, via `_take`) and `_restart(slot, why)` (count it
  with `_count_restart`, end the process, launch a new one).
  """

  def __init__(self, spec: pool_lib.ActorSpec, config: config_lib.TrainConfig):
    self._spec = spec
    self._config = config
    self._slots = make_slots(spec.num_actors, config.threads_per_actor_process)
    self._actor_unrolls = [0] * spec.num_actors  # received, per actor thread
    self._ready: list[types.Batch] = []
    self._episodes: list[actor_lib.Episode] = []
    self.params_version = 0
    self.num_streams = spec.num_actors * spec.envs_per_actor
    self._want_latency = False
    self._stop_error: errors.RunError | None = None  # found while stopping

  def _collect(self, timeout_s: float) -> None:
    raise NotImplementedError

  def _restart(self, slot: ProcessSlot, why: str) -> None:
    raise NotImplementedError

  def get_unroll(self, timeout_s: float) -> types.Batch | None:
    if not self._ready:
      self._collect(timeout_s)
    return self._ready.pop(0) if self._ready else None

  def _take(self, slot: ProcessSlot, reply: PollReply) -> bool:
    """Takes a reply's unrolls and episodes; True if it restarted the
    process (a stalled thread)."""
    if reply.error is not None:
      raise reply_error(slot, reply)
    slot.last = reply
    if reply.pid not in slot.pids:
      slot.pids.append(reply.pid)
    slot.node_ids.add(reply.node_id)
    if reply.latency is not None:
      slot.latency = reply.latency
    slot.unrolls_received += len(reply.unrolls)
    envs = self._spec.envs_per_actor
    for unroll in reply.unrolls:  # an unroll's rows are one actor's streams
      self._actor_unrolls[int(unroll.stream_id[0]) // envs] += 1
    self._ready.extend(reply.unrolls)
    self._episodes.extend(reply.episodes)
    stall_s = self._config.actor_stall_s
    worst = max(range(len(reply.idle_s)), key=reply.idle_s.__getitem__)
    if stall_s and reply.idle_s[worst] > stall_s:
      self._restart(slot, f"stalled: actor {slot.actor_ids[worst]} made no "
                    f"environment step for {reply.idle_s[worst]:.1f} s "
                    f"(--actor_stall_s={stall_s:g})")
      return True
    return False

  def _count_restart(self, slot: ProcessSlot, why: str) -> None:
    """Counts one restart of `slot`; past the limit raises the run's error."""
    slot.last_failure = why
    limit = self._config.max_actor_restarts
    if sum(s.restarts for s in self._slots) >= limit:
      raise errors.ActorRestartLimitError(
          f"{slot.name} failed and the run is past "
          f"--max_actor_restarts={limit}; its last failure: {why}")
    slot.restarts += 1
    logging.warning("%s %s; restarting it (restart %d of %d)", slot.name,
                    why, sum(s.restarts for s in self._slots), limit)
    slot.env_steps_before = slot.env_steps
    slot.last = None

  def _overdue(self) -> list[ProcessSlot]:
    """Slots whose poll has been outstanding for actor_stall_s (one that has
    not answered since its start gets STARTUP_GRACE_S more)."""
    stall_s = self._config.actor_stall_s
    if not stall_s:
      return []
    now = time.monotonic()
    return [slot for slot in self._slots if slot.pending is not None and
            now - slot.pending_since > stall_s + (
                STARTUP_GRACE_S if slot.last is None else 0.0)]

  def _unresponsive(self, slot: ProcessSlot) -> str:
    return (f"unresponsive for {time.monotonic() - slot.pending_since:.0f} s "
            f"(--actor_stall_s={self._config.actor_stall_s:g})")

  # ---- reporting ----

  @property
  def queue_size(self) -> int:
    return len(self._ready)

  def env_steps(self) -> int:
    return sum(slot.env_steps for slot in self._slots)

  def drain_episodes(self) -> list[actor_lib.Episode]:
    out, self._episodes = self._episodes, []
    return out

  def stats(self) -> dict[str, Any]:
    """Pool-wide fields, per actor thread (`actor{i}_*`: T_actor, sps,
    unrolls received, parameter version) and per process (`process{p}_*`:
    unrolls, env steps, restarts)."""
    # T_actor samples come with the next polls (asked at report time).
    self._want_latency = True
    views = [ThreadView(slot, k, self._spec) for slot in self._slots
             for k in range(len(slot.actor_ids))]
    row = actor_lib.summarize_actors(views, per_actor=True)
    row["env_steps"] = self.env_steps()
    row["actor_restarts"] = sum(s.restarts for s in self._slots)
    for view in views:
      stats = view.stats()
      prefix = f"actor{stats.actor_id}_"
      row[prefix + "unrolls"] = self._actor_unrolls[stats.actor_id]
      row[prefix + "params_version"] = stats.params_version
    for slot in self._slots:
      prefix = f"process{slot.process_id}_"
      row[prefix + "unrolls"] = slot.unrolls_received
      row[prefix + "env_steps"] = slot.env_steps
      row[prefix + "restarts"] = slot.restarts
    return row

  def raise_error(self) -> None:
    """Raises an actor error that the last replies (collected at `stop`)
    held; errors in earlier replies were raised when they came."""
    if self._stop_error is not None:
      raise self._stop_error

  def actor_pids(self) -> list[int]:
    """Every actor process pid seen in this run (tests check they are gone)."""
    return [pid for slot in self._slots for pid in slot.pids]


class ThreadView:
  """Thread k of an actor process seen through the process's latest reply
  (for summarize_actors)."""

  def __init__(self, slot: ProcessSlot, k: int, spec: pool_lib.ActorSpec):
    self._slot = slot
    self._k = k
    self.latency = (slot.latency[k] if slot.latency is not None
                    else LatencySnapshot(np.zeros(0, np.int64), 0, 0, 0,
                                         spec.t_actor_budget_ms))

  def stats(self) -> actor_lib.ActorStats:
    if self._slot.last is not None:
      return self._slot.last.stats[self._k]
    return actor_lib.ActorStats(self._slot.actor_ids[self._k], 0, 0, 0, 0,
                                0.0, 0.0, 0.0, 0, 0, 0, 0.0, None, 0)
