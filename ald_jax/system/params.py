"""Versioned latest-only parameter slot: learner -> actors.

The learner publishes actor parameters after each update; actors poll between
unrolls without blocking and only ever see the newest version (older ones are
dropped, never queued). Versions start at 1 for the first publish; 0 means
"nothing published yet".
"""
from __future__ import annotations

import threading
import time
from typing import Any

import jax
import numpy as np

Params = Any


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
