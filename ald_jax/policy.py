"""Load an exported actor and act: jax, flax and numpy only (docs/deploy.md).

    policy = ald_jax.Policy.load(directory)       # written by ald_jax.export
    state = policy.initial_state(num_envs, seed=0)
    action, state = policy.step(state, observation, step_type)
    action, state = policy.step(state, observation, step_type, greedy=True)

Sampling keys live in the state: `PolicyState(recurrent, key)`. A sampled
step splits the key exactly as the in-training actor does
(`system/actor.make_act_fn`: `key, step_key = split(key)`, the action drawn
with `step_key`), so from the same key the exported policy draws the same
actions as the training actor; a greedy step takes the argmax and leaves the
key as it was. `recurrent` is the packed LSTM state [E, 2H] (cell then
hidden), zeroed where `step_type` is FIRST before that step.

Nothing here imports the learner, optax or orbax, and nothing of the learner
is built. `ExportedPolicy.load(directory)` runs the serialized `jax.export`
step instead (no Flax at all; the same API and numbers), and
`ald_jax.policy_numpy.NumpyPolicy` the same math in numpy alone.
"""
from __future__ import annotations

import os
from typing import Any, Mapping, NamedTuple

import jax
from jax import export as jax_export
import jax.numpy as jnp
import numpy as np

from ald_jax import config as config_lib
from ald_jax import policy_numpy
from ald_jax.networks import policy_value

# The key implementation the exported artefacts take as raw key data.
KEY_IMPL = "threefry2x32"
PolicyFormatError = policy_numpy.PolicyFormatError


class PolicyState(NamedTuple):
  recurrent: jax.Array   # [E, 2H] float32: cell then hidden
  key: jax.Array         # typed PRNG key (threefry2x32)


def network_from_spec(spec: Mapping[str, Any]
                      ) -> policy_value.LSTMPolicyValueNet:
  """The Flax actor network described by policy.json's "network"."""
  network = spec["network"]
  if network.get("kind") != "lstm":
    raise PolicyFormatError(f"unknown network kind {network.get('kind')!r}")
  torso = network["torso"]
  lstm = network["lstm"]
  return policy_value.LSTMPolicyValueNet(
      torso=config_lib.TorsoConfig(
          conv_channels=tuple(torso["conv_channels"]),
          mlp_sizes=tuple(torso["mlp_sizes"])),
      lstm=config_lib.LSTMConfig(hidden_size=int(lstm["hidden_size"]),
                                 forget_bias=float(lstm["forget_bias"])),
      num_actions=int(network["num_actions"]),
      obs_ndim=len(network["obs_shape"]))


def _check_num_envs(num_envs: Any) -> int:
  if not isinstance(num_envs, int) or isinstance(num_envs, bool) or (
      num_envs <= 0):
    raise ValueError(f"num_envs must be a positive integer, got {num_envs!r}")
  return num_envs


def sampled_step_fn(net: policy_value.LSTMPolicyValueNet, params: Any):
  """(recurrent, key, observation, step_type) -> (action, recurrent, key);
  the training actor's key split and draw."""
  def step(recurrent, key, observation, step_type):
    key, step_key = jax.random.split(key)
    logits, recurrent = net.apply(params, observation, step_type, recurrent,
                                  method="act")
    action = jax.random.categorical(step_key, logits).astype(jnp.int32)
    return action, recurrent, key
  return step


def greedy_step_fn(net: policy_value.LSTMPolicyValueNet, params: Any):
  """(recurrent, observation, step_type) -> (argmax action, recurrent)."""
  def step(recurrent, observation, step_type):
    logits, recurrent = net.apply(params, observation, step_type, recurrent,
                                  method="act")
    return jnp.argmax(logits, axis=-1).astype(jnp.int32), recurrent
  return step


class Policy:
  """The exported LSTM actor as a Flax network, jitted on the CPU device.

  The parameters are closed over (constants of the compiled step), so a call
  passes only the state and the inputs.
  """

  def __init__(self, spec: Mapping[str, Any], params: Any,
               device: jax.Device | None = None):
    self.spec = dict(spec)
    self.net = network_from_spec(spec)
    self.obs_shape = tuple(spec["network"]["obs_shape"])
    self.num_actions = int(spec["network"]["num_actions"])
    self.hidden_size = int(spec["network"]["lstm"]["hidden_size"])
    self.device = device or jax.devices("cpu")[0]
    self.params = jax.device_put(
        jax.tree_util.tree_map(jnp.asarray, params), self.device)
    sample = sampled_step_fn(self.net, self.params)
    greedy = greedy_step_fn(self.net, self.params)
    self._sample = jax.jit(
        lambda state, obs, step_type: _repack(sample(state.recurrent,
                                                     state.key, obs,
                                                     step_type)))
    self._greedy = jax.jit(
        lambda state, obs, step_type: _repack_greedy(
            greedy(state.recurrent, obs, step_type), state.key))
    self._logits = jax.jit(
        lambda recurrent, obs, step_type: self.net.apply(
            self.params, obs, step_type, recurrent, method="act"))

  @classmethod
  def load(cls, directory: str | os.PathLike,
           device: jax.Device | None = None) -> "Policy":
    """Reads policy.json and params.npz (format checked)."""
    spec = policy_numpy.read_policy_json(directory)
    return cls(spec, policy_numpy.read_params(directory), device)

  def initial_state(self, num_envs: int, seed: int = 0) -> PolicyState:
    """Zero recurrent state for `num_envs` streams and a key from `seed`."""
    num_envs = _check_num_envs(num_envs)
    return jax.device_put(PolicyState(
        jnp.zeros((num_envs, 2 * self.hidden_size), jnp.float32),
        jax.random.key(seed, impl=KEY_IMPL)), self.device)

  def step(self, state: PolicyState, observation, step_type, *,
           greedy: bool = False) -> tuple[jax.Array, PolicyState]:
    """observation [E, *obs_shape], step_type [E] -> (action [E] int32,
    new state)."""
    if greedy:
      return self._greedy(state, observation, step_type)
    return self._sample(state, observation, step_type)

  def logits(self, recurrent, observation, step_type
             ) -> tuple[jax.Array, jax.Array]:
    """(logits [E, A], new recurrent [E, 2H]): the deterministic part."""
    return self._logits(recurrent, observation, step_type)


