"""What every benchmark does: a worker process per variant, alternating windows, medians, JSON and markdown
rows, the machine's fingerprint and each worker's peak memory.

A worker is `python scripts/benchmark.py FAMILY --worker=VARIANT ...`: it builds its variant, says ready
(one JSON line on stdout), then answers each command line on stdin with one JSON line ('train', 'eval',
'run', ...: whatever its family serves); 'done' (or the end of stdin) ends it with its peak resident set.
The parent starts the workers one after another, so their compile times do not overlap, and asks them in
turn window by window (`alternate`), so a noisy or shared machine slows every variant alike.
"""

import contextlib
import datetime
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
from typing import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BENCHMARK = os.path.join(ROOT, 'scripts', 'benchmark.py')
# The CPU flags that pick the convolutions and bfloat16 paths (cifar_jax/onednn_conv.py).
CPU_FLAGS = ('avx512f', 'avx512_bf16', 'amx_bf16')
PACKAGES = ('jax', 'jaxlib', 'flax', 'optax', 'torch', 'onednn-cpu-gomp')


class UsageError(ValueError):
  """A flag's value that cannot run; benchmark.py prints it as its family's usage error (exit 2)."""


# The worker's side --------------------------------------------------------------------------------------


def peak_rss_mb() -> float:
  """This process's peak resident set in MiB (ru_maxrss is in KiB on Linux)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def send(obj) -> None:
  print(json.dumps(obj), flush=True)


def serve(ready: dict, handlers: dict[str, Callable[[], dict]], done: Callable[[], dict] | None = None,
          stdin=None) -> None:
  """Says `ready`, then answers each command line with `handlers[command]()`; 'done', an unknown command or
  the end of stdin ends it with {'peak_rss_mb': ..., **done()}."""
  send({'ready': True, **ready})
  for line in stdin or sys.stdin:
    command = line.strip()
    if command not in handlers:
      break
    send(handlers[command]())
  send({'peak_rss_mb': peak_rss_mb(), **(done() if done else {})})


# The parent's side --------------------------------------------------------------------------------------


def worker_command(family: str, variant: str, flags: list[str]) -> list[str]:
  return [sys.executable, BENCHMARK, family, f'--worker={variant}', *flags]


class Worker:
  """One variant's process: `ready` is what it said when ready; `ask(command)` one answer."""

  def __init__(self, name: str, command: list[str], env: dict | None = None):
    self.name = name
    self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT,
                                 env=env)
    line = self.proc.stdout.readline()
    if not line:
      sys.exit(f'{name}: the worker failed to start (exit {self.proc.wait()})')
    self.ready = json.loads(line)

  def ask(self, command: str) -> dict:
    self.proc.stdin.write(command + '\n')
    self.proc.stdin.flush()
    line = self.proc.stdout.readline()
    if not line:
      sys.exit(f'{self.name}: the worker died (exit {self.proc.wait()})')
    return json.loads(line)

  def finish(self) -> dict:
    """Ends the worker; its last answer (peak_rss_mb and the family's memory figures)."""
    return self.ask('done')

  def close(self) -> None:
    if self.proc.stdin and not self.proc.stdin.closed:
      self.proc.stdin.close()
    try:
      self.proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
      self.proc.kill()


@contextlib.contextmanager
def workers(commands: dict[str, list[str]], env: dict | None = None,
            on_ready: Callable[[Worker], None] | None = None):
  """{name: Worker} started one after another (compiles do not overlap), all ended on the way out."""
  started = {}
  try:
    for name, command in commands.items():
      started[name] = Worker(name, command, env)
      if on_ready:
        on_ready(started[name])
    yield started
  finally:
    for worker in started.values():
      worker.close()


def rotation(names: list, index: int) -> list:
  """`names` starting at its `index`-th (mod its length): window `index`'s turn order."""
  k = index % len(names) if names else 0
  return list(names[k:]) + list(names[:k])


def alternate(names: list, windows: int, measure: Callable, kinds: tuple = (None,), rotate: bool = True,
              on_window: Callable | None = None) -> dict:
  """Window by window, every name takes a turn for each kind: `measure(name)` (or `measure(name, kind)`).

  The turn order rotates by one name a window (`rotate`): the variant timed first after a switch measured
  up to 20 % slower (ResNet18 width 1 on 2 cores), so none may always be first. Returns {name: [values]}
  ({name: {kind: [values]}} with kinds); `on_window(index, samples)` after each window.
  """
  samples = {n: {k: [] for k in kinds} for n in names}
  for index in range(windows):
    order = rotation(names, index) if rotate else list(names)
    for kind in kinds:
      for name in order:
        samples[name][kind].append(measure(name) if kind is None else measure(name, kind))
    if on_window:
      on_window(index, _plain(samples, kinds))
  return _plain(samples, kinds)


