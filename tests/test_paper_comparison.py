"""experiments/paper_comparison.py: the grid runner.

The grid flags are parsed and every run's config validated before any run
starts; a real 2-agent x 2-seed grid of tiny Cue Recall runs completes,
writes the per-run JSON, the summary and the plot; a rerun trains nothing;
a run stopped mid-way (a SIGINT sent by its environment after a fixed number
of steps: the clean stop a Ctrl-C gives, final checkpoint included) stops
the grid, and the next call resumes it from its checkpoint and finishes.
"""
import io
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import threading
from unittest import mock

import pytest

from ald_jax import checkpoint as checkpoint_lib
from ald_jax import metrics as metrics_lib
from ald_jax.envs import imaze
from ald_jax.system import errors
from ald_jax.system import run as run_lib
from ald_jax.system import run_dir as run_dir_lib
from experiments import paper_comparison as pc

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TOTAL_ENV_STEPS = 1500
STOP_AFTER_STEPS = 200   # the interrupted run's SIGINT, well before its budget
TINY_FLAGS = (
    f"--total_env_steps={TOTAL_ENV_STEPS}", "--unroll_length=8",
    "--learner_context=8", "--batch_size=4", "--torso_mlp_sizes=16",
    "--lstm_hidden_size=16", "--gtrxl_num_layers=1", "--gtrxl_d_model=16",
    "--gtrxl_num_heads=2", "--gtrxl_mlp_size=32", "--gtrxl_memory_length=8",
    "--num_actors=2", "--envs_per_actor=2", "--replay_capacity=32",
    "--queue_capacity=4", "--t_actor_budget_ms=1000", "--report_interval_s=0.3",
    "--checkpoint_interval_s=3600", "--notensorboard",
    # One combined-step compile instead of two (warm and cold): the grid, not
    # the learner, is under test, and the first ALD compile dominates.
    "--learner_memory=recompute")
GRID = dict(agents=["ald", "lstm"], seeds=[1, 2], env="cue_recall",
            env_kwargs_grid="span=2", train_flags=TINY_FLAGS)


# The real grid below trains: on I-Maze with the learner, stream count
# (2 actors x 4 envs) and replay of tests/test_system_run.py's tiny_run, so
# its runs reuse the learner steps compiled there (the grid, not the
# learner, is under test).
RUN_FLAGS = (
    f"--total_env_steps={TOTAL_ENV_STEPS}", "--unroll_length=8",
    "--learner_context=8", "--batch_size=8", "--torso_mlp_sizes=32",
    "--lstm_hidden_size=32", "--gtrxl_num_layers=1", "--gtrxl_d_model=32",
    "--gtrxl_num_heads=2", "--gtrxl_mlp_size=64", "--gtrxl_memory_length=8",
    "--num_actors=2", "--envs_per_actor=4", "--replay_capacity=64",
    "--queue_capacity=4", "--t_actor_budget_ms=1000", "--report_interval_s=0.3",
    "--checkpoint_interval_s=3600", "--notensorboard",
    # No gap evaluation (tests/test_system_eval.py has it): its acting steps
    # compile and its final evaluation runs after every ALD run.
    "--eval_interval_s=0")
RUN_TASK = {"env": "imaze", "kwargs": {"corridor_length": 2}}
RUN_GRID = dict(agents=["ald", "lstm"], seeds=[1, 2], env="imaze",
                env_kwargs_grid="corridor_length=2", train_flags=RUN_FLAGS)


def _never_train(config):
  raise AssertionError(f"no run may start, but {config.logdir} did")


# ---- parsing and validation (no training) ---------------------------------------

def test_parse_env_kwargs_grid():
  assert pc.parse_env_kwargs_grid("span=16;span=32") == (
      {"span": 16}, {"span": 32})
  assert pc.parse_env_kwargs_grid(
      "corridor_length=8, wrong_reward=0.5;corridor_length=16") == (
          {"corridor_length": 8, "wrong_reward": 0.5}, {"corridor_length": 16})
  assert pc.parse_env_kwargs_grid("") == ({},)
  assert pc.parse_env_kwargs_grid("name=abc") == ({"name": "abc"},)
  for bad, message in (("span", "expected key=value"),
                       ("=3", "expected key=value"),
                       ("span=1,span=2", "set twice"),
                       ("span=1;span=1", "listed twice")):
    with pytest.raises(pc.GridError, match=f"--env_kwargs_grid: .*{message}"):
      pc.parse_env_kwargs_grid(bad)


