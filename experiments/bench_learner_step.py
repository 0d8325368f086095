"""Acting latency (CPU, pinned thread) and the learner step (default device).

Prints one JSON object, all measured in this run:
  dispatch_floor_us                      median call of a jitted identity on CPU
  lstm_b1_p50_us / _p99_us, lstm_b16_p50_us   the actor's acting call (the lean
                                         `act` path the actor threads run)
  gtrxl_b1_p50_us / _p99_us, gtrxl_b16_p50_us GTrXL step with its K/V cache
  gtrxl_over_lstm_b1                     the reason ALD exists
  learner_compile_s, learner_step_ms     combined ALD step, default B/T/context
  learner_frames_per_s_cached / _recompute   trained T-step frames per second of
                                         the combined step, warm (segment
                                         memory) vs cold (context re-read)
  distill_step_ms_stored / _recompute    a distill-only step from the device
                                         replay, stored vs recomputed teacher
  distill_call_ms_stored / _recompute    the k distill-only steps due per RL
                                         step (k = the training default,
                                         `distill_steps_per_call`) in one
                                         call, as the driver runs them, vs
  distill_separate_calls_ms_*            the same k steps one call each
                                         (also alone: --only=distill; CPU
                                         dispatch synchronous, as in a run)
  driver_train_ms, driver_device_calls_ms   one `LearnerDriver.train` call
                                         (warm batch, k distill-only steps) vs
                                         the same jitted calls alone; their
                                         difference is the driver's host work
                                         (--only=driver)
  lstm_train_ms, lstm_agent_step_ms[_actor_context0]   the LSTM's training
                                         cost (also alone: --only=lstm)
  transformer_learner_frames_per_s_cached / _recompute   the same for the
                                         `transformer` agent (no LSTM actor
                                         to distil, whose cost over the
                                         C+T+1 row is the same warm or cold)

With --shape=large (the shape of a public Flax gated Transformer-XL we compare
with: 4 layers, d=256, 8 heads, mlp 256, M=64, T=64, B=16, vector
observations of 36), acting is skipped and it prints instead:
  gtrxl_frames_per_s_cached / _recompute  that peer's workload: forward +
                                         backward + Adam of the GTrXL
                                         policy-value network alone
                                         (cross-entropy policy loss, squared
                                         value loss), trained T-step frames/s,
                                         with segment memory vs re-reading M
  learner_frames_per_s_cached / ...      the full ALD learner step at that
                                         shape, as above

    python experiments/bench_learner_step.py [--iters 3000] [--learner_steps 20]
    python experiments/bench_learner_step.py --shape=large
    python experiments/bench_learner_step.py --only=lstm
    python experiments/bench_learner_step.py --only=distill
    python experiments/bench_learner_step.py --only=driver
"""
import argparse
import dataclasses
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_acting  # pylint: disable=wrong-import-position
import bench_output  # pylint: disable=wrong-import-position

import jax  # pylint: disable=wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
import optax  # pylint: disable=wrong-import-position

from ald_jax import config as config_lib  # pylint: disable=wrong-import-position
from ald_jax import learner as learner_lib  # pylint: disable=wrong-import-position
from ald_jax.networks import gtrxl as gtrxl_lib  # pylint: disable=wrong-import-position
from ald_jax.networks import lstm as lstm_lib  # pylint: disable=wrong-import-position
from ald_jax.networks import policy_value  # pylint: disable=wrong-import-position
from ald_jax.system import learner_driver as driver_lib  # pylint: disable=wrong-import-position
from ald_jax.types import MID  # pylint: disable=wrong-import-position

# The peer's shape (issue 7): vector observations of 36, 4 actions.
LARGE_OBS_SHAPE, LARGE_NUM_ACTIONS = (36,), 4


def large_learner_config() -> config_lib.LearnerConfig:
  return config_lib.LearnerConfig(
      unroll_length=64, learner_context=64, batch_size=16,
      torso=config_lib.TorsoConfig(conv_channels=(), mlp_sizes=(256,)),
      gtrxl=config_lib.GTrXLConfig(num_layers=4, d_model=256, num_heads=8,
                                   mlp_size=256, memory_length=64))


