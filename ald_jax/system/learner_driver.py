"""The learner side of a run: everything done with one batch of unrolls.

`LearnerDriver.train(batch)` is the one call the learner loop makes per
batch: it moves the batch to the learner's device (one transfer), runs the
combined step, does the non-finite accounting, feeds the replay buffer and
runs the distill-only steps due. The loop knows nothing else about the
learner: it publishes `actor_params()`, checkpoints `host_state()` with
`checkpoint_metadata()`, and reports `counters()` and `metrics()`.
"""
from __future__ import annotations

from typing import Any, NamedTuple

from absl import logging
import jax
import jax.numpy as jnp

from ald_jax import config as config_lib
from ald_jax import types
from ald_jax.system import errors
from ald_jax.system import replay as replay_lib

Params = Any


class TrainResult(NamedTuple):
  """What one `LearnerDriver.train` call did."""
  applied: bool          # the combined update was finite and applied
  distill_steps: int     # distill-only steps applied
  distill_skipped: int   # distill-only steps skipped as non-finite


class DriverCounters(NamedTuple):
  learner_steps: int        # combined updates applied
  distill_steps: int        # distill-only updates applied
  nonfinite_total: int      # combined updates skipped (NaN/inf)
  distill_nonfinite_total: int  # distill-only updates skipped (NaN/inf)


class LearnerDriver:
  """Runs the learner on batches; owns the learner state and the replay.

  Args:
    learner: a `learner.Learner` (step, distill_step, actor_params).
    config: the run's TrainConfig (batch size, distill ratio, replay size,
      max_consecutive_nonfinite, seed).
    device: the learner's device.
    state: the initial LearnerState (host or device arrays).
    counters: counters restored from a checkpoint (DriverCounters fields).
    replay_rng_state: the replay sampler's restored bit-generator state.

  Raises (from `train`): errors.NonFiniteLossError after
  `max_consecutive_nonfinite` skipped combined updates in a row.
  """

  def __init__(self, learner: Any, config: config_lib.TrainConfig,
               device: jax.Device, state: Any, *,
               counters: dict[str, int] | None = None,
               replay_rng_state: dict | None = None):
    self._learner = learner
    self._config = config
    self._device = device
    self._state = jax.device_put(state, device)
    restored = counters or {}
    self._counts = {name: int(restored.get(name, 0))
                    for name in DriverCounters._fields}
    self._consecutive_nonfinite = 0
    self._last_metrics: dict[str, Any] = {}
    self._replay = replay_lib.ReplayBuffer(config.replay_capacity,
                                           seed=config.seed)
    if replay_rng_state is not None:
      self._replay.rng.bit_generator.state = replay_rng_state
    self._schedule = replay_lib.DistillSchedule(
        config.distill_steps_per_rl_step)
    # One jitted call copies the actor parameters out of the (donated)
    # learner state: fresh buffers the actors may keep, without a host
    # round-trip per leaf.
    self._copy_actor_params = jax.jit(lambda s: jax.tree_util.tree_map(
        jnp.copy, learner.actor_params(s)))

  def train(self, batch: types.Batch) -> TrainResult:
    """One combined step on `batch` (host arrays) plus the distill steps due."""
    cfg = self._config
    state, metrics = self._learner.step(
        self._state, jax.device_put(batch, self._device))
    self._state = state
    # One scalar per step; the rest is fetched at report time.
    applied = float(metrics["nonfinite"]) == 0
    if applied:
      self._consecutive_nonfinite = 0
      self._counts["learner_steps"] += 1
      self._last_metrics = metrics
    else:
      self._consecutive_nonfinite += 1
      self._counts["nonfinite_total"] += 1
      logging.warning("non-finite loss or gradient: update skipped "
                      "(%d in a row)", self._consecutive_nonfinite)
      if self._consecutive_nonfinite >= cfg.max_consecutive_nonfinite:
        raise errors.NonFiniteLossError(
            f"{self._consecutive_nonfinite} learner updates in a row had a "
            "non-finite loss or gradient (max_consecutive_nonfinite="
            f"{cfg.max_consecutive_nonfinite}); last metrics: "
            f"{ {k: float(v) for k, v in metrics.items()} }")
    distilled = skipped = 0
    if cfg.distill_steps_per_rl_step > 0:  # replay feeds distill-only steps
      self._replay.add(batch)
      for _ in range(self._schedule.steps_due()):
        replayed = jax.device_put(self._replay.sample(cfg.learner.batch_size),
                                  self._device)
        self._state, distill_metrics = self._learner.distill_step(
            self._state, replayed)
        if float(distill_metrics["nonfinite"]) == 0:
          distilled += 1
        else:
          skipped += 1
      self._counts["distill_steps"] += distilled
      self._counts["distill_nonfinite_total"] += skipped
      if skipped:
        logging.warning("%d distill-only update(s) skipped: non-finite loss "
                        "or gradient", skipped)
    return TrainResult(applied, distilled, skipped)

  def actor_params(self) -> Params:
    """A fresh device copy of the actor parameters, safe to publish."""
    return self._copy_actor_params(self._state)

  def counters(self) -> DriverCounters:
    return DriverCounters(**self._counts)

  def metrics(self) -> dict[str, float]:
    """The last applied combined step's metrics, as floats (one transfer)."""
    return {k: float(v) for k, v in jax.device_get(self._last_metrics).items()}

  def host_state(self) -> Any:
    """The learner state as host arrays (for checkpoints and results)."""
    return jax.device_get(self._state)

  def checkpoint_metadata(self) -> dict[str, Any]:
    """What a checkpoint needs beyond the state to continue this driver."""
    return dict(self._counts,
                replay_rng_state=self._replay.rng.bit_generator.state)