def test_parse_knobs_grid():
  assert pc.parse_knobs_grid(
      "distill_steps_per_rl_step=0,0.5,1,4; learner_pull_cost=0,0.1") == (
          ("distill_steps_per_rl_step", ("0", "0.5", "1", "4")),
          ("learner_pull_cost", ("0", "0.1")))
  assert pc.parse_knobs_grid("") == ()
  for bad, message in (("nope=1", "'nope' is not a run flag"),
                       ("seed=1,2", "set by the grid; use --seeds"),
                       ("torso_mlp_sizes=16", "cannot be a knob"),
                       ("learner_pull_cost=", "expected flag=value"),
                       ("learner_pull_cost=0,0", "lists a value twice"),
                       ("actor_lr=1;actor_lr=2", "listed twice")):
    with pytest.raises(pc.GridError, match=f"--knobs_grid: .*{message}"):
      pc.parse_knobs_grid(bad)


def test_plan_is_the_full_product_with_knobs_in_each_config(tmp_path):
  runs = pc.plan_grid(agents=["ald", "transformer"], seeds=["1", "2"],
                      env="cue_recall", env_kwargs_grid="span=4;span=8",
                      knobs_grid="learner_pull_cost=0,1;actor_lr=0.01,0.1",
                      train_flags=TINY_FLAGS, grid_dir=str(tmp_path))
  assert len(runs) == 2 * 2 * 2 * 2 * 2
  assert len({run.run_dir for run in runs}) == len(runs)
  # Seeds outermost, agents innermost.
  assert [r.seed for r in runs[:16]] == [1] * 16
  assert [r.agent for r in runs[:2]] == ["ald", "transformer"]
  run = runs[-1]
  assert (run.agent, run.seed, run.task) == (
      "transformer", 2, {"env": "cue_recall", "kwargs": {"span": 8}})
  assert run.knobs == (("learner_pull_cost", 1.0), ("actor_lr", 0.1))
  config = run.config()
  assert config.learner.agent == "transformer" and config.seed == 2
  assert config.env_kwargs == (("span", 8),)
  assert config.learner.distill.learner_pull_cost == 1.0
  assert config.learner.actor_optimizer.learning_rate == 0.1
  assert config.total_env_steps == TOTAL_ENV_STEPS
  assert config.logdir == run.run_dir and not config.resume
  assert run.run_dir == os.path.join(
      str(tmp_path),
      "transformer__cue_recall-span=8__learner_pull_cost=1.0,actor_lr=0.1__seed2")
  assert run.config(resume=True).resume


@pytest.mark.parametrize("changes, message", [
    (dict(agents=["ald", "nope"]), "--agents: unknown agent 'nope'"),
    (dict(seeds=["1", "x"]), "--seeds: expected integers"),
    (dict(env_kwargs_grid="spam=3"), "--env_kwargs_grid: setting 'spam=3'"),
    (dict(env_kwargs_grid="span=0"), "--env_kwargs_grid: setting 'span=0'"),
    (dict(knobs_grid="learner_pull_cost=abc"),
     "--knobs_grid: ald seed 1 .*learner_pull_cost=abc"),
    # Distill-only steps exist for ALD only: the lstm run's config refuses.
    (dict(knobs_grid="distill_steps_per_rl_step=0,1"),
     "--knobs_grid: lstm seed 1 .*distill_steps_per_rl_step=1: "
     "--distill_steps_per_rl_step: must be 0"),
    (dict(train_flags=TINY_FLAGS + ("--seed=3",)), "--seed: set by the grid"),
    (dict(train_flags=TINY_FLAGS + ("--lstm_hidden_size=0",)),
     "--lstm_hidden_size: must be a positive integer"),
    (dict(train_flags=("--no_such_flag=1",)), "run flags: .*no_such_flag"),
    # A bad run flag is named as one even when knobs vary.
    (dict(knobs_grid="learner_pull_cost=0,1",
          train_flags=TINY_FLAGS + ("--lstm_hidden_size=0",)),
     "^run flags: ald seed 1 cue_recall span=2: --lstm_hidden_size"),
    (dict(name="a/b"), "--name:"),
    (dict(threshold=float("nan")), "--threshold:"),
    (dict(threshold_metric="loss"), "--threshold_metric:"),
])
def test_bad_grid_fails_before_any_run(tmp_path, changes, message):
  kwargs = dict(GRID, name="bad", grid_dir=str(tmp_path / "runs"),
                results_dir=str(tmp_path / "results"), train_fn=_never_train,
                out=io.StringIO())
  kwargs.update(changes)
  with pytest.raises(pc.GridError, match=message):
    pc.run_grid(**kwargs)
  assert not (tmp_path / "results").exists()


