"""Tests for ald_jax.losses.vtrace and the shared helpers in losses.common.

Oracles: arithmetic worked out by hand (written next to each expectation) and
rlax (a test-only dependency) on random inputs.
"""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import rlax

from ald_jax.losses import common
from ald_jax.losses import vtrace

f32 = lambda x: jnp.asarray(x, jnp.float32)

# Jitted once per shape: eager op-by-op dispatch of scans and gradients is far
# slower to compile on a small shared CPU than one jitted call.
vtrace_returns = jax.jit(vtrace.vtrace_returns)
# The defaults of VTraceConfig; the losses take them as keyword scalars.
_HYPER = dict(baseline_cost=0.5, entropy_cost=0.01, lambda_=1.0,
              clip_rho_threshold=1.0, clip_pg_rho_threshold=1.0)
per_step_loss = jax.jit(functools.partial(vtrace.vtrace_actor_critic_loss,
                                          **_HYPER))
batch_loss = jax.jit(functools.partial(vtrace.actor_critic_loss, **_HYPER))
lambda_returns = jax.jit(common.lambda_returns,
                         static_argnames="stop_target_gradients")
rlax_vtrace = jax.jit(rlax.vtrace_td_error_and_advantage)
rlax_lambda_returns = jax.jit(rlax.lambda_returns)


# ----------------------------------------------------------------- common ---


def test_masked_mean_hand_values():
  x = f32([[1.0, 2.0], [3.0, 10.0]])
  mask = f32([[1.0, 1.0], [1.0, 0.0]])
  # (1 + 2 + 3) / 3
  np.testing.assert_allclose(common.masked_mean(x, mask), 2.0, rtol=1e-6)


def test_masked_mean_all_masked_is_zero_and_ignores_nan_padding():
  x = f32([1.0, jnp.nan, jnp.inf])
  np.testing.assert_allclose(common.masked_mean(x, f32([0, 0, 0])), 0.0)
  np.testing.assert_allclose(common.masked_mean(x, f32([1, 0, 0])), 1.0)
  grad = jax.grad(lambda v: common.masked_mean(v, f32([1, 1, 0])))(
      f32([1.0, 2.0, 3.0]))
  np.testing.assert_allclose(grad, [0.5, 0.5, 0.0])


def test_masked_mean_shape_mismatch_raises():
  with pytest.raises(AssertionError):
    common.masked_mean(jnp.zeros((2, 3)), jnp.ones((3, 2)))


def test_lambda_returns_hand_values():
  r = f32([1.0, 2.0])
  d = f32([0.5, 0.5])
  v = f32([10.0, 20.0])
  # lambda=1: G1 = 2 + 0.5*20 = 12; G0 = 1 + 0.5*12 = 7.
  np.testing.assert_allclose(lambda_returns(r, d, v, 1.0), [7.0, 12.0])
  # lambda=0.5: G1 = 12; G0 = 1 + 0.5*(0.5*10 + 0.5*12) = 6.5.
  np.testing.assert_allclose(lambda_returns(r, d, v, 0.5), [6.5, 12.0])
  # lambda=0: one-step targets r + d*v.
  np.testing.assert_allclose(lambda_returns(r, d, v, 0.0), [6.0, 12.0])


def test_lambda_returns_mask_cuts_trace():
  r = f32([1.0, 2.0, 3.0])
  d = f32([0.5, 0.5, 0.5])
  v = f32([10.0, 20.0, 30.0])
  mask = f32([1.0, 0.0, 1.0])
  # G2 = 3 + 0.5*30 = 18; G1 = 0 (masked: reward 0, discount 0);
  # G0 = 1 + 0.5*v[0] = 6 (the trace is cut before the masked step).
  got = lambda_returns(r, d, v, 1.0, mask=mask)
  np.testing.assert_allclose(got, [6.0, 0.0, 18.0])
  # Garbage at or after the masked step does not reach G0.
  got2 = lambda_returns(f32([1.0, jnp.nan, 99.0]), d,
                               f32([10.0, -5.0, 7.0]), 1.0, mask=mask)
  np.testing.assert_allclose(got2[0], 6.0)


