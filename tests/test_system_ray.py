"""Actor processes with Ray (`actors="ray"`): few, small runs (Ray starts
slowly on 2 cores). Skipped where Ray is not installed. The ActorGroup that a
Ray process runs is tested without Ray in test_system_processes.py."""
import dataclasses
import os
import signal
import threading
import time

import numpy as np
import pytest

ray = pytest.importorskip("ray")

from ald_jax import metrics as metrics_lib  # pylint: disable=wrong-import-position
from ald_jax.system import actor_group  # pylint: disable=wrong-import-position
from ald_jax.system import affinity  # pylint: disable=wrong-import-position
from ald_jax.system import errors  # pylint: disable=wrong-import-position
from ald_jax.system import liveness  # pylint: disable=wrong-import-position
from ald_jax.system import ray_pool  # pylint: disable=wrong-import-position
from ald_jax.system import run  # pylint: disable=wrong-import-position

from test_system_processes import RowHook, group_spec  # pylint: disable=wrong-import-order,wrong-import-position
from helpers import jump_clock_when, tiny_run  # pylint: disable=wrong-import-order,wrong-import-position

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"


def process_run(tmp_path, **changes):
  # No learner-actor evaluation here: it builds environments in the learner's
  # process (a hanging test environment would hang it too); it has its own
  # tests in test_system_eval.py.
  changes = {"eval_interval_s": 0.0, **changes}
  return tiny_run(tmp_path, agent="lstm", actors="ray",
                  report_interval_s=1.0, **changes)


@pytest.mark.timeout(300)
def test_processes_act_get_params_are_trained_on_and_shut_down(
    tmp_path, monkeypatch):
  seen_threads = []
  ray_processes = {}  # pid -> kind: the local Ray's raylet, GCS, ...

  def look(pool, row):
    seen_threads.append([t.name for t in threading.enumerate()])
    node = ray._private.worker._global_node  # pylint: disable=protected-access
    ray_processes.update({p.pid: kind for kind, p in node.live_processes()})

  hook = RowHook(monkeypatch, look)
  # A budget several batches long: with 1500 steps one process could reach
  # it before the other's first unroll is trained on (a slow process start).
  result = run.train(process_run(tmp_path, total_env_steps=6000))
  assert result.stopped_by == "budget"
  # The learner's process ran no actor thread while the processes acted.
  assert seen_threads
  assert not [n for names in seen_threads for n in names
              if n.startswith("actor-")]
  row = result.final_row
  for i in range(2):
    # Unrolls from every process reached the learner and were trained on,
    # and every process acted with a version published after the first.
    assert row[f"process{i}_unrolls"] == row[f"actor{i}_unrolls"] > 0, row
    assert row[f"actor{i}_trained_rows"] > 0, row
    assert row[f"actor{i}_params_version"] > 1, row
    assert row[f"process{i}_restarts"] == 0
  assert row["learner_steps"] > 0 and row["t_actor_count"] > 0
  assert row["actor_restarts"] == 0
  # Each process's threads were pinned to the cores assigned to them.
  spec = hook.pools[0]._spec  # pylint: disable=protected-access
  assert [s.last.stats[0].affinity for s in hook.pools[0]._slots  # pylint: disable=protected-access
         ] == spec.cores[:2]
  # Nothing left: the run started Ray and shut it down, processes are gone.
  assert not ray.is_initialized()
  pids = hook.pools[0].actor_pids()
  assert len(pids) == 2 and not [p for p in pids if liveness.process_alive(p)]
  assert "raylet" in ray_processes.values(), ray_processes
  left = {pid: kind for pid, kind in ray_processes.items()
          if liveness.process_alive(pid)}
  assert not left, f"Ray processes left after the run: {left}"


