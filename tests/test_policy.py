"""Loading and stepping an exported policy (ald_jax/policy.py,
ald_jax/policy_numpy.py) without the learner."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from ald_jax import checkpoint as checkpoint_lib
from ald_jax import config as config_lib
from ald_jax import export as export_lib
from ald_jax import learner as learner_lib
from ald_jax import policy as policy_lib
from ald_jax import policy_numpy
from ald_jax import types
from ald_jax.networks import policy_value
from ald_jax.system import actor as actor_lib

HIDDEN, NUM_ACTIONS = 8, 3


def _write_policy(directory, obs_shape=(6,), conv_channels=(4,), seed=0):
  """An exported-format directory from a freshly initialised actor."""
  net = policy_value.LSTMPolicyValueNet(
      torso=config_lib.TorsoConfig(conv_channels=conv_channels,
                                   mlp_sizes=(16, 12)),
      lstm=config_lib.LSTMConfig(hidden_size=HIDDEN),
      num_actions=NUM_ACTIONS, obs_ndim=len(obs_shape))
  params = net.init(jax.random.PRNGKey(seed),
                    np.zeros((1, 1, *obs_shape), np.float32),
                    np.zeros((1, 1), np.int32), net.initial_state(1))
  cfg = config_lib.TrainConfig(learner=config_lib.LearnerConfig(
      torso=net.torso, lstm=net.lstm))
  resolved = {"train": checkpoint_lib.to_jsonable(cfg),
              "obs_shape": list(obs_shape), "num_actions": NUM_ACTIONS,
              "agent": "ald"}
  spec = export_lib.policy_spec(resolved, {"learner_steps": 1}, 1, None)
  os.makedirs(directory)
  with open(os.path.join(directory, "policy.json"), "w",
            encoding="utf-8") as f:
    json.dump(spec, f)
  np.savez(os.path.join(directory, "params.npz"),
           **policy_lib.as_numpy_params(params))
  return net, params


def _fresh_python(code):
  done = subprocess.run([sys.executable, "-c", code], capture_output=True,
                        text=True, check=False, timeout=300)
  assert done.returncode == 0, done.stderr
  return json.loads(done.stdout.strip().splitlines()[-1])


def test_loader_imports_nothing_of_the_learner(tmp_path):
  _write_policy(tmp_path / "p")
  loaded = _fresh_python(f"""
import json, sys
import numpy as np
import ald_jax
policy = ald_jax.Policy.load({str(tmp_path / 'p')!r})
state = policy.initial_state(2)
action, state = policy.step(state, np.zeros((2, 6), np.float32),
                            np.zeros(2, np.int32))
action, state = policy.step(state, np.zeros((2, 6), np.float32),
                            np.ones(2, np.int32), greedy=True)
print(json.dumps(sorted(sys.modules)))
""")
  for banned in ("optax", "orbax", "ald_jax.learner", "ald_jax.losses",
                 "ald_jax.checkpoint", "ald_jax.system"):
    assert not [m for m in loaded if m == banned or
                m.startswith(banned + ".")], banned
  assert "ald_jax.policy" in loaded and "flax" in loaded


def test_numpy_step_imports_no_jax(tmp_path):
  _write_policy(tmp_path / "p")
  loaded = _fresh_python(f"""
import json, sys
import numpy as np
from ald_jax import policy_numpy
policy = policy_numpy.NumpyPolicy.load({str(tmp_path / 'p')!r})
action, state = policy.step(policy.initial_state(2),
                            np.zeros((2, 6), np.float32), np.zeros(2, np.int32))