@pytest.mark.parametrize("lambda_", [1.0, 0.7, 0.0])
def test_lambda_returns_matches_rlax(lambda_):
  rng = np.random.default_rng(0)
  t = 9
  r = f32(rng.normal(size=t))
  d = f32(rng.uniform(size=t))
  v = f32(rng.normal(size=t))
  np.testing.assert_allclose(
      lambda_returns(r, d, v, lambda_),
      rlax_lambda_returns(r, d, v, lambda_), rtol=1e-5, atol=1e-6)


def test_lambda_returns_stop_gradient_by_default():
  r, d, v = f32([1.0, 2.0]), f32([0.5, 0.5]), f32([10.0, 20.0])
  grad = jax.grad(lambda v_: lambda_returns(r, d, v_).sum())(v)
  np.testing.assert_allclose(grad, [0.0, 0.0])
  grad = jax.grad(lambda v_: lambda_returns(
      r, d, v_, stop_target_gradients=False).sum())(v)
  # dG1/dv1 = 0.5, dG0/dv1 = 0.5*0.5 -> 0.75.
  np.testing.assert_allclose(grad, [0.0, 0.75])


# ---------------------------------------------------------- vtrace_returns --

# T = 3: values v0..v3 = [1, 2, 0.5, 1.5], r = [1, 0, 2], discount 0.9,
# rho = [0.5, 2, 1]; clipped rho = [0.5, 1, 1], c = lambda * [0.5, 1, 1].
_V = [1.0, 2.0, 0.5, 1.5]
_R = [1.0, 0.0, 2.0]
_D = [0.9, 0.9, 0.9]
_RHO = [0.5, 2.0, 1.0]


def _returns(mask=(1.0, 1.0, 1.0), lambda_=1.0, **kw):
  v = f32(_V)
  return vtrace_returns(v[:-1], v[1:], f32(_R), f32(_D), f32(_RHO),
                               f32(mask), lambda_, **kw)


def test_vtrace_returns_hand_values_lambda_one():
  # td0 = 0.5*(1 + 0.9*2 - 1) = 0.9; td1 = 1*(0 + 0.9*0.5 - 2) = -1.55;
  # td2 = 1*(2 + 0.9*1.5 - 0.5) = 2.85.
  # vs2 = 0.5 + 2.85 = 3.35; vs1 - v1 = -1.55 + 0.9*1*2.85 = 1.015 -> 3.015;
  # vs0 - v0 = 0.9 + 0.9*0.5*1.015 = 1.35675 -> 2.35675.
  # adv0 = 0.5*(1 + 0.9*3.015 - 1) = 1.35675; adv1 = 0.9*3.35 - 2 = 1.015;
  # adv2 = 2 + 0.9*1.5 - 0.5 = 2.85.
  out = _returns()
  np.testing.assert_allclose(out.vs, [2.35675, 3.015, 3.35], rtol=1e-6)
  np.testing.assert_allclose(out.pg_advantages, [1.35675, 1.015, 2.85],
                             rtol=1e-6)


def test_vtrace_returns_hand_values_lambda_half():
  # c = [0.25, 0.5, 0.5]. vs2 = 3.35; vs1 - v1 = -1.55 + 0.9*0.5*2.85
  # = -0.2675 -> 1.7325; vs0 - v0 = 0.9 + 0.9*0.25*(-0.2675) = 0.8398125.
  # adv0 = 0.5*(1 + 0.9*1.7325 - 1) = 0.779625 (the paper's vs_{t+1}).
  out = _returns(lambda_=0.5)
  np.testing.assert_allclose(out.vs, [1.8398125, 1.7325, 3.35], rtol=1e-6)
  np.testing.assert_allclose(out.pg_advantages, [0.779625, 1.015, 2.85],
                             rtol=1e-6)


