"""The jitted ALD learner step: isolation, learning, compilation, errors."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ald_jax import config as config_lib
from ald_jax import learner as learner_lib
from ald_jax import types

OBS_SHAPE = (6,)
NUM_ACTIONS = 3


def tiny_config(**changes) -> config_lib.LearnerConfig:
  base = config_lib.LearnerConfig(
      unroll_length=5, learner_context=4, batch_size=3,
      torso=config_lib.TorsoConfig(mlp_sizes=(16,)),
      lstm=config_lib.LSTMConfig(hidden_size=16),
      gtrxl=config_lib.GTrXLConfig(num_layers=1, d_model=16, num_heads=2,
                                   mlp_size=32, memory_length=6),
      distill=config_lib.DistillConfig(learner_pull_cost=0.1),
      vmpo=config_lib.VMPOConfig(target_update_period=3),
  )
  return dataclasses.replace(base, **changes)


def random_batch(learner, seed=0) -> types.Batch:
  cfg = learner.config
  rng = np.random.default_rng(seed)
  b, length = cfg.batch_size, cfg.sequence_length
  step_type = np.full((b, length), types.MID, np.int32)
  step_type[:, 0] = types.FIRST
  step_type[0, 6] = types.LAST      # an episode ends inside the unroll ...
  step_type[0, 7] = types.FIRST     # ... and the next one starts
  reward = rng.normal(size=(b, length)).astype(np.float32)
  discount = np.ones((b, length), np.float32)
  discount[0, 6] = 0.0
  example = learner.example_batch(b)
  actor_state = jax.tree_util.tree_map(
      lambda x: rng.normal(size=x.shape).astype(np.float32) * 0.1,
      example.actor_state)
  return types.Batch(
      observation=rng.normal(size=(b, length, *learner.obs_shape)).astype(
          np.float32),
      action=rng.integers(0, learner.num_actions, (b, length)).astype(np.int32),
      reward=reward, discount=discount, step_type=step_type,
      behaviour_logits=rng.normal(size=(b, length, learner.num_actions)).astype(
          np.float32),
      actor_state=actor_state)


def build(**changes):
  learner = learner_lib.make_learner(tiny_config(**changes), OBS_SHAPE,
                                     NUM_ACTIONS)
  batch = random_batch(learner)
  state = learner.init(jax.random.PRNGKey(0), batch)
  return learner, batch, state


def tree_norm(tree) -> float:
  return float(sum(jnp.sum(jnp.abs(x)) for x in jax.tree_util.tree_leaves(tree)))


ISOLATION_METRICS = ("learner/rl_loss", "distill/policy_kl",
                     "distill/value_loss", "learner/pull_kl")


def component_grads(learner, state, batch):
  """{metric: (learner grads, actor grads)} for each loss component, in one
  compilation (op by op, these gradients cost more than compiling them)."""
  def component(learner_params, actor_params, metric):
    _, metrics = learner.losses(learner_params, actor_params,
                                state.target_params, batch)
    return metrics[metric]

  @jax.jit
  def all_grads(learner_params, actor_params):
    return {metric: jax.grad(component, argnums=(0, 1))(
        learner_params, actor_params, metric) for metric in ISOLATION_METRICS}
  return all_grads(state.learner_params, state.actor_params)


@pytest.mark.parametrize("rl_loss", ["vmpo", "vtrace"])
def test_gradient_isolation(rl_loss):
  learner, batch, state = build(rl_loss=rl_loss)
  grads = component_grads(learner, state, batch)
  # RL loss: gradient on the learner only.
  learner_g, actor_g = grads["learner/rl_loss"]
  assert tree_norm(learner_g["net"]) > 0
  assert tree_norm(actor_g) == 0.0
  # Distillation (policy and value): gradient on the actor only.
  for metric in ("distill/policy_kl", "distill/value_loss"):
    learner_g, actor_g = grads[metric]
    assert tree_norm(learner_g) == 0.0, metric
    assert tree_norm(actor_g) > 0, metric
  # The beta pull KL(sg[pi_A] || pi_L): gradient on the learner only.
  learner_g, actor_g = grads["learner/pull_kl"]
  assert tree_norm(learner_g["net"]) > 0
  assert tree_norm(actor_g) == 0.0


def perturbed_actor(state, scale=0.5, seed=3):
  """Moves the actor away from the learner so distillation has work to do."""
  leaves, treedef = jax.tree_util.tree_flatten(state.actor_params)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  noisy = [x + scale * jax.random.normal(k, x.shape, x.dtype)
           for x, k in zip(leaves, keys)]
  return state.replace(
      actor_params=jax.tree_util.tree_unflatten(treedef, noisy))


def test_step_compiles_once_and_lowers_distillation_loss():
  learner, batch, state = build()
  state = perturbed_actor(state)
  placed = jax.device_put(batch)
  first_kl = None
  for _ in range(40):
    state, metrics = learner.step(state, placed)
    if first_kl is None:
      first_kl = float(metrics["distill/policy_kl"])
  # The teacher moves too (RL on the same batch); measured ~0.55x at 40 steps.
  assert float(metrics["distill/policy_kl"]) < 0.7 * first_kl
  assert learner.step._cache_size() == 1
  assert int(state.step) == 40
  assert float(metrics["nonfinite"]) == 0.0


# Every agent with V-MPO (the default) and ald/lstm with V-trace in `make
# test`; V-trace with the GTrXL agents (the costliest compiles) in test-slow.
@pytest.mark.parametrize("agent,rl_loss", [
    (a, loss) if loss == "vmpo" or a in ("ald", "lstm")
    else pytest.param(a, loss, marks=pytest.mark.slow)
    for a in config_lib.AGENTS for loss in ("vmpo", "vtrace")])
def test_every_agent_steps(agent, rl_loss):
  learner, batch, state = build(agent=agent, rl_loss=rl_loss)
  before = jax.tree_util.tree_map(np.array, learner.actor_params(state))
  state, metrics = learner.step(state, batch)
  for name, value in metrics.items():
    assert np.isfinite(value), name
  after = learner.actor_params(state)
  moved = jax.tree_util.tree_map(lambda a, b: np.abs(a - b).sum(), before,
                                 after)
  assert sum(jax.tree_util.tree_leaves(moved)) > 0  # the acting policy learns
  # The actor core acts with the published parameters.
  core = learner.actor_core
  core_state = core.initial_state(2)
  obs = np.zeros((2, *OBS_SHAPE), np.float32)
  step_type = np.array([types.FIRST, types.FIRST], np.int32)
  action, logits, core_state = jax.jit(core.step)(
      after, obs, step_type, core_state, jax.random.PRNGKey(1))
  assert action.shape == (2,) and logits.shape == (2, NUM_ACTIONS)
  assert np.all((action >= 0) & (action < NUM_ACTIONS))


def test_vmpo_target_refreshes_every_period():
  learner, batch, state = build()
  net = lambda s: s.learner_params["net"]
  for step in range(1, 7):
    state, metrics = learner.step(state, batch)
    # A refresh copies the new parameters, but XLA may compute the copy in a
    # fusion of its own: at -O0 on CPU it differed by float32 rounding (norm
    # ~7e-8), while one Adam step moves every parameter by ~lr = 3e-4 (norm
    # ~1.6 here).
    distance = float(tree_norm(jax.tree_util.tree_map(
        jnp.subtract, net(state), state.target_params)))
    assert (distance < 1e-6) == (step % 3 == 0), (step, distance)
    assert float(metrics["vmpo/target_refreshed"]) == float(step % 3 == 0)


def test_distill_step_moves_actor_only_and_lowers_loss():
  learner, batch, state = build()
  state = perturbed_actor(state)
  learner_before = jax.tree_util.tree_map(np.array, state.learner_params)
  first = None
  for _ in range(20):
    state, metrics = learner.distill_step(state, batch)
    first = first if first is not None else float(metrics["distill/policy_kl"])
  assert float(metrics["distill/policy_kl"]) < first
  assert tree_norm(jax.tree_util.tree_map(jnp.subtract, learner_before,
                                          state.learner_params)) == 0.0
  assert int(state.distill_step) == 20 and int(state.step) == 0


def test_nonfinite_batch_skips_update():
  learner, batch, state = build()
  before = jax.tree_util.tree_map(np.array, state)
  bad = batch.replace(reward=np.full_like(batch.reward, np.nan))
  state, metrics = learner.step(state, bad)
  assert float(metrics["nonfinite"]) == 1.0
  assert int(state.step) == 0
  # The whole state is unchanged: parameters, optimizer states (Adam counts
  # and moments), the target network, counters and rng.
  before_leaves, before_def = jax.tree_util.tree_flatten(before)
  after_leaves, after_def = jax.tree_util.tree_flatten(state)
  assert before_def == after_def
  assert len(after_leaves) > 10
  for old, new in zip(before_leaves, after_leaves):
    np.testing.assert_array_equal(np.asarray(old), np.asarray(new))


def test_action_count_mismatch_is_a_clear_error():
  learner = learner_lib.make_learner(tiny_config(), OBS_SHAPE, NUM_ACTIONS)
  batch = random_batch(learner)
  wrong = batch.replace(behaviour_logits=np.zeros(
      (*batch.action.shape, NUM_ACTIONS + 1), np.float32))
  with pytest.raises(ValueError, match="num_actions=3"):
    learner.init(jax.random.PRNGKey(0), wrong)


def test_sequence_length_mismatch_is_a_clear_error():
  learner = learner_lib.make_learner(tiny_config(), OBS_SHAPE, NUM_ACTIONS)
  other = learner_lib.make_learner(tiny_config(learner_context=2), OBS_SHAPE,
                                   NUM_ACTIONS)
  with pytest.raises(ValueError, match="learner_context"):
    learner.init(jax.random.PRNGKey(0), random_batch(other))


@pytest.mark.parametrize("changes, field", [
    (dict(learner_context=-1), "learner_context"),
    (dict(unroll_length=0), "unroll_length"),
    (dict(agent="gru"), "agent"),
    (dict(rl_loss="ppo"), "rl_loss"),
    (dict(distill=None), "distill"),
    (dict(vmpo="x"), "vmpo"),
    (dict(torso=3), "torso"),
    (dict(discount="x"), "discount"),
])
def test_bad_config_names_the_field(changes, field):
  with pytest.raises(config_lib.ConfigError, match=f"^{field}: "):
    tiny_config(**changes)


def test_bad_nested_value_names_the_nested_field():
  with pytest.raises(config_lib.ConfigError, match="^distill.policy_cost: "):
    config_lib.DistillConfig(policy_cost=-1.0)


def test_bad_num_actions_and_obs_shape():
  with pytest.raises(config_lib.ConfigError, match="num_actions"):
    learner_lib.make_learner(tiny_config(), OBS_SHAPE, 1)
  with pytest.raises(config_lib.ConfigError, match="observation shape"):
    learner_lib.make_learner(tiny_config(), (3, 4), NUM_ACTIONS)