print(json.dumps(sorted(sys.modules)))
""")
  assert not [m for m in loaded if m.split(".")[0] in ("jax", "jaxlib",
                                                       "flax", "chex")]


@pytest.mark.parametrize("obs_shape", [(6,), (4, 5, 2)])
def test_numpy_matches_flax_over_an_episode_boundary(tmp_path, obs_shape):
  _write_policy(tmp_path / "p", obs_shape)
  policy = policy_lib.Policy.load(tmp_path / "p")
  numpy_policy = policy_numpy.NumpyPolicy.load(tmp_path / "p")
  rng = np.random.default_rng(0)
  recurrent = np.zeros((3, 2 * HIDDEN), np.float32)
  numpy_recurrent = recurrent
  for t in range(5):
    obs = rng.standard_normal((3, *obs_shape)).astype(np.float32)
    step_type = np.array([types.FIRST if t in (0, 3) else types.MID,
                          types.FIRST if t == 0 else types.MID,
                          types.LAST if t == 2 else types.MID], np.int32)
    logits, recurrent = policy.logits(recurrent, obs, step_type)
    numpy_logits, numpy_recurrent = numpy_policy.logits(numpy_recurrent, obs,
                                                        step_type)
    np.testing.assert_allclose(numpy_logits, logits, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(numpy_recurrent, recurrent, rtol=1e-5,
                               atol=1e-6)


def test_first_step_resets_the_recurrent_state(tmp_path):
  """A FIRST step ignores whatever state it is given (both paths)."""
  _write_policy(tmp_path / "p")
  policy = policy_lib.Policy.load(tmp_path / "p")
  numpy_policy = policy_numpy.NumpyPolicy.load(tmp_path / "p")
  obs = np.ones((2, 6), np.float32)
  first = np.full((2,), types.FIRST, np.int32)
  junk = np.full((2, 2 * HIDDEN), 5.0, np.float32)
  zeros = np.zeros_like(junk)
  for step in (policy.logits, numpy_policy.logits):
    from_junk = step(junk, obs, first)
    from_zeros = step(zeros, obs, first)
    np.testing.assert_allclose(np.asarray(from_junk[1]),
                               np.asarray(from_zeros[1]), atol=1e-7)
    mid = step(junk, obs, np.full((2,), types.MID, np.int32))
    assert not np.allclose(np.asarray(mid[1]), np.asarray(from_zeros[1]))


def test_sampled_steps_match_the_training_act_fn(tmp_path):
  net, params = _write_policy(tmp_path / "p")
  policy = policy_lib.Policy.load(tmp_path / "p")
  act = actor_lib.make_act_fn(learner_lib.lstm_actor_core(net).step)
  state = policy.initial_state(4, seed=5)
  ref_state, ref_key = state.recurrent, jax.random.key(5)
  rng = np.random.default_rng(1)
  for _ in range(6):
    obs = rng.standard_normal((4, 6)).astype(np.float32)
    step_type = np.full((4,), types.MID, np.int32)
    action, state = policy.step(state, obs, step_type)
    ref_action, _, ref_state, ref_key = act(params, obs, step_type,
                                            ref_state, ref_key)
    np.testing.assert_array_equal(np.asarray(action), np.asarray(ref_action))


def test_numpy_sampling_follows_the_softmax(tmp_path):
  _write_policy(tmp_path / "p")
  numpy_policy = policy_numpy.NumpyPolicy.load(tmp_path / "p")
  n = 40_000
  obs = np.tile(np.linspace(-2, 2, 6, dtype=np.float32), (n, 1))
  step_type = np.zeros(n, np.int32)
  state = numpy_policy.initial_state(n, seed=3)
  logits, _ = numpy_policy.logits(state.recurrent, obs, step_type)
  probs = np.exp(logits[0] - logits[0].max())
  probs /= probs.sum()
  action, state = numpy_policy.step(state, obs, step_type)
  frequencies = np.bincount(action, minlength=NUM_ACTIONS) / n
  np.testing.assert_allclose(frequencies, probs, atol=0.01)
  greedy, _ = numpy_policy.step(state, obs, step_type, greedy=True)
  assert (greedy == np.argmax(logits[0])).all()


def test_format_is_checked(tmp_path):
  with pytest.raises(policy_numpy.PolicyFormatError, match="no policy.json"):
    policy_lib.Policy.load(tmp_path)
  _write_policy(tmp_path / "p")
  path = tmp_path / "p" / "policy.json"
  spec = json.loads(path.read_text())
  path.write_text(json.dumps(dict(spec, version=99)))
  with pytest.raises(policy_numpy.PolicyFormatError,
                     match="format version 99"):
    policy_numpy.NumpyPolicy.load(tmp_path / "p")
  path.write_text(json.dumps(dict(spec, format="other")))
  with pytest.raises(policy_numpy.PolicyFormatError, match="format is not"):
    policy_lib.Policy.load(tmp_path / "p")
  with pytest.raises(ValueError, match="num_envs"):
    policy_numpy.NumpyPolicy(spec, policy_numpy.read_params(
        tmp_path / "p")).initial_state(0)


def test_params_flatten_round_trip():
  tree = {"params": {"a": {"kernel": np.ones((2, 3))},
                     "b": {"bias": np.arange(3.0)}}}
  flat = policy_numpy.flatten_params(tree)
  assert sorted(flat) == ["params/a/kernel", "params/b/bias"]
  back = policy_numpy.unflatten_params(flat)
  np.testing.assert_array_equal(back["params"]["b"]["bias"], np.arange(3.0))
  with pytest.raises(ValueError, match="contains"):
    policy_numpy.flatten_params({"a/b": np.ones(1)})
