"""Tests for ald_jax.losses.vmpo: hand-computed values, numpy-loop oracles for
the advantages and targets, the rlax oracle for the policy/dual terms, top-k
over valid steps, the duals' optimisation, masking and gradient routing.
"""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import rlax

from ald_jax.losses import common
from ald_jax.losses import vmpo

f32 = lambda x: jnp.asarray(x, jnp.float32)

# rlax only serves as an oracle here; its deprecation notice is noise.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Rlax categorical_kl_divergence:PendingDeprecationWarning")
E = math.e

# The defaults of VMPOConfig, as the keyword scalars the loss takes.
_EPS = dict(top_k_fraction=0.5, epsilon_eta=0.1, epsilon_alpha=0.01)
_STATIC = tuple(_EPS)
_loss = jax.jit(vmpo.vmpo_loss, static_argnames=_STATIC)
_grad = jax.jit(jax.value_and_grad(vmpo.vmpo_loss, argnums=(0, 5),
                                   has_aux=True), static_argnames=_STATIC)


def loss_fn(online, target, actions, advantages, mask, duals, **kw):
  return _loss(online, target, actions, advantages, mask, duals,
               **{**_EPS, **kw})


# 4 samples, 2 actions. Online pi = [0.75, 0.25] everywhere, target uniform.
# actions [0, 1, 1, 0]; advantages [1, -1, 2, 0].
_ONLINE = f32([[math.log(3.0), 0.0]] * 4)
_TARGET = f32([[0.0, 0.0]] * 4)
_ACTIONS = jnp.asarray([0, 1, 1, 0], jnp.int32)
_ADV = f32([1.0, -1.0, 2.0, 0.0])
# KL(uniform || [0.75, 0.25]) = 0.5 ln(0.5/0.75) + 0.5 ln(0.5/0.25)
#                             = 0.5 ln(4/3) per sample.
_KL = 0.5 * math.log(4.0 / 3.0)


def _hand_case(init_eta=1.0, init_alpha=5.0, mask=(1.0, 1.0, 1.0, 1.0),
               adv=_ADV):
  return loss_fn(_ONLINE, _TARGET, _ACTIONS, adv, f32(mask),
                 vmpo.init_duals(init_eta, init_alpha))


def test_duals_init_and_positivity():
  eta, alpha = vmpo.duals_values(vmpo.init_duals(0.3, 7.0))
  np.testing.assert_allclose([eta, alpha], [0.3, 7.0], rtol=1e-6)
  eta, alpha = vmpo.duals_values(vmpo.VMPODuals(f32(-200.0), f32(-1e4)))
  assert eta > 0 and alpha > 0
  with pytest.raises(ValueError, match="init_alpha"):
    vmpo.init_duals(1.0, 0.0)


def test_top_k_count():
  assert vmpo.top_k_count(24, 0.5) == 12
  assert vmpo.top_k_count(24, 0.3) == 7    # floor(7.2), as rlax
  assert vmpo.top_k_count(100, 0.29) == 29  # 0.29*100 = 28.999999999999996
  assert vmpo.top_k_count(4, 0.1) == 1     # at least 1 of any valid
  assert vmpo.top_k_count(5, 1.0) == 5
  assert vmpo.top_k_count(0, 0.5) == 0     # nothing valid, nothing kept
  with pytest.raises(ValueError, match="top_k_fraction"):
    vmpo.top_k_count(4, 0.0)


def test_vmpo_hand_values_eta_one():
  loss, extras = _hand_case()
  # k = 2: samples 2 (A=2) and 0 (A=1) are selected.
  # psi = softmax([1, 2]) = [1/(1+e), e/(1+e)].
  # policy = -(ln 0.75 / (1+e) + e ln 0.25 / (1+e)).
  policy = -(math.log(0.75) + E * math.log(0.25)) / (1 + E)
  # temperature = 1*0.1 + 1*log((e^1 + e^2)/2).
  temperature = 0.1 + math.log((E + E ** 2) / 2)
  kl_loss = 5.0 * _KL
  alpha_loss = 5.0 * (0.01 - _KL)
  # ESS = 1 / sum psi^2 = (1+e)^2 / (1 + e^2), of 2 selected.
  ess = (1 + E) ** 2 / (1 + E ** 2)
  np.testing.assert_allclose(extras["policy_loss"], policy, rtol=1e-5)
  np.testing.assert_allclose(extras["temperature_loss"], temperature,
                             rtol=1e-5)
  np.testing.assert_allclose(extras["kl"], _KL, rtol=1e-5)
  np.testing.assert_allclose(extras["kl_loss"], kl_loss, rtol=1e-5)
  np.testing.assert_allclose(extras["alpha_loss"], alpha_loss, rtol=1e-4)
  np.testing.assert_allclose(extras["eta"], 1.0, rtol=1e-6)
  np.testing.assert_allclose(extras["alpha"], 5.0, rtol=1e-6)
  np.testing.assert_allclose(extras["selected_fraction"], 0.5)
  np.testing.assert_allclose(extras["ess"], ess, rtol=1e-5)
  np.testing.assert_allclose(extras["ess_fraction"], ess / 2, rtol=1e-5)
  np.testing.assert_allclose(
      loss, policy + temperature + kl_loss + alpha_loss, rtol=1e-5)


