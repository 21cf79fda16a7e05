"""The stages of scripts/gpu/gpu_check.sh; each appends its rows to OUT/results.jsonl the moment it measures
them.

  python scripts/gpu/gpu_stages.py preflight --out=DIR --expect=gpu   # versions, devices; stops on a mismatch
  python scripts/gpu/gpu_stages.py correctness --out=DIR              # precision=highest losses vs the CPU's
  python scripts/gpu/gpu_stages.py jax_step --out=DIR --deadline=T    # the step grid (benchmark.py step)
  python scripts/gpu/gpu_stages.py seeds --out=DIR --deadline=T       # k seeds in one run: benchmark.py seeds
  python scripts/gpu/gpu_stages.py shake --out=DIR --deadline=T       # gated models: benchmark.py shake
  python scripts/gpu/gpu_stages.py train --out=DIR --deadline=T --data=.gpu_data   # cifar-jax on real images
  python scripts/gpu/gpu_stages.py torch --out=DIR --deadline=T --mode=channels_last   # benchmark.py step
  python scripts/gpu/gpu_stages.py summary --out=DIR                  # summary.md from results.jsonl
  JAX_PLATFORMS=cpu python scripts/gpu/gpu_stages.py reference        # rewrites gpu_reference_losses.json

Every row is one JSON line with `stage` and `status`: 'measured' (a measurement), 'skipped', 'failed',
'timeout' or 'wrong_backend' (a cell that did not measure, and why), and gpu_check.sh's stage-end rows
('ok', 'failed', 'timeout', 'skipped'; `end`: true). A stage given --deadline (Unix seconds) stops its
child processes there and records what it had; cells that would not fit are recorded as skipped.

Only the standard library is imported at the top: `summary` must run whatever else is broken.
"""

import argparse
import collections
import datetime
import importlib.metadata
import json
import math
import os
import platform
import signal
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPTS = os.path.join(ROOT, 'scripts')
# The benchmark harness: every measurement here is one of its families.
BENCHMARK = [sys.executable, os.path.join(SCRIPTS, 'benchmark.py')]
RESULTS = 'results.jsonl'
SKIPPED = 75  # a stage's exit status when it had too little time or nothing to run on (gpu_check.sh: skipped)
SUMMARY = 'summary.md'
REFERENCE = os.path.join(SCRIPTS, 'gpu', 'gpu_reference_losses.json')
STAGES = ('preflight', 'correctness', 'jax_step', 'seeds', 'shake', 'train', 'torch_eager', 'torch_compile')
# The correctness check: ResNet9 at width 1/4, float32, XLA's convolutions, one step a call, on
# the step family's synthetic data (the trainer's own compiled Program), seed 0.
CHECK = dict(model='resnet9', width=0.25, batch=32, steps=8, eval_images=256)
PACKAGES = ('jax', 'jaxlib', 'jax-cuda13-plugin', 'jax-cuda12-plugin', 'flax', 'optax', 'orbax-checkpoint',
            'ml_collections', 'numpy', 'pillow', 'torch', 'tensorflow-datasets', 'tensorboardX')
_lock = threading.Lock()
_children = set()  # the process groups of running children, ended with this process (SIGTERM)


def append(out: str, row: dict) -> dict:
  """Appends `row` (with the time) to OUT/results.jsonl at once, flushed to disk."""
  row = {'time': round(time.time(), 1), **row}
  with _lock, open(os.path.join(out, RESULTS), 'a') as f:
    f.write(json.dumps(row) + '\n')
    f.flush()
    os.fsync(f.fileno())
  return row


def read_jsonl(path: str) -> list[dict]:
  """The JSON lines of `path` ([] when missing), skipping a line a kill cut short."""
  if not os.path.isfile(path):
    return []
  rows = []
  with open(path) as f:
    for line in f:
      try:
        rows.append(json.loads(line))
      except ValueError:  # a line cut short by a kill
        pass
  return rows


def read_rows(out: str) -> list[dict]:
  return read_jsonl(os.path.join(out, RESULTS))


def skip(out: str, row: dict) -> None:
  """Records why a stage does not run, says so, and ends it with SKIPPED."""
  append(out, {**row, 'status': 'skipped'})
  print(f'gpu_check: {row["stage"]} skipped: {row["note"]}', flush=True)
  sys.exit(SKIPPED)


def stop(message: str) -> None:
  """Ends the stage with one line on stderr."""
  print(f'gpu_check: {" ".join(str(message).split())}', file=sys.stderr, flush=True)
  sys.exit(3)


def first_line(error: BaseException | str, limit: int = 300) -> str:
  text = str(error).strip().splitlines()
  return (text[0] if text else '')[:limit]


def describe(error: BaseException) -> str:
  """'Type: the first line of the message' (the type alone when the message is empty)."""
  line = first_line(error)
  return f'{type(error).__name__}: {line}' if line else type(error).__name__