@pytest.mark.timeout(300)
def test_killed_process_restarts_then_the_limit_stops_the_run(
    tmp_path, monkeypatch):
  killed = []

  def kill_one(pool, row):
    # Kill actor 0's current process once per incarnation: the first kill
    # is restarted (max_actor_restarts=1), the second ends the run.
    slot = pool._slots[0]  # pylint: disable=protected-access
    if slot.last is not None and slot.last.pid not in killed:
      killed.append(slot.last.pid)
      os.kill(slot.last.pid, signal.SIGKILL)

  RowHook(monkeypatch, kill_one)
  config = process_run(tmp_path, total_env_steps=10**8, max_actor_restarts=1)
  with pytest.raises(errors.ActorRestartLimitError,
                     match=r"actor process 0 \(actor 0\) failed .* "
                     r"--max_actor_restarts=1; its last failure: process died"):
    run.train(config)
  assert len(killed) == 2
  rows = metrics_lib.read_metrics(tmp_path)
  assert max(r.get("actor_restarts", 0) for r in rows) == 1
  assert max(r.get("process0_restarts", 0) for r in rows) == 1
  assert max(r.get("process1_restarts", 0) for r in rows) == 0
  assert not ray.is_initialized()


class HangingIMaze:
  """Factory of I-Maze environments that block forever after 20 steps
  (pickled by value: actor processes cannot import this test module). With
  `marker_dir`, a hanging environment first creates `hung.<pid>` there."""

  def __init__(self, marker_dir: str = ""):
    self.marker_dir = marker_dir

  def __call__(self, seed):
    import threading as threading_lib  # pylint: disable=import-outside-toplevel,reimported
    from ald_jax.envs import imaze  # pylint: disable=import-outside-toplevel
    marker_dir = self.marker_dir

    class Env(imaze.IMaze):
      steps = 0

      def step(self, action):
        self.steps += 1
        if self.steps > 20:
          if marker_dir:
            open(os.path.join(marker_dir, f"hung.{os.getpid()}"), "w").close()
          threading_lib.Event().wait()  # hangs
        return super().step(action)
    return Env(seed=seed)


@pytest.mark.timeout(300)
def test_stalled_process_is_restarted_then_the_limit_stops_the_run(tmp_path):
  import sys  # pylint: disable=import-outside-toplevel
  from ray import cloudpickle  # pylint: disable=import-outside-toplevel
  cloudpickle.register_pickle_by_value(sys.modules[__name__])
  config = process_run(tmp_path, total_env_steps=10**8, actor_stall_s=3.0,
                       max_actor_restarts=1)
  with pytest.raises(errors.ActorRestartLimitError,
                     match=r"its last failure: stalled: actor [01] made no "
                     r"environment step"):
    run.train(config, env_factory=HangingIMaze())
  assert not ray.is_initialized()


@pytest.mark.timeout(300)
def test_hanging_env_in_processes_stops_at_the_wall_time_limit_leaving_nothing(
    tmp_path, monkeypatch):
  """No stall limit: the run stops at its wall-time limit although the actor
  processes hang in their environments, and no process is left running.

  The loop's clock jumps past the limit once both actor processes have a
  hung environment, so the limit falls while every actor hangs whatever the
  machine's speed (jumping at the first one let a slow second process
  start after the stop: 1 pid seen instead of 2, once in CI). It also waits
  until the pool has both pids: it learns a pid from the process's first
  poll reply (replies keep coming while the actor threads hang), and a
  clean-clone CI once stopped before any reply came (0 pids seen)."""
  import sys  # pylint: disable=import-outside-toplevel
  from ray import cloudpickle  # pylint: disable=import-outside-toplevel
  cloudpickle.register_pickle_by_value(sys.modules[__name__])
  hook = RowHook(monkeypatch, lambda pool, row: None)
  markers = tmp_path / "hung"
  markers.mkdir()
  limit_s = 3600.0
  jump_clock_when(monkeypatch, limit_s,
                  lambda: len(os.listdir(markers)) >= 2 and hook.pools and
                  len(hook.pools[0].actor_pids()) >= 2)
  config = process_run(tmp_path / "run", total_env_steps=10**8,
                       actor_stall_s=0.0, max_wall_time_s=limit_s)
  result = run.train(config, env_factory=HangingIMaze(str(markers)))
  assert result.stopped_by == "wall_time"
  assert result.stuck_actors == ()  # hung processes are killed
  pids = hook.pools[0].actor_pids()
  assert len(pids) == 2 and not [p for p in pids if liveness.process_alive(p)]
  assert not ray.is_initialized()


