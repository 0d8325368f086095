"""The learner-actor gap evaluation: exact returns, the thread, run rows."""
import math
import threading

from absl import app
from absl import flags
import dm_env
from dm_env import specs as dm_specs
import jax
import jax.numpy as jnp
import matplotlib.axes
import matplotlib.image
import numpy as np
import pytest

from ald_jax import config as config_lib
from ald_jax import learner as learner_lib
from ald_jax import metrics as metrics_lib
from ald_jax import plot
from ald_jax import train as train_lib
from ald_jax import types
from ald_jax.envs import batched
from ald_jax.envs import imaze
from ald_jax.system import errors
from ald_jax.system import evaluation
from ald_jax.system import run

from helpers import actor_threads_alive, tiny_run  # pylint: disable=wrong-import-order

WAIT_S = 120.0  # generous bound on a wait that must not hang


# tiny_run evaluates nothing; these runs evaluate at the start and then every
# 30 s (the default).
EVALUATING = dict(eval_interval_s=30.0)

def episode_length(seed):
  return 2 + seed % 3


class AlternatingEnv(dm_env.Environment):
  """Pays +1 when the action equals the step index mod 2, else -1.

  Episodes last `episode_length(seed)` steps; success = every step paid +1.
  `length=None` never ends (for abort tests); `on_step` is called per step.
  """

  def __init__(self, seed, length="by_seed", on_step=None):
    self._length = episode_length(seed) if length == "by_seed" else length
    self._on_step = on_step
    self._t = 0
    self._return = 0.0

  def _observation(self):
    return np.array([self._t], np.float32)

  def reset(self):
    self._t, self._return = 0, 0.0
    return dm_env.restart(self._observation())

  def step(self, action):
    if self._on_step is not None:
      self._on_step()
    reward = 1.0 if int(action) == self._t % 2 else -1.0
    self._t += 1
    self._return += reward
    if self._length is not None and self._t >= self._length:
      return dm_env.termination(reward, self._observation())
    return dm_env.transition(reward, self._observation())

  def episode_success(self):
    return self._return == self._length

  def observation_spec(self):
    return dm_specs.Array((1,), np.float32)

  def action_spec(self):
    return dm_specs.DiscreteArray(2)


def counting_core():
  """A hand-made recurrent policy: action = (steps so far + shift) mod 2.

  Its state counts the steps of the current episode (reset on FIRST), so
  shift 0 plays AlternatingEnv perfectly and shift 1 always wrongly. The
  logits make the sampled action certain (the other has probability
  exp(-1e9) = 0).
  """
  def step(params, observation, step_type, state, rng):
    del observation
    state = jnp.where(step_type == types.FIRST, 0, state)
    target = (state + params["shift"]) % 2
    logits = jnp.where(jax.nn.one_hot(target, 2) > 0, 0.0, -1e9)
    action = jax.random.categorical(rng, logits).astype(jnp.int32)
    return action, logits, state + 1
  return learner_lib.ActorCore(
      initial_state=lambda n: jnp.zeros((n,), jnp.int32), step=step,
      recorded_state=lambda state: state)


PERFECT, WRONG = {"shift": 0}, {"shift": 1}


@pytest.mark.parametrize("greedy", [False, True])
def test_hand_made_policy_gets_its_exact_return(greedy):
  env = batched.BatchedEnv(AlternatingEnv, 5, seed=7)
  lengths = [episode_length(s) for s in env.seeds]
  assert len(set(lengths)) > 1  # short episodes finish first and restart
  act = evaluation.make_eval_act(counting_core(), greedy)
  core = counting_core()
  perfect = evaluation.play_episodes(act, PERFECT, core.initial_state(5),
                                     env, jax.random.key(0))
  # The first episode of each environment counts, whatever its length.
  assert perfect == evaluation.EvalResult(float(np.mean(lengths)), 1.0, 5)
  wrong = evaluation.play_episodes(act, WRONG, core.initial_state(5), env,
                                   jax.random.key(1))
  assert wrong == evaluation.EvalResult(-float(np.mean(lengths)), 0.0, 5)


def test_play_episodes_without_success_reports_nan():
  class NoSuccess(AlternatingEnv):
    episode_success = None
  env = batched.BatchedEnv(NoSuccess, 2, seed=0)
  result = evaluation.play_episodes(
      evaluation.make_eval_act(counting_core(), False), PERFECT,
      counting_core().initial_state(2), env, jax.random.key(0))
  assert math.isnan(result.success_rate)


