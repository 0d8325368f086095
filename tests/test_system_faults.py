"""Fault injection on whole runs: each case stops cleanly, in bounded time.

Bounds are pytest timeouts, never timing assertions; waits are on events.
"""
import errno
import itertools
import json
import os
import subprocess
import sys
import textwrap
import threading

import dm_env
import numpy as np
import pytest

from ald_jax import metrics as metrics_lib
from ald_jax.envs import imaze
from ald_jax.envs import specs
from ald_jax.system import errors
from ald_jax.system import run

from helpers import actor_threads_alive, jump_clock_when, tiny_run  # pylint: disable=wrong-import-order


class WrappedIMaze(dm_env.Environment):
  """I-Maze with hooks: `on_step(n, timestep) -> timestep` per step."""

  def __init__(self, seed, on_step=None):
    self._env = imaze.IMaze(seed=seed)
    self._on_step = on_step
    self.steps = 0

  def reset(self):
    return self._env.reset()

  def step(self, action):
    self.steps += 1
    timestep = self._env.step(action)
    if self._on_step is not None:
      timestep = self._on_step(self.steps, timestep)
    return timestep

  def observation_spec(self):
    return self._env.observation_spec()

  def action_spec(self):
    return self._env.action_spec()


class Hang:
  """Blocks every env after `after` steps until `release` is set."""

  def __init__(self, after=100, announce=False):
    self.after = after
    self.announce = announce
    self.release = threading.Event()
    self.hanging = threading.Event()
    self.hung_threads = set()  # names of the threads blocked here

  def __call__(self, n, timestep):
    if n >= self.after:
      if self.announce and not self.hanging.is_set():
        print("an environment hangs now", flush=True)
      self.hung_threads.add(threading.current_thread().name)
      self.hanging.set()
      self.release.wait()
    return timestep

  def factory(self, seed):
    return WrappedIMaze(seed, self)


def _release_and_join(hang: Hang):
  hang.release.set()
  for thread in threading.enumerate():
    if thread.name.startswith("actor-"):
      thread.join(30)
  assert not actor_threads_alive()


@pytest.mark.timeout(180)
def test_hanging_env_stops_at_the_wall_time_limit_and_reports_stuck_actors(
    tmp_path, monkeypatch):
  """No stall limit: the run stops at its wall-time limit although every
  actor hangs in its environment, and names the stuck actors.

  The loop's clock jumps past the limit once every actor thread hangs, so
  the limit falls while they all hang whatever the machine's speed; the
  stop deadline is cut to 1 s (a hung thread never meets it)."""
  hang = Hang(after=30)
  limit_s = 3600.0
  config = tiny_run(tmp_path, agent="lstm", total_env_steps=10**8,
                    max_wall_time_s=limit_s, checkpoint_interval_s=2.0,
                    actor_stall_s=0.0)
  jump_clock_when(monkeypatch, limit_s,
                  lambda: len(hang.hung_threads) >= config.num_actors)
  monkeypatch.setattr(run, "STOP_DEADLINE_S", 1.0)
  try:
    result = run.train(config, env_factory=hang.factory)
  finally:
    stuck = [t.name for t in threading.enumerate()
             if t.name.startswith("actor-") and t.is_alive()]
    _release_and_join(hang)
  assert hang.hanging.is_set()
  assert result.stopped_by == "wall_time"
  assert result.stuck_actors and set(result.stuck_actors) <= set(stuck)
  assert set(result.stuck_actors) == hang.hung_threads
  rows = metrics_lib.read_metrics(result.run_dir)
  assert rows[-1]["stopped_by"] == "wall_time"
  assert rows[-1]["stuck_actors"] == ",".join(result.stuck_actors)
  assert str(result.final_row["learner_steps"]) in os.listdir(
      tmp_path / run.CHECKPOINT_DIR)


