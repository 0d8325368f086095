"""The run directory: one run at a time, and a config record per segment.

    <run_dir>/run.lock            flock'ed by the run using the directory; holds its pid
    <run_dir>/config.<n>.json     the resolved config of segment n (0: the first
                                  start, n: the n-th --resume); never overwritten
                                  by a later segment
    <run_dir>/config.json         a copy of the latest segment's config
    <run_dir>/checkpoints/        see ald_jax/checkpoint.py

A resumed run must use the config its checkpoint was written with:
`check_resume_config` lists every differing field as a dotted `TrainConfig`
path with the stored and new values, unless `resume_allow_change` names it.
`ALWAYS_ALLOWED` fields may change without being named: they neither change
what is learned nor the data it is learned from. `check_resume_env` compares
where the environments come from (config.json's "env" record), so a run
made with an `env_factory` is never resumed on another environment.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
from typing import Any, Mapping, Sequence

from absl import logging

from ald_jax import checkpoint as checkpoint_lib
from ald_jax import config as config_lib
from ald_jax.system import liveness

LOCK_NAME = "run.lock"
CONFIG_NAME = "config.json"

# Fields a resume may change without naming them. `total_env_steps` is not
# among them: extending a run's budget is a decision to state
# (`resume_allow_change=total_env_steps`).
ALWAYS_ALLOWED = (
    "logdir",                 # the directory may have been moved
    "resume",
    "resume_allow_change",
    "report_interval_s",      # reporting only
    "checkpoint_interval_s",  # how often state is saved, not what
    "keep_checkpoints",
    "max_wall_time_s",        # a per-segment limit
    "pin_learner",            # where threads run, not what they compute
    "publish_every_steps",    # how fresh actors' parameters are (system)
    "publish_interval_s",
    "compilation_cache",      # how executables are found, not what they do
    "compilation_cache_dir",
    "calibration_steps",      # the start-up T_actor check
    "t_actor_policy",
    "t_actor_budget_ms",      # a threshold for refusal and overrun counts
    "eval_interval_s",        # measurement only (system/evaluation.py)
    "eval_episodes",
    "eval_greedy",
    "tensorboard",            # a logging switch
    "ray_address",            # which cluster runs the actor processes
)


class RunDirLockedError(config_lib.ConfigError):
  """Another live process holds the run directory's lock."""


class RunDirLock:
  """Holds `<run_dir>/run.lock` (an exclusive `flock`) while a run uses it.

  A second holder, in this process or another, is refused with a
  RunDirLockedError naming the holder's pid. The kernel drops the lock when
  the holder's process dies, so a lock file left by a crash never blocks.
  The lock is shared by processes forked while it is held (they inherit the
  open file): start helper processes with `spawn`/`forkserver`, or they keep
  the directory locked until they exit.

      with RunDirLock(run_dir):
        ...  # clean tmp checkpoints, restore, train
  """

  def __init__(self, run_dir: str | os.PathLike):
    self.run_dir = os.path.abspath(os.fspath(run_dir))
    self.path = os.path.join(self.run_dir, LOCK_NAME)
    self._fd: int | None = None

  def acquire(self) -> None:
    if self._fd is not None:
      raise RuntimeError(f"{self.path} is already held by this RunDirLock")
    os.makedirs(self.run_dir, exist_ok=True)
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
      os.close(fd)
      if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
        raise
      holder = read_lock_holder(self.run_dir)
      if holder is None:
        who = "pid unknown"
      elif liveness.process_alive(holder):
        who = f"pid {holder}"
      else:  # a child forked while the lock was held outlived its parent
        who = (f"pid {holder}, no longer running: a process it forked still "
               "holds the lock")
      raise RunDirLockedError(
          f"logdir: {self.run_dir} is in use by another run ({who}); wait "
          "for it to end or choose another --logdir") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    os.fsync(fd)
    self._fd = fd

  def release(self) -> None:
    if self._fd is None:
      return
    fd, self._fd = self._fd, None
    try:
      os.ftruncate(fd, 0)  # no stale pid for a reader racing the next holder
    finally:
      os.close(fd)  # drops the flock

  @property
  def held(self) -> bool:
    return self._fd is not None

  def __enter__(self) -> "RunDirLock":
    self.acquire()
    return self

  def __exit__(self, *exc_info) -> None:
    self.release()


def read_lock_holder(run_dir: str | os.PathLike) -> int | None:
  """The pid written in the run directory's lock file, if any (the holder's
  pid while the lock is held; None after a clean release)."""
  try:
    with open(os.path.join(os.fspath(run_dir), LOCK_NAME),
              encoding="utf-8") as f:
      text = f.read().strip()
  except FileNotFoundError:
    return None
  return int(text) if text.isdigit() else None


