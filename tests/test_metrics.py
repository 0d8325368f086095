"""MetricsWriter (JSONL/CSV, resume), episode window, progress line."""
import csv
import io
import json
import math
import os
import struct
import sys
from typing import Any

import numpy as np
import pytest

from ald_jax import metrics


def _rows(n, start=0):
  return [{"env_steps": 100 * (i + 1), "episode_return": 0.5 * i,
           "success_rate": float("nan") if i == 0 else 0.25 * i,
           "agent": "ald"} for i in range(start, start + n)]


def test_writer_writes_both_formats(tmp_path):
  with metrics.MetricsWriter(tmp_path) as writer:
    for row in _rows(3):
      writer.write(row)
  jsonl = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert [r["env_steps"] for r in jsonl] == [100, 200, 300]
  assert jsonl[0]["success_rate"] is None  # NaN -> null
  assert jsonl[2]["success_rate"] == 0.5
  with open(tmp_path / "metrics.csv", newline="") as f:
    csv_rows = list(csv.DictReader(f))
  assert csv_rows[1] == {"env_steps": "200", "episode_return": "0.5",
                         "success_rate": "0.25", "agent": "ald"}
  assert csv_rows[0]["success_rate"] == ""
  parsed = metrics.read_metrics(tmp_path / "metrics.csv")
  assert parsed[2]["env_steps"] == 300 and parsed[0]["success_rate"] is None
  assert metrics.read_metrics(tmp_path) == jsonl  # run dir: JSONL preferred


def test_resume_appends_and_drops_rows_after_the_checkpoint(tmp_path):
  with metrics.MetricsWriter(tmp_path) as writer:
    for row in _rows(4):
      writer.write(row)
  # The checkpoint was at env step 200: rows 300 and 400 are re-run.
  with metrics.MetricsWriter(tmp_path, resume=True,
                             keep_until=("env_steps", 200)) as writer:
    for row in _rows(2, start=2):
      writer.write(row)
  for name in ("metrics.jsonl", "metrics.csv"):
    rows = metrics.read_metrics(tmp_path / name)
    assert [r["env_steps"] for r in rows] == [100, 200, 300, 400], name
  # A fresh (non-resume) writer starts over.
  with metrics.MetricsWriter(tmp_path, formats=("jsonl",)) as writer:
    writer.write({"env_steps": 1})
  assert metrics.read_metrics(tmp_path) == [{"env_steps": 1}]


def test_resume_skips_a_metrics_line_cut_short_by_a_crash(tmp_path):
  with metrics.MetricsWriter(tmp_path, formats=("jsonl",)) as writer:
    for row in _rows(2):
      writer.write(row)
  with open(tmp_path / "metrics.jsonl", "a", encoding="utf-8") as f:
    f.write('{"env_steps": 300, "wall_ti')   # killed mid-write
  with metrics.MetricsWriter(tmp_path, formats=("jsonl",), resume=True,
                             keep_until=("env_steps", 200)) as writer:
    writer.write({"env_steps": 300})
  assert [r["env_steps"] for r in metrics.read_metrics(tmp_path)] == [
      100, 200, 300]


def test_a_bad_metrics_line_before_the_last_still_raises(tmp_path):
  (tmp_path / "metrics.jsonl").write_text('{"env_steps": 1}\n{oops\n'
                                          '{"env_steps": 2}\n')
  with pytest.raises(ValueError):
    metrics.read_metrics(tmp_path)


def test_csv_header_widens_for_new_keys(tmp_path):
  with metrics.MetricsWriter(tmp_path, formats=("csv",)) as writer:
    writer.write({"a": 1})
    writer.write({"a": 2, "b": np.float32(3.0)})
  rows = metrics.read_metrics(tmp_path / "metrics.csv")
  assert rows == [{"a": 1, "b": None}, {"a": 2, "b": 3.0}]
  with pytest.raises(ValueError, match="formats"):
    metrics.MetricsWriter(tmp_path, formats=("xml",))


def test_episode_window():
  window = metrics.EpisodeWindow(size=3)
  assert math.isnan(window.summary()["episode_return"])
  window.extend([(1.0, 1.0, 5), (2.0, float("nan"), 6), (3.0, 0.0, 7),
                 (4.0, 1.0, 8)])
  s = window.summary()
  assert s["episode_return"] == 3.0        # mean of 2, 3, 4
  assert s["success_rate"] == 0.5          # 0 and 1; NaN not counted
  assert s["episode_length"] == 7.0 and s["episodes_total"] == 4
  no_success = metrics.EpisodeWindow(2)
  no_success.add(1.0)
  assert math.isnan(no_success.summary()["success_rate"])


