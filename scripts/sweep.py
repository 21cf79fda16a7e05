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

On a cluster (docs/cluster.md): `--executor=slurm` submits the runs as one SLURM job array through submitit
(cifar_jax/cluster.py), each task one run in its own workdir as above, and returns; `--wait` blocks until
the array has ended and tabulates. `--seeds_per_task=m` splits each config's seeds into runs of m seeds
(WORKDIR/<config name>/seeds_<first>-<last>: the seeds one k-seed run trains). Run again, the command
keeps finished runs, submits failed ones again and never a run that SLURM still has queued or running;
`--train=False` tabulates at any time, marking the runs that have not finished.

  python scripts/sweep.py --executor=slurm --seeds=10 --seeds_per_task=5 --workdir=runs/study \
      --slurm_partition=gpu --slurm_gpus_per_task=1 --slurm_timeout_min=240
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

from cifar_jax import cluster
from cifar_jax import metrics_writer
from cifar_jax.errors import ConfigError

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command line's flags; only when run as a script (importing this module defines none, so it
  does not clash with cifar_jax.main's --workdir in one process, as in the test suite)."""
  flags.DEFINE_list('configs', None, 'Config files (default: every blog experiment in configs/).')
  flags.DEFINE_integer('seeds', 3, 'Seeds per config (num_seeds): config.seed .. config.seed + seeds - 1.')
  flags.DEFINE_string('workdir', None, 'Where the runs, sweep.md and sweep.png go.')
  flags.DEFINE_multi_string('set', [], 'A config override FIELD=VALUE for every config (repeatable).')
  flags.DEFINE_bool('train', True, 'Train what is missing; False: only tabulate the runs that exist.')
  flags.DEFINE_integer('seeds_per_task', 0, 'Seeds per run (one array task each); 0: all of a config\'s '
                       'seeds in one run.')
  flags.DEFINE_enum('executor', 'inline', ['inline'] + list(cluster.EXECUTORS),
                    'inline: train the runs one after another in this process; slurm: submit them as one '
                    'SLURM job array (submitit) and return; local: as processes of this machine '
                    '(submitit\'s local executor), waiting for them.')
  flags.DEFINE_bool('wait', False, '--executor=slurm: wait until the job array has ended, then tabulate.')
  flags.DEFINE_string('slurm_partition', None, 'SLURM partition (default: the cluster\'s).')
  flags.DEFINE_integer('slurm_timeout_min', 24 * 60, 'Time limit of each task, minutes; 90 s before it the '
                       'task checkpoints and requeues itself.')
  flags.DEFINE_integer('slurm_gpus_per_task', 0, 'GPUs for each task (one run).')
  flags.DEFINE_integer('slurm_cpus_per_task', 0, 'CPUs for each task (0: the cluster\'s default).')
  flags.DEFINE_float('slurm_mem_gb', 0, 'Memory for each task, GB (0: the cluster\'s default).')
  flags.DEFINE_integer('slurm_array_parallelism', 0, 'Tasks of the array running at once (0: all).')
  flags.DEFINE_multi_string('slurm_sbatch', [], 'One more sbatch option, NAME=VALUE or NAME: account=abc, '
                            'qos=high, gres=gpu:1 (repeatable).')
  flags.DEFINE_multi_string('slurm_setup', [], 'A shell line of the batch script before the task starts, '
                            'e.g. "module load cuda" (repeatable).')
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
  records = metrics_writer.read_metrics(workdir)
  return bool(records) and records[-1]['epoch'] >= num_epochs


def train_config(config, workdir: str) -> str:
  """Trains (or resumes) one config's k-seed run unless it has finished; returns what happened."""
  if finished(workdir, config.num_epochs):
    return 'finished, kept'
  from cifar_jax import train  # pylint: disable=g-import-not-at-top
  train.train_and_evaluate(config, workdir)
  return 'trained'


def seed_chunks(seeds: int, seeds_per_task: int) -> list[tuple[int, int]]:
  """(first seed offset, seeds) of each run of a config: one run of all seeds unless split."""
  size = seeds_per_task if 0 < seeds_per_task < seeds else seeds
  return [(first, min(size, seeds - first)) for first in range(0, seeds, size)]


