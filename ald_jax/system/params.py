"""Versioned latest-only parameter slot: learner -> actors.

The learner publishes actor parameters after each update; actors poll between
unrolls without blocking and only ever see the newest version (older ones are
dropped, never queued). Versions start at 1 for the first publish; 0 means
"nothing published yet".
"""
from __future__ import annotations

import collections
import threading
import time
from typing import Any

import jax
import numpy as np

Params = Any
_VERSIONS_KEPT = 4096  # versions whose learner step a Publisher keeps


def host_copy(params: Params) -> Params:
  """A numpy copy of a parameter tree, detached from device buffers.

  Why: a jitted learner step that donates its state may delete the device
  buffers an actor still reads; an owned host copy is immune to that and is
  transferred once instead of once per actor.
  """
  return jax.tree.map(lambda x: np.array(x, copy=True), jax.device_get(params))


class ParamsSlot:
  """Thread-safe latest-only slot holding `(version, params)`."""

  def __init__(self):
    self._cond = threading.Condition()
    self._version = 0
    self._params: Params = None

  @property
  def version(self) -> int:
    """The latest published version (0 before the first publish)."""
    with self._cond:
      return self._version

  def publish(self, params: Params, copy_to_host: bool = True,
              version: int | None = None) -> int:
    """Replaces the slot's params; returns the new version.

    With `copy_to_host` (default) the tree is copied to numpy first (see
    `host_copy`), so the publisher may keep mutating or donating its arrays.
    `version` publishes under a given (newer) number instead of the next one:
    an actor process mirrors the learner's versions, so its lags count
    learner versions (against the newest its last poll brought: a lower
    bound of the lag behind the learner).
    """
    if copy_to_host:
      params = host_copy(params)
    with self._cond:
      if version is not None and version <= self._version:
        raise ValueError(f"version {version} is not newer than "
                         f"{self._version}")
      self._version = self._version + 1 if version is None else version
      self._params = params
      self._cond.notify_all()
      return self._version

  def get(self) -> tuple[int, Params]:
    """The current `(version, params)`, `(0, None)` before any publish."""
    with self._cond:
      return self._version, self._params

  def get_if_newer(self, known_version: int) -> tuple[int, Params] | None:
    """`(version, params)` if newer than `known_version`, else None.

    Never blocks beyond the slot's (short) lock.
    """
    with self._cond:
      if self._version > known_version:
        return self._version, self._params
      return None

  def wait_for_first(self, timeout: float | None = None,
                     stop_event: threading.Event | None = None,
                     poll_s: float = 0.1) -> tuple[int, Params] | None:
    """Blocks until something is published.

    Returns `(version, params)`, or None if `stop_event` was set first.
    Raises TimeoutError after `timeout` seconds (None waits indefinitely,
    still watching `stop_event`).
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    with self._cond:
      while self._version == 0:
        if stop_event is not None and stop_event.is_set():
          return None
        wait_s = poll_s
        if deadline is not None:
          remaining = deadline - time.monotonic()
          if remaining <= 0:
            raise TimeoutError(
                f"no parameters were published within {timeout} s")
          wait_s = min(wait_s, remaining)
        self._cond.wait(wait_s)
      return self._version, self._params


class Publisher:
  """Publishes the learner's actor parameters to a pool without waiting.

  `step()` after each learner step: when at least `every_steps` steps and
  `min_interval_s` seconds have passed since the last copy was started, it
  starts a new one (`copy_params()`: a fresh device copy) and its host
  transfer (`copy_to_host_async`); a later `step()` or `poll()` that finds
  the transfer done hands the host (numpy) arrays to `pool.publish`. The
  loop never waits on the device for a publish, and actors never read an
  array of the learner's device. One copy is in flight at a time.

  `age_steps(version)`: learner steps since the copy published as `version`
  was started (the age of the parameters an actor acts with).
  """

  def __init__(self, pool: Any, copy_params: Any, *, every_steps: int = 1,
               min_interval_s: float = 0.0, clock=time.monotonic):
    if every_steps < 1:
      raise ValueError(f"every_steps must be >= 1, got {every_steps}")
    self._pool = pool
    self._copy_params = copy_params
    self._every_steps = every_steps
    self._min_interval_s = min_interval_s
    self._clock = clock
    self._steps = 0                 # learner steps seen
    self._started_step = 0          # step of the last copy started
    self._started_at = -float("inf")
    self._in_flight: tuple[int, Params] | None = None
    # version -> learner step of its copy (the newest few thousand)
    self._step_of_version: collections.OrderedDict[int, int] = (
        collections.OrderedDict())
    self.published = 0

  def start(self) -> Params:
    """The first parameters, copied to the host now (for `pool.start`)."""
    self._started_at = self._clock()
    self._started_step = self._steps
    params = host_copy(self._copy_params())
    return params

  def started(self, version: int) -> None:
    """Records the version `pool.start` published."""
    self._remember(version, self._started_step)

  def _remember(self, version: int, step: int) -> None:
    self._step_of_version[version] = step
    while len(self._step_of_version) > _VERSIONS_KEPT:
      self._step_of_version.popitem(last=False)

  def step(self) -> None:
    """Call after each learner step."""
    self._steps += 1
    self.poll()
    if (self._in_flight is None and
        self._steps - self._started_step >= self._every_steps and
        self._clock() - self._started_at >= self._min_interval_s):
      copy = self._copy_params()
      for leaf in jax.tree.leaves(copy):
        leaf.copy_to_host_async()
      self._in_flight = (self._steps, copy)
      self._started_step = self._steps
      self._started_at = self._clock()

  def poll(self) -> bool:
    """Publishes the copy in flight if its transfer is done."""
    if self._in_flight is None:
      return False
    step, copy = self._in_flight
    if not all(leaf.is_ready() for leaf in jax.tree.leaves(copy)):
      return False
    self._in_flight = None
    version = self._pool.publish(jax.tree.map(np.asarray, copy))
    self._remember(version, step)
    self.published += 1
    return True

  def age_steps(self, version: int) -> int | None:
    """Learner steps since `version`'s copy was made (None if unknown)."""
    step = self._step_of_version.get(version)
    return None if step is None else self._steps - step
