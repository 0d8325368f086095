"""Gated Transformer-XL (Parisotto et al. 2020, "Stabilizing Transformers for RL").

Each block, with x the block input (the residual stream):

  y = ReLU(RelMultiHeadAttention(LayerNorm(x)))     # identity-map reordering:
  x = GRUGate(x, y)                                 # LayerNorm on submodule
  y = ReLU(MLP(LayerNorm(x)))                       # inputs only, gates in
  x = GRUGate(x, y)                                 # place of residual adds

GRU gate: r = s(W_r y + U_r x), z = s(W_z y + U_z x - b_g),
h = tanh(W_g y + U_g (r * x)), out = (1 - z) * x + z * h. With b_g = 2 the
update gate starts near s(-2) ~ 0.12, so every block starts close to the
identity.

Attention uses Transformer-XL relative positions (Dai et al. 2019): for query
i and key j at distance d = i - j,
  score = (q_i + u) . k_j  +  (q_i + v) . (W_R R_d),
with R_d a sinusoidal embedding of d and u, v learned per-head biases.

Two call forms that agree numerically:
  * sequence form `__call__(x [B, L, D], step_type [B, L], num_memory_steps)`
    (training): position i attends to j in [i - memory_length, i] and never
    across the most recent FIRST at or before i. Positions < num_memory_steps
    are the Transformer-XL memory: each layer's input there is
    stop-gradient'ed.
  * step form `step(x [B, D], step_type [B], cache)` (acting): a ring cache of
    the projected keys/values of the last `memory_length` steps per layer.
  * segment form `__call__(..., memory=SegmentMemory)` (training with
    Transformer-XL's recurrence): the inputs of every layer at the last M
    steps of the previous segment are given (stop-gradient), so only the new
    positions are computed. Both sequence calls can return the per-layer inputs
    of their own positions, from which the next segment's memory is cut.
They agree to ~1e-6 in float32 with full-precision matmuls (CPU); on GPUs
whose default float32 matmul precision is TF32 the gap is larger.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ald_jax.config import GTrXLConfig
from ald_jax.types import FIRST

_NEG_INF = -1e30  # Masked logits; every query always sees itself.


class GTrXLCache(NamedTuple):
  """Acting-time memory. Every leaf has leading dimension B.

  Slot s of row b was written `distance = ((index - 1 - s) mod M) + 1` steps
  before the current step (the ring holds exactly the last M steps).
  """
  keys: chex.Array    # [B, num_layers, num_heads, M, head_dim]
  values: chex.Array  # [B, num_layers, num_heads, M, head_dim]
  valid: chex.Array   # [B, M] bool: slot holds a step of the current episode
  index: chex.Array   # [B] int32: the slot the current step will be written to


def gtrxl_initial_cache(config: GTrXLConfig, batch_size: int) -> GTrXLCache:
  """An empty cache; needs no parameters."""
  head_dim = config.d_model // config.num_heads
  # Heads before slots: a layer's slice is [B, H, M, hd], the layout the
  # per-head attention matmuls want (no transposed copies per step).
  shape = (batch_size, config.num_layers, config.num_heads,
           config.memory_length, head_dim)
  return GTrXLCache(
      keys=jnp.zeros(shape, jnp.float32),
      values=jnp.zeros(shape, jnp.float32),
      valid=jnp.zeros((batch_size, config.memory_length), bool),
      index=jnp.zeros((batch_size,), jnp.int32))


def sinusoid_embedding(distances: np.ndarray, dim: int) -> np.ndarray:
  """[N] -> [N, dim]: [sin(d * f_k), cos(d * f_k)], f_k = 10000^(-2k/dim).

  Numpy on purpose: distances are static, so the table is a compile-time
  constant instead of N * dim transcendentals on every acting step.
  """
  half = (dim + 1) // 2
  inv_freq = 1.0 / (10000.0 ** (np.arange(half, dtype=np.float64) * 2 / dim))
  angles = np.asarray(distances, np.float64)[:, None] * inv_freq[None, :]
  table = np.concatenate([np.sin(angles), np.cos(angles)], axis=-1)[:, :dim]
  return table.astype(np.float32)


class SegmentMemory(NamedTuple):
  """Transformer-XL memory of M steps per row (training-time recurrence).

  `inputs[:, l]` holds layer l's inputs at the M steps before the segment
  (computed by earlier parameters; always used under stop-gradient).
  """
  inputs: chex.Array     # [B, num_layers, M, d_model] float32
  step_type: chex.Array  # [B, M] int32 step types of those steps
  valid: chex.Array      # [B, M] bool: the slot holds a computed step


def empty_segment_memory(config: GTrXLConfig, batch_size: int) -> SegmentMemory:
  m = config.memory_length
  return SegmentMemory(
      inputs=jnp.zeros((batch_size, config.num_layers, m, config.d_model),
                       jnp.float32),
      step_type=jnp.full((batch_size, m), FIRST, jnp.int32),
      valid=jnp.zeros((batch_size, m), bool))


def attention_mask(step_type: chex.Array, memory_length: int,
                   num_queries: int | None = None,
                   key_valid: chex.Array | None = None) -> chex.Array:
  """[B, L] key step types -> [B, Q, L] bool; queries are the last Q keys.

  True where 0 <= i - j <= memory_length and no FIRST lies in (j, i], i.e. j
  is at or after the most recent FIRST at or before i (and j is valid).
  """
  length = step_type.shape[1]
  num_queries = length if num_queries is None else num_queries
  episode = jnp.cumsum(jnp.equal(step_type, FIRST), axis=1)
  same_episode = episode[:, -num_queries:, None] == episode[:, None, :]
  offset = relative_offsets(num_queries, length)
  window = (offset >= 0) & (offset <= memory_length)
  mask = same_episode & window[None]
  if key_valid is not None:
    mask = mask & key_valid[:, None, :]
  return mask


def relative_offsets(num_queries: int, num_keys: int) -> np.ndarray:
  """[Q, K] distances i - j, query i being key position K - Q + i."""
  queries = np.arange(num_keys - num_queries, num_keys)
  return queries[:, None] - np.arange(num_keys)[None, :]


def relative_shift(by_distance: chex.Array, num_keys: int) -> chex.Array:
  """[..., L, R] scores by distance -> [..., L, K] scores by key.

  Query i is key position q_i = K - L + i; out[..., i, j] =
  by_distance[..., i, q_i - j] wherever 0 <= q_i - j < R, and some other
  finite entry of the input (or 0) elsewhere, which callers mask.
  Reversed, row i needs columns shifted by i - s with s = R - 1 - (K - L):
  padding rows to K + 1 and re-reading the flat array in rows of K shifts
  row i by exactly i.
  """
  *lead, length, num_distances = by_distance.shape
  offset = num_distances - 1 - (num_keys - length)
  if not 0 <= offset <= length or num_distances > num_keys + 1:
    raise ValueError(f"relative_shift: {num_distances} distances do not fit "
                     f"{length} queries over {num_keys} keys")
  padded = jnp.pad(by_distance[..., ::-1],
                   [(0, 0)] * (len(lead) + 1)
                   + [(0, num_keys + 1 - num_distances)])
  flat = padded.reshape(*lead, length * (num_keys + 1))
  return flat[..., offset:offset + length * num_keys].reshape(
      *lead, length, num_keys)


class RelativeMultiHeadAttention(nn.Module):
  """Transformer-XL multi-head attention with relative positions."""
  d_model: int
  num_heads: int

  def setup(self):
    d = self.d_model
    init = nn.initializers.lecun_normal()
    self.qkv_kernel = self.param("qkv_kernel", init, (d, 3 * d))
    # W_R, stored [H, hd, d] (output heads first, embedding input last) so
    # the per-head projection of queries needs no transposed copy.
    self.position_kernel = self.param(
        "position_kernel",
        nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal",
                                         in_axis=-1, out_axis=(0, 1)),
        (self.num_heads, self.head_dim, d))
    head_shape = (self.num_heads, self.head_dim)
    self.content_bias = self.param("content_bias", nn.initializers.zeros,
                                   head_shape)                          # u
    self.position_bias = self.param("position_bias", nn.initializers.zeros,
                                    head_shape)                         # v
    self.out_kernel = self.param("out_kernel", init, (d, d))

  @property
  def head_dim(self) -> int:
    return self.d_model // self.num_heads

  def _qkv(self, x: chex.Array) -> tuple[chex.Array, chex.Array, chex.Array]:
    """[..., d] -> three [..., H, head_dim]."""
    qkv = (x @ self.qkv_kernel).reshape(
        *x.shape[:-1], 3, self.num_heads, self.head_dim)
    return qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]

  def _attend(self, scores: chex.Array, mask: chex.Array) -> chex.Array:
    scores = jnp.where(mask, scores / math.sqrt(self.head_dim), _NEG_INF)
    return jax.nn.softmax(scores, axis=-1)

  def _scores_by_distance(self, q: chex.Array,
                          num_distances: int) -> chex.Array:
    """Acting form: q [B, H, hd] -> position scores [B, H, num_distances].

    (q + v) . (W_R R_d) is computed as ((q + v) W_R^T) . R_d: the query is
    projected back to embedding space, which for one query per row is far
    cheaper than projecting all M + 1 embeddings.
    """
    query_rel = jnp.einsum("bhd,hde->bhe", q + self.position_bias,
                           self.position_kernel)
    rel = sinusoid_embedding(np.arange(num_distances), self.d_model)
    return jnp.einsum("bhe,re->bhr", query_rel, rel)

  def _sequence_position_scores(self, q: chex.Array, num_keys: int,
                                num_distances: int) -> chex.Array:
    """q [B, L, H, hd] (the last L of num_keys keys) -> [B, H, L, num_keys].

    Entry (i, j) is (q_i + v) . (W_R R_d) at distance d = i - j, for
    0 <= d < num_distances; elsewhere it is a finite value the mask hides.
    The R embeddings are projected once (with many queries that is the
    cheap order) and the [.., L, R] scores by distance are skewed into key
    order with a pad and two reshapes (Transformer-XL's shift): exact, and
    its gradient is the same data movement, not a scatter or a matmul.
    """
    rel = sinusoid_embedding(np.arange(num_distances), self.d_model)
    rel_keys = jnp.einsum("re,hde->rhd", rel, self.position_kernel)
    by_distance = jnp.einsum("blhd,rhd->bhlr", q + self.position_bias,
                             rel_keys)
    return relative_shift(by_distance, num_keys)

  def __call__(self, x: chex.Array, mask: chex.Array, num_distances: int,
               memory: chex.Array | None = None) -> chex.Array:
    """x [B, L, d] queries; memory [B, M, d] extra keys before them or None.

    mask [B, L, M + L]; distances i - j >= num_distances must be masked.
    """
    if memory is None:
      q, k, v = self._qkv(x)
    else:
      d = self.d_model
      head_shape = (self.num_heads, self.head_dim)
      q = (x @ self.qkv_kernel[:, :d]).reshape(*x.shape[:-1], *head_shape)
      keys_in = jnp.concatenate([memory, x], axis=1)
      kv = (keys_in @ self.qkv_kernel[:, d:]).reshape(
          *keys_in.shape[:-1], 2, *head_shape)
      k, v = kv[..., 0, :, :], kv[..., 1, :, :]
    content = jnp.einsum("blhd,bmhd->bhlm", q + self.content_bias, k)
    position = self._sequence_position_scores(q, k.shape[1], num_distances)
    weights = self._attend(content + position, mask[:, None])
    out = jnp.einsum("bhlm,bmhd->blhd", weights, v)
    return out.reshape(x.shape) @ self.out_kernel

  def step(self, x: chex.Array, cache_keys: chex.Array,
           cache_values: chex.Array, valid: chex.Array,
           distances: chex.Array
           ) -> tuple[chex.Array, chex.Array, chex.Array]:
    """One query per row against the cached keys plus itself.

    x [B, d]; cache_keys/values [B, H, M, hd]; valid, distances [B, M].
    Returns (output [B, d], new key [B, H, hd], new value [B, H, hd]).
    """
    batch_size, memory_length = valid.shape
    q, k, v = self._qkv(x)
    by_distance = self._scores_by_distance(q, memory_length + 1)  # [B, H, M+1]
    gather_index = jnp.broadcast_to(
        distances[:, None, :], (batch_size, self.num_heads, memory_length))
    position = jnp.concatenate([
        jnp.take_along_axis(by_distance, gather_index, axis=-1),
        by_distance[..., :1]], axis=-1)                      # [B, H, M + 1]
    q_content = q + self.content_bias
    content = jnp.concatenate([
        jnp.einsum("bhd,bhmd->bhm", q_content, cache_keys),
        jnp.einsum("bhd,bhd->bh", q_content, k)[..., None]], axis=-1)
    mask = jnp.concatenate([valid, jnp.ones((batch_size, 1), bool)], axis=-1)
    weights = self._attend(content + position, mask[:, None, :])
    out = (jnp.einsum("bhm,bhmd->bhd", weights[..., :-1], cache_values)
           + weights[..., -1:] * v)
    return out.reshape(batch_size, self.d_model) @ self.out_kernel, k, v


class GRUGate(nn.Module):
  """GRU-type gating layer g(x, y) used in place of the residual add x + y."""
  d_model: int
  gate_bias: float

  def setup(self):
    d = self.d_model
    init = nn.initializers.lecun_normal()
    # W_r, W_z, W_g fused (one matmul of y); U_r, U_z fused (one matmul of x).
    self.w_kernel = self.param("w_kernel", init, (d, 3 * d))
    self.w_bias = self.param("w_bias", nn.initializers.zeros, (3 * d,))
    self.u_kernel = self.param("u_kernel", init, (d, 2 * d))
    self.ug_kernel = self.param("ug_kernel", init, (d, d))

  def __call__(self, x: chex.Array, y: chex.Array) -> chex.Array:
    wy_r, wy_z, wy_g = jnp.split(y @ self.w_kernel + self.w_bias, 3, axis=-1)
    ux_r, ux_z = jnp.split(x @ self.u_kernel, 2, axis=-1)
    r = jax.nn.sigmoid(wy_r + ux_r)
    z = jax.nn.sigmoid(wy_z + ux_z - self.gate_bias)
    candidate = jnp.tanh(wy_g + (r * x) @ self.ug_kernel)
    return (1.0 - z) * x + z * candidate


class GTrXLBlock(nn.Module):
  """One gated, identity-map-reordered Transformer-XL layer."""
  config: GTrXLConfig

  def setup(self):
    c = self.config
    self.attention_norm = nn.LayerNorm()
    self.attention = RelativeMultiHeadAttention(c.d_model, c.num_heads)
    self.attention_gate = GRUGate(c.d_model, c.gate_bias)
    self.mlp_norm = nn.LayerNorm()
    self.mlp_hidden = nn.Dense(c.mlp_size)
    self.mlp_out = nn.Dense(c.d_model)
    self.mlp_gate = GRUGate(c.d_model, c.gate_bias)

  def _mlp_submodule(self, x: chex.Array) -> chex.Array:
    y = self.mlp_out(nn.relu(self.mlp_hidden(self.mlp_norm(x))))
    return self.mlp_gate(x, nn.relu(y))

  def __call__(self, x: chex.Array, mask: chex.Array, num_distances: int,
               memory: chex.Array | None = None) -> chex.Array:
    """Sequence form: x [B, L, d] (+ memory inputs [B, M, d]) -> [B, L, d]."""
    normed_memory = None if memory is None else self.attention_norm(memory)
    y = self.attention(self.attention_norm(x), mask, num_distances,
                       normed_memory)
    x = self.attention_gate(x, nn.relu(y))
    return self._mlp_submodule(x)

  def step(self, x: chex.Array, cache_keys: chex.Array,
           cache_values: chex.Array, valid: chex.Array,
           distances: chex.Array
           ) -> tuple[chex.Array, chex.Array, chex.Array]:
    """Step form: x [B, d] -> (out [B, d], key [B, H, hd], value [B, H, hd])."""
    y, key, value = self.attention.step(
        self.attention_norm(x), cache_keys, cache_values, valid, distances)
    x = self.attention_gate(x, nn.relu(y))
    return self._mlp_submodule(x), key, value


class GTrXL(nn.Module):
  """Input projection to d_model, `num_layers` GTrXL blocks, final LayerNorm.

  The final LayerNorm (on by default) normalises the un-normalised residual
  stream before the heads (identity-map reordering leaves it raw).
  """
  config: GTrXLConfig
  final_layer_norm: bool = True

  def setup(self):
    c = self.config
    self.input_projection = nn.Dense(c.d_model)
    self.blocks = [GTrXLBlock(c) for _ in range(c.num_layers)]
    if self.final_layer_norm:
      self.output_norm = nn.LayerNorm()

  def initial_cache(self, batch_size: int) -> GTrXLCache:
    """Empty cache; callable on an unbound module."""
    return gtrxl_initial_cache(self.config, batch_size)

  def _finish(self, x: chex.Array) -> chex.Array:
    return self.output_norm(x) if self.final_layer_norm else x

  def __call__(self, x: chex.Array, step_type: chex.Array,
               num_memory_steps: int = 0,
               memory: SegmentMemory | None = None,
               return_layer_inputs: bool = False):
    """x [B, L, D_in], step_type [B, L] -> [B, L, d_model].

    Positions < num_memory_steps are memory: gradients do not flow through
    their hidden states (the forward pass is unchanged). With `memory`, the
    L positions also attend to the M memorised steps before them (each
    layer's stored input, stop-gradient). With `return_layer_inputs`, also
    returns every layer's input at the L positions, [B, num_layers, L, d].
    """
    chex.assert_rank(x, 3)
    batch_size, length, _ = x.shape
    chex.assert_shape(step_type, (batch_size, length))
    memory_length = self.config.memory_length
    if memory is None:
      mask = attention_mask(step_type, memory_length)
      num_keys = length
    else:
      chex.assert_shape(memory.inputs, (batch_size, self.config.num_layers,
                                        None, self.config.d_model))
      num_keys = memory.inputs.shape[2] + length
      mask = attention_mask(
          jnp.concatenate([memory.step_type, step_type], axis=1),
          memory_length, num_queries=length,
          key_valid=jnp.concatenate(
              [memory.valid, jnp.ones((batch_size, length), bool)], axis=1))
    # Distances past memory_length are masked out: no embeddings for them.
    num_distances = min(num_keys - 1, memory_length) + 1
    is_memory = jnp.asarray(np.arange(length) < num_memory_steps)[None, :, None]
    h = self.input_projection(x)
    layer_inputs = []
    for layer, block in enumerate(self.blocks):
      h = jnp.where(is_memory, jax.lax.stop_gradient(h), h)
      layer_inputs.append(h)
      layer_memory = (None if memory is None else
                      jax.lax.stop_gradient(memory.inputs[:, layer]))
      h = block(h, mask, num_distances, layer_memory)
    out = self._finish(h)
    if return_layer_inputs:
      return out, jnp.stack(layer_inputs, axis=1)
    return out

  def step(self, x: chex.Array, step_type: chex.Array,
           cache: GTrXLCache) -> tuple[chex.Array, GTrXLCache]:
    """x [B, D_in], step_type [B] -> (y [B, d_model], updated cache)."""
    chex.assert_rank(x, 2)
    batch_size = x.shape[0]
    c = self.config
    chex.assert_shape(step_type, (batch_size,))
    chex.assert_shape([cache.keys, cache.values],
                      (batch_size, c.num_layers, c.num_heads, c.memory_length,
                       c.d_model // c.num_heads))
    chex.assert_shape(cache.valid, (batch_size, c.memory_length))
    slots = np.arange(c.memory_length)
    # An episode start invalidates everything cached for that row.
    valid = cache.valid & ~jnp.equal(step_type, FIRST)[:, None]
    distances = (cache.index[:, None] - 1 - slots[None, :]) % c.memory_length + 1
    h = self.input_projection(x)
    new_keys, new_values = [], []
    for layer, block in enumerate(self.blocks):
      h, key, value = block.step(h, cache.keys[:, layer],
                                 cache.values[:, layer], valid, distances)
      new_keys.append(key)
      new_values.append(value)

    def written(old: chex.Array, new: list[chex.Array]) -> chex.Array:
      # Writes slot `index` of each row in place (when the cache is donated).
      def write_row(row, row_new, index):  # [NL, H, M, hd], [NL, H, hd]
        return jax.lax.dynamic_update_slice(row, row_new[:, :, None, :],
                                            (0, 0, index, 0))
      return jax.vmap(write_row)(old, jnp.stack(new, axis=1), cache.index)

    cache = GTrXLCache(
        keys=written(cache.keys, new_keys),
        values=written(cache.values, new_values),
        valid=valid | (slots[None, :] == cache.index[:, None]),
        index=(cache.index + 1) % c.memory_length)
    return self._finish(h), cache
