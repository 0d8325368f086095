"""Actor processes with Ray: `--actors=ray` (a local Ray, or a cluster).

The learner's process runs no actor. Each Ray actor process (`_ActorProcess`)
builds its own learner definition on its own JAX CPU client, builds its
environments itself and runs `threads_per_actor_process` pinned
`ActorThread`s (an `actor_group.ActorGroup`; one by default) feeding a small
local queue. Actor thread i acts exactly as actor i does in thread mode
(envs, seed, stream ids); process p hosts threads p*N .. p*N+N-1 and asks Ray
for N CPUs. One host needs no Ray: `process_pool` (`--actors=processes`) runs
the same groups with the same fault rules (`actor_group.ProcessPoolBase`).
The learner side (`RayActorPool`) keeps one outstanding `poll` call per
process; each call carries the newest parameter version when the process
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
import re
import time
from typing import Any, Sequence

from absl import logging

from ald_jax import config as config_lib
from ald_jax import learner as learner_lib  # ActorCore, the actor contract
from ald_jax.system import actor_group
from ald_jax.system import affinity
from ald_jax.system import errors
from ald_jax.system import liveness
from ald_jax.system import pool as pool_lib

# Ray refuses multi-node clusters on Windows/macOS unless this is set; the
# run sets it to "0" (no such cluster) for itself and its actor processes.
RAY_CLUSTER_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
ACTOR_PROCESS_ENV = dict(RAY_CLUSTER_ENV, **actor_group.ACTOR_PROCESS_ENV)
POLL_S = actor_group.POLL_S
STARTUP_GRACE_S = actor_group.STARTUP_GRACE_S
_FAILURE_CHARS = 2000   # of a dead process's error kept in the message
_ANSI_COLOUR = re.compile(r"\x1b\[[0-9;]*m")  # Ray colours its messages


def _import_ray():
  try:
    import ray  # pylint: disable=import-outside-toplevel
  except ImportError as error:
    raise config_lib.ConfigError(
        "actors: 'ray' needs Ray: pip install 'ald_jax[ray]'") from error
  return ray


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
    self._group = actor_group.ActorGroup(actor_ids, spec, core, seeds, cores,
                             queue_capacity, incarnation=incarnation)
    self._group.start()
    self._node_id = self._ray.get_runtime_context().get_node_id()
    self._version = 0

  def poll(self, version: int, params_ref: list, with_latency: bool
           ) -> actor_group.PollReply:
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


class RayActorPool(actor_group.ProcessPoolBase):
  """Actor processes under Ray; see the module doc. Builds nothing until
  `start`. Process p runs actors p*N .. p*N+N-1 (N:
  `config.threads_per_actor_process`) and asks Ray for N CPUs."""

  def __init__(self, spec: pool_lib.ActorSpec, config: config_lib.TrainConfig,
               poll_queue_capacity: int = 2):
    super().__init__(spec, config)
    self._ray = None
    self._connected = False   # this pool called ray.init
    self._started_ray = False  # ... and that started a local Ray
    self._remote_class: Any = None
    self._params: Any = None          # the newest published host tree
    self._params_ref: Any = None      # (version, its ObjectRef)
    self._sent_version: dict[Any, int] = {}  # handle -> version it has
    self.params_put = 0               # versions put into the object store
    self._queue_capacity = poll_queue_capacity
    self._spec_blob: bytes | None = None

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

  def _launch(self, slot: actor_group.ProcessSlot) -> None:
    spec, cfg = self._spec, self._config
    # On a local Ray the learner assigns cores as in thread mode; on a
    # cluster core ids of this machine mean nothing: the process picks.
    cores = ([spec.cores[i] for i in slot.actor_ids] if not cfg.ray_address
             else None)
    seeds = slot.seeds(spec)
    slot.handle = self._remote_class.remote(
        slot.actor_ids, self._spec_blob, cfg.learner, spec.env_info, seeds,
        cores, self._queue_capacity, slot.restarts)
    slot.last = None
    slot.pending = None
    self._poll(slot)

  def _poll(self, slot: actor_group.ProcessSlot) -> None:
    # A version goes into Ray's object store only when a process that is
    # behind polls, once per version (not on every publish).
    version, refs = self._sent_version.get(slot.handle, 0), [None]
    if self.params_version > version:
      if self._params_ref is None or self._params_ref[0] != self.params_version:
        self._params_ref = (self.params_version,
                            self._ray.put(self._params))
        self.params_put += 1
      version, refs = self._params_ref[0], [self._params_ref[1]]
      self._sent_version[slot.handle] = version
    slot.pending = slot.handle.poll.remote(version, refs, self._want_latency)
    slot.pending_since = time.monotonic()

  def publish(self, params: Any) -> int:
    """Keeps the newest host tree; processes get it at their next poll."""
    self._params = params
    self.params_version += 1
    return self.params_version

  # ---- unrolls ----

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

  def _restart(self, slot: actor_group.ProcessSlot, why: str) -> None:
    self._count_restart(slot, why)
    try:
      self._ray.kill(slot.handle, no_restart=True)
    except Exception:  # pylint: disable=broad-except
      pass
    self._launch(slot)

  def check(self) -> None:
    """Restarts a process whose poll has not returned for actor_stall_s
    (a poll returns within POLL_S from a live process); one that has not
    answered since its start gets STARTUP_GRACE_S more."""
    overdue = self._overdue()
    if not overdue:
      return
    # A reply that is ready but not yet collected (the learner was busy:
    # compiling, checkpointing) is an answer, not a stall.
    answered, _ = self._ray.wait([slot.pending for slot in overdue],
                                 num_returns=len(overdue), timeout=0)
    for slot in overdue:
      if slot.pending not in answered:
        self._restart(slot, self._unresponsive(slot))

  # ---- reporting ----

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
        return actor_group.reply_error(slot, reply)
    return None

  def actor_node_ids(self) -> set[str]:
    """The Ray nodes actor processes ran on."""
    return set().union(*(slot.node_ids for slot in self._slots))

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
      left = liveness.wait_for_exit(self.actor_pids(),
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
