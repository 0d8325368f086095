"""A resumed run continues: counters, metrics, parameters, replay RNG, seeds.

Runs through the public entry point (`ald_jax.train(config, env_factory)`),
to N env steps and then, with `resume=True`, to 2N. What segment 2 starts
from is observed without hooks in the library: the learner's `step` is
wrapped (via `ald_jax.learner.make_learner`) to copy the first state its
`train_step` is given and the first state a distill-only step samples the
replay with (`LearnerState.rng` drives replay sampling); the environment
factory appends every seed it is called with to a file (so it
works wherever the actors run).
"""
import json
import os

import jax
import numpy as np
import pytest

import ald_jax
from ald_jax import checkpoint as checkpoint_lib
from ald_jax import config as config_lib
from ald_jax import learner as learner_lib
from ald_jax import metrics as metrics_lib
from ald_jax.envs import imaze
from ald_jax.system import run
import helpers  # pylint: disable=g-bad-import-order

SEED = 3


def tiny_config(logdir, total_env_steps, resume=False):
  # The learner, stream count and replay of tests/test_system_run.py's
  # tiny_run: its compiled learner steps are shared.
  learner = helpers.tiny_learner("ald")
  return config_lib.TrainConfig(
      learner=learner, num_actors=2, envs_per_actor=4,
      total_env_steps=total_env_steps, distill_steps_per_rl_step=1.0,
      replay_capacity=64, queue_capacity=4, t_actor_budget_ms=1000.0,
      calibration_steps=5, report_interval_s=0.2,
      checkpoint_interval_s=3600.0, logdir=str(logdir), seed=SEED,
      resume=resume,
      # The gap evaluation's environments would add their seeds to the
      # factory's record of the actors' seeds.
      eval_interval_s=0.0,
      # Segment 2 runs to 2N: the budget is the one field allowed to change.
      resume_allow_change=("total_env_steps",) if resume else ())


class SeedRecordingIMaze:
  """An I-Maze factory that appends each seed it builds with to a file."""

  def __init__(self, path):
    self.path = str(path)

  def __call__(self, seed):
    with open(self.path, "a", encoding="utf-8") as f:
      f.write(f"{int(seed)}\n")
    return imaze.IMaze(seed=seed)

  def seeds(self):
    with open(self.path, encoding="utf-8") as f:
      return [int(line) for line in f if line.strip()]


def host_copy(tree):
  return jax.tree_util.tree_map(lambda x: np.array(x, copy=True), tree)


@pytest.fixture
def first_states(monkeypatch):
  """Records the state given to the first combined step and to the first
  distill-only step of a run (before the jitted calls donate them)."""
  recorded = {}
  original = learner_lib.make_learner

  def make_learner(*args, **kwargs):
    learner = original(*args, **kwargs)
    train_step, distill = learner.train_step, learner.replay_distill_steps

    def recording_train_step(state, *rest, **kwargs):
      recorded.setdefault("train", host_copy(state))
      return train_step(state, *rest, **kwargs)

    def recording_distill(state, replay, num_steps):
      recorded.setdefault("distill", host_copy(state))
      return distill(state, replay, num_steps=num_steps)

    return learner._replace(train_step=recording_train_step,
                            replay_distill_steps=recording_distill)

  monkeypatch.setattr(learner_lib, "make_learner", make_learner)
  return recorded


def assert_trees_equal(a, b):
  a_leaves, a_def = jax.tree_util.tree_flatten(a)
  b_leaves, b_def = jax.tree_util.tree_flatten(b)
  assert a_def == b_def
  for x, y in zip(a_leaves, b_leaves):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def read_lines(path):
  with open(path, encoding="utf-8") as f:
    return [line for line in f if line.strip()]


