"""Command line and Python entry point of an ALD run.

    python -m ald_jax.train --agent=ald --env=imaze --total_env_steps=200000
    ald-train --help            # the same command, installed by pip

From Python, `ald_jax.train(config, env_factory=None)` (this module is
callable) runs a `TrainConfig` with any `(seed) -> dm_env.Environment`
factory, e.g. from `ald_jax.envs.registry` or the gymnasium adapter.
`run_cli()` is the command line itself: a script that registers its own
environment and then calls it puts that environment behind the flags.

Every flag maps to one config field; flags are validated into a
`TrainConfig` before anything starts, and a bad value fails with the flag's
name. `--help` lists the flags by topic (`FLAG_TOPICS`); `cli_reference()`
renders the same text as docs/cli.md.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import logging as std_logging
import os
import signal
import sys
import types as pytypes
from typing import Any, Callable, NamedTuple, Sequence

from absl import app
from absl import flags
from absl import logging

from ald_jax import config as config_lib
from ald_jax.system import run_dir as run_dir_lib


class _Flag(NamedTuple):
  name: str        # the command-line flag
  path: str        # dotted TrainConfig field
  kind: str        # int, float, bool, str, ints, enum
  help: str
  choices: tuple[str, ...] = ()


_DEFAULT = config_lib.TrainConfig()

# One table: flag <-> config field. Defaults come from the config dataclasses.
FLAG_TABLE = (
    _Flag("env", "env", "str", "Environment name from the registry."),
    _Flag("env_kwargs", "env_kwargs", "str",
          'Environment keyword arguments as JSON, e.g. \'{"corridor_length": 8}\'.'),
    _Flag("agent", "learner.agent", "enum",
          "ald: GTrXL learns, LSTM acts; lstm: LSTM learns and acts; "
          "transformer: GTrXL learns and acts; asymmetric: LSTM policy with a "
          "GTrXL critic.", config_lib.AGENTS),
    _Flag("rl_loss", "learner.rl_loss", "enum", "The learner's RL loss.",
          config_lib.RL_LOSSES),
    _Flag("discount", "learner.discount", "float", "Discount gamma."),
    _Flag("unroll_length", "learner.unroll_length", "int",
          "T: steps per unroll covered by the losses."),
    _Flag("learner_context", "learner.learner_context", "int",
          "C: earlier steps of the stream given to the transformer as memory."),
    _Flag("batch_size", "learner.batch_size", "int", "Unrolls per learner batch."),
    _Flag("torso_mlp_sizes", "learner.torso.mlp_sizes", "ints",
          "Torso MLP sizes, comma separated."),
    _Flag("torso_conv_channels", "learner.torso.conv_channels", "ints",
          "Torso conv channels for grid observations, comma separated."),
    _Flag("lstm_hidden_size", "learner.lstm.hidden_size", "int_or_auto",
          "LSTM hidden size (the actor); auto: the largest of 32, 64, 128, "
          "256, 512 whose calibrated acting p99 fits --t_actor_budget_ms "
          "(recorded in config.json; a resume keeps the stored width)."),
    _Flag("lstm_forget_bias", "learner.lstm.forget_bias", "float",
          "Initial LSTM forget-gate bias (long memories need a larger one)."),
    _Flag("gtrxl_num_layers", "learner.gtrxl.num_layers", "int", "GTrXL blocks."),
    _Flag("gtrxl_d_model", "learner.gtrxl.d_model", "int", "GTrXL width."),
    _Flag("gtrxl_num_heads", "learner.gtrxl.num_heads", "int",
          "GTrXL attention heads."),
    _Flag("gtrxl_mlp_size", "learner.gtrxl.mlp_size", "int",
          "GTrXL position-wise MLP size."),
    _Flag("gtrxl_memory_length", "learner.gtrxl.memory_length", "int",
          "GTrXL attention span / acting K-V cache length."),
    _Flag("vmpo_top_k_fraction", "learner.vmpo.top_k_fraction", "float",
          "V-MPO: fraction of advantages kept by the E-step."),
    _Flag("vmpo_epsilon_eta", "learner.vmpo.epsilon_eta", "float",
          "V-MPO: temperature constraint."),
    _Flag("vmpo_epsilon_alpha", "learner.vmpo.epsilon_alpha", "float",
          "V-MPO: KL trust-region bound."),
    _Flag("vmpo_target_update_period", "learner.vmpo.target_update_period",
          "int", "V-MPO: learner steps between target refreshes."),
    _Flag("vtrace_entropy_cost", "learner.vtrace.entropy_cost", "float",
          "V-trace: entropy bonus."),
    _Flag("vtrace_baseline_cost", "learner.vtrace.baseline_cost", "float",
          "V-trace: value loss weight."),
    _Flag("distill_policy_cost", "learner.distill.policy_cost", "float",
          "alpha_pi: weight of KL(sg[pi_L] || pi_A)."),
    _Flag("distill_value_cost", "learner.distill.value_cost", "float",
          "alpha_V: weight of 1/2 (sg[V_L] - V_A)^2."),
    _Flag("learner_pull_cost", "learner.distill.learner_pull_cost", "float",
          "beta: weight of KL(sg[pi_A] || pi_L) on the learner."),
    _Flag("learner_lr", "learner.learner_optimizer.learning_rate", "float",
          "Learner Adam learning rate."),
    _Flag("actor_lr", "learner.actor_optimizer.learning_rate", "float",
          "Actor (distillation) Adam learning rate."),
    _Flag("max_grad_norm", "learner.learner_optimizer.max_grad_norm", "float",
          "Global gradient-norm clip (learner and actor)."),
    _Flag("learner_memory", "learner.learner_memory", "enum",
          "How the transformer reads history: cached (Transformer-XL segment "
          "memory per stream) or recompute (re-read the C context steps).",
          config_lib.LEARNER_MEMORIES),
    _Flag("actor_context", "learner.actor_context", "int",
          "How far back the actor can learn to remember: context steps each "
          "row's LSTM is trained through (default: all of learner_context)."),
    _Flag("distill_teacher", "learner.distill.teacher", "enum",
          "Distill-only steps: teacher outputs stored with the replayed rows "
          "(LSTM only) or recomputed by the current GTrXL.",
          config_lib.TEACHERS),
    _Flag("distill_step_weighting", "learner.distill.step_weighting", "enum",
          "Per-step weights of the distillation terms.",
          config_lib.STEP_WEIGHTINGS),
    _Flag("vmpo_dual_lr", "learner.vmpo.dual_learning_rate", "float",
          "V-MPO: learning rate of the duals' own Adam (eta, alpha)."),
    _Flag("vmpo_init_eta", "learner.vmpo.init_eta", "float",
          "V-MPO: initial temperature eta."),
    _Flag("vmpo_init_alpha", "learner.vmpo.init_alpha", "float",
          "V-MPO: initial KL multiplier alpha."),
    _Flag("num_actors", "num_actors", "int",
          "Actor threads (with --actors=processes: in all processes)."),
    _Flag("envs_per_actor", "envs_per_actor", "int",
          "E: environments stepped together by one actor thread."),
    _Flag("total_env_steps", "total_env_steps", "int",
          "Stop after this many environment steps."),
    _Flag("distill_steps_per_rl_step", "distill_steps_per_rl_step", "float",
          "Extra distill-only actor steps per RL step (0, 0.5, 1, 4, ...); "
          "default 4 for ald, 0 otherwise."),
    _Flag("replay_capacity", "replay_capacity", "int",
          "Unroll rows kept for distill-only steps."),
    _Flag("queue_capacity", "queue_capacity", "int",
          "Unrolls in flight between actors and the learner (with "
          "--actors=processes: split over the actor threads, >= 1 each)."),
    _Flag("t_actor_budget_ms", "t_actor_budget_ms", "float",
          "Per-step acting latency budget T_actor, in ms."),
    _Flag("t_actor_policy", "t_actor_policy", "enum",
          "What calibration does when p99 exceeds the budget.",
          config_lib.T_ACTOR_POLICIES),
    _Flag("calibration_steps", "calibration_steps", "int",
          "Acting steps timed before the run to measure T_actor's p99."),
    _Flag("pin_learner", "pin_learner", "bool",
          "Confine the learner's threads to the cores actors do not use."),
    _Flag("seed", "seed", "int", "Random seed."),
    _Flag("logdir", "logdir", "str", "Run directory (config, metrics, "
          "checkpoints, plots); from Python, TrainConfig's default is "
          "runs/default."),
    _Flag("report_interval_s", "report_interval_s", "float",
          "Seconds between progress lines / metric rows."),
    _Flag("checkpoint_interval_s", "checkpoint_interval_s", "float",
          "Seconds between checkpoints."),
    _Flag("keep_checkpoints", "keep_checkpoints", "int",
          "Checkpoints kept (the newest)."),
    _Flag("resume", "resume", "bool", "Continue from the newest checkpoint "
          "in --logdir."),
    _Flag("resume_allow_change", "resume_allow_change", "str",
          "With --resume: comma-separated flags or config fields allowed to "
          "differ from the stored config (e.g. total_env_steps)."),
    _Flag("tensorboard", "tensorboard", "bool",
          "Write TensorBoard scalars (every metrics row) and the end-of-run "
          "curves image into the run directory (when tensorboardX is "
          "installed: pip install 'ald_jax[tensorboard]')."),
    _Flag("max_consecutive_nonfinite", "max_consecutive_nonfinite", "int",
          "Stop after this many NaN/inf updates in a row (each is skipped)."),
    _Flag("max_wall_time_s", "max_wall_time_s", "float",
          "Stop after this many seconds (0: no limit)."),
    _Flag("actors", "actors", "enum",
          "threads: actor threads in this process; processes: actor "
          "processes on this host (standard library, no Ray); ray: Ray actor "
          "processes, local or on a cluster (pip install 'ald_jax[ray]').",
          config_lib.ACTOR_MODES),
    _Flag("ray_address", "ray_address", "str",
          "With --actors=ray: HOST:PORT of a running Ray cluster to "
          "join (empty: start a local Ray for this run)."),
    _Flag("actor_stall_s", "actor_stall_s", "float",
          "An actor with no progress for this long is stalled: the run stops "
          "naming it (threads) or restarts it (processes); 0: off."),
    _Flag("max_actor_restarts", "max_actor_restarts", "int",
          "Process mode: actor restarts (death, stall) before the run fails."),
    _Flag("threads_per_actor_process", "threads_per_actor_process", "int",
          "Process mode (processes, ray): actor threads per actor process, "
          "each pinned to its own core; a Ray process takes this many of "
          "Ray's CPUs (must divide --num_actors)."),
    _Flag("nonfinite_obs", "nonfinite_obs", "enum",
          "A NaN/inf observation: error stops the run naming the env and "
          "step; mask zeroes it and counts it.",
          config_lib.NONFINITE_OBS_POLICIES),
    _Flag("publish_every_steps", "publish_every_steps", "int",
          "Hand actors new parameters every this many learner steps."),
    _Flag("publish_interval_s", "publish_interval_s", "float",
          "... and at most once per this many seconds (0: every time)."),
    _Flag("compilation_cache", "compilation_cache", "bool",
          "Keep compiled XLA programs on disk (JAX's persistent cache): a "
          "second run or a --resume with the same shapes starts in seconds."),
    _Flag("compilation_cache_dir", "compilation_cache_dir", "str",
          "Where: empty for $ALD_JAX_CACHE_DIR, else ~/.cache/ald_jax/xla."),
    _Flag("eval_interval_s", "eval_interval_s", "float",
          "Seconds between evaluations of the learner acting alone and of "
          "the actor (eval/learner_return, eval/actor_return, "
          "eval/gap_return); CPU episodes in their own thread; 0: off."),
    _Flag("eval_episodes", "eval_episodes", "int",
          "Episodes per evaluated policy and evaluation."),
    _Flag("eval_greedy", "eval_greedy", "bool",
          "Evaluate with argmax actions instead of sampled ones."),
)
# --help's sections, in order: (title, what the flags are for, flag names).
# Every FLAG_TABLE flag belongs to one (a test checks).
FLAG_TOPICS = (
    ("Run", "What to run, for how long, and where its outputs go.",
     ("env", "env_kwargs", "total_env_steps", "max_wall_time_s", "seed",
      "logdir", "report_interval_s", "tensorboard", "checkpoint_interval_s",
      "keep_checkpoints", "resume", "resume_allow_change")),
    ("Agent and sizes", "Which agent learns and acts, and the networks' "
     "sizes.",
     ("agent", "unroll_length", "learner_context", "actor_context",
      "batch_size", "learner_memory", "torso_mlp_sizes",
      "torso_conv_channels", "lstm_hidden_size", "lstm_forget_bias",
      "gtrxl_num_layers", "gtrxl_d_model", "gtrxl_num_heads",
      "gtrxl_mlp_size", "gtrxl_memory_length")),
    ("Learner", "The learner's RL loss and optimiser.",
     ("rl_loss", "discount", "learner_lr", "max_grad_norm",
      "vmpo_top_k_fraction", "vmpo_epsilon_eta", "vmpo_epsilon_alpha",
      "vmpo_target_update_period", "vmpo_dual_lr", "vmpo_init_eta",
      "vmpo_init_alpha", "vtrace_entropy_cost", "vtrace_baseline_cost")),
    ("Distillation", "How the learner is distilled into the actor.",
     ("distill_policy_cost", "distill_value_cost", "learner_pull_cost",
      "actor_lr", "distill_teacher", "distill_step_weighting",
      "distill_steps_per_rl_step", "replay_capacity")),
    ("Actors and system", "Where the actors run and the acting latency "
     "budget T_actor.",
     ("actors", "num_actors", "envs_per_actor", "queue_capacity",
      "t_actor_budget_ms", "t_actor_policy", "calibration_steps",
      "pin_learner", "ray_address", "threads_per_actor_process",
      "publish_every_steps", "publish_interval_s", "compilation_cache",
      "compilation_cache_dir")),
    ("Evaluation", "The learner-actor gap: both policies evaluated on their "
     "own episodes.",
     ("eval_interval_s", "eval_episodes", "eval_greedy")),
    ("Faults", "What a failing actor, environment or update does to the "
     "run.",
     ("max_consecutive_nonfinite", "nonfinite_obs", "actor_stall_s",
      "max_actor_restarts")),
)

# Flags of the command itself (not config fields).
COMMAND_FLAGS = (
    ("print_config", "Print the resolved, validated config as JSON and exit "
     "0 without training."),
    ("only_check_args", "Validate the flags and the config they make, then "
     "exit (0: valid, 2: not) without training."),
    ("help", "List the flags by topic (this text) and exit 0."),
    ("helpfull", "Also list absl's own flags (logging, debugging)."),
)

# Exit status of the command line.
EXIT_OK = 0           # reached its budget or wall-time limit; --help
EXIT_RUN_FAILED = 1   # an actor, environment or update failed mid-run
EXIT_BAD_INPUT = 2    # bad flags or config, found before any work
EXIT_CODES = (
    (EXIT_OK, "the run reached --total_env_steps or --max_wall_time_s "
     "(also --help, --print_config, a valid --only_check_args)"),
    (EXIT_RUN_FAILED, "the run failed after it started (an actor or "
     "environment error, a stalled actor, non-finite updates); the message "
     "names the cause, the final checkpoint is kept"),
    (EXIT_BAD_INPUT, "bad input, found before any work: an unknown flag, a "
     "bad value, a stray argument, an invalid config, an environment that "
     "fails to build, an impossible T_actor budget, a refused --resume"),
    ("128+N", "stopped by signal N (SIGINT: 130, SIGTERM: 143) after the "
     "final checkpoint"),
)
_BY_PATH = {f.path: f for f in FLAG_TABLE}
AUTO_WIDTH = "auto"   # --lstm_hidden_size=auto (system/actor_sizing.py)
# Flag name -> config path: `resume_allow_change` accepts flag names.
FLAG_PATHS = {f.name: f.path for f in FLAG_TABLE}


def get_path(obj: Any, path: str) -> Any:
  """The value at a dotted config path, e.g. `get_path(config,
  "learner.lstm.hidden_size")` (a flag's `FLAG_TABLE` path)."""
  for part in path.split("."):
    obj = getattr(obj, part)
  return obj


def _default(flag: _Flag) -> Any:
  if flag.name == "distill_steps_per_rl_step":
    return None  # resolved per agent
  if flag.name == "env_kwargs":
    return "{}"
  if flag.name == "resume_allow_change":
    return ""
  if flag.name == "logdir":
    return ""  # a fresh timestamped directory per run
  value = get_path(_DEFAULT, flag.path)
  if flag.kind == "ints":
    return ",".join(str(v) for v in value)
  return value


def _shown_default(flag: _Flag) -> str:
  if flag.name == "distill_steps_per_rl_step":
    return "4 for ald, 0 otherwise"
  if flag.name == "logdir":
    return "runs/<agent>_<env>_<UTC time>"
  value = _default(flag)
  if flag.kind == "bool":
    return "true" if value else "false"
  return str(value) if value != "" else "(empty)"


def _topics() -> list[tuple[str, str, list[_Flag]]]:
  """FLAG_TOPICS with their flags; a flag no topic names lands in "Other"
  (so --help never hides one)."""
  by_name = {f.name: f for f in FLAG_TABLE}
  sections = [(title, about, [by_name[n] for n in names if n in by_name])
              for title, about, names in FLAG_TOPICS]
  grouped = {n for _, _, names in FLAG_TOPICS for n in names}
  other = [f for f in FLAG_TABLE if f.name not in grouped]
  if other:
    sections.append(("Other", "Flags without a topic.", other))
  return sections


def _wrap(text: str, indent: str, width: int = 79) -> str:
  import textwrap  # pylint: disable=import-outside-toplevel
  return textwrap.fill(text, width, initial_indent=indent,
                       subsequent_indent=indent)


def help_text(program: str = "python -m ald_jax.train") -> str:
  """`--help`: the flags by topic, with defaults, choices and exit codes."""
  lines = [f"usage: {program} [--flag=value ...]", "",
           "Trains an ALD agent (or a baseline) and writes a run directory "
           "(config, metrics, checkpoints, curves). Every flag sets one "
           "TrainConfig field; all are checked before any work starts.", ""]
  lines[2] = _wrap(lines[2], "")
  for title, about, topic_flags in _topics():
    lines += [f"{title}: {about}"]
    for flag in topic_flags:
      choices = f" {{{'|'.join(flag.choices)}}}" if flag.choices else ""
      lines.append(f"  --{flag.name}{choices} (default: "
                   f"{_shown_default(flag)})")
      lines.append(_wrap(flag.help, "      "))
    lines.append("")
  lines.append("Command:")
  for name, text in COMMAND_FLAGS:
    lines.append(f"  --{name}")
    lines.append(_wrap(text, "      "))
  lines += ["", "Exit status:"]
  for code, text in EXIT_CODES:
    lines.append(_wrap(f"{code}: {text}", "  "))
  return "\n".join(lines) + "\n"


def cli_reference() -> str:
  """docs/cli.md: the same flags, wording and exit codes as `--help`
  (scripts/make_cli_reference.py writes it; a test keeps it current)."""
  def cell(text: str) -> str:
    return text.replace("|", "\\|")
  lines = ["# Command-line reference", "",
           "<!-- Generated from ald_jax/train.py by "
           "scripts/make_cli_reference.py; do not edit. -->", "",
           "`python -m ald_jax.train` (installed as `ald-train`) trains an "
           "ALD agent or a baseline and writes a run directory. Every flag "
           "sets one `TrainConfig` field (the *field* column); all are "
           "checked before any work starts. `ald-train --help` prints the "
           "same text. A script that registers its own environment and "
           "then calls `ald_jax.train.run_cli()` puts it behind `--env`.",
           ""]
  for title, about, topic_flags in _topics():
    lines += [f"## {title}", "", about, "",
              "| flag | default | field | what it does |",
              "|---|---|---|---|"]
    for flag in topic_flags:
      choices = (" (" + ", ".join(f"`{c}`" for c in flag.choices) + ")"
                 if flag.choices else "")
      lines.append(f"| `--{flag.name}` | `{cell(_shown_default(flag))}` | "
                   f"`{flag.path}` | {cell(flag.help)}{choices} |")
    lines.append("")
  lines += ["## Command", "", "| flag | what it does |", "|---|---|"]
  lines += [f"| `--{name}` | {cell(text)} |" for name, text in COMMAND_FLAGS]
  lines += ["", "## Exit status", "", "| status | when |", "|---|---|"]
  lines += [f"| {code} | {cell(text)} |" for code, text in EXIT_CODES]
  return "\n".join(lines) + "\n"


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """Defines every run flag (idempotent per FlagValues)."""
  if "print_config" not in flag_values:
    flags.DEFINE_bool("print_config", False, COMMAND_FLAGS[0][1],
                      flag_values=flag_values)
  for flag in FLAG_TABLE:
    if flag.name in flag_values:
      continue
    default = _default(flag)
    if flag.kind == "enum":
      flags.DEFINE_enum(flag.name, default, list(flag.choices), flag.help,
                        flag_values=flag_values)
    elif flag.kind == "bool":
      flags.DEFINE_bool(flag.name, default, flag.help, flag_values=flag_values)
    elif flag.kind == "int_or_auto":
      flags.DEFINE_string(flag.name, str(default), flag.help,
                          flag_values=flag_values)
    elif flag.kind == "float" and default is None:
      flags.DEFINE_float(flag.name, None, flag.help, flag_values=flag_values)
    else:
      define = {"int": flags.DEFINE_integer, "float": flags.DEFINE_float,
                "str": flags.DEFINE_string, "ints": flags.DEFINE_string}
      define[flag.kind](flag.name, default, flag.help, flag_values=flag_values)


def _set_path(tree: dict, path: str, value: Any) -> None:
  parts = path.split(".")
  for part in parts[:-1]:
    tree = tree.setdefault(part, {})
  tree[parts[-1]] = value


def _parse_value(flag: _Flag, raw: Any) -> Any:
  if flag.kind == "ints":
    try:
      return tuple(int(v) for v in str(raw).split(",") if v.strip())
    except ValueError:
      raise config_lib.ConfigError(
          f"{flag.path}: expected comma-separated integers, got {raw!r}"
      ) from None
  if flag.kind == "int_or_auto":
    if str(raw).strip() == AUTO_WIDTH:
      return AUTO_WIDTH
    try:
      return int(raw)
    except ValueError:
      raise config_lib.ConfigError(
          f"{flag.path}: expected an integer or {AUTO_WIDTH!r}, got {raw!r}"
      ) from None
  if flag.name == "resume_allow_change":
    names = [name.strip() for name in str(raw).split(",") if name.strip()]
    return run_dir_lib.resolve_allow_names(names, FLAG_PATHS)
  if flag.name == "env_kwargs":
    try:
      kwargs = json.loads(raw) if raw else {}
    except json.JSONDecodeError as error:
      raise config_lib.ConfigError(
          f"env_kwargs: not valid JSON ({error}): {raw!r}") from None
    if not isinstance(kwargs, dict):
      raise config_lib.ConfigError(
          f"env_kwargs: must be a JSON object, got {raw!r}")
    return tuple(sorted(kwargs.items()))
  return raw


def _in_section(message: str, section: str) -> str:
  """'learning_rate: ...' raised inside section 'learner.actor_optimizer'
  -> 'learner.actor_optimizer.learning_rate: ...' when one flag's path
  fits (a nested config names only its own field)."""
  field, _, rest = message.partition(": ")
  leaf = field.rsplit(".", 1)[-1]
  paths = [path for path in _BY_PATH
           if path.startswith(section + ".") and path.endswith("." + leaf)]
  return f"{paths[0]}: {rest}" if len(paths) == 1 else message


def _build(cls, values: dict, section: str = "") -> Any:
  """Builds a (nested) config dataclass from a dict of overrides."""
  kwargs = {}
  for field in dataclasses.fields(cls):
    if field.name not in values:
      continue
    value = values[field.name]
    if isinstance(value, dict):
      path = f"{section}.{field.name}" if section else field.name
      try:  # every nested field has a default
        value = _build(type(field.default), value, path)
      except config_lib.ConfigError as error:
        raise config_lib.ConfigError(_in_section(str(error), path)) from None
    kwargs[field.name] = value
  return cls(**kwargs)


def config_from_flags(flag_values: flags.FlagValues = flags.FLAGS
                      ) -> config_lib.TrainConfig:
  """Validates the parsed flags into a TrainConfig.

  Raises app.UsageError naming the flag for any invalid value.
  """
  values: dict = {}
  try:
    for flag in FLAG_TABLE:
      raw = flag_values[flag.name].value
      if raw is None:
        continue
      _set_path(values, flag.path, _parse_value(flag, raw))
    # "auto" is resolved before the run (`auto_width_requested`); the
    # config holds the default width until then.
    lstm = values["learner"].get("lstm", {})
    if lstm.get("hidden_size") == AUTO_WIDTH:
      del lstm["hidden_size"]
    # The actor optimizer clips like the learner's.
    clip = values["learner"]["learner_optimizer"]["max_grad_norm"]
    values["learner"].setdefault("actor_optimizer", {})["max_grad_norm"] = clip
    if not values.get("logdir"):
      if values.get("resume"):
        raise config_lib.ConfigError(
            "resume: needs --logdir, the run directory to continue (without "
            "it a new, timestamped directory is made: nothing to resume)")
      stamp = datetime.datetime.now(datetime.timezone.utc).strftime(
          "%Y%m%d-%H%M%S")
      values["logdir"] = os.path.join(
          "runs", f"{values['learner']['agent']}_{values['env']}_{stamp}")
    return _build(config_lib.TrainConfig, values)
  except config_lib.ConfigError as error:
    raise app.UsageError(_name_flag(str(error))) from None


def auto_width_requested(flag_values: flags.FlagValues = flags.FLAGS
                         ) -> bool:
  """--lstm_hidden_size=auto: `config_from_flags` then holds the default
  width, which `system/actor_sizing.resolve_auto_width` replaces."""
  if "lstm_hidden_size" not in flag_values:   # flags not defined here
    return False
  return str(flag_values["lstm_hidden_size"].value).strip() == AUTO_WIDTH


def config_from_argv(argv: Sequence[str]) -> config_lib.TrainConfig:
  """A TrainConfig from run flags, e.g. `["--agent=lstm", "--seed=2"]`.

  The flags are parsed into their own FlagValues (the global FLAGS are left
  alone), so a program can build many configs. Raises app.UsageError naming
  the flag for an unknown flag, a bad value or a positional argument.
  """
  if isinstance(argv, str):
    raise TypeError(f"argv must be a sequence of flags, got the string {argv!r}")
  flag_values = flags.FlagValues()
  define_flags(flag_values)
  try:
    rest = flag_values(["ald_jax.train", *argv])
  except flags.Error as error:
    raise app.UsageError(str(error)) from None
  if len(rest) > 1:
    raise app.UsageError(f"unexpected arguments: {rest[1:]}")
  if auto_width_requested(flag_values):
    # A TrainConfig holds a width; silently keeping the default would be
    # worse than saying so.
    raise app.UsageError(
        "--lstm_hidden_size=auto is resolved before a run by the CLI; from "
        "Python use ald_jax.system.actor_sizing.resolve_auto_width(config)")
  return config_from_flags(flag_values)


def _name_flag(message: str) -> str:
  """Rewrites 'learner.gtrxl.num_layers: ...' as '--gtrxl_num_layers: ...'."""
  field, _, rest = message.partition(": ")
  for path, flag in _BY_PATH.items():
    if path == field or path.endswith("." + field):
      return f"--{flag.name}: {rest}"
  return message


def train(config: config_lib.TrainConfig, env_factory: Callable | None = None):
  """Runs `config`; see `ald_jax.system.run.train`."""
  from ald_jax.system import run  # pylint: disable=import-outside-toplevel
  return run.train(config, env_factory, flag_paths=FLAG_PATHS)


class _QuietLibraries(std_logging.Filter):
  """Keeps orbax's per-save INFO lines out of the progress output."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return (record.levelno >= std_logging.WARNING
            or "orbax" not in record.pathname)


def configure_logging() -> None:
  """INFO progress logging, without orbax's per-save lines (the CLI's)."""
  logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().addFilter(_QuietLibraries())


def exit_status(stopped_by: str) -> int:
  """0 when the run reached its budget (or wall-time limit); 128 + signal
  number after a signal stop, like a shell reports a signalled process."""
  if stopped_by.startswith("signal:"):
    return 128 + signal.Signals[stopped_by.split(":", 1)[1]].value
  return 0


def _plot(run_dir: str, tensorboard: bool) -> None:
  """Draws <run_dir>/curves.png and, with `tensorboard` (`--tensorboard`)
  and tensorboardX installed, adds it to the run's TensorBoard images (the
  run's metrics writer is closed by now: the image gets its own event file).
  A failure is logged, never raised."""
  from ald_jax import metrics  # pylint: disable=import-outside-toplevel
  from ald_jax import plot  # pylint: disable=import-outside-toplevel
  try:
    if not os.path.exists(os.path.join(run_dir, metrics.JSONL_NAME)):
      return
    png = os.path.join(run_dir, plot.DEFAULT_NAME)
    plot.plot_runs([run_dir], png)
    if tensorboard and metrics.tensorboard_available():
      metrics.write_tensorboard_image(run_dir, "curves", png)
  except Exception:  # pylint: disable=broad-except
    logging.exception("plotting %s failed", run_dir)


def _bad_input(message: str) -> int:
  """One line (or the message's own lines) on stderr, never the whole flag
  list; returns EXIT_BAD_INPUT."""
  print(f"error: {message}\n(--help lists the flags)", file=sys.stderr)
  return EXIT_BAD_INPUT


def config_json(config: config_lib.TrainConfig) -> str:
  """`--print_config`: the config as JSON (tuples as lists)."""
  return json.dumps(dataclasses.asdict(config), indent=2, sort_keys=True)


def _parse_flags(argv: Sequence[str]) -> list[str]:
  """absl's flags_parser: a bad flag exits EXIT_BAD_INPUT with one line (absl
  would exit 1); `--only_check_args` also validates the config."""
  try:
    rest = flags.FLAGS(list(argv))
  except flags.Error as error:
    sys.exit(_bad_input(str(error)))
  if len(rest) > 1:
    sys.exit(_bad_input(f"unexpected arguments: {' '.join(rest[1:])} "
                        "(flags are --name=value)"))
  if flags.FLAGS["only_check_args"].value:
    try:
      config_from_flags()
    except app.UsageError as error:
      sys.exit(_bad_input(str(error)))
  return rest


def main(argv) -> int:
  if len(argv) > 1:
    return _bad_input(f"unexpected arguments: {' '.join(argv[1:])}")
  try:
    config = config_from_flags()
  except app.UsageError as error:
    return _bad_input(str(error))
  if "print_config" in flags.FLAGS and flags.FLAGS["print_config"].value:
    print(config_json(config))
    return EXIT_OK
  configure_logging()
  from ald_jax.system import run  # pylint: disable=import-outside-toplevel
  from ald_jax.system import timing  # pylint: disable=import-outside-toplevel
  from ald_jax.system import errors  # pylint: disable=import-outside-toplevel
  try:
    sized = {}
    if auto_width_requested():
      from ald_jax.system import actor_sizing  # pylint: disable=import-outside-toplevel
      config, sized["actor_sizing"] = actor_sizing.resolve_auto_width(config)
    result = run.train(config, flag_paths=FLAG_PATHS, **sized)
  except (config_lib.ConfigError, ValueError, timing.TActorBudgetError) as error:
    # Bad input found before any actor started (environment kwargs, specs,
    # an existing run directory, a refused resume ...).
    print(f"error: {error}", file=sys.stderr)
    return EXIT_BAD_INPUT
  except errors.RunError as error:
    # Known failures print their cause only; an unexpected exception (e.g. a
    # bug in an environment) also gets its traceback.
    print(f"run failed: {error}", file=sys.stderr)
    if error.cause_traceback:
      print(error.cause_traceback, file=sys.stderr)
    _plot(os.path.abspath(config.logdir), config.tensorboard)
    return EXIT_RUN_FAILED
  _plot(result.run_dir, config.tensorboard)
  if result.stuck_actors:
    print(f"actors still running at exit: {', '.join(result.stuck_actors)}",
          file=sys.stderr)
  print(f"run directory: {result.run_dir} (stopped by {result.stopped_by})")
  return exit_status(result.stopped_by)


_HELP_ARGS = ("--help", "-help", "--helpshort", "-helpshort", "-h", "-?",
              "--help=true", "--helpshort=true")


def run_cli(argv: Sequence[str] | None = None) -> None:
  """The command line (`ald-train`, `python -m ald_jax.train`); exits with
  an `EXIT_CODES` status. `argv` defaults to sys.argv."""
  argv = list(sys.argv if argv is None else argv)
  define_flags()
  if any(arg in _HELP_ARGS for arg in argv[1:]):
    program = os.path.basename(argv[0]) if argv else "ald-train"
    if program in ("train.py", "__main__.py", "-c", ""):
      program = "python -m ald_jax.train"
    sys.stdout.write(help_text(program))
    sys.exit(EXIT_OK)
  app.run(main, argv=argv, flags_parser=_parse_flags)


class _CallableModule(pytypes.ModuleType):
  """Lets `ald_jax.train(config)` call the entry point while `python -m
  ald_jax.train` still runs this module as the CLI."""

  def __call__(self, config, env_factory=None):
    return train(config, env_factory)


sys.modules[__name__].__class__ = _CallableModule

if __name__ == "__main__":
  run_cli()