def test_one_process_runs_two_pinned_threads_as_one_unit(tmp_path,
                                                        monkeypatch):
  """threads_per_actor_process=2: one Ray actor process (2 CPUs) hosts actors
  0 and 1; both threads' unrolls are trained on and add up to the process's
  counters; each thread is pinned to its own assigned cores."""
  seen = []
  hook = RowHook(monkeypatch, lambda pool, row: seen.append(
      [t.name for t in threading.enumerate()]))
  result = run.train(process_run(tmp_path, threads_per_actor_process=2))
  assert result.stopped_by == "budget"
  assert seen and not [n for names in seen for n in names
                       if n.startswith("actor-")]
  row = result.final_row
  assert "process1_unrolls" not in row  # one process
  assert row["process0_unrolls"] == row["actor0_unrolls"] + row[
      "actor1_unrolls"]
  for i in range(2):
    assert row[f"actor{i}_unrolls"] > 0 and row[f"actor{i}_trained_rows"] > 0
    assert row[f"actor{i}_params_version"] > 1, row
  assert row["process0_env_steps"] == row["env_steps"] >= 1500
  pool = hook.pools[0]
  slot = pool._slots[0]  # pylint: disable=protected-access
  assert slot.actor_ids == [0, 1] and len(pool.actor_pids()) == 1
  spec_cores = pool._spec.cores  # pylint: disable=protected-access
  pinned = [stats.affinity for stats in slot.last.stats]
  assert pinned == spec_cores[:2]  # as assigned, seen inside each thread
  if not affinity.assign_cores(2, reserve_for_learner=1).shared:
    assert not pinned[0] & pinned[1]  # distinct cores (needs >= 3 cores)
  assert not ray.is_initialized()
  assert not [p for p in pool.actor_pids() if liveness.process_alive(p)]


class ExplodingIMaze:
  """I-Maze environments that raise after 30 steps (pickled by value)."""

  def __call__(self, seed):
    from ald_jax.envs import imaze  # pylint: disable=import-outside-toplevel

    class Env(imaze.IMaze):
      steps = 0

      def step(self, action):
        self.steps += 1
        if self.steps > 30:
          raise RuntimeError("env exploded")
        return super().step(action)
    return Env(seed=seed)


@pytest.mark.timeout(300)
def test_env_error_in_one_thread_stops_the_run_naming_process_and_actor(
    tmp_path):
  import sys  # pylint: disable=import-outside-toplevel
  from ray import cloudpickle  # pylint: disable=import-outside-toplevel
  cloudpickle.register_pickle_by_value(sys.modules[__name__])
  config = process_run(tmp_path, total_env_steps=10**8,
                       threads_per_actor_process=2)
  with pytest.raises(errors.RunError,
                     match=r"error in actor process 0 \(actors 0-1\), pid "
                     r"\d+: actor [01]: RuntimeError: env exploded"):
    run.train(config, env_factory=ExplodingIMaze())
  rows = metrics_lib.read_metrics(tmp_path)
  assert rows[-1]["stopped_by"] == "error"
  # The stop sequence still wrote the final checkpoint.
  assert any(name.isdigit() for name in
             os.listdir(os.path.join(tmp_path, run.CHECKPOINT_DIR)))
  assert not ray.is_initialized()


