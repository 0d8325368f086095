"""Core affinity: which cores actors and the learner run on (Linux).

`assign_cores` splits the process's cores between the learner and actors;
`spread_threads` gives each thread of an actor process one of its cores;
`pin_current_thread` pins the calling thread (actor threads pin themselves);
`pinned_process` confines every thread of the process (the learner and XLA's
CPU pool) and restores the previous affinity afterwards, so a second run in
the same process starts from the original cores. Elsewhere (no
`os.sched_setaffinity`) every function is a no-op.
"""
from __future__ import annotations

import contextlib
import os
import threading
from typing import Collection, Iterator, NamedTuple, Sequence

from absl import logging
import numpy as np


class CoreAssignment(NamedTuple):
  actors: list[frozenset[int] | None]  # per actor; None: do not pin
  learner: frozenset[int] | None       # cores left for the learner thread
  shared: bool                         # some actors share a core


def available_cores() -> list[int] | None:
  """Cores this process may run on, or None where affinity is unsupported."""
  if not hasattr(os, "sched_getaffinity"):
    return None
  return sorted(os.sched_getaffinity(0))


def assign_cores(num_actors: int, reserve_for_learner: int = 1,
                 cores: Sequence[int] | None = None) -> CoreAssignment:
  """Spreads actors over the process's cores, keeping some for the learner.

  The first `reserve_for_learner` cores go to the learner (never all of them:
  at least one core is left for actors). The remaining cores are split into
  `num_actors` contiguous groups when there are enough; otherwise actor i gets
  core `pool[i % len(pool)]` and actors share cores (`shared=True`). On a
  2-core box with 2 actors and 1 reserved core both actors share core 1 and
  the learner has core 0; with `reserve_for_learner=0` each actor gets its own
  core and the learner (unpinned) competes with both.
  """
  if num_actors <= 0:
    raise ValueError(f"num_actors must be > 0, got {num_actors}")
  if reserve_for_learner < 0:
    raise ValueError(f"reserve_for_learner must be >= 0, got "
                     f"{reserve_for_learner}")
  cores = available_cores() if cores is None else sorted(cores)
  if cores is None:
    return CoreAssignment([None] * num_actors, None, False)
  if not cores:
    raise ValueError("no cores to assign")
  reserve = min(reserve_for_learner, len(cores) - 1)
  learner = frozenset(cores[:reserve]) if reserve else frozenset(cores)
  pool = cores[reserve:]
  if len(pool) >= num_actors:
    groups = np.array_split(np.asarray(pool), num_actors)
    actors = [frozenset(int(c) for c in group) for group in groups]
    return CoreAssignment(actors, learner, False)
  actors = [frozenset({pool[i % len(pool)]}) for i in range(num_actors)]
  return CoreAssignment(actors, learner, True)


def spread_threads(allotment: Sequence[int] | None, num_threads: int,
                   offset: int = 0) -> list[frozenset[int] | None]:
  """One core each for `num_threads` threads, taken from `allotment`.

  Thread k gets core `allotment[(offset + k) % len(allotment)]`: distinct
  cores while `num_threads <= len(allotment)`, shared round-robin beyond.
  An actor process on a Ray cluster uses it with its own affinity as the
  allotment and its first actor id as `offset` (Ray grants a number of CPUs,
  not core ids, so processes on one node spread by id). None (no affinity
  API): no pinning.
  """
  if num_threads <= 0:
    raise ValueError(f"num_threads must be > 0, got {num_threads}")
  if allotment is None:
    return [None] * num_threads
  cores = sorted(allotment)
  if not cores:
    raise ValueError("no cores in the allotment")
  return [frozenset({cores[(offset + k) % len(cores)]})
          for k in range(num_threads)]


def pin_current_thread(cores: Collection[int] | None) -> frozenset[int] | None:
  """Pins the calling thread (Linux) and returns the affinity it now has.

  Returns None when `cores` is None or the platform has no affinity API (a
  note is logged). Threads started afterwards inherit the affinity.
  """
  if cores is None:
    return None
  if not hasattr(os, "sched_setaffinity"):
    logging.info("os.sched_setaffinity is unavailable on this platform; "
                 "thread %s is not pinned.", threading.current_thread().name)
    return None
  os.sched_setaffinity(0, set(cores))  # pid 0: the calling thread
  return frozenset(os.sched_getaffinity(0))


def _thread_ids() -> list[int]:
  try:
    return [int(t) for t in os.listdir("/proc/self/task")]
  except OSError:
    return []


def pin_process_threads(cores: Collection[int] | None) -> int:
  """Pins every thread of this process that exists now (Linux) to `cores`.

  Returns the number of threads pinned (0 where unsupported).
  """
  if cores is None or not hasattr(os, "sched_setaffinity"):
    return 0
  pinned = 0
  for tid in _thread_ids():
    try:
      os.sched_setaffinity(tid, set(cores))
      pinned += 1
    except OSError:  # the thread exited meanwhile
      pass
  return pinned


@contextlib.contextmanager
def pinned_process(cores: Collection[int] | None) -> Iterator[None]:
  """Confines the process's threads to `cores`, restoring them on exit.

  Each thread gets back the affinity it had on entry; threads started inside
  get the calling thread's original affinity.
  """
  if cores is None or not hasattr(os, "sched_setaffinity"):
    yield
    return
  before = {}
  for tid in _thread_ids():
    try:
      before[tid] = os.sched_getaffinity(tid)
    except OSError:
      pass
  original = os.sched_getaffinity(0)
  pin_process_threads(cores)
  try:
    yield
  finally:
    for tid in _thread_ids():
      try:
        os.sched_setaffinity(tid, before.get(tid, original))
      except OSError:
        pass