@pytest.mark.timeout(180)
def test_stall_watchdog_names_the_stalled_actor(tmp_path):
  hang = Hang(after=30)
  config = tiny_run(tmp_path, agent="lstm", total_env_steps=10**8,
                    actor_stall_s=2.0)
  try:
    with pytest.raises(errors.ActorStalledError,
                       match=r"actor \d stalled: no environment step"):
      run.train(config, env_factory=hang.factory)
  finally:
    _release_and_join(hang)
  # The learner's state was still saved.
  assert os.listdir(tmp_path / run.CHECKPOINT_DIR)


@pytest.mark.timeout(180)
def test_exception_in_one_actor_only_stops_the_run_naming_it(tmp_path):
  created = itertools.count()
  lock = threading.Lock()

  def on_step_for(index):
    def on_step(n, timestep):
      if index == 1 and n > 30:  # index 0 is the probe
        raise RuntimeError("only this environment exploded")
      return timestep
    return on_step

  def factory(seed):
    with lock:
      index = next(created)
    return WrappedIMaze(seed, on_step_for(index))

  config = tiny_run(tmp_path, agent="lstm", total_env_steps=10**8)
  with pytest.raises(run.RunError) as info:
    run.train(config, env_factory=factory)
  message = str(info.value)
  assert "only this environment exploded" in message
  assert sum(f"actor {i}" in message for i in range(2)) == 1
  assert not actor_threads_alive()


@pytest.mark.timeout(180)
def test_an_actor_error_as_the_budget_ends_the_run_still_stops_it(tmp_path):
  """Actor 0's environment raises while actor 1's step, in flight, crosses
  total_env_steps: the run must end with actor 0's error, not 'budget'."""
  failed, waiting = threading.Event(), threading.Event()

  class RacingIMaze(imaze.IMaze):
    def step(self, action):
      name = threading.current_thread().name
      if name == "actor-0":
        waiting.wait(60)     # actor 1 is inside its step
        failed.set()
        raise RuntimeError("actor 0's environment crashed")
      if name == "actor-1":
        waiting.set()
        failed.wait(60)      # ... and finishes it once actor 0 failed
      return super().step(action)

  config = tiny_run(tmp_path, agent="lstm", total_env_steps=4)
  with pytest.raises(run.RunError, match="actor 0's environment crashed"):
    run.train(config, env_factory=lambda seed: RacingIMaze(seed=seed))
  assert not actor_threads_alive()


class ENOSPCOnFinalRow:
  """Patches MetricsWriter.write to fail with ENOSPC on the final row."""

  def __init__(self, monkeypatch):
    original = metrics_lib.MetricsWriter.write

    def write(writer, row):
      if row.get("stopped_by"):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
      original(writer, row)
    monkeypatch.setattr(metrics_lib.MetricsWriter, "write", write)


@pytest.mark.timeout(180)
def test_disk_full_on_the_last_row_is_reported_after_the_final_checkpoint(
    tmp_path, monkeypatch):
  ENOSPCOnFinalRow(monkeypatch)
  with pytest.raises(run.RunError, match="No space left on device"):
    run.train(tiny_run(tmp_path, agent="lstm"))
  checkpoints = os.listdir(tmp_path / run.CHECKPOINT_DIR)
  assert checkpoints
  assert not actor_threads_alive()


@pytest.mark.timeout(180)
def test_disk_full_does_not_hide_the_original_error(tmp_path, monkeypatch):
  ENOSPCOnFinalRow(monkeypatch)

  def crash(n, timestep):
    if n > 40:
      raise RuntimeError("the original failure")
    return timestep

  config = tiny_run(tmp_path, agent="lstm", total_env_steps=10**8)
  with pytest.raises(run.RunError, match="the original failure"):
    run.train(config, env_factory=lambda seed: WrappedIMaze(seed, crash))
  assert os.listdir(tmp_path / run.CHECKPOINT_DIR)  # final checkpoint kept


def _nan_after(n_bad):
  def on_step(n, timestep):
    if n == n_bad:
      observation = np.array(timestep.observation, np.float32)
      observation[0] = np.nan
      return timestep._replace(observation=observation)
    return timestep
  return on_step


