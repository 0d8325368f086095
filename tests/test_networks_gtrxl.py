"""GTrXL: gating, near-identity init, step == sequence, episode masking,
causality, stop-gradient memory, relative positions."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ald_jax.config import GTrXLConfig
from ald_jax.networks import gtrxl as gtrxl_lib
from ald_jax.types import FIRST, MID

CONFIG = GTrXLConfig(num_layers=2, d_model=16, num_heads=2, mlp_size=32,
                     memory_length=5)
INPUT_SIZE = 7
BATCH, LENGTH = 2, 16  # Shared shape: one compilation serves most tests.


def perturbed(params, seed=1, scale=0.1):
  """Adds noise to every parameter so zero-initialised ones (u, v, biases)
  take part in the checks."""
  leaves, treedef = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  return jax.tree_util.tree_unflatten(treedef, [
      leaf + scale * jax.random.normal(k, leaf.shape)
      for leaf, k in zip(leaves, keys)])


NET = gtrxl_lib.GTrXL(CONFIG)
PARAMS = jax.jit(lambda rng: perturbed(NET.init(
    rng, np.zeros((1, 4, INPUT_SIZE), np.float32),
    np.full((1, 4), MID, np.int32))))(jax.random.PRNGKey(0))
# Jitted once per shape: eager op-by-op dispatch would dominate test time.
_SEQUENCE = jax.jit(NET.apply, static_argnums=3)
_STEP = jax.jit(lambda p, x, s, c: NET.apply(p, x, s, c, method="step"))


def sequence(x, step_type, num_memory_steps=0, params=PARAMS):
  return _SEQUENCE(params, x, step_type, num_memory_steps)


def random_inputs(batch=BATCH, length=LENGTH, seed=0):
  rng = np.random.default_rng(seed)
  return rng.normal(size=(batch, length, INPUT_SIZE)).astype(np.float32)


def step_types(*firsts, batch=BATCH, length=LENGTH):
  step_type = np.full((batch, length), MID, np.int32)
  step_type[:, list(firsts)] = FIRST
  return step_type


def test_attention_mask_hand_computed():
  step_type = np.array([[MID, FIRST, MID, MID, FIRST, MID]], np.int32)
  mask = np.asarray(gtrxl_lib.attention_mask(step_type, memory_length=1))[0]
  expected = np.zeros((6, 6), bool)
  expected[0, 0] = True                    # padding before the first FIRST
  expected[1, 1] = True                    # FIRST: only itself
  expected[2, 1:3] = True
  expected[3, 2:4] = True                  # window: itself + 1 past step
  expected[4, 4] = True
  expected[5, 4:6] = True
  np.testing.assert_array_equal(mask, expected)


@pytest.mark.parametrize("length,num_keys,memory_length", [
    (16, 48, 32), (48, 48, 32), (5, 5, 32), (7, 7, 3), (1, 33, 32)])
def test_relative_shift_matches_a_gather_by_distance(length, num_keys,
                                                     memory_length):
  # Every unmasked (query, key) pair reads the score of its own distance.
  num_distances = min(num_keys - 1, memory_length) + 1
  scores = np.random.default_rng(0).normal(
      size=(2, 3, length, num_distances)).astype(np.float32)
  shifted = np.asarray(gtrxl_lib.relative_shift(jnp.asarray(scores),
                                                num_keys))
  distance = gtrxl_lib.relative_offsets(length, num_keys)
  in_window = (distance >= 0) & (distance < num_distances)
  expected = np.take_along_axis(
      scores, np.broadcast_to(np.clip(distance, 0, num_distances - 1),
                              (2, 3, length, num_keys)), axis=-1)
  assert shifted.shape == (2, 3, length, num_keys)
  np.testing.assert_array_equal(shifted[..., in_window],
                                expected[..., in_window])
  assert np.isfinite(shifted).all()


def test_relative_shift_rejects_distances_that_do_not_fit():
  with pytest.raises(ValueError, match="do not fit"):
    gtrxl_lib.relative_shift(jnp.zeros((4, 40)), 8)


def test_sinusoid_embedding_values():
  emb = np.asarray(gtrxl_lib.sinusoid_embedding(np.array([0, 3]), 4))
  # dim 4: frequencies 1 and 1/100.
  np.testing.assert_allclose(emb[0], [0, 0, 1, 1], atol=1e-7)
  np.testing.assert_allclose(
      emb[1], [np.sin(3), np.sin(0.03), np.cos(3), np.cos(0.03)], rtol=1e-6)


def test_gru_gate_hand_computed():
  # With all weights zero: r = 1/2, z = sigmoid(-b_g), candidate = tanh(0) = 0,
  # so g(x, y) = (1 - sigmoid(-b_g)) * x whatever y is.
  gate = gtrxl_lib.GRUGate(d_model=3, gate_bias=2.0)
  x = np.array([[1.0, -2.0, 0.5]], np.float32)
  y = np.array([[3.0, 1.0, -1.0]], np.float32)
  params = jax.tree_util.tree_map(
      jnp.zeros_like, jax.eval_shape(gate.init, jax.random.PRNGKey(0), x, y))
  expected = (1 - 1 / (1 + np.exp(2.0))) * x
  np.testing.assert_allclose(jax.jit(gate.apply)(params, x, y), expected,
                             rtol=1e-6)


def block_relative_changes(gate_biases) -> list[float]:
  """||block(x) - x|| / ||x|| for freshly initialised blocks, one per bias."""
  batch, length, d = 4, 12, 32
  x = jax.random.normal(jax.random.PRNGKey(3), (batch, length, d))
  mask = gtrxl_lib.attention_mask(np.full((batch, length), MID), 8)
  num_distances = 9   # distances 0..memory_length
  blocks = [gtrxl_lib.GTrXLBlock(GTrXLConfig(
      num_layers=1, d_model=d, num_heads=4, mlp_size=64, memory_length=8,
      gate_bias=bias)) for bias in gate_biases]

  @jax.jit  # One compilation for all blocks.
  def changes(rng):
    out = []
    for block in blocks:
      y = block.apply(block.init(rng, x, mask, num_distances), x, mask,
                      num_distances)
      out.append(jnp.linalg.norm(y - x) / jnp.linalg.norm(x))
    return out

  return [float(c) for c in changes(jax.random.PRNGKey(0))]


def test_blocks_start_near_identity():
  # Measured: gate bias 0 -> ~0.8, 1 -> ~0.6, 2 -> ~0.37, 3 -> ~0.2.
  with_bias, without_bias, huge_bias = block_relative_changes([2.0, 0.0, 40.0])
  assert with_bias < 0.45, with_bias
  assert without_bias > 2 * with_bias, (with_bias, without_bias)
  # A huge gate bias shuts the update gates: the identity up to float eps.
  assert huge_bias < 1e-6, huge_bias


def test_step_form_matches_sequence_form():
  # 28 steps with memory 5: the ring wraps five times. Episode starts
  # mid-sequence (row 2 has two FIRSTs in a row); row 1 begins with padding
  # steps (zeros, MID) before its first FIRST.
  batch, length = 3, 28
  x = random_inputs(batch, length)
  step_type = step_types(0, batch=batch, length=length)
  step_type[0, 11] = FIRST
  step_type[1, 0] = MID
  step_type[1, [3, 19]] = FIRST
  step_type[2, [6, 7]] = FIRST
  x[1, :3] = 0.0
  # Full float32 matmuls: the claim is that both forms compute the same
  # function. On a GPU the default (TF32) differs by ~2e-3 (seen on an H200);
  # on CPU this changes nothing.
  with jax.default_matmul_precision("float32"):
    expected = sequence(x, step_type)
    cache = NET.initial_cache(batch)
    outputs = []
    for t in range(length):
      y, cache = _STEP(PARAMS, x[:, t], step_type[:, t], cache)
      outputs.append(y)
  stepped = jnp.stack(outputs, axis=1)
  assert expected.shape == (batch, length, CONFIG.d_model)
  np.testing.assert_allclose(stepped, expected, atol=1e-5, rtol=0)
  assert float(jnp.abs(expected).max()) > 0.5  # not trivially small


def test_cache_layout_and_ring_index():
  cache = gtrxl_lib.gtrxl_initial_cache(CONFIG, BATCH)
  head_dim = CONFIG.d_model // CONFIG.num_heads
  assert cache.keys.shape == (BATCH, CONFIG.num_layers, CONFIG.num_heads,
                              CONFIG.memory_length, head_dim)
  assert not np.asarray(cache.valid).any()
  x = random_inputs()
  for t in range(7):
    _, cache = _STEP(PARAMS, x[:, t], np.full((BATCH,), t and MID, np.int32),
                     cache)
  np.testing.assert_array_equal(cache.index, [7 % 5] * BATCH)
  assert np.asarray(cache.valid).all()
  # A FIRST invalidates every slot of its row but the one it writes.
  _, cache = _STEP(PARAMS, x[:, 0], np.array([FIRST, MID], np.int32), cache)
  np.testing.assert_array_equal(np.asarray(cache.valid).sum(axis=1), [1, 5])


def test_inputs_before_episode_start_are_invisible():
  start = 6
  x = random_inputs()
  step_type = step_types(0, start)
  changed = x.copy()
  changed[:, :start] += 5.0
  y, y_changed = sequence(x, step_type), sequence(changed, step_type)
  np.testing.assert_allclose(y[:, start:], y_changed[:, start:], atol=1e-6)
  assert float(jnp.abs(y[:, :start] - y_changed[:, :start]).min()) > 0


def test_outputs_are_causal_and_windowed():
  x = random_inputs()
  step_type = step_types()  # no episode start at all: only the window limits
  t = 2
  changed = x.copy()
  changed[:, t] += 3.0
  diff = np.asarray(jnp.abs(sequence(x, step_type)
                            - sequence(changed, step_type)).max(axis=(0, 2)))
  assert (diff[:t] == 0).all()                      # causal
  # Each layer looks memory_length steps back, so a change at t reaches up to
  # t + num_layers * memory_length and no further.
  reach = t + CONFIG.num_layers * CONFIG.memory_length
  assert (diff[t:reach + 1] > 0).all(), diff
  np.testing.assert_allclose(diff[reach + 1:], 0.0, atol=1e-6)


def test_attention_uses_relative_positions():
  # The same episode at two offsets (after another episode) gives the same
  # outputs: positions enter only through distances i - j.
  episode = random_inputs(1, 10, seed=4)
  early = np.concatenate([episode, random_inputs(1, 6, seed=5)], axis=1)
  late = np.concatenate([random_inputs(1, 6, seed=6), episode], axis=1)
  x = np.concatenate([early, late])
  step_type = step_types(0)
  step_type[0, 10] = FIRST
  step_type[1, 6] = FIRST
  y = sequence(x, step_type)
  np.testing.assert_allclose(y[0, :10], y[1, 6:], atol=1e-5)


def test_memory_steps_get_no_gradient():
  c = 4
  x = random_inputs()
  step_type = step_types(0)

  @jax.jit
  def grads(params, inputs):
    def loss(params, inputs, memory):
      y = NET.apply(params, inputs, step_type, memory)
      return jnp.sum(y[:, c:] ** 2)
    return (jax.grad(loss, argnums=(0, 1))(params, inputs, c),
            jax.grad(loss, argnums=1)(params, inputs, 0))

  (param_grad, grad_with_memory), grad_without = grads(PARAMS, x)
  np.testing.assert_array_equal(grad_with_memory[:, :c], 0.0)
  assert float(jnp.abs(grad_without[:, :c]).max()) > 0   # the path exists
  # Later inputs never reach memory positions (causality): their gradients
  # are untouched.
  np.testing.assert_allclose(grad_with_memory[:, c:], grad_without[:, c:],
                             rtol=1e-5, atol=1e-6)
  # The forward pass is unchanged.
  np.testing.assert_array_equal(sequence(x, step_type, c),
                                sequence(x, step_type, 0))
  # Parameters still learn through the memory's keys and values.
  qkv = param_grad["params"]["blocks_0"]["attention"]["qkv_kernel"]
  assert float(jnp.abs(qkv).max()) > 0


def test_final_layer_norm_optional():
  net = gtrxl_lib.GTrXL(CONFIG, final_layer_norm=False)
  x = random_inputs(1, 4)
  st = step_types(0, batch=1, length=4)
  params = jax.eval_shape(net.init, jax.random.PRNGKey(0), x, st)
  assert set(params["params"]) == {"input_projection", "blocks_0", "blocks_1"}
  assert "output_norm" in PARAMS["params"]
