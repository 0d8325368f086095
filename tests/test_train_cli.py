"""The absl CLI: flags map onto TrainConfig; bad flags fail before any work."""
import dataclasses
import os
import subprocess
import sys

from absl import app
from absl import flags
import pytest

import ald_jax
from ald_jax import config as config_lib
from ald_jax import train


def parse(*argv) -> config_lib.TrainConfig:
  flag_values = flags.FlagValues()
  train.define_flags(flag_values)
  flag_values(["prog", *argv])
  return train.config_from_flags(flag_values)


def test_defaults_match_the_config_defaults():
  config = parse()
  assert config.logdir.startswith(os.path.join("runs", "ald_imaze_"))
  # ald: one distill step per RL step; everything else as in the dataclasses.
  assert config == dataclasses.replace(config_lib.TrainConfig(),
                                       logdir=config.logdir)


def test_flags_reach_nested_fields():
  config = parse("--agent=transformer", "--gtrxl_num_layers=2",
                 "--torso_mlp_sizes=32,16", "--env_kwargs={\"corridor_length\": 8}",
                 "--learner_lr=1e-3", "--max_grad_norm=5", "--resume")
  assert config.learner.agent == "transformer"
  assert config.distill_steps_per_rl_step == 0.0  # resolved for non-ald agents
  assert config.learner.gtrxl.num_layers == 2
  assert config.learner.torso.mlp_sizes == (32, 16)
  assert config.env_kwargs_dict == {"corridor_length": 8}
  assert config.learner.learner_optimizer.learning_rate == 1e-3
  assert config.learner.actor_optimizer.max_grad_norm == 5.0
  assert config.resume


@pytest.mark.parametrize("argv, flag", [
    (["--distill_steps_per_rl_step=-1"], "--distill_steps_per_rl_step"),
    (["--unroll_length=0"], "--unroll_length"),
    (["--envs_per_actor=0"], "--envs_per_actor"),
    (["--gtrxl_num_heads=3"], "--gtrxl_d_model"),
    (["--agent=lstm", "--distill_steps_per_rl_step=2"],
     "--distill_steps_per_rl_step"),
    (["--env_kwargs=[1, 2]"], "env_kwargs"),
    (["--torso_mlp_sizes=a,b"], "--torso_mlp_sizes"),
])
def test_bad_values_name_the_flag(argv, flag):
  with pytest.raises(app.UsageError, match=flag):
    parse(*argv)


def test_unknown_agent_is_rejected_by_the_parser():
  with pytest.raises(flags.IllegalFlagValueError, match="agent"):
    parse("--agent=gru")


def test_cli_exits_nonzero_before_any_work(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "ald_jax.train", "--unroll_length=0",
       f"--logdir={tmp_path / 'run'}"],
      capture_output=True, text=True, timeout=120, check=False)
  assert result.returncode != 0
  assert "--unroll_length: must be a positive integer, got 0" in (
      result.stdout + result.stderr)
  assert not (tmp_path / "run").exists()  # nothing was started or written


def test_package_is_callable_as_train():
  assert callable(ald_jax.train)
  assert ald_jax.train.config_from_flags is train.config_from_flags
