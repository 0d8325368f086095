"""Actor processes on one host without Ray: `--actors=processes`.

Built on the standard library (`multiprocessing` with spawn, one pipe per
process) and the package's core dependencies, so it runs wherever ald_jax
does. The learner's process runs no actor. Each child process sets JAX to its
CPU (JAX_PLATFORMS=cpu, async dispatch off: a pinned thread's work stays on
its core), rebuilds the actor core from the learner config, builds its
environments itself and runs an `actor_group.ActorGroup` of
`threads_per_actor_process` pinned `ActorThread`s. Actor thread i acts
exactly as actor i does in thread mode (envs, seeds, stream ids, the cores
`affinity.assign_cores` gives it); process p hosts actors p*N .. p*N+N-1.

Protocol (the learner keeps one poll outstanding per process):

    learner -> child   ("poll", version, want_latency, has_params)
                       [pickled params, only when has_params]
                       ("stop", timeout_s)
    child -> learner   PollReply (unrolls ready within POLL_S, episodes,
                       counters, idle seconds, error, pid)
                       ("failed", error, traceback)  its start-up failed
                       ("stopped", all_threads_ended)

`publish` only keeps the newest (host) parameter tree and counts its
version. A poll carries parameters only when its process is behind; they are
pickled once per version that some process needs, so a process receives a
version at most once and versions sent <= versions published. Messages go
out through one sender thread per process: a process that stopped reading
cannot block the learner.

Faults, as in `ray_pool`: a process that dies (kill -9, out of memory) or
makes no progress for `actor_stall_s` (a thread stuck in its environment, or
the process not answering; STARTUP_GRACE_S more before its first reply) is
killed and started again with the same stream ids, fresh environment and
action seeds of the new incarnation and `unroll_index` from 0. Restarts are
counted (`actor_restarts`, `process{p}_restarts`); past `max_actor_restarts`
the run stops with an ActorRestartLimitError naming the process, its actors
and its last failure. An exception inside an environment stops the run with
a RunError naming the process and the failing actor (with the child's
traceback). `stop` asks every process to stop its threads, then terminates
and kills what is left within the deadline, and reaps every child.

What a child needs must pickle with the standard pickle: the run's env
factory (a module-level function, class or functools.partial). The pool
checks that when it is built, before anything starts. Spawn imports the main
module again in each child: a script that starts a run needs the usual
`if __name__ == "__main__":` guard. Children are daemonic (they end with the
learner even if `stop` never ran), so an environment cannot itself start
`multiprocessing` children.
"""
from __future__ import annotations

import copy
import multiprocessing
from multiprocessing import connection as mp_connection
import os
import pickle
import queue as queue_lib
import signal
import threading
import time
import traceback
from typing import Any, NamedTuple, Sequence

from absl import logging

from ald_jax import config as config_lib
from ald_jax import learner as learner_lib  # ActorCore, the actor contract
from ald_jax.system import actor_group
from ald_jax.system import pool as pool_lib

SPAWN = multiprocessing.get_context("spawn")
POLL_S = actor_group.POLL_S
STARTUP_GRACE_S = actor_group.STARTUP_GRACE_S
_KILL_WAIT_S = 1.0       # joining a process after SIGKILL
_TERMINATE_WAIT_S = 0.5  # after SIGTERM, before SIGKILL (stop)
_STOP_MARGIN_S = 1.0     # of stop's deadline kept for terminate and kill
_FAILURE_CHARS = 2000    # of a child's start-up traceback kept in the message
_PICKLE = pickle.HIGHEST_PROTOCOL

UNPICKLABLE_FACTORY = (
    "actors: 'processes' needs a picklable env_factory (a module-level "
    "function, class or functools.partial); a lambda or local function works "
    "with --actors=threads")


def _refuse_unpicklable(error: Exception) -> config_lib.ConfigError:
  return config_lib.ConfigError(
      f"{UNPICKLABLE_FACTORY} (pickling it failed: "
      f"{type(error).__name__}: {error})")


def check_factory_picklable(env_factory: Any) -> None:
  """Raises ConfigError, naming the cause, when `env_factory` does not pickle:
  `run.train` asks before any work starts."""
  try:
    pickle.dumps(env_factory, protocol=_PICKLE)
  except Exception as error:  # pylint: disable=broad-except
    raise _refuse_unpicklable(error) from error


