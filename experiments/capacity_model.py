"""Capacity model: env steps/s against actor cores, for ALD and the
`transformer` agent, with the learner on this CPU or on the recorded H200.

A script over recorded figures, not a benchmark: it reads the result files
named by its flags (all in experiments/results/), predicts, checks itself
against the end-to-end `bench_system` runs recorded on the 2-core CPU, and
prints one JSON object (also written with --out; --plot writes the figure).

The model, per agent (ald: GTrXL learner + LSTM actor; transformer: the
GTrXL learns and acts):

  acting cost     a = (t_act(E) + o) / E       core-seconds per env step: the
                  acting step over E envs timed alone in a pinned thread
                  (`<agent>_t_actor_alone_p50_us` of bench_system), plus o,
                  the rest of an actor's loop per acting step (stepping the
                  environments, building unrolls, sending them), from a
                  bench_system run whose one actor process had a core of its
                  own (--pin_learner): E / actor_sps - t_act there.
  learner rate    F = B*T / t_rl               env steps (frames) trained per
                  second; t_rl = B*T / F_combined + k * t_distill (ALD runs k
                  distill-only steps per RL step; the transformer agent none),
                  from bench_learner_step. The loop's host work per step h
                  (bench_loop, pipelined) runs under an accelerator's step
                  (t = max(t_rl, h)) but on the same cores as a CPU learner
                  (t = t_rl + h).
  dedicated cores X(N) = min(F, N / a)         the learner on its own device
                  (or cores) and N actor cores: actor-bound until N / a
                  reaches F, learner-bound after.
  shared CPU      X = F / (1 + F * a)          the learner and the actors on one
                  machine's cores: the learner's XLA ops are split over every
                  core and finish with their slowest part, so each second of
                  acting on any core delays the learner by about that second.
                  This is the case a 2-core machine checks end to end
                  (bench_system with actor processes); runs with actor
                  threads are shown beside it, not checked: they also share
                  the learner's interpreter, which the model leaves out.

Each env step is trained on once by an RL step, so in steady state the
system's env steps/s is the smaller of what the actors produce and what the
learner consumes.

    python experiments/capacity_model.py
    python experiments/capacity_model.py --distill_steps_per_rl_step=1
    python experiments/capacity_model.py \
        --out=experiments/results/capacity_model_2026-12-04_cpu2.json \
        --plot=experiments/results/capacity_model_2026-12-04_cpu2.png
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from typing import Any, Mapping, Sequence

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_output  # pylint: disable=g-bad-import-order,wrong-import-position

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
AGENTS = ("ald", "transformer")
SHAPES = ("default", "large")
SITES = ("cpu2", "h200")
# A prediction within this factor of the measured env steps/s validates it.
TOLERANCE = 0.25

@dataclasses.dataclass(frozen=True)
class Sources:
  """The recorded figures the model reads (names in experiments/results/)."""
  # Learner step (bench_learner_step), per site and shape.
  learner_cpu2: str = "bench_learner_step_2026-12-04_cpu2.json"
  learner_cpu2_large: str = "bench_learner_step_large_2026-12-04_cpu2.json"
  learner_h200: str = "bench_learner_step_2026-11-26_h200.json"
  learner_h200_large: str = "bench_learner_step_large_2026-11-26_h200.json"
  # Acting step alone at E envs (bench_system's t_actor_alone), per shape:
  # each agent's figure from the first file that has it.
  acting_default: tuple[str, ...] = (
      "bench_system_ab_loop_after_1_2026-12-04_cpu2.json",
      "bench_system_transformer_2026-12-04_cpu2.json")
  acting_large: tuple[str, ...] = ("bench_system_large_2026-12-04_cpu2.json",)
  # An actor process on a core of its own (bench_system --pin_learner): the
  # actor loop's cost beyond the acting step.
  actor_loop: str = "bench_system_pinned_2026-12-04_cpu2.json"
  # The pipelined learner loop's host work per step (bench_loop).
  loop: str = "bench_loop_fake_2026-12-04_cpu2.json"
  # End-to-end runs with actor processes on the 2-core CPU the shared-CPU
  # case is checked on, recorded on the machine the figures above were.
  validate: tuple[str, ...] = (
      "bench_system_processes_1_2026-12-04_cpu2.json",
      "bench_system_processes_2_2026-12-04_cpu2.json",
      "bench_system_transformer_processes_2026-12-04_cpu2.json",
      "bench_system_large_processes_2026-12-04_cpu2.json")
  # Runs with actor threads, shown beside the model but not checked: the
  # threads share the learner's interpreter, which the model leaves out.
  compare: tuple[str, ...] = (
      "bench_system_ab_loop_after_1_2026-12-04_cpu2.json",
      "bench_system_ab_loop_after_2_2026-12-04_cpu2.json",
      "bench_system_threads_2026-12-04_cpu2.json",
      "bench_system_transformer_2026-12-04_cpu2.json",
      "bench_system_large_2026-12-04_cpu2.json")

  def learner(self, site: str, shape: str) -> str:
    return getattr(self, f"learner_{site}" + ("_large" if shape == "large"
                                              else ""))

  def acting(self, shape: str) -> tuple[str, ...]:
    return getattr(self, f"acting_{shape}")


DEFAULT_DISTILL_STEPS = 4.0


# ---- the model: small pure functions ----

def acting_us_per_env_step(t_act_us: float, num_envs: int,
                           overhead_us: float) -> float:
  """Core-microseconds one env step costs an actor: its share of one batched
  acting step over `num_envs` environments and of the rest of the actor's
  loop per acting step (`overhead_us`)."""
  if num_envs < 1:
    raise ValueError(f"num_envs must be >= 1, got {num_envs}")
  return (t_act_us + overhead_us) / num_envs


def actor_overhead_us(num_envs: int, actor_sps: float,
                      t_act_us: float) -> float:
  """An actor's loop time per acting step beyond the acting call, from one
  actor on a core of its own: E env steps take E / actor_sps seconds of its
  active time, of which t_act is the acting call."""
  return 1e6 * num_envs / actor_sps - t_act_us


def rl_step_ms(frames_per_step: int, combined_frames_per_s: float,
               distill_ms: float, distill_steps: float) -> float:
  """Device time of one RL step and the distill-only steps due with it."""
  return 1e3 * frames_per_step / combined_frames_per_s + (
      distill_steps * distill_ms)


def learner_frames_per_s(frames_per_step: int, step_ms: float,
                         host_ms: float, accelerator: bool) -> float:
  """Frames the learner trains per second: the pipelined loop hides its
  host work under an accelerator's step; a CPU learner does both on the
  same cores."""
  total_ms = max(step_ms, host_ms) if accelerator else step_ms + host_ms
  return 1e3 * frames_per_step / total_ms


def dedicated_env_sps(learner_fps: float, acting_us: float,
                      actor_cores: float) -> float:
  """Env steps/s with the learner on its own device and `actor_cores`."""
  return min(learner_fps, actor_cores * 1e6 / acting_us)


def shared_cpu_env_sps(learner_fps: float, acting_us: float) -> float:
  """Env steps/s with the learner and the actors on one machine's cores."""
  return learner_fps / (1.0 + learner_fps * acting_us * 1e-6)


