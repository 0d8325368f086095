"""Timing: per-step actor latency (T_actor), learner phase times, calibration.

`LatencyRecorder` is written by one actor thread on every step, so recording
is a store into a preallocated ring buffer and two integer updates: no
allocation, no lock. Readers (the reporting thread) take a copy; a value being
overwritten while copied only perturbs one sample of a percentile.

Percentiles (p50/p90/p99) are over the ring, i.e. the most recent `capacity`
steps; `count`, `over_budget` and `max` are over every recorded step.
"""
from __future__ import annotations

import collections
import contextlib
import time
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Sequence

from absl import logging
import jax
import numpy as np

from ald_jax.config import T_ACTOR_POLICIES


class TActorBudgetError(RuntimeError):
  """The actor step cannot meet the T_actor budget (policy "refuse")."""

  def __init__(self, message: str, p99_ms: float, budget_ms: float):
    super().__init__(message)
    self.p99_ms = p99_ms
    self.budget_ms = budget_ms


class LatencySummary(NamedTuple):
  """Latency statistics in microseconds."""
  count: int          # steps recorded in total
  window: int         # steps the percentiles are computed over
  p50_us: float
  p90_us: float
  p99_us: float
  max_us: float
  mean_us: float
  over_budget: int    # steps strictly over the budget (0 without a budget)
  budget_ms: float | None

  def as_dict(self, prefix: str = "t_actor_") -> dict[str, Any]:
    return {
        f"{prefix}count": self.count,
        f"{prefix}p50_us": self.p50_us,
        f"{prefix}p90_us": self.p90_us,
        f"{prefix}p99_us": self.p99_us,
        f"{prefix}max_us": self.max_us,
        f"{prefix}mean_us": self.mean_us,
        f"{prefix}over_budget": self.over_budget,
    }


def _summarize(values_ns: np.ndarray, count: int, max_ns: int,
               over_budget: int, budget_ms: float | None) -> LatencySummary:
  if values_ns.size == 0:
    nan = float("nan")
    return LatencySummary(count, 0, nan, nan, nan, nan, nan, over_budget,
                          budget_ms)
  us = values_ns.astype(np.float64) / 1e3
  p50, p90, p99 = np.percentile(us, [50.0, 90.0, 99.0])
  return LatencySummary(
      count=int(count), window=int(us.size), p50_us=float(p50),
      p90_us=float(p90), p99_us=float(p99), max_us=float(max_ns) / 1e3,
      mean_us=float(us.mean()), over_budget=int(over_budget),
      budget_ms=budget_ms)


class LatencyRecorder:
  """Cheap per-actor record of step durations (ns) with a budget counter."""

  def __init__(self, budget_ms: float | None = None, capacity: int = 1 << 16):
    if capacity <= 0:
      raise ValueError(f"capacity must be > 0, got {capacity}")
    self.budget_ms = budget_ms
    # Integer ns threshold so `record` compares ints only.
    self._budget_ns = None if budget_ms is None else int(budget_ms * 1e6)
    self._buffer = np.zeros(capacity, np.int64)
    self._capacity = capacity
    self.count = 0
    self.over_budget = 0
    self.max_ns = 0

  def record(self, duration_ns: int) -> None:
    self._buffer[self.count % self._capacity] = duration_ns
    self.count += 1
    if duration_ns > self.max_ns:
      self.max_ns = duration_ns
    if self._budget_ns is not None and duration_ns > self._budget_ns:
      self.over_budget += 1

  def values_ns(self) -> np.ndarray:
    """A copy of the recorded window (unordered once the ring has wrapped)."""
    count = self.count
    return self._buffer[:min(count, self._capacity)].copy()

  def latest_ns(self, n: int) -> np.ndarray:
    """A copy of the most recent `min(n, count, capacity)` durations, oldest
    first (a slice of `values_ns` is not that once the ring has wrapped)."""
    count = self.count
    n = min(n, count, self._capacity)
    return self._buffer[(count - n + np.arange(n)) % self._capacity].copy()

  def summary(self) -> LatencySummary:
    return _summarize(self.values_ns(), self.count, self.max_ns,
                      self.over_budget, self.budget_ms)


def merge_latency(recorders: Iterable[LatencyRecorder]) -> LatencySummary:
  """One summary over several actors' recorders (windows concatenated)."""
  recorders = list(recorders)
  if not recorders:
    return _summarize(np.zeros(0, np.int64), 0, 0, 0, None)
  values = np.concatenate([r.values_ns() for r in recorders])
  return _summarize(values, sum(r.count for r in recorders),
                    max(r.max_ns for r in recorders),
                    sum(r.over_budget for r in recorders),
                    recorders[0].budget_ms)


