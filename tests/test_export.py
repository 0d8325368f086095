"""Exporting the acting policy from a run directory (ald_jax/export.py).

The round trip: a real tiny run written by `run.train`, exported, loaded
three ways (Flax `Policy`, the `jax.export` artefact, numpy), stepped beside
the in-training actor core on the same observations, episode starts
included.
"""
import dataclasses
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import ald_jax
from ald_jax import checkpoint as checkpoint_lib
from ald_jax import config as config_lib
from ald_jax import export as export_lib
from ald_jax import learner as learner_lib
from ald_jax import policy as policy_lib
from ald_jax import policy_numpy
from ald_jax import types
from ald_jax.system import actor as actor_lib
from ald_jax.system import run
from ald_jax.system import run_dir as run_dir_lib
from doc_blocks import marked_block  # pylint: disable=wrong-import-order


def tiny_learner(agent="ald", **changes):
  return config_lib.LearnerConfig(
      agent=agent, unroll_length=8, learner_context=8, batch_size=4,
      learner_memory="recompute",   # one compiled train step, not two
      rl_loss="vtrace",             # cheaper to compile than V-MPO
      torso=config_lib.TorsoConfig(mlp_sizes=(32,)),
      lstm=config_lib.LSTMConfig(hidden_size=16),
      gtrxl=config_lib.GTrXLConfig(num_layers=1, d_model=32, num_heads=2,
                                   mlp_size=64, memory_length=8), **changes)


def tiny_run(logdir, **changes):
  base = config_lib.TrainConfig(
      learner=tiny_learner(), num_actors=1, envs_per_actor=4,
      total_env_steps=400, distill_steps_per_rl_step=0.0, replay_capacity=64,
      queue_capacity=4, t_actor_budget_ms=1000.0, calibration_steps=10,
      report_interval_s=0.5, eval_interval_s=0.0, tensorboard=False,
      logdir=str(logdir), seed=3)
  return dataclasses.replace(base, **changes)


# One real run serves several checks: one test, so that xdist's workers do
# not each train it.
@pytest.mark.first
def test_export_of_a_real_run(tmp_path, capsys):
  result = run.train(tiny_run(tmp_path / "run"))
  out = export_lib.export_actor(result.run_dir, tmp_path / "policy")
  trained = (result, out)
  check_round_trip_matches_the_in_training_actor(trained)
  check_policy_json_records_the_run(trained)
  check_jax_export_artefact_needs_only_jax_and_numpy(trained)
  check_cli_exports_and_benches(trained, tmp_path, capsys)
  check_the_deploy_page_runs(trained, tmp_path)


def _reference_core(run_dir):
  """The in-training actor core and parameters, restored the way a resume
  restores the learner (the whole learner state)."""
  resolved = run_dir_lib.read_latest_config(run_dir)
  lcfg = export_lib.config_from_jsonable(config_lib.LearnerConfig,
                                         resolved["train"]["learner"])
  learner = learner_lib.make_learner(lcfg, tuple(resolved["obs_shape"]),
                                     resolved["num_actions"])
  state = learner.init(jax.random.PRNGKey(0),
                       learner.example_batch(lcfg.batch_size))
  state, _ = checkpoint_lib.restore_latest(
      os.path.join(run_dir, run.CHECKPOINT_DIR), state)
  return learner, learner.actor_params(state)


def _episode_inputs(obs_shape, num_envs, length, seed=0):
  """Observations and step types with episode starts mid-sequence."""
  rng = np.random.default_rng(seed)
  observations = rng.standard_normal(
      (length, num_envs, *obs_shape)).astype(np.float32)
  step_types = np.full((length, num_envs), types.MID, np.int32)
  step_types[0] = types.FIRST
  step_types[3, 0] = types.FIRST
  step_types[5, num_envs - 1] = types.FIRST
  step_types[2, :] = types.LAST
  return observations, step_types