def test_a_changed_flag_for_an_existing_run_fails_before_any_run(tmp_path):
  runs = pc.plan_grid(grid_dir=str(tmp_path), **GRID)
  # The second run was stopped with a checkpoint at lstm_hidden_size=32.
  stopped = runs[1]
  stored = stopped.config(resume=False)
  changed = pc.plan_grid(grid_dir=str(tmp_path), **dict(
      GRID, train_flags=TINY_FLAGS + ("--lstm_hidden_size=32",)))[1].config()
  assert stored.learner.lstm.hidden_size == 16
  run_dir_lib.write_segment_config(
      stopped.run_dir, 0, {"train": checkpoint_lib.to_jsonable(changed)})
  os.makedirs(os.path.join(stopped.run_dir, run_lib.CHECKPOINT_DIR, "7"))
  assert pc.run_status(runs[0]) == "new"
  with pytest.raises(pc.GridError, match=(
      f"(?s){re.escape(stopped.run_dir)}: resume: .*learner.lstm.hidden_size "
      r"\(--lstm_hidden_size\): stored 32, now 16")):
    pc.run_grid(name="changed", results_dir=str(tmp_path / "results"),
                grid_dir=str(tmp_path), train_fn=_never_train,
                out=io.StringIO(), **GRID)


def test_first_crossing_and_the_run_record(tmp_path):
  rows = [{"env_steps": 100, "wall_time_s": 1.0, "success_rate": 0.5,
           "episode_return": 0.0},
          {"env_steps": 200, "wall_time_s": 2.0, "success_rate": None,
           "episode_return": 0.2},
          {"env_steps": 300, "wall_time_s": 3.5, "success_rate": 0.9,
           "episode_return": 0.8, "eval/learner_return": 1.0,
           "eval/actor_return": 0.25, "eval/gap_return": 0.75},
          {"env_steps": 400, "wall_time_s": 4.0, "success_rate": 0.8,
           "episode_return": None}]
  assert pc.first_crossing(rows, "success_rate", 0.9) == (300, 3.5)
  assert pc.first_crossing(rows, "success_rate", 0.95) == (None, None)
  assert pc.first_crossing(rows, "episode_return", 0.1) == (200, 2.0)
  run = pc.plan_grid(grid_dir=str(tmp_path), **GRID)[0]
  with metrics_lib.MetricsWriter(run.run_dir, formats=("jsonl",),
                                 tensorboard=False) as writer:
    for row in rows:
      writer.write(row)
  record = pc.run_record(run, 0.9, "success_rate")
  assert record["env_steps_to_threshold"] == 300
  assert record["wall_clock_to_threshold_s"] == 3.5
  assert record["final_success"] == 0.8
  assert record["final_return"] == 0.8  # the last row that has one
  assert record["final_env_steps"] == 400
  assert (record["final_eval_learner_return"], record["final_eval_actor_return"],
          record["final_eval_gap_return"]) == (1.0, 0.25, 0.75)
  assert (record["agent"], record["seed"], record["knobs"]) == ("ald", 1, {})
  assert record["task"] == {"env": "cue_recall", "kwargs": {"span": 2}}
  # The acting step alone comes from the run's config (none before it runs).
  assert record["t_actor_alone_p50_us"] is None
  run_dir_lib.write_segment_config(run.run_dir, 0, {
      "t_actor_alone": {"envs": 2, "p50_us": 40.0, "p99_us": 90.0}})
  record = pc.run_record(run, 0.9, "success_rate")
  assert (record["t_actor_alone_p50_us"],
          record["t_actor_alone_p99_us"]) == (40.0, 90.0)


