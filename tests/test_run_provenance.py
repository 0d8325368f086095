"""A run records where its environments came from, and a resume checks it.

`ald_jax.train(config, env_factory=...)` leaves `config.env` unused: the run
directory's config.json must name the factory (registry name, gymnasium id
or module:qualname), and a command-line resume, which can only rebuild a
registered environment, must refuse such a run instead of resuming it on
I-Maze.
"""
import dataclasses
import json
import os

import pytest

from ald_jax import checkpoint as checkpoint_lib
from ald_jax import config as config_lib
from ald_jax.envs import gymnasium_adapter
from ald_jax.envs import imaze
from ald_jax.envs import registry
from ald_jax.system import run
from ald_jax.system import run_dir as run_dir_lib
import helpers  # pylint: disable=g-bad-import-order


class MyMaze:
  """A user's factory object: a callable (seed) -> env."""

  def __call__(self, seed):
    return imaze.IMaze(seed=seed, corridor_length=3)


def make_maze(seed):
  return imaze.IMaze(seed=seed)


class DescribedFactory(MyMaze):

  def provenance(self):
    return {"source": "lab", "version": 3, "shape": (2, 2)}


def test_each_kind_of_factory_is_described():
  assert registry.describe_env_factory(
      registry.make_env_factory("imaze", corridor_length=6)) == {
          "source": "registry", "name": "imaze",
          "kwargs": {"corridor_length": 6}}
  gym = gymnasium_adapter.gymnasium_env_factory(
      "CartPole-v1", max_episode_steps=50)
  assert registry.describe_env_factory(gym) == {
      "source": "gymnasium", "id": "CartPole-v1",
      "kwargs": {"max_episode_steps": 50}, "observation_key": None,
      "observation_scale": 1.0}
  assert registry.describe_env_factory(MyMaze()) == {
      "source": "callable", "callable": "test_run_provenance:MyMaze"}
  assert registry.describe_env_factory(make_maze) == {
      "source": "callable", "callable": "test_run_provenance:make_maze"}
  # A factory's own description, made JSON-able (tuples as lists).
  assert registry.describe_env_factory(DescribedFactory()) == {
      "source": "lab", "version": 3, "shape": [2, 2]}


def test_a_bad_self_description_is_refused():
  class Bad(MyMaze):
    def provenance(self):
      return {"name": "no source"}
  with pytest.raises(TypeError, match="'source'"):
    registry.describe_env_factory(Bad())


GYM = {"source": "gymnasium", "id": "CartPole-v1", "kwargs": {},
       "observation_key": None, "observation_scale": 1.0}
IMAZE = {"source": "registry", "name": "imaze", "kwargs": {}}


def test_a_command_line_resume_of_a_factory_run_is_refused_with_the_way():
  with pytest.raises(config_lib.ConfigError) as info:
    run_dir_lib.check_resume_env(GYM, IMAZE)
  message = str(info.value)
  assert message.startswith("resume:")
  assert "'CartPole-v1'" in message and "'imaze'" in message
  assert "ald_jax.train(config, env_factory=...)" in message
  assert "run_cli" in message and "--env=NAME" in message


def test_resume_env_check_passes_only_the_same_environment():
  run_dir_lib.check_resume_env(GYM, dict(GYM))
  run_dir_lib.check_resume_env(None, IMAZE)  # a run recorded before
  # Registry to registry: the config comparison names env / env_kwargs.
  run_dir_lib.check_resume_env(IMAZE, dict(IMAZE, name="cue_recall"))
  other = {"source": "callable", "callable": "lab:OtherMaze"}
  with pytest.raises(config_lib.ConfigError, match="same env_factory"):
    run_dir_lib.check_resume_env(GYM, other)
  with pytest.raises(config_lib.ConfigError, match="same env_factory"):
    run_dir_lib.check_resume_env(GYM, dict(GYM, kwargs={"render_mode": 1}))
  run_dir_lib.check_resume_env(GYM, other, allow=("env",))


def read_json(path):
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def test_a_factory_run_records_the_factory_and_refuses_a_cli_resume(
    tmp_path):
  factory = gymnasium_adapter.gymnasium_env_factory(
      "CartPole-v1", max_episode_steps=40)
  config = helpers.tiny_run(tmp_path, total_env_steps=600)
  result = run.train(config, factory)
  stored = read_json(os.path.join(result.run_dir, "config.json"))
  assert stored["env"] == {
      "source": "gymnasium", "id": "CartPole-v1",
      "kwargs": {"max_episode_steps": 40}, "observation_key": None,
      "observation_scale": 1.0}
  # The unused built-in environment is recorded nowhere.
  assert "env" not in stored["train"] and "env_kwargs" not in stored["train"]
  latest = checkpoint_lib.read_latest_metadata(
      os.path.join(result.run_dir, run.CHECKPOINT_DIR))
  assert "env" not in latest[1]["config"]
  assert stored["obs_shape"] == [4] and stored["num_actions"] == 2

  # What the CLI does: no factory, so config.env (I-Maze) would be built.
  resume = dataclasses.replace(config, resume=True)
  with pytest.raises(config_lib.ConfigError, match="env_factory=") as info:
    run.train(resume)
  assert "'CartPole-v1'" in str(info.value)
  # From Python with the same factory it continues (the budget is spent).
  resumed = run.train(resume, factory)
  assert resumed.stopped_by == "budget"
  assert read_json(os.path.join(result.run_dir, "config.1.json"))["env"] == (
      stored["env"])


def test_a_registry_factory_fills_env_and_env_kwargs():
  record = registry.describe_env_factory(
      registry.make_env_factory("imaze", corridor_length=3))
  # config.env names another environment: the factory is what runs.
  config = config_lib.TrainConfig(env="cue_recall")
  effective = run._effective_config(config, record)  # pylint: disable=protected-access
  assert (effective.env, effective.env_kwargs) == (
      "imaze", (("corridor_length", 3),))
  recorded = run._recorded_config(effective, record)  # pylint: disable=protected-access
  assert recorded["env"] == "imaze"
  assert recorded["env_kwargs"] == [["corridor_length", 3]]
  # Another factory: env / env_kwargs did not make the environments.
  unused = run._effective_config(config, GYM)  # pylint: disable=protected-access
  assert unused.env == config_lib.TrainConfig().env
  assert "env" not in run._recorded_config(unused, GYM)  # pylint: disable=protected-access