def test_vtrace_returns_hand_values_clip_thresholds():
  # clip_rho = 1.5: clipped rho = [0.5, 1.5, 1]; c is still min(1, rho).
  # td1 = 1.5*(-1.55) = -2.325; vs1 - v1 = -2.325 + 0.9*2.85 = 0.24;
  # vs0 - v0 = 0.9 + 0.9*0.5*0.24 = 1.008.
  # clip_pg = 0.25: pg rho = [0.25, 0.25, 0.25];
  # adv0 = 0.25*(0.9*2.24) = 0.504, adv1 = 0.25*1.015, adv2 = 0.25*2.85.
  out = _returns(clip_rho_threshold=1.5, clip_pg_rho_threshold=0.25)
  np.testing.assert_allclose(out.vs, [2.008, 2.24, 3.35], rtol=1e-6)
  np.testing.assert_allclose(out.pg_advantages,
                             [0.504, 0.25375, 0.7125], rtol=1e-6)


def test_vtrace_returns_hand_values_masked_step():
  # Step 1 masked: rho = c = discount = 0 there, so vs1 = v1 = 2, adv1 = 0.
  # vs0 - v0 = 0.9 + 0.9*0.5*0 = 0.9 -> 1.9; adv0 = 0.5*(1 + 0.9*2 - 1) = 0.9.
  out = _returns(mask=(1.0, 0.0, 1.0))
  np.testing.assert_allclose(out.vs, [1.9, 2.0, 3.35], rtol=1e-6)
  np.testing.assert_allclose(out.pg_advantages, [0.9, 0.0, 2.85], rtol=1e-6)


def _random_inputs(seed, t):
  rng = np.random.default_rng(seed)
  values = f32(rng.normal(size=t + 1))
  rewards = f32(rng.normal(size=t))
  discounts = f32(rng.uniform(0.5, 1.0, size=t))
  # Some steps with rho > 1, some < 1, so both clips matter.
  rho = f32(np.exp(0.8 * rng.normal(size=t)))
  return values, rewards, discounts, rho


@pytest.mark.parametrize("clip_rho,clip_pg", [(1.0, 1.0), (1.7, 0.6)])
def test_vtrace_returns_matches_rlax_lambda_one(clip_rho, clip_pg):
  values, rewards, discounts, rho = _random_inputs(1, 11)
  ours = vtrace_returns(values[:-1], values[1:], rewards, discounts, rho,
                               jnp.ones(11), 1.0, clip_rho, clip_pg)
  ref = rlax_vtrace(
      values[:-1], values[1:], rewards, discounts, rho, 1.0, clip_rho, clip_pg)
  np.testing.assert_allclose(ours.vs, ref.errors + values[:-1], rtol=1e-5,
                             atol=1e-5)
  np.testing.assert_allclose(ours.pg_advantages, ref.pg_advantage, rtol=1e-5,
                             atol=1e-5)


def test_vtrace_returns_matches_rlax_lambda_below_one():
  """vs agree for any lambda; rlax's pg bootstrap mixes in v with (1-lambda).

  rlax: q_t = r_t + d_t * (lambda * vs_{t+1} + (1 - lambda) * v_{t+1});
  ours (IMPALA paper / TRFL): q_t = r_t + d_t * vs_{t+1}.
  """
  lam, t = 0.8, 11
  values, rewards, discounts, rho = _random_inputs(2, t)
  ours = vtrace_returns(values[:-1], values[1:], rewards, discounts, rho,
                               jnp.ones(t), lam)
  ref = rlax_vtrace(
      values[:-1], values[1:], rewards, discounts, rho, lam)
  ref_vs = ref.errors + values[:-1]
  np.testing.assert_allclose(ours.vs, ref_vs, rtol=1e-5, atol=1e-5)
  vs_next = jnp.concatenate([ref_vs[1:], values[-1:]])
  expected = jnp.minimum(1.0, rho) * (rewards + discounts * vs_next
                                      - values[:-1])
  np.testing.assert_allclose(ours.pg_advantages, expected, rtol=1e-5,
                             atol=1e-5)
  # The conventions really differ for lambda < 1 (so the test above is real).
  assert not np.allclose(ours.pg_advantages, ref.pg_advantage, atol=1e-3)


