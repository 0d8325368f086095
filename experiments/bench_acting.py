"""Single-step acting latency of the agent networks on CPU (T_actor).

Measured the way actor threads run (docs/design.md, "System"): a thread
pins itself to one core (`os.sched_setaffinity(0, {core})`), JAX runs with
synchronous CPU dispatch, the step is a plain `jax.jit` of a pure function of
(params, obs, step_type, state) with params already on the CPU device, the
observation arrives as a fresh numpy array and every call is timed until its
outputs are ready.

Cases:
  * dispatch floor: a jitted identity on a small CPU array.
  * lstm (API): `LSTMPolicyValueNet.step` -> (AgentOutput, LSTMState), state
    donated.
  * lstm_lean: the acting fast path `LSTMPolicyValueNet.act` (logits and a
    packed [B, 2H] state: 2 outputs instead of 4) with the params passed as a
    flat tuple of leaves (flattening a nested dict costs ~1-2 us per call).
  * gtrxl (API): `GTrXLPolicyValueNet.step` with its K/V cache donated.

Library use (e.g. from bench_learner_step.py):

  import bench_acting
  bench_acting.configure_cpu_acting()      # before any other JAX work
  results = bench_acting.measure_acting()  # dict of microseconds

Command line: `.venv/bin/python experiments/bench_acting.py [--iters N]
[--core C] [--obs_dim D] [--no_b16]`; prints one JSON object.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import threading
import time
import warnings
from typing import Any, Callable

import jax
import numpy as np

from ald_jax.config import GTrXLConfig, LSTMConfig, TorsoConfig
from ald_jax.networks.policy_value import (GTrXLPolicyValueNet,
                                           LSTMPolicyValueNet,
                                           pack_lstm_state)
from ald_jax.types import MID

DEFAULT_OBS_SHAPE = (36,)  # I-Maze-like local view, flattened (3 x 3 x 4)
DEFAULT_NUM_ACTIONS = 4


def configure_cpu_acting() -> None:
  """Synchronous CPU dispatch: the result is ready when the call returns.

  Must run before JAX creates its CPU client (any array or jit call), or it
  has no effect.
  """
  try:
    from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
    if xla_bridge.backends_are_initialized():
      warnings.warn("configure_cpu_acting() called after JAX backends were "
                    "initialised: async CPU dispatch may still be on.")
  except (ImportError, AttributeError):
    pass
  jax.config.update("jax_cpu_enable_async_dispatch", False)


def cpu_device() -> jax.Device:
  return jax.devices("cpu")[0]


def default_core() -> int:
  """The highest core this process may use (core 0 gets more interrupts)."""
  return max(os.sched_getaffinity(0))


def run_pinned(fn: Callable[[], Any], core: int) -> Any:
  """Runs `fn` in a new thread pinned to `core` and returns its result."""
  result: dict[str, Any] = {}

  def target():
    try:
      os.sched_setaffinity(0, {core})  # 0 = the calling thread on Linux
      result["value"] = fn()
    except BaseException as error:  # re-raised in the caller
      result["error"] = error

  thread = threading.Thread(target=target, name=f"bench-acting-core{core}")
  thread.start()
  thread.join()
  if "error" in result:
    raise result["error"]
  return result["value"]


@dataclasses.dataclass(frozen=True)
class LatencyStats:
  """Per-call latency in microseconds."""
  p50_us: float
  p90_us: float
  p99_us: float
  max_us: float
  mean_us: float
  calls: int

  @classmethod
  def from_ns(cls, samples_ns: np.ndarray) -> "LatencyStats":
    us = np.asarray(samples_ns, np.float64) / 1e3
    p50, p90, p99 = np.percentile(us, [50, 90, 99])
    return cls(round(float(p50), 2), round(float(p90), 2),
               round(float(p99), 2), round(float(us.max()), 2),
               round(float(us.mean()), 2), int(us.size))


def time_calls(call: Callable[[], None], num_calls: int) -> np.ndarray:
  """Wall time of each call in ns; `call` must block until results are ready."""
  samples = np.empty(num_calls, np.int64)
  clock = time.perf_counter_ns
  for i in range(num_calls):
    start = clock()
    call()
    samples[i] = clock() - start
  return samples


# A stepper builds its jitted function and state, and returns a zero-argument
# closure doing one acting step (outputs ready when it returns).
Stepper = Callable[[], None]


def identity_stepper() -> Stepper:
  identity = jax.jit(lambda x: x)
  x = jax.device_put(np.zeros((4,), np.float32), cpu_device())
  return lambda: identity(x).block_until_ready()


def lstm_stepper(batch_size: int, *, lean: bool = False,
                 obs_shape: tuple[int, ...] = DEFAULT_OBS_SHAPE,
                 num_actions: int = DEFAULT_NUM_ACTIONS,
                 torso: TorsoConfig = TorsoConfig(),
                 lstm: LSTMConfig = LSTMConfig()) -> Stepper:
  """One step of the LSTM actor: the API form or the lean acting form."""
  device = cpu_device()
  net = LSTMPolicyValueNet(torso, lstm, num_actions, obs_ndim=len(obs_shape))
  obs = np.zeros((batch_size, *obs_shape), np.float32)
  step_type = np.full((batch_size,), MID, np.int32)
  state = net.initial_state(batch_size)
  params = jax.device_put(
      net.init(jax.random.PRNGKey(0), obs[:, None], step_type[:, None],
               state), device)
  carry = {}
  if lean:
    leaves, treedef = jax.tree_util.tree_flatten(params)
    leaves = tuple(leaves)

    def act(leaves, obs, step_type, packed):
      return net.apply(jax.tree_util.tree_unflatten(treedef, leaves), obs,
                       step_type, packed, method="act")

    jitted = jax.jit(act, donate_argnums=3)
    carry["state"] = jax.device_put(pack_lstm_state(state), device)

    def call():
      logits, carry["state"] = jitted(leaves, obs, step_type, carry["state"])
      logits.block_until_ready()
  else:
    jitted = jax.jit(
        lambda p, o, s, c: net.apply(p, o, s, c, method="step"),
        donate_argnums=3)
    carry["state"] = jax.device_put(state, device)

    def call():
      out, carry["state"] = jitted(params, obs, step_type, carry["state"])
      jax.block_until_ready(out)
  return call


def gtrxl_stepper(batch_size: int, *,
                  obs_shape: tuple[int, ...] = DEFAULT_OBS_SHAPE,
                  num_actions: int = DEFAULT_NUM_ACTIONS,
                  torso: TorsoConfig = TorsoConfig(),
                  gtrxl: GTrXLConfig = GTrXLConfig()) -> Stepper:
  """One step of the GTrXL with its K/V cache (the transformer agent)."""
  device = cpu_device()
  net = GTrXLPolicyValueNet(torso, gtrxl, num_actions,
                            obs_ndim=len(obs_shape))
  obs = np.zeros((batch_size, *obs_shape), np.float32)
  step_type = np.full((batch_size,), MID, np.int32)
  params = jax.device_put(
      net.init(jax.random.PRNGKey(0), obs[:, None], step_type[:, None]),
      device)
  jitted = jax.jit(lambda p, o, s, c: net.apply(p, o, s, c, method="step"),
                   donate_argnums=3)
  carry = {"cache": jax.device_put(net.initial_cache(batch_size), device)}

  def call():
    out, carry["cache"] = jitted(params, obs, step_type, carry["cache"])
    jax.block_until_ready(out)
  return call


def measure_steppers(builders: dict[str, Callable[[], Stepper]], *,
                     num_calls: int = 3000, rounds: int = 5,
                     budget_s_per_case: float = 4.0,
                     warmup_calls: int = 200) -> dict[str, LatencyStats]:
  """Builds, compiles and times every stepper in the calling thread.

  Cases are interleaved over `rounds` so that background noise spreads over
  all of them; slow cases get fewer calls (about `budget_s_per_case`).
  """
  steppers = {name: build() for name, build in builders.items()}
  calls_per_round = {}
  for name, step in steppers.items():
    probe = time_calls(step, 5)  # includes compilation
    probe = time_calls(step, min(warmup_calls, 20))
    estimate_s = float(np.median(probe)) / 1e9
    total = int(min(num_calls, max(100, budget_s_per_case / estimate_s)))
    calls_per_round[name] = max(1, total // rounds)
    time_calls(step, min(warmup_calls, calls_per_round[name]))
  samples = {name: [] for name in steppers}
  for _ in range(rounds):
    for name, step in steppers.items():
      samples[name].append(time_calls(step, calls_per_round[name]))
  return {name: LatencyStats.from_ns(np.concatenate(parts))
          for name, parts in samples.items()}


def device_description(core: int) -> str:
  model = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          model = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  return (f"{cpu_device().device_kind} via JAX {jax.__version__}: {model}, "
          f"{os.cpu_count()} cores, measuring thread pinned to core {core}")


def measure_acting(*, core: int | None = None, num_calls: int = 3000,
                   obs_shape: tuple[int, ...] = DEFAULT_OBS_SHAPE,
                   num_actions: int = DEFAULT_NUM_ACTIONS,
                   include_b16: bool = True) -> dict[str, Any]:
  """All acting-latency numbers as a flat dict (microseconds).

  Call `configure_cpu_acting()` before any JAX work for representative
  numbers.
  """
  core = default_core() if core is None else core
  kwargs = dict(obs_shape=obs_shape, num_actions=num_actions)
  builders = {
      "dispatch_floor": identity_stepper,
      "lstm_b1": lambda: lstm_stepper(1, **kwargs),
      "lstm_lean_b1": lambda: lstm_stepper(1, lean=True, **kwargs),
      "gtrxl_b1": lambda: gtrxl_stepper(1, **kwargs),
  }
  if include_b16:
    builders.update({
        "lstm_b16": lambda: lstm_stepper(16, **kwargs),
        "lstm_lean_b16": lambda: lstm_stepper(16, lean=True, **kwargs),
        "gtrxl_b16": lambda: gtrxl_stepper(16, **kwargs),
    })
  stats = run_pinned(lambda: measure_steppers(builders, num_calls=num_calls),
                     core)
  floor = stats["dispatch_floor"].p50_us
  results: dict[str, Any] = {"dispatch_floor_us": floor}
  for name, s in stats.items():
    if name != "dispatch_floor":
      results[f"{name}_p50_us"] = s.p50_us
      results[f"{name}_p99_us"] = s.p99_us
  results["lstm_b1_p50_over_floor"] = round(
      results["lstm_b1_p50_us"] / floor, 2)
  results["lstm_lean_b1_p50_over_floor"] = round(
      results["lstm_lean_b1_p50_us"] / floor, 2)
  results["calls"] = {name: s.calls for name, s in stats.items()}
  results["device"] = device_description(core)
  results["obs_shape"] = list(obs_shape)
  results["num_actions"] = num_actions
  return results


def main(argv: list[str]) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--iters", type=int, default=3000,
                      help="timed calls per case (fewer for slow cases)")
  parser.add_argument("--core", type=int, default=None,
                      help="core the measuring thread pins itself to")
  parser.add_argument("--obs_dim", type=int, default=DEFAULT_OBS_SHAPE[0])
  parser.add_argument("--num_actions", type=int, default=DEFAULT_NUM_ACTIONS)
  parser.add_argument("--no_b16", action="store_true",
                      help="skip the batch-16 cases")
  args = parser.parse_args(argv)
  configure_cpu_acting()
  results = measure_acting(core=args.core, num_calls=args.iters,
                           obs_shape=(args.obs_dim,),
                           num_actions=args.num_actions,
                           include_b16=not args.no_b16)
  results["command"] = " ".join([os.path.basename(sys.executable),
                                 *sys.argv])
  print(json.dumps(results, indent=1))


if __name__ == "__main__":
  main(sys.argv[1:])
