"""ald_jax: Actor-Learner Distillation in JAX/Flax.

A Gated Transformer-XL learner is trained with an RL loss (V-MPO or V-trace)
and continually distilled into a small LSTM actor, the only model that acts.
"""
__version__ = "0.1.0"


# Lazy attributes: `import ald_jax` imports nothing heavy, and loading a
# policy (`ald_jax.Policy`) never imports the learner, optax or orbax.
_LAZY = {"Policy": ("ald_jax.policy", "Policy"),
         "export_actor": ("ald_jax.export", "export_actor")}


def __getattr__(name):
  import importlib  # pylint: disable=import-outside-toplevel
  # `ald_jax.train(config, env_factory=None)` without importing the CLI module
  # (and absl flags) on `import ald_jax`.
  if name == "train":
    return importlib.import_module("ald_jax.train")
  if name in _LAZY:
    module, attribute = _LAZY[name]
    return getattr(importlib.import_module(module), attribute)
  raise AttributeError(f"module 'ald_jax' has no attribute {name!r}")