def run_logged(cmd, deadline: float, poll=None, on_line=None, env=None):
  """Runs `cmd` until it ends or `deadline`, echoing its output; returns (status, seconds, last lines).

  `poll()` runs every half second and once at the end, `on_line(line)` for each line of output. At the
  deadline the child's process group gets SIGTERM, then SIGKILL 5 s later.
  """
  start = time.time()
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, start_new_session=True)
  _children.add(proc.pid)
  tail = collections.deque(maxlen=40)

  def read():
    for line in proc.stdout:
      sys.stdout.write(line)
      sys.stdout.flush()
      tail.append(line.rstrip('\n'))
      if on_line:
        on_line(line)

  reader = threading.Thread(target=read, daemon=True)
  reader.start()
  status = None
  while proc.poll() is None:
    if poll:
      poll()
    if time.time() > deadline:
      status = 'timeout'
      for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
          os.killpg(proc.pid, sig)
          proc.wait(timeout=5)
          break
        except ProcessLookupError:
          break
        except subprocess.TimeoutExpired:
          continue
      break
    time.sleep(0.5)
  proc.wait()
  _children.discard(proc.pid)
  reader.join(timeout=5)
  if poll:
    poll()
  return status or ('ok' if proc.returncode == 0 else 'failed'), time.time() - start, list(tail)


def _end_children(signum, frame) -> None:
  """SIGTERM (gpu_check.sh's timeout): the children run in sessions of their own, so end them too."""
  del frame
  for pid in list(_children):
    try:
      os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
      pass
  sys.exit(128 + signum)


def _note(tail: list[str]) -> str:
  """The child's last line that says something (its error, usually)."""
  lines = [line for line in tail if line.strip()]
  errors = [line for line in lines if 'error' in line.lower() or line.startswith(('gpu_check', 'cifar-jax'))]
  return first_line((errors or lines or [''])[-1])


def _version(package: str):
  try:
    return importlib.metadata.version(package)
  except importlib.metadata.PackageNotFoundError:
    return None


def _jax_backend(expect: str) -> str:
  return 'gpu' if expect == 'gpu' else 'cpu'


def _torch_backend(expect: str) -> str:
  return 'cuda' if expect == 'gpu' else 'cpu'


def precision_label(dtype: str, expect: str, framework: str) -> str:
  """What a dtype computes in: both frameworks' float32 convolutions are TF32 on Hopper by default."""
  if dtype == 'bfloat16':
    return 'bfloat16 (float32 params)'
  if expect != 'gpu':
    return 'float32'
  if framework == 'jax':
    return "float32/TF32 (XLA's default precision)"
  return 'float32/TF32 (cudnn.allow_tf32)'


# preflight -------------------------------------------------------------------------------------------------


def preflight(args) -> None:
  """Versions, devices and settings; stops with one line unless JAX's backend is the one expected."""
  platforms = os.environ.get('JAX_PLATFORMS', '')
  try:
    import jax  # pylint: disable=g-import-not-at-top
    devices = jax.devices()
    backend = jax.default_backend()
  except Exception as e:  # pylint: disable=broad-except
    plugins = sorted(p.name for p in importlib.metadata.entry_points(group='jax_plugins')) or ['none']
    stop(f'JAX could not start a backend (JAX_PLATFORMS={platforms!r}, JAX plugins installed: '
         f'{", ".join(plugins)}): {describe(e)}; stopping before measuring anything')
  want = _jax_backend(args.expect)
  if backend != want:
    stop(f'JAX runs on {backend} ({devices[0].device_kind}), expected {want} (GPU_CHECK_BACKEND='
         f'{args.expect}, JAX_PLATFORMS={platforms!r}); stopping before measuring anything')
  row = {'stage': 'preflight', 'status': 'measured', 'expect': args.expect, 'jax_backend': backend,
         'jax_devices': [str(d) for d in devices], 'device_kind': devices[0].device_kind,
         'device_count': len(devices), 'jax_platforms': platforms,
         'jax_default_matmul_precision': str(getattr(jax.config, 'jax_default_matmul_precision', None)),
         'xla_flags': os.environ.get('XLA_FLAGS', ''), 'python': platform.python_version(),
         'versions': {p: _version(p) for p in PACKAGES}, 'cpu_count': os.cpu_count(),
         'compile_cache': os.environ.get('JAX_COMPILATION_CACHE_DIR', '')}
  cache = row['compile_cache']
  row['compile_cache_entries'] = len(os.listdir(cache)) if cache and os.path.isdir(cache) else 0
  try:
    stats = devices[0].memory_stats() or {}
    row['device_memory_gib'] = round(stats.get('bytes_limit', 0) / 2**30, 1) or None
  except Exception:  # pylint: disable=broad-except
    row['device_memory_gib'] = None
  try:
    row['nvidia_smi'] = subprocess.run(['nvidia-smi', '-L'], capture_output=True, text=True, timeout=20,
                                       check=False).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    row['nvidia_smi'] = None
  want_torch = _torch_backend(args.expect)
  try:
    import torch  # pylint: disable=g-import-not-at-top
    cuda = torch.cuda.is_available()
    row.update(torch_backend='cuda' if cuda else 'cpu', torch_cuda=torch.version.cuda,
               torch_device=torch.cuda.get_device_name(0) if cuda else 'cpu',
               cudnn=torch.backends.cudnn.version() if cuda else None,
               torch_cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
               torch_matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32)
  except Exception as e:  # pylint: disable=broad-except
    row.update(torch_backend=None, torch_error=describe(e))
  row['torch_ok'] = row['torch_backend'] == want_torch
  try:
    import ml_collections  # pylint: disable=g-import-not-at-top,unused-import  # noqa: F401
    row['ml_collections'] = True
  except ImportError:
    row['ml_collections'] = False
  if args.data:
    manifest = os.path.join(args.data, 'manifest.json')
    try:
      with open(manifest) as f:
        m = json.load(f)
      row['data'] = {'path': args.data, 'count': m.get('count'), 'strips': len(m.get('strips', []))}
    except (OSError, ValueError, AttributeError, TypeError) as e:  # the train stage will say more
      row['data'] = {'path': args.data, 'unreadable': describe(e)}
  append(args.out, row)
  print(f'preflight: JAX {jax.__version__} on {backend} ({devices[0].device_kind} x{len(devices)}); torch '
        f'{row.get("torch_backend")} ({row.get("torch_device", row.get("torch_error"))})', flush=True)
  if not row['torch_ok']:
    print(f'gpu_check: torch runs on {row["torch_backend"]}, expected {want_torch}: the torch stages will '
          'be skipped', flush=True)


