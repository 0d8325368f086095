"""An oracle for the learner's loss assembly (`Learner.losses`).

The losses themselves are tested against hand values and rlax elsewhere; this
file pins how the learner *feeds* them: which network runs over which steps,
the time alignment of rewards and discounts, the LAST-step mask, the
importance weights, the V-MPO / V-trace terms, the distillation terms and the
learner pull. Everything expected is recomputed here in float64 numpy with
plain loops, from the networks' outputs (the flax modules applied to the
LearnerState's parameters), and compared with `learner.losses`' total and
metrics for every agent and both RL losses.

Semantics implemented (update these functions when the learner's change):
  * Unroll view (types.py time convention): loss step t is row position C+t;
    the reward and discount *following* action t are read at position C+t+1;
    discounts_t = gamma * env discount; mask_t = step_type[C+t] != LAST (an
    action taken at a LAST step is ignored), and a masked step has reward and
    discount 0.
  * V-trace (Espeholt et al. 2018, paper form): rho_t = pi(a_t) / mu(a_t),
    vs_t = V_t + sum_{s>=t} (prod_{i=t}^{s-1} d_i c_i) delta_s with
    delta_s = min(rho_bar, rho_s)(r_s + d_s V_{s+1} - V_s), c_i = lambda
    min(1, rho_i); a masked step has rho = c = d = 0. pg advantage
    min(rho_bar_pg, rho_t)(r_t + d_t vs_{t+1} - V_t) with vs_T = V_T.
  * V-MPO (issue 7): value targets are the V-trace vs of the learner's
    policy against the behaviour logits (with the vtrace lambda and rho clip)
    or n-step returns (value_target="nstep"); advantages are the V-trace
    policy-gradient form without the rho factor, A = r_t + d_t vs_{t+1} - V_t
    (vs_T = V_T), or G_t - V_t for n-step; the E-step keeps the top
    k = floor(fraction * #valid) (at least 1) valid samples; psi =
    softmax(A/eta) over them; ESS = 1 / sum(psi^2).
  * Distillation: alpha_pi KL(sg pi_L || pi_A) + alpha_V 1/2 (sg V_L - V_A)^2,
    masked means over the T loss steps; learner pull beta KL(sg pi_A || pi_L).
"""
import dataclasses
import functools
import math

import jax
import numpy as np
import pytest

from ald_jax import config as config_lib
from ald_jax import learner as learner_lib
from ald_jax import types
from ald_jax.networks import policy_value

C, T = 2, 6          # context and unroll: rows of L = C + T + 1 = 9 steps
L = C + T + 1
OBS_SHAPE = (4,)
NUM_ACTIONS = 3
GAMMA = 0.9


def oracle_config(agent: str, rl_loss: str, step_weighting: str = "uniform",
                  **vmpo_changes):
  return config_lib.LearnerConfig(
      agent=agent, rl_loss=rl_loss, discount=GAMMA, unroll_length=T,
      learner_context=C, batch_size=2,
      torso=config_lib.TorsoConfig(mlp_sizes=(8,)),
      lstm=config_lib.LSTMConfig(hidden_size=8),
      gtrxl=config_lib.GTrXLConfig(num_layers=1, d_model=8, num_heads=2,
                                   mlp_size=16, memory_length=L),
      vmpo=config_lib.VMPOConfig(top_k_fraction=0.5, **vmpo_changes),
      vtrace=config_lib.VTraceConfig(entropy_cost=0.03, baseline_cost=0.7,
                                     clip_rho_threshold=1.2,
                                     clip_pg_rho_threshold=0.8, lambda_=0.9),
      distill=config_lib.DistillConfig(policy_cost=1.3, value_cost=0.6,
                                       learner_pull_cost=0.25,
                                       step_weighting=step_weighting))


