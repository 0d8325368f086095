"""Pure loss functions: V-MPO, V-trace and distillation.

Per-step functions over `[T]` arrays (rlax style, vmapped over the batch) and
batch-level RL losses over `common.ActorCriticInputs`. Hyper-parameters are
scalar keyword arguments; nothing here imports `ald_jax.config`.
"""