def check_round_trip_matches_the_in_training_actor(trained):
  result, out = trained
  learner, params = _reference_core(result.run_dir)
  core = learner.actor_core
  act = actor_lib.make_act_fn(core.step)
  num_envs, seed = 3, 11
  observations, step_types = _episode_inputs(learner.obs_shape, num_envs, 8)

  flax_policy = policy_lib.Policy.load(out)
  exported = policy_lib.ExportedPolicy.load(out)
  numpy_policy = policy_numpy.NumpyPolicy.load(out)
  ref_state = core.initial_state(num_envs)
  ref_key = jax.random.key(seed)
  states = {"flax": flax_policy.initial_state(num_envs, seed),
            "jax_export": exported.initial_state(num_envs, seed)}
  greedy_states = {"flax": flax_policy.initial_state(num_envs),
                   "jax_export": exported.initial_state(num_envs),
                   "numpy": numpy_policy.initial_state(num_envs)}
  paths = {"flax": flax_policy, "jax_export": exported,
           "numpy": numpy_policy}
  for obs, step_type in zip(observations, step_types):
    action, logits, ref_state, ref_key = act(params, obs, step_type,
                                             ref_state, ref_key)
    ref_recurrent = np.asarray(ref_state)
    for name, state in states.items():
      got, states[name] = paths[name].step(state, obs, step_type)
      np.testing.assert_array_equal(np.asarray(got), np.asarray(action),
                                    err_msg=name)
      np.testing.assert_allclose(np.asarray(states[name].recurrent),
                                 ref_recurrent, rtol=1e-5, atol=1e-6,
                                 err_msg=name)
    for name, state in greedy_states.items():
      got, greedy_states[name] = paths[name].step(state, obs, step_type,
                                                  greedy=True)
      # The greedy states follow the same recurrence (it does not depend on
      # the action), so they track the reference too.
      np.testing.assert_allclose(np.asarray(greedy_states[name].recurrent),
                                 ref_recurrent, rtol=1e-4, atol=1e-5,
                                 err_msg=name)
      np.testing.assert_array_equal(
          np.asarray(got), np.argmax(np.asarray(logits), -1), err_msg=name)
    numpy_logits, _ = numpy_policy.logits(
        np.asarray(greedy_states["numpy"].recurrent), obs, step_type)
    assert numpy_logits.shape == logits.shape
  # Greedy steps leave the key alone; sampled steps advance it.
  assert np.array_equal(
      jax.random.key_data(greedy_states["flax"].key),
      jax.random.key_data(flax_policy.initial_state(1).key))
  assert np.array_equal(jax.random.key_data(states["flax"].key),
                        jax.random.key_data(ref_key))


def check_policy_json_records_the_run(trained):
  result, out = trained
  spec = policy_numpy.read_policy_json(out)
  resolved = run_dir_lib.read_latest_config(result.run_dir)
  assert spec["format"] == "ald_jax.policy" and spec["version"] == 1
  network = spec["network"]
  assert network["obs_shape"] == resolved["obs_shape"]
  assert network["num_actions"] == resolved["num_actions"]
  assert network["lstm"]["hidden_size"] == 16
  assert network["torso"]["mlp_sizes"] == [32]
  identity = spec["identity"]
  assert identity["agent"] == "ald" and identity["env"] == "imaze"
  assert identity["learner_steps"] == result.final_row["learner_steps"]
  assert identity["env_steps"] >= 400
  assert identity["envs_per_actor"] == 4
  assert identity["t_actor"]["alone"] == resolved["t_actor_alone"]
  assert identity["t_actor"]["in_run"]["p50_us"] == (
      result.final_row["t_actor_p50_us"])
  assert sorted(os.listdir(out)) == sorted([
      "policy.json", "params.npz", "step.jax_export",
      "step_greedy.jax_export"])
  # Nothing left beside the output (the temporary directory was renamed).
  assert [n for n in os.listdir(os.path.dirname(out)) if "tmp" in n] == []


def check_jax_export_artefact_needs_only_jax_and_numpy(trained):
  """A fresh interpreter loads the artefact without importing ald_jax."""
  _, out = trained
  code = f"""
import json, sys
import jax, numpy as np
from jax import export
with open({os.path.join(out, 'step_greedy.jax_export')!r}, 'rb') as f:
  step = export.deserialize(bytearray(f.read()))
spec = json.load(open({os.path.join(out, 'policy.json')!r}))
n = spec['network']
obs = np.linspace(-1, 1, 2 * int(np.prod(n['obs_shape']))).astype(np.float32)
obs = obs.reshape(2, *n['obs_shape'])
state = np.zeros((2, 2 * n['lstm']['hidden_size']), np.float32)
action, logits, state = step.call(obs, np.zeros(2, np.int32), state)
assert not [m for m in sys.modules if m.startswith('ald_jax')]
print(json.dumps([np.asarray(action).tolist(), np.asarray(state).tolist()]))
"""
  done = subprocess.run([sys.executable, "-c", code], capture_output=True,
                        text=True, check=False, cwd="/", timeout=300)
  assert done.returncode == 0, done.stderr
  action, state = json.loads(done.stdout.strip().splitlines()[-1])
  policy = policy_lib.Policy.load(out)
  spec = policy.spec["network"]
  obs = np.linspace(-1, 1, 2 * int(np.prod(spec["obs_shape"]))).astype(
      np.float32).reshape(2, *spec["obs_shape"])
  want, want_state = policy.step(policy.initial_state(2), obs,
                                 np.zeros(2, np.int32), greedy=True)
  assert action == np.asarray(want).tolist()
  np.testing.assert_allclose(state, np.asarray(want_state.recurrent),
                             rtol=1e-5, atol=1e-6)


