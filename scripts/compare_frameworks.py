"""Trains the JAX trainer and the PyTorch reference under one config, N seeds each, and compares them.

  python scripts/compare_frameworks.py --config=configs/one_cycle.py --seeds=2 --workdir=runs/compare \
      --config.model.width_multiplier=0.25 --config.num_epochs=4 \
      --config.data.source=npz --config.data.path=../shared/data/cifar10/cifar10_train.npz \
      --config.data.validation_size=5000

Writes WORKDIR/comparison.md (final and best eval accuracy as mean +- std per framework, the difference with
a 95 % Welch interval, wall time, images per second, device) and WORKDIR/comparison.png (eval accuracy and
loss curves, one line per seed). With config.swag.enabled (configs/swag.py) both frameworks collect SWAG
over the SWA phase (the torch twin with the reference's formulas, torch_reference.TorchSwag) and the table
gains the SWAG Bayesian model average's accuracy, NLL, ECE and Brier per framework; with config.ema.enabled
the same for the moving average of the weights (the twin's torch_reference.TorchEma). Each run lives in
WORKDIR/{jax,torch}/seed_{i}; a finished run is not retrained, so `--only=jax` and `--only=torch` can split
a long comparison across sessions. Both resume an unfinished run: JAX from its checkpoint, the torch twin
after its last finished epoch (WORKDIR/torch/seed_{i}/torch_checkpoint.pt).
With --config.model.dtype=bfloat16 the two run in mixed precision: JAX with bfloat16 compute and float32
state (docs/architecture.md, "Mixed precision"), torch under torch.autocast(device, dtype=torch.bfloat16).
"""

import os
import platform
import statistics
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cifar_jax.stats import welch_interval  # pylint: disable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Training configuration file.', lock_config=True)
flags.DEFINE_string('workdir', None, 'Where the runs and the comparison go.')
flags.DEFINE_integer('seeds', 2, 'Seeds per framework: config.seed + 0 .. config.seed + seeds - 1.')
flags.DEFINE_enum('only', None, ['jax', 'torch'], 'Train only this framework (then compare what exists).')
flags.DEFINE_enum('data_mode', 'native', ['native', 'identical'],
                  "torch's data: its own shuffling and augmentation, or exactly the JAX trainer's batches.")
flags.DEFINE_string('torch_device', None, "torch device (default 'cuda' when available, else 'cpu').")
flags.mark_flags_as_required(['config', 'workdir'])

FRAMEWORKS = ('jax', 'torch')
SWAG_METRICS = ('accuracy', 'nll', 'ece', 'brier')
SWAG_HEADERS = {'accuracy': 'accuracy (%)', 'nll': 'NLL', 'ece': 'ECE (15 bins)', 'brier': 'Brier'}
EMA_KEYS = {'accuracy': 'ema_eval_accuracy', 'nll': 'ema_eval_loss', 'ece': 'ema_eval_ece',
            'brier': 'ema_eval_brier'}


def run_dir(workdir: str, framework: str, seed: int) -> str:
  return os.path.join(workdir, framework, f'seed_{seed}')


def finished(path: str, num_epochs: int) -> bool:
  from cifar_jax import metrics_writer  # pylint: disable=g-import-not-at-top
  records = metrics_writer.read_metrics(path)
  return bool(records) and records[-1]['epoch'] >= num_epochs


def train_one(framework: str, config, path: str, data_mode: str, torch_device) -> None:
  """Trains one seed of one framework into `path` unless it has finished there."""
  if finished(path, config.num_epochs):
    print(f'{path}: finished, kept')
    return
  print(f'{path}: training {framework}', flush=True)
  if framework == 'jax':
    from cifar_jax import train  # pylint: disable=g-import-not-at-top
    train.train_and_evaluate(config, path)
  else:
    from cifar_jax import torch_reference  # pylint: disable=g-import-not-at-top
    # An unfinished torch run continues after its last epoch, as the JAX trainer resumes from its checkpoint.
    torch_reference.train_and_evaluate_torch(config, path, data_mode=data_mode, device=torch_device,
                                             resume=True)


def device_name(framework: str, torch_device) -> str:
  if framework == 'jax':
    import jax  # pylint: disable=g-import-not-at-top
    d = jax.devices()[0]
    return f'JAX {jax.__version__} {d.platform} ({d.device_kind}) x{jax.device_count()}'
  import torch  # pylint: disable=g-import-not-at-top

  from cifar_jax import torch_reference  # pylint: disable=g-import-not-at-top
  dev = torch_device or torch_reference.default_device()
  kind = torch.cuda.get_device_name() if dev.startswith('cuda') else platform.processor() or 'cpu'
  return f'torch {torch.__version__} {dev} ({kind}), {torch.get_num_threads()} threads'


