"""The exported LSTM actor in numpy alone: no JAX, no Flax (docs/deploy.md).

An exported policy directory (written by `ald_jax.export`) holds

    policy.json            format name and version, the network's sizes, the
                           run's identity (see `read_policy_json`)
    params.npz             the actor's parameters, one array per tree path
                           ("params/core/weights/kernel", ...)
    step.jax_export        the compiled acting step, sampled (jax.export)
    step_greedy.jax_export the same, argmax actions

This module reads the first two and runs the same math as the Flax actor
(`networks/policy_value.py`: torso -> fused LSTM -> policy head), in float32:

    policy = NumpyPolicy.load(directory)
    state = policy.initial_state(num_envs, seed=0)
    action, state = policy.step(state, observation, step_type, greedy=False)

The recurrent state is packed like the in-training actor's, [E, 2H] (cell
then hidden); it is zeroed where `step_type` is FIRST before the step. The
sampling generator lives in the state and is advanced in place (numpy
sampling is not JAX's: sampled actions differ from the JAX paths' draws,
greedy actions and logits agree).
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping, NamedTuple

import numpy as np

FORMAT_NAME = "ald_jax.policy"
FORMAT_VERSION = 1
POLICY_JSON = "policy.json"
PARAMS_NPZ = "params.npz"
STEP_EXPORT = "step.jax_export"
STEP_GREEDY_EXPORT = "step_greedy.jax_export"
FIRST = 0   # dm_env.StepType.FIRST (ald_jax.types.FIRST)
_SEPARATOR = "/"


class PolicyFormatError(ValueError):
  """A directory is not a readable exported policy of a known version."""


def flatten_params(tree: Mapping[str, Any], prefix: str = ""
                   ) -> dict[str, np.ndarray]:
  """{"params": {"core": {...}}} -> {"params/core/...": array}."""
  flat = {}
  for name, value in tree.items():
    if _SEPARATOR in str(name):
      raise ValueError(f"parameter name {name!r} contains {_SEPARATOR!r}")
    path = f"{prefix}{name}"
    if isinstance(value, Mapping):
      flat.update(flatten_params(value, path + _SEPARATOR))
    else:
      flat[path] = np.asarray(value)
  return flat


def unflatten_params(flat: Mapping[str, np.ndarray]) -> dict[str, Any]:
  """The inverse of `flatten_params`."""
  tree: dict[str, Any] = {}
  for path, value in flat.items():
    node = tree
    *parents, leaf = path.split(_SEPARATOR)
    for part in parents:
      node = node.setdefault(part, {})
    node[leaf] = np.asarray(value)
  return tree


def read_policy_json(directory: str | os.PathLike) -> dict[str, Any]:
  """policy.json of an exported policy, its format and version checked."""
  path = os.path.join(os.fspath(directory), POLICY_JSON)
  try:
    with open(path, encoding="utf-8") as f:
      spec = json.load(f)
  except FileNotFoundError:
    raise PolicyFormatError(
        f"{directory} is not an exported policy: no {POLICY_JSON} (write one "
        "with `python -m ald_jax.export RUN_DIR --out DIR`)") from None
  except json.JSONDecodeError as error:
    raise PolicyFormatError(f"{path} is not valid JSON: {error}") from None
  if not isinstance(spec, dict) or spec.get("format") != FORMAT_NAME:
    raise PolicyFormatError(f"{path}: format is not {FORMAT_NAME!r}")
  if spec.get("version") != FORMAT_VERSION:
    raise PolicyFormatError(
        f"{path}: format version {spec.get('version')!r}; this ald_jax reads "
        f"version {FORMAT_VERSION}")
  return spec


def read_params(directory: str | os.PathLike) -> dict[str, Any]:
  """params.npz of an exported policy as the nested parameter tree."""
  path = os.path.join(os.fspath(directory), PARAMS_NPZ)
  try:
    with np.load(path, allow_pickle=False) as npz:
      flat = {name: npz[name] for name in npz.files}
  except FileNotFoundError:
    raise PolicyFormatError(f"{directory}: no {PARAMS_NPZ}") from None
  return unflatten_params(flat)


class NumpyPolicyState(NamedTuple):
  recurrent: np.ndarray        # [E, 2H] float32: cell then hidden
  rng: np.random.Generator     # advanced in place by sampled steps


def _float32(array: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(array, np.float32)


def _sigmoid(x: np.ndarray) -> np.ndarray:
  return 1.0 / (1.0 + np.exp(-x))


def _conv3x3_same(x: np.ndarray, kernel: np.ndarray,
                  bias: np.ndarray) -> np.ndarray:
  """x [E, H, W, C], kernel [3, 3, C, K] (flax's layout), SAME padding."""
  e, h, w, c = x.shape
  padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  patches = np.concatenate([padded[:, dy:dy + h, dx:dx + w]
                            for dy in range(3) for dx in range(3)], axis=-1)
  out = patches.reshape(e * h * w, 9 * c) @ kernel.reshape(9 * c, -1) + bias
  return out.reshape(e, h, w, -1)


class NumpyPolicy:
  """The exported LSTM actor's step in numpy (see the module docstring)."""

  def __init__(self, spec: Mapping[str, Any], params: Mapping[str, Any]):
    network = spec["network"]
    if network.get("kind") != "lstm":
      raise PolicyFormatError(
          f"the numpy step runs LSTM actors, not {network.get('kind')!r}")
    self.spec = dict(spec)
    self.obs_shape = tuple(network["obs_shape"])
    self.num_actions = int(network["num_actions"])
    self.hidden_size = int(network["lstm"]["hidden_size"])
    p = params["params"]
    f32 = _float32
    torso = p["encoder"]
    num_convs = len(network["torso"]["conv_channels"]) if len(
        self.obs_shape) == 3 else 0
    self._convs = [(f32(torso[f"Conv_{i}"]["kernel"]),
                    f32(torso[f"Conv_{i}"]["bias"])) for i in range(num_convs)]
    self._dense = [(f32(torso[f"Dense_{i}"]["kernel"]),
                    f32(torso[f"Dense_{i}"]["bias"]))
                   for i in range(len(network["torso"]["mlp_sizes"]))]
    self._lstm_kernel = f32(p["core"]["weights"]["kernel"])
    self._lstm_bias = f32(p["core"]["weights"]["bias"])
    # Only the policy columns of the fused head: acting needs no value.
    head_kernel = f32(p["head"]["Dense_0"]["kernel"])
    head_bias = f32(p["head"]["Dense_0"]["bias"])
    self._head_kernel = np.ascontiguousarray(head_kernel[:, :-1])
    self._head_bias = np.ascontiguousarray(head_bias[:-1])
    expected = self._dense[-1][0].shape[1] + self.hidden_size
    if self._lstm_kernel.shape != (expected, 4 * self.hidden_size):
      raise PolicyFormatError(
          f"LSTM kernel shape {self._lstm_kernel.shape} does not match the "
          f"sizes in policy.json ({expected}, {4 * self.hidden_size})")

  @classmethod
  def load(cls, directory: str | os.PathLike) -> "NumpyPolicy":
    return cls(read_policy_json(directory), read_params(directory))

  def initial_state(self, num_envs: int, seed: int = 0) -> NumpyPolicyState:
    if not isinstance(num_envs, int) or num_envs <= 0:
      raise ValueError(f"num_envs must be a positive integer, got {num_envs!r}")
    return NumpyPolicyState(
        np.zeros((num_envs, 2 * self.hidden_size), np.float32),
        np.random.default_rng(seed))

  def logits(self, recurrent: np.ndarray, observation: np.ndarray,
             step_type: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(logits [E, A], new packed state [E, 2H]); the deterministic part."""
    x = np.asarray(observation, np.float32)
    num_envs = x.shape[0]
    if x.shape[1:] != self.obs_shape:
      raise ValueError(f"observation shape {x.shape}: expected "
                       f"[E, {', '.join(map(str, self.obs_shape))}]")
    for kernel, bias in self._convs:
      x = np.maximum(_conv3x3_same(x, kernel, bias), 0.0)
    x = x.reshape(num_envs, -1)
    for kernel, bias in self._dense:
      x = np.maximum(x @ kernel + bias, 0.0)
    h = self.hidden_size
    keep = (np.asarray(step_type) != FIRST)[:, None]
    state = np.where(keep, recurrent, np.float32(0.0))
    cell, hidden = state[:, :h], state[:, h:]
    gates = np.concatenate([x, hidden], axis=-1) @ self._lstm_kernel
    gates += self._lstm_bias
    i, f, g, o = (gates[:, :h], gates[:, h:2 * h], gates[:, 2 * h:3 * h],
                  gates[:, 3 * h:])
    cell = _sigmoid(f) * cell + _sigmoid(i) * np.tanh(g)
    hidden = _sigmoid(o) * np.tanh(cell)
    logits = hidden @ self._head_kernel + self._head_bias
    return logits, np.concatenate([cell, hidden], axis=-1)

  def step(self, state: NumpyPolicyState, observation: np.ndarray,
           step_type: np.ndarray, *, greedy: bool = False
           ) -> tuple[np.ndarray, NumpyPolicyState]:
    """(action [E] int32, new state)."""
    logits, recurrent = self.logits(state.recurrent, observation, step_type)
    if greedy:
      action = np.argmax(logits, axis=-1)
    else:  # inverse CDF of the softmax
      weights = np.exp(logits - logits.max(axis=-1, keepdims=True))
      cumulative = np.cumsum(weights, axis=-1)
      u = state.rng.random((len(logits), 1)) * cumulative[:, -1:]
      action = np.minimum((cumulative < u).sum(axis=-1), self.num_actions - 1)
    return action.astype(np.int32), NumpyPolicyState(recurrent, state.rng)
