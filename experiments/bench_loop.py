"""How much of its device the learner loop keeps busy.

The real `LearnerLoop`, `LearnerDriver`, batcher and publisher, fed by real
actors (or by a fake pool that hands out copies of one real unroll), drive a
stand-in device: a single "stream" thread that runs each dispatched step as
a sleep of D ms, so the step costs the host nothing and holds no interpreter
lock, as a GPU step does. The loop's results (non-finite flags) are objects
that block until the stream has run their step, as reading a device array
does. What the host does per step (batch assembly, `device_put` of the
batch, dispatch, bookkeeping, publishing a real LSTM actor's parameters)
is real. Prints one JSON object with, for each loop (`serial`: read every
step's flags before the next, publish every step, as the loop did before
pipelining, with the batch moved by a `device_put` of its tree; `pipelined`:
today's driver and defaults) and each D:

  device_busy_at_<D>ms       the stream's busy time / wall time
  learner_steps_per_s_at_<D>ms
  host_ms_per_step_at_<D>ms  loop time per step outside waits for the device
                             and for unrolls
  publish_ms_per_step_at_<D>ms, publishes_per_step_at_<D>ms
  wait_batch_frac_at_<D>ms   the loop's share of time waiting for unrolls

    python experiments/bench_loop.py --actors=processes --num_actors=1
    python experiments/bench_loop.py --actors=fake
"""
import concurrent.futures
import dataclasses
import json
import os
import sys
import tempfile
import threading
import time
from typing import Any, NamedTuple

from absl import app
from absl import flags
import jax
import numpy as np

from ald_jax import config as config_lib
from ald_jax import learner as learner_lib
from ald_jax import types
from ald_jax.envs import registry
from ald_jax.system import affinity
from ald_jax.system import learner_driver as driver_lib
from ald_jax.system import loop as loop_lib
from ald_jax.system import pool as pool_lib
from ald_jax.system import run

import bench_output  # pylint: disable=g-bad-import-order

_STEP_MS = flags.DEFINE_list("step_ms", ["5", "2"],
                             "Stand-in device step durations D, in ms.")
_DISTILL_MS = flags.DEFINE_float(
    "distill_ms", 0.0, "Device time of one distill-only step (ald: ~0.55 D "
    "on the H200); 0 runs none.")
_SECONDS = flags.DEFINE_float("seconds", 20.0, "Measured seconds per case.")
_ACTORS = flags.DEFINE_enum("actors", "fake",
                            ["fake"] + list(config_lib.ACTOR_MODES),
                            "Who feeds the loop.")
_NUM_ACTORS = flags.DEFINE_integer("num_actors", 1, "Actors (not fake).")
_ENVS = flags.DEFINE_integer("envs_per_actor", 16, "Environments per actor.")
_LOOPS = flags.DEFINE_list("loops", ["serial", "pipelined"], "Loops to run.")
_OUT = flags.DEFINE_string("out", "", "Also write the JSON here.")


class StandInStream:
  """A device stream: steps run one after another, each a sleep."""

  def __init__(self):
    self._executor = concurrent.futures.ThreadPoolExecutor(
        1, thread_name_prefix="stand-in-device")
    self.busy_s = 0.0
    self.read_wait_s = 0.0  # host time blocked reading a result

  def run(self, seconds: float) -> "Result":
    def kernel():
      start = time.perf_counter()
      time.sleep(seconds)
      self.busy_s += time.perf_counter() - start
    return Result(self, self._executor.submit(kernel))

  def close(self):
    self._executor.shutdown(wait=True)


class Result:
  """A step's non-finite flag: reading it waits for the step."""

  def __init__(self, stream: StandInStream, future):
    self._stream, self._future = stream, future

  def _wait(self):
    start = time.perf_counter()
    self._future.result()
    self._stream.read_wait_s += time.perf_counter() - start

  def __float__(self):
    self._wait()
    return 0.0

  def __array__(self, dtype=None, copy=None):
    self._wait()
    return np.zeros((), dtype or np.float32)


class StandInLearner(NamedTuple):
  """The driver-facing surface of `learner.Learner` over a stand-in device;
  the actor parameters are a real actor's."""
  train_step: Any
  replay_distill_steps: Any
  actor_params: Any
  init_memory: Any
  init_replay: Any
  example_batch: Any
  uses_memory: bool
  config: Any
  spec: Any


