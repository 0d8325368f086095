"""Metric rows: JSONL/CSV writer, windowed episode statistics, progress line.

One row per report, flat `{name: number | str}`. The standard names below are
what `format_progress` and `ald_jax.plot` read; a row may hold any others.
Non-finite floats are written as JSON null / empty CSV cells.

TensorBoard (optional extra `pip install 'ald_jax[tensorboard]'`, i.e.
tensorboardX): `MetricsWriter` also writes every finite numeric entry of
every row as a scalar, tagged with its metric name, at step `env_steps`, to
an event file in the run directory (`tensorboard --logdir runs/`). JSONL/CSV
stay the source of truth (plots and resume read them).
`write_tensorboard_image` adds a PNG (the CLI's end-of-run `curves.png`) to
the run's Images tab.
"""
from __future__ import annotations

import collections
import csv
import json
import math
import os
import time
from typing import Any, Iterable, Mapping, Sequence

from absl import logging
import numpy as np

JSONL_NAME = "metrics.jsonl"
CSV_NAME = "metrics.csv"
FORMATS = ("jsonl", "csv")
TENSORBOARD_INSTALL_HINT = "pip install 'ald_jax[tensorboard]'"

# Standard row keys.
WALL_TIME = "wall_time_s"
ENV_STEPS = "env_steps"
ENV_SPS = "env_sps"
EPISODE_RETURN = "episode_return"
SUCCESS_RATE = "success_rate"
EPISODES = "episodes_total"
T_ACTOR_P50 = "t_actor_p50_us"
T_ACTOR_P99 = "t_actor_p99_us"
T_ACTOR_OVER = "t_actor_over_budget"
LEARNER_STEPS = "learner_steps"
QUEUE_SIZE = "queue_size"
QUEUE_CAPACITY = "queue_capacity"
VERSION_LAG = "version_lag"
ACTOR_RESTARTS = "actor_restarts"  # process mode only
# Resources: the learner process's resident memory, and the learner device's
# memory in use where the device reports it (GPUs and TPUs; not JAX's CPU).
RSS_MB = "rss_mb"
DEVICE_MEMORY_MB = "device_memory_mb"
AGENT = "agent"
# The learner-actor gap (system/evaluation.py): the latest evaluation's
# results, repeated in every row until the next one completes (NaN before the
# first). The learner and gap entries exist only for agents with a separate
# actor (ald).
EVAL_LEARNER_RETURN = "eval/learner_return"
EVAL_ACTOR_RETURN = "eval/actor_return"
EVAL_GAP_RETURN = "eval/gap_return"       # learner - actor
EVAL_LEARNER_SUCCESS = "eval/learner_success"
EVAL_ACTOR_SUCCESS = "eval/actor_success"
EVAL_GAP_SUCCESS = "eval/gap_success"
EVAL_ENV_STEPS = "eval/env_steps"         # env steps when the params were taken
EVAL_COUNT = "eval/evaluations"           # evaluations completed


def _clean(value: Any) -> Any:
  """JSON-safe scalar: numpy -> python, NaN/inf -> None."""
  if isinstance(value, np.generic):
    value = value.item()
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


class EpisodeWindow:
  """Statistics over the most recent `size` finished episodes.

  Success is averaged over episodes that report it (not NaN); with none, the
  success rate is NaN (the environment has no notion of success).
  """

  def __init__(self, size: int = 100):
    if size <= 0:
      raise ValueError(f"window size must be > 0, got {size}")
    self._returns = collections.deque(maxlen=size)
    self._successes = collections.deque(maxlen=size)
    self._lengths = collections.deque(maxlen=size)
    self.total = 0

  def add(self, episode_return: float, success: float = float("nan"),
          length: int = 0) -> None:
    self._returns.append(float(episode_return))
    self._successes.append(float(success))
    self._lengths.append(int(length))
    self.total += 1

  def extend(self, episodes: Iterable[Sequence[float]]) -> None:
    """Adds `(return, success, length)` tuples such as actor.Episode."""
    for episode in episodes:
      self.add(*episode)

  def summary(self) -> dict[str, float]:
    nan = float("nan")
    successes = [s for s in self._successes if not math.isnan(s)]
    return {
        EPISODE_RETURN: float(np.mean(self._returns)) if self._returns else nan,
        SUCCESS_RATE: float(np.mean(successes)) if successes else nan,
        "episode_length": (float(np.mean(self._lengths)) if self._lengths
                           else nan),
        EPISODES: self.total,
    }


