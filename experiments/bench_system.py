"""End-to-end throughput of the four agents on I-Maze, one agent after another.

Each agent runs for a fixed wall-clock budget; rates are steady-state (from
the first report after --warmup_learner_steps learner steps to the last), so
start-up is excluded: the run compiles its step variants before the actors
start (minutes on a 2-core CPU with a cold compilation cache, seconds with
a warm one), and the first steps still fill the queue and the replay. The
`<agent>_learner_frac_*` shares are of the whole run, compiles included, so
they need not add up to 1. Prints one JSON object:

  <agent>_env_sps            env steps/s end to end (learner in the loop)
  <agent>_actor_sps          env steps per second of actor time not spent
                             waiting on the queue or for parameters
  <agent>_learner_steps_per_s, <agent>_learner_frames_per_s (B * T per step)
  <agent>_t_actor_p50_us, <agent>_t_actor_p99_us
  <agent>_bottleneck         "learner" if actors mostly wait on a full queue
  <agent>_t_actor_alone_p50_us, <agent>_t_actor_alone_p99_us
                             the same acting step (same agent, sizes and E)
                             measured alone in a pinned thread, in this run
  <agent>_learner_frac_<phase>  the learner loop's share of the run's time
                             per phase (step, publish, wait_batch, ...)
  actors                     "threads", "processes" (local actor processes)
                             or "ray" (Ray actor processes) (--actors)

    python experiments/bench_system.py --seconds_per_agent=60 --preset=default
    python experiments/bench_system.py --actors=processes   # no Ray needed
    python experiments/bench_system.py --actors=ray         # needs ald_jax[ray]
"""
import dataclasses
import json
import os
import sys
import tempfile

from absl import app
from absl import flags
from absl import logging
import jax

from ald_jax import config as config_lib
from ald_jax import metrics as metrics_lib
from ald_jax import learner as learner_lib
from ald_jax.envs import registry
from ald_jax.system import actor as actor_lib
from ald_jax.system import affinity
from ald_jax.system import run

import bench_output  # pylint: disable=g-bad-import-order

_SECONDS = flags.DEFINE_float("seconds_per_agent", 60.0,
                              "Wall-clock budget per agent (after start-up).")
_PRESET = flags.DEFINE_enum(
    "preset", "default", ["default", "small", "large"],
    "default: the library's default sizes; small: the CI learning-test "
    "sizes; large: bench_learner_step's --shape=large (GTrXL 4 x 256, "
    "M = T = C = 64), where acting with the transformer costs most.")
_PIN_LEARNER = flags.DEFINE_bool(
    "pin_learner", False, "Confine the learner to the cores actors do not "
    "use (with --actors=processes --num_actors=1 on 2 cores: learner on core "
    "0, the actor process on core 1).")
_AGENTS = flags.DEFINE_list("agents", list(config_lib.AGENTS), "Agents to run.")
_NUM_ACTORS = flags.DEFINE_integer("num_actors", 2, "Actor threads.")
_ENVS = flags.DEFINE_integer("envs_per_actor", 8, "Environments per actor.")
_OUT = flags.DEFINE_string("out", "", "Also write the JSON here.")
_ACTORS = flags.DEFINE_enum("actors", "threads", list(config_lib.ACTOR_MODES),
                            "Actor threads in this process, local actor "
                            "processes, or Ray actor processes.")
_LEARNER_MEMORY = flags.DEFINE_enum(
    "learner_memory", "cached", list(config_lib.LEARNER_MEMORIES),
    "How the transformer reads history: segment memory or context re-read "
    "(run both back to back to compare learner frames/s).")
_WARMUP_STEPS = flags.DEFINE_integer(
    "warmup_learner_steps", 5,
    "The measured window starts at the first report after this many learner "
    "steps: by then every compiled variant of the step has run once.")
_ALD_DISTILL_STEPS = flags.DEFINE_float(
    "ald_distill_steps", None,
    "Distill-only steps per RL step for ald (default: training's, see "
    "TrainConfig; the tables before 2026-11-27's second one ran 1).")
_ALONE_CALLS = flags.DEFINE_integer(
    "alone_calls", 5000, "Acting steps timed alone per agent.")


def learner_config(agent: str, preset: str) -> config_lib.LearnerConfig:
  if preset == "large":
    return dataclasses.replace(
        config_lib.LearnerConfig(
            agent=agent, learner_memory=_LEARNER_MEMORY.value,
            unroll_length=64, learner_context=64, batch_size=16,
            torso=config_lib.TorsoConfig(conv_channels=(), mlp_sizes=(256,)),
            gtrxl=config_lib.GTrXLConfig(num_layers=4, d_model=256,
                                         num_heads=8, mlp_size=256,
                                         memory_length=64)))
  if preset == "default":
    return config_lib.LearnerConfig(agent=agent,
                                    learner_memory=_LEARNER_MEMORY.value)
  return config_lib.LearnerConfig(
      agent=agent, learner_memory=_LEARNER_MEMORY.value, unroll_length=16, learner_context=16, batch_size=16,
      torso=config_lib.TorsoConfig(mlp_sizes=(64,)),
      lstm=config_lib.LSTMConfig(hidden_size=64),
      gtrxl=config_lib.GTrXLConfig(num_layers=2, d_model=64, num_heads=4,
                                   mlp_size=128, memory_length=16))