def test_vmpo_hand_values_eta_two():
  _, extras = _hand_case(init_eta=2.0)
  # psi = softmax([1/2, 2/2]); temperature = 2*0.1 + 2*log((e^0.5 + e)/2).
  w0, w2 = math.exp(0.5), E
  policy = -(w0 * math.log(0.75) + w2 * math.log(0.25)) / (w0 + w2)
  temperature = 0.2 + 2 * math.log((w0 + w2) / 2)
  np.testing.assert_allclose(extras["policy_loss"], policy, rtol=1e-5)
  np.testing.assert_allclose(extras["temperature_loss"], temperature,
                             rtol=1e-5)
  # A larger eta flattens psi: the ESS grows toward the 2 selected.
  np.testing.assert_allclose(extras["ess"],
                             (w0 + w2) ** 2 / (w0 ** 2 + w2 ** 2), rtol=1e-5)


def test_vmpo_hand_values_masked():
  # Sample 2 is masked and given a huge advantage: it must not be selected.
  # 3 valid samples -> k = floor(0.5 * 3) = 1: only sample 0 (A=1) is kept.
  # psi = [1], action 0 -> policy = -ln 0.75; ESS = 1.
  # temperature = 0.1 + 1*log(mean exp(1/1)) = 1.1. KL is the same everywhere.
  loss, extras = _hand_case(mask=(1.0, 1.0, 0.0, 1.0),
                            adv=_ADV.at[2].set(100.0))
  np.testing.assert_allclose(extras["policy_loss"], -math.log(0.75),
                             rtol=1e-5)
  np.testing.assert_allclose(extras["temperature_loss"], 1.1, rtol=1e-5)
  np.testing.assert_allclose(extras["kl"], _KL, rtol=1e-5)
  np.testing.assert_allclose(extras["selected_fraction"], 1 / 3, rtol=1e-6)
  np.testing.assert_allclose(extras["ess"], 1.0, rtol=1e-6)
  np.testing.assert_allclose(extras["ess_fraction"], 1.0, rtol=1e-6)
  assert np.isfinite(loss)


def test_vmpo_any_leading_shape():
  flat, flat_extras = _hand_case()
  shaped, shaped_extras = loss_fn(
      _ONLINE.reshape(2, 2, 2), _TARGET.reshape(2, 2, 2),
      _ACTIONS.reshape(2, 2), _ADV.reshape(2, 2), jnp.ones((2, 2)),
      vmpo.init_duals(1.0, 5.0))
  np.testing.assert_allclose(shaped, flat, rtol=1e-6)
  for name in flat_extras:
    np.testing.assert_allclose(shaped_extras[name], flat_extras[name],
                               rtol=1e-6)


# ------------------------------------------------------ top-k over valid ---

_select = jax.jit(vmpo.select_top_k, static_argnames="top_k_fraction")


def test_top_k_counts_only_valid_steps():
  # 10 samples, 5 valid. The masked ones hold the largest advantages.
  adv = f32([9.0, 0.5, 8.0, 3.0, 7.0, -1.0, 6.0, 2.0, 5.0, 1.0])
  valid = f32([0, 1, 0, 1, 0, 1, 0, 1, 0, 1])
  # fraction 0.5: k = floor(2.5) = 2 of the 5 valid (not 5 of all 10):
  # the valid advantages are [0.5, 3, -1, 2, 1] -> samples 3 and 7.
  np.testing.assert_array_equal(_select(adv, valid, top_k_fraction=0.5),
                                [0, 0, 0, 1, 0, 0, 0, 1, 0, 0])
  # fraction 0.1: floor(0.5) = 0, but at least 1 -> sample 3 only.
  np.testing.assert_array_equal(_select(adv, valid, top_k_fraction=0.1),
                                [0, 0, 0, 1, 0, 0, 0, 0, 0, 0])
  # fraction 1: every valid sample, no masked one.
  np.testing.assert_array_equal(_select(adv, valid, top_k_fraction=1.0),
                                valid)


def test_top_k_is_counted_inside_jit():
  """One trace, k follows the number of valid samples."""
  traces = []

  def select(adv, valid):
    traces.append(None)
    return vmpo.select_top_k(adv, valid, top_k_fraction=0.5)

  select = jax.jit(select)
  adv = f32(np.arange(8.0))
  for num_valid in range(9):
    valid = f32([1.0] * num_valid + [0.0] * (8 - num_valid))
    selected = np.asarray(select(adv, valid))
    k = vmpo.top_k_count(num_valid, 0.5)
    assert selected.sum() == k, num_valid
    # The k largest valid advantages: the last k of the valid prefix.
    np.testing.assert_array_equal(selected[num_valid - k:num_valid], 1.0)
    assert np.all(selected[num_valid:] == 0.0)
  assert len(traces) == 1


def test_top_k_ties_broken_by_index():
  adv = f32([1.0, 2.0, 2.0, 2.0])
  selected = _select(adv, f32([1, 1, 1, 1]), top_k_fraction=0.5)
  np.testing.assert_array_equal(selected, [0, 1, 1, 0])


