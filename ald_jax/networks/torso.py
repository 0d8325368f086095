"""Observation encoder shared by the actor (LSTM) and learner (GTrXL) nets.

Vector observations ([D]) go straight into an MLP; small grids ([H, W, C])
first go through 3x3 convolutions. Any leading batch dimensions are folded
into one for the layers and restored at the end, so the same module serves
single acting steps ([B, ...]) and training sequences ([B, T, ...]).
"""
from __future__ import annotations

import chex
import flax.linen as nn
import jax.numpy as jnp

from ald_jax.config import OBS_RANKS as SUPPORTED_OBS_NDIMS
from ald_jax.config import TorsoConfig


class Torso(nn.Module):
  """Conv (grid only) -> flatten -> MLP, ReLU everywhere.

  Attributes:
    config: layer sizes.
    obs_ndim: rank of one observation: 1 for vectors [D], 3 for grids
      [H, W, C]. Everything in front of those dims is batch.
  """
  config: TorsoConfig
  obs_ndim: int

  @nn.compact
  def __call__(self, obs: chex.Array) -> chex.Array:
    if self.obs_ndim not in SUPPORTED_OBS_NDIMS:
      raise ValueError(f"Torso.obs_ndim must be one of {SUPPORTED_OBS_NDIMS} "
                       f"(vector [D] or grid [H, W, C]), got {self.obs_ndim}")
    if obs.ndim < self.obs_ndim:
      raise ValueError(f"Torso expected observations with at least "
                       f"{self.obs_ndim} dims, got shape {obs.shape}")
    batch_shape = obs.shape[:obs.ndim - self.obs_ndim]
    obs_shape = obs.shape[obs.ndim - self.obs_ndim:]
    x = jnp.reshape(obs, (-1, *obs_shape)).astype(jnp.float32)
    if self.obs_ndim == 3:
      # SAME padding keeps tiny grids (e.g. a 3x3 local view) from vanishing.
      for channels in self.config.conv_channels:
        x = nn.relu(nn.Conv(channels, kernel_size=(3, 3), padding="SAME")(x))
    x = jnp.reshape(x, (x.shape[0], -1))
    for size in self.config.mlp_sizes:
      x = nn.relu(nn.Dense(size)(x))
    return jnp.reshape(x, (*batch_shape, x.shape[-1]))