# ---- a real grid: completes, skips, resumes ------------------------------------

class _StepCounter:
  """Shared by all environments of one run: the `stop_after`-th step sends
  this process one SIGINT (the run's handler stops it cleanly)."""

  def __init__(self, stop_after):
    self._lock = threading.Lock()
    self._steps = 0
    self._stop_after = stop_after

  def tick(self):
    with self._lock:
      self._steps += 1
      if self._steps == self._stop_after:
        os.kill(os.getpid(), signal.SIGINT)


class RecordingTrain:
  """train_fn: records each config and stops the run at `interrupt_dir`
  after STOP_AFTER_STEPS env steps (the first time only).

  The stopped run uses the built-in environment (its IMaze.step counts for
  the run's duration), so its recorded env is the one the grid resumes with.
  """

  def __init__(self, interrupt_dir=None):
    self.configs = []
    self.results = {}
    self._interrupt_dir = interrupt_dir

  def __call__(self, config):
    self.configs.append(config)
    if config.logdir != self._interrupt_dir:
      result = run_lib.train(config)
    else:
      self._interrupt_dir = None
      counter = _StepCounter(STOP_AFTER_STEPS)
      original_step = imaze.IMaze.step

      def counting_step(env, action):
        counter.tick()
        return original_step(env, action)

      with mock.patch.object(imaze.IMaze, "step", counting_step):
        result = run_lib.train(config)
    self.results[config.logdir] = result
    return result


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
  """Three calls of the same grid: stopped at the second run, continued,
  then run again with everything finished."""
  root = tmp_path_factory.mktemp("grid")
  kwargs = dict(RUN_GRID, name="tiny", grid_dir=str(root / "runs"),
                results_dir=str(root / "results"), command="test grid")
  runs = pc.plan_grid(grid_dir=kwargs["grid_dir"], **RUN_GRID)
  calls = []
  for interrupt in (runs[1].run_dir, None, None):
    train = RecordingTrain(interrupt)
    out = io.StringIO()
    result = pc.run_grid(train_fn=train, out=out, **kwargs)
    calls.append((train, result, out.getvalue()))
  return runs, calls


def test_grid_order_and_dirs(grid):
  runs, _ = grid
  assert [(r.agent, r.seed) for r in runs] == [
      ("ald", 1), ("lstm", 1), ("ald", 2), ("lstm", 2)]


def test_a_signal_stops_the_run_and_the_grid(grid):
  runs, calls = grid
  train, result, out = calls[0]
  assert [c.logdir for c in train.configs] == [runs[0].run_dir,
                                               runs[1].run_dir]
  assert result.interrupted == "signal:SIGINT"
  assert result.trained == [runs[0].run_dir, runs[1].run_dir]
  stopped = train.results[runs[1].run_dir]
  assert stopped.stopped_by == "signal:SIGINT"
  assert stopped.final_row["env_steps"] < TOTAL_ENV_STEPS
  # Stopped: its checkpoint is there, its per-run JSON is not.
  assert pc._has_checkpoints(runs[1].run_dir)  # pylint: disable=protected-access
  assert "stops (run the same command to continue)" in out
  # The summary of the stopped grid lists the unfinished runs.
  assert not result.summary["complete"]
  assert [r["run_dir"] for r in result.summary["unfinished"]] == [
      r.run_dir for r in runs[1:]]


