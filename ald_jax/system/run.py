"""Wires actors, queue, parameter slot and the learner loop into one run.

    actor threads (CPU, pinned) --unrolls--> bounded queue --> learner loop
          ^                                                   (default device)
          +----------- versioned latest-only params slot <-------+

The learner loop runs on the calling thread: it batches unrolls, runs the
jitted combined step, takes `distill_steps_per_rl_step` distill-only steps on
replayed unrolls, publishes actor parameters, reports, and checkpoints.

Process-wide setting: JAX's CPU async dispatch is turned off, so a jitted call
runs on the thread that makes it and an actor thread's pinning pins its work
(measured: with async dispatch the small actor step had a p99 ~8x higher
beside a training thread). A CPU learner then also blocks its own thread for
each step, which costs nothing here: the loop waits on the result anyway, and
XLA still parallelises the learner's large ops over its own thread pool.
"""
from __future__ import annotations

import functools
import json
import os
import queue as queue_lib
import signal
import threading
import time
from typing import Any, Callable, NamedTuple

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from ald_jax import checkpoint as checkpoint_lib
from ald_jax import config as config_lib
from ald_jax import learner as learner_lib
from ald_jax import metrics as metrics_lib
from ald_jax import plot as plot_lib
from ald_jax.envs import batched as batched_lib
from ald_jax.envs import registry
from ald_jax.envs import specs
from ald_jax.system import actor as actor_lib
from ald_jax.system import params as params_lib
from ald_jax.system import queue as queue_utils
from ald_jax.system import replay as replay_lib
from ald_jax.system import timing

EnvFactory = Callable[[int], Any]
CONFIG_NAME = "config.json"
CHECKPOINT_DIR = "checkpoints"


class RunError(RuntimeError):
  """The run stopped because of an error; the message names the cause."""


class NonFiniteLossError(RunError):
  """Too many learner updates in a row had a NaN/inf loss or gradient."""


class RunResult(NamedTuple):
  run_dir: str
  final_row: dict[str, Any]
  state: Any                 # the final LearnerState (host arrays)
  stopped_by: str            # "budget", "wall_time", "signal:SIGINT", ...


def resolve_env_factory(config: config_lib.TrainConfig,
                        env_factory: EnvFactory | None) -> EnvFactory:
  if env_factory is not None:
    if not callable(env_factory):
      raise TypeError("env_factory must be a callable (seed) -> "
                      f"dm_env.Environment, got {type(env_factory)}")
    return env_factory
  return registry.make_env_factory(config.env, **config.env_kwargs_dict)


def probe_environment(env_factory: EnvFactory, seed: int):
  """Builds one environment to read and validate its specs, then closes it."""
  env = env_factory(seed)
  try:
    return specs.validate_environment(env)
  finally:
    env.close()


def _actor_seed(base_seed: int, actor_id: int, segment: int) -> int:
  # Distinct, reproducible streams per actor and per resumed segment.
  return int(np.random.SeedSequence([base_seed, actor_id, segment])
             .generate_state(1)[0])


