"""The absl CLI: flags map onto TrainConfig; bad flags fail before any work."""
import dataclasses
import json
import os
import subprocess
import sys

from absl import app
from absl import flags
import pytest

import ald_jax
from ald_jax import config as config_lib
from ald_jax import train

import test_metrics  # pylint: disable=wrong-import-order


def parse(*argv) -> config_lib.TrainConfig:
  flag_values = flags.FlagValues()
  train.define_flags(flag_values)
  flag_values(["prog", *argv])
  return train.config_from_flags(flag_values)


def test_defaults_match_the_config_defaults():
  config = parse()
  assert config.logdir.startswith(os.path.join("runs", "ald_imaze_"))
  # ald: one distill step per RL step; everything else as in the dataclasses.
  assert config == dataclasses.replace(config_lib.TrainConfig(),
                                       logdir=config.logdir)


def test_flags_reach_nested_fields():
  config = parse("--agent=transformer", "--gtrxl_num_layers=2",
                 "--torso_mlp_sizes=32,16", "--env_kwargs={\"corridor_length\": 8}",
                 "--learner_lr=1e-3", "--max_grad_norm=5", "--resume",
                 "--logdir=runs/x")
  assert config.learner.agent == "transformer"
  assert config.distill_steps_per_rl_step == 0.0  # resolved for non-ald agents
  assert config.learner.gtrxl.num_layers == 2
  assert config.learner.torso.mlp_sizes == (32, 16)
  assert config.env_kwargs_dict == {"corridor_length": 8}
  assert config.learner.learner_optimizer.learning_rate == 1e-3
  assert config.learner.actor_optimizer.max_grad_norm == 5.0
  assert config.resume


@pytest.mark.parametrize("argv, flag", [
    (["--distill_steps_per_rl_step=-1"], "--distill_steps_per_rl_step"),
    (["--unroll_length=0"], "--unroll_length"),
    (["--envs_per_actor=0"], "--envs_per_actor"),
    (["--gtrxl_num_heads=3"], "--gtrxl_d_model"),
    (["--agent=lstm", "--distill_steps_per_rl_step=2"],
     "--distill_steps_per_rl_step"),
    (["--env_kwargs=[1, 2]"], "env_kwargs"),
    (["--torso_mlp_sizes=a,b"], "--torso_mlp_sizes"),
    (["--learner_lr=0"], "--learner_lr"),
    (["--actor_lr=-1"], "--actor_lr"),
    (["--max_grad_norm=0"], "--max_grad_norm"),
    (["--replay_capacity=4"], "--replay_capacity"),
])
def test_bad_values_name_the_flag(argv, flag):
  with pytest.raises(app.UsageError, match=flag):
    parse(*argv)


def test_resume_without_a_logdir_is_refused():
  with pytest.raises(app.UsageError, match="--resume: needs --logdir"):
    train.config_from_argv(["--resume"])


def test_unknown_agent_is_rejected_by_the_parser():
  with pytest.raises(flags.IllegalFlagValueError, match="agent"):
    parse("--agent=gru")


def test_cli_exits_nonzero_before_any_work(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "ald_jax.train", "--unroll_length=0",
       f"--logdir={tmp_path / 'run'}"],
      capture_output=True, text=True, timeout=120, check=False)
  assert result.returncode != 0
  assert "--unroll_length: must be a positive integer, got 0" in (
      result.stdout + result.stderr)
  assert not (tmp_path / "run").exists()  # nothing was started or written


def test_package_is_callable_as_train():
  assert callable(ald_jax.train)
  assert ald_jax.train.config_from_flags is train.config_from_flags


def test_new_system_flags_reach_the_config():
  config = parse("--actors=ray", "--ray_address=10.0.0.1:6379",
                 "--actor_stall_s=30", "--max_actor_restarts=5",
                 "--nonfinite_obs=mask")
  assert config.actors == "ray"
  assert config.ray_address == "10.0.0.1:6379"
  assert config.actor_stall_s == 30.0 and config.max_actor_restarts == 5
  assert config.nonfinite_obs == "mask"
  with pytest.raises(app.UsageError, match="--ray_address"):
    parse("--ray_address=10.0.0.1:6379")  # needs --actors=ray
  with pytest.raises(app.UsageError, match="--ray_address: needs actors='ray'"):
    parse("--actors=processes", "--ray_address=10.0.0.1:6379")
  with pytest.raises(app.UsageError, match="--actor_stall_s"):
    parse("--actor_stall_s=-1")
  with pytest.raises(app.UsageError, match="--batch_size"):
    parse("--num_actors=1", "--envs_per_actor=4", "--batch_size=8")


