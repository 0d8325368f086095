"""Small numeric building blocks shared by the RL and distillation losses.

Everything here is pure and float32. Per-step functions take `[T]` arrays (one
unroll, rlax style); callers `jax.vmap` over the batch. `ActorCriticInputs` is
the one batch-level `[B, T]` input both RL losses (`vtrace.actor_critic_loss`,
`vmpo.actor_critic_loss`) take.
"""
from __future__ import annotations

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp

Array = chex.Array


class ActorCriticInputs(NamedTuple):
  """One batch of B unrolls of T steps, time-aligned for an RL loss.

  Index t is the transition taken by `actions[:, t]`.
  """
  learner_logits: Array    # [B, T, A] f32, the policy being trained
  behaviour_logits: Array  # [B, T, A] f32, the policy that acted
  actions: Array           # [B, T] int32
  values: Array            # [B, T + 1] f32 learner values at steps 0..T;
                           # values[:, T] bootstraps
  rewards: Array           # [B, T] f32, reward following action t
  discounts: Array         # [B, T] f32, gamma * env discount of step t + 1,
                           # already 0 where masked
  mask: Array              # [B, T] f32, 1 where the action at t was real
                           # (0 for an action taken at a LAST step)


def assert_actor_critic_inputs(inputs: ActorCriticInputs) -> None:
  """Shapes and dtypes of `ActorCriticInputs`; raises naming the field."""
  if not isinstance(inputs, ActorCriticInputs):
    raise TypeError(
        f"inputs must be an ActorCriticInputs, got {type(inputs).__name__}")
  actions = inputs.actions
  if actions.ndim != 2:
    raise ValueError(f"inputs.actions must be [B, T], got {actions.shape}")
  b, t = actions.shape
  logits_shape = inputs.learner_logits.shape
  expected = dict(
      learner_logits=(b, t, logits_shape[-1] if logits_shape else 0),
      values=(b, t + 1), rewards=(b, t), discounts=(b, t), mask=(b, t))
  expected["behaviour_logits"] = expected["learner_logits"]
  for name, shape in expected.items():
    got = getattr(inputs, name).shape
    if tuple(got) != shape:
      raise ValueError(f"inputs.{name} must have shape {shape} (B={b}, T={t}),"
                       f" got {tuple(got)}")
  if actions.dtype != jnp.int32:
    raise ValueError(f"inputs.actions must be int32, got {actions.dtype}")
  for name in ("learner_logits", "behaviour_logits", "values", "rewards",
               "discounts", "mask"):
    dtype = getattr(inputs, name).dtype
    if dtype != jnp.float32:
      raise ValueError(f"inputs.{name} must be float32, got {dtype}")


def masked_mean(x: Array, mask: Array) -> Array:
  """Mean of `x` over the elements where `mask` is non-zero.

  `sum(x * mask) / max(sum(mask), 1)` over all elements of any shape. The
  denominator floor of 1 makes an all-masked batch give 0 instead of NaN.
  Masked entries are selected away with `where`, so a NaN/inf in a padding
  position cannot leak into the result.
  """
  chex.assert_equal_shape([x, mask])
  mask = mask.astype(x.dtype)
  total = jnp.sum(jnp.where(mask != 0, x * mask, 0.0))
  return total / jnp.maximum(jnp.sum(mask), 1.0)


def _assert_logits(logits: Array) -> None:
  """Logits need a trailing action axis and a float dtype."""
  if logits.ndim < 1:
    raise ValueError(f"logits need a trailing action axis, got shape "
                     f"{logits.shape}")
  chex.assert_type(logits, float)


def _safe_plogp_terms(p: Array, log_p: Array, log_q: Array) -> Array:
  """Elementwise p * (log p - log q), defined as 0 where p == 0."""
  safe_log_p = jnp.where(p > 0, log_p, 0.0)
  safe_log_q = jnp.where(p > 0, log_q, 0.0)
  return jnp.where(p > 0, p * (safe_log_p - safe_log_q), 0.0)


def categorical_kl(p_logits: Array, q_logits: Array) -> Array:
  """KL(p || q) of categorical distributions given by logits `[..., A]`.

  Uses `log_softmax` for both sides (no log of a rounded probability), so it is
  stable for large logits. Returns `[...]`. Gradients flow to both arguments;
  callers apply `stop_gradient` to whichever side is the fixed target.

  The derivative is given in closed form (a custom JVP):
    dKL/dq_logits = softmax(q) - softmax(p),
    dKL/dp_logits = p * (log p - log q) - p * KL,
  so the loss *and* its gradient are exactly 0 when p_logits == q_logits
  (plain autodiff leaves float rounding of order 1e-7 there).
  """
  chex.assert_equal_shape([p_logits, q_logits])
  _assert_logits(p_logits)
  return _categorical_kl(p_logits, q_logits)


