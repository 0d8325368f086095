"""Segment memory (warm vs cold), stream bookkeeping, stored-teacher replay,
and the distillation window (issues 7 and 8)."""
import dataclasses

import chex
import jax
import numpy as np
import pytest

from ald_jax import config as config_lib
from ald_jax import learner as learner_lib
from ald_jax import types
from ald_jax.networks import policy_value
from ald_jax.system import learner_driver

OBS_DIM, NUM_ACTIONS = 5, 3
T, C, M = 4, 8, 8


def memory_config(**changes) -> config_lib.LearnerConfig:
  base = config_lib.LearnerConfig(
      agent="ald", unroll_length=T, learner_context=C, batch_size=2,
      torso=config_lib.TorsoConfig(mlp_sizes=(16,)),
      lstm=config_lib.LSTMConfig(hidden_size=16),
      gtrxl=config_lib.GTrXLConfig(num_layers=2, d_model=16, num_heads=2,
                                   mlp_size=32, memory_length=M))
  return dataclasses.replace(base, **changes)


def stream_rows(num_streams: int, k: int, firsts=(0,), seed=0) -> types.Batch:
  """Row k of each stream as the actor builds it: stream steps [kT-C, kT+T],
  zero/MID padding before step 0, FIRST at the given stream steps."""
  rng = np.random.default_rng(seed)
  total = 64   # the same stream data whatever k
  obs = rng.normal(size=(num_streams, total, OBS_DIM)).astype(np.float32)
  step_type = np.full((num_streams, total), types.MID, np.int32)
  step_type[:, list(firsts)] = types.FIRST
  length = C + T + 1
  out_obs = np.zeros((num_streams, length, OBS_DIM), np.float32)
  out_st = np.full((num_streams, length), types.MID, np.int32)
  for p in range(length):
    s = k * T - C + p
    if s >= 0:
      out_obs[:, p] = obs[:, s]
      out_st[:, p] = step_type[:, s]
  return types.Batch(
      observation=out_obs,
      action=rng.integers(0, NUM_ACTIONS, (num_streams, length)).astype(
          np.int32),
      reward=rng.normal(size=(num_streams, length)).astype(np.float32),
      discount=np.ones((num_streams, length), np.float32),
      step_type=out_st,
      behaviour_logits=np.zeros((num_streams, length, NUM_ACTIONS),
                                np.float32),
      actor_state=types.LSTMState(np.zeros((num_streams, 16), np.float32),
                                  np.zeros((num_streams, 16), np.float32)),
      stream_id=np.arange(num_streams, dtype=np.int32),
      unroll_index=np.full(num_streams, k, np.int32))


def host(tree):
  return jax.tree_util.tree_map(np.array, tree)


@pytest.mark.parametrize("firsts", [(0,), (0, 2)])
def test_warm_step_equals_cold_step_over_the_same_history(firsts):
  learner = learner_lib.make_learner(memory_config(), (OBS_DIM,),
                                     NUM_ACTIONS)
  rows0 = stream_rows(2, 0, firsts, seed=0)
  rows1 = stream_rows(2, 1, firsts, seed=0)
  state = learner.init(jax.random.PRNGKey(0), rows0)
  params = host(state.learner_params["net"])   # the step donates the state
  memory = learner.init_memory(2)
  _, memory, _, metrics = learner.train_step(state, memory, None, rows0,
                                             warm=False)
  assert float(metrics["learner/warm"]) == 0.0
  # Row 1 re-reads C = 8 >= T context steps: its cold pass sees the whole
  # stream since step 0, as the memory written by row 0 does.
  cold, _ = learner.forward(params, rows1)
  # Streams in the other order: a row reads only its own stream's memory.
  order = np.array([1, 0])
  swapped = jax.tree_util.tree_map(lambda x: x[order], rows1)
  warm, _ = learner.forward(params, swapped,
                            jax.tree_util.tree_map(lambda x: x[order], memory))
  np.testing.assert_allclose(np.asarray(warm.logits),
                             np.asarray(cold.logits)[order], atol=2e-5)
  np.testing.assert_allclose(np.asarray(warm.value),
                             np.asarray(cold.value)[order], atol=2e-5)


