"""A pool of actors: the one interface the learner loop uses to reach them.

    pool.start(params)              build and start every actor
    pool.publish(params) -> version the newest actor parameters
    pool.get_unroll(timeout_s)      the next unroll, or None after timeout_s
    pool.check()                    raises a RunError for a failed/stalled actor
    pool.stats() -> dict            metric-row fields (env_steps, T_actor, ...)
    pool.drain_episodes()           finished episodes since the last call
    pool.stop(deadline_s) -> stuck  stops every actor within one deadline

`ThreadActorPool` runs `ActorThread`s in this process;
`process_pool.LocalProcessPool` runs them in actor processes on this host and
`ray_pool.RayActorPool` in Ray actor processes. All emit `types.Batch` unrolls
with numpy leaves, `stream_id` and `unroll_index`.
"""
from __future__ import annotations

import queue as queue_lib
import threading
import time
from typing import Any, Callable, Protocol, Sequence

from absl import logging

from ald_jax import learner as learner_lib  # ActorCore, the actor contract
from ald_jax import types
from ald_jax.envs import specs as specs_lib
from ald_jax.system import actor as actor_lib
from ald_jax.system import errors
from ald_jax.system import params as params_lib

Params = Any


class ActorPool(Protocol):
  """What the learner loop needs from its actors (see the module doc)."""

  num_streams: int     # distinct stream ids the pool's actors emit
  params_version: int  # the newest published version
  queue_size: int      # unrolls waiting for the learner

  def env_steps(self) -> int: ...
  def start(self, params: Params) -> None: ...
  def publish(self, params: Params) -> int: ...
  def get_unroll(self, timeout_s: float) -> types.Batch | None: ...
  def check(self) -> None: ...
  def raise_error(self) -> None: ...
  def stats(self) -> dict[str, Any]: ...
  def drain_episodes(self) -> list[actor_lib.Episode]: ...
  def stop(self, deadline_s: float) -> list[str]: ...


class ActorSpec:
  """How to build actor i: its env, seeds, cores and stream ids.

  Shared by every pool so that all act the same way (the process pools
  send it, without `core`, to their processes).
  """

  def __init__(self, *, make_env: Callable[[int], Any],
               core: learner_lib.ActorCore,
               num_actors: int, envs_per_actor: int, unroll_length: int,
               context_length: int, seed_for: Callable[[int], int],
               cores: Sequence[frozenset[int] | None],
               t_actor_budget_ms: float | None,
               env_info: specs_lib.EnvInfo | None,
               nonfinite_obs: str = "error"):
    # (actor_id[, incarnation]) -> batched env, built in the actor's thread;
    # a restarted actor process asks with its restart count (fresh seeds).
    self.make_env = make_env
    self.core = core
    self.num_actors = num_actors
    self.envs_per_actor = envs_per_actor
    self.unroll_length = unroll_length
    self.context_length = context_length
    self.seed_for = seed_for          # actor_id -> action-sampling seed
    self.cores = list(cores)
    self.t_actor_budget_ms = t_actor_budget_ms
    self.env_info = env_info
    self.nonfinite_obs = nonfinite_obs


class ThreadActorPool:
  """Actor threads in this process, feeding one bounded queue.

  Args:
    spec: how to build each actor.
    queue_capacity: unrolls in flight between the actors and the learner.
    stall_s: an actor without progress for this long fails `check()` with
      ActorStalledError naming it (0: no watchdog). A thread cannot be
      killed: the run stops, and a thread stuck in its environment is left
      as a daemon thread (reported by `stop`).
  """

  def __init__(self, spec: ActorSpec, queue_capacity: int,
               stall_s: float = 0.0, poll_s: float = 0.1):
    self._spec = spec
    self._stall_s = stall_s
    self._stop_event = threading.Event()
    self._errors = errors.ErrorHolder(self._stop_event)
    self._slot = params_lib.ParamsSlot()
    self._queue: queue_lib.Queue = queue_lib.Queue(maxsize=queue_capacity)
    self.num_streams = spec.num_actors * spec.envs_per_actor
    self.actors = [
        actor_lib.ActorThread(
            i, lambda i=i: spec.make_env(i), spec.core, self._slot,
            self._queue, self._stop_event, self._errors,
            unroll_length=spec.unroll_length,
            context_length=spec.context_length, seed=spec.seed_for(i),
            cores=spec.cores[i], t_actor_budget_ms=spec.t_actor_budget_ms,
            env_info=spec.env_info, nonfinite_obs=spec.nonfinite_obs,
            poll_s=poll_s)
        for i in range(spec.num_actors)]

  @property
  def params_version(self) -> int:
    return self._slot.version

  @property
  def queue_size(self) -> int:
    return self._queue.qsize()

  def start(self, params: Params) -> None:
    self._slot.publish(params, copy_to_host=False)
    now = time.monotonic()
    for actor in self.actors:
      actor.last_progress = now
      actor.start()

  def publish(self, params: Params) -> int:
    return self._slot.publish(params, copy_to_host=False)

  def get_unroll(self, timeout_s: float) -> types.Batch | None:
    try:
      return self._queue.get(timeout=timeout_s)
    except queue_lib.Empty:
      return None

  def raise_error(self) -> None:
    """Raises a RunError for the first error an actor recorded, if any
    (also after `stop`: an error must not vanish behind a budget stop)."""
    if self._errors.has_error:
      error = self._errors.error
      if isinstance(error, errors.RunError):
        raise error
      raise errors.RunError(
          f"run stopped by an error in {self._errors.message()}",
          self._errors.traceback) from error

  def check(self) -> None:
    self.raise_error()
    if self._stall_s > 0:
      now = time.monotonic()
      for actor in self.actors:
        idle = now - actor.last_progress
        if actor.is_alive() and idle > self._stall_s:
          raise errors.ActorStalledError(
              f"actor {actor.actor_id} stalled: no environment step for "
              f"{idle:.1f} s (--actor_stall_s={self._stall_s:g}) after "
              f"{actor.stats().env_steps} env steps; its environment may be "
              "hanging")

  def env_steps(self) -> int:
    return sum(actor.stats().env_steps for actor in self.actors)

  def stats(self) -> dict[str, Any]:
    return actor_lib.summarize_actors(self.actors)

  def drain_episodes(self) -> list[actor_lib.Episode]:
    return [e for actor in self.actors for e in actor.drain_episodes()]

  def stop(self, deadline_s: float) -> list[str]:
    """Stops every actor within one shared deadline; returns the stuck ones."""
    self._stop_event.set()
    deadline = time.monotonic() + deadline_s
    for actor in self.actors:
      if actor.ident is not None:
        actor.join(timeout=max(0.0, deadline - time.monotonic()))
    stuck = [a.name for a in self.actors if a.is_alive()]
    if stuck:
      logging.error("actor threads still running %.0f s after stop (stuck "
                    "in their environment; left as daemon threads): %s",
                    deadline_s, stuck)
    return stuck