def pickle_spec(spec: pool_lib.ActorSpec) -> bytes:
  """The actor spec as a child receives it, without the actor core (a child
  builds its own from the learner config).

  Raises:
    ConfigError: the spec (in practice its env factory) does not pickle; the
      message names the cause.
  """
  spec = copy.copy(spec)
  spec.core = None
  try:
    return pickle.dumps(spec, protocol=_PICKLE)
  except Exception as error:  # pylint: disable=broad-except
    raise _refuse_unpicklable(error) from error


# ---- the child process ------------------------------------------------------


class _ChildInit(NamedTuple):
  """What a child needs to build its ActorGroup."""
  actor_ids: list[int]
  spec_blob: bytes
  learner_config: config_lib.LearnerConfig
  seeds: list[int]
  cores: list[frozenset[int] | None]
  queue_capacity: int
  incarnation: int


def _child_main(conn: mp_connection.Connection, init: _ChildInit) -> None:
  """A child's entry point: builds the group, then answers polls."""
  os.environ.update(actor_group.ACTOR_PROCESS_ENV)
  # Ctrl-C reaches the whole process group: the learner stops its children.
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  try:
    group = _start_group(init)
  except BaseException as error:  # pylint: disable=broad-except
    _send_quietly(conn, ("failed", f"{type(error).__name__}: {error}",
                         traceback.format_exc()))
    os._exit(1)  # pylint: disable=protected-access
  try:
    _serve(conn, group)
  finally:
    # Threads stuck in an environment must not keep the process alive.
    os._exit(0)  # pylint: disable=protected-access


def _start_group(init: _ChildInit) -> actor_group.ActorGroup:
  cores = [c for c in init.cores if c]
  if cores and hasattr(os, "sched_setaffinity"):
    # A spawned child inherits the affinity of the learner thread that
    # started it (pinned with --pin_learner): the process's own threads
    # (XLA's, this one) belong on its actors' cores.
    os.sched_setaffinity(0, set().union(*cores))
  import jax  # pylint: disable=import-outside-toplevel
  jax.config.update("jax_platforms", "cpu")
  jax.config.update("jax_cpu_enable_async_dispatch", False)
  spec = pickle.loads(init.spec_blob)
  info = spec.env_info
  core = learner_lib.make_learner(init.learner_config, info.obs_shape,
                                  info.num_actions).actor_core
  group = actor_group.ActorGroup(
      init.actor_ids, spec, core, init.seeds, init.cores,
      init.queue_capacity, incarnation=init.incarnation)
  group.start()
  return group


def _serve(conn: mp_connection.Connection,
           group: actor_group.ActorGroup) -> None:
  while True:
    try:
      message = conn.recv()
    except (EOFError, OSError):  # the learner is gone
      group.stop(1.0)
      return
    if message[0] == "stop":
      _send_quietly(conn, ("stopped", group.stop(message[1])))
      return
    _, version, with_latency, has_params = message
    if has_params:
      params = pickle.loads(conn.recv_bytes())
      if version > group.params_version:
        group.publish(params, version)
    unrolls = group.take_unrolls(POLL_S)
    if not _send_quietly(conn, group.report(unrolls, with_latency)):
      group.stop(1.0)
      return


def _send_quietly(conn: mp_connection.Connection, message: Any) -> bool:
  try:
    conn.send(message)
    return True
  except (OSError, ValueError):  # the learner is gone
    return False


# ---- the learner side -------------------------------------------------------