class RateMeter:
  """Per-second rate of a growing counter between successive calls."""

  def __init__(self, initial_count: float = 0.0):
    self._count = initial_count
    self._time = time.perf_counter()

  def rate(self, count: float) -> float:
    now = time.perf_counter()
    elapsed = now - self._time
    rate = (count - self._count) / elapsed if elapsed > 0 else 0.0
    self._count, self._time = count, now
    return rate


def _read_jsonl(path: str) -> list[dict[str, Any]]:
  """The rows of a metrics file; a cut last line (a kill or a full disk
  mid-write) is skipped with a warning, a bad line elsewhere raises."""
  with open(path, encoding="utf-8") as f:
    lines = [line.strip() for line in f if line.strip()]
  rows = []
  for number, line in enumerate(lines, 1):
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError:
      if number < len(lines):
        raise
      logging.warning("%s: its last line is cut short (%d chars); skipped",
                      path, len(line))
  return rows


def _parse_cell(text: str) -> Any:
  if text == "":
    return None
  for parse in (int, float):
    try:
      return parse(text)
    except ValueError:
      pass
  return text


def _read_csv(path: str) -> list[dict[str, Any]]:
  with open(path, encoding="utf-8", newline="") as f:
    return [{k: _parse_cell(v) for k, v in row.items()}
            for row in csv.DictReader(f)]


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
  """Rows of a metrics file, or of a run directory's (JSONL preferred)."""
  path = os.fspath(path)
  if os.path.isdir(path):
    for name, reader in ((JSONL_NAME, _read_jsonl), (CSV_NAME, _read_csv)):
      candidate = os.path.join(path, name)
      if os.path.exists(candidate):
        return reader(candidate)
    raise FileNotFoundError(f"no {JSONL_NAME} or {CSV_NAME} in {path}")
  return _read_csv(path) if path.endswith(".csv") else _read_jsonl(path)


def tensorboard_available() -> bool:
  """Whether tensorboardX (the optional `tensorboard` extra) is importable."""
  try:
    import tensorboardX  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    return False
  return True


def _event_file_suffix(run_dir: str, name: str = "") -> str:
  """Event file names hold the time in whole seconds: a suffix numbered by
  the files already there keeps a quick second writer (a resume, the curves)
  from overwriting an earlier file."""
  previous = [f for f in os.listdir(run_dir) if "tfevents" in f]
  return f"{name}.{len(previous):03d}"


