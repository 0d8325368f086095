"""The learner-actor gap, measured during the run (issue 8).

ALD fails silently when distillation fails: the learner knows the task, the
actor never learns it, and the training return (the actor's) looks like
plain slow learning. `Evaluator` measures both policies beside the running
system, in its own thread on the CPU device with its own environments:

    eval/learner_return, eval/learner_success   the learner acting alone
        (`Learner.learner_core` with `learner_params_for_acting`; for the
        GTrXL its K/V-cache acting step)
    eval/actor_return, eval/actor_success       the actor that acts in the run
        (`Learner.actor_core` with `actor_params`)
    eval/gap_return, eval/gap_success           learner - actor

Only `ald` has a separate actor. The other agents act with the learner's own
policy (`lstm`, `transformer`; `asymmetric` acts with its LSTM policy, the
GTrXL critic cannot act), so only `eval/actor_*` is measured for them: their
gap is zero by construction and is not logged.

Snapshots: the learner loop asks `due()` between steps and, when due, hands
over a host copy of both parameter sets with `submit` (one device-to-host
copy every `interval_s`, on the learner thread; actors are never touched).
The first evaluation is due at once, so every run measures its initial
policies. An evaluation in progress is never interrupted by a newer
snapshot: offers are declined while one runs.

The thread is started from the learner's thread and inherits its core set
(with --pin_learner: the learner's cores, not the actors').

Episodes: one environment per episode (`eval_episodes`) in one `BatchedEnv`,
each playing exactly its first episode (counting the first N finished
episodes of fewer environments would favour short episodes). Within one
evaluation both policies play the same environment seeds and sampling key
(a paired comparison); each evaluation draws new ones.

Errors: an exception in the evaluation thread stops the run with its cause
(`errors.EvaluationError` from `check()`), like an actor's: a measurement
that silently stops would hide exactly the failure it exists to show.
"""
from __future__ import annotations

import math
import threading
import time
import traceback
from typing import Any, Callable, Mapping, NamedTuple, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from ald_jax import learner as learner_lib  # ActorCore, the actor contract
from ald_jax import types
from ald_jax.system import actor as actor_lib
from ald_jax.system import errors

Params = Any
PREFIX = "eval/"
LEARNER, ACTOR = "learner", "actor"


class EvalResult(NamedTuple):
  """One policy's evaluation."""
  mean_return: float
  success_rate: float   # NaN when no episode reports success
  episodes: int


def make_eval_act(core: learner_lib.ActorCore,
                  greedy: bool) -> Callable[..., Any]:
  """Jitted acting step of an `ActorCore` for evaluation.

  act(params, observation, step_type, state, key) -> (action, state, key):
  the core's sampled action, or the argmax of its logits when `greedy`.
  """
  def act(params, observation, step_type, state, key):
    key, step_key = jax.random.split(key)
    sampled, logits, new_state = core.step(params, observation, step_type,
                                           state, step_key)
    action = (jnp.argmax(logits, axis=-1).astype(jnp.int32) if greedy
              else sampled)
    return action, new_state, key
  return jax.jit(act)


def play_episodes(act: Callable[..., Any], params: Params, initial_state: Any,
                  env: Any, key: Any,
                  should_stop: Callable[[], bool] | None = None
                  ) -> EvalResult | None:
  """Plays the first episode of each of `env`'s environments.

  Args:
    act: `make_eval_act(...)`.
    params / initial_state / key: the policy's parameters, its initial
      recurrent state for `env.num_envs` environments, a PRNG key.
    env: a `BatchedEnv` (reset(), step(actions), num_envs).
    should_stop: polled before every step; True abandons the evaluation.

  Returns the mean return and success rate over the `env.num_envs`
  episodes, or None when stopped first.
  """
  n = env.num_envs
  returns = np.full(n, np.nan)
  successes = np.full(n, np.nan)
  done = np.zeros(n, bool)
  timestep = env.reset()
  state = initial_state
  while not done.all():
    if should_stop is not None and should_stop():
      return None
    action, state, key = act(params, timestep.observation, timestep.step_type,
                             state, key)
    timestep = env.step(np.asarray(action))
    finished = timestep.last() & ~done
    returns[finished] = timestep.episode_return[finished]
    successes[finished] = timestep.episode_success[finished]
    done |= finished
  reported = successes[~np.isnan(successes)]
  return EvalResult(
      mean_return=float(np.mean(returns)),
      success_rate=float(np.mean(reported)) if reported.size else math.nan,
      episodes=n)