def check_cli_exports_and_benches(trained, tmp_path, capsys):
  result, _ = trained
  out = tmp_path / "cli_policy"
  assert export_lib.main([result.run_dir, "--out", str(out)]) == 0
  assert policy_numpy.read_policy_json(out)["identity"]["agent"] == "ald"
  capsys.readouterr()
  assert export_lib.main(["--bench", str(out), "--calls", "40"]) == 0
  report = json.loads(capsys.readouterr().out)
  assert report["envs"] == [1, 4]
  for path in export_lib.PATHS:
    for num_envs in (1, 4):
      for stat in ("p50", "p99"):
        value = report[f"{path}_{stat}_us_e{num_envs}"]
        assert np.isfinite(value) and value > 0
      assert isinstance(report["fits_budget"][f"{path}_e{num_envs}"], bool)
  assert report["budget_ms"] == 1000.0   # the run's
  assert report["machine"]["cpu_count"] >= 1
  # An existing, non-empty --out is refused.
  assert export_lib.main([result.run_dir, "--out", str(out)]) == 2
  assert "not an empty directory" in capsys.readouterr().err


def check_the_deploy_page_runs(trained, tmp_path):
  """docs/deploy.md's blocks, in order, on this run (its paths replaced)."""
  result, _ = trained
  policies = tmp_path / "deploy_page"
  code = "\n".join(marked_block(name) for name in (
      "deploy-export", "deploy-other-paths", "deploy-without-ald-jax"))
  code = code.replace('"runs/imaze"', repr(result.run_dir)).replace(
      '"policies/imaze', '"' + str(policies))
  obs_shape = run_dir_lib.read_latest_config(result.run_dir)["obs_shape"]
  namespace = {"observation": np.zeros((1, *obs_shape), np.float32),
               "step_type": np.zeros(1, np.int32)}
  exec(compile(code, "docs/deploy.md", "exec"), namespace)  # pylint: disable=exec-used
  assert (policies / "policy.json").exists()
  assert int(np.asarray(namespace["action"]).reshape(-1)[0]) in range(
      run_dir_lib.read_latest_config(result.run_dir)["num_actions"])


# ---- fake run directories: a learner state saved like a run saves it ------

def _fake_run(path, agent, steps=(1,), seed=0):
  """A run directory with config.json and checkpoints of `agent`'s learner
  state (no training): returns {step: the learner state saved}."""
  lcfg = tiny_learner(agent)
  cfg = config_lib.TrainConfig(learner=lcfg, num_actors=1, envs_per_actor=4,
                               logdir=str(path))
  obs_shape, num_actions = (5, 5, 3), 4
  learner = learner_lib.make_learner(lcfg, obs_shape, num_actions)
  run_dir_lib.write_segment_config(path, 0, {
      "train": checkpoint_lib.to_jsonable(cfg), "obs_shape": list(obs_shape),
      "num_actions": num_actions, "agent": agent})
  saved = {}
  with checkpoint_lib.Checkpointer(path / run.CHECKPOINT_DIR) as ckpt:
    for step in steps:
      state = jax.device_get(learner.init(
          jax.random.PRNGKey(seed + step), learner.example_batch(4)))
      ckpt.save(step, state, {"learner_steps": step, "env_steps": 10 * step,
                              "config": checkpoint_lib.to_jsonable(cfg)})
      saved[step] = state
  return learner, saved


def _assert_params_equal(exported_dir, params):
  stored = policy_numpy.read_params(exported_dir)
  flat_stored = policy_numpy.flatten_params(stored)
  flat_want = policy_numpy.flatten_params(jax.device_get(params))
  assert flat_stored.keys() == flat_want.keys()
  for name, value in flat_want.items():
    np.testing.assert_array_equal(flat_stored[name], value, err_msg=name)