# correctness -------------------------------------------------------------------------------------------


def check_losses(precision: str, dtype: str = 'float32', conv: str = 'xla', devices: int = 1) -> dict:
  """Per-step train losses and the final eval loss of CHECK's run, compiled under `precision`."""
  sys.path.insert(0, ROOT)
  sys.path.insert(0, SCRIPTS)
  import jax  # pylint: disable=g-import-not-at-top

  from bench import step  # pylint: disable=g-import-not-at-top
  from cifar_jax import parallel  # pylint: disable=g-import-not-at-top
  from configs import default  # pylint: disable=g-import-not-at-top

  config = default.get_config()
  config.model.name, config.model.width_multiplier = CHECK['model'], CHECK['width']
  config.model.dtype, config.model.conv = dtype, conv
  config.batch_size, config.eval_batch_size, config.steps_per_dispatch = CHECK['batch'], 128, 1
  par = parallel.create('jit', devices=jax.devices()[:devices])
  with jax.default_matmul_precision(precision):
    run, state, acc, compiled = step.synthetic_step(config, par, CHECK['batch'], CHECK['eval_images'])
    losses, total = [], 0.0
    for _ in range(CHECK['steps']):
      state, acc = run(state, acc, 1)
      now = float(acc['loss_sum'])
      losses.append((now - total) / CHECK['batch'])
      total = now
    sums = jax.device_get(compiled.evaluate(state))
  return {'train_losses': losses, 'eval_loss': float(sums['loss_sum']) / float(sums['count'])}


def max_relative_difference(a: dict, b: dict) -> float:
  xs = a['train_losses'] + [a['eval_loss']]
  ys = b['train_losses'] + [b['eval_loss']]
  return max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(xs, ys))


def correctness(args) -> None:
  """CHECK's losses at precision=highest against the CPU's (gpu_reference_losses.json); then at default."""
  with open(args.reference) as f:
    reference = json.load(f)
  if reference['check'] != CHECK:
    stop(f'{args.reference} was computed for {reference["check"]}, not {CHECK}: rerun `reference`')
  rtol = reference['tolerance']['rtol']
  import jax  # pylint: disable=g-import-not-at-top
  start = time.time()
  got = check_losses('highest')
  diff = max_relative_difference(got, reference)
  ok = diff <= rtol and all(math.isfinite(x) for x in got['train_losses'])
  append(args.out, {'stage': 'correctness', 'status': 'measured', 'precision': 'highest', 'passed': ok,
                    'max_rel_diff': diff, 'rtol': rtol, **got, 'reference': reference['train_losses'],
                    'reference_eval_loss': reference['eval_loss'], 'backend': jax.default_backend(),
                    'seconds': time.time() - start})
  print(f'correctness: precision=highest, max relative difference to the CPU {diff:.2e} (tolerance '
        f'{rtol:.0e}): {"passed" if ok else "FAILED"}', flush=True)
  if jax.default_backend() == 'cpu':
    print('correctness: the default precision is float32 on the CPU: not run again', flush=True)
  elif time.time() + (time.time() - start) < args.deadline:  # informative: what TF32 does
    default = check_losses('default')
    append(args.out, {'stage': 'correctness', 'status': 'measured', 'precision': 'default',
                      'max_rel_diff': max_relative_difference(default, reference), **default})
    print(f'correctness: default precision (TF32 on Hopper), max relative difference '
          f'{max_relative_difference(default, reference):.2e} (informative)', flush=True)
  if not ok:
    sys.exit(1)