class _StopSignals:
  """SIGINT/SIGTERM set the stop event (main thread only) and are recorded."""

  def __init__(self, stop_event: threading.Event):
    self._stop = stop_event
    self.received: str | None = None
    self._previous: dict[int, Any] = {}

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    self.received = signal.Signals(signum).name
    logging.warning("%s received: stopping cleanly (final checkpoint follows)",
                    self.received)
    self._stop.set()

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGINT, signal.SIGTERM):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def _write_config(run_dir: str, config: config_lib.TrainConfig,
                  env_info) -> None:
  resolved = {"train": checkpoint_lib.to_jsonable(config),
              "obs_shape": list(env_info.obs_shape),
              "num_actions": env_info.num_actions,
              "agent": config.learner.agent,
              "jax_version": jax.__version__,
              "learner_device": str(jax.devices()[0])}
  path = os.path.join(run_dir, CONFIG_NAME)
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(resolved, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


def train(config: config_lib.TrainConfig,
          env_factory: EnvFactory | None = None) -> RunResult:
  """Runs ALD (or a baseline agent) until `total_env_steps` or a stop.

  Args:
    config: the whole run; validated on construction.
    env_factory: `(seed) -> dm_env.Environment`; defaults to the registry's
      `config.env` with `config.env_kwargs`.

  Raises:
    ConfigError / UnsupportedEnvironmentError / TActorBudgetError before any
    thread starts; RunError (with the cause) if an actor or environment fails
    or losses stay non-finite.
  """
  if not isinstance(config, config_lib.TrainConfig):
    raise TypeError(f"config must be a TrainConfig, got {type(config)}")
  cfg, lcfg = config, config.learner
  # ---- everything that can fail on bad input, before any thread starts ----
  factory = resolve_env_factory(cfg, env_factory)
  env_info = probe_environment(factory, cfg.seed)
  run_dir = os.path.abspath(cfg.logdir)
  ckpt_dir = os.path.join(run_dir, CHECKPOINT_DIR)
  has_checkpoints = os.path.isdir(ckpt_dir) and any(
      name.isdigit() for name in os.listdir(ckpt_dir))
  if has_checkpoints and not cfg.resume:
    raise config_lib.ConfigError(
        f"logdir: {run_dir} already holds checkpoints; pass --resume to "
        "continue that run or choose another --logdir")
  jax.config.update("jax_cpu_enable_async_dispatch", False)
  learner = learner_lib.make_learner(lcfg, env_info.obs_shape,
                                     env_info.num_actions)
  learner_device = jax.devices()[0]
  os.makedirs(run_dir, exist_ok=True)

  state = learner.init(jax.random.PRNGKey(cfg.seed),
                       learner.example_batch(lcfg.batch_size))
  checkpointer = checkpoint_lib.Checkpointer(ckpt_dir,
                                             max_to_keep=cfg.keep_checkpoints)
  counters = {"env_steps": 0, "learner_steps": 0, "distill_steps": 0,
              "wall_time_s": 0.0, "segment": 0, "nonfinite_total": 0}
  replay_rng_state = None
  if cfg.resume:
    restored = checkpointer.restore_latest(state)
    if restored is None:
      logging.warning("--resume: no checkpoint in %s; starting fresh", ckpt_dir)
    else:
      state, metadata = restored
      counters.update({k: metadata[k] for k in counters if k in metadata})
      counters["segment"] += 1
      replay_rng_state = metadata.get("replay_rng_state")
      logging.info("resumed from %s at env step %d, learner step %d",
                   ckpt_dir, counters["env_steps"], counters["learner_steps"])
  state = jax.device_put(state, learner_device)
  _write_config(run_dir, cfg, env_info)

  # One jitted call copies the actor parameters out of the (donated) learner
  # state: fresh buffers the actors may keep, without a host round-trip per
  # leaf on the learner thread.
  copy_actor_params = jax.jit(lambda s: jax.tree_util.tree_map(
      jnp.copy, learner.actor_params(s)))
  core = learner.actor_core
  cores = actor_lib.assign_cores(cfg.num_actors, reserve_for_learner=1)
  calibration = actor_lib.calibrate_core(
      core, copy_actor_params(state),
      env_info.obs_shape, cfg.envs_per_actor, budget_ms=cfg.t_actor_budget_ms,
      policy=cfg.t_actor_policy, num_calls=cfg.calibration_steps,
      cores=cores.actors[0], seed=cfg.seed)
  logging.info("T_actor calibration (%d envs): p50 %.0f us, p99 %.0f us, "
               "budget %.2f ms", cfg.envs_per_actor, calibration.p50_us,
               calibration.p99_us, cfg.t_actor_budget_ms)

  # ---- the running system --------------------------------------------------
  stop_event = threading.Event()
  errors = queue_utils.ErrorHolder(stop_event)
  slot = params_lib.ParamsSlot()
  unroll_queue: queue_lib.Queue = queue_lib.Queue(maxsize=cfg.queue_capacity)
  batcher = replay_lib.UnrollBatcher(lcfg.batch_size)
  replay = replay_lib.ReplayBuffer(cfg.replay_capacity, seed=cfg.seed)
  if replay_rng_state is not None:
    replay.rng.bit_generator.state = replay_rng_state
  schedule = replay_lib.DistillSchedule(cfg.distill_steps_per_rl_step)
  phases = timing.PhaseTimer()
  episodes = metrics_lib.EpisodeWindow(size=200)
  writer = metrics_lib.MetricsWriter(
      run_dir, resume=cfg.resume,
      keep_until=("env_steps", counters["env_steps"]) if cfg.resume else None)
  slot.publish(copy_actor_params(state), copy_to_host=False)

  actors = [
      actor_lib.ActorThread(
          i,
          functools.partial(batched_lib.BatchedEnv, factory,
                            cfg.envs_per_actor,
                            _actor_seed(cfg.seed, i, counters["segment"])),
          core, slot, unroll_queue, stop_event, errors,
          unroll_length=lcfg.unroll_length,
          context_length=lcfg.learner_context,
          seed=_actor_seed(cfg.seed + 1, i, counters["segment"]),
          cores=cores.actors[i], t_actor_budget_ms=cfg.t_actor_budget_ms)
      for i in range(cfg.num_actors)
  ]
  start_time = time.perf_counter()
  wall_offset = counters["wall_time_s"]
  env_offset = counters["env_steps"]
  stopped_by = "budget"
  last_metrics: dict[str, Any] = {}
  consecutive_nonfinite = 0
  rate = metrics_lib.RateMeter()
  row: dict[str, Any] = {}

  def env_steps_now() -> int:
    return env_offset + sum(a.stats().env_steps for a in actors)

  def make_row() -> dict[str, Any]:
    episodes.extend(e for a in actors for e in a.drain_episodes())
    row = {"agent": lcfg.agent, "env": cfg.env, "stopped_by": "",
           "wall_time_s": wall_offset + time.perf_counter() - start_time}
    row.update(actor_lib.summarize_actors(actors))
    row["env_steps"] = env_offset + row["env_steps"]
    row["env_sps"] = rate.rate(row["env_steps"])
    row.update(episodes.summary())
    row.update({"learner_steps": counters["learner_steps"],
                "distill_steps": counters["distill_steps"],
                "nonfinite_total": counters["nonfinite_total"],
                "queue_size": unroll_queue.qsize(),
                "queue_capacity": cfg.queue_capacity,
                "params_version": slot.version})
    row.update(phases.summary())
    row.update({k: float(v)
                for k, v in jax.device_get(last_metrics).items()})
    return row

  def save_checkpoint():
    counters["wall_time_s"] = wall_offset + time.perf_counter() - start_time
    counters["env_steps"] = env_steps_now()
    metadata = dict(counters,
                    replay_rng_state=replay.rng.bit_generator.state,
                    config=checkpoint_lib.to_jsonable(cfg))
    with phases.phase("checkpoint"):
      checkpointer.save(counters["learner_steps"],
                        jax.device_get(state), metadata)

  with _StopSignals(stop_event) as signals:
    try:
      if env_offset >= cfg.total_env_steps:
        logging.info("the restored run already has %d >= total_env_steps=%d "
                     "env steps; nothing to do", env_offset,
                     cfg.total_env_steps)
        stop_event.set()
      else:
        if cfg.pin_learner:
          actor_lib.pin_process_threads(cores.learner)
        for actor in actors:
          actor.start()
      last_report = last_checkpoint = time.perf_counter()
      rate.rate(env_offset)
      while not stop_event.is_set():
        if env_steps_now() >= cfg.total_env_steps:
          break
        if cfg.max_wall_time_s and (time.perf_counter() - start_time
                                    >= cfg.max_wall_time_s):
          stopped_by = "wall_time"
          break
        with phases.phase("wait_batch"):
          unroll = queue_utils.get_until_stopped(unroll_queue, stop_event,
                                                 poll_s=0.05)
        if unroll is None:
          break
        batcher.add(unroll)
        if cfg.distill_steps_per_rl_step > 0:  # replay feeds distill-only steps
          replay.add(unroll)
        batch = batcher.pop_batch()
        while batch is not None and not stop_event.is_set():
          with phases.phase("step"):
            state, metrics = learner.step(
                state, jax.device_put(batch, learner_device))
            # One scalar per step; the rest is fetched at report time (each
            # host transfer holds the GIL the actors need).
            nonfinite = float(metrics["nonfinite"])
          if nonfinite > 0:
            consecutive_nonfinite += 1
            counters["nonfinite_total"] += 1
            logging.warning("non-finite loss or gradient: update skipped "
                            "(%d in a row)", consecutive_nonfinite)
            if consecutive_nonfinite >= cfg.max_consecutive_nonfinite:
              raise NonFiniteLossError(
                  f"{consecutive_nonfinite} learner updates in a row had a "
                  "non-finite loss or gradient (max_consecutive_nonfinite="
                  f"{cfg.max_consecutive_nonfinite}); last metrics: "
                  f"{ {k: float(v) for k, v in metrics.items()} }")
          else:
            consecutive_nonfinite = 0
            counters["learner_steps"] += 1
            last_metrics = metrics
          with phases.phase("distill"):
            for _ in range(schedule.steps_due()):
              replayed = jax.device_put(replay.sample(lcfg.batch_size),
                                        learner_device)
              state, distill_metrics = learner.distill_step(state, replayed)
              if float(distill_metrics["nonfinite"]) == 0:
                counters["distill_steps"] += 1
          with phases.phase("publish"):
            slot.publish(copy_actor_params(state), copy_to_host=False)
          batch = batcher.pop_batch()
        now = time.perf_counter()
        if now - last_report >= cfg.report_interval_s:
          last_report = now
          row = make_row()
          writer.write(row)
          print(metrics_lib.format_progress(row), flush=True)
        if now - last_checkpoint >= cfg.checkpoint_interval_s:
          last_checkpoint = now
          save_checkpoint()
    except BaseException as error:  # pylint: disable=broad-except
      errors.record(error, "learner")
    finally:
      stop_event.set()
      for actor in actors:
        if actor.ident is not None:
          actor.join(timeout=30.0)
      alive = [a.name for a in actors if a.is_alive()]
      if alive:
        logging.error("actor threads still running after stop: %s", alive)
      if signals.received:
        stopped_by = f"signal:{signals.received}"
      row = make_row()
      row["stopped_by"] = stopped_by if not errors.has_error else "error"
      writer.write(row)
      writer.close()
      print(metrics_lib.format_progress(row), flush=True)
      if not isinstance(errors.error, NonFiniteLossError):
        # A final checkpoint: after a budget end, a signal or an actor error
        # (the learner state itself is sound; NaN updates were skipped).
        try:
          save_checkpoint()
        except Exception:  # pylint: disable=broad-except
          logging.exception("final checkpoint failed")
      checkpointer.close()
      try:
        plot_lib.plot_runs([run_dir], os.path.join(run_dir, "curves.png"))
      except Exception:  # pylint: disable=broad-except
        logging.exception("plotting %s failed", run_dir)

  if errors.has_error:
    if isinstance(errors.error, KeyboardInterrupt):
      stopped_by = "signal:SIGINT"
    else:
      raise RunError(f"run stopped by an error in {errors.message()}\n"
                     f"{errors.traceback or ''}") from errors.error
  return RunResult(run_dir=run_dir, final_row=row,
                   state=jax.device_get(state), stopped_by=stopped_by)
