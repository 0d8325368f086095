"""Unroll plumbing for the learner: stacking, fixed-size batching, replay.

An *unroll* is a `Batch` (or any pytree of arrays) whose every leaf has the
same leading dimension: one row per environment stream. Actors emit unrolls
with E rows; the learner wants batches of exactly B rows, so `UnrollBatcher`
re-cuts rows into B-sized batches (`StreamBatcher`: each stream at most once)
and `DistillSchedule` paces the distill-only steps. The replay itself lives on
the learner's device (`learner.Replay`). Everything here is numpy on the host.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np

Tree = Any


def _leading_dim(tree: Tree) -> int:
  leaves = jax.tree.leaves(tree)
  if not leaves:
    raise ValueError("an unroll must contain at least one array")
  sizes = {np.shape(leaf)[0] for leaf in leaves}
  if len(sizes) != 1:
    raise ValueError(f"every leaf of an unroll must share the leading (row) "
                     f"dimension, got sizes {sorted(sizes)}")
  return sizes.pop()


def num_rows(tree: Tree) -> int:
  """The shared leading dimension of every leaf."""
  return _leading_dim(tree)


def stack_unrolls(unrolls: Sequence[Tree]) -> Tree:
  """Concatenates unrolls along the row axis: [E1 + E2 + ..., ...]."""
  if not unrolls:
    raise ValueError("stack_unrolls needs at least one unroll")
  for unroll in unrolls:
    _leading_dim(unroll)
  return jax.tree.map(lambda *xs: np.concatenate(xs, axis=0), *unrolls)


def slice_rows(tree: Tree, start: int, stop: int) -> Tree:
  return jax.tree.map(lambda x: x[start:stop], tree)


class UnrollBatcher:
  """Accumulates unrolls and cuts them into batches of `batch_size` rows.

  Leftover rows carry over to the next batch, in arrival order.
  """

  def __init__(self, batch_size: int):
    if batch_size <= 0:
      raise ValueError(f"batch_size must be > 0, got {batch_size}")
    self.batch_size = batch_size
    self._pending: list[Tree] = []
    self._rows = 0

  @property
  def pending_rows(self) -> int:
    return self._rows

  def add(self, unroll: Tree) -> None:
    self._rows += _leading_dim(unroll)
    self._pending.append(unroll)

  def pop_batch(self) -> Tree | None:
    """A batch of `batch_size` rows, or None while fewer rows are pending."""
    if self._rows < self.batch_size:
      return None
    merged = (self._pending[0] if len(self._pending) == 1
              else stack_unrolls(self._pending))
    batch = slice_rows(merged, 0, self.batch_size)
    rest = self._rows - self.batch_size
    self._pending = ([slice_rows(merged, self.batch_size, self._rows)]
                     if rest else [])
    self._rows = rest
    return batch


class StreamBatcher:
  """Cuts unrolls into batches of `batch_size` rows, each stream at most once.

  Rows carry `stream_id`; a batch takes, in arrival order, the oldest pending
  row of each stream, so a stream's consecutive unrolls land in later batches
  in order (a row whose stream is already in the batch waits for a later
  one). Needs at least `batch_size` distinct streams.

  If pending rows reach `max_pending_rows` (one actor far ahead of the
  others), the batch is filled with the oldest remaining rows instead, still
  in per-stream order, so it may hold a stream twice (the learner then takes
  the cold path: `StreamMemoryBook.is_warm`); `repeated_rows` counts those
  rows.
  """

  def __init__(self, batch_size: int, max_pending_rows: int | None = None):
    if batch_size <= 0:
      raise ValueError(f"batch_size must be > 0, got {batch_size}")
    self.batch_size = batch_size
    self.max_pending_rows = (8 * batch_size if max_pending_rows is None
                             else max_pending_rows)
    if self.max_pending_rows < batch_size:
      raise ValueError(f"max_pending_rows must be >= batch_size "
                       f"({batch_size}), got {self.max_pending_rows}")
    self._pending: list[Tree] = []
    self._rows = 0
    self.repeated_rows = 0

  @property
  def pending_rows(self) -> int:
    return self._rows

  def add(self, unroll: Tree) -> None:
    if getattr(unroll, "stream_id", None) is None:
      raise ValueError("StreamBatcher needs unrolls with a stream_id")
    self._rows += _leading_dim(unroll)
    self._pending.append(unroll)

  def _rows_to_take(self, stream_id: np.ndarray) -> np.ndarray | None:
    _, first = np.unique(stream_id, return_index=True)
    first = np.sort(first)  # the oldest pending row of each stream
    if first.size >= self.batch_size:
      return first[:self.batch_size]
    if self._rows < self.max_pending_rows:
      return None  # wait for rows of other streams
    others = np.setdiff1d(np.arange(stream_id.size), first)  # sorted
    fill = others[:self.batch_size - first.size]
    self.repeated_rows += fill.size
    return np.sort(np.concatenate([first, fill]))

  def pop_batch(self) -> Tree | None:
    """A batch of distinct streams, or None while too few are pending."""
    if self._rows < self.batch_size:
      return None
    merged = (self._pending[0] if len(self._pending) == 1
              else stack_unrolls(self._pending))
    take = self._rows_to_take(np.asarray(merged.stream_id))
    if take is None:
      self._pending = [merged]
      return None
    keep = np.ones(self._rows, bool)
    keep[take] = False
    batch = jax.tree.map(lambda x: x[take], merged)
    rest = self._rows - take.size
    self._pending = [jax.tree.map(lambda x: x[keep], merged)] if rest else []
    self._rows = rest
    return batch


def make_batcher(batch_size: int, example: Tree):
  """A StreamBatcher when rows carry `stream_id`, else an UnrollBatcher."""
  if getattr(example, "stream_id", None) is not None:
    return StreamBatcher(batch_size)
  return UnrollBatcher(batch_size)


class DistillSchedule:
  """Turns a float ratio of distill-only steps per RL step into whole steps.

  A running credit accumulates `ratio` per RL step; each call returns the
  whole steps now due. Over n RL steps exactly floor(n * ratio) distill steps
  run (up to float rounding), e.g. 0.5 -> 0, 1, 0, 1, ...; 4 -> 4, 4, ...
  """

  def __init__(self, ratio: float):
    if not ratio >= 0:
      raise ValueError(f"distill_steps_per_rl_step must be >= 0, got {ratio!r}")
    self.ratio = float(ratio)
    self._credit = 0.0

  def steps_due(self) -> int:
    """Call once per RL step; returns the distill-only steps to run now."""
    self._credit += self.ratio
    # A small epsilon absorbs float error (0.1 * 10 must give 1, not 0).
    due = int(np.floor(self._credit + 1e-9))
    self._credit -= due
    return due

  def possible_steps(self) -> list[int]:
    """Every non-zero count `steps_due` can return: floor and ceil of the
    ratio (4 -> [4]; 0.5 -> [1]; 1.5 -> [1, 2])."""
    return sorted({int(np.floor(self.ratio)), int(np.ceil(self.ratio))} - {0})