def reference(args) -> None:
  """Writes gpu_reference_losses.json: CHECK's losses on this CPU, and the spreads that set its tolerance."""
  # Two virtual CPU devices for the spread of another summation order (set before JAX starts).
  os.environ['XLA_FLAGS'] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=2"
  import jax  # pylint: disable=g-import-not-at-top
  if jax.default_backend() != 'cpu':
    stop('the reference losses are computed on the CPU (JAX_PLATFORMS=cpu)')
  base = check_losses('highest')
  order = max_relative_difference(check_losses('highest', devices=2), base)
  bf16 = max_relative_difference(check_losses('highest', dtype='bfloat16'), base)
  why = (f'float32 in another summation order (the batch split over 2 CPU devices) moved the losses by '
         f'{order:.1e}, bfloat16 compute by {bf16:.1e}; rtol {args.rtol:.0e} lies between, '
         f'{args.rtol / max(order, 1e-12):.0f}x the first, so that a GPU computing float32 in its own order '
         'passes and an error the size of bfloat16 rounding fails. TF32 (10 mantissa bits to bfloat16\'s 7, '
         'about 8x finer) is not what this checks: the default-precision run reports it.')
  out = {'command': 'JAX_PLATFORMS=cpu python scripts/gpu/gpu_stages.py reference', 'check': CHECK,
         'precision': 'highest', 'jax': jax.__version__, 'flax': _version('flax'),
         'machine': platform.processor() or platform.machine(),
         'date': datetime.date.today().isoformat(), **base,
         'spread': {'float32, batch over 2 CPU devices': order, 'bfloat16 compute': bf16},
         'tolerance': {'rtol': args.rtol, 'on': 'max over the 8 train losses and the eval loss of '
                       '|loss - reference| / |reference|', 'why': why}}
  with open(args.write, 'w') as f:
    json.dump(out, f, indent=1)
    f.write('\n')
  print(json.dumps(out, indent=1))


# the JAX step grid, and torch: benchmark.py step ---------------------------------------------------


def _cells(args):
  return [(dtype, batch) for batch in args.batches.split(',') for dtype in args.dtypes.split(',')]


def _benchmark_cells(args, stage: str, variant: str, extra: list[str], framework: str) -> int:
  """benchmark.py step once per (dtype, batch) cell, a row for each as soon as it ends; the cells measured."""
  measured = 0
  want = _jax_backend(args.expect) if framework == 'jax' else _torch_backend(args.expect)
  for dtype, batch in _cells(args):
    cell = {'stage': stage, 'dtype': dtype, 'batch': int(batch), 'model': args.model, 'width': args.width,
            'precision': precision_label(dtype, args.expect, framework)}
    left = args.deadline - time.time()
    if left < args.min_cell_s:
      append(args.out, {**cell, 'status': 'skipped', 'note': f'{left:.0f} s left, a cell needs '
                        f'{args.min_cell_s:.0f} s'})
      continue
    path = os.path.join(args.work, f'{stage}_{dtype}_{batch}.json')
    if os.path.exists(path):
      os.remove(path)
    cmd = BENCHMARK + ['step', f'--model={args.model}',
           f'--width={args.width}', f'--batch={batch}', f'--dtype={dtype}', f'--windows={args.windows}',
           f'--steps={args.steps}', f'--json={path}'] + extra
    status, seconds, tail = run_logged(cmd, min(args.deadline, time.time() + args.cell_cap_s))
    if status != 'ok' or not os.path.isfile(path):
      append(args.out, {**cell, 'status': status if status != 'ok' else 'failed', 'seconds': seconds,
                        'note': _note(tail)})
      continue
    with open(path) as f:
      result = json.load(f)
    r = result[variant]
    backend = result['machine']['backends'][variant]
    row = {**cell, 'status': 'measured' if backend == want else 'wrong_backend', 'backend': backend,
           'compile_s': r['compile_seconds'], 'train_ips': r['train_images_per_second'],
           'eval_ips': r['eval_images_per_second'], 'peak_mb': r['peak_memory_mb'],
           'peak_source': r['peak_memory_source'], 'train_windows': r['train_windows'],
           'devices': r['devices'], 'seconds': seconds, 'steps': args.steps, 'windows': args.windows}
    append(args.out, row)
    if backend != want:
      print(f'gpu_check: {variant} ran on {backend}, expected {want}: its numbers are not kept', flush=True)
      return measured
    measured += 1
  return measured


def jax_step(args) -> None:
  """The trainer's compiled step (benchmark.py step's jax variant) for each dtype and batch."""
  if not _benchmark_cells(args, 'jax_step', 'jax', ['--torch_modes='], 'jax'):
    sys.exit(1)


