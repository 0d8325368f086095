"""ald_jax: Actor-Learner Distillation in JAX/Flax.

A Gated Transformer-XL learner is trained with an RL loss (V-MPO or V-trace)
and continually distilled into a small LSTM actor, the only model that acts.
"""
__version__ = "0.1.0"


def __getattr__(name):
  # `ald_jax.train(config, env_factory=None)` without importing the CLI module
  # (and absl flags) on `import ald_jax`.
  if name == "train":
    import importlib  # pylint: disable=import-outside-toplevel
    return importlib.import_module("ald_jax.train")
  raise AttributeError(f"module 'ald_jax' has no attribute {name!r}")
