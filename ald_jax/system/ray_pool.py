"""Actor processes with Ray: `--actors=processes`.

The learner's process runs no actor. Each Ray actor process (`_ActorProcess`)
builds its own learner definition on its own JAX CPU client, builds its
environments itself and runs `threads_per_actor_process` pinned
`ActorThread`s (an `ActorGroup`; one by default) feeding a small local queue.
Actor thread i acts exactly as actor i does in thread mode (envs, seed,
stream ids); process p hosts threads p*N .. p*N+N-1 and asks Ray for N CPUs.
The learner side (`RayActorPool`) keeps one outstanding `poll` call per
process; each call carries the newest parameter version (one `ray.put` per
publish, passed by reference: a process fetches it only when it is newer
than what it has) and returns the unrolls ready by then as numpy arrays, the
finished episodes and each thread's counters.

Pinning: on a local Ray each thread gets the core set thread mode would give
that actor (`affinity.assign_cores`). On a cluster Ray grants a number of
CPUs, not core ids, so a process pins its threads to distinct cores of its
own affinity (`affinity.spread_threads`, spread by actor id).

Faults: a process is one unit. One that dies (kill -9, out of memory) or
makes no progress for `actor_stall_s` (any of its threads stuck in an
environment, or the whole process unresponsive) is killed and started again,
all its threads with the same stream ids (their streams start fresh
episodes, from environment and action seeds of that incarnation;
`unroll_index` restarts at 0, so the learner treats them as new streams).
Restarts are counted (`actor_restarts`, `process{p}_restarts`); past
`max_actor_restarts` the run stops with an error naming the process,
its actors and its last failure (a stall names the stuck thread's actor). An
exception inside an environment stops the run as in thread mode, naming the
process and the failing thread's actor. `stop` ends every process; Ray itself
is shut down when the run started it.
"""
from __future__ import annotations

import copy
import os
import queue as queue_lib
import re
import threading
import time
from typing import Any, NamedTuple, Sequence

from absl import logging
import numpy as np

from ald_jax import config as config_lib
from ald_jax import learner as learner_lib  # ActorCore, the actor contract
from ald_jax import types
from ald_jax.system import actor as actor_lib
from ald_jax.system import affinity
from ald_jax.system import errors
from ald_jax.system import params as params_lib
from ald_jax.system import pool as pool_lib
from ald_jax.system import queue as queue_utils
from ald_jax.system import timing

# Ray refuses multi-node clusters on Windows/macOS unless this is set; the
# run sets it to "0" (no such cluster) for itself and its actor processes.
RAY_CLUSTER_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
# Actor processes act on their CPU (never grab the learner's accelerator).
ACTOR_PROCESS_ENV = dict(RAY_CLUSTER_ENV, JAX_PLATFORMS="cpu")
POLL_S = 0.5            # how long a process's poll call waits for an unroll
# A process that has not answered yet is building its core and compiling:
# it gets this much longer than actor_stall_s before it counts as stuck.
STARTUP_GRACE_S = 60.0
LATENCY_SAMPLES = 4096  # T_actor samples a process sends per report
_FAILURE_CHARS = 2000   # of a dead process's error kept in the message
_ANSI_COLOUR = re.compile(r"\x1b\[[0-9;]*m")  # Ray colours its messages


def _import_ray():
  try:
    import ray  # pylint: disable=import-outside-toplevel
  except ImportError as error:
    raise config_lib.ConfigError(
        "actors: 'processes' needs Ray: pip install 'ald_jax[ray]'") from error
  return ray


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
  node_id: str                    # the Ray node the process runs on


def _snapshot(recorder: timing.LatencyRecorder) -> LatencySnapshot:
  return LatencySnapshot(recorder.latest_ns(LATENCY_SAMPLES),
                         recorder.count, recorder.max_ns,
                         recorder.over_budget, recorder.budget_ms)