def ald_ahead_below_cores(ald_fps: float, ald_acting_us: float,
                          transformer_fps: float,
                          transformer_acting_us: float) -> float:
  """The actor cores below which ALD's dedicated-core curve is above the
  transformer agent's (math.inf: at every count).

  Both curves rise as N / a until their learner's rate; ALD's acting is the
  cheaper, so it is ahead until the transformer agent's actors catch up with
  ALD's learner rate, at N = F_ald * a_transformer, unless its learner is
  the slower one (then it stays behind).
  """
  if ald_acting_us >= transformer_acting_us:
    raise ValueError(f"ALD's acting ({ald_acting_us:.1f} us per env step) "
                     f"is not cheaper than the transformer agent's "
                     f"({transformer_acting_us:.1f}): no crossover to find")
  if ald_fps >= transformer_fps:
    return math.inf
  return ald_fps * transformer_acting_us * 1e-6


def crossover(ald: Sequence[float], transformer: Sequence[float],
              cores: Sequence[int]) -> dict[str, Any]:
  """Where ALD's curve is above the transformer agent's at the predicted
  core counts, and by how much."""
  wins = [n for n, a, t in zip(cores, ald, transformer) if a > t]
  ratios = [a / t for a, t in zip(ald, transformer)]
  best = max(range(len(cores)), key=lambda i: ratios[i])
  return {
      "ald_wins_at_cores": [min(wins), max(wins)] if wins else None,
      "ald_wins_everywhere": len(wins) == len(cores),
      "best_ratio": ratios[best],
      "best_ratio_at_cores": cores[best],
      "ratio_at_max_cores": ratios[-1],
  }


# ---- figures ----

