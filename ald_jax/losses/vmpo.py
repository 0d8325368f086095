"""V-MPO policy loss (Song et al. 2019, "V-MPO: On-Policy Maximum a Posteriori
Policy Optimization for Discrete and Continuous Control").

One scalar loss over a whole batch (the E-step's top-k selection and the
temperature's softmax are batch-wide), built from four terms:

* E-step weights: select the top `top_k_fraction` of the valid samples by
  advantage; psi = softmax over the selected of A / eta (stop-gradient).
* policy loss: -sum(psi * log pi_online(a)).
* temperature loss: eta * eps_eta + eta * log(mean_selected exp(A / eta)),
  differentiable in eta only (advantages are stop-gradient).
* trust region: KL(pi_target || pi_online) averaged over valid samples;
  sg(alpha) * KL trains the policy, alpha * (eps_alpha - sg(KL)) trains alpha.

The value loss is not in here: the learner adds value_cost * 0.5 * (G - V)^2.

Mapping to `rlax.vmpo_loss` (checked in tests/test_losses_vmpo.py): our mask is
rlax's `restarting_weights`; `importance_weights` = 1; rlax's temperature and
KL `LagrangePenalty.alpha` are our `duals_values(duals)` (already positive, so
rlax's clip projection is the identity); rlax returns per-example losses whose
mean is our scalar (its policy loss is scaled by the number of examples, its KL
terms are per example). Differences: rlax selects with `>=` the k-th largest
(ties may select more than k), we select exactly k by index; rlax adds 1e-10
inside its logs; rlax computes k = int(fraction * N) and raises when it is 0,
we floor with a 1e-6 tolerance against float rounding and keep at least 1.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp

from ald_jax.config import VMPOConfig
from ald_jax.losses import common

Array = chex.Array

# Smallest value a dual can take: softplus alone could underflow to 0, and
# eta = 0 would divide the advantages by zero.
_MIN_DUAL = 1e-8


class VMPODuals(NamedTuple):
  """Unconstrained Lagrange dual parameters; eta = softplus(.) + 1e-8 etc.

  A softplus (not exp) keeps the gradient bounded for large values, and the
  duals stay positive whatever the optimiser does (no projection step).
  """
  eta: Array    # temperature, unconstrained scalar float32
  alpha: Array  # KL multiplier, unconstrained scalar float32


def _inverse_softplus(y: float) -> float:
  # log(exp(y) - 1), written stably for large y.
  return float(y + math.log(-math.expm1(-y)))


def init_duals(config: VMPOConfig) -> VMPODuals:
  """Duals whose positive values are `config.init_eta` and `init_alpha`."""
  return VMPODuals(
      eta=jnp.asarray(_inverse_softplus(config.init_eta - _MIN_DUAL),
                      jnp.float32),
      alpha=jnp.asarray(_inverse_softplus(config.init_alpha - _MIN_DUAL),
                        jnp.float32))


def duals_values(duals: VMPODuals) -> tuple[Array, Array]:
  """The positive (eta, alpha) the loss uses."""
  chex.assert_rank([duals.eta, duals.alpha], 0)
  chex.assert_type([duals.eta, duals.alpha], float)
  eta = jax.nn.softplus(duals.eta) + _MIN_DUAL
  alpha = jax.nn.softplus(duals.alpha) + _MIN_DUAL
  return eta, alpha


def top_k_count(num_samples: int, top_k_fraction: float) -> int:
  """Static number of samples the E-step keeps (at least 1)."""
  return max(1, min(num_samples, int(math.floor(
      top_k_fraction * num_samples + 1e-6))))


def select_top_k(advantages: Array, valid: Array, k: int) -> Array:
  """A float {0, 1} mask of the k largest advantages among valid samples.

  Invalid samples get -inf before `lax.top_k` and are masked out afterwards,
  so they are never selected; with fewer than k valid samples every valid one
  is selected. Exactly min(k, #valid) entries are 1 (ties broken by index).
  """
  chex.assert_rank([advantages, valid], 1)
  ranked = jnp.where(valid, advantages, -jnp.inf)
  _, indices = jax.lax.top_k(ranked, k)
  chosen = jnp.zeros(advantages.shape, jnp.float32).at[indices].set(1.0)
  return chosen * valid.astype(jnp.float32)


def vmpo_loss(online_logits: Array, target_logits: Array, actions: Array,
              advantages: Array, mask: Array, duals: VMPODuals,
              config: VMPOConfig) -> tuple[Array, dict[str, Array]]:
  """V-MPO policy + dual losses for a batch of any leading shape.

  Args:
    online_logits: [..., A] logits of the policy being trained.
    target_logits: [..., A] logits of the target network (trust-region anchor).
    actions: [...] int32 actions taken.
    advantages: [...] float32 advantages (e.g. G - V); treated as constants.
    mask: [...] 1 for a valid sample, 0 for padding / actions at LAST steps.
    duals: unconstrained (eta, alpha), see `VMPODuals`.
    config: top_k_fraction, epsilon_eta, epsilon_alpha.

  Returns:
    The scalar loss and scalar extras: eta, alpha, kl (mean over valid),
    temperature_loss, policy_loss, kl_loss (sg(alpha) * kl), alpha_loss
    (alpha * (eps_alpha - sg(kl))), selected_fraction (selected / valid).
    Gradients: eta only from temperature_loss, alpha only from alpha_loss,
    online logits from policy_loss and kl_loss; none reach target_logits.
  """
  chex.assert_equal_shape([online_logits, target_logits])
  chex.assert_equal_shape([actions, advantages, mask])
  chex.assert_rank(online_logits, actions.ndim + 1)
  chex.assert_equal_shape_prefix([online_logits, actions], actions.ndim)
  chex.assert_type([online_logits, target_logits, advantages], jnp.float32)
  chex.assert_type(actions, jnp.int32)

  num_actions = online_logits.shape[-1]
  online_logits = online_logits.reshape(-1, num_actions)
  target_logits = jax.lax.stop_gradient(target_logits.reshape(-1, num_actions))
  actions = actions.reshape(-1)
  advantages = jax.lax.stop_gradient(advantages.reshape(-1))
  valid = mask.reshape(-1) > 0
  eta, alpha = duals_values(duals)

  # E-step: top-k of the valid advantages, then a softmax of A / eta over them.
  k = top_k_count(advantages.shape[0], config.top_k_fraction)
  selected = select_top_k(advantages, valid, k)
  is_selected = selected > 0
  num_selected = jnp.sum(selected)
  # Double `where`: unselected entries are 0 before the exp, so nothing there
  # can overflow (a NaN in a discarded branch would still poison gradients).
  scaled = jnp.where(is_selected, advantages, 0.0) / eta
  shift = jax.lax.stop_gradient(
      jnp.max(jnp.where(is_selected, scaled, -jnp.inf)))
  shift = jnp.where(num_selected > 0, shift, 0.0)
  weights = jnp.where(is_selected, jnp.exp(
      jnp.where(is_selected, scaled - shift, 0.0)), 0.0)
  sum_weights = jnp.sum(weights)
  psi = jax.lax.stop_gradient(weights / jnp.maximum(sum_weights, 1e-30))

  log_pi = common.log_prob(online_logits, actions)
  policy_loss = -jnp.sum(psi * log_pi)

  # log(mean_selected exp(A / eta)); `shift` is a constant, so its gradient
  # cancels exactly. Zero when nothing is selected (an all-masked batch).
  log_mean_weights = (jnp.log(jnp.maximum(sum_weights, 1e-30)) + shift
                      - jnp.log(jnp.maximum(num_selected, 1.0)))
  temperature_loss = jnp.where(
      num_selected > 0,
      eta * config.epsilon_eta + eta * log_mean_weights, 0.0)

  # Trust region KL(pi_target || pi_online), averaged over valid samples.
  kl = common.masked_mean(common.categorical_kl(target_logits, online_logits),
                          valid.astype(jnp.float32))
  kl_loss = jax.lax.stop_gradient(alpha) * kl
  alpha_loss = alpha * (config.epsilon_alpha - jax.lax.stop_gradient(kl))

  loss = policy_loss + temperature_loss + kl_loss + alpha_loss
  num_valid = jnp.sum(valid.astype(jnp.float32))
  extras = dict(
      eta=jax.lax.stop_gradient(eta),
      alpha=jax.lax.stop_gradient(alpha),
      kl=jax.lax.stop_gradient(kl),
      temperature_loss=temperature_loss,
      policy_loss=policy_loss,
      kl_loss=kl_loss,
      alpha_loss=alpha_loss,
      selected_fraction=num_selected / jnp.maximum(num_valid, 1.0),
  )
  return loss, extras
