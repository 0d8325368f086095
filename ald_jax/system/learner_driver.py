"""The learner side of a run: one call per batch, everything on the device.

`LearnerDriver.train(batch)` does all the learner work the loop needs for one
batch of rows: one host-to-device transfer, the combined step (warm with the
streams' segment memory, or cold re-reading the context), the replay write,
the distill-only steps due, and non-finite accounting. The segment memory and
the replay live on the learner's device; the host keeps only
`StreamMemoryBook`, the record of which unroll each stream's memory holds.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import numpy as np

from ald_jax import config as config_lib
from ald_jax import learner as learner_lib
from ald_jax import types
from ald_jax.system import replay as replay_lib


class StreamMemoryBook:
  """Which unroll of each stream its device memory holds (host, numpy).

  A batch is warm when every row's previous unroll (same stream, index - 1)
  was the last one trained for that stream: a stream's first unroll, a gap in
  its counter (dropped data), a restarted actor (its counter restarts at 0)
  and a resumed run (a fresh book) all take the cold path.
  """

  def __init__(self, num_streams: int):
    if num_streams <= 0:
      raise ValueError(f"num_streams must be > 0, got {num_streams}")
    self.num_streams = num_streams
    self._last = np.full(num_streams, -2, np.int64)

  def _check(self, stream_id: np.ndarray) -> np.ndarray:
    stream_id = np.asarray(stream_id)
    if stream_id.size and (stream_id.min() < 0
                           or stream_id.max() >= self.num_streams):
      raise ValueError(
          f"stream ids must be in [0, {self.num_streams}), got "
          f"[{stream_id.min()}, {stream_id.max()}]")
    if np.unique(stream_id).size != stream_id.size:
      raise ValueError("a batch must hold each stream at most once for the "
                       "segment memory (see StreamBatcher)")
    return stream_id

  def is_warm(self, stream_id: np.ndarray, unroll_index: np.ndarray) -> bool:
    stream_id = self._check(stream_id)
    unroll_index = np.asarray(unroll_index)
    return bool(np.all(unroll_index > 0) and
                np.all(self._last[stream_id] == unroll_index - 1))

  def record(self, stream_id: np.ndarray, unroll_index: np.ndarray) -> None:
    self._last[self._check(stream_id)] = unroll_index

  def forget(self, stream_id: np.ndarray) -> None:
    """The next unroll of these streams takes the cold path."""
    self._last[self._check(stream_id)] = -2


class TrainOutcome(NamedTuple):
  nonfinite: bool          # the combined update was skipped (NaN/inf)
  warm: bool               # the combined step read the segment memory
  distill_steps: int       # distill-only updates applied
  distill_nonfinite: int   # distill-only updates skipped (NaN/inf)


class LearnerDriver:
  """Owns the learner's device state, segment memory and replay.

  Args:
    learner: from `learner.make_learner`.
    config: the run's TrainConfig (distill ratio, replay capacity, streams).
    state: the initial (or restored) LearnerState.
    device: the learner's device (default: jax.devices()[0]).
  """

  def __init__(self, learner: learner_lib.Learner,
               config: config_lib.TrainConfig, state: learner_lib.LearnerState,
               device: jax.Device | None = None):
    self.learner = learner
    self.device = device or jax.devices()[0]
    self.num_streams = config.num_actors * config.envs_per_actor
    self.cached = (learner.uses_memory and
                   learner.config.learner_memory == "cached")
    self.state = jax.device_put(state, self.device)
    self.book = StreamMemoryBook(self.num_streams)
    self._memory = jax.device_put(learner.init_memory(self.num_streams),
                                  self.device) if self.cached else ()
    ratio = config.distill_steps_per_rl_step if learner.spec.distills else 0
    self.schedule = replay_lib.DistillSchedule(ratio)
    self._replay = (jax.device_put(learner.init_replay(config.replay_capacity),
                                   self.device) if ratio > 0 else None)
    self.last_metrics: dict[str, Any] = {}
    self.last_distill_metrics: dict[str, Any] = {}
    self.warm_steps = 0
    self.cold_steps = 0
    self._copy_actor_params = jax.jit(lambda s: jax.tree_util.tree_map(
        lambda x: x.copy(), learner.actor_params(s)))

  def train(self, batch: types.Batch) -> TrainOutcome:
    """One combined step on `batch` (host arrays, rows with stream ids when
    the memory is cached) and the distill-only steps now due."""
    warm = False
    if self.cached:
      if batch.stream_id is None or batch.unroll_index is None:
        raise ValueError("learner_memory='cached' needs rows with stream_id "
                         "and unroll_index (the system's actors set them)")
      warm = self.book.is_warm(batch.stream_id, batch.unroll_index)
    placed = jax.device_put(batch, self.device)   # one transfer per batch
    if not self.cached:
      placed = placed.replace(stream_id=None, unroll_index=None)
    self.state, self._memory, self._replay, metrics = self.learner.train_step(
        self.state, self._memory, self._replay, placed, warm=warm)
    # One scalar per step; the rest is fetched at report time.
    nonfinite = float(metrics["nonfinite"]) > 0
    if not nonfinite:
      self.last_metrics = metrics
      if self.cached:
        self.book.record(batch.stream_id, batch.unroll_index)
    if warm:
      self.warm_steps += 1
    else:
      self.cold_steps += 1
    done = skipped = 0
    for _ in range(self.schedule.steps_due()):
      self.state, distill_metrics = self.learner.replay_distill_step(
          self.state, self._replay)
      if float(distill_metrics["nonfinite"]) > 0:
        skipped += 1
      else:
        done += 1
        self.last_distill_metrics = distill_metrics
    return TrainOutcome(nonfinite, warm, done, skipped)

  def actor_params(self):
    """Fresh device buffers of the acting parameters (safe to hand to actors
    while later steps donate the state)."""
    return self._copy_actor_params(self.state)

  def host_state(self):
    return jax.device_get(self.state)

  def metrics(self) -> dict[str, float]:
    """The latest step's metrics as floats (one host transfer)."""
    out = {k: float(v) for k, v in jax.device_get(self.last_metrics).items()}
    for k, v in jax.device_get(self.last_distill_metrics).items():
      out[f"distill_only/{k}"] = float(v)
    out["learner_warm_steps"] = float(self.warm_steps)
    out["learner_cold_steps"] = float(self.cold_steps)
    return out
