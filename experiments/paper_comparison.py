"""The paper-style comparison as a resumable grid of runs.

A grid is agents x seeds x task settings x knobs, every run in its own
directory under --grid_dir, run one after another:

    python experiments/paper_comparison.py --name=cue_span \\
        --agents=ald,transformer,asymmetric,lstm --seeds=1,2,3 \\
        --env=cue_recall --env_kwargs_grid='span=16;span=32' \\
        --knobs_grid='distill_steps_per_rl_step=0,1,4' \\
        --total_env_steps=300000 --lstm_hidden_size=64

Grid flags (everything is validated, and every run's config built, before
the first run starts; a bad value fails naming its flag):
  --agents           comma-separated agents (ald, lstm, transformer, asymmetric)
  --seeds            comma-separated integer seeds
  --env              the environment of every run (a run flag)
  --env_kwargs_grid  task settings separated by ';', each a comma-separated
                     list of key=value environment kwargs (values read as
                     JSON, else as text): 'corridor_length=8,wrong_reward=0;
                     corridor_length=16,wrong_reward=0'. Empty: one setting,
                     the environment's defaults.
  --knobs_grid       run flags to vary, separated by ';', each name=v1,v2,...:
                     'distill_steps_per_rl_step=0,0.5,1,4;learner_pull_cost=0,1'
                     runs every combination. A combination an agent's config
                     rejects (distill steps for a non-ALD agent) is an error:
                     run such ablations with --agents=ald.
  --threshold, --threshold_metric   "reached" = the metric's first row >= this
  --name, --grid_dir, --results_dir, --dry_run
  --aggregate_only, --ran_on   summary and plots of a grid run elsewhere
Every other run flag of `python -m ald_jax.train` (sizes, budget, --actors,
...) applies to every run; --agent, --seed, --logdir, --resume and
--env_kwargs are the grid's.

Resuming: a run whose directory holds its per-run JSON (`grid_run.json`) is
finished and skipped; one with checkpoints but no per-run JSON (stopped,
killed) continues from its newest checkpoint (`resume=True`, the project's
resume check refuses a changed config unless --resume_allow_change names the
field: e.g. `--resume_allow_change=total_env_steps` with a larger budget
extends finished runs). A run stopped by a signal (Ctrl-C) stops the grid;
one that fails is reported and the grid goes on; run the same command again
to continue.

Outputs: `<run_dir>/grid_run.json` per run, and in --results_dir
`<name>_summary.json` (versions, machine, command, the grid and `runs`: one
object per run with agent, task, seed, knobs, threshold,
env_steps_to_threshold, wall_clock_to_threshold_s, final_success,
final_return) and `<name>_<task>.png` per task setting (return and success vs
env steps and vs wall-clock; per agent and knob setting the mean over seeds
with the min-max band).
"""
from __future__ import annotations

import dataclasses
import datetime
import itertools
import json
import math
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from typing import Any, Callable, Sequence, TextIO

from absl import app
from absl import flags

from ald_jax import checkpoint as checkpoint_lib
from ald_jax import config as config_lib
from ald_jax import metrics as metrics_lib
from ald_jax import plot
from ald_jax import train as train_lib
from ald_jax.envs import registry
from ald_jax.system import errors
from ald_jax.system import run as run_lib
from ald_jax.system import run_dir as run_dir_lib
from ald_jax.system import timing

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                           "results")
RUN_JSON = "grid_run.json"   # per-run result; its presence marks "finished"
THRESHOLD_METRICS = (metrics_lib.SUCCESS_RATE, metrics_lib.EPISODE_RETURN)
# Run flags the grid sets per run, with what to use instead.
GRID_OWNED = {
    "agent": "--agents", "seed": "--seeds", "logdir": "--grid_dir",
    "resume": "nothing (the grid resumes stopped runs itself)",
    "env_kwargs": "--env_kwargs_grid", "env": "--env",
}
_FLAG_KINDS = {flag.name: flag.kind for flag in train_lib.FLAG_TABLE}
_FLAG_PATHS = train_lib.FLAG_PATHS
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._=,+-]")


