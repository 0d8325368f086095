"""The importable ALD learner core: `make_learner -> Learner(init, step, distill_step)`.

One jitted `step(state, batch) -> (state, metrics)` updates
  * theta_L (the learner) with the RL loss (V-MPO or V-trace) + beta * KL(sg[pi_A] || pi_L),
  * theta_A (the actor) with alpha_pi * KL(sg[pi_L] || pi_A) + alpha_V * 1/2 (sg[V_L] - V_A)^2,
with separate optax optimizers. Stop-gradients isolate the two parameter sets,
so a single backward pass of the summed loss gives each set exactly its own
gradient (tests check this). `distill_step` runs actor-only updates on replayed
batches, with teacher outputs recomputed by the current learner.

The four agents of SPEC section 3 are configurations of the same code:
  ald          GTrXL learner, separate LSTM actor distilled from it.
  transformer  GTrXL learns and acts (actor = learner, no distillation).
  lstm         LSTM learns and acts.
  asymmetric   LSTM policy (acts) with a GTrXL critic (value only).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import chex
import flax.struct
import jax
import jax.numpy as jnp
import optax

from ald_jax import config as config_lib
from ald_jax import types
from ald_jax.losses import common
from ald_jax.losses import distill
from ald_jax.losses import vmpo
from ald_jax.losses import vtrace
from ald_jax.networks import gtrxl as gtrxl_lib
from ald_jax.networks import policy_value

Array = chex.Array
Params = Any
Metrics = dict[str, Array]


@flax.struct.dataclass
class LearnerState:
  """Everything a learner step reads and writes; a pytree of arrays."""
  learner_params: Params     # {"net": network params, "duals": VMPODuals | ()}
  actor_params: Params       # the distilled LSTM actor (agent "ald"), else ()
  target_params: Params      # V-MPO target network (a copy of "net"), else ()
  learner_opt_state: Any
  actor_opt_state: Any
  step: Array                # int32 number of combined steps taken
  distill_step: Array        # int32 number of distill-only steps taken
  rng: Array


class ActorCore(NamedTuple):
  """What an actor thread needs to act with the published parameters.

  `step` is pure; actor threads jit it on the CPU device themselves.
  """
  initial_state: Callable[[int], Any]
  # (params, observation [E,*obs], step_type [E], state, rng) ->
  #     (action [E] int32, logits [E,A], new_state)
  step: Callable[..., tuple[Array, Array, Any]]
  # Recurrent state -> what is stored in Batch.actor_state (row start).
  recorded_state: Callable[[Any], Any]


class Learner(NamedTuple):
  config: config_lib.LearnerConfig
  obs_shape: tuple[int, ...]
  num_actions: int
  init: Callable[[Array, types.Batch], LearnerState]
  step: Callable[[LearnerState, types.Batch], tuple[LearnerState, Metrics]]
  distill_step: Callable[[LearnerState, types.Batch],
                         tuple[LearnerState, Metrics]]
  actor_params: Callable[[LearnerState], Params]
  actor_core: ActorCore
  example_batch: Callable[[int], types.Batch]
  losses: Callable[..., tuple[Array, Metrics]]  # unjitted, for tests


def _optimizer(cfg: config_lib.OptimizerConfig) -> optax.GradientTransformation:
  return optax.chain(
      optax.clip_by_global_norm(cfg.max_grad_norm),
      optax.adam(cfg.learning_rate, eps=cfg.adam_eps),
  )


def _all_finite(tree) -> Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def _select(pred: Array, on_true, on_false):
  return jax.tree_util.tree_map(lambda a, b: jnp.where(pred, a, b), on_true,
                                on_false)


class _UnrollView(NamedTuple):
  """The T loss steps of a batch, time-aligned for the losses ([B, T])."""
  actions: Array
  behaviour_logits: Array
  rewards: Array     # reward following the action at t
  discounts: Array   # gamma * env discount of step t+1; 0 where masked
  mask: Array        # 1.0 where the action at t was real (step t not LAST)


def _unroll_view(batch: types.Batch, context: int, unroll: int,
                 discount: float) -> _UnrollView:
  c, t = context, unroll
  step_type = batch.step_type[:, c:c + t]
  mask = (step_type != types.LAST).astype(jnp.float32)
  return _UnrollView(
      actions=batch.action[:, c:c + t].astype(jnp.int32),
      behaviour_logits=batch.behaviour_logits[:, c:c + t],
      rewards=batch.reward[:, c + 1:c + t + 1] * mask,
      discounts=discount * batch.discount[:, c + 1:c + t + 1] * mask,
      mask=mask,
  )


def make_learner(config: config_lib.LearnerConfig,
                 obs_shape: tuple[int, ...],
                 num_actions: int) -> Learner:
  """Builds the learner for `config` and an environment's specs."""
  if not isinstance(config, config_lib.LearnerConfig):
    raise TypeError(f"config must be a LearnerConfig, got {type(config)}")
  obs_shape = tuple(int(d) for d in obs_shape)
  if len(obs_shape) not in (1, 3):
    raise config_lib.ConfigError(
        f"observation shape {obs_shape}: the torso takes vector [D] or grid "
        "[H, W, C] observations; flatten other shapes in the environment")
  if not isinstance(num_actions, int) or num_actions < 2:
    raise config_lib.ConfigError(
        f"num_actions must be an integer >= 2, got {num_actions!r}")

  cfg = config
  ctx, unroll = cfg.learner_context, cfg.unroll_length
  obs_ndim = len(obs_shape)
  lstm_net = policy_value.LSTMPolicyValueNet(
      torso=cfg.torso, lstm=cfg.lstm, num_actions=num_actions,
      obs_ndim=obs_ndim)
  gtrxl_net = policy_value.GTrXLPolicyValueNet(
      torso=cfg.torso, gtrxl=cfg.gtrxl, num_actions=num_actions,
      obs_ndim=obs_ndim)
  learner_opt = _optimizer(cfg.learner_optimizer)
  actor_opt = _optimizer(cfg.actor_optimizer)
  use_vmpo = cfg.rl_loss == "vmpo"
  distills = cfg.agent == "ald"

  # ---- forward passes over the T+1 unroll steps of a batch --------------

  def lstm_forward(params, batch: types.Batch) -> types.AgentOutput:
    # The LSTM starts from the actor's recorded state at the row's first step
    # and runs over the whole row: gradients reach C + T steps back.
    out, _ = lstm_net.apply(params, batch.observation, batch.step_type,
                            batch.actor_state)
    return jax.tree_util.tree_map(lambda x: x[:, ctx:], out)

  def gtrxl_forward(params, batch: types.Batch) -> types.AgentOutput:
    # The transformer reads the context prefix as stop-gradient memory.
    out = gtrxl_net.apply(params, batch.observation, batch.step_type,
                          num_memory_steps=ctx)
    return jax.tree_util.tree_map(lambda x: x[:, ctx:], out)

  def learner_forward(net_params, batch) -> types.AgentOutput:
    if cfg.agent in ("ald", "transformer"):
      return gtrxl_forward(net_params, batch)
    if cfg.agent == "lstm":
      return lstm_forward(net_params, batch)
    # asymmetric: LSTM policy, GTrXL critic.
    policy_out = lstm_forward(net_params["policy"], batch)
    critic_out = gtrxl_forward(net_params["critic"], batch)
    return types.AgentOutput(logits=policy_out.logits, value=critic_out.value)

  # ---- losses ---------------------------------------------------------------

  def rl_loss(duals, target_params, batch, view: _UnrollView,
              learner_out: types.AgentOutput) -> tuple[Array, Metrics]:
    logits = learner_out.logits[:, :unroll]
    values = learner_out.value  # [B, T+1]
    if not use_vmpo:
      per_step, extras = jax.vmap(
          functools.partial(vtrace.vtrace_actor_critic_loss,
                            config=cfg.vtrace))(
              logits, view.behaviour_logits, view.actions, values,
              view.rewards, view.discounts, view.mask)
      loss = common.masked_mean(per_step, view.mask)
      metrics = {f"vtrace/{k}": common.masked_mean(v, view.mask)
                 for k, v in extras.items()}
      return loss, metrics

    v_tm1 = values[:, :-1]
    v_t = jax.lax.stop_gradient(values[:, 1:])
    if cfg.vmpo.value_target == "vtrace":
      # Importance weights pi_L / pi_A correct for acting with the actor.
      rho = jnp.exp(common.log_prob(logits, view.actions) -
                    common.log_prob(view.behaviour_logits, view.actions))
      returns = jax.vmap(vtrace.vtrace_returns)(
          v_tm1, v_t, view.rewards, view.discounts, rho, view.mask).vs
    else:
      returns = jax.vmap(common.lambda_returns,
                         in_axes=(0, 0, 0, None, 0))(
                             view.rewards, view.discounts, v_t, 1.0, view.mask)
    returns = jax.lax.stop_gradient(returns)  # targets, already sg; explicit
    advantages = returns - jax.lax.stop_gradient(v_tm1)
    target_out = jax.lax.stop_gradient(learner_forward(target_params, batch))
    policy_loss, extras = vmpo.vmpo_loss(
        logits, target_out.logits[:, :unroll], view.actions, advantages,
        view.mask, duals, cfg.vmpo)
    value_loss = cfg.vmpo.value_cost * common.masked_mean(
        0.5 * jnp.square(returns - v_tm1), view.mask)
    metrics = {f"vmpo/{k}": v for k, v in extras.items()}
    metrics["vmpo/value_loss"] = value_loss
    metrics["vmpo/advantage_mean"] = common.masked_mean(advantages, view.mask)
    return policy_loss + value_loss, metrics

  def distillation(teacher: types.AgentOutput, actor_out: types.AgentOutput,
                   mask: Array) -> tuple[Array, Metrics]:
    """alpha_pi KL(sg[pi_L] || pi_A) + alpha_V 1/2 (sg[V_L] - V_A)^2."""
    policy_kl = common.masked_mean(
        jax.vmap(distill.policy_distillation)(
            teacher.logits[:, :unroll], actor_out.logits[:, :unroll]), mask)
    value_sq = common.masked_mean(
        jax.vmap(distill.value_distillation)(
            teacher.value[:, :unroll], actor_out.value[:, :unroll]), mask)
    total = (cfg.distill.policy_cost * policy_kl +
             cfg.distill.value_cost * value_sq)
    return total, {"distill/policy_kl": policy_kl,
                   "distill/value_loss": value_sq}

  def losses(learner_params, actor_params, target_params,
             batch: types.Batch) -> tuple[Array, Metrics]:
    """Sum of all losses; each parameter set gets only its own gradient."""
    view = _unroll_view(batch, ctx, unroll, cfg.discount)
    learner_out = learner_forward(learner_params["net"], batch)
    rl, metrics = rl_loss(learner_params["duals"], target_params, batch, view,
                          learner_out)
    learner_logits = learner_out.logits[:, :unroll]
    total = rl
    metrics["learner/rl_loss"] = rl
    metrics["learner/entropy"] = common.masked_mean(
        common.entropy(learner_logits), view.mask)
    metrics["learner/value_mean"] = common.masked_mean(
        learner_out.value[:, :unroll], view.mask)
    if distills:
      actor_out = lstm_forward(actor_params, batch)
      actor_logits = actor_out.logits[:, :unroll]
      pull = common.masked_mean(
          jax.vmap(distill.policy_distillation)(actor_logits, learner_logits),
          view.mask)
      distill_loss, distill_metrics = distillation(learner_out, actor_out,
                                                   view.mask)
      total = total + cfg.distill.learner_pull_cost * pull + distill_loss
      metrics.update(distill_metrics)
      metrics["learner/pull_kl"] = pull
      metrics["actor/entropy"] = common.masked_mean(
          common.entropy(actor_logits), view.mask)
    metrics["loss/total"] = total
    return total, metrics

  def distill_losses(actor_params, learner_net_params,
                     batch: types.Batch) -> tuple[Array, Metrics]:
    teacher = jax.lax.stop_gradient(learner_forward(learner_net_params, batch))
    mask = _unroll_view(batch, ctx, unroll, cfg.discount).mask
    return distillation(teacher, lstm_forward(actor_params, batch), mask)

  # ---- init -------------------------------------------------------------------

  def actor_state_example(batch_size: int):
    if cfg.agent == "transformer":
      return ()
    return lstm_net.initial_state(batch_size)

  def example_batch(batch_size: int) -> types.Batch:
    return types.zeros_batch(batch_size, cfg.sequence_length, obs_shape,
                             num_actions, actor_state_example(batch_size))

  def init(rng: Array, batch: types.Batch) -> LearnerState:
    batch.validate(context=ctx, unroll=unroll, num_actions=num_actions,
                   obs_shape=obs_shape)
    rng, lstm_key, gtrxl_key, actor_key = jax.random.split(rng, 4)
    obs, step_type = batch.observation[:1], batch.step_type[:1]
    init_lstm = lambda key: lstm_net.init(
        key, obs, step_type, lstm_net.initial_state(1))
    init_gtrxl = lambda key: gtrxl_net.init(key, obs, step_type,
                                            num_memory_steps=ctx)
    if cfg.agent in ("ald", "transformer"):
      net = init_gtrxl(gtrxl_key)
    elif cfg.agent == "lstm":
      net = init_lstm(lstm_key)
    else:
      net = {"policy": init_lstm(lstm_key), "critic": init_gtrxl(gtrxl_key)}
    duals = vmpo.init_duals(cfg.vmpo) if use_vmpo else ()
    learner_params = {"net": net, "duals": duals}
    actor_params = init_lstm(actor_key) if distills else ()
    return LearnerState(
        learner_params=learner_params,
        actor_params=actor_params,
        target_params=net if use_vmpo else (),
        learner_opt_state=learner_opt.init(learner_params),
        actor_opt_state=actor_opt.init(actor_params) if distills else (),
        step=jnp.zeros((), jnp.int32),
        distill_step=jnp.zeros((), jnp.int32),
        rng=rng,
    )

  # ---- updates ------------------------------------------------------------------

  def step(state: LearnerState, batch: types.Batch):
    grad_fn = jax.value_and_grad(losses, argnums=(0, 1), has_aux=True)
    (_, metrics), (learner_grads, actor_grads) = grad_fn(
        state.learner_params, state.actor_params, state.target_params, batch)
    finite = _all_finite((metrics, learner_grads, actor_grads))
    updates, learner_opt_state = learner_opt.update(
        learner_grads, state.learner_opt_state, state.learner_params)
    learner_params = optax.apply_updates(state.learner_params, updates)
    actor_params, actor_opt_state = state.actor_params, state.actor_opt_state
    if distills:
      updates, actor_opt_state = actor_opt.update(
          actor_grads, actor_opt_state, actor_params)
      actor_params = optax.apply_updates(actor_params, updates)
    new_step = state.step + 1
    target_params = state.target_params
    if use_vmpo:
      refresh = new_step % cfg.vmpo.target_update_period == 0
      target_params = _select(refresh, learner_params["net"], target_params)
      metrics["vmpo/target_refreshed"] = refresh.astype(jnp.float32)
    proposed = state.replace(
        learner_params=learner_params, actor_params=actor_params,
        target_params=target_params, learner_opt_state=learner_opt_state,
        actor_opt_state=actor_opt_state, step=new_step)
    # A non-finite loss or gradient skips the whole update (counters too).
    new_state = _select(finite, proposed, state)
    metrics["learner/grad_norm"] = optax.global_norm(learner_grads)
    if distills:
      metrics["actor/grad_norm"] = optax.global_norm(actor_grads)
    metrics["nonfinite"] = 1.0 - finite.astype(jnp.float32)
    return new_state, metrics

  def distill_step_fn(state: LearnerState, batch: types.Batch):
    if not distills:
      raise ValueError(
          f"distill_step needs a separate actor (agent 'ald'); agent "
          f"{cfg.agent!r} acts with the learner itself")
    grad_fn = jax.value_and_grad(distill_losses, has_aux=True)
    (_, metrics), grads = grad_fn(state.actor_params,
                                  state.learner_params["net"], batch)
    finite = _all_finite((metrics, grads))
    updates, opt_state = actor_opt.update(grads, state.actor_opt_state,
                                          state.actor_params)
    proposed = state.replace(
        actor_params=optax.apply_updates(state.actor_params, updates),
        actor_opt_state=opt_state, distill_step=state.distill_step + 1)
    metrics["actor/grad_norm"] = optax.global_norm(grads)
    metrics["nonfinite"] = 1.0 - finite.astype(jnp.float32)
    return _select(finite, proposed, state), metrics

  # ---- acting -----------------------------------------------------------------

  def actor_params(state: LearnerState) -> Params:
    if cfg.agent == "ald":
      return state.actor_params
    if cfg.agent == "asymmetric":
      return state.learner_params["net"]["policy"]
    return state.learner_params["net"]

  # LSTM actors act through the lean path: logits and one packed [E, 2H]
  # state, fewer buffers per call (each output costs ~1 us at E=1).
  def actor_initial_state(batch_size: int):
    if cfg.agent == "transformer":
      return gtrxl_lib.gtrxl_initial_cache(cfg.gtrxl, batch_size)
    return policy_value.pack_lstm_state(lstm_net.initial_state(batch_size))

  def actor_step(params, observation, step_type, state, rng):
    if cfg.agent == "transformer":
      out, new_state = gtrxl_net.apply(params, observation, step_type, state,
                                       method="step")
      logits = out.logits
    else:
      logits, new_state = lstm_net.apply(params, observation, step_type,
                                         state, method="act")
    action = jax.random.categorical(rng, logits).astype(jnp.int32)
    return action, logits, new_state

  def recorded_state(state):
    if cfg.agent == "transformer":
      return ()
    return policy_value.unpack_lstm_state(state)

  return Learner(
      config=cfg,
      obs_shape=obs_shape,
      num_actions=num_actions,
      init=jax.jit(init),
      step=jax.jit(step, donate_argnums=0),
      distill_step=jax.jit(distill_step_fn, donate_argnums=0),
      actor_params=actor_params,
      actor_core=ActorCore(initial_state=actor_initial_state, step=actor_step,
                           recorded_state=recorded_state),
      example_batch=example_batch,
      losses=losses,
  )
