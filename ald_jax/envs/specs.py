"""What environments ald_jax can drive, checked up front with clear errors.

ald_jax needs one discrete action (a scalar integer in [0, A)) and one numeric
observation array of rank 1 (a vector) or rank 3 ([H, W, C], for the conv
torso). `validate_environment` checks an environment's specs and returns the
shapes the networks are built from; `FlattenObservation` turns a nested
(dict / list / tuple) or odd-rank observation into one float32 vector.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import dm_env
from dm_env import specs
import numpy as np

SUPPORTED_OBS_RANKS = (1, 3)


class UnsupportedEnvironmentError(ValueError):
  """The environment's specs are outside what ald_jax supports."""


class EnvInfo(NamedTuple):
  obs_shape: tuple[int, ...]
  num_actions: int


def _is_nested(spec: Any) -> bool:
  return isinstance(spec, (dict, list, tuple))


def _describe(spec: Any) -> str:
  if isinstance(spec, dict):
    return f"a dict with keys {sorted(spec)}"
  return f"a {type(spec).__name__} of {len(spec)} specs"


def _is_numeric(dtype: np.dtype) -> bool:
  return (np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating)
          or np.issubdtype(dtype, np.bool_))


def num_actions_from_spec(spec: Any) -> int:
  """Number of discrete actions of an action spec; raises when unsupported."""
  if _is_nested(spec):
    raise UnsupportedEnvironmentError(
        f"action spec is nested ({_describe(spec)}); ald_jax needs a single "
        f"discrete action (dm_env.specs.DiscreteArray)")
  if not isinstance(spec, specs.Array):
    raise UnsupportedEnvironmentError(
        f"action spec must be a dm_env.specs.Array, got {type(spec).__name__}")
  dtype = np.dtype(spec.dtype)
  if not np.issubdtype(dtype, np.integer):
    kind = ("bounded " if isinstance(spec, specs.BoundedArray) else "")
    raise UnsupportedEnvironmentError(
        f"continuous action spec ({kind}{dtype} array of shape {spec.shape}) "
        f"is not supported: ald_jax needs discrete actions "
        f"(dm_env.specs.DiscreteArray)")
  if spec.shape != ():
    raise UnsupportedEnvironmentError(
        f"multi-dimensional action spec (shape {spec.shape}) is not "
        f"supported: ald_jax needs one scalar discrete action")
  if isinstance(spec, specs.DiscreteArray):
    num = int(spec.num_values)
  elif isinstance(spec, specs.BoundedArray):
    low, high = int(np.min(spec.minimum)), int(np.max(spec.maximum))
    if low != 0:
      raise UnsupportedEnvironmentError(
          f"integer action spec has minimum {low}; ald_jax emits actions in "
          f"[0, A), so the minimum must be 0")
    num = high + 1
  else:
    raise UnsupportedEnvironmentError(
        f"integer action spec without bounds ({spec!r}); use "
        f"dm_env.specs.DiscreteArray(num_values)")
  if num < 1:
    raise UnsupportedEnvironmentError(f"action spec has {num} actions")
  return num


def obs_shape_from_spec(spec: Any) -> tuple[int, ...]:
  """Observation shape of an observation spec; raises when unsupported."""
  if _is_nested(spec):
    raise UnsupportedEnvironmentError(
        f"observation spec is nested ({_describe(spec)}); wrap the environment "
        f"with ald_jax.envs.FlattenObservation to get one float32 vector")
  if not isinstance(spec, specs.Array):
    raise UnsupportedEnvironmentError(
        f"observation spec must be a dm_env.specs.Array, got "
        f"{type(spec).__name__}")
  dtype = np.dtype(spec.dtype)
  if not _is_numeric(dtype):
    raise UnsupportedEnvironmentError(
        f"observation dtype {dtype} is not numeric (need bool, integer or "
        f"float; observations are fed to the networks as float32)")
  shape = tuple(int(d) for d in spec.shape)
  if len(shape) not in SUPPORTED_OBS_RANKS:
    raise UnsupportedEnvironmentError(
        f"observation rank {len(shape)} (shape {shape}) is not supported: the "
        f"torso takes rank 1 (vector) or rank 3 ([H, W, C]) observations; "
        f"wrap the environment with ald_jax.envs.FlattenObservation")
  if 0 in shape:
    raise UnsupportedEnvironmentError(f"observation shape {shape} is empty")
  return shape


