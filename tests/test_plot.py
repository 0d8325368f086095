"""plot_runs and the `python -m ald_jax.plot` entry point write PNGs."""
import json
import subprocess
import sys

import pytest

from ald_jax import metrics
from ald_jax import plot

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


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


def test_plot_runs_writes_png_with_labels(tmp_path):
  a = _run_dir(tmp_path / "a", agent_in_rows="ald")
  b = _run_dir(tmp_path / "b", config_agent="lstm")
  c = _run_dir(tmp_path / "seed3")
  assert plot.run_label(str(a), metrics.read_metrics(a)) == "ald"
  assert plot.run_label(str(b), metrics.read_metrics(b)) == "lstm"
  assert plot.run_label(str(c), metrics.read_metrics(c)) == "seed3"
  out = plot.plot_runs([a, b, c], tmp_path / "out" / "curves.png")
  assert _is_png(out)


def test_cli_writes_png(tmp_path):
  a = _run_dir(tmp_path / "a", agent_in_rows="ald")
  b = _run_dir(tmp_path / "b", agent_in_rows="ald")  # same agent: two seeds
  out = tmp_path / "both.png"
  subprocess.run([sys.executable, "-m", "ald_jax.plot", str(a), str(b),
                  "--out", str(out)], check=True, capture_output=True)
  assert _is_png(out)
  # One run without --out: the PNG goes into the run directory.
  assert _is_png(plot.main([str(a)]))
  assert (a / plot.DEFAULT_NAME).exists()


def test_missing_metrics_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="metrics"):
    plot.plot_runs([tmp_path], tmp_path / "x.png")