@pytest.mark.timeout(180)
def test_nan_observation_stops_naming_env_and_step(tmp_path):
  config = tiny_run(tmp_path, agent="lstm", total_env_steps=10**8)
  with pytest.raises(errors.NonFiniteObservationError,
                     match=r"actor \d: environment \d \(stream \d\) returned a "
                     r"non-finite observation at its step 25"):
    run.train(config, env_factory=lambda seed: WrappedIMaze(
        seed, _nan_after(25)))
  assert not actor_threads_alive()


@pytest.mark.timeout(180)
def test_nan_observation_masked_and_counted(tmp_path):
  config = tiny_run(tmp_path, agent="lstm", nonfinite_obs="mask")
  result = run.train(config, env_factory=lambda seed: WrappedIMaze(
      seed, _nan_after(25)))
  assert result.stopped_by == "budget"
  # Every env (2 actors x 4) reaches its step 25 within 1500 env steps.
  assert result.final_row["nonfinite_obs_masked"] == 8


def test_factory_returning_none_gets_a_clear_error():
  with pytest.raises(specs.UnsupportedEnvironmentError,
                     match="env_factory returned None"):
    run.probe_environment(lambda seed: None, 0)


def test_failing_close_does_not_hide_the_validation_error():
  class BadEnv:
    def observation_spec(self):
      return "not a spec"

    def action_spec(self):
      return "not a spec"

    def close(self):
      raise RuntimeError("close failed")

  with pytest.raises(specs.UnsupportedEnvironmentError):
    run.probe_environment(lambda seed: BadEnv(), 0)


class WideObsIMaze(WrappedIMaze):
  """I-Maze whose observation spec is one longer (a mismatching actor env)."""

  def observation_spec(self):
    spec = self._env.observation_spec()
    return spec.replace(shape=(spec.shape[0] + 1,))


@pytest.mark.timeout(180)
def test_actor_envs_must_match_the_probed_specs(tmp_path):
  created = itertools.count()
  config = tiny_run(tmp_path, agent="lstm")

  def factory(seed):  # the probe (first call) differs from the actors' envs
    return WrappedIMaze(seed) if next(created) == 0 else WideObsIMaze(seed)

  with pytest.raises(run.RunError, match="must have the same specs"):
    run.train(config, env_factory=factory)


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"),
                    reason="needs Linux affinity")
@pytest.mark.timeout(180)
def test_pin_learner_restores_the_process_affinity(tmp_path):
  before = os.sched_getaffinity(0)
  run.train(tiny_run(tmp_path, agent="lstm", pin_learner=True))
  assert os.sched_getaffinity(0) == before


SECOND_SIGINT_SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    from absl import logging
    from ald_jax.system import run
    from test_system_faults import Hang
    from helpers import tiny_run
    logging.set_verbosity(logging.INFO)
    hang = Hang(announce=True)
    config = tiny_run({logdir!r}, agent="lstm", total_env_steps=10**8,
                      actor_stall_s=0.0)
    run.train(config, env_factory=hang.factory)
    print("train returned", flush=True)