def torch_stage(args) -> None:
  """benchmark.py step's torch variant `--mode` for each dtype and batch; skipped when torch lacks the
  device."""
  stage = 'torch_compile' if args.mode.startswith('compile') else 'torch_eager'
  pre = [r for r in read_rows(args.out) if r.get('stage') == 'preflight' and r.get('status') == 'measured']
  if pre and not pre[-1].get('torch_ok'):
    skip(args.out, {'stage': stage, 'note': f'torch runs on {pre[-1].get("torch_backend")}, expected '
                                            f'{_torch_backend(args.expect)}'})
  variant = 'torch' if args.mode == 'eager' else f'torch_{args.mode}'
  if not _benchmark_cells(args, stage, variant, ['--no_jax', f'--torch_modes={args.mode}'], 'torch'):
    sys.exit(1)


# seeds and the end-to-end run ----------------------------------------------------------------------------


def seeds(args) -> None:
  """benchmark.py seeds for k in --seeds: a row for each k as soon as its run ends."""
  workdir = os.path.join(args.work, 'seeds')
  ks = [int(k) for k in args.seeds.split(',')]
  cmd = BENCHMARK + ['seeds', '--config=configs/one_cycle.py',
         f'--seeds={args.seeds}', f'--epochs={args.epochs}', '--rounds=1', f'--workdir={workdir}',
         f'--set=model.name={args.model}', f'--set=model.width_multiplier={args.width}',
         f'--set=batch_size={args.batch}', '--set=data.source=synthetic',
         f'--set=data.synthetic_train_size={args.train_size}', f'--set=data.synthetic_eval_size={args.batch}']
  done = []

  def on_line(line):
    if line.startswith('k=') and 'images/s' in line:
      k = int(line.split(':')[0][2:])
      records = read_jsonl(os.path.join(workdir, f'k{k}', 'metrics.jsonl'))
      ips = float(line.split(':')[1].split()[0])
      append(args.out, {'stage': 'seeds', 'status': 'measured', 'k': k, 'images_per_second': ips,
                        'per_seed': ips / k, 'epochs': args.epochs, 'train_size': args.train_size,
                        'batch': args.batch, 'model': args.model, 'width': args.width,
                        'compile_s': records[0].get('compile_seconds') if records else None,
                        'eval_accuracy': records[-1].get('eval_accuracy') if records else None})
      done.append(k)

  status, seconds, tail = run_logged(cmd, args.deadline, on_line=on_line)
  for k in ks:
    if k not in done:
      append(args.out, {'stage': 'seeds', 'k': k, 'status': status if status != 'ok' else 'failed',
                        'note': _note(tail)})
  if status != 'ok':
    sys.exit(1)


def shake(args) -> None:
  """benchmark.py shake: images/s of each gated model (Shake-Shake-26 2xNd, ResNet18 + ShakeDrop) and its
  step against the same network without gates; a row per pair."""
  path = os.path.join(args.work, 'shake.json')
  if os.path.exists(path):
    os.remove(path)
  cmd = BENCHMARK + ['shake', f'--pairs={args.pairs}',
         f'--batch={args.batch}', f'--windows={args.windows}', f'--steps={args.steps}', f'--json={path}']
  status, seconds, tail = run_logged(cmd, args.deadline)
  if status != 'ok' or not os.path.isfile(path):
    append(args.out, {'stage': 'shake', 'status': status if status != 'ok' else 'failed', 'seconds': seconds,
                      'note': _note(tail)})
    sys.exit(1)
  with open(path) as f:
    result = json.load(f)
  for pair in result['pairs']:
    append(args.out, {'stage': 'shake', 'status': 'measured', 'model': pair['label'], 'batch': args.batch,
                      'backend': result['machine']['backend'],
                      'images_per_second': pair['gated_images_per_second'],
                      'gated_over_plain': pair['gated_over_plain'], 'plain_step_s': pair['plain_step_s'],
                      'gated_step_s': pair['gated_step_s'], 'seconds': seconds})


def _estimate(args, n_train: int, n_eval: int, dtype: str = 'float32') -> tuple[float, float, str]:
  """(seconds an epoch, seconds to start and compile, from what) for the end-to-end run in `dtype`."""
  cells = [r for r in read_rows(args.out) if r.get('stage') == 'jax_step' and r.get('status') == 'measured'
           and r.get('dtype') == dtype]
  if cells:
    cell = min(cells, key=lambda r: abs(r['batch'] - args.batch))
    epoch = n_train / cell['train_ips'] * 1.25 + n_eval / cell['eval_ips'] + 1.0
    return epoch, 15.0 + 1.5 * cell['compile_s'], f'the jax_step cell {dtype} batch {cell["batch"]}'
  if dtype != 'float32':  # no cell of its own: as float32's
    return _estimate(args, n_train, n_eval)
  return n_train / args.guess_ips + 1.0, args.guess_start_s, f'a guess of {args.guess_ips:.0f} img/s'


def train_plan(args, n_train: int, n_eval: int, left: float) -> tuple[list[str], int, list[tuple]]:
  """(dtypes, epochs, estimates): the same number of epochs in every dtype of --dtypes when all fit in
  `left` seconds (float32 first), else float32 alone with as many epochs as fit; `_estimate` of each."""
  dtypes = [d for d in args.dtypes.split(',') if d]
  dtypes = ['float32'] + [d for d in dtypes if d != 'float32']
  estimates = [_estimate(args, n_train, n_eval, d) for d in dtypes]
  epochs = int((left - sum(e[1] for e in estimates)) / sum(e[0] for e in estimates))
  if len(dtypes) > 1 and epochs < 1:
    dtypes, estimates = dtypes[:1], estimates[:1]
    epochs = int((left - estimates[0][1]) / estimates[0][0])
  return dtypes, min(args.max_epochs, epochs), estimates


