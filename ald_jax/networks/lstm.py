"""LSTM actor core: a pre-fused cell, scanned over time with episode resets.

Speed at batch 1 is what matters for acting, so the cell stores its gate
weights already fused: one kernel [D + H, 4H] (input rows on top of recurrent
rows) and one bias [4H]. A step is then one matmul of concat([x, h]) plus
elementwise work, and the core has only two parameter leaves (each leaf is an
argument of the jitted acting step, and every argument costs dispatch time).
linen's `OptimizedLSTMCell`, by contrast, concatenates its per-gate kernels on
every call.

Gate order in the fused 4H axis: input, forget, cell candidate, output.

Reset convention: where `step_type == FIRST` the recurrent state is zeroed
*before* that step is processed, inside the scan, so one call can cover any
number of episode boundaries.
"""
from __future__ import annotations

from typing import Callable

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from ald_jax.types import FIRST, LSTMState


def lstm_initial_state(batch_size: int, hidden_size: int) -> LSTMState:
  """All-zeros state; needs no parameters.

  Two distinct buffers (not one shared zeros array), so the state can be
  donated to a jitted step.
  """
  shape = (batch_size, hidden_size)
  return LSTMState(cell=jnp.zeros(shape, jnp.float32),
                   hidden=jnp.zeros(shape, jnp.float32))


def reset_state(state: LSTMState, step_type: chex.Array) -> LSTMState:
  """Zeroes the rows of `state` whose `step_type` [B] is FIRST."""
  first = jnp.equal(step_type, FIRST)[:, None]
  return jax.tree_util.tree_map(
      lambda s: jnp.where(first, jnp.zeros_like(s), s), state)


def _gates_to_state(gates: chex.Array, state: LSTMState) -> LSTMState:
  """Applies the LSTM nonlinearities to pre-activations [B, 4H]."""
  i, f, g, o = jnp.split(gates, 4, axis=-1)
  cell = jax.nn.sigmoid(f) * state.cell + jax.nn.sigmoid(i) * jnp.tanh(g)
  hidden = jax.nn.sigmoid(o) * jnp.tanh(cell)
  return LSTMState(cell=cell, hidden=hidden)


def fused_lstm_step(kernel: chex.Array, bias: chex.Array, x: chex.Array,
                    state: LSTMState) -> LSTMState:
  """One LSTM step with fused weights: kernel [D+H, 4H], bias [4H], x [B, D]."""
  gates = jnp.concatenate([x, state.hidden], axis=-1) @ kernel + bias
  return _gates_to_state(gates, state)


def _fused_kernel_init(input_size: int, hidden_size: int) -> Callable:
  """Input rows lecun-normal, recurrent rows orthogonal (per gate)."""
  def init(rng: chex.PRNGKey, shape, dtype=jnp.float32) -> chex.Array:
    assert shape == (input_size + hidden_size, 4 * hidden_size), shape
    input_rng, recurrent_rng = jax.random.split(rng)
    w_input = nn.initializers.lecun_normal()(
        input_rng, (input_size, 4 * hidden_size), dtype)
    w_recurrent = jnp.concatenate([
        nn.initializers.orthogonal()(k, (hidden_size, hidden_size), dtype)
        for k in jax.random.split(recurrent_rng, 4)], axis=1)
    return jnp.concatenate([w_input, w_recurrent], axis=0)
  return init


def _bias_init(hidden_size: int, forget_bias: float) -> Callable:
  """Zeros but the forget gate's: start by remembering (Jozefowicz et al.
  2015); a cue survives ~sigmoid(forget_bias)^span at initialisation."""
  def init(rng: chex.PRNGKey, shape, dtype=jnp.float32) -> chex.Array:
    del rng
    assert shape == (4 * hidden_size,), shape
    bias = jnp.zeros(shape, dtype)
    return bias.at[hidden_size:2 * hidden_size].set(forget_bias)
  return init


class _FusedLSTMWeights(nn.Module):
  """Holds the fused kernel and bias; shapes depend on the input size."""
  hidden_size: int
  forget_bias: float

  @nn.compact
  def __call__(self, input_size: int) -> tuple[chex.Array, chex.Array]:
    h = self.hidden_size
    kernel = self.param("kernel", _fused_kernel_init(input_size, h),
                        (input_size + h, 4 * h))
    bias = self.param("bias", _bias_init(h, self.forget_bias), (4 * h,))
    return kernel, bias


class LSTMCore(nn.Module):
  """LSTM over time (`__call__`) or one step (`step`); same parameters.

  Params: {"weights": {"kernel": [D+H, 4H], "bias": [4H]}}.
  """
  hidden_size: int
  forget_bias: float   # initial forget-gate bias (LSTMConfig.forget_bias)

  def setup(self):
    self.weights = _FusedLSTMWeights(self.hidden_size, self.forget_bias)

  def initial_state(self, batch_size: int) -> LSTMState:
    """Zeros; callable on an unbound module."""
    return lstm_initial_state(batch_size, self.hidden_size)

  def _check_state(self, state: LSTMState, batch_size: int) -> None:
    chex.assert_shape([state.cell, state.hidden],
                      (batch_size, self.hidden_size))

  def __call__(self, x: chex.Array, step_type: chex.Array,
               state: LSTMState) -> tuple[chex.Array, LSTMState]:
    """x [B, T, D], step_type [B, T] -> (hidden [B, T, H], final state)."""
    chex.assert_rank(x, 3)
    batch_size, length, input_size = x.shape
    chex.assert_shape(step_type, (batch_size, length))
    self._check_state(state, batch_size)
    kernel, bias = self.weights(input_size)
    # The input half of the matmul does not depend on the recurrence: do it
    # for all steps at once, outside the scan.
    input_gates = x @ kernel[:input_size] + bias          # [B, T, 4H]
    recurrent_kernel = kernel[input_size:]

    def scan_step(carry: LSTMState, inputs):
      gates_x, step_type_t = inputs
      carry = reset_state(carry, step_type_t)
      carry = _gates_to_state(gates_x + carry.hidden @ recurrent_kernel, carry)
      return carry, carry.hidden

    final_state, hidden = jax.lax.scan(
        scan_step, state,
        (jnp.swapaxes(input_gates, 0, 1), jnp.swapaxes(step_type, 0, 1)))
    return jnp.swapaxes(hidden, 0, 1), final_state

  def step(self, x: chex.Array, step_type: chex.Array,
           state: LSTMState) -> tuple[chex.Array, LSTMState]:
    """x [B, D], step_type [B] -> (hidden [B, H], new state)."""
    chex.assert_rank(x, 2)
    batch_size, input_size = x.shape
    chex.assert_shape(step_type, (batch_size,))
    self._check_state(state, batch_size)
    kernel, bias = self.weights(input_size)
    state = fused_lstm_step(kernel, bias, x, reset_state(state, step_type))
    return state.hidden, state