""")


@pytest.mark.timeout(240)
def test_second_sigint_ends_the_process_at_once(tmp_path):
  """First SIGINT: clean stop, stuck on the hanging actors' deadline; the
  second ends the process with 128 + SIGINT before that deadline is over."""
  import signal  # pylint: disable=import-outside-toplevel
  script = SECOND_SIGINT_SCRIPT.format(
      tests=os.path.dirname(__file__), logdir=str(tmp_path / "run"))
  env = dict(os.environ, PYTHONPATH=os.getcwd())
  proc = subprocess.Popen([sys.executable, "-c", script], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)
  lines = []
  try:
    first_sent = False
    for line in proc.stdout:
      lines.append(line)
      if not first_sent and "an environment hangs now" in line:
        proc.send_signal(signal.SIGINT)  # the loop runs; an actor is stuck
        first_sent = True
      elif first_sent and "stopping actors" in line:
        proc.send_signal(signal.SIGINT)  # inside the stop deadline
        break
    assert first_sent, "".join(lines)
    rest, _ = proc.communicate(timeout=60)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  output = "".join(lines) + rest
  assert proc.returncode == 128 + signal.SIGINT, output
  assert "second signal (SIGINT): exiting now" in output
  assert "train returned" not in output


# ---- a signal or kill -9 while a checkpoint is being written -----------------

# The CLI in a child process, its checkpoint saves slowed at a controlled
# point inside orbax (the step's `<step>.orbax-checkpoint-tmp` directory
# exists), where it prints "writing checkpoint N":
#   then=release: the `block_at`-th save of a step > 0 waits there until a
#     stop signal has been handled, then completes;
#   then=hold: that save never completes (the test kills the process);
#   then=second: once a save of a step > 0 has completed, the next learner
#     step ends with a SIGTERM to itself; the save that follows (a step no
#     checkpoint has yet) never completes (the test sends the second signal).
SAVE_FAULT_SCRIPT = textwrap.dedent("""
    import os, signal, sys, threading
    import orbax.checkpoint as ocp
    from absl import app
    from ald_jax import train
    from ald_jax.system import learner_driver
    from ald_jax.system import run

    block_at, then = int(sys.argv[1]), sys.argv[2]
    handled = threading.Event()
    handle = run._StopSignals._handle

    def observed_handle(self, signum, frame):
      handle(self, signum, frame)  # the stop request first
      handled.set()
    run._StopSignals._handle = observed_handle

    json_save = ocp.handlers.JsonCheckpointHandler.async_save
    started, written = [], []

    async def slowed_save(self, directory, item=None, args=None):
      step = (getattr(args, "item", None) or {}).get("learner_steps", 0)
      if step > 0:
        started.append(step)
        if (handled.is_set() if then == "second"
            else len(started) == block_at):
          print(f"writing checkpoint {step}", flush=True)
          if then in ("hold", "second"):
            threading.Event().wait()
          if not handled.wait(120):
            print("no stop signal within 120 s", flush=True)
            os._exit(3)
          print("the write goes on", flush=True)
      result = await json_save(self, directory, item, args)
      if step > 0:
        written.append(step)
      return result
    ocp.handlers.JsonCheckpointHandler.async_save = slowed_save

    learner_train = learner_driver.LearnerDriver.train

    def train_then_stop(self, batch):
      result = learner_train(self, batch)
      if then == "second" and written and not handled.is_set():
        os.kill(os.getpid(), signal.SIGTERM)
      return result
    learner_driver.LearnerDriver.train = train_then_stop

    train.define_flags()
    app.run(train.main, argv=["ald_jax.train"] + sys.argv[3:])
""")

# tiny_run(agent="lstm") as flags, saving a checkpoint every second.
TINY_LSTM_FLAGS = (
    "--agent=lstm", "--unroll_length=8", "--learner_context=8",
    "--batch_size=8", "--torso_mlp_sizes=32", "--lstm_hidden_size=32",
    "--num_actors=2", "--envs_per_actor=4", "--replay_capacity=64",
    "--queue_capacity=4", "--t_actor_budget_ms=1000",
    "--report_interval_s=0.5", "--checkpoint_interval_s=1", "--seed=1",
    "--actor_stall_s=0")


def _cli_config(logdir, *flags_argv):
  """The TrainConfig the CLI builds from TINY_LSTM_FLAGS and `flags_argv`."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  from ald_jax import train as train_cli  # pylint: disable=import-outside-toplevel
  flag_values = flags.FlagValues()
  train_cli.define_flags(flag_values)
  flag_values(["prog", *TINY_LSTM_FLAGS, f"--logdir={logdir}", *flags_argv])
  return train_cli.config_from_flags(flag_values)


