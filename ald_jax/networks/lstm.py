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

Training runs the sequence through `lstm_sequence`, whose gradient is written
by hand (the recurrent kernel's gradient as one matmul after the backward
loop, not one accumulation per step): LSTM training 1.45x faster on CPU
(experiments/results/bench_learner_step_ab_lstm_2026-11-27_cpu2.md), the same
gradients as autodiff (tested).
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


def _gate_activations(gates: chex.Array):
  """Pre-activations [B, 4H] -> input, forget, candidate, output gates."""
  i, f, g, o = jnp.split(gates, 4, axis=-1)
  return jax.nn.sigmoid(i), jax.nn.sigmoid(f), jnp.tanh(g), jax.nn.sigmoid(o)


def _gates_to_state(gates: chex.Array, state: LSTMState) -> LSTMState:
  """Applies the LSTM nonlinearities to pre-activations [B, 4H]."""
  i, f, g, o = _gate_activations(gates)
  cell = f * state.cell + i * g
  return LSTMState(cell=cell, hidden=o * jnp.tanh(cell))


def fused_lstm_step(kernel: chex.Array, bias: chex.Array, x: chex.Array,
                    state: LSTMState) -> LSTMState:
  """One LSTM step with fused weights: kernel [D+H, 4H], bias [4H], x [B, D]."""
  gates = jnp.concatenate([x, state.hidden], axis=-1) @ kernel + bias
  return _gates_to_state(gates, state)


def _sequence_forward(recurrent_kernel, input_gates, keep, cell, hidden,
                      save: bool):
  """The recurrence over T steps -> (hidden [T, B, H], final cell, saved);
  with `save`, `saved` holds what the backward pass needs (a scan's unused
  outputs are not pruned, so only then)."""
  def scan_step(carry, inputs):
    cell, hidden = carry
    gates_x, keep_t = inputs
    # Episode start: multiply by 0 (keep) = `reset_state`, as a product so
    # its derivative is the same product.
    cell_in, hidden_in = cell * keep_t, hidden * keep_t
    i, f, g, o = _gate_activations(gates_x + hidden_in @ recurrent_kernel)
    cell = f * cell_in + i * g
    tanh_cell = jnp.tanh(cell)
    hidden = o * tanh_cell
    saved = (cell_in, hidden_in, i, f, g, o, tanh_cell) if save else ()
    return (cell, hidden), (hidden, saved)
  (cell, _), (hidden_seq, saved) = jax.lax.scan(
      scan_step, (cell, hidden), (input_gates, keep))
  return hidden_seq, cell, saved


@jax.custom_vjp
def lstm_sequence(recurrent_kernel: chex.Array, input_gates: chex.Array,
                  keep: chex.Array, cell: chex.Array, hidden: chex.Array
                  ) -> tuple[chex.Array, chex.Array]:
  """The LSTM recurrence, time-major: input_gates [T, B, 4H] (x W_x + b),
  keep [T, B, 1] (0 where the step starts an episode), initial cell/hidden
  [B, H] -> (hidden [T, B, H], final cell [B, H]).

  Its gradient is written by hand for one reason: autodiff of a scan adds
  each step's recurrent-kernel gradient h_{t-1}^T dpre_t inside the backward
  loop (a [H, 4H] accumulation per step, ~1/3 of the LSTM's training time on
  CPU); here the loop only carries dh, dc and the kernel's gradient is one
  [H, T*B] x [T*B, 4H] matmul after it. Checked against autodiff in
  tests/test_networks_lstm.py.
  """
  hidden_seq, final_cell, _ = _sequence_forward(
      recurrent_kernel, input_gates, keep, cell, hidden, save=False)
  return hidden_seq, final_cell


def _lstm_sequence_fwd(recurrent_kernel, input_gates, keep, cell, hidden):
  hidden_seq, final_cell, saved = _sequence_forward(
      recurrent_kernel, input_gates, keep, cell, hidden, save=True)
  return (hidden_seq, final_cell), (recurrent_kernel, keep, saved)


def _lstm_sequence_bwd(residuals, cotangents):
  recurrent_kernel, keep, saved = residuals
  d_hidden_seq, d_final_cell = cotangents

  def scan_step(carry, inputs):
    d_cell, d_hidden = carry     # from step t + 1 (through its inputs)
    d_hidden_out, keep_t, (cell_in, _, i, f, g, o, tanh_cell) = inputs
    d_hidden = d_hidden + d_hidden_out
    d_cell = d_cell + d_hidden * o * (1.0 - tanh_cell ** 2)
    d_pre = jnp.concatenate([
        d_cell * g * i * (1.0 - i),
        d_cell * cell_in * f * (1.0 - f),
        d_cell * i * (1.0 - g ** 2),
        d_hidden * tanh_cell * o * (1.0 - o)], axis=-1)
    d_hidden_in = d_pre @ recurrent_kernel.T
    return (d_cell * f * keep_t, d_hidden_in * keep_t), d_pre

  (d_cell, d_hidden), d_pre = jax.lax.scan(
      scan_step, (d_final_cell, jnp.zeros_like(d_final_cell)),
      (d_hidden_seq, keep, saved), reverse=True)
  hidden_in = saved[1]
  d_kernel = jnp.einsum("tbh,tbg->hg", hidden_in, d_pre)
  return d_kernel, d_pre, jnp.zeros_like(keep), d_cell, d_hidden


lstm_sequence.defvjp(_lstm_sequence_fwd, _lstm_sequence_bwd)


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
    keep = jnp.logical_not(jnp.equal(step_type, FIRST)).astype(x.dtype)
    hidden, cell = lstm_sequence(
        kernel[input_size:], jnp.swapaxes(input_gates, 0, 1),
        jnp.swapaxes(keep, 0, 1)[..., None], state.cell, state.hidden)
    return (jnp.swapaxes(hidden, 0, 1),
            LSTMState(cell=cell, hidden=hidden[-1]))

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
