"""Export the trained actor from a run directory, and measure it where it runs.

    python -m ald_jax.export RUN_DIR --out DIR [--step N]
    python -m ald_jax.export --bench DIR [--calls N] [--budget_ms MS]

From Python: `ald_jax.export_actor(run_dir, out_dir, step=None)`.

The export restores the run's newest (or the chosen) checkpoint, takes the
acting policy's parameters (the distilled LSTM of "ald", the LSTM policy of
"lstm" and "asymmetric") and writes the format of `ald_jax.policy_numpy`
(docs/deploy.md): policy.json, params.npz and two `jax.export` artefacts
with a symbolic batch dimension (any E). Everything is written into a
temporary directory beside DIR and renamed into place at the end, so a
failed export leaves nothing behind.

`--bench` times, pinned to one core, one step at E=1 and at the run's E of
each path: the exported Flax policy (`Policy`), the `jax.export` artefact,
the numpy step, and the in-training lean acting step
(`system/actor.make_act_fn`) on the same parameters; one JSON object on
stdout.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from typing import Any, Mapping, Sequence

if __name__ == "__main__":
  # Set before numpy loads its BLAS: an actor is one thread on one core, and
  # BLAS worker threads competing with XLA's for the same cores made the
  # numpy step's E=1 p50 ~18x slower on the 2-core machine (docs/deploy.md).
  for _name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_name, "1")

import jax  # pylint: disable=wrong-import-position
from jax import export as jax_export  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

from ald_jax import checkpoint as checkpoint_lib
from ald_jax import config as config_lib
from ald_jax import learner as learner_lib
from ald_jax import metrics as metrics_lib
from ald_jax import policy as policy_lib
from ald_jax import policy_numpy
from ald_jax import types
from ald_jax.system import run_dir as run_dir_lib

CHECKPOINT_DIR = "checkpoints"   # system/run.py's
# Agents whose acting policy is an LSTM: the network this format holds.
LSTM_ACTING_AGENTS = ("ald", "lstm", "asymmetric")


class ExportError(ValueError):
  """The run directory, checkpoint or output directory cannot be exported
  from / to. Raised before anything is written."""


def config_from_jsonable(cls: type, data: Mapping[str, Any]) -> Any:
  """A (nested) config dataclass from its `to_jsonable` form (lists back to
  tuples); fields the data lacks keep their defaults."""
  kwargs = {}
  for field in dataclasses.fields(cls):
    if field.name not in data:
      continue
    value = data[field.name]
    if dataclasses.is_dataclass(field.default):
      value = config_from_jsonable(type(field.default), value)
    elif isinstance(value, list):
      value = _as_tuples(value)
    kwargs[field.name] = value
  return cls(**kwargs)


def _as_tuples(value: Any) -> Any:
  if isinstance(value, list):
    return tuple(_as_tuples(v) for v in value)
  return value


def read_run(run_dir: str | os.PathLike) -> dict[str, Any]:
  """The run's config.json, checked to describe an exportable run."""
  run_dir = os.fspath(run_dir)
  if not os.path.isdir(run_dir):
    raise ExportError(f"{run_dir}: no such run directory")
  try:
    resolved = run_dir_lib.read_latest_config(run_dir)
  except (OSError, ValueError) as error:
    raise ExportError(
        f"{run_dir}: config.json is unreadable: {error}") from None
  if resolved is None or "train" not in resolved:
    raise ExportError(
        f"{run_dir} is not a run directory: no config.json written by "
        "`python -m ald_jax.train` (ald_jax.system.run.train)")
  agent = resolved.get("agent", resolved["train"].get("learner", {}).get(
      "agent"))
  if agent == "transformer":
    raise ExportError(
        "agent 'transformer' acts with its GTrXL (a K/V-cache step over "
        "gtrxl.memory_length steps): export format version "
        f"{policy_numpy.FORMAT_VERSION} holds an LSTM actor only. Train "
        "--agent=ald to get a small LSTM actor distilled from the GTrXL.")
  if agent not in LSTM_ACTING_AGENTS:
    raise ExportError(f"{run_dir}: unknown agent {agent!r}")
  return resolved


