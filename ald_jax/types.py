"""Containers shared by networks, losses, the learner and the system.

Time convention (dm_env / acme style). Index t of every array is one
environment time step: `observation[t]`, `step_type[t]`, and the `reward[t]`
and `discount[t]` that *arrived with* that step (results of `action[t-1]`).
`action[t]` and `behaviour_logits[t]` are what the actor chose at step t. An
action chosen at a LAST step is ignored by the environment, so losses mask it.

A batch row holds `C + T + 1` steps: a context prefix of C earlier steps of
the same stream (transformer memory; zeros with step_type MID where the stream
had not started yet: attention never crosses the FIRST step that follows),
the T steps the losses cover, and one bootstrap step.

`actor_state` is the actor's recurrent state before the row's *first* step
(position 0, stream step k*T - C): the LSTM is re-run over the whole row, so
gradients can teach it to remember across the context as well as the unroll.
Rows built by the system also carry `stream_id` (which environment stream)
and `unroll_index` (k, counting the stream's unrolls from 0); the learner's
segment memory uses them. Both are optional (None) for plain batches.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import chex
import flax.struct
import numpy as np

Array = chex.Array
Params = Any

# dm_env.StepType values, as small ints in arrays.
FIRST, MID, LAST = 0, 1, 2


class AgentOutput(NamedTuple):
  """What every network emits: discrete-action logits and a scalar value."""
  logits: Array  # [..., A]
  value: Array   # [...]


class LSTMState(NamedTuple):
  cell: Array    # [B, H]
  hidden: Array  # [B, H]


@flax.struct.dataclass
class Batch:
  """A batch of B unrolls, batch-major: every array is [B, C+T+1, ...]."""
  observation: Array       # [B, L, *obs_shape] float32
  action: Array            # [B, L] int32
  reward: Array            # [B, L] float32
  discount: Array          # [B, L] float32 (environment discount, 0 at a terminal)
  step_type: Array         # [B, L] int32: FIRST / MID / LAST
  behaviour_logits: Array  # [B, L, A] float32, the actor's logits when acting
  # The actor's recurrent state before position 0 of the row (the first
  # context step). Any pytree with leading dimension B; an LSTMState for LSTM
  # actors (zeros where the stream had not started yet).
  actor_state: Any
  stream_id: Array | None = None     # [B] int32, which environment stream
  unroll_index: Array | None = None  # [B] int32, k: the stream's k-th unroll

  @property
  def batch_size(self) -> int:
    return self.action.shape[0]

  @property
  def sequence_length(self) -> int:
    return self.action.shape[1]

  def validate(self, *, context: int, unroll: int, num_actions: int,
               obs_shape: tuple[int, ...] | None = None) -> None:
    """Checks shapes against the learner's expectations with clear errors."""
    b = self.batch_size
    length = context + unroll + 1
    if self.action.ndim != 2:
      raise ValueError(f"Batch.action must be [B, L], got shape "
                       f"{self.action.shape}")
    if self.sequence_length != length:
      raise ValueError(
          f"Batch time length {self.sequence_length} != learner_context "
          f"({context}) + unroll_length ({unroll}) + 1 = {length}")
    for name in ("reward", "discount", "step_type"):
      shape = getattr(self, name).shape
      if shape != (b, length):
        raise ValueError(f"Batch.{name} must have shape {(b, length)}, got "
                         f"{shape}")
    logits_shape = self.behaviour_logits.shape
    if logits_shape[:2] != (b, length) or len(logits_shape) != 3:
      raise ValueError(f"Batch.behaviour_logits must be [B, L, A] = "
                       f"{(b, length, num_actions)}, got {logits_shape}")
    if logits_shape[2] != num_actions:
      raise ValueError(
          f"Batch.behaviour_logits has {logits_shape[2]} actions but the "
          f"learner was built for num_actions={num_actions}")
    if self.observation.shape[:2] != (b, length):
      raise ValueError(f"Batch.observation must start with {(b, length)}, got "
                       f"{self.observation.shape}")
    if obs_shape is not None and tuple(self.observation.shape[2:]) != tuple(
        obs_shape):
      raise ValueError(f"Batch.observation per-step shape "
                       f"{tuple(self.observation.shape[2:])} != observation "
                       f"spec shape {tuple(obs_shape)}")


def zeros_batch(batch_size: int, sequence_length: int,
                obs_shape: tuple[int, ...], num_actions: int,
                actor_state: Any) -> Batch:
  """An all-zeros batch, e.g. the example batch for `init`. Numpy arrays."""
  b, length = batch_size, sequence_length
  return Batch(
      observation=np.zeros((b, length, *obs_shape), np.float32),
      action=np.zeros((b, length), np.int32),
      reward=np.zeros((b, length), np.float32),
      discount=np.ones((b, length), np.float32),
      step_type=np.full((b, length), MID, np.int32),
      behaviour_logits=np.zeros((b, length, num_actions), np.float32),
      actor_state=actor_state,
  )
