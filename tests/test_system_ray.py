"""Actor processes with Ray (`actors="processes"`): few, small runs (Ray
starts slowly on 2 cores). Skipped where Ray is not installed."""
import dataclasses
import os
import signal
import threading

import pytest

ray = pytest.importorskip("ray")

from ald_jax import metrics as metrics_lib  # pylint: disable=wrong-import-position
from ald_jax.system import errors  # pylint: disable=wrong-import-position
from ald_jax.system import loop as loop_lib  # pylint: disable=wrong-import-position
from ald_jax.system import ray_pool  # pylint: disable=wrong-import-position
from ald_jax.system import run  # pylint: disable=wrong-import-position

from test_system_run import tiny_run  # pylint: disable=wrong-import-order,wrong-import-position

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"


def process_run(tmp_path, **changes):
  return tiny_run(tmp_path, agent="lstm", actors="processes",
                  report_interval_s=1.0, **changes)


class RowHook:
  """Wraps LearnerLoop.row to look at the running system at each report."""

  def __init__(self, monkeypatch, on_row):
    original = loop_lib.LearnerLoop.row
    self.pools = []

    def row(loop, stopped_by=""):
      pool = loop._pool  # pylint: disable=protected-access
      if pool not in self.pools:
        self.pools.append(pool)
      result = original(loop, stopped_by)
      if not stopped_by:
        on_row(pool, result)
      return result
    monkeypatch.setattr(loop_lib.LearnerLoop, "row", row)


@pytest.mark.timeout(300)
def test_processes_act_get_params_are_trained_on_and_shut_down(
    tmp_path, monkeypatch):
  seen_threads = []
  hook = RowHook(monkeypatch, lambda pool, row: seen_threads.append(
      [t.name for t in threading.enumerate()]))
  result = run.train(process_run(tmp_path))
  assert result.stopped_by == "budget"
  # The learner's process ran no actor thread while the processes acted.
  assert seen_threads
  assert not [n for names in seen_threads for n in names
              if n.startswith("actor-")]
  row = result.final_row
  for i in range(2):
    # Unrolls from every process reached the learner, and every process
    # acted with a version published after the first.
    assert row[f"actor{i}_unrolls"] > 0, row
    assert row[f"actor{i}_params_version"] > 1, row
  assert row["learner_steps"] > 0 and row["t_actor_count"] > 0
  assert row["actor_restarts"] == 0
  # Nothing left: the run started Ray and shut it down, processes are gone.
  assert not ray.is_initialized()
  pids = hook.pools[0].actor_pids()
  assert len(pids) == 2 and not [p for p in pids if ray_pool.process_alive(p)]


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
                     match=r"actor 0 failed .* --max_actor_restarts=1; its "
                     r"last failure: process died"):
    run.train(config)
  assert len(killed) == 2
  rows = metrics_lib.read_metrics(tmp_path)
  assert max(r.get("actor_restarts", 0) for r in rows) == 1
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
                     match=r"its last failure: stalled: no environment step"):
    run.train(config, env_factory=HangingIMaze())
  assert not ray.is_initialized()


@pytest.mark.timeout(300)
def test_hanging_env_in_processes_stops_at_the_wall_time_limit_leaving_nothing(
    tmp_path, monkeypatch):
  """No stall limit: the run stops at its wall-time limit although the actor
  processes hang in their environments, and no process is left running.

  The loop's clock jumps past the limit once an environment has hung, so
  the limit falls while the actors hang whatever the machine's speed."""
  import sys  # pylint: disable=import-outside-toplevel
  from ray import cloudpickle  # pylint: disable=import-outside-toplevel
  cloudpickle.register_pickle_by_value(sys.modules[__name__])
  hook = RowHook(monkeypatch, lambda pool, row: None)
  markers = tmp_path / "hung"
  markers.mkdir()
  limit_s = 3600.0
  elapsed_s = loop_lib.LearnerLoop.elapsed_s
  monkeypatch.setattr(
      loop_lib.LearnerLoop, "elapsed_s",
      lambda loop: elapsed_s(loop) + (limit_s if os.listdir(markers) else 0))
  config = process_run(tmp_path / "run", total_env_steps=10**8,
                       actor_stall_s=0.0, max_wall_time_s=limit_s)
  result = run.train(config, env_factory=HangingIMaze(str(markers)))
  assert result.stopped_by == "wall_time"
  assert result.stuck_actors == ()  # hung processes are killed
  pids = hook.pools[0].actor_pids()
  assert len(pids) == 2 and not [p for p in pids if ray_pool.process_alive(p)]
  assert not ray.is_initialized()


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
    config = dataclasses.replace(learns, actors="processes",
                                 ray_address=cluster.address)
    result = run.train(config)
    placed = hook.pools[0].actor_node_ids()
  finally:
    if ray.is_initialized():
      ray.shutdown()
    cluster.shutdown()
  assert placed and placed <= {w.node_id for w in workers}
  assert result.final_row["success_rate"] >= 0.9, result.final_row