def summarize(workdir: str, seeds: list[int], num_epochs: int) -> dict:
  """Per framework: final and best accuracy, wall time and throughput of each finished seed."""
  from cifar_jax import metrics_writer  # pylint: disable=g-import-not-at-top
  out = {}
  for framework in FRAMEWORKS:
    runs = [metrics_writer.read_metrics(run_dir(workdir, framework, s)) for s in seeds]
    runs = [r for r in runs if r and r[-1]['epoch'] >= num_epochs]
    final_key = 'swa_eval_accuracy' if runs and 'swa_eval_accuracy' in runs[0][-1] else 'eval_accuracy'
    out[framework] = {
        'runs': runs, 'final_key': final_key,
        'final': [r[-1][final_key] for r in runs],
        'best': [max(x['eval_accuracy'] for x in r) for r in runs],
        'wall': [r[-1]['elapsed_seconds'] for r in runs],
        'ips': [statistics.median(x['images_per_second'] for x in r) for r in runs],
        'swag': {key: [r[-1][f'swag_eval_{key}'] for r in runs if f'swag_eval_{key}' in r[-1]]
                 for key in SWAG_METRICS},
        # the weights' moving average (config.ema): its NLL is logged as ema_eval_loss
        'ema': {key: [r[-1][EMA_KEYS[key]] for r in runs if EMA_KEYS[key] in r[-1]] for key in SWAG_METRICS},
    }
  return out


def swag_lines(summary: dict, config) -> list[str]:
  """The SWAG table: each framework's Bayesian model average (S samples, each with its own update_bn) and
  JAX - torch per metric with a 95 % Welch interval; no lines when no run has SWAG metrics."""
  if not any(summary[f]['swag']['accuracy'] for f in FRAMEWORKS):
    return []
  s = config.swag
  return metric_lines(summary, 'swag', 'SWAG', [
      f'SWAG, the final models: {s.num_samples} samples at scale {s.scale}, rank {s.rank}'
      f'{" (diagonal only)" if s.diag_only else ""}, each with its own BatchNorm pass over '
      f'{s.bn_update_fraction:g} of an epoch; probabilities averaged over the samples.', ''])


def ema_lines(summary: dict, config) -> list[str]:
  """The EMA table (config.ema): each framework's moving average of the weights at the end, accuracy,
  NLL, ECE and Brier, and JAX - torch per metric with a 95 % Welch interval; no lines without EMA metrics."""
  if not any(summary[f]['ema']['accuracy'] for f in FRAMEWORKS):
    return []
  e = config.ema
  return metric_lines(summary, 'ema', 'EMA', [
      f'EMA of the weights, the final models: decay {e.decay}{" with the warm-up" if e.warmup else ""}, '
      f'updated every {e.every_steps} step(s), BatchNorm statistics {e.batch_stats}d.', ''])


def metric_lines(summary: dict, field: str, name: str, header: list[str]) -> list[str]:
  """`header`, then per framework the mean ± std of summary[framework][field]'s metrics, then JAX - torch
  per metric with a 95 % Welch interval (when both have runs)."""
  lines = header + ['| framework | seeds | ' + ' | '.join(SWAG_HEADERS[k] for k in SWAG_METRICS) + ' |',
                    '| --- | --- | ' + ' | '.join('---' for _ in SWAG_METRICS) + ' |']
  for framework in FRAMEWORKS:
    values = summary[framework][field]
    lines.append(f"| {framework} | {len(values['accuracy'])} | " + ' | '.join(
        _mean_std(values[k], 100 if k == 'accuracy' else 1, 2 if k == 'accuracy' else 4)
        for k in SWAG_METRICS) + ' |')
  lines.append('')
  if summary['jax'][field]['accuracy'] and summary['torch'][field]['accuracy']:
    for key in SWAG_METRICS:
      diff, lo, hi = welch_interval(summary['jax'][field][key], summary['torch'][field][key])
      scale, unit = (100, ' points') if key == 'accuracy' else (1, '')
      lines.append(f'JAX − torch, {name} {SWAG_HEADERS[key]}: {scale * diff:+.4g}{unit}, 95 % Welch interval '
                   f'[{scale * lo:+.4g}, {scale * hi:+.4g}].')
    lines.append('')
  return lines