def eval_policies(learner: Any) -> dict[str, Any]:
  """`{name: ActorCore}` to evaluate: learner and actor for an agent with a
  separate actor (`ald`), else the one acting policy as "actor"."""
  if learner.spec.distills:
    return {LEARNER: learner.learner_core, ACTOR: learner.actor_core}
  return {ACTOR: learner.actor_core}


def eval_params(learner: Any, state: Any) -> dict[str, Params]:
  """The parameters of each of `eval_policies(learner)` in `state`."""
  params = {ACTOR: learner.actor_params(state)}
  if learner.spec.distills:
    params[LEARNER] = learner.learner_params_for_acting(state)
  return params


def metric_names(policies: Sequence[str]) -> list[str]:
  """The row keys an evaluator of `policies` writes, in order."""
  names = []
  for name in policies:
    names += [f"{PREFIX}{name}_return", f"{PREFIX}{name}_success"]
  if LEARNER in policies and ACTOR in policies:
    names += [f"{PREFIX}gap_return", f"{PREFIX}gap_success"]
  return names + [f"{PREFIX}env_steps", f"{PREFIX}learner_steps",
                  f"{PREFIX}evaluations", f"{PREFIX}duration_s"]


def result_metrics(results: Mapping[str, EvalResult]) -> dict[str, float]:
  """Row entries of one evaluation's results (policy name -> result)."""
  row = {}
  for name, result in results.items():
    row[f"{PREFIX}{name}_return"] = result.mean_return
    row[f"{PREFIX}{name}_success"] = result.success_rate
  if LEARNER in results and ACTOR in results:
    learner, actor = results[LEARNER], results[ACTOR]
    row[f"{PREFIX}gap_return"] = learner.mean_return - actor.mean_return
    row[f"{PREFIX}gap_success"] = learner.success_rate - actor.success_rate
  return row


def evaluation_seed(seed: int, segment: int, index: int) -> int:
  """Environment seed and sampling key of evaluation `index` (distinct from
  every actor's: a different SeedSequence entropy length)."""
  return int(np.random.SeedSequence([seed, segment, index, 1])
             .generate_state(1)[0])


class _Snapshot(NamedTuple):
  params: dict[str, Params]
  env_steps: int
  learner_steps: int


