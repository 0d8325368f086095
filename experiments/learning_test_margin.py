"""Measures the margin of the CI learning test (issue 13).

Runs the exact configuration of tests/test_system_run.py::test_ald_learns_imaze
K times, one after another, and writes one JSON to experiments/results/ with,
per run, the env steps at which the success rate first reached 90% (None if
never), the final success rate and wall time; plus the slowest crossing, the
budget it suggests (1.3 x the slowest crossing) and the command, date,
machine and commit.

    flock /tmp/ald_heavy.lock python experiments/learning_test_margin.py \
        --repeats=5
    # other seeds, or a larger budget to see where slow runs cross:
    python experiments/learning_test_margin.py --seeds=1,2,3,4,5 \
        --total_env_steps=600000

The configuration is taken from the test itself: the test function is called
with `run.train` replaced by a stub that records the config and stops, so the
script cannot drift from the test. If the test cannot be read that way (it
moved or no longer calls `run.train`), the script stops with the reason.
Each run takes minutes on a 2-core CPU.
"""
import dataclasses
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile

from absl import app
from absl import flags
import jax

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from ald_jax import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top
from ald_jax import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
from ald_jax.system import run  # pylint: disable=g-import-not-at-top

_REPEATS = flags.DEFINE_integer(
    "repeats", 5, "Runs of the test's own seed (ignored with --seeds).")
_SEEDS = flags.DEFINE_list(
    "seeds", [], "Seeds to run, one run each (default: the test's seed "
    "--repeats times; each repeat is a fresh draw of thread timing).")
_TOTAL = flags.DEFINE_integer(
    "total_env_steps", 0, "Budget per run (0: the test's budget).")
_THRESHOLD = flags.DEFINE_float("threshold", 0.9, "Success rate to reach.")
_OUT_DIR = flags.DEFINE_string(
    "out_dir", os.path.join(REPO, "experiments", "results"),
    "Where the JSON goes.")
_DRY_RUN = flags.DEFINE_bool(
    "dry_run", False, "Print the captured configuration and stop.")
_RUNS_DIR = flags.DEFINE_string(
    "runs_dir", "", "Where the run directories go (default: a temp dir).")

TEST_FILE = os.path.join(REPO, "tests", "test_system_run.py")
TEST_NAME = "test_ald_learns_imaze"
BUDGET_FACTOR = 1.3


class _Captured(Exception):
  """Raised by the stub `run.train` once it has the config."""


def config_of_the_test():
  """The TrainConfig the CI learning test passes to `run.train`."""
  import importlib.util  # pylint: disable=import-outside-toplevel
  spec = importlib.util.spec_from_file_location("_learning_test", TEST_FILE)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  test = getattr(module, TEST_NAME, None)
  if test is None:
    raise SystemExit(f"{TEST_FILE} has no {TEST_NAME}; update TEST_NAME")
  captured = []

  def stub_train(config, env_factory=None):
    if env_factory is not None:
      raise SystemExit(f"{TEST_NAME} passes an env_factory; this script "
                       "only reproduces registry environments")
    captured.append(config)
    raise _Captured()

  original = run.train
  run.train = stub_train
  try:
    with tempfile.TemporaryDirectory() as tmp:
      import pathlib  # pylint: disable=import-outside-toplevel
      test(pathlib.Path(tmp))
  except _Captured:
    pass
  finally:
    run.train = original
  if not captured:
    raise SystemExit(f"{TEST_NAME} did not call ald_jax.system.run.train; "
                     "update this script")
  return captured[0]


def steps_to_threshold(rows, threshold):
  """Env steps of the first report at or above `threshold`, else None."""
  for row in rows:
    success = row.get("success_rate")
    if success is not None and success >= threshold:
      return row["env_steps"]
  return None


def git_commit():
  try:
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, check=True,
                          capture_output=True, text=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return None


def main(argv):
  del argv
  base = config_of_the_test()
  if _DRY_RUN.value:
    print(json.dumps(checkpoint_lib.to_jsonable(base), indent=1))
    return
  seeds = ([int(s) for s in _SEEDS.value] if _SEEDS.value
           else [base.seed] * _REPEATS.value)
  total = _TOTAL.value or base.total_env_steps
  runs_dir = _RUNS_DIR.value or tempfile.mkdtemp(prefix="learning_margin_")
  started = datetime.datetime.now(datetime.timezone.utc)
  runs = []
  for i, seed in enumerate(seeds):
    logdir = os.path.join(runs_dir, f"run{i}_seed{seed}")
    config = dataclasses.replace(base, seed=seed, total_env_steps=total,
                                 logdir=logdir, resume=False)
    print(f"run {i + 1}/{len(seeds)}: seed {seed}, {total} env steps -> "
          f"{logdir}", flush=True)
    result = run.train(config)
    rows = metrics_lib.read_metrics(result.run_dir)
    crossing = steps_to_threshold(rows, _THRESHOLD.value)
    runs.append({
        "seed": seed, "run_dir": result.run_dir,
        "env_steps_to_threshold": crossing,
        "final_success_rate": result.final_row.get("success_rate"),
        "final_env_steps": result.final_row.get("env_steps"),
        "wall_time_s": result.final_row.get("wall_time_s"),
        "learner_steps": result.final_row.get("learner_steps"),
        "stopped_by": result.stopped_by,
        "test_passes": (result.final_row.get("success_rate") or 0.0)
                       >= _THRESHOLD.value,
    })
    print(json.dumps(runs[-1]), flush=True)

  crossings = [r["env_steps_to_threshold"] for r in runs]
  slowest = (max(crossings) if crossings and None not in crossings else None)
  summary = {
      "what": f"env steps to {_THRESHOLD.value:.0%} success of "
              f"tests/test_system_run.py::{TEST_NAME}'s configuration",
      "command": " ".join([sys.executable] + sys.argv),
      "date_utc": started.isoformat(timespec="seconds"),
      "machine": {"platform": platform.platform(),
                  "processor": platform.processor(),
                  "cpu_count": os.cpu_count(),
                  "affinity": len(os.sched_getaffinity(0)),
                  "jax": jax.__version__,
                  "devices": [str(d) for d in jax.devices()]},
      "commit": git_commit(),
      "test_budget_env_steps": base.total_env_steps,
      "run_budget_env_steps": total,
      "config": {k: v for k, v in checkpoint_lib.to_jsonable(base).items()
                 if k != "logdir"},
      "runs": runs,
      "runs_failing_the_test": sum(not r["test_passes"] for r in runs),
      "slowest_crossing": slowest,
      "suggested_budget": (int(BUDGET_FACTOR * slowest)
                           if slowest is not None else None),
      "note": (None if slowest is not None else
               "some runs never crossed the threshold within the run budget; "
               "rerun with a larger --total_env_steps"),
  }
  os.makedirs(_OUT_DIR.value, exist_ok=True)
  host = f"cpu{os.cpu_count()}"
  path = os.path.join(_OUT_DIR.value, f"learning_test_margin_"
                      f"{started:%Y-%m-%d_%H%M}_{host}.json")
  with open(path, "w", encoding="utf-8") as f:
    json.dump(summary, f, indent=2)
  print(path)


if __name__ == "__main__":
  app.run(main)