def train(args) -> None:
  """`cifar-jax` with one-cycle on the real images of --data, as many epochs as the deadline allows: in
  float32, and in the other --dtypes (bfloat16) for the same epochs when they fit too, so that the summary
  sets their accuracies side by side."""
  manifest = os.path.join(args.data, 'manifest.json')
  if not os.path.isfile(manifest):
    skip(args.out, {'stage': 'train', 'note': f'no {manifest}: run python scripts/gpu/gpu_bundle.py and '
                                              'carry .gpu_data'})
  with open(manifest) as f:
    bundle = json.load(f)
  count = bundle['count']
  # The training set a whole number of batches (one compiled step), the rest held out for evaluation.
  n_train = (count - args.eval_size) // args.batch * args.batch
  n_eval = count - n_train
  if n_train < args.batch:
    skip(args.out, {'stage': 'train', 'note': f'{count} images in {args.data}: too few for a batch of '
                                              f'{args.batch} and {args.eval_size} held out'})
  left = args.deadline - time.time()
  dtypes, epochs, estimates = train_plan(args, n_train, n_eval, left)
  (epoch_s, start_s, _), basis = estimates[0], '; '.join(e[2] for e in estimates)
  source = bundle.get('source', {})
  plan = {'stage': 'train', 'images': count, 'train_images': n_train, 'eval_images': n_eval,
          'source': 'synthetic' if 'synthetic' in source else source.get('file', '?'),
          'batch': args.batch, 'model': args.model, 'width': args.width, 'dtypes': dtypes,
          'estimate': {'epoch_s': round(epoch_s, 1), 'start_s': round(start_s, 1), 'basis': basis}}
  if epochs < 1:
    skip(args.out, {**plan, 'note': f'{left:.0f} s left; one epoch needs about {start_s + epoch_s:.0f} s '
                                    f'({basis})'})
  append(args.out, {**plan, 'status': 'planned', 'epochs': epochs})
  print(f'train: {epochs} epochs of {n_train} real images (eval on {n_eval}) in {", ".join(dtypes)}, about '
        f'{epoch_s:.1f} s an epoch and {start_s:.0f} s to start in float32 ({basis})', flush=True)
  for dtype in dtypes:
    _train_run(args, dtype, epochs, n_eval)


def _train_run(args, dtype: str, epochs: int, n_eval: int) -> None:
  workdir = os.path.join(args.work, 'train' if dtype == 'float32' else f'train_{dtype}')
  cmd = [sys.executable, '-m', 'cifar_jax.main', '--config=configs/one_cycle.py', f'--workdir={workdir}',
         f'--config.num_epochs={epochs}', '--config.data.source=images', f'--config.data.path={args.data}',
         f'--config.data.validation_size={n_eval}', f'--config.batch_size={args.batch}',
         f'--config.model.name={args.model}', f'--config.model.width_multiplier={args.width}',
         f'--config.model.dtype={dtype}', '--config.progress_bar=False']
  seen = []

  def poll():
    for record in read_jsonl(os.path.join(workdir, 'metrics.jsonl'))[len(seen):]:
      seen.append(record)
      keep = ('epoch', 'train_loss', 'train_accuracy', 'eval_loss', 'eval_accuracy', 'images_per_second',
              'elapsed_seconds', 'compile_seconds', 'learning_rate')
      append(args.out, {'stage': 'train', 'status': 'measured', 'of_epochs': epochs, 'dtype': dtype,
                        **{k: record[k] for k in keep if k in record}})

  status, seconds, tail = run_logged(cmd, args.deadline, poll=poll)
  if status != 'ok':
    append(args.out, {'stage': 'train', 'status': status, 'dtype': dtype, 'epochs_done': len(seen),
                      'seconds': seconds, 'note': _note(tail)})
    sys.exit(1)


# stage ends and the summary ------------------------------------------------------------------------------


def record(args) -> None:
  """gpu_check.sh's row at the end of a stage."""
  append(args.out, {'stage': args.stage, 'status': args.status, 'end': True, 'seconds': args.seconds,
                    'rc': args.rc, 'note': args.note})


def _fmt(value, digits=0) -> str:
  if value is None:
    return ''
  if isinstance(value, float):
    return f'{value:,.{digits}f}'
  return str(value)


def _cell_name(row: dict) -> str:
  parts = [row['stage'], row.get('dtype'), f'batch {row["batch"]}' if 'batch' in row else None,
           f'k = {row["k"]}' if 'k' in row else None]
  return ' '.join(p for p in parts if p)


