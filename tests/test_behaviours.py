"""Behaviours with no other test, each through the public API, each tiny.

V-MPO's n-step value target in a learner step; a rank-3 grid environment
(Meta-Fetch, flat_obs=False) through the learner and a whole run; the
wall-clock limit; t_actor_policy="warn" in a run; the final checkpoint after
an actor's environment crashes.
"""
import dataclasses
import functools
import json
import logging
import os

import jax
import numpy as np
import pytest

import ald_jax
from ald_jax import checkpoint as checkpoint_lib
from ald_jax import config as config_lib
from ald_jax import learner as learner_lib
from ald_jax import metrics as metrics_lib
from ald_jax import types
from ald_jax.envs import imaze
from ald_jax.envs import meta_fetch
from ald_jax.system import run
import test_system_run  # the crashing environment  # pylint: disable=g-bad-import-order

GRID_KWARGS = (("flat_obs", False), ("grid_size", 4), ("num_objects", 2),
               ("time_limit", 20))


def tiny_learner(agent="lstm", **changes):
  return config_lib.LearnerConfig(
      agent=agent, unroll_length=8, learner_context=8, batch_size=4,
      torso=config_lib.TorsoConfig(conv_channels=(4,), mlp_sizes=(16,)),
      lstm=config_lib.LSTMConfig(hidden_size=16),
      gtrxl=config_lib.GTrXLConfig(num_layers=1, d_model=16, num_heads=2,
                                   mlp_size=32, memory_length=8),
      **changes)


def tiny_run(logdir, agent="lstm", **changes):
  base = config_lib.TrainConfig(
      learner=tiny_learner(agent), num_actors=2, envs_per_actor=2,
      total_env_steps=400,
      distill_steps_per_rl_step=1.0 if agent == "ald" else 0.0,
      replay_capacity=32, queue_capacity=4, t_actor_budget_ms=1000.0,
      calibration_steps=5, report_interval_s=0.5,
      checkpoint_interval_s=3600.0, logdir=str(logdir), seed=5)
  return dataclasses.replace(base, **changes)


def random_batch(learner, seed=0):
  """Random unrolls with an episode end inside the unroll."""
  cfg = learner.config
  rng = np.random.default_rng(seed)
  b, length = cfg.batch_size, cfg.sequence_length
  step_type = np.full((b, length), types.MID, np.int32)
  step_type[:, 0] = types.FIRST
  step_type[0, 11], step_type[0, 12] = types.LAST, types.FIRST
  discount = np.ones((b, length), np.float32)
  discount[0, 11] = 0.0
  return types.Batch(
      observation=rng.normal(size=(b, length, *learner.obs_shape)).astype(
          np.float32),
      action=rng.integers(0, learner.num_actions, (b, length)).astype(
          np.int32),
      reward=rng.normal(size=(b, length)).astype(np.float32),
      discount=discount, step_type=step_type,
      behaviour_logits=rng.normal(size=(b, length, learner.num_actions)
                                  ).astype(np.float32),
      actor_state=learner.example_batch(b).actor_state)


def leaves_moved(before, after) -> bool:
  return any(not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(
      jax.tree_util.tree_leaves(before), jax.tree_util.tree_leaves(after)))


def test_vmpo_nstep_value_target_in_a_learner_step():
  metrics_by_target = {}
  for target in ("nstep", "vtrace"):
    cfg = tiny_learner("lstm", vmpo=config_lib.VMPOConfig(value_target=target))
    learner = learner_lib.make_learner(cfg, (6,), 3)
    batch = random_batch(learner)
    state = learner.init(jax.random.PRNGKey(0), batch)
    _, expected = learner.losses(state.learner_params, state.actor_params,
                                 state.target_params, batch)
    before = jax.tree_util.tree_map(np.array, state.learner_params)
    state, metrics = learner.step(state, batch)
    assert float(metrics["nonfinite"]) == 0.0 and int(state.step) == 1
    assert leaves_moved(before, state.learner_params)
    # The jitted step reports what the (oracle-tested) losses compute.
    for name in ("vmpo/value_loss", "vmpo/advantage_mean", "loss/total"):
      np.testing.assert_allclose(float(metrics[name]), float(expected[name]),
                                 rtol=1e-4, atol=1e-6, err_msg=name)
    metrics_by_target[target] = metrics
  # Off-policy behaviour logits: the n-step target (no importance weights)
  # differs from the V-trace one, so the option is wired through.
  assert abs(float(metrics_by_target["nstep"]["vmpo/value_loss"]) -
             float(metrics_by_target["vtrace"]["vmpo/value_loss"])) > 1e-4


