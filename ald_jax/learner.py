"""The importable ALD learner core: `make_learner -> Learner`.

One jitted `step(state, batch) -> (state, metrics)` updates
  * theta_L (the learner) with the RL loss (V-MPO or V-trace) + beta * KL(sg[pi_A] || pi_L),
  * theta_A (the actor) with alpha_pi * KL(sg[pi_L] || pi_A) + alpha_V * 1/2 (sg[V_L] - V_A)^2,
with separate optax optimizers (and, for V-MPO, a third one for the Lagrange
duals). Stop-gradients isolate the parameter sets, so one backward pass of the
summed loss gives each set exactly its own gradient (tests check this).

Two ways to read history before an unroll (docs/design.md, "Memory"):
  * `step` (cold): the transformer re-reads the row's C context steps.
  * `train_step(..., warm=True)`: Transformer-XL's recurrence. A
    `SegmentMemory` per environment stream keeps every layer's inputs at the
    last M steps of the stream's previous unroll (stop-gradient), so only
    the T + 1 new positions are computed. Cold and warm are two compiled
    variants of one function; both write the next memory.
The actor's LSTM always re-runs over the whole row from the state recorded at
its first step (`Batch.actor_state`), with gradients through the last
`actor_context` context steps: how far back the actor can learn to remember.

Agents (docs/design.md, "Agents") are rows of one table, `AGENT_SPECS`.
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
SegmentMemory = gtrxl_lib.SegmentMemory


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
  rng: Array                 # advanced by replay sampling


class ActorCore(NamedTuple):
  """What an actor needs to act with published parameters (the actor contract).

  `step` is pure; actors jit it on the CPU device themselves.
  """
  initial_state: Callable[[int], Any]
  # (params, observation [E,*obs], step_type [E], state, rng) ->
  #     (action [E] int32, logits [E,A], new_state)
  step: Callable[..., tuple[Array, Array, Any]]
  # Recurrent state -> what is stored in Batch.actor_state (row start).
  recorded_state: Callable[[Any], Any]


class Replay(NamedTuple):
  """A device ring of recent batch rows for distill-only steps.

  `teacher` holds the learner's logits/values on each row's T unroll steps as
  computed by the combined step that trained on it (empty when the teacher is
  recomputed); a skipped (non-finite) combined step writes nothing. Rows are
  overwritten oldest first, so a stored teacher output comes from one of the
  last ceil(capacity / batch_size) applied combined steps.
  """
  rows: types.Batch            # [capacity, C+T+1, ...]
  teacher: Any                 # AgentOutput [capacity, T(, A)] or ()
  next: Array                  # int32 ring position of the next write
  size: Array                  # int32 rows held


class AgentSpec(NamedTuple):
  """How one agent builds and runs its networks."""
  policy: str          # network trained by the RL loss and acting: gtrxl | lstm
  critic: str | None   # a separate value network (gtrxl), or None: the policy's
  distills: bool       # a separate LSTM actor is distilled from the learner
  description: str


AGENT_SPECS: dict[str, AgentSpec] = {
    "ald": AgentSpec("gtrxl", None, True,
                     "GTrXL learns (RL), an LSTM distilled from it acts"),
    "transformer": AgentSpec("gtrxl", None, False,
                             "GTrXL learns and acts (K/V-cache step)"),
    "lstm": AgentSpec("lstm", None, False, "LSTM learns and acts"),
    "asymmetric": AgentSpec("lstm", "gtrxl", False,
                            "LSTM policy acts, GTrXL critic"),
}
assert set(AGENT_SPECS) == set(config_lib.AGENTS)


class Learner(NamedTuple):
  """The learner's pure functions (jitted) and what they were built for.

  Importable core: `init`, `step`, `distill_step`, `actor_params`,
  `actor_core`, `example_batch`. The system additionally uses segment memory
  (`init_memory`, `train_step`) and the device replay (`init_replay`,
  `replay_distill_steps`); `learner_core` acts with the learner's own policy
  (evaluation of the learner-actor gap).
  """
  config: config_lib.LearnerConfig
  spec: AgentSpec
  obs_shape: tuple[int, ...]
  num_actions: int
  init: Callable[[Array, types.Batch], LearnerState]
  step: Callable[[LearnerState, types.Batch], tuple[LearnerState, Metrics]]
  distill_step: Callable[[LearnerState, types.Batch],
                         tuple[LearnerState, Metrics]]
  actor_params: Callable[[LearnerState], Params]
  actor_core: ActorCore
  learner_params_for_acting: Callable[[LearnerState], Params]
  learner_core: ActorCore
  example_batch: Callable[[int], types.Batch]
  # (net params, batch, memory rows or None) -> (AgentOutput [B, T+1], memory)
  forward: Callable[..., tuple[types.AgentOutput, Any]]
  # (actor params, batch) -> AgentOutput [B, T+1] of the distilled LSTM
  actor_forward: Callable[..., types.AgentOutput]
  uses_memory: bool
  init_memory: Callable[[int], Any]
  # (state, memory, replay, batch, warm) -> (state, memory, replay, metrics)
  train_step: Callable[..., tuple[LearnerState, Any, Replay, Metrics]]
  init_replay: Callable[[int], Replay]
  # (state, replay, num_steps) -> (state, metrics stacked [num_steps])
  replay_distill_steps: Callable[..., tuple[LearnerState, Metrics]]
  losses: Callable[..., tuple[Array, Metrics]]  # unjitted, for tests


def _network_optimizer(cfg: config_lib.OptimizerConfig
                       ) -> optax.GradientTransformation:
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


def _rows(tree, index: Array):
  return jax.tree_util.tree_map(lambda x: x[index], tree)


def _set_rows(tree, index: Array, values):
  return jax.tree_util.tree_map(lambda x, v: x.at[index].set(v), tree, values)


class UnrollView(NamedTuple):
  """The T loss steps of a batch, time-aligned for the losses ([B, T])."""
  actions: Array
  behaviour_logits: Array
  rewards: Array     # reward following the action at t
  discounts: Array   # gamma * env discount of step t+1; 0 where masked
  mask: Array        # 1.0 where the action at t was real (step t not LAST)


def unroll_view(batch: types.Batch, context: int, unroll: int,
                discount: float) -> UnrollView:
  """Step t of the unroll is row position C + t; what follows its action
  (reward, discount) arrives with position C + t + 1 (types.py)."""
  c, t = context, unroll
  step_type = batch.step_type[:, c:c + t]
  mask = (step_type != types.LAST).astype(jnp.float32)
  return UnrollView(
      actions=batch.action[:, c:c + t].astype(jnp.int32),
      behaviour_logits=batch.behaviour_logits[:, c:c + t],
      rewards=batch.reward[:, c + 1:c + t + 1] * mask,
      discounts=discount * batch.discount[:, c + 1:c + t + 1] * mask,
      mask=mask,
  )


def next_segment_memory(previous: SegmentMemory, layer_inputs: Array,
                        step_type: Array) -> SegmentMemory:
  """The last M steps of `previous` followed by n new steps (all valid).

  layer_inputs [B, num_layers, n, d], step_type [B, n]. Stop-gradient: memory
  is a constant for the next segment (Transformer-XL).
  """
  m = previous.inputs.shape[2]
  inputs = jnp.concatenate([previous.inputs, layer_inputs], axis=2)[:, :, -m:]
  steps = jnp.concatenate([previous.step_type, step_type], axis=1)[:, -m:]
  valid = jnp.concatenate(
      [previous.valid, jnp.ones(step_type.shape, bool)], axis=1)[:, -m:]
  return jax.lax.stop_gradient(SegmentMemory(inputs, steps, valid))


def lstm_actor_core(lstm_net: policy_value.LSTMPolicyValueNet) -> ActorCore:
  """The lean acting core of an LSTM actor (`make_learner`'s, and what the
  actor sizing ladder calibrates at each width)."""
  def lstm_step(params, observation, step_type, state, rng):
    logits, new_state = lstm_net.apply(params, observation, step_type,
                                       state, method="act")
    action = jax.random.categorical(rng, logits).astype(jnp.int32)
    return action, logits, new_state
  return ActorCore(
      initial_state=lambda batch_size: policy_value.pack_lstm_state(
          lstm_net.initial_state(batch_size)),
      step=lstm_step, recorded_state=policy_value.unpack_lstm_state)


def make_learner(config: config_lib.LearnerConfig,
                 obs_shape: tuple[int, ...],
                 num_actions: int) -> Learner:
  """Builds the learner for `config` and an environment's specs."""
  if not isinstance(config, config_lib.LearnerConfig):
    raise TypeError(f"config must be a LearnerConfig, got {type(config)}")
  obs_shape = tuple(int(d) for d in obs_shape)
  if len(obs_shape) not in config_lib.OBS_RANKS:
    raise config_lib.ConfigError(
        f"observation shape {obs_shape}: the torso takes vector [D] or grid "
        "[H, W, C] observations; flatten other shapes in the environment")
  if not isinstance(num_actions, int) or num_actions < 2:
    raise config_lib.ConfigError(
        f"num_actions must be an integer >= 2, got {num_actions!r}")

  cfg = config
  spec = AGENT_SPECS[cfg.agent]
  ctx, unroll = cfg.learner_context, cfg.unroll_length
  actor_context = ctx if cfg.actor_context is None else cfg.actor_context
  burn_in = ctx - actor_context   # row steps the LSTM runs without gradient
  obs_ndim = len(obs_shape)
  lstm_net = policy_value.LSTMPolicyValueNet(
      torso=cfg.torso, lstm=cfg.lstm, num_actions=num_actions,
      obs_ndim=obs_ndim)
  gtrxl_net = policy_value.GTrXLPolicyValueNet(
      torso=cfg.torso, gtrxl=cfg.gtrxl, num_actions=num_actions,
      obs_ndim=obs_ndim)
  use_vmpo = cfg.rl_loss == "vmpo"
  memory_net = spec.critic or spec.policy   # the GTrXL, if any
  uses_memory = memory_net == "gtrxl"

  # Network parameters train with clipped Adam; V-MPO's duals with their own
  # unclipped Adam (their gradients are O(1) and must not share the clip).
  learner_opt = optax.multi_transform(
      {"net": _network_optimizer(cfg.learner_optimizer),
       "duals": optax.adam(cfg.vmpo.dual_learning_rate)},
      {"net": "net", "duals": "duals"})
  actor_opt = _network_optimizer(cfg.actor_optimizer)

  # ---- forward passes: outputs at the T + 1 unroll + bootstrap steps --------

  def lstm_forward(params, batch: types.Batch, memory=None):
    """The LSTM from the state recorded at the row's first step, over the row.

    The first `burn_in` steps run without gradient (only their final state is
    used), so gradients reach `actor_context` steps before the unroll.
    """
    del memory
    obs, step_type, state = batch.observation, batch.step_type, batch.actor_state
    if burn_in > 0:
      _, state = lstm_net.apply(params, obs[:, :burn_in],
                                step_type[:, :burn_in], state)
      state = jax.lax.stop_gradient(state)
    out, _ = lstm_net.apply(params, obs[:, burn_in:], step_type[:, burn_in:],
                            state)
    return jax.tree_util.tree_map(lambda x: x[:, actor_context:], out), None

  def gtrxl_forward(params, batch: types.Batch, memory=None):
    """Cold (memory None): re-reads the C context steps as stop-gradient
    memory. Warm: reads `memory` and computes only the T + 1 new steps.
    Returns (outputs, the next segment memory of each row)."""
    if memory is None:
      out, layer_inputs = gtrxl_net.apply(
          params, batch.observation, batch.step_type, num_memory_steps=ctx,
          return_layer_inputs=True)
      out = jax.tree_util.tree_map(lambda x: x[:, ctx:], out)
      previous = gtrxl_lib.empty_segment_memory(cfg.gtrxl, batch.batch_size)
      new_inputs, new_steps = layer_inputs, batch.step_type
      new_from = 0
    else:
      out, layer_inputs = gtrxl_net.apply(
          params, batch.observation[:, ctx:], batch.step_type[:, ctx:],
          memory=memory, return_layer_inputs=True)
      previous, new_inputs, new_steps = memory, layer_inputs, batch.step_type
      new_from = ctx
    # The next unroll starts at this row's bootstrap step: memory ends before.
    next_memory = next_segment_memory(
        previous, new_inputs[:, :, :-1], new_steps[:, new_from:-1])
    return out, next_memory

  forwards = {"lstm": lstm_forward, "gtrxl": gtrxl_forward}

  def learner_forward(net_params, batch, memory=None):
    """(AgentOutput [B, T+1], next memory or None)."""
    if spec.critic is None:
      return forwards[spec.policy](net_params, batch, memory)
    policy_out, _ = forwards[spec.policy](net_params["policy"], batch)
    critic_out, next_memory = forwards[spec.critic](net_params["critic"],
                                                   batch, memory)
    return types.AgentOutput(policy_out.logits, critic_out.value), next_memory

  # ---- losses ---------------------------------------------------------------

  def rl_loss(duals, target_params, batch, memory, view: UnrollView,
              learner_out: types.AgentOutput) -> tuple[Array, Metrics]:
    inputs = common.ActorCriticInputs(
        learner_logits=learner_out.logits[:, :unroll],
        behaviour_logits=view.behaviour_logits, actions=view.actions,
        values=learner_out.value, rewards=view.rewards,
        discounts=view.discounts, mask=view.mask)
    trace = dict(lambda_=cfg.vtrace.lambda_,
                 clip_rho_threshold=cfg.vtrace.clip_rho_threshold,
                 clip_pg_rho_threshold=cfg.vtrace.clip_pg_rho_threshold)
    if not use_vmpo:
      loss, extras = vtrace.actor_critic_loss(
          inputs, baseline_cost=cfg.vtrace.baseline_cost,
          entropy_cost=cfg.vtrace.entropy_cost, **trace)
      return loss, {f"vtrace/{k}": v for k, v in extras.items()}
    # The target network reads the same memory as the online network.
    target_out, _ = learner_forward(target_params, batch, memory)
    loss, extras = vmpo.actor_critic_loss(
        inputs, target_logits=jax.lax.stop_gradient(
            target_out.logits[:, :unroll]),
        duals=duals, top_k_fraction=cfg.vmpo.top_k_fraction,
        epsilon_eta=cfg.vmpo.epsilon_eta,
        epsilon_alpha=cfg.vmpo.epsilon_alpha, value_cost=cfg.vmpo.value_cost,
        value_target=cfg.vmpo.value_target, lambda_=trace["lambda_"],
        clip_rho_threshold=trace["clip_rho_threshold"])
    return loss, {f"vmpo/{k}": v for k, v in extras.items()}

  def distillation(teacher: types.AgentOutput, actor_out: types.AgentOutput,
                   mask: Array) -> tuple[Array, Metrics]:
    """alpha_pi KL(sg[pi_L] || pi_A) + alpha_V 1/2 (sg[V_L] - V_A)^2 over the
    T unroll steps, each step weighted (`distill.step_weighting`)."""
    teacher_logits = teacher.logits[:, :unroll]
    policy_kl = jax.vmap(distill.policy_distillation)(
        teacher_logits, actor_out.logits[:, :unroll])
    value_sq = jax.vmap(distill.value_distillation)(
        teacher.value[:, :unroll], actor_out.value[:, :unroll])
    weights = distill.step_weights(teacher_logits, mask,
                                   cfg.distill.step_weighting)
    terms = distill.distillation_metrics(policy_kl, value_sq, weights, mask)
    total = (cfg.distill.policy_cost * terms["policy_kl_weighted"] +
             cfg.distill.value_cost * terms["value_loss_weighted"])
    metrics = {f"distill/{name}": value for name, value in terms.items()}
    return total, dict(metrics, **{"distill/loss": total})

  def losses_with_memory(learner_params, actor_params, target_params,
                         batch: types.Batch, memory=None):
    """Sum of all losses; aux = (metrics, teacher outputs, next memory)."""
    view = unroll_view(batch, ctx, unroll, cfg.discount)
    learner_out, next_memory = learner_forward(learner_params["net"], batch,
                                               memory)
    rl, metrics = rl_loss(learner_params["duals"], target_params, batch,
                          memory, view, learner_out)
    learner_logits = learner_out.logits[:, :unroll]
    total = rl
    metrics["learner/rl_loss"] = rl
    metrics["learner/entropy"] = common.masked_mean(
        common.entropy(learner_logits), view.mask)
    metrics["learner/value_mean"] = common.masked_mean(
        learner_out.value[:, :unroll], view.mask)
    if spec.distills:
      actor_out, _ = lstm_forward(actor_params, batch)
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
    teacher = jax.lax.stop_gradient(jax.tree_util.tree_map(
        lambda x: x[:, :unroll], learner_out))
    return total, (metrics, teacher, next_memory)

  def losses(learner_params, actor_params, target_params,
             batch: types.Batch) -> tuple[Array, Metrics]:
    """Cold losses (context re-read); for tests and custom training loops."""
    total, (metrics, _, _) = losses_with_memory(
        learner_params, actor_params, target_params, batch)
    return total, metrics

  def distill_losses(actor_params, teacher: types.AgentOutput,
                     batch: types.Batch) -> tuple[Array, Metrics]:
    mask = unroll_view(batch, ctx, unroll, cfg.discount).mask
    actor_out, _ = lstm_forward(actor_params, batch)
    return distillation(teacher, actor_out, mask)

  # ---- init -------------------------------------------------------------------

  def actor_state_example(batch_size: int):
    if spec.policy == "gtrxl" and not spec.distills:
      return ()
    return lstm_net.initial_state(batch_size)

  def example_batch(batch_size: int) -> types.Batch:
    return types.zeros_batch(batch_size, cfg.sequence_length, obs_shape,
                             num_actions, actor_state_example(batch_size))

  def init(rng: Array, batch: types.Batch) -> LearnerState:
    batch.validate(context=ctx, unroll=unroll, num_actions=num_actions,
                   obs_shape=obs_shape)
    rng, policy_key, critic_key, actor_key = jax.random.split(rng, 4)
    obs, step_type = batch.observation[:1], batch.step_type[:1]
    init_net = {
        "lstm": lambda key: lstm_net.init(key, obs, step_type,
                                          lstm_net.initial_state(1)),
        "gtrxl": lambda key: gtrxl_net.init(key, obs, step_type,
                                            num_memory_steps=ctx),
    }
    if spec.critic is None:
      net = init_net[spec.policy](policy_key)
    else:
      net = {"policy": init_net[spec.policy](policy_key),
             "critic": init_net[spec.critic](critic_key)}
    duals = vmpo.init_duals(cfg.vmpo.init_eta,
                            cfg.vmpo.init_alpha) if use_vmpo else ()
    learner_params = {"net": net, "duals": duals}
    actor_params = init_net["lstm"](actor_key) if spec.distills else ()
    return LearnerState(
        learner_params=learner_params,
        actor_params=actor_params,
        target_params=net if use_vmpo else (),
        learner_opt_state=learner_opt.init(learner_params),
        actor_opt_state=actor_opt.init(actor_params) if spec.distills else (),
        step=jnp.zeros((), jnp.int32),
        distill_step=jnp.zeros((), jnp.int32),
        rng=rng,
    )

  # ---- updates ------------------------------------------------------------------

  def update(state: LearnerState, batch: types.Batch, memory=None):
    """One combined update; (state, metrics, teacher, next memory)."""
    grad_fn = jax.value_and_grad(losses_with_memory, argnums=(0, 1),
                                 has_aux=True)
    (_, (metrics, teacher, next_memory)), (learner_grads, actor_grads) = (
        grad_fn(state.learner_params, state.actor_params, state.target_params,
                batch, memory))
    finite = _all_finite((metrics, learner_grads, actor_grads))
    updates, learner_opt_state = learner_opt.update(
        learner_grads, state.learner_opt_state, state.learner_params)
    learner_params = optax.apply_updates(state.learner_params, updates)
    actor_params, actor_opt_state = state.actor_params, state.actor_opt_state
    if spec.distills:
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
    metrics["learner/grad_norm"] = optax.global_norm(learner_grads["net"])
    if spec.distills:
      metrics["actor/grad_norm"] = optax.global_norm(actor_grads)
    metrics["nonfinite"] = 1.0 - finite.astype(jnp.float32)
    return new_state, metrics, teacher, next_memory, finite

  def step(state: LearnerState, batch: types.Batch):
    new_state, metrics, _, _, _ = update(state, batch)
    return new_state, metrics

  def init_memory(num_streams: int):
    if not uses_memory:
      return ()
    return gtrxl_lib.empty_segment_memory(cfg.gtrxl, num_streams)

  def replay_rows(batch: types.Batch) -> types.Batch:
    return batch.replace(stream_id=None, unroll_index=None)

  def init_replay(capacity: int) -> Replay:
    if capacity < cfg.batch_size:
      raise config_lib.ConfigError(
          f"replay_capacity: must be >= batch_size ({cfg.batch_size}), got "
          f"{capacity}")
    rows = jax.tree_util.tree_map(jnp.asarray, example_batch(capacity))
    teacher = ()
    if cfg.distill.teacher == "stored":
      teacher = types.AgentOutput(
          logits=jnp.zeros((capacity, unroll, num_actions), jnp.float32),
          value=jnp.zeros((capacity, unroll), jnp.float32))
    return Replay(rows=rows, teacher=teacher, next=jnp.zeros((), jnp.int32),
                  size=jnp.zeros((), jnp.int32))

  def train_step(state: LearnerState, memory, replay: Replay | None,
                 batch: types.Batch, warm: bool,
                 previous_nonfinite: Array | float = 0.0):
    """The system's combined step: segment memory in and out, replay add.

    `warm` (static): every row's stream has a valid memory (its previous
    unroll was the last one trained); else every row re-reads its context.
    Rows are addressed by `batch.stream_id` (each stream at most once when
    warm; a cold batch may repeat one, and which write wins is unknown).
    `previous_nonfinite` (traced scalar): a pipelined caller dispatches a
    warm step before it has read whether the previous step over the same
    streams was applied; that step's `nonfinite` flag, passed here, sends a
    warm step down the cold path on the device when it was skipped (its
    memory rows then hold the unroll before), as a serial caller would.
    """
    if uses_memory and isinstance(memory, SegmentMemory):
      rows_memory = _rows(memory, batch.stream_id)
      if warm:
        warm_path = jnp.asarray(previous_nonfinite) == 0
        new_state, metrics, teacher, next_memory, finite = jax.lax.cond(
            warm_path, lambda: update(state, batch, rows_memory),
            lambda: update(state, batch, None))
      else:
        warm_path = jnp.asarray(False)
        new_state, metrics, teacher, next_memory, finite = update(
            state, batch, None)
      # A skipped (non-finite) update leaves the memory as it was (cold
      # too: a NaN there must not wait for a later warm read).
      memory = _set_rows(memory, batch.stream_id,
                         _select(finite, next_memory, rows_memory))
    else:
      warm_path = jnp.asarray(False)
      new_state, metrics, teacher, _, finite = update(state, batch)
    metrics["learner/warm"] = warm_path.astype(jnp.float32)
    if replay is not None:
      # Only rows the learner trained on enter the replay: a skipped step's
      # rows (and their possibly non-finite teacher) are not written.
      capacity = replay.rows.action.shape[0]
      b = batch.batch_size
      positions = (replay.next + jnp.arange(b)) % capacity

      def write(tree, values):
        return _set_rows(tree, positions,
                         _select(finite, values, _rows(tree, positions)))

      stored = replay.teacher
      if cfg.distill.teacher == "stored":
        stored = write(stored, teacher)
      written = finite.astype(jnp.int32) * b
      replay = Replay(
          rows=write(replay.rows, replay_rows(batch)), teacher=stored,
          next=(replay.next + written) % capacity,
          size=jnp.minimum(replay.size + written, capacity))
    return new_state, memory, replay, metrics

  def distill_update(state: LearnerState, batch: types.Batch,
                     teacher: types.AgentOutput):
    if not spec.distills:
      raise ValueError(
          f"distill steps need a separate actor (agent 'ald'); agent "
          f"{cfg.agent!r} acts with the learner itself")
    grad_fn = jax.value_and_grad(distill_losses, has_aux=True)
    (_, metrics), grads = grad_fn(state.actor_params, teacher, batch)
    finite = _all_finite((metrics, grads))
    updates, opt_state = actor_opt.update(grads, state.actor_opt_state,
                                          state.actor_params)
    proposed = state.replace(
        actor_params=optax.apply_updates(state.actor_params, updates),
        actor_opt_state=opt_state, distill_step=state.distill_step + 1)
    metrics["actor/grad_norm"] = optax.global_norm(grads)
    metrics["nonfinite"] = 1.0 - finite.astype(jnp.float32)
    return _select(finite, proposed, state), metrics

  def recomputed_teacher(state: LearnerState, batch: types.Batch):
    out, _ = learner_forward(state.learner_params["net"], batch)
    return jax.lax.stop_gradient(
        jax.tree_util.tree_map(lambda x: x[:, :unroll], out))

  def distill_step_fn(state: LearnerState, batch: types.Batch):
    """Actor-only update on `batch`, the teacher recomputed (cold)."""
    return distill_update(state, batch, recomputed_teacher(state, batch))

  def replay_distill_step(state: LearnerState, replay: Replay):
    """Actor-only update on B rows sampled uniformly from the replay (with
    `state.rng`, which advances), using stored or recomputed teacher outputs."""
    rng, key = jax.random.split(state.rng)
    index = jax.random.randint(key, (cfg.batch_size,), 0,
                               jnp.maximum(replay.size, 1))
    batch = _rows(replay.rows, index)
    state = state.replace(rng=rng)
    if cfg.distill.teacher == "stored":
      teacher = _rows(replay.teacher, index)
    else:
      teacher = recomputed_teacher(state, batch)
    new_state, metrics = distill_update(state, batch, teacher)
    # The sampling key is consumed even when the update is skipped.
    return new_state.replace(rng=rng), metrics

  def replay_distill_steps(state: LearnerState, replay: Replay,
                           num_steps: int):
    """`num_steps` replay distill-only updates in one call (a scan over
    `replay_distill_step`): one dispatch of the state for all of them. Each
    step is skipped on its own if non-finite; metrics are stacked
    [num_steps]."""
    return jax.lax.scan(lambda s, _: replay_distill_step(s, replay), state,
                        None, length=num_steps)

  # ---- acting -----------------------------------------------------------------

  def policy_params(state: LearnerState) -> Params:
    net = state.learner_params["net"]
    return net if spec.critic is None else net["policy"]

  def actor_params(state: LearnerState) -> Params:
    return state.actor_params if spec.distills else policy_params(state)

  # LSTM actors act through the lean path: logits and one packed [E, 2H]
  # state, fewer buffers per call (each output costs ~1 us at E=1).
  def make_core(kind: str) -> ActorCore:
    if kind == "gtrxl":
      def gtrxl_step(params, observation, step_type, state, rng):
        out, new_state = gtrxl_net.apply(params, observation, step_type,
                                         state, method="step")
        action = jax.random.categorical(rng, out.logits).astype(jnp.int32)
        return action, out.logits, new_state
      return ActorCore(
          initial_state=functools.partial(gtrxl_lib.gtrxl_initial_cache,
                                          cfg.gtrxl),
          step=gtrxl_step, recorded_state=lambda state: ())

    return lstm_actor_core(lstm_net)

  actor_kind = "lstm" if spec.distills else spec.policy

  return Learner(
      config=cfg,
      spec=spec,
      obs_shape=obs_shape,
      num_actions=num_actions,
      init=jax.jit(init),
      step=jax.jit(step, donate_argnums=0),
      distill_step=jax.jit(distill_step_fn, donate_argnums=0),
      actor_params=actor_params,
      actor_core=make_core(actor_kind),
      learner_params_for_acting=policy_params,
      learner_core=make_core(spec.policy),
      example_batch=example_batch,
      forward=learner_forward,
      actor_forward=lambda params, batch: lstm_forward(params, batch)[0],
      uses_memory=uses_memory,
      init_memory=init_memory,
      train_step=jax.jit(train_step, static_argnames="warm",
                         donate_argnums=(0, 1, 2)),
      init_replay=init_replay,
      replay_distill_steps=jax.jit(replay_distill_steps,
                                   static_argnames="num_steps",
                                   donate_argnums=0),
      losses=losses,
  )