def measure_learner(num_steps: int, obs_shape, num_actions) -> dict:
  config = config_lib.LearnerConfig()
  learner = learner_lib.make_learner(config, obs_shape, num_actions)
  device = jax.devices()[0]
  rng = np.random.default_rng(0)
  batch = learner.example_batch(config.batch_size)
  batch = batch.replace(
      observation=rng.normal(size=batch.observation.shape).astype(np.float32),
      reward=rng.normal(size=batch.reward.shape).astype(np.float32))
  batch = jax.device_put(batch, device)
  state = learner.init(jax.random.PRNGKey(0), batch)
  jax.block_until_ready(state)
  start = time.perf_counter()
  state, metrics = learner.step(state, batch)
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - start
  times = []
  for _ in range(num_steps):
    start = time.perf_counter()
    state, metrics = learner.step(state, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  return {
      "learner_compile_s": round(compile_s, 2),
      "learner_step_ms": round(float(np.median(times)) * 1e3, 2),
      "learner_step_p90_ms": round(float(np.percentile(times, 90)) * 1e3, 2),
      "learner_device": str(device),
      "learner_config": {
          "agent": config.agent, "rl_loss": config.rl_loss,
          "batch_size": config.batch_size,
          "unroll_length": config.unroll_length,
          "learner_context": config.learner_context,
          "gtrxl": vars(config.gtrxl) if hasattr(config.gtrxl, "__dict__")
                   else str(config.gtrxl),
          "lstm_hidden_size": config.lstm.hidden_size},
  }


def _echo(figures: dict) -> None:
  """Figures to stderr at once, so a run cut short by a time limit (a lent
  GPU's budget) still leaves what it measured."""
  print(json.dumps(figures, default=str), file=sys.stderr, flush=True)


def _put(out: dict, key: str, value) -> None:
  out[key] = value
  _echo({key: value})


def _timed(fn, num_steps):
  out = fn()   # compile
  jax.block_until_ready(out)
  times = []
  for _ in range(num_steps):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return float(np.median(times))


class _LearnerBench:
  """One learner on a fixed random batch whose rows are streams 0..B-1, with
  its state, segment memory and replay carried from call to call."""

  def __init__(self, config: config_lib.LearnerConfig, obs_shape,
               num_actions):
    self.config = config
    self.learner = learner_lib.make_learner(config, obs_shape, num_actions)
    b = config.batch_size
    rng = np.random.default_rng(0)
    batch = self.learner.example_batch(b)
    batch = batch.replace(
        observation=rng.normal(size=batch.observation.shape).astype(
            np.float32),
        reward=rng.normal(size=batch.reward.shape).astype(np.float32),
        stream_id=np.arange(b, dtype=np.int32),
        unroll_index=np.zeros(b, np.int32))
    # Everything placed on the device as `LearnerDriver` does: committed
    # inputs, so the steps' outputs (committed) keep the compiled signature
    # and no timed call retraces.
    device = jax.devices()[0]
    self.batch = jax.device_put(batch, device)
    self.state = jax.device_put(
        self.learner.init(jax.random.PRNGKey(0), self.batch), device)
    self.memory = jax.device_put(self.learner.init_memory(b), device)
    self.replay = (jax.device_put(self.learner.init_replay(max(256, b)),
                                  device)
                   if self.learner.spec.distills else None)

  def combined(self, warm: bool):
    def run():
      (self.state, self.memory, self.replay,
       metrics) = self.learner.train_step(self.state, self.memory,
                                          self.replay, self.batch, warm=warm)
      return metrics
    return run

  def distill(self, num_steps: int = 1):
    self.state, metrics = self.learner.replay_distill_steps(
        self.state, self.replay, num_steps=num_steps)
    return metrics

  def distill_separately(self, num_steps: int):
    return [self.distill() for _ in range(num_steps)]

  def frames_per_s(self, warm: bool, num_steps: int) -> float:
    frames = self.config.batch_size * self.config.unroll_length
    return round(frames / _timed(self.combined(warm), num_steps), 1)


def _put_warm_cold_pair(out: dict, prefix: str, bench: _LearnerBench,
                        num_steps: int) -> None:
  """`{prefix}learner_frames_per_s_{recompute,cached}` and their ratio."""
  for name, warm in (("recompute", False), ("cached", True)):
    _put(out, f"{prefix}learner_frames_per_s_{name}",
         bench.frames_per_s(warm, num_steps))
  out[f"{prefix}cached_over_recompute"] = round(
      out[f"{prefix}learner_frames_per_s_cached"] /
      out[f"{prefix}learner_frames_per_s_recompute"], 2)


def _teacher_bench(config, teacher: str, obs_shape, num_actions
                   ) -> _LearnerBench:
  return _LearnerBench(dataclasses.replace(config, distill=dataclasses.replace(
      config.distill, teacher=teacher)), obs_shape, num_actions)


def _put_distill_calls(out: dict, teacher: str, bench: _LearnerBench,
                       num_steps: int) -> None:
  """The k distill-only steps due per RL step (k = training's default), one
  call vs k calls, on a bench whose replay is filled."""
  k = int(config_lib.ALD_DISTILL_STEPS)
  out["distill_steps_per_call"] = k
  _put(out, f"distill_call_ms_{teacher}", round(
      _timed(lambda: bench.distill(k), num_steps) * 1e3, 2))
  _put(out, f"distill_separate_calls_ms_{teacher}", round(
      _timed(lambda: bench.distill_separately(k), num_steps) * 1e3, 2))


def measure_distill_calls(num_steps: int, obs_shape, num_actions,
                          config=None) -> dict:
  """`_put_distill_calls` alone, for both teachers."""
  config = config or config_lib.LearnerConfig()
  out = {}
  for teacher in ("stored", "recompute"):
    bench = _teacher_bench(config, teacher, obs_shape, num_actions)
    bench.combined(False)()   # fill the replay
    _put_distill_calls(out, teacher, bench, num_steps)
  return out


def measure_driver(num_steps: int, obs_shape, num_actions,
                   config=None) -> dict:
  """`LearnerDriver.train` on warm host batches (as the loop calls it: the
  transfer, the bookkeeping, the non-finite reads) vs its jitted calls
  alone (combined warm step + the k distill-only steps, placed inputs)."""
  config = config or config_lib.LearnerConfig()
  b = config.batch_size
  train_config = config_lib.TrainConfig(learner=config, num_actors=1,
                                        envs_per_actor=b)
  k = int(train_config.distill_steps_per_rl_step)
  bench = _LearnerBench(config, obs_shape, num_actions)
  host_batch = jax.device_get(bench.batch)
  driver = driver_lib.LearnerDriver(bench.learner, train_config,
                                    jax.devices()[0], jax.device_get(
                                        bench.state))
  unroll = iter(range(10**9))

  def train():
    index = next(unroll)
    return driver.train(host_batch.replace(
        unroll_index=np.full(b, index, np.int32)))

  def device_calls():
    return bench.combined(True)(), bench.distill(k)
  out = {"driver_distill_steps": k}
  _timed(train, 2)   # compiles every variant, then warm
  _put(out, "driver_train_ms", round(_timed(train, num_steps) * 1e3, 2))
  _put(out, "driver_device_calls_ms",
       round(_timed(device_calls, num_steps) * 1e3, 2))
  out["driver_host_overhead_ms"] = round(
      out["driver_train_ms"] - out["driver_device_calls_ms"], 2)
  return out


def measure_memory_and_replay(num_steps: int, obs_shape, num_actions,
                              config=None, distill_calls: bool = True
                              ) -> dict:
  """Warm vs cold combined steps and stored vs recomputed distill steps
  (one step a call, and k in one call vs k calls unless `distill_calls` is
  False).

  Also the same warm/cold pair for the `transformer` agent (the GTrXL
  learner without the LSTM actor's distillation, whose cost over the C+T+1
  row is the same warm or cold)."""
  config = config or config_lib.LearnerConfig()
  out = {}
  for teacher in ("stored", "recompute"):
    bench = _teacher_bench(config, teacher, obs_shape, num_actions)
    if teacher == "stored":
      _put_warm_cold_pair(out, "", bench, num_steps)
    else:
      bench.combined(False)()   # fill the replay
    _put(out, f"distill_step_ms_{teacher}", round(
        _timed(bench.distill, num_steps) * 1e3, 2))
    if distill_calls:
      _put_distill_calls(out, teacher, bench, num_steps)
  bench = _LearnerBench(dataclasses.replace(config, agent="transformer"),
                        obs_shape, num_actions)
  _put_warm_cold_pair(out, "transformer_", bench, num_steps)
  return out


def measure_lstm(num_steps: int, obs_shape, num_actions) -> dict:
  """The LSTM's training cost at the default sizes.

  lstm_train_ms: forward + backward of the LSTM core alone over the C+T+1
  steps of a row (B rows, the torso's output as input), as in every ALD
  step. lstm_agent_step_ms[_actor_context0]: the `lstm` agent's combined
  step training through the whole row, or from the unroll only (the context
  as burn-in without gradients).
  """
  config = config_lib.LearnerConfig()
  b = config.batch_size
  length = config.learner_context + config.unroll_length + 1
  core = lstm_lib.LSTMCore(config.lstm.hidden_size, config.lstm.forget_bias)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(b, length, config.torso.mlp_sizes[-1])),
                  jnp.float32)
  step_type = jnp.full((b, length), MID, jnp.int32)
  state = core.initial_state(b)
  params = core.init(jax.random.PRNGKey(0), x, step_type, state)

  def loss(params):
    hidden, _ = core.apply(params, x, step_type, state)
    return jnp.sum(hidden ** 2)

  grad = jax.jit(jax.grad(loss))
  out = {}
  _put(out, "lstm_train_ms",
       round(_timed(lambda: grad(params), num_steps) * 1e3, 2))
  for suffix, actor_context in (("", None), ("_actor_context0", 0)):
    bench = _LearnerBench(config_lib.LearnerConfig(
        agent="lstm", actor_context=actor_context), obs_shape, num_actions)
    _put(out, f"lstm_agent_step_ms{suffix}",
         round(_timed(bench.combined(False), num_steps) * 1e3, 2))
  return out