class GridError(ValueError):
  """A bad grid flag or an existing run that the grid cannot continue; the
  message names the flag or the run directory."""


# ---- parsing the grid flags ---------------------------------------------------

def parse_agents(agents: Sequence[str]) -> tuple[str, ...]:
  agents = tuple(a.strip() for a in agents if a.strip())
  if not agents:
    raise GridError("--agents: name at least one agent")
  for agent in agents:
    if agent not in config_lib.AGENTS:
      raise GridError(f"--agents: unknown agent {agent!r}; choose from "
                      f"{', '.join(config_lib.AGENTS)}")
  if len(set(agents)) != len(agents):
    raise GridError(f"--agents: an agent is named twice: {','.join(agents)}")
  return agents


def parse_seeds(seeds: Sequence[str | int]) -> tuple[int, ...]:
  parsed = []
  for seed in seeds:
    text = str(seed).strip()
    if not re.fullmatch(r"\d+", text):
      raise GridError(f"--seeds: expected integers >= 0, got {seed!r}")
    parsed.append(int(text))
  if not parsed:
    raise GridError("--seeds: name at least one seed")
  if len(set(parsed)) != len(parsed):
    raise GridError(f"--seeds: a seed is named twice: {parsed}")
  return tuple(parsed)


def _json_or_text(text: str) -> Any:
  try:
    return json.loads(text)
  except json.JSONDecodeError:
    return text


def parse_env_kwargs_grid(text: str) -> tuple[dict[str, Any], ...]:
  """'span=16;span=32,num_cues=4' -> ({"span": 16}, {"span": 32,
  "num_cues": 4}); '' -> ({},): one setting, the environment's defaults."""
  settings: list[dict[str, Any]] = []
  for setting_text in (text.split(";") if text.strip() else [""]):
    setting: dict[str, Any] = {}
    for item in (i.strip() for i in setting_text.split(",")):
      if not item:
        continue
      key, sep, value = item.partition("=")
      key = key.strip()
      if not sep or not key or not value.strip():
        raise GridError(f"--env_kwargs_grid: expected key=value, got {item!r} "
                        f"in setting {setting_text.strip()!r}")
      if key in setting:
        raise GridError(f"--env_kwargs_grid: {key!r} is set twice in setting "
                        f"{setting_text.strip()!r}")
      setting[key] = _json_or_text(value.strip())
    if setting in settings:
      raise GridError(f"--env_kwargs_grid: setting {setting_text.strip()!r} "
                      "is listed twice")
    settings.append(setting)
  return tuple(settings)


def parse_knobs_grid(text: str) -> tuple[tuple[str, tuple[str, ...]], ...]:
  """'distill_steps_per_rl_step=0,1;learner_pull_cost=0,0.1' ->
  (("distill_steps_per_rl_step", ("0", "1")), ("learner_pull_cost", ("0",
  "0.1"))). Values stay text here; each run's flag parser reads them."""
  knobs: list[tuple[str, tuple[str, ...]]] = []
  for item in (i.strip() for i in text.split(";")):
    if not item:
      continue
    name, sep, values_text = item.partition("=")
    name = name.strip()
    values = tuple(v.strip() for v in values_text.split(",") if v.strip())
    if not sep or not name or not values:
      raise GridError(f"--knobs_grid: expected flag=value1,value2,..., got "
                      f"{item!r}")
    if name not in _FLAG_KINDS:
      raise GridError(f"--knobs_grid: {name!r} is not a run flag of "
                      "`python -m ald_jax.train` (--helpfull lists them)")
    if name in GRID_OWNED:
      raise GridError(f"--knobs_grid: {name!r} is set by the grid; use "
                      f"{GRID_OWNED[name]}")
    if _FLAG_KINDS[name] == "ints":
      raise GridError(f"--knobs_grid: {name!r} takes a comma-separated list "
                      "and cannot be a knob; run one grid per value")
    if name in dict(knobs):
      raise GridError(f"--knobs_grid: {name!r} is listed twice")
    if len(set(values)) != len(values):
      raise GridError(f"--knobs_grid: {name!r} lists a value twice: "
                      f"{','.join(values)}")
    knobs.append((name, values))
  return tuple(knobs)


