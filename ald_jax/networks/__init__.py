"""Flax networks: torso, LSTM actor core, Gated Transformer-XL, policy-value nets."""
