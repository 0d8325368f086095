"""Actor processes on one host without Ray (`actors="processes"`,
system/process_pool.py): the ActorGroup a process runs, the parameter rule,
the fault rules on fakes, and a few small real runs."""
import dataclasses
import functools
import multiprocessing
import os
import pickle
import signal
import subprocess
import sys
import threading
import time

import pytest

from ald_jax import config as config_lib
from ald_jax import metrics as metrics_lib
from ald_jax.envs import imaze
from ald_jax.envs import registry
from ald_jax.system import actor_group
from ald_jax.system import affinity
from ald_jax.system import errors
from ald_jax.system import liveness
from ald_jax.system import loop as loop_lib
from ald_jax.system import pool as pool_lib
from ald_jax.system import process_pool
from ald_jax.system import run

import process_envs  # pylint: disable=wrong-import-order
from test_system_actor import FAKE_CORE, CounterEnv, JOIN_S, _params  # pylint: disable=wrong-import-order
from helpers import jump_clock_when, tiny_run  # pylint: disable=wrong-import-order


def process_run(tmp_path, **changes):
  # No learner-actor evaluation: it builds environments in the learner's
  # process (a hanging test environment would hang it too).
  changes = {"eval_interval_s": 0.0, **changes}
  return tiny_run(tmp_path, agent="lstm", actors="processes",
                  report_interval_s=1.0, **changes)


class RowHook:
  """Wraps LearnerLoop.row to look at the running system at each report:
  calls on_row(pool, row) (or on_row(pool, row, loop) with with_loop)."""

  def __init__(self, monkeypatch, on_row, with_loop=False):
    original = loop_lib.LearnerLoop.row
    self.pools = []

    def row(loop, stopped_by=""):
      pool = loop._pool  # pylint: disable=protected-access
      if pool not in self.pools:
        self.pools.append(pool)
      result = original(loop, stopped_by)
      if not stopped_by:
        if with_loop:
          on_row(pool, result, loop)
        else:
          on_row(pool, result)
      return result
    monkeypatch.setattr(loop_lib.LearnerLoop, "row", row)


def is_zombie(pid: int) -> bool:
  try:
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
      return f.read().rsplit(")", 1)[1].split()[0] == "Z"
  except OSError:
    return False


def no_process_left(pool) -> None:
  """Every actor process the pool started is gone and reaped (looked at
  before anything here asks multiprocessing, which would reap them)."""
  pids = pool.actor_pids()
  assert pids and not [p for p in pids if is_zombie(p)]
  assert not [p for p in pids if liveness.process_alive(p)]
  assert not multiprocessing.active_children()



# ---- the process side: ActorGroup (no process) ------------------------------

def group_spec(make_env, num_actors=4, envs=2) -> pool_lib.ActorSpec:
  return pool_lib.ActorSpec(
      make_env=make_env, core=FAKE_CORE, num_actors=num_actors,
      envs_per_actor=envs, unroll_length=4, context_length=3,
      seed_for=lambda i: i, cores=[None] * num_actors, t_actor_budget_ms=None,
      env_info=None)


