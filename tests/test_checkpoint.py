"""Orbax checkpoints: roundtrip, keep-last-N, newest wins, atomicity, leaf
checks on restore, and a save killed with SIGKILL."""
import dataclasses
import os
import signal
import subprocess
import sys

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from ald_jax import checkpoint
from ald_jax import config as config_lib


@flax.struct.dataclass
class State:
  params: dict
  opt_state: optax.OptState
  step: jax.Array
  key: jax.Array      # typed PRNG key
  raw_key: jax.Array  # legacy uint32 key


def _state(seed: int) -> State:
  rng = np.random.default_rng(seed)
  params = {"w": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32),
            "b": jnp.asarray(rng.normal(size=(2,)), jnp.float32)}
  opt = optax.adam(1e-3)
  opt_state = opt.init(params)
  # One real update so moments and count are non-trivial.
  _, opt_state = opt.update(jax.tree.map(jnp.ones_like, params), opt_state)
  return State(params=params, opt_state=opt_state,
               step=jnp.asarray(seed, jnp.int32),
               key=jax.random.key(seed), raw_key=jax.random.PRNGKey(seed + 1))


def _assert_state_equal(a: State, b: State):
  a_leaves = jax.tree.leaves(a.replace(key=jax.random.key_data(a.key)))
  b_leaves = jax.tree.leaves(b.replace(key=jax.random.key_data(b.key)))
  assert len(a_leaves) == len(b_leaves)
  for x, y in zip(a_leaves, b_leaves):
    assert np.asarray(x).dtype == np.asarray(y).dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _metadata(step):
  return {"learner_steps": step, "env_steps": np.int64(step * 100),
          "np_rng": np.random.default_rng(step).bit_generator.state,
          "config": config_lib.LearnerConfig(), "shape": (1, 2)}


def test_roundtrip_with_int_step_keys_and_metadata(tmp_path):
  saved = _state(5)
  with checkpoint.Checkpointer(tmp_path / "ckpt") as ckpt:
    assert ckpt.save(5, saved, _metadata(5))
    state, meta = ckpt.restore_latest(_state(0))
  _assert_state_equal(saved, state)
  assert state.step.dtype == jnp.int32 and int(state.step) == 5
  assert jax.dtypes.issubdtype(state.key.dtype, jax.dtypes.prng_key)
  # The restored key generates the same numbers.
  np.testing.assert_array_equal(jax.random.normal(state.key, (3,)),
                                jax.random.normal(saved.key, (3,)))
  assert meta["env_steps"] == 500 and meta["shape"] == [1, 2]
  assert meta["config"]["agent"] == "ald"
  assert meta["config"]["gtrxl"]["num_layers"] == config_lib.GTrXLConfig().num_layers
  rng = np.random.default_rng()
  rng.bit_generator.state = meta["np_rng"]
  assert rng.random() == np.random.default_rng(5).random()


def test_keep_last_n_and_newest_wins(tmp_path):
  directory = tmp_path / "ckpt"
  with checkpoint.Checkpointer(directory, max_to_keep=2) as ckpt:
    for step in (1, 2, 3, 4):
      ckpt.save(step, _state(step), _metadata(step))
    assert ckpt.all_steps() == [3, 4]
    assert not ckpt.save(4, _state(9), _metadata(9))  # already there
  assert sorted(os.listdir(directory)) == ["3", "4"]
  state, meta = checkpoint.restore_latest(directory, _state(0))
  _assert_state_equal(_state(4), state)
  assert meta["learner_steps"] == 4


def test_restore_latest_none_without_checkpoints(tmp_path):
  assert checkpoint.restore_latest(tmp_path / "missing", _state(0)) is None
  with checkpoint.Checkpointer(tmp_path / "empty") as ckpt:
    assert ckpt.restore_latest(_state(0)) is None


def test_failed_save_never_becomes_the_latest(tmp_path, monkeypatch):
  directory = tmp_path / "ckpt"
  with checkpoint.Checkpointer(directory) as ckpt:
    ckpt.save(1, _state(1), _metadata(1))

    async def crash(*args, **kwargs):
      raise OSError("disk full")
    # The state item is written, then the metadata item fails mid-save.
    monkeypatch.setattr(ocp.handlers.JsonCheckpointHandler, "async_save",
                        crash)
    with pytest.raises(OSError, match="disk full"):
      ckpt.save(2, _state(2), _metadata(2))
  monkeypatch.undo()
  names = os.listdir(directory)
  assert "2" not in names  # only a tmp directory, if anything
  assert all(n == "1" or ".orbax-checkpoint-tmp" in n for n in names)
  state, meta = checkpoint.restore_latest(directory, _state(0))
  assert meta["learner_steps"] == 1
  _assert_state_equal(_state(1), state)


