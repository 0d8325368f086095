"""Every python block in README.md and docs/*.md runs: each is marked
`<!-- test: NAME -->` (or is the README's learner snippet, tests/
test_readme.py) and executed here; any other code block is marked as
shell or text. A new unmarked python block, or a marked one no test runs,
fails `test_every_python_block_is_marked_and_run`.

Blocks that call `ald_jax.train` run with it replaced by `checked_train`:
the config and factory are validated as a run would (the factory's specs,
20 batched steps, its recorded provenance) without training; whole runs
with user factories are tests/test_run_provenance.py's. The README's
`run_cli` block runs a real (tiny) command-line run.
"""
import json
import os
import subprocess
import sys

import dm_env
from dm_env import specs
import numpy as np
import pytest

import ald_jax
from ald_jax import config as config_lib
from ald_jax.envs import batched
from ald_jax.envs import imaze
from ald_jax.envs import registry
from ald_jax.system import run
from doc_blocks import PAGES, ROOT, code_blocks, marked_block  # pylint: disable=wrong-import-order

class MyEnv(imaze.IMaze):
  """Stands in for a user's environment with a `size` keyword."""

  def __init__(self, seed, size=5):
    super().__init__(seed=seed, corridor_length=size)


class MyDictEnv(dm_env.Environment):
  """A dict observation with an image-like "pixels" entry."""

  def __init__(self, seed):
    self._rng = np.random.default_rng(seed)

  def _obs(self):
    return {"pixels": self._rng.integers(0, 256, (3, 3, 1)).astype(np.uint8),
            "speed": np.zeros(2, np.float32)}

  def reset(self):
    return dm_env.restart(self._obs())

  def step(self, action):
    return dm_env.transition(0.0, self._obs())

  def observation_spec(self):
    return {"pixels": specs.BoundedArray((3, 3, 1), np.uint8, 0, 255),
            "speed": specs.Array((2,), np.float32)}

  def action_spec(self):
    return specs.DiscreteArray(3)


def checked_train(calls):
  def train(config, env_factory=None):
    assert isinstance(config, config_lib.TrainConfig)
    factory = run.resolve_env_factory(config, env_factory)
    info = run.probe_environment(factory, config.seed)
    envs = batched.BatchedEnv(factory, 2, seed=0)
    envs.reset()
    for _ in range(20):
      envs.step(np.zeros(2, np.int32))
    calls.append((config, info, registry.describe_env_factory(factory)))
    return run.RunResult(config.logdir, {"episode_return": 0.0}, None,
                         "budget")
  return train


def execute(name, monkeypatch, **names):
  calls = []
  monkeypatch.setattr(ald_jax.train.__class__, "__call__",
                      lambda self, config, env_factory=None:
                      checked_train(calls)(config, env_factory))
  namespace = dict(names)
  exec(compile(marked_block(name), name, "exec"), namespace)  # pylint: disable=exec-used
  return namespace, calls


@pytest.fixture
def fresh_registry():
  before = set(registry.available_envs())
  yield
  for name in set(registry.available_envs()) - before:
    registry.unregister(name)


def test_readme_dm_env_example(monkeypatch):
  namespace, calls = execute("readme-dm-env", monkeypatch)
  (config, info, record), = calls
  assert config.logdir == "runs/recall" and config.total_env_steps == 100_000
  assert info.obs_shape == (1,) and info.num_actions == 2
  assert record["source"] == "callable"
  # The example is a memory task: naming the cue pays 1, the other 0.
  env = namespace["Recall"](seed=3, delay=2)
  cue = int(env.reset().observation[0] > 0)
  env.step(0)
  assert env.step(cue).reward == 1.0


def test_readme_gymnasium_example(monkeypatch, capsys):
  _, calls = execute("readme-gymnasium", monkeypatch)
  (config, info, record), = calls
  assert config.logdir == "runs/cartpole" and info.num_actions == 2
  assert record["id"] == "CartPole-v1"
  assert record["kwargs"] == {"max_episode_steps": 200}
  assert "runs/cartpole" in capsys.readouterr().out