class PhaseTimer:
  """Cumulative wall time per named phase of a loop (single thread).

    timer = PhaseTimer()
    with timer.phase("wait_batch"): ...
    with timer.phase("step"): ...
    timer.summary()  # {"time_wait_batch_s": ..., "frac_step": ...}
  """

  def __init__(self):
    self.reset()

  def reset(self) -> None:
    self._totals: dict[str, float] = collections.defaultdict(float)
    self._counts: dict[str, int] = collections.defaultdict(int)
    self._start = time.perf_counter()

  @contextlib.contextmanager
  def phase(self, name: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
      yield
    finally:
      self.add(name, time.perf_counter() - start)

  def add(self, name: str, seconds: float) -> None:
    self._totals[name] += seconds
    self._counts[name] += 1

  def totals(self) -> dict[str, float]:
    return dict(self._totals)

  def counts(self) -> dict[str, int]:
    return dict(self._counts)

  def elapsed(self) -> float:
    """Wall time since construction or the last `reset`."""
    return time.perf_counter() - self._start

  def summary(self, prefix: str = "time_") -> dict[str, float]:
    """Seconds per phase and each phase's fraction of the elapsed time."""
    elapsed = max(self.elapsed(), 1e-9)
    out = {}
    for name, total in self._totals.items():
      out[f"{prefix}{name}_s"] = total
      out[f"frac_{name}"] = total / elapsed
    return out


def time_call_ns(fn: Callable[..., Any], *args) -> tuple[Any, int]:
  """Calls `fn(*args)`, waits until the result is ready; returns (out, ns)."""
  start = time.perf_counter_ns()
  out = fn(*args)
  jax.block_until_ready(out)
  return out, time.perf_counter_ns() - start


def _check_policy(policy: str) -> None:
  if policy not in T_ACTOR_POLICIES:
    raise ValueError(f"t_actor_policy must be one of {T_ACTOR_POLICIES}, got "
                     f"{policy!r}")


def check_budget(summary: LatencySummary, budget_ms: float | None,
                 policy: str, what: str = "actor step") -> None:
  """Applies the T_actor policy to a calibration summary.

  Raises TActorBudgetError (policy "refuse") or logs a warning ("warn") when
  the measured p99 exceeds `budget_ms`. No budget (None) checks nothing.
  """
  _check_policy(policy)
  if budget_ms is None:
    return
  p99_ms = summary.p99_us / 1e3
  if not p99_ms > budget_ms:
    logging.info("T_actor calibration: %s p99 %.4g ms is within the budget "
                 "%.4g ms (p50 %.4g ms).", what, p99_ms, budget_ms,
                 summary.p50_us / 1e3)
    return
  message = (
      f"T_actor budget exceeded: the {what}'s measured p99 is {p99_ms:.4g} ms "
      f"(p50 {summary.p50_us / 1e3:.4g} ms, {summary.window} calibration "
      f"calls), above the budget of {budget_ms:.4g} ms (--t_actor_budget_ms). "
      f"Use a smaller actor, fewer environments per actor or a larger budget; "
      f"--t_actor_policy=warn runs anyway.")
  if policy == "refuse":
    raise TActorBudgetError(message, p99_ms, budget_ms)
  logging.warning("%s", message)


def calibrate_actor_step(step_fn: Callable[..., Any], args: Sequence[Any],
                         num_calls: int = 200, budget_ms: float | None = None,
                         policy: str = "refuse",
                         warmup_calls: int = 3) -> LatencySummary:
  """Times `step_fn(*args)` (compiled, result ready) and applies the policy.

  The first `warmup_calls` calls (compilation, caches) are not measured. The
  call runs on the calling thread's current affinity; see
  `actor.calibrate_core` for a calibration pinned like an actor.
  """
  _check_policy(policy)   # before any timing work
  if num_calls <= 0:
    raise ValueError(f"num_calls must be > 0, got {num_calls}")
  for _ in range(warmup_calls):
    time_call_ns(step_fn, *args)
  recorder = LatencyRecorder(budget_ms, capacity=num_calls)
  for _ in range(num_calls):
    _, ns = time_call_ns(step_fn, *args)
    recorder.record(ns)
  summary = recorder.summary()
  check_budget(summary, budget_ms, policy)
  return summary