def measure_gtrxl_alone(num_steps: int, config: config_lib.LearnerConfig,
                        obs_shape, num_actions) -> dict:
  """The GTrXL policy-value net alone: CE + squared value loss, Adam.

  Cached: each step attends to the previous step's per-layer inputs (M
  steps, stop-gradient) and computes T positions, carrying its new memory
  forward. Recompute: each step re-reads M context steps (M + T positions,
  gradients through the last T only).
  """
  b, t, m = config.batch_size, config.unroll_length, config.gtrxl.memory_length
  net = policy_value.GTrXLPolicyValueNet(config.torso, config.gtrxl,
                                         num_actions, len(obs_shape))
  rng = np.random.default_rng(0)
  optimizer = optax.adam(3e-4)
  out = {}
  for variant, length in (("cached", t), ("recompute", m + t)):
    obs = jnp.asarray(rng.normal(size=(b, length, *obs_shape)), jnp.float32)
    step_type = jnp.full((b, length), MID, jnp.int32)
    actions = jnp.asarray(rng.integers(num_actions, size=(b, t)), jnp.int32)
    returns = jnp.asarray(rng.normal(size=(b, t)), jnp.float32)
    memory = gtrxl_lib.empty_segment_memory(config.gtrxl, b)
    memory = memory._replace(valid=jnp.ones_like(memory.valid))
    num_memory_steps = length - t

    def loss_fn(params, memory, obs=obs, step_type=step_type,
                actions=actions, returns=returns,
                num_memory_steps=num_memory_steps, cached=variant == "cached"):
      output, layer_inputs = net.apply(
          params, obs, step_type, num_memory_steps,
          memory if cached else None, return_layer_inputs=True)
      logits = output.logits[:, -t:]
      values = output.value[:, -t:]
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, actions)
      loss = jnp.mean(ce) + 0.5 * jnp.mean(jnp.square(values - returns))
      return loss, layer_inputs[:, :, -m:]

    @jax.jit
    def train(params, opt_state, memory, loss_fn=loss_fn):
      (loss, next_inputs), grads = jax.value_and_grad(
          loss_fn, has_aux=True)(params, memory)
      updates, opt_state = optimizer.update(grads, opt_state, params)
      memory = memory._replace(inputs=jax.lax.stop_gradient(next_inputs))
      return optax.apply_updates(params, updates), opt_state, memory, loss

    params = net.init(jax.random.PRNGKey(0), obs, step_type)
    holder = {"params": params, "opt": optimizer.init(params),
              "memory": memory}

    def run():
      (holder["params"], holder["opt"], holder["memory"],
       loss) = train(holder["params"], holder["opt"], holder["memory"])
      return loss

    _put(out, f"gtrxl_frames_per_s_{variant}", round(
        b * t / _timed(run, num_steps), 1))
  out["gtrxl_cached_over_recompute"] = round(
      out["gtrxl_frames_per_s_cached"] / out["gtrxl_frames_per_s_recompute"],
      2)
  return out