def test_grid_observations_through_the_learner():
  env = meta_fetch.MetaFetch(seed=0, **dict(GRID_KWARGS))
  obs_shape = env.observation_spec().shape
  assert len(obs_shape) == 3  # [H, W, C]
  num_actions = int(env.action_spec().num_values)
  learner = learner_lib.make_learner(tiny_learner("ald"), obs_shape,
                                     num_actions)
  batch = random_batch(learner)
  assert batch.observation.shape[2:] == obs_shape
  state = learner.init(jax.random.PRNGKey(0), batch)
  before = jax.tree_util.tree_map(np.array, (state.learner_params,
                                             state.actor_params))
  state, metrics = learner.step(state, batch)
  assert all(np.isfinite(float(v)) for v in metrics.values())
  assert float(metrics["nonfinite"]) == 0.0
  assert leaves_moved(before[0], state.learner_params)
  assert leaves_moved(before[1], state.actor_params)
  # Grid observations go through the conv torso, in both networks.
  for params in (state.learner_params["net"], state.actor_params):
    assert any("Conv" in name for name in params["params"]["encoder"])


@pytest.mark.slow  # ~70 s; the grid path through the learner stays in make test
def test_grid_environment_whole_run(tmp_path):
  config = tiny_run(tmp_path, agent="ald", env="meta_fetch",
                    env_kwargs=GRID_KWARGS)
  result = ald_jax.train(config)
  assert result.stopped_by == "budget"
  assert result.final_row["env_steps"] >= 400
  assert result.final_row["learner_steps"] > 0
  assert result.final_row["distill_steps"] > 0
  with open(os.path.join(result.run_dir, "config.json"),
            encoding="utf-8") as f:
    assert len(json.load(f)["obs_shape"]) == 3


def test_wall_time_limit_stops_the_run(tmp_path):
  # A finite budget (~a minute of acting here), so that a run ignoring the
  # limit fails the assertion instead of hanging.
  config = tiny_run(tmp_path, total_env_steps=100_000, max_wall_time_s=2.0)
  result = ald_jax.train(config)
  assert result.stopped_by == "wall_time"
  assert result.final_row["stopped_by"] == "wall_time"
  assert result.final_row["env_steps"] < 100_000
  rows = metrics_lib.read_metrics(result.run_dir)
  assert rows[-1]["stopped_by"] == "wall_time"
  # A wall-time stop keeps a final checkpoint like any other stop.
  restored = checkpoint_lib.restore_latest(
      os.path.join(result.run_dir, run.CHECKPOINT_DIR), result.state)
  assert restored is not None
  assert restored[1]["learner_steps"] == result.final_row["learner_steps"]


def test_t_actor_policy_warn_runs_past_an_impossible_budget(tmp_path,
                                                            caplog):
  # The same budget with policy "refuse" raises TActorBudgetError before any
  # thread starts (tests/test_system_run.py); "warn" logs and runs.
  config = tiny_run(tmp_path, t_actor_budget_ms=1e-6, t_actor_policy="warn")
  with caplog.at_level(logging.WARNING):
    result = ald_jax.train(config)
  assert result.stopped_by == "budget"
  assert result.final_row["env_steps"] >= 400
  assert result.final_row["learner_steps"] > 0
  assert "T_actor budget exceeded" in caplog.text
  # Every acting step is over such a budget, and the run counts them.
  assert result.final_row["t_actor_over_budget"] > 0


def test_final_checkpoint_after_an_actor_crash(tmp_path):
  # Budget 20k steps: the envs crash at 600; a run that ignored the crash
  # would end by budget and fail the `raises`.
  config = tiny_run(tmp_path, total_env_steps=20_000)
  with pytest.raises(run.RunError, match="environment exploded on purpose"):
    ald_jax.train(config, env_factory=functools.partial(
        test_system_run.CrashingEnv, crash_after=150))
  ckpt_dir = tmp_path / run.CHECKPOINT_DIR
  steps = sorted(int(name) for name in os.listdir(ckpt_dir) if name.isdigit())
  assert steps, "no final checkpoint after the crash"
  env = imaze.IMaze(seed=0)
  learner = learner_lib.make_learner(config.learner,
                                     env.observation_spec().shape,
                                     int(env.action_spec().num_values))
  target = learner.init(jax.random.PRNGKey(0), learner.example_batch(
      config.learner.batch_size))
  state, metadata = checkpoint_lib.restore_latest(ckpt_dir, target)
  # The checkpoint holds the work done before the crash.
  assert metadata["learner_steps"] == steps[-1] == int(state.step)
  # Stopped by the crash (each env raises at its 150th step), far from the
  # 20k budget; the count may include a few steps the other actor took
  # before the stop reached it.
  assert 0 < metadata["env_steps"] < config.total_env_steps // 10
  rows = metrics_lib.read_metrics(tmp_path)
  assert rows[-1]["stopped_by"] == "error"