def _abstract_state(learner: learner_lib.Learner, batch_size: int) -> Any:
  """The learner state's shapes and dtypes (nothing computed), on the CPU."""
  cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
  shapes = jax.eval_shape(learner.init, jax.random.PRNGKey(0),
                          learner.example_batch(batch_size))
  return jax.tree_util.tree_map(
      lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=cpu),
      shapes)


def restore_actor(run_dir: str | os.PathLike, resolved: Mapping[str, Any],
                  step: int | None = None
                  ) -> tuple[Any, dict[str, Any], int]:
  """(acting parameters as numpy, checkpoint metadata, checkpoint step)."""
  ckpt_dir = os.path.join(os.fspath(run_dir), CHECKPOINT_DIR)
  steps = []
  if os.path.isdir(ckpt_dir):
    steps = sorted(int(n) for n in os.listdir(ckpt_dir) if n.isdigit())
  if not steps:
    raise ExportError(f"{run_dir}: no checkpoint in {ckpt_dir}")
  if step is None:
    step = steps[-1]
  elif step not in steps:
    raise ExportError(f"{run_dir}: no checkpoint step {step} (steps: "
                      f"{steps})")
  lcfg = config_from_jsonable(config_lib.LearnerConfig,
                              resolved["train"]["learner"])
  learner = learner_lib.make_learner(lcfg, tuple(resolved["obs_shape"]),
                                     int(resolved["num_actions"]))
  target = _abstract_state(learner, lcfg.batch_size)
  try:
    with checkpoint_lib.Checkpointer(ckpt_dir, read_only=True) as ckpt:
      state, metadata = ckpt.restore(step, target)
  except checkpoint_lib.CheckpointMismatchError as error:
    raise ExportError(f"{run_dir}: checkpoint step {step} does not match "
                      f"the run's config.json: {error}") from None
  except Exception as error:  # pylint: disable=broad-except
    older = [s for s in steps if s < step]
    hint = f"; pass --step {older[-1]} for an older one" if older else ""
    raise ExportError(f"{run_dir}: checkpoint step {step} is unreadable "
                      f"({type(error).__name__}: {error}){hint}") from None
  params = jax.device_get(learner.actor_params(state))
  return params, metadata, step


def _t_actor_in_run(run_dir: str | os.PathLike) -> dict[str, Any] | None:
  """The last metrics row's T_actor figures (measured while training)."""
  try:
    rows = metrics_lib.read_metrics(os.fspath(run_dir))
  except (OSError, ValueError):
    return None
  for row in reversed(rows):
    if row.get(metrics_lib.T_ACTOR_P50) is not None:
      return {key[len("t_actor_"):]: row[key] for key in row
              if key.startswith("t_actor_") and not key.startswith(
                  "t_actor_budget")}
  return None


def policy_spec(resolved: Mapping[str, Any], metadata: Mapping[str, Any],
                checkpoint_step: int,
                t_actor_in_run: Mapping[str, Any] | None) -> dict[str, Any]:
  """policy.json's content (docs/deploy.md lists every field)."""
  train = resolved["train"]
  learner = train["learner"]
  env_kwargs = {str(k): v for k, v in train.get("env_kwargs", [])}
  return {
      "format": policy_numpy.FORMAT_NAME,
      "version": policy_numpy.FORMAT_VERSION,
      "network": {
          "kind": "lstm",
          "obs_shape": [int(d) for d in resolved["obs_shape"]],
          # What the step takes; the torso casts to float32 and nothing
          # else is applied to observations.
          "obs_dtype": "float32",
          "observation_scaling": None,
          "num_actions": int(resolved["num_actions"]),
          "torso": {"conv_channels": list(learner["torso"]["conv_channels"]),
                    "mlp_sizes": list(learner["torso"]["mlp_sizes"])},
          "lstm": {"hidden_size": int(learner["lstm"]["hidden_size"]),
                   "forget_bias": float(learner["lstm"]["forget_bias"])},
          "state": "recurrent [E, 2H] float32: cell then hidden, zeroed "
                   "where step_type == FIRST (0) before the step",
      },
      "identity": {
          "agent": resolved.get("agent", learner["agent"]),
          "env": train["env"],
          "env_kwargs": env_kwargs,
          "checkpoint_step": int(checkpoint_step),
          "learner_steps": int(metadata.get("learner_steps", checkpoint_step)),
          "env_steps": int(metadata.get("env_steps", 0)),
          "envs_per_actor": int(train["envs_per_actor"]),
          "seed": train.get("seed"),
          "t_actor": {"alone": resolved.get("t_actor_alone"),
                      "in_run": t_actor_in_run},
          "actor_sizing": resolved.get("actor_sizing"),
          "jax_version": jax.__version__,
      },
      "jax_export": {
          "sampled": policy_numpy.STEP_EXPORT,
          "greedy": policy_numpy.STEP_GREEDY_EXPORT,
          "batch": "symbolic E (any number of environments)",
          "key": f"raw key data uint32[2], {policy_lib.KEY_IMPL}",
          "sampled_signature": "(observation f32[E,*obs], step_type i32[E], "
                               "recurrent f32[E,2H], key_data u32[2]) -> "
                               "(action i32[E], logits f32[E,A], recurrent, "
                               "key_data)",
          "greedy_signature": "(observation, step_type, recurrent) -> "
                              "(action, logits, recurrent)",
      },
  }


