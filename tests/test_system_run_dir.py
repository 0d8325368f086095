"""The run directory: its lock (two processes), per-segment configs, and the
resume check of a changed config."""
import dataclasses
import fcntl
import json
import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest

from ald_jax import checkpoint
from ald_jax import config as config_lib
from ald_jax import train as train_cli
from ald_jax.system import run_dir as run_dir_lib

FLAG_PATHS = {f.name: f.path for f in train_cli.FLAG_TABLE}
LR_PATH = "learner.learner_optimizer.learning_rate"


def _config(**changes) -> config_lib.TrainConfig:
  learner = config_lib.LearnerConfig(
      agent="lstm", batch_size=4,
      learner_optimizer=config_lib.OptimizerConfig(
          learning_rate=changes.pop("learning_rate", 3e-4)))
  return dataclasses.replace(
      config_lib.TrainConfig(learner=learner, distill_steps_per_rl_step=0.0,
                             env_kwargs=(("corridor_length", 4),),
                             total_env_steps=1000),
      **changes)


def _stored(config) -> dict:
  """The config as a checkpoint stores it (through JSON)."""
  return json.loads(json.dumps(checkpoint.to_jsonable(config)))


# ---- resume: the stored config against the new one -------------------------

def test_an_unchanged_config_passes_through_json():
  assert run_dir_lib.config_differences(_stored(_config()), _config()) == {}
  assert run_dir_lib.check_resume_config(_stored(_config()), _config()) == {}


def test_a_changed_learning_rate_is_refused_naming_the_field():
  with pytest.raises(config_lib.ConfigError) as info:
    run_dir_lib.check_resume_config(
        _stored(_config()), _config(learning_rate=1e-3),
        flag_paths=FLAG_PATHS)
  message = str(info.value)
  assert message.startswith("resume: ")
  assert f"{LR_PATH} (--learner_lr): stored 0.0003, now 0.001" in message
  assert "--resume_allow_change=learner_lr" in message
  assert message.count("stored") == 2  # one field listed (and the header)


@pytest.mark.parametrize("name", ["learner_lr", LR_PATH, "learning_rate",
                                  "learner_optimizer", "learner"])
def test_a_named_change_is_allowed(name):
  allowed = run_dir_lib.check_resume_config(
      _stored(_config()), _config(learning_rate=1e-3), allow=(name,),
      flag_paths=FLAG_PATHS)
  assert allowed == {LR_PATH: (3e-4, 1e-3)}


def test_total_env_steps_must_be_named():
  stored, longer = _stored(_config()), _config(total_env_steps=5000)
  with pytest.raises(config_lib.ConfigError,
                     match=r"total_env_steps \(--total_env_steps\): stored "
                           r"1000, now 5000"):
    run_dir_lib.check_resume_config(stored, longer, flag_paths=FLAG_PATHS)
  assert run_dir_lib.check_resume_config(
      stored, longer, allow=("total_env_steps",)) == {
          "total_env_steps": (1000, 5000)}


def test_every_refused_field_is_listed_and_only_those():
  new = _config(learning_rate=1e-3, total_env_steps=5000, seed=3,
                env_kwargs=(("corridor_length", 6),))
  with pytest.raises(config_lib.ConfigError) as info:
    run_dir_lib.check_resume_config(_stored(_config()), new,
                                    allow=("seed",))
  lines = str(info.value).splitlines()[1:-1]
  assert lines == [
      "  env_kwargs: stored [['corridor_length', 4]], now "
      "[['corridor_length', 6]]",
      f"  {LR_PATH}: stored 0.0003, now 0.001",
      "  total_env_steps: stored 1000, now 5000"]


def test_operational_fields_change_without_a_name():
  new = _config(logdir="elsewhere", resume=True, report_interval_s=1.0,
                checkpoint_interval_s=7.0, keep_checkpoints=5,
                max_wall_time_s=60.0)
  new = dataclasses.replace(new, tensorboard=False)
  allowed = run_dir_lib.check_resume_config(_stored(_config()), new)
  assert set(allowed) == {"logdir", "resume", "report_interval_s",
                          "checkpoint_interval_s", "keep_checkpoints",
                          "max_wall_time_s", "tensorboard"}
  assert "total_env_steps" not in run_dir_lib.ALWAYS_ALLOWED


