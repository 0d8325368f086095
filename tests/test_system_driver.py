"""LearnerDriver: the one learner call per batch, with a fake learner."""
import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ald_jax import config as config_lib
from ald_jax.system import errors
from ald_jax.system import learner_driver as driver_lib
from ald_jax.system import replay as replay_lib

from test_system_batcher import unroll


class FakeSpec(NamedTuple):
  distills: bool = True


class FakeLearnerConfig(NamedTuple):
  learner_memory: str = "cached"


class FakeLearner(NamedTuple):
  """The driver-facing surface of `learner.Learner`. State counts steps; an
  update is non-finite when the batch's reward is NaN (combined) or when
  `distill_nan(k)` says so for the k-th distill-only step (counted from 1);
  memory counts writes per stream."""
  train_step: Callable[..., Any]
  replay_distill_steps: Callable[..., Any]
  actor_params: Callable[[Any], Any]
  init_memory: Callable[[int], Any]
  init_replay: Callable[[int], Any]
  uses_memory: bool
  config: Any
  spec: Any


def fake_learner(distill_nan=lambda k: False, uses_memory=False):
  calls = {"distill": 0, "warm": [], "distill_calls": []}

  def train_step(state, memory, replay, batch, warm, previous_nonfinite=0.0):
    del previous_nonfinite
    calls["warm"].append(warm)
    bad = jnp.any(jnp.isnan(batch.reward)).astype(jnp.float32)
    if uses_memory:
      memory = memory.at[batch.stream_id].add(1)
    return ({"steps": state["steps"] + 1, "w": state["w"] + 1.0,
             "distill": state["distill"]}, memory, replay,
            {"nonfinite": bad, "loss": jnp.float32(2.5)})

  def replay_distill_steps(state, replay, num_steps):
    del replay
    calls["distill_calls"].append(num_steps)
    first = calls["distill"] + 1
    calls["distill"] += num_steps
    ks = range(first, first + num_steps)
    return (dict(state, distill=state["distill"] + num_steps),
            {"nonfinite": jnp.asarray([float(distill_nan(k)) for k in ks]),
             "step": jnp.asarray(list(ks), jnp.float32)})

  learner = FakeLearner(
      train_step, replay_distill_steps, lambda s: {"w": s["w"]},
      init_memory=lambda n: jnp.zeros((n,), jnp.int32),
      init_replay=lambda capacity: jnp.zeros(()), uses_memory=uses_memory,
      config=FakeLearnerConfig(), spec=FakeSpec())
  return learner, calls


# Each result read before `train` returns (the pipelined driver reports it
# one call later; tests below compare the two).
serial_driver = functools.partial(driver_lib.LearnerDriver, pipelined=False)


def train_config(**changes):
  base = config_lib.TrainConfig(
      learner=config_lib.LearnerConfig(batch_size=2), num_actors=1,
      envs_per_actor=2, distill_steps_per_rl_step=0.5, replay_capacity=8,
      max_consecutive_nonfinite=2)
  return dataclasses.replace(base, **changes)


def initial_state():
  return {"steps": jnp.int32(0), "w": jnp.zeros(3), "distill": jnp.int32(0)}


def test_counts_steps_distill_schedule_and_publishes_copies():
  driver = serial_driver(fake_learner()[0], train_config(),
                                    jax.devices()[0], initial_state())
  results = [driver.train(unroll([0, 1], [k, k])) for k in range(4)]
  # ratio 0.5: a distill-only step after every second combined step.
  assert [r.distill_steps for r in results] == [0, 1, 0, 1]
  assert all(r.applied for r in results)
  assert driver.counters() == driver_lib.DriverCounters(4, 2, 0, 0, 0, 4)
  assert driver.metrics() == {"nonfinite": 0.0, "loss": 2.5,
                              "distill_only/nonfinite": 0.0,
                              "distill_only/step": 2.0,
                              "learner_warm_steps": 0.0,
                              "learner_cold_steps": 4.0}
  np.testing.assert_array_equal(driver.actor_params()["w"], [4, 4, 4])
  state = driver.host_state()
  assert int(state["steps"]) == 4 and int(state["distill"]) == 2
  metadata = driver.checkpoint_metadata()
  assert metadata["learner_steps"] == 4


def test_restored_counters_continue():
  driver = serial_driver(
      fake_learner()[0], train_config(distill_steps_per_rl_step=0.0),
      jax.devices()[0], initial_state(),
      counters={"learner_steps": 7, "distill_steps": 3, "env_steps": 99})
  driver.train(unroll([0, 1], [0, 0]))
  assert driver.counters()[:4] == (8, 3, 0, 0)


def test_nonfinite_combined_steps_skip_then_stop():
  driver = serial_driver(
      fake_learner()[0], train_config(distill_steps_per_rl_step=0.0),
      jax.devices()[0], initial_state())
  bad = unroll([0, 1], [0, 0])
  bad = bad.replace(reward=np.full_like(bad.reward, np.nan))
  assert not driver.train(bad).applied
  assert driver.train(unroll([0, 1], [1, 1])).applied  # resets the run
  assert not driver.train(bad).applied
  with pytest.raises(errors.NonFiniteLossError, match="2 learner updates"):
    driver.train(bad)
  assert driver.counters().nonfinite_total == 3
  assert driver.counters().learner_steps == 1