@pytest.mark.parametrize("terminal", [True, False])
def test_vtrace_masked_step_is_inert(terminal):
  """Nothing at or after a masked step reaches earlier targets.

  Step m's action was taken at a LAST step. For a termination the step before
  has discount 0 and even V(LAST) is irrelevant; for a time-limit truncation it
  bootstraps from V(LAST) = values[m] only.
  """
  t, m = 8, 4
  values, rewards, discounts, rho = _random_inputs(3, t)
  if terminal:
    discounts = discounts.at[m - 1].set(0.0)
  mask = jnp.ones(t).at[m].set(0.0)
  base = vtrace_returns(values[:-1], values[1:], rewards, discounts,
                               rho, mask)
  first_changed = m if terminal else m + 1
  noise = f32(np.random.default_rng(4).normal(size=t + 1) * 5.0)
  values2 = values.at[first_changed:].add(noise[first_changed:])
  rewards2 = rewards.at[m:].add(noise[m:t])
  rho2 = rho.at[m].set(7.0)
  changed = vtrace_returns(values2[:-1], values2[1:], rewards2,
                                  discounts, rho2, mask)
  np.testing.assert_allclose(changed.vs[:m], base.vs[:m], rtol=1e-6)
  np.testing.assert_allclose(changed.pg_advantages[:m],
                             base.pg_advantages[:m], rtol=1e-6)
  # The masked step itself: zero value error, zero advantage.
  np.testing.assert_allclose(changed.vs[m], values2[m], rtol=1e-6)
  assert changed.pg_advantages[m] == 0.0
  # Sanity: the perturbation does change later targets.
  assert not np.allclose(changed.vs[m + 1:], base.vs[m + 1:])


def test_vtrace_masked_garbage_does_not_leak_nan():
  t, m = 6, 2
  values, rewards, discounts, rho = _random_inputs(5, t)
  mask = jnp.ones(t).at[m].set(0.0)
  out = vtrace_returns(values[:-1], values[1:],
                              rewards.at[m].set(jnp.nan),
                              discounts.at[m].set(jnp.nan),
                              rho.at[m].set(jnp.inf), mask)
  assert np.all(np.isfinite(out.vs)) and np.all(np.isfinite(out.pg_advantages))


# ------------------------------------------------ vtrace_actor_critic_loss --


def _ac_example():
  # T = 2, A = 2. Learner uniform (pi = 0.5); behaviour [log 3, 0] ->
  # mu = [0.75, 0.25]; actions [0, 1] -> rho = [2/3, 2].
  return dict(
      learner_logits=f32([[0.0, 0.0], [0.0, 0.0]]),
      behaviour_logits=f32([[math.log(3.0), 0.0], [math.log(3.0), 0.0]]),
      actions=jnp.asarray([0, 1], jnp.int32),
      values=f32([1.0, 2.0, 0.0]),
      rewards=f32([1.0, 1.0]),
      discounts=f32([0.5, 0.5]))


def test_actor_critic_loss_hand_values():
  loss, extras = per_step_loss(**_ac_example(), mask=f32([1.0, 1.0]))
  ln2 = math.log(2.0)
  # td1 = 1*(1 + 0 - 2) = -1 -> vs1 = 1; td0 = (2/3)*(1 + 0.5*2 - 1) = 2/3,
  # vs0 - v0 = 2/3 + 0.5*(2/3)*(-1) = 1/3 -> vs0 = 4/3.
  # adv0 = (2/3)*(1 + 0.5*1 - 1) = 1/3; adv1 = 1*(1 + 0 - 2) = -1.
  # pg = -adv * log 0.5 = [ln2/3, -ln2]; value = 0.5*(vs - v)^2 = [1/18, 1/2].
  np.testing.assert_allclose(extras["rho"], [2 / 3, 2.0], rtol=1e-6)
  np.testing.assert_allclose(extras["vs"], [4 / 3, 1.0], rtol=1e-6)
  np.testing.assert_allclose(extras["pg_advantages"], [1 / 3, -1.0],
                             rtol=1e-6)
  np.testing.assert_allclose(extras["pg_loss"], [ln2 / 3, -ln2], rtol=1e-6)
  np.testing.assert_allclose(extras["value_loss"], [1 / 18, 0.5], rtol=1e-6)
  np.testing.assert_allclose(extras["entropy"], [ln2, ln2], rtol=1e-6)
  expected = [ln2 / 3 + 0.5 / 18 - 0.01 * ln2, -ln2 + 0.25 - 0.01 * ln2]
  np.testing.assert_allclose(loss, expected, rtol=1e-6)