def read_result(name: str) -> dict[str, Any]:
  path = name if os.path.isabs(name) else os.path.join(RESULTS, name)
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"{path}: recorded figure missing (the flag that names it can point "
        f"to another result file)")
  with open(path, encoding="utf-8") as f:
    return json.load(f)


@dataclasses.dataclass(frozen=True)
class LearnerFigures:
  """One learner device at one shape, from bench_learner_step."""
  source: str
  frames_per_step: int
  ald_combined_frames_per_s: float
  distill_ms: float
  transformer_frames_per_s: float
  transformer_estimated: bool  # no transformer figure was recorded there


def learner_figures(name: str, cpu_ratio: float | None = None
                    ) -> LearnerFigures:
  """`cpu_ratio`: the transformer's step over ALD's combined step measured on
  the CPU at this shape, used where the file has no transformer figure."""
  data = read_result(name)
  lcfg = data["learner_config"]
  ald = data["learner_frames_per_s_cached"]
  transformer = data.get("transformer_learner_frames_per_s_cached")
  estimated = transformer is None
  if estimated:
    if cpu_ratio is None:
      raise ValueError(f"{name}: no transformer_learner_frames_per_s_cached "
                       f"and no CPU ratio to estimate it from")
    # The transformer agent's step is ALD's combined step less the LSTM's
    # distillation: never slower than it.
    transformer = ald * max(1.0, cpu_ratio)
  return LearnerFigures(
      source=name, frames_per_step=lcfg["batch_size"] * lcfg["unroll_length"],
      ald_combined_frames_per_s=ald, distill_ms=data["distill_step_ms_stored"],
      transformer_frames_per_s=transformer, transformer_estimated=estimated)


@dataclasses.dataclass(frozen=True)
class ActingFigures:
  """Acting step alone, per agent, at E envs (bench_system)."""
  sources: Mapping[str, str]
  num_envs: int
  t_act_us: Mapping[str, float]


def acting_figures(names: Sequence[str]) -> ActingFigures:
  """Each agent's figure from the first of `names` that has it; all at one
  E (envs per actor)."""
  sources, t_act_us, num_envs = {}, {}, set()
  for name in names:
    data = read_result(name)
    for agent in AGENTS:
      key = f"{agent}_t_actor_alone_p50_us"
      if agent not in t_act_us and key in data:
        sources[agent], t_act_us[agent] = name, data[key]
        num_envs.add(int(data["envs_per_actor"]))
  missing = [agent for agent in AGENTS if agent not in t_act_us]
  if missing:
    raise ValueError(f"no acting figure for {missing} in {list(names)}")
  if len(num_envs) != 1:
    raise ValueError(f"{list(names)}: acting figures at different E "
                     f"{sorted(num_envs)}")
  return ActingFigures(sources=sources, num_envs=num_envs.pop(),
                       t_act_us=t_act_us)


def actor_loop_overhead_us(name: str) -> float:
  """The mean of `actor_overhead_us` over the agents of a bench_system run
  with one actor process (its core its own)."""
  data = read_result(name)
  if data.get("num_actors") != 1 or data.get("actors") != "processes":
    raise ValueError(f"{name}: the actor loop's cost needs a run with one "
                     f"actor process on its own core (--actors=processes "
                     f"--num_actors=1 --pin_learner)")
  per_agent = [actor_overhead_us(int(data["envs_per_actor"]),
                                 data[f"{agent}_actor_sps"],
                                 data[f"{agent}_t_actor_alone_p50_us"])
               for agent in ("ald", "lstm", "transformer")
               if f"{agent}_actor_sps" in data]
  if not per_agent:
    raise ValueError(f"{name}: no <agent>_actor_sps")
  return sum(per_agent) / len(per_agent)


def loop_host_ms(name: str) -> float:
  return read_result(name)["pipelined"]["host_ms_per_step_at_5ms"]


def agent_learner_fps(agent: str, fig: LearnerFigures, distill_steps: float,
                      host_ms: float, accelerator: bool) -> float:
  if agent == "ald":
    step = rl_step_ms(fig.frames_per_step, fig.ald_combined_frames_per_s,
                      fig.distill_ms, distill_steps)
  else:
    step = rl_step_ms(fig.frames_per_step, fig.transformer_frames_per_s,
                      0.0, 0.0)
  return learner_frames_per_s(fig.frames_per_step, step, host_ms, accelerator)


# ---- validation and prediction ----

