"""Tests for ald_jax.losses.distill and the KL/entropy helpers in common."""
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import rlax

from ald_jax.losses import common
from ald_jax.losses import distill

f32 = lambda x: jnp.asarray(x, jnp.float32)

# rlax only serves as an oracle here; its deprecation notice is noise.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Rlax categorical_kl_divergence:PendingDeprecationWarning")

policy_distillation = jax.jit(distill.policy_distillation)
value_distillation = jax.jit(distill.value_distillation)


def _random_logits(seed, shape=(6, 5), scale=2.0):
  return f32(np.random.default_rng(seed).normal(size=shape) * scale)


# ------------------------------------------------------------ KL, entropy --


def test_categorical_kl_and_entropy_hand_values():
  p = f32([[math.log(3.0), 0.0], [0.0, 0.0]])
  q = f32([[0.0, 0.0], [math.log(3.0), 0.0]])
  # KL([.75, .25] || [.5, .5]) = .75 ln 1.5 + .25 ln .5;
  # KL([.5, .5] || [.75, .25]) = .5 ln(2/3) + .5 ln 2 = .5 ln(4/3).
  np.testing.assert_allclose(
      common.categorical_kl(p, q),
      [0.75 * math.log(1.5) + 0.25 * math.log(0.5), 0.5 * math.log(4 / 3)],
      rtol=1e-6)
  # H([.75, .25]) = -(.75 ln .75 + .25 ln .25); H(uniform over 2) = ln 2.
  np.testing.assert_allclose(
      common.entropy(p),
      [-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)), math.log(2.0)],
      rtol=1e-6)


def test_categorical_kl_value_and_gradients_match_rlax():
  """The closed-form JVP agrees with autodiff of an independent KL."""
  p, q = _random_logits(0), _random_logits(1)
  ours = lambda a, b: jnp.sum(common.categorical_kl(a, b) * jnp.arange(6.0))
  ref = lambda a, b: jnp.sum(rlax.categorical_kl_divergence(a, b)
                             * jnp.arange(6.0))
  np.testing.assert_allclose(common.categorical_kl(p, q),
                             rlax.categorical_kl_divergence(p, q), rtol=1e-5,
                             atol=1e-6)
  grads = jax.jit(jax.grad(ours, argnums=(0, 1)))(p, q)
  ref_grads = jax.jit(jax.grad(ref, argnums=(0, 1)))(p, q)
  for g, ref_g in zip(grads, ref_grads):
    np.testing.assert_allclose(g, ref_g, rtol=1e-4, atol=1e-6)
  # Forward-mode too (jvp is what we defined; grad goes through its transpose).
  tangent = _random_logits(2)
  _, jvp_ours = jax.jvp(lambda a: common.categorical_kl(a, q), (p,), (tangent,))
  _, jvp_ref = jax.jvp(lambda a: rlax.categorical_kl_divergence(a, q), (p,),
                       (tangent,))
  np.testing.assert_allclose(jvp_ours, jvp_ref, rtol=1e-4, atol=1e-6)


def test_categorical_kl_stable_for_large_logits():
  p = f32([[1000.0, 0.0, -1000.0]])
  q = f32([[0.0, 1000.0, 0.0]])
  kl = common.categorical_kl(p, q)
  # p is one-hot on action 0, q puts e^-1000 there: KL = 1000.
  np.testing.assert_allclose(kl, [1000.0], rtol=1e-5)
  grads = jax.grad(lambda a, b: common.categorical_kl(a, b).sum(),
                   argnums=(0, 1))(p, q)
  assert all(np.all(np.isfinite(g)) for g in grads)
  assert np.isfinite(common.entropy(p)).all()


# ------------------------------------------------------------ distillation --


def test_policy_distillation_hand_values():
  teacher = f32([[math.log(3.0), 0.0], [0.0, 0.0]])
  student = f32([[0.0, 0.0], [math.log(3.0), 0.0]])
  np.testing.assert_allclose(
      policy_distillation(teacher, student),
      [0.75 * math.log(1.5) + 0.25 * math.log(0.5), 0.5 * math.log(4 / 3)],
      rtol=1e-6)


def test_value_distillation_hand_values():
  # 0.5*(1 - 0.5)^2 = 0.125; 0.5*(-2 - 1)^2 = 4.5.
  np.testing.assert_allclose(
      value_distillation(f32([1.0, -2.0]), f32([0.5, 1.0])), [0.125, 4.5])


