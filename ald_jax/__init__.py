"""ald_jax: Actor-Learner Distillation in JAX/Flax.

A Gated Transformer-XL learner is trained with an RL loss (V-MPO or V-trace)
and continually distilled into a small LSTM actor, the only model that acts.
"""
__version__ = "0.1.0"
