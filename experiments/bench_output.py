"""What every benchmark's JSON object starts with, and how it is written.

A result is read on another day, on another machine of the same class, so
it names the command that made it, when, and on what (the CPU model too:
VMs of one class differ by ~1.5x).
"""
import datetime
import json
import os
import platform
import sys
from typing import Any, Mapping


def cpu_model() -> str:
  """The CPU's model name (Linux), else what `platform` knows."""
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def header() -> dict[str, Any]:
  """command, date (UTC), machine (CPU model and core count)."""
  return {
      "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
          timespec="seconds"),
      "machine": f"{cpu_model()}, {os.cpu_count()} cores",
  }


def emit(result: Mapping[str, Any], out: str = "", indent: int = 1) -> None:
  """Prints the result as one JSON object; also writes it to `out`."""
  text = json.dumps(result, indent=indent)
  print(text)
  if out:
    with open(out, "w", encoding="utf-8") as f:
      f.write(text + "\n")
