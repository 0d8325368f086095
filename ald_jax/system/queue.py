"""Coordination between the system's threads: stop-aware queue ops, errors.

Every blocking call in the system waits in short slices and re-checks a shared
`threading.Event`, so that setting the event (Ctrl-C, a crashed actor, the end
of training) stops every thread within about one `poll_s`: nothing blocks
forever on a full or empty queue.

(The stdlib `queue` is imported absolutely; this module does not shadow it.)
"""
from __future__ import annotations

import queue
import threading
import traceback
from typing import Any

_POLL_S = 0.1


def put_until_stopped(q: queue.Queue, item: Any, stop_event: threading.Event,
                      poll_s: float = _POLL_S) -> bool:
  """Puts `item`, waiting while `q` is full. False if stopped before it fit."""
  while not stop_event.is_set():
    try:
      q.put(item, timeout=poll_s)
      return True
    except queue.Full:
      continue
  return False


def get_until_stopped(q: queue.Queue, stop_event: threading.Event,
                      poll_s: float = _POLL_S) -> Any | None:
  """Gets an item, waiting while `q` is empty. None if stopped first."""
  while not stop_event.is_set():
    try:
      return q.get(timeout=poll_s)
    except queue.Empty:
      continue
  return None


def drain(q: queue.Queue) -> int:
  """Empties `q` without blocking; returns how many items were dropped."""
  dropped = 0
  while True:
    try:
      q.get_nowait()
    except queue.Empty:
      return dropped
    dropped += 1


class ErrorHolder:
  """Keeps the first exception raised by any thread, with its traceback.

  `record` also sets the shared stop event, so one failing thread stops the
  whole run; later errors (often consequences of the first) are counted only.
  """

  def __init__(self, stop_event: threading.Event | None = None):
    self._lock = threading.Lock()
    self._stop_event = stop_event
    self.error: BaseException | None = None
    self.where: str | None = None
    self.traceback: str | None = None
    self.num_errors = 0

  def record(self, error: BaseException, where: str) -> None:
    """Records `error` (call from inside an `except` block) and stops."""
    with self._lock:
      self.num_errors += 1
      if self.error is None:
        self.error = error
        self.where = where
        self.traceback = "".join(
            traceback.format_exception(type(error), error, error.__traceback__))
    if self._stop_event is not None:
      self._stop_event.set()

  @property
  def has_error(self) -> bool:
    return self.error is not None

  def message(self) -> str:
    """One human-readable description of the first error, or ''."""
    if self.error is None:
      return ""
    return f"{self.where}: {type(self.error).__name__}: {self.error}"

  def raise_if_error(self) -> None:
    """Re-raises the first error as a RuntimeError chained to the cause."""
    if self.error is not None:
      raise RuntimeError(f"{self.message()}\n{self.traceback}") from self.error