def make_evaluator(make_env=None, **kwargs):
  core = counting_core()
  return evaluation.Evaluator(
      {"learner": core, "actor": core},
      make_env or (lambda seed: batched.BatchedEnv(AlternatingEnv, 4, seed)),
      interval_s=kwargs.pop("interval_s", 3600.0), **kwargs)


def test_evaluator_measures_learner_actor_and_gap():
  evaluator = make_evaluator(seed=3)
  before = evaluator.metrics()
  assert math.isnan(before["eval/gap_return"])
  assert before["eval/evaluations"] == 0
  evaluator.start()
  assert evaluator.due()  # the first evaluation is due at once
  assert evaluator.submit({"learner": PERFECT, "actor": WRONG}, env_steps=123,
                          learner_steps=4)
  assert not evaluator.due()  # busy, then the interval has not elapsed
  assert not evaluator.submit({"learner": PERFECT, "actor": WRONG}, 0, 0)
  assert evaluator.wait_idle(WAIT_S)
  assert evaluator.stop(WAIT_S) == []
  evaluator.check()
  seed = evaluation.evaluation_seed(3, 0, 0)
  mean_length = float(np.mean([episode_length(s) for s in
                               batched.derive_seeds(seed, 4)]))
  got = evaluator.metrics()
  assert got["eval/learner_return"] == mean_length
  assert got["eval/actor_return"] == -mean_length
  assert got["eval/gap_return"] == 2 * mean_length
  assert (got["eval/learner_success"], got["eval/actor_success"],
          got["eval/gap_success"]) == (1.0, 0.0, 1.0)
  assert (got["eval/env_steps"], got["eval/learner_steps"],
          got["eval/evaluations"]) == (123, 4, 1)
  assert set(got) == set(evaluation.metric_names(["learner", "actor"]))


def test_evaluate_now_ignores_the_interval_and_waits_for_its_result():
  evaluator = make_evaluator()  # interval: an hour
  assert not evaluator.evaluate_now({"learner": PERFECT, "actor": WRONG},
                                    1, 1, WAIT_S)  # not started: declined
  evaluator.start()
  assert evaluator.submit({"learner": PERFECT, "actor": WRONG}, 10, 1)
  assert not evaluator.due()
  # Runs after the one in progress, though the interval has not elapsed.
  assert evaluator.evaluate_now({"learner": WRONG, "actor": PERFECT},
                                env_steps=99, learner_steps=7,
                                timeout_s=WAIT_S)
  got = evaluator.metrics()
  assert (got["eval/env_steps"], got["eval/learner_steps"],
          got["eval/evaluations"]) == (99, 7, 2)
  assert got["eval/gap_return"] < 0  # the second snapshot's policies
  evaluator.close()
  assert not evaluator.evaluate_now({"learner": PERFECT, "actor": WRONG},
                                    100, 8, WAIT_S)  # closed: declined
  assert evaluator.stop(WAIT_S) == []


def test_metric_names_match_the_metrics_module():
  names = evaluation.metric_names(["learner", "actor"])
  for key in (metrics_lib.EVAL_LEARNER_RETURN, metrics_lib.EVAL_ACTOR_RETURN,
              metrics_lib.EVAL_GAP_RETURN, metrics_lib.EVAL_LEARNER_SUCCESS,
              metrics_lib.EVAL_ACTOR_SUCCESS, metrics_lib.EVAL_GAP_SUCCESS,
              metrics_lib.EVAL_ENV_STEPS, metrics_lib.EVAL_COUNT):
    assert key in names
  alone = evaluation.metric_names(["actor"])
  assert metrics_lib.EVAL_ACTOR_RETURN in alone
  assert not any("learner_" in n or "gap" in n for n in alone
                 if n != "eval/learner_steps")


def test_an_error_in_the_evaluation_is_reported_with_its_cause():
  def broken_env(seed):
    raise RuntimeError(f"eval env {seed} exploded on purpose")
  evaluator = make_evaluator(make_env=broken_env)
  evaluator.start()
  evaluator.submit({"learner": PERFECT, "actor": WRONG}, 0, 0)
  assert evaluator.wait_idle(WAIT_S)
  with pytest.raises(errors.EvaluationError,
                     match="exploded on purpose") as info:
    evaluator.check()
  assert isinstance(info.value.__cause__, RuntimeError)
  assert "broken_env" in info.value.cause_traceback
  assert evaluator.stop(WAIT_S) == []