def test_actor_critic_loss_hand_values_masked():
  loss, extras = per_step_loss(**_ac_example(), mask=f32([1.0, 0.0]))
  ln2 = math.log(2.0)
  # Step 1 masked: vs1 = v1 = 2; vs0 - v0 = 2/3 -> 5/3;
  # adv0 = (2/3)*(1 + 0.5*2 - 1) = 2/3 -> pg0 = (2/3) ln2; value0 = 0.5*(2/3)^2.
  np.testing.assert_allclose(extras["vs"], [5 / 3, 2.0], rtol=1e-6)
  expected0 = 2 / 3 * ln2 + 0.5 * 0.5 * 4 / 9 - 0.01 * ln2
  np.testing.assert_allclose(loss, [expected0, 0.0], rtol=1e-6)
  for name in ("pg_loss", "value_loss", "entropy"):
    assert extras[name][1] == 0.0


def _random_ac_inputs(seed, t=7, a=4):
  values, rewards, discounts, _ = _random_inputs(seed, t)
  rng = np.random.default_rng(seed + 100)
  return dict(
      learner_logits=f32(rng.normal(size=(t, a))),
      behaviour_logits=f32(rng.normal(size=(t, a))),
      actions=jnp.asarray(rng.integers(0, a, size=t), jnp.int32),
      values=values, rewards=rewards, discounts=discounts)


def test_actor_critic_loss_gradient_isolation():
  inputs = _random_ac_inputs(6)
  mask = f32([1, 1, 1, 0, 1, 1, 1])

  def terms(learner_logits, behaviour_logits, values):
    _, extras = vtrace.vtrace_actor_critic_loss(
        **{**inputs, "learner_logits": learner_logits,
           "behaviour_logits": behaviour_logits, "values": values},
        mask=mask, **_HYPER)
    return {name: jnp.sum(extras[name])
            for name in ("pg_loss", "entropy", "value_loss")}

  # One reverse-mode Jacobian of all terms: a single compilation.
  jacobian = jax.jit(jax.jacrev(terms, argnums=(0, 1, 2)))(
      inputs["learner_logits"], inputs["behaviour_logits"], inputs["values"])
  for name, reaches in (("pg_loss", 0), ("entropy", 0), ("value_loss", 2)):
    for i, g in enumerate(jacobian[name]):
      if i == reaches:
        assert np.abs(g).max() > 1e-4, (name, i)
      else:
        np.testing.assert_array_equal(g, 0.0, err_msg=f"{name} -> arg {i}")

  # The value term is a semi-gradient toward fixed targets:
  # d/dv_t 0.5*(vs_t - v_t)^2 = v_t - vs_t on valid steps, 0 elsewhere and at
  # the bootstrap value.
  _, extras = per_step_loss(**inputs, mask=mask)
  grad_v = jacobian["value_loss"][2]
  expected = jnp.append((inputs["values"][:-1] - extras["vs"]) * mask, 0.0)
  np.testing.assert_allclose(grad_v, expected, rtol=1e-5, atol=1e-6)
  # The pg term's gradient on the logits is -adv * (onehot(a) - pi).
  grad_l = jacobian["pg_loss"][0]
  pi = jax.nn.softmax(inputs["learner_logits"])
  onehot = jax.nn.one_hot(inputs["actions"], 4)
  adv = extras["pg_advantages"] * mask
  np.testing.assert_allclose(grad_l, -adv[:, None] * (onehot - pi), rtol=1e-4,
                             atol=1e-6)


def test_actor_critic_loss_rejects_bad_shapes():
  inputs = _ac_example()
  with pytest.raises(AssertionError):
    per_step_loss(**{**inputs, "values": f32([1.0, 2.0])},
                  mask=f32([1.0, 1.0]))
  with pytest.raises(AssertionError):
    per_step_loss(**{**inputs, "actions": jnp.asarray([0.0, 1.0])},
                  mask=f32([1.0, 1.0]))


