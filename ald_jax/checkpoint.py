"""Orbax checkpoints: a pytree state plus a JSON metadata dict per step.

Layout: `<directory>/<step>/{state,metadata}` managed by orbax's
`CheckpointManager` (keeps the last `max_to_keep` steps). Atomicity is
orbax's: a step is written into `<step>.orbax-checkpoint-tmp*` and renamed
to `<step>` only once every item is complete, and step discovery ignores tmp
directories, so a crash mid-save leaves the previous step as the latest.
A writable `Checkpointer` removes such leftover tmp directories when it is
built (take the run directory's lock first: see `system/run_dir.py`). As a
second line of defence, `restore_latest` falls back to older steps (with a
warning) when the newest cannot be read.

Restoring checks every stored leaf against the target's shape and dtype and
refuses a mismatch naming the leaf (orbax would cast a dtype silently and
fail on a shape with an unnamed traceback).

The state is any pytree of arrays (a flax.struct dataclass such as the
learner state, typed or raw PRNG keys included); the metadata is JSON
(counters, numpy RNG state, resolved config: see `to_jsonable`).
"""
from __future__ import annotations

import dataclasses
import os
import shutil
from typing import Any, Mapping

from absl import logging
import jax
import numpy as np
import orbax.checkpoint as ocp

_STATE, _METADATA = "state", "metadata"
# Orbax 0.12 writes a step as `<step>.orbax-checkpoint-tmp` (older versions
# add `-<timestamp>`) and renames it once complete.
TMP_DIR_MARKER = ocp.path.atomicity_types.TMP_DIR_SUFFIX
# Mismatched leaves listed in full in an error; the rest are counted.
_MAX_LISTED_MISMATCHES = 20


class CheckpointMismatchError(ValueError):
  """A stored leaf's shape or dtype differs from the restore target's (or
  a leaf exists on one side only). The message names every such leaf."""


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


def remove_temporary_dirs(directory: str | os.PathLike) -> list[str]:
  """Deletes unfinished saves (orbax tmp directories) left in `directory` by
  a crashed process; returns the names removed. Only safe while no other
  process saves into `directory` (hold the run directory's lock)."""
  directory = os.fspath(directory)
  if not os.path.isdir(directory):
    return []
  removed = sorted(name for name in os.listdir(directory)
                   if TMP_DIR_MARKER in name)
  for name in removed:
    path = os.path.join(directory, name)
    if os.path.isdir(path) and not os.path.islink(path):
      shutil.rmtree(path)
    else:
      os.remove(path)
  if removed:
    logging.warning("removed unfinished checkpoint saves from %s: %s",
                    directory, removed)
  return removed


def _path_name(path: tuple) -> str:
  """'opt_state/0/mu/w' for a pytree key path (attribute, dict and sequence
  keys alike, so a dataclass target matches orbax's stored dicts)."""
  parts = []
  for key in path:
    for attr in ("name", "key", "idx"):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  return "/".join(parts)


def _stored_shape_dtype(leaf: Any) -> tuple[tuple[int, ...], np.dtype]:
  """How a target leaf is stored: typed PRNG keys as their key data."""
  dtype = getattr(leaf, "dtype", None)
  if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
    leaf = jax.eval_shape(jax.random.key_data, leaf)
  elif dtype is None:
    leaf = np.asarray(leaf)
  return tuple(leaf.shape), np.dtype(leaf.dtype)


def _describe(shape: tuple[int, ...], dtype: Any) -> str:
  return f"{np.dtype(dtype).name}{list(shape)}"