# ---- the planned runs ---------------------------------------------------------

def _label(pairs: Sequence[tuple[str, Any]]) -> str:
  return ",".join(f"{key}={value}" for key, value in pairs)


@dataclasses.dataclass(frozen=True)
class GridRun:
  """One point of the grid: what it runs and where."""
  agent: str
  seed: int
  env: str
  env_kwargs: tuple[tuple[str, Any], ...]
  knobs: tuple[tuple[str, Any], ...]   # (flag, value as the run's config has it)
  run_dir: str
  argv: tuple[str, ...]                # the run flags that build its config

  @property
  def task(self) -> dict[str, Any]:
    return {"env": self.env, "kwargs": dict(self.env_kwargs)}

  @property
  def task_label(self) -> str:
    return self.env + (f"-{_label(self.env_kwargs)}" if self.env_kwargs
                       else "")

  @property
  def knobs_label(self) -> str:
    return _label(self.knobs) or "default"

  @property
  def curve_label(self) -> str:
    """The plot's label of this run's group (its seeds share it)."""
    return self.agent + (f" {_label(self.knobs)}" if self.knobs else "")

  @property
  def name(self) -> str:
    return f"{self.agent} {self.task_label} {self.knobs_label} seed {self.seed}"

  def config(self, resume: bool = False) -> config_lib.TrainConfig:
    return train_lib.config_from_argv(
        list(self.argv) + [f"--resume={str(resume).lower()}"])


def _build_config(argv: Sequence[str], what: str,
                  flag: str) -> config_lib.TrainConfig:
  try:
    return train_lib.config_from_argv(argv)
  except app.UsageError as error:
    raise GridError(f"{flag}: {what}: {error}") from None


def _check_train_flags(train_flags: Sequence[str]) -> None:
  flag_values = flags.FlagValues()
  train_lib.define_flags(flag_values)
  try:
    flag_values(["paper_comparison", *train_flags])
  except flags.Error as error:
    raise GridError(f"run flags: {error}") from None
  for name, instead in GRID_OWNED.items():
    if flag_values[name].present:
      raise GridError(f"--{name}: set by the grid; use {instead}")


def plan_grid(*, agents: Sequence[str], seeds: Sequence[int | str], env: str,
              env_kwargs_grid: str = "", knobs_grid: str = "",
              train_flags: Sequence[str] = (), grid_dir: str
              ) -> list[GridRun]:
  """Every run of the grid, its config built and validated.

  Order: seeds outermost, then task settings, knob settings and agents, so a
  grid stopped part-way has compared every agent on the first seeds.
  Raises GridError naming the flag for any bad value.
  """
  agents = parse_agents(agents)
  seeds = parse_seeds(seeds)
  settings = parse_env_kwargs_grid(env_kwargs_grid)
  knobs = parse_knobs_grid(knobs_grid)
  _check_train_flags(train_flags)
  if not isinstance(env, str) or not env:
    raise GridError(f"--env: must be an environment name, got {env!r}")
  for setting in settings:
    try:
      registry.make_env_factory(env, **setting)
    except ValueError as error:
      raise GridError(f"--env_kwargs_grid: setting {_label(setting.items())!r}"
                      f" of {env!r}: {error}") from None
  knob_settings = list(itertools.product(
      *[[(name, value) for value in values] for name, values in knobs]))
  grid_dir = os.path.abspath(grid_dir)
  runs, by_dir = [], {}
  for seed, setting, knob_setting, agent in itertools.product(
      seeds, settings, knob_settings, agents):
    kwargs = tuple(sorted(setting.items()))
    argv = list(train_flags) + [
        f"--env={env}", f"--env_kwargs={json.dumps(dict(kwargs))}",
        f"--agent={agent}", f"--seed={seed}"]
    what = " ".join(part for part in (agent, f"seed {seed}", env,
                                      _label(kwargs)) if part)
    # The run flags alone first, so an error names the right grid flag.
    _build_config(argv + ["--logdir=."], what, "run flags")
    argv += [f"--{name}={value}" for name, value in knob_setting]
    config = _build_config(argv + ["--logdir=."],
                           f"{what} {_label(knob_setting)}", "--knobs_grid")
    # Knob values as the run's config reads them (e.g. "4" -> 4.0).
    knob_values = tuple((name, train_lib.get_path(config, _FLAG_PATHS[name]))
                        for name, _ in knob_setting)
    run = GridRun(agent=agent, seed=seed, env=env, env_kwargs=kwargs,
                  knobs=knob_values, run_dir="", argv=())
    dirname = _SAFE_NAME.sub("_", f"{agent}__{run.task_label}__"
                             f"{run.knobs_label}__seed{seed}")
    run_dir = os.path.join(grid_dir, dirname)
    if run_dir in by_dir:
      raise GridError(f"--env_kwargs_grid/--knobs_grid: {run.name} and "
                      f"{by_dir[run_dir]} map to the same directory "
                      f"{run_dir}")
    by_dir[run_dir] = run.name
    runs.append(dataclasses.replace(
        run, run_dir=run_dir, argv=tuple(argv + [f"--logdir={run_dir}"])))
  return runs


