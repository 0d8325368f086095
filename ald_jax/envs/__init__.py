"""numpy dm_env memory environments, batched stepping, registry and adapters.

Built-ins (by name): "imaze" (`IMaze`), "meta_fetch" (`MetaFetch`) and
"cue_recall" (`CueRecall`, a memory task whose span is one keyword).
Use `make_env_factory(name, **kwargs)` for a `(seed) -> dm_env.Environment`
factory, `BatchedEnv(factory, num_envs, seed)` to step E of them at once, and
`gymnasium_env_factory(env_id)` for gymnasium environments (optional extra).
`AdaptObservation` selects one entry of a dict observation and/or scales it;
`FlattenObservation` concatenates a nested observation into one vector.
"""
from ald_jax.envs.batched import BatchedEnv
from ald_jax.envs.batched import BatchedTimeStep
from ald_jax.envs.batched import derive_seeds
from ald_jax.envs.batched import EnvFactory
from ald_jax.envs.cue_recall import CueRecall
from ald_jax.envs.gymnasium_adapter import gymnasium_env_factory
from ald_jax.envs.gymnasium_adapter import GymnasiumEnv
from ald_jax.envs.imaze import IMaze
from ald_jax.envs.meta_fetch import MetaFetch
from ald_jax.envs.registry import available_envs
from ald_jax.envs.registry import make_env_factory
from ald_jax.envs.registry import register
from ald_jax.envs.registry import unregister
from ald_jax.envs.specs import AdaptObservation
from ald_jax.envs.specs import EnvInfo
from ald_jax.envs.specs import FlattenObservation
from ald_jax.envs.specs import UnsupportedEnvironmentError
from ald_jax.envs.specs import validate_environment

__all__ = [
    "BatchedEnv", "BatchedTimeStep", "CueRecall", "derive_seeds", "EnvFactory",
    "gymnasium_env_factory", "GymnasiumEnv", "IMaze", "MetaFetch",
    "available_envs", "make_env_factory", "register", "unregister",
    "AdaptObservation", "EnvInfo",
    "FlattenObservation", "UnsupportedEnvironmentError",
    "validate_environment",
]