def test_distillation_exactly_zero_when_teacher_equals_student():
  logits = _random_logits(3, scale=4.0)
  values = f32(np.random.default_rng(4).normal(size=6))
  np.testing.assert_array_equal(policy_distillation(logits, logits), 0.0)
  np.testing.assert_array_equal(value_distillation(values, values), 0.0)
  # Teacher and student are both runtime arguments, as in the learner. (A
  # teacher closed over as a jit constant is constant-folded by a different
  # code path, whose log_softmax may differ from the runtime one by an ulp.)
  grad_pi = jax.jit(jax.grad(
      lambda t, s: distill.policy_distillation(t, s).sum(), argnums=1))(
          logits, logits)
  grad_v = jax.jit(jax.grad(
      lambda t, s: distill.value_distillation(t, s).sum(), argnums=1))(
          values, values)
  np.testing.assert_array_equal(grad_pi, 0.0)
  np.testing.assert_array_equal(grad_v, 0.0)
  # Eagerly too.
  grad_pi = jax.grad(
      lambda s: distill.policy_distillation(logits, s).sum())(logits)
  np.testing.assert_array_equal(grad_pi, 0.0)


def test_no_gradient_reaches_the_teacher():
  teacher, student = _random_logits(5), _random_logits(6)
  v_teacher = f32(np.random.default_rng(7).normal(size=6))
  v_student = f32(np.random.default_rng(8).normal(size=6))
  g_teacher, g_student = jax.jit(jax.grad(
      lambda t, s: distill.policy_distillation(t, s).sum(), argnums=(0, 1)))(
          teacher, student)
  np.testing.assert_array_equal(g_teacher, 0.0)
  assert np.abs(g_student).max() > 1e-3
  gv_teacher, gv_student = jax.jit(jax.grad(
      lambda t, s: distill.value_distillation(t, s).sum(), argnums=(0, 1)))(
          v_teacher, v_student)
  np.testing.assert_array_equal(gv_teacher, 0.0)
  # d/dV_s 0.5*(V_t - V_s)^2 = V_s - V_t.
  np.testing.assert_allclose(gv_student, v_student - v_teacher, rtol=1e-6)


def test_policy_distillation_gradient_is_analytic():
  teacher, student = _random_logits(9), _random_logits(10)
  grad = jax.jit(jax.grad(
      lambda s: distill.policy_distillation(teacher, s).sum()))(student)
  np.testing.assert_allclose(
      grad, jax.nn.softmax(student) - jax.nn.softmax(teacher), rtol=1e-5,
      atol=1e-7)


def test_learner_pull_is_roles_swapped_hand_values():
  """beta * KL(sg[pi_A] || pi_L): teacher = actor, student = learner.

  Actor pi_A = [0.75, 0.25], learner pi_L = [0.5, 0.5] at step 0, swapped at
  step 1 (pi_A uniform, pi_L = [0.75, 0.25]).
  """
  actor = f32([[math.log(3.0), 0.0], [0.0, 0.0]])
  learner = f32([[0.0, 0.0], [math.log(3.0), 0.0]])
  # Pull: KL(pi_A || pi_L) = [.75 ln(.75/.5) + .25 ln(.25/.5),
  #                            .5 ln(.5/.75) + .5 ln(.5/.25)]
  #                        = [.75 ln 1.5 - .25 ln 2, .5 ln(4/3)].
  pull = [0.75 * math.log(1.5) - 0.25 * math.log(2.0),
          0.5 * math.log(4.0 / 3.0)]
  np.testing.assert_allclose(policy_distillation(actor, learner), pull,
                             rtol=1e-6)
  # The other direction is the actor's distillation KL(pi_L || pi_A): a
  # different number at each step (KL is asymmetric).
  np.testing.assert_allclose(policy_distillation(learner, actor), pull[::-1],
                             rtol=1e-6)
  # Gradients: only the learner (student) gets one,
  # d/d learner_logits = softmax(learner) - softmax(actor)
  #                    = [[.5 - .75, .5 - .25], [.75 - .5, .25 - .5]].
  g_actor, g_learner = jax.grad(
      lambda a, l: distill.policy_distillation(a, l).sum(), argnums=(0, 1))(
          actor, learner)
  np.testing.assert_array_equal(g_actor, 0.0)
  np.testing.assert_allclose(g_learner, [[-0.25, 0.25], [0.25, -0.25]],
                             rtol=1e-6)


def test_distillation_batch_hand_values():
  """The learner's use: vmap over rows, then a masked mean over valid steps.

  Two rows of two steps, step 1 of row 1 masked (its garbage must not count).
  Teacher pi_L = [0.75, 0.25] everywhere, student uniform: KL(pi_L || pi_A)
  = .75 ln 1.5 + .25 ln .5 per valid step. Values: teacher [1, 2], student
  [0, 0] in row 0 and [3, 99] in row 1: 0.5*(1, 4, 4) over the 3 valid steps.
  """
  teacher = jnp.tile(f32([math.log(3.0), 0.0]), (2, 2, 1))
  student = jnp.zeros((2, 2, 2), jnp.float32).at[1, 1].set(f32([50.0, -50.0]))
  mask = f32([[1.0, 1.0], [1.0, 0.0]])
  kl = common.masked_mean(
      jax.vmap(distill.policy_distillation)(teacher, student), mask)
  np.testing.assert_allclose(
      kl, 0.75 * math.log(1.5) + 0.25 * math.log(0.5), rtol=1e-6)
  value = common.masked_mean(jax.vmap(distill.value_distillation)(
      f32([[1.0, 2.0], [1.0, 2.0]]), f32([[0.0, 0.0], [3.0, 99.0]])), mask)
  np.testing.assert_allclose(value, 0.5 * (1 + 4 + 4) / 3, rtol=1e-6)