class ActorGroup:
  """The actor threads of one actor process, run and reported as one unit.

  Thread k acts as actor `actor_ids[k]` (its envs, seed and stream ids are
  the ones that actor has in thread mode; a restarted process, `incarnation`
  > 0, asks `spec.make_env` for that incarnation's envs) pinned to
  `cores[k]`. The threads
  share one parameter slot, one unroll queue and one stop event: a thread
  that fails stops its siblings, and the error names the failing actor.
  Plain threads, no Ray: `_ActorProcess` wraps it in a Ray actor.
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
    self._errors = queue_utils.ErrorHolder(self._stop)
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
    return PollReply(
        unrolls, [e for t in self.threads for e in t.drain_episodes()],
        [t.stats() for t in self.threads],
        [_snapshot(t.latency) for t in self.threads] if with_latency else None,
        [now - t.last_progress for t in self.threads],
        self._errors.message() or None, self._errors.traceback, os.getpid(),
        node_id)

  def stop(self, timeout_s: float) -> bool:
    """Stops every thread within one deadline; True if all ended."""
    self._stop.set()
    deadline = time.monotonic() + timeout_s
    for thread in self.threads:
      if thread.ident is not None:
        thread.join(max(0.0, deadline - time.monotonic()))
    return not any(t.is_alive() for t in self.threads)


class _ActorProcess:
  """Runs inside a Ray actor process: an ActorGroup of pinned threads.

  `cores` holds one core set per thread (a local Ray: assigned by the
  learner like thread mode's) or is None (a cluster: the process pins its
  threads to distinct cores of its own affinity, see
  `affinity.spread_threads`).
  """

  def __init__(self, actor_ids: Sequence[int], spec_blob: bytes,
               learner_config: Any, env_info: Any, seeds: Sequence[int],
               cores: Sequence[frozenset[int] | None] | None,
               queue_capacity: int, incarnation: int = 0):
    import jax  # pylint: disable=import-outside-toplevel
    from ray import cloudpickle  # pylint: disable=import-outside-toplevel
    jax.config.update("jax_cpu_enable_async_dispatch", False)
    spec = cloudpickle.loads(spec_blob)
    core = learner_lib.make_learner(learner_config, env_info.obs_shape,
                                    env_info.num_actions).actor_core
    if cores is None:
      cores = affinity.spread_threads(affinity.available_cores(),
                                      len(actor_ids), offset=actor_ids[0])
    self._ray = _import_ray()
    self._group = ActorGroup(actor_ids, spec, core, seeds, cores,
                             queue_capacity, incarnation=incarnation)
    self._group.start()
    self._node_id = self._ray.get_runtime_context().get_node_id()
    self._version = 0

  def poll(self, version: int, params_ref: list, with_latency: bool
           ) -> PollReply:
    """Takes newer parameters, returns the unrolls ready within POLL_S."""
    if version > self._version:
      params = self._ray.get(params_ref[0])
      self._version = version
      self._group.publish(params, version)
    unrolls = self._group.take_unrolls(POLL_S)
    return self._group.report(unrolls, with_latency, self._node_id)

  def stop(self, timeout_s: float) -> bool:
    """Stops the threads; True if they ended within `timeout_s`."""
    return self._group.stop(timeout_s)


class _Slot:
  """The learner's view of one actor process: its current incarnation and
  history. It hosts actors `actor_ids` (one thread each)."""

  def __init__(self, process_id: int, actor_ids: Sequence[int]):
    self.process_id = process_id
    self.actor_ids = list(actor_ids)
    self.handle: Any = None
    self.pending: Any = None          # the outstanding poll's ObjectRef
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


def _reply_error(slot: _Slot, reply: PollReply) -> errors.RunError:
  """The run's error for an actor failure a process reported."""
  return errors.RunError(
      f"run stopped by an error in {slot.name}, pid {reply.pid}: "
      f"{reply.error}", reply.error_traceback)