# --------------------------------------------- batch-level actor_critic_loss --


def _batch(rows, masks):
  stacked = jax.tree.map(lambda *x: jnp.stack(x), *rows)
  return common.ActorCriticInputs(mask=f32(masks), **stacked)


def test_batch_loss_hand_values():
  """Two rows of the hand example: one fully valid, one with step 1 masked.

  Valid steps: row 0 steps 0, 1 and row 1 step 0 (3 in all). From the two
  hand tests above (ln2 = log 2):
    pg:      ln2/3, -ln2, 2/3 ln2          -> policy_loss = 0
    value:   1/18, 1/2, 2/9 (x0.5 cost)    -> value_loss = 0.5 * 7/9 / 3
    entropy: ln2 each                      -> entropy = ln2
    adv:     1/3, -1, 2/3                  -> advantage_mean = 0
    rho:     2/3, 2, 2/3                   -> rho_mean = 10/9
  """
  ln2 = math.log(2.0)
  inputs = _batch([_ac_example(), _ac_example()], [[1, 1], [1, 0]])
  loss, metrics = batch_loss(inputs)
  np.testing.assert_allclose(metrics["policy_loss"], 0.0, atol=1e-7)
  np.testing.assert_allclose(metrics["value_loss"], 0.5 * 7 / 27, rtol=1e-6)
  np.testing.assert_allclose(metrics["entropy"], ln2, rtol=1e-6)
  np.testing.assert_allclose(metrics["advantage_mean"], 0.0, atol=1e-7)
  np.testing.assert_allclose(metrics["rho_mean"], 10 / 9, rtol=1e-6)
  np.testing.assert_allclose(metrics["vs_mean"], (4 / 3 + 1 + 5 / 3) / 3,
                             rtol=1e-6)
  np.testing.assert_allclose(loss, 0.5 * 7 / 27 - 0.01 * ln2, rtol=1e-6)
  np.testing.assert_allclose(
      loss, metrics["policy_loss"] + metrics["value_loss"]
      - 0.01 * metrics["entropy"], rtol=1e-6)


def test_batch_loss_is_masked_mean_of_per_step_loss():
  rows = [_random_ac_inputs(seed) for seed in (7, 8, 9)]
  masks = [[1] * 7, [1, 1, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0]]
  inputs = _batch(rows, masks)
  loss, _ = batch_loss(inputs)
  per_step = [np.asarray(per_step_loss(**row, mask=f32(m))[0])
              for row, m in zip(rows, masks)]
  expected = np.sum(per_step) / np.sum(masks)
  np.testing.assert_allclose(loss, expected, rtol=1e-5)


def test_batch_loss_honours_hyper_parameters():
  """lambda_ and both clips reach the targets (they change the loss)."""
  inputs = _batch([_random_ac_inputs(10), _random_ac_inputs(11)],
                  [[1] * 7, [1] * 7])
  base, _ = batch_loss(inputs)
  for name, value in (("lambda_", 0.5), ("clip_rho_threshold", 2.0),
                      ("clip_pg_rho_threshold", 0.3)):
    changed, _ = vtrace.actor_critic_loss(inputs, **{**_HYPER, name: value})
    assert not np.allclose(changed, base, rtol=1e-4), name


def test_batch_loss_rejects_bad_inputs_naming_the_field():
  inputs = _batch([_ac_example()], [[1, 1]])
  with pytest.raises(ValueError, match="inputs.values"):
    vtrace.actor_critic_loss(inputs._replace(values=inputs.values[:, :2]),
                             **_HYPER)
  with pytest.raises(ValueError, match="inputs.actions must be int32"):
    vtrace.actor_critic_loss(
        inputs._replace(actions=inputs.actions.astype(jnp.float32)), **_HYPER)
  with pytest.raises(ValueError, match="inputs.mask"):
    vtrace.actor_critic_loss(inputs._replace(mask=inputs.mask[0]), **_HYPER)
  with pytest.raises(TypeError, match="ActorCriticInputs"):
    vtrace.actor_critic_loss(tuple(inputs), **_HYPER)
