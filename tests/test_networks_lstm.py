"""LSTM core: equals linen's LSTMCell, resets on FIRST, step == sequence."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ald_jax import config as config_lib
from ald_jax.networks import lstm as lstm_lib
from ald_jax.types import FIRST, MID, LSTMState

HIDDEN, INPUT = 6, 4
BATCH, LENGTH = 3, 10
CORE = lstm_lib.LSTMCore(HIDDEN, config_lib.LSTMConfig().forget_bias)
PARAMS = jax.jit(CORE.init)(
    jax.random.PRNGKey(0), np.zeros((1, 2, INPUT), np.float32),
    np.full((1, 2), MID, np.int32), lstm_lib.lstm_initial_state(1, HIDDEN))
SEQUENCE = jax.jit(CORE.apply)
STEP = jax.jit(lambda p, x, s, c: CORE.apply(p, x, s, c, method="step"))


def random_inputs(seed=0, length=LENGTH):
  rng = np.random.default_rng(seed)
  return rng.normal(size=(BATCH, length, INPUT)).astype(np.float32)


def random_state(seed=1):
  rng = np.random.default_rng(seed)
  return LSTMState(*(rng.normal(size=(BATCH, HIDDEN)).astype(np.float32)
                     for _ in range(2)))


def test_params_are_fused_with_forget_bias():
  weights = PARAMS["params"]["weights"]
  assert weights["kernel"].shape == (INPUT + HIDDEN, 4 * HIDDEN)
  bias = np.asarray(weights["bias"])
  np.testing.assert_array_equal(bias[HIDDEN:2 * HIDDEN], 3.0)  # forget gate
  np.testing.assert_array_equal(np.delete(bias, np.s_[HIDDEN:2 * HIDDEN]), 0)
  # Recurrent rows of each gate are orthogonal.
  recurrent = np.asarray(weights["kernel"][INPUT:, :HIDDEN])
  np.testing.assert_allclose(recurrent.T @ recurrent, np.eye(HIDDEN),
                             atol=1e-5)


def test_forget_bias_sets_only_the_forget_gate():
  core = lstm_lib.LSTMCore(HIDDEN, forget_bias=1.0)
  params = core.init(jax.random.PRNGKey(0), np.zeros((1, 2, INPUT), np.float32),
                     np.full((1, 2), MID, np.int32),
                     lstm_lib.lstm_initial_state(1, HIDDEN))
  bias = np.asarray(params["params"]["weights"]["bias"])
  np.testing.assert_array_equal(bias[HIDDEN:2 * HIDDEN], 1.0)
  np.testing.assert_array_equal(np.delete(bias, np.s_[HIDDEN:2 * HIDDEN]), 0)


def test_initial_state_needs_no_params():
  state = CORE.initial_state(5)
  assert isinstance(state, LSTMState)
  for part in state:
    assert part.shape == (5, HIDDEN)
    assert not np.asarray(part).any()


def test_cell_matches_linen_lstm_cell():
  # Oracle: linen's LSTMCell (gates i, f, g, o) with our fused weights split
  # into its per-gate Dense layers.
  kernel = np.asarray(PARAMS["params"]["weights"]["kernel"])
  bias = np.asarray(PARAMS["params"]["weights"]["bias"])
  linen_params = {}
  for index, gate in enumerate("ifgo"):
    cols = np.s_[index * HIDDEN:(index + 1) * HIDDEN]
    linen_params["i" + gate] = {"kernel": kernel[:INPUT, cols]}
    linen_params["h" + gate] = {"kernel": kernel[INPUT:, cols],
                                "bias": bias[cols]}
  x = random_inputs()[:, 0]
  state = random_state()
  (cell, hidden), _ = nn.LSTMCell(HIDDEN).apply(
      {"params": linen_params}, (state.cell, state.hidden), x)
  out, new_state = STEP(PARAMS, x, np.full((BATCH,), MID, np.int32), state)
  np.testing.assert_allclose(new_state.cell, cell, atol=1e-6)
  np.testing.assert_allclose(new_state.hidden, hidden, atol=1e-6)
  np.testing.assert_array_equal(out, new_state.hidden)


def test_step_form_matches_sequence_form():
  x = random_inputs()
  step_type = np.full((BATCH, LENGTH), MID, np.int32)
  step_type[0, 0] = FIRST
  step_type[1, 4] = FIRST
  step_type[2, [3, 4]] = FIRST
  state = random_state()
  hidden, final = SEQUENCE(PARAMS, x, step_type, state)
  assert hidden.shape == (BATCH, LENGTH, HIDDEN)
  stepped = []
  for t in range(LENGTH):
    out, state = STEP(PARAMS, x[:, t], step_type[:, t], state)
    stepped.append(out)
  np.testing.assert_allclose(jnp.stack(stepped, 1), hidden, atol=1e-6)
  np.testing.assert_allclose(state.cell, final.cell, atol=1e-6)
  np.testing.assert_allclose(state.hidden, final.hidden, atol=1e-6)


def test_state_resets_on_first():
  start = 4
  x = random_inputs()
  step_type = np.full((BATCH, LENGTH), MID, np.int32)
  step_type[:, start] = FIRST
  hidden, _ = SEQUENCE(PARAMS, x, step_type, random_state())
  # Fresh run of the same episode from a zero state.
  fresh_x = np.zeros_like(x)
  fresh_x[:, :LENGTH - start] = x[:, start:]
  fresh_types = np.full((BATCH, LENGTH), MID, np.int32)
  fresh_types[:, 0] = FIRST
  fresh, _ = SEQUENCE(PARAMS, fresh_x, fresh_types, random_state(seed=7))
  np.testing.assert_allclose(hidden[:, start:], fresh[:, :LENGTH - start],
                             atol=1e-6)
  # Without the FIRST the earlier steps (and initial state) do matter.
  no_reset, _ = SEQUENCE(PARAMS, x, np.full_like(step_type, MID),
                         random_state())
  assert float(jnp.abs(no_reset[:, start:] - hidden[:, start:]).max()) > 1e-3


def test_step_reset_zeroes_only_first_rows():
  state = random_state()
  reset = jax.tree_util.tree_map(np.asarray, lstm_lib.reset_state(
      state, np.array([FIRST, MID, FIRST])))
  for part, before in zip(reset, state):
    np.testing.assert_array_equal(part[[0, 2]], 0.0)
    np.testing.assert_array_equal(part[1], before[1])


def _autodiff_sequence(recurrent_kernel, input_gates, keep, cell, hidden):
  """The same recurrence, differentiated by JAX (the reference)."""
  def scan_step(carry, inputs):
    gates_x, keep_t = inputs
    state = LSTMState(cell=carry.cell * keep_t, hidden=carry.hidden * keep_t)
    state = lstm_lib._gates_to_state(  # pylint: disable=protected-access
        gates_x + state.hidden @ recurrent_kernel, state)
    return state, state.hidden
  final, hidden_seq = jax.lax.scan(
      scan_step, LSTMState(cell=cell, hidden=hidden), (input_gates, keep))
  return hidden_seq, final.cell


def test_hand_written_gradient_matches_autodiff():
  # Episode starts mid-sequence (one row twice), a non-zero initial state,
  # and a loss on every hidden output and the final cell: the four
  # gradients agree.
  length, batch, hidden_size = 9, 3, 5
  rng = np.random.default_rng(0)
  recurrent_kernel = jnp.asarray(rng.normal(size=(hidden_size, 4 * hidden_size)),
                                 jnp.float32)
  input_gates = jnp.asarray(rng.normal(size=(length, batch, 4 * hidden_size)),
                            jnp.float32)
  keep = np.ones((length, batch, 1), np.float32)
  keep[[3, 4], 0] = 0.0
  keep[6, 2] = 0.0
  keep = jnp.asarray(keep)
  cell = jnp.asarray(rng.normal(size=(batch, hidden_size)), jnp.float32)
  hidden = jnp.asarray(rng.normal(size=(batch, hidden_size)), jnp.float32)
  weights_h = jnp.asarray(rng.normal(size=(length, batch, hidden_size)),
                          jnp.float32)
  weights_c = jnp.asarray(rng.normal(size=(batch, hidden_size)), jnp.float32)

  def loss(sequence_fn):
    def fn(*args):
      hidden_seq, final_cell = sequence_fn(*args)
      return (jnp.sum(weights_h * jnp.sin(hidden_seq))
              + jnp.sum(weights_c * final_cell ** 2))
    return fn

  args = (recurrent_kernel, input_gates, keep, cell, hidden)
  argnums = (0, 1, 3, 4)
  with jax.default_matmul_precision("float32"):
    ours = jax.grad(loss(lstm_lib.lstm_sequence), argnums)(*args)
    reference = jax.grad(loss(_autodiff_sequence), argnums)(*args)
    for got, want in zip(lstm_lib.lstm_sequence(*args),
                         _autodiff_sequence(*args)):
      np.testing.assert_allclose(np.asarray(got), np.asarray(want),
                                 rtol=1e-6, atol=1e-6)
  for got, want in zip(ours, reference):
    assert float(jnp.abs(want).max()) > 1e-3
    np.testing.assert_allclose(np.asarray(got), np.asarray(want),
                               rtol=1e-5, atol=1e-5)
  # A reset cuts the gradient: row 0's initial state gets none through the
  # steps after its episode start at t=3.
  def first_steps_only(*args):
    hidden_seq, _ = lstm_lib.lstm_sequence(*args)
    return jnp.sum(hidden_seq[3:, 0])
  assert float(jnp.abs(jax.grad(first_steps_only, 4)(*args)).max()) == 0.0