# ---- the state of a run directory -----------------------------------------------

def _read_json(path: str) -> Any:
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _has_checkpoints(run_dir: str) -> bool:
  ckpt_dir = os.path.join(run_dir, run_lib.CHECKPOINT_DIR)
  return os.path.isdir(ckpt_dir) and any(
      name.isdigit() for name in os.listdir(ckpt_dir))


def run_status(run: GridRun) -> str:
  """"finished" (skip), "resume" (continue from its checkpoint) or "new".

  An existing run is checked against the config the grid would give it now
  (the project's resume check), so a changed flag is refused before any
  work, naming the run directory and the field.
  """
  run_json = os.path.join(run.run_dir, RUN_JSON)
  finished = os.path.exists(run_json)
  if not (finished or _has_checkpoints(run.run_dir)):
    return "new"
  config = run.config(resume=True)
  stored = run_dir_lib.read_latest_config(run.run_dir)
  if stored is not None:
    try:
      run_dir_lib.check_resume_config(
          stored["train"], config,
          config.resume_allow_change, _FLAG_PATHS)
    except config_lib.ConfigError as error:
      raise GridError(f"{run.run_dir}: {error}") from None
  if finished and (_read_json(run_json).get("final_env_steps") or 0
                   ) >= config.total_env_steps:
    return "finished"
  return "resume"


# ---- per-run results ------------------------------------------------------------

def first_crossing(rows: Sequence[dict[str, Any]], metric: str,
                   threshold: float) -> tuple[int | None, float | None]:
  """(env_steps, wall_time_s) of the first row whose `metric` is >=
  `threshold`; (None, None) if none is."""
  for row in rows:
    value = row.get(metric)
    if isinstance(value, (int, float)) and not math.isnan(value) and (
        value >= threshold):
      return row.get(metrics_lib.ENV_STEPS), row.get(metrics_lib.WALL_TIME)
  return None, None


def _last(rows: Sequence[dict[str, Any]], key: str) -> Any:
  for row in reversed(rows):
    value = row.get(key)
    if isinstance(value, (int, float)) and not math.isnan(value):
      return value
  return None