def _table(header: list[str], rows: list[list]) -> list[str]:
  return (['| ' + ' | '.join(header) + ' |', '|' + ' --- |' * len(header)] +
          ['| ' + ' | '.join(_fmt(c) if not isinstance(c, str) else c for c in row) + ' |' for row in rows])


def summarize(out: str, stopped: str = '', started: float = 0.0, deadline_s: float = 0.0,
              exit_status: int = 0, smoke: bool = False) -> str:
  """summary.md's text from results.jsonl."""
  rows = read_rows(out)
  by_stage = collections.defaultdict(list)
  for r in rows:
    by_stage[r.get('stage')].append(r)
  measured = lambda stage: [r for r in by_stage[stage] if r.get('status') == 'measured' and not r.get('end')]
  pre = (measured('preflight') or [{}])[-1]
  elapsed = time.time() - started if started else None
  lines = ['# gpu_check' + (' (smoke: tiny sizes, on the CPU)' if smoke else ''), '']
  if pre:
    v = pre.get('versions', {})
    lines.append(f'{pre.get("device_kind")} x{pre.get("device_count")} ({pre.get("jax_backend")}), JAX '
                 f'{v.get("jax")}, flax {v.get("flax")}, torch {v.get("torch")} on '
                 f'{pre.get("torch_device", pre.get("torch_backend"))}, Python {pre.get("python")}; '
                 f'persistent compilation cache {pre.get("compile_cache")} '
                 f'({pre.get("compile_cache_entries")} entries at the start).')
  if elapsed is not None:
    lines.append(f'Ran {elapsed:.0f} s of a {deadline_s:.0f} s deadline; exit status {exit_status}.')
  if stopped:
    return '\n'.join(lines + ['', f'**Stopped before measuring anything:** {stopped}']) + '\n'
  lines += ['', '## Stages', '']
  ends = {r['stage']: r for r in rows if r.get('end')}
  lines += _table(['stage', 'status', 'seconds', 'rows measured', 'note'], [
      [s, ends[s]['status'] if s in ends else 'not run', _fmt(ends.get(s, {}).get('seconds')),
       str(len(measured(s))), (ends.get(s, {}).get('note') or '').replace('|', '/')[:200]] for s in STAGES])
  skipped = [r for r in rows if not r.get('end') and r.get('status') not in ('measured', 'planned')]
  if skipped:
    lines += ['', 'Cells not measured:', '']
    lines += [f'- {_cell_name(r)}: {r["status"]}{" (" + r["note"] + ")" if r.get("note") else ""}'
              for r in skipped]
  checks = measured('correctness')
  if checks:
    lines += ['', '## Correctness: train and eval losses against the CPU', '']
    lines += _table(['precision', 'max relative difference', 'tolerance', 'result'], [
        [r['precision'], f'{r["max_rel_diff"]:.2e}', f'{r["rtol"]:.0e}' if 'rtol' in r else '',
         ('passed' if r['passed'] else '**FAILED**') if 'passed' in r else 'informative'] for r in checks])
  lines += ['', '## The JAX train step (the trainer\'s compiled Program, synthetic data on the device)', '']
  jax_cells = measured('jax_step')
  torch_cells = measured('torch_eager') + measured('torch_compile')
  lines += _table(['framework', 'variant', 'precision', 'batch', 'compile s', 'train img/s', 'eval img/s',
                   'peak MiB', 'JAX / this (train)'], [
      ['jax', 'jit', r['precision'], r['batch'], _fmt(r['compile_s'], 1), r['train_ips'], r['eval_ips'],
       r['peak_mb'], ''] for r in jax_cells] + [
      ['torch', r['stage'].replace('torch_', '') + ', channels_last', r['precision'], r['batch'],
       _fmt(r['compile_s'], 1), r['train_ips'], r['eval_ips'], r['peak_mb'],
       next((f'{j["train_ips"] / r["train_ips"]:.2f}x' for j in jax_cells
             if (j['dtype'], j['batch']) == (r['dtype'], r['batch'])), '')] for r in torch_cells])
  lines += ['', 'float32 is labelled float32/TF32 on a GPU: XLA\'s default precision and torch\'s '
            'cudnn.allow_tf32 (on by default) both run float32 convolutions in TF32 on Hopper. torch runs '
            'channels_last with cudnn.benchmark. Peak memory: JAX memory_stats / '
            'torch.cuda.max_memory_allocated on a GPU, the process RSS on the CPU.']
  seed_rows = measured('seeds')
  if seed_rows:
    base = seed_rows[0]
    lines += ['', '## Seeds in one run (benchmark.py seeds, synthetic data)', '']
    lines += _table(['k', 'images/s, all seeds', 'per seed', 'epoch time vs k = 1', 'compile s'], [
        [r['k'], r['images_per_second'], r['per_seed'],
         f'{(r["k"] / r["images_per_second"]) / (base["k"] / base["images_per_second"]):.2f}x',
         _fmt(r.get('compile_s'), 1)] for r in seed_rows])
  shake_rows = measured('shake')
  if shake_rows:
    lines += ['', '## Shake-Shake and ShakeDrop (benchmark.py shake, the trainer\'s step, float32)', '']
    lines += _table(['model', 'batch', 'images/s', 'step vs the same net without gates'], [
        [r['model'], r['batch'], r['images_per_second'], f'{r["gated_over_plain"]:.3f}x']
        for r in shake_rows])
  epochs = measured('train')
  plan = next((r for r in by_stage['train'] if r.get('status') == 'planned'), None)
  if plan or epochs:
    where = 'synthetic images' if (plan or {}).get('source') == 'synthetic' else 'real CIFAR-10 images'
    lines += ['', f'## cifar-jax end to end on {where} from the bundle (one-cycle)', '']
    if plan:
      lines.append(f'{plan["train_images"]} training images, {plan["eval_images"]} held out; '
                   f'{plan["epochs"]} epochs planned in {", ".join(plan.get("dtypes", ["float32"]))} from '
                   f'{plan["estimate"]["basis"]}.')
      lines.append('')
    lines += _table(['dtype', 'epoch', 'train loss', 'eval accuracy', 'images/s', 'elapsed s'], [
        [r.get('dtype', 'float32'), r.get('epoch'), _fmt(r.get('train_loss'), 4),
         _fmt(r.get('eval_accuracy'), 4), r.get('images_per_second'), _fmt(r.get('elapsed_seconds'), 1)]
        for r in epochs])
  return '\n'.join(lines) + '\n'