def _plain(samples: dict, kinds: tuple) -> dict:
  return {n: s[None] for n, s in samples.items()} if kinds == (None,) else samples


def median(values) -> float:
  return statistics.median(values)


def spread(values) -> dict:
  """The median of `values` and their range."""
  values = list(values)
  return {'median': statistics.median(values), 'min': min(values), 'max': max(values), 'n': len(values)}


# Rows: markdown and JSON --------------------------------------------------------------------------------


def cell(value, digits: int = 1) -> str:
  if value is None:
    return ''
  if isinstance(value, float):
    return f'{value:.{digits}f}'
  return str(value)


def markdown_table(header: list[str], rows: list[list], digits: int = 1) -> str:
  """A markdown table; float cells with `digits` decimals, None as an empty cell."""
  lines = ['| ' + ' | '.join(header) + ' |', '|' + ' --- |' * len(header)]
  lines += ['| ' + ' | '.join(cell(v, digits) for v in row) + ' |' for row in rows]
  return '\n'.join(lines)


def flag_values(args) -> dict:
  """A family's flags as they were given (without the harness's own: the family, the worker)."""
  return {k: v for k, v in vars(args).items() if k not in ('family', 'worker')}


def write_json(path: str, results: dict) -> None:
  """Writes `results` with the machine's fingerprint (under 'fingerprint', unless it has one)."""
  if not path:
    return
  results = {**results, 'fingerprint': results.get('fingerprint') or fingerprint()}
  with open(path, 'w') as f:
    json.dump(results, f, indent=2)
  print(f'wrote {path}')


# The machine's fingerprint ------------------------------------------------------------------------------


def version(package: str):
  try:
    return importlib.metadata.version(package)
  except importlib.metadata.PackageNotFoundError:
    return None


def cpu_info(text: str) -> dict:
  """CPU model name and which of CPU_FLAGS it has, from /proc/cpuinfo's text."""
  model = re.search(r'^model name\s*:\s*(.+)$', text, re.M)
  flags = re.search(r'^flags\s*:\s*(.+)$', text, re.M)
  have = set(flags.group(1).split()) if flags else set()
  return {'cpu_model': model.group(1).strip() if model else (platform.processor() or None),
          'cpu_flags': {flag: flag in have for flag in CPU_FLAGS}}


def memory_gib(text: str) -> float | None:
  """MemTotal from /proc/meminfo's text, in GiB."""
  found = re.search(r'^MemTotal:\s*(\d+) kB', text, re.M)
  return int(found.group(1)) / 2**20 if found else None


def torch_onednn_version() -> str | None:
  """The oneDNN torch bundles, from the header its wheel ships (importing torch would take seconds)."""
  spec = importlib.util.find_spec('torch') if version('torch') else None
  if not spec or not spec.origin:
    return None
  header = _read(os.path.join(os.path.dirname(spec.origin), 'include', 'oneapi', 'dnnl', 'dnnl_version.h'))
  parts = [re.search(rf'#define DNNL_VERSION_{p} (\d+)', header) for p in ('MAJOR', 'MINOR', 'PATCH')]
  return '.'.join(m.group(1) for m in parts) if all(parts) else None


def _read(path: str) -> str:
  try:
    with open(path) as f:
      return f.read()
  except OSError:
    return ''


def fingerprint() -> dict:
  """The machine a number was measured on: CPU model and the flags that matter, cores, memory, versions,
  date."""
  return {
      **cpu_info(_read('/proc/cpuinfo')),
      'cores': os.cpu_count(),
      'memory_gib': memory_gib(_read('/proc/meminfo')),
      'platform': platform.platform(),
      'python': platform.python_version(),
      **{package.replace('-', '_'): version(package) for package in PACKAGES},
      'torch_onednn': torch_onednn_version(),
      'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
  }


def describe(fp: dict) -> str:
  """One line of a fingerprint, for a table's caption."""
  flags = ','.join(flag for flag, have in fp['cpu_flags'].items() if have) or 'none of ' + ','.join(CPU_FLAGS)
  return (f"{fp['cpu_model']} ({flags}), {fp['cores']} cores, {cell(fp['memory_gib'], 0)} GiB; "
          f"JAX {fp['jax']}, torch {fp['torch']} (oneDNN {fp['torch_onednn']}), "
          f"onednn-cpu-gomp {fp['onednn_cpu_gomp']}; {fp['date']}")