def steady_rates(rows, warmup_learner_steps: int):
  """Rates between the first row past the warm-up and the last row."""
  started = [r for r in rows
             if r.get("learner_steps", 0) >= max(warmup_learner_steps, 1)]
  if len(started) < 2:
    return None
  first, last = started[0], started[-1]
  seconds = last["wall_time_s"] - first["wall_time_s"]
  if seconds <= 0:
    return None
  return {
      "env_sps": (last["env_steps"] - first["env_steps"]) / seconds,
      "learner_steps_per_s": (last["learner_steps"] -
                              first["learner_steps"]) / seconds,
      "seconds": seconds,
  }


def t_actor_alone(config: config_lib.TrainConfig) -> dict:
  """The run's acting step timed alone (same agent, sizes, E, core)."""
  jax.config.update("jax_cpu_enable_async_dispatch", False)
  factory = registry.make_env_factory(config.env, **config.env_kwargs_dict)
  env_info = run.probe_environment(factory, config.seed)
  lcfg = config.learner
  learner = learner_lib.make_learner(lcfg, env_info.obs_shape,
                                     env_info.num_actions)
  state = learner.init(jax.random.PRNGKey(0),
                       learner.example_batch(lcfg.batch_size))
  cores = affinity.assign_cores(config.num_actors, reserve_for_learner=1)
  summary = actor_lib.calibrate_core(
      learner.actor_core, learner.actor_params(state), env_info.obs_shape,
      config.envs_per_actor, budget_ms=None, policy="warn",
      num_calls=_ALONE_CALLS.value, cores=cores.actors[0])
  return {"p50_us": summary.p50_us, "p99_us": summary.p99_us}


def bench_agent(agent: str, workdir: str) -> dict:
  lcfg = learner_config(agent, _PRESET.value)
  config = config_lib.TrainConfig(
      learner=lcfg, num_actors=_NUM_ACTORS.value,
      envs_per_actor=_ENVS.value, total_env_steps=10**12,
      distill_steps_per_rl_step=(_ALD_DISTILL_STEPS.value if agent == "ald"
                                 else None),
      t_actor_policy="warn", report_interval_s=2.0,
      checkpoint_interval_s=10**6, logdir=os.path.join(workdir, agent),
      max_wall_time_s=_SECONDS.value + 60.0,  # + start-up and compile
      actors=_ACTORS.value, pin_learner=_PIN_LEARNER.value,
      # No learner-actor gap evaluation: its thread would share the
      # learner's process and cores with what is measured here.
      eval_interval_s=0.0)
  alone = t_actor_alone(config)
  result = run.train(config)
  rows = metrics_lib.read_metrics(result.run_dir)
  rates = steady_rates(rows, _WARMUP_STEPS.value) or {"env_sps": float("nan"),
                                 "learner_steps_per_s": float("nan"),
                                 "seconds": 0.0}
  final = result.final_row
  active = final.get("actor_active_s", 0.0)
  waiting = final.get("actor_wait_queue_s", 0.0)
  return {
      f"{agent}_distill_steps_per_rl_step": config.distill_steps_per_rl_step,
      f"{agent}_env_sps": rates["env_sps"],
      f"{agent}_actor_sps": final.get("actor_sps"),
      f"{agent}_learner_steps_per_s": rates["learner_steps_per_s"],
      f"{agent}_learner_frames_per_s": rates["learner_steps_per_s"] *
      lcfg.batch_size * lcfg.unroll_length,
      f"{agent}_t_actor_p50_us": final.get("t_actor_p50_us"),
      f"{agent}_t_actor_p99_us": final.get("t_actor_p99_us"),
      f"{agent}_t_actor_over_budget": final.get("t_actor_over_budget"),
      f"{agent}_actor_wait_queue_frac": waiting / max(active + waiting, 1e-9),
      f"{agent}_bottleneck": "learner" if waiting > 0.2 * (active + waiting)
                             else "actors",
      f"{agent}_measured_s": rates["seconds"],
      f"{agent}_t_actor_alone_p50_us": alone["p50_us"],
      f"{agent}_t_actor_alone_p99_us": alone["p99_us"],
      # Where the learner loop's time went (whole run, compiles included).
      **{f"{agent}_learner_{key}": final[key] for key in sorted(final)
         if key.startswith("frac_")},
  }


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  result = {
      **bench_output.header(),
      "device": str(jax.devices()[0]),
      "preset": _PRESET.value,
      "seconds_per_agent": _SECONDS.value,
      "num_actors": _NUM_ACTORS.value,
      "envs_per_actor": _ENVS.value,
      "actors": _ACTORS.value,
      "pin_learner": _PIN_LEARNER.value,
      "load_average_at_start": os.getloadavg()[0],
      "learner_memory": _LEARNER_MEMORY.value,
      "warmup_learner_steps": _WARMUP_STEPS.value,
  }
  with tempfile.TemporaryDirectory() as workdir:
    for agent in _AGENTS.value:
      figures = bench_agent(agent, workdir)
      # Echoed at once: a run cut short by a time limit keeps what it measured.
      print(json.dumps(figures), file=sys.stderr, flush=True)
      result.update(figures)
  bench_output.emit(result, _OUT.value, indent=2)


if __name__ == "__main__":
  app.run(main)