def run_record(run: GridRun, threshold: float,
               threshold_metric: str) -> dict[str, Any]:
  """The per-run JSON object, read from the run's metrics rows."""
  rows = metrics_lib.read_metrics(run.run_dir)
  steps, wall = first_crossing(rows, threshold_metric, threshold)
  last = rows[-1] if rows else {}
  alone = (run_dir_lib.read_latest_config(run.run_dir) or {}).get(
      "t_actor_alone", {})
  return {
      "agent": run.agent, "task": run.task, "seed": run.seed,
      "knobs": dict(run.knobs), "threshold": threshold,
      "threshold_metric": threshold_metric,
      "env_steps_to_threshold": steps, "wall_clock_to_threshold_s": wall,
      "final_success": _last(rows, metrics_lib.SUCCESS_RATE),
      "final_return": _last(rows, metrics_lib.EPISODE_RETURN),
      "final_env_steps": last.get(metrics_lib.ENV_STEPS),
      "final_wall_time_s": last.get(metrics_lib.WALL_TIME),
      # The learner acting alone vs the actor at the last evaluation (ALD
      # runs): a large gap is failed distillation, not a failed learner.
      "final_eval_learner_return": _last(rows, metrics_lib.EVAL_LEARNER_RETURN),
      "final_eval_actor_return": _last(rows, metrics_lib.EVAL_ACTOR_RETURN),
      "final_eval_gap_return": _last(rows, metrics_lib.EVAL_GAP_RETURN),
      # The acting step in the run, and alone at the run's start.
      "t_actor_p50_us": _last(rows, metrics_lib.T_ACTOR_P50),
      "t_actor_p99_us": _last(rows, metrics_lib.T_ACTOR_P99),
      "t_actor_alone_p50_us": alone.get("p50_us"),
      "t_actor_alone_p99_us": alone.get("p99_us"),
      "stopped_by": last.get("stopped_by"),
      "actors": run.config().actors,   # the engine: threads or processes
      "run_dir": run.run_dir,
  }


def _write_json(path: str, value: Any) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(value, f, indent=1)
    f.write("\n")
  os.replace(tmp, path)


# ---- versions and machine --------------------------------------------------------

def _git(*args: str) -> str | None:
  package_dir = os.path.dirname(os.path.abspath(train_lib.__file__))
  try:
    return subprocess.run(["git", "-C", package_dir, *args], check=True,
                          capture_output=True, text=True,
                          timeout=10).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return None


def environment_record() -> dict[str, Any]:
  """Versions (jax, ald_jax and its git commit) and the machine."""
  import jax  # pylint: disable=import-outside-toplevel
  import jaxlib  # pylint: disable=import-outside-toplevel
  import flax  # pylint: disable=import-outside-toplevel
  import ald_jax  # pylint: disable=import-outside-toplevel
  dirty = _git("status", "--porcelain", "--untracked-files=no")
  return {
      "versions": {
          "python": platform.python_version(), "jax": jax.__version__,
          "jaxlib": jaxlib.__version__, "flax": flax.__version__,
          "ald_jax": getattr(ald_jax, "__version__", None),
          "ald_jax_git_sha": _git("rev-parse", "HEAD"),
          "ald_jax_git_dirty": None if dirty is None else bool(dirty),
      },
      "machine": {
          "platform": platform.platform(), "processor": platform.machine(),
          "cpu_count": os.cpu_count(),
          "devices": [str(device) for device in jax.devices()],
      },
  }


# ---- the grid --------------------------------------------------------------------

@dataclasses.dataclass
class GridResult:
  summary_path: str
  plot_paths: list[str]
  summary: dict[str, Any]
  trained: list[str]          # run directories trained by this call
  failed: dict[str, str]      # run directory -> error
  interrupted: str | None     # "signal:SIGINT" when a signal stopped the grid


def _progress(done: int, total: int, width: int = 24) -> str:
  filled = int(round(width * done / total)) if total else width
  return f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total}"


def _duration(seconds: float) -> str:
  seconds = int(round(seconds))
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


_STATUS_WORDS = {"finished": "finished, skipped", "resume": "resuming from "
                 "its checkpoint", "new": "starting"}


def _print(out: TextIO, text: str) -> None:
  print(text, file=out, flush=True)


