"""Epoch time with synchronous and asynchronous checkpoints: what writing a checkpoint every epoch costs.

  JAX_PLATFORMS=cpu python scripts/bench_checkpoint.py --width=1 --train_size=512 --epochs=5 --repeats=2

Trains configs/default.py (ResNet18) at `--width` on `--train_size` synthetic images (one checkpoint an
epoch, as the trainer does), with `async_checkpoints` False and True, the two taking turns `--repeats`
times, each run in a fresh workdir under --workdir. An epoch's time is the difference of consecutive
`elapsed_seconds` in metrics.jsonl: the previous epoch's checkpoint (what of it blocks the loop), this
epoch's steps and its evaluation; the median over epochs 3..N of every run of a mode (epoch 2 also pays
for orbax's first save: its set-up). The time of each save call (until the loop goes on) is measured too.
Prints a markdown table.
"""

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--width', type=float, default=1.0, help='model.width_multiplier')
  parser.add_argument('--train_size', type=int, default=512, help='synthetic training images (an epoch)')
  parser.add_argument('--eval_size', type=int, default=256)
  parser.add_argument('--epochs', type=int, default=5)
  parser.add_argument('--repeats', type=int, default=2, help='runs of each mode, taking turns')
  parser.add_argument('--workdir', default=None, help='where the runs go (default: a temporary folder)')
  args = parser.parse_args()

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
  epoch_seconds = {False: [], True: []}
  save_seconds = {False: [], True: []}
  size = 0
  for repeat in range(args.repeats):
    for mode in (False, True):
      workdir = os.path.join(root, f'{"async" if mode else "sync"}_{repeat}')
      shutil.rmtree(workdir, ignore_errors=True)
      timer = TimeSaves()
      train.train_and_evaluate(config_for(mode), workdir, actions=[timer])
      elapsed = [r['elapsed_seconds'] for r in metrics_writer.read_metrics(workdir)]
      epochs = [b - a for a, b in zip(elapsed, elapsed[1:])]
      epoch_seconds[mode] += epochs[1:]
      save_seconds[mode] += timer.seconds[1:-1]  # the last save is waited for at the end, not in an epoch
      ckpt = os.path.join(workdir, 'checkpoints')
      last = os.path.join(ckpt, max(os.listdir(ckpt), key=int))
      size = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(last) for f in files)
      print(f'{"async" if mode else "sync"} run {repeat + 1}: epochs {[round(e, 2) for e in epochs]} s, '
            f'saves {[round(s, 3) for s in timer.seconds]} s', flush=True)
  if not args.workdir:
    shutil.rmtree(root, ignore_errors=True)

  sync_epoch, async_epoch = (statistics.median(epoch_seconds[m]) for m in (False, True))
  lines = [f'ResNet18 width {args.width}, batch 128, {args.train_size} synthetic images an epoch '
           f'({-(-args.train_size // 128)} steps) + eval of {args.eval_size}, a checkpoint of '
           f'{size / 2**20:.1f} MiB every epoch; medians of epochs 3..{args.epochs} of {args.repeats} runs '
           f'each; JAX {jax.__version__} {jax.devices()[0].platform}.', '',
           '| checkpoints | epoch time (s) | save call, blocking (s) | epoch time vs sync |',
           '| --- | --- | --- | --- |']
  for mode, name in ((False, 'synchronous'), (True, 'asynchronous')):
    epoch = statistics.median(epoch_seconds[mode])
    lines.append(f'| {name} | {epoch:.2f} | {statistics.median(save_seconds[mode]):.3f} | '
                 f'{epoch / sync_epoch:.3f}x |')
  lines += ['', f'Saved per epoch by async: {sync_epoch - async_epoch:.2f} s '
            f'({100 * (sync_epoch - async_epoch) / sync_epoch:.1f} % of a synchronous epoch).']
  print('\n'.join(lines))


if __name__ == '__main__':
  main()