def test_a_failing_close_does_not_replace_the_evaluations_error():
  class StepAndCloseFail(batched.BatchedEnv):
    def close(self):
      raise OSError("close failed too")

  def explode():
    raise RuntimeError("eval step exploded on purpose")

  evaluator = make_evaluator(make_env=lambda seed: StepAndCloseFail(
      lambda s: AlternatingEnv(s, on_step=explode), 4, seed))
  evaluator.start()
  evaluator.submit({"learner": PERFECT, "actor": WRONG}, 0, 0)
  assert evaluator.wait_idle(WAIT_S)
  with pytest.raises(errors.EvaluationError, match="step exploded"):
    evaluator.check()
  assert evaluator.stop(WAIT_S) == []


def endless_evaluation():
  """A started evaluator whose first evaluation never ends (it has begun)."""
  stepping = threading.Event()
  evaluator = make_evaluator(make_env=lambda seed: batched.BatchedEnv(
      lambda s: AlternatingEnv(s, length=None, on_step=stepping.set), 2,
      seed))
  evaluator.start()
  evaluator.submit({"learner": PERFECT, "actor": WRONG}, 0, 0)
  assert stepping.wait(WAIT_S)
  return evaluator


def test_stop_abandons_an_endless_evaluation():
  evaluator = endless_evaluation()
  # No time to finish: abandoned at its next step, well before the deadline.
  assert evaluator.stop(WAIT_S, finish_s=0.0) == []
  evaluator.check()
  assert evaluator.metrics()["eval/evaluations"] == 0


@pytest.mark.timeout(60)
def test_a_stop_request_ends_the_wait_for_a_final_evaluation():
  """A stop signal during the final evaluation (an endless one here) does
  not wait out its long deadline."""
  evaluator, stop = endless_evaluation(), threading.Event()
  threading.Timer(0.2, stop.set).start()
  assert not evaluator.evaluate_now({"learner": PERFECT, "actor": WRONG}, 0,
                                    0, timeout_s=3600.0,
                                    should_stop=stop.is_set)
  assert evaluator.stop(WAIT_S, finish_s=0.0) == []


def test_stop_lets_a_pending_evaluation_finish():
  evaluator = make_evaluator()
  evaluator.start()
  evaluator.submit({"learner": PERFECT, "actor": WRONG}, 0, 0)
  assert evaluator.stop(WAIT_S, finish_s=WAIT_S) == []
  assert evaluator.metrics()["eval/evaluations"] == 1


@pytest.mark.parametrize("agent", config_lib.AGENTS)
def test_policies_and_params_per_agent(agent):
  learner = learner_lib.make_learner(tiny_run("unused", agent).learner, (5,),
                                     3)
  policies = evaluation.eval_policies(learner)
  if agent == "ald":
    assert policies == {"learner": learner.learner_core,
                        "actor": learner.actor_core}
  else:  # the acting policy is the learner's own: no gap to measure
    assert policies == {"actor": learner.actor_core}
  state = jax.eval_shape(learner.init, jax.random.PRNGKey(0),
                         learner.example_batch(8))
  params = evaluation.eval_params(learner, state)
  assert set(params) == set(policies)
  assert params["actor"] is learner.actor_params(state)
  if agent == "ald":
    assert params["learner"] is learner.learner_params_for_acting(state)


def test_an_actor_alone_logs_no_learner_or_gap():
  evaluator = evaluation.Evaluator(
      {"actor": counting_core()},
      lambda seed: batched.BatchedEnv(AlternatingEnv, 2, seed),
      interval_s=3600.0)
  evaluator.start()
  evaluator.submit({"actor": PERFECT}, 0, 0)
  assert evaluator.stop(WAIT_S, finish_s=WAIT_S) == []
  got = evaluator.metrics()
  assert got["eval/evaluations"] == 1 and got["eval/actor_success"] == 1.0
  assert not {"eval/learner_return", "eval/gap_return"} & set(got)


def test_evaluation_off_builds_no_evaluator(tmp_path):
  config = tiny_run(tmp_path, eval_interval_s=0.0)
  assert run._make_evaluator(config, None, None, 0) is None  # pylint: disable=protected-access


# ---- the run ----------------------------------------------------------------


