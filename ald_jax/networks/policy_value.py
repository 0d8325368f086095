"""The two agent networks: torso -> core -> policy logits and value.

* `LSTMPolicyValueNet`: the small, fast actor (and the `lstm` agent).
* `GTrXLPolicyValueNet`: the transformer learner (and the `transformer`
  agent, which acts with its step form and K/V cache).

Both are initialised through `__call__` (the sequence form) and share those
parameters with `step` (`module.apply(params, ..., method="step")`).

The policy and value heads are one fused matmul [F, A + 1] (one kernel and one
bias leaf instead of two of each: fewer arguments for the jitted acting step).
The policy columns start tiny (scale 0.01) so the initial policy is near
uniform.

Acting fast path. At batch 1 a jitted LSTM step costs mostly per-call
overhead, and every output buffer costs about a microsecond (measured in
experiments/bench_acting.py). `LSTMPolicyValueNet.act` returns only what an
actor needs, the logits and the state packed in one array [B, 2H]
(`pack_lstm_state` / `unpack_lstm_state` convert).
"""
from __future__ import annotations

from typing import Callable

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from ald_jax.config import GTrXLConfig, LSTMConfig, TorsoConfig
from ald_jax.networks.gtrxl import (GTrXL, GTrXLCache, SegmentMemory,
                                    gtrxl_initial_cache)
from ald_jax.networks.lstm import LSTMCore, lstm_initial_state
from ald_jax.networks.torso import Torso
from ald_jax.types import AgentOutput, LSTMState

POLICY_INIT_SCALE = 0.01


def pack_lstm_state(state: LSTMState) -> chex.Array:
  """LSTMState -> [B, 2H] (cell then hidden): one array instead of two."""
  return jnp.concatenate([state.cell, state.hidden], axis=-1)


def unpack_lstm_state(packed: chex.Array) -> LSTMState:
  """[B, 2H] -> LSTMState; works on numpy arrays too."""
  hidden_size = packed.shape[-1] // 2
  return LSTMState(cell=packed[..., :hidden_size],
                   hidden=packed[..., hidden_size:])


def _head_kernel_init(num_actions: int) -> Callable:
  """Policy columns: lecun-normal x 0.01; value column: lecun-normal."""
  def init(rng: chex.PRNGKey, shape, dtype=jnp.float32) -> chex.Array:
    fan_in, outputs = shape
    assert outputs == num_actions + 1, shape
    policy_rng, value_rng = jax.random.split(rng)
    lecun = nn.initializers.lecun_normal()
    policy = POLICY_INIT_SCALE * lecun(policy_rng, (fan_in, num_actions), dtype)
    value = lecun(value_rng, (fan_in, 1), dtype)
    return jnp.concatenate([policy, value], axis=1)
  return init


class PolicyValueHead(nn.Module):
  """features [..., F] -> AgentOutput(logits [..., A], value [...])."""
  num_actions: int

  @nn.compact
  def __call__(self, features: chex.Array) -> AgentOutput:
    out = nn.Dense(self.num_actions + 1,
                   kernel_init=_head_kernel_init(self.num_actions))(features)
    return AgentOutput(logits=out[..., :-1], value=out[..., -1])


class LSTMPolicyValueNet(nn.Module):
  """Torso -> LSTM -> heads."""
  torso: TorsoConfig
  lstm: LSTMConfig
  num_actions: int
  obs_ndim: int

  def setup(self):
    self.encoder = Torso(self.torso, self.obs_ndim)
    self.core = LSTMCore(self.lstm.hidden_size, self.lstm.forget_bias)
    self.head = PolicyValueHead(self.num_actions)

  def initial_state(self, batch_size: int) -> LSTMState:
    """Zeros; callable on an unbound module."""
    return lstm_initial_state(batch_size, self.lstm.hidden_size)

  def __call__(self, obs: chex.Array, step_type: chex.Array,
               state: LSTMState) -> tuple[AgentOutput, LSTMState]:
    """obs [B, T, *obs], step_type [B, T] -> (AgentOutput [B, T, ...], state)."""
    chex.assert_rank(obs, 2 + self.obs_ndim)
    hidden, state = self.core(self.encoder(obs), step_type, state)
    return self.head(hidden), state

  def step(self, obs: chex.Array, step_type: chex.Array,
           state: LSTMState) -> tuple[AgentOutput, LSTMState]:
    """obs [B, *obs], step_type [B] -> (AgentOutput [B, ...], state)."""
    chex.assert_rank(obs, 1 + self.obs_ndim)
    hidden, state = self.core.step(self.encoder(obs), step_type, state)
    return self.head(hidden), state

  def act(self, obs: chex.Array, step_type: chex.Array,
          packed_state: chex.Array) -> tuple[chex.Array, chex.Array]:
    """Acting fast path: obs [B, *obs], step_type [B], packed state [B, 2H]
    -> (logits [B, A], packed state [B, 2H]). Same numbers as `step`."""
    out, state = self.step(obs, step_type, unpack_lstm_state(packed_state))
    return out.logits, pack_lstm_state(state)


class GTrXLPolicyValueNet(nn.Module):
  """Torso -> GTrXL -> heads."""
  torso: TorsoConfig
  gtrxl: GTrXLConfig
  num_actions: int
  obs_ndim: int

  def setup(self):
    self.encoder = Torso(self.torso, self.obs_ndim)
    self.core = GTrXL(self.gtrxl)
    self.head = PolicyValueHead(self.num_actions)

  def initial_cache(self, batch_size: int) -> GTrXLCache:
    """Empty cache; callable on an unbound module."""
    return gtrxl_initial_cache(self.gtrxl, batch_size)

  def __call__(self, obs: chex.Array, step_type: chex.Array,
               num_memory_steps: int = 0,
               memory: SegmentMemory | None = None,
               return_layer_inputs: bool = False):
    """obs [B, L, *obs], step_type [B, L] -> AgentOutput [B, L, ...].

    `memory` and `return_layer_inputs` as in `GTrXL.__call__`; with the
    latter, returns (AgentOutput, layer inputs [B, num_layers, L, d]).
    """
    chex.assert_rank(obs, 2 + self.obs_ndim)
    features = self.core(self.encoder(obs), step_type, num_memory_steps,
                         memory, return_layer_inputs)
    if return_layer_inputs:
      features, layer_inputs = features
      return self.head(features), layer_inputs
    return self.head(features)

  def step(self, obs: chex.Array, step_type: chex.Array,
           cache: GTrXLCache) -> tuple[AgentOutput, GTrXLCache]:
    """obs [B, *obs], step_type [B] -> (AgentOutput [B, ...], cache)."""
    chex.assert_rank(obs, 1 + self.obs_ndim)
    features, cache = self.core.step(self.encoder(obs), step_type, cache)
    return self.head(features), cache