def validate(run_name: str, learners: Mapping[tuple[str, str], LearnerFigures],
             overhead_us: float, host_ms: float) -> dict[str, Any]:
  """Shared-CPU prediction of one recorded bench_system run on the 2-core
  CPU (its own acting figure and distill-only steps, the learner's figure
  at its shape), beside what it measured."""
  run = read_result(run_name)
  preset = run.get("preset", "default")
  if preset not in SHAPES:
    raise ValueError(f"{run_name}: preset {preset!r} is not modelled")
  out = {"file": run_name, "preset": preset, "actors": run.get("actors")}
  for agent in AGENTS:
    if f"{agent}_env_sps" not in run:
      continue
    distill = run.get(f"{agent}_distill_steps_per_rl_step") or 0.0
    fps = agent_learner_fps(agent, learners[("cpu2", preset)], distill,
                            host_ms, accelerator=False)
    acting_us = acting_us_per_env_step(
        run[f"{agent}_t_actor_alone_p50_us"], int(run["envs_per_actor"]),
        overhead_us)
    predicted = min(shared_cpu_env_sps(fps, acting_us),
                    run["num_actors"] * 1e6 / acting_us)
    measured = run[f"{agent}_env_sps"]
    out[agent] = {
        "measured_env_sps": measured, "predicted_env_sps": predicted,
        "predicted_over_measured": predicted / measured,
        "within_tolerance": abs(predicted / measured - 1.0) <= TOLERANCE,
        "learner_frames_per_s_alone": fps, "acting_us_per_env_step": acting_us,
        "distill_steps_per_rl_step": distill,
    }
  return out


def predict(learners: Mapping[tuple[str, str], LearnerFigures],
            acting: Mapping[str, ActingFigures], overhead_us: float,
            host_ms: float, distill_steps: float,
            cores: Sequence[int]) -> dict[str, Any]:
  """Curves X(N) for each learner site and shape, with dedicated actor
  cores; and where ALD is ahead."""
  out = {}
  for site in SITES:
    for shape in SHAPES:
      fig = learners[(site, shape)]
      curves, inputs = {}, {}
      for agent in AGENTS:
        fps = agent_learner_fps(agent, fig, distill_steps if agent == "ald"
                                else 0.0, host_ms,
                                accelerator=site != "cpu2")
        acting_us = acting_us_per_env_step(acting[shape].t_act_us[agent],
                                           acting[shape].num_envs, overhead_us)
        curves[agent] = [dedicated_env_sps(fps, acting_us, n) for n in cores]
        inputs[agent] = {"learner_frames_per_s": fps,
                         "acting_us_per_env_step": acting_us,
                         "cores_to_keep_the_learner_busy":
                             fps * acting_us * 1e-6}
      below = ald_ahead_below_cores(
          inputs["ald"]["learner_frames_per_s"],
          inputs["ald"]["acting_us_per_env_step"],
          inputs["transformer"]["learner_frames_per_s"],
          inputs["transformer"]["acting_us_per_env_step"])
      out[f"{site}_{shape}"] = {
          "ald_ahead_below_cores": None if math.isinf(below) else below,
          "learner": fig.source,
          "transformer_learner_estimated": fig.transformer_estimated,
          "acting": dict(acting[shape].sources), "inputs": inputs,
          "env_sps": curves,
          **crossover(curves["ald"], curves["transformer"], cores)}
  return out


def core_counts(max_cores: int) -> list[int]:
  counts, n = [], 1
  while n <= max_cores:
    counts.append(n)
    n *= 2
  return counts if counts[-1] == max_cores else counts + [max_cores]


def plot(prediction: Mapping[str, Any], cores: Sequence[int], path: str
         ) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
  styles = {"cpu2": "--", "h200": "-"}
  colors = {"ald": "tab:blue", "transformer": "tab:orange"}
  for ax, shape in zip(axes, SHAPES):
    for site in SITES:
      case = prediction[f"{site}_{shape}"]
      for agent in AGENTS:
        ax.plot(cores, case["env_sps"][agent], styles[site],
                color=colors[agent], marker="o", markersize=3,
                label=f"{agent}, learner on {site}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(cores))
    ax.set_xticklabels([str(n) for n in cores])
    ax.set_yscale("log")
    ax.set_xlabel("actor cores (one actor process each)")
    ax.set_title(f"{shape} shape")
    ax.grid(True, which="both", alpha=0.3)
  axes[0].set_ylabel("env steps / s (model)")
  axes[0].legend(fontsize=8)
  fig.suptitle("ALD vs the transformer agent: predicted throughput")
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)


