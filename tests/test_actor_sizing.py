"""--lstm_hidden_size=auto: the largest actor that fits the T_actor budget
(ald_jax/system/actor_sizing.py)."""
import dataclasses
import json
import math
import os

from absl import app
from absl import flags
import numpy as np
import pytest

from ald_jax import config as config_lib
from ald_jax import train as train_cli
from ald_jax.system import actor_sizing
from ald_jax.system import run
from ald_jax.system import run_dir as run_dir_lib
from ald_jax.system import timing


def _summary(p99_us, p50_us=None):
  p50_us = p99_us / 2 if p50_us is None else p50_us
  return timing.LatencySummary(count=10, window=10, p50_us=p50_us,
                               p90_us=p99_us, p99_us=p99_us, max_us=p99_us,
                               mean_us=p50_us, over_budget=0, budget_ms=None)


def fake_calibration(us_per_unit=10.0):
  """p99 = us_per_unit * hidden_size; records each width it was asked."""
  asked = []

  def calibrate(config, obs_shape, num_actions, cores):
    del obs_shape, num_actions, cores
    width = config.learner.lstm.hidden_size
    asked.append(width)
    return _summary(us_per_unit * width)
  calibrate.asked = asked
  return calibrate


def _config(budget_ms, **changes):
  return config_lib.TrainConfig(t_actor_budget_ms=budget_ms, **changes)


def test_picks_the_largest_width_within_the_budget():
  calibrate = fake_calibration()     # 32 -> 320 us ... 512 -> 5.12 ms
  record = actor_sizing.choose_width(_config(3.0), (4,), 3,
                                     calibrate=calibrate)
  assert record["hidden_size"] == 256     # 2.56 ms <= 3 < 5.12 ms
  assert calibrate.asked == [32, 64, 128, 256, 512]
  assert [r["fits"] for r in record["ladder"]] == [True] * 4 + [False]
  assert record["ladder"][2] == {"hidden_size": 128, "p50_us": 640.0,
                                 "p99_us": 1280.0, "fits": True}
  assert record["budget_ms"] == 3.0 and record["envs"] == 8
  # A tighter budget: a smaller actor.
  tighter = actor_sizing.choose_width(_config(0.7), (4,), 3,
                                      calibrate=fake_calibration())
  assert tighter["hidden_size"] == 64
  # The budget is inclusive, like the run's refusal (p99 > budget refuses).
  exact = actor_sizing.choose_width(_config(1.28), (4,), 3,
                                    calibrate=fake_calibration())
  assert exact["hidden_size"] == 128


def test_refuses_when_even_the_smallest_does_not_fit():
  with pytest.raises(timing.TActorBudgetError) as info:
    actor_sizing.choose_width(_config(0.1), (4,), 3,
                              calibrate=fake_calibration())
  message = str(info.value)
  assert "no actor width fits" in message
  for width, p99 in ((32, 320), (512, 5120)):
    assert f"{width}: p99 {p99} us" in message
  assert math.isclose(info.value.p99_ms, 0.32)
  assert info.value.budget_ms == 0.1


def test_bad_ladders_and_agents_are_refused():
  with pytest.raises(config_lib.ConfigError, match="ladder"):
    actor_sizing.choose_width(_config(1.0), (4,), 3, ladder=(),
                              calibrate=fake_calibration())
  with pytest.raises(config_lib.ConfigError, match="ladder"):
    actor_sizing.choose_width(_config(1.0), (4,), 3, ladder=(32, -1),
                              calibrate=fake_calibration())
  gtrxl = _config(1.0, learner=config_lib.LearnerConfig(agent="transformer"),
                  distill_steps_per_rl_step=0.0)
  with pytest.raises(config_lib.ConfigError, match="acts with its GTrXL"):
    actor_sizing.choose_width(gtrxl, (4,), 3, calibrate=fake_calibration())


