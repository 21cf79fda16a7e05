"""Trains a list of configs with k seeds each (one vmap-ed run per config) and tabulates mean ± std.

  python scripts/sweep.py --seeds=3 --workdir=runs/sweep                  # every blog experiment
  python scripts/sweep.py --seeds=3 --workdir=runs/sweep_cpu \
      --configs=configs/one_cycle.py,configs/cosine.py \
      --set=num_epochs=3 --set=model.width_multiplier=0.125 --set=data.source=npz \
      --set=data.path=../shared/data/cifar10/cifar10_train.npz --set=data.validation_size=5000

Each config trains with `num_seeds=k` in WORKDIR/<config name>. Writes WORKDIR/sweep.md (per config: final
eval accuracy as mean ± sample std over the seeds, the t-based 95 % interval of the mean, each seed's
figure, and the blog's single-run figure from the config's docstring) and WORKDIR/sweep.png (eval accuracy
against epochs: the seeds' mean and a ±1 std band per config). SWA configs report the SWA model's
accuracy. Resumable: a finished run is kept, an unfinished one resumes from its checkpoint, so a long
sweep can be split (`--configs=...` per session, `--train=False` to only tabulate what exists).
"""

import ast
import datetime
import glob
import importlib.util
import math
import os
import re
import statistics
import sys

from absl import app
from absl import flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command line's flags; only when run as a script (importing this module defines none, so it
  does not clash with cifar_jax.main's --workdir in one process, as in the test suite)."""
  flags.DEFINE_list('configs', None, 'Config files (default: every blog experiment in configs/).')
  flags.DEFINE_integer('seeds', 3, 'Seeds per config (num_seeds): config.seed .. config.seed + seeds - 1.')
  flags.DEFINE_string('workdir', None, 'Where the runs, sweep.md and sweep.png go.')
  flags.DEFINE_multi_string('set', [], 'A config override FIELD=VALUE for every config (repeatable).')
  flags.DEFINE_bool('train', True, 'Train what is missing; False: only tabulate the runs that exist.')
  flags.mark_flag_as_required('workdir')


NOT_EXPERIMENTS = ('__init__.py', 'smoke.py', 'tiny.py')  # configs/ files that are not blog experiments
BLOG_FIGURE = re.compile(r'Blog(?: figure)?: (\d+\.\d+) %')


def blog_configs() -> list[str]:
  """Every experiment config of configs/ (not the smoke and test configs), by name."""
  return sorted(p for p in glob.glob(os.path.join(ROOT, 'configs', '*.py'))
                if os.path.basename(p) not in NOT_EXPERIMENTS)