def test_the_next_call_resumes_the_stopped_run_and_finishes(grid):
  runs, calls = grid
  train, result, out = calls[1]
  assert [(c.logdir, c.resume) for c in train.configs] == [
      (runs[1].run_dir, True), (runs[2].run_dir, False),
      (runs[3].run_dir, False)]
  assert result.interrupted is None and not result.failed
  resumed = train.results[runs[1].run_dir]
  assert resumed.stopped_by == "budget"
  assert resumed.final_row["env_steps"] >= TOTAL_ENV_STEPS
  # One run directory, two segments: segment 1 continued segment 0's steps.
  assert os.path.exists(os.path.join(runs[1].run_dir, "config.1.json"))
  rows = metrics_lib.read_metrics(runs[1].run_dir)
  steps = [row["env_steps"] for row in rows]
  assert steps == sorted(steps)
  assert f"{runs[0].name}: finished, skipped" in out
  assert f"{runs[1].name}: resuming from its checkpoint" in out
  assert result.summary["complete"]


def test_a_rerun_trains_nothing(grid):
  runs, calls = grid
  train, result, out = calls[2]
  assert train.configs == [] and result.trained == []
  assert out.count("finished, skipped") == len(runs)
  assert [r["run_dir"] for r in result.summary["runs"]] == [
      r["run_dir"] for r in calls[1][1].summary["runs"]]


def test_summary_per_run_json_and_plot(grid):
  runs, calls = grid
  _, result, _ = calls[2]
  with open(result.summary_path, encoding="utf-8") as f:
    summary = json.load(f)
  assert result.summary_path.endswith(os.path.join("results",
                                                   "tiny_summary.json"))
  assert summary["command"] == "test grid"
  assert summary["versions"]["jax"] and "ald_jax_git_sha" in summary["versions"]
  assert summary["machine"]["cpu_count"] == os.cpu_count()
  assert summary["threshold"] == {"metric": "success_rate", "value": 0.9}
  assert summary["complete"] and summary["unfinished"] == []
  assert len(summary["runs"]) == 4
  for run, record in zip(runs, summary["runs"]):
    assert set(record) >= {
        "agent", "task", "seed", "knobs", "threshold",
        "env_steps_to_threshold", "wall_clock_to_threshold_s",
        "final_success", "final_return"}
    assert (record["agent"], record["seed"], record["knobs"]) == (
        run.agent, run.seed, {})
    assert record["task"] == RUN_TASK
    assert record["actors"] == "threads"  # the runs' default engine
    assert record["t_actor_alone_p99_us"] >= record["t_actor_alone_p50_us"] > 0
    # Values as read back from the run's own metrics rows.
    rows = metrics_lib.read_metrics(run.run_dir)
    assert record["final_success"] == [
        r["success_rate"] for r in rows if r.get("success_rate") is not None
    ][-1]
    assert record["final_env_steps"] >= TOTAL_ENV_STEPS
    assert record["env_steps_to_threshold"] == pc.first_crossing(
        rows, "success_rate", 0.9)[0]
    with open(os.path.join(run.run_dir, pc.RUN_JSON), encoding="utf-8") as f:
      assert json.load(f) == record
  assert summary["plots"] == ["tiny_imaze-corridor_length=2.png"]
  assert len(result.plot_paths) == 1
  with open(result.plot_paths[0], "rb") as f:
    assert f.read(8) == PNG_MAGIC


# ---- bookkeeping with a stand-in for training (no JAX) ----------------------------

class FakeTrain:
  """train_fn that writes what a run leaves (config record, one metrics row,
  a checkpoint directory) without training. `outcomes`: run_dir -> "fail"
  (raises RunError), "wall_time" (stops at half the budget) or "budget"."""

  def __init__(self, outcomes=None):
    self.outcomes = dict(outcomes or {})
    self.configs = []

  def __call__(self, config):
    self.configs.append(config)
    outcome = self.outcomes.get(config.logdir, "budget")
    if outcome == "fail":
      raise errors.RunError("actor 1 failed")
    steps = config.total_env_steps // (1 if outcome == "budget" else 2)
    run_dir_lib.write_segment_config(
        config.logdir, len(self.configs),
        {"train": checkpoint_lib.to_jsonable(config)})
    row = {"env_steps": steps, "wall_time_s": steps / 1000.0,
           "success_rate": 0.9 + config.seed / 100, "episode_return": 0.5,
           "stopped_by": outcome}
    with metrics_lib.MetricsWriter(config.logdir, formats=("jsonl",),
                                   resume=config.resume,
                                   tensorboard=False) as writer:
      writer.write(row)
    os.makedirs(os.path.join(config.logdir, run_lib.CHECKPOINT_DIR,
                             str(steps)), exist_ok=True)
    return run_lib.RunResult(config.logdir, row, None, outcome)