def test_unreadable_newest_falls_back_to_previous(tmp_path):
  directory = tmp_path / "ckpt"
  with checkpoint.Checkpointer(directory) as ckpt:
    ckpt.save(1, _state(1), _metadata(1))
  os.makedirs(directory / "7" / "state")  # not written by orbax: unreadable
  state, meta = checkpoint.restore_latest(directory, _state(0))
  assert meta["learner_steps"] == 1
  _assert_state_equal(_state(1), state)


def test_a_run_restoring_past_an_unreadable_step_sets_it_aside(tmp_path):
  """The run continues from the older step and saves its own checkpoint
  under the unreadable step's number (before, that save was refused as
  'already exists' and the next resume lost it)."""
  directory = tmp_path / "ckpt"
  with checkpoint.Checkpointer(directory) as ckpt:
    ckpt.save(1, _state(1), _metadata(1))
  os.makedirs(directory / "2" / "state")  # not written by orbax: unreadable
  with checkpoint.Checkpointer(directory) as ckpt:
    _, meta = ckpt.restore_latest(_state(0))
    assert meta["learner_steps"] == 1
    assert ckpt.all_steps() == [1]
    assert ckpt.save(2, _state(2), _metadata(2))
  assert sorted(os.listdir(directory)) == ["1", "2", "2.unreadable"]
  state, meta = checkpoint.restore_latest(directory, _state(0))
  assert meta["learner_steps"] == 2
  _assert_state_equal(_state(2), state)


def test_to_jsonable_rejects_unknown_types():
  @dataclasses.dataclass
  class Cfg:
    sizes: tuple = (1, 2)
  assert checkpoint.to_jsonable({"c": Cfg(), "x": np.float32(0.5)}) == {
      "c": {"sizes": [1, 2]}, "x": 0.5}
  with pytest.raises(TypeError, match="metadata"):
    checkpoint.to_jsonable({"f": object()})


# ---- restore checks each leaf's shape and dtype ------------------------------

def test_restore_refuses_a_dtype_change_naming_the_leaf(tmp_path):
  with checkpoint.Checkpointer(tmp_path / "ckpt") as ckpt:
    ckpt.save(1, _state(1), _metadata(1))
    # The stored int32 step restored into a float32 target: orbax would cast.
    target = _state(0).replace(step=jnp.zeros((), jnp.float32))
    with pytest.raises(checkpoint.CheckpointMismatchError) as info:
      ckpt.restore(1, target)
  message = str(info.value)
  assert "step: stored int32[], target float32[]" in message
  assert "(1 leaves" in message  # every other leaf matches


def test_restore_refuses_a_shape_change_naming_every_leaf(tmp_path):
  directory = tmp_path / "ckpt"
  with checkpoint.Checkpointer(directory) as ckpt:
    ckpt.save(1, _state(1), _metadata(1))
  params = {"w": jnp.zeros((4, 2)), "b": jnp.zeros((2,))}
  opt_state = optax.adam(1e-3).init(params)
  target = _state(0).replace(params=params, opt_state=opt_state)
  # restore_latest does not fall back past a mismatch: older steps of the
  # same run have the same structure.
  with pytest.raises(checkpoint.CheckpointMismatchError) as info:
    checkpoint.restore_latest(directory, target)
  message = str(info.value)
  for leaf in ("params/w", "opt_state/0/mu/w", "opt_state/0/nu/w"):
    assert f"{leaf}: stored float32[3, 2], target float32[4, 2]" in message
  assert "(3 leaves" in message and "params/b" not in message


def test_restore_names_leaves_on_one_side_only(tmp_path):
  with checkpoint.Checkpointer(tmp_path / "ckpt") as ckpt:
    ckpt.save(1, {"a": jnp.zeros(2), "b": jnp.zeros(3)}, {})
    with pytest.raises(checkpoint.CheckpointMismatchError) as info:
      ckpt.restore(1, {"a": jnp.zeros(2), "c": jnp.zeros(3)})
  assert "b: in the checkpoint, not in the target" in str(info.value)
  assert "c: in the target, not in the checkpoint" in str(info.value)


def test_leaf_mismatches_compares_typed_keys_as_key_data():
  stored = {"key": jax.ShapeDtypeStruct((2,), jnp.uint32)}
  assert checkpoint.leaf_mismatches(stored, {"key": jax.random.key(0)}) == []
  assert checkpoint.leaf_mismatches(
      stored, {"key": jax.random.split(jax.random.key(0), 3)}) == [
          "key: stored uint32[2], target uint32[3, 2]"]


