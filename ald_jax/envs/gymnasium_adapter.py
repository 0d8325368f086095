"""Gymnasium environments as dm_env environments.

`GymnasiumEnv` wraps one `gymnasium.Env` with a `Discrete` action space:

* actions 0..n-1 map to the space's `start + a`;
* observations become float32 arrays (a copy, never the env's own buffer):
  a `Box` as it is (rank 2 is flattened later, like any dm_env's), a
  `Discrete(n, start)` one-hot over its n values (`obs - start`);
* a `Dict` / `Tuple` observation needs `observation_key`, which selects one
  entry (e.g. MiniGrid's "image"); the refusal names the keys, and suggests
  `gymnasium.wrappers.FlattenObservation` only when gymnasium can flatten the
  space (MiniGrid's mission string cannot be flattened);
* `observation_scale` multiplies observations (default 1.0: unscaled; use
  1/255 for 0-255 pixels; MiniGrid's uint8 "image" holds small integer codes,
  so leave it at 1). The choice is logged once;
* `terminated` -> LAST with discount 0 (dm_env termination);
  `truncated` -> LAST with discount 1 (dm_env truncation: bootstrap);
* the first reset passes `seed`, later resets continue the env's own RNG;
* `episode_success()` reports `info["is_success"]` from the last step when
  the env provides it (the gymnasium-robotics convention), else None.

`gymnasium_env_factory(env_id_or_callable, observation_key=...,
observation_scale=..., **kwargs)` builds them per seed, from an env id or from
any callable returning a (wrapped) env.

gymnasium is an optional dependency, imported only when used:
`pip install 'ald_jax[gymnasium]'`.
"""
from __future__ import annotations

from typing import Any, Callable

import dm_env
from dm_env import specs
import numpy as np

from ald_jax.envs import registry
from ald_jax.envs.batched import EnvFactory
from ald_jax.envs.specs import check_observation_options
from ald_jax.envs.specs import log_once
from ald_jax.envs.specs import select_entry
from ald_jax.envs.specs import unscaled_uint8_note
from ald_jax.envs.specs import UnsupportedEnvironmentError
from ald_jax.envs.specs import validate_environment

INSTALL_HINT = "pip install 'ald_jax[gymnasium]'"


def import_gymnasium():
  """Imports gymnasium, or explains how to install it."""
  try:
    import gymnasium  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(f"the gymnasium adapter needs gymnasium, which is not "
                      f"installed: {INSTALL_HINT}") from e
  return gymnasium


def _flatten_hint(spaces: Any, space: Any) -> str:
  """Suggests gymnasium's FlattenObservation only if it works on `space`."""
  try:
    spaces.flatdim(space)
  except (NotImplementedError, ValueError, TypeError):
    return ""
  return (", or wrap the env with gymnasium.wrappers.FlattenObservation to "
          "get one flat vector")


def _env_name(gym_env: Any) -> str:
  spec = getattr(gym_env, "spec", None)
  return getattr(spec, "id", None) or type(gym_env).__name__


def _space_keys(spaces: Any, space: Any) -> list[Any]:
  if isinstance(space, spaces.Dict):
    return sorted(space.spaces)
  return list(range(len(space.spaces)))