def oracle_batch(actor_state, seed=0) -> types.Batch:
  """Two rows: row 0 (mid-episode at position 0) terminates inside the
  unroll (LAST, discount 0) and at the bootstrap step; row 1 is truncated
  by a time limit (LAST, discount 1) inside the unroll and had an episode
  end inside the context."""
  rng = np.random.default_rng(seed)
  step_type = np.full((2, L), types.MID, np.int32)
  discount = np.ones((2, L), np.float32)
  # Row 0 starts mid-episode, so its LSTM outputs depend on actor_state (the
  # state before position 0); row 1 starts an episode there.
  step_type[1, 0] = types.FIRST
  # Row 0: termination at position 4 (loss step t=2), restart, termination
  # again at the bootstrap position 8.
  step_type[0, 4], discount[0, 4] = types.LAST, 0.0
  step_type[0, 5] = types.FIRST
  step_type[0, 8], discount[0, 8] = types.LAST, 0.0
  # Row 1: an episode ends in the context (position 1); the next one is cut by
  # a time limit at position 6 (t=4) with discount 1.
  step_type[1, 1], discount[1, 1] = types.LAST, 0.0
  step_type[1, 2] = types.FIRST
  step_type[1, 6], discount[1, 6] = types.LAST, 1.0
  step_type[1, 7] = types.FIRST
  return types.Batch(
      observation=rng.normal(size=(2, L, *OBS_SHAPE)).astype(np.float32),
      action=rng.integers(0, NUM_ACTIONS, (2, L)).astype(np.int32),
      reward=rng.normal(size=(2, L)).astype(np.float32),
      discount=discount, step_type=step_type,
      behaviour_logits=rng.normal(size=(2, L, NUM_ACTIONS)).astype(np.float32),
      actor_state=actor_state)


def perturbed(params, seed, scale=0.3):
  """Parameters moved away from init so every term has work to do."""
  leaves, treedef = jax.tree_util.tree_flatten(params)
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_unflatten(treedef, [
      np.asarray(x) + scale * rng.normal(size=x.shape).astype(np.float32)
      for x in leaves])


@functools.lru_cache(maxsize=None)  # builds are reused across tests
def build(agent, rl_loss, value_target="vtrace", step_weighting="uniform"):
  learner = learner_lib.make_learner(
      oracle_config(agent, rl_loss, step_weighting, value_target=value_target),
      OBS_SHAPE, NUM_ACTIONS)
  example = learner.example_batch(2)
  rng = np.random.default_rng(7)
  actor_state = jax.tree_util.tree_map(
      lambda x: (0.5 * rng.normal(size=x.shape)).astype(np.float32),
      example.actor_state)
  batch = oracle_batch(actor_state)
  # Op by op: compiling `init` for each of the configs here costs more.
  with jax.disable_jit():
    state = learner.init(jax.random.PRNGKey(0), batch)
  state = state.replace(
      learner_params=dict(state.learner_params,
                          net=perturbed(state.learner_params["net"], 1)),
      actor_params=perturbed(state.actor_params, 2),
      target_params=perturbed(state.target_params, 3))
  return learner, batch, state


# ---- network outputs, applied here from the modules -----------------------


def lstm_outputs(cfg, params, batch):
  """LSTM from batch.actor_state (before position 0) over all L steps."""
  net = policy_value.LSTMPolicyValueNet(cfg.torso, cfg.lstm, NUM_ACTIONS,
                                        obs_ndim=len(OBS_SHAPE))
  out, _ = net.apply(params, batch.observation, batch.step_type,
                     batch.actor_state)
  return np.float64(out.logits)[:, C:], np.float64(out.value)[:, C:]


def gtrxl_outputs(cfg, params, batch):
  """GTrXL over all L steps, the C context steps as memory."""
  net = policy_value.GTrXLPolicyValueNet(cfg.torso, cfg.gtrxl, NUM_ACTIONS,
                                         obs_ndim=len(OBS_SHAPE))
  out = net.apply(params, batch.observation, batch.step_type,
                  num_memory_steps=C)
  return np.float64(out.logits)[:, C:], np.float64(out.value)[:, C:]


def learner_outputs(cfg, net_params, batch):
  """(logits [B, T+1, A], values [B, T+1]) of the learner for each agent."""
  if cfg.agent in ("ald", "transformer"):
    return gtrxl_outputs(cfg, net_params, batch)
  if cfg.agent == "lstm":
    return lstm_outputs(cfg, net_params, batch)
  logits, _ = lstm_outputs(cfg, net_params["policy"], batch)
  _, values = gtrxl_outputs(cfg, net_params["critic"], batch)
  return logits, values


# ---- numpy oracle -----------------------------------------------------------