def test_real_calibration_of_one_width():
  """The injected function's default: the run's own pinned calibration."""
  config = _config(1000.0, calibration_steps=5, envs_per_actor=8,
                   learner=config_lib.LearnerConfig(
                       torso=config_lib.TorsoConfig(mlp_sizes=(8,))))
  summary = actor_sizing.calibrate_width(
      actor_sizing.with_width(config, 16), (4,), 3, cores=None)
  assert summary.count == 5 and np.isfinite(summary.p99_us)
  assert summary.p99_us >= summary.p50_us > 0


def test_cli_accepts_auto():
  flag_values = flags.FlagValues()
  train_cli.define_flags(flag_values)
  flag_values(["prog", "--lstm_hidden_size=auto"])
  assert train_cli.auto_width_requested(flag_values)
  config = train_cli.config_from_flags(flag_values)
  assert config.learner.lstm.hidden_size == config_lib.LSTMConfig().hidden_size
  assert train_cli.config_from_argv(
      ["--lstm_hidden_size=48"]).learner.lstm.hidden_size == 48
  # A config cannot hold "auto": no silent default width from Python.
  with pytest.raises(app.UsageError, match="resolve_auto_width"):
    train_cli.config_from_argv(["--lstm_hidden_size=auto"])
  with pytest.raises(app.UsageError,
                     match="--lstm_hidden_size: expected an integer or 'auto'"):
    train_cli.config_from_argv(["--lstm_hidden_size=big"])
  with pytest.raises(app.UsageError, match="--lstm_hidden_size"):
    train_cli.config_from_argv(["--lstm_hidden_size=0"])


def _tiny_run(logdir, budget_ms, **changes):
  return config_lib.TrainConfig(
      learner=config_lib.LearnerConfig(
          agent="lstm", rl_loss="vtrace", unroll_length=8, learner_context=0,
          batch_size=4, torso=config_lib.TorsoConfig(mlp_sizes=(16,))),
      num_actors=1, envs_per_actor=4, total_env_steps=200,
      queue_capacity=2, t_actor_budget_ms=budget_ms, calibration_steps=5,
      report_interval_s=0.5, eval_interval_s=0.0, tensorboard=False,
      logdir=str(logdir), seed=2, **changes)


def test_choice_lands_in_config_json_and_resume_keeps_it(tmp_path):
  config = _tiny_run(tmp_path / "run", budget_ms=0.5)
  sized, record = actor_sizing.resolve_auto_width(
      config, calibrate=fake_calibration(us_per_unit=4.0))
  assert sized.learner.lstm.hidden_size == 64     # 256 us <= 0.5 ms < 512
  # The fake calibration chose the width; the run's own calibration must
  # not refuse it.
  sized = dataclasses.replace(sized, t_actor_budget_ms=1000.0)
  run.train(sized, actor_sizing=record)
  stored = run_dir_lib.read_latest_config(tmp_path / "run")
  assert stored["train"]["learner"]["lstm"]["hidden_size"] == 64
  assert stored["actor_sizing"]["hidden_size"] == 64
  assert [r["hidden_size"] for r in stored["actor_sizing"]["ladder"]] == [
      32, 64, 128, 256, 512]

  def must_not_calibrate(*args):
    raise AssertionError(f"a resume recalibrated: {args}")
  resumed_config = dataclasses.replace(sized, resume=True)
  resumed, resumed_record = actor_sizing.resolve_auto_width(
      resumed_config, calibrate=must_not_calibrate)
  assert resumed.learner.lstm.hidden_size == 64
  assert resumed_record["ladder"] == stored["actor_sizing"]["ladder"]
  assert resumed_record["resumed"] is True
  # The resumed segment (nothing left to do) writes its config with the
  # stored record, also when no record is passed.
  run.train(resumed)
  with open(os.path.join(tmp_path / "run", "config.1.json"),
            encoding="utf-8") as f:
    segment = json.load(f)
  assert segment["actor_sizing"]["hidden_size"] == 64
  assert segment["train"]["learner"]["lstm"]["hidden_size"] == 64
