"""Orbax checkpoints: a pytree state plus a JSON metadata dict per step.

Layout: `<directory>/<step>/{state,metadata}` managed by orbax's
`CheckpointManager` (keeps the last `max_to_keep` steps). Atomicity is
orbax's: a step is written into `<step>.orbax-checkpoint-tmp*` and renamed
to `<step>` only once every item is complete, and step discovery ignores tmp
directories, so a crash mid-save leaves the previous step as the latest.
As a second line of defence, `restore_latest` falls back to older steps
(with a warning) when the newest cannot be read.

The state is any pytree of arrays (a flax.struct dataclass such as the
learner state, typed or raw PRNG keys included); the metadata is JSON
(counters, numpy RNG state, resolved config: see `to_jsonable`).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

from absl import logging
import jax
import numpy as np
import orbax.checkpoint as ocp

_STATE, _METADATA = "state", "metadata"


def to_jsonable(value: Any) -> Any:
  """Converts configs/numpy values into plain JSON types (tuples -> lists)."""
  if dataclasses.is_dataclass(value) and not isinstance(value, type):
    return {f.name: to_jsonable(getattr(value, f.name))
            for f in dataclasses.fields(value)}
  if isinstance(value, Mapping):
    return {str(k): to_jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [to_jsonable(v) for v in value]
  if isinstance(value, (np.ndarray, jax.Array)):
    return to_jsonable(np.asarray(value).tolist())
  if isinstance(value, np.generic):
    return value.item()
  if value is None or isinstance(value, (bool, int, float, str)):
    return value
  raise TypeError(f"cannot store {type(value).__name__} in checkpoint "
                  f"metadata: {value!r}")


def _abstract_target(target_like: Any) -> Any:
  """Restore targets: jax arrays keep their shape, dtype and sharding (so a
  CPU-saved checkpoint restores onto the target's device); other leaves are
  passed as-is."""
  def abstract(leaf):
    if isinstance(leaf, jax.Array):
      return ocp.utils.to_shape_dtype_struct(leaf)
    return leaf
  return jax.tree.map(abstract, target_like)


class Checkpointer:
  """Saves and restores `(state, metadata)` pairs under one directory."""

  def __init__(self, directory: str | os.PathLike, max_to_keep: int = 3,
               async_save: bool = False, read_only: bool = False):
    if max_to_keep <= 0:
      raise ValueError(f"max_to_keep must be > 0, got {max_to_keep}")
    self.directory = os.path.abspath(os.fspath(directory))
    options = ocp.CheckpointManagerOptions(
        max_to_keep=None if read_only else max_to_keep,
        create=not read_only, read_only=read_only,
        enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(
        self.directory, options=options, item_names=(_STATE, _METADATA))

  def save(self, step: int, state: Any, metadata: Mapping[str, Any]) -> bool:
    """Saves `state` and `metadata` as `step`. False if `step` already exists
    (e.g. a final save right after a periodic one). Blocks until written
    unless the checkpointer was built with `async_save=True`."""
    step = int(step)
    if step in self._manager.all_steps():
      logging.info("checkpoint step %d already exists in %s; not saved again",
                   step, self.directory)
      return False
    saved = self._manager.save(
        step,
        args=ocp.args.Composite(
            **{_STATE: ocp.args.StandardSave(state),
               _METADATA: ocp.args.JsonSave(to_jsonable(dict(metadata)))}),
        force=True)
    if not saved:
      raise RuntimeError(f"orbax refused to save checkpoint step {step}")
    return True

  def wait_until_finished(self) -> None:
    self._manager.wait_until_finished()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def restore(self, step: int, target_like: Any) -> tuple[Any, dict]:
    """Restores `step`; `target_like` gives the state's structure, shapes,
    dtypes and (for jax arrays) devices."""
    restored = self._manager.restore(
        int(step),
        args=ocp.args.Composite(
            **{_STATE: ocp.args.StandardRestore(_abstract_target(target_like)),
               _METADATA: ocp.args.JsonRestore()}))
    return restored[_STATE], dict(restored[_METADATA])

  def restore_latest(self, target_like: Any) -> tuple[Any, dict] | None:
    """The newest readable checkpoint, or None when there is none.

    A newest step that fails to restore is skipped with a warning; if every
    step fails, the newest step's error is raised.
    """
    self._manager.reload()
    steps = sorted(self._manager.all_steps(), reverse=True)
    first_error = None
    for step in steps:
      try:
        return self.restore(step, target_like)
      except Exception as error:  # pylint: disable=broad-except
        logging.warning("checkpoint step %d in %s cannot be restored (%r); "
                        "trying an older one", step, self.directory, error)
        first_error = first_error or error
    if first_error is not None:
      raise RuntimeError(f"no checkpoint in {self.directory} could be "
                         f"restored (steps {steps})") from first_error
    return None

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


def restore_latest(directory: str | os.PathLike,
                   target_like: Any) -> tuple[Any, dict] | None:
  """`(state, metadata)` of the newest checkpoint in `directory`, or None."""
  if not os.path.isdir(directory):
    return None
  with Checkpointer(directory, read_only=True) as checkpointer:
    return checkpointer.restore_latest(target_like)
