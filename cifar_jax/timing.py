"""How long this process has run: the start-up a run reports (imports, data, init, compile)."""

import os
import time

_IMPORTED = time.perf_counter()
_runs = {'started': 0}


def process_seconds() -> float:
  """Seconds since this process started (Linux: /proc), else since cifar_jax was first imported."""
  try:
    with open('/proc/self/stat') as f:
      start_ticks = int(f.read().rsplit(')', 1)[1].split()[19])  # field 22, starttime
    with open('/proc/uptime') as f:
      uptime = float(f.read().split()[0])
    return max(0.0, uptime - start_ticks / os.sysconf('SC_CLK_TCK'))
  except (OSError, ValueError, IndexError):
    return time.perf_counter() - _IMPORTED


def seconds_before_run() -> float:
  """What a run started in this process paid before it began: the process's start and imports for the
  first run, nothing for later ones (a notebook or a test suite calling train_and_evaluate again)."""
  _runs['started'] += 1
  return process_seconds() if _runs['started'] == 1 else 0.0


class Laps:
  """Seconds between successive `lap()` calls, summed by name."""

  def __init__(self):
    self.seconds: dict[str, float] = {}
    self._last = time.perf_counter()

  def lap(self, name: str) -> float:
    now = time.perf_counter()
    seconds = now - self._last
    self.seconds[name] = self.seconds.get(name, 0.0) + seconds
    self._last = now
    return seconds
