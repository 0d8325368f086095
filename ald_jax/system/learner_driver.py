"""The learner side of a run: everything done with one batch of unrolls.

`LearnerDriver.train(batch)` is the one call the learner loop makes per
batch: one host-to-device transfer, the combined step (warm with the streams'
segment memory, or cold re-reading the context), the replay write, the
distill-only steps due, and non-finite accounting. The segment memory and the
replay live on the learner's device; the host keeps only `StreamMemoryBook`,
the record of which unroll each stream's memory holds. The loop knows nothing
else about the learner: it publishes `actor_params()`, checkpoints
`host_state()` with `checkpoint_metadata()`, and reports `counters()` and
`metrics()`.

With the first batch the driver compiles every step variant the run will
call (cold, warm, distill-only) side by side on threads, instead of stalling
the loop once per variant as each is first needed.
"""
from __future__ import annotations

from concurrent import futures
from typing import Any, Callable, NamedTuple

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from ald_jax import config as config_lib
from ald_jax import types
from ald_jax.system import errors
from ald_jax.system import params as params_lib
from ald_jax.system import replay as replay_lib

Params = Any


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
    return stream_id

  def is_warm(self, stream_id: np.ndarray, unroll_index: np.ndarray) -> bool:
    stream_id = self._check(stream_id)
    unroll_index = np.asarray(unroll_index)
    # A stream twice in one batch (the batcher's overflow fallback) cannot
    # read one memory slot for two different unrolls.
    return bool(np.unique(stream_id).size == stream_id.size and
                np.all(unroll_index > 0) and
                np.all(self._last[stream_id] == unroll_index - 1))

  def record(self, stream_id: np.ndarray, unroll_index: np.ndarray) -> None:
    """The memory of these streams now holds these unrolls. With a stream
    twice in the batch, which write won is unknown: those go cold next."""
    stream_id = self._check(stream_id)
    self._last[stream_id] = unroll_index
    unique, counts = np.unique(stream_id, return_counts=True)
    self._last[unique[counts > 1]] = -2

  def forget(self, stream_id: np.ndarray) -> None:
    """The next unroll of these streams takes the cold path."""
    self._last[self._check(stream_id)] = -2


class TrainResult(NamedTuple):
  """What one `LearnerDriver.train` call did."""
  applied: bool          # the combined update was finite and applied
  distill_steps: int     # distill-only steps applied
  distill_skipped: int   # distill-only steps skipped as non-finite
  warm: bool = False     # the combined step read the segment memory


class DriverCounters(NamedTuple):
  learner_steps: int        # combined updates applied
  distill_steps: int        # distill-only updates applied
  nonfinite_total: int      # combined updates skipped (NaN/inf)
  distill_nonfinite_total: int  # distill-only updates skipped (NaN/inf)
  warm_steps: int = 0       # combined steps that read the segment memory
  cold_steps: int = 0       # combined steps that re-read the context


