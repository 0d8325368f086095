"""V-MPO (Song et al. 2019, "V-MPO: On-Policy Maximum a Posteriori Policy
Optimization for Discrete and Continuous Control") as an actor-critic loss.

`actor_critic_loss` takes the same batch (`common.ActorCriticInputs`) as
`vtrace.actor_critic_loss`, plus the target network's logits and the duals, and
returns one scalar loss over the whole batch (the E-step's top-k selection and
the temperature's softmax are batch-wide):

* advantages and value targets (stop-gradient), with V(s_t) = values[:, t]:
  - value_target="vtrace": targets are V-trace `vs` (lambda_,
    clip_rho_threshold; rho = pi_L(a) / pi_A(a) from learner and behaviour
    logits), and the advantage is V-trace's policy-gradient form WITHOUT its
    rho factor, A_t = r_t + discount_t * vs_{t+1} - V(s_t), vs_T = values[:, T]
    (not vs_t - V(s_t), which the first TD term scales by min(1, rho_t)). So
    there is no clip_pg_rho_threshold.
  - value_target="nstep": targets are lambda-returns G_t, A_t = G_t - V(s_t).
* value loss: value_cost * masked_mean(0.5 * (target - V)^2).
* `vmpo_loss`, the policy and dual terms:
  - E-step weights: rank the VALID samples by advantage and keep the top
    k = floor(top_k_fraction * num_valid) (at least 1 when any is valid;
    counted inside jit); psi = softmax over the selected of A / eta.
  - policy loss: -sum(psi * log pi_online(a)).
  - temperature loss: eta * eps_eta + eta * log(mean_selected exp(A / eta)),
    differentiable in eta only.
  - trust region: KL(pi_target || pi_online) averaged over valid samples;
    sg(alpha) * KL trains the policy, alpha * (eps_alpha - sg(KL)) trains alpha.
  Gradients: eta only from the temperature loss, alpha only from the alpha
  loss, the online logits from the policy loss and sg(alpha) * KL, the values
  from the value loss; none reach the target or behaviour logits. The duals are
  meant to have their own optimizer (e.g. Adam around 1e-2, unclipped).

Mapping of `vmpo_loss` to `rlax.vmpo_loss` (checked in
tests/test_losses_vmpo.py): our mask is rlax's `restarting_weights`;
`importance_weights` = 1; rlax's temperature and KL `LagrangePenalty.alpha` are
our `duals_values(duals)` (already positive, so rlax's clip projection is the
identity); rlax returns per-example losses whose mean is our scalar (its policy
loss is scaled by the number of examples, its KL terms are per example).
Differences: rlax's k = int(fraction * N) counts all N samples, masked ones
included, and raises when it is 0; ours counts only the valid samples (so with
padding we keep fewer), floors with a 1e-6 tolerance against float rounding and
keeps at least 1. rlax selects with `>=` the k-th largest (ties may select more
than k), we select exactly k (ties broken by index). rlax adds 1e-10 inside its
logs.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np

from ald_jax.losses import common
from ald_jax.losses import vtrace

Array = chex.Array

VALUE_TARGETS = ("vtrace", "nstep")

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


def init_duals(init_eta: float, init_alpha: float) -> VMPODuals:
  """Duals whose positive values (`duals_values`) are init_eta, init_alpha."""
  for name, value in (("init_eta", init_eta), ("init_alpha", init_alpha)):
    if not value > _MIN_DUAL:
      raise ValueError(f"{name} must be > {_MIN_DUAL}, got {value!r}")
  return VMPODuals(
      eta=jnp.asarray(_inverse_softplus(init_eta - _MIN_DUAL), jnp.float32),
      alpha=jnp.asarray(_inverse_softplus(init_alpha - _MIN_DUAL),
                        jnp.float32))


def duals_values(duals: VMPODuals) -> tuple[Array, Array]:
  """The positive (eta, alpha) the loss uses."""
  chex.assert_rank([duals.eta, duals.alpha], 0)
  chex.assert_type([duals.eta, duals.alpha], float)
  eta = jax.nn.softplus(duals.eta) + _MIN_DUAL
  alpha = jax.nn.softplus(duals.alpha) + _MIN_DUAL
  return eta, alpha


def _check_top_k_fraction(top_k_fraction: float) -> None:
  if not 0.0 < top_k_fraction <= 1.0:
    raise ValueError(
        f"top_k_fraction must be in (0, 1], got {top_k_fraction!r}")


def top_k_count(num_valid: int, top_k_fraction: float) -> int:
  """How many of `num_valid` samples the E-step keeps: floor(fraction * n).

  At least 1 when any sample is valid, 0 when none is. The 1e-6 tolerance
  keeps float rounding (0.29 * 100 = 28.999999999999996) from losing one.
  """
  _check_top_k_fraction(top_k_fraction)
  if num_valid <= 0:
    return 0
  return max(1, min(num_valid, int(math.floor(
      top_k_fraction * num_valid + 1e-6))))


def select_top_k(advantages: Array, valid: Array,
                 top_k_fraction: float) -> Array:
  """A float {0, 1} mask of the top `top_k_fraction` of the valid samples.

  k = top_k_count(#valid, top_k_fraction) is counted inside jit: `lax.top_k`
  needs a static k, so the samples are ranked by a sort instead (invalid ones
  last) and those ranked below k are kept. Exactly k entries are 1, never an
  invalid one; ties are broken by index. `top_k_fraction` is a Python float
  (static); the k of each possible count comes from a table built from it.
  """
  chex.assert_rank([advantages, valid], 1)
  chex.assert_equal_shape([advantages, valid])
  n = advantages.shape[0]
  k_of_count = jnp.asarray(
      np.array([top_k_count(i, top_k_fraction) for i in range(n + 1)]),
      jnp.int32)
  valid = valid > 0
  k = k_of_count[jnp.sum(valid.astype(jnp.int32))]
  # Descending by advantage, invalid samples last; a stable sort keeps ties in
  # index order.
  ranked = jnp.where(valid, advantages, -jnp.inf)
  order = jnp.argsort(-ranked, stable=True)
  rank = jnp.zeros((n,), jnp.int32).at[order].set(
      jnp.arange(n, dtype=jnp.int32))
  return jnp.logical_and(rank < k, valid).astype(jnp.float32)


def vmpo_loss(online_logits: Array, target_logits: Array, actions: Array,
              advantages: Array, mask: Array, duals: VMPODuals, *,
              top_k_fraction: float, epsilon_eta: float,
              epsilon_alpha: float) -> tuple[Array, dict[str, Array]]:
  """V-MPO policy + dual losses for a batch of any leading shape.

  Args:
    online_logits: [..., A] logits of the policy being trained.
    target_logits: [..., A] logits of the target network (trust-region anchor).
    actions: [...] int32 actions taken.
    advantages: [...] float32 advantages; treated as constants.
    mask: [...] 1 for a valid sample, 0 for padding / actions at LAST steps.
    duals: unconstrained (eta, alpha), see `VMPODuals`.
    top_k_fraction: fraction of the valid samples the E-step keeps (static).
    epsilon_eta: temperature constraint.
    epsilon_alpha: bound on KL(pi_target || pi_online).

  Returns:
    The scalar loss and scalar extras: eta, alpha, kl (mean over valid),
    temperature_loss, policy_loss, kl_loss (sg(alpha) * kl), alpha_loss
    (alpha * (eps_alpha - sg(kl))), selected_fraction (selected / valid), ess
    (effective sample size of psi, 1 / sum(psi^2); 0 when nothing is selected)
    and ess_fraction (ess / selected).
    Gradients: eta only from temperature_loss, alpha only from alpha_loss,
    online logits from policy_loss and kl_loss; none reach target_logits.
  """
  chex.assert_equal_shape([online_logits, target_logits])
  chex.assert_equal_shape([actions, advantages, mask])
  chex.assert_rank(online_logits, actions.ndim + 1)
  chex.assert_equal_shape_prefix([online_logits, actions], actions.ndim)
  chex.assert_type([online_logits, target_logits, advantages], jnp.float32)
  chex.assert_type(actions, jnp.int32)
  _check_top_k_fraction(top_k_fraction)

  num_actions = online_logits.shape[-1]
  online_logits = online_logits.reshape(-1, num_actions)
  target_logits = jax.lax.stop_gradient(target_logits.reshape(-1, num_actions))
  actions = actions.reshape(-1)
  advantages = jax.lax.stop_gradient(advantages.reshape(-1))
  valid = mask.reshape(-1) > 0
  eta, alpha = duals_values(duals)

  # E-step: top-k of the valid advantages, then a softmax of A / eta over them.
  selected = select_top_k(advantages, valid, top_k_fraction)
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
      num_selected > 0, eta * epsilon_eta + eta * log_mean_weights, 0.0)

  # Trust region KL(pi_target || pi_online), averaged over valid samples.
  kl = common.masked_mean(common.categorical_kl(target_logits, online_logits),
                          valid.astype(jnp.float32))
  kl_loss = jax.lax.stop_gradient(alpha) * kl
  alpha_loss = alpha * (epsilon_alpha - jax.lax.stop_gradient(kl))

  loss = policy_loss + temperature_loss + kl_loss + alpha_loss
  num_valid = jnp.sum(valid.astype(jnp.float32))
  # Effective sample size of the E-step weights: 1 when one sample dominates,
  # the number selected when they are uniform.
  ess = jnp.where(num_selected > 0,
                  1.0 / jnp.maximum(jnp.sum(jnp.square(psi)), 1e-30), 0.0)
  extras = dict(
      eta=jax.lax.stop_gradient(eta),
      alpha=jax.lax.stop_gradient(alpha),
      kl=jax.lax.stop_gradient(kl),
      temperature_loss=temperature_loss,
      policy_loss=policy_loss,
      kl_loss=kl_loss,
      alpha_loss=alpha_loss,
      selected_fraction=num_selected / jnp.maximum(num_valid, 1.0),
      ess=ess,
      ess_fraction=ess / jnp.maximum(num_selected, 1.0),
  )
  return loss, extras


def value_targets_and_advantages(
    inputs: common.ActorCriticInputs, *, value_target: str, lambda_: float,
    clip_rho_threshold: float) -> tuple[Array, Array]:
  """V-MPO's value targets and advantages `[B, T]` (both stop-gradient).

  value_target="vtrace": targets vs (V-trace with lambda_ and
  clip_rho_threshold, rho = pi_L(a) / pi_A(a)); advantages
  A_t = r_t + discount_t * vs_{t+1} - V(s_t) with vs_T = values[:, T].
  value_target="nstep": targets G (lambda-returns), A_t = G_t - V(s_t).
  Masked steps get advantage 0 (and are never selected by the E-step).
  """
  if value_target not in VALUE_TARGETS:
    raise ValueError(f"value_target must be one of {VALUE_TARGETS}, got "
                     f"{value_target!r}")
  values = jax.lax.stop_gradient(inputs.values)
  v_tm1, v_t = values[:, :-1], values[:, 1:]
  valid = inputs.mask > 0
  rewards = jnp.where(valid, inputs.rewards, 0.0)
  discounts = jnp.where(valid, inputs.discounts, 0.0)
  if value_target == "vtrace":
    rho = vtrace.importance_weights(inputs.learner_logits,
                                    inputs.behaviour_logits, inputs.actions)
    targets = jax.vmap(
        lambda *row: vtrace.vtrace_returns(
            *row, lambda_=lambda_, clip_rho_threshold=clip_rho_threshold).vs)(
                v_tm1, v_t, rewards, discounts, rho, inputs.mask)
    targets_next = jnp.concatenate([targets[:, 1:], v_t[:, -1:]], axis=1)
    advantages = rewards + discounts * targets_next - v_tm1
  else:
    targets = jax.vmap(common.lambda_returns, in_axes=(0, 0, 0, None, 0))(
        rewards, discounts, v_t, lambda_, inputs.mask)
    advantages = targets - v_tm1
  advantages = jnp.where(valid, advantages, 0.0)
  return (jax.lax.stop_gradient(targets),
          jax.lax.stop_gradient(advantages))


def actor_critic_loss(
    inputs: common.ActorCriticInputs, *, target_logits: Array,
    duals: VMPODuals, top_k_fraction: float, epsilon_eta: float,
    epsilon_alpha: float, value_cost: float, value_target: str,
    lambda_: float,
    clip_rho_threshold: float) -> tuple[Array, dict[str, Array]]:
  """V-MPO policy, dual and value losses of a batch (see the module docstring).

  Args:
    inputs: the batch, as for `vtrace.actor_critic_loss`.
    target_logits: [B, T, A] logits of the target network (stop-gradient).
    duals: unconstrained (eta, alpha), see `VMPODuals`.
    top_k_fraction, epsilon_eta, epsilon_alpha: see `vmpo_loss`.
    value_cost: weight of the value loss.
    value_target: "vtrace" or "nstep", see `value_targets_and_advantages`.
    lambda_: V-trace / lambda-return lambda.
    clip_rho_threshold: V-trace's rho_bar for the "vtrace" targets. (There is
      no clip_pg_rho_threshold: the advantages carry no rho factor.)

  Returns:
    The scalar loss = policy_loss + temperature_loss + kl_loss + alpha_loss +
    value_loss and scalar metrics: those of `vmpo_loss`, value_loss
    (value_cost * masked_mean(0.5 * (target - V)^2), as it enters the loss),
    advantage_mean (over valid steps) and rho_mean (pi_L / pi_A of the taken
    actions over valid steps).
  """
  common.assert_actor_critic_inputs(inputs)
  if target_logits.shape != inputs.learner_logits.shape:
    raise ValueError(f"target_logits must have shape "
                     f"{inputs.learner_logits.shape}, got "
                     f"{target_logits.shape}")
  targets, advantages = value_targets_and_advantages(
      inputs, value_target=value_target, lambda_=lambda_,
      clip_rho_threshold=clip_rho_threshold)
  policy_and_duals, metrics = vmpo_loss(
      inputs.learner_logits, target_logits, inputs.actions, advantages,
      inputs.mask, duals, top_k_fraction=top_k_fraction,
      epsilon_eta=epsilon_eta, epsilon_alpha=epsilon_alpha)
  value_loss = value_cost * common.masked_mean(
      0.5 * jnp.square(targets - inputs.values[:, :-1]), inputs.mask)
  rho = vtrace.importance_weights(inputs.learner_logits,
                                  inputs.behaviour_logits, inputs.actions)
  metrics.update(
      value_loss=value_loss,
      advantage_mean=common.masked_mean(advantages, inputs.mask),
      rho_mean=common.masked_mean(rho, inputs.mask))
  return policy_and_duals + value_loss, metrics
