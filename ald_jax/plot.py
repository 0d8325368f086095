"""PNG learning curves from run directories.

    python -m ald_jax.plot RUN_DIR [RUN_DIR ...] [--out FILE]

One figure, four panels: episode return and success rate, each against env
steps and against wall-clock time; one curve per run, labelled by its agent
(the metrics rows' `agent`, else `config.json`, else the directory name).
`plot_seed_bands` draws the same panels for groups of runs (e.g. one agent's
seeds): the mean over the group as a line and its min-max as a band.

When a run has learner-actor gap evaluations (`eval/...` columns, see
system/evaluation.py), a third row of panels shows them against the env
steps at which the evaluated parameters were taken: the evaluation return of
the learner acting alone (solid) and of the actor (dashed), in the run's
colour, and the gap (learner - actor). A large gap is failed distillation.
"""
from __future__ import annotations

import argparse
import json
import math
import os
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import matplotlib
import numpy as np

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

from ald_jax import metrics  # pylint: disable=g-import-not-at-top

DEFAULT_NAME = "curves.png"
_PANELS = (
    (metrics.EPISODE_RETURN, metrics.ENV_STEPS, "episode return", "env steps"),
    (metrics.EPISODE_RETURN, metrics.WALL_TIME, "episode return",
     "wall-clock (s)"),
    (metrics.SUCCESS_RATE, metrics.ENV_STEPS, "success rate", "env steps"),
    (metrics.SUCCESS_RATE, metrics.WALL_TIME, "success rate",
     "wall-clock (s)"),
)


def _find_agent(value: Any) -> str | None:
  """The first `agent` string in a (nested) config dict."""
  if isinstance(value, dict):
    if isinstance(value.get("agent"), str):
      return value["agent"]
    for child in value.values():
      found = _find_agent(child)
      if found:
        return found
  return None


def run_label(run_dir: str, rows: Sequence[dict[str, Any]]) -> str:
  for row in rows:
    if isinstance(row.get(metrics.AGENT), str):
      return row[metrics.AGENT]
  config_path = os.path.join(run_dir, "config.json")
  if os.path.exists(config_path):
    with open(config_path, encoding="utf-8") as f:
      found = _find_agent(json.load(f))
    if found:
      return found
  return os.path.basename(os.path.normpath(run_dir))


def _series(rows: Sequence[dict[str, Any]], x_key: str,
            y_key: str) -> tuple[list[float], list[float]]:
  xs, ys = [], []
  for row in rows:
    x, y = row.get(x_key), row.get(y_key)
    if isinstance(x, (int, float)) and isinstance(y, (int, float)) and not (
        math.isnan(x) or math.isnan(y)):
      xs.append(float(x))
      ys.append(float(y))
  return xs, ys


def _eval_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
  """One row per completed evaluation (rows repeat the latest until the next
  one completes)."""
  out, last = [], None
  for row in rows:
    count = row.get(metrics.EVAL_COUNT)
    if isinstance(count, (int, float)) and count > 0 and count != last:
      out.append(row)
      last = count
  return out


def _has_eval(rows: Sequence[dict[str, Any]]) -> bool:
  return bool(_series(_eval_rows(rows), metrics.EVAL_ENV_STEPS,
                      metrics.EVAL_ACTOR_RETURN)[0])


def _plot_eval(axes, runs) -> None:
  """The evaluation panels: learner (solid) and actor (dashed) return, gap."""
  returns_ax, gap_ax = axes
  for i, (_, label, rows) in enumerate(runs):
    evals, color = _eval_rows(rows), f"C{i}"
    for key, style, name in ((metrics.EVAL_LEARNER_RETURN, "-", "learner"),
                             (metrics.EVAL_ACTOR_RETURN, "--", "actor")):
      xs, ys = _series(evals, metrics.EVAL_ENV_STEPS, key)
      if xs:
        returns_ax.plot(xs, ys, style, color=color, label=f"{label} {name}")
    xs, ys = _series(evals, metrics.EVAL_ENV_STEPS, metrics.EVAL_GAP_RETURN)
    if xs:
      gap_ax.plot(xs, ys, color=color, label=label)
  for ax, y_name in ((returns_ax, "eval return"),
                     (gap_ax, "eval gap (learner - actor)")):
    ax.set_xlabel("env steps (params evaluated)")
    ax.set_ylabel(y_name)
    ax.grid(alpha=0.3)
    if ax.get_lines():
      ax.legend(fontsize=8)
    else:
      ax.text(0.5, 0.5, "no data", ha="center", va="center",
              transform=ax.transAxes)


