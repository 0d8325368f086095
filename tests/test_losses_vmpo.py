"""Tests for ald_jax.losses.vmpo: hand-computed values, rlax oracle, masking and
gradient routing.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import rlax

from ald_jax.config import VMPOConfig
from ald_jax.losses import vmpo

f32 = lambda x: jnp.asarray(x, jnp.float32)

# rlax only serves as an oracle here; its deprecation notice is noise.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Rlax categorical_kl_divergence:PendingDeprecationWarning")
E = math.e

_loss = jax.jit(vmpo.vmpo_loss, static_argnames="config")


def loss_fn(online, target, actions, advantages, mask, duals, config):
  return _loss(online, target, actions, advantages, mask, duals, config=config)


# 4 samples, 2 actions. Online pi = [0.75, 0.25] everywhere, target uniform.
# actions [0, 1, 1, 0]; advantages [1, -1, 2, 0].
_ONLINE = f32([[math.log(3.0), 0.0]] * 4)
_TARGET = f32([[0.0, 0.0]] * 4)
_ACTIONS = jnp.asarray([0, 1, 1, 0], jnp.int32)
_ADV = f32([1.0, -1.0, 2.0, 0.0])
# KL(uniform || [0.75, 0.25]) = 0.5 ln(0.5/0.75) + 0.5 ln(0.5/0.25)
#                             = 0.5 ln(4/3) per sample.
_KL = 0.5 * math.log(4.0 / 3.0)


def _hand_case(config, mask=(1.0, 1.0, 1.0, 1.0), adv=_ADV):
  # The loss only reads top_k_fraction and the epsilons from the config, so
  # the hand cases share one (static, hence one compilation); init_eta and
  # init_alpha enter through the duals.
  loss_config = VMPOConfig(top_k_fraction=config.top_k_fraction,
                           epsilon_eta=config.epsilon_eta,
                           epsilon_alpha=config.epsilon_alpha)
  return loss_fn(_ONLINE, _TARGET, _ACTIONS, adv, f32(mask),
                 vmpo.init_duals(config), loss_config)


def test_duals_init_and_positivity():
  config = VMPOConfig(init_eta=0.3, init_alpha=7.0)
  eta, alpha = vmpo.duals_values(vmpo.init_duals(config))
  np.testing.assert_allclose([eta, alpha], [0.3, 7.0], rtol=1e-6)
  eta, alpha = vmpo.duals_values(vmpo.VMPODuals(f32(-200.0), f32(-1e4)))
  assert eta > 0 and alpha > 0


def test_top_k_count():
  assert vmpo.top_k_count(24, 0.5) == 12
  assert vmpo.top_k_count(24, 0.3) == 7    # floor(7.2), as rlax
  assert vmpo.top_k_count(100, 0.29) == 29  # 0.29*100 = 28.999999999999996
  assert vmpo.top_k_count(4, 0.1) == 1     # never 0
  assert vmpo.top_k_count(5, 1.0) == 5


def test_vmpo_hand_values_eta_one():
  config = VMPOConfig(top_k_fraction=0.5, epsilon_eta=0.1, epsilon_alpha=0.01,
                      init_eta=1.0, init_alpha=5.0)
  loss, extras = _hand_case(config)
  # k = 2: samples 2 (A=2) and 0 (A=1) are selected.
  # psi = softmax([1, 2]) = [1/(1+e), e/(1+e)].
  # policy = -(ln 0.75 / (1+e) + e ln 0.25 / (1+e)).
  policy = -(math.log(0.75) + E * math.log(0.25)) / (1 + E)
  # temperature = 1*0.1 + 1*log((e^1 + e^2)/2).
  temperature = 0.1 + math.log((E + E ** 2) / 2)
  kl_loss = 5.0 * _KL
  alpha_loss = 5.0 * (0.01 - _KL)
  np.testing.assert_allclose(extras["policy_loss"], policy, rtol=1e-5)
  np.testing.assert_allclose(extras["temperature_loss"], temperature,
                             rtol=1e-5)
  np.testing.assert_allclose(extras["kl"], _KL, rtol=1e-5)
  np.testing.assert_allclose(extras["kl_loss"], kl_loss, rtol=1e-5)
  np.testing.assert_allclose(extras["alpha_loss"], alpha_loss, rtol=1e-4)
  np.testing.assert_allclose(extras["eta"], 1.0, rtol=1e-6)
  np.testing.assert_allclose(extras["alpha"], 5.0, rtol=1e-6)
  np.testing.assert_allclose(extras["selected_fraction"], 0.5)
  np.testing.assert_allclose(
      loss, policy + temperature + kl_loss + alpha_loss, rtol=1e-5)


def test_vmpo_hand_values_eta_two():
  config = VMPOConfig(init_eta=2.0)
  _, extras = _hand_case(config)
  # psi = softmax([1/2, 2/2]); temperature = 2*0.1 + 2*log((e^0.5 + e)/2).
  w0, w2 = math.exp(0.5), E
  policy = -(w0 * math.log(0.75) + w2 * math.log(0.25)) / (w0 + w2)
  temperature = 0.2 + 2 * math.log((w0 + w2) / 2)
  np.testing.assert_allclose(extras["policy_loss"], policy, rtol=1e-5)
  np.testing.assert_allclose(extras["temperature_loss"], temperature,
                             rtol=1e-5)


def test_vmpo_hand_values_masked():
  config = VMPOConfig()
  # Sample 2 is masked and given a huge advantage: it must not be selected.
  # k = 2 (from 4 elements): valid advantages [1, -1, ., 0] -> samples 0, 3.
  # psi = [e/(e+1), 1/(e+1)], both actions 0 -> policy = -ln 0.75.
  # temperature = 0.1 + log((e + 1)/2). KL is the same at every sample.
  loss, extras = _hand_case(config, mask=(1.0, 1.0, 0.0, 1.0),
                            adv=_ADV.at[2].set(100.0))
  np.testing.assert_allclose(extras["policy_loss"], -math.log(0.75),
                             rtol=1e-5)
  np.testing.assert_allclose(extras["temperature_loss"],
                             0.1 + math.log((E + 1) / 2), rtol=1e-5)
  np.testing.assert_allclose(extras["kl"], _KL, rtol=1e-5)
  np.testing.assert_allclose(extras["selected_fraction"], 2 / 3, rtol=1e-6)
  assert np.isfinite(loss)


def test_vmpo_any_leading_shape():
  config = VMPOConfig()
  flat, flat_extras = _hand_case(config)
  shaped, shaped_extras = loss_fn(
      _ONLINE.reshape(2, 2, 2), _TARGET.reshape(2, 2, 2),
      _ACTIONS.reshape(2, 2), _ADV.reshape(2, 2), jnp.ones((2, 2)),
      vmpo.init_duals(config), config)
  np.testing.assert_allclose(shaped, flat, rtol=1e-6)
  for name in flat_extras:
    np.testing.assert_allclose(shaped_extras[name], flat_extras[name],
                               rtol=1e-6)


def _random_batch(seed, shape=(4, 6), num_actions=3):
  rng = np.random.default_rng(seed)
  return dict(
      online=f32(rng.normal(size=(*shape, num_actions))),
      target=f32(rng.normal(size=(*shape, num_actions))),
      actions=jnp.asarray(rng.integers(0, num_actions, size=shape), jnp.int32),
      advantages=f32(2.0 * rng.normal(size=shape)))


def _rlax_loss(online, target, actions, advantages, mask, duals, config):
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
      temperature_constraint=rlax.LagrangePenalty(eta, f32(
          config.epsilon_eta)),
      kl_constraints=[(kl, rlax.LagrangePenalty(alpha, f32(
          config.epsilon_alpha)))],
      restarting_weights=mask, top_k_fraction=config.top_k_fraction)
  parts = dict(policy_loss=jnp.mean(out.policy_loss),
               temperature_loss=out.temperature_loss,
               kl_loss=jnp.mean(out.kl_loss),
               alpha_loss=jnp.mean(out.alpha_loss))
  return jnp.mean(loss), parts


@pytest.mark.parametrize("top_k_fraction", [0.5, 0.3])
def test_vmpo_matches_rlax(top_k_fraction):
  config = VMPOConfig(top_k_fraction=top_k_fraction, init_eta=0.7,
                      init_alpha=2.0)
  b = _random_batch(0)
  mask = jnp.ones(b["actions"].shape)
  duals = vmpo.init_duals(config)

  def ours(online, duals):
    return vmpo.vmpo_loss(online, b["target"], b["actions"], b["advantages"],
                          mask, duals, config)

  def theirs(online, duals):
    return _rlax_loss(online, b["target"], b["actions"], b["advantages"],
                      mask, duals, config)

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

  (Only the E-step terms: rlax leaves masking the KL to the caller.)
  """
  config = VMPOConfig(top_k_fraction=0.5)
  b = _random_batch(1)
  mask = f32(np.random.default_rng(2).random(b["actions"].shape) > 0.3)
  duals = vmpo.init_duals(config)
  _, extras = loss_fn(b["online"], b["target"], b["actions"], b["advantages"],
                      mask, duals, config)
  _, ref_parts = jax.jit(_rlax_loss, static_argnums=6)(
      b["online"], b["target"], b["actions"], b["advantages"], mask, duals,
      config)
  for name in ("policy_loss", "temperature_loss"):
    np.testing.assert_allclose(extras[name], ref_parts[name], rtol=1e-5,
                               err_msg=name)