def test_threads_per_actor_process_flag_is_validated():
  config = parse("--actors=processes", "--num_actors=4",
                 "--threads_per_actor_process=2")
  assert config.threads_per_actor_process == 2
  assert parse().threads_per_actor_process == 1
  with pytest.raises(app.UsageError,
                     match="--threads_per_actor_process: needs actors="):
    parse("--num_actors=4", "--threads_per_actor_process=2")  # threads mode
  with pytest.raises(app.UsageError,
                     match=r"--threads_per_actor_process: must divide "
                     r"num_actors \(3\)"):
    parse("--actors=processes", "--num_actors=3",
          "--threads_per_actor_process=2")
  with pytest.raises(app.UsageError, match="--threads_per_actor_process"):
    parse("--actors=processes", "--threads_per_actor_process=0")


def test_exit_status():
  assert train.exit_status("budget") == 0
  assert train.exit_status("wall_time") == 0
  assert train.exit_status("signal:SIGTERM") == 143
  assert train.exit_status("signal:SIGINT") == 130


_CONFIG_FROM_FLAGS = train.config_from_flags


def _main_with(monkeypatch, tmp_path, outcome, *argv):
  """Runs the CLI's main with run.train replaced by `outcome(config)`."""
  from ald_jax.system import run  # pylint: disable=import-outside-toplevel

  def run_train(config, *, flag_paths):
    # Refused resumes name flags, and flag names may allow changes.
    assert flag_paths is train.FLAG_PATHS
    return outcome(config)
  monkeypatch.setattr(run, "train", run_train)
  flag_values = flags.FlagValues()
  train.define_flags(flag_values)
  flag_values(["prog", f"--logdir={tmp_path}", *argv])
  config = _CONFIG_FROM_FLAGS(flag_values)
  monkeypatch.setattr(train, "config_from_flags", lambda: config)
  return train.main(["prog"])


def test_main_exit_codes_and_plot(monkeypatch, tmp_path, capsys):
  from ald_jax import metrics  # pylint: disable=import-outside-toplevel
  from ald_jax.system import errors  # pylint: disable=import-outside-toplevel
  from ald_jax.system import run  # pylint: disable=import-outside-toplevel
  with metrics.MetricsWriter(tmp_path) as writer:
    for step in (100, 200):
      writer.write({"env_steps": step, "wall_time_s": step / 10,
                    "episode_return": 0.5, "success_rate": 0.5})

  def stopped_by(reason):
    return lambda config: run.RunResult(str(tmp_path), {}, None, reason)

  assert _main_with(monkeypatch, tmp_path, stopped_by("budget")) == 0
  # The CLI draws the end-of-run plot (the system layer does not), after
  # the run closed its metrics writer, and adds it to TensorBoard's images.
  assert (tmp_path / "curves.png").exists()
  if metrics.tensorboard_available():
    images = [(v.tag, event.step) for event in test_metrics._events(tmp_path)
              for v in event.summary.value if v.HasField("image")]
    assert images == [("curves", 200)]
  assert _main_with(monkeypatch, tmp_path,
                    stopped_by("signal:SIGTERM")) == 143

  def known_error(config):
    raise errors.ActorStalledError("actor 1 stalled: no environment step")
  capsys.readouterr()
  assert _main_with(monkeypatch, tmp_path, known_error) == 1
  err = capsys.readouterr().err
  assert "run failed: actor 1 stalled" in err and "Traceback" not in err


def test_every_flag_and_config_field_appears_once():
  names = [f.name for f in train.FLAG_TABLE]
  fields = [f.path for f in train.FLAG_TABLE]
  assert sorted({n for n in names if names.count(n) > 1}) == []
  assert sorted({f for f in fields if fields.count(f) > 1}) == []


def test_no_tensorboard_image_with_the_flag_off(monkeypatch, tmp_path):
  from ald_jax import metrics  # pylint: disable=import-outside-toplevel
  from ald_jax.system import run  # pylint: disable=import-outside-toplevel
  with metrics.MetricsWriter(tmp_path, tensorboard=False) as writer:
    writer.write({"env_steps": 100, "wall_time_s": 1.0,
                  "episode_return": 0.5, "success_rate": 0.5})
  assert _main_with(monkeypatch, tmp_path, lambda config: run.RunResult(
      str(tmp_path), {}, None, "budget"), "--notensorboard") == 0
  assert (tmp_path / "curves.png").exists()
  assert not [f for f in os.listdir(tmp_path) if "tfevents" in f]