def test_progress_line():
  row = {"wall_time_s": 12.34, "env_steps": 1_234_567, "env_sps": 4567.4,
         "episode_return": 0.4567, "success_rate": 0.75,
         "t_actor_p50_us": 25.2, "t_actor_p99_us": 74.0,
         "t_actor_over_budget": 3, "learner_steps": 120, "queue_size": 3,
         "queue_capacity": 8, "version_lag": 1.5}
  line = metrics.format_progress(row)
  for part in ("12.3s", "steps 1.23M", "sps 4567", "return 0.457",
               "success 75.0%", "T_actor p50 25us p99 74us over 3",
               "learner 120", "queue 3/8", "lag 1.5"):
    assert part in line, (part, line)
  sparse = metrics.format_progress({"env_steps": 10, "success_rate": None})
  assert "steps 10" in sparse and "success -" in sparse and "sps -" in sparse
  # Actor processes count restarts on the line; thread rows have no such key.
  assert "restarts" not in line
  assert metrics.format_progress(dict(row, actor_restarts=2)).endswith(
      " | restarts 2")
  assert metrics.format_progress(dict(row, rss_mb=812.4)).endswith(
      " | mem 812MB")
  assert metrics.format_progress(dict(row, rss_mb=812.4,
                                      device_memory_mb=2048.0)).endswith(
      " | mem 812MB device 2048MB")


def test_resources_read_this_process_and_a_device_that_reports_memory():
  rss = metrics.process_rss_mb()
  # This process holds numpy and JAX: tens of MiB at least, below the RAM.
  assert 10 < rss < os.sysconf("SC_PHYS_PAGES") * os.sysconf(
      "SC_PAGE_SIZE") / 2**20

  class Reporting:
    def memory_stats(self):
      return {"bytes_in_use": 3 * 2**20, "peak_bytes_in_use": 5 * 2**20}

  class Silent:
    def memory_stats(self):
      return None

  assert metrics.device_memory_mb(Reporting()) == 3.0
  assert metrics.device_memory_mb(Silent()) is None
  assert metrics.device_memory_mb(object()) is None  # no memory_stats at all
  entries = metrics.resource_entries(Reporting())
  assert entries == {"rss_mb": pytest.approx(entries["rss_mb"]),
                     "device_memory_mb": 3.0}
  assert set(metrics.resource_entries(Silent())) == {"rss_mb"}


# -- TensorBoard ---------------------------------------------------------------


def _events(run_dir) -> list:
  """Every Event of every event file in `run_dir`, files in name order.

  Event files are TFRecords: [uint64 length][uint32 crc][Event proto][uint32
  crc]; the protos come from tensorboardX.
  """
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  files = sorted(f for f in os.listdir(run_dir) if "tfevents" in f)
  assert files, f"no event file in {run_dir}"
  events = []
  for name in files:
    data = open(os.path.join(run_dir, name), "rb").read()
    offset = 0
    while offset < len(data):
      (length,) = struct.unpack("<Q", data[offset:offset + 8])
      events.append(event_pb2.Event.FromString(
          data[offset + 12:offset + 12 + length]))
      offset += 12 + length + 4
  return events


def _read_tensorboard_scalars(run_dir) -> dict[str, dict[int, float]]:
  """{tag: {step: value}} as TensorBoard shows them (a resume's purge
  marker hides the earlier events at or after its step)."""
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  scalars: dict[str, dict[int, float]] = {}
  for event in _events(run_dir):
    if event.HasField("session_log") and (
        event.session_log.status == event_pb2.SessionLog.START):
      for series in scalars.values():
        for step in [s for s in series if s >= event.step]:
          del series[step]
    for value in event.summary.value:
      if not value.HasField("image"):
        scalars.setdefault(value.tag, {})[event.step] = value.simple_value
  return scalars


def test_tensorboard_scalars_match_jsonl_rows(tmp_path):
  pytest.importorskip("tensorboardX")
  rows = _rows(3)
  rows[1]["eval/actor_return"] = 0.75  # a key only one row has
  with metrics.MetricsWriter(tmp_path, tensorboard=True) as writer:
    assert writer.tensorboard
    for row in rows:
      writer.write(row)
  jsonl = metrics.read_metrics(tmp_path)
  scalars = _read_tensorboard_scalars(tmp_path)
  expected: dict[str, dict[int, float]] = {}
  for row in jsonl:
    for key, value in row.items():
      if isinstance(value, (int, float)):
        expected.setdefault(key, {})[row["env_steps"]] = value
  # Strings ("agent") and nulls (NaN success) are not scalars.
  assert set(scalars) == {"env_steps", "episode_return", "success_rate",
                          "eval/actor_return"}
  assert scalars.keys() == expected.keys()
  for tag, series in expected.items():
    assert scalars[tag] == pytest.approx(series), tag
  assert scalars["success_rate"] == {200: 0.25, 300: 0.5}
  assert scalars["eval/actor_return"] == {200: 0.75}


