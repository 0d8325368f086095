"""Gymnasium environments as dm_env environments.

`GymnasiumEnv` wraps one `gymnasium.Env` with a `Discrete` action space and a
`Box` (or `Discrete`, one-hot encoded) observation space:

* actions 0..n-1 map to the space's `start + a`;
* observations become float32 arrays (a copy, never the env's own buffer);
* `terminated` -> LAST with discount 0 (dm_env termination);
  `truncated` -> LAST with discount 1 (dm_env truncation: bootstrap);
* the first reset passes `seed`, later resets continue the env's own RNG;
* `episode_success()` reports `info["is_success"]` from the last step when
  the env provides it (the gymnasium-robotics convention), else None.

gymnasium is an optional dependency, imported only when used:
`pip install 'ald_jax[gymnasium]'`.
"""
from __future__ import annotations

from typing import Any, Callable

import dm_env
from dm_env import specs
import numpy as np

from ald_jax.envs.batched import EnvFactory
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


class GymnasiumEnv(dm_env.Environment):
  """A dm_env view of one gymnasium environment (see module docstring)."""

  def __init__(self, gym_env: Any, seed: int | None = None):
    gymnasium = import_gymnasium()
    spaces = gymnasium.spaces
    self._env = gym_env
    self._seed = None if seed is None else int(seed)

    action_space = gym_env.action_space
    if not isinstance(action_space, spaces.Discrete):
      raise UnsupportedEnvironmentError(
          f"gymnasium action space {action_space} is not supported: ald_jax "
          f"needs gymnasium.spaces.Discrete actions")
    self._num_actions = int(action_space.n)
    self._action_start = int(action_space.start)

    obs_space = gym_env.observation_space
    self._one_hot_start = None  # set for Discrete observations
    if isinstance(obs_space, spaces.Box):
      dtype = np.dtype(obs_space.dtype)
      if not (np.issubdtype(dtype, np.number) or dtype == np.bool_) or (
          np.issubdtype(dtype, np.complexfloating)):
        raise UnsupportedEnvironmentError(
            f"gymnasium Box observation dtype {dtype} is not numeric")
      shape = tuple(int(d) for d in obs_space.shape)
    elif isinstance(obs_space, spaces.Discrete):
      self._one_hot_start = int(obs_space.start)
      shape = (int(obs_space.n),)
    elif isinstance(obs_space, (spaces.Dict, spaces.Tuple)):
      raise UnsupportedEnvironmentError(
          f"gymnasium observation space {obs_space} is nested: wrap the env "
          f"with gymnasium.wrappers.FlattenObservation first")
    else:
      raise UnsupportedEnvironmentError(
          f"gymnasium observation space {type(obs_space).__name__} "
          f"({obs_space}) is not supported: use Box or Discrete (or "
          f"gymnasium.wrappers.FlattenObservation)")
    self._obs_spec = specs.Array(shape, np.float32, name="observation")
    self._needs_reset = True
    self._seeded = False
    self._ended = False
    self._last_info: dict[str, Any] = {}

  def _observation(self, obs: Any) -> np.ndarray:
    if self._one_hot_start is not None:
      one_hot = np.zeros(self._obs_spec.shape, np.float32)
      one_hot[int(obs) - self._one_hot_start] = 1.0
      return one_hot
    return np.array(obs, dtype=np.float32)  # a copy, float32

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
               kwargs: dict[str, Any]):
    self._source = env_id_or_callable
    self.kwargs = dict(kwargs)

  def __call__(self, seed: int) -> GymnasiumEnv:
    if isinstance(self._source, str):
      gym_env = import_gymnasium().make(self._source, **self.kwargs)
    else:
      gym_env = self._source(**self.kwargs)
    return GymnasiumEnv(gym_env, seed=seed)

  def __repr__(self) -> str:
    source = (self._source if isinstance(self._source, str) else getattr(
        self._source, "__name__", repr(self._source)))
    args = "".join(f", {k}={v!r}" for k, v in sorted(self.kwargs.items()))
    return f"gymnasium_env_factory({source!r}{args})"


def gymnasium_env_factory(env_id_or_callable: str | Callable[..., Any],
                          **kwargs: Any) -> EnvFactory:
  """An `EnvFactory` for `gymnasium.make(env_id, **kwargs)` or `fn(**kwargs)`.

  Builds one probe environment now so that a missing gymnasium, an unknown id
  or an unsupported space fails at set-up time with a clear message.
  """
  import_gymnasium()
  if not (isinstance(env_id_or_callable, str) or callable(env_id_or_callable)):
    raise TypeError(f"expected a gymnasium env id or a callable returning a "
                    f"gymnasium.Env, got {env_id_or_callable!r}")
  factory = _GymnasiumFactory(env_id_or_callable, kwargs)
  probe = factory(0)
  try:
    validate_environment(probe)
  finally:
    probe.close()
  return factory