def config_runs(name: str, config, seeds: int, seeds_per_task: int, workdir: str) -> list[cluster.Run]:
  """The runs of one config: WORKDIR/<name> with every seed, or WORKDIR/<name>/seeds_<a>-<b> per chunk.

  A chunk trains seeds config.seed + a .. + b; synthetic images keep the config's seed (data.synthetic_seed),
  so that every chunk sees the data one run of all seeds would.
  """
  chunks = seed_chunks(seeds, seeds_per_task)
  if len(chunks) == 1:
    config.num_seeds = seeds
    return [cluster.Run(name, os.path.join(workdir, name), config)]
  runs = []
  for first, count in chunks:
    chunk = config.copy_and_resolve_references()
    if chunk.data.source == 'synthetic' and chunk.data.get('synthetic_seed', -1) < 0:
      chunk.data.synthetic_seed = config.seed
    chunk.seed, chunk.num_seeds = config.seed + first, count
    folder = f'seeds_{chunk.seed}-{chunk.seed + count - 1}'
    runs.append(cluster.Run(name, os.path.join(workdir, name, folder), chunk))
  return runs


def per_seed(record: dict, key: str) -> list[float]:
  return record.get(f'{key}_per_seed', [record[key]])


def summarize_run(workdir: str) -> dict | None:
  """Final per-seed accuracy (%), the per-epoch curves and the wall time of a run, or None."""
  records = metrics_writer.read_metrics(workdir)
  if not records:
    return None
  key = 'swa_eval_accuracy' if 'swa_eval_accuracy' in records[-1] else 'eval_accuracy'
  return {'epochs': records[-1]['epoch'], 'key': key,
          'final': [100 * a for a in per_seed(records[-1], key)],
          'curve': [(r['epoch'], [100 * a for a in per_seed(r, 'eval_accuracy')]) for r in records],
          'wall': records[-1]['elapsed_seconds'],
          'images_per_second': statistics.median(r['images_per_second'] for r in records)}


def summarize_runs(workdirs: list[str]) -> dict | None:
  """summarize_run over a config's runs (seed chunks), seeds in order: the epochs all of them reached,
  each run's last record, the longest wall time; None until every run has metrics."""
  parts = [summarize_run(w) if os.path.isdir(w) else None for w in workdirs]
  if len(parts) == 1 or None in parts:
    return parts[0] if len(parts) == 1 else None
  common = sorted(set.intersection(*(set(e for e, _ in p['curve']) for p in parts)))
  curve = [(e, [a for p in parts for ep, v in p['curve'] if ep == e for a in v]) for e in common]
  return {'epochs': min(p['epochs'] for p in parts), 'key': parts[0]['key'],
          'final': [a for p in parts for a in p['final']], 'curve': curve,
          'wall': max(p['wall'] for p in parts),
          'images_per_second': statistics.median(p['images_per_second'] for p in parts)}


def mean_std_interval(values: list[float]) -> tuple[float, float, float, float]:
  """Mean, sample std (ddof=1) and the t-based 95 % interval of the mean (nan with one value)."""
  from cifar_jax import stats  # pylint: disable=g-import-not-at-top
  mean = statistics.fmean(values)
  if len(values) < 2:
    return mean, float('nan'), float('nan'), float('nan')
  std = statistics.stdev(values)
  half = stats.t_quantile(len(values) - 1) * std / math.sqrt(len(values))
  return mean, std, mean - half, mean + half


UNFINISHED = ('failed', 'running', 'queued', 'stopped', 'not run')  # the first a row's runs show


def row_status(states: list) -> str:
  """'' when every run of a row has finished; else its least finished state ('failed: DataError: ...',
  'running', ...), and with several runs how many have finished."""
  unfinished = [s for s in states if s.status != 'finished']
  if not unfinished:
    return ''
  worst = min(unfinished, key=lambda s: UNFINISHED.index(s.status))
  text = f'{worst.status}: {worst.error}' if worst.error else worst.status
  if worst.status in ('queued', 'running'):
    text += f' (job {worst.job_id})'
  if len(states) > 1:
    text += f'; {len(states) - len(unfinished)} of {len(states)} runs finished'
  return text.replace('|', '/')


