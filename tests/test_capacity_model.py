"""experiments/capacity_model.py: the model's arithmetic by hand, and the
model against the end-to-end runs recorded on the 2-core CPU."""
import json
import math
import os

import pytest

from experiments import capacity_model as cm


def test_acting_cost_shares_the_batched_step_and_the_loop_over_envs():
  # A 200 us acting step and 40 us of the rest of the loop, for 8 envs.
  assert cm.acting_us_per_env_step(200.0, 8, 40.0) == pytest.approx(30.0)
  with pytest.raises(ValueError, match="num_envs"):
    cm.acting_us_per_env_step(200.0, 0, 40.0)


def test_actor_overhead_is_the_loop_time_beyond_the_acting_call():
  # 16 envs at 25,000 env steps per active second: 640 us per acting step,
  # of which the acting call takes 320.
  assert cm.actor_overhead_us(16, 25_000.0, 320.0) == pytest.approx(320.0)


def test_actor_overhead_needs_one_actor_process_on_its_own_core(tmp_path):
  path = tmp_path / "run.json"
  path.write_text(json.dumps({"num_actors": 2, "actors": "threads",
                              "envs_per_actor": 8}))
  with pytest.raises(ValueError, match="one actor process"):
    cm.actor_loop_overhead_us(str(path))
  path.write_text(json.dumps({
      "num_actors": 1, "actors": "processes", "envs_per_actor": 16,
      "ald_actor_sps": 25_000.0, "ald_t_actor_alone_p50_us": 320.0,
      "lstm_actor_sps": 32_000.0, "lstm_t_actor_alone_p50_us": 300.0}))
  assert cm.actor_loop_overhead_us(str(path)) == pytest.approx(
      (320.0 + 200.0) / 2)


def test_rl_step_adds_the_distill_only_steps():
  # 256 frames at 5,120 frames/s: 50 ms; 4 distill-only steps of 10 ms.
  assert cm.rl_step_ms(256, 5120.0, 10.0, 4) == pytest.approx(90.0)
  assert cm.rl_step_ms(256, 5120.0, 10.0, 0) == pytest.approx(50.0)


def test_host_work_hides_under_an_accelerator_step_not_a_cpu_step():
  # 256 frames per 4 ms step, 1 ms of host work per step.
  assert cm.learner_frames_per_s(256, 4.0, 1.0, accelerator=True) == (
      pytest.approx(64_000.0))
  assert cm.learner_frames_per_s(256, 4.0, 1.0, accelerator=False) == (
      pytest.approx(51_200.0))
  # A host-bound loop runs at its host rate.
  assert cm.learner_frames_per_s(256, 0.5, 1.0, accelerator=True) == (
      pytest.approx(256_000.0))


def test_dedicated_cores_are_actor_bound_then_learner_bound():
  # 50 us per env step: 20,000 env steps/s per core; the learner takes 50,000.
  assert cm.dedicated_env_sps(50_000.0, 50.0, 1) == pytest.approx(20_000.0)
  assert cm.dedicated_env_sps(50_000.0, 50.0, 2) == pytest.approx(40_000.0)
  assert cm.dedicated_env_sps(50_000.0, 50.0, 4) == pytest.approx(50_000.0)


def test_shared_cpu_acting_delays_the_learner_second_for_second():
  # F = 4,000 frames/s; 50 us of acting per env step. X = F / (1 + F a):
  # each second the system spends 1/F * X learning and a * X acting.
  x = cm.shared_cpu_env_sps(4000.0, 50.0)
  assert x == pytest.approx(4000.0 / 1.2)
  assert x / 4000.0 + x * 50e-6 == pytest.approx(1.0)


def test_crossover_names_the_cores_where_ald_is_ahead():
  cores = [1, 2, 4, 8]
  ald = [10.0, 10.0, 10.0, 10.0]
  transformer = [2.0, 4.0, 8.0, 16.0]
  result = cm.crossover(ald, transformer, cores)
  assert result["ald_wins_at_cores"] == [1, 4]
  assert not result["ald_wins_everywhere"]
  assert result["best_ratio"] == pytest.approx(5.0)
  assert result["best_ratio_at_cores"] == 1
  assert result["ratio_at_max_cores"] == pytest.approx(10.0 / 16.0)
  assert cm.crossover([1.0], [2.0], [1])["ald_wins_at_cores"] is None


