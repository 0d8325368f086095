"""StreamBatcher: each stream at most once per batch, per-stream order kept."""
import numpy as np
import pytest

from ald_jax import types
from ald_jax.system import replay as replay_lib


def unroll(streams, indices):
  """Rows whose reward records (stream, unroll index) for checking."""
  streams = np.asarray(streams, np.int32)
  n = len(streams)
  tag = (streams * 100 + np.asarray(indices)).astype(np.float32)
  return types.Batch(
      observation=np.zeros((n, 2, 1), np.float32),
      action=np.zeros((n, 2), np.int32),
      reward=np.repeat(tag[:, None], 2, 1), discount=np.ones((n, 2)),
      step_type=np.ones((n, 2), np.int32),
      behaviour_logits=np.zeros((n, 2, 3), np.float32),
      actor_state=np.zeros((n, 4), np.float32),
      stream_id=streams, unroll_index=np.asarray(indices, np.int32))


def rows(batch):
  return list(zip(batch.stream_id.tolist(), batch.unroll_index.tolist()))


def test_a_stream_already_in_the_batch_waits_for_the_next():
  batcher = replay_lib.StreamBatcher(batch_size=4)
  batcher.add(unroll([0, 1], [0, 0]))   # actor 0, unroll 0
  batcher.add(unroll([0, 1], [1, 1]))   # actor 0 again (ahead), unroll 1
  assert batcher.pop_batch() is None    # 4 rows but only 2 streams
  batcher.add(unroll([2, 3], [0, 0]))   # actor 1 arrives
  first = batcher.pop_batch()
  assert rows(first) == [(0, 0), (1, 0), (2, 0), (3, 0)]
  np.testing.assert_array_equal(first.reward[:, 0], [0, 100, 200, 300])
  assert batcher.pending_rows == 2 and batcher.pop_batch() is None
  batcher.add(unroll([2, 3], [1, 1]))
  assert rows(batcher.pop_batch()) == [(0, 1), (1, 1), (2, 1), (3, 1)]
  assert batcher.pending_rows == 0 and batcher.repeated_rows == 0


def test_overflow_fills_with_the_oldest_rows_in_stream_order():
  batcher = replay_lib.StreamBatcher(batch_size=4, max_pending_rows=6)
  for k in range(3):  # one actor far ahead: streams 0, 1 only
    batcher.add(unroll([0, 1], [k, k]))
  batch = batcher.pop_batch()
  assert rows(batch) == [(0, 0), (1, 0), (0, 1), (1, 1)]
  assert batcher.repeated_rows == 2 and batcher.pending_rows == 2


def test_make_batcher_picks_by_stream_id_and_validates():
  assert isinstance(replay_lib.make_batcher(2, unroll([0], [0])),
                    replay_lib.StreamBatcher)
  plain = unroll([0], [0]).replace(stream_id=None, unroll_index=None)
  assert isinstance(replay_lib.make_batcher(2, plain),
                    replay_lib.UnrollBatcher)
  with pytest.raises(ValueError, match="stream_id"):
    replay_lib.StreamBatcher(2).add(plain)
  with pytest.raises(ValueError, match="max_pending_rows"):
    replay_lib.StreamBatcher(4, max_pending_rows=3)