def _unrolls_until_every_actor_is_seen(group, actor_ids, envs,
                                       deadline_s=60.0):
  """Takes unrolls until each actor sent one; fails loudly after deadline_s."""
  seen = {}
  deadline = time.monotonic() + deadline_s
  while time.monotonic() < deadline:
    for unroll in group.take_unrolls(JOIN_S):
      seen.setdefault(int(unroll.stream_id[0]) // envs, []).append(unroll)
    if set(seen) == set(actor_ids):
      return seen
  raise AssertionError(f"only actors {sorted(seen)} sent unrolls")


def test_actor_group_runs_pinned_threads_with_their_actors_streams():
  """The threads of one actor process (no process here): thread k acts as actor
  actor_ids[k] with that actor's streams, pinned to its own core."""
  available = affinity.available_cores()
  cores = affinity.spread_threads(available, 2)
  group = actor_group.ActorGroup(
      [2, 3], group_spec(lambda i: CounterEnv((5, 7))), FAKE_CORE,
      seeds=[1, 2], cores=cores, queue_capacity=2, poll_s=0.02)
  group.start()
  group.publish(_params(1.0), version=4)
  try:
    seen = _unrolls_until_every_actor_is_seen(group, [2, 3], envs=2)
    reply = group.report([], with_latency=True)
  finally:
    assert group.stop(JOIN_S)
  for actor_id, unrolls in seen.items():
    assert {tuple(u.stream_id) for u in unrolls} == {
        (2 * actor_id, 2 * actor_id + 1)}
  assert [s.actor_id for s in reply.stats] == [2, 3]
  assert all(s.unrolls > 0 and s.params_version == 4 for s in reply.stats)
  assert len(reply.latency) == 2 and len(reply.idle_s) == 2
  # Pinned as assigned, seen from inside each thread.
  assert [s.affinity for s in reply.stats] == cores
  if available is not None and len(available) >= 2:
    assert cores[0] != cores[1]
  assert reply.error is None
  assert not [t for t in group.threads if t.is_alive()]


def test_actor_group_one_failing_thread_stops_the_group_naming_it():
  group = actor_group.ActorGroup(
      [0, 1], group_spec(lambda i: CounterEnv(
          (5, 7), raise_after=2 if i == 1 else None), num_actors=2),
      FAKE_CORE, seeds=[1, 2], cores=[None, None], queue_capacity=2,
      poll_s=0.02)
  group.start()
  group.publish(_params(1.0), version=1)
  # Actor 1 fails before its first unroll; actor 0 stops with it.
  for thread in group.threads:
    thread.join(JOIN_S)
  try:
    assert not [t for t in group.threads if t.is_alive()]
    reply = group.report([], with_latency=False)
    assert reply.error.startswith(
        "actor 1: RuntimeError: fake env exploded at step 2"), reply.error
    assert "in step" in reply.error_traceback
  finally:
    group.stop(JOIN_S)


def test_a_restarted_process_builds_its_envs_from_new_seeds():
  """Incarnation 0 asks make_env(i) as thread mode does; a restart asks for
  its incarnation, and the run's make_env gives those envs fresh seeds."""
  asked = []
  spec = group_spec(lambda *args: asked.append(args), num_actors=2)
  for incarnation in (0, 3):
    group = actor_group.ActorGroup([0, 1], spec, FAKE_CORE, seeds=[1, 2],
                                cores=[None, None], queue_capacity=2,
                                incarnation=incarnation)
    for thread in group.threads:
      thread._make_env()  # pylint: disable=protected-access
  assert asked == [(0,), (1,), (0, 3), (1, 3)]
  seeds = {run._actor_seed(5, 1, 0, incarnation)  # pylint: disable=protected-access
           for incarnation in range(3)}
  assert len(seeds) == 3
  assert run._actor_seed(5, 1, 0) == run._actor_seed(5, 1, 0, 0)  # pylint: disable=protected-access




# ---- what a child receives must pickle --------------------------------------


def picklable_spec(num_actors=2, envs=2) -> pool_lib.ActorSpec:
  """A spec as run.train builds it (EnvMaker, a partial for seeds)."""
  factory = registry.make_env_factory("imaze", corridor_length=4)
  return pool_lib.ActorSpec(
      make_env=run.EnvMaker(factory, envs, base_seed=5, segment=0),
      core=FAKE_CORE, num_actors=num_actors, envs_per_actor=envs,
      unroll_length=4, context_length=3,
      seed_for=functools.partial(run._seed_for_actor, 5, 0),  # pylint: disable=protected-access
      cores=[None] * num_actors, t_actor_budget_ms=None,
      env_info=None)


def test_the_runs_env_maker_pickles_and_builds_the_same_envs():
  """EnvMaker (a closure before) round-trips through pickle and seeds actor
  i's environments from _actor_seed(base, i, segment, incarnation)."""
  from ald_jax.envs import batched  # pylint: disable=import-outside-toplevel
  spec = picklable_spec()
  maker = pickle.loads(pickle.dumps(spec.make_env))
  for incarnation in (0, 2):
    env = maker(1, incarnation)
    seed = run._actor_seed(5, 1, 0, incarnation)  # pylint: disable=protected-access
    assert env._seeds == batched.derive_seeds(seed, 2)  # pylint: disable=protected-access
    env.close()
  assert maker.factory.kwargs == {"corridor_length": 4}
  assert pickle.loads(pickle.dumps(spec.seed_for))(3) == spec.seed_for(3)


def test_registry_and_gymnasium_factories_pickle():
  factory = pickle.loads(pickle.dumps(
      registry.make_env_factory("imaze", corridor_length=4)))
  assert repr(factory) == "EnvFactory('imaze', corridor_length=4)"
  factory(3).close()
  gymnasium = pytest.importorskip("gymnasium")
  del gymnasium
  from ald_jax.envs import gymnasium_adapter  # pylint: disable=import-outside-toplevel
  gym_factory = gymnasium_adapter.gymnasium_env_factory("CartPole-v1")
  again = pickle.loads(pickle.dumps(gym_factory))
  assert repr(again) == repr(gym_factory)
  again(0).close()


def _local_factory():
  def make(seed):
    return imaze.IMaze(seed=seed)
  return make


@pytest.mark.parametrize("factory, cause", [
    (lambda seed: imaze.IMaze(seed=seed), "lambda"),
    (_local_factory(), "_local_factory.<locals>.make")])
def test_an_unpicklable_factory_is_refused_naming_the_cause(factory, cause):
  spec = picklable_spec()
  spec.make_env = run.EnvMaker(factory, 2, base_seed=5, segment=0)
  config = process_run("unused")
  with pytest.raises(config_lib.ConfigError) as info:
    process_pool.LocalProcessPool(spec, config)
  message = str(info.value)
  assert message.startswith(process_pool.UNPICKLABLE_FACTORY), message
  assert cause in message, message
  # The thread pool takes the same spec.
  pool_lib.ThreadActorPool(spec, queue_capacity=2)


def test_a_run_with_an_unpicklable_factory_is_refused_before_any_work(
    tmp_path):
  built = []
  with pytest.raises(config_lib.ConfigError,
                     match=r"actors: 'processes' needs a picklable "
                     r"env_factory .*lambda"):
    run.train(process_run(tmp_path),
              env_factory=lambda seed: built.append(seed) or imaze.IMaze(
                  seed=seed))
  # Refused with the input checks: no environment was built (the probe
  # comes next), no learner compiled, no process started.
  assert not built
  assert not multiprocessing.active_children()
  assert not os.path.exists(os.path.join(tmp_path, metrics_lib.JSONL_NAME))


# ---- the learner side on fakes ----------------------------------------------


class FakeProcess:
  def __init__(self, pid=4242, exitcode=None):
    self.pid, self.exitcode = pid, exitcode
    self.killed = False

  def is_alive(self):
    return self.exitcode is None

  def kill(self):
    self.killed = True
    self.exitcode = -signal.SIGKILL

  def join(self, timeout=None):
    del timeout


class FakeConn:
  def __init__(self):
    self.inbox = []

  def poll(self):
    return bool(self.inbox)


class FakeChild:
  """The learner's end of a process: records what the pool sends."""

  def __init__(self, process=None):
    self.sent_version = 0
    self.process = process or FakeProcess()
    self.conn = FakeConn()
    self.sent = []      # decoded messages, one list per send
    self.ended = False

  def send(self, *messages):
    self.sent.append([pickle.loads(m) for m in messages])

  def receive(self):
    if not self.conn.inbox:
      return None
    message = self.conn.inbox.pop(0)
    if message is EOFError:
      raise EOFError
    return message

  def end(self):
    self.ended = True

  def params_received(self):
    """(version, params) of each poll that carried parameters."""
    return [(m[0][1], m[1]) for m in self.sent if m[0][0] == "poll" and m[0][3]]


def fake_pool(monkeypatch, num_processes=2, **changes):
  """A LocalProcessPool whose processes are FakeChilds; `_launch` records."""
  config = dataclasses.replace(process_run("unused"), **changes)
  pool = process_pool.LocalProcessPool(picklable_spec(num_processes), config)
  for slot in pool._slots:  # pylint: disable=protected-access
    slot.handle = FakeChild()
  pool.launched = []
  monkeypatch.setattr(pool, "_launch", pool.launched.append)
  return pool


def test_parameters_go_to_a_process_only_when_it_is_behind(monkeypatch):
  """publish only counts a version; a poll carries the newest parameters
  when its process is behind, pickled once per version sent; a process
  never receives a version twice."""
  pool = fake_pool(monkeypatch)
  first, second = pool._slots  # pylint: disable=protected-access
  pool.publish(_params(1.0))
  pool._poll(first)  # pylint: disable=protected-access
  pool._poll(second)  # pylint: disable=protected-access
  for scale in (2.0, 3.0, 4.0):  # publishes nobody polls in between
    pool.publish(_params(scale))
  assert pool.params_pickled == 1  # publishing pickles nothing
  pool._poll(first)  # pylint: disable=protected-access
  pool._poll(first)  # pylint: disable=protected-access  nothing newer
  pool.publish(_params(5.0))
  pool._poll(first)  # pylint: disable=protected-access
  pool._poll(second)  # pylint: disable=protected-access
  got_first = first.handle.params_received()
  got_second = second.handle.params_received()
  assert [v for v, _ in got_first] == [1, 4, 5]
  assert [v for v, _ in got_second] == [1, 5]
  assert (got_first[1][1]["w"] == _params(4.0)["w"]).all()
  assert (got_second[1][1]["w"] == _params(5.0)["w"]).all()
  # Every poll says the newest version; only those behind carried params.
  assert [m[0][1] for m in first.handle.sent] == [1, 4, 4, 5]
  assert pool.params_pickled == 3  # versions 1, 4, 5: once each
  assert pool.params_sent == {(0, 0): [1, 4, 5], (1, 0): [1, 5]}
  assert pool.params_version == 5


def test_a_dead_process_is_restarted_and_the_limit_names_it(monkeypatch):
  """A process that died (kill -9: EOF on its pipe) is ended and launched
  again, counted; the next death past max_actor_restarts is the run's
  error naming the process, its actor and the cause."""
  pool = fake_pool(monkeypatch, num_processes=1, max_actor_restarts=1)
  slot = pool._slots[0]  # pylint: disable=protected-access
  dead = slot.handle
  dead.process.exitcode = -signal.SIGKILL
  dead.conn.inbox.append(EOFError)
  pool._receive(slot)  # pylint: disable=protected-access
  assert dead.ended and pool.launched == [slot]
  assert slot.restarts == 1
  assert slot.last_failure == "process died (killed by SIGKILL, pid 4242)"
  slot.handle = FakeChild(FakeProcess(pid=4343, exitcode=1))
  with pytest.raises(errors.ActorRestartLimitError,
                     match=r"^actor process 0 \(actor 0\) failed and the run "
                     r"is past --max_actor_restarts=1; its last failure: "
                     r"process died \(exit code 1, pid 4343\)$"):
    pool._receive(slot)  # pylint: disable=protected-access


def test_a_failed_start_up_is_a_death_with_its_cause(monkeypatch):
  pool = fake_pool(monkeypatch, num_processes=1, max_actor_restarts=0)
  slot = pool._slots[0]  # pylint: disable=protected-access
  slot.handle.conn.inbox.append(
      ("failed", "ModuleNotFoundError: No module named 'my_env'",
       "Traceback (most recent call last): ..."))
  with pytest.raises(errors.ActorRestartLimitError,
                     match=r"process died in its start-up: "
                     r"ModuleNotFoundError: No module named 'my_env'"):
    pool._receive(slot)  # pylint: disable=protected-access


def test_replies_are_taken_and_an_actor_error_names_process_and_actor(
    monkeypatch):
  pool = fake_pool(monkeypatch, num_processes=2)
  quiet, failed = pool._slots  # pylint: disable=protected-access
  quiet.handle.conn.inbox.append(actor_group.PollReply(
      [], [], [], None, [0.0], None, None, 4242, ""))
  pool._receive(quiet)  # pylint: disable=protected-access
  assert quiet.last.pid == 4242 and quiet.pending  # polled again
  failed.handle.conn.inbox.append(actor_group.PollReply(
      [], [], [], None, [0.0], "actor 1: RuntimeError: env exploded",
      "Traceback ...", 4343, ""))
  with pytest.raises(errors.RunError,
                     match=r"error in actor process 1 \(actor 1\), pid 4343: "
                     "actor 1: RuntimeError: env exploded") as info:
    pool._receive(failed)  # pylint: disable=protected-access
  assert info.value.cause_traceback == "Traceback ..."


def test_an_unresponsive_process_is_restarted_after_actor_stall_s(monkeypatch):
  """`check()`: a poll outstanding longer than actor_stall_s restarts a
  process that has answered before; one still starting gets
  STARTUP_GRACE_S more; a reply that is in but not collected is no stall;
  a stalled thread in a reply restarts its process too."""
  pool = fake_pool(monkeypatch, num_processes=3, actor_stall_s=5.0)
  answered, starting, busy_learner = pool._slots  # pylint: disable=protected-access
  answered.last = busy_learner.last = actor_group.PollReply(
      [], [], [], None, [0.0], None, None, 4242, "")
  for slot in pool._slots:  # pylint: disable=protected-access
    slot.pending, slot.pending_since = True, time.monotonic() - 10.0
  busy_learner.handle.conn.inbox.append("a reply")
  pool.check()
  assert pool.launched == [answered]
  assert answered.last_failure.startswith(
      "unresponsive for 10 s (--actor_stall_s=5)")
  starting.pending_since = time.monotonic() - (
      5.0 + process_pool.STARTUP_GRACE_S + 10.0)
  answered.pending, answered.pending_since = True, time.monotonic()
  pool.check()
  assert pool.launched == [answered, starting]
  busy_learner.handle.conn.inbox[:] = [actor_group.PollReply(
      [], [], [], None, [9.0], None, None, 4242, "")]
  pool._receive(busy_learner)  # pylint: disable=protected-access
  assert pool.launched[-1] is busy_learner
  assert busy_learner.last_failure.startswith(
      "stalled: actor 2 made no environment step for 9.0 s")


# ---- liveness ---------------------------------------------------------------


def test_a_zombie_counts_as_gone():
  child = subprocess.Popen([sys.executable, "-c", "pass"])
  try:
    # Not reaped yet: a zombie once it exited.
    assert liveness.wait_for_exit([child.pid], 60.0) == []
    assert child.returncode is None and is_zombie(child.pid)
  finally:
    child.wait()
  assert not liveness.process_alive(child.pid)
  assert liveness.process_alive(os.getpid())
  assert liveness.wait_for_exit([os.getpid()], 0.0) == [os.getpid()]


# ---- real runs --------------------------------------------------------------


@pytest.mark.timeout(300)
def test_processes_act_get_params_are_trained_on_and_shut_down(
    tmp_path, monkeypatch):
  seen_threads = []
  process_cores = {}  # pid -> the affinity of the process's main thread

  def look(pool, row):
    del row
    seen_threads.append([t.name for t in threading.enumerate()])
    if hasattr(os, "sched_getaffinity"):
      for process in pool.children():
        process_cores[process.pid] = frozenset(
            os.sched_getaffinity(process.pid))

  hook = RowHook(monkeypatch, look)
  # A budget several batches long: one process could reach a short one
  # before the other's first unroll is trained on. The learner is pinned:
  # its processes must not inherit its cores.
  result = run.train(process_run(tmp_path, total_env_steps=6000,
                                 pin_learner=True))
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
  pool = hook.pools[0]
  assert isinstance(pool, process_pool.LocalProcessPool)
  # Each process's thread was pinned to the cores assigned to it.
  spec = pool._spec  # pylint: disable=protected-access
  assert [s.last.stats[0].affinity for s in pool._slots  # pylint: disable=protected-access
         ] == spec.cores[:2]
  # ... and each process's own threads (XLA's, the one answering polls) run
  # on its actors' cores, not on the pinned learner's it was started from.
  if spec.cores[0] is not None:
    assert process_cores == {
        slot.pids[0]: spec.cores[slot.actor_ids[0]]
        for slot in pool._slots}  # pylint: disable=protected-access
  # Parameters: each process got increasing versions, each at most once,
  # never more than were published.
  for versions in pool.params_sent.values():
    assert versions == sorted(set(versions)) and versions[0] == 1
    assert len(versions) <= pool.params_version
  assert max(max(v) for v in pool.params_sent.values()) > 1
  no_process_left(pool)
  assert len(pool.actor_pids()) == 2


@pytest.mark.timeout(300)
def test_a_killed_process_is_restarted_and_the_run_finishes(
    tmp_path, monkeypatch):
  """kill -9 of actor process 0 mid-run: it is restarted (counted), its new
  incarnation acts with unroll_index from 0 again, and the run then
  finishes normally."""
  killed = []
  first_unroll = {}  # pid -> unroll_index of its first unroll
  take = process_pool.LocalProcessPool._take  # pylint: disable=protected-access

  def recording_take(pool, slot, reply):
    if reply.unrolls and reply.pid not in first_unroll:
      first_unroll[reply.pid] = int(reply.unrolls[0].unroll_index[0])
    return take(pool, slot, reply)
  monkeypatch.setattr(process_pool.LocalProcessPool, "_take", recording_take)

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
  result = run.train(process_run(tmp_path, total_env_steps=10**8,
                                 max_actor_restarts=1))
  assert result.stopped_by == "restarted_process_acted"
  row = result.final_row
  assert row["actor_restarts"] == row["process0_restarts"] == 1
  assert row["process1_restarts"] == 0
  pool = hook.pools[0]
  slot = pool._slots[0]  # pylint: disable=protected-access
  assert len(slot.pids) == 2 and slot.pids[0] == killed[0][0]
  assert "killed by SIGKILL" in slot.last_failure
  # Env steps of the killed incarnation are kept; the new one added more.
  assert row["process0_env_steps"] > killed[0][1]
  assert first_unroll[slot.pids[1]] == 0
  # The new incarnation got parameters afresh, from version 1 or later.
  assert pool.params_sent[(0, 1)]
  no_process_left(pool)


@pytest.mark.timeout(300)
def test_a_hanging_env_stalls_restarts_then_the_limit_stops_the_run(
    tmp_path, monkeypatch):
  hook = RowHook(monkeypatch, lambda pool, row: None)
  markers = tmp_path / "hung"
  markers.mkdir()
  # 6 s: well above the first acting step's compile on a loaded machine,
  # which counts as no progress too (the marker check below would fail).
  config = process_run(tmp_path / "run", total_env_steps=10**8,
                       actor_stall_s=6.0, max_actor_restarts=1)
  with pytest.raises(errors.ActorRestartLimitError,
                     match=r"actor process ([01]) \(actor \1\) failed .* "
                     r"--max_actor_restarts=1; its last failure: stalled: "
                     r"actor \1 made no environment step"):
    run.train(config, env_factory=process_envs.HangingIMaze(str(markers)))
  pool = hook.pools[0]
  restarted = [s for s in pool._slots if s.restarts]  # pylint: disable=protected-access
  assert len(restarted) == 1
  # The restarted incarnation had hung in its environment (a real stall).
  assert f"hung.{restarted[0].pids[0]}" in os.listdir(markers)
  no_process_left(pool)


@pytest.mark.timeout(300)
def test_env_error_in_one_thread_stops_the_run_naming_process_and_actor(
    tmp_path, monkeypatch):
  """threads_per_actor_process=2: one process hosts actors 0 and 1; an
  exception in one thread's environment is the run's error, naming the
  process and that actor, with the child's traceback."""
  hook = RowHook(monkeypatch, lambda pool, row: None)
  config = process_run(tmp_path, total_env_steps=10**8,
                       threads_per_actor_process=2)
  with pytest.raises(errors.RunError,
                     match=r"error in actor process 0 \(actors 0-1\), pid "
                     r"\d+: actor [01]: RuntimeError: env exploded") as info:
    run.train(config, env_factory=process_envs.ExplodingIMaze())
  assert "process_envs.py" in info.value.cause_traceback
  rows = metrics_lib.read_metrics(tmp_path)
  assert rows[-1]["stopped_by"] == "error"
  # The stop sequence still wrote the final checkpoint.
  assert any(name.isdigit() for name in
             os.listdir(os.path.join(tmp_path, run.CHECKPOINT_DIR)))
  pool = hook.pools[0]
  slot, = pool._slots  # pylint: disable=protected-access
  assert slot.actor_ids == [0, 1]
  no_process_left(pool)


@pytest.mark.timeout(300)
def test_hanging_env_stops_at_the_wall_time_limit_leaving_nothing(
    tmp_path, monkeypatch):
  """No stall limit: the run stops at its wall-time limit although both
  actor processes hang in their environments, and one of them does not
  answer at all (SIGSTOP): stop ends both within its deadline (the frozen
  one by SIGKILL) and reaps them. The clock jumps once both have hung and
  one is frozen."""
  monkeypatch.setattr(run, "STOP_DEADLINE_S", 3.0)
  markers = tmp_path / "hung"
  markers.mkdir()
  frozen = []

  def freeze_one(pool, row):
    del row
    if not frozen and len(os.listdir(markers)) >= 2:
      frozen.append(pool.actor_pids()[0])
      os.kill(frozen[0], signal.SIGSTOP)

  hook = RowHook(monkeypatch, freeze_one)
  limit_s = 3600.0
  jump_clock_when(monkeypatch, limit_s, lambda: bool(frozen))
  config = process_run(tmp_path / "run", total_env_steps=10**8,
                       actor_stall_s=0.0, max_wall_time_s=limit_s)
  try:
    result = run.train(config,
                       env_factory=process_envs.HangingIMaze(str(markers)))
  finally:
    for pid in frozen:  # never leave a stopped process behind a failure
      if liveness.process_alive(pid):
        os.kill(pid, signal.SIGKILL)
  assert result.stopped_by == "wall_time"
  assert result.stuck_actors == ()  # hung processes are killed
  pool = hook.pools[0]
  assert {f"hung.{pid}" for pid in pool.actor_pids()} == set(
      os.listdir(markers))
  no_process_left(pool)
  assert pool.children()[0].exitcode == -signal.SIGKILL  # the frozen one
