"""The learner loop never waits unboundedly: with no unroll ever arriving,
the wall-time limit, reports and checkpoints still run (fakes; no JAX)."""
import threading

import pytest

from ald_jax import config as config_lib
from ald_jax.system import learner_driver as driver_lib
from ald_jax.system import loop as loop_lib


class SilentPool:
  """A pool whose actors never deliver: each poll waits its full timeout."""

  num_streams = 8
  params_version = 1
  queue_size = 0

  def __init__(self):
    self.polls = 0
    self._nothing = threading.Event()  # never set

  def env_steps(self):
    return 40

  def get_unroll(self, timeout_s):
    assert 0 < timeout_s <= 1.0, timeout_s  # a bounded wait
    self.polls += 1
    self._nothing.wait(timeout_s)
    return None

  def check(self):
    pass

  def stats(self):
    return {"env_steps": self.env_steps()}

  def drain_episodes(self):
    return []

  def publish(self, params):
    raise AssertionError("nothing was trained, nothing to publish")


class IdleDriver:
  """A learner side that was never given a batch."""

  device = None  # no device: its memory is not in the rows

  def counters(self):
    return driver_lib.DriverCounters(
        **{name: 0 for name in driver_lib.DriverCounters._fields})

  def metrics(self):
    return {}

  def checkpoint_metadata(self):
    return self.counters()._asdict()

  def host_state(self):
    return {"w": 0.0}

  def train(self, batch):
    raise AssertionError("no batch ever came")

  def actor_params(self):
    raise AssertionError("nothing was trained, nothing to publish")


@pytest.mark.timeout(60)
def test_wall_time_reports_and_checkpoints_run_while_no_unroll_comes():
  config = config_lib.TrainConfig(
      total_env_steps=10**8, max_wall_time_s=1.0, report_interval_s=1e-9,
      checkpoint_interval_s=1e-9)
  pool, rows, saves = SilentPool(), [], []
  loop = loop_lib.LearnerLoop(
      config, pool, IdleDriver(), write_row=rows.append,
      save_checkpoint=lambda step, state, meta: saves.append((step, meta)),
      poll_s=0.1)
  assert loop.run() == "wall_time"
  assert pool.polls >= 1
  # One report and one checkpoint after every empty poll.
  assert len(rows) == len(saves) == pool.polls
  assert all(row["env_steps"] == 40 and row["learner_steps"] == 0
             for row in rows)
  assert all(step == 0 and meta["env_steps"] == 40 for step, meta in saves)
  # Every row carries the process's resident memory (this is Linux).
  assert all(row["rss_mb"] > 10 for row in rows)
  assert all("device_memory_mb" not in row for row in rows)


@pytest.mark.timeout(60)
def test_a_stop_request_from_another_thread_ends_the_wait():
  config = config_lib.TrainConfig(total_env_steps=10**8)  # no wall-time limit
  pool = SilentPool()
  loop = loop_lib.LearnerLoop(
      config, pool, IdleDriver(), write_row=lambda row: None,
      save_checkpoint=lambda *args: None, poll_s=0.1)
  original = pool.get_unroll
  stopper = threading.Thread(target=loop.request_stop,
                             args=("signal:SIGTERM",))

  def get_unroll(timeout_s):
    if pool.polls == 3:  # as a signal handler would, mid-wait
      stopper.start()
    return original(timeout_s)
  pool.get_unroll = get_unroll
  assert loop.run() == "signal:SIGTERM"
  stopper.join()
  assert pool.polls >= 4
