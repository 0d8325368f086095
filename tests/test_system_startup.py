"""Start-up: nothing compiles in the learner's process once actors run, and
the persistent compilation cache serves a second run."""
import collections
import dataclasses
import threading

import jax
from jax import monitoring
import pytest

from ald_jax.system import compile_cache
from ald_jax.system import loop as loop_lib
from ald_jax.system import run

from helpers import tiny_run

LOWERING = "/jax/core/compile/jaxpr_to_mlir_module_duration"
BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"
CACHE_HIT = "/jax/compilation_cache/cache_hits"


class CompileLog:
  """Counts JAX's compile events in this process, before and after the
  actors started (`LearnerLoop.start_actors`)."""

  def __init__(self, monkeypatch):
    self.after_start = collections.Counter()
    self.before_start = collections.Counter()
    self.started = threading.Event()
    start_actors = loop_lib.LearnerLoop.start_actors

    def start_then_mark(loop):
      start_actors(loop)
      self.started.set()
    monkeypatch.setattr(loop_lib.LearnerLoop, "start_actors", start_then_mark)

  def __call__(self, event, *args, **kwargs):
    del args, kwargs
    if event in (LOWERING, BACKEND_COMPILE, CACHE_HIT):
      (self.after_start if self.started.is_set()
       else self.before_start)[event] += 1

  def __enter__(self):
    monitoring.register_event_duration_secs_listener(self)
    monitoring.register_event_listener(self)
    return self

  def __exit__(self, *exc):
    monitoring.unregister_event_duration_listener(self)
    monitoring.unregister_event_listener(self)


@pytest.mark.parametrize("evaluate", [False, True])
def test_a_run_compiles_nothing_after_its_actors_start(tmp_path, monkeypatch,
                                                       evaluate):
  config = tiny_run(tmp_path, compilation_cache=False,
                    eval_interval_s=0.5 if evaluate else 0.0,
                    eval_episodes=2, total_env_steps=3000)
  with CompileLog(monkeypatch) as log:
    result = run.train(config)
  assert result.final_row["learner_steps"] > 0
  if evaluate:
    assert result.final_row["eval/evaluations"] >= 1
  assert log.before_start[BACKEND_COMPILE] > 0
  assert log.after_start == collections.Counter(), log.after_start


def test_a_second_run_loads_its_programs_from_the_cache(tmp_path,
                                                        monkeypatch):
  cache = tmp_path / "cache"
  counts = []
  for name in ("first", "second"):
    config = tiny_run(tmp_path / name, compilation_cache_dir=str(cache),
                      total_env_steps=800)
    jax.clear_caches()  # as in a new process: only the disk cache is left
    with CompileLog(monkeypatch) as log:
      run.train(config)
    counts.append(log.before_start)
  assert counts[0][BACKEND_COMPILE] > 0 and counts[0][CACHE_HIT] == 0
  # What took long enough to keep was kept: the second run loads at least
  # the learner's four programs (cold, warm, distill-only, parameter copy)
  # and compiles only programs below the cache's minimum compile time.
  assert counts[1][CACHE_HIT] >= 4
  assert counts[1][BACKEND_COMPILE] <= counts[0][BACKEND_COMPILE]
  assert any(cache.iterdir())
  compile_cache.enable()  # back to the suite's cache for later tests
