"""Replay buffer, unroll stacking/batching, distillation schedule."""
import numpy as np
import pytest

from ald_jax import types
from ald_jax.system import replay


def _unroll(ids, length=5, num_actions=3):
  """A Batch whose rows are tagged with `ids` (in reward) for tracking."""
  n = len(ids)
  batch = types.zeros_batch(n, length, (2,), num_actions,
                            actor_state=types.LSTMState(
                                np.zeros((n, 4), np.float32),
                                np.zeros((n, 4), np.float32)))
  ids = np.asarray(ids, np.float32)
  return batch.replace(
      reward=np.repeat(ids[:, None], length, 1),
      actor_state=types.LSTMState(np.repeat(ids[:, None], 4, 1),
                                  -np.repeat(ids[:, None], 4, 1)))


def _ids(batch):
  ids = batch.reward[:, 0]
  # Every leaf of a row moved together.
  np.testing.assert_array_equal(batch.actor_state.cell[:, 0], ids)
  np.testing.assert_array_equal(batch.actor_state.hidden[:, 0], -ids)
  return ids.astype(int).tolist()


def test_stack_unrolls():
  stacked = replay.stack_unrolls([_unroll([0, 1]), _unroll([2, 3, 4])])
  assert stacked.batch_size == 5 and _ids(stacked) == [0, 1, 2, 3, 4]
  assert stacked.observation.shape == (5, 5, 2)
  with pytest.raises(ValueError):
    replay.stack_unrolls([])


def test_unroll_batcher_carries_leftover_rows_in_order():
  batcher = replay.UnrollBatcher(batch_size=3)
  batcher.add(_unroll([0, 1]))
  assert batcher.pop_batch() is None
  batcher.add(_unroll([2, 3]))
  assert _ids(batcher.pop_batch()) == [0, 1, 2]
  assert batcher.pending_rows == 1
  batcher.add(_unroll([4, 5, 6, 7, 8]))
  assert _ids(batcher.pop_batch()) == [3, 4, 5]
  assert _ids(batcher.pop_batch()) == [6, 7, 8]
  assert batcher.pop_batch() is None and batcher.pending_rows == 0


@pytest.mark.parametrize("ratio,expected", [
    (0.0, [0, 0, 0, 0]),
    (0.5, [0, 1, 0, 1]),
    (1.0, [1, 1, 1, 1]),
    (4.0, [4, 4, 4, 4]),
    (1.5, [1, 2, 1, 2]),
])
def test_distill_schedule(ratio, expected):
  schedule = replay.DistillSchedule(ratio)
  assert [schedule.steps_due() for _ in expected] == expected


def test_distill_schedule_total_and_validation():
  schedule = replay.DistillSchedule(0.1)
  assert sum(schedule.steps_due() for _ in range(100)) == 10
  with pytest.raises(ValueError, match="distill_steps_per_rl_step"):
    replay.DistillSchedule(-0.5)