@pytest.mark.slow  # a 3-node cluster; kill -9 restarts are in make test above
@pytest.mark.timeout(400)
def test_cluster_killed_actor_process_restarts_and_the_run_finishes(
    tmp_path, monkeypatch):
  """A head without CPUs plus two 1-CPU worker nodes: actor process 0 is
  killed (kill -9) mid-run, restarted on a worker, its new incarnation sends
  unrolls again, and the run then finishes normally."""
  from ray import cluster_utils  # pylint: disable=import-outside-toplevel
  killed = []

  def kill_then_finish(pool, row, loop):
    slot = pool._slots[0]  # pylint: disable=protected-access
    if slot.last is None:
      return
    if not killed:
      killed.append((slot.last.pid, row["process0_env_steps"]))
      os.kill(slot.last.pid, signal.SIGKILL)
    elif slot.last.pid != killed[0][0] and sum(
        s.unrolls for s in slot.last.stats) > 0:
      loop.request_stop("restarted_process_acted")

  hook = RowHook(monkeypatch, kill_then_finish, with_loop=True)
  cluster = cluster_utils.Cluster(
      initialize_head=True, head_node_args={"num_cpus": 0})
  workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
  cluster.wait_for_nodes()
  try:
    config = process_run(tmp_path, ray_address=cluster.address,
                         total_env_steps=10**8, max_actor_restarts=1)
    result = run.train(config)
    pool = hook.pools[0]
    placed = pool.actor_node_ids()
  finally:
    if ray.is_initialized():
      ray.shutdown()
    cluster.shutdown()
  assert result.stopped_by == "restarted_process_acted"
  row = result.final_row
  assert row["actor_restarts"] == row["process0_restarts"] == 1
  assert row["process1_restarts"] == 0
  slot = pool._slots[0]  # pylint: disable=protected-access
  assert len(slot.pids) == 2 and slot.pids[0] == killed[0][0]
  # Env steps of the killed incarnation are kept; the new one added more.
  assert row["process0_env_steps"] > killed[0][1]
  assert placed and placed <= {w.node_id for w in workers}
  # On a cluster a process pins its thread to one core of its own affinity.
  available = set(affinity.available_cores() or [])
  for s in pool._slots:  # pylint: disable=protected-access
    for stats in s.last.stats:
      assert stats.affinity is not None and len(stats.affinity) == 1
      assert stats.affinity <= available


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_cluster_actors_on_worker_nodes_only_learn_imaze(tmp_path, monkeypatch):
  """A head (no CPUs for actors) plus two CPU worker nodes on this machine:
  the actor processes land on the workers and ALD learns I-Maze (N=4)."""
  from ray import cluster_utils  # pylint: disable=import-outside-toplevel
  import test_system_run  # pylint: disable=import-outside-toplevel
  cluster = cluster_utils.Cluster(
      initialize_head=True, head_node_args={"num_cpus": 0})
  workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
  cluster.wait_for_nodes()
  hook = RowHook(monkeypatch, lambda pool, row: None)
  try:
    learns = test_system_run.learning_config(tmp_path)
    config = dataclasses.replace(learns, actors="ray",
                                 ray_address=cluster.address)
    result = run.train(config)
    placed = hook.pools[0].actor_node_ids()
  finally:
    if ray.is_initialized():
      ray.shutdown()
    cluster.shutdown()
  assert placed and placed <= {w.node_id for w in workers}
  assert result.final_row["success_rate"] >= 0.9, result.final_row


class FakeRay:
  """The few calls RayActorPool makes, over plain objects: `ready` refs are
  answered (their value or exception in `values`), the rest pending."""

  exceptions = ray.exceptions

  def __init__(self):
    self.ready, self.values = set(), {}

  def wait(self, refs, num_returns=1, timeout=None):
    del num_returns, timeout
    return ([r for r in refs if r in self.ready],
            [r for r in refs if r not in self.ready])

  def get(self, ref):
    value = self.values[ref]
    if isinstance(value, BaseException):
      raise value
    return value

  def kill(self, handle, no_restart=True):
    del handle, no_restart


