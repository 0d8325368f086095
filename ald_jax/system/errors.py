"""Errors that stop a run. Each message names the cause (actor, env, step).

`RunError` subclasses are *known* failures: the CLI prints their message
without a traceback. A `RunError` raised for an unexpected exception (a bug
in an environment, say) keeps that exception as `__cause__` and its
traceback in `cause_traceback`.
"""
from __future__ import annotations


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