def run_grid(*, name: str, agents: Sequence[str], seeds: Sequence[int | str],
             env: str, env_kwargs_grid: str = "", knobs_grid: str = "",
             train_flags: Sequence[str] = (), grid_dir: str,
             results_dir: str = RESULTS_DIR, threshold: float = 0.9,
             threshold_metric: str = metrics_lib.SUCCESS_RATE,
             command: str | None = None,
             train_fn: Callable[[config_lib.TrainConfig], Any] | None = None,
             out: TextIO = sys.stdout) -> GridResult:
  """Runs (or continues) the grid, then writes the summary and the plots.

  Args:
    name: names the summary `<results_dir>/<name>_summary.json` and plots.
    agents, seeds, env, env_kwargs_grid, knobs_grid: the grid; strings in
      the flags' syntax (see the module docstring).
    train_flags: run flags for every run, e.g. `["--total_env_steps=5000"]`.
    grid_dir: the run directories go here, one per run.
    threshold, threshold_metric: a run reaches the threshold at its first
      metrics row with `threshold_metric >= threshold`.
    command: recorded in the summary (default: this process's command line).
    train_fn: `(TrainConfig) -> RunResult`; default `ald_jax.system.run.train`.
    out: where the progress lines go.

  Raises GridError (naming the flag or run directory) before any run starts.
  """
  if not isinstance(name, str) or not name or _SAFE_NAME.search(name):
    raise GridError(f"--name: letters, digits and . _ = , + - only, got "
                    f"{name!r}")
  if threshold_metric not in THRESHOLD_METRICS:
    raise GridError(f"--threshold_metric: one of {THRESHOLD_METRICS}, got "
                    f"{threshold_metric!r}")
  if not (isinstance(threshold, (int, float)) and math.isfinite(threshold)):
    raise GridError(f"--threshold: must be a finite number, got {threshold!r}")
  runs = plan_grid(agents=agents, seeds=seeds, env=env,
                   env_kwargs_grid=env_kwargs_grid, knobs_grid=knobs_grid,
                   train_flags=train_flags, grid_dir=grid_dir)
  statuses = {run.run_dir: run_status(run) for run in runs}
  train_fn = train_fn or run_lib.train
  started = time.monotonic()
  trained, failed, interrupted = [], {}, None
  durations: list[float] = []
  for index, run in enumerate(runs):
    # Again now: another process may have finished or started it meanwhile.
    status = statuses[run.run_dir] = run_status(run)
    remaining = sum(statuses[r.run_dir] != "finished" for r in runs[index:])
    eta = (f", about {_duration(remaining * sum(durations) / len(durations))}"
           " left" if durations else "")
    _print(out, f"grid {_progress(index, len(runs))} "
           f"{_duration(time.monotonic() - started)}{eta} | {run.name}: "
           f"{_STATUS_WORDS[status]}")
    if status == "finished":
      continue
    run_json = os.path.join(run.run_dir, RUN_JSON)
    if os.path.exists(run_json):  # a finished run extended to a new budget
      os.remove(run_json)
    run_start = time.monotonic()
    trained.append(run.run_dir)
    try:
      result = train_fn(run.config(resume=status == "resume"))
    except (errors.RunError, ValueError, timing.TActorBudgetError) as error:
      # What `python -m ald_jax.train` reports as a failed run; the grid goes
      # on, and the next invocation tries this run again.
      failed[run.run_dir] = f"{type(error).__name__}: {error}"
      _print(out, f"grid | {run.name}: failed: {error}")
      continue
    durations.append(time.monotonic() - run_start)
    if result.stopped_by.startswith("signal:"):
      interrupted = result.stopped_by
      _print(out, f"grid | {run.name}: stopped by {result.stopped_by}; the "
             "grid stops (run the same command to continue)")
      break
    if result.stopped_by == "budget":
      _write_json(run_json, run_record(run, threshold, threshold_metric))
    else:  # e.g. --max_wall_time_s: continues on the next invocation
      _print(out, f"grid | {run.name}: stopped by {result.stopped_by} "
             "before its budget; the next invocation continues it")
  finished = sum(os.path.exists(os.path.join(r.run_dir, RUN_JSON))
                 for r in runs)
  _print(out, f"grid {_progress(finished, len(runs))} finished, "
         f"{len(trained)} trained now, {len(failed)} failed, "
         f"{_duration(time.monotonic() - started)}")
  summary, plot_paths = aggregate(
      runs, name=name, results_dir=results_dir, threshold=threshold,
      threshold_metric=threshold_metric, grid=grid_record(
          agents=agents, seeds=seeds, env=env,
          env_kwargs_grid=env_kwargs_grid, knobs_grid=knobs_grid,
          train_flags=train_flags, grid_dir=grid_dir),
      command=command or _this_command(), failed=failed)
  summary_path = os.path.join(results_dir, f"{name}_summary.json")
  _print(out, f"summary: {summary_path}\nplots: {', '.join(plot_paths)}")
  return GridResult(summary_path, plot_paths, summary, trained, failed,
                    interrupted)


