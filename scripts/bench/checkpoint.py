"""Epoch time with synchronous and asynchronous checkpoints: what writing a checkpoint every epoch costs.

  JAX_PLATFORMS=cpu python scripts/benchmark.py checkpoint --width=1 --train_size=512 --epochs=5 --repeats=2

Trains configs/default.py (ResNet18) at `--width` on `--train_size` synthetic images (one checkpoint an
epoch, as the trainer does), with `async_checkpoints` False and True, the two taking turns `--repeats`
times in this process, each run in a fresh workdir under --workdir. An epoch's time is the difference of
consecutive `elapsed_seconds` in metrics.jsonl: the previous epoch's checkpoint (what of it blocks the loop),
this epoch's steps and its evaluation; the median over epochs 3..N of every run of a mode (epoch 2 also pays
for orbax's first save: its set-up). The time of each save call (until the loop goes on) is measured too.
Prints a markdown table.
"""

import os
import shutil
import tempfile
import time

from bench import harness


def add_flags(parser) -> None:
  parser.add_argument('--width', type=float, default=1.0, help='model.width_multiplier')
  parser.add_argument('--train_size', type=int, default=512, help='synthetic training images (an epoch)')
  parser.add_argument('--eval_size', type=int, default=256)
  parser.add_argument('--epochs', type=int, default=5)
  parser.add_argument('--repeats', type=int, default=2, help='runs of each mode, taking turns')
  parser.add_argument('--workdir', default=None, help='where the runs go (default: a temporary folder)')
  parser.add_argument('--json', default='', help='write the results here')


def main(args) -> None:
  from cifar_jax import cpu_backend  # pylint: disable=g-import-not-at-top
  from configs import default  # pylint: disable=g-import-not-at-top

  def config_for(async_checkpoints: bool):
    config = default.get_config()
    config.model.width_multiplier = args.width
    config.data.source = 'synthetic'
    config.data.synthetic_train_size, config.data.synthetic_eval_size = args.train_size, args.eval_size
    config.num_epochs, config.progress_bar = args.epochs, False
    config.async_checkpoints = async_checkpoints
    return config

  cpu_backend.configure(config_for(True))  # the XLA:CPU settings cifar-jax uses, before JAX starts
  import jax  # pylint: disable=g-import-not-at-top

  from cifar_jax import loop  # pylint: disable=g-import-not-at-top
  from cifar_jax import metrics_writer  # pylint: disable=g-import-not-at-top
  from cifar_jax import train  # pylint: disable=g-import-not-at-top

  class TimeSaves(loop.Action):
    """Times each checkpoint save call: until the loop may go on (the whole write when synchronous)."""

    def __init__(self):
      self.seconds = []

    def start(self, run):
      save = run.checkpoints.save

      def timed(*a, **k):
        start = time.perf_counter()
        save(*a, **k)
        self.seconds.append(time.perf_counter() - start)

      run.checkpoints.save = timed

    def due(self, step):
      return False

  root = args.workdir or tempfile.mkdtemp(prefix='bench_checkpoint_')
  size = {'bytes': 0}
  repeat = {False: 0, True: 0}

  def measure(mode: bool) -> dict:
    """One run of a mode: its epochs after the first, and its save calls inside them."""
    repeat[mode] += 1
    workdir = os.path.join(root, f'{"async" if mode else "sync"}_{repeat[mode] - 1}')
    shutil.rmtree(workdir, ignore_errors=True)
    timer = TimeSaves()
    train.train_and_evaluate(config_for(mode), workdir, actions=[timer])
    elapsed = [r['elapsed_seconds'] for r in metrics_writer.read_metrics(workdir)]
    epochs = [b - a for a, b in zip(elapsed, elapsed[1:])]
    ckpt = os.path.join(workdir, 'checkpoints')
    last = os.path.join(ckpt, max(os.listdir(ckpt), key=int))
    size['bytes'] = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(last) for f in files)
    print(f'{"async" if mode else "sync"} run {repeat[mode]}: epochs {[round(e, 2) for e in epochs]} s, '
          f'saves {[round(s, 3) for s in timer.seconds]} s', flush=True)
    # the last save is waited for at the end, not in an epoch
    return {'epochs': epochs[1:], 'saves': timer.seconds[1:-1]}

  runs = harness.alternate([False, True], args.repeats, measure, rotate=False)
  if not args.workdir:
    shutil.rmtree(root, ignore_errors=True)
  epoch_seconds = {m: [e for r in runs[m] for e in r['epochs']] for m in runs}
  save_seconds = {m: [s for r in runs[m] for s in r['saves']] for m in runs}

  sync_epoch, async_epoch = (harness.median(epoch_seconds[m]) for m in (False, True))
  rows = []
  for mode, name in ((False, 'synchronous'), (True, 'asynchronous')):
    epoch = harness.median(epoch_seconds[mode])
    save = harness.median(save_seconds[mode])
    rows.append([name, f'{epoch:.2f}', f'{save:.3f}', f'{epoch / sync_epoch:.3f}x'])
  lines = [f'ResNet18 width {args.width}, batch 128, {args.train_size} synthetic images an epoch '
           f'({-(-args.train_size // 128)} steps) + eval of {args.eval_size}, a checkpoint of '
           f'{size["bytes"] / 2**20:.1f} MiB every epoch; medians of epochs 3..{args.epochs} of '
           f'{args.repeats} runs each; JAX {jax.__version__} {jax.devices()[0].platform}.', '',
           harness.markdown_table(['checkpoints', 'epoch time (s)', 'save call, blocking (s)',
                                   'epoch time vs sync'], rows),
           '', f'Saved per epoch by async: {sync_epoch - async_epoch:.2f} s '
           f'({100 * (sync_epoch - async_epoch) / sync_epoch:.1f} % of a synchronous epoch).']
  print('\n'.join(lines))
  flags = ('width', 'train_size', 'eval_size', 'epochs', 'repeats')
  harness.write_json(args.json, {
      'args': {k: getattr(args, k) for k in flags},
      'epoch_seconds': {'sync': epoch_seconds[False], 'async': epoch_seconds[True]},
      'save_seconds': {'sync': save_seconds[False], 'async': save_seconds[True]},
      'checkpoint_mib': size['bytes'] / 2**20})