def _kl_terms(p_logits: Array, q_logits: Array):
  log_p = jax.nn.log_softmax(p_logits, axis=-1)
  log_q = jax.nn.log_softmax(q_logits, axis=-1)
  p = jnp.exp(log_p)
  terms = _safe_plogp_terms(p, log_p, log_q)
  return p, jnp.exp(log_q), terms


@jax.custom_jvp
def _categorical_kl(p_logits: Array, q_logits: Array) -> Array:
  _, _, terms = _kl_terms(p_logits, q_logits)
  return jnp.sum(terms, axis=-1)


@_categorical_kl.defjvp
def _categorical_kl_jvp(primals, tangents):
  p_logits, q_logits = primals
  dp_logits, dq_logits = tangents
  p, q, terms = _kl_terms(p_logits, q_logits)
  kl = jnp.sum(terms, axis=-1)
  grad_p = terms - p * kl[..., None]
  grad_q = q - p
  return kl, jnp.sum(grad_p * dp_logits + grad_q * dq_logits, axis=-1)


def entropy(logits: Array) -> Array:
  """Entropy of the categorical distribution given by logits `[..., A]`."""
  _assert_logits(logits)
  log_p = jax.nn.log_softmax(logits, axis=-1)
  p = jnp.exp(log_p)
  return -jnp.sum(jnp.where(p > 0, p * jnp.where(p > 0, log_p, 0.0), 0.0),
                  axis=-1)


def log_prob(logits: Array, actions: Array) -> Array:
  """log pi(a) for integer `actions [...]` under `logits [..., A]`."""
  chex.assert_equal_shape_prefix([logits, actions], actions.ndim)
  chex.assert_rank(logits, actions.ndim + 1)
  log_pi = jax.nn.log_softmax(logits, axis=-1)
  return jnp.take_along_axis(
      log_pi, actions[..., None].astype(jnp.int32), axis=-1)[..., 0]


def lambda_returns(r_t: Array, discount_t: Array, v_t: Array,
                   lambda_: float = 1.0, mask: Array | None = None,
                   stop_target_gradients: bool = True) -> Array:
  """Bootstrapped lambda-returns over one unroll, by a reverse `lax.scan`.

  Index t is the transition taken by `action[t]`: `r_t[t]` and
  `discount_t[t]` follow it and `v_t[t]` is the value of the state it leads to
  (so `v_t[-1]` is the bootstrap value). Recursion, with G_T := v_t[-1]:

    G_t = r_t + discount_t * ((1 - lambda) * v_t + lambda * G_{t+1}).

  With lambda = 1 this is the n-step return to the end of the unroll,
  bootstrapped from `v_t[-1]`; lambda = 0 gives one-step TD targets. It equals
  `rlax.lambda_returns` when no step is masked.

  `mask [T]` (optional, 1 = valid): a masked step's action was taken at a LAST
  step and is meaningless. It is treated as reward 0 and discount 0, so its
  return is 0 (not a target; the caller masks it), and the lambda-trace is cut
  in front of it: the step before bootstraps from `v_t` of the LAST state only
  (lambda_eff[t-1] = lambda * mask[t]). Nothing after a masked step reaches an
  earlier return.

  Returns `[T]` float32; wrapped in `stop_gradient` unless
  `stop_target_gradients=False`.
  """
  chex.assert_rank([r_t, discount_t, v_t], 1)
  chex.assert_equal_shape([r_t, discount_t, v_t])
  chex.assert_type([r_t, discount_t, v_t], jnp.float32)
  if mask is None:
    mask = jnp.ones_like(r_t)
  chex.assert_equal_shape([r_t, mask])
  valid = mask > 0
  r_t = jnp.where(valid, r_t, 0.0)
  discount_t = jnp.where(valid, discount_t, 0.0)
  # The trace from t+1 is only followed when step t+1 is valid; the final
  # step's "next" is the bootstrap, always valid.
  next_valid = jnp.concatenate([valid[1:], jnp.ones((1,), bool)])
  lambdas = jnp.where(next_valid, jnp.asarray(lambda_, jnp.float32), 0.0)

  def step(g_next, xs):
    r, d, v, lam = xs
    g = r + d * ((1.0 - lam) * v + lam * g_next)
    return g, g

  _, returns = jax.lax.scan(step, v_t[-1], (r_t, discount_t, v_t, lambdas),
                            reverse=True)
  if stop_target_gradients:
    returns = jax.lax.stop_gradient(returns)
  return returns