def test_fields_added_since_the_checkpoint():
  stored = _stored(_config())
  del stored["queue_capacity"]   # as if written before the field existed
  stored["removed_field"] = 1    # a field this version no longer has
  assert run_dir_lib.config_differences(stored, _config()) == {}
  assert run_dir_lib.config_differences(stored, _config(queue_capacity=2)) == {
      "queue_capacity": ("<absent>", 2)}


def test_unknown_allow_names_are_refused():
  with pytest.raises(config_lib.ConfigError,
                     match="resume_allow_change: 'learning_rat' is neither"):
    run_dir_lib.resolve_allow_names(["learning_rat"], FLAG_PATHS)
  with pytest.raises(config_lib.ConfigError, match="split it on commas"):
    run_dir_lib.resolve_allow_names("total_env_steps", FLAG_PATHS)
  with pytest.raises(config_lib.ConfigError, match="non-empty"):
    run_dir_lib.resolve_allow_names([""])


def test_flag_names_resolve_to_paths():
  assert run_dir_lib.resolve_allow_names(
      ["learner_lr", " total_env_steps", LR_PATH], FLAG_PATHS) == (
          LR_PATH, "total_env_steps", "total_env_steps", LR_PATH)
  # A flag that is also a field name allows both: --max_grad_norm sets the
  # learner's and (through the CLI) the actor's clip.
  names = run_dir_lib.resolve_allow_names(["max_grad_norm"], FLAG_PATHS)
  assert names == ("learner.learner_optimizer.max_grad_norm", "max_grad_norm")


def test_resume_check_against_a_checkpoints_metadata(tmp_path):
  """The resume path: the stored config is read from the newest checkpoint's
  metadata, without building the state to restore into."""
  directory = tmp_path / "run" / "checkpoints"
  with checkpoint.Checkpointer(directory) as ckpt:
    ckpt.save(10, {"w": np.zeros(2, np.float32)},
              {"learner_steps": 10, "config": _config()})
  step, metadata = checkpoint.read_latest_metadata(directory)
  assert step == 10
  with pytest.raises(config_lib.ConfigError, match=LR_PATH):
    run_dir_lib.check_resume_config(metadata["config"],
                                    _config(learning_rate=1e-3))
  run_dir_lib.check_resume_config(metadata["config"],
                                  _config(total_env_steps=2000),
                                  allow=("total_env_steps",))


# ---- one config file per segment -------------------------------------------

def test_every_segment_keeps_its_config(tmp_path):
  first = {"train": checkpoint.to_jsonable(_config()), "obs_shape": (3,)}
  second = {"train": checkpoint.to_jsonable(_config(total_env_steps=5000)),
            "obs_shape": (3,)}
  assert run_dir_lib.read_latest_config(tmp_path) is None  # none written
  path = run_dir_lib.write_segment_config(tmp_path, 0, first)
  assert path == str(tmp_path / "config.0.json")
  run_dir_lib.write_segment_config(tmp_path, 1, second)

  def load(name):
    with open(tmp_path / name, encoding="utf-8") as f:
      return json.load(f)
  assert load("config.0.json")["train"]["total_env_steps"] == 1000
  assert load("config.1.json")["train"]["total_env_steps"] == 5000
  assert load("config.json") == load("config.1.json")  # the latest
  assert run_dir_lib.read_latest_config(tmp_path) == load("config.1.json")
  assert load("config.0.json")["obs_shape"] == [3]
  assert sorted(os.listdir(tmp_path)) == [
      "config.0.json", "config.1.json", "config.json"]  # no tmp files left
  with pytest.raises(ValueError, match="segment"):
    run_dir_lib.write_segment_config(tmp_path, -1, first)


# ---- the lock: one run per directory ----------------------------------------

_HOLD_LOCK = r"""
import sys
from ald_jax.system import run_dir
with run_dir.RunDirLock(sys.argv[1]):
  print("locked", flush=True)
  sys.stdin.readline()  # hold until the parent closes stdin (or kills us)
print("released", flush=True)
"""


def _child(tmp_path, source: str, directory) -> subprocess.Popen:
  """A Python process running `source` on `directory`, importing this
  checkout's ald_jax; stdin and stdout are pipes."""
  script = tmp_path / "child.py"
  script.write_text(source)
  repo = os.path.dirname(os.path.dirname(os.path.dirname(
      os.path.abspath(run_dir_lib.__file__))))
  env = dict(os.environ, PYTHONPATH=repo)
  return subprocess.Popen([sys.executable, str(script), str(directory)],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          text=True, env=env)


