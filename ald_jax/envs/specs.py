"""What environments ald_jax can drive, checked up front with clear errors.

ald_jax needs one discrete action (a scalar integer in [0, A)) and one numeric
observation array. Rank 1 (a vector) and rank 3 ([H, W, C], for the conv
torso) reach the networks as they are; rank 2 ([H, W], e.g. a (1, 3) row) is
flattened to a vector (`BatchedEnv` reshapes each observation; logged once).
`validate_environment` checks an environment's specs and returns the shapes
the networks are built from.

Nested (dict / list / tuple) observations: `AdaptObservation(env,
observation_key=KEY)` selects one entry (e.g. a MiniGrid-style "image"), and
`FlattenObservation` concatenates all numeric entries into one float32
vector. `AdaptObservation(..., observation_scale=s)` multiplies observations
by `s` (e.g. 1/255 for 0-255 pixels); ald_jax never rescales on its own,
because a space's bounds cannot tell pixel intensities from small integer
codes (MiniGrid declares its codes as uint8 0-255).
"""
from __future__ import annotations

from typing import Any, NamedTuple

from absl import logging
import dm_env
from dm_env import specs
import numpy as np

from ald_jax import config as config_lib

FLATTENED_OBS_RANK = 2   # flattened to a vector for the torso
SUPPORTED_OBS_RANKS = tuple(sorted((*config_lib.OBS_RANKS,
                                    FLATTENED_OBS_RANK)))

_LOGGED: set[str] = set()


def log_once(message: str) -> None:
  """Logs `message` the first time only: E environments are built per actor,
  and each would otherwise repeat the same set-up note."""
  if message not in _LOGGED:
    _LOGGED.add(message)
    logging.info("%s", message)


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
    raise UnsupportedEnvironmentError(nested_observation_message(spec))
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
        f"torso takes rank 1 (vector) or rank 3 ([H, W, C]) observations, and "
        f"rank 2 is flattened; wrap the environment with "
        f"ald_jax.envs.FlattenObservation")
  if 0 in shape:
    raise UnsupportedEnvironmentError(f"observation shape {shape} is empty")
  if len(shape) == FLATTENED_OBS_RANK:
    flat = (shape[0] * shape[1],)
    log_once(f"observation spec shape {shape} (rank 2) is flattened to {flat} "
             f"for the torso")
    return flat
  return shape


def _all_leaves_numeric(spec: Any) -> bool:
  return all(isinstance(leaf, specs.Array) and _is_numeric(np.dtype(leaf.dtype))
             for _, leaf in _flatten_specs(spec))


def nested_observation_message(spec: Any) -> str:
  """The refusal for a nested observation spec: names the keys (indices) and
  suggests only what works for this spec."""
  keys = sorted(spec) if isinstance(spec, dict) else list(range(len(spec)))
  message = (f"observation spec is nested ({_describe(spec)}); select one "
             f"entry with ald_jax.envs.AdaptObservation(env, "
             f"observation_key=K) for K in {keys}")
  if _all_leaves_numeric(spec):
    message += (", or concatenate all entries into one float32 vector with "
                "ald_jax.envs.FlattenObservation(env)")
  return message


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


class _ObservationWrapper(dm_env.Environment):
  """Delegates everything to `self._env` but the observation, which
  `_transform(timestep)` rewrites and `self._spec` describes."""
  _env: dm_env.Environment
  _spec: specs.Array

  def _transform(self, timestep: dm_env.TimeStep) -> dm_env.TimeStep:
    raise NotImplementedError

  def reset(self) -> dm_env.TimeStep:
    return self._transform(self._env.reset())

  def step(self, action) -> dm_env.TimeStep:
    return self._transform(self._env.step(action))

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


class FlattenObservation(_ObservationWrapper):
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

  _transform = _flatten


# -- AdaptObservation ----------------------------------------------------------


