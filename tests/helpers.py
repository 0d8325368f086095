"""Builders the test modules share: tiny run configs, and hooks on the
learner loop's clock and on the actor threads."""
import dataclasses
import threading

from ald_jax import config as config_lib
from ald_jax.system import loop as loop_lib


def tiny_learner(agent: str, **changes) -> config_lib.LearnerConfig:
  return config_lib.LearnerConfig(
      agent=agent, unroll_length=8, learner_context=8, batch_size=8,
      torso=config_lib.TorsoConfig(mlp_sizes=(32,)),
      lstm=config_lib.LSTMConfig(hidden_size=32),
      gtrxl=config_lib.GTrXLConfig(num_layers=1, d_model=32, num_heads=2,
                                   mlp_size=64, memory_length=8),
      **changes)


def tiny_run(logdir, agent="ald", **changes) -> config_lib.TrainConfig:
  base = config_lib.TrainConfig(
      learner=tiny_learner(agent), num_actors=2, envs_per_actor=4,
      total_env_steps=1500,
      distill_steps_per_rl_step=1.0 if agent == "ald" else 0.0,
      replay_capacity=64, queue_capacity=4, t_actor_budget_ms=1000.0,
      calibration_steps=20, report_interval_s=0.5,
      # The gap evaluation has its own tests (test_system_eval.py); in a tiny
      # run it would compile two acting steps and evaluate once more at the end.
      eval_interval_s=0.0,
      logdir=str(logdir), seed=1)
  return dataclasses.replace(base, **changes)


def actor_threads_alive():
  return [t.name for t in threading.enumerate()
          if t.name.startswith("actor-") and t.is_alive()]


def jump_clock_when(monkeypatch, jump_s: float, condition) -> None:
  """The learner loop's clock runs `jump_s` ahead while `condition()` holds:
  a wall-time limit falls at a chosen moment, whatever the machine's speed."""
  elapsed_s = loop_lib.LearnerLoop.elapsed_s
  monkeypatch.setattr(
      loop_lib.LearnerLoop, "elapsed_s",
      lambda loop: elapsed_s(loop) + (jump_s if condition() else 0.0))