def test_warm_train_step_compiles_once_per_variant():
  learner = learner_lib.make_learner(memory_config(), (OBS_DIM,),
                                     NUM_ACTIONS)
  state = learner.init(jax.random.PRNGKey(0), stream_rows(2, 0))
  memory = learner.init_memory(2)
  for k in range(4):
    state, memory, _, metrics = learner.train_step(
        state, memory, None, stream_rows(2, k, seed=k), warm=k > 0)
    assert float(metrics["learner/warm"]) == float(k > 0)
  assert learner.train_step._cache_size() == 2


def test_driver_compiles_every_variant_with_the_first_batch():
  """The warm and distill-only steps compile beside the cold one, with the
  first batch: no later step compiles (each used to stall the loop)."""
  cfg = memory_config()
  learner = learner_lib.make_learner(cfg, (OBS_DIM,), NUM_ACTIONS)
  train_cfg = config_lib.TrainConfig(
      learner=cfg, num_actors=1, envs_per_actor=2,
      distill_steps_per_rl_step=1.0, replay_capacity=4)
  driver = learner_driver.LearnerDriver(
      learner, train_cfg, jax.devices()[0],
      learner.init(jax.random.PRNGKey(0), stream_rows(2, 0)), pipelined=False)
  compiles = []

  def count(event, duration_s, **kwargs):
    del duration_s, kwargs
    if event == "/jax/core/compile/backend_compile_duration":
      compiles.append(event)

  jax.monitoring.register_event_duration_secs_listener(count)
  try:
    first = driver.train(stream_rows(2, 0))
    assert not first.warm and first.distill_steps == 1
    assert driver.compiled_variants and compiles
    compiled_at_first = len(compiles)
    for k in range(1, 4):
      result = driver.train(stream_rows(2, k, seed=k))
      assert result.warm and result.applied and result.distill_steps == 1
    # A gap (unrolls 4-5 lost) takes the cold path again, then warm again:
    # the states the steps returned must not change the compiled signature.
    for k, warm in ((6, False), (7, True), (9, False), (10, True)):
      assert driver.train(stream_rows(2, k, seed=k)).warm == warm
    assert len(compiles) == compiled_at_first
  finally:
    jax.monitoring.unregister_event_duration_listener(count)


def test_memory_book_takes_the_cold_path_on_gaps_restarts_and_resume():
  book = learner_driver.StreamMemoryBook(4)
  ids = np.array([0, 1])
  assert not book.is_warm(ids, np.array([0, 0]))   # a stream's first unroll
  book.record(ids, np.array([0, 0]))
  assert book.is_warm(ids, np.array([1, 1]))
  assert not book.is_warm(ids, np.array([1, 2]))   # a gap in stream 1
  assert not book.is_warm(np.array([0, 2]), np.array([1, 1]))  # 2 unseen
  book.record(ids, np.array([1, 1]))
  assert not book.is_warm(ids, np.array([0, 0]))   # restarted actor
  assert not learner_driver.StreamMemoryBook(4).is_warm(  # resumed run
      ids, np.array([2, 2]))
  book.forget(np.array([0]))
  assert not book.is_warm(ids, np.array([2, 2]))
  # A stream twice in a batch: never warm, and cold again afterwards.
  assert not book.is_warm(np.array([1, 1]), np.array([2, 2]))
  book.record(np.array([0, 1, 1]), np.array([2, 2, 3]))
  assert book.is_warm(np.array([0]), np.array([3]))
  assert not book.is_warm(np.array([1]), np.array([4]))
  with pytest.raises(ValueError, match=r"\[0, 4\)"):
    book.is_warm(np.array([7]), np.array([2]))


