"""LatencyRecorder percentiles/budget, PhaseTimer, T_actor calibration."""
import jax.numpy as jnp
import numpy as np
import pytest

from ald_jax.system import timing


def _record_us(recorder, values_us):
  for v in values_us:
    recorder.record(int(v * 1000))


def test_percentiles_and_budget_count_on_known_data():
  recorder = timing.LatencyRecorder(budget_ms=0.0905)  # 90.5 us
  _record_us(recorder, np.random.default_rng(0).permutation(np.arange(1, 101)))
  s = recorder.summary()
  # numpy's linear interpolation on 1..100: rank q/100 * 99.
  assert s.count == 100 and s.window == 100
  assert s.p50_us == pytest.approx(50.5)
  assert s.p90_us == pytest.approx(90.1)
  assert s.p99_us == pytest.approx(99.01)
  assert s.max_us == 100.0 and s.mean_us == pytest.approx(50.5)
  assert s.over_budget == 10  # 91..100 us
  row = s.as_dict()
  assert row["t_actor_p99_us"] == s.p99_us and row["t_actor_over_budget"] == 10


def test_ring_window_keeps_recent_but_counts_all():
  recorder = timing.LatencyRecorder(budget_ms=0.020, capacity=10)
  _record_us(recorder, range(1, 26))
  s = recorder.summary()
  assert s.count == 25 and s.window == 10
  np.testing.assert_array_equal(np.sort(recorder.values_ns()),
                                np.arange(16, 26) * 1000)
  assert s.p50_us == pytest.approx(20.5)
  assert s.max_us == 25.0 and s.over_budget == 5  # 21..25 us


def test_latest_samples_are_the_most_recent_in_order_after_the_ring_wrapped():
  recorder = timing.LatencyRecorder(capacity=10)
  assert recorder.latest_ns(4).size == 0
  _record_us(recorder, range(1, 4))
  np.testing.assert_array_equal(recorder.latest_ns(5),
                                np.arange(1, 4) * 1000)
  _record_us(recorder, range(4, 24))   # 23 recorded, the ring wrapped twice
  np.testing.assert_array_equal(recorder.latest_ns(4),
                                np.arange(20, 24) * 1000)
  np.testing.assert_array_equal(recorder.latest_ns(99),
                                np.arange(14, 24) * 1000)


def test_no_budget_and_empty():
  recorder = timing.LatencyRecorder()
  s = recorder.summary()
  assert s.count == 0 and np.isnan(s.p50_us)
  _record_us(recorder, [1e6])
  assert recorder.summary().over_budget == 0


def test_merge_latency_across_actors():
  a = timing.LatencyRecorder(budget_ms=0.05)
  b = timing.LatencyRecorder(budget_ms=0.05)
  _record_us(a, range(1, 51))
  _record_us(b, range(51, 101))
  merged = timing.merge_latency([a, b])
  assert merged.count == 100 and merged.window == 100
  assert merged.p50_us == pytest.approx(50.5)
  assert merged.max_us == 100.0 and merged.over_budget == 50


class FakeClock:
  """A `time` stand-in whose perf_counter returns the given readings."""

  def __init__(self, readings):
    self._readings = iter(readings)

  def perf_counter(self):
    return next(self._readings)


def test_phase_timer(monkeypatch):
  # Construction reads the clock once; each phase reads it at start and end.
  monkeypatch.setattr(timing, "time", FakeClock([0.0, 10.0, 10.25, 12.0]))
  timer = timing.PhaseTimer()
  timer.add("step", 0.25)
  timer.add("step", 0.5)
  timer.add("wait_batch", 1.0)
  with timer.phase("publish"):
    pass
  assert timer.totals() == {"step": 0.75, "wait_batch": 1.0, "publish": 0.25}
  assert timer.counts() == {"step": 2, "wait_batch": 1, "publish": 1}
  summary = timer.summary()  # elapsed: 12.0 - 0.0
  assert summary["time_step_s"] == 0.75
  assert summary["frac_step"] == pytest.approx(0.75 / 12.0)
  assert summary["frac_publish"] == pytest.approx(0.25 / 12.0)
  monkeypatch.setattr(timing, "time", FakeClock([20.0]))
  timer.reset()
  assert timer.totals() == {}


def _step(x):
  return jnp.tanh(x) * 2.0


@pytest.fixture
def fake_durations(monkeypatch):
  """Calibration sees the step durations a test sets, not the clock's.

  `set(warmup_ns, measured_ns)`; each call still runs the step function.
  """
  calls = []

  def install(warmup_ns, measured_ns):
    durations = iter(list(warmup_ns) + list(measured_ns))

    def fake_time_call_ns(fn, *args):
      calls.append(args)
      return fn(*args), next(durations)

    monkeypatch.setattr(timing, "time_call_ns", fake_time_call_ns)
    return calls

  return install


def test_calibration_refuses_with_both_numbers(fake_durations):
  # 100 calls of 1..100 us after three huge warmup calls (not measured).
  calls = fake_durations([10**9] * 3, np.arange(1, 101) * 1000)
  with pytest.raises(timing.TActorBudgetError) as info:
    timing.calibrate_actor_step(_step, (jnp.ones(8),), num_calls=100,
                                budget_ms=0.05, policy="refuse")
  err = info.value
  assert len(calls) == 103
  assert err.budget_ms == 0.05
  assert err.p99_ms == pytest.approx(99.01e-3)  # warmups excluded
  assert "measured p99 is 0.09901 ms" in str(err)
  assert "p50 0.0505 ms" in str(err)
  assert "budget of 0.05 ms" in str(err)


def test_calibration_warns_or_passes(monkeypatch, fake_durations):
  warnings = []
  monkeypatch.setattr(timing.logging, "warning",
                      lambda fmt, *a: warnings.append(fmt % a))
  fake_durations([0] * 3, [2_000_000] * 10)  # 2 ms a step
  s = timing.calibrate_actor_step(_step, (jnp.ones(8),), num_calls=10,
                                  budget_ms=1.0, policy="warn")
  assert s.window == 10 and s.over_budget == 10 and len(warnings) == 1
  assert "T_actor budget exceeded" in warnings[0]
  assert "measured p99 is 2 ms" in warnings[0]
  # Within the budget (p99 955 us < 1 ms): neither a refusal nor a warning.
  fake_durations([0] * 3, [500_000] * 9 + [1_000_000])
  s = timing.calibrate_actor_step(_step, (jnp.ones(8),), num_calls=10,
                                  budget_ms=1.0, policy="refuse")
  assert s.p99_us == pytest.approx(955.0)
  assert s.over_budget == 0 and s.max_us == 1000.0 and len(warnings) == 1
  with pytest.raises(ValueError, match="t_actor_policy"):
    timing.calibrate_actor_step(_step, (jnp.ones(8),), budget_ms=1.0,
                                policy="ignore")