class SaveFaultChild:
  """The CLI run of SAVE_FAULT_SCRIPT; stdout and stderr in `lines`."""

  def __init__(self, logdir, then: str, block_at: int = 0):
    repo = os.path.dirname(os.path.dirname(os.path.abspath(run.__file__)))
    env = dict(os.environ, PYTHONPATH=os.path.dirname(repo),
               JAX_PLATFORMS="cpu")
    self.proc = subprocess.Popen(
        [sys.executable, "-c", SAVE_FAULT_SCRIPT, str(block_at), then,
         *TINY_LSTM_FLAGS, "--total_env_steps=100000000", f"--logdir={logdir}"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    self.lines: list[str] = []

  def wait_for_write(self) -> int:
    """Blocks until the slowed save is in flight; returns its step."""
    for line in self.proc.stdout:
      self.lines.append(line)
      if line.startswith("writing checkpoint "):
        return int(line.split()[-1])
    raise AssertionError("the child ended before the slowed save:\n"
                         + self.output())

  def finish(self, timeout_s: float = 120) -> int:
    rest, _ = self.proc.communicate(timeout=timeout_s)
    self.lines.append(rest)
    return self.proc.returncode

  def sigterm_during_write(self) -> tuple[int, int]:
    """SIGTERM once a save is in flight; (step being written, exit status)."""
    import signal  # pylint: disable=import-outside-toplevel
    try:
      writing = self.wait_for_write()
      self.proc.send_signal(signal.SIGTERM)
      return writing, self.finish()
    finally:
      self.kill()

  def output(self) -> str:
    return "".join(self.lines)[-6000:]

  def kill(self) -> None:
    if self.proc.poll() is None:
      self.proc.kill()
      self.proc.communicate(timeout=60)


def _checkpoint_names(logdir) -> list[str]:
  return sorted(os.listdir(os.path.join(logdir, run.CHECKPOINT_DIR)))


def _assert_write_lost(logdir, writing: int) -> tuple[int, dict]:
  """The checkpoint write at step `writing` was cut off: only its tmp
  directory is left, and the previous complete checkpoint is the newest.
  Returns that checkpoint's (step, metadata)."""
  from ald_jax import checkpoint  # pylint: disable=import-outside-toplevel
  names = _checkpoint_names(logdir)
  assert str(writing) not in names
  assert [n for n in names
          if n.startswith(f"{writing}{checkpoint.TMP_DIR_MARKER}")], names
  previous, stored = checkpoint.read_latest_metadata(
      logdir / run.CHECKPOINT_DIR)
  assert 0 < previous < writing
  return previous, stored


def _steps_on_disk(logdir) -> list[int]:
  return sorted(int(n) for n in _checkpoint_names(logdir) if n.isdigit())


@pytest.mark.timeout(240)
def test_sigterm_during_a_checkpoint_write_ends_cleanly_with_128_plus_15(
    tmp_path):
  """SIGTERM while a periodic save is in flight: the save completes, the
  run stops (no half-written step), the CLI exits 143, and --resume loads
  the checkpoint that was being written."""
  import signal  # pylint: disable=import-outside-toplevel
  from ald_jax import checkpoint  # pylint: disable=import-outside-toplevel
  logdir = tmp_path / "run"
  child = SaveFaultChild(logdir, "release", block_at=2)
  writing, status = child.sigterm_during_write()
  output = child.output()
  assert status == 128 + signal.SIGTERM, output
  assert "the write goes on" in output
  assert "(stopped by signal:SIGTERM)" in output
  # The step being written is complete and the newest; nothing half-written.
  assert not [n for n in _checkpoint_names(logdir)
              if checkpoint.TMP_DIR_MARKER in n], _checkpoint_names(logdir)
  assert _steps_on_disk(logdir)[-1] == writing
  rows = metrics_lib.read_metrics(logdir)
  assert rows[-1]["stopped_by"] == "signal:SIGTERM"
  assert rows[-1]["learner_steps"] == writing  # no step after the signal
  if metrics_lib.tensorboard_available():  # the CLI's curves, as an image
    import test_metrics  # pylint: disable=import-outside-toplevel
    assert [(v.tag, event.step) for event in test_metrics._events(logdir)  # pylint: disable=protected-access
            for v in event.summary.value if v.HasField("image")] == [
                ("curves", rows[-1]["env_steps"])]
  _, stored = checkpoint.read_latest_metadata(logdir / run.CHECKPOINT_DIR)
  # --resume loads it: with the budget set to its env steps the resumed run
  # has nothing left to do and reports the restored counters.
  resumed = run.train(_cli_config(
      logdir, "--resume", "--resume_allow_change=total_env_steps",
      f"--total_env_steps={stored['env_steps']}"))
  assert resumed.stopped_by == "budget"
  assert resumed.final_row["learner_steps"] == writing
  assert int(resumed.state.step) == writing
  assert resumed.final_row["env_steps"] == stored["env_steps"]


@pytest.mark.timeout(300)
def test_kill_9_during_a_runs_checkpoint_write_then_resume_continues(
    tmp_path):
  """SIGKILL while a save is in flight leaves only its tmp directory; the
  resumed run removes it, loads the previous checkpoint and its counters
  continue from there."""
  import signal  # pylint: disable=import-outside-toplevel
  from ald_jax import checkpoint  # pylint: disable=import-outside-toplevel
  logdir = tmp_path / "run"
  child = SaveFaultChild(logdir, "hold", block_at=2)
  try:
    writing = child.wait_for_write()
    child.proc.kill()
    status = child.finish()
  finally:
    child.kill()
  assert status == -signal.SIGKILL, child.output()
  previous, stored = _assert_write_lost(logdir, writing)
  assert stored["learner_steps"] == previous
  budget = stored["env_steps"] + 512
  resumed = run.train(_cli_config(
      logdir, "--resume", "--resume_allow_change=total_env_steps",
      f"--total_env_steps={budget}"))
  assert resumed.stopped_by == "budget"
  assert not [n for n in _checkpoint_names(logdir)
              if checkpoint.TMP_DIR_MARKER in n]
  # The counters continue from the previous checkpoint's.
  step, latest = checkpoint.read_latest_metadata(logdir / run.CHECKPOINT_DIR)
  assert latest["segment"] == stored["segment"] + 1
  assert step == resumed.final_row["learner_steps"] > previous
  assert resumed.final_row["env_steps"] >= budget
  rows = metrics_lib.read_metrics(logdir)
  resumed_rows = [r for r in rows if r["env_steps"] > stored["env_steps"]]
  assert resumed_rows and all(r["learner_steps"] >= previous
                              for r in resumed_rows)
  assert [r["env_steps"] for r in rows] == sorted(r["env_steps"] for r in rows)
  # Each segment's config is kept.
  segments = [json.loads((logdir / f"config.{n}.json").read_text())
              for n in (0, 1)]
  assert [c["train"]["total_env_steps"] for c in segments] == [10**8, budget]


@pytest.mark.timeout(240)
def test_a_second_sigterm_during_the_final_checkpoint_write_exits_at_once(
    tmp_path):
  """The first SIGTERM starts the stop; the second, while the final
  checkpoint is being written, ends the process with 143 at once: that
  write is lost (only its tmp directory is left), the previous complete
  checkpoint is the newest, the metrics rows written so far are intact,
  and --resume loads that checkpoint."""
  import signal  # pylint: disable=import-outside-toplevel
  from ald_jax import checkpoint  # pylint: disable=import-outside-toplevel
  logdir = tmp_path / "run"
  child = SaveFaultChild(logdir, "second")
  writing, status = child.sigterm_during_write()
  output = child.output()
  assert status == 128 + signal.SIGTERM, output
  assert "second signal (SIGTERM): exiting now" in output
  assert "run directory:" not in output  # main never returned
  previous, stored = _assert_write_lost(logdir, writing)
  rows = metrics_lib.read_metrics(logdir)  # every line whole (flushed)
  assert rows and not any(row.get("stopped_by") for row in rows)
  resumed = run.train(_cli_config(
      logdir, "--resume", "--resume_allow_change=total_env_steps",
      f"--total_env_steps={stored['env_steps']}"))
  assert resumed.final_row["learner_steps"] == previous
  assert not [n for n in _checkpoint_names(logdir)
              if checkpoint.TMP_DIR_MARKER in n]