# ---- per-segment config record ---------------------------------------------

def segment_config_name(segment: int) -> str:
  return f"config.{int(segment)}.json"


def _write_json_atomically(path: str, value: Any) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(value, f, indent=2, sort_keys=True)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def write_segment_config(run_dir: str | os.PathLike, segment: int,
                         resolved: Mapping[str, Any]) -> str:
  """Writes `config.<segment>.json` and the same to `config.json` (the
  latest); returns the segment file's path. Earlier segments' files stay."""
  if not isinstance(segment, int) or isinstance(segment, bool) or segment < 0:
    raise ValueError(f"segment must be an integer >= 0, got {segment!r}")
  run_dir = os.fspath(run_dir)
  os.makedirs(run_dir, exist_ok=True)
  value = checkpoint_lib.to_jsonable(dict(resolved))
  path = os.path.join(run_dir, segment_config_name(segment))
  _write_json_atomically(path, value)
  _write_json_atomically(os.path.join(run_dir, CONFIG_NAME), value)
  return path


def read_latest_config(run_dir: str | os.PathLike) -> dict[str, Any] | None:
  """The latest segment's resolved config (`config.json`, as written by
  `write_segment_config`); None before a run's first segment writes it."""
  try:
    with open(os.path.join(run_dir, CONFIG_NAME), encoding="utf-8") as f:
      return json.load(f)
  except FileNotFoundError:
    return None


# ---- resume: stored vs new config --------------------------------------------

def flatten_config(tree: Mapping[str, Any], prefix: str = ""
                   ) -> dict[str, Any]:
  """`{"learner.discount": 0.99, ...}` from a (JSON) config dict; lists
  (tuples, `env_kwargs` pairs) stay whole values."""
  flat = {}
  for name, value in tree.items():
    path = f"{prefix}{name}"
    if isinstance(value, Mapping):
      flat.update(flatten_config(value, path + "."))
    else:
      flat[path] = value
  return flat


def _config_paths() -> dict[str, Any]:
  """Every TrainConfig leaf path with its default value (JSON form)."""
  return flatten_config(checkpoint_lib.to_jsonable(config_lib.TrainConfig()))


def _matches(name: str, path: str) -> bool:
  """A name allows a path when its fields appear in the path in a row: the
  path itself, a section (`learner.vmpo`, `learner_optimizer`) or a last
  field (`learning_rate`: both optimizers')."""
  return f".{name}." in f".{path}."


def resolve_allow_names(names: Sequence[str],
                        flag_paths: Mapping[str, str] | None = None
                        ) -> tuple[str, ...]:
  """Validates `resume_allow_change` names and maps flag names to config
  paths (`flag_paths`: flag name -> dotted path, e.g. the CLI's table).

  Accepted: a dotted config path (`learner.learner_optimizer.learning_rate`),
  a section (`learner.vmpo`), a leaf field name (`learning_rate`, every
  field of that name) or a flag name in `flag_paths` (`learner_lr`).
  Raises ConfigError naming an unknown name.
  """
  if isinstance(names, str):
    raise config_lib.ConfigError(
        "resume_allow_change: must be a sequence of names, got the string "
        f"{names!r} (split it on commas)")
  flag_paths = dict(flag_paths or {})
  paths = _config_paths()
  resolved = []
  for name in names:
    if not isinstance(name, str) or not name.strip():
      raise config_lib.ConfigError(
          f"resume_allow_change: names must be non-empty strings, got {name!r}")
    name = name.strip()
    is_field = any(_matches(name, path) for path in paths)
    if name in flag_paths:  # a flag that is also a field name allows both
      resolved.append(flag_paths[name])
    elif not is_field:
      flags = ", ".join(sorted(flag_paths)) if flag_paths else "none given"
      raise config_lib.ConfigError(
          f"resume_allow_change: {name!r} is neither a config field (a "
          "dotted TrainConfig path, a section or a field name) nor a flag "
          f"(flags: {flags})")
    if is_field:
      resolved.append(name)
  return tuple(resolved)


def config_differences(stored: Mapping[str, Any],
                       new: config_lib.TrainConfig
                       ) -> dict[str, tuple[Any, Any]]:
  """`{path: (stored, new)}` for every leaf whose value differs.

  A field the stored config lacks (added since it was written) counts as
  changed only when the new value is not the field's default; a stored field
  this version no longer has is ignored (nothing reads it).
  """
  old = flatten_config(stored)
  current = flatten_config(checkpoint_lib.to_jsonable(new))
  defaults = _config_paths()
  missing = object()
  differences = {}
  for path, value in current.items():
    old_value = old.get(path, missing)
    if old_value is missing:
      if value != defaults.get(path, missing):
        differences[path] = ("<absent>", value)
    elif old_value != value:
      differences[path] = (old_value, value)
  return differences


