"""Steps the E environments of one actor thread in one call.

`BatchedEnv.step(actions)` returns stacked numpy arrays with standard dm_env
semantics per environment: FIRST / MID / LAST step types, and an automatic
reset on the call after an environment's LAST step (that environment's
action is ignored and it returns FIRST). Rewards are 0.0 and discounts 1.0 on
FIRST steps (dm_env uses None there), so every field is a dense array.

Finished-episode statistics come out on LAST steps: the episode's return and
length, and its success when the environment reports one. Success protocol:
an environment may define `episode_success() -> bool | None`, read right
after it returns LAST; True/False become 1.0/0.0, None (or no such method)
becomes NaN.

Output arrays are fresh on every call (a few small allocations, cheap next to
E environment steps), so a caller may keep a timestep while stepping on.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import dm_env
import numpy as np

from ald_jax.envs.specs import UnsupportedEnvironmentError
from ald_jax.envs.specs import validate_environment

EnvFactory = Callable[[int], dm_env.Environment]

# = ald_jax.types FIRST/MID/LAST; not imported so that envs stay numpy-only
# (ald_jax.types pulls in jax and flax).
_FIRST, _MID, _LAST = 0, 1, 2


class BatchedTimeStep(NamedTuple):
  """One step of E environments; every field has leading dimension E."""
  step_type: np.ndarray        # [E] int32: 0 FIRST, 1 MID, 2 LAST
  reward: np.ndarray           # [E] float32, 0.0 at FIRST
  discount: np.ndarray         # [E] float32, 1.0 at FIRST
  observation: np.ndarray      # [E, *obs_shape] float32 (rank 2 flattened)
  # Finished-episode statistics, set only where step_type is LAST:
  episode_return: np.ndarray   # [E] float32: the episode's return, else NaN
  episode_success: np.ndarray  # [E] float32: 1.0 / 0.0 if reported, else NaN
  episode_length: np.ndarray   # [E] int32: actions taken in it, else 0

  def first(self) -> np.ndarray:
    return self.step_type == _FIRST

  def last(self) -> np.ndarray:
    return self.step_type == _LAST


def derive_seeds(seed: int, num_envs: int) -> list[int]:
  """Distinct, deterministic per-environment seeds (uint32) from one seed.

  Each environment gets an independent child of `np.random.SeedSequence`
  (different seeds give unrelated streams, unlike seed + i).
  """
  children = np.random.SeedSequence(seed).spawn(num_envs)
  seeds = [int(child.generate_state(1)[0]) for child in children]
  # uint32 collisions are ~1e-6 likely at E=64; make them impossible.
  taken: set[int] = set()
  for i, s in enumerate(seeds):
    while s in taken:
      s = (s + 1) % 2**32
    taken.add(s)
    seeds[i] = s
  return seeds


class BatchedEnv:
  """E environments built by `env_factory(seed_i)`, stepped together.

  `seed_i = derive_seeds(seed, E)[i]`; give each actor thread its own `seed`
  (e.g. base seed + thread index) and all environments get unrelated streams.
  """

  def __init__(self, env_factory: EnvFactory, num_envs: int, seed: int):
    if (not isinstance(num_envs, (int, np.integer))
        or isinstance(num_envs, bool) or num_envs < 1):
      raise ValueError(f"BatchedEnv: num_envs must be a positive integer, got "
                       f"{num_envs!r}")
    self._seeds = derive_seeds(seed, int(num_envs))
    self._envs = [env_factory(s) for s in self._seeds]
    infos = [validate_environment(env) for env in self._envs]
    if any(info != infos[0] for info in infos):
      raise UnsupportedEnvironmentError(
          f"env_factory built environments with different specs: "
          f"{sorted(set(infos))}; all E environments of a BatchedEnv must "
          f"share one observation shape and action count")
    self._info = infos[0]
    self._spec_shape = tuple(
        int(d) for d in self._envs[0].observation_spec().shape)
    # Rank-2 observations are flattened (specs.obs_shape_from_spec).
    self._flatten = self._spec_shape != self._info.obs_shape
    self._success_fns = [getattr(env, "episode_success", None)
                         for env in self._envs]
    n = len(self._envs)
    # Running statistics of each environment's current episode.
    self._returns = [0.0] * n
    self._lengths = [0] * n
    self._needs_reset = [True] * n

  @property
  def num_envs(self) -> int:
    return len(self._envs)

  @property
  def obs_shape(self) -> tuple[int, ...]:
    return self._info.obs_shape

  @property
  def num_actions(self) -> int:
    return self._info.num_actions

  @property
  def seeds(self) -> list[int]:
    """The seed each environment was built with, in order."""
    return list(self._seeds)

  @property
  def envs(self) -> Sequence[dm_env.Environment]:
    return tuple(self._envs)

  def observation_spec(self):
    return self._envs[0].observation_spec()

  def action_spec(self):
    return self._envs[0].action_spec()

  def reset(self) -> BatchedTimeStep:
    """Resets every environment; all step types are FIRST."""
    self._needs_reset = [True] * len(self._envs)
    return self._advance(None)

  def step(self, actions: np.ndarray) -> BatchedTimeStep:
    """Steps every environment; those after LAST (or never reset) reset."""
    actions = np.asarray(actions)
    if actions.shape != (len(self._envs),):
      raise ValueError(f"BatchedEnv.step: actions must have shape "
                       f"({len(self._envs)},), got {actions.shape}")
    if not np.issubdtype(actions.dtype, np.integer):
      raise ValueError(f"BatchedEnv.step: actions must be integers, got dtype "
                       f"{actions.dtype}")
    return self._advance(actions.tolist())

  def _advance(self, actions: list[int] | None) -> BatchedTimeStep:
    n = len(self._envs)
    step_type = [_MID] * n
    reward = [0.0] * n
    discount = [1.0] * n
    observations = [None] * n
    finished = []
    needs_reset, returns, lengths = (self._needs_reset, self._returns,
                                     self._lengths)
    # The per-environment loop touches Python scalars only; arrays are built
    # once per call below.
    for i, env in enumerate(self._envs):
      if actions is None or needs_reset[i]:
        timestep = env.reset()
        needs_reset[i] = False
      else:
        timestep = env.step(actions[i])
      observations[i] = timestep.observation
      kind = timestep.step_type
      if kind == _FIRST:
        # From reset(), or an environment that restarted on its own.
        step_type[i] = _FIRST
        returns[i] = 0.0
        lengths[i] = 0
        continue
      r = float(timestep.reward)
      reward[i] = r
      discount[i] = float(timestep.discount)
      returns[i] += r
      lengths[i] += 1
      if kind == _LAST:
        step_type[i] = _LAST
        needs_reset[i] = True
        finished.append(i)

    episode_return = np.full(n, np.nan, np.float32)
    episode_success = np.full(n, np.nan, np.float32)
    episode_length = np.zeros(n, np.int32)
    for i in finished:
      episode_return[i] = returns[i]
      episode_length[i] = lengths[i]
      success_fn = self._success_fns[i]
      success = success_fn() if success_fn is not None else None
      if success is not None:
        episode_success[i] = float(success)
    observation = np.stack(observations).astype(np.float32, copy=False)
    if observation.shape[1:] != self._spec_shape:
      raise ValueError(f"BatchedEnv: observations of shape "
                       f"{observation.shape[1:]} do not match the observation "
                       f"spec shape {self._spec_shape}")
    if self._flatten:
      observation = observation.reshape(n, *self._info.obs_shape)
    return BatchedTimeStep(
        step_type=np.array(step_type, np.int32),
        reward=np.array(reward, np.float32),
        discount=np.array(discount, np.float32),
        observation=observation,
        episode_return=episode_return,
        episode_success=episode_success,
        episode_length=episode_length)

  def close(self) -> None:
    for env in self._envs:
      env.close()

  def __enter__(self) -> "BatchedEnv":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
