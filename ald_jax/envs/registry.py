"""Environments by name: `make_env_factory("imaze", corridor_length=8)`.

A constructor is any callable `constructor(seed=..., **kwargs)` returning a
`dm_env.Environment`; `register` adds one under a name. `make_env_factory`
checks the keyword arguments against the constructor's signature, builds one
probe environment (seed 0) to surface bad values and unsupported specs at
set-up time rather than inside an actor thread, and returns an `EnvFactory`:
a callable `(seed) -> dm_env.Environment`.

Any dm_env environment plugs in without the registry too: pass your own
`(seed) -> env` callable wherever an `EnvFactory` is expected.

`describe_env_factory` says where a factory's environments come from (the
run directory's config.json records it, and a resume compares it): a
registered name with its kwargs, a gymnasium id with its kwargs, or the
callable's `module:qualname`. A factory object may describe itself with a
`provenance()` method returning such a JSON-able dict.
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

  def provenance(self) -> dict[str, Any]:
    return {"source": REGISTRY_SOURCE, "name": self.name,
            "kwargs": dict(sorted(self.kwargs.items()))}


REGISTRY_SOURCE = "registry"


def qualified_name(fn: Any) -> str:
  """`module:qualname` of a function or class; of its class for an instance
  (a callable object names its type, the thing one can import again)."""
  target = fn if hasattr(fn, "__qualname__") else type(fn)
  return f"{target.__module__}:{target.__qualname__}"


def _jsonable(value: Any) -> Any:
  """JSON types as they are (tuples as lists); anything else as its repr
  (the record says what it was; it cannot rebuild it anyway)."""
  if isinstance(value, dict):
    return {str(k): _jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  if value is None or isinstance(value, (bool, int, float, str)):
    return value
  if hasattr(value, "item") and getattr(value, "ndim", None) == 0:
    return _jsonable(value.item())  # a numpy scalar
  return repr(value)


def describe_env_factory(factory: EnvFactory) -> dict[str, Any]:
  """Where `factory`'s environments come from, as a JSON-able dict.

  `{"source": "registry", "name": ..., "kwargs": {...}}` for
  `make_env_factory`'s factories, `{"source": "gymnasium", "id": ...,
  "kwargs": {...}, ...}` for `gymnasium_env_factory`'s, whatever a
  `provenance()` method returns, else `{"source": "callable", "callable":
  "module:qualname"}`.
  """
  provenance = getattr(factory, "provenance", None)
  if callable(provenance):
    record = provenance()
    if not isinstance(record, dict) or not isinstance(
        record.get("source"), str):
      raise TypeError(f"{factory!r}.provenance() must return a dict with a "
                      f"'source' string, got {record!r}")
    return _jsonable(record)
  return {"source": "callable", "callable": qualified_name(factory)}


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
