"""Orbax checkpoints: roundtrip, keep-last-N, newest wins, atomicity."""
import dataclasses
import os

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


def test_to_jsonable_rejects_unknown_types():
  @dataclasses.dataclass
  class Cfg:
    sizes: tuple = (1, 2)
  assert checkpoint.to_jsonable({"c": Cfg(), "x": np.float32(0.5)}) == {
      "c": {"sizes": [1, 2]}, "x": 0.5}
  with pytest.raises(TypeError, match="metadata"):
    checkpoint.to_jsonable({"f": object()})