# -------------------------------------------------------------- rlax oracle --


def _random_batch(seed, shape=(4, 6), num_actions=3):
  rng = np.random.default_rng(seed)
  return dict(
      online=f32(rng.normal(size=(*shape, num_actions))),
      target=f32(rng.normal(size=(*shape, num_actions))),
      actions=jnp.asarray(rng.integers(0, num_actions, size=shape), jnp.int32),
      advantages=f32(2.0 * rng.normal(size=shape)))


def _rlax_loss(online, target, actions, advantages, mask, duals,
               top_k_fraction, epsilon_eta, epsilon_alpha):
  """rlax.vmpo_loss averaged over examples, with our duals mapping.

  rlax gets the already-positive eta/alpha (its clip projection at 1e-10 is
  then the identity), `restarting_weights` = mask, no importance weights.
  """
  eta, alpha = vmpo.duals_values(duals)
  log_probs = jnp.take_along_axis(jax.nn.log_softmax(online),
                                  actions[..., None], axis=-1)[..., 0]
  kl = rlax.categorical_kl_divergence(jax.lax.stop_gradient(target), online)
  loss, out = rlax.vmpo_loss(
      sample_log_probs=log_probs, advantages=advantages,
      temperature_constraint=rlax.LagrangePenalty(eta, f32(epsilon_eta)),
      kl_constraints=[(kl, rlax.LagrangePenalty(alpha, f32(epsilon_alpha)))],
      restarting_weights=mask, top_k_fraction=top_k_fraction)
  parts = dict(policy_loss=jnp.mean(out.policy_loss),
               temperature_loss=out.temperature_loss,
               kl_loss=jnp.mean(out.kl_loss),
               alpha_loss=jnp.mean(out.alpha_loss))
  return jnp.mean(loss), parts


@pytest.mark.parametrize("top_k_fraction", [0.5, 0.3])
def test_vmpo_matches_rlax(top_k_fraction):
  eps = dict(_EPS, top_k_fraction=top_k_fraction)
  b = _random_batch(0)
  mask = jnp.ones(b["actions"].shape)
  duals = vmpo.init_duals(0.7, 2.0)

  def ours(online, duals):
    return vmpo.vmpo_loss(online, b["target"], b["actions"], b["advantages"],
                          mask, duals, **eps)

  def theirs(online, duals):
    return _rlax_loss(online, b["target"], b["actions"], b["advantages"],
                      mask, duals, **eps)

  (loss, extras), grads = jax.jit(jax.value_and_grad(
      ours, argnums=(0, 1), has_aux=True))(b["online"], duals)
  (ref_loss, ref_parts), ref_grads = jax.jit(jax.value_and_grad(
      theirs, argnums=(0, 1), has_aux=True))(b["online"], duals)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, atol=1e-6)
  for name, value in ref_parts.items():
    np.testing.assert_allclose(extras[name], value, rtol=1e-5, atol=1e-6,
                               err_msg=name)
  for g, ref_g in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(g, ref_g, rtol=1e-4, atol=1e-6)


def test_vmpo_e_step_matches_rlax_with_mask():
  """With padding, rlax's restarting_weights select and weigh like our mask.

  rlax counts k over all N samples (k = int(fraction * N)), we over the valid
  ones, so rlax is given the fraction that makes its k equal ours. (Only the
  E-step terms: rlax leaves masking the KL to the caller.)
  """
  b = _random_batch(1)
  mask = f32(np.random.default_rng(2).random(b["actions"].shape) > 0.3)
  num_valid, n = int(mask.sum()), mask.size
  k = vmpo.top_k_count(num_valid, 0.5)
  assert k < int(0.5 * n)  # the counts really differ
  duals = vmpo.init_duals(1.0, 5.0)
  _, extras = loss_fn(b["online"], b["target"], b["actions"], b["advantages"],
                      mask, duals)
  _, ref_parts = jax.jit(_rlax_loss, static_argnums=(6, 7, 8))(
      b["online"], b["target"], b["actions"], b["advantages"], mask, duals,
      (k + 0.5) / n, 0.1, 0.01)
  for name in ("policy_loss", "temperature_loss"):
    np.testing.assert_allclose(extras[name], ref_parts[name], rtol=1e-5,
                               err_msg=name)
  np.testing.assert_allclose(extras["selected_fraction"], k / num_valid,
                             rtol=1e-6)


# ------------------------------------------------------- masking, gradients --