def _start_holder(tmp_path, directory) -> subprocess.Popen:
  holder = _child(tmp_path, _HOLD_LOCK, directory)
  line = holder.stdout.readline()  # returns once locked, or at exit
  assert line == "locked\n", (line, holder.poll())
  return holder


@pytest.mark.timeout(120)
def test_a_second_process_is_refused_with_the_holders_pid(tmp_path):
  directory = tmp_path / "run"
  holder = _start_holder(tmp_path, directory)
  try:
    assert run_dir_lib.read_lock_holder(directory) == holder.pid
    with pytest.raises(run_dir_lib.RunDirLockedError) as info:
      run_dir_lib.RunDirLock(directory).acquire()
    assert f"in use by another run (pid {holder.pid})" in str(info.value)
    assert str(info.value).startswith("logdir: ")
    assert isinstance(info.value, config_lib.ConfigError)
    # The holder releases on a clean exit; the lock is free again.
    holder.stdin.close()
    assert holder.stdout.readline() == "released\n"
    assert holder.wait(timeout=60) == 0
  finally:
    holder.kill()
    holder.wait(timeout=60)
    holder.stdout.close()
  assert run_dir_lib.read_lock_holder(directory) is None
  with run_dir_lib.RunDirLock(directory) as lock:
    assert lock.held
    assert run_dir_lib.read_lock_holder(directory) == os.getpid()


@pytest.mark.timeout(120)
def test_a_killed_holder_leaves_no_lock_behind(tmp_path):
  directory = tmp_path / "run"
  holder = _start_holder(tmp_path, directory)
  try:
    os.kill(holder.pid, signal.SIGKILL)
    assert holder.wait(timeout=60) == -signal.SIGKILL
  finally:
    holder.kill()
    holder.wait(timeout=60)
    holder.stdin.close()
    holder.stdout.close()
  # The lock file (with the dead pid) is still there; the kernel dropped the
  # flock with the process, so it does not block.
  assert run_dir_lib.read_lock_holder(directory) == holder.pid
  with run_dir_lib.RunDirLock(directory):
    assert run_dir_lib.read_lock_holder(directory) == os.getpid()


def test_a_second_lock_in_the_same_process_is_refused(tmp_path):
  with run_dir_lib.RunDirLock(tmp_path) as lock:
    with pytest.raises(run_dir_lib.RunDirLockedError,
                       match=f"pid {os.getpid()}"):
      run_dir_lib.RunDirLock(tmp_path).acquire()
    with pytest.raises(RuntimeError, match="already held"):
      lock.acquire()
  assert not lock.held
  with run_dir_lib.RunDirLock(tmp_path):
    pass


_FORK_AND_DIE = r"""
import os, sys
from ald_jax.system import run_dir
lock = run_dir.RunDirLock(sys.argv[1])
lock.acquire()
if os.fork() == 0:      # the child inherits the locked file
  sys.stdin.readline()  # and outlives its parent until stdin closes
  os._exit(0)
print("forked", flush=True)
os._exit(0)             # the parent dies without releasing
"""


@pytest.mark.timeout(120)
def test_a_forked_child_holding_the_lock_is_named_as_such(tmp_path):
  directory = tmp_path / "run"
  parent = _child(tmp_path, _FORK_AND_DIE, directory)
  try:
    assert parent.stdout.readline() == "forked\n"
    assert parent.wait(timeout=60) == 0
    with pytest.raises(run_dir_lib.RunDirLockedError,
                       match=f"pid {parent.pid}, no longer running"):
      run_dir_lib.RunDirLock(directory).acquire()
  finally:
    parent.stdin.close()  # the child sees EOF and exits
    parent.stdout.close()  # EOF once the child is gone
  # No sleep: flock blocks until the child has exited and dropped the lock.
  with open(directory / run_dir_lib.LOCK_NAME, encoding="utf-8") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
  with run_dir_lib.RunDirLock(directory):
    pass


# ---- the same, through a run ------------------------------------------------