def _counting_gtrxl(monkeypatch):
  calls = {"n": 0}
  original = policy_value.GTrXLPolicyValueNet.__call__

  def counted(self, *args, **kwargs):
    calls["n"] += 1
    return original(self, *args, **kwargs)
  monkeypatch.setattr(policy_value.GTrXLPolicyValueNet, "__call__", counted)
  return calls


@pytest.mark.parametrize("teacher", ["stored", "recompute"])
def test_replay_distill_steps_use_stored_teacher_without_the_gtrxl(
    monkeypatch, teacher):
  calls = _counting_gtrxl(monkeypatch)
  # Uniform weights: the KL below is the unweighted one the loss then lowers.
  # One GTrXL layer: what is checked is whether the GTrXL runs at all.
  cfg = memory_config(
      distill=config_lib.DistillConfig(teacher=teacher,
                                       step_weighting="uniform"),
      gtrxl=dataclasses.replace(memory_config().gtrxl, num_layers=1))
  learner = learner_lib.make_learner(cfg, (OBS_DIM,), NUM_ACTIONS)
  rows = stream_rows(2, 1)
  state = learner.init(jax.random.PRNGKey(0), rows)
  replay = learner.init_replay(4)
  state, _, replay, _ = learner.train_step(state, (), replay, rows,
                                           warm=False)
  assert int(replay.size) == 2
  calls["n"] = 0
  kls = []
  for _ in range(10):
    state, metrics = learner.replay_distill_steps(state, replay, num_steps=3)
    kls.extend(np.asarray(metrics["distill/policy_kl"]).tolist())
  traced_calls = calls["n"]
  if teacher == "stored":
    assert traced_calls == 0
    assert kls[-1] < 0.5 * kls[0]     # fixed targets: the KL falls
  else:
    assert traced_calls > 0
  assert int(state.distill_step) == 30


def _filled_replay(learner, rows):
  state = learner.init(jax.random.PRNGKey(0), rows)
  state, _, replay, _ = learner.train_step(state, (), learner.init_replay(4),
                                           rows, warm=False)
  return host(state), host(replay)


def test_replay_distill_steps_in_one_call_equal_one_call_per_step():
  learner = learner_lib.make_learner(memory_config(), (OBS_DIM,), NUM_ACTIONS)
  state, replay = _filled_replay(learner, stream_rows(2, 1))
  fused, metrics = learner.replay_distill_steps(host(state), replay,
                                                num_steps=3)
  assert metrics["distill/policy_kl"].shape == (3,)
  stepped, kls = host(state), []
  for _ in range(3):
    stepped, step_metrics = learner.replay_distill_steps(stepped, replay,
                                                         num_steps=1)
    kls.append(float(step_metrics["distill/policy_kl"][0]))
  np.testing.assert_allclose(metrics["distill/policy_kl"], kls, rtol=1e-5)
  assert int(fused.distill_step) == int(stepped.distill_step) == 3
  np.testing.assert_array_equal(fused.rng, stepped.rng)
  jax.tree_util.tree_map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
      host(fused.actor_params), host(stepped.actor_params))


def test_non_finite_replay_distill_steps_are_skipped_one_by_one():
  learner = learner_lib.make_learner(memory_config(), (OBS_DIM,), NUM_ACTIONS)
  state, replay = _filled_replay(learner, stream_rows(2, 1))
  bad = replay.rows.observation.copy()
  bad[1] = np.nan   # one of the two stored rows
  replay = replay._replace(rows=replay.rows.replace(observation=bad))
  new, metrics = learner.replay_distill_steps(host(state), replay,
                                              num_steps=16)
  flags = np.asarray(metrics["nonfinite"])
  assert 0 < flags.sum() < 16   # some steps sampled the NaN row, some not
  assert int(new.distill_step) == int(state.distill_step) + int(
      (flags == 0).sum())
  assert all(np.isfinite(x).all()
             for x in jax.tree_util.tree_leaves(host(new.actor_params)))