def test_ald_is_ahead_until_the_transformers_actors_reach_alds_learner():
  # ALD: learner 10,000 frames/s, 50 us per env step; transformer: learner
  # 40,000, 500 us. Its actors make 2,000 env steps/s per core: they reach
  # ALD's 10,000 at 5 cores.
  assert cm.ald_ahead_below_cores(10_000.0, 50.0, 40_000.0, 500.0) == (
      pytest.approx(5.0))
  for n, ahead in ((4, True), (6, False)):
    ald = cm.dedicated_env_sps(10_000.0, 50.0, n)
    transformer = cm.dedicated_env_sps(40_000.0, 500.0, n)
    assert (ald > transformer) == ahead
  # A learner at least as fast as the transformer agent's: ahead everywhere.
  assert cm.ald_ahead_below_cores(50_000.0, 50.0, 40_000.0, 500.0) == math.inf
  with pytest.raises(ValueError, match="not cheaper"):
    cm.ald_ahead_below_cores(10_000.0, 500.0, 40_000.0, 50.0)


def test_core_counts_double_up_to_the_maximum():
  assert cm.core_counts(64) == [1, 2, 4, 8, 16, 32, 64]
  assert cm.core_counts(12) == [1, 2, 4, 8, 12]


def test_missing_transformer_figure_is_estimated_from_the_cpu_ratio(tmp_path):
  path = tmp_path / "step.json"
  path.write_text(json.dumps({
      "learner_config": {"batch_size": 16, "unroll_length": 16},
      "learner_frames_per_s_cached": 1000.0,
      "distill_step_ms_stored": 2.0}))
  fig = cm.learner_figures(str(path), cpu_ratio=1.5)
  assert fig.transformer_estimated
  assert fig.transformer_frames_per_s == pytest.approx(1500.0)
  # Never slower than ALD's combined step, which also trains the LSTM.
  assert cm.learner_figures(str(path), cpu_ratio=0.8
                            ).transformer_frames_per_s == pytest.approx(1000.0)
  with pytest.raises(ValueError, match="no transformer"):
    cm.learner_figures(str(path))


def test_a_missing_result_file_names_its_path():
  with pytest.raises(FileNotFoundError, match="recorded figure missing"):
    cm.read_result("no_such_result.json")


def test_model_predicts_the_recorded_cpu_runs_within_tolerance():
  result = cm.model(cm.Sources())
  assert result["validated"]
  checked = 0
  for case in result["validation"]:
    for agent in cm.AGENTS:
      if agent in case:
        v = case[agent]
        assert v["within_tolerance"], (case["file"], agent, v)
        checked += 1
  assert checked >= 2
  # Every case has both agents' curves over the same core counts, never
  # above the learner's rate.
  for case in result["prediction"].values():
    for agent in cm.AGENTS:
      curve = case["env_sps"][agent]
      assert len(curve) == len(result["cores"])
      assert max(curve) <= case["inputs"][agent]["learner_frames_per_s"] + 1e-6
      assert curve == sorted(curve)
    below = case["ald_ahead_below_cores"]
    for n, ald, transformer in zip(result["cores"], case["env_sps"]["ald"],
                                   case["env_sps"]["transformer"]):
      if below is None or n < below:
        assert ald > transformer
      elif n > below:
        assert ald <= transformer


def test_run_model_writes_the_json_and_the_plot(tmp_path, capsys):
  out, png = tmp_path / "model.json", tmp_path / "model.png"
  cm.run_model(cm.Sources(), None, 16, out=str(out), plot_path=str(png))
  data = json.loads(out.read_text())
  assert data["validated"] is True
  assert data["command"].startswith("python")
  assert data["cores"] == [1, 2, 4, 8, 16]
  assert os.path.getsize(png) > 10_000
  assert "predicted" in capsys.readouterr().err


def test_more_distill_only_steps_slow_only_alds_learner():
  few = cm.model(cm.Sources(), ald_distill_steps=1.0)["prediction"]
  many = cm.model(cm.Sources(), ald_distill_steps=8.0)["prediction"]
  for case in few:
    assert (many[case]["inputs"]["ald"]["learner_frames_per_s"] <
            few[case]["inputs"]["ald"]["learner_frames_per_s"])
    assert (many[case]["inputs"]["transformer"] ==
            few[case]["inputs"]["transformer"])
