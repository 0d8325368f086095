"""Frozen dataclass configs with validation.

Every config validates itself in `__post_init__`, so a bad value fails at
construction with a message naming the field, before any work starts.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any

AGENTS = ("ald", "lstm", "transformer", "asymmetric")
RL_LOSSES = ("vmpo", "vtrace")
VALUE_TARGETS = ("vtrace", "nstep")
STEP_WEIGHTINGS = ("uniform", "teacher_confidence")
TEACHERS = ("stored", "recompute")
LEARNER_MEMORIES = ("cached", "recompute")


class ConfigError(ValueError):
  """A configuration value is invalid. The message names the field."""


def _require(condition: bool, field: str, message: str) -> None:
  if not condition:
    raise ConfigError(f"{field}: {message}")


def _is_int(value: Any) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: Any, allow_inf: bool = False) -> bool:
  """A real number (not a bool), never NaN; inf only where allowed."""
  if not isinstance(value, numbers.Real) or isinstance(value, bool):
    return False
  return math.isfinite(value) or (allow_inf and not math.isnan(value))


def _positive_int(value: Any, field: str) -> None:
  _require(_is_int(value) and value > 0, field,
           f"must be a positive integer, got {value!r}")


def _non_negative(value: Any, field: str, allow_inf: bool = False) -> None:
  _require(_is_number(value, allow_inf) and value >= 0, field,
           f"must be a {'' if allow_inf else 'finite '}number >= 0, got "
           f"{value!r}")


def _positive(value: Any, field: str, allow_inf: bool = False) -> None:
  _require(_is_number(value, allow_inf) and value > 0, field,
           f"must be a {'' if allow_inf else 'finite '}number > 0, got "
           f"{value!r}")


def _probability(value: Any, field: str, allow_zero: bool = False) -> None:
  interval = f"{'[0' if allow_zero else '(0'}, 1]"
  _require(_is_number(value), field,
           f"must be a number in {interval}, got {value!r}")
  low_ok = value >= 0 if allow_zero else value > 0
  _require(low_ok and value <= 1, field, f"must be in {interval}, got "
           f"{value!r}")


def _int_tuple(value: Any, field: str, allow_empty: bool = True) -> None:
  _require(isinstance(value, tuple) and all(
      _is_int(v) and v > 0 for v in value), field,
           f"must be a tuple of positive integers, got {value!r}")
  _require(allow_empty or len(value) > 0, field, "must not be empty")


def _bool(value: Any, field: str) -> None:
  _require(isinstance(value, bool), field,
           f"must be True or False, got {value!r}")


def _nested(value: Any, expected: type, field: str) -> None:
  """A nested config must be its dataclass (checked before it is used)."""
  _require(isinstance(value, expected), field,
           f"must be a {expected.__name__}, got {value!r}")


# The observation ranks the torso takes: vector [D] and grid [H, W, C]
# (environments flatten rank 2, envs/specs.py). Here, not in types.py, so that
# ald_jax.envs stays numpy-only.
OBS_RANKS = (1, 3)


@dataclasses.dataclass(frozen=True)
class TorsoConfig:
  """Observation encoder shared by actor and learner designs.

  Grid observations ([H, W, C]) go through `conv_channels` 3x3 convolutions;
  every observation is then flattened through an MLP of `mlp_sizes`.
  """
  conv_channels: tuple[int, ...] = (16,)
  mlp_sizes: tuple[int, ...] = (128,)

  def __post_init__(self):
    _int_tuple(self.conv_channels, "torso.conv_channels")
    _int_tuple(self.mlp_sizes, "torso.mlp_sizes", allow_empty=False)


@dataclasses.dataclass(frozen=True)
class LSTMConfig:
  hidden_size: int = 128
  # Initial forget-gate bias: how far back the LSTM can start to learn to
  # remember (sigmoid(b)^span of a cue survives). 3.0: distillation then
  # teaches a 60-step memory in < 500 updates, 1.0 not in 2000
  # (experiments/results/probe_distill_span_*.json).
  forget_bias: float = 3.0

  def __post_init__(self):
    _positive_int(self.hidden_size, "lstm.hidden_size")
    _require(_is_number(self.forget_bias), "lstm.forget_bias",
             f"must be a finite number, got {self.forget_bias!r}")


@dataclasses.dataclass(frozen=True)
class GTrXLConfig:
  """Gated Transformer-XL (Parisotto et al. 2020).

  Defaults are sized to learn the built-in tasks in minutes on a 2-core CPU
  (a combined learner step ~80 ms there); 4 layers x 256 wide with memory 64
  costs ~0.5 s per step on that CPU and suits an accelerator.
  """
  num_layers: int = 3
  d_model: int = 128
  num_heads: int = 4
  mlp_size: int = 256
  # Steps each position attends back to (the Transformer-XL memory); the
  # acting step keeps a K/V cache of this length.
  memory_length: int = 32
  gate_bias: float = 2.0

  def __post_init__(self):
    _positive_int(self.num_layers, "gtrxl.num_layers")
    _positive_int(self.d_model, "gtrxl.d_model")
    _positive_int(self.num_heads, "gtrxl.num_heads")
    _positive_int(self.mlp_size, "gtrxl.mlp_size")
    _positive_int(self.memory_length, "gtrxl.memory_length")
    _require(self.d_model % self.num_heads == 0, "gtrxl.d_model",
             f"must be divisible by gtrxl.num_heads ({self.num_heads}), "
             f"got {self.d_model}")
    _require(_is_number(self.gate_bias), "gtrxl.gate_bias",
             f"must be a finite number, got {self.gate_bias!r}")


@dataclasses.dataclass(frozen=True)
class VMPOConfig:
  """V-MPO (Song et al. 2019) hyper-parameters."""
  top_k_fraction: float = 0.5
  epsilon_eta: float = 0.1        # temperature constraint
  epsilon_alpha: float = 0.01     # KL(target || online) trust region
  init_eta: float = 1.0
  init_alpha: float = 5.0
  value_cost: float = 0.5
  target_update_period: int = 10  # learner steps between target refreshes
  value_target: str = "vtrace"    # "vtrace" (off-policy corrected) | "nstep"
  # The duals (eta, alpha) have their own unclipped Adam: at the network's
  # learning rate, under its gradient clip, they barely moved (issue 7).
  dual_learning_rate: float = 1e-2

  def __post_init__(self):
    _probability(self.top_k_fraction, "vmpo.top_k_fraction")
    _positive(self.epsilon_eta, "vmpo.epsilon_eta")
    _positive(self.epsilon_alpha, "vmpo.epsilon_alpha")
    _positive(self.init_eta, "vmpo.init_eta")
    _positive(self.init_alpha, "vmpo.init_alpha")
    _non_negative(self.value_cost, "vmpo.value_cost")
    _positive_int(self.target_update_period, "vmpo.target_update_period")
    _positive(self.dual_learning_rate, "vmpo.dual_learning_rate")
    _require(isinstance(self.value_target, str) and
             self.value_target in VALUE_TARGETS, "vmpo.value_target",
             f"must be one of {VALUE_TARGETS}, got {self.value_target!r}")


@dataclasses.dataclass(frozen=True)
class VTraceConfig:
  """IMPALA / V-trace actor-critic (Espeholt et al. 2018)."""
  baseline_cost: float = 0.5
  entropy_cost: float = 0.01
  clip_rho_threshold: float = 1.0
  clip_pg_rho_threshold: float = 1.0
  lambda_: float = 1.0

  def __post_init__(self):
    _non_negative(self.baseline_cost, "vtrace.baseline_cost")
    _non_negative(self.entropy_cost, "vtrace.entropy_cost")
    _positive(self.clip_rho_threshold, "vtrace.clip_rho_threshold")
    _positive(self.clip_pg_rho_threshold, "vtrace.clip_pg_rho_threshold")
    _probability(self.lambda_, "vtrace.lambda_", allow_zero=True)


@dataclasses.dataclass(frozen=True)
class DistillConfig:
  """Actor-learner distillation coefficients (docs/design.md, "Losses").

  Defaults chosen by measurement (experiments/results/
  distill_weighting_cue_recall_2026-11-26_cpu2_summary.json: Cue Recall spans
  16 and 32, 2 seeds, 400k env steps): at span 32 only alpha_pi = 10 with
  teacher-confidence weights reached 90% on both seeds (144k, 247k env steps);
  alpha_pi = 1 uniform (the previous default) reached it on neither.
  """
  policy_cost: float = 10.0       # alpha_pi: KL(sg[pi_L] || pi_A)
  value_cost: float = 1.0         # alpha_V: 1/2 (sg[V_L] - V_A)^2
  learner_pull_cost: float = 0.0  # beta: KL(sg[pi_A] || pi_L), reaches theta_L
  # Per-step weights of both terms: "uniform", or "teacher_confidence"
  # (1 - H(pi_L)/log A, normalised to mean 1: decisive steps count more).
  step_weighting: str = "teacher_confidence"
  # Distill-only steps read the teacher's outputs "stored" with the replayed
  # rows by the combined step (LSTM only), or "recompute" them (GTrXL again).
  teacher: str = "stored"

  def __post_init__(self):
    _non_negative(self.policy_cost, "distill.policy_cost")
    _non_negative(self.value_cost, "distill.value_cost")
    _non_negative(self.learner_pull_cost, "distill.learner_pull_cost")
    _require(self.step_weighting in STEP_WEIGHTINGS, "distill.step_weighting",
             f"must be one of {STEP_WEIGHTINGS}, got {self.step_weighting!r}")
    _require(self.teacher in TEACHERS, "distill.teacher",
             f"must be one of {TEACHERS}, got {self.teacher!r}")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  learning_rate: float = 3e-4
  max_grad_norm: float = 1.0
  adam_eps: float = 1e-6

  def __post_init__(self):
    _positive(self.learning_rate, "optimizer.learning_rate")
    _positive(self.max_grad_norm, "optimizer.max_grad_norm", allow_inf=True)
    _positive(self.adam_eps, "optimizer.adam_eps")


@dataclasses.dataclass(frozen=True)
class LearnerConfig:
  """Everything the jitted learner step depends on.

  Batches hold `learner_context + unroll_length + 1` time steps: a context
  prefix the transformer reads as memory, the unroll the losses cover, and one
  bootstrap step (the first step of the next unroll).
  """
  agent: str = "ald"
  rl_loss: str = "vmpo"
  discount: float = 0.99
  unroll_length: int = 16
  learner_context: int = 32   # = gtrxl.memory_length: step 0 sees a full memory
  batch_size: int = 16
  # How the transformer reads history in a run: "cached" (Transformer-XL
  # segment memory per stream; the context is re-read only when a stream's
  # memory is missing) or "recompute" (always re-read the C context steps).
  learner_memory: str = "cached"
  # How far back the actor can learn to remember: context steps of each row
  # the LSTM is trained through (None: all C). Gradients then reach
  # actor_context + 1 steps back at the unroll's first step.
  actor_context: int | None = None
  torso: TorsoConfig = TorsoConfig()
  lstm: LSTMConfig = LSTMConfig()
  gtrxl: GTrXLConfig = GTrXLConfig()
  vmpo: VMPOConfig = VMPOConfig()
  vtrace: VTraceConfig = VTraceConfig()
  distill: DistillConfig = DistillConfig()
  learner_optimizer: OptimizerConfig = OptimizerConfig()
  actor_optimizer: OptimizerConfig = OptimizerConfig(learning_rate=1e-3)

  def __post_init__(self):
    for field, expected in (
        ("torso", TorsoConfig), ("lstm", LSTMConfig), ("gtrxl", GTrXLConfig),
        ("vmpo", VMPOConfig), ("vtrace", VTraceConfig),
        ("distill", DistillConfig), ("learner_optimizer", OptimizerConfig),
        ("actor_optimizer", OptimizerConfig)):
      _nested(getattr(self, field), expected, field)
    _require(isinstance(self.agent, str) and self.agent in AGENTS, "agent",
             f"must be one of {AGENTS}, got {self.agent!r}")
    _require(isinstance(self.rl_loss, str) and self.rl_loss in RL_LOSSES,
             "rl_loss",
             f"must be one of {RL_LOSSES}, got {self.rl_loss!r}")
    _probability(self.discount, "discount", allow_zero=True)
    _positive_int(self.unroll_length, "unroll_length")
    _require(_is_int(self.learner_context) and self.learner_context >= 0,
             "learner_context", f"must be an integer >= 0, got "
             f"{self.learner_context!r}")
    _positive_int(self.batch_size, "batch_size")
    _require(self.learner_memory in LEARNER_MEMORIES, "learner_memory",
             f"must be one of {LEARNER_MEMORIES}, got {self.learner_memory!r}")
    _require(self.actor_context is None or (
        isinstance(self.actor_context, int)
        and not isinstance(self.actor_context, bool)
        and 0 <= self.actor_context <= self.learner_context),
             "actor_context", f"must be None or an integer in [0, "
             f"learner_context={self.learner_context}], got "
             f"{self.actor_context!r}")

  @property
  def sequence_length(self) -> int:
    """Time steps in one batch row: context + unroll + bootstrap step."""
    return self.learner_context + self.unroll_length + 1



# Distill-only steps per RL step for "ald", chosen by measurement (3 seeds
# each, small sizes, this 2-core CPU): 4 instead of 1 took fewer env steps to
# threshold on every task measured: I-Maze N=12 median 255k vs 324k
# (imaze12_knobs_ratio4_2026-11-26_cpu2_summary.json), Meta-Fetch 3x3 1.22M vs
# never on 2 of 3 seeds (metafetch3_ratio4_...), Cue Recall span 32 163k vs
# 199k, span 64 250k vs 265k (ablation_distill_ratio*_...). The extra LSTM
# steps cost wall-clock where the learner is the bottleneck (CPU).
ALD_DISTILL_STEPS = 4.0

T_ACTOR_POLICIES = ("refuse", "warn")
ACTOR_MODES = ("threads", "processes", "ray")
NONFINITE_OBS_POLICIES = ("error", "mask")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """A whole ALD run: environment, learner, actors, budget and logging."""
  env: str = "imaze"
  env_kwargs: tuple[tuple[str, Any], ...] = ()   # (name, value) pairs
  learner: LearnerConfig = LearnerConfig()
  num_actors: int = 2
  envs_per_actor: int = 8
  total_env_steps: int = 500_000   # default I-Maze: >= 90% success by ~150k
  # Distill-only steps per combined step (float; None: ALD_DISTILL_STEPS for
  # "ald", the only agent with a separate actor, and 0 for the others).
  # Resolved at construction: `dataclasses.replace` that changes the agent
  # keeps the old agent's value unless it passes None again.
  distill_steps_per_rl_step: float | None = None
  replay_capacity: int = 256          # unroll rows kept for distill-only steps
  # Unrolls in flight between actors and learner (processes: split over
  # the actor threads' local queues, at least 1 each).
  queue_capacity: int = 8
  t_actor_budget_ms: float = 10.0
  t_actor_policy: str = "refuse"
  calibration_steps: int = 200
  # Confine the learner (main thread and XLA's CPU pool) to the cores actors
  # do not use. Off by default: on the 2-core CPU machine it cost ~25% of
  # learner steps/s and did not lower the actors' in-run T_actor p50 (GIL
  # hand-offs with the learner thread dominate there; see README).
  pin_learner: bool = False
  seed: int = 0
  logdir: str = "runs/default"
  report_interval_s: float = 5.0
  checkpoint_interval_s: float = 300.0
  keep_checkpoints: int = 3
  resume: bool = False
  # Fields a --resume may change (flag names, dotted paths or field names;
  # see system/run_dir.py). Everything else must match the stored config.
  resume_allow_change: tuple[str, ...] = ()
  # TensorBoard scalars in the run directory when tensorboardX is installed.
  tensorboard: bool = True
  max_consecutive_nonfinite: int = 10
  max_wall_time_s: float = 0.0        # 0: no wall-clock limit
  # Where actors run: "threads" in this process, "processes" in local actor
  # processes on this host (system/process_pool.py, standard library only),
  # "ray" in Ray actor processes, local or on a cluster (needs
  # `pip install 'ald_jax[ray]'`).
  actors: str = "threads"
  ray_address: str = ""               # ray: "" a local Ray; HOST:PORT joins
  actor_stall_s: float = 300.0        # no actor progress this long: stalled (0: off)
  max_actor_restarts: int = 3         # actor process restarts before failing
  # processes, ray: actor threads per actor process (`num_actors` counts
  # threads, so num_actors / threads_per_actor_process processes). Each
  # thread is pinned to its own assigned cores; a Ray process asks Ray for
  # this many CPUs.
  threads_per_actor_process: int = 1
  nonfinite_obs: str = "error"        # "error" stops the run; "mask" zeroes, counts
  # Actors get new parameters every publish_every_steps learner steps, at
  # most once per publish_interval_s; the host copy never stalls the loop.
  publish_every_steps: int = 1
  publish_interval_s: float = 0.02
  # JAX's persistent compilation cache: a second run or a --resume with the
  # same shapes loads its executables instead of compiling them.
  compilation_cache: bool = True
  # "": $ALD_JAX_CACHE_DIR, else ~/.cache/ald_jax/xla (system/compile_cache.py)
  compilation_cache_dir: str = ""
  # The learner-actor gap (system/evaluation.py): every eval_interval_s
  # seconds (0: off) a CPU thread plays eval_episodes episodes with the
  # learner acting alone and with the actor, on its own environments.
  eval_interval_s: float = 30.0
  eval_episodes: int = 8
  eval_greedy: bool = False           # argmax actions instead of sampling

  def __post_init__(self):
    _require(isinstance(self.env, str) and self.env != "", "env",
             f"must be a non-empty environment name, got {self.env!r}")
    _require(isinstance(self.env_kwargs, tuple) and all(
        isinstance(kv, tuple) and len(kv) == 2 and isinstance(kv[0], str)
        for kv in self.env_kwargs), "env_kwargs",
             "must be a tuple of (name, value) pairs")
    # One order (the CLI's): a resume compares configs field by field.
    object.__setattr__(self, "env_kwargs",
                       tuple(sorted(self.env_kwargs, key=lambda kv: kv[0])))
    _nested(self.learner, LearnerConfig, "learner")
    _positive_int(self.num_actors, "num_actors")
    _positive_int(self.envs_per_actor, "envs_per_actor")
    _positive_int(self.total_env_steps, "total_env_steps")
    if self.distill_steps_per_rl_step is None:
      object.__setattr__(self, "distill_steps_per_rl_step",
                         ALD_DISTILL_STEPS if self.learner.agent == "ald"
                         else 0.0)
    _non_negative(self.distill_steps_per_rl_step, "distill_steps_per_rl_step")
    _require(isinstance(self.resume_allow_change, tuple) and all(
        isinstance(name, str) and name for name in self.resume_allow_change),
             "resume_allow_change", "must be a tuple of field or flag names, "
             f"got {self.resume_allow_change!r}")
    _bool(self.tensorboard, "tensorboard")
    _require(self.distill_steps_per_rl_step == 0 or self.learner.agent == "ald",
             "distill_steps_per_rl_step",
             f"must be 0 for agent {self.learner.agent!r} (only 'ald' has a "
             "separate actor to distill into)")
    _positive_int(self.replay_capacity, "replay_capacity")
    _require(self.distill_steps_per_rl_step == 0 or
             self.replay_capacity >= self.learner.batch_size,
             "replay_capacity", f"must be >= batch_size "
             f"({self.learner.batch_size}) for distill-only steps, got "
             f"{self.replay_capacity}")
    _positive_int(self.queue_capacity, "queue_capacity")
    _positive(self.t_actor_budget_ms, "t_actor_budget_ms", allow_inf=True)
    _require(isinstance(self.t_actor_policy, str) and
             self.t_actor_policy in T_ACTOR_POLICIES, "t_actor_policy",
             f"must be one of {T_ACTOR_POLICIES}, got {self.t_actor_policy!r}")
    _positive_int(self.calibration_steps, "calibration_steps")
    # JAX keys take int64 seeds; actors derive theirs from seed + 1.
    _require(_is_int(self.seed) and 0 <= self.seed < 2**63 - 1, "seed",
             f"must be an integer in [0, 2**63 - 1), got {self.seed!r}")
    _require(isinstance(self.logdir, str) and self.logdir != "", "logdir",
             "must be a non-empty path")
    _positive(self.report_interval_s, "report_interval_s", allow_inf=True)
    _positive(self.checkpoint_interval_s, "checkpoint_interval_s",
              allow_inf=True)
    _positive_int(self.keep_checkpoints, "keep_checkpoints")
    _positive_int(self.max_consecutive_nonfinite, "max_consecutive_nonfinite")
    _bool(self.pin_learner, "pin_learner")
    _bool(self.resume, "resume")
    _non_negative(self.max_wall_time_s, "max_wall_time_s", allow_inf=True)
    _require(self.learner.batch_size <= self.num_actors * self.envs_per_actor,
             "batch_size", f"must be <= num_actors * envs_per_actor "
             f"({self.num_actors * self.envs_per_actor}): a batch holds each "
             f"environment stream at most once, got {self.learner.batch_size}")
    _require(self.actors in ACTOR_MODES, "actors",
             f"must be one of {ACTOR_MODES}, got {self.actors!r}")
    _require(isinstance(self.ray_address, str), "ray_address",
             f"must be a string (HOST:PORT or empty), got {self.ray_address!r}")
    _require(self.ray_address == "" or self.actors == "ray",
             "ray_address", "needs actors='ray' (--actors=ray)")
    _non_negative(self.actor_stall_s, "actor_stall_s")
    _require(isinstance(self.max_actor_restarts, int)
             and not isinstance(self.max_actor_restarts, bool)
             and self.max_actor_restarts >= 0, "max_actor_restarts",
             f"must be an integer >= 0, got {self.max_actor_restarts!r}")
    _positive_int(self.threads_per_actor_process, "threads_per_actor_process")
    _require(self.threads_per_actor_process == 1 or
             self.actors in ("processes", "ray"), "threads_per_actor_process",
             "needs actors='processes' or 'ray' (--actors=processes|ray)")
    _require(self.num_actors % self.threads_per_actor_process == 0,
             "threads_per_actor_process",
             f"must divide num_actors ({self.num_actors}): every actor process "
             f"runs the same number of threads, got "
             f"{self.threads_per_actor_process}")
    _require(self.nonfinite_obs in NONFINITE_OBS_POLICIES, "nonfinite_obs",
             f"must be one of {NONFINITE_OBS_POLICIES}, got "
             f"{self.nonfinite_obs!r}")
    _positive_int(self.publish_every_steps, "publish_every_steps")
    _non_negative(self.publish_interval_s, "publish_interval_s")
    _bool(self.compilation_cache, "compilation_cache")
    _require(isinstance(self.compilation_cache_dir, str),
             "compilation_cache_dir",
             f"must be a path or empty, got {self.compilation_cache_dir!r}")
    _non_negative(self.eval_interval_s, "eval_interval_s")
    _positive_int(self.eval_episodes, "eval_episodes")
    _bool(self.eval_greedy, "eval_greedy")

  @property
  def env_kwargs_dict(self) -> dict[str, Any]:
    return dict(self.env_kwargs)