def load_config(path: str):
  """`get_config()` of a config file, and its module docstring."""
  spec = importlib.util.spec_from_file_location(f'sweep_config_{abs(hash(path))}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(), module.__doc__ or ''


def parse_override(text: str) -> tuple[str, object]:
  """'model.width_multiplier=0.125' -> ('model.width_multiplier', 0.125); unparsable values are strings."""
  name, sep, raw = text.partition('=')
  if not sep or not name:
    raise ValueError(f'--set={text}: expected FIELD=VALUE, e.g. --set=num_epochs=3')
  try:
    value = ast.literal_eval(raw)
  except (ValueError, SyntaxError):
    value = raw
  return name, value


def apply_overrides(config, overrides: list[tuple[str, object]]):
  from cifar_jax import config_lib  # pylint: disable=g-import-not-at-top
  config_lib.check_field_names([name for name, _ in overrides], config, flag='--set')
  for name, value in overrides:
    parent, _, leaf = name.rpartition('.')
    target = config_lib.field_value(config, parent) if parent else config
    if isinstance(target[leaf], float) and isinstance(value, int):
      value = float(value)
    target[leaf] = value
  return config


def blog_figure(docstring: str) -> float | None:
  """The blog's single-run accuracy (%) that a config's docstring quotes, if any."""
  match = BLOG_FIGURE.search(docstring)
  return float(match.group(1)) if match else None


def finished(workdir: str, num_epochs: int) -> bool:
  from cifar_jax import metrics_writer  # pylint: disable=g-import-not-at-top
  records = metrics_writer.read_metrics(workdir)
  return bool(records) and records[-1]['epoch'] >= num_epochs


def train_config(config, workdir: str) -> str:
  """Trains (or resumes) one config's k-seed run unless it has finished; returns what happened."""
  if finished(workdir, config.num_epochs):
    return 'finished, kept'
  from cifar_jax import train  # pylint: disable=g-import-not-at-top
  train.train_and_evaluate(config, workdir)
  return 'trained'


def per_seed(record: dict, key: str) -> list[float]:
  return record.get(f'{key}_per_seed', [record[key]])


def summarize_run(workdir: str) -> dict | None:
  """Final per-seed accuracy (%), the per-epoch curves and the wall time of a run, or None."""
  from cifar_jax import metrics_writer  # pylint: disable=g-import-not-at-top
  records = metrics_writer.read_metrics(workdir)
  if not records:
    return None
  key = 'swa_eval_accuracy' if 'swa_eval_accuracy' in records[-1] else 'eval_accuracy'
  return {'epochs': records[-1]['epoch'], 'key': key,
          'final': [100 * a for a in per_seed(records[-1], key)],
          'curve': [(r['epoch'], [100 * a for a in per_seed(r, 'eval_accuracy')]) for r in records],
          'wall': records[-1]['elapsed_seconds'],
          'images_per_second': statistics.median(r['images_per_second'] for r in records)}


def mean_std_interval(values: list[float]) -> tuple[float, float, float, float]:
  """Mean, sample std (ddof=1) and the t-based 95 % interval of the mean (nan with one value)."""
  from cifar_jax import stats  # pylint: disable=g-import-not-at-top
  mean = statistics.fmean(values)
  if len(values) < 2:
    return mean, float('nan'), float('nan'), float('nan')
  std = statistics.stdev(values)
  half = stats.t_quantile(len(values) - 1) * std / math.sqrt(len(values))
  return mean, std, mean - half, mean + half


def table(rows: list[dict]) -> list[str]:
  """The markdown results table, one row per config."""
  lines = ['| config | schedule | epochs | seeds | final accuracy (%), mean ± std | 95 % interval (%) | '
           'per seed (%) | blog, single run (%) | wall (s) |',
           '| --- | --- | --- | --- | --- | --- | --- | --- | --- |']
  for row in rows:
    s = row['summary']
    if s is None:
      lines.append(f"| {row['name']} | {row['schedule']} | — | — | {row.get('error', 'not run')} | | | "
                   f"{row['blog']} | |")
      continue
    mean, std, lo, hi = mean_std_interval(s['final'])
    swa = ' (SWA)' if s['key'] == 'swa_eval_accuracy' else ''
    lines.append(
        f"| {row['name']} | {row['schedule']} | {s['epochs']} | {len(s['final'])} | "
        f'{mean:.2f} ± {std:.2f}{swa} | [{lo:.2f}, {hi:.2f}] | '
        f"{', '.join(f'{a:.2f}' for a in s['final'])} | {row['blog']} | {s['wall']:.0f} |")
  return lines


def plot(rows: list[dict], path: str) -> None:
  """Eval accuracy against epochs: the seeds' mean and a ±1 sample-std band, one colour per config."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(8, 5))
  for row in rows:
    if row['summary'] is None:
      continue
    epochs = [e for e, _ in row['summary']['curve']]
    means = [statistics.fmean(v) for _, v in row['summary']['curve']]
    stds = [statistics.stdev(v) if len(v) > 1 else 0.0 for _, v in row['summary']['curve']]
    line, = ax.plot(epochs, means, marker='o', label=f"{row['name']} ({len(row['summary']['final'])} seeds)")
    ax.fill_between(epochs, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)],
                    color=line.get_color(), alpha=0.2)
  ax.set_xlabel('epoch')
  ax.set_ylabel('eval accuracy (%): mean, band ±1 std over seeds')
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def device_name() -> str:
  import jax  # pylint: disable=g-import-not-at-top
  d = jax.devices()[0]
  return f'JAX {jax.__version__} {d.platform} ({d.device_kind}) x{jax.device_count()}'


def run_sweep(config_paths: list[str], seeds: int, overrides: list[str], workdir: str,
              train: bool = True, command: str = '') -> list[dict]:
  """Trains (unless `train` is False) and tabulates every config; writes sweep.md and sweep.png."""
  from cifar_jax import config_lib  # pylint: disable=g-import-not-at-top
  from cifar_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  parsed = [parse_override(o) for o in overrides]
  rows = []
  for path in config_paths:
    name = os.path.splitext(os.path.basename(path))[0]
    config, doc = load_config(path)
    figure = blog_figure(doc)
    blog = f'{figure:.2f} ({config.num_epochs} epochs)' if figure is not None else '—'
    row = {'name': name, 'blog': blog, 'schedule': config.schedule.name + (
        ' + SWA' if config.swa.enabled else '')}
    run_dir = os.path.join(workdir, name)
    try:
      config = apply_overrides(config, parsed)
      config.num_seeds = seeds
      config_lib.validate(config)
      if train:
        print(f'{run_dir}: {train_config(config, run_dir)}', flush=True)
    except (config_lib.ConfigError, input_pipeline.DataError) as e:
      print(f'{run_dir}: skipped: {e}', flush=True)
      row['error'] = f'error: {e}'.replace('|', '/')
    row['summary'] = summarize_run(run_dir) if 'error' not in row else None
    rows.append(row)
  os.makedirs(workdir, exist_ok=True)
  lines = [
      '# Sweep: final eval accuracy over seeds', '',
      f'Command: `{command}`' if command else '',
      f'Device: {device_name()}; date {datetime.date.today().isoformat()}; overrides: '
      f"{', '.join(overrides) or 'none'}.",
      'Mean ± sample std (ddof=1) over the seeds; the 95 % interval is mean ± t(0.975, k-1) · std / √k. '
      "The blog's figure is one run at the config's full length.", '',
  ] + table(rows) + ['', '![eval accuracy against epochs](sweep.png)', '']
  with open(os.path.join(workdir, 'sweep.md'), 'w') as f:
    f.write('\n'.join(lines))
  plot(rows, os.path.join(workdir, 'sweep.png'))
  return rows


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}')
  paths = FLAGS.configs or blog_configs()
  from cifar_jax import cpu_backend  # pylint: disable=g-import-not-at-top
  config, _ = load_config(paths[0])
  config = apply_overrides(config, [parse_override(o) for o in FLAGS.set])
  config.num_seeds = FLAGS.seeds
  cpu_backend.configure(config)  # cifar-jax's XLA:CPU settings, before JAX starts
  command = 'python scripts/sweep.py ' + ' '.join(sys.argv[1:])
  run_sweep(paths, FLAGS.seeds, FLAGS.set, FLAGS.workdir, FLAGS.train, command)
  print(os.path.join(FLAGS.workdir, 'sweep.md'))
  print(open(os.path.join(FLAGS.workdir, 'sweep.md')).read())


if __name__ == '__main__':
  define_flags()
  app.run(main)
