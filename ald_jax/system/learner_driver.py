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

Pipelining (the default): the host never waits for the step it has just
dispatched. `train(batch n)` dispatches step n (and its distill-only steps),
then reads step n-1's non-finite flags, which the device has usually
finished by then, so batch assembly, transfers, bookkeeping and publishing
run while the device works. The book records step n as applied when it is
dispatched; a step found skipped afterwards is taken back out of the book.
Its successor, already dispatched, may have been sent warm over the same
streams: it receives the skipped step's flag and takes the cold path on the
device (`learner.train_step`'s `previous_nonfinite`), which is what a serial
driver, knowing the outcome, would have chosen. Pipelined and serial drivers
therefore compute the same steps on the same sequence of batches, skipped
steps included; the pipelined one reports each result one call later.

`compile(example)` compiles every step variant the run will call (cold,
warm, distill-only) side by side on threads, from the config's shapes, so a
run compiles them before its actors start.
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

  def snapshot(self) -> np.ndarray:
    """Every stream's entry, to take a record back later (`restore`)."""
    return self._last.copy()

  def restore(self, stream_id: np.ndarray, entries: np.ndarray) -> None:
    """Sets these streams' entries back to `entries` (a `snapshot`)."""
    stream_id = self._check(stream_id)
    self._last[stream_id] = entries[stream_id]


class TrainResult(NamedTuple):
  """What one combined step (and its distill-only steps) did."""
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


class _InFlight(NamedTuple):
  """A dispatched step whose flags the host has not read yet."""
  stream_id: np.ndarray | None
  dispatched_warm: bool     # sent warm (the device may still go cold)
  after_previous: bool      # warm over a stream of the step before it
  book_before: np.ndarray | None  # the book before this step's record
  nonfinite: Any            # device scalar
  metrics: dict[str, Any]
  due: int
  distill_nonfinite: Any    # device [due] or None
  distill_metrics: dict[str, Any] | None


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
    pipelined: read each step's results one call later (see the module
      doc); False reads them before `train` returns.

  Raises (from `train`/`flush`): errors.NonFiniteLossError after
  `max_consecutive_nonfinite` skipped combined updates in a row.
  """

  def __init__(self, learner: Any, config: config_lib.TrainConfig,
               device: jax.Device, state: Any, *,
               counters: dict[str, int] | None = None,
               pipelined: bool = True):
    self._learner = learner
    self._config = config
    self._device = device
    self.pipelined = pipelined
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
    self._applied_zero = jax.device_put(np.float32(0), device)
    self._in_flight: _InFlight | None = None
    self._previous_skipped = False  # the last resolved step was skipped
    # One jitted call copies the actor parameters out of the (donated)
    # learner state: fresh buffers the actors may keep.
    self._copy_actor_params = jax.jit(lambda s: jax.tree_util.tree_map(
        jnp.copy, learner.actor_params(s)))
    self.compiled_variants = False

  # ---- compiling ----

  def example_batch(self) -> types.Batch:
    """A zero batch of the run's shapes, with stream ids when cached."""
    batch = self._learner.example_batch(self._config.learner.batch_size)
    if self.cached:
      rows = self._config.learner.batch_size
      batch = batch.replace(stream_id=np.arange(rows, dtype=np.int32),
                            unroll_index=np.ones(rows, np.int32))
    return batch

  def compile(self, batch: types.Batch | None = None) -> int:
    """Compiles every step variant this run calls, at once, for `batch`'s
    shapes (default: `example_batch()`); returns how many were compiled.

    Each variant (the cold and warm combined steps, the distill-only steps
    for each count the schedule can ask for, the parameter copy) is a
    separate XLA program; compiled on first use, they would stall the loop
    one after another, after the actors have started. XLA compiles without
    holding the GIL, so threads overlap them. The executables land in JAX's
    in-memory cache (and its persistent cache when enabled), where the
    jitted calls find them. Lowering reads the arguments' shapes only:
    nothing is donated here.
    """
    placed = self._place(self.example_batch() if batch is None else batch)
    learner = self._learner
    jobs = [(learner.train_step, (self._state, self._memory, self._replay,
                                  placed),
             {"warm": warm, "previous_nonfinite": self._applied_zero})
            for warm in ((False, True) if self.cached else (False,))]
    if self._replay is not None:
      jobs += [(learner.replay_distill_steps, (self._state, self._replay),
                {"num_steps": num_steps})
               for num_steps in self._schedule.possible_steps()]
    jobs.append((self._copy_actor_params, (self._state,), {}))
    # Steps that are not jitted functions (test doubles) compile nothing.
    jobs = [job for job in jobs if hasattr(job[0], "lower")]
    self.compiled_variants = True
    if jobs:
      with futures.ThreadPoolExecutor(len(jobs),
                                      thread_name_prefix="compile") as pool:
        for done in [pool.submit(lambda f, args, kwargs:
                                 f.lower(*args, **kwargs).compile(), *job)
                     for job in jobs]:
          done.result()
    return len(jobs)

  def _place(self, batch: types.Batch) -> types.Batch:
    """The batch as the step receives it. Host arrays go straight into the
    jitted call when the learner's device is JAX's default: its dispatch
    transfers them ~5x faster than a `device_put` of the tree (measured:
    0.18 vs 0.94 ms for a default-size batch on the 2-core CPU)."""
    if not self.cached:
      batch = batch.replace(stream_id=None, unroll_index=None)
    if self._device == jax.devices()[0]:
      return jax.tree.map(np.asarray, batch)
    return jax.device_put(batch, self._device)

  # ---- training ----

  def train(self, batch: types.Batch) -> TrainResult | None:
    """Dispatches one combined step on `batch` (host arrays; rows with
    stream ids when the memory is cached) plus the distill-only steps due.

    Returns the result of the previous step (pipelined; None for the first)
    or of this one (serial).
    """
    warm, after_previous, book_before = False, False, None
    if self.cached:
      if batch.stream_id is None or batch.unroll_index is None:
        raise ValueError("learner_memory='cached' needs rows with stream_id "
                         "and unroll_index (the system's actors set them)")
      warm = self.book.is_warm(batch.stream_id, batch.unroll_index)
      previous = self._in_flight
      after_previous = bool(
          warm and previous is not None and previous.stream_id is not None
          and np.intersect1d(previous.stream_id, batch.stream_id).size)
    placed = self._place(batch)
    if not self.compiled_variants:
      self.compile(batch)
    previous_nonfinite = (self._in_flight.nonfinite if after_previous
                          else self._applied_zero)
    self._state, self._memory, self._replay, metrics = (
        self._learner.train_step(self._state, self._memory, self._replay,
                                 placed, warm=warm,
                                 previous_nonfinite=previous_nonfinite))
    if self.cached:  # recorded as applied; taken back if it was not
      book_before = self.book.snapshot()
      self.book.record(batch.stream_id, batch.unroll_index)
    step = _InFlight(batch.stream_id if self.cached else None, warm,
                     after_previous, book_before, metrics["nonfinite"],
                     metrics, 0, None, None)
    earlier = None
    due = self._schedule.steps_due()
    if due and not self._replay_holds_rows:
      # Nothing to sample until a step has written rows: read the earlier
      # step, then this one (only until the first step is applied).
      earlier = self._resolve(later=step)
      if not self._replay_holds_rows and float(
          jax.device_get(metrics["nonfinite"])) != 0:
        due = 0
    if due:
      self._state, distill_metrics = self._learner.replay_distill_steps(
          self._state, self._replay, num_steps=due)
      step = step._replace(due=due,
                           distill_nonfinite=distill_metrics["nonfinite"],
                           distill_metrics=distill_metrics)
    if earlier is None:  # pipelined: the previous step, done or nearly
      earlier = self._resolve(later=step)
    self._in_flight = step
    return earlier if self.pipelined else self._resolve()

  def flush(self) -> TrainResult | None:
    """Reads the step in flight, if any; returns its result."""
    return self._resolve()

  def _resolve(self, later: _InFlight | None = None) -> TrainResult | None:
    """Reads the in-flight step's flags and does its bookkeeping; `later`
    is the step dispatched after it, if any."""
    step, self._in_flight = self._in_flight, None
    if step is None:
      return None
    cfg = self._config
    nonfinite, distill_nonfinite = jax.device_get(
        (step.nonfinite, step.distill_nonfinite if step.due
         else np.zeros(0, np.float32)))
    applied = float(nonfinite) == 0
    warm = step.dispatched_warm and not (step.after_previous and
                                         self._previous_skipped)
    self._counts["warm_steps" if warm else "cold_steps"] += 1
    self._previous_skipped = not applied
    if applied:
      self._replay_holds_rows = True
      self._consecutive_nonfinite = 0
      self._counts["learner_steps"] += 1
      self._last_metrics = step.metrics
    else:
      if step.book_before is not None:
        self._take_back(step, later)
      self._consecutive_nonfinite += 1
      self._counts["nonfinite_total"] += 1
      logging.warning("non-finite loss or gradient: update skipped "
                      "(%d in a row)", self._consecutive_nonfinite)
      if self._consecutive_nonfinite >= cfg.max_consecutive_nonfinite:
        raise errors.NonFiniteLossError(
            f"{self._consecutive_nonfinite} learner updates in a row had a "
            "non-finite loss or gradient (max_consecutive_nonfinite="
            f"{cfg.max_consecutive_nonfinite}); last metrics: "
            f"{ {k: float(v) for k, v in jax.device_get(step.metrics).items()} }")
    finite_steps = np.flatnonzero(
        np.asarray(distill_nonfinite, np.float32) == 0)
    distilled = int(finite_steps.size)
    skipped = step.due - distilled
    if distilled:  # the last applied step's metrics, read when reported
      self._last_distill_metrics = (step.distill_metrics,
                                    int(finite_steps[-1]))
    self._counts["distill_steps"] += distilled
    self._counts["distill_nonfinite_total"] += skipped
    if skipped:
      logging.warning("%d distill-only update(s) skipped: non-finite loss "
                      "or gradient", skipped)
    return TrainResult(applied, distilled, skipped, warm)

  def _take_back(self, step: _InFlight, later: _InFlight | None) -> None:
    """A skipped step left its streams' memory as it was: the book says so
    again. A later step already dispatched over those streams recorded its
    own unrolls (and went cold on the device if it was sent warm); its
    record stays, but what it would restore is corrected."""
    streams = step.stream_id
    if later is None or later.stream_id is None:
      self.book.restore(streams, step.book_before)
      return
    untouched = np.setdiff1d(streams, later.stream_id)
    self.book.restore(untouched, step.book_before)
    later.book_before[streams] = step.book_before[streams]

  # ---- reading ----

  def actor_params(self) -> Params:
    """A fresh device copy of the actor parameters, safe to publish (its
    buffers are never donated)."""
    return self._copy_actor_params(self._state)

  def host_params(self, select: Callable[[Any], Params]) -> Params:
    """A host (numpy) copy of `select(learner state)`, e.g. the parameters
    an evaluation acts with; safe to keep across later (donating) steps."""
    return params_lib.host_copy(select(self._state))

  def host_buffers(self) -> tuple[Any, Any]:
    """(segment memory, replay) as host arrays (tests, debugging)."""
    self.flush()
    return jax.device_get((self._memory, self._replay))

  @property
  def device(self) -> jax.Device:
    """The device the learner's state lives and steps on."""
    return self._device

  def counters(self) -> DriverCounters:
    self.flush()
    return DriverCounters(**self._counts)

  def metrics(self) -> dict[str, float]:
    """The last applied combined step's metrics and, as `distill_only/*`,
    the last applied distill-only step's, as floats."""
    self.flush()
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
    self.flush()
    return jax.device_get(self._state)

  def checkpoint_metadata(self) -> dict[str, Any]:
    """What a checkpoint needs beyond the state to continue this driver."""
    self.flush()
    return dict(self._counts)