@pytest.mark.parametrize("warm", [False, True])
def test_a_skipped_combined_step_leaves_memory_and_replay_as_they_were(warm):
  """Only trained rows enter the replay and the segment memory: a non-finite
  combined step (here a NaN observation) writes neither, warm or cold."""
  learner = learner_lib.make_learner(memory_config(), (OBS_DIM,), NUM_ACTIONS)
  first = stream_rows(2, 0)
  state = learner.init(jax.random.PRNGKey(0), first)
  memory, replay = learner.init_memory(2), learner.init_replay(4)
  state, memory, replay, metrics = learner.train_step(
      state, memory, replay, first, warm=False)
  assert float(metrics["nonfinite"]) == 0
  before = host((memory, replay))
  bad = stream_rows(2, 1)
  obs = bad.observation.copy()
  obs[1, -2] = np.nan
  state, memory, replay, metrics = learner.train_step(
      state, memory, replay, bad.replace(observation=obs), warm=warm)
  assert float(metrics["nonfinite"]) == 1
  chex.assert_trees_all_equal(host((memory, replay)), before)
  # The next trained batch is written where the skipped one would have been.
  state, memory, replay, metrics = learner.train_step(
      state, memory, replay, stream_rows(2, 1), warm=warm)
  assert float(metrics["nonfinite"]) == 0
  assert int(replay.size) == 4 and int(replay.next) == 0
  assert np.isfinite(host(replay.teacher.logits)).all()
  np.testing.assert_array_equal(host(replay.rows.observation[2:]),
                                stream_rows(2, 1).observation)


def cue_batch(rng, batch_size, *, span=30):
  """Rows of C=32, T=16: a cue (one-hot of 2) at position p, a decision flag
  at q = p + span inside the unroll, zeros elsewhere; FIRST at position 0."""
  length = 32 + 16 + 1
  obs = np.zeros((batch_size, length, 4), np.float32)
  cues = rng.integers(0, 2, batch_size)
  decisions = rng.integers(32, 48, batch_size)
  for i, (cue, q) in enumerate(zip(cues, decisions)):
    obs[i, q - span, cue] = 1.0
    obs[i, q, 2] = 1.0
  obs[:, :, 3] = 1.0   # a bias feature
  step_type = np.full((batch_size, length), types.MID, np.int32)
  step_type[:, 0] = types.FIRST
  # The teacher knows: at the decision it picks the cue; elsewhere uniform.
  teacher_logits = np.zeros((batch_size, 16, 2), np.float32)
  for i, (cue, q) in enumerate(zip(cues, decisions)):
    teacher_logits[i, q - 32, cue] = 4.0
  batch = types.Batch(
      observation=obs, action=np.zeros((batch_size, length), np.int32),
      reward=np.zeros((batch_size, length), np.float32),
      discount=np.ones((batch_size, length), np.float32), step_type=step_type,
      behaviour_logits=np.zeros((batch_size, length, 2), np.float32),
      actor_state=types.LSTMState(np.zeros((batch_size, 32), np.float32),
                                  np.zeros((batch_size, 32), np.float32)))
  teacher = types.AgentOutput(teacher_logits,
                              np.zeros((batch_size, 16), np.float32))
  return batch, teacher, cues, decisions


@pytest.mark.parametrize("actor_context, expect_learned",
                         [(None, True), (0, False)])
