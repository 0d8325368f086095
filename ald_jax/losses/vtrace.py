"""V-trace targets and the IMPALA actor-critic loss (Espeholt et al. 2018).

Per-step functions over one unroll of T transitions (rlax style: `[T]` arrays,
hyper-parameters as scalar keyword arguments); `actor_critic_loss` is the
batch-level loss over `common.ActorCriticInputs` (vmap, then a masked mean).
Index t is the transition taken by `action[t]`: `v_tm1[t]` is the value of the
state the action was taken in, `r_t[t]` / `discount_t[t]` follow the action,
`v_t[t]` is the value of the next state (`v_t[-1]` bootstraps).

Masking. `mask[t] = 0` marks a transition whose action was taken at a LAST step
(the environment ignored it). Such a step is made inert by treating it as
rho = 0, c = 0 and discount = 0: its target is `vs[t] = v_tm1[t]` (zero value
error), its policy-gradient advantage is 0, and no correction term crosses it,
so rewards and values after a masked step never reach earlier targets. The step
before a masked one bootstraps from `v_t` of the LAST state through its own
discount (0 for a termination, gamma for a time-limit truncation).

Conventions versus rlax (checked in tests/test_losses_vtrace.py):
* `vs` equals `errors + v_tm1` of `rlax.vtrace` (c = lambda * min(1, rho), as
  in the IMPALA paper's remark on lambda) when nothing is masked.
* The policy-gradient advantage is the paper's
  `min(rho_bar_pg, rho) * (r + discount * vs_{t+1} - v_tm1)`, with
  `vs_T = v_t[-1]`. rlax mixes the bootstrap as
  `lambda * vs_{t+1} + (1 - lambda) * v_{t+1}`; the two agree for lambda = 1.
* rlax's `sample_mask` *skips* a masked step (the trace passes through it);
  ours *cuts* the trace there, which is what an action at a LAST step needs.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp

from ald_jax.losses import common

Array = chex.Array


class VTraceReturns(NamedTuple):
  vs: Array             # [T] V-trace value targets (stop-gradient)
  pg_advantages: Array  # [T] clipped-rho policy-gradient advantages (stop-grad)


def vtrace_returns(v_tm1: Array, v_t: Array, r_t: Array, discount_t: Array,
                   rho_tm1: Array, mask: Array, lambda_: float = 1.0,
                   clip_rho_threshold: float = 1.0,
                   clip_pg_rho_threshold: float = 1.0) -> VTraceReturns:
  """V-trace targets `vs` and policy-gradient advantages for one unroll.

    delta_t = min(rho_bar, rho_t) * (r_t + discount_t * v_t - v_tm1)
    c_t     = lambda * min(1, rho_t)
    vs_t - v_tm1_t = delta_t + discount_t * c_t * (vs_{t+1} - v_tm1_{t+1})
    adv_t   = min(rho_bar_pg, rho_t) * (r_t + discount_t * vs_{t+1} - v_tm1_t)

  with `vs_T = v_t[-1]`. Masked steps (mask = 0) act as rho = c = discount = 0
  (see the module docstring). All inputs are `[T]` float32; the outputs are
  wrapped in `stop_gradient` (they are targets).
  """
  chex.assert_rank([v_tm1, v_t, r_t, discount_t, rho_tm1, mask], 1)
  chex.assert_equal_shape([v_tm1, v_t, r_t, discount_t, rho_tm1, mask])
  chex.assert_type([v_tm1, v_t, r_t, discount_t, rho_tm1], jnp.float32)
  v_tm1, v_t, r_t, discount_t, rho_tm1 = jax.lax.stop_gradient(
      (v_tm1, v_t, r_t, discount_t, rho_tm1))
  valid = mask > 0
  # `where`, not multiplication: a padding step may hold inf/NaN garbage.
  rho = jnp.where(valid, rho_tm1, 0.0)
  discount = jnp.where(valid, discount_t, 0.0)
  clipped_rho = jnp.minimum(clip_rho_threshold, rho)
  cs = lambda_ * jnp.minimum(1.0, rho)
  td = jnp.where(valid, clipped_rho * (r_t + discount * v_t - v_tm1), 0.0)

  def step(acc_next, xs):
    delta, d, c = xs
    acc = delta + d * c * acc_next
    return acc, acc

  _, vs_minus_v = jax.lax.scan(step, jnp.zeros((), jnp.float32),
                               (td, discount, cs), reverse=True)
  vs = v_tm1 + vs_minus_v
  vs_next = jnp.concatenate([vs[1:], v_t[-1:]])
  clipped_pg_rho = jnp.minimum(clip_pg_rho_threshold, rho)
  pg_advantages = jnp.where(
      valid, clipped_pg_rho * (r_t + discount * vs_next - v_tm1), 0.0)
  return VTraceReturns(vs=jax.lax.stop_gradient(vs),
                       pg_advantages=jax.lax.stop_gradient(pg_advantages))


def vtrace_actor_critic_loss(
    learner_logits: Array, behaviour_logits: Array, actions: Array,
    values: Array, rewards: Array, discounts: Array, mask: Array, *,
    baseline_cost: float, entropy_cost: float, lambda_: float,
    clip_rho_threshold: float,
    clip_pg_rho_threshold: float) -> tuple[Array, dict[str, Array]]:
  """IMPALA actor-critic loss per step of one unroll.

  Args:
    learner_logits: [T, A] logits of the policy being trained (pi_learner).
    behaviour_logits: [T, A] logits the acting policy used (pi_behaviour).
    actions: [T] int32 actions taken.
    values: [T + 1] learner values at steps 0..T (the last bootstraps).
    rewards: [T] reward following action t.
    discounts: [T] gamma * environment discount of step t + 1.
    mask: [T] 1 for a valid step, 0 for an action taken at a LAST step.
    baseline_cost: weight of the value term.
    entropy_cost: weight of the entropy bonus.
    lambda_, clip_rho_threshold, clip_pg_rho_threshold: see `vtrace_returns`.

  Returns:
    `per_step_loss [T]` = pg + baseline_cost * 0.5 * (vs - v)^2
    - entropy_cost * entropy, zero at masked steps (the caller takes
    `masked_mean`), and extras of `[T]` arrays: pg_loss, value_loss (unweighted
    0.5 * (vs - v)^2), entropy (each zero at masked steps), vs (the targets),
    pg_advantages and rho (pi/mu of the taken action). Gradients: the pg and
    entropy terms reach `learner_logits` only, the value term `values` only;
    `behaviour_logits` get none.
  """
  chex.assert_rank([learner_logits, behaviour_logits, actions, values, rewards,
                    discounts, mask], [2, 2, 1, 1, 1, 1, 1])
  chex.assert_equal_shape([learner_logits, behaviour_logits])
  chex.assert_equal_shape([actions, rewards, discounts, mask])
  chex.assert_equal_shape_prefix([learner_logits, actions], 1)
  chex.assert_type([learner_logits, behaviour_logits, values, rewards,
                    discounts], jnp.float32)
  chex.assert_type(actions, jnp.int32)
  chex.assert_shape(values, (actions.shape[0] + 1,))

  log_pi = common.log_prob(learner_logits, actions)
  rho = importance_weights(learner_logits, behaviour_logits, actions)
  targets = vtrace_returns(
      v_tm1=values[:-1], v_t=values[1:], r_t=rewards, discount_t=discounts,
      rho_tm1=rho, mask=mask, lambda_=lambda_,
      clip_rho_threshold=clip_rho_threshold,
      clip_pg_rho_threshold=clip_pg_rho_threshold)

  valid = mask > 0
  pg_loss = jnp.where(valid, -targets.pg_advantages * log_pi, 0.0)
  value_loss = jnp.where(valid, 0.5 * jnp.square(targets.vs - values[:-1]), 0.0)
  ent = jnp.where(valid, common.entropy(learner_logits), 0.0)
  per_step_loss = (pg_loss + baseline_cost * value_loss - entropy_cost * ent)
  extras = dict(pg_loss=pg_loss, value_loss=value_loss, entropy=ent,
                vs=targets.vs, pg_advantages=targets.pg_advantages, rho=rho)
  return per_step_loss, extras


def importance_weights(learner_logits: Array, behaviour_logits: Array,
                       actions: Array) -> Array:
  """rho = pi_L(a) / pi_A(a) of the taken actions, a constant (stop-gradient).

  Computed as exp(log pi_L - log pi_A) from logits `[..., A]` and actions
  `[...]`; returns `[...]`.
  """
  log_pi = common.log_prob(jax.lax.stop_gradient(learner_logits), actions)
  log_mu = common.log_prob(jax.lax.stop_gradient(behaviour_logits), actions)
  return jnp.exp(log_pi - log_mu)


def actor_critic_loss(
    inputs: common.ActorCriticInputs, *, baseline_cost: float,
    entropy_cost: float, lambda_: float, clip_rho_threshold: float,
    clip_pg_rho_threshold: float) -> tuple[Array, dict[str, Array]]:
  """IMPALA actor-critic loss of a batch: the masked mean of the per-step loss.

  `vtrace_actor_critic_loss` vmapped over the B rows of `inputs`, averaged over
  the valid steps (`inputs.mask`) of the whole batch.

  Returns:
    The scalar loss and scalar metrics (masked means over valid steps):
    policy_loss (-adv * log pi), value_loss (baseline_cost * 0.5 * (vs - v)^2,
    as it enters the loss), entropy, advantage_mean (the clipped-rho pg
    advantages), rho_mean (pi_L / pi_A of the taken actions), vs_mean. So
    loss = policy_loss + value_loss - entropy_cost * entropy.
  """
  common.assert_actor_critic_inputs(inputs)
  per_step_fn = functools.partial(
      vtrace_actor_critic_loss, baseline_cost=baseline_cost,
      entropy_cost=entropy_cost, lambda_=lambda_,
      clip_rho_threshold=clip_rho_threshold,
      clip_pg_rho_threshold=clip_pg_rho_threshold)
  per_step, extras = jax.vmap(per_step_fn)(
      inputs.learner_logits, inputs.behaviour_logits, inputs.actions,
      inputs.values, inputs.rewards, inputs.discounts, inputs.mask)
  mean = lambda x: common.masked_mean(x, inputs.mask)
  metrics = dict(
      policy_loss=mean(extras["pg_loss"]),
      value_loss=baseline_cost * mean(extras["value_loss"]),
      entropy=mean(extras["entropy"]),
      advantage_mean=mean(extras["pg_advantages"]),
      rho_mean=mean(extras["rho"]),
      vs_mean=mean(extras["vs"]))
  return mean(per_step), metrics