def test_failed_distill_only_steps_are_counted():
  driver = serial_driver(
      fake_learner(distill_nan=lambda k: k % 2 == 0)[0],
      train_config(distill_steps_per_rl_step=1.0), jax.devices()[0],
      initial_state())
  results = [driver.train(unroll([0, 1], [k, k])) for k in range(4)]
  assert [r.distill_skipped for r in results] == [0, 1, 0, 1]
  assert driver.counters().distill_steps == 2
  assert driver.counters().distill_nonfinite_total == 2


def test_no_distill_only_step_runs_before_the_replay_holds_a_row():
  """The replay starts empty (start, resume) and a skipped combined step
  writes nothing: the steps due then are dropped, not run on placeholder
  rows."""
  learner, calls = fake_learner()
  driver = serial_driver(
      learner, train_config(distill_steps_per_rl_step=1.0), jax.devices()[0],
      initial_state())
  bad = unroll([0, 1], [0, 0])
  bad = bad.replace(reward=np.full_like(bad.reward, np.nan))
  result = driver.train(bad)
  assert (result.applied, result.distill_steps, result.distill_skipped) == (
      False, 0, 0)
  assert calls["distill_calls"] == []
  assert driver.train(unroll([0, 1], [1, 1])).distill_steps == 1
  # Once rows are held, a skipped combined step keeps the steps due.
  assert driver.train(bad).distill_steps == 1
  assert calls["distill_calls"] == [1, 1]


def test_the_steps_due_run_as_one_call_and_are_counted_one_by_one():
  learner, calls = fake_learner(distill_nan=lambda k: k in (4, 6))
  driver = serial_driver(
      learner, train_config(distill_steps_per_rl_step=3.0), jax.devices()[0],
      initial_state())
  results = [driver.train(unroll([0, 1], [k, k])) for k in range(2)]
  assert calls["distill_calls"] == [3, 3]
  assert [(r.distill_steps, r.distill_skipped) for r in results] == [
      (3, 0), (1, 2)]
  assert driver.counters().distill_steps == 4
  assert driver.counters().distill_nonfinite_total == 2
  # The reported metrics are the last applied step's (5th), not the 6th's.
  assert driver.metrics()["distill_only/step"] == 5.0


@pytest.mark.parametrize("ratio, counts", [(4.0, [4]), (0.5, [1]),
                                           (1.5, [1, 2]), (0.0, [])])
def test_schedule_names_every_count_the_driver_compiles(ratio, counts):
  schedule = replay_lib.DistillSchedule(ratio)
  assert schedule.possible_steps() == counts
  seen = {schedule.steps_due() for _ in range(20)} - {0}
  assert seen == set(counts)


def test_all_steps_of_a_batch_are_queued_before_any_result_is_read():
  # Reading a step's result makes the host wait for that step; the driver
  # queues the combined step and its distill-only steps first.
  log = []

  class Flag:
    def __float__(self):
      log.append("read")
      return 0.0

  def train_step(state, memory, replay, batch, warm, previous_nonfinite=0.0):
    del batch, warm, previous_nonfinite
    log.append("train")
    return state, memory, replay, {"nonfinite": Flag()}

  def replay_distill_steps(state, replay, num_steps):
    del replay
    log.append(f"distill x{num_steps}")
    return state, {"nonfinite": np.asarray([Flag()] * num_steps)}

  learner = fake_learner()[0]._replace(
      train_step=train_step, replay_distill_steps=replay_distill_steps)
  driver = serial_driver(
      learner, train_config(distill_steps_per_rl_step=4.0), jax.devices()[0],
      initial_state())
  driver.train(unroll([0, 1], [0, 0]))
  # Only the first batch waits for its combined step: distilling needs the
  # rows that step writes into the (empty) replay.
  assert log == ["train", "read", "distill x4"] + ["read"] * 5
  log.clear()
  result = driver.train(unroll([0, 1], [1, 1]))
  assert log == ["train", "distill x4"] + ["read"] * 5
  assert result.applied and result.distill_steps == 4


def test_cached_memory_goes_warm_after_each_streams_previous_unroll():
  learner, calls = fake_learner(uses_memory=True)
  driver = serial_driver(
      learner, train_config(distill_steps_per_rl_step=0.0, envs_per_actor=2),
      jax.devices()[0], initial_state())
  for k in range(3):
    driver.train(unroll([0, 1], [k, k]))
  driver.train(unroll([0, 1], [0, 4]))   # a restart and a gap: cold
  driver.train(unroll([0, 1], [1, 5]))
  assert calls["warm"] == [False, True, True, False, True]
  counters = driver.counters()
  assert (counters.warm_steps, counters.cold_steps) == (3, 2)
