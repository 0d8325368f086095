"""Fault injection on whole runs: each case stops cleanly, in bounded time.

Bounds are pytest timeouts, never timing assertions; waits are on events.
"""
import errno
import itertools
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

from test_system_run import actor_threads_alive, tiny_run  # pylint: disable=wrong-import-order


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

  def __call__(self, n, timestep):
    if n >= self.after:
      if self.announce and not self.hanging.is_set():
        print("an environment hangs now", flush=True)
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
    tmp_path):
  # Hangs while the learner's first step compiles (~20 s here): the loop
  # then waits on an empty queue until the wall-time limit.
  hang = Hang(after=30)
  config = tiny_run(tmp_path, agent="lstm", total_env_steps=10**8,
                    max_wall_time_s=30.0, checkpoint_interval_s=2.0,
                    actor_stall_s=0.0)
  try:
    result = run.train(config, env_factory=hang.factory)
  finally:
    stuck = [t.name for t in threading.enumerate()
             if t.name.startswith("actor-") and t.is_alive()]
    _release_and_join(hang)
  assert hang.hanging.is_set()
  assert result.stopped_by == "wall_time"
  assert result.stuck_actors and set(result.stuck_actors) <= set(stuck)
  # Reports and checkpoints ran while the learner waited for unrolls.
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
    from test_system_run import tiny_run
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