def write_tensorboard_image(run_dir: str | os.PathLike, tag: str,
                            png_path: str | os.PathLike,
                            step: int | None = None) -> None:
  """Adds a PNG (e.g. the learning curves) to TensorBoard's Images tab of
  the run in `run_dir`, in an event file of its own beside the scalars'.

  `step` defaults to the `env_steps` of the run's last metrics row (0
  without rows). Needs tensorboardX (ImportError naming the extra).
  """
  if not tensorboard_available():
    raise ImportError(f"write_tensorboard_image needs tensorboardX, which is "
                      f"not installed: {TENSORBOARD_INSTALL_HINT}")
  import tensorboardX  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top (matplotlib's)
  run_dir = os.fspath(run_dir)
  os.makedirs(run_dir, exist_ok=True)
  if step is None:
    try:
      rows = read_metrics(run_dir)
    except FileNotFoundError:
      rows = []
    step = int(rows[-1].get(ENV_STEPS) or 0) if rows else 0
  with Image.open(os.fspath(png_path)) as image:
    pixels = np.asarray(image.convert("RGB"))
  writer = tensorboardX.SummaryWriter(
      run_dir, filename_suffix=_event_file_suffix(run_dir, "." + tag))
  try:
    writer.add_image(tag, pixels, global_step=int(step), dataformats="HWC")
  finally:
    writer.close()


def _scalars(row: Mapping[str, Any]) -> dict[str, float]:
  """The finite numeric entries of a cleaned row (strings and nulls skipped)."""
  return {k: float(v) for k, v in row.items()
          if isinstance(v, (int, float)) and math.isfinite(v)}


def _keep_row(row: Mapping[str, Any], keep_until: tuple[str, float] | None
              ) -> bool:
  if keep_until is None:
    return True
  key, limit = keep_until
  value = row.get(key)
  return value is None or value <= limit


class MetricsWriter:
  """Appends one row per report to `<run_dir>/metrics.jsonl` and/or `.csv`.

  Args:
    run_dir: the run directory (created if needed).
    formats: any of "jsonl", "csv".
    resume: append to existing files instead of starting new ones.
    keep_until: with `resume`, `(key, value)`: drop existing rows whose `key`
      exceeds `value` first, e.g. `("env_steps", restored_env_steps)` so the
      rows written after the restored checkpoint are not duplicated (in
      TensorBoard they are hidden: events after that step are purged).
    tensorboard: also write the numeric entries of every row as TensorBoard
      scalars into `run_dir` (tag = metric name, step = the row's
      `env_steps`, else the row's index). None (default): on when tensorboardX
      is installed, off otherwise; True without tensorboardX raises. The
      choice is logged.

  Rows are flushed as written. A CSV row with new keys rewrites the CSV with
  the widened header (rare: the run writes one schema).
  """

  def __init__(self, run_dir: str | os.PathLike,
               formats: Sequence[str] = FORMATS, resume: bool = False,
               keep_until: tuple[str, float] | None = None,
               tensorboard: bool | None = None):
    unknown = set(formats) - set(FORMATS)
    if unknown or not formats:
      raise ValueError(f"metrics formats must be a non-empty subset of "
                       f"{FORMATS}, got {tuple(formats)}")
    if tensorboard is not None and not isinstance(tensorboard, bool):
      raise ValueError(f"tensorboard must be True, False or None (on when "
                       f"tensorboardX is installed), got {tensorboard!r}")
    available = tensorboard_available()
    if tensorboard and not available:
      raise ImportError(f"tensorboard=True needs tensorboardX, which is not "
                        f"installed: {TENSORBOARD_INSTALL_HINT}")
    self.run_dir = os.fspath(run_dir)
    os.makedirs(self.run_dir, exist_ok=True)
    self.jsonl_path = (os.path.join(self.run_dir, JSONL_NAME)
                       if "jsonl" in formats else None)
    self.csv_path = (os.path.join(self.run_dir, CSV_NAME)
                     if "csv" in formats else None)
    self._jsonl = None
    self._csv_file = None
    self._csv_writer = None
    self._csv_fields: list[str] = []
    self._rows_written = 0
    self._tensorboard = None
    if tensorboard is None:
      tensorboard = available
      if not available:
        logging.info("TensorBoard scalars off: tensorboardX is not installed "
                     "(%s)", TENSORBOARD_INSTALL_HINT)
    if tensorboard:
      import tensorboardX  # pylint: disable=g-import-not-at-top
      purge_step = None
      if resume and keep_until and keep_until[0] == ENV_STEPS:
        purge_step = int(keep_until[1]) + 1
      self._tensorboard = tensorboardX.SummaryWriter(
          self.run_dir, purge_step=purge_step,
          filename_suffix=_event_file_suffix(self.run_dir))
      logging.info("TensorBoard scalars on: %s (tensorboard --logdir %s)",
                   self.run_dir, self.run_dir)

    if self.jsonl_path:
      if resume and os.path.exists(self.jsonl_path) and keep_until:
        kept = [r for r in _read_jsonl(self.jsonl_path)
                if _keep_row(r, keep_until)]
        self._rewrite_jsonl(kept)
      self._jsonl = open(self.jsonl_path, "a" if resume else "w",
                         encoding="utf-8")
    if self.csv_path:
      rows = []
      if resume and os.path.exists(self.csv_path):
        with open(self.csv_path, encoding="utf-8", newline="") as f:
          reader = csv.DictReader(f)
          self._csv_fields = list(reader.fieldnames or [])
          rows = list(reader)
        if keep_until:
          rows = [r for r in rows if _keep_row(
              {k: _parse_cell(v) for k, v in r.items()}, keep_until)]
          self._rewrite_csv(rows)
      if resume and self._csv_fields:
        self._open_csv("a", write_header=False)
      else:
        self._csv_fields = []  # header comes from the first row

  def _rewrite_jsonl(self, rows: list[dict[str, Any]]) -> None:
    tmp = self.jsonl_path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      for row in rows:
        f.write(json.dumps(row) + "\n")
    os.replace(tmp, self.jsonl_path)

  def _rewrite_csv(self, rows: list[dict[str, Any]]) -> None:
    tmp = self.csv_path + ".tmp"
    with open(tmp, "w", encoding="utf-8", newline="") as f:
      writer = csv.DictWriter(f, self._csv_fields, restval="")
      writer.writeheader()
      writer.writerows(rows)
    os.replace(tmp, self.csv_path)

  def _open_csv(self, mode: str, write_header: bool) -> None:
    self._csv_file = open(self.csv_path, mode, encoding="utf-8", newline="")
    self._csv_writer = csv.DictWriter(self._csv_file, self._csv_fields,
                                      restval="")
    if write_header:
      self._csv_writer.writeheader()

  def _write_csv(self, row: dict[str, Any]) -> None:
    new_keys = [k for k in row if k not in self._csv_fields]
    if self._csv_writer is None:
      self._csv_fields = list(row)
      self._open_csv("w", write_header=True)
    elif new_keys:
      self._csv_file.close()
      with open(self.csv_path, encoding="utf-8", newline="") as f:
        old_rows = list(csv.DictReader(f))
      self._csv_fields += new_keys
      self._rewrite_csv(old_rows)
      self._open_csv("a", write_header=False)
      logging.info("metrics CSV header widened with %s", new_keys)
    self._csv_writer.writerow(
        {k: ("" if v is None else v) for k, v in row.items()})
    self._csv_file.flush()

  def write(self, row: Mapping[str, Any]) -> None:
    row = {str(k): _clean(v) for k, v in row.items()}
    if self._jsonl is not None:
      self._jsonl.write(json.dumps(row) + "\n")
      self._jsonl.flush()
    if self.csv_path:
      self._write_csv(row)
    if self._tensorboard is not None:
      self._write_tensorboard(row)
    self._rows_written += 1

  def _write_tensorboard(self, row: dict[str, Any]) -> None:
    step = row.get(ENV_STEPS)
    if not isinstance(step, (int, float)) or isinstance(step, bool):
      step = self._rows_written
    for tag, value in _scalars(row).items():
      self._tensorboard.add_scalar(tag, value, global_step=int(step))
    self._tensorboard.flush()

  @property
  def tensorboard(self) -> bool:
    """Whether rows also go to TensorBoard."""
    return self._tensorboard is not None

  def close(self) -> None:
    for f in (self._jsonl, self._csv_file):
      if f is not None:
        f.close()
    self._jsonl = self._csv_file = self._csv_writer = None
    if self._tensorboard is not None:
      self._tensorboard.close()
      self._tensorboard = None

  def __enter__(self) -> "MetricsWriter":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


def _fmt_count(value: float) -> str:
  for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
    if abs(value) >= limit:
      return f"{value / limit:.2f}{suffix}"
  return f"{value:.0f}"


def _get(row: Mapping[str, Any], key: str) -> float | None:
  value = row.get(key)
  if value is None:
    return None
  value = float(value)
  return None if math.isnan(value) else value


def process_rss_mb() -> float | None:
  """This process's resident memory in MiB (Linux; None elsewhere)."""
  try:
    with open("/proc/self/statm", encoding="ascii") as f:
      resident_pages = int(f.read().split()[1])
  except (OSError, ValueError, IndexError):
    return None
  return resident_pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def device_memory_mb(device: Any) -> float | None:
  """Memory in use on a JAX device in MiB, where it reports it."""
  try:
    stats = device.memory_stats()
  except Exception:  # pylint: disable=broad-except
    return None  # a backend without the call
  if not stats or "bytes_in_use" not in stats:
    return None
  return stats["bytes_in_use"] / 2**20


def resource_entries(device: Any) -> dict[str, float]:
  """The resource entries of a metrics row (those that can be read)."""
  entries = {RSS_MB: process_rss_mb(), DEVICE_MEMORY_MB: device_memory_mb(
      device)}
  return {key: value for key, value in entries.items() if value is not None}


def format_progress(row: Mapping[str, Any]) -> str:
  """One human-readable progress line from a metrics row (missing -> '-')."""
  def show(key, fmt):
    value = _get(row, key)
    return "-" if value is None else fmt(value)

  queue_size, queue_cap = _get(row, QUEUE_SIZE), _get(row, QUEUE_CAPACITY)
  if queue_size is None:
    queue = "-"
  elif queue_cap is None:
    queue = f"{queue_size:.0f}"
  else:
    queue = f"{queue_size:.0f}/{queue_cap:.0f}"
  parts = [
      f"[{show(WALL_TIME, lambda v: f'{v:7.1f}s')}]",
      f"steps {show(ENV_STEPS, _fmt_count)}",
      f"sps {show(ENV_SPS, lambda v: f'{v:.0f}')}",
      f"return {show(EPISODE_RETURN, lambda v: f'{v:.3f}')}",
      f"success {show(SUCCESS_RATE, lambda v: f'{100 * v:.1f}%')}",
      (f"T_actor p50 {show(T_ACTOR_P50, lambda v: f'{v:.0f}us')} "
       f"p99 {show(T_ACTOR_P99, lambda v: f'{v:.0f}us')} "
       f"over {show(T_ACTOR_OVER, lambda v: f'{v:.0f}')}"),
      f"learner {show(LEARNER_STEPS, lambda v: f'{v:.0f}')}",
      f"queue {queue}",
      f"lag {show(VERSION_LAG, lambda v: f'{v:.1f}')}",
  ]
  if EVAL_ACTOR_RETURN in row:  # evaluation on (values '-' before the first)
    value = lambda v: f"{v:.3f}"
    if EVAL_LEARNER_RETURN in row:
      parts.append(f"eval learner {show(EVAL_LEARNER_RETURN, value)} "
                   f"actor {show(EVAL_ACTOR_RETURN, value)} "
                   f"gap {show(EVAL_GAP_RETURN, lambda v: f'{v:+.3f}')}")
    else:
      parts.append(f"eval {show(EVAL_ACTOR_RETURN, value)}")
  if ACTOR_RESTARTS in row:  # actor processes: restarts so far
    parts.append(f"restarts {show(ACTOR_RESTARTS, lambda v: f'{v:.0f}')}")
  if RSS_MB in row:
    memory = f"mem {show(RSS_MB, lambda v: f'{v:.0f}MB')}"
    if DEVICE_MEMORY_MB in row:
      memory += f" device {show(DEVICE_MEMORY_MB, lambda v: f'{v:.0f}MB')}"
    parts.append(memory)
  return " | ".join(parts)