def summary(args) -> None:
  text = summarize(args.out, args.stopped, args.started, args.deadline_s, args.exit_status, args.smoke)
  with open(os.path.join(args.out, SUMMARY), 'w') as f:
    f.write(text)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('stage', choices=('preflight', 'correctness', 'reference', 'jax_step', 'torch', 'seeds',
                                        'shake', 'train', 'record', 'summary'))
  parser.add_argument('--out', default=os.environ.get('OUT', '/tmp/gpu_check'))
  parser.add_argument('--work', default='/tmp/gpu_check_work', help='workdirs and scratch files')
  parser.add_argument('--deadline', type=float, default=float('inf'), help='Unix time to stop by')
  parser.add_argument('--expect', default='gpu', choices=('gpu', 'cpu'), help="JAX's backend")
  parser.add_argument('--data', default='', help='the image bundle (scripts/gpu/gpu_bundle.py)')
  parser.add_argument('--model', default='resnet18')
  parser.add_argument('--width', type=float, default=1.0)
  parser.add_argument('--dtypes', default='float32,bfloat16')
  parser.add_argument('--batches', default='128,512')
  parser.add_argument('--batch', type=int, default=128, help='seeds, train')
  parser.add_argument('--windows', type=int, default=3)
  parser.add_argument('--steps', type=int, default=20)
  parser.add_argument('--min_cell_s', type=float, default=30.0)
  parser.add_argument('--cell_cap_s', type=float, default=120.0)
  parser.add_argument('--mode', default='channels_last', help='torch: a benchmark.py step torch mode')
  parser.add_argument('--seeds', default='1,4')
  parser.add_argument('--pairs', default='shake_shake:96,resnet18:1',
                      help='shake: benchmark.py shake --pairs')
  parser.add_argument('--epochs', type=int, default=2, help='seeds')
  parser.add_argument('--train_size', type=int, default=12800, help='seeds: synthetic images')
  parser.add_argument('--eval_size', type=int, default=5000, help='train: images held out, at least')
  parser.add_argument('--max_epochs', type=int, default=20, help='train')
  parser.add_argument('--guess_ips', type=float, default=5000.0, help='train: img/s without a jax_step row')
  parser.add_argument('--guess_start_s', type=float, default=90.0)
  parser.add_argument('--reference', default=REFERENCE)
  parser.add_argument('--write', default=REFERENCE, help='reference: the file to write')
  parser.add_argument('--rtol', type=float, default=1e-4, help='reference: the tolerance to write')
  parser.add_argument('--stage_name', dest='stage_name', default='')
  parser.add_argument('--status', default='')
  parser.add_argument('--seconds', type=float, default=0.0)
  parser.add_argument('--rc', type=int, default=0)
  parser.add_argument('--note', default='')
  parser.add_argument('--stopped', default='')
  parser.add_argument('--started', type=float, default=0.0)
  parser.add_argument('--deadline_s', type=float, default=0.0)
  parser.add_argument('--exit_status', type=int, default=0)
  parser.add_argument('--smoke', action='store_true')
  args = parser.parse_args()
  os.makedirs(args.out, exist_ok=True)
  os.makedirs(args.work, exist_ok=True)
  signal.signal(signal.SIGTERM, _end_children)
  if args.stage == 'record':
    args.stage = args.stage_name
    record(args)
    return
  {'preflight': preflight, 'correctness': correctness, 'reference': reference, 'jax_step': jax_step,
   'torch': torch_stage, 'seeds': seeds, 'shake': shake, 'train': train, 'summary': summary}[args.stage](args)


if __name__ == '__main__':
  main()
