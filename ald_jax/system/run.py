"""Wires actors, the learner driver and the learner loop into one run.

    actor pool (threads, processes or Ray) --unrolls--> learner loop
          ^                                               | batches
          |                                         learner driver
          +------ versioned actor parameters <-----------+ (default device)

`train` validates everything that can fail on bad input before any actor
starts, builds the pieces (`pool.ActorPool`, `learner_driver.LearnerDriver`,
`loop.LearnerLoop`, the learner-actor gap `evaluation.Evaluator`), runs the
loop and then stops in a fixed order: the final checkpoint first (the
learner state does not depend on the actors), then one shared deadline
(STOP_DEADLINE_S) for every actor and the evaluation (which may finish the
evaluation in progress meanwhile), then the final metrics row. Each step of
that sequence runs even if an earlier one failed, and the first error is the
one reported.

Process-wide setting: JAX's CPU async dispatch is turned off, so a jitted call
runs on the thread that makes it and an actor thread's pinning pins its work
(measured: with async dispatch the small actor step had a p99 ~8x higher
beside a training thread). A CPU learner then also blocks its own thread for
each step, which costs nothing here: the loop waits on the result anyway, and
XLA still parallelises the learner's large ops over its own thread pool.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import signal
import sys
import threading
import time
import traceback
from typing import Any, Callable, Mapping, NamedTuple

from absl import logging
import jax
import numpy as np

from ald_jax import checkpoint as checkpoint_lib
from ald_jax import config as config_lib
from ald_jax import learner as learner_lib
from ald_jax import metrics as metrics_lib
from ald_jax.envs import batched as batched_lib
from ald_jax.envs import registry
from ald_jax.envs import specs
from ald_jax.system import actor as actor_lib
from ald_jax.system import affinity
from ald_jax.system import compile_cache
from ald_jax.system import errors
from ald_jax.system import evaluation
from ald_jax.system import learner_driver as driver_lib
from ald_jax.system import loop as loop_lib
from ald_jax.system import pool as pool_lib
from ald_jax.system import run_dir as run_dir_lib
from ald_jax.system import timing

EnvFactory = batched_lib.EnvFactory  # (seed) -> dm_env.Environment
CHECKPOINT_DIR = "checkpoints"


STOP_DEADLINE_S = 10.0  # one deadline shared by all actors at the end
FINAL_EVAL_DEADLINE_S = 60.0  # the evaluation of the final parameters

RunError = errors.RunError
NonFiniteLossError = errors.NonFiniteLossError


class RunResult(NamedTuple):
  run_dir: str
  final_row: dict[str, Any]
  state: Any                 # the final LearnerState (host arrays)
  stopped_by: str            # "budget", "wall_time", "signal:SIGINT", ...
  # Actor threads (and "evaluation") still running after the stop deadline.
  stuck_actors: tuple[str, ...] = ()


def resolve_env_factory(config: config_lib.TrainConfig,
                        env_factory: EnvFactory | None) -> EnvFactory:
  if env_factory is not None:
    if not callable(env_factory):
      raise TypeError("env_factory must be a callable (seed) -> "
                      f"dm_env.Environment, got {type(env_factory)}")
    return env_factory
  return registry.make_env_factory(config.env, **config.env_kwargs_dict)


def probe_environment(env_factory: EnvFactory, seed: int) -> specs.EnvInfo:
  """Builds one environment to read and validate its specs, then closes it.

  A failing `close()` is logged, never raised over the validation's result.
  """
  env = env_factory(seed)
  if env is None:
    raise specs.UnsupportedEnvironmentError(
        "env_factory returned None; it must return a dm_env.Environment")
  try:
    return specs.validate_environment(env)
  finally:
    try:
      close = getattr(env, "close", None)
      if close is not None:
        close()
    except Exception as error:  # pylint: disable=broad-except
      logging.warning("closing the probed environment failed: %r", error)


def _actor_seed(base_seed: int, actor_id: int, segment: int,
                incarnation: int = 0) -> int:
  # Distinct, reproducible streams per actor, per resumed segment and per
  # restart of an actor process (incarnation 0 keeps the seeds of runs that
  # never restarted one).
  entropy = [base_seed, actor_id, segment] + ([incarnation] if incarnation
                                              else [])
  return int(np.random.SeedSequence(entropy).generate_state(1)[0])


class _StopSignals:
  """SIGINT/SIGTERM (main thread only): the first stops the run cleanly.

  The first signal calls `on_stop("signal:NAME")`; the loop sees it within
  one poll and the final checkpoint follows. A second signal flushes what it
  can (`flush` callbacks, stdout, stderr) and ends the process at once with
  exit status 128 + signal number.
  """

  def __init__(self, on_stop: Callable[[str], None]):
    self._on_stop = on_stop
    self.received: str | None = None
    self.flush: list[Callable[[], None]] = []
    self._previous: dict[int, Any] = {}

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    name = signal.Signals(signum).name
    if self.received is not None:
      self._exit_now(signum, name)
    self.received = name
    logging.warning("%s received: stopping cleanly (final checkpoint "
                    "follows; a second signal exits at once)", name)
    self._on_stop(f"signal:{name}")

  def _exit_now(self, signum: int, name: str) -> None:
    print(f"second signal ({name}): exiting now without a final checkpoint",
          file=sys.stderr, flush=True)
    for flush in self.flush:
      try:
        flush()
      except Exception:  # pylint: disable=broad-except
        pass
    for stream in (sys.stdout, sys.stderr):
      try:
        stream.flush()
      except Exception:  # pylint: disable=broad-except
        pass
    os._exit(128 + signum)  # pylint: disable=protected-access

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGINT, signal.SIGTERM):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def _error_traceback(error: BaseException) -> str:
  return "".join(traceback.format_exception(type(error), error,
                                            error.__traceback__))


class _FirstError:
  """Keeps the first error of the run; later ones are only logged."""

  def __init__(self):
    self.error: BaseException | None = None

  def record(self, error: BaseException, what: str) -> None:
    if self.error is None:
      self.error = error
    else:
      logging.error("%s also failed: %r", what, error)

  def attempt(self, what: str, fn: Callable[[], Any]) -> Any:
    """Runs one step of the stop sequence; its error never skips the rest."""
    try:
      return fn()
    except Exception as error:  # pylint: disable=broad-except
      logging.exception("%s failed", what)
      self.record(error, what)
      return None


class EnvMaker:
  """`(actor_id, incarnation=0) -> BatchedEnv`: actor i's environments.

  A class, not a closure, so that actor processes can receive it by pickle
  (it pickles when `factory` does).
  """

  def __init__(self, factory: EnvFactory, envs_per_actor: int,
               base_seed: int, segment: int):
    self.factory = factory
    self.envs_per_actor = envs_per_actor
    self.base_seed = base_seed
    self.segment = segment

  def __call__(self, actor_id: int,
               incarnation: int = 0) -> batched_lib.BatchedEnv:
    return batched_lib.BatchedEnv(
        self.factory, self.envs_per_actor,
        _actor_seed(self.base_seed, actor_id, self.segment, incarnation))


def _make_pool(cfg: config_lib.TrainConfig, spec: pool_lib.ActorSpec
               ) -> pool_lib.ActorPool:
  # Process pools split queue_capacity over the actor threads' local queues.
  per_thread = max(1, cfg.queue_capacity // spec.num_actors)
  if cfg.actors == "processes":
    from ald_jax.system import process_pool  # pylint: disable=import-outside-toplevel
    return process_pool.LocalProcessPool(spec, cfg,
                                         poll_queue_capacity=per_thread)
  if cfg.actors == "ray":
    from ald_jax.system import ray_pool  # pylint: disable=import-outside-toplevel
    return ray_pool.RayActorPool(spec, cfg, poll_queue_capacity=per_thread)
  return pool_lib.ThreadActorPool(spec, cfg.queue_capacity,
                                  stall_s=cfg.actor_stall_s)


def _make_evaluator(cfg: config_lib.TrainConfig, learner: Any,
                    factory: EnvFactory, segment: int
                    ) -> evaluation.Evaluator | None:
  """The learner-actor gap evaluation (None with eval_interval_s=0)."""
  if cfg.eval_interval_s == 0:
    return None
  return evaluation.Evaluator(
      evaluation.eval_policies(learner),
      lambda seed: batched_lib.BatchedEnv(factory, cfg.eval_episodes, seed),
      interval_s=cfg.eval_interval_s, greedy=cfg.eval_greedy, seed=cfg.seed,
      segment=segment)


def _compile_before_actors(driver: driver_lib.LearnerDriver,
                           evaluator: evaluation.Evaluator | None,
                           learner: Any, env_info: specs.EnvInfo) -> None:
  """Compiles every program the learner's process will run, so that
  nothing compiles once actors wait for the learner (the acting step was
  compiled by the calibration)."""
  start = time.perf_counter()
  variants = driver.compile()
  if evaluator is not None:
    evaluator.compile(driver.host_params(functools.partial(
        evaluation.eval_params, learner)), env_info.obs_shape)
  logging.info("compiled %d learner programs%s in %.1f s", variants,
               " and the evaluation's" if evaluator is not None else "",
               time.perf_counter() - start)


def _effective_config(config: config_lib.TrainConfig,
                      env_record: Mapping[str, Any]
                      ) -> config_lib.TrainConfig:
  """The config as it runs: a registry factory's name and kwargs fill
  `env`/`env_kwargs`; any other factory leaves them unused, so they are
  reset to their defaults (not recorded, see `_recorded_config`)."""
  if env_record["source"] == registry.REGISTRY_SOURCE:
    return dataclasses.replace(
        config, env=env_record["name"],
        env_kwargs=tuple(sorted(env_record["kwargs"].items())))
  return dataclasses.replace(config, env=config_lib.TrainConfig.env,
                             env_kwargs=())


def _recorded_config(config: config_lib.TrainConfig,
                     env_record: Mapping[str, Any]) -> dict[str, Any]:
  """The config as stored (config.json, checkpoints): without `env` and
  `env_kwargs` when they did not make the environment."""
  recorded = checkpoint_lib.to_jsonable(config)
  if env_record["source"] != registry.REGISTRY_SOURCE:
    del recorded["env"], recorded["env_kwargs"]
  return recorded


def _write_config(run_dir: str, config: config_lib.TrainConfig,
                  env_info, segment: int,
                  calibration: timing.LatencySummary,
                  env_record: Mapping[str, Any],
                  actor_sizing: Mapping[str, Any] | None = None) -> None:
  resolved = {"train": _recorded_config(config, env_record),
              # Where the environments came from (registry name, gymnasium
              # id or callable), with their arguments.
              "env": dict(env_record),
              "obs_shape": list(env_info.obs_shape),
              "num_actions": env_info.num_actions,
              "agent": config.learner.agent,
              "jax_version": jax.__version__,
              "learner_device": str(jax.devices()[0]),
              # The acting step measured alone (the in-run figures are in
              # the metrics rows): the pair shows what the run costs it.
              "t_actor_alone": {
                  "envs": config.envs_per_actor,
                  "p50_us": calibration.p50_us,
                  "p99_us": calibration.p99_us,
                  "budget_ms": config.t_actor_budget_ms}}
  if actor_sizing is not None:
    # How the actor's width was chosen (system/actor_sizing.py).
    resolved["actor_sizing"] = dict(actor_sizing)
  run_dir_lib.write_segment_config(run_dir, segment, resolved)


def train(config: config_lib.TrainConfig,
          env_factory: EnvFactory | None = None, *,
          flag_paths: Mapping[str, str] | None = None,
          actor_sizing: Mapping[str, Any] | None = None) -> RunResult:
  """Runs ALD (or a baseline agent) until `total_env_steps` or a stop.

  Args:
    config: the whole run; validated on construction.
    env_factory: `(seed) -> dm_env.Environment`; defaults to the registry's
      `config.env` with `config.env_kwargs`.
    flag_paths: command-line flag name -> config path (`ald_jax.train`
      passes its FLAG_TABLE's), so `resume_allow_change` may name flags and
      a refused resume names the flag to pass.
    actor_sizing: the record of an automatic actor width
      (`system/actor_sizing.resolve_auto_width`), written to config.json; a
      resume without one keeps the stored config's.

  Returns a RunResult; `stopped_by` is "budget", "wall_time" or
  "signal:NAME" (a first SIGINT/SIGTERM; the final checkpoint is written).

  Raises:
    ConfigError / UnsupportedEnvironmentError / TActorBudgetError before any
    actor starts; RunError (with the cause) if an actor or environment fails,
    an actor stalls or losses stay non-finite.
  """
  started_at = time.perf_counter()
  if not isinstance(config, config_lib.TrainConfig):
    raise TypeError(f"config must be a TrainConfig, got {type(config)}")
  cfg = config
  # ---- everything that can fail on bad input, before any actor starts ----
  run_dir_lib.resolve_allow_names(cfg.resume_allow_change, flag_paths)
  factory = resolve_env_factory(cfg, env_factory)
  if cfg.actors == "processes":
    from ald_jax.system import process_pool  # pylint: disable=import-outside-toplevel
    process_pool.check_factory_picklable(factory)
  env_record = registry.describe_env_factory(factory)
  cfg = _effective_config(cfg, env_record)
  env_info = probe_environment(factory, cfg.seed)
  run_dir = os.path.abspath(cfg.logdir)
  # One run per directory: held until train() returns.
  with run_dir_lib.RunDirLock(run_dir):
    return _train_locked(cfg, factory, env_info, run_dir, flag_paths,
                         env_record, started_at, actor_sizing)


def _train_locked(cfg: config_lib.TrainConfig, factory: EnvFactory,
                  env_info: specs.EnvInfo, run_dir: str,
                  flag_paths: Mapping[str, str] | None,
                  env_record: Mapping[str, Any], started_at: float,
                  actor_sizing: Mapping[str, Any] | None = None
                  ) -> RunResult:
  lcfg = cfg.learner
  ckpt_dir = os.path.join(run_dir, CHECKPOINT_DIR)
  has_checkpoints = os.path.isdir(ckpt_dir) and any(
      name.isdigit() for name in os.listdir(ckpt_dir))
  if has_checkpoints and not cfg.resume:
    raise config_lib.ConfigError(
        f"logdir: {run_dir} already holds checkpoints; pass --resume to "
        "continue that run or choose another --logdir")
  if cfg.resume and has_checkpoints:
    stored = run_dir_lib.read_latest_config(run_dir) or {}
    run_dir_lib.check_resume_env(stored.get("env"), env_record,
                                 cfg.resume_allow_change, flag_paths)
  if cfg.resume:
    latest = checkpoint_lib.read_latest_metadata(ckpt_dir)
    if latest is not None and "config" in latest[1]:
      run_dir_lib.check_resume_config(latest[1]["config"], cfg,
                                      cfg.resume_allow_change, flag_paths)
  if cfg.actors == "threads":
    # Read when JAX's CPU client is created: a process that used JAX on
    # its CPU before keeps the setting it had then.
    jax.config.update("jax_cpu_enable_async_dispatch", False)
  if cfg.compilation_cache:
    logging.info("compilation cache: %s",
                 compile_cache.enable(cfg.compilation_cache_dir))
  else:
    compile_cache.disable()
  learner = learner_lib.make_learner(lcfg, env_info.obs_shape,
                                     env_info.num_actions)
  learner_device = jax.devices()[0]
  os.makedirs(run_dir, exist_ok=True)

  state = learner.init(jax.random.PRNGKey(cfg.seed),
                       learner.example_batch(lcfg.batch_size))
  checkpointer = checkpoint_lib.Checkpointer(ckpt_dir,
                                             max_to_keep=cfg.keep_checkpoints)
  metadata: dict[str, Any] = {}
  if cfg.resume:
    restored = checkpointer.restore_latest(state)
    if restored is None:
      logging.warning("--resume: no checkpoint in %s; starting fresh", ckpt_dir)
    else:
      state, metadata = restored
      logging.info("resumed from %s at env step %d, learner step %d",
                   ckpt_dir, metadata.get("env_steps", 0),
                   metadata.get("learner_steps", 0))
  segment = metadata.get("segment", -1) + 1 if metadata else 0
  env_offset = int(metadata.get("env_steps", 0))
  driver = driver_lib.LearnerDriver(
      learner, cfg, learner_device, state, counters=metadata)

  core = learner.actor_core
  cores = affinity.assign_cores(cfg.num_actors, reserve_for_learner=1)
  calibration = actor_lib.calibrate_core(
      core, driver.host_params(learner.actor_params), env_info.obs_shape, cfg.envs_per_actor,
      budget_ms=cfg.t_actor_budget_ms, policy=cfg.t_actor_policy,
      num_calls=cfg.calibration_steps, cores=cores.actors[0], seed=cfg.seed)
  logging.info("T_actor calibration (%d envs): p50 %.0f us, p99 %.0f us, "
               "budget %.2f ms", cfg.envs_per_actor, calibration.p50_us,
               calibration.p99_us, cfg.t_actor_budget_ms)
  if actor_sizing is None and cfg.resume:
    actor_sizing = (run_dir_lib.read_latest_config(run_dir) or {}).get(
        "actor_sizing")
  _write_config(run_dir, cfg, env_info, segment, calibration, env_record,
                actor_sizing)

  # ---- the running system --------------------------------------------------
  spec = pool_lib.ActorSpec(
      make_env=EnvMaker(factory, cfg.envs_per_actor, cfg.seed, segment),
      core=core, num_actors=cfg.num_actors, envs_per_actor=cfg.envs_per_actor,
      unroll_length=lcfg.unroll_length, context_length=lcfg.learner_context,
      seed_for=functools.partial(_seed_for_actor, cfg.seed, segment),
      cores=cores.actors, t_actor_budget_ms=cfg.t_actor_budget_ms,
      env_info=env_info, nonfinite_obs=cfg.nonfinite_obs)
  writer = metrics_lib.MetricsWriter(
      run_dir, resume=cfg.resume,
      tensorboard=None if cfg.tensorboard else False,
      keep_until=("env_steps", env_offset) if cfg.resume else None)

  def write_row(row: dict[str, Any]) -> None:
    writer.write(row)
    print(metrics_lib.format_progress(row), flush=True)

  def save_checkpoint(step: int, host_state: Any, meta: dict[str, Any]):
    checkpointer.save(step, host_state,
                      dict(meta, config=_recorded_config(cfg, env_record)))

  pool = _make_pool(cfg, spec)  # builds; starts nothing
  evaluator = _make_evaluator(cfg, learner, factory, segment)
  _compile_before_actors(driver, evaluator, learner, env_info)
  loop = loop_lib.LearnerLoop(
      cfg, pool, driver, write_row=write_row,
      save_checkpoint=save_checkpoint, env_offset=env_offset,
      episodes_offset=int(metadata.get("episodes_total", 0)),
      wall_offset=float(metadata.get("wall_time_s", 0.0)), segment=segment,
      evaluator=evaluator,
      eval_params=(functools.partial(evaluation.eval_params, learner)
                   if evaluator is not None else None),
      started_at=started_at)
  first_error = _FirstError()
  stuck: list[str] = []
  row: dict[str, Any] = {}
  with _StopSignals(loop.request_stop) as signals:
    signals.flush.append(writer.close)
    try:
      if env_offset >= cfg.total_env_steps:
        logging.info("the restored run already has %d >= total_env_steps=%d "
                     "env steps; nothing to do", env_offset,
                     cfg.total_env_steps)
        loop.request_stop("budget")
      else:
        with affinity.pinned_process(cores.learner if cfg.pin_learner
                                     else None):
          if evaluator is not None:
            evaluator.start()
          loop.start_actors()
          loop.run()
    except BaseException as error:  # pylint: disable=broad-except
      first_error.record(error, "learner loop")
    # ---- the stop sequence: each step runs whatever failed before ----
    if not isinstance(first_error.error, errors.NonFiniteLossError):
      # The learner state is sound (NaN updates were skipped).
      first_error.attempt("final checkpoint", loop.checkpoint)
    logging.info("stopping actors (deadline %.0f s)", STOP_DEADLINE_S)
    stop_start = time.monotonic()
    stuck = first_error.attempt(
        "stopping actors", lambda: pool.stop(STOP_DEADLINE_S)) or []
    # An actor that failed while the loop was ending (budget, wall time)
    # still stops the run with its cause.
    if first_error.error is None:
      first_error.attempt("the actors", pool.raise_error)
    if evaluator is not None:
      if (evaluator.started and first_error.error is None and
          loop.stop_reason in ("budget", "wall_time")):
        # On the cores the actors left: the final row's gap is of the final
        # parameters. Bounded; a stop signal does not wait for it.
        logging.info("evaluating the final parameters (deadline %.0f s)",
                     FINAL_EVAL_DEADLINE_S)
        if first_error.attempt("the final evaluation", lambda: (
            loop.evaluate_final(FINAL_EVAL_DEADLINE_S))) is False:
          logging.warning("the final evaluation did not finish within %.0f "
                          "s; the last eval/* entries are of an earlier one",
                          FINAL_EVAL_DEADLINE_S)
        stop_start = time.monotonic()  # the stop deadline starts after it
      evaluator.close()  # no new evaluation; one in progress may finish
      # The same deadline: the evaluation finished meanwhile or is cut short.
      stuck += first_error.attempt("stopping the evaluation", lambda: (
          evaluator.stop(max(0.0, STOP_DEADLINE_S -
                             (time.monotonic() - stop_start))))) or []
      first_error.attempt("the evaluation", evaluator.check)
    stopped_by = ("error" if first_error.error is not None
                  and not isinstance(first_error.error, KeyboardInterrupt)
                  else loop.stop_reason or "budget")
    if isinstance(first_error.error, KeyboardInterrupt):
      stopped_by = "signal:SIGINT"
    row = first_error.attempt("final metrics row",
                              lambda: loop.row(stopped_by)) or {}
    if stuck:
      row["stuck_actors"] = ",".join(stuck)
    if row:
      first_error.attempt("writing the final metrics row",
                          lambda: write_row(row))
    first_error.attempt("closing the metrics files", writer.close)
    first_error.attempt("closing the checkpointer", checkpointer.close)

  error = first_error.error
  if error is not None and not isinstance(error, KeyboardInterrupt):
    if isinstance(error, errors.RunError):
      raise error
    raise RunError(f"run stopped by an error: {type(error).__name__}: {error}",
                   _error_traceback(error)) from error
  return RunResult(run_dir=run_dir, final_row=row,
                   state=driver.host_state(), stopped_by=stopped_by,
                   stuck_actors=tuple(stuck))


def _seed_for_actor(base_seed: int, segment: int, actor_id: int) -> int:
  return _actor_seed(base_seed + 1, actor_id, segment)