def unscaled_uint8_note(dtype: Any, maximum: Any, scale: float) -> str:
  """A hint for the start-up log when 0-255 values would reach the torso."""
  if np.dtype(dtype) == np.uint8 and scale == 1.0 and np.max(maximum) > 1:
    return (" (unscaled: pass observation_scale=1/255 if these are 0-255 "
            "pixel intensities)")
  return ""


def check_observation_options(observation_key: Any,
                              observation_scale: Any) -> float:
  """Checks the two observation options; returns the scale as a float."""
  if observation_key is not None and (
      not isinstance(observation_key, (str, int))
      or isinstance(observation_key, bool)):
    raise ValueError(f"observation_key must be a dict key (str), a tuple "
                     f"index (int) or None, got {observation_key!r}")
  if (not isinstance(observation_scale, (int, float, np.number))
      or isinstance(observation_scale, bool)
      or not np.isfinite(observation_scale) or observation_scale <= 0):
    raise ValueError(f"observation_scale must be a finite number > 0, got "
                     f"{observation_scale!r}")
  return float(observation_scale)


def select_entry(nested: Any, observation_key: str | int, what: str) -> Any:
  """`nested[observation_key]`, or an error naming the keys there are."""
  if isinstance(nested, dict):
    if observation_key not in nested:
      raise UnsupportedEnvironmentError(
          f"observation_key={observation_key!r} is not in the {what}; its "
          f"keys are {sorted(nested)}")
    return nested[observation_key]
  if isinstance(nested, (list, tuple)):
    if (not isinstance(observation_key, int)
        or not 0 <= observation_key < len(nested)):
      raise UnsupportedEnvironmentError(
          f"observation_key={observation_key!r} is not an index of the "
          f"{what}, which has {len(nested)} entries")
    return nested[observation_key]
  raise UnsupportedEnvironmentError(
      f"observation_key={observation_key!r} was given but the {what} is not "
      f"a dict, list or tuple")


class AdaptObservation(_ObservationWrapper):
  """Selects one entry of a nested observation and/or scales observations.

  `observation_key` picks `observation[key]` from a dict (or `[index]` from a
  list / tuple) observation; None keeps the observation whole.
  `observation_scale` multiplies the (selected) observation, delivered as
  float32: 1.0 (the default) leaves values as they are, 1/255 maps 0-255
  pixels to [0, 1]. Actions, rewards, discounts and `episode_success()` pass
  through. The choice is logged once.
  """

  def __init__(self, env: dm_env.Environment,
               observation_key: str | int | None = None,
               observation_scale: float = 1.0):
    self._env = env
    self._key = observation_key
    self._scale = check_observation_options(observation_key,
                                            observation_scale)
    spec = env.observation_spec()
    if observation_key is not None:
      spec = select_entry(spec, observation_key, "observation spec")
    if _is_nested(spec):
      raise UnsupportedEnvironmentError(
          f"observation entry {observation_key!r} is itself nested: "
          f"{nested_observation_message(spec)}")
    if not isinstance(spec, specs.Array) or not _is_numeric(
        np.dtype(spec.dtype)):
      raise UnsupportedEnvironmentError(
          f"observation entry {observation_key!r} must be a numeric "
          f"dm_env.specs.Array, got {spec!r}")
    self._spec = specs.Array(spec.shape, np.float32, name="observation")
    maximum = getattr(spec, "maximum", 255)  # unbounded uint8: up to 255
    log_once(f"{type(env).__name__}: observation entry {observation_key!r} "
             f"(shape {tuple(spec.shape)}, {np.dtype(spec.dtype)}"
             f"{unscaled_uint8_note(spec.dtype, maximum, self._scale)}) "
             f"scaled by {self._scale:g}")

  def _adapt(self, timestep: dm_env.TimeStep) -> dm_env.TimeStep:
    obs = timestep.observation
    if self._key is not None:
      obs = obs[self._key]
    obs = np.asarray(obs, np.float32)
    obs = obs * np.float32(self._scale) if self._scale != 1.0 else obs.copy()
    return timestep._replace(observation=obs)

  _transform = _adapt