class RayActorPool:
  """Actor processes under Ray; see the module doc. Builds nothing until
  `start`. Process p runs actors p*N .. p*N+N-1 (N:
  `config.threads_per_actor_process`) and asks Ray for N CPUs."""

  def __init__(self, spec: pool_lib.ActorSpec, config: config_lib.TrainConfig,
               poll_queue_capacity: int = 2):
    self._spec = spec
    self._config = config
    self._ray = None
    self._connected = False   # this pool called ray.init
    self._started_ray = False  # ... and that started a local Ray
    self._remote_class: Any = None
    per_process = config.threads_per_actor_process  # divides num_actors
    self._slots = [
        _Slot(p, range(p * per_process, (p + 1) * per_process))
        for p in range(spec.num_actors // per_process)]
    self._actor_unrolls = [0] * spec.num_actors  # received, per actor thread
    self._ready: list[types.Batch] = []
    self._episodes: list[actor_lib.Episode] = []
    self._params_ref: Any = None
    self.params_version = 0
    self.num_streams = spec.num_actors * spec.envs_per_actor
    self._queue_capacity = poll_queue_capacity
    self._want_latency = False
    self._spec_blob: bytes | None = None
    self._stop_error: errors.RunError | None = None  # found while stopping

  # ---- lifecycle ----

  def start(self, params: Any) -> None:
    ray = self._ray = _import_ray()
    from ray import cloudpickle  # pylint: disable=import-outside-toplevel
    import ald_jax  # pylint: disable=import-outside-toplevel
    os.environ.update(RAY_CLUSTER_ENV)
    # Actor processes import this ald_jax (same machine; on a cluster each
    # node needs ald_jax installed, and this path is only a hint).
    source_root = os.path.dirname(os.path.dirname(ald_jax.__file__))
    python_path = os.pathsep.join(
        p for p in (source_root, os.environ.get("PYTHONPATH", "")) if p)
    env_vars = dict(ACTOR_PROCESS_ENV, PYTHONPATH=python_path)
    if not ray.is_initialized():
      address = self._config.ray_address or None
      kwargs = {}
      if address is None:  # a local Ray with a CPU slot for each thread
        kwargs["num_cpus"] = max(os.cpu_count() or 1, self._spec.num_actors)
      ray.init(address=address, include_dashboard=False,
               log_to_driver=False, configure_logging=False,
               runtime_env={"env_vars": env_vars}, **kwargs)
      self._connected = True
      self._started_ray = address is None
    self._remote_class = ray.remote(
        num_cpus=self._config.threads_per_actor_process)(_ActorProcess)
    # What a process needs besides the learner config: envs and sizes (the
    # actor core is rebuilt there from the config).
    spec = copy.copy(self._spec)
    spec.core = None
    self._spec_blob = cloudpickle.dumps(spec)
    self.publish(params)
    for slot in self._slots:
      self._launch(slot)

  def _launch(self, slot: _Slot) -> None:
    spec, cfg = self._spec, self._config
    # On a local Ray the learner assigns cores as in thread mode; on a
    # cluster core ids of this machine mean nothing: the process picks.
    cores = ([spec.cores[i] for i in slot.actor_ids] if not cfg.ray_address
             else None)
    seeds = [spec.seed_for(i) + 7919 * slot.restarts for i in slot.actor_ids]
    slot.handle = self._remote_class.remote(
        slot.actor_ids, self._spec_blob, cfg.learner, spec.env_info, seeds,
        cores, self._queue_capacity, slot.restarts)
    slot.last = None
    slot.pending = None
    self._poll(slot)

  def _poll(self, slot: _Slot) -> None:
    slot.pending = slot.handle.poll.remote(
        self.params_version, [self._params_ref], self._want_latency)
    slot.pending_since = time.monotonic()

  def publish(self, params: Any) -> int:
    import jax  # pylint: disable=import-outside-toplevel
    self._params_ref = self._ray.put(jax.device_get(params))
    self.params_version += 1
    return self.params_version

  # ---- unrolls ----

  def get_unroll(self, timeout_s: float) -> types.Batch | None:
    if not self._ready:
      self._collect(timeout_s)
    return self._ready.pop(0) if self._ready else None

  def _collect(self, timeout_s: float) -> None:
    ray = self._ray
    pending = {slot.pending: slot for slot in self._slots
               if slot.pending is not None}
    if not pending:
      return
    done, _ = ray.wait(list(pending), num_returns=1, timeout=timeout_s)
    done, _ = ray.wait(list(pending), num_returns=len(pending), timeout=0) \
        if done else (done, None)
    for ref in done:
      slot = pending[ref]
      try:
        reply = ray.get(ref)
      except (ray.exceptions.RayActorError,
              ray.exceptions.ActorUnavailableError) as error:
        # Ray's message holds the cause (e.g. an exception in the process's
        # start-up, with its traceback): keep it for the restart-limit error.
        message = _ANSI_COLOUR.sub("", str(error))[:_FAILURE_CHARS]
        self._restart(slot, f"process died: {type(error).__name__}: "
                      f"{message}")
        continue
      if not self._take(slot, reply):
        self._poll(slot)  # a restarted slot polls its new process already

  def _take(self, slot: _Slot, reply: PollReply) -> bool:
    """Takes a reply's unrolls and episodes; True if it restarted the
    process (a stalled thread)."""
    if reply.error is not None:
      raise _reply_error(slot, reply)
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

  def _restart(self, slot: _Slot, why: str) -> None:
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
    try:
      self._ray.kill(slot.handle, no_restart=True)
    except Exception:  # pylint: disable=broad-except
      pass
    self._launch(slot)

  def check(self) -> None:
    """Restarts a process whose poll has not returned for actor_stall_s
    (a poll returns within POLL_S from a live process); one that has not
    answered since its start gets STARTUP_GRACE_S more."""
    stall_s = self._config.actor_stall_s
    if not stall_s:
      return
    now = time.monotonic()
    overdue = [slot for slot in self._slots if slot.pending is not None and
               now - slot.pending_since > stall_s + (
                   STARTUP_GRACE_S if slot.last is None else 0.0)]
    if not overdue:
      return
    # A reply that is ready but not yet collected (the learner was busy:
    # compiling, checkpointing) is an answer, not a stall.
    answered, _ = self._ray.wait([slot.pending for slot in overdue],
                                 num_returns=len(overdue), timeout=0)
    for slot in overdue:
      if slot.pending not in answered:
        self._restart(slot, f"unresponsive for {now - slot.pending_since:.0f} "
                      f"s (--actor_stall_s={stall_s:g})")

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
    views = [_View(slot, k, self._spec) for slot in self._slots
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

  def _error_in_last_replies(self) -> errors.RunError | None:
    """The first actor error in the poll replies left when the run stopped
    (a process answers its pending poll before its stop call)."""
    for slot in self._slots:
      if slot.pending is None:
        continue
      try:
        ready, _ = self._ray.wait([slot.pending], timeout=0)
        reply = self._ray.get(ready[0]) if ready else None
      except Exception:  # pylint: disable=broad-except
        continue  # a dead process: nothing it reported is left
      if reply is not None and reply.error is not None:
        return _reply_error(slot, reply)
    return None

  def raise_error(self) -> None:
    """Raises an actor error that the last replies (collected at `stop`)
    held; errors in earlier replies were raised when they came."""
    if self._stop_error is not None:
      raise self._stop_error

  def actor_node_ids(self) -> set[str]:
    """The Ray nodes actor processes ran on."""
    return set().union(*(slot.node_ids for slot in self._slots))

  def actor_pids(self) -> list[int]:
    """Every actor process pid seen in this run (tests check they are gone)."""
    return [pid for slot in self._slots for pid in slot.pids]

  def stop(self, deadline_s: float) -> list[str]:
    if self._ray is None:
      return []
    ray = self._ray
    deadline = time.monotonic() + deadline_s
    handles = [s.handle for s in self._slots if s.handle is not None]
    stopping = []  # (slot, ref of its stop call)
    for slot in self._slots:
      if slot.handle is None:
        continue
      try:
        stopping.append(
            (slot, slot.handle.stop.remote(max(0.0, deadline_s - 1.0))))
      except Exception:  # pylint: disable=broad-except
        pass
    stuck = []
    if stopping:
      refs = [ref for _, ref in stopping]
      done, _ = ray.wait(refs, num_returns=len(refs),
                         timeout=max(0.0, deadline - time.monotonic()))
      self._stop_error = self._error_in_last_replies()
      for slot, ref in stopping:
        try:
          if ref not in done or not ray.get(ref):
            stuck.append(f"actor-process-{slot.process_id}")
        except Exception:  # pylint: disable=broad-except
          pass  # the process is gone already
    for handle in handles:
      try:
        ray.kill(handle, no_restart=True)  # ends stuck threads too
      except Exception:  # pylint: disable=broad-except
        pass
    if stuck:
      logging.error("actor processes that did not stop within %.0f s were "
                    "killed: %s", deadline_s, stuck)
    if self._started_ray:
      # Our local Ray: raylet, GCS and every worker end with the run.
      ray.shutdown(wait_for_processes=True)
      left = wait_for_exit(self.actor_pids(),
                           max(2.0, deadline - time.monotonic()))
      for pid in left:
        try:
          os.kill(pid, 9)
        except OSError:
          pass
      if left:
        logging.warning("killed actor processes left after ray.shutdown: %s",
                        left)
    elif self._connected:
      ray.shutdown()  # disconnects; the cluster keeps running
    return []  # a killed process leaves nothing running


def process_alive(pid: int) -> bool:
  """True while `pid` runs (a zombie, exited but not reaped, counts as gone)."""
  try:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
      for line in f:
        if line.startswith("State:"):
          return "Z" not in line.split()[1]
  except OSError:
    pass
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return not os.path.isdir("/proc")  # no /proc: trust kill(0)


def wait_for_exit(pids: list[int], timeout_s: float) -> list[int]:
  """Waits (in 50 ms slices) until `pids` are gone; returns those left."""
  deadline = time.monotonic() + timeout_s
  left = [pid for pid in pids if process_alive(pid)]
  while left and time.monotonic() < deadline:
    time.sleep(0.05)
    left = [pid for pid in left if process_alive(pid)]
  return left


class _View:
  """Thread k of an actor process seen through the process's latest reply
  (for summarize_actors)."""

  def __init__(self, slot: _Slot, k: int, spec: pool_lib.ActorSpec):
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