def log_softmax(logits):
  shifted = logits - logits.max(axis=-1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def kl(p_logits, q_logits):
  log_p, log_q = log_softmax(p_logits), log_softmax(q_logits)
  return (np.exp(log_p) * (log_p - log_q)).sum(axis=-1)


def entropy(logits):
  log_p = log_softmax(logits)
  return -(np.exp(log_p) * log_p).sum(axis=-1)


def taken(log_probs, actions):
  return np.take_along_axis(log_probs, actions[..., None], axis=-1)[..., 0]


def masked_mean(x, mask):
  return float((x * mask).sum() / max(mask.sum(), 1.0))


def unroll_view(batch, gamma):
  """Loss step t = position C+t; reward/discount following it at C+t+1."""
  b = batch.action.shape[0]
  view = {k: np.zeros((b, T)) for k in ("rewards", "discounts", "mask")}
  view["actions"] = np.zeros((b, T), np.int64)
  view["behaviour_logits"] = np.zeros((b, T, NUM_ACTIONS))
  for i in range(b):
    for t in range(T):
      now, after = C + t, C + t + 1
      valid = float(batch.step_type[i, now] != types.LAST)
      view["mask"][i, t] = valid
      view["actions"][i, t] = batch.action[i, now]
      view["behaviour_logits"][i, t] = batch.behaviour_logits[i, now]
      view["rewards"][i, t] = valid * batch.reward[i, after]
      view["discounts"][i, t] = valid * gamma * batch.discount[i, after]
  return view


def vtrace_targets(values, rewards, discounts, rho, mask, lambda_=1.0,
                   rho_bar=1.0, pg_rho_bar=1.0):
  """One row: values [T+1]; the paper's sum form, masked steps inert."""
  rho = np.where(mask > 0, rho, 0.0)
  d = np.where(mask > 0, discounts, 0.0)
  c = lambda_ * np.minimum(1.0, rho)
  delta = np.minimum(rho_bar, rho) * (rewards + d * values[1:] - values[:-1])
  delta = np.where(mask > 0, delta, 0.0)
  vs = np.zeros(T)
  for t in range(T):
    trace, total = 1.0, 0.0
    for s in range(t, T):
      total += trace * delta[s]
      trace *= d[s] * c[s]
    vs[t] = values[t] + total
  vs_next = np.append(vs[1:], values[T])
  pg_adv = np.minimum(pg_rho_bar, rho) * (rewards + d * vs_next - values[:-1])
  return vs, np.where(mask > 0, pg_adv, 0.0)


def nstep_returns(values, rewards, discounts, mask, lambda_=1.0):
  """One row: lambda-returns G_t = r_t + d_t ((1-lambda) V_{t+1} +
  lambda G_{t+1}), G_T = V_T; the trace is cut in front of a masked step
  (bootstrap from the LAST state's value) and a masked step's return is 0.
  With lambda 1: discounted rewards to the end of the unroll or the next
  masked step, bootstrapped from the value there."""
  returns = np.zeros(T)
  g_next = values[T]
  for t in reversed(range(T)):
    if not mask[t]:
      returns[t], g_next = 0.0, 0.0
      continue
    next_valid = t == T - 1 or mask[t + 1]
    lam = lambda_ if next_valid else 0.0
    g = rewards[t] + discounts[t] * ((1 - lam) * values[t + 1] + lam * g_next)
    returns[t], g_next = g, g
  return returns


def top_k_selection(advantages, mask, fraction):
  """k = floor(fraction * valid samples) (at least 1), chosen among the
  valid samples by advantage."""
  k = max(1, int(math.floor(fraction * mask.sum() + 1e-6)))
  order = sorted(np.flatnonzero(mask), key=lambda j: -advantages[j])
  selected = np.zeros(advantages.size)
  selected[order[:k]] = 1.0
  return selected


def softplus(x):
  return float(np.log1p(np.exp(x)))


def vmpo_terms(online_logits, target_logits, actions, advantages, mask, duals,
               cfg):
  """V-MPO policy, temperature and trust-region terms over the batch."""
  online = online_logits.reshape(-1, NUM_ACTIONS)
  target = target_logits.reshape(-1, NUM_ACTIONS)
  adv, mask, actions = advantages.ravel(), mask.ravel(), actions.ravel()
  eta = softplus(float(duals.eta)) + 1e-8
  alpha = softplus(float(duals.alpha)) + 1e-8
  selected = top_k_selection(adv, mask, cfg.top_k_fraction)
  chosen = np.flatnonzero(selected)
  weights = np.exp(adv[chosen] / eta)
  psi = weights / weights.sum()
  policy_loss = -float((psi * taken(log_softmax(online[chosen]),
                                    actions[chosen])).sum())
  temperature_loss = eta * cfg.epsilon_eta + eta * math.log(weights.mean())
  trust_kl = masked_mean(kl(target, online), mask)
  return {
      "vmpo/eta": eta, "vmpo/alpha": alpha, "vmpo/kl": trust_kl,
      "vmpo/policy_loss": policy_loss,
      "vmpo/temperature_loss": temperature_loss,
      "vmpo/kl_loss": alpha * trust_kl,
      "vmpo/alpha_loss": alpha * (cfg.epsilon_alpha - trust_kl),
      "vmpo/selected_fraction": len(chosen) / mask.sum(),
      "vmpo/ess": 1.0 / float((psi ** 2).sum()),
      "vmpo/ess_fraction": 1.0 / float((psi ** 2).sum()) / len(chosen),
  }


def expected_losses(learner, state, target_params, batch, view_fn=unroll_view):
  """Every metric `learner.losses` reports, recomputed; `loss/total` too."""
  cfg = learner.config
  view = view_fn(batch, cfg.discount)
  mask, actions = view["mask"], view["actions"]
  logits, values = learner_outputs(cfg, state.learner_params["net"], batch)
  loss_logits = logits[:, :T]
  log_pi = taken(log_softmax(loss_logits), actions)
  log_mu = taken(log_softmax(view["behaviour_logits"]), actions)
  rho = np.exp(log_pi - log_mu)  # importance weights pi_L / pi_A
  out = {}
  if cfg.rl_loss == "vtrace":
    v = cfg.vtrace
    vs, pg_adv = zip(*[vtrace_targets(
        values[i], view["rewards"][i], view["discounts"][i], rho[i], mask[i],
        v.lambda_, v.clip_rho_threshold, v.clip_pg_rho_threshold)
                       for i in range(len(mask))])
    vs, pg_adv = np.array(vs), np.array(pg_adv)
    pg_loss = -pg_adv * log_pi
    value_loss = 0.5 * (vs - values[:, :T]) ** 2
    ent = entropy(loss_logits)
    per_step = pg_loss + v.baseline_cost * value_loss - v.entropy_cost * ent
    rl = masked_mean(per_step, mask)
    out.update({"vtrace/policy_loss": masked_mean(pg_loss, mask),
                "vtrace/value_loss": v.baseline_cost * masked_mean(
                    value_loss, mask),
                "vtrace/entropy": masked_mean(ent, mask),
                "vtrace/advantage_mean": masked_mean(pg_adv, mask),
                "vtrace/vs_mean": masked_mean(vs, mask),
                "vtrace/rho_mean": masked_mean(rho, mask)})
  else:
    v = cfg.vtrace
    if cfg.vmpo.value_target == "vtrace":
      rows = [vtrace_targets(values[i], view["rewards"][i],
                             view["discounts"][i], rho[i], mask[i],
                             v.lambda_, v.clip_rho_threshold)[0]
              for i in range(len(mask))]
      targets = np.array(rows)
      vs_next = np.concatenate([targets[:, 1:], values[:, T:]], axis=1)
      advantages = np.where(mask > 0, view["rewards"] + view["discounts"] *
                            vs_next - values[:, :T], 0.0)
    else:
      targets = np.array([nstep_returns(
          values[i], view["rewards"][i], view["discounts"][i], mask[i],
          v.lambda_) for i in range(len(mask))])
      advantages = targets - values[:, :T]
    target_logits, _ = learner_outputs(cfg, target_params, batch)
    terms = vmpo_terms(loss_logits, target_logits[:, :T], actions, advantages,
                       mask, state.learner_params["duals"], cfg.vmpo)
    value_loss = cfg.vmpo.value_cost * masked_mean(
        0.5 * (targets - values[:, :T]) ** 2, mask)
    out.update(terms)
    out["vmpo/value_loss"] = value_loss
    out["vmpo/advantage_mean"] = masked_mean(advantages, mask)
    out["vmpo/rho_mean"] = masked_mean(rho, mask)
    rl = (terms["vmpo/policy_loss"] + terms["vmpo/temperature_loss"] +
          terms["vmpo/kl_loss"] + terms["vmpo/alpha_loss"] + value_loss)
  out["learner/rl_loss"] = rl
  out["learner/entropy"] = masked_mean(entropy(loss_logits), mask)
  out["learner/value_mean"] = masked_mean(values[:, :T], mask)
  total = rl
  if cfg.agent == "ald":
    d = cfg.distill
    actor_logits, actor_values = lstm_outputs(cfg, state.actor_params, batch)
    actor_logits, actor_values = actor_logits[:, :T], actor_values[:, :T]
    policy_kl = kl(loss_logits, actor_logits)
    value_sq = 0.5 * (values[:, :T] - actor_values) ** 2
    out["distill/policy_kl"] = masked_mean(policy_kl, mask)
    out["distill/value_loss"] = masked_mean(value_sq, mask)
    out["learner/pull_kl"] = masked_mean(kl(actor_logits, loss_logits), mask)
    out["actor/entropy"] = masked_mean(entropy(actor_logits), mask)
    if d.step_weighting == "teacher_confidence":
      # 1 - H(teacher)/log A, rescaled to mean 1 over the valid steps.
      confidence = np.maximum(
          1.0 - entropy(loss_logits) / math.log(loss_logits.shape[-1]), 0.0)
      weights = confidence / max(masked_mean(confidence, mask), 1e-6)
    else:
      weights = np.ones_like(policy_kl)
    out["distill/policy_kl_weighted"] = masked_mean(policy_kl * weights, mask)
    out["distill/value_loss_weighted"] = masked_mean(value_sq * weights, mask)
    out["distill/loss"] = (d.policy_cost * masked_mean(policy_kl * weights,
                                                       mask) +
                           d.value_cost * masked_mean(value_sq * weights,
                                                      mask))
    total += (out["distill/loss"] +
              d.learner_pull_cost * out["learner/pull_kl"])
  out["loss/total"] = total
  return out


def assert_matches_oracle(learner, state, batch, view_fn=unroll_view):
  total, metrics = learner.losses(state.learner_params, state.actor_params,
                                  state.target_params, batch)
  expected = expected_losses(learner, state, state.target_params, batch,
                             view_fn)
  for name, value in expected.items():
    assert name in metrics, f"learner.losses reports no {name!r}"
    np.testing.assert_allclose(float(metrics[name]), value, rtol=2e-5,
                               atol=2e-6, err_msg=name)
  np.testing.assert_allclose(float(total), expected["loss/total"], rtol=2e-5,
                             atol=2e-6)


# ---- tests ------------------------------------------------------------------


def test_unroll_view_by_hand():
  """The oracle's own alignment, spelled out for row 0 of the batch."""
  batch = oracle_batch(actor_state=())
  view = unroll_view(batch, GAMMA)
  # Loss steps t = 0..5 are positions 2..7; position 4 (t=2) is LAST.
  np.testing.assert_array_equal(view["mask"][0], [1, 1, 0, 1, 1, 1])
  np.testing.assert_array_equal(view["mask"][1], [1, 1, 1, 1, 0, 1])
  r = batch.reward[0]
  np.testing.assert_allclose(view["rewards"][0],
                             [r[3], r[4], 0.0, r[6], r[7], r[8]])
  # Termination at 4 and 8 -> discount 0 after t=1 and t=5; truncation at
  # position 6 of row 1 keeps gamma after t=3.
  np.testing.assert_allclose(view["discounts"][0],
                             [GAMMA, 0.0, 0.0, GAMMA, GAMMA, 0.0])
  np.testing.assert_allclose(view["discounts"][1],
                             [GAMMA, GAMMA, GAMMA, GAMMA, 0.0, GAMMA])


def test_vtrace_and_nstep_oracles_by_hand():
  """Two-step checks of the oracle's target functions against hand sums."""
  values = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0])
  rewards = np.array([1.0, 0.0, 2.0, 0.0, 0.0, 1.0])
  discounts = np.array([0.5, 0.0, 0.5, 0.5, 0.5, 0.5])
  mask = np.array([1.0, 1.0, 1.0, 0.0, 1.0, 1.0])
  # On-policy (rho = 1), lambda 1: vs = n-step returns, cut at the mask.
  vs, pg = vtrace_targets(values, rewards, discounts, np.ones(T), mask)
  returns = nstep_returns(values, rewards, discounts, mask)
  np.testing.assert_allclose(vs[:3], [1.0 + 0.5 * 0.0, 0.0, 2.0 + 0.5 * 4.0])
  np.testing.assert_allclose(returns, [1.0, 0.0, 4.0, 0.0,
                                       0.0 + 0.5 * (1.0 + 0.5 * 7.0),
                                       1.0 + 0.5 * 7.0])
  np.testing.assert_allclose(vs[[0, 1, 2, 4, 5]], returns[[0, 1, 2, 4, 5]])
  assert vs[3] == values[3] and pg[3] == 0.0  # masked: inert