def leaf_mismatches(stored_tree: Any, target_like: Any) -> list[str]:
  """One line per leaf whose stored shape/dtype differs from the target's,
  or that exists on one side only; [] when every leaf matches.

  `stored_tree` is orbax's metadata tree (leaves with `.shape`, `.dtype`).
  """
  stored = {_path_name(path): leaf for path, leaf in
            jax.tree_util.tree_flatten_with_path(stored_tree)[0]}
  target = {_path_name(path): leaf for path, leaf in
            jax.tree_util.tree_flatten_with_path(target_like)[0]}
  problems = []
  for name in sorted(stored.keys() | target.keys()):
    if name not in target:
      problems.append(f"{name}: in the checkpoint, not in the target")
      continue
    if name not in stored:
      problems.append(f"{name}: in the target, not in the checkpoint")
      continue
    shape, dtype = _stored_shape_dtype(target[name])
    stored_shape = tuple(stored[name].shape)
    stored_dtype = np.dtype(stored[name].dtype)
    if stored_shape != shape or stored_dtype != dtype:
      problems.append(f"{name}: stored {_describe(stored_shape, stored_dtype)}"
                      f", target {_describe(shape, dtype)}")
  return problems


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
        save_interval_steps=0 if read_only else 1,  # orbax warns otherwise
        enable_async_checkpointing=async_save)
    self._read_only = read_only
    if not read_only:
      remove_temporary_dirs(self.directory)
    # Handlers named up front: a fresh manager can then read a step's
    # metadata (shapes, dtypes) before anything was restored.
    self._manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={_STATE: ocp.StandardCheckpointHandler(),
                       _METADATA: ocp.JsonCheckpointHandler()})

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
    dtypes and (for jax arrays) devices.

    Raises CheckpointMismatchError naming each leaf whose stored shape or
    dtype differs from `target_like`'s.
    """
    step = int(step)
    stored = self._manager.item_metadata(step)[_STATE]
    if stored is None:  # an incomplete or foreign step directory
      raise FileNotFoundError(f"checkpoint step {step} in {self.directory} "
                              "has no readable state metadata")
    problems = leaf_mismatches(stored, target_like)
    if problems:
      listed = problems[:_MAX_LISTED_MISMATCHES]
      more = len(problems) - len(listed)
      raise CheckpointMismatchError(
          f"checkpoint step {step} in {self.directory} does not match the "
          f"state to restore into ({len(problems)} leaves; was the model, "
          "optimizer or agent config changed?):\n  " + "\n  ".join(listed)
          + (f"\n  ... and {more} more" if more > 0 else ""))
    restored = self._manager.restore(
        int(step),
        args=ocp.args.Composite(
            **{_STATE: ocp.args.StandardRestore(_abstract_target(target_like)),
               _METADATA: ocp.args.JsonRestore()}))
    return restored[_STATE], dict(restored[_METADATA])

  def _set_aside(self, steps: list[int]) -> None:
    for step in steps:
      path = os.path.join(self.directory, str(step))
      aside = f"{path}.unreadable"
      suffix = 1
      while os.path.exists(aside):
        aside, suffix = f"{path}.unreadable{suffix}", suffix + 1
      os.rename(path, aside)
      logging.warning("unreadable checkpoint step %d moved to %s", step, aside)
    self._manager.reload()

  def read_metadata(self, step: int) -> dict:
    """The JSON metadata of `step` alone (counters, config), without the
    state: cheap, and needs no target."""
    restored = self._manager.restore(
        int(step), args=ocp.args.Composite(
            **{_METADATA: ocp.args.JsonRestore()}))
    return dict(restored[_METADATA])

  def restore_latest(self, target_like: Any) -> tuple[Any, dict] | None:
    """The newest readable checkpoint, or None when there is none.

    A newest step that fails to restore is skipped with a warning; if every
    step fails, the newest step's error is raised. A shape/dtype mismatch is
    raised at once: older steps of the same run have the same structure.
    The skipped steps are renamed `<step>.unreadable` (kept for inspection,
    no longer a step): the run continues from the older step and saves its
    own checkpoints under those step numbers.
    """
    self._manager.reload()
    steps = sorted(self._manager.all_steps(), reverse=True)
    first_error = None
    for index, step in enumerate(steps):
      try:
        restored = self.restore(step, target_like)
        if index and not self._read_only:
          self._set_aside(steps[:index])
        return restored
      except CheckpointMismatchError:
        raise
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


def read_latest_metadata(directory: str | os.PathLike
                         ) -> tuple[int, dict] | None:
  """`(step, metadata)` of the newest checkpoint whose metadata reads, or
  None when there is none (e.g. to compare a stored config before building
  the state to restore into)."""
  if not os.path.isdir(directory):
    return None
  with Checkpointer(directory, read_only=True) as checkpointer:
    for step in reversed(checkpointer.all_steps()):
      try:
        return step, checkpointer.read_metadata(step)
      except Exception as error:  # pylint: disable=broad-except
        logging.warning("checkpoint step %d in %s: metadata unreadable (%r)",
                        step, checkpointer.directory, error)
  return None