def _mean_std(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
  if not values:
    return 'n/a'
  mean = statistics.fmean(values) * scale
  std = statistics.stdev(values) * scale if len(values) > 1 else float('nan')
  return f'{mean:.{digits}f} ± {std:.{digits}f}'


def precision(dtype: str) -> str:
  """How each framework computes under `model.dtype`, for the comparison's header."""
  if dtype == 'bfloat16':
    return ('bfloat16 mixed precision (JAX: model.dtype=bfloat16, float32 params and state; torch: '
            'torch.autocast(bfloat16))')
  return 'float32'


def write_markdown(path: str, summary: dict, config, command: str, devices: dict) -> None:
  lines = [
      '# JAX vs PyTorch', '',
      f'Config: model {config.model.name} width {config.model.width_multiplier} ({config.model.norm}), '
      f'schedule {config.schedule.name}, {config.num_epochs} epochs, batch {config.batch_size}, '
      f'data {config.data.source} (validation_size {config.data.validation_size}), torch data: '
      f'{FLAGS.data_mode}. Precision: {precision(config.model.dtype)}.', '',
      f'Command: `{command}`', '',
      '| framework | seeds | final accuracy (%) | best accuracy (%) | wall time (s) '
      '| images/s (median epoch) | device |',
      '| --- | --- | --- | --- | --- | --- | --- |',
  ]
  for framework in FRAMEWORKS:
    s = summary[framework]
    label = 'final SWA accuracy' if s['final_key'] == 'swa_eval_accuracy' else 'final'
    lines.append(f"| {framework} | {len(s['final'])} | {_mean_std(s['final'], 100)} ({label}) | "
                 f"{_mean_std(s['best'], 100)} | {_mean_std(s['wall'], 1, 0)} | "
                 f"{_mean_std(s['ips'], 1, 0)} | {devices.get(framework, 'n/a')} |")
  lines.append('')
  if summary['jax']['final'] and summary['torch']['final']:
    for key, name in (('final', 'final'), ('best', 'best')):
      diff, lo, hi = welch_interval(summary['jax'][key], summary['torch'][key])
      lines.append(f'JAX − torch, {name} accuracy: {100 * diff:+.2f} points, 95 % Welch interval '
                   f'[{100 * lo:+.2f}, {100 * hi:+.2f}].')
    lines.append('')
  lines += swag_lines(summary, config)
  lines += ema_lines(summary, config)
  lines.append('Mean ± sample standard deviation over seeds; an interval that contains 0 means the two '
               'frameworks are not distinguishable at this number of seeds.')
  with open(path, 'w') as f:
    f.write('\n'.join(lines) + '\n')


def write_plot(path: str, summary: dict) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(12, 4))
  colors = {'jax': 'tab:blue', 'torch': 'tab:orange'}
  for framework in FRAMEWORKS:
    for i, run in enumerate(summary[framework]['runs']):
      epochs = [r['epoch'] for r in run]
      label = framework if i == 0 else None
      ax_acc.plot(epochs, [r['eval_accuracy'] for r in run], color=colors[framework], label=label)
      ax_loss.plot(epochs, [r['eval_loss'] for r in run], color=colors[framework], label=label)
      ax_loss.plot(epochs, [r['train_loss'] for r in run], ':', color=colors[framework])
  ax_acc.set_title('eval accuracy')
  ax_loss.set_title('loss (eval solid, train dotted)')
  for ax in (ax_acc, ax_loss):
    ax.set_xlabel('epoch')
    ax.grid(alpha=0.3)
    ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def main(argv):
  del argv
  config = FLAGS.config
  seeds = [config.seed + i for i in range(FLAGS.seeds)]
  frameworks = [FLAGS.only] if FLAGS.only else list(FRAMEWORKS)
  for framework in frameworks:
    os.makedirs(os.path.join(FLAGS.workdir, framework), exist_ok=True)
    if not all(finished(run_dir(FLAGS.workdir, framework, seed), config.num_epochs) for seed in seeds):
      # The device of the process that trains; a call that only tabulates finished runs keeps the record.
      with open(os.path.join(FLAGS.workdir, framework, 'device.txt'), 'w') as f:
        f.write(device_name(framework, FLAGS.torch_device))
    for seed in seeds:
      seeded = config.copy_and_resolve_references()
      with seeded.unlocked():
        seeded.seed = seed
      train_one(framework, seeded, run_dir(FLAGS.workdir, framework, seed), FLAGS.data_mode,
                FLAGS.torch_device)
  devices = {}
  for framework in FRAMEWORKS:
    path = os.path.join(FLAGS.workdir, framework, 'device.txt')
    if os.path.exists(path):
      devices[framework] = open(path).read().strip()
  summary = summarize(FLAGS.workdir, seeds, config.num_epochs)
  command = 'python scripts/compare_frameworks.py ' + ' '.join(sys.argv[1:])
  md = os.path.join(FLAGS.workdir, 'comparison.md')
  write_markdown(md, summary, config, command, devices)
  write_plot(os.path.join(FLAGS.workdir, 'comparison.png'), summary)
  print(open(md).read())


if __name__ == '__main__':
  sys.path.insert(0, os.getcwd())
  app.run(main)