def table(rows: list[dict]) -> list[str]:
  """The markdown results table, one row per config; an unfinished row says so in its epochs cell."""
  lines = ['| config | schedule | epochs | seeds | final accuracy (%), mean ± std | 95 % interval (%) | '
           'per seed (%) | blog, single run (%) | wall (s) |',
           '| --- | --- | --- | --- | --- | --- | --- | --- | --- |']
  for row in rows:
    s, status = row['summary'], row.get('status', '')
    if s is None:
      lines.append(f"| {row['name']} | {row['schedule']} | — | — | {row.get('error') or status or 'not run'} "
                   f"| | | {row['blog']} | |")
      continue
    epochs = f"{s['epochs']} of {row['num_epochs']} ({status})" if status else s['epochs']
    mean, std, lo, hi = mean_std_interval(s['final'])
    swa = ' (SWA)' if s['key'] == 'swa_eval_accuracy' else ''
    lines.append(
        f"| {row['name']} | {row['schedule']} | {epochs} | {len(s['final'])} | "
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
  if any(row['summary'] is not None for row in rows):
    ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def device_name() -> str:
  import jax  # pylint: disable=g-import-not-at-top
  d = jax.devices()[0]
  return f'JAX {jax.__version__} {d.platform} ({d.device_kind}) x{jax.device_count()}'


def plan(config_paths: list[str], seeds: int, overrides: list[str], workdir: str,
         seeds_per_task: int = 0) -> list[dict]:
  """One row per config: its name, schedule and blog figure, and its runs (or the error that stops it:
  an override or config that config_lib.validate refuses)."""
  from cifar_jax import config_lib  # pylint: disable=g-import-not-at-top
  parsed = [parse_override(o) for o in overrides]
  rows = []
  for path in config_paths:
    name = os.path.splitext(os.path.basename(path))[0]
    config, doc = load_config(path)
    figure = blog_figure(doc)
    blog = f'{figure:.2f} ({config.num_epochs} epochs)' if figure is not None else '—'
    row = {'name': name, 'blog': blog, 'runs': [], 'schedule': config.schedule.name + (
        ' + SWA' if config.swa.enabled else '')}
    try:
      config = apply_overrides(config, parsed)
      config.num_seeds = seeds
      config_lib.validate(config)
      row['runs'] = config_runs(name, config, seeds, seeds_per_task, workdir)
      for run in row['runs']:  # a seed chunk's num_seeds, too
        config_lib.validate(run.config)
    except config_lib.ConfigError as e:
      print(f'{os.path.join(workdir, name)}: skipped: {e}', flush=True)
      row['error'] = f'error: {e}'.replace('|', '/')
    row['num_epochs'] = config.num_epochs
    rows.append(row)
  return rows


def train_inline(rows: list[dict]) -> None:
  """Trains every row's runs one after another in this process (a data or config error found while
  training, such as a workdir another run holds, stops only that row)."""
  from cifar_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  for row in rows:
    for run in row['runs']:
      try:
        print(f'{run.workdir}: {train_config(run.config, run.workdir)}', flush=True)
      except (ConfigError, input_pipeline.DataError) as e:
        print(f'{run.workdir}: skipped: {e}', flush=True)
        row['error'] = f'error: {e}'.replace('|', '/')
        break


def tabulate(rows: list[dict], workdir: str, overrides: list[str], command: str = '',
             device: str | None = None) -> None:
  """Writes WORKDIR/sweep.md (the table, each row's state from cluster.run_states) and sweep.png."""
  runs = [run for row in rows for run in row['runs']]
  states = cluster.run_states(runs, workdir)
  for row in rows:
    row['status'] = row_status([states[run.workdir] for run in row['runs']]) if row['runs'] else ''
    row['summary'] = summarize_runs([run.workdir for run in row['runs']]) if 'error' not in row else None
  os.makedirs(workdir, exist_ok=True)
  lines = [
      '# Sweep: final eval accuracy over seeds', '',
      f'Command: `{command}`' if command else '',
      f'Device: {device or device_name()}; date {datetime.date.today().isoformat()}; overrides: '
      f"{', '.join(overrides) or 'none'}.",
      'Mean ± sample std (ddof=1) over the seeds; the 95 % interval is mean ± t(0.975, k-1) · std / √k. '
      "The blog's figure is one run at the config's full length.", '',
  ] + table(rows) + ['', '![eval accuracy against epochs](sweep.png)', '']
  with open(os.path.join(workdir, 'sweep.md'), 'w') as f:
    f.write('\n'.join(lines))
  plot(rows, os.path.join(workdir, 'sweep.png'))


def run_sweep(config_paths: list[str], seeds: int, overrides: list[str], workdir: str,
              train: bool = True, command: str = '', seeds_per_task: int = 0) -> list[dict]:
  """Trains (unless `train` is False) every config one after another and tabulates; writes sweep.md and
  sweep.png."""
  rows = plan(config_paths, seeds, overrides, workdir, seeds_per_task)
  if train:
    train_inline(rows)
  tabulate(rows, workdir, overrides, command)
  return rows


def slurm_options() -> cluster.SlurmOptions:
  return cluster.SlurmOptions(
      partition=FLAGS.slurm_partition, timeout_min=FLAGS.slurm_timeout_min,
      gpus_per_task=FLAGS.slurm_gpus_per_task, cpus_per_task=FLAGS.slurm_cpus_per_task,
      mem_gb=FLAGS.slurm_mem_gb, array_parallelism=FLAGS.slurm_array_parallelism,
      sbatch=tuple(FLAGS.slurm_sbatch), setup=tuple(FLAGS.slurm_setup))


def submit_sweep(paths: list[str], workdir: str, command: str) -> None:
  """--executor=slurm|local: checks, submits what is missing as one job array, and (local, --wait) waits
  and tabulates; exit status 2 with one line when the sweep cannot be submitted."""
  options = slurm_options()
  cluster.check_workdir(workdir)
  if FLAGS.executor == 'slurm' and FLAGS.train:  # tabulating needs no sbatch (squeue where there is one)
    cluster.check_slurm(options)
  # Absolute: a task starts in the submission's folder, which a compute node may not share.
  workdir = os.path.abspath(workdir)
  rows = plan(paths, FLAGS.seeds, FLAGS.set, workdir, FLAGS.seeds_per_task)
  runs = [run for row in rows for run in row['runs']]
  if FLAGS.train:
    jobs = cluster.submit(runs, workdir, FLAGS.executor, options)
    if FLAGS.executor == 'local':
      for job in jobs:  # local tasks are this command's processes: wait for them
        job.wait()
    if FLAGS.wait or FLAGS.executor == 'local':
      cluster.wait(runs, workdir)
  device = 'each run\'s own (its log names its devices)'
  tabulate(rows, workdir, FLAGS.set, command, device=device)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}')
  paths = FLAGS.configs or blog_configs()
  from cifar_jax import cpu_backend  # pylint: disable=g-import-not-at-top
  command = 'python scripts/sweep.py ' + ' '.join(sys.argv[1:])
  try:
    for override in FLAGS.set:
      parse_override(override)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  try:
    if FLAGS.executor != 'inline':
      submit_sweep(paths, FLAGS.workdir, command)
    else:
      config, _ = load_config(paths[0])
      config = apply_overrides(config, [parse_override(o) for o in FLAGS.set])
      config.num_seeds = FLAGS.seeds
      cpu_backend.configure(config)  # cifar-jax's XLA:CPU settings, before JAX starts
      run_sweep(paths, FLAGS.seeds, FLAGS.set, FLAGS.workdir, FLAGS.train, command, FLAGS.seeds_per_task)
  except ConfigError as e:
    print(f'sweep.py: error: {" ".join(str(e).split())}', file=sys.stderr)
    sys.exit(2)
  print(os.path.join(FLAGS.workdir, 'sweep.md'))
  print(open(os.path.join(FLAGS.workdir, 'sweep.md')).read())


if __name__ == '__main__':
  define_flags()
  app.run(main)