@pytest.mark.parametrize("rl_loss", ["vmpo", "vtrace"])
@pytest.mark.parametrize("agent", config_lib.AGENTS)
def test_losses_match_oracle(agent, rl_loss):
  learner, batch, state = build(agent, rl_loss)
  assert_matches_oracle(learner, state, batch)


@pytest.mark.parametrize("rl_loss", ["vtrace"])
def test_teacher_confidence_weighting_matches_oracle(rl_loss):
  """The default step weighting: each step's distillation terms weighted by
  the teacher's confidence (mean 1 over valid steps)."""
  learner, batch, state = build("ald", rl_loss,
                                step_weighting="teacher_confidence")
  assert_matches_oracle(learner, state, batch)


def test_distill_only_step_matches_oracle():
  """`distill_step` reports the distillation terms of the state it is given
  (teacher = the current learner), on the same mask as the combined step."""
  learner, batch, state = build("ald", "vtrace")
  expected = expected_losses(learner, state, state.target_params, batch)
  own_copy = jax.tree_util.tree_map(np.array, state)  # distill_step donates
  _, metrics = learner.distill_step(own_copy, batch)
  for name in ("distill/policy_kl", "distill/value_loss",
               "distill/policy_kl_weighted", "distill/value_loss_weighted"):
    np.testing.assert_allclose(float(metrics[name]), expected[name],
                               rtol=2e-5, atol=2e-6, err_msg=name)