def test_docs_batched_env_example(monkeypatch):
  namespace, _ = execute("batched-env", monkeypatch)
  assert namespace["ts"].observation.shape[0] == 16


def test_docs_own_env_example(monkeypatch, fresh_registry):  # pylint: disable=redefined-outer-name,unused-argument
  _, calls = execute("my-env", monkeypatch, MyEnv=MyEnv, MyDictEnv=MyDictEnv)
  (config, info, record), = calls
  # The last factory of the block: every dict entry concatenated.
  assert config.logdir == "runs/my_env" and info.obs_shape == (11,)
  assert record["source"] == "callable"


def test_docs_gymnasium_id_example(monkeypatch):
  namespace, _ = execute("gymnasium-id", monkeypatch)
  assert registry.describe_env_factory(namespace["factory"])["kwargs"] == {
      "max_episode_steps": 200}


def script_run(tmp_path, code, *argv, timeout=300):
  script = tmp_path / "my_train.py"
  script.write_text(code)
  env = dict(os.environ, PYTHONPATH=ROOT)
  return subprocess.run([sys.executable, str(script), *argv],
                        capture_output=True, text=True, timeout=timeout,
                        check=False, env=env, cwd=tmp_path)


def test_docs_run_cli_example_puts_the_environment_behind_the_flags(
    tmp_path):
  prelude = "from ald_jax.envs.imaze import IMaze as MyEnv\n"
  result = script_run(tmp_path, prelude + marked_block("run-cli-api"),
                      "--print_config", "--env=my_env")
  assert result.returncode == 0, result.stderr
  assert json.loads(result.stdout)["env"] == "my_env"


TINY_FLAGS = (
    "--agent=lstm", "--total_env_steps=300", "--num_actors=1",
    "--envs_per_actor=2", "--unroll_length=8", "--learner_context=8",
    "--batch_size=2", "--lstm_hidden_size=16", "--torso_mlp_sizes=16",
    "--replay_capacity=8", "--queue_capacity=2", "--calibration_steps=5",
    "--t_actor_budget_ms=1000", "--eval_interval_s=0",
    "--report_interval_s=0.5", "--notensorboard")


def test_readme_run_cli_example_trains_a_registered_environment(tmp_path):
  recall = marked_block("readme-dm-env").split("cfg = config.TrainConfig")[0]
  run_dir = tmp_path / "run"
  result = script_run(tmp_path, recall + "\n" + marked_block("readme-run-cli"),
                      "--env=recall", '--env_kwargs={"delay": 3}',
                      f"--logdir={run_dir}", *TINY_FLAGS)
  assert result.returncode == 0, result.stderr[-3000:]
  stored = json.loads((run_dir / "config.json").read_text())
  assert stored["env"] == {"source": "registry", "name": "recall",
                           "kwargs": {"delay": 3}}


RUN_HERE = {"readme-snippet", "readme-dm-env", "readme-gymnasium",
            "readme-run-cli", "batched-env", "my-env", "gymnasium-id",
            "run-cli-api"}
# Blocks that need a trained run: run by the test that trains one.
RUN_BY_THE_EXPORT_TEST = {"deploy-export", "deploy-other-paths",
                          "deploy-without-ald-jax"}


def test_every_python_block_is_marked_and_run():
  unmarked, names = [], []
  for path in PAGES:
    for language, marker, code in code_blocks(path):
      assert language, f"{path}: a code block without a language"
      if language == "python":
        if marker is None:
          unmarked.append(f"{os.path.relpath(path, ROOT)}: {code[:60]!r}")
        else:
          names.append(marker)
  assert not unmarked, ("python blocks that no test runs (mark them "
                        "<!-- test: NAME --> and run them here, or make them "
                        f"text): {unmarked}")
  assert sorted(names) == sorted(RUN_HERE | RUN_BY_THE_EXPORT_TEST)
  export_test = open(os.path.join(ROOT, "tests", "test_export.py"),
                     encoding="utf-8").read()
  for name in RUN_BY_THE_EXPORT_TEST:
    assert f'"{name}"' in export_test, name
