"""Start-up to the first learner step, without and with a warm compilation
cache.

Runs `python -m ald_jax.train` twice in fresh processes with one new cache
directory: the first run compiles everything and fills the cache, the second
loads its programs from it (a second run, or a --resume, of the same
shapes). Each run reads its own `startup_to_first_step_s` (from `train()`
being called to the first learner step: build, calibrate, compile, first
batch) into its first metrics row. Prints one JSON object:

  first_run_to_first_step_s     cold cache
  cached_run_to_first_step_s    the same run again
  cached_over_first             the ratio (goal <= 0.3)
  first_run_process_s, cached_run_process_s
                                the whole process (imports, the run's few
                                steps, the stop sequence)

    python experiments/bench_startup.py
    python experiments/bench_startup.py --train_args=--agent=transformer
"""
import os
import shutil
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags

from ald_jax import metrics as metrics_lib

import bench_output  # pylint: disable=g-bad-import-order

_TRAIN_ARGS = flags.DEFINE_list(
    "train_args", [], "Extra flags for ald_jax.train (comma separated).")
_STEPS = flags.DEFINE_integer("total_env_steps", 2000,
                              "A few learner steps, then the run stops.")
_OUT = flags.DEFINE_string("out", "", "Also write the JSON here.")


def one_run(cache_dir: str, logdir: str) -> tuple[float, float]:
  command = [sys.executable, "-m", "ald_jax.train",
             f"--logdir={logdir}", f"--total_env_steps={_STEPS.value}",
             f"--compilation_cache_dir={cache_dir}", "--report_interval_s=1",
             "--notensorboard"] + _TRAIN_ARGS.value
  start = time.perf_counter()
  subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
  process_s = time.perf_counter() - start
  rows = [row for row in metrics_lib.read_metrics(logdir)
          if "startup_to_first_step_s" in row]
  if not rows:
    raise RuntimeError(f"{logdir}: no metrics row has startup_to_first_step_s")
  return float(rows[0]["startup_to_first_step_s"]), process_s


def main(argv):
  del argv
  work = tempfile.mkdtemp(prefix="bench_startup_")
  try:
    cache = os.path.join(work, "cache")
    first, first_process = one_run(cache, os.path.join(work, "first"))
    cached, cached_process = one_run(cache, os.path.join(work, "second"))
  finally:
    shutil.rmtree(work, ignore_errors=True)
  out = {
      **bench_output.header(),
      "train_args": _TRAIN_ARGS.value,
      "first_run_to_first_step_s": first,
      "cached_run_to_first_step_s": cached,
      "cached_over_first": cached / first,
      "first_run_process_s": first_process,
      "cached_run_process_s": cached_process,
  }
  bench_output.emit(out, _OUT.value, indent=1)


if __name__ == "__main__":
  app.run(main)