def serialize_steps(spec: Mapping[str, Any], params: Any
                    ) -> tuple[bytes, bytes]:
  """The sampled and greedy steps as `jax.export` bytes (symbolic E)."""
  network = spec["network"]
  sampled, greedy = policy_lib.exportable_steps(spec, params)
  e, = jax_export.symbolic_shape("e")
  h2 = 2 * network["lstm"]["hidden_size"]
  f32, i32 = np.float32, np.int32
  observation = jax.ShapeDtypeStruct((e, *network["obs_shape"]), f32)
  step_type = jax.ShapeDtypeStruct((e,), i32)
  recurrent = jax.ShapeDtypeStruct((e, h2), f32)
  key_data = jax.ShapeDtypeStruct((2,), np.uint32)
  platforms = ("cpu",)
  sampled_bytes = jax_export.export(jax.jit(sampled), platforms=platforms)(
      observation, step_type, recurrent, key_data).serialize()
  greedy_bytes = jax_export.export(jax.jit(greedy), platforms=platforms)(
      observation, step_type, recurrent).serialize()
  return bytes(sampled_bytes), bytes(greedy_bytes)


def _check_out_dir(out_dir: str) -> None:
  if os.path.exists(out_dir) and (not os.path.isdir(out_dir)
                                  or os.listdir(out_dir)):
    raise ExportError(f"--out {out_dir} exists and is not an empty "
                      "directory; choose another")


