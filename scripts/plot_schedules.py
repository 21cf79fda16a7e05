"""Plots the blog experiments' lr (and momentum) schedules against the optimizer step, batch 128.

  python scripts/plot_schedules.py --out=docs/schedules

Writes one PNG per schedule and an overview `schedules.png`. The values are the torch-exact float32
tables of cifar_jax.schedules, i.e. exactly what the trainer applies at each step.
"""

import argparse
import pathlib
import sys

try:
  from cifar_jax import schedules
except ImportError:  # run from a checkout that is not pip-installed
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
  from cifar_jax import schedules

TRAIN_SIZE = 50_000
BATCH_SIZE = 128
STEPS_PER_EPOCH = -(-TRAIN_SIZE // BATCH_SIZE)  # 391: the last, partial batch is kept
DPI = 120
LR_COLOR = 'tab:blue'
MOMENTUM_COLOR = 'tab:orange'

# CyclicLR: the blog gives no parameters, so this follows Smith (2017): half-cycles of 2-10
# epochs, base_lr well below max_lr. 'triangular2' with 4-epoch half-cycles over 40 epochs gives 5
# full cycles that end exactly at the end of training, each at half the previous amplitude, so the
# last epochs run at small lrs (the last peak is 0.001 + 0.099 / 16 ~ 0.007), as a decay would.
CYCLIC = dict(base_lr=0.001, max_lr=0.1, step_size_up=4 * STEPS_PER_EPOCH, mode='triangular2')
CYCLIC_EPOCHS = 40


def blog_schedules(spe: int = STEPS_PER_EPOCH) -> list[dict]:
  """The blog's schedules: name, title, epochs, lr schedule, momentum schedule (or None)."""
  swa_start = 20 * spe
  swa_warmup = schedules.one_cycle_lr(0.1, swa_start)
  return [
      dict(name='multistep', epochs=50, momentum=None,
           title='MultiStepLR(lr=0.05, milestones=[25, 40], gamma=0.1), per epoch',
           lr=schedules.multistep_lr(0.05, [25, 40], 0.1, steps_per_epoch=spe)),
      dict(name='cosine', epochs=50, momentum=None,
           title='CosineAnnealingLR(lr=0.2, T_max=50), per epoch',
           lr=schedules.cosine_annealing_lr(0.2, 50, steps_per_epoch=spe)),
      dict(name='warm_restarts', epochs=60, momentum=None,
           title='CosineAnnealingWarmRestarts(lr=0.2, T_0=20, T_mult=2), per epoch',
           lr=schedules.cosine_annealing_warm_restarts(0.2, 20, 2, steps_per_epoch=spe)),
      dict(name='cyclic', epochs=CYCLIC_EPOCHS,
           title='CyclicLR(0.001, 0.1, step_size_up=4 epochs, triangular2), per batch',
           lr=schedules.cyclic_lr(**CYCLIC), momentum=schedules.cyclic_momentum(**CYCLIC)),
      dict(name='one_cycle_50', epochs=50, title='OneCycleLR(max_lr=0.1), 50 epochs, per batch',
           lr=schedules.one_cycle_lr(0.1, 50 * spe),
           momentum=schedules.one_cycle_momentum(0.1, 50 * spe)),
      dict(name='one_cycle_30', epochs=30, title='OneCycleLR(max_lr=0.1), 30 epochs, per batch',
           lr=schedules.one_cycle_lr(0.1, 30 * spe),
           momentum=schedules.one_cycle_momentum(0.1, 30 * spe)),
      dict(name='swa', epochs=30,
           title='SWA: OneCycleLR(0.1) for 20 epochs, then SWALR(0.01) for 10',
           lr=schedules.swa_lr(0.01, anneal_epochs=0, start_lr=swa_warmup, start_count=swa_start,
                               steps_per_epoch=spe),
           momentum=None),
  ]


def draw(ax, spec: dict, spe: int = STEPS_PER_EPOCH) -> None:
  """lr (left axis) and momentum (right axis) against the optimizer step, epochs on top."""
  import numpy as np

  n = spec['epochs'] * spe
  steps = np.arange(n)
  ax.plot(steps, spec['lr'].table(n), color=LR_COLOR, lw=1.2)
  ax.set_xlim(0, n)
  ax.set_ylim(bottom=0)
  ax.set_xlabel('optimizer step')
  ax.set_ylabel('learning rate', color=LR_COLOR)
  ax.set_title(spec['title'], fontsize=9)
  ax.grid(alpha=0.3)
  top = ax.secondary_xaxis('top', functions=(lambda s: s / spe, lambda e: e * spe))
  top.set_xlabel('epoch', fontsize=8)
  if spec['momentum'] is not None:
    mom = ax.twinx()
    mom.plot(steps, spec['momentum'].table(n), color=MOMENTUM_COLOR, lw=1.0, ls='--')
    mom.set_ylabel('momentum', color=MOMENTUM_COLOR)


def main(argv=None) -> None:
  """Writes the PNGs."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--out', default='docs/schedules', help='output folder')
  args = parser.parse_args(argv)
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  specs = blog_schedules()
  for spec in specs:
    fig, ax = plt.subplots(figsize=(8, 3.6), constrained_layout=True)
    draw(ax, spec)
    fig.savefig(out / f"{spec['name']}.png", dpi=DPI)
    plt.close(fig)
  cols = 2
  rows = -(-len(specs) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(14, 3.4 * rows), constrained_layout=True)
  for ax, spec in zip(axes.flat, specs):
    draw(ax, spec)
  for ax in list(axes.flat)[len(specs):]:
    ax.axis('off')
  fig.suptitle(f'Blog schedules at batch {BATCH_SIZE} ({STEPS_PER_EPOCH} steps per epoch)')
  fig.savefig(out / 'schedules.png', dpi=DPI)
  plt.close(fig)
  print(f'wrote {len(specs) + 1} figures to {out}')


if __name__ == '__main__':
  main()