def validate_environment(env: Any) -> EnvInfo:
  """Checks that ald_jax can drive `env`; returns its shapes.

  Raises:
    UnsupportedEnvironmentError: naming what is wrong.
  """
  for method in ("reset", "step", "observation_spec", "action_spec"):
    if not callable(getattr(env, method, None)):
      raise UnsupportedEnvironmentError(
          f"{type(env).__name__} is not a dm_env.Environment: no {method}() "
          f"method")
  info = EnvInfo(obs_shape=obs_shape_from_spec(env.observation_spec()),
                 num_actions=num_actions_from_spec(env.action_spec()))
  for name in ("reward", "discount"):
    spec_fn = getattr(env, f"{name}_spec", None)
    spec = spec_fn() if callable(spec_fn) else None
    if spec is not None and (_is_nested(spec) or getattr(spec, "shape",
                                                          ()) != ()):
      raise UnsupportedEnvironmentError(
          f"{name} spec {spec!r} is not a scalar; ald_jax needs one scalar "
          f"{name} per step")
  return info


# -- FlattenObservation --------------------------------------------------------


def _flatten_specs(spec: Any,
                   path: str = "observation") -> list[tuple[str, Any]]:
  """Leaves of a nested spec in a fixed order (dict keys sorted)."""
  if isinstance(spec, dict):
    return [leaf for key in sorted(spec)
            for leaf in _flatten_specs(spec[key], f"{path}/{key}")]
  if isinstance(spec, (list, tuple)):
    return [leaf for i, s in enumerate(spec)
            for leaf in _flatten_specs(s, f"{path}/{i}")]
  return [(path, spec)]


def _flatten_values(value: Any) -> list[Any]:
  if isinstance(value, dict):
    return [leaf for key in sorted(value)
            for leaf in _flatten_values(value[key])]
  if isinstance(value, (list, tuple)):
    return [leaf for v in value for leaf in _flatten_values(v)]
  return [value]


class FlattenObservation(dm_env.Environment):
  """Flattens any (nested) numeric observation into one float32 vector.

  Dict entries are concatenated in sorted-key order, lists/tuples in order,
  each leaf raveled in C order. Actions, rewards and discounts pass through,
  and so does the wrapped environment's `episode_success()` when it has one.
  """

  def __init__(self, env: dm_env.Environment):
    self._env = env
    leaves = _flatten_specs(env.observation_spec())
    sizes = []
    for path, spec in leaves:
      if not isinstance(spec, specs.Array):
        raise UnsupportedEnvironmentError(
            f"{path}: observation spec leaf must be a dm_env.specs.Array, got "
            f"{type(spec).__name__}")
      if not _is_numeric(np.dtype(spec.dtype)):
        raise UnsupportedEnvironmentError(
            f"{path}: observation dtype {np.dtype(spec.dtype)} is not numeric")
      sizes.append(int(np.prod(spec.shape, dtype=np.int64)))
    self._size = int(sum(sizes))
    if self._size == 0:
      raise UnsupportedEnvironmentError("observation spec has no elements")
    self._spec = specs.Array((self._size,), np.float32, name="observation")

  def _flatten(self, timestep: dm_env.TimeStep) -> dm_env.TimeStep:
    out = np.empty(self._size, np.float32)
    start = 0
    for leaf in _flatten_values(timestep.observation):
      leaf = np.asarray(leaf).reshape(-1)
      out[start:start + leaf.size] = leaf
      start += leaf.size
    if start != self._size:
      raise ValueError(f"observation has {start} elements, its spec "
                       f"{self._size}")
    return timestep._replace(observation=out)

  def reset(self) -> dm_env.TimeStep:
    return self._flatten(self._env.reset())

  def step(self, action) -> dm_env.TimeStep:
    return self._flatten(self._env.step(action))

  def observation_spec(self) -> specs.Array:
    return self._spec

  def action_spec(self):
    return self._env.action_spec()

  def reward_spec(self):
    return self._env.reward_spec()

  def discount_spec(self):
    return self._env.discount_spec()

  def episode_success(self) -> bool | None:
    success = getattr(self._env, "episode_success", None)
    return success() if callable(success) else None

  def close(self) -> None:
    self._env.close()

  @property
  def unwrapped(self) -> dm_env.Environment:
    return self._env
