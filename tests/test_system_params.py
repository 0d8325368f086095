"""ParamsSlot: versions, non-blocking reads, waiting, thread safety."""
import threading

import jax.numpy as jnp
import numpy as np
import pytest

from ald_jax.system import params as params_lib


def test_versions_and_get_if_newer():
  slot = params_lib.ParamsSlot()
  assert slot.version == 0 and slot.get() == (0, None)
  assert slot.get_if_newer(0) is None
  assert slot.publish({"w": np.ones(2)}) == 1
  version, params = slot.get_if_newer(0)
  assert version == 1
  np.testing.assert_array_equal(params["w"], np.ones(2))
  assert slot.get_if_newer(1) is None
  assert slot.publish({"w": np.zeros(2)}) == 2
  # Latest only: a reader that knew v0 jumps straight to v2.
  version, params = slot.get_if_newer(0)
  assert version == 2 and not params["w"].any()


def test_publish_copies_to_host():
  slot = params_lib.ParamsSlot()
  source = {"w": np.arange(3.0), "b": jnp.ones(2)}
  slot.publish(source)
  source["w"][:] = -1.0  # the publisher keeps mutating its arrays
  _, params = slot.get()
  np.testing.assert_array_equal(params["w"], [0.0, 1.0, 2.0])
  assert isinstance(params["b"], np.ndarray)


def test_wait_for_first_returns_after_publish_from_another_thread():
  slot = params_lib.ParamsSlot()
  timer = threading.Timer(0.05, lambda: slot.publish({"w": np.ones(1)}))
  timer.start()
  version, params = slot.wait_for_first(timeout=10.0)
  timer.join()
  assert version == 1 and params["w"][0] == 1.0


def test_wait_for_first_timeout_and_stop():
  slot = params_lib.ParamsSlot()
  with pytest.raises(TimeoutError):
    slot.wait_for_first(timeout=0.05, poll_s=0.01)
  stop = threading.Event()
  threading.Timer(0.05, stop.set).start()
  assert slot.wait_for_first(timeout=None, stop_event=stop, poll_s=0.01) is None


def test_concurrent_publishers_and_readers_stay_consistent():
  slot = params_lib.ParamsSlot()
  per_thread, publishers = 200, 3
  problems = []
  done = threading.Event()

  def publish(tid):
    for i in range(per_thread):
      slot.publish({"id": np.array([tid, i])}, copy_to_host=False)

  def read():
    known = 0
    while not done.is_set():
      got = slot.get_if_newer(known)
      if got is None:
        continue
      version, params = got
      if version <= known or params is None:
        problems.append((known, version))
      known = version

  readers = [threading.Thread(target=read) for _ in range(2)]
  writers = [threading.Thread(target=publish, args=(t,))
             for t in range(publishers)]
  for t in readers + writers:
    t.start()
  for t in writers:
    t.join()
  done.set()
  for t in readers:
    t.join()
  assert not problems
  assert slot.version == per_thread * publishers
  # The slot's params are the last publish of some thread.
  _, params = slot.get()
  assert params["id"][1] == per_thread - 1


def test_publish_under_a_given_version():
  slot = params_lib.ParamsSlot()
  assert slot.publish({"w": np.ones(2)}, version=5) == 5
  assert slot.get_if_newer(4)[0] == 5
  assert slot.publish({"w": np.ones(2)}) == 6
  with pytest.raises(ValueError, match="not newer"):
    slot.publish({"w": np.ones(2)}, version=6)


class RecordingPool:
  """Keeps what `Publisher` hands over, numbering versions like a slot."""

  def __init__(self):
    self.received = []

  @property
  def params_version(self):
    return len(self.received)

  def start(self, params):
    self.publish(params)

  def publish(self, params):
    self.received.append(params)
    return len(self.received)


class FakeClock:
  def __init__(self):
    self.now = 0.0

  def __call__(self):
    return self.now


def learner_params(value):
  return lambda: {"w": jnp.full(3, float(value()))}


def test_publisher_hands_over_host_arrays_every_k_steps():
  pool, step = RecordingPool(), [0]
  publisher = params_lib.Publisher(pool, learner_params(lambda: step[0]),
                                   every_steps=3)
  pool.start(publisher.start())
  publisher.started(pool.params_version)
  for _ in range(10):
    step[0] += 1
    publisher.step()
  publisher.poll()
  assert all(isinstance(p["w"], np.ndarray) for p in pool.received)
  # Versions 1 (start), then the copies made at steps 3, 6, 9.
  assert [float(p["w"][0]) for p in pool.received] == [0.0, 3.0, 6.0, 9.0]
  assert len(pool.received) - 1 <= 10 // 3
  assert publisher.age_steps(pool.params_version) == 1  # made at 9, now 10
  assert publisher.age_steps(1) == 10


def test_publisher_waits_out_its_minimum_interval():
  pool, clock = RecordingPool(), FakeClock()
  publisher = params_lib.Publisher(pool, learner_params(lambda: clock.now),
                                   every_steps=1, min_interval_s=0.05,
                                   clock=clock)
  pool.start(publisher.start())
  for _ in range(10):  # 10 steps 10 ms apart: one copy per 50 ms
    clock.now = round(clock.now + 0.01, 6)
    publisher.step()
  publisher.poll()
  assert [round(float(p["w"][0]), 2) for p in pool.received] == [
      0.0, 0.05, 0.1]


def test_publisher_never_waits_for_a_copy_in_flight():
  """A copy whose transfer is not done stays in flight; no second copy
  starts meanwhile, and the next step or poll publishes it."""

  class Pending:
    ready = False

    def copy_to_host_async(self):
      pass

    def is_ready(self):
      return Pending.ready

    def __array__(self, dtype=None, copy=None):
      return np.ones(2)

  pool, copies = RecordingPool(), []

  def copy_params():
    copies.append(Pending())
    return {"w": copies[-1]}

  publisher = params_lib.Publisher(pool, copy_params, every_steps=1)
  publisher.step()
  publisher.step()
  assert len(copies) == 1 and not pool.received
  Pending.ready = True
  assert publisher.poll()
  np.testing.assert_array_equal(pool.received[0]["w"], np.ones(2))
  publisher.step()
  assert len(copies) == 2
