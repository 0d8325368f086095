"""The learner loop: unrolls in, learner steps, publishes, reports, checkpoints.

A small object with its own state (counters, stop reason) so that the run
module only wires it up and stops it. It never waits unboundedly: each wait
for an unroll lasts at most `poll_s`, after which the stop request, the
budget, the wall-time limit, the actors' health, reports and checkpoints are
checked again, whether or not an unroll came. With an evaluator
(system/evaluation.py) it also hands over a parameter snapshot whenever one
is due and stops the run if the evaluation failed.
"""
from __future__ import annotations

import threading
import time
from typing import Any, Callable

import numpy as np

from ald_jax import config as config_lib
from ald_jax import metrics as metrics_lib
from ald_jax.system import learner_driver as driver_lib
from ald_jax.system import params as params_lib
from ald_jax.system import pool as pool_lib
from ald_jax.system import replay as replay_lib
from ald_jax.system import timing


class LearnerLoop:
  """Runs until the budget, the wall-time limit, a stop request or an error.

  Args:
    config: the run's TrainConfig.
    pool: the actors (pool.ActorPool).
    driver: the learner side (learner_driver.LearnerDriver).
    write_row: called with each report row (metrics file + progress line).
    save_checkpoint: called with (learner_step, host_state, metadata).
    env_offset / wall_offset / segment / episodes_offset: where a resumed
      run continues.
    evaluator: an `evaluation.Evaluator` (started by the caller), or None.
    eval_params: learner state -> the evaluator's `{policy: params}`.
  """

  def __init__(self, config: config_lib.TrainConfig,
               pool: pool_lib.ActorPool, driver: driver_lib.LearnerDriver,
               *, write_row: Callable[[dict[str, Any]], None],
               save_checkpoint: Callable[[int, Any, dict[str, Any]], None],
               env_offset: int = 0, wall_offset: float = 0.0,
               episodes_offset: int = 0,
               segment: int = 0, poll_s: float = 0.1,
               evaluator: Any = None,
               eval_params: Callable[[Any], dict[str, Any]] | None = None,
               started_at: float | None = None):
    if (evaluator is None) != (eval_params is None):
      raise ValueError("evaluator and eval_params come together")
    self._config = config
    self._pool = pool
    self._driver = driver
    self._write_row = write_row
    self._save_checkpoint = save_checkpoint
    self.env_offset = env_offset
    self.wall_offset = wall_offset
    self.segment = segment
    self._poll_s = poll_s
    self._evaluator = evaluator
    self._eval_params = eval_params
    self._stop_requested = threading.Event()
    self.stop_reason: str | None = None  # "budget", "wall_time", "signal:..."
    self.phases = timing.PhaseTimer()
    self._episodes = metrics_lib.EpisodeWindow(size=200)
    self._episodes.total = episodes_offset  # finished in earlier segments
    self._rate = metrics_lib.RateMeter()
    self._batcher: Any = None  # chosen from the first unroll's fields
    # Rows each actor contributed to RL steps (stream id // E is the actor).
    self._trained_rows = np.zeros(config.num_actors, np.int64)
    self._publisher = params_lib.Publisher(
        pool, driver.actor_params, every_steps=config.publish_every_steps,
        min_interval_s=config.publish_interval_s)
    self._start_time = time.perf_counter()
    # perf_counter() when the run began: the first row says how long the
    # start-up took (build, compile, calibrate, first batch).
    self._started_at = self._start_time if started_at is None else started_at
    self.startup_s: float | None = None

  # ---- state read by the run module ----

  def start_actors(self) -> None:
    """Starts the pool with the current actor parameters (host arrays)."""
    self._pool.start(self._publisher.start())
    self._publisher.started(self._pool.params_version)

  def elapsed_s(self) -> float:
    return time.perf_counter() - self._start_time

  def env_steps(self) -> int:
    return self.env_offset + self._pool.env_steps()

  def request_stop(self, reason: str) -> None:
    """Asks the loop to stop (any thread, signal handlers included)."""
    if self.stop_reason is None:
      self.stop_reason = reason
    self._stop_requested.set()

  def row(self, stopped_by: str = "") -> dict[str, Any]:
    """One metrics row: actors, episodes, learner counters and metrics."""
    cfg = self._config
    self._collect_episodes()
    row: dict[str, Any] = {"agent": cfg.learner.agent, "env": cfg.env,
                           "stopped_by": stopped_by,
                           "wall_time_s": self.wall_offset + self.elapsed_s()}
    row.update(self._pool.stats())
    row["env_steps"] = self.env_offset + row["env_steps"]
    row["env_sps"] = self._rate.rate(row["env_steps"])
    row.update(self._episodes.summary())
    row.update(self._driver.counters()._asdict())
    row.update({"queue_size": self._pool.queue_size,
                "queue_capacity": cfg.queue_capacity,
                "params_version": self._pool.params_version,
                "batch_repeated_rows": getattr(self._batcher, "repeated_rows",
                                               0)})
    if self.startup_s is not None:
      row["startup_to_first_step_s"] = self.startup_s
    row["params_published"] = self._publisher.published
    age = self._publisher.age_steps(row.get("params_version_oldest", 0))
    if age is not None:
      row["params_age_steps"] = age
    for actor_id, rows in enumerate(self._trained_rows):
      row[f"actor{actor_id}_trained_rows"] = int(rows)
    row.update(self.phases.summary())
    row.update(metrics_lib.resource_entries(self._driver.device))
    row.update(self._driver.metrics())
    if self._evaluator is not None:
      row.update(self._evaluator.metrics())
    return row

  def _collect_episodes(self) -> None:
    self._episodes.extend(self._pool.drain_episodes())

  def checkpoint(self) -> None:
    """Saves the learner state with the counters a resume continues from."""
    self._collect_episodes()
    metadata = dict(self._driver.checkpoint_metadata(),
                    env_steps=self.env_steps(),
                    episodes_total=self._episodes.total,
                    wall_time_s=self.wall_offset + self.elapsed_s(),
                    segment=self.segment)
    with self.phases.phase("checkpoint"):
      self._save_checkpoint(self._driver.counters().learner_steps,
                            self._driver.host_state(), metadata)

  # ---- the loop ----

  def _due_stop(self) -> str | None:
    cfg = self._config
    if self._stop_requested.is_set():
      return self.stop_reason
    if self.env_steps() >= cfg.total_env_steps:
      return "budget"
    if cfg.max_wall_time_s and self.elapsed_s() >= cfg.max_wall_time_s:
      return "wall_time"
    return None

  def _offer_evaluation(self) -> None:
    """A host snapshot of the evaluated parameters, when one is due."""
    if self._evaluator is None:
      return
    self._evaluator.check()  # raises an EvaluationError with the cause
    if self._evaluator.due():
      with self.phases.phase("eval_snapshot"):
        self._evaluator.submit(
            self._driver.host_params(self._eval_params),
            env_steps=self.env_steps(),
            learner_steps=self._driver.counters().learner_steps)

  def evaluate_final(self, timeout_s: float) -> bool:
    """Evaluates the parameters the run ends with, so that its last eval/*
    entries describe them (the periodic ones lag by up to an interval);
    False without an evaluator or if it did not finish within `timeout_s`."""
    if self._evaluator is None:
      return False
    with self.phases.phase("eval_snapshot"):
      params = self._driver.host_params(self._eval_params)
    return self._evaluator.evaluate_now(
        params, env_steps=self.env_steps(),
        learner_steps=self._driver.counters().learner_steps,
        timeout_s=timeout_s, should_stop=self._stop_requested.is_set)

  def _train_on(self, unroll: Any) -> None:
    if self._batcher is None:
      self._batcher = replay_lib.make_batcher(self._config.learner.batch_size,
                                              unroll)
    self._batcher.add(unroll)
    while not self._stop_requested.is_set():
      batch = self._batcher.pop_batch()
      if batch is None:
        return
      with self.phases.phase("step"):
        self._driver.train(batch)
      if self.startup_s is None:
        self.startup_s = time.perf_counter() - self._started_at
      stream_id = getattr(batch, "stream_id", None)
      if stream_id is not None:
        self._trained_rows += np.bincount(
            np.asarray(stream_id) // self._config.envs_per_actor,
            minlength=self._trained_rows.size)
      with self.phases.phase("publish"):
        self._publisher.step()

  def run(self) -> str:
    """Runs until a stop; returns (and sets) the stop reason."""
    cfg = self._config
    self._rate.rate(self.env_offset)
    last_report = last_checkpoint = time.perf_counter()
    while True:
      # Actors first: an actor's error must not hide behind a budget stop.
      self._pool.check()  # raises a RunError for a failed/stalled actor
      reason = self._due_stop()
      if reason is not None:
        break
      self._offer_evaluation()
      self._publisher.poll()
      with self.phases.phase("wait_batch"):
        unroll = self._pool.get_unroll(self._poll_s)
      if unroll is not None:
        self._train_on(unroll)
      now = time.perf_counter()
      if now - last_report >= cfg.report_interval_s:
        last_report = now
        self._write_row(self.row())
      if now - last_checkpoint >= cfg.checkpoint_interval_s:
        last_checkpoint = now
        self.checkpoint()
    if self.stop_reason is None:
      self.stop_reason = reason
    return self.stop_reason