@pytest.mark.parametrize("agent", ["lstm", "asymmetric"])
def test_lstm_acting_agents_export_their_policy(tmp_path, agent):
  learner, saved = _fake_run(tmp_path / "run", agent)
  out = ald_jax.export_actor(tmp_path / "run", tmp_path / "policy")
  _assert_params_equal(out, learner.actor_params(saved[1]))
  spec = policy_numpy.read_policy_json(out)
  assert spec["identity"]["agent"] == agent
  assert spec["network"]["obs_shape"] == [5, 5, 3]   # a grid: conv torso
  # Grid observations through the numpy conv: the same logits.
  policy = policy_lib.Policy.load(out)
  numpy_policy = policy_numpy.NumpyPolicy.load(out)
  obs = np.random.default_rng(0).standard_normal((2, 5, 5, 3)).astype(
      np.float32)
  step_type = np.array([types.FIRST, types.MID], np.int32)
  recurrent = np.random.default_rng(1).standard_normal(
      (2, 2 * 16)).astype(np.float32)
  want_logits, want_state = policy.logits(recurrent, obs, step_type)
  logits, state = numpy_policy.logits(recurrent, obs, step_type)
  np.testing.assert_allclose(logits, want_logits, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(state, want_state, rtol=1e-5, atol=1e-6)


def test_step_chooses_the_checkpoint(tmp_path):
  learner, saved = _fake_run(tmp_path / "run", "lstm", steps=(1, 2))
  newest = export_lib.export_actor(tmp_path / "run", tmp_path / "newest")
  older = export_lib.export_actor(tmp_path / "run", tmp_path / "older", 1)
  _assert_params_equal(newest, learner.actor_params(saved[2]))
  _assert_params_equal(older, learner.actor_params(saved[1]))
  assert policy_numpy.read_policy_json(older)["identity"][
      "checkpoint_step"] == 1
  with pytest.raises(export_lib.ExportError, match=r"no checkpoint step 7 "
                     r"\(steps: \[1, 2\]\)"):
    export_lib.export_actor(tmp_path / "run", tmp_path / "none", 7)
  assert not os.path.exists(tmp_path / "none")


def _nothing_written(tmp_path, name="policy"):
  return not os.path.exists(tmp_path / name) and not [
      n for n in os.listdir(tmp_path) if n.startswith(f".{name}.tmp")]


def test_refusals_write_nothing(tmp_path):
  with pytest.raises(export_lib.ExportError, match="no such run directory"):
    export_lib.export_actor(tmp_path / "missing", tmp_path / "policy")
  (tmp_path / "empty").mkdir()
  with pytest.raises(export_lib.ExportError, match="is not a run directory"):
    export_lib.export_actor(tmp_path / "empty", tmp_path / "policy")
  # A run whose checkpoints are gone.
  cfg = config_lib.TrainConfig(learner=tiny_learner("ald"))
  run_dir_lib.write_segment_config(tmp_path / "nockpt", 0, {
      "train": checkpoint_lib.to_jsonable(cfg), "obs_shape": [4],
      "num_actions": 3, "agent": "ald"})
  with pytest.raises(export_lib.ExportError, match="no checkpoint in"):
    export_lib.export_actor(tmp_path / "nockpt", tmp_path / "policy")
  # The transformer agent has no LSTM actor: refused with the reason.
  cfg = config_lib.TrainConfig(learner=tiny_learner("transformer"))
  run_dir_lib.write_segment_config(tmp_path / "gtrxl", 0, {
      "train": checkpoint_lib.to_jsonable(cfg), "obs_shape": [4],
      "num_actions": 3, "agent": "transformer"})
  with pytest.raises(export_lib.ExportError, match="acts with its GTrXL"):
    export_lib.export_actor(tmp_path / "gtrxl", tmp_path / "policy")
  assert _nothing_written(tmp_path)
  assert export_lib.main([str(tmp_path / "gtrxl"), "--out",
                          str(tmp_path / "policy")]) == 2


def test_unreadable_checkpoint_is_refused_naming_an_older_step(tmp_path):
  _fake_run(tmp_path / "run", "lstm", steps=(1, 2))
  state_dir = tmp_path / "run" / run.CHECKPOINT_DIR / "2" / "state"
  for root, _, files in os.walk(state_dir):
    for name in files:
      with open(os.path.join(root, name), "wb") as f:
        f.write(b"garbage")
  with pytest.raises(export_lib.ExportError,
                     match=r"step 2 is unreadable.*--step 1"):
    export_lib.export_actor(tmp_path / "run", tmp_path / "policy")
  assert _nothing_written(tmp_path)
  # The older step still exports.
  export_lib.export_actor(tmp_path / "run", tmp_path / "policy", 1)