class _Child:
  """One incarnation of an actor process: the process, the learner's end of
  its pipe and the thread that sends to it (a send to a process that
  stopped reading blocks that thread only)."""

  def __init__(self, process: Any, conn: mp_connection.Connection,
               process_id: int):
    self.process = process
    self.conn = conn
    self.sent_version = 0              # newest parameter version sent
    self._outbox: queue_lib.Queue = queue_lib.Queue()
    self._sender = threading.Thread(
        target=self._send_loop, name=f"procpool-sender-{process_id}",
        daemon=True)
    self._sender.start()

  def send(self, *messages: bytes) -> None:
    self._outbox.put(messages)

  def _send_loop(self) -> None:
    while True:
      messages = self._outbox.get()
      if messages is None:
        return
      try:
        for message in messages:
          self.conn.send_bytes(message)
      except (OSError, ValueError):  # the process is gone or closed
        return

  def receive(self) -> Any:
    """The next message if one is in, else None; EOFError once the process
    has closed its end (died)."""
    if not self.conn.poll():
      return None
    try:
      return self.conn.recv()
    except OSError as error:
      raise EOFError(str(error)) from error

  def end(self, wait_s: float = _KILL_WAIT_S) -> None:
    """Kills the process (if still running), reaps it, closes the pipe."""
    if self.process.is_alive():
      self.process.kill()
    self.process.join(wait_s)
    self.close()

  def close(self) -> None:
    self._outbox.put(None)
    self._sender.join(_KILL_WAIT_S)
    self.conn.close()


def describe_exit(process: Any) -> str:
  code = process.exitcode
  if code is None:
    return "closed its pipe"
  if code < 0:
    try:
      return f"killed by {signal.Signals(-code).name}"
    except ValueError:
      return f"killed by signal {-code}"
  return f"exit code {code}"


def _join_all(processes: Sequence[Any], until: float) -> None:
  """Waits until every process has exited or the clock reaches `until`."""
  while True:
    alive = [p for p in processes if p.is_alive()]  # reaps the exited
    if not alive or time.monotonic() >= until:
      return
    mp_connection.wait([p.sentinel for p in alive], until - time.monotonic())