class GymnasiumEnv(dm_env.Environment):
  """A dm_env view of one gymnasium environment (see module docstring)."""

  def __init__(self, gym_env: Any, seed: int | None = None,
               observation_key: str | int | None = None,
               observation_scale: float = 1.0):
    gymnasium = import_gymnasium()
    spaces = gymnasium.spaces
    self._env = gym_env
    self._seed = None if seed is None else int(seed)
    self._key = observation_key
    self._scale = np.float32(check_observation_options(observation_key,
                                                       observation_scale))

    action_space = gym_env.action_space
    if not isinstance(action_space, spaces.Discrete):
      raise UnsupportedEnvironmentError(
          f"gymnasium action space {action_space} is not supported: ald_jax "
          f"needs gymnasium.spaces.Discrete actions")
    self._num_actions = int(action_space.n)
    self._action_start = int(action_space.start)

    obs_space = gym_env.observation_space
    nested = (spaces.Dict, spaces.Tuple)
    if observation_key is not None:
      if not isinstance(obs_space, nested):
        raise UnsupportedEnvironmentError(
            f"observation_key={observation_key!r} was given but the "
            f"gymnasium observation space {obs_space} is not a Dict or Tuple")
      obs_space = select_entry(
          obs_space.spaces if isinstance(obs_space, spaces.Dict) else tuple(
              obs_space.spaces), observation_key, "gymnasium observation space")
    entry = ("" if observation_key is None else
             f"observation_key={observation_key!r} selects ")
    if isinstance(obs_space, nested) and observation_key is not None:
      raise UnsupportedEnvironmentError(
          f"{entry}gymnasium observation space {obs_space}, which is nested "
          f"again; observation_key selects one level only: choose another "
          f"key, or return one array from a gymnasium.ObservationWrapper")
    if isinstance(obs_space, nested):
      raise UnsupportedEnvironmentError(
          f"gymnasium observation space {obs_space} is nested: pass "
          f"observation_key=K (to gymnasium_env_factory or GymnasiumEnv) to "
          f"select one entry, K in {_space_keys(spaces, obs_space)}"
          f"{_flatten_hint(spaces, obs_space)}")
    self._one_hot_start = None  # set for Discrete observations
    if isinstance(obs_space, spaces.Box):
      dtype = np.dtype(obs_space.dtype)
      if not (np.issubdtype(dtype, np.number) or dtype == np.bool_) or (
          np.issubdtype(dtype, np.complexfloating)):
        raise UnsupportedEnvironmentError(
            f"{entry}gymnasium Box observation dtype {dtype}, which is not "
            f"numeric")
      shape = tuple(int(d) for d in obs_space.shape)
      encoding = f"Box {shape} {dtype}" + unscaled_uint8_note(
          dtype, obs_space.high, float(self._scale))
    elif isinstance(obs_space, spaces.Discrete):
      self._one_hot_start = int(obs_space.start)
      shape = (int(obs_space.n),)
      encoding = f"Discrete({obs_space.n}, start={obs_space.start}) one-hot"
    else:
      raise UnsupportedEnvironmentError(
          f"{entry}gymnasium observation space {type(obs_space).__name__} "
          f"({obs_space}), which is not supported: use Box or Discrete"
          f"{_flatten_hint(spaces, obs_space)}")
    self._obs_spec = specs.Array(shape, np.float32, name="observation")
    log_once(f"gymnasium {_env_name(gym_env)}: observation "
             f"{'' if observation_key is None else f'[{observation_key!r}] '}"
             f"{encoding} -> float32 {shape}, scaled by {float(self._scale):g}")
    self._needs_reset = True
    self._seeded = False
    self._ended = False
    self._last_info: dict[str, Any] = {}

  def _observation(self, obs: Any) -> np.ndarray:
    if self._key is not None:
      obs = obs[self._key]
    if self._one_hot_start is not None:
      out = np.zeros(self._obs_spec.shape, np.float32)
      out[int(obs) - self._one_hot_start] = 1.0
    else:
      out = np.array(obs, dtype=np.float32)  # a copy, float32
    if self._scale != 1.0:
      out *= self._scale
    return out

  def reset(self) -> dm_env.TimeStep:
    seed = None if self._seeded else self._seed
    self._seeded = True
    obs, info = self._env.reset(seed=seed)
    self._needs_reset = False
    self._ended = False
    self._last_info = info
    return dm_env.restart(self._observation(obs))

  def step(self, action) -> dm_env.TimeStep:
    if self._needs_reset:
      return self.reset()
    a = int(action)
    if not 0 <= a < self._num_actions:
      raise ValueError(f"action must be in [0, {self._num_actions}), got "
                       f"{action!r}")
    obs, reward, terminated, truncated, info = self._env.step(
        a + self._action_start)
    self._last_info = info
    obs = self._observation(obs)
    reward = float(reward)
    if terminated or truncated:
      self._needs_reset = True
      self._ended = True
      if terminated:
        return dm_env.termination(reward, obs)
      return dm_env.truncation(reward, obs)
    return dm_env.transition(reward, obs)

  def observation_spec(self) -> specs.Array:
    return self._obs_spec

  def action_spec(self) -> specs.DiscreteArray:
    return specs.DiscreteArray(self._num_actions, dtype=np.int32,
                               name="action")

  def episode_success(self) -> bool | None:
    if not self._ended or "is_success" not in self._last_info:
      return None
    return bool(self._last_info["is_success"])

  def close(self) -> None:
    self._env.close()

  @property
  def gym_env(self) -> Any:
    return self._env


