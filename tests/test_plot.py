"""plot_runs and the `python -m ald_jax.plot` entry point write PNGs."""
import json
import subprocess
import sys

import matplotlib.axes
import matplotlib.colors
import matplotlib.image
import numpy as np
import pytest

from ald_jax import metrics
from ald_jax import plot

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FIGURE_PIXELS = (750, 1100)  # figsize (11, 7.5) at dpi 100: rows, columns


def _run_dir(path, agent_in_rows=None, config_agent=None, n=5):
  with metrics.MetricsWriter(path, formats=("jsonl",)) as writer:
    for i in range(n):
      row = {"env_steps": 1000 * (i + 1), "wall_time_s": 2.0 * (i + 1),
             "episode_return": 0.1 * i, "success_rate": 0.2 * i}
      if agent_in_rows:
        row["agent"] = agent_in_rows
      writer.write(row)
  if config_agent:
    with open(path / "config.json", "w") as f:
      json.dump({"learner": {"agent": config_agent}}, f)
  return path


def _is_png(path):
  with open(path, "rb") as f:
    return f.read(8) == PNG_MAGIC


def _pixels_of_color(path, color):
  """How many pixels of the PNG have (about) the matplotlib color `color`."""
  image = matplotlib.image.imread(path)[..., :3]
  assert image.shape[:2] == FIGURE_PIXELS
  rgb = np.array(matplotlib.colors.to_rgb(color))
  return int(np.sum(np.all(np.abs(image - rgb) < 0.02, axis=-1)))


def _assert_curves_drawn(path, num_runs):
  """Each run's line color (the default cycle C0, C1, ...) is on the image,
  and the next color is not (no extra curve)."""
  assert _is_png(path)
  for i in range(num_runs):
    assert _pixels_of_color(path, f"C{i}") > 50, f"no curve in color C{i}"
  assert _pixels_of_color(path, f"C{num_runs}") == 0


def test_plot_runs_writes_png_with_labels(tmp_path):
  a = _run_dir(tmp_path / "a", agent_in_rows="ald")
  b = _run_dir(tmp_path / "b", config_agent="lstm")
  c = _run_dir(tmp_path / "seed3")
  assert plot.run_label(str(a), metrics.read_metrics(a)) == "ald"
  assert plot.run_label(str(b), metrics.read_metrics(b)) == "lstm"
  assert plot.run_label(str(c), metrics.read_metrics(c)) == "seed3"
  out = plot.plot_runs([a, b, c], tmp_path / "out" / "curves.png")
  _assert_curves_drawn(out, num_runs=3)


def test_plot_runs_draws_each_series(tmp_path, monkeypatch):
  """Every panel gets one line per run with that run's (x, y) data."""
  calls = []
  original = matplotlib.axes.Axes.plot

  def spy(self, xs, ys, **kwargs):
    calls.append((self.get_ylabel(), kwargs.get("label"), list(xs), list(ys)))
    return original(self, xs, ys, **kwargs)

  monkeypatch.setattr(matplotlib.axes.Axes, "plot", spy)
  a = _run_dir(tmp_path / "a", agent_in_rows="ald")
  b = _run_dir(tmp_path / "b", agent_in_rows="lstm", n=3)
  plot.plot_runs([a, b], tmp_path / "curves.png")
  assert len(calls) == 4 * 2  # four panels x two runs
  steps = [1000.0 * (i + 1) for i in range(5)]
  returns = [0.1 * i for i in range(5)]
  success = [0.2 * i for i in range(3)]
  assert ("", "ald", steps, returns) in calls  # set_ylabel comes after plot
  assert ("", "lstm", steps[:3], returns[:3]) in calls
  assert ("", "lstm", [2.0, 4.0, 6.0], success) in calls


def test_cli_writes_png(tmp_path):
  a = _run_dir(tmp_path / "a", agent_in_rows="ald")
  b = _run_dir(tmp_path / "b", agent_in_rows="ald")  # same agent: two seeds
  out = tmp_path / "both.png"
  subprocess.run([sys.executable, "-m", "ald_jax.plot", str(a), str(b),
                  "--out", str(out)], check=True, capture_output=True)
  _assert_curves_drawn(out, num_runs=2)
  # One run without --out: the PNG goes into the run directory.
  _assert_curves_drawn(plot.main([str(a)]), num_runs=1)
  assert (a / plot.DEFAULT_NAME).exists()


def test_missing_metrics_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="metrics"):
    plot.plot_runs([tmp_path], tmp_path / "x.png")