def run_header(device: str) -> dict:
  """What every result starts with: the command, date, machine, versions."""
  return {
      **bench_output.header(),
      "device": device,
      "jax_version": jax.__version__,
  }


def main_large(args) -> dict:
  config = large_learner_config()
  result = {
      **run_header(str(jax.devices()[0])),
      "shape": "large",
      "learner_config": {
          "batch_size": config.batch_size,
          "unroll_length": config.unroll_length,
          "learner_context": config.learner_context,
          "gtrxl": dataclasses.asdict(config.gtrxl),
          "obs_shape": list(LARGE_OBS_SHAPE)},
  }
  result.update(measure_gtrxl_alone(args.learner_steps, config,
                                    LARGE_OBS_SHAPE, LARGE_NUM_ACTIONS))
  result.update(measure_memory_and_replay(args.learner_steps,
                                          LARGE_OBS_SHAPE, LARGE_NUM_ACTIONS,
                                          config=config, distill_calls=False))
  return result


def main(argv):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--iters", type=int, default=3000)
  parser.add_argument("--learner_steps", type=int, default=20)
  parser.add_argument("--core", type=int, default=None)
  parser.add_argument("--shape", choices=("default", "large"),
                      default="default")
  parser.add_argument("--only", choices=("all", "lstm", "distill", "driver"),
                      default="all",
                      help="lstm: only the LSTM's training figures; distill: "
                      "only the distill-only calls (one vs k); driver: only "
                      "the driver's train call vs its jitted calls")
  args = parser.parse_args(argv)
  if args.shape == "large":
    print(json.dumps(main_large(args), indent=1, default=str))
    return
  if args.only != "all":
    if args.only in ("distill", "driver"):
      # As in a run (system/run.py): the CPU learner dispatches
      # synchronously, so each call's dispatch is paid in full.
      bench_acting.configure_cpu_acting()
    measure = {"lstm": measure_lstm, "distill": measure_distill_calls,
               "driver": measure_driver}
    print(json.dumps({
        **run_header(str(jax.devices()[0])),
        **measure[args.only](args.learner_steps,
                             bench_acting.DEFAULT_OBS_SHAPE, 4)},
        indent=1, default=str))
    return
  bench_acting.configure_cpu_acting()   # before any other JAX work
  # Create JAX's CPU client (and XLA's worker pool) on this unpinned thread:
  # threads inherit the affinity of their creator, and the acting
  # measurement below runs in a thread pinned to one core.
  warm = jax.jit(lambda x: x @ x)(jax.numpy.ones((256, 256)))
  jax.block_until_ready(warm)
  obs_shape, num_actions = bench_acting.DEFAULT_OBS_SHAPE, 4
  acting = bench_acting.measure_acting(core=args.core, num_calls=args.iters,
                                       obs_shape=obs_shape,
                                       num_actions=num_actions)
  result = {
      **run_header(acting["device"]),
      "dispatch_floor_us": acting["dispatch_floor_us"],
      # The actor threads act through the lean path (LSTMPolicyValueNet.act).
      "lstm_b1_p50_us": acting["lstm_lean_b1_p50_us"],
      "lstm_b1_p99_us": acting["lstm_lean_b1_p99_us"],
      "lstm_b16_p50_us": acting["lstm_lean_b16_p50_us"],
      "lstm_api_step_b1_p50_us": acting["lstm_b1_p50_us"],
      "gtrxl_b1_p50_us": acting["gtrxl_b1_p50_us"],
      "gtrxl_b1_p99_us": acting["gtrxl_b1_p99_us"],
      "gtrxl_b16_p50_us": acting["gtrxl_b16_p50_us"],
  }
  result["lstm_b1_over_dispatch_floor"] = round(
      result["lstm_b1_p50_us"] / result["dispatch_floor_us"], 2)
  result["gtrxl_over_lstm_b1"] = round(
      result["gtrxl_b1_p50_us"] / result["lstm_b1_p50_us"], 1)
  _echo(result)
  learner = measure_learner(args.learner_steps, obs_shape, num_actions)
  _echo(learner)
  result.update(learner)
  result.update(measure_memory_and_replay(args.learner_steps, obs_shape,
                                          num_actions))
  result.update(measure_driver(args.learner_steps, obs_shape, num_actions))
  result.update(measure_lstm(args.learner_steps, obs_shape, num_actions))
  print(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
  main(sys.argv[1:])