def test_vmpo_masked_samples_never_selected_and_inert():
  config = VMPOConfig(top_k_fraction=0.5)
  b = _random_batch(3, shape=(2, 4))
  mask = f32([[1, 0, 1, 1], [0, 1, 1, 0]])
  masked = mask == 0
  duals = vmpo.init_duals(config)
  grad_fn = jax.jit(jax.value_and_grad(vmpo.vmpo_loss, has_aux=True),
                    static_argnames="config")
  (loss, _), grad = grad_fn(b["online"], b["target"], b["actions"],
                            b["advantages"], mask, duals, config=config)
  # Huge advantages, different logits and targets at the masked samples:
  # nothing changes, and the masked samples' logits get no gradient.
  adv2 = jnp.where(masked, 1e4, b["advantages"])
  online2 = jnp.where(masked[..., None], 50.0, b["online"])
  target2 = jnp.where(masked[..., None], -50.0, b["target"])
  (loss2, _), grad2 = grad_fn(online2, target2, b["actions"], adv2, mask,
                              duals, config=config)
  np.testing.assert_allclose(loss2, loss, rtol=1e-6)
  np.testing.assert_array_equal(grad2[masked], 0.0)
  np.testing.assert_allclose(grad2, grad, rtol=1e-5, atol=1e-7)
  # And the selection itself, directly.
  selected = vmpo.select_top_k(adv2.reshape(-1), mask.reshape(-1) > 0, 4)
  assert np.all(np.asarray(selected)[np.asarray(masked).reshape(-1)] == 0)
  assert float(selected.sum()) == 4.0