def test_vmpo_nstep_value_target_matches_oracle():
  learner, batch, state = build("ald", "vmpo", value_target="nstep")
  assert_matches_oracle(learner, state, batch)


# ---- the oracle catches mutations of the learner's unroll view --------------


def _early_rewards(original):
  """Mutation: reward and discount read at position C+t (one step early)."""
  def view(batch, context, unroll, discount):
    out = original(batch, context, unroll, discount)
    c, t = context, unroll
    return out._replace(
        rewards=batch.reward[:, c:c + t] * out.mask,
        discounts=discount * batch.discount[:, c:c + t] * out.mask)
  return view


def _last_not_masked(original):
  """Mutation: actions at LAST steps count as real steps."""
  def view(batch, context, unroll, discount):
    out = original(batch, context, unroll, discount)
    c, t = context, unroll
    return out._replace(
        rewards=batch.reward[:, c + 1:c + t + 1],
        discounts=discount * batch.discount[:, c + 1:c + t + 1],
        mask=np.ones_like(out.mask))
  return view


@pytest.mark.parametrize("mutation", [_early_rewards, _last_not_masked])
@pytest.mark.parametrize("rl_loss", ["vmpo", "vtrace"])
def test_oracle_catches_unroll_view_mutations(monkeypatch, mutation, rl_loss):
  learner, batch, state = build("ald", rl_loss)
  assert_matches_oracle(learner, state, batch)  # sanity: unmutated passes
  # When the learner's unroll view moves, point this at its replacement.
  monkeypatch.setattr(learner_lib, "unroll_view",
                      mutation(learner_lib.unroll_view))
  with pytest.raises(AssertionError):
    assert_matches_oracle(learner, state, batch)


def test_oracle_catches_a_wrong_lstm_start_state():
  """Row 0 starts mid-episode, so where the LSTM starts matters: an oracle
  run from zeros instead of batch.actor_state (the state before position 0)
  disagrees with the learner."""
  learner, batch, state = build("lstm", "vtrace")
  _, metrics = learner.losses(state.learner_params, state.actor_params,
                              state.target_params, batch)
  zero_start = dataclasses.replace(batch, actor_state=jax.tree_util.tree_map(
      np.zeros_like, batch.actor_state))
  expected = expected_losses(learner, state, state.target_params, zero_start)
  with pytest.raises(AssertionError):
    np.testing.assert_allclose(float(metrics["loss/total"]),
                               expected["loss/total"], rtol=2e-5, atol=2e-6)
