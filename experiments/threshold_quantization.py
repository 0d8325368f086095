"""How much the grid's threshold figure depends on the report interval.

`paper_comparison.first_crossing` takes the first metrics row at or above the
threshold (not interpolated), so a figure overshoots the true crossing by up
to one report interval of env steps, more for a faster agent. This simulates
two agents with the SAME success-vs-env-steps curve (a step at
`--true_crossing`) but different env steps/s, rows every `interval` seconds
of wall-clock starting at a random phase, and prints one JSON object with
the ratio (slow agent / fast agent) of their figures per interval: 1.0 would
be no bias.

    python experiments/threshold_quantization.py   # ALD vs transformer sps
"""
import datetime
import json
import os
import random
import statistics
import sys

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import paper_comparison as pc  # pylint: disable=wrong-import-position

# Defaults: ALD's and the transformer's env steps/s in the 2026-11-27
# four-agent table (bench_system_defaults_2026-11-27_cpu2.json).
_SLOW_SPS = flags.DEFINE_float("slow_sps", 2874.0, "The slower agent's env "
                               "steps/s.")
_FAST_SPS = flags.DEFINE_float("fast_sps", 3920.0, "The faster agent's env "
                               "steps/s.")
_TRUE = flags.DEFINE_integer("true_crossing", 240_000,
                             "Env steps where both agents cross.")
_INTERVALS = flags.DEFINE_list("intervals_s", ["2", "5", "10"],
                               "Report intervals to simulate, seconds.")
_TRIALS = flags.DEFINE_integer("trials", 2000, "Random phase pairs each.")
_SEED = flags.DEFINE_integer("seed", 0, "Random seed.")


def rows(sps: float, phase_s: float, interval_s: float, true_crossing: int):
  """Metrics rows of an agent whose success jumps past 0.9 at `true_crossing`."""
  out, t = [], phase_s
  while t * sps < 3 * true_crossing:
    steps = int(t * sps)
    out.append({"env_steps": steps, "wall_time_s": t,
                "success_rate": 0.95 if steps >= true_crossing else 0.5})
    t += interval_s
  return out


def ratios(slow_sps: float, fast_sps: float, interval_s: float,
           true_crossing: int, trials: int, rng: random.Random) -> list[float]:
  """Slow/fast threshold figures over `trials` random report phases."""
  out = []
  for _ in range(trials):
    slow, _ = pc.first_crossing(
        rows(slow_sps, rng.uniform(0, interval_s), interval_s, true_crossing),
        "success_rate", 0.9)
    fast, _ = pc.first_crossing(
        rows(fast_sps, rng.uniform(0, interval_s), interval_s, true_crossing),
        "success_rate", 0.9)
    out.append(slow / fast)
  return out


def main(argv):
  del argv
  rng = random.Random(_SEED.value)
  result = {
      "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
          timespec="seconds"),
      "slow_sps": _SLOW_SPS.value, "fast_sps": _FAST_SPS.value,
      "true_crossing": _TRUE.value, "trials": _TRIALS.value,
  }
  for interval in _INTERVALS.value:
    values = ratios(_SLOW_SPS.value, _FAST_SPS.value, float(interval),
                    _TRUE.value, _TRIALS.value, rng)
    result[f"ratio_mean_{interval}s"] = round(statistics.mean(values), 4)
    result[f"ratio_min_{interval}s"] = round(min(values), 4)
    result[f"ratio_max_{interval}s"] = round(max(values), 4)
  print(json.dumps(result, indent=1))


if __name__ == "__main__":
  app.run(main)