def _draw_figure(draw_panel: Callable[[Any, str, str], bool],
                 out_path: str | os.PathLike, title: str | None,
                 draw_extra_row: Callable[[Any], None] | None = None) -> str:
  """The 2x2 figure of `_PANELS`: `draw_panel(ax, y_key, x_key)` draws one
  panel's curves and says whether it drew any; `draw_extra_row(axes)`, if
  given, fills a third row of two panels. Writes the PNG; returns it."""
  fig, axes = plt.subplots(3 if draw_extra_row else 2, 2,
                           figsize=(11, 11.25 if draw_extra_row else 7.5),
                           squeeze=False)
  if draw_extra_row:
    draw_extra_row(axes[2])
  for ax, (y_key, x_key, y_name, x_name) in zip(axes.flat, _PANELS):
    plotted = draw_panel(ax, y_key, x_key)
    ax.set_xlabel(x_name)
    ax.set_ylabel(y_name)
    ax.grid(alpha=0.3)
    if plotted:
      ax.legend(fontsize=8)
    else:
      ax.text(0.5, 0.5, "no data", ha="center", va="center",
              transform=ax.transAxes)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  out_path = os.fspath(out_path)
  os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
  fig.savefig(out_path, dpi=100)
  plt.close(fig)
  return out_path


def plot_runs(run_dirs: Sequence[str | os.PathLike],
              out_path: str | os.PathLike, title: str | None = None) -> str:
  """Writes the curves PNG for `run_dirs` to `out_path`; returns it (2x2
  panels, 3x2 with the evaluation panels when a run has evaluations)."""
  if not run_dirs:
    raise ValueError("plot_runs needs at least one run directory")
  runs = []
  for run_dir in map(os.fspath, run_dirs):
    rows = metrics.read_metrics(run_dir)
    runs.append((run_dir, run_label(run_dir, rows), rows))
  labels = [label for _, label, _ in runs]
  # Same agent twice (e.g. two seeds): disambiguate with the directory name.
  runs = [(d, f"{label} ({os.path.basename(os.path.normpath(d))})"
           if labels.count(label) > 1 else label, rows)
          for d, label, rows in runs]

  def draw_panel(ax, y_key: str, x_key: str) -> bool:
    plotted = False
    for _, label, rows in runs:
      xs, ys = _series(rows, x_key, y_key)
      if xs:
        ax.plot(xs, ys, label=label)
        plotted = True
    return plotted

  with_eval = any(_has_eval(rows) for _, _, rows in runs)
  return _draw_figure(draw_panel, out_path, title,
                      (lambda axes: _plot_eval(axes, runs)) if with_eval
                      else None)


class SeedBand(NamedTuple):
  """Curves of several seeds on one x grid: their mean, min and max."""
  x: np.ndarray
  mean: np.ndarray
  low: np.ndarray
  high: np.ndarray


def seed_band(curves: Sequence[tuple[Sequence[float], Sequence[float]]],
              num_points: int = 200) -> SeedBand | None:
  """Mean and min-max band of `(xs, ys)` curves (one per seed, xs rising).

  Each curve is linearly interpolated onto `num_points` x values spanning
  the range every curve covers (so each point averages all seeds). None
  when a curve is empty or the curves share no x range.
  """
  if not curves or any(len(xs) == 0 for xs, _ in curves):
    return None
  start = max(float(xs[0]) for xs, _ in curves)
  stop = min(float(xs[-1]) for xs, _ in curves)
  if stop < start:
    return None
  x = np.linspace(start, stop, num_points if stop > start else 1)
  ys = np.stack([np.interp(x, np.asarray(xs, float), np.asarray(ys, float))
                 for xs, ys in curves])
  return SeedBand(x, ys.mean(axis=0), ys.min(axis=0), ys.max(axis=0))


def plot_seed_bands(groups: Mapping[str, Sequence[str | os.PathLike]],
                    out_path: str | os.PathLike, title: str | None = None,
                    num_points: int = 200) -> str:
  """The 2x2 curves PNG with one colour per group (e.g. an agent): the mean
  over the group's run directories (its seeds) as a line, their min-max as
  a shaded band. Writes `out_path`; returns it."""
  if not groups:
    raise ValueError("plot_seed_bands needs at least one group of runs")
  rows_by_group = {label: [metrics.read_metrics(os.fspath(d)) for d in dirs]
                   for label, dirs in groups.items()}

  def draw_panel(ax, y_key: str, x_key: str) -> bool:
    plotted = False
    for index, (label, runs) in enumerate(rows_by_group.items()):
      band = seed_band([_series(rows, x_key, y_key) for rows in runs],
                       num_points)
      if band is None:
        continue
      color = f"C{index}"  # fixed per group across all four panels
      ax.plot(band.x, band.mean, color=color,
              label=f"{label} (mean of {len(runs)})")
      ax.fill_between(band.x, band.low, band.high, color=color, alpha=0.2,
                      linewidth=0)
      plotted = True
    return plotted

  return _draw_figure(draw_panel, out_path, title)


def main(argv: Sequence[str] | None = None) -> str:
  parser = argparse.ArgumentParser(
      prog="python -m ald_jax.plot",
      description="Plot return/success vs env steps and wall-clock for runs.")
  parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
  parser.add_argument("--out", default=None,
                      help=f"output PNG (default: RUN_DIR/{DEFAULT_NAME} for "
                           f"one run, ./{DEFAULT_NAME} for several)")
  parser.add_argument("--title", default=None)
  args = parser.parse_args(argv)
  out = args.out
  if out is None:
    out = (os.path.join(args.run_dirs[0], DEFAULT_NAME)
           if len(args.run_dirs) == 1 else DEFAULT_NAME)
  path = plot_runs(args.run_dirs, out, title=args.title)
  print(path)
  return path


if __name__ == "__main__":
  main()