def _unit_pool(monkeypatch, num_processes=2, **changes):
  """A RayActorPool with FakeRay and no processes; `_launch` only records."""
  pool = ray_pool.RayActorPool.__new__(ray_pool.RayActorPool)
  pool._config = dataclasses.replace(tiny_run("unused"), **changes)  # pylint: disable=protected-access
  pool._ray = FakeRay()  # pylint: disable=protected-access
  pool._stop_error = None  # pylint: disable=protected-access
  pool._slots = [actor_group.ProcessSlot(p, [p]) for p in range(num_processes)]  # pylint: disable=protected-access
  pool.launched = []
  monkeypatch.setattr(pool, "_launch", pool.launched.append)
  return pool


def test_an_unresponsive_process_is_restarted_after_actor_stall_s(monkeypatch):
  """`check()`: a poll outstanding longer than actor_stall_s restarts a
  process that has answered before (a live one answers within POLL_S); one
  still starting (no answer yet) gets STARTUP_GRACE_S more; a reply that is
  ready but not collected yet (the learner was busy) is no stall."""
  pool = _unit_pool(monkeypatch, num_processes=3, actor_stall_s=5.0)
  answered, starting, busy_learner = pool._slots  # pylint: disable=protected-access
  answered.last = busy_learner.last = object()
  restarted = []
  monkeypatch.setattr(pool, "_restart",
                      lambda slot, why: restarted.append((slot.process_id,
                                                          why)))
  for slot in pool._slots:  # pylint: disable=protected-access
    slot.pending, slot.pending_since = object(), time.monotonic() - 10.0
  pool._ray.ready.add(busy_learner.pending)  # pylint: disable=protected-access
  pool.check()
  assert [p for p, _ in restarted] == [0]
  assert "unresponsive for 10 s (--actor_stall_s=5)" in restarted[0][1]
  starting.pending_since = time.monotonic() - (
      5.0 + ray_pool.STARTUP_GRACE_S + 10.0)
  answered.pending_since = time.monotonic()
  pool.check()
  assert [p for p, _ in restarted] == [0, 1]


def test_a_dead_process_is_restarted_with_its_cause_and_polled_once(
    monkeypatch):
  """A process that died (here in its start-up) is relaunched once (its new
  poll comes from the launch, not a second one after it), and the restart
  limit's error keeps Ray's message, which holds the cause."""
  pool = _unit_pool(monkeypatch, num_processes=1, max_actor_restarts=1)
  slot = pool._slots[0]  # pylint: disable=protected-access
  polls = []
  monkeypatch.setattr(pool, "_poll", polls.append)

  def die():
    slot.pending = object()
    pool._ray.ready.add(slot.pending)  # pylint: disable=protected-access
    pool._ray.values[slot.pending] = ray.exceptions.RayActorError(  # pylint: disable=protected-access
        error_msg="\x1b[36mray::_ActorProcess.__init__()\x1b[39m "
        "ModuleNotFoundError: No module named 'my_env'")

  die()
  pool._collect(0.0)  # pylint: disable=protected-access
  assert pool.launched == [slot] and not polls
  die()
  with pytest.raises(errors.ActorRestartLimitError,
                     match=r"process died: RayActorError: "
                     r"ray::_ActorProcess.__init__\(\) ModuleNotFoundError: "
                     r"No module named 'my_env'"):
    pool._collect(0.0)  # pylint: disable=protected-access


@pytest.mark.parametrize("queue_capacity, per_thread", [(8, 4), (1, 1)])
def test_queue_capacity_is_split_over_the_actor_threads(queue_capacity,
                                                       per_thread):
  config = dataclasses.replace(process_run("unused"),
                               queue_capacity=queue_capacity)
  pool = run._make_pool(config, group_spec(lambda i: None, num_actors=2))  # pylint: disable=protected-access
  assert pool._queue_capacity == per_thread  # pylint: disable=protected-access


