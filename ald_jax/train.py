"""Command line and Python entry point of an ALD run.

    python -m ald_jax.train --agent=ald --env=imaze --total_env_steps=200000

From Python, `ald_jax.train(config, env_factory=None)` (this module is
callable) runs a `TrainConfig` with any `(seed) -> dm_env.Environment`
factory, e.g. from `ald_jax.envs.registry` or the gymnasium adapter.

Every flag maps to one config field; flags are validated into a
`TrainConfig` before anything starts, and a bad value fails with the flag's
name.
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
    _Flag("lstm_hidden_size", "learner.lstm.hidden_size", "int",
          "LSTM hidden size (the actor)."),
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
          "checkpoints, plots); default runs/<agent>_<env>_<UTC time>."),
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
          "threads: actor threads in this process; processes: Ray actor "
          "processes (pip install 'ald_jax[ray]').", config_lib.ACTOR_MODES),
    _Flag("ray_address", "ray_address", "str",
          "With --actors=processes: HOST:PORT of a running Ray cluster to "
          "join (empty: start a local Ray for this run)."),
    _Flag("actor_stall_s", "actor_stall_s", "float",
          "An actor with no progress for this long is stalled: the run stops "
          "naming it (threads) or restarts it (processes); 0: off."),
    _Flag("max_actor_restarts", "max_actor_restarts", "int",
          "Process mode: actor restarts (death, stall) before the run fails."),
    _Flag("threads_per_actor_process", "threads_per_actor_process", "int",
          "Process mode: actor threads per Ray actor process, each pinned to "
          "its own core; the process takes this many of Ray's CPUs "
          "(must divide --num_actors)."),
    _Flag("nonfinite_obs", "nonfinite_obs", "enum",
          "A NaN/inf observation: error stops the run naming the env and "
          "step; mask zeroes it and counts it.",
          config_lib.NONFINITE_OBS_POLICIES),
    _Flag("eval_interval_s", "eval_interval_s", "float",
          "Seconds between evaluations of the learner acting alone and of "
          "the actor (eval/learner_return, eval/actor_return, "
          "eval/gap_return); CPU episodes in their own thread; 0: off."),
    _Flag("eval_episodes", "eval_episodes", "int",
          "Episodes per evaluated policy and evaluation."),
    _Flag("eval_greedy", "eval_greedy", "bool",
          "Evaluate with argmax actions instead of sampled ones."),
)
_BY_PATH = {f.path: f for f in FLAG_TABLE}
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


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """Defines every run flag (idempotent per FlagValues)."""
  for flag in FLAG_TABLE:
    if flag.name in flag_values:
      continue
    default = _default(flag)
    if flag.kind == "enum":
      flags.DEFINE_enum(flag.name, default, list(flag.choices), flag.help,
                        flag_values=flag_values)
    elif flag.kind == "bool":
      flags.DEFINE_bool(flag.name, default, flag.help, flag_values=flag_values)
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


def main(argv) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    config = config_from_flags()
  except app.UsageError as error:
    # Just the cause (absl would print the whole flag list above it).
    print(f"error: {error}\n(python -m ald_jax.train --helpfull lists the "
          "flags)", file=sys.stderr)
    return 2
  configure_logging()
  from ald_jax.system import run  # pylint: disable=import-outside-toplevel
  from ald_jax.system import timing  # pylint: disable=import-outside-toplevel
  from ald_jax.system import errors  # pylint: disable=import-outside-toplevel
  try:
    result = run.train(config, flag_paths=FLAG_PATHS)
  except (config_lib.ConfigError, ValueError, timing.TActorBudgetError) as error:
    # Bad input found before any actor started (environment kwargs, specs,
    # an existing run directory ...).
    print(f"error: {error}", file=sys.stderr)
    return 2
  except errors.RunError as error:
    # Known failures print their cause only; an unexpected exception (e.g. a
    # bug in an environment) also gets its traceback.
    print(f"run failed: {error}", file=sys.stderr)
    if error.cause_traceback:
      print(error.cause_traceback, file=sys.stderr)
    _plot(os.path.abspath(config.logdir), config.tensorboard)
    return 1
  _plot(result.run_dir, config.tensorboard)
  if result.stuck_actors:
    print(f"actors still running at exit: {', '.join(result.stuck_actors)}",
          file=sys.stderr)
  print(f"run directory: {result.run_dir} (stopped by {result.stopped_by})")
  return exit_status(result.stopped_by)


def run_cli() -> None:
  define_flags()
  app.run(main)


class _CallableModule(pytypes.ModuleType):
  """Lets `ald_jax.train(config)` call the entry point while `python -m
  ald_jax.train` still runs this module as the CLI."""

  def __call__(self, config, env_factory=None):
    return train(config, env_factory)


sys.modules[__name__].__class__ = _CallableModule

if __name__ == "__main__":
  run_cli()