class _GymnasiumFactory:
  """`(seed) -> GymnasiumEnv` for an env id or a callable returning an env."""

  def __init__(self, env_id_or_callable: str | Callable[..., Any],
               kwargs: dict[str, Any], observation_key: str | int | None,
               observation_scale: float):
    self._source = env_id_or_callable
    self.kwargs = dict(kwargs)
    self.observation_key = observation_key
    self.observation_scale = observation_scale

  def __call__(self, seed: int) -> GymnasiumEnv:
    if isinstance(self._source, str):
      gym_env = import_gymnasium().make(self._source, **self.kwargs)
    else:
      gym_env = self._source(**self.kwargs)
    return GymnasiumEnv(gym_env, seed=seed,
                        observation_key=self.observation_key,
                        observation_scale=self.observation_scale)

  def __repr__(self) -> str:
    source = (self._source if isinstance(self._source, str) else getattr(
        self._source, "__name__", repr(self._source)))
    options = dict(self.kwargs)
    if self.observation_key is not None:
      options["observation_key"] = self.observation_key
    if self.observation_scale != 1.0:
      options["observation_scale"] = self.observation_scale
    args = "".join(f", {k}={v!r}" for k, v in sorted(options.items()))
    return f"gymnasium_env_factory({source!r}{args})"

  def provenance(self) -> dict[str, Any]:
    """The gymnasium id (or the env callable's module:qualname) and every
    argument the factory passes on."""
    if isinstance(self._source, str):
      origin = {"id": self._source}
    else:
      origin = {"callable": registry.qualified_name(self._source)}
    return {"source": "gymnasium", **origin,
            "kwargs": dict(sorted(self.kwargs.items())),
            "observation_key": self.observation_key,
            "observation_scale": self.observation_scale}


def gymnasium_env_factory(env_id_or_callable: str | Callable[..., Any],
                          *,
                          observation_key: str | int | None = None,
                          observation_scale: float = 1.0,
                          **kwargs: Any) -> EnvFactory:
  """An `EnvFactory` for `gymnasium.make(env_id, **kwargs)` or `fn(**kwargs)`.

  Args:
    env_id_or_callable: a registered gymnasium id, or a callable returning a
      `gymnasium.Env` (apply wrappers there, e.g.
      `lambda: ImgObsWrapper(gymnasium.make("MiniGrid-MemoryS7-v0"))`).
    observation_key: for a Dict (Tuple) observation space, the key (index) of
      the one entry to observe, e.g. "image"; None for Box / Discrete spaces.
    observation_scale: multiplies every observation (1/255 for pixels).
    **kwargs: passed to `gymnasium.make` or the callable.

  Builds one probe environment now so that a missing gymnasium, an unknown id
  or an unsupported space fails at set-up time with a clear message.
  """
  import_gymnasium()
  if not (isinstance(env_id_or_callable, str) or callable(env_id_or_callable)):
    raise TypeError(f"expected a gymnasium env id or a callable returning a "
                    f"gymnasium.Env, got {env_id_or_callable!r}")
  check_observation_options(observation_key, observation_scale)
  factory = _GymnasiumFactory(env_id_or_callable, kwargs, observation_key,
                              observation_scale)
  probe = factory(0)
  try:
    validate_environment(probe)
  finally:
    probe.close()
  return factory
