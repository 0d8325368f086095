"""Environment steps per second through BatchedEnv, as one JSON object.

    python experiments/bench_envs.py [--seconds 1.0] [--repeats 3]

For each built-in environment (default kwargs) and E in (1, 16, 64): build a
BatchedEnv, reset, then time batched steps with uniformly random actions
(drawn up front, so the RNG is not timed) for about `--seconds`; the median
of `--repeats` runs is reported as env steps per second (E per batched step,
auto-resets included). `*_raw_sps` is a bare `env.step` loop on one
environment, for the cost of the batching layer itself.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import numpy as np

from ald_jax.envs import BatchedEnv
from ald_jax.envs import make_env_factory

import bench_output  # pylint: disable=g-bad-import-order

ENVS = ("imaze", "meta_fetch")
NUM_ENVS = (1, 16, 64)
_ACTION_BLOCK = 4096


def batched_sps(name: str, num_envs: int, seconds: float) -> float:
  """Env steps per second of BatchedEnv.step over about `seconds`."""
  batched = BatchedEnv(make_env_factory(name), num_envs, seed=0)
  actions = np.random.default_rng(0).integers(
      batched.num_actions, size=(_ACTION_BLOCK, num_envs), dtype=np.int32)
  batched.reset()
  for i in range(100):  # warm-up
    batched.step(actions[i])
  calls = 0
  start = time.perf_counter()
  while True:
    for i in range(256):
      batched.step(actions[(calls + i) % _ACTION_BLOCK])
    calls += 256
    elapsed = time.perf_counter() - start
    if elapsed >= seconds:
      break
  batched.close()
  return calls * num_envs / elapsed


def raw_sps(name: str, seconds: float) -> float:
  """Steps per second of a bare dm_env step loop on one environment."""
  env = make_env_factory(name)(0)
  actions = np.random.default_rng(0).integers(4, size=_ACTION_BLOCK).tolist()
  env.reset()
  steps = 0
  start = time.perf_counter()
  while True:
    for a in actions:
      env.step(a)
    steps += len(actions)
    elapsed = time.perf_counter() - start
    if elapsed >= seconds:
      break
  return steps / elapsed


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seconds", type=float, default=1.0)
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()

  result: dict[str, object] = {}
  for name in ENVS:
    for num_envs in NUM_ENVS:
      runs = [batched_sps(name, num_envs, args.seconds)
              for _ in range(args.repeats)]
      result[f"{name}_e{num_envs}_sps"] = round(statistics.median(runs))
    runs = [raw_sps(name, args.seconds) for _ in range(args.repeats)]
    result[f"{name}_raw_sps"] = round(statistics.median(runs))
  result.update(bench_output.header())
  result["machine"] = (f"{bench_output.cpu_model()}, {os.cpu_count()} cores "
                       f"visible, {platform.system()} {platform.machine()}, "
                       f"Python "
                       f"{platform.python_version()}, numpy {np.__version__}")
  result["method"] = (f"median of {args.repeats} runs of ~{args.seconds}s; "
                      f"uniform random actions; default env kwargs; seed 0")
  print(json.dumps(result, indent=2))


if __name__ == "__main__":
  main()