def test_tensorboard_resume_hides_rows_after_the_checkpoint(tmp_path):
  pytest.importorskip("tensorboardX")
  with metrics.MetricsWriter(tmp_path, tensorboard=True) as writer:
    for row in _rows(4):
      writer.write(row)
  with metrics.MetricsWriter(tmp_path, resume=True, tensorboard=True,
                             keep_until=("env_steps", 200)) as writer:
    for row in _rows(2, start=2):
      writer.write({**row, "episode_return": -1.0})
  scalars = _read_tensorboard_scalars(tmp_path)
  assert scalars["episode_return"] == {100: 0.0, 200: 0.5, 300: -1.0,
                                       400: -1.0}
  assert [r["episode_return"] for r in metrics.read_metrics(tmp_path)] == [
      0.0, 0.5, -1.0, -1.0]


def test_tensorboard_default_follows_availability(tmp_path, monkeypatch):
  installed = metrics.tensorboard_available()
  with metrics.MetricsWriter(tmp_path / "default") as writer:
    assert writer.tensorboard == installed
  with metrics.MetricsWriter(tmp_path / "off", tensorboard=False) as writer:
    writer.write(_rows(1)[0])
    assert not writer.tensorboard
  assert sorted(os.listdir(tmp_path / "off")) == ["metrics.csv",
                                                   "metrics.jsonl"]
  monkeypatch.setitem(sys.modules, "tensorboardX", None)  # import now fails
  assert not metrics.tensorboard_available()
  with metrics.MetricsWriter(tmp_path / "missing") as writer:
    assert not writer.tensorboard
  with pytest.raises(ImportError, match=r"ald_jax\[tensorboard\]"):
    metrics.MetricsWriter(tmp_path / "forced", tensorboard=True)
  with pytest.raises(ValueError, match="tensorboard"):
    metrics.MetricsWriter(tmp_path / "bad", tensorboard="yes")


def _images(run_dir) -> list[tuple[str, int, Any]]:
  """(tag, step, image summary) of every image in the run's event files."""
  return [(value.tag, event.step, value.image) for event in _events(run_dir)
          for value in event.summary.value if value.HasField("image")]


def test_tensorboard_image_from_png_beside_the_scalars(tmp_path):
  pytest.importorskip("tensorboardX")
  from PIL import Image  # pylint: disable=g-import-not-at-top
  png = tmp_path / "curves.png"
  Image.new("RGB", (6, 4), (255, 0, 0)).save(png)
  run_dir = tmp_path / "run"
  with metrics.MetricsWriter(run_dir, tensorboard=True) as writer:
    for row in _rows(2):
      writer.write(row)
  # After the writer closed (as the CLI does at the end of a run): the
  # image goes into an event file of its own, at the last row's step.
  metrics.write_tensorboard_image(run_dir, "curves", png)
  metrics.write_tensorboard_image(run_dir, "curves", png, step=7)
  assert len([f for f in os.listdir(run_dir) if "tfevents" in f]) == 3
  (tag, step, image), (_, other_step, _) = _images(run_dir)
  assert (tag, step, other_step) == ("curves", 200, 7)
  assert (image.width, image.height, image.colorspace) == (6, 4, 3)
  decoded = np.asarray(Image.open(io.BytesIO(image.encoded_image_string)))
  assert (decoded == [255, 0, 0]).all()
  assert _read_tensorboard_scalars(run_dir)["env_steps"] == {100: 100,
                                                            200: 200}
  # Without rows the image is at step 0; without tensorboardX it refuses.
  metrics.write_tensorboard_image(tmp_path / "empty", "curves", png)
  assert [step for _, step, _ in _images(tmp_path / "empty")] == [0]


def test_tensorboard_image_needs_tensorboardx(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "tensorboardX", None)
  with pytest.raises(ImportError, match=r"ald_jax\[tensorboard\]"):
    metrics.write_tensorboard_image(tmp_path, "curves", tmp_path / "x.png")
