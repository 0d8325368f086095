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


def test_seed_band_interpolates_over_the_shared_range():
  # Seed a: y = x / 10 on [0, 10]; seed b: y = x / 20 on [0, 20]. Shared
  # range [0, 10]; at x = 5: a 0.5, b 0.25 -> mean 0.375, min 0.25, max 0.5.
  band = plot.seed_band([([0.0, 10.0], [0.0, 1.0]),
                         ([0.0, 20.0], [0.0, 1.0])], num_points=3)
  np.testing.assert_allclose(band.x, [0.0, 5.0, 10.0])
  np.testing.assert_allclose(band.mean, [0.0, 0.375, 0.75])
  np.testing.assert_allclose(band.low, [0.0, 0.25, 0.5])
  np.testing.assert_allclose(band.high, [0.0, 0.5, 1.0])


def test_seed_band_without_a_shared_range_is_none():
  assert plot.seed_band([([0.0, 1.0], [0.0, 1.0]), ([], [])]) is None
  assert plot.seed_band([([0.0, 1.0], [0.0, 1.0]),
                         ([2.0, 3.0], [0.0, 1.0])]) is None
  assert plot.seed_band([]) is None
  one = plot.seed_band([([4.0], [0.5]), ([4.0], [0.7])])
  np.testing.assert_allclose([one.x, one.mean, one.low, one.high],
                             [[4.0], [0.6], [0.5], [0.7]])


def test_plot_seed_bands_draws_one_mean_and_band_per_group(tmp_path,
                                                           monkeypatch):
  means, bands = [], []
  original_plot = matplotlib.axes.Axes.plot
  original_fill = matplotlib.axes.Axes.fill_between

  def spy_plot(self, xs, ys, **kwargs):
    means.append((kwargs.get("label"), kwargs.get("color"), list(ys)))
    return original_plot(self, xs, ys, **kwargs)

  def spy_fill(self, xs, low, high, **kwargs):
    bands.append((kwargs.get("color"), list(low), list(high)))
    return original_fill(self, xs, low, high, **kwargs)

  monkeypatch.setattr(matplotlib.axes.Axes, "plot", spy_plot)
  monkeypatch.setattr(matplotlib.axes.Axes, "fill_between", spy_fill)
  # Two "ald" seeds (success 0.2 i and 0.2 i) and one "lstm" seed.
  groups = {"ald": [_run_dir(tmp_path / "a1"), _run_dir(tmp_path / "a2")],
            "lstm": [_run_dir(tmp_path / "l1", n=3)]}
  out = plot.plot_seed_bands(groups, tmp_path / "bands.png", num_points=5)
  _assert_curves_drawn(out, num_runs=2)
  assert len(means) == len(bands) == 4 * 2  # four panels x two groups
  assert {(label, color) for label, color, _ in means} == {
      ("ald (mean of 2)", "C0"), ("lstm (mean of 1)", "C1")}
  # ald's success vs env steps: both seeds 0.2 i at x = 1000 (i + 1), so the
  # mean and the band are the same line 0, 0.2, ..., 0.8 on 5 points.
  assert ("ald (mean of 2)", "C0", pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8])
          ) in means
  with pytest.raises(ValueError, match="at least one group"):
    plot.plot_seed_bands({}, tmp_path / "none.png")