def test_gap_metrics_reach_rows_progress_line_and_plot(tmp_path, monkeypatch):
  # A generous shared stop deadline: the evaluation started with the run
  # always finishes in the stop sequence, however loaded the machine is.
  monkeypatch.setattr(run, "STOP_DEADLINE_S", 2 * WAIT_S)
  result = run.train(tiny_run(tmp_path, eval_interval_s=1.0,
                              eval_episodes=3))
  assert result.stopped_by == "budget"
  assert not actor_threads_alive()
  assert "evaluation" not in [t.name for t in threading.enumerate()]
  final = result.final_row
  assert final["eval/evaluations"] >= 2  # the first, and the final one
  # The final row's gap is of the parameters the run ends with.
  assert (final["eval/env_steps"], final["eval/learner_steps"]) == (
      final["env_steps"], final["learner_steps"])
  for key in ("eval/learner_return", "eval/actor_return",
              "eval/learner_success", "eval/actor_success"):
    assert math.isfinite(final[key]), key
  assert 0 <= final["eval/learner_success"] <= 1
  assert final["eval/gap_return"] == pytest.approx(
      final["eval/learner_return"] - final["eval/actor_return"])
  for path in (tmp_path / "metrics.jsonl", tmp_path / "metrics.csv"):
    rows = metrics_lib.read_metrics(str(path))
    assert rows[-1]["eval/evaluations"] == final["eval/evaluations"], path
    assert rows[-1]["eval/gap_return"] == pytest.approx(
        final["eval/gap_return"]), path
    assert all("eval/actor_return" in row for row in rows), path
  line = metrics_lib.format_progress(final)
  assert f"gap {final['eval/gap_return']:+.3f}" in line

  calls = []
  original = matplotlib.axes.Axes.plot

  def spy(self, *args, **kwargs):
    calls.append(kwargs.get("label"))
    return original(self, *args, **kwargs)

  monkeypatch.setattr(matplotlib.axes.Axes, "plot", spy)
  plot.plot_runs([result.run_dir], tmp_path / "curves.png")
  assert {"ald learner", "ald actor"} <= set(calls)


class EvalOnlyCrash(dm_env.Environment):
  """I-Maze that explodes when built by the evaluation thread only."""

  def __init__(self, seed):
    if threading.current_thread().name == "evaluation":
      raise RuntimeError("evaluation environment exploded on purpose")
    self._env = imaze.IMaze(seed=seed)

  def reset(self):
    return self._env.reset()

  def step(self, action):
    return self._env.step(action)

  def observation_spec(self):
    return self._env.observation_spec()

  def action_spec(self):
    return self._env.action_spec()


def test_an_evaluation_error_stops_the_run_with_its_cause(tmp_path):
  config = tiny_run(tmp_path, total_env_steps=10**8, **EVALUATING)
  with pytest.raises(errors.EvaluationError,
                     match="evaluation environment exploded on purpose"):
    run.train(config, env_factory=EvalOnlyCrash)
  assert not actor_threads_alive()


class BlockedEvaluationEnv(dm_env.Environment):
  """I-Maze whose first step in the evaluation thread blocks until released;
  the actors' environments start stepping only once it blocks."""

  blocked = threading.Event()   # the evaluation is inside its first step
  release = threading.Event()

  def __init__(self, seed):
    self._in_evaluation = threading.current_thread().name == "evaluation"
    self._env = imaze.IMaze(seed=seed)

  def reset(self):
    return self._env.reset()

  def step(self, action):
    cls = BlockedEvaluationEnv
    if self._in_evaluation:
      cls.blocked.set()
      assert cls.release.wait(WAIT_S), "the test never released the eval"
    else:
      assert cls.blocked.wait(WAIT_S), "the evaluation never started"
    return self._env.step(action)

  def observation_spec(self):
    return self._env.observation_spec()

  def action_spec(self):
    return self._env.action_spec()


def test_a_blocked_evaluation_stalls_neither_actors_nor_learner(
    tmp_path, monkeypatch):
  # Every env step and learner step of this run happens while the
  # evaluation is blocked in its environment; the stop gives up on it.
  monkeypatch.setattr(run, "STOP_DEADLINE_S", 1.0)
  monkeypatch.setattr(run, "FINAL_EVAL_DEADLINE_S", 1.0)
  BlockedEvaluationEnv.blocked.clear()
  BlockedEvaluationEnv.release.clear()
  try:
    result = run.train(tiny_run(tmp_path, **EVALUATING),
                       env_factory=BlockedEvaluationEnv)
  finally:
    BlockedEvaluationEnv.release.set()
  assert result.stopped_by == "budget"
  assert result.final_row["env_steps"] >= 1500
  assert result.final_row["learner_steps"] > 0
  assert result.final_row["eval/evaluations"] == 0
  assert result.stuck_actors == ("evaluation",)
  # Released, the abandoned evaluation ends at once.
  for thread in threading.enumerate():
    if thread.name == "evaluation":
      thread.join(WAIT_S)
      assert not thread.is_alive()


