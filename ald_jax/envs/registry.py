"""Environments by name: `make_env_factory("imaze", corridor_length=8)`.

A constructor is any callable `constructor(seed=..., **kwargs)` returning a
`dm_env.Environment`; `register` adds one under a name. `make_env_factory`
checks the keyword arguments against the constructor's signature, builds one
probe environment (seed 0) to surface bad values and unsupported specs at
set-up time rather than inside an actor thread, and returns an `EnvFactory`:
a callable `(seed) -> dm_env.Environment`.

Any dm_env environment plugs in without the registry too: pass your own
`(seed) -> env` callable wherever an `EnvFactory` is expected.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable

import dm_env

from ald_jax.envs.batched import EnvFactory
from ald_jax.envs.cue_recall import CueRecall
from ald_jax.envs.imaze import IMaze
from ald_jax.envs.meta_fetch import MetaFetch
from ald_jax.envs.specs import UnsupportedEnvironmentError
from ald_jax.envs.specs import validate_environment

Constructor = Callable[..., dm_env.Environment]

_REGISTRY: dict[str, Constructor] = {}


def register(name: str, constructor: Constructor, *,
             overwrite: bool = False) -> None:
  """Registers `constructor(seed=..., **kwargs) -> dm_env.Environment`."""
  if not isinstance(name, str) or not name:
    raise ValueError(f"environment name must be a non-empty string, got "
                     f"{name!r}")
  if not callable(constructor):
    raise TypeError(f"constructor for {name!r} must be callable, got "
                    f"{constructor!r}")
  if name in _REGISTRY and not overwrite:
    raise ValueError(f"environment {name!r} is already registered; pass "
                     f"overwrite=True to replace it")
  _REGISTRY[name] = constructor


def unregister(name: str) -> None:
  """Removes a registered environment (e.g. one a test registered)."""
  if name not in _REGISTRY:
    raise ValueError(f"unknown environment {name!r}; available: "
                     f"{available_envs()}")
  del _REGISTRY[name]


def available_envs() -> list[str]:
  return sorted(_REGISTRY)


class _RegisteredFactory:
  """`(seed) -> env` for a registered constructor with fixed kwargs."""

  def __init__(self, name: str, constructor: Constructor,
               kwargs: dict[str, Any]):
    self.name = name
    self._constructor = constructor
    self.kwargs = dict(kwargs)

  def __call__(self, seed: int) -> dm_env.Environment:
    return self._constructor(seed=seed, **self.kwargs)

  def __repr__(self) -> str:
    args = ", ".join(f"{k}={v!r}" for k, v in sorted(self.kwargs.items()))
    return f"EnvFactory({self.name!r}{', ' + args if args else ''})"


def _check_kwargs(name: str, constructor: Constructor,
                  kwargs: dict[str, Any]) -> None:
  if "seed" in kwargs:
    raise ValueError(f"environment {name!r}: do not pass 'seed'; the factory "
                     f"is called with a distinct seed per environment")
  try:
    signature = inspect.signature(constructor)
  except (TypeError, ValueError):
    return  # Builtins without a signature: the probe below still checks.
  params = signature.parameters
  takes_var_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD
                         for p in params.values())
  if "seed" not in params and not takes_var_kwargs:
    raise TypeError(f"constructor of environment {name!r} must accept a "
                    f"'seed' keyword argument")
  if takes_var_kwargs:
    return
  accepted = [p for p, v in params.items() if p != "seed" and v.kind in (
      inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]
  for key in kwargs:
    if key not in accepted:
      raise ValueError(f"environment {name!r} has no keyword argument {key!r}; "
                      f"it accepts {sorted(accepted)}")


def make_env_factory(name: str, **kwargs: Any) -> EnvFactory:
  """An `EnvFactory` for the environment registered as `name`.

  Raises:
    ValueError: an unknown name (the message lists the available ones), a
      keyword argument the constructor does not take (named), a bad value
      (the constructor's own error, found by building one probe environment
      with seed 0), or specs ald_jax cannot drive
      (`UnsupportedEnvironmentError`).
  """
  if name not in _REGISTRY:
    raise ValueError(f"unknown environment {name!r}; available: "
                   f"{available_envs()}")
  constructor = _REGISTRY[name]
  _check_kwargs(name, constructor, kwargs)
  factory = _RegisteredFactory(name, constructor, kwargs)
  try:
    probe = factory(0)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{factory!r} failed to build: {e}") from e
  try:
    validate_environment(probe)
  except UnsupportedEnvironmentError as e:
    raise UnsupportedEnvironmentError(f"{factory!r}: {e}") from e
  finally:
    probe.close()
  return factory


register("imaze", IMaze)
register("meta_fetch", MetaFetch)
register("cue_recall", CueRecall)