def stand_in_learner(real: Any, stream: StandInStream, step_s: float,
                     distill_s: float) -> StandInLearner:
  # A real dispatch that takes the batch: its host-to-device transfer is
  # part of the host's cost, as in the real step.
  take_batch = jax.jit(lambda batch: batch.reward[0, 0])

  def train_step(state, memory, replay, batch, warm, previous_nonfinite):
    del warm, previous_nonfinite
    take_batch(batch)
    return state, memory, replay, {"nonfinite": stream.run(step_s)}

  def replay_distill_steps(state, replay, num_steps):
    del replay
    flags_ = [stream.run(distill_s) for _ in range(num_steps)]
    return state, {"nonfinite": np.asarray(flags_, object)}

  return StandInLearner(
      train_step, replay_distill_steps,
      actor_params=lambda state: state["actor"],
      init_memory=lambda n: (), init_replay=lambda capacity: (),
      example_batch=real.example_batch, uses_memory=True,
      config=dataclasses.replace(real.config, learner_memory="cached"),
      spec=real.spec)


class FakePool:
  """Hands out copies of one real unroll as fast as the loop asks, with the
  stream ids and unroll indices real actors would give them."""

  def __init__(self, unroll: types.Batch, num_streams: int,
               unroll_length: int):
    self._unroll = unroll
    self._unroll_length = unroll_length
    self._rows = unroll.stream_id.size
    self.num_streams = num_streams
    self.params_version = 0
    self.queue_size = 0
    self._next_stream = 0
    self._index = np.zeros(num_streams, np.int32)
    self._env_steps = 0

  def start(self, params):
    self.publish(params)

  def publish(self, params):
    del params
    self.params_version += 1
    return self.params_version

  def get_unroll(self, timeout_s):
    del timeout_s
    streams = (self._next_stream + np.arange(self._rows)) % self.num_streams
    self._next_stream = (self._next_stream + self._rows) % self.num_streams
    unroll = jax.tree.map(np.copy, self._unroll).replace(
        stream_id=streams.astype(np.int32), unroll_index=self._index[streams])
    self._index[streams] += 1
    self._env_steps += self._rows * self._unroll_length
    return unroll

  def env_steps(self):
    return self._env_steps

  def check(self):
    pass

  def raise_error(self):
    pass

  def stats(self):
    return {"env_steps": self._env_steps}

  def drain_episodes(self):
    return []

  def stop(self, deadline_s):
    del deadline_s
    return []


def action_seed(actor_id: int) -> int:
  """Actor i's action-sampling seed (module level: processes unpickle it)."""
  return 1000 + actor_id


def one_unroll(real: Any, rows: int) -> types.Batch:
  batch = real.example_batch(rows)
  return batch.replace(stream_id=np.arange(rows, dtype=np.int32),
                       unroll_index=np.zeros(rows, np.int32))


def measure(loop_kind: str, step_ms: float, real: Any, cfg, pool_factory,
            actor_params) -> dict[str, float]:
  stream = StandInStream()
  learner = stand_in_learner(real, stream, step_ms / 1e3,
                             _DISTILL_MS.value / 1e3)
  if loop_kind == "serial":
    cfg = dataclasses.replace(cfg, publish_every_steps=1,
                              publish_interval_s=0.0)
  driver = driver_lib.LearnerDriver(learner, cfg, jax.devices()[0],
                                    {"actor": actor_params},
                                    pipelined=loop_kind == "pipelined")
  if loop_kind == "serial":
    # The transfer as it was: a device_put of the batch tree.
    driver._place = lambda batch: jax.device_put(  # pylint: disable=protected-access
        batch, jax.devices()[0])
  pool = pool_factory(cfg)
  loop = loop_lib.LearnerLoop(cfg, pool, driver, write_row=lambda row: None,
                              save_checkpoint=lambda *args: None)
  loop.start_actors()
  try:
    # Warm-up: the actors compile and fill the queue; then a clean window.
    deadline = time.perf_counter() + 3.0
    while time.perf_counter() < deadline:
      unroll = pool.get_unroll(0.1)
      if unroll is not None:
        loop._train_on(unroll)  # pylint: disable=protected-access
    driver.flush()
    steps0 = driver.counters().learner_steps
    busy0, wait0 = stream.busy_s, stream.read_wait_s
    published0 = loop._publisher.published  # pylint: disable=protected-access
    loop.phases.reset()
    loop._config = dataclasses.replace(  # pylint: disable=protected-access
        cfg, max_wall_time_s=loop.elapsed_s() + _SECONDS.value)
    start = time.perf_counter()
    loop.run()
    driver.flush()
    wall = time.perf_counter() - start
    published = (loop._publisher.published  # pylint: disable=protected-access
                 - published0)
  finally:
    pool.stop(10.0)
    stream.close()
  steps = driver.counters().learner_steps - steps0
  phases = loop.phases.totals()
  waits = stream.read_wait_s - wait0 + phases.get("wait_batch", 0.0)
  d = f"{step_ms:g}ms"
  return {
      f"device_busy_at_{d}": (stream.busy_s - busy0) / wall,
      f"learner_steps_per_s_at_{d}": steps / wall,
      f"host_ms_per_step_at_{d}": 1e3 * (wall - waits) / max(steps, 1),
      f"publish_ms_per_step_at_{d}": 1e3 * phases.get("publish", 0.0) /
                                     max(steps, 1),
      f"publishes_per_step_at_{d}": published / max(steps, 1),
      f"wait_batch_frac_at_{d}": phases.get("wait_batch", 0.0) / wall,
  }