@pytest.mark.timeout(120)
def test_a_run_on_a_locked_directory_is_refused_before_touching_it(tmp_path):
  from ald_jax.system import run  # pylint: disable=import-outside-toplevel
  from helpers import tiny_run  # pylint: disable=import-outside-toplevel
  directory = tmp_path / "run"
  holder = _start_holder(tmp_path, directory)
  try:
    with pytest.raises(run_dir_lib.RunDirLockedError,
                       match=f"pid {holder.pid}"):
      run.train(tiny_run(directory, agent="lstm"))
    assert os.listdir(directory) == [run_dir_lib.LOCK_NAME]
    assert run_dir_lib.read_lock_holder(directory) == holder.pid
  finally:
    holder.kill()
    holder.wait(timeout=60)
    holder.stdin.close()
    holder.stdout.close()


def test_a_resume_with_a_changed_learning_rate_is_refused_by_the_run(
    tmp_path):
  """The run compares the newest checkpoint's config before building
  anything, and leaves the stored config files as they were."""
  from ald_jax.system import run  # pylint: disable=import-outside-toplevel
  from helpers import tiny_run  # pylint: disable=import-outside-toplevel
  first = tiny_run(tmp_path, agent="lstm")
  run_dir_lib.write_segment_config(tmp_path, 0, {"train": first})
  with checkpoint.Checkpointer(tmp_path / run.CHECKPOINT_DIR) as ckpt:
    ckpt.save(4, {"w": np.zeros(2, np.float32)},
              {"learner_steps": 4, "env_steps": 256, "config": first})
  before = {name: (tmp_path / name).read_text()
            for name in ("config.0.json", "config.json")}
  learner = dataclasses.replace(
      first.learner, learner_optimizer=config_lib.OptimizerConfig(
          learning_rate=1e-3))
  changed = dataclasses.replace(first, learner=learner, resume=True)
  with pytest.raises(config_lib.ConfigError,
                     match=rf"resume: .*\n  {LR_PATH}: stored 0.0003, "
                           r"now 0.001\n"):
    run.train(changed)
  assert {name: (tmp_path / name).read_text()
          for name in ("config.0.json", "config.json")} == before
  assert not (tmp_path / "config.1.json").exists()
  assert not (tmp_path / "metrics.jsonl").exists()
  # Through the package's API (the CLI's flag table), the refusal names the
  # flag to pass, and a flag name allows the change.
  with pytest.raises(config_lib.ConfigError,
                     match=r"\(--learner_lr\): stored 0.0003, now 0.001\n.*"
                           r"--resume_allow_change=learner_lr"):
    train_cli.train(changed)
  with pytest.raises(config_lib.ConfigError, match="'lr' is neither"):
    train_cli.train(dataclasses.replace(changed, resume_allow_change=("lr",)))


def test_a_resume_into_a_changed_model_names_the_mismatched_leaves(tmp_path):
  """An allowed config change that changes a parameter's shape is refused
  at restore, naming each leaf (no traceback from deep inside orbax)."""
  import jax  # pylint: disable=import-outside-toplevel
  from ald_jax import learner as learner_lib  # pylint: disable=import-outside-toplevel
  from ald_jax.envs import imaze  # pylint: disable=import-outside-toplevel
  from ald_jax.system import run  # pylint: disable=import-outside-toplevel
  from helpers import tiny_run  # pylint: disable=import-outside-toplevel
  first = tiny_run(tmp_path, agent="lstm")
  env = imaze.IMaze(seed=0)
  learner = learner_lib.make_learner(first.learner,
                                     env.observation_spec().shape,
                                     env.action_spec().num_values)
  state = learner.init(jax.random.PRNGKey(0), learner.example_batch(8))
  with checkpoint.Checkpointer(tmp_path / run.CHECKPOINT_DIR) as ckpt:
    ckpt.save(1, jax.device_get(state),
              {"learner_steps": 1, "env_steps": 64, "config": first})
  wider = dataclasses.replace(
      first, resume=True, resume_allow_change=("lstm",),
      learner=dataclasses.replace(
          first.learner, lstm=config_lib.LSTMConfig(hidden_size=16)))
  with pytest.raises(checkpoint.CheckpointMismatchError) as info:
    run.train(wider)
  message = str(info.value)
  assert "was the model, optimizer or agent config changed?" in message
  assert re.search(r"\n  learner_params/net/params/head/\S+/kernel: stored "
                   r"float32\[32, \d+\], target float32\[16, \d+\]", message)
  assert not (tmp_path / "metrics.jsonl").exists()