def _fake_grid(tmp_path, train, **changes):
  kwargs = dict(GRID, name="fake", grid_dir=str(tmp_path / "runs"),
                results_dir=str(tmp_path / "results"), train_fn=train,
                out=io.StringIO())
  kwargs.update(changes)
  return pc.run_grid(**kwargs)


def test_a_failed_run_is_reported_the_grid_goes_on_and_the_next_call_retries(
    tmp_path):
  runs = pc.plan_grid(grid_dir=str(tmp_path / "runs"), **GRID)
  train = FakeTrain({runs[0].run_dir: "fail", runs[1].run_dir: "wall_time"})
  result = _fake_grid(tmp_path, train)
  assert result.trained == [r.run_dir for r in runs]
  assert result.failed == {runs[0].run_dir: "RunError: actor 1 failed"}
  assert not result.summary["complete"]
  assert [(u["run_dir"], u["error"]) for u in result.summary["unfinished"]] == [
      (runs[0].run_dir, "RunError: actor 1 failed"), (runs[1].run_dir, None)]
  assert [r["run_dir"] for r in result.summary["runs"]] == [
      r.run_dir for r in runs[2:]]
  assert result.summary["runs"][0]["env_steps_to_threshold"] == TOTAL_ENV_STEPS
  # Next call: the failed run starts again, the one stopped by its wall-time
  # limit resumes, the finished ones are skipped.
  again = FakeTrain()
  result = _fake_grid(tmp_path, again)
  assert [(c.logdir, c.resume) for c in again.configs] == [
      (runs[0].run_dir, False), (runs[1].run_dir, True)]
  assert result.summary["complete"] and not result.failed


def test_a_larger_budget_extends_finished_runs_only_when_allowed(tmp_path):
  runs = pc.plan_grid(grid_dir=str(tmp_path / "runs"), **GRID)
  _fake_grid(tmp_path, FakeTrain())
  larger = tuple(f for f in TINY_FLAGS if not f.startswith("--total_env_steps"))
  larger += ("--total_env_steps=3000",)
  with pytest.raises(pc.GridError, match=(
      "(?s)resume: .*total_env_steps.*stored 1500, now 3000")):
    _fake_grid(tmp_path, FakeTrain(), train_flags=larger)
  extend = FakeTrain()
  result = _fake_grid(tmp_path, extend, train_flags=larger + (
      "--resume_allow_change=total_env_steps",))
  assert [(c.logdir, c.resume, c.total_env_steps) for c in extend.configs] == [
      (r.run_dir, True, 3000) for r in runs]
  assert [r["final_env_steps"] for r in result.summary["runs"]] == [3000] * 4


def test_command_line_dry_run_and_a_bad_flag(tmp_path):
  script = os.path.join(os.path.dirname(pc.__file__), "paper_comparison.py")
  common = [sys.executable, script, "--agents=ald,lstm", "--seeds=1,2",
            "--env=cue_recall", "--env_kwargs_grid=span=2",
            f"--grid_dir={tmp_path}", *TINY_FLAGS]
  done = subprocess.run(common + ["--dry_run"], capture_output=True,
                        text=True, check=False)
  assert done.returncode == 0, done.stderr
  planned = pc.plan_grid(grid_dir=str(tmp_path), **GRID)
  assert done.stdout.split() == [
      word for run in planned for word in ("new", run.run_dir)]
  done = subprocess.run(common + ["--knobs_grid=learner_pull_cost=x"],
                        capture_output=True, text=True, check=False)
  assert done.returncode == 2
  assert "error: --knobs_grid: ald seed 1" in done.stderr
  assert os.listdir(tmp_path) == []  # nothing started