def grid_record(*, agents: Sequence[str], seeds: Sequence[int | str],
                env: str, env_kwargs_grid: str, knobs_grid: str,
                train_flags: Sequence[str], grid_dir: str) -> dict[str, Any]:
  """The grid as the summary records it."""
  return {"agents": list(parse_agents(agents)),
          "seeds": list(parse_seeds(seeds)), "env": env,
          "env_kwargs_grid": env_kwargs_grid, "knobs_grid": knobs_grid,
          "train_flags": list(train_flags),
          "grid_dir": os.path.abspath(grid_dir)}


def _this_command() -> str:
  return shlex.join([os.path.basename(sys.executable)] + sys.argv)


def aggregate(runs: Sequence[GridRun], *, name: str, results_dir: str,
              threshold: float, threshold_metric: str, grid: dict[str, Any],
              command: str, failed: dict[str, str] | None = None,
              ran_on: str = "") -> tuple[dict[str, Any], list[str]]:
  """Refreshes every finished run's per-run JSON (the threshold may have
  changed), writes `<name>_summary.json` and one PNG per task setting.

  `ran_on`: where the runs ran when that was not this machine (a grid run
  elsewhere and copied back); `versions`/`machine` are then this machine's.
  """
  failed = failed or {}
  os.makedirs(results_dir, exist_ok=True)
  records, unfinished = [], []
  for run in runs:
    run_json = os.path.join(run.run_dir, RUN_JSON)
    if os.path.exists(run_json):
      record = run_record(run, threshold, threshold_metric)
      _write_json(run_json, record)
      records.append(record)
    else:
      unfinished.append({"agent": run.agent, "task": run.task,
                         "seed": run.seed, "knobs": dict(run.knobs),
                         "run_dir": run.run_dir,
                         "error": failed.get(run.run_dir)})
  plot_paths = []
  by_task: dict[str, dict[str, list[str]]] = {}
  finished = {record["run_dir"] for record in records}
  for run in runs:  # the runs the summary counts: a failed or half-copied
    # run would cut its group's seed band short
    if run.run_dir in finished:
      by_task.setdefault(run.task_label, {}).setdefault(
          run.curve_label, []).append(run.run_dir)
  for task_label, groups in by_task.items():
    out_path = os.path.join(results_dir, _SAFE_NAME.sub(
        "_", f"{name}_{task_label}.png"))
    plot_paths.append(plot.plot_seed_bands(
        groups, out_path, title=f"{name}: {task_label} (mean and min-max "
        "over seeds)"))
  summary = {
      "name": name,
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
          timespec="seconds"),
      "command": command,
      **environment_record(),
      **({"ran_on": ran_on} if ran_on else {}),
      "grid": grid,
      "threshold": {"metric": threshold_metric, "value": threshold},
      "complete": not unfinished,
      "runs": records,
      "unfinished": unfinished,
      "plots": [os.path.basename(p) for p in plot_paths],
  }
  _write_json(os.path.join(results_dir, f"{name}_summary.json"),
              checkpoint_lib.to_jsonable(summary))
  return summary, plot_paths


# ---- command line ------------------------------------------------------------------

