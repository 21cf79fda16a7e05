"""Whole processes, taking turns: `cifar-jax` with a cold and a warm compilation cache against the PyTorch
reference (scripts/compare_frameworks.py --only=torch), one short run of the same config each.

  python scripts/benchmark.py startup --repeats=3 --out=/tmp/bench_startup.json

The data: the first `--num_train` images of ../shared/data/cifar10/cifar10_train.npz as the training set
and the next `--num_test` as its test set, written to a temporary npz. Each round runs every variant once,
in a rotated order (one round of warm-up first, not counted); a cold run gets an empty cache folder, a warm
run the folder its variant filled. Reports the median wall time of each variant, the epoch's images/s,
and for JAX the start-up split the run logged (imports, devices, data, init, compile).

`--before=TREE` adds `jax_before`: `cifar-jax` from another checkout (an older commit, e.g. made with
`git worktree add /tmp/before COMMIT`), for its steady-state epoch speed beside today's;
`--variants` picks which variants run.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

from bench import harness

DATA = os.path.join(harness.ROOT, '..', 'shared', 'data', 'cifar10', 'cifar10_train.npz')
STARTUP = re.compile(r'Start-up ([\d.]+) s before the first step: imports ([\d.]+), devices ([\d.]+), '
                     r'data ([\d.]+), init ([\d.]+), compile ([\d.]+)')
VARIANTS = ('jax_cold', 'jax_warm', 'torch')


def add_flags(parser) -> None:
  parser.add_argument('--config', default='configs/one_cycle.py')
  parser.add_argument('--width', type=float, default=0.25)
  parser.add_argument('--epochs', type=int, default=1)
  parser.add_argument('--num_train', type=int, default=20000)
  parser.add_argument('--num_test', type=int, default=1000)
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--out', default=None, help='JSON with every run')
  parser.add_argument('--before', default=None, help='another checkout: adds the jax_before variant')
  parser.add_argument('--variants', default=','.join(VARIANTS), help='comma-separated')


def make_data(path: str, num_train: int, num_test: int) -> None:
  with np.load(DATA, allow_pickle=False) as f:
    x, y = f['x_train'], f['y_train']
  np.savez(path, x_train=x[:num_train], y_train=y[:num_train],
           x_test=x[num_train:num_train + num_test], y_test=y[num_train:num_train + num_test])


def command(variant: str, args, workdir: str, npz: str, cache: str) -> list[str]:
  """The command line of a variant (run from the repository root, or from --before's tree)."""
  overrides = [f'--config.model.width_multiplier={args.width}', f'--config.num_epochs={args.epochs}',
               '--config.data.source=npz', f'--config.data.path={npz}', '--config.progress_bar=False']
  if variant == 'torch':
    return [sys.executable, 'scripts/compare_frameworks.py', f'--config={args.config}', '--only=torch',
            '--seeds=1', f'--workdir={workdir}', *overrides]
  cache_flag = [] if variant == 'jax_before' else [f'--config.compilation_cache={cache}']
  return [sys.executable, '-m', 'cifar_jax.main', f'--config={args.config}', f'--workdir={workdir}',
          *overrides, *cache_flag]


def run_once(variant: str, args, tmp: str, npz: str, index: int) -> dict:
  workdir = os.path.join(tmp, f'{variant}_{index}')
  cache = os.path.join(tmp, f'cache_{variant}' + (f'_{index}' if variant == 'jax_cold' else ''))
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env.pop('JAX_COMPILATION_CACHE_DIR', None)
  cwd = harness.ROOT
  if variant == 'jax_before':
    cwd = os.path.abspath(args.before)
    env['PYTHONPATH'] = cwd
  start = time.perf_counter()
  result = subprocess.run(command(variant, args, workdir, npz, cache), cwd=cwd, env=env,
                          capture_output=True, text=True, check=False)
  wall = time.perf_counter() - start
  if result.returncode:
    raise RuntimeError(f'{variant} failed:\n{result.stderr[-3000:]}')
  run_dir = os.path.join(workdir, 'torch', 'seed_0') if variant == 'torch' else workdir
  with open(os.path.join(run_dir, 'metrics.jsonl')) as f:
    records = [json.loads(line) for line in f if line.strip()]
  out = {'wall_seconds': wall, 'images_per_second': records[0]['images_per_second'],
         'eval_accuracy': records[-1]['eval_accuracy']}
  match = STARTUP.search(result.stderr)
  if match:
    out.update(zip(('startup', 'imports', 'devices', 'data', 'init', 'compile'),
                   (float(v) for v in match.groups())))
  shutil.rmtree(workdir, ignore_errors=True)
  return out


def main(args) -> None:
  variants = tuple(args.variants.split(',')) + (('jax_before',) if args.before else ())
  bad = [v for v in variants if v not in VARIANTS + ('jax_before',)]
  if bad:
    raise harness.UsageError(f'--variants: unknown {bad}; choose from {list(VARIANTS)}')
  tmp = tempfile.mkdtemp(prefix='bench_startup_')
  npz = os.path.join(tmp, 'data.npz')
  make_data(npz, args.num_train, args.num_test)
  rounds = {'index': 0}

  def measure(variant: str) -> dict:
    r = run_once(variant, args, tmp, npz, rounds['index'])
    print(f'round {rounds["index"]} {variant}: {json.dumps(r)}', flush=True)
    return r

  # round 0 warms the page cache and fills jax_warm's cache; it is not counted
  all_runs = harness.alternate(list(variants), args.repeats + 1, measure,
                               on_window=lambda index, _: rounds.update(index=index + 1))
  runs = {v: rs[1:] for v, rs in all_runs.items()}
  summary = {}
  for variant, rs in runs.items():
    summary[variant] = {key: harness.median(r[key] for r in rs) for key in rs[0]}
  torch_wall = summary['torch']['wall_seconds'] if 'torch' in summary else float('nan')
  print(f'\n{args.config}, width {args.width}, {args.epochs} epoch(s), {args.num_train} train + '
        f'{args.num_test} test images; medians of {args.repeats} rounds\n')
  split = ('startup', 'imports', 'devices', 'data', 'init', 'compile')
  rows = [[variant, s['wall_seconds'], f"{s['wall_seconds'] / torch_wall:.2f}",
           f"{s['images_per_second']:.0f}", *(s.get(k) for k in split)] for variant, s in summary.items()]
  print(harness.markdown_table(['variant', 'wall s', '/ torch', 'epoch img/s', 'start-up s', 'imports',
                                'devices', 'data', 'init', 'compile'], rows))
  if args.out:
    harness.write_json(args.out, {'args': harness.flag_values(args), 'runs': runs, 'summary': summary})
  shutil.rmtree(tmp, ignore_errors=True)