class Evaluator:
  """Evaluates submitted parameter snapshots in a background thread.

  Args:
    policies: `{name: ActorCore}` (see `eval_policies`).
    make_env: `seed -> BatchedEnv` with one environment per episode.
    interval_s: seconds between the starts of evaluations (> 0).
    greedy: act with the argmax of the logits instead of sampling.
    seed / segment: seed the evaluations (see `evaluation_seed`).
    poll_s: how often a running evaluation checks for an abort.

  Use: `start()`; the learner loop calls `due()` and `submit(...)` and
  `check()` (raises EvaluationError with the cause), and at the end of a run
  `evaluate_now(...)` on its final parameters; `metrics()` is the
  latest completed evaluation (NaN before the first); `close()` declines new
  snapshots; `stop(deadline_s)` lets the evaluation in progress finish for
  part of the deadline, then abandons it.
  """

  def __init__(self, policies: Mapping[str, Any],
               make_env: Callable[[int], Any], *, interval_s: float,
               greedy: bool = False, seed: int = 0, segment: int = 0):
    if not policies or not set(policies) <= {LEARNER, ACTOR}:
      raise ValueError(f"policies must be a non-empty subset of "
                       f"{(LEARNER, ACTOR)}, got {sorted(policies)}")
    if not interval_s > 0:
      raise ValueError(f"interval_s must be > 0, got {interval_s!r}")
    self._policies = dict(policies)
    self._make_env = make_env
    self._interval_s = interval_s
    self._greedy = greedy
    self._seed = seed
    self._segment = segment
    self._cond = threading.Condition()
    self._pending: _Snapshot | None = None
    self._busy = False
    self._closed = False
    self._abort = threading.Event()
    self._last_submit: float | None = None
    self._metrics = {name: math.nan for name in metric_names(
        [name for name in (LEARNER, ACTOR) if name in self._policies])}
    self._metrics[f"{PREFIX}evaluations"] = 0
    self.error: BaseException | None = None
    self.error_traceback: str | None = None
    self._thread = threading.Thread(target=self._run, name="evaluation",
                                    daemon=True)
    self._acts = {name: make_eval_act(core, greedy)
                  for name, core in self._policies.items()}

  def compile(self, params: Mapping[str, Params],
              obs_shape: Sequence[int]) -> None:
    """Compiles each policy's evaluation step (one step on zeros, on the
    CPU, for the evaluation's batch of environments), so that the first
    evaluation compiles nothing."""
    env = self._make_env(0)
    try:
      num_envs = env.num_envs
    finally:
      actor_lib.close_quietly(env, "evaluation")
    cpu = jax.devices("cpu")[0]
    with jax.default_device(cpu):
      for name, act in self._acts.items():
        core = self._policies[name]
        jax.block_until_ready(act(
            jax.device_put(params[name], cpu),
            np.zeros((num_envs, *obs_shape), np.float32),
            np.full((num_envs,), types.FIRST, np.int32),
            jax.device_put(core.initial_state(num_envs), cpu),
            jax.device_put(jax.random.key(0), cpu)))

  # ---- the learner loop's side ----

  def start(self) -> None:
    self._thread.start()

  @property
  def started(self) -> bool:
    return self._thread.ident is not None

  def due(self) -> bool:
    """Whether a snapshot would be taken now (idle, interval elapsed)."""
    with self._cond:
      if self._closed or self._busy or self._pending is not None:
        return False
      return (self._last_submit is None or
              time.monotonic() - self._last_submit >= self._interval_s)

  def submit(self, params: dict[str, Params], env_steps: int,
             learner_steps: int) -> bool:
    """Hands over a snapshot (host arrays); False if declined (not due)."""
    missing = set(self._policies) - set(params)
    if missing:
      raise ValueError(f"snapshot misses parameters for {sorted(missing)}")
    if not self.due():
      return False
    return self._hand_over(params, env_steps, learner_steps)

  def _hand_over(self, params: dict[str, Params], env_steps: int,
                 learner_steps: int) -> bool:
    with self._cond:
      if self._closed:
        return False
      self._pending = _Snapshot(params, int(env_steps), int(learner_steps))
      self._last_submit = time.monotonic()
      self._cond.notify_all()
    return True

  def evaluate_now(self, params: dict[str, Params], env_steps: int,
                   learner_steps: int, timeout_s: float,
                   should_stop: Callable[[], bool] = lambda: False) -> bool:
    """Evaluates `params` whatever the interval and waits for the result
    (after any evaluation in progress); False if it did not finish within
    `timeout_s` or `should_stop()` turned true meanwhile (checked every
    0.1 s: a stop signal does not wait for it). It may still finish, or be
    abandoned by `stop`."""
    deadline = time.monotonic() + timeout_s

    def wait() -> bool:
      while not should_stop():
        left = deadline - time.monotonic()
        if self.wait_idle(min(0.1, max(0.0, left))):
          return True
        if left <= 0:
          return False
      return False

    if not (self.started and wait() and
            self._hand_over(params, env_steps, learner_steps)):
      return False
    return wait()

  def check(self) -> None:
    """Raises EvaluationError (cause chained) if the evaluation failed."""
    if self.error is not None:
      raise errors.EvaluationError(
          f"run stopped by an error in the evaluation thread: "
          f"{type(self.error).__name__}: {self.error}",
          self.error_traceback) from self.error

  def metrics(self) -> dict[str, float]:
    """The latest completed evaluation's row entries (NaN before any)."""
    with self._cond:
      return dict(self._metrics)

  def wait_idle(self, timeout_s: float) -> bool:
    """Waits until no snapshot is pending or evaluating; False on timeout."""
    deadline = time.monotonic() + timeout_s
    with self._cond:
      while self._busy or self._pending is not None:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not self._thread.is_alive():
          return not (self._busy or self._pending is not None)
        self._cond.wait(remaining)
      return True

  def close(self) -> None:
    """Declines further snapshots; a pending or running one still finishes."""
    with self._cond:
      self._closed = True
      self._cond.notify_all()

  def stop(self, deadline_s: float, finish_s: float | None = None
           ) -> list[str]:
    """Stops within `deadline_s`.

    The evaluation in progress (or pending) may finish during the first
    `finish_s` seconds (default: half the deadline); then it is abandoned
    (checked before every environment step). Returns ["evaluation"] if the
    thread is still running at the deadline (stuck in its environment; left
    as a daemon thread), else [].
    """
    self.close()
    if self._thread.ident is None:
      return []
    deadline = time.monotonic() + deadline_s
    finish_s = deadline_s / 2 if finish_s is None else finish_s
    self._thread.join(timeout=max(0.0, min(finish_s, deadline_s)))
    if self._thread.is_alive():
      self._abort.set()
      self._thread.join(timeout=max(0.0, deadline - time.monotonic()))
    if self._thread.is_alive():
      logging.error("the evaluation thread is still running %.0f s after "
                    "stop (stuck in its environment; left as a daemon "
                    "thread)", deadline_s)
      return [self._thread.name]
    return []

  # ---- the evaluation thread ----

  def _next_snapshot(self) -> _Snapshot | None:
    with self._cond:
      while self._pending is None and not self._closed:
        self._cond.wait()
      snapshot, self._pending = self._pending, None
      self._busy = snapshot is not None
      return snapshot

  def _run(self) -> None:
    try:
      cpu = jax.devices("cpu")[0]
      with jax.default_device(cpu):
        acts = self._acts
        index = 0
        while True:
          snapshot = self._next_snapshot()
          if snapshot is None:
            return
          start = time.perf_counter()
          results = self._evaluate(acts, snapshot, index, cpu)
          index += 1
          with self._cond:
            if results is not None:
              self._metrics.update(result_metrics(results))
              self._metrics.update({
                  f"{PREFIX}env_steps": snapshot.env_steps,
                  f"{PREFIX}learner_steps": snapshot.learner_steps,
                  f"{PREFIX}evaluations":
                      self._metrics[f"{PREFIX}evaluations"] + 1,
                  f"{PREFIX}duration_s": time.perf_counter() - start})
            self._busy = False
            self._cond.notify_all()
    except BaseException as error:  # pylint: disable=broad-except
      logging.error("evaluation failed: %r", error)
      self.error_traceback = "".join(traceback.format_exception(
          type(error), error, error.__traceback__))
      self.error = error
    finally:
      with self._cond:
        self._busy = False
        self._pending = None
        self._cond.notify_all()

  def _evaluate(self, acts: Mapping[str, Any], snapshot: _Snapshot,
                index: int, cpu: jax.Device) -> dict[str, EvalResult] | None:
    seed = evaluation_seed(self._seed, self._segment, index)
    results = {}
    for name, act in acts.items():
      core = self._policies[name]
      env = self._make_env(seed)
      try:
        result = play_episodes(
            act, jax.device_put(snapshot.params[name], cpu),
            jax.device_put(core.initial_state(env.num_envs), cpu), env,
            jax.device_put(jax.random.key(seed), cpu),
            should_stop=self._abort.is_set)
      finally:
        actor_lib.close_quietly(env, "evaluation")
      if result is None:
        return None
      results[name] = result
    return results