def test_a_stalled_reply_restarts_its_process_which_is_polled_once(
    monkeypatch):
  """A reply whose thread made no env step for actor_stall_s restarts the
  process; its new poll is the launch's (a second one would drop the new
  process's first reply)."""
  pool = _unit_pool(monkeypatch, num_processes=1, actor_stall_s=5.0)
  pool._spec = group_spec(lambda i: None, num_actors=1)  # pylint: disable=protected-access
  pool._actor_unrolls, pool._ready, pool._episodes = [0], [], []  # pylint: disable=protected-access
  slot = pool._slots[0]  # pylint: disable=protected-access
  polls = []
  monkeypatch.setattr(pool, "_poll", polls.append)
  slot.pending = object()
  pool._ray.ready.add(slot.pending)  # pylint: disable=protected-access
  pool._ray.values[slot.pending] = actor_group.PollReply(  # pylint: disable=protected-access
      [], [], [], None, [9.0], None, None, 4242, "")
  pool._collect(0.0)  # pylint: disable=protected-access
  assert pool.launched == [slot] and not polls
  assert "stalled: actor 0 made no environment step for 9.0 s" in (
      slot.last_failure)


def test_an_error_in_the_replies_left_at_stop_is_raised_after_stop(
    monkeypatch):
  """A process's pending poll reply is answered before its stop call: an
  actor error in it (the run ending meanwhile on its budget) is raised by
  `raise_error` after `stop`, naming the process and actor."""
  pool = _unit_pool(monkeypatch, num_processes=2)
  pool._connected = pool._started_ray = False  # pylint: disable=protected-access
  quiet, failed = pool._slots  # pylint: disable=protected-access
  fake = pool._ray  # pylint: disable=protected-access

  class Handle:
    class stop:  # pylint: disable=invalid-name
      @staticmethod
      def remote(timeout_s):
        del timeout_s
        ref = object()
        fake.ready.add(ref)
        fake.values[ref] = True
        return ref

  for slot in pool._slots:  # pylint: disable=protected-access
    slot.handle, slot.pending = Handle(), object()
  fake.ready.add(failed.pending)
  fake.values[failed.pending] = actor_group.PollReply(
      [], [], [], None, [0.0], "actor 1: RuntimeError: env exploded",
      "Traceback ...", 4242, "")
  pool.raise_error()  # nothing found before stop
  assert pool.stop(1.0) == []
  with pytest.raises(errors.RunError,
                     match=r"actor process 1 \(actor 1\), pid 4242: actor 1: "
                     "RuntimeError: env exploded"):
    pool.raise_error()


def test_a_version_is_put_into_ray_only_when_a_process_behind_polls(
    monkeypatch):
  """Publishing puts nothing; a poll of a process that is behind puts the
  newest version once (shared by every process polling for it) and passes
  its reference; a process that has it gets no reference."""
  pool = _unit_pool(monkeypatch, num_processes=2)
  puts, calls = [], []
  pool._ray.put = lambda value: puts.append(value) or f"ref{len(puts)}"  # pylint: disable=protected-access

  class Handle:
    def __init__(self, name):
      self.poll = self
      self.name = name

    def remote(self, version, refs, with_latency):
      del with_latency
      calls.append((self.name, version, refs[0]))
      return object()

  for slot in pool._slots:  # pylint: disable=protected-access
    slot.handle = Handle(slot.process_id)
  pool._params = pool._params_ref = None  # pylint: disable=protected-access
  pool._sent_version, pool.params_put = {}, 0  # pylint: disable=protected-access
  pool._want_latency, pool.params_version = False, 0  # pylint: disable=protected-access
  for value in range(5):
    pool.publish({"w": np.full(2, value)})
  assert puts == []
  first, second = pool._slots  # pylint: disable=protected-access
  pool._poll(first)  # pylint: disable=protected-access
  pool._poll(second)  # pylint: disable=protected-access
  pool._poll(first)  # pylint: disable=protected-access
  pool.publish({"w": np.full(2, 5)})
  pool._poll(second)  # pylint: disable=protected-access
  assert len(puts) == pool.params_put == 2
  np.testing.assert_array_equal(puts[0]["w"], [4, 4])
  assert calls == [(0, 5, "ref1"), (1, 5, "ref1"), (0, 5, None),
                   (1, 6, "ref2")]
