"""Plots a run's loss, accuracy and learning rate per epoch, like the blog's `plot_history`.

  python scripts/plot_history.py runs/default            # writes runs/default/history.png
  python scripts/plot_history.py runs/a runs/b --out=cmp.png
"""

import argparse
import os
import sys

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cifar_jax import metrics_writer  # pylint: disable=g-import-not-at-top,wrong-import-position


def plot_history(workdirs: list[str], out: str) -> str:
  """Writes one figure with loss, accuracy and lr (and momentum) against epochs for each workdir."""
  fig, axes = plt.subplots(1, 3, figsize=(15, 4))
  for workdir in workdirs:
    records = metrics_writer.read_metrics(workdir)
    if not records:
      raise SystemExit(f'{workdir}: no metrics.jsonl records')
    label = os.path.basename(os.path.normpath(workdir)) if len(workdirs) > 1 else ''
    prefix = f'{label} ' if label else ''
    epochs = [r['epoch'] for r in records]
    axes[0].plot(epochs, [r['train_loss'] for r in records], label=f'{prefix}train')
    axes[0].plot(epochs, [r['eval_loss'] for r in records], '--', label=f'{prefix}eval')
    axes[1].plot(epochs, [r['train_accuracy'] for r in records], label=f'{prefix}train')
    axes[1].plot(epochs, [r['eval_accuracy'] for r in records], '--', label=f'{prefix}eval')
    swa = [(r['epoch'], r['swa_eval_accuracy']) for r in records if 'swa_eval_accuracy' in r]
    if swa:
      axes[1].plot(*zip(*swa), 'o', label=f'{prefix}SWA eval')
    axes[2].plot(epochs, [r['learning_rate'] for r in records], label=f'{prefix}lr')
    if len({r.get('momentum') for r in records}) > 1:
      twin = axes[2].twinx()
      twin.plot(epochs, [r['momentum'] for r in records], ':', color='gray')
      twin.set_ylabel('momentum (dotted)')
  for ax, title in zip(axes, ('loss', 'accuracy', 'learning rate (last step of each epoch)')):
    ax.set_title(title)
    ax.set_xlabel('epoch')
    ax.grid(alpha=0.3)
    ax.legend()
  fig.tight_layout()
  fig.savefig(out, dpi=100)
  plt.close(fig)
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('workdirs', nargs='+')
  parser.add_argument('--out', default=None, help='PNG path (default: WORKDIR/history.png)')
  args = parser.parse_args()
  out = args.out or os.path.join(args.workdirs[0], 'history.png')
  print(plot_history(args.workdirs, out))


if __name__ == '__main__':
  main()
