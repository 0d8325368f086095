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