def check_resume_config(stored: Mapping[str, Any],
                        new: config_lib.TrainConfig,
                        allow: Sequence[str] = (),
                        flag_paths: Mapping[str, str] | None = None
                        ) -> dict[str, tuple[Any, Any]]:
  """Refuses a resume whose config differs from the stored one.

  Args:
    stored: the config the checkpoint was written with, as stored
      (`checkpoint.to_jsonable(TrainConfig)`, e.g. the checkpoint metadata's
      "config").
    new: the config of this segment.
    allow: names from `resume_allow_change` (see `resolve_allow_names`);
      `ALWAYS_ALLOWED` fields need no name.
    flag_paths: flag name -> config path, so flag names are accepted too.

  Returns:
    The allowed changes `{path: (stored, new)}` (to log).

  Raises:
    ConfigError starting "resume:" that lists every other differing field
    with its stored and new values.
  """
  if not isinstance(new, config_lib.TrainConfig):
    raise TypeError(f"new must be a TrainConfig, got {type(new)}")
  names = resolve_allow_names(tuple(allow), flag_paths) + ALWAYS_ALLOWED
  differences = config_differences(stored, new)
  refused = {path: values for path, values in differences.items()
             if not any(_matches(name, path) for name in names)}
  if refused:
    by_path = {path: flag for flag, path in (flag_paths or {}).items()}
    lines, suggested = [], []
    for path, (old, value) in sorted(refused.items()):
      flag = f" (--{by_path[path]})" if path in by_path else ""
      lines.append(f"{path}{flag}: stored {old!r}, now {value!r}")
      suggested.append(by_path.get(path, path))
    raise config_lib.ConfigError(
        "resume: the config differs from the one the checkpoint was written "
        "with:\n  " + "\n  ".join(lines) + "\nResume with the stored values, "
        "or name the fields to change in resume_allow_change (e.g. "
        f"--resume_allow_change={','.join(suggested)}).")
  allowed = {path: values for path, values in differences.items()
             if path not in refused}
  for path, (old, value) in sorted(allowed.items()):
    logging.info("resume: %s changed from %r to %r", path, old, value)
  return allowed


def _describe(record: Mapping[str, Any]) -> str:
  origin = record.get("name") or record.get("id") or record.get("callable")
  kwargs = record.get("kwargs")
  args = f" with kwargs {dict(kwargs)!r}" if kwargs else ""
  return f"{record.get('source')} {origin!r}{args}"


def check_resume_env(stored: Mapping[str, Any] | None,
                     current: Mapping[str, Any],
                     allow: Sequence[str] = (),
                     flag_paths: Mapping[str, str] | None = None) -> None:
  """Refuses a resume whose environments would come from elsewhere.

  Args:
    stored: the run's "env" record (config.json), None for a run recorded
      without one (nothing to compare).
    current: this segment's record (`registry.describe_env_factory`).
    allow, flag_paths: as for `check_resume_config`; a name matching `env`
      allows the change.

  Two registry records may differ here: `check_resume_config` names the
  changed `env` / `env_kwargs` fields.

  Raises:
    ConfigError starting "resume:" that says how to resume such a run.
  """
  if stored is None:
    return
  stored_json = checkpoint_lib.to_jsonable(dict(stored))
  current_json = checkpoint_lib.to_jsonable(dict(current))
  registry_source = "registry"
  if stored_json == current_json or (
      stored_json.get("source") == registry_source
      and current_json.get("source") == registry_source):
    return
  names = resolve_allow_names(tuple(allow), flag_paths)
  if any(_matches(name, "env") for name in names):
    logging.info("resume: environment changed from %s to %s",
                 _describe(stored_json), _describe(current_json))
    return
  if current_json.get("source") == registry_source:
    raise config_lib.ConfigError(
        f"resume: this run's environments came from an env_factory "
        f"({_describe(stored_json)}), which the command line cannot "
        f"rebuild; it would build {_describe(current_json)} instead. Resume "
        "it from Python with the same factory: ald_jax.train(config, "
        "env_factory=...) with resume=True; or register the environment "
        "(ald_jax.envs.register(NAME, constructor)) and resume through "
        "ald_jax.train.run_cli() with --env=NAME --resume.")
  raise config_lib.ConfigError(
      f"resume: the environments differ from the stored run's: stored "
      f"{_describe(stored_json)}, now {_describe(current_json)}. Resume "
      "with the same env_factory, or name env in resume_allow_change to "
      "change it.")