def test_aggregate_only_summarises_a_grid_run_elsewhere(tmp_path):
  grid_dir, results = tmp_path / "grid", tmp_path / "results"
  script = os.path.join(os.path.dirname(pc.__file__), "paper_comparison.py")
  common = [sys.executable, script, "--agents=ald,lstm", "--seeds=1,2",
            "--env=cue_recall", "--env_kwargs_grid=span=2",
            f"--grid_dir={grid_dir}", f"--results_dir={results}",
            "--name=copied", *TINY_FLAGS]
  done = subprocess.run(common + ["--ran_on=an H200"], capture_output=True,
                        text=True, check=False)
  assert done.returncode == 2
  assert "--ran_on: only with --aggregate_only" in done.stderr
  # One finished run, as copied back from another machine.
  finished = pc.plan_grid(grid_dir=str(grid_dir), **GRID)[0]
  with metrics_lib.MetricsWriter(finished.run_dir, formats=("jsonl",),
                                 tensorboard=False) as writer:
    writer.write({"env_steps": 500, "wall_time_s": 2.0, "success_rate": 0.95,
                  "episode_return": 0.9})
  with open(os.path.join(finished.run_dir, pc.RUN_JSON), "w") as f:
    f.write("{}")
  done = subprocess.run(common + ["--aggregate_only", "--ran_on=an H200"],
                        capture_output=True, text=True, check=False)
  assert done.returncode == 0, done.stderr
  with open(results / "copied_summary.json") as f:
    summary = json.load(f)
  assert summary["ran_on"] == "an H200"
  assert [(r["agent"], r["seed"], r["env_steps_to_threshold"])
          for r in summary["runs"]] == [("ald", 1, 500)]
  assert len(summary["unfinished"]) == 3
  # Nothing trained: only the finished run's directory exists.
  assert os.listdir(grid_dir) == [os.path.basename(finished.run_dir)]


def test_plots_draw_only_the_runs_the_summary_counts(tmp_path, monkeypatch):
  """A failed or half-copied run (metrics, no grid_run.json) is listed as
  unfinished and left out of its group's seed band, which it would cut to
  its short x range."""
  finished, failed = pc.plan_grid(grid_dir=str(tmp_path / "grid"),
                                  **dict(GRID, agents=["ald"]))
  for run, last in ((finished, 500), (failed, 50)):
    with metrics_lib.MetricsWriter(run.run_dir, formats=("jsonl",),
                                   tensorboard=False) as writer:
      for steps in range(10, last + 1, 10):
        writer.write({"env_steps": steps, "wall_time_s": steps / 100,
                      "success_rate": 1.0 if steps >= 200 else 0.3,
                      "episode_return": 0.0})
  with open(os.path.join(finished.run_dir, pc.RUN_JSON), "w") as f:
    f.write("{}")
  plotted = {}

  def plot_seed_bands(groups, out_path, **kwargs):
    del kwargs
    plotted.update(groups)
    return out_path
  monkeypatch.setattr(pc.plot, "plot_seed_bands", plot_seed_bands)
  summary, _ = pc.aggregate([finished, failed], name="partial",
                            results_dir=str(tmp_path / "results"),
                            threshold=0.9, threshold_metric="success_rate",
                            grid={}, command="test")
  assert len(summary["runs"]) == 1 and len(summary["unfinished"]) == 1
  assert list(plotted.values()) == [[finished.run_dir]]


def test_the_threshold_figure_overshoots_by_up_to_a_report_interval():
  """experiments/threshold_quantization.py: the first row at or above the
  threshold favours the slower agent, and the bias vanishes with the
  report interval."""
  from experiments import threshold_quantization as tq  # pylint: disable=import-outside-toplevel
  rng = random.Random(0)
  coarse = tq.ratios(2874.0, 3920.0, 10.0, 240_000, 200, rng)
  fine = tq.ratios(2874.0, 3920.0, 0.05, 240_000, 20, rng)
  assert 0.95 < statistics.mean(coarse) < 1.0
  assert abs(statistics.mean(fine) - 1.0) < 1e-3
  # One row of the faster agent is the most either figure can overshoot.
  assert min(coarse) > 1 - 10.0 * 3920.0 / 240_000