def test_distillation_rejects_bad_inputs():
  with pytest.raises(AssertionError):
    distill.policy_distillation(jnp.zeros((3, 4)), jnp.zeros((3, 5)))
  with pytest.raises(AssertionError):
    distill.value_distillation(jnp.zeros((3,)), jnp.zeros((3, 1)))
  with pytest.raises(AssertionError):
    distill.policy_distillation(jnp.zeros((3, 4), jnp.int32),
                                jnp.zeros((3, 4), jnp.int32))


# The checkout under test, so the subprocess imports the same `ald_jax`.
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_losses_do_not_import_config():
  """Loss functions take scalars (rlax style): `losses/` never loads config.

  In a fresh interpreter, since this test session may have imported it.
  """
  code = ("import sys\n"
          "import ald_jax.losses.common, ald_jax.losses.distill\n"
          "import ald_jax.losses.vmpo, ald_jax.losses.vtrace\n"
          "sys.exit('ald_jax.config' in sys.modules)\n")
  result = subprocess.run([sys.executable, "-c", code], check=False,
                          capture_output=True, text=True,
                          env={**os.environ, "JAX_PLATFORMS": "cpu",
                               "PYTHONPATH": _REPO_ROOT})
  assert result.returncode == 0, result.stderr or "ald_jax.config imported"


def test_teacher_confidence_step_weights_by_hand():
  # Step 0: a uniform teacher (confidence 0); steps 1-2: p = (0.9, 0.1), so
  # confidence 1 - H/log 2 = 0.531; step 2 is masked out of the mean.
  logits = np.array([[0.0, 0.0], [np.log(9.0), 0.0], [np.log(9.0), 0.0]],
                    np.float32)
  mask = np.array([1.0, 1.0, 0.0], np.float32)
  weights = distill.step_weights(logits, mask, "teacher_confidence")
  np.testing.assert_allclose(weights, [0.0, 2.0, 2.0], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(distill.step_weights(logits, mask, "uniform"),
                             [1.0, 1.0, 1.0])
  with pytest.raises(ValueError, match="unknown step weighting"):
    distill.step_weights(logits, mask, "kl")


# ------------------------------------------- weighted and unweighted metrics --

def test_distillation_metrics_by_hand():
  """Teacher-confidence weights: the loss's weighted KL beside the plain one.

  Step 0: a uniform teacher (confidence 0, nothing to teach). Step 1: the
  teacher says (3/4, 1/4): H = 0.562335, confidence 1 - H / log 2 = 0.188722.
  Step 2 is masked out. Mean confidence over the valid steps 0.094361, so
  the weights are (0, 2). The student is uniform on every step.
  """
  teacher = f32([[0.0, 0.0], [math.log(3.0), 0.0], [5.0, 0.0]])
  student = f32(np.zeros((3, 2)))
  mask = f32([1.0, 1.0, 0.0])
  weights = distill.step_weights(teacher, mask, "teacher_confidence")
  np.testing.assert_allclose(weights[:2], [0.0, 2.0], atol=1e-6)
  policy_kl = distill.policy_distillation(teacher, student)
  # KL((3/4, 1/4) || (1/2, 1/2)) = 3/4 log(3/2) + 1/4 log(1/2) = 0.130812.
  np.testing.assert_allclose(policy_kl[:2], [0.0, 0.130812], atol=1e-6)
  value_sq = distill.value_distillation(f32([1.0, 3.0, 9.0]), f32([0, 0, 0]))
  metrics = distill.distillation_metrics(policy_kl, value_sq, weights, mask)
  np.testing.assert_allclose(metrics["policy_kl"], 0.130812 / 2, atol=1e-6)
  np.testing.assert_allclose(metrics["policy_kl_weighted"], 0.130812,
                             atol=1e-6)
  np.testing.assert_allclose(metrics["value_loss"], (0.5 + 4.5) / 2)
  np.testing.assert_allclose(metrics["value_loss_weighted"], 4.5)
  # Uniform weights: each pair is one number.
  uniform = distill.step_weights(teacher, mask, "uniform")
  plain = distill.distillation_metrics(policy_kl, value_sq, uniform, mask)
  assert float(plain["policy_kl"]) == float(plain["policy_kl_weighted"])
  assert float(plain["value_loss"]) == float(plain["value_loss_weighted"])
