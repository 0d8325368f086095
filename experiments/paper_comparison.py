"""The paper-style comparison: the four agents on one memory task, same budget.

Runs `ald`, `lstm`, `transformer` and `asymmetric` one after another with the
same environment, sizes and env-step budget, then overlays their curves
(return / success vs env steps and vs wall-clock) and prints a JSON summary.

    python experiments/paper_comparison.py --env=imaze --total_env_steps=600000 \
        --logdir=runs/comparison
"""
import json
import os
import sys

from absl import app
from absl import flags

from ald_jax import config as config_lib
from ald_jax import plot
from ald_jax import train as train_lib
from ald_jax.system import run

_AGENTS = flags.DEFINE_list("agents", list(config_lib.AGENTS),
                            "Agents to compare.")
train_lib.define_flags()
FLAGS = flags.FLAGS


def main(argv):
  del argv
  base_logdir = FLAGS.logdir
  summary = {"command": " ".join([os.path.basename(sys.executable)] + sys.argv)}
  run_dirs = []
  for agent in _AGENTS.value:
    FLAGS.agent = agent
    FLAGS.logdir = os.path.join(base_logdir, agent)
    if agent != "ald":
      FLAGS.distill_steps_per_rl_step = 0.0
    config = train_lib.config_from_flags()
    result = run.train(config)
    run_dirs.append(result.run_dir)
    row = result.final_row
    summary[agent] = {k: row.get(k) for k in (
        "env_steps", "wall_time_s", "episode_return", "success_rate",
        "env_sps", "actor_sps", "t_actor_p50_us", "t_actor_p99_us")}
  out = os.path.join(base_logdir, "comparison.png")
  plot.plot_runs(run_dirs, out, title="ALD vs baselines")
  summary["plot"] = out
  print(json.dumps(summary, indent=2))


if __name__ == "__main__":
  app.run(main)