# ---- the command line as a user meets it -------------------------------------

def cli(*argv, timeout=120):
  """`python -m ald_jax.train ARGV` in a subprocess (no run starts: every
  case here ends before training)."""
  env = dict(os.environ, PYTHONPATH=os.getcwd())
  return subprocess.run([sys.executable, "-m", "ald_jax.train", *argv],
                        capture_output=True, text=True, timeout=timeout,
                        check=False, env=env)


@pytest.mark.parametrize("argv, message", [
    (["--agnet=ald"], "Unknown command line flag 'agnet'"),
    (["--agent=nosuch"], "--agent"),
    (["--discount=1.5"], "--discount: must be in [0, 1], got 1.5"),
    (["stray"], "unexpected arguments: stray"),
    (["--only_check_args", "--discount=1.5"], "--discount"),
])
def test_bad_input_exits_2_with_a_short_message(argv, message, tmp_path):
  result = cli(*argv, f"--logdir={tmp_path / 'run'}")
  assert result.returncode == train.EXIT_BAD_INPUT == 2, result.stderr
  assert message in result.stderr
  # The cause only: never the whole flag list.
  assert len(result.stderr.strip().splitlines()) <= 3, result.stderr
  assert "--gtrxl_d_model" not in result.stderr
  assert not (tmp_path / "run").exists()


def test_only_check_args_accepts_a_valid_config_without_work(tmp_path):
  result = cli("--only_check_args", "--agent=lstm",
               f"--logdir={tmp_path / 'run'}")
  assert result.returncode == 0, result.stderr
  assert not (tmp_path / "run").exists()


def test_print_config_prints_the_validated_config_and_exits_0(tmp_path):
  result = cli("--print_config", "--agent=lstm", "--lstm_hidden_size=48",
               "--env_kwargs={\"corridor_length\": 6}",
               f"--logdir={tmp_path / 'run'}")
  assert result.returncode == 0, result.stderr
  printed = json.loads(result.stdout)
  expected = train.config_from_argv([
      "--agent=lstm", "--lstm_hidden_size=48",
      "--env_kwargs={\"corridor_length\": 6}",
      f"--logdir={tmp_path / 'run'}"])
  assert printed == json.loads(train.config_json(expected))
  assert printed["learner"]["lstm"]["hidden_size"] == 48
  # Resolved: lstm takes no distill-only steps.
  assert printed["distill_steps_per_rl_step"] == 0.0
  assert printed["env_kwargs"] == [["corridor_length", 6]]
  assert not (tmp_path / "run").exists()  # nothing trained or written
  bad = cli("--print_config", "--batch_size=0")
  assert bad.returncode == 2 and "--batch_size" in bad.stderr


def test_help_lists_every_flag_once_by_topic():
  result = cli("--help")
  assert result.returncode == 0
  text = result.stdout
  assert text == train.help_text()
  titles = [title for title, _, _ in train.FLAG_TOPICS]
  assert titles == ["Run", "Agent and sizes", "Learner", "Distillation",
                    "Actors and system", "Evaluation", "Faults"]
  positions = [text.index(f"\n{title}: ") for title in titles]
  assert positions == sorted(positions)
  for flag in train.FLAG_TABLE:
    assert text.count(f"  --{flag.name} ") == 1, flag.name
  assert "Other:" not in text  # no flag without a topic
  for code in ("0:", "1:", "2:", "128+N:"):
    assert f"\n  {code}" in text


def test_every_flag_has_exactly_one_topic():
  named = [n for _, _, names in train.FLAG_TOPICS for n in names]
  assert sorted(named) == sorted(f.name for f in train.FLAG_TABLE)


def test_the_cli_reference_is_current():
  # docs/cli.md is generated: rerun scripts/make_cli_reference.py when a
  # flag, its help, default or topic changes.
  path = os.path.join(os.path.dirname(__file__), os.pardir, "docs", "cli.md")
  with open(path, encoding="utf-8") as f:
    assert f.read() == train.cli_reference()
  text = train.cli_reference()
  for flag in train.FLAG_TABLE:
    assert f"| `--{flag.name}` |" in text
    assert flag.help.replace("|", "\\|") in text  # the --help wording


def test_run_cli_takes_its_argv_and_exits_with_the_documented_codes(
    capsys):
  with pytest.raises(SystemExit) as info:
    train.run_cli(["ald-train", "--help"])
  assert info.value.code == 0
  assert capsys.readouterr().out.startswith("usage: ald-train ")