def test_read_metadata_without_the_state(tmp_path):
  directory = tmp_path / "ckpt"
  assert checkpoint.read_latest_metadata(directory) is None
  with checkpoint.Checkpointer(directory) as ckpt:
    ckpt.save(1, _state(1), _metadata(1))
    ckpt.save(2, _state(2), _metadata(2))
    assert ckpt.read_metadata(1)["learner_steps"] == 1
  step, meta = checkpoint.read_latest_metadata(directory)
  assert step == 2 and meta["env_steps"] == 200
  assert meta["config"]["agent"] == "ald"


# ---- leftovers of a crashed save -------------------------------------------

def _make_tmp_save(directory, name):
  path = directory / name
  os.makedirs(path / "state")
  (path / "state" / "partial").write_bytes(b"\0" * 16)
  return path


def test_writable_checkpointer_removes_unfinished_saves(tmp_path):
  directory = tmp_path / "ckpt"
  with checkpoint.Checkpointer(directory) as ckpt:
    ckpt.save(1, _state(1), _metadata(1))
  # The names orbax gives an unfinished step (the installed version's and
  # an older timestamped form).
  _make_tmp_save(directory, "2" + checkpoint.TMP_DIR_MARKER)
  _make_tmp_save(directory, f"3{checkpoint.TMP_DIR_MARKER}-1764100000")
  assert checkpoint.TMP_DIR_MARKER == ".orbax-checkpoint-tmp"
  # Readers leave them alone (a writer may own them).
  checkpoint.restore_latest(directory, _state(0))
  assert len(os.listdir(directory)) == 3
  with checkpoint.Checkpointer(directory) as ckpt:
    assert sorted(os.listdir(directory)) == ["1"]
    assert ckpt.save(2, _state(2), _metadata(2))  # the same step saves again
  _, meta = checkpoint.restore_latest(directory, _state(0))
  assert meta["learner_steps"] == 2
  assert checkpoint.remove_temporary_dirs(tmp_path / "missing") == []


_SAVE_LOOP = r"""
import sys, threading
import numpy as np
import orbax.checkpoint as ocp
from ald_jax import checkpoint

directory, hang_at = sys.argv[1], int(sys.argv[2])

async def hang(*args, **kwargs):
  print("writing", hang_at, flush=True)
  threading.Event().wait()  # killed here, mid-save

with checkpoint.Checkpointer(directory, max_to_keep=2) as ckpt:
  for step in range(1, hang_at + 1):
    if step == hang_at:
      ocp.handlers.JsonCheckpointHandler.async_save = hang
    state = {"w": np.full((256, 256), step, np.float32),
             "step": np.asarray(step, np.int64)}
    ckpt.save(step, state, {"learner_steps": step, "env_steps": 100 * step})
    print("saved", step, flush=True)
"""


@pytest.mark.timeout(180)
def test_kill_9_during_a_save_then_resume_loads_the_previous(tmp_path):
  directory = tmp_path / "ckpt"
  script = tmp_path / "save_loop.py"
  script.write_text(_SAVE_LOOP)
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [os.path.dirname(os.path.dirname(os.path.abspath(checkpoint.__file__)))]
      + os.environ.get("PYTHONPATH", "").split(os.pathsep)),
             JAX_PLATFORMS="cpu")
  with open(tmp_path / "stderr.txt", "wb") as stderr:
    child = subprocess.Popen(
        [sys.executable, str(script), str(directory), "4"],
        stdout=subprocess.PIPE, stderr=stderr, env=env, text=True)
  try:
    lines = []
    for line in child.stdout:  # blocks until the child reports, or exits
      lines.append(line.strip())
      if line.startswith("writing"):
        break
    assert lines == ["saved 1", "saved 2", "saved 3", "writing 4"], (
        lines, (tmp_path / "stderr.txt").read_text()[-3000:])
    child.kill()  # SIGKILL: no handler, no cleanup
  finally:
    child.kill()
    child.wait(timeout=60)
    child.stdout.close()
  assert child.returncode == -signal.SIGKILL
  names = sorted(os.listdir(directory))
  assert "4" not in names
  assert any(checkpoint.TMP_DIR_MARKER in n for n in names), names
  target = {"w": np.zeros((256, 256), np.float32),
            "step": np.zeros((), np.int64)}
  state, meta = checkpoint.restore_latest(directory, target)
  assert meta == {"learner_steps": 3, "env_steps": 300}
  np.testing.assert_array_equal(state["w"], np.full((256, 256), 3, np.float32))
  # The resumed run cleans the unfinished save and its counters continue.
  with checkpoint.Checkpointer(directory, max_to_keep=2) as ckpt:
    assert ckpt.all_steps() == [2, 3]
    assert not any(checkpoint.TMP_DIR_MARKER in n
                   for n in os.listdir(directory))
    ckpt.save(4, dict(target, step=np.asarray(4, np.int64)),
              {"learner_steps": 4, "env_steps": 400})
  _, meta = checkpoint.restore_latest(directory, target)
  assert meta["learner_steps"] == 4
