"""Config validation: every bad value is a ConfigError naming its field."""
import dataclasses
import math

import numpy as np
import pytest

from ald_jax import config as config_lib

NESTED = (("torso", None), ("lstm", 128), ("gtrxl", "x"), ("vmpo", "x"),
          ("vtrace", {}), ("distill", None), ("learner_optimizer", 3e-4),
          ("actor_optimizer", config_lib.VMPOConfig()))


@pytest.mark.parametrize("field, value", NESTED)
def test_nested_config_of_the_wrong_type_names_the_field(field, value):
  with pytest.raises(config_lib.ConfigError, match=f"^{field}: must be a "):
    config_lib.LearnerConfig(**{field: value})


def test_several_bad_nested_configs_fail_at_construction():
  # Used to be accepted, then failed inside jit.
  with pytest.raises(config_lib.ConfigError, match="torso|vmpo|distill"):
    config_lib.LearnerConfig(distill=None, vmpo="x", torso=3)
  with pytest.raises(config_lib.ConfigError, match="^learner: must be a "):
    config_lib.TrainConfig(learner={"agent": "ald"})


@pytest.mark.parametrize("value", [math.inf, math.nan, "1", None, True])
def test_lstm_forget_bias_must_be_a_finite_number(value):
  with pytest.raises(config_lib.ConfigError, match="^lstm.forget_bias: "):
    config_lib.LSTMConfig(forget_bias=value)


@pytest.mark.parametrize("value", [math.inf, math.nan, -1.0, "1"])
def test_distill_ratio_must_be_finite_and_non_negative(value):
  with pytest.raises(config_lib.ConfigError,
                     match="^distill_steps_per_rl_step: "):
    config_lib.TrainConfig(distill_steps_per_rl_step=value)


@pytest.mark.parametrize("make, field", [
    (lambda v: config_lib.LearnerConfig(discount=v), "discount"),
    (lambda v: config_lib.VMPOConfig(top_k_fraction=v), "vmpo.top_k_fraction"),
    (lambda v: config_lib.VTraceConfig(lambda_=v), "vtrace.lambda_"),
])
@pytest.mark.parametrize("value", ["x", None, [0.5], math.nan, True, 1.5,
                                   -0.1])
def test_probabilities_reject_non_numbers_and_out_of_range(make, field, value):
  with pytest.raises(config_lib.ConfigError, match=f"^{field}: "):
    make(value)


@pytest.mark.parametrize("make, field", [
    (lambda v: config_lib.OptimizerConfig(learning_rate=v),
     "optimizer.learning_rate"),
    (lambda v: config_lib.VMPOConfig(value_cost=v), "vmpo.value_cost"),
    (lambda v: config_lib.VMPOConfig(epsilon_eta=v), "vmpo.epsilon_eta"),
    (lambda v: config_lib.DistillConfig(policy_cost=v), "distill.policy_cost"),
    (lambda v: config_lib.VTraceConfig(entropy_cost=v), "vtrace.entropy_cost"),
    (lambda v: config_lib.GTrXLConfig(gate_bias=v), "gtrxl.gate_bias"),
])
@pytest.mark.parametrize("value", [math.inf, math.nan, "0.1"])
def test_coefficients_must_be_finite_numbers(make, field, value):
  with pytest.raises(config_lib.ConfigError, match=f"^{field}: "):
    make(value)


@pytest.mark.parametrize("changes, field", [
    (dict(seed=True), "seed"), (dict(seed=1.5), "seed"),
    (dict(seed=2**63), "seed"), (dict(seed=-1), "seed"),
    (dict(resume="yes"), "resume"), (dict(pin_learner=1), "pin_learner"),
    (dict(t_actor_policy=["warn"]), "t_actor_policy"),
    (dict(max_wall_time_s=math.nan), "max_wall_time_s"),
    (dict(report_interval_s=0), "report_interval_s"),
    (dict(num_actors=2.0), "num_actors"),
])
def test_train_config_fields(changes, field):
  with pytest.raises(config_lib.ConfigError, match=f"^{field}: "):
    config_lib.TrainConfig(**changes)


def test_unlimited_values_stay_allowed():
  """inf is meaningful for intervals, budgets and gradient clipping."""
  config = config_lib.TrainConfig(
      max_wall_time_s=math.inf, checkpoint_interval_s=math.inf,
      report_interval_s=math.inf, t_actor_budget_ms=math.inf,
      learner=dataclasses.replace(
          config_lib.LearnerConfig(),
          learner_optimizer=config_lib.OptimizerConfig(max_grad_norm=math.inf)))
  assert math.isinf(config.max_wall_time_s)
  # numpy scalars are numbers too.
  assert config_lib.LearnerConfig(discount=np.float32(0.5),
                                  batch_size=np.int64(4)).batch_size == 4


def test_replay_smaller_than_a_batch_fails_at_construction():
  with pytest.raises(config_lib.ConfigError,
                     match=r"^replay_capacity: must be >= batch_size \(16\)"):
    config_lib.TrainConfig(replay_capacity=8)
  # Agents without distill-only steps keep no replay.
  config_lib.TrainConfig(replay_capacity=8,
                         learner=config_lib.LearnerConfig(agent="lstm"))


def test_env_kwargs_have_one_order():
  """Python and the CLI (sorted) give the same config for the same kwargs,
  so a resume from the other compares equal."""
  config = config_lib.TrainConfig(
      env_kwargs=(("wrong_reward", 0.0), ("corridor_length", 8)))
  assert config.env_kwargs == (("corridor_length", 8), ("wrong_reward", 0.0))


@pytest.mark.parametrize("agent, ratio", [("ald", 4.0), ("lstm", 0.0),
                                          ("transformer", 0.0),
                                          ("asymmetric", 0.0)])
def test_config_owns_the_distill_ratio_default(agent, ratio):
  """None (the default) resolves per agent: only 'ald' has an actor to
  distill into, so TrainConfig(learner=LearnerConfig(agent="lstm")) builds."""
  cfg = config_lib.TrainConfig(learner=config_lib.LearnerConfig(agent=agent))
  assert cfg.distill_steps_per_rl_step == ratio