def test_resume_continues_from_the_checkpoint(tmp_path, first_states):
  run_dir = tmp_path / "run"
  factory = SeedRecordingIMaze(tmp_path / "seeds.txt")
  first = ald_jax.train(tiny_config(run_dir, 600), env_factory=factory)
  assert first.stopped_by == "budget"
  n = first.final_row["env_steps"]
  assert n >= 600 and first.final_row["learner_steps"] > 0
  assert first.final_row["distill_steps"] > 0
  seeds_first = factory.seeds()
  metrics_path = os.path.join(first.run_dir, "metrics.jsonl")
  rows_first = read_lines(metrics_path)
  assert len(rows_first) >= 2

  # The checkpoint segment 2 will restore: the final state of segment 1.
  ckpt_dir = os.path.join(first.run_dir, run.CHECKPOINT_DIR)
  checkpointed, metadata = checkpoint_lib.restore_latest(ckpt_dir, first.state)
  assert_trees_equal(checkpointed, first.state)
  # The final checkpoint is written before the actors stop: the steps they
  # take meanwhile are in segment 1's last row (n), not in the checkpoint.
  assert 600 <= metadata["env_steps"] <= n
  assert metadata["learner_steps"] == first.final_row["learner_steps"]
  # Segment 1 drew from the replay, so its sampling key has moved on from
  # the seed's.
  initial_rng = first_states["train"].rng
  assert not np.array_equal(np.asarray(checkpointed.rng),
                            np.asarray(initial_rng))

  first_states.clear()
  open(factory.path, "w").close()
  second = ald_jax.train(tiny_config(run_dir, 2 * n, resume=True),
                         env_factory=factory)
  assert second.stopped_by == "budget"

  # Parameters, optimizer states, target network, counters: the first
  # learner step of segment 2 starts from the checkpoint.
  assert "train" in first_states, "segment 2 took no learner step"
  assert_trees_equal(first_states["train"], checkpointed)
  # The replay sampling key continues from the checkpointed one (the first
  # distill-only step follows the first combined step, which keeps rng).
  assert "distill" in first_states, "segment 2 took no distill-only step"
  np.testing.assert_array_equal(np.asarray(first_states["distill"].rng),
                                np.asarray(checkpointed.rng))

  # Counters grow from the restored ones.
  assert second.final_row["env_steps"] >= 2 * n
  assert second.final_row["learner_steps"] > metadata["learner_steps"]
  assert second.final_row["distill_steps"] > metadata["distill_steps"]
  assert 0 < metadata["episodes_total"] <= first.final_row["episodes_total"]
  assert all(row["episodes_total"] >= metadata["episodes_total"]
             for row in metrics_lib.read_metrics(second.run_dir)[
                 len(rows_first):])
  assert int(second.state.step) == second.final_row["learner_steps"]
  # (Every learner step moved the state's counter: none were non-finite.)
  assert second.final_row["nonfinite_total"] == 0

  # Segment 1's metric rows up to the checkpoint are kept, unchanged, as a
  # prefix; the rows of segment 2 continue after them. Segment 1's last row
  # may count env steps its actors took after the final checkpoint (written
  # before they stop): segment 2 takes those steps again, so the resume drops
  # that row rather than let env_steps run backwards.
  kept_first = [line for line in rows_first
                if json.loads(line)["env_steps"] <= metadata["env_steps"]]
  assert len(kept_first) >= len(rows_first) - 1
  rows_all = read_lines(metrics_path)
  assert rows_all[:len(kept_first)] == kept_first
  rows_second = metrics_lib.read_metrics(second.run_dir)[len(kept_first):]
  assert rows_second
  assert all(row["env_steps"] >= metadata["env_steps"] for row in rows_second)
  assert rows_second[-1]["env_steps"] >= 2 * n
  assert all(row["learner_steps"] >= metadata["learner_steps"]
             for row in rows_second)
  assert rows_second[-1]["learner_steps"] == second.final_row["learner_steps"]

  # The actors' environments get new seeds in the new segment (the probe
  # environment is built with the config seed both times).
  seeds_second = factory.seeds()
  actor_first = set(seeds_first) - {SEED}
  actor_second = set(seeds_second) - {SEED}
  assert len(actor_first) == len(actor_second) == 8  # 2 actors x 4 envs
  assert not actor_first & actor_second

  # The new segment's checkpoint continues the numbering and the counters.
  _, metadata_second = checkpoint_lib.restore_latest(ckpt_dir, second.state)
  assert metadata_second["segment"] == metadata["segment"] + 1
  assert metadata_second["learner_steps"] == second.final_row["learner_steps"]