def test_vmpo_masked_samples_never_selected_and_inert():
  b = _random_batch(3, shape=(2, 4))
  mask = f32([[1, 0, 1, 1], [0, 1, 1, 0]])
  masked = mask == 0
  duals = vmpo.init_duals(1.0, 5.0)
  (loss, _), (grad, _) = _grad(b["online"], b["target"], b["actions"],
                               b["advantages"], mask, duals, **_EPS)
  # Huge advantages, different logits and targets at the masked samples:
  # nothing changes, and the masked samples' logits get no gradient.
  adv2 = jnp.where(masked, 1e4, b["advantages"])
  online2 = jnp.where(masked[..., None], 50.0, b["online"])
  target2 = jnp.where(masked[..., None], -50.0, b["target"])
  (loss2, _), (grad2, _) = _grad(online2, target2, b["actions"], adv2, mask,
                                 duals, **_EPS)
  np.testing.assert_allclose(loss2, loss, rtol=1e-6)
  np.testing.assert_array_equal(grad2[masked], 0.0)
  np.testing.assert_allclose(grad2, grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("num_valid", [1, 0])
def test_vmpo_one_or_no_valid_sample(num_valid):
  b = _random_batch(4, shape=(8,))
  mask = f32([1.0] * num_valid + [0.0] * (8 - num_valid))
  (loss, extras), grads = _grad(b["online"], b["target"], b["actions"],
                                b["advantages"], mask,
                                vmpo.init_duals(1.0, 5.0), **_EPS)
  assert np.isfinite(loss)
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  if num_valid:
    # The one valid sample is selected: psi = [1], ESS = 1.
    np.testing.assert_allclose(extras["selected_fraction"], 1.0)
    np.testing.assert_allclose(extras["ess"], 1.0, rtol=1e-6)
    log_pi = jax.nn.log_softmax(b["online"][0])[b["actions"][0]]
    np.testing.assert_allclose(extras["policy_loss"], -log_pi, rtol=1e-5)
  else:
    # Nothing to learn from: only the alpha term (kl = 0) is left.
    np.testing.assert_allclose(extras["selected_fraction"], 0.0)
    np.testing.assert_allclose(extras["temperature_loss"], 0.0)
    np.testing.assert_allclose(extras["ess"], 0.0)
    np.testing.assert_allclose(loss, extras["alpha"] * 0.01, rtol=1e-6)


def test_vmpo_gradient_routing():
  b = _random_batch(5)
  mask = jnp.ones(b["actions"].shape)
  duals = vmpo.init_duals(0.8, 3.0)

  def terms(online, target, advantages, duals):
    loss, extras = vmpo.vmpo_loss(online, target, b["actions"], advantages,
                                  mask, duals, **_EPS)
    names = ("policy_loss", "kl_loss", "temperature_loss", "alpha_loss")
    return dict(loss=loss, **{name: extras[name] for name in names})

  # One reverse-mode Jacobian of all terms: a single compilation.
  jacobian = jax.jit(jax.jacrev(terms, argnums=(0, 1, 2, 3)))(
      b["online"], b["target"], b["advantages"], duals)
  # Which of (online, target, advantages, eta, alpha) each term may reach.
  reaches = dict(policy_loss={"online"}, kl_loss={"online"},
                 temperature_loss={"eta"}, alpha_loss={"alpha"},
                 loss={"online", "eta", "alpha"})
  for name, allowed in reaches.items():
    g_online, g_target, g_adv, g_duals = jacobian[name]
    found = dict(online=g_online, target=g_target, advantages=g_adv,
                 eta=g_duals.eta, alpha=g_duals.alpha)
    for arg, g in found.items():
      if arg in allowed:
        assert np.abs(g).max() > 1e-5, (name, arg)
      else:
        np.testing.assert_array_equal(g, 0.0, err_msg=f"{name} -> {arg}")

  # Closed forms of the dual gradients (chain rule through the softplus):
  # d temp / d eta = eps + log mean_sel exp(A/eta) - sum psi A / eta;
  # d alpha_loss / d alpha = eps_alpha - KL.
  _, extras = loss_fn(b["online"], b["target"], b["actions"],
                      b["advantages"], mask, duals)
  eta = float(extras["eta"])
  adv = np.sort(np.asarray(b["advantages"], np.float64).reshape(-1))[-12:]
  psi = np.exp(adv / eta - (adv / eta).max())
  psi /= psi.sum()
  d_eta = (0.1 + np.log(np.mean(np.exp(adv / eta))) - np.sum(psi * adv) / eta)
  g_eta = jacobian["temperature_loss"][3].eta
  np.testing.assert_allclose(g_eta, d_eta * jax.nn.sigmoid(duals.eta),
                             rtol=1e-4)
  g_alpha = jacobian["alpha_loss"][3].alpha
  np.testing.assert_allclose(
      g_alpha, (0.01 - float(extras["kl"])) * jax.nn.sigmoid(duals.alpha),
      rtol=1e-4)


def test_vmpo_rejects_bad_inputs():
  duals = vmpo.init_duals(1.0, 5.0)
  with pytest.raises(AssertionError):  # actions must be int32
    vmpo.vmpo_loss(_ONLINE, _TARGET, _ACTIONS.astype(jnp.float32), _ADV,
                   jnp.ones(4), duals, **_EPS)
  with pytest.raises(AssertionError):  # advantages shape != actions shape
    vmpo.vmpo_loss(_ONLINE, _TARGET, _ACTIONS, _ADV[:3], jnp.ones(4), duals,
                   **_EPS)
  with pytest.raises(ValueError, match="top_k_fraction"):
    vmpo.vmpo_loss(_ONLINE, _TARGET, _ACTIONS, _ADV, jnp.ones(4), duals,
                   **{**_EPS, "top_k_fraction": 1.5})


# ------------------------------------------------------------------ duals ---


def _optimal_eta(advantages, epsilon_eta):
  """argmin_eta eta*eps + eta*log(mean exp(A/eta)), by a 1-D numeric search.

  The dual is convex in eta (a perspective of log-mean-exp): a log-spaced grid
  brackets the minimum, a golden-section search refines it.
  """
  a = np.asarray(advantages, np.float64)

  def dual(eta):
    z = a / eta
    return eta * epsilon_eta + eta * (z.max() + np.log(np.mean(
        np.exp(z - z.max()))))

  grid = np.exp(np.linspace(np.log(1e-3), np.log(1e2), 2001))
  i = int(np.argmin([dual(e) for e in grid]))
  lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
  ratio = (math.sqrt(5) - 1) / 2
  for _ in range(100):
    m1, m2 = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    if dual(m1) < dual(m2):
      hi = m2
    else:
      lo = m1
  return (lo + hi) / 2


def _run_dual_adam(online, target, actions, advantages, mask, duals, steps):
  """Adam(1e-2) on the duals only, minimising the whole V-MPO loss.

  Only the temperature loss reaches eta and only the alpha loss reaches alpha
  (test_vmpo_gradient_routing), so this minimises each dual's own term.
  """
  opt = optax.adam(1e-2)

  def step(carry, _):
    duals, opt_state = carry
    grads = jax.grad(lambda d: vmpo.vmpo_loss(
        online, target, actions, advantages, mask, d, **_EPS)[0])(duals)
    updates, opt_state = opt.update(grads, opt_state)
    duals = optax.apply_updates(duals, updates)
    return (duals, opt_state), vmpo.duals_values(duals)

  _, (etas, alphas) = jax.lax.scan(step, (duals, opt.init(duals)), None,
                                   length=steps)
  return etas, alphas


_run_dual_adam = jax.jit(_run_dual_adam, static_argnames="steps")


def test_duals_adam_moves_eta_to_the_dual_optimum():
  rng = np.random.default_rng(6)
  advantages = f32(0.3 * rng.normal(size=(4, 16)))
  mask = f32(rng.random((4, 16)) > 0.2)
  # The E-step keeps the top half of the valid advantages.
  valid = np.asarray(advantages)[np.asarray(mask) > 0]
  kept = np.sort(valid)[-vmpo.top_k_count(valid.size, 0.5):]
  eta_star = _optimal_eta(kept, 0.1)
  assert 0.05 < eta_star < 0.5, eta_star  # far from the initial eta = 1
  logits = f32(rng.normal(size=(4, 16, 3)))
  actions = jnp.asarray(rng.integers(0, 3, size=(4, 16)), jnp.int32)
  etas, _ = _run_dual_adam(logits, logits, actions, advantages, mask,
                           vmpo.init_duals(1.0, 5.0), steps=400)
  # |eta - eta*| shrinks by >= 5x from eta = 1.
  assert abs(etas[-1] - eta_star) <= abs(1.0 - eta_star) / 5, (
      etas[-1], eta_star)
  # At the optimum the E-step is no longer near-uniform: the temperature
  # constraint KL(psi || uniform over selected) ~ eps_eta binds.
  psi = np.exp(kept / etas[-1] - (kept / etas[-1]).max())
  psi /= psi.sum()
  kl_uniform = np.sum(psi * np.log(psi * kept.size))
  np.testing.assert_allclose(kl_uniform, 0.1, rtol=0.2)


@pytest.mark.parametrize("kl_above_bound", [True, False])
def test_duals_adam_moves_alpha_with_the_kl(kl_above_bound):
  b = _random_batch(7)
  mask = jnp.ones(b["actions"].shape)
  # Random logits are far apart (KL ~ 1 >> eps_alpha = 0.01); a target a tiny
  # step from the online policy keeps the KL far below it.
  target = b["target"] if kl_above_bound else b["online"] + 1e-2 * b["target"]
  kl = float(common.masked_mean(common.categorical_kl(target, b["online"]),
                                mask))
  assert (kl > 0.01) == kl_above_bound, kl
  _, alphas = _run_dual_adam(b["online"], target, b["actions"],
                             b["advantages"], mask, vmpo.init_duals(1.0, 5.0),
                             steps=100)
  moves = np.diff(np.concatenate([[5.0], alphas]))
  if kl_above_bound:
    assert np.all(moves > 0) and alphas[-1] > 5.5
  else:
    assert np.all(moves < 0) and alphas[-1] < 4.5


# ------------------------------------------------ advantages and targets ---

_AC_HYPER = dict(lambda_=1.0, clip_rho_threshold=1.0)
_targets = jax.jit(vmpo.value_targets_and_advantages,
                   static_argnames=("value_target", "lambda_",
                                    "clip_rho_threshold"))


def _hand_inputs(mask=(1.0, 1.0, 1.0)):
  """One row, T = 3, 4 actions; the V-trace hand case of test_losses_vtrace.

  values v0..v3 = [1, 2, 0.5, 1.5], r = [1, 0, 2], discount 0.9. The learner
  is uniform (pi(a) = 1/4); the behaviour gave the taken actions [0, 1, 2]
  probabilities [1/2, 1/8, 1/4], so rho = [0.5, 2, 1].
  """
  behaviour = np.log(np.array([[0.5, 1 / 6, 1 / 6, 1 / 6],
                               [0.125, 0.125, 0.375, 0.375],
                               [0.25, 0.25, 0.25, 0.25]]))
  return common.ActorCriticInputs(
      learner_logits=jnp.zeros((1, 3, 4), jnp.float32),
      behaviour_logits=f32(behaviour[None]),
      actions=jnp.asarray([[0, 1, 2]], jnp.int32),
      values=f32([[1.0, 2.0, 0.5, 1.5]]),
      rewards=f32([[1.0, 0.0, 2.0]]),
      discounts=f32([[0.9, 0.9, 0.9]]),
      mask=f32([mask]))


def test_vtrace_advantages_hand_values():
  # V-trace targets (lambda 1, rho_bar 1): vs = [2.35675, 3.015, 3.35]
  # (worked out in test_losses_vtrace). Advantages without the rho factor:
  # A0 = 1 + 0.9*3.015 - 1 = 2.7135; A1 = 0 + 0.9*3.35 - 2 = 1.015;
  # A2 = 2 + 0.9*1.5 - 0.5 = 2.85 (vs_3 = v3).
  # The old form vs0 - v0 = 1.35675 was scaled by min(1, rho0) = 0.5.
  targets, advantages = _targets(_hand_inputs(), value_target="vtrace",
                                 **_AC_HYPER)
  np.testing.assert_allclose(targets, [[2.35675, 3.015, 3.35]], rtol=1e-6)
  np.testing.assert_allclose(advantages, [[2.7135, 1.015, 2.85]], rtol=1e-6)


def test_vtrace_advantages_hand_values_masked_step():
  # Step 1 masked: vs1 = v1 = 2 (trace cut), A1 = 0.
  # vs0 = 1 + 0.5*(1 + 0.9*2 - 1) = 1.9; A0 = 1 + 0.9*2 - 1 = 1.8.
  targets, advantages = _targets(_hand_inputs(mask=(1.0, 0.0, 1.0)),
                                 value_target="vtrace", **_AC_HYPER)
  np.testing.assert_allclose(targets, [[1.9, 2.0, 3.35]], rtol=1e-6)
  np.testing.assert_allclose(advantages, [[1.8, 0.0, 2.85]], rtol=1e-6)


def test_nstep_advantages_hand_values():
  # lambda 1: G2 = 2 + 0.9*1.5 = 3.35; G1 = 0 + 0.9*3.35 = 3.015;
  # G0 = 1 + 0.9*3.015 = 3.7135. A = G - v = [2.7135, 1.015, 2.85].
  # lambda 0.5: G1 = 0.9*(0.5*0.5 + 0.5*3.35) = 1.7325;
  # G0 = 1 + 0.9*(0.5*2 + 0.5*1.7325) = 2.679625.
  targets, advantages = _targets(_hand_inputs(), value_target="nstep",
                                 **_AC_HYPER)
  np.testing.assert_allclose(targets, [[3.7135, 3.015, 3.35]], rtol=1e-6)
  np.testing.assert_allclose(advantages, [[2.7135, 1.015, 2.85]], rtol=1e-6)
  targets, advantages = _targets(_hand_inputs(), value_target="nstep",
                                 lambda_=0.5, clip_rho_threshold=1.0)
  np.testing.assert_allclose(targets, [[2.679625, 1.7325, 3.35]], rtol=1e-6)
  np.testing.assert_allclose(advantages, [[1.679625, -0.2675, 2.85]],
                             rtol=1e-6)


def _np_vtrace(values, rewards, discounts, rho, mask, lambda_, clip_rho):
  """Plain-loop V-trace targets and rho-free advantages for one row."""
  t_len = len(rewards)
  vs = np.zeros(t_len)
  acc_next = 0.0  # vs_{t+1} - v_{t+1}; 0 past the end and at masked steps
  for t in reversed(range(t_len)):
    if not mask[t]:
      vs[t], acc_next = values[t], 0.0
      continue
    delta = min(clip_rho, rho[t]) * (
        rewards[t] + discounts[t] * values[t + 1] - values[t])
    acc_next = delta + discounts[t] * lambda_ * min(1.0, rho[t]) * acc_next
    vs[t] = values[t] + acc_next
  advantages = np.zeros(t_len)
  for t in range(t_len):
    if mask[t]:
      vs_next = vs[t + 1] if t + 1 < t_len else values[t_len]
      advantages[t] = rewards[t] + discounts[t] * vs_next - values[t]
  return vs, advantages


def _np_lambda_returns(values, rewards, discounts, mask, lambda_):
  """Plain-loop lambda-returns and advantages G - V for one row."""
  t_len = len(rewards)
  returns = np.zeros(t_len)
  for t in reversed(range(t_len)):
    if not mask[t]:
      continue  # return 0, never a target
    if t + 1 == t_len:
      following = values[t_len]
    elif not mask[t + 1]:
      following = values[t + 1]  # V(LAST): the trace stops there
    else:
      following = (1 - lambda_) * values[t + 1] + lambda_ * returns[t + 1]
    returns[t] = rewards[t] + discounts[t] * following
  return returns, np.where(mask, returns - values[:t_len], 0.0)


def _episode_batch(seed):
  """B = 2, T = 8, gamma = 0.9, with episode boundaries inside the unroll.

  Row 0: step 3 is a terminal LAST (discount[2] = 0) and its action is
  masked; a new episode starts at step 4. Row 1: step 5 is a time-limit LAST
  (discount[4] = gamma) and its action is masked. Masked steps hold garbage
  rewards and discounts (the learner zeroes them; the loss must not need it).
  """
  rng = np.random.default_rng(seed)
  b, t, a = 2, 8, 3
  mask = np.ones((b, t))
  mask[0, 3] = mask[1, 5] = 0.0
  discounts = np.full((b, t), 0.9)
  discounts[0, 2] = 0.0
  rewards = rng.normal(size=(b, t))
  rewards[~mask.astype(bool)] = 123.0
  discounts[~mask.astype(bool)] = 7.0
  return common.ActorCriticInputs(
      learner_logits=f32(rng.normal(size=(b, t, a))),
      behaviour_logits=f32(rng.normal(size=(b, t, a))),
      actions=jnp.asarray(rng.integers(0, a, size=(b, t)), jnp.int32),
      values=f32(rng.normal(size=(b, t + 1))),
      rewards=f32(rewards), discounts=f32(discounts), mask=f32(mask))


@pytest.mark.parametrize("lambda_,clip_rho", [(1.0, 1.0), (0.8, 1.5)])
def test_vtrace_targets_match_numpy_loop(lambda_, clip_rho):
  inputs = _episode_batch(8)
  targets, advantages = _targets(inputs, value_target="vtrace",
                                 lambda_=lambda_, clip_rho_threshold=clip_rho)
  log_softmax = lambda x: x - np.log(np.exp(x).sum(-1, keepdims=True))
  np_in = jax.tree.map(lambda x: np.asarray(x, np.float64), inputs)
  taken = lambda logits: np.take_along_axis(
      log_softmax(logits), np.asarray(inputs.actions)[..., None], -1)[..., 0]
  rho = np.exp(taken(np_in.learner_logits) - taken(np_in.behaviour_logits))
  assert rho.max() > clip_rho and rho.min() < 1.0  # both clips matter
  for row in range(2):
    vs, adv = _np_vtrace(np_in.values[row], np_in.rewards[row],
                         np_in.discounts[row], rho[row], np_in.mask[row],
                         lambda_, clip_rho)
    valid = np_in.mask[row] > 0
    np.testing.assert_allclose(np.asarray(targets[row])[valid], vs[valid],
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(advantages[row], adv, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("lambda_", [1.0, 0.7])
def test_nstep_targets_match_numpy_loop(lambda_):
  inputs = _episode_batch(9)
  targets, advantages = _targets(inputs, value_target="nstep",
                                 lambda_=lambda_, clip_rho_threshold=1.0)
  np_in = jax.tree.map(lambda x: np.asarray(x, np.float64), inputs)
  for row in range(2):
    returns, adv = _np_lambda_returns(np_in.values[row], np_in.rewards[row],
                                      np_in.discounts[row], np_in.mask[row],
                                      lambda_)
    valid = np_in.mask[row] > 0
    np.testing.assert_allclose(np.asarray(targets[row])[valid],
                               returns[valid], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(advantages[row], adv, rtol=1e-5, atol=1e-5)


# -------------------------------------------------------- actor_critic_loss --

_AC_LOSS_ARGS = dict(_EPS, value_cost=0.5, value_target="vtrace",
                     **_AC_HYPER)
_ac_loss = jax.jit(vmpo.actor_critic_loss,
                   static_argnames=tuple(_AC_LOSS_ARGS))


def test_actor_critic_loss_hand_values():
  """The hand row with a uniform target: KL = 0, rho from the behaviour."""
  inputs = _hand_inputs()
  loss, metrics = _ac_loss(inputs, target_logits=inputs.learner_logits,
                           duals=vmpo.init_duals(1.0, 5.0), **_AC_LOSS_ARGS)
  # A = [2.7135, 1.015, 2.85]; k = floor(1.5) = 1 -> sample 2 only, psi = [1].
  # policy = -log(1/4); temperature = 0.1 + log(exp(2.85)) = 2.95.
  # value = 0.5 * mean(0.5 * (vs - v)^2), vs - v = [1.35675, 1.015, 2.85].
  # alpha_loss = 5 * 0.01 (KL = 0). rho_mean = (0.5 + 2 + 1) / 3.
  value = 0.5 * np.mean(0.5 * np.square([1.35675, 1.015, 2.85]))
  np.testing.assert_allclose(metrics["policy_loss"], math.log(4.0), rtol=1e-6)
  np.testing.assert_allclose(metrics["temperature_loss"], 2.95, rtol=1e-6)
  np.testing.assert_allclose(metrics["value_loss"], value, rtol=1e-6)
  np.testing.assert_allclose(metrics["kl"], 0.0, atol=1e-7)
  np.testing.assert_allclose(metrics["advantage_mean"],
                             (2.7135 + 1.015 + 2.85) / 3, rtol=1e-6)
  np.testing.assert_allclose(metrics["rho_mean"], 3.5 / 3, rtol=1e-6)
  np.testing.assert_allclose(metrics["selected_fraction"], 1 / 3, rtol=1e-6)
  np.testing.assert_allclose(metrics["ess"], 1.0, rtol=1e-6)
  np.testing.assert_allclose(
      loss, math.log(4.0) + 2.95 + 0.05 + value, rtol=1e-6)
  assert {"eta", "alpha", "kl_loss", "alpha_loss",
          "ess_fraction"} <= set(metrics)


def test_actor_critic_loss_masked_steps_never_selected():
  """The masked steps of the episode batch hold huge garbage advantages."""
  inputs = _episode_batch(10)
  _, advantages = _targets(inputs, value_target="vtrace", **_AC_HYPER)
  assert np.all(np.asarray(advantages)[np.asarray(inputs.mask) == 0] == 0.0)
  _, metrics = _ac_loss(inputs, target_logits=inputs.learner_logits,
                        duals=vmpo.init_duals(1.0, 5.0), **_AC_LOSS_ARGS)
  # 14 valid steps -> k = 7.
  np.testing.assert_allclose(metrics["selected_fraction"], 7 / 14, rtol=1e-6)
  # The E-step on the valid advantages alone, by hand.
  valid_adv = np.sort(np.asarray(advantages)[np.asarray(inputs.mask) > 0])
  kept = valid_adv[-7:]
  np.testing.assert_allclose(
      metrics["temperature_loss"],
      0.1 + np.log(np.mean(np.exp(kept.astype(np.float64)))), rtol=1e-5)


@pytest.mark.parametrize("value_target", ["vtrace", "nstep"])
def test_actor_critic_loss_gradient_routing(value_target):
  inputs = _episode_batch(11)
  target_logits = f32(np.random.default_rng(12).normal(
      size=inputs.learner_logits.shape))
  args = dict(_AC_LOSS_ARGS, value_target=value_target)

  def terms(learner_logits, behaviour_logits, values, target_logits, duals):
    loss, metrics = vmpo.actor_critic_loss(
        inputs._replace(learner_logits=learner_logits,
                        behaviour_logits=behaviour_logits, values=values),
        target_logits=target_logits, duals=duals, **args)
    names = ("policy_loss", "kl_loss", "temperature_loss", "alpha_loss",
             "value_loss")
    return dict(loss=loss, **{name: metrics[name] for name in names})

  jacobian = jax.jit(jax.jacrev(terms, argnums=(0, 1, 2, 3, 4)))(
      inputs.learner_logits, inputs.behaviour_logits, inputs.values,
      target_logits, vmpo.init_duals(1.0, 5.0))
  reaches = dict(policy_loss={"learner"}, kl_loss={"learner"},
                 temperature_loss={"eta"}, alpha_loss={"alpha"},
                 value_loss={"values"},
                 loss={"learner", "values", "eta", "alpha"})
  for name, allowed in reaches.items():
    g_learner, g_behaviour, g_values, g_target, g_duals = jacobian[name]
    found = dict(learner=g_learner, behaviour=g_behaviour, values=g_values,
                 target=g_target, eta=g_duals.eta, alpha=g_duals.alpha)
    for arg, g in found.items():
      if arg in allowed:
        assert np.abs(g).max() > 1e-5, (name, arg)
      else:
        np.testing.assert_array_equal(g, 0.0, err_msg=f"{name} -> {arg}")
  # The value loss is a semi-gradient toward fixed targets:
  # d/dV_t 0.5*mean(0.5*(target - V)^2) = 0.5*(V_t - target_t)/#valid on valid
  # steps, 0 at masked steps and at the bootstrap value.
  targets, _ = _targets(inputs, value_target=value_target, **_AC_HYPER)
  mask = np.asarray(inputs.mask)
  expected = 0.5 * (np.asarray(inputs.values[:, :-1]) - targets) * mask
  expected = np.concatenate([expected / mask.sum(), np.zeros((2, 1))], 1)
  np.testing.assert_allclose(jacobian["value_loss"][2], expected, rtol=1e-4,
                             atol=1e-7)


def test_actor_critic_loss_rejects_bad_inputs():
  inputs = _hand_inputs()
  args = dict(duals=vmpo.init_duals(1.0, 5.0), **_AC_LOSS_ARGS)
  with pytest.raises(ValueError, match="value_target"):
    vmpo.actor_critic_loss(inputs, target_logits=inputs.learner_logits,
                           **{**args, "value_target": "td"})
  with pytest.raises(ValueError, match="target_logits"):
    vmpo.actor_critic_loss(inputs, target_logits=inputs.learner_logits[0],
                           **args)
  with pytest.raises(ValueError, match="inputs.rewards"):
    vmpo.actor_critic_loss(inputs._replace(rewards=inputs.rewards[:, :2]),
                           target_logits=inputs.learner_logits, **args)