def export_actor(run_dir: str | os.PathLike, out_dir: str | os.PathLike,
                 step: int | None = None) -> str:
  """Writes the run's acting policy to `out_dir` (see the module docstring);
  returns its absolute path. Raises ExportError before writing anything."""
  run_dir, out_dir = os.fspath(run_dir), os.path.abspath(os.fspath(out_dir))
  if step is not None and (not isinstance(step, int) or step < 0):
    raise ExportError(f"step must be an integer >= 0, got {step!r}")
  _check_out_dir(out_dir)
  resolved = read_run(run_dir)
  params, metadata, step = restore_actor(run_dir, resolved, step)
  spec = policy_spec(resolved, metadata, step, _t_actor_in_run(run_dir))
  # The parameters must be the network policy.json describes.
  policy = policy_lib.Policy(spec, params)
  recurrent = policy.initial_state(1).recurrent
  policy.logits(recurrent, np.zeros((1, *policy.obs_shape), np.float32),
                np.zeros((1,), np.int32))
  sampled_bytes, greedy_bytes = serialize_steps(spec, params)

  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-",
                         dir=parent)
  try:
    np.savez(os.path.join(tmp, policy_numpy.PARAMS_NPZ),
             **policy_lib.as_numpy_params(params))
    with open(os.path.join(tmp, policy_numpy.STEP_EXPORT), "wb") as f:
      f.write(sampled_bytes)
    with open(os.path.join(tmp, policy_numpy.STEP_GREEDY_EXPORT), "wb") as f:
      f.write(greedy_bytes)
    with open(os.path.join(tmp, policy_numpy.POLICY_JSON), "w",
              encoding="utf-8") as f:
      json.dump(checkpoint_lib.to_jsonable(spec), f, indent=2, sort_keys=True)
    if os.path.isdir(out_dir):
      os.rmdir(out_dir)   # empty (checked above)
    os.rename(tmp, out_dir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return out_dir


# ---- --bench ---------------------------------------------------------------

PATHS = ("exported", "jax_export", "numpy", "training_actor")


def _machine() -> dict[str, Any]:
  model = platform.processor()
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith("model name"):
          model = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  load = os.getloadavg() if hasattr(os, "getloadavg") else None
  return {"platform": platform.platform(), "cpu": model,
          "load_average_1_5_15min": list(load) if load else None,
          "cpu_count": os.cpu_count(), "python": platform.python_version(),
          "jax": jax.__version__, "numpy": np.__version__}


def _step_callers(directory: str, num_envs: int, seed: int):
  """path -> a zero-argument callable doing one step (result ready), each
  carrying its own state forward like an acting loop."""
  # Imported here: the bench only (pulls in the system's actor module).
  from ald_jax.system import actor as actor_lib  # pylint: disable=import-outside-toplevel
  spec = policy_numpy.read_policy_json(directory)
  params = policy_numpy.read_params(directory)
  obs_shape = tuple(spec["network"]["obs_shape"])
  rng = np.random.default_rng(seed)
  observation = rng.standard_normal((num_envs, *obs_shape)).astype(np.float32)
  step_type = np.full((num_envs,), types.MID, np.int32)
  callers = {}

  def stateful(policy):
    state = [policy.initial_state(num_envs, seed)]

    def call():
      action, state[0] = policy.step(state[0], observation, step_type)
      jax.block_until_ready(action)
    return call

  callers["exported"] = stateful(policy_lib.Policy(spec, params))
  callers["jax_export"] = stateful(policy_lib.ExportedPolicy.load(directory))
  numpy_policy = policy_numpy.NumpyPolicy(spec, params)
  numpy_state = [numpy_policy.initial_state(num_envs, seed)]

  def numpy_call():
    _, numpy_state[0] = numpy_policy.step(numpy_state[0], observation,
                                          step_type)
  callers["numpy"] = numpy_call

  cpu = jax.devices("cpu")[0]
  core = learner_lib.lstm_actor_core(policy_lib.network_from_spec(spec))
  act = actor_lib.make_act_fn(core.step)
  device_params = jax.device_put(jax.tree_util.tree_map(np.asarray, params),
                                 cpu)
  carry = [jax.device_put(core.initial_state(num_envs), cpu),
           jax.device_put(jax.random.key(seed), cpu)]

  def training_call():
    out = act(device_params, observation, step_type, carry[0], carry[1])
    jax.block_until_ready(out)
    carry[0], carry[1] = out[2], out[3]
  callers["training_actor"] = training_call
  return callers


def bench(directory: str, *, num_calls: int = 2000, rounds: int = 20,
          budget_ms: float | None = None, core: int | None = None,
          envs: Sequence[int] | None = None, seed: int = 0
          ) -> dict[str, Any]:
  """Per-step p50/p99 of every path (see the module docstring).

  The calls of each path are spread over `rounds` interleaved blocks, so
  every path sees the same background load.
  """
  from ald_jax.system import affinity  # pylint: disable=import-outside-toplevel
  if num_calls < rounds or rounds <= 0:
    raise ValueError(f"num_calls ({num_calls}) must be >= rounds ({rounds}) "
                     "> 0")
  spec = policy_numpy.read_policy_json(directory)
  identity = spec["identity"]
  if budget_ms is None:
    alone = identity.get("t_actor", {}).get("alone") or {}
    budget_ms = float(alone.get("budget_ms") or
                      config_lib.TrainConfig().t_actor_budget_ms)
  run_envs = int(identity["envs_per_actor"])
  envs = tuple(envs) if envs else tuple(sorted({1, run_envs}))
  available = affinity.available_cores()
  if core is None and available:
    core = available[-1]   # an actor's core (assign_cores gives the first
  #                          to the learner)
  # Like a run: a jitted call runs on the calling (pinned) thread.
  jax.config.update("jax_cpu_enable_async_dispatch", False)
  pinned = affinity.pin_current_thread(None if core is None else {core})
  result: dict[str, Any] = {
      "command": "python -m ald_jax.export " + " ".join(sys.argv[1:])
                 if sys.argv and sys.argv[0].endswith("export.py")
                 else f"ald_jax.export.bench({directory!r})",
      "machine": _machine(),
      "pinned_cores": sorted(pinned) if pinned else None,
      "policy": {"directory": os.path.abspath(directory),
                 "agent": identity["agent"], "env": identity["env"],
                 "hidden_size": spec["network"]["lstm"]["hidden_size"],
                 "obs_shape": spec["network"]["obs_shape"],
                 "num_actions": spec["network"]["num_actions"],
                 "learner_steps": identity["learner_steps"]},
      "envs": list(envs), "run_envs_per_actor": run_envs,
      "calls_per_path": num_calls, "rounds": rounds, "budget_ms": budget_ms,
      "async_dispatch": False,
      "blas_threads": os.environ.get("OPENBLAS_NUM_THREADS", "default"),
      "time_utc": time.strftime(
          "%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
  }
  fits = {}
  per_round = num_calls // rounds
  for num_envs in envs:
    callers = _step_callers(directory, num_envs, seed)
    samples = {name: [] for name in callers}
    for call in callers.values():   # compile and warm up
      for _ in range(20):
        call()
    for _ in range(rounds):
      for name, call in callers.items():
        out = samples[name]
        for _ in range(per_round):
          start = time.perf_counter_ns()
          call()
          out.append(time.perf_counter_ns() - start)
    for name in PATHS:
      us = np.asarray(samples[name], np.float64) / 1e3
      p50, p99 = np.percentile(us, [50.0, 99.0])
      result[f"{name}_p50_us_e{num_envs}"] = float(p50)
      result[f"{name}_p99_us_e{num_envs}"] = float(p99)
      fits[f"{name}_e{num_envs}"] = bool(p99 / 1e3 <= budget_ms)
  result["fits_budget"] = fits
  ratio = result["exported_p50_us_e1"] / result["training_actor_p50_us_e1"]
  result["exported_over_training_p50_e1"] = ratio
  result["goal_exported_within_1.1x_of_training_e1"] = bool(ratio <= 1.1)
  result["numpy_over_training_p50_e1"] = (
      result["numpy_p50_us_e1"] / result["training_actor_p50_us_e1"])
  return result


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m ald_jax.export",
      description="Export a run's acting policy, or time an exported one.")
  parser.add_argument("run_dir", nargs="?", help="the run directory")
  parser.add_argument("--out", help="the directory to write (new or empty)")
  parser.add_argument("--step", type=int, default=None,
                      help="checkpoint step to export (default: newest)")
  parser.add_argument("--bench", metavar="DIR",
                      help="time the exported policy in DIR; JSON on stdout")
  parser.add_argument("--calls", type=int, default=2000,
                      help="--bench: timed steps per path and E")
  parser.add_argument("--budget_ms", type=float, default=None,
                      help="--bench: T_actor budget (default: the run's)")
  parser.add_argument("--core", type=int, default=None,
                      help="--bench: core to pin to (default: the last)")
  args = parser.parse_args(argv)
  if args.bench:
    if args.run_dir or args.out:
      parser.error("--bench DIR takes no RUN_DIR or --out")
    try:
      result = bench(args.bench, num_calls=args.calls,
                     budget_ms=args.budget_ms, core=args.core)
    except (policy_numpy.PolicyFormatError, ValueError) as error:
      print(f"error: {error}", file=sys.stderr)
      return 2
    print(json.dumps(result, indent=2, sort_keys=True))
    return 0
  if not args.run_dir or not args.out:
    parser.error("give RUN_DIR and --out DIR (or --bench DIR)")
  try:
    out = export_actor(args.run_dir, args.out, args.step)
  except ExportError as error:
    print(f"error: {error}", file=sys.stderr)
    return 2
  print(f"exported {args.run_dir} to {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
