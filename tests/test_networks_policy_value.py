"""Policy-value nets: shapes, step == sequence, near-uniform initial policy."""
import jax
import jax.numpy as jnp
import numpy as np

from ald_jax.config import GTrXLConfig, LSTMConfig, TorsoConfig
from ald_jax.networks.policy_value import (POLICY_INIT_SCALE,
                                           GTrXLPolicyValueNet,
                                           LSTMPolicyValueNet,
                                           PolicyValueHead, pack_lstm_state,
                                           unpack_lstm_state)
from ald_jax.types import FIRST, MID, AgentOutput, LSTMState

TORSO = TorsoConfig(conv_channels=(3,), mlp_sizes=(8,))
NUM_ACTIONS = 5
BATCH, LENGTH = 2, 9


def episode_step_types():
  step_type = np.full((BATCH, LENGTH), MID, np.int32)
  step_type[:, 0] = FIRST
  step_type[1, 4] = FIRST
  return step_type


def observations(obs_shape, seed=0):
  rng = np.random.default_rng(seed)
  return rng.normal(size=(BATCH, LENGTH, *obs_shape)).astype(np.float32)


def assert_near_uniform(logits):
  # Policy columns start at 1% of the usual init scale.
  probs = jax.nn.softmax(logits, axis=-1)
  np.testing.assert_allclose(probs, 1 / NUM_ACTIONS, atol=0.01)


def test_lstm_net_shapes_and_step_matches_sequence():
  obs_shape = (3, 3, 2)  # a grid observation
  net = LSTMPolicyValueNet(TORSO, LSTMConfig(hidden_size=7), NUM_ACTIONS,
                           obs_ndim=3)
  obs, step_type = observations(obs_shape), episode_step_types()
  state = net.initial_state(BATCH)

  @jax.jit  # init and apply in one compilation
  def init_apply(rng):
    params = net.init(rng, obs, step_type, state)
    return params, net.apply(params, obs, step_type, state)

  params, (out, final) = init_apply(jax.random.PRNGKey(0))
  head = params["params"]["head"]["Dense_0"]["kernel"]
  assert head.shape == (7, NUM_ACTIONS + 1)
  assert isinstance(out, AgentOutput) and isinstance(final, LSTMState)
  assert out.logits.shape == (BATCH, LENGTH, NUM_ACTIONS)
  assert out.value.shape == (BATCH, LENGTH)
  assert_near_uniform(out.logits)
  assert_logits_depend_on_input(out.logits)
  step = jax.jit(lambda p, o, s, c: net.apply(p, o, s, c, method="step"))
  for t in range(LENGTH):
    step_out, state = step(params, obs[:, t], step_type[:, t], state)
    assert step_out.logits.shape == (BATCH, NUM_ACTIONS)
    assert step_out.value.shape == (BATCH,)
    np.testing.assert_allclose(step_out.logits, out.logits[:, t], atol=1e-6)
    np.testing.assert_allclose(step_out.value, out.value[:, t], atol=1e-6)
  np.testing.assert_allclose(state.hidden, final.hidden, atol=1e-6)
  assert float(jnp.abs(out.value).max()) > 1e-3
  # The acting fast path gives the same logits and (packed) state.
  act = jax.jit(lambda p, o, s, c: net.apply(p, o, s, c, method="act"))
  logits, packed = act(params, obs[:, 0], step_type[:, 0],
                       pack_lstm_state(net.initial_state(BATCH)))
  assert packed.shape == (BATCH, 2 * 7)
  np.testing.assert_allclose(logits, out.logits[:, 0], atol=1e-6)
  first_state = unpack_lstm_state(np.asarray(packed))
  _, after_one = jax.jit(net.apply)(params, obs[:, :1], step_type[:, :1],
                                    net.initial_state(BATCH))
  np.testing.assert_allclose(first_state.cell, after_one.cell, atol=1e-6)
  np.testing.assert_allclose(first_state.hidden, after_one.hidden, atol=1e-6)


def test_gtrxl_net_shapes_and_step_matches_sequence():
  obs_shape = (6,)
  gtrxl = GTrXLConfig(num_layers=1, d_model=8, num_heads=2, mlp_size=16,
                      memory_length=3)
  net = GTrXLPolicyValueNet(TORSO, gtrxl, NUM_ACTIONS, obs_ndim=1)
  obs, step_type = observations(obs_shape), episode_step_types()

  @jax.jit  # init and apply in one compilation
  def init_apply(rng):
    params = net.init(rng, obs, step_type)
    # Memory steps change gradients only, never outputs.
    return params, net.apply(params, obs, step_type), net.apply(
        params, obs, step_type, num_memory_steps=3)

  params, out, out_with_memory = init_apply(jax.random.PRNGKey(0))
  assert out.logits.shape == (BATCH, LENGTH, NUM_ACTIONS)
  assert out.value.shape == (BATCH, LENGTH)
  assert_near_uniform(out.logits)
  assert_logits_depend_on_input(out.logits)
  np.testing.assert_allclose(out_with_memory.value, out.value, atol=1e-6)
  np.testing.assert_allclose(out_with_memory.logits, out.logits, atol=1e-6)
  step = jax.jit(lambda p, o, s, c: net.apply(p, o, s, c, method="step"))
  cache = net.initial_cache(BATCH)
  for t in range(LENGTH):
    step_out, cache = step(params, obs[:, t], step_type[:, t], cache)
    np.testing.assert_allclose(step_out.logits, out.logits[:, t], atol=1e-5)
    np.testing.assert_allclose(step_out.value, out.value[:, t], atol=1e-5)
  assert float(jnp.abs(out.value).max()) > 1e-3


def assert_logits_depend_on_input(logits):
  """Near-uniform but not constant: the policy columns are live."""
  flat = np.asarray(logits).reshape(-1, NUM_ACTIONS)
  assert np.std(flat, axis=0).min() > 1e-5
  assert np.abs(flat - flat.mean(axis=-1, keepdims=True)).max() > 1e-4


def test_fused_head_splits_policy_and_value_columns():
  """logits = x W[:, :A] + b[:A] and value = x W[:, A] + b[A]; the policy
  columns start POLICY_INIT_SCALE times smaller than the value column."""
  features = np.random.default_rng(1).normal(size=(4, 3, 64)).astype(
      np.float32)
  head = PolicyValueHead(NUM_ACTIONS)
  params = head.init(jax.random.PRNGKey(2), features)
  out = head.apply(params, features)
  kernel = np.asarray(params["params"]["Dense_0"]["kernel"])
  bias = np.asarray(params["params"]["Dense_0"]["bias"])
  assert kernel.shape == (64, NUM_ACTIONS + 1)
  np.testing.assert_allclose(out.logits,
                             features @ kernel[:, :NUM_ACTIONS] +
                             bias[:NUM_ACTIONS], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out.value, features @ kernel[:, NUM_ACTIONS] +
                             bias[NUM_ACTIONS], rtol=1e-5, atol=1e-6)
  ratio = np.std(kernel[:, :NUM_ACTIONS]) / np.std(kernel[:, NUM_ACTIONS])
  assert 0.3 * POLICY_INIT_SCALE < ratio < 3 * POLICY_INIT_SCALE
  assert_logits_depend_on_input(out.logits)

