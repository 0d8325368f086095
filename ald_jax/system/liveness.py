"""Is a process still running? One answer for the whole system.

A zombie (exited, not yet reaped by its parent) counts as gone: it runs no
code and holds no file locks (the kernel closed its files at exit), so for
every question asked here (is an actor process left behind, does a lock
holder still run) it is dead. Its parent reaps it (`Process.join`,
`os.waitpid`).
"""
from __future__ import annotations

import os
import time
from typing import Sequence


def process_alive(pid: int) -> bool:
  """True while `pid` runs (a zombie counts as gone)."""
  try:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
      for line in f:
        if line.startswith("State:"):
          return "Z" not in line.split()[1]
  except OSError:
    pass
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # exists, owned by another user
    return True
  return not os.path.isdir("/proc")  # no /proc: trust kill(0)


def wait_for_exit(pids: Sequence[int], timeout_s: float) -> list[int]:
  """Waits (in 50 ms slices) until `pids` are gone; returns those left."""
  deadline = time.monotonic() + timeout_s
  left = [pid for pid in pids if process_alive(pid)]
  while left and time.monotonic() < deadline:
    time.sleep(0.05)
    left = [pid for pid in left if process_alive(pid)]
  return left
