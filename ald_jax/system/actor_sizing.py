"""The largest actor that fits the budget: `--lstm_hidden_size=auto`.

Before a run starts, `resolve_auto_width` calibrates the acting step at each
width of a ladder (32, 64, ... by default) exactly as the run calibrates its
actor (`system/actor.calibrate_core`: the lean jitted step, pinned to an
actor's cores, `calibration_steps` calls on the run's E environments) and
picks the largest width whose p99 is within `t_actor_budget_ms`. The ladder
is logged and returned as a record that `system/run.train(...,
actor_sizing=record)` writes into config.json. When even the smallest width
does not fit, `timing.TActorBudgetError` lists the ladder.

A resumed run (`resume=True` with a stored config.json) does not
recalibrate: the width is the stored config's, and so is the record.

`LSTMConfig.hidden_size` stays an integer; "auto" exists only on the command
line (train.py) and here.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Collection, Sequence

from absl import logging
import jax
import numpy as np

from ald_jax import config as config_lib
from ald_jax import learner as learner_lib
from ald_jax.networks import policy_value
from ald_jax.system import actor as actor_lib
from ald_jax.system import affinity
from ald_jax.system import run_dir as run_dir_lib
from ald_jax.system import timing

AUTO = "auto"
DEFAULT_LADDER = (32, 64, 128, 256, 512)
# Agents whose acting network is the LSTM that `lstm.hidden_size` sizes.
SIZABLE_AGENTS = ("ald", "lstm", "asymmetric")

# (config at one width, obs_shape, num_actions, cores) -> p99/p50 summary
Calibrate = Callable[[config_lib.TrainConfig, tuple[int, ...], int,
                      Collection[int] | None], timing.LatencySummary]


def with_width(config: config_lib.TrainConfig,
               hidden_size: int) -> config_lib.TrainConfig:
  lstm = dataclasses.replace(config.learner.lstm, hidden_size=hidden_size)
  return dataclasses.replace(
      config, learner=dataclasses.replace(config.learner, lstm=lstm))


def calibrate_width(config: config_lib.TrainConfig,
                    obs_shape: tuple[int, ...], num_actions: int,
                    cores: Collection[int] | None) -> timing.LatencySummary:
  """The run's own calibration of the acting step of `config`'s width (only
  the actor network is built and initialised, not the learner)."""
  lcfg = config.learner
  net = policy_value.LSTMPolicyValueNet(
      torso=lcfg.torso, lstm=lcfg.lstm, num_actions=num_actions,
      obs_ndim=len(obs_shape))
  with jax.default_device(jax.devices("cpu")[0]):
    params = net.init(jax.random.PRNGKey(config.seed),
                      np.zeros((1, 1, *obs_shape), np.float32),
                      np.zeros((1, 1), np.int32), net.initial_state(1))
  return actor_lib.calibrate_core(
      learner_lib.lstm_actor_core(net), params, obs_shape,
      config.envs_per_actor, budget_ms=None, num_calls=config.calibration_steps,
      cores=cores, seed=config.seed)


def _check_ladder(ladder: Sequence[int]) -> tuple[int, ...]:
  ladder = tuple(ladder)
  if not ladder or any(not isinstance(w, int) or isinstance(w, bool) or w <= 0
                       for w in ladder):
    raise config_lib.ConfigError(
        f"lstm.hidden_size ladder: must be positive integers, got {ladder!r}")
  return tuple(sorted(set(ladder)))


def choose_width(config: config_lib.TrainConfig,
                 obs_shape: Sequence[int], num_actions: int, *,
                 ladder: Sequence[int] = DEFAULT_LADDER,
                 calibrate: Calibrate = calibrate_width,
                 cores: Collection[int] | None = None) -> dict[str, Any]:
  """Calibrates every width of `ladder`; returns the record
  {"hidden_size", "budget_ms", "envs", "ladder": [{hidden_size, p50_us,
  p99_us, fits}]}. Raises TActorBudgetError when no width fits."""
  if config.learner.agent not in SIZABLE_AGENTS:
    raise config_lib.ConfigError(
        f"lstm.hidden_size: 'auto' sizes the acting LSTM; agent "
        f"{config.learner.agent!r} acts with its GTrXL")
  ladder = _check_ladder(ladder)
  obs_shape = tuple(int(d) for d in obs_shape)
  budget_ms = config.t_actor_budget_ms
  rungs = []
  for width in ladder:
    summary = calibrate(with_width(config, width), obs_shape, num_actions,
                        cores)
    fits = bool(summary.p99_us / 1e3 <= budget_ms)
    rungs.append({"hidden_size": width, "p50_us": float(summary.p50_us),
                  "p99_us": float(summary.p99_us), "fits": fits})
    logging.info("actor sizing: hidden_size %d: p50 %.0f us, p99 %.0f us "
                 "(%s the %.4g ms budget at %d envs)", width, summary.p50_us,
                 summary.p99_us, "within" if fits else "over", budget_ms,
                 config.envs_per_actor)
  fitting = [rung["hidden_size"] for rung in rungs if rung["fits"]]
  table = ", ".join(f"{r['hidden_size']}: p99 {r['p99_us']:.0f} us"
                    for r in rungs)
  if not fitting:
    smallest = rungs[0]
    raise timing.TActorBudgetError(
        f"--lstm_hidden_size=auto: no actor width fits the T_actor budget of "
        f"{budget_ms:.4g} ms (p99 at {config.envs_per_actor} envs per actor; "
        f"{table}). Use a larger --t_actor_budget_ms, fewer "
        "--envs_per_actor or a smaller --torso_mlp_sizes.",
        smallest["p99_us"] / 1e3, budget_ms)
  chosen = max(fitting)
  logging.info("actor sizing: chose hidden_size %d (%s)", chosen, table)
  return {"hidden_size": chosen, "budget_ms": budget_ms,
          "envs": config.envs_per_actor, "ladder": rungs,
          "calibration_steps": config.calibration_steps}


def stored_sizing(run_dir: str | os.PathLike
                  ) -> tuple[int, dict[str, Any] | None] | None:
  """(stored width, stored sizing record) of a run directory's config.json,
  or None when it has none."""
  resolved = run_dir_lib.read_latest_config(run_dir)
  if not resolved or "train" not in resolved:
    return None
  width = resolved["train"]["learner"]["lstm"]["hidden_size"]
  return int(width), resolved.get("actor_sizing")


def resolve_auto_width(config: config_lib.TrainConfig,
                       env_factory: Callable | None = None, *,
                       ladder: Sequence[int] = DEFAULT_LADDER,
                       calibrate: Calibrate = calibrate_width
                       ) -> tuple[config_lib.TrainConfig, dict[str, Any]]:
  """(config with the chosen width, the record for config.json).

  A resume reads the width (and record) from the stored config.json and
  calibrates nothing; otherwise the environment is probed for its specs and
  the ladder calibrated on an actor's cores (the ones the run will give its
  first actor).
  """
  if config.resume:
    stored = stored_sizing(os.path.abspath(config.logdir))
    if stored is not None:
      width, record = stored
      logging.info("actor sizing: resumed run keeps hidden_size %d", width)
      record = dict(record or {"hidden_size": width, "ladder": None})
      record["resumed"] = True
      return with_width(config, width), record
  # Imported here: run.py imports this module's users, not the reverse.
  from ald_jax.system import run  # pylint: disable=import-outside-toplevel
  env_info = run.probe_environment(
      run.resolve_env_factory(config, env_factory), config.seed)
  cores = affinity.assign_cores(config.num_actors,
                                reserve_for_learner=1).actors[0]
  jax.config.update("jax_cpu_enable_async_dispatch", False)  # as the run does
  record = choose_width(config, env_info.obs_shape, env_info.num_actions,
                        ladder=ladder, calibrate=calibrate, cores=cores)
  return with_width(config, record["hidden_size"]), record