def _repack(out) -> tuple[jax.Array, PolicyState]:
  action, recurrent, key = out
  return action, PolicyState(recurrent, key)


def _repack_greedy(out, key) -> tuple[jax.Array, PolicyState]:
  action, recurrent = out
  return action, PolicyState(recurrent, key)


class ExportedPolicy:
  """The serialized `jax.export` steps of an exported policy, same API as
  `Policy`. Needs jax and numpy only (no Flax network is built).

  The artefacts take raw key data (uint32 [2], threefry2x32); this class
  keeps a typed key in `PolicyState` like `Policy` and converts at the call.
  """

  def __init__(self, spec: Mapping[str, Any], sampled: Any, greedy: Any):
    self.spec = dict(spec)
    self.hidden_size = int(spec["network"]["lstm"]["hidden_size"])

    # One jitted call per step: the key conversions run inside it.
    def sampled_step(state, observation, step_type):
      action, _, recurrent, key_data = sampled.call(
          observation, step_type, state.recurrent,
          jax.random.key_data(state.key))
      return action, PolicyState(
          recurrent, jax.random.wrap_key_data(key_data, impl=KEY_IMPL))

    def greedy_step(state, observation, step_type):
      action, _, recurrent = greedy.call(observation, step_type,
                                         state.recurrent)
      return action, PolicyState(recurrent, state.key)

    self._sampled = jax.jit(sampled_step)
    self._greedy = jax.jit(greedy_step)

  @classmethod
  def load(cls, directory: str | os.PathLike) -> "ExportedPolicy":
    spec = policy_numpy.read_policy_json(directory)
    exported = []
    for name in (policy_numpy.STEP_EXPORT, policy_numpy.STEP_GREEDY_EXPORT):
      path = os.path.join(os.fspath(directory), name)
      try:
        with open(path, "rb") as f:
          exported.append(jax_export.deserialize(bytearray(f.read())))
      except FileNotFoundError:
        raise PolicyFormatError(f"{directory}: no {name}") from None
    return cls(spec, *exported)

  def initial_state(self, num_envs: int, seed: int = 0) -> PolicyState:
    """On the CPU, the platform the artefacts are exported for (a committed
    state takes the step there on a machine whose default is an
    accelerator)."""
    num_envs = _check_num_envs(num_envs)
    return jax.device_put(PolicyState(
        jnp.zeros((num_envs, 2 * self.hidden_size), jnp.float32),
        jax.random.key(seed, impl=KEY_IMPL)), jax.devices("cpu")[0])

  def step(self, state: PolicyState, observation, step_type, *,
           greedy: bool = False) -> tuple[jax.Array, PolicyState]:
    if greedy:
      return self._greedy(state, observation, step_type)
    return self._sampled(state, observation, step_type)


def exportable_steps(spec: Mapping[str, Any], params: Any):
  """The two functions `ald_jax.export` serializes, parameters baked in:

    sampled(observation [E, *obs] f32, step_type [E] i32, recurrent [E, 2H]
            f32, key_data [2] u32) -> (action, logits, recurrent, key_data)
    greedy(observation, step_type, recurrent) -> (action, logits, recurrent)
  """
  net = network_from_spec(spec)
  params = jax.tree_util.tree_map(jnp.asarray, params)

  def sampled(observation, step_type, recurrent, key_data):
    key = jax.random.wrap_key_data(key_data, impl=KEY_IMPL)
    key, step_key = jax.random.split(key)
    logits, recurrent = net.apply(params, observation, step_type, recurrent,
                                  method="act")
    action = jax.random.categorical(step_key, logits).astype(jnp.int32)
    return action, logits, recurrent, jax.random.key_data(key)

  def greedy(observation, step_type, recurrent):
    logits, recurrent = net.apply(params, observation, step_type, recurrent,
                                  method="act")
    return (jnp.argmax(logits, axis=-1).astype(jnp.int32), logits,
            recurrent)

  return sampled, greedy


def as_numpy_params(params: Any) -> dict[str, np.ndarray]:
  """A parameter tree as params.npz's flat {path: array}."""
  return policy_numpy.flatten_params(jax.device_get(params))