@pytest.mark.parametrize("num_valid", [2, 0])
def test_vmpo_fewer_valid_than_k(num_valid):
  config = VMPOConfig(top_k_fraction=0.5)  # k = 4 of 8
  b = _random_batch(4, shape=(8,))
  mask = f32([1.0] * num_valid + [0.0] * (8 - num_valid))
  duals = vmpo.init_duals(config)
  (loss, extras), grads = jax.jit(
      jax.value_and_grad(vmpo.vmpo_loss, argnums=(0, 5), has_aux=True),
      static_argnames="config")(b["online"], b["target"], b["actions"],
                                b["advantages"], mask, duals, config=config)
  assert np.isfinite(loss)
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  if num_valid:
    np.testing.assert_allclose(extras["selected_fraction"], 1.0)
    # Every valid sample selected: psi = softmax over both valid A / eta.
    a = np.asarray(b["advantages"][:2], np.float64)
    psi = np.exp(a - a.max()) / np.exp(a - a.max()).sum()
    log_pi = np.asarray(jax.nn.log_softmax(b["online"][:2]))[
        np.arange(2), np.asarray(b["actions"][:2])]
    np.testing.assert_allclose(extras["policy_loss"], -(psi * log_pi).sum(),
                               rtol=1e-5)
  else:
    # Nothing to learn from: only the alpha term (kl = 0) is left.
    np.testing.assert_allclose(extras["selected_fraction"], 0.0)
    np.testing.assert_allclose(extras["temperature_loss"], 0.0)
    np.testing.assert_allclose(loss, extras["alpha"] * config.epsilon_alpha,
                               rtol=1e-6)


def test_vmpo_gradient_routing():
  config = VMPOConfig(top_k_fraction=0.5, init_eta=0.8, init_alpha=3.0)
  b = _random_batch(5)
  mask = jnp.ones(b["actions"].shape)
  duals = vmpo.init_duals(config)

  def terms(online, target, advantages, duals):
    loss, extras = vmpo.vmpo_loss(online, target, b["actions"], advantages,
                                  mask, duals, config)
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
                      b["advantages"], mask, duals, config)
  eta = float(extras["eta"])
  adv = np.sort(np.asarray(b["advantages"], np.float64).reshape(-1))[-12:]
  psi = np.exp(adv / eta - (adv / eta).max())
  psi /= psi.sum()
  d_eta = (config.epsilon_eta + np.log(np.mean(np.exp(adv / eta)))
           - np.sum(psi * adv) / eta)
  g_eta = jacobian["temperature_loss"][3].eta
  np.testing.assert_allclose(g_eta, d_eta * jax.nn.sigmoid(duals.eta),
                             rtol=1e-4)
  g_alpha = jacobian["alpha_loss"][3].alpha
  np.testing.assert_allclose(
      g_alpha, (config.epsilon_alpha - float(extras["kl"]))
      * jax.nn.sigmoid(duals.alpha), rtol=1e-4)


def test_vmpo_rejects_bad_inputs():
  config = VMPOConfig()
  duals = vmpo.init_duals(config)
  with pytest.raises(AssertionError):  # actions must be int32
    vmpo.vmpo_loss(_ONLINE, _TARGET, _ACTIONS.astype(jnp.float32), _ADV,
                   jnp.ones(4), duals, config)
  with pytest.raises(AssertionError):  # advantages shape != actions shape
    vmpo.vmpo_loss(_ONLINE, _TARGET, _ACTIONS, _ADV[:3], jnp.ones(4), duals,
                   config)