class LocalProcessPool(actor_group.ProcessPoolBase):
  """Actor processes on this host; see the module doc. Checks that the spec
  pickles when built; starts nothing until `start`."""

  def __init__(self, spec: pool_lib.ActorSpec, config: config_lib.TrainConfig,
               poll_queue_capacity: int = 2):
    super().__init__(spec, config)
    self._spec_blob = pickle_spec(spec)
    self._queue_capacity = poll_queue_capacity
    self._params: Any = None
    self._params_blob: tuple[int, bytes] | None = None  # (version, pickle)
    # (process id, incarnation) -> versions sent to it, in order.
    self.params_sent: dict[tuple[int, int], list[int]] = {}
    self.params_pickled = 0   # versions serialised for some process
    self._stopped = False

  # ---- lifecycle ----

  def start(self, params: Any) -> None:
    self.publish(params)
    for slot in self._slots:
      self._launch(slot)

  def _launch(self, slot: actor_group.ProcessSlot) -> None:
    spec = self._spec
    init = _ChildInit(
        list(slot.actor_ids), self._spec_blob, self._config.learner,
        slot.seeds(spec), [spec.cores[i] for i in slot.actor_ids],
        self._queue_capacity, slot.restarts)
    parent_conn, child_conn = SPAWN.Pipe(duplex=True)
    process = SPAWN.Process(
        target=_child_main, args=(child_conn, init), daemon=True,
        name=f"ald-actor-process-{slot.process_id}")
    process.start()
    child_conn.close()  # the child holds its end: EOF here when it dies
    slot.handle = _Child(process, parent_conn, slot.process_id)
    slot.pids.append(process.pid)
    slot.last = None
    slot.pending = None
    self._poll(slot)

  def publish(self, params: Any) -> int:
    """Keeps the newest host tree; processes get it at their next poll."""
    self._params = params
    self.params_version += 1
    return self.params_version

  def _poll(self, slot: actor_group.ProcessSlot) -> None:
    child = slot.handle
    version = self.params_version
    messages = []
    if version > child.sent_version:
      if self._params_blob is None or self._params_blob[0] != version:
        self._params_blob = (version, pickle.dumps(self._params,
                                                   protocol=_PICKLE))
        self.params_pickled += 1
      messages.append(self._params_blob[1])
      child.sent_version = version
      self.params_sent.setdefault((slot.process_id, slot.restarts),
                                  []).append(version)
    child.send(pickle.dumps(("poll", version, self._want_latency,
                             bool(messages)), protocol=_PICKLE), *messages)
    slot.pending = True
    slot.pending_since = time.monotonic()

  # ---- unrolls ----

  def _collect(self, timeout_s: float) -> None:
    waiting = {}
    for slot in self._slots:
      if slot.handle is not None:
        waiting[slot.handle.conn] = slot
        waiting[slot.handle.process.sentinel] = slot
    if not waiting:
      return
    ready = mp_connection.wait(list(waiting), timeout_s)
    for slot in dict.fromkeys(waiting[r] for r in ready):
      self._receive(slot)

  def _receive(self, slot: actor_group.ProcessSlot) -> None:
    """Takes what `slot`'s process sent; restarts it if it died."""
    child = slot.handle
    try:
      message = child.receive()
    except EOFError:
      message = EOFError
    if isinstance(message, actor_group.PollReply):
      slot.pending = None
      if not self._take(slot, message):
        self._poll(slot)  # a restarted slot polls its new process already
      return
    if isinstance(message, tuple) and message[0] == "failed":
      self._restart(slot, f"process died in its start-up: {message[1]}\n"
                    f"{message[2][-_FAILURE_CHARS:]}")
      return
    if message is EOFError or not child.process.is_alive():
      child.process.join(_KILL_WAIT_S)  # its exit code, once it is reaped
      self._restart(slot, f"process died ({describe_exit(child.process)}, "
                    f"pid {child.process.pid})")

  def _restart(self, slot: actor_group.ProcessSlot, why: str) -> None:
    self._count_restart(slot, why)
    slot.handle.end()
    self._launch(slot)

  def check(self) -> None:
    """Restarts a process whose poll has not been answered for
    actor_stall_s (a live one answers within POLL_S); one that has not
    answered since its start gets STARTUP_GRACE_S more."""
    for slot in self._overdue():
      # A reply that is in but not yet collected (the learner was busy) is
      # an answer, not a stall; a dead process is found by `_collect`.
      if not slot.handle.conn.poll():
        self._restart(slot, self._unresponsive(slot))

  def stop(self, deadline_s: float) -> list[str]:
    """Stops every process within `deadline_s` (threads first, then
    SIGTERM, then SIGKILL) and reaps them; a reply left with an actor error
    is kept for `raise_error`."""
    if self._stopped:
      return []
    self._stopped = True
    deadline = time.monotonic() + deadline_s
    children = {slot.handle.conn: slot for slot in self._slots
                if slot.handle is not None}
    thread_timeout_s = max(0.0, deadline_s - 2 * _STOP_MARGIN_S)
    for slot in children.values():
      slot.handle.send(pickle.dumps(("stop", thread_timeout_s)))
    waiting = dict(children)
    stuck = []
    while waiting and time.monotonic() < deadline - _STOP_MARGIN_S:
      ready = mp_connection.wait(
          list(waiting), deadline - _STOP_MARGIN_S - time.monotonic())
      for conn in ready:
        slot = waiting[conn]
        try:
          message = slot.handle.receive()
        except EOFError:
          del waiting[conn]  # it ended
          continue
        if isinstance(message, actor_group.PollReply):
          if message.error is not None and self._stop_error is None:
            self._stop_error = actor_group.reply_error(slot, message)
        elif isinstance(message, tuple) and message[0] == "stopped":
          del waiting[conn]
          if not message[1]:
            stuck.append(slot.name)
        elif message is not None:
          del waiting[conn]  # its start-up failed
    if waiting or stuck:
      logging.error("actor processes whose threads did not stop within %.0f "
                    "s are killed: %s", deadline_s,
                    sorted({s.name for s in waiting.values()} | set(stuck)))
    # One that answered `stop` exits by itself; the rest get SIGTERM, then
    # SIGKILL.
    processes = [slot.handle.process for slot in children.values()]
    _join_all(processes, min(time.monotonic() + _TERMINATE_WAIT_S,
                             deadline - _TERMINATE_WAIT_S))
    for process in processes:
      if process.is_alive():
        process.terminate()
    _join_all(processes, min(time.monotonic() + _TERMINATE_WAIT_S, deadline))
    for slot in children.values():
      slot.handle.end()  # SIGKILL for what is left, reaps, closes
    return []  # a killed process leaves nothing running

  def children(self) -> Sequence[Any]:
    """The current incarnation's process of each slot (tests)."""
    return [slot.handle.process for slot in self._slots
            if slot.handle is not None]