def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  flags.DEFINE_string("name", "paper_comparison", "Names the summary "
                      "(<results_dir>/<name>_summary.json) and plots.",
                      flag_values=flag_values)
  flags.DEFINE_list("agents", list(config_lib.AGENTS), "Agents to compare.",
                    flag_values=flag_values)
  flags.DEFINE_list("seeds", ["1", "2", "3"], "Seeds, comma separated.",
                    flag_values=flag_values)
  flags.DEFINE_string("env_kwargs_grid", "", "Task settings separated by "
                      "';', each key=value,key=value environment kwargs.",
                      flag_values=flag_values)
  flags.DEFINE_string("knobs_grid", "", "Run flags to vary, separated by "
                      "';', each flag=value1,value2,...",
                      flag_values=flag_values)
  flags.DEFINE_string("grid_dir", "", "Run directories (default: "
                      "runs/<name>).", flag_values=flag_values)
  flags.DEFINE_string("results_dir", RESULTS_DIR, "Summary JSON and plots.",
                      flag_values=flag_values)
  flags.DEFINE_float("threshold", 0.9, "A run reaches it at its first "
                     "metrics row with --threshold_metric >= this.",
                     flag_values=flag_values)
  flags.DEFINE_enum("threshold_metric", metrics_lib.SUCCESS_RATE,
                    list(THRESHOLD_METRICS), "Metric the threshold applies "
                    "to.", flag_values=flag_values)
  flags.DEFINE_bool("dry_run", False, "List the runs and their state, then "
                    "exit.", flag_values=flag_values)
  flags.DEFINE_bool("aggregate_only", False, "Start no run: write the summary "
                    "and plots from the run directories as they are (a grid "
                    "run elsewhere and copied back; unfinished runs are "
                    "listed as such).", flag_values=flag_values)
  flags.DEFINE_string("ran_on", "", "With --aggregate_only: where the runs "
                      "ran (recorded as `ran_on` in the summary).",
                      flag_values=flag_values)
  train_lib.define_flags(flag_values)


def _train_flags_given(flag_values: flags.FlagValues) -> list[str]:
  """The run flags given on the command line (--env is the grid's)."""
  return [flag_values[f.name].serialize() for f in train_lib.FLAG_TABLE
          if flag_values[f.name].present and f.name != "env"]


def main(argv) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  fv = flags.FLAGS
  grid_dir = fv.grid_dir or os.path.join("runs", fv.name)
  grid = dict(agents=fv.agents, seeds=fv.seeds, env=fv.env,
              env_kwargs_grid=fv.env_kwargs_grid, knobs_grid=fv.knobs_grid,
              train_flags=_train_flags_given(fv), grid_dir=grid_dir)
  try:
    if fv.dry_run:
      for run in plan_grid(**grid):
        print(f"{run_status(run):8s} {run.run_dir}")
      return 0
    if fv.ran_on and not fv.aggregate_only:
      raise GridError("--ran_on: only with --aggregate_only (a grid this "
                      "command runs is recorded with this machine)")
    if fv.aggregate_only:
      summary, plot_paths = aggregate(
          plan_grid(**grid), name=fv.name, results_dir=fv.results_dir,
          threshold=fv.threshold, threshold_metric=fv.threshold_metric,
          grid=grid_record(**grid), command=_this_command(),
          ran_on=fv.ran_on)
      print(f"{len(summary['runs'])} finished, {len(summary['unfinished'])} "
            f"unfinished\nsummary: "
            f"{os.path.join(fv.results_dir, fv.name + '_summary.json')}\n"
            f"plots: {', '.join(plot_paths)}")
      return 0
    train_lib.configure_logging()
    import jax  # pylint: disable=import-outside-toplevel
    # Seeds and resumed segments of one config compile once.
    jax.config.update("jax_compilation_cache_dir",
                      os.path.join(os.path.abspath(grid_dir), "xla_cache"))
    result = run_grid(name=fv.name, results_dir=fv.results_dir,
                      threshold=fv.threshold,
                      threshold_metric=fv.threshold_metric, **grid)
  except GridError as error:
    print(f"error: {error}", file=sys.stderr)
    return 2
  if result.interrupted:
    return train_lib.exit_status(result.interrupted)
  return 1 if result.failed else 0


if __name__ == "__main__":
  define_flags()
  app.run(main)
