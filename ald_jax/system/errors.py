"""Errors that stop a run. Each message names the cause (actor, env, step).

`ErrorHolder` keeps the first error any of the system's threads raised, and
stops the others.

`RunError` subclasses are *known* failures: the CLI prints their message
without a traceback. A `RunError` raised for an unexpected exception (a bug
in an environment, say) keeps that exception as `__cause__` and its
traceback in `cause_traceback`.
"""
from __future__ import annotations

import threading
import traceback


class RunError(RuntimeError):
  """The run stopped because of an error; the message names the cause."""

  def __init__(self, message: str, cause_traceback: str | None = None):
    super().__init__(message)
    self.cause_traceback = cause_traceback


class NonFiniteLossError(RunError):
  """Too many learner updates in a row had a NaN/inf loss or gradient."""


class ActorStalledError(RunError):
  """An actor made no progress (env steps, queue waits) for actor_stall_s."""


class NonFiniteObservationError(RunError):
  """An environment returned a NaN/inf observation (nonfinite_obs=error)."""


class ActorRestartLimitError(RunError):
  """An actor process died more often than max_actor_restarts allows."""


class EvaluationError(RunError):
  """The learner-actor gap evaluation (system/evaluation.py) failed."""


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
        # `error` last: readers that check it without the lock (a poll reply
        # built while a thread is failing) then see where and traceback too.
        self.traceback = "".join(
            traceback.format_exception(type(error), error, error.__traceback__))
        self.where = where
        self.error = error
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

  def first(self) -> tuple[str | None, str | None]:
    """(message, traceback) of the first error, read together; Nones if none."""
    with self._lock:
      return (self.message() or None), self.traceback

  def raise_if_error(self) -> None:
    """Re-raises the first error as a RuntimeError chained to the cause."""
    if self.error is not None:
      raise RuntimeError(f"{self.message()}\n{self.traceback}") from self.error