def main(argv):
  del argv
  cfg = config_lib.TrainConfig(
      num_actors=_NUM_ACTORS.value, envs_per_actor=_ENVS.value,
      learner=config_lib.LearnerConfig(batch_size=16),
      total_env_steps=10**12, queue_capacity=16,
      actors=_ACTORS.value if _ACTORS.value != "fake" else "threads",
      distill_steps_per_rl_step=1.0 if _DISTILL_MS.value > 0 else 0.0,
      t_actor_budget_ms=float("inf"), report_interval_s=float("inf"),
      checkpoint_interval_s=float("inf"), eval_interval_s=0.0,
      logdir=tempfile.mkdtemp(prefix="bench_loop_"))
  factory = registry.make_env_factory(cfg.env)
  env_info = run.probe_environment(factory, 0)
  real = learner_lib.make_learner(cfg.learner, env_info.obs_shape,
                                  env_info.num_actions)
  state = real.init(jax.random.PRNGKey(0), real.example_batch(2))
  actor_params = jax.device_get(real.actor_params(state))
  num_streams = cfg.num_actors * cfg.envs_per_actor

  def pool_factory(cfg):
    if _ACTORS.value == "fake":
      return FakePool(one_unroll(real, cfg.envs_per_actor),
                      max(num_streams, cfg.learner.batch_size),
                      cfg.learner.unroll_length)
    cores = affinity.assign_cores(cfg.num_actors, reserve_for_learner=1)
    spec = pool_lib.ActorSpec(
        make_env=run.EnvMaker(factory, cfg.envs_per_actor, 0, 0),
        core=real.actor_core, num_actors=cfg.num_actors,
        envs_per_actor=cfg.envs_per_actor,
        unroll_length=cfg.learner.unroll_length,
        context_length=cfg.learner.learner_context,
        seed_for=action_seed, cores=cores.actors, t_actor_budget_ms=None,
        env_info=env_info)
    return run._make_pool(cfg, spec)  # pylint: disable=protected-access

  if _ACTORS.value == "fake" and num_streams < cfg.learner.batch_size:
    pass  # the fake pool has as many streams as a batch needs
  elif num_streams < cfg.learner.batch_size:
    cfg = dataclasses.replace(cfg, learner=dataclasses.replace(
        cfg.learner, batch_size=num_streams))
  out: dict[str, Any] = {
      **bench_output.header(),
      "jax": jax.__version__, "actors": _ACTORS.value,
      "load_average_at_start": os.getloadavg()[0],
      "num_actors": cfg.num_actors, "envs_per_actor": cfg.envs_per_actor,
      "batch_size": cfg.learner.batch_size, "distill_ms": _DISTILL_MS.value,
      "publish_every_steps": cfg.publish_every_steps,
      "publish_interval_s": cfg.publish_interval_s}
  for loop_kind in _LOOPS.value:
    results = {}
    for step_ms in _STEP_MS.value:
      results.update(measure(loop_kind, float(step_ms), real, cfg,
                             pool_factory, actor_params))
      print(loop_kind, json.dumps(results), file=sys.stderr, flush=True)
    out[loop_kind] = results
  for key, value in out.get("pipelined", {}).items():
    out[key] = value  # the headline figures are today's loop's
  bench_output.emit(out, _OUT.value, indent=1)


if __name__ == "__main__":
  app.run(main)