def model(sources: Sources = Sources(),
          ald_distill_steps: float | None = None,
          max_cores: int = 64) -> dict[str, Any]:
  """Validation against the recorded runs, and the predicted curves.

  `ald_distill_steps`: ALD's distill-only steps per RL step in the curves
  (None: the training default); each validation run keeps its own.
  """
  overhead_us = actor_loop_overhead_us(sources.actor_loop)
  host_ms = loop_host_ms(sources.loop)
  learners = {}
  for shape in SHAPES:
    cpu = learner_figures(sources.learner("cpu2", shape))
    learners[("cpu2", shape)] = cpu
    learners[("h200", shape)] = learner_figures(
        sources.learner("h200", shape),
        cpu_ratio=cpu.transformer_frames_per_s / cpu.ald_combined_frames_per_s)
  acting = {shape: acting_figures(sources.acting(shape)) for shape in SHAPES}
  cores = core_counts(max_cores)
  distill = (DEFAULT_DISTILL_STEPS if ald_distill_steps is None
             else ald_distill_steps)
  validation = [validate(name, learners, overhead_us, host_ms)
                for name in sources.validate]
  comparison = [validate(name, learners, overhead_us, host_ms)
                for name in sources.compare]
  return {
      "sources": dataclasses.asdict(sources),
      "inputs": {"actor_overhead_us_per_acting_step": overhead_us,
                 # o is taken per acting step, measured at this E:
                 "actor_overhead_measured_at_envs": int(read_result(
                     sources.actor_loop)["envs_per_actor"]),
                 "loop_host_ms_per_step": host_ms,
                 "ald_distill_steps_per_rl_step": distill},
      "validation": validation,
      "threads_comparison": comparison,
      "validated": all(case[agent]["within_tolerance"]
                       for case in validation for agent in AGENTS
                       if agent in case),
      "cores": cores,
      "prediction": predict(learners, acting, overhead_us, host_ms, distill,
                            cores),
  }


def define_flags() -> dict[str, flags.FlagHolder]:
  """Flags for the command line: one per source file, and the options."""
  holders = {}
  for field in dataclasses.fields(Sources):
    if isinstance(field.default, tuple):
      holders[field.name] = flags.DEFINE_list(
          field.name, list(field.default),
          f"Result files read for {field.name.replace('_', ' ')} "
          f"(comma separated).")
    else:
      holders[field.name] = flags.DEFINE_string(
          field.name, field.default,
          f"Result file read for {field.name.replace('_', ' ')}.")
  holders["distill_steps_per_rl_step"] = flags.DEFINE_float(
      "distill_steps_per_rl_step", None,
      "ALD's distill-only steps per RL step in the predicted curves "
      f"(default {DEFAULT_DISTILL_STEPS:g}, the training default; each "
      "validation run keeps its own).")
  holders["max_cores"] = flags.DEFINE_integer("max_cores", 64,
                                              "Largest N predicted.")
  holders["out"] = flags.DEFINE_string("out", "", "Also write the JSON here.")
  holders["plot"] = flags.DEFINE_string("plot", "",
                                        "Write the figure (PNG) here.")
  return holders


def run_model(sources: Sources, ald_distill_steps: float | None,
              max_cores: int, out: str = "", plot_path: str = ""
              ) -> dict[str, Any]:
  """`model`, printed as one JSON object (and to --out), a line per
  validated agent on stderr, the figure to --plot."""
  result = {
      **bench_output.header(),
      "tolerance": TOLERANCE,
      **model(sources, ald_distill_steps, max_cores),
  }
  bench_output.emit(result, out)
  if plot_path:
    plot(result["prediction"], result["cores"], plot_path)
  for title, key in (("checked", "validation"),
                     ("actor threads, not checked", "threads_comparison")):
    print(f"{title}:", file=sys.stderr)
    for case in result[key]:
      for agent in AGENTS:
        if agent in case:
          v = case[agent]
          print(f"  {case['file']}: {agent} measured "
                f"{v['measured_env_sps']:.0f}, predicted "
                f"{v['predicted_env_sps']:.0f} env steps/s "
                f"({v['predicted_over_measured']:.2f}x)", file=sys.stderr)
  return result


def main(argv, holders):
  del argv
  values = {name: holder.value for name, holder in holders.items()}
  sources = Sources(**{field.name: (tuple(values[field.name])
                                    if isinstance(field.default, tuple)
                                    else values[field.name])
                       for field in dataclasses.fields(Sources)})
  run_model(sources, values["distill_steps_per_rl_step"],
            values["max_cores"], values["out"], values["plot"])


if __name__ == "__main__":
  _HOLDERS = define_flags()
  app.run(lambda argv: main(argv, _HOLDERS))