class LearnerDriver:
  """Runs the learner on batches; owns the learner state, the streams'
  segment memory and the device replay.

  Args:
    learner: a `learner.Learner`.
    config: the run's TrainConfig (streams, distill ratio, replay size,
      max_consecutive_nonfinite).
    device: the learner's device.
    state: the initial LearnerState (host or device arrays). Its `rng`
      drives replay sampling, so a restored state continues the sampling.
    counters: counters restored from a checkpoint (DriverCounters fields).
    replay_rng_state: ignored (older checkpoints); kept for compatibility.

  Raises (from `train`): errors.NonFiniteLossError after
  `max_consecutive_nonfinite` skipped combined updates in a row.
  """

  def __init__(self, learner: Any, config: config_lib.TrainConfig,
               device: jax.Device, state: Any, *,
               counters: dict[str, int] | None = None,
               replay_rng_state: dict | None = None):
    del replay_rng_state
    self._learner = learner
    self._config = config
    self._device = device
    self._state = jax.device_put(state, device)
    restored = counters or {}
    self._counts = {name: int(restored.get(name, 0))
                    for name in DriverCounters._fields}
    self._consecutive_nonfinite = 0
    self._last_metrics: dict[str, Any] = {}
    # (metrics stacked [steps], index of the last applied step) or None
    self._last_distill_metrics: tuple[dict[str, Any], int] | None = None
    self.num_streams = config.num_actors * config.envs_per_actor
    self.cached = (learner.uses_memory and
                   learner.config.learner_memory == "cached")
    self.book = StreamMemoryBook(self.num_streams)
    self._memory = (jax.device_put(learner.init_memory(self.num_streams),
                                   device) if self.cached else ())
    ratio = (config.distill_steps_per_rl_step if learner.spec.distills
             else 0.0)
    self._schedule = replay_lib.DistillSchedule(ratio)
    self._replay = (jax.device_put(learner.init_replay(config.replay_capacity),
                                   device) if ratio > 0 else None)
    # The replay is not checkpointed: it starts empty, and only an applied
    # combined step writes rows into it.
    self._replay_holds_rows = False
    # One jitted call copies the actor parameters out of the (donated)
    # learner state: fresh buffers the actors may keep.
    self._copy_actor_params = jax.jit(lambda s: jax.tree_util.tree_map(
        jnp.copy, learner.actor_params(s)))
    self.compiled_variants = False

  def _compile_variants(self, placed: types.Batch) -> None:
    """Compiles every step variant this run calls, at once, for `placed`'s
    shapes.

    Each variant (the cold and warm combined steps, the distill-only steps
    for each count the schedule can ask for) is
    a separate XLA program of ~15-20 s to compile at the small sizes on two
    CPU cores; compiled on first use, they stall the loop one after another.
    XLA compiles without holding the GIL, so threads overlap them. The
    executables land in JAX's in-memory compilation cache, where the jitted
    calls find them (tracing runs again, ~0.3 s). Lowering reads the
    arguments' shapes only: nothing is donated here.
    """
    learner = self._learner
    jobs = [(learner.train_step, (self._state, self._memory, self._replay,
                                  placed), {"warm": warm})
            for warm in ((False, True) if self.cached else (False,))]
    if self._replay is not None:
      jobs += [(learner.replay_distill_steps, (self._state, self._replay),
                {"num_steps": num_steps})
               for num_steps in self._schedule.possible_steps()]
    # Steps that are not jitted functions (test doubles) compile nothing.
    jobs = [job for job in jobs if hasattr(job[0], "lower")]
    self.compiled_variants = True
    if not jobs:
      return
    with futures.ThreadPoolExecutor(len(jobs),
                                    thread_name_prefix="compile") as pool:
      for done in [pool.submit(lambda f, args, kwargs:
                               f.lower(*args, **kwargs).compile(), *job)
                   for job in jobs]:
        done.result()

  def train(self, batch: types.Batch) -> TrainResult:
    """One combined step on `batch` (host arrays; rows with stream ids when
    the memory is cached) plus the distill-only steps due."""
    cfg = self._config
    warm = False
    if self.cached:
      if batch.stream_id is None or batch.unroll_index is None:
        raise ValueError("learner_memory='cached' needs rows with stream_id "
                         "and unroll_index (the system's actors set them)")
      warm = self.book.is_warm(batch.stream_id, batch.unroll_index)
    placed = jax.device_put(batch, self._device)   # one transfer per batch
    if not self.cached:
      placed = placed.replace(stream_id=None, unroll_index=None)
    if not self.compiled_variants:
      self._compile_variants(placed)
    self._state, self._memory, self._replay, metrics = (
        self._learner.train_step(self._state, self._memory, self._replay,
                                 placed, warm=warm))
    self._counts["warm_steps" if warm else "cold_steps"] += 1
    # The distill-only steps due run as one call, dispatched before any
    # result is read; one device_get reads every non-finite flag.
    due = self._schedule.steps_due()
    if due and not self._replay_holds_rows and float(
        jax.device_get(metrics["nonfinite"])) != 0:
      due = 0  # nothing to sample yet: distilling needs a trained row
    distill_metrics = None
    if due:
      self._state, distill_metrics = self._learner.replay_distill_steps(
          self._state, self._replay, num_steps=due)
    nonfinite, distill_nonfinite = jax.device_get(
        (metrics["nonfinite"],
         distill_metrics["nonfinite"] if due else np.zeros(0, np.float32)))
    applied = float(nonfinite) == 0
    if applied:
      self._replay_holds_rows = True
      self._consecutive_nonfinite = 0
      self._counts["learner_steps"] += 1
      self._last_metrics = metrics
      if self.cached:
        self.book.record(batch.stream_id, batch.unroll_index)
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
    finite_steps = np.flatnonzero(
        np.asarray(distill_nonfinite, np.float32) == 0)
    distilled = int(finite_steps.size)
    skipped = due - distilled
    if distilled:  # the last applied step's metrics, read when reported
      self._last_distill_metrics = (distill_metrics, int(finite_steps[-1]))
    self._counts["distill_steps"] += distilled
    self._counts["distill_nonfinite_total"] += skipped
    if skipped:
      logging.warning("%d distill-only update(s) skipped: non-finite loss "
                      "or gradient", skipped)
    return TrainResult(applied, distilled, skipped, warm)

  def actor_params(self) -> Params:
    """A fresh device copy of the actor parameters, safe to publish."""
    return self._copy_actor_params(self._state)

  def host_params(self, select: Callable[[Any], Params]) -> Params:
    """A host (numpy) copy of `select(learner state)`, e.g. the parameters
    an evaluation acts with; safe to keep across later (donating) steps."""
    return params_lib.host_copy(select(self._state))

  def counters(self) -> DriverCounters:
    return DriverCounters(**self._counts)

  def metrics(self) -> dict[str, float]:
    """The last applied combined step's metrics and, as `distill_only/*`,
    the last applied distill-only step's, as floats."""
    out = {k: float(v) for k, v in jax.device_get(self._last_metrics).items()}
    if self._last_distill_metrics is not None:
      stacked, index = self._last_distill_metrics
      for k, v in jax.device_get(stacked).items():
        out[f"distill_only/{k}"] = float(np.asarray(v)[index])
    out["learner_warm_steps"] = float(self._counts["warm_steps"])
    out["learner_cold_steps"] = float(self._counts["cold_steps"])
    return out

  def host_state(self) -> Any:
    """The learner state as host arrays (for checkpoints and results)."""
    return jax.device_get(self._state)

  def checkpoint_metadata(self) -> dict[str, Any]:
    """What a checkpoint needs beyond the state to continue this driver."""
    return dict(self._counts)
