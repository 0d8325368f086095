"""Actor-learner distillation losses (docs/design.md, "Losses").

* Actor (student) side: alpha_pi * KL(sg[pi_L] || pi_A) is
  `policy_distillation(teacher_logits=learner_logits, student_logits=
  actor_logits)`, and alpha_V * 1/2 (sg[V_L] - V_A)^2 is
  `value_distillation(teacher_values=learner_values, student_values=
  actor_values)`.
* Learner pull: beta * KL(sg[pi_A] || pi_L) is the same `policy_distillation`
  with the roles swapped (teacher = actor, student = learner), so it reaches
  the learner's parameters only.

The teacher side is always wrapped in `stop_gradient`, so these functions on
their own guarantee that no gradient reaches the teacher. Both are per step:
`[T, A]`/`[T]` in, `[T]` out (callers `jax.vmap` over the batch, then mask and
average with `masked_mean`).

With `step_weights` other than uniform, the loss minimises the step-weighted
means; `distillation_metrics` reports them beside the plain means, which can
move the other way (a teacher-confidence-weighted KL falls while the
unweighted KL, dominated by steps the teacher is unsure of, rises).
"""
from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from ald_jax.losses import common

Array = chex.Array


def policy_distillation(teacher_logits: Array, student_logits: Array) -> Array:
  """Per-step KL(sg[pi_teacher] || pi_student) from logits `[T, A]` -> `[T]`.

  Its gradient w.r.t. the student logits is softmax(student) -
  softmax(teacher). For the learner-pull term KL(sg[pi_A] || pi_L) call it
  with teacher = actor logits and student = learner logits.
  """
  chex.assert_equal_shape([teacher_logits, student_logits])
  chex.assert_rank(student_logits, 2)
  chex.assert_type([teacher_logits, student_logits], jnp.float32)
  return common.categorical_kl(jax.lax.stop_gradient(teacher_logits),
                               student_logits)


def value_distillation(teacher_values: Array, student_values: Array) -> Array:
  """Per-step 1/2 (sg[V_teacher] - V_student)^2, `[T]` -> `[T]`."""
  chex.assert_equal_shape([teacher_values, student_values])
  chex.assert_rank(student_values, 1)
  chex.assert_type([teacher_values, student_values], jnp.float32)
  return 0.5 * jnp.square(jax.lax.stop_gradient(teacher_values)
                          - student_values)


def step_weights(teacher_logits: Array, mask: Array, weighting: str) -> Array:
  """Per-step weights [..., T] for the distillation terms, mean 1 over mask.

  "uniform": all 1. "teacher_confidence": 1 - H(pi_teacher) / log A (0 for a
  uniform teacher, 1 for a deterministic one), normalised to mean 1 over the
  valid steps, so the steps where the teacher has decided weigh more (in a
  recall task, the decision step) without changing the loss scale. A teacher
  uniform on every valid step has nothing to teach: all weights are 0 then.
  """
  if weighting == "uniform":
    return jnp.ones(mask.shape, jnp.float32)
  if weighting != "teacher_confidence":
    raise ValueError(f"unknown step weighting {weighting!r}")
  num_actions = teacher_logits.shape[-1]
  confidence = 1.0 - common.entropy(
      jax.lax.stop_gradient(teacher_logits)) / jnp.log(num_actions)
  confidence = jnp.maximum(confidence, 0.0)
  mean = common.masked_mean(confidence, mask)
  return confidence / jnp.maximum(mean, 1e-6)


def distillation_metrics(policy_kl: Array, value_sq: Array, weights: Array,
                         mask: Array) -> dict[str, Array]:
  """Per-step terms `[..., T]` -> the distillation metrics (scalars).

  `policy_kl` / `value_loss`: the plain means over the valid steps, how well
  the actor matches the teacher everywhere. `policy_kl_weighted` /
  `value_loss_weighted`: the means weighted by `weights` (`step_weights`),
  the terms the distillation loss minimises (alpha_pi and alpha_V times
  these). With uniform weights each pair is equal.
  """
  chex.assert_equal_shape([policy_kl, value_sq, weights, mask])
  return {"policy_kl": common.masked_mean(policy_kl, mask),
          "value_loss": common.masked_mean(value_sq, mask),
          "policy_kl_weighted": common.masked_mean(policy_kl * weights, mask),
          "value_loss_weighted": common.masked_mean(value_sq * weights, mask)}