# ---- progress line, plot, config --------------------------------------------


def test_progress_line_shows_the_gap():
  row = {"env_steps": 1000, "eval/learner_return": 1.0,
         "eval/actor_return": 0.03, "eval/gap_return": 0.97}
  assert "eval learner 1.000 actor 0.030 gap +0.970" in (
      metrics_lib.format_progress(row))
  before = dict.fromkeys(row, math.nan)
  assert "eval learner - actor - gap -" in metrics_lib.format_progress(before)
  alone = {"eval/actor_return": 0.9}
  assert metrics_lib.format_progress(alone).endswith("| eval 0.900")
  assert "eval" not in metrics_lib.format_progress({"env_steps": 1})


def _eval_rows(path):
  """Six report rows; evaluations complete at rows 0, 2 and 5."""
  evals = {0: (0, 0.5, 0.4), 2: (3000, 0.9, 0.5), 5: (6000, 1.0, 0.95)}
  with metrics_lib.MetricsWriter(path, formats=("jsonl",)) as writer:
    latest, count = (math.nan, math.nan, math.nan), 0
    for i in range(6):
      if i in evals:
        latest, count = evals[i], count + 1
      writer.write({
          "agent": "ald", "env_steps": 1000 * (i + 1),
          "wall_time_s": float(i), "episode_return": 0.1 * i,
          "success_rate": 0.1 * i, "eval/env_steps": latest[0],
          "eval/learner_return": latest[1], "eval/actor_return": latest[2],
          "eval/gap_return": latest[1] - latest[2],
          "eval/evaluations": count})
  return path


def test_plot_draws_learner_actor_and_gap_per_evaluation(tmp_path,
                                                         monkeypatch):
  calls = []
  original = matplotlib.axes.Axes.plot

  def spy(self, xs, ys, *args, **kwargs):
    calls.append((kwargs.get("label"), args, list(xs), list(ys)))
    return original(self, xs, ys, *args, **kwargs)

  monkeypatch.setattr(matplotlib.axes.Axes, "plot", spy)
  out = plot.plot_runs([_eval_rows(tmp_path / "a")], tmp_path / "c.png")
  steps = [0.0, 3000.0, 6000.0]  # one point per evaluation
  assert ("ald learner", ("-",), steps, [0.5, 0.9, 1.0]) in calls
  assert ("ald actor", ("--",), steps, [0.4, 0.5, 0.95]) in calls
  gap = [c for c in calls if c[0] == "ald" and c[2] == steps]
  assert len(gap) == 1 and gap[0][3] == pytest.approx([0.1, 0.4, 0.05])
  assert len(calls) == 4 + 3  # four standard panels, three eval curves
  image = matplotlib.image.imread(out)
  assert image.shape[:2] == (1125, 1100)  # the third row of panels


@pytest.mark.parametrize("field, value", [
    ("eval_interval_s", -1.0), ("eval_interval_s", math.nan),
    ("eval_interval_s", math.inf), ("eval_interval_s", "30"),
    ("eval_episodes", 0), ("eval_episodes", 2.5),
    ("eval_greedy", 1), ("eval_greedy", "yes")])
def test_config_rejects_bad_eval_values_naming_the_field(field, value):
  with pytest.raises(config_lib.ConfigError, match=f"^{field}: "):
    config_lib.TrainConfig(**{field: value})


def test_eval_flags_reach_the_config_and_bad_ones_name_the_flag():
  def parse(*argv):
    flag_values = flags.FlagValues()
    train_lib.define_flags(flag_values)
    flag_values(["prog", *argv])
    return train_lib.config_from_flags(flag_values)
  default = parse()
  assert (default.eval_interval_s, default.eval_episodes,
          default.eval_greedy) == (30.0, 8, False)
  config = parse("--eval_interval_s=0", "--eval_episodes=3", "--eval_greedy")
  assert (config.eval_interval_s, config.eval_episodes,
          config.eval_greedy) == (0.0, 3, True)
  with pytest.raises(app.UsageError, match="--eval_episodes"):
    parse("--eval_episodes=0")