def test_distillation_window_teaches_a_memory_longer_than_the_unroll(
    actor_context, expect_learned):
  cfg = config_lib.LearnerConfig(
      agent="ald", unroll_length=16, learner_context=32, batch_size=32,
      actor_context=actor_context,
      torso=config_lib.TorsoConfig(mlp_sizes=(16,)),
      lstm=config_lib.LSTMConfig(hidden_size=32),
      gtrxl=config_lib.GTrXLConfig(num_layers=1, d_model=16, num_heads=2,
                                   mlp_size=16, memory_length=32),
      distill=config_lib.DistillConfig(value_cost=0.0),
      actor_optimizer=config_lib.OptimizerConfig(learning_rate=3e-3))
  # Measured: span 30 is learned (100%) after ~600-800 updates at lr 3e-3.
  learner = learner_lib.make_learner(cfg, (4,), 2)
  rng = np.random.default_rng(0)
  batch, teacher, _, _ = cue_batch(rng, 32)
  state = learner.init(jax.random.PRNGKey(0), batch)
  for _ in range(900):
    batch, teacher, _, _ = cue_batch(rng, 32)
    # A distill-only update through the replay path, with a fixed teacher.
    replay = learner_lib.Replay(rows=batch, teacher=teacher,
                                next=np.zeros((), np.int32),
                                size=np.asarray(32, np.int32))
    state, _ = learner.replay_distill_steps(state, replay, num_steps=1)
  batch, _, cues, decisions = cue_batch(np.random.default_rng(1), 256)
  out = learner.actor_forward(state.actor_params, batch)
  chosen = np.argmax(np.asarray(out.logits)[np.arange(256), decisions - 32],
                     axis=-1)
  agreement = float(np.mean(chosen == cues))
  if expect_learned:
    assert agreement >= 0.95, agreement
  else:
    assert agreement < 0.8, agreement


def _rows_of(streams, k, nan=False) -> types.Batch:
  """Unroll k of the given streams (of 4), optionally with a NaN."""
  rows = jax.tree.map(lambda x: x[np.asarray(streams)],
                      stream_rows(4, k, seed=0))
  if nan:
    obs = rows.observation.copy()
    obs[0, -2] = np.nan
    rows = rows.replace(observation=obs)
  return rows


# Streams {0,1} and {2,3} in turn and together: warm steps over the previous
# step's streams and over others, a skipped step followed by a warm step over
# its streams (sent warm before its flag is read), and by one over others.
PIPELINE_SEQUENCE = (
    ((0, 1), 0, False), ((2, 3), 0, False), ((0, 1), 1, False),
    ((0, 1), 2, False), ((0, 1), 3, True), ((0, 1), 4, False),
    ((2, 3), 1, False), ((2, 3), 2, True), ((0, 1), 5, False),
    ((2, 3), 3, False), ((2, 3), 4, False), ((1, 2), 6, False))


def test_the_pipelined_driver_computes_what_the_serial_one_does():
  """Same batches, same parameters, memory, replay and counters; each result
  one call later. Skipped steps are skipped, counted, and send the next warm
  step over their streams down the cold path on the device."""
  cfg = memory_config()
  learner = learner_lib.make_learner(cfg, (OBS_DIM,), NUM_ACTIONS)
  train_cfg = config_lib.TrainConfig(
      learner=cfg, num_actors=1, envs_per_actor=4,
      distill_steps_per_rl_step=1.0, replay_capacity=4,
      max_consecutive_nonfinite=3)
  init = jax.device_get(learner.init(jax.random.PRNGKey(0),
                                    _rows_of((0, 1), 0)))
  outcome = {}
  for pipelined in (False, True):
    driver = learner_driver.LearnerDriver(
        learner, train_cfg, jax.devices()[0], init, pipelined=pipelined)
    results = [driver.train(_rows_of(*step)) for step in PIPELINE_SEQUENCE]
    results.append(driver.flush())
    if pipelined:
      assert results[0] is None
      results = results[1:]
    else:
      assert results[-1] is None
      results = results[:-1]
    outcome[pipelined] = (results, driver.counters(), driver.host_state(),
                          driver.host_buffers())
  serial, piped = outcome[False], outcome[True]
  assert piped[0] == serial[0]
  assert [r.applied for r in serial[0]] == [
      not nan for _, _, nan in PIPELINE_SEQUENCE]
  # k=4 after the skipped k=3: cold; {2,3} k=3 after the skipped k=2: cold.
  assert [r.warm for r in serial[0]] == [
      False, False, True, True, True, False, True, True, True, False, True,
      False]
  assert piped[1] == serial[1]
  assert serial[1].nonfinite_total == 2
  chex.assert_trees_all_close(piped[2], serial[2], rtol=1e-6, atol=1e-6)
  chex.assert_trees_all_close(piped[3], serial[3], rtol=1e-6, atol=1e-6)
