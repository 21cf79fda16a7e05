"""The plots: one entry point, the figure as its first argument.

  python scripts/plot.py history runs/default                # runs/default/history.png
  python scripts/plot.py history runs/a runs/b --out=cmp.png
  python scripts/plot.py schedules --out=docs/schedules       # the blog's lr and momentum schedules
  python scripts/plot.py calibration runs/multiswag           # calibration.png (and shift.png, if any)
  python scripts/plot.py shift runs/multiswag                 # shift.png alone
  python scripts/plot.py lr_find runs/lr_find                 # lr_find.png again from lr_find.json

history: a run's loss, accuracy and learning rate per epoch, like the blog's `plot_history`.

schedules: one PNG per blog schedule and an overview `schedules.png`, lr (and momentum) against the
optimizer step at batch 128. The values are the torch-exact float32 tables of cifar_jax.schedules, i.e.
exactly what the trainer applies at each step.

calibration: the evaluation table of `--mode=evaluate` (evaluation.json): reliability diagrams (accuracy
against confidence in the 15 ECE bins, each model of the table) and NLL against the number of models
averaged (single model -> deep ensemble, SWA -> MultiSWA, SWAG -> MultiSWAG), as the papers show them.
The NLL lines show every ensemble size evaluate wrote (`nll_by_models` in evaluation.json): the deep
ensemble and MultiSWA of the first 1, .., k seeds; SWAG of seed 0 after each call of its samples
(swag.samples_per_call, 2 c, .., S), then MultiSWAG of the first 2, .., k seeds' S samples each. An older
evaluation.json without it gives the table's points only (1 and k seeds; S and k S samples). With an
evaluation under shift it also writes the shift figure.

shift: for an evaluation under shift (`--config.evaluation.shift=all`), Ovadia et al.'s (2019) box plots of
accuracy and ECE over the corruptions at each severity, one box per model (clean: the test point), and
MultiSWAG's paper's NLL against severity (the mean over the corruptions).

lr_find: the LR range test's figure (`--mode=lr_find` writes it; this redraws it from lr_find.json with
the trainer's own `cifar_jax.lr_find.plot`).
"""

import argparse
import json
import os
import pathlib
import sys

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cifar_jax import metrics_writer  # pylint: disable=g-import-not-at-top,wrong-import-position
from cifar_jax import schedules  # pylint: disable=g-import-not-at-top,wrong-import-position

EVALUATION_FILE = 'evaluation.json'
FAMILIES = (('single model', 'deep ensemble'), ('SWA', 'MultiSWA'), ('SWAG', 'MultiSWAG'))

TRAIN_SIZE = 50_000
BATCH_SIZE = 128
STEPS_PER_EPOCH = -(-TRAIN_SIZE // BATCH_SIZE)  # 391: the last, partial batch is kept
DPI = 120
LR_COLOR = 'tab:blue'
MOMENTUM_COLOR = 'tab:orange'
OOD_SCORE_LABELS = {'msp': '1 - max probability (msp score)', 'entropy': 'predictive entropy',
                    'mutual_information': 'mutual information'}  # cifar_jax/ood.py's scores

# CyclicLR: the blog gives no parameters, so this follows Smith (2017): half-cycles of 2-10
# epochs, base_lr well below max_lr. 'triangular2' with 4-epoch half-cycles over 40 epochs gives 5
# full cycles that end exactly at the end of training, each at half the previous amplitude, so the
# last epochs run at small lrs (the last peak is 0.001 + 0.099 / 16 ~ 0.007), as a decay would.
CYCLIC = dict(base_lr=0.001, max_lr=0.1, step_size_up=4 * STEPS_PER_EPOCH, mode='triangular2')
CYCLIC_EPOCHS = 40



# history ---------------------------------------------------------------------------------------------------


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



# schedules -------------------------------------------------------------------------------------------------


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


def plot_schedules(out: str) -> str:
  """Writes one PNG per blog schedule and the overview schedules.png into `out`."""
  out = pathlib.Path(out)
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
  return f'wrote {len(specs) + 1} figures to {out}'



# calibration and shift ---------------------------------------------------------------------------------


def plot_calibration(workdir: str, out: str) -> str:
  """Writes one figure: a reliability diagram with every model, and NLL against models averaged."""
  path = os.path.join(workdir, EVALUATION_FILE)
  if not os.path.exists(path):
    raise SystemExit(f'{path}: not found; run cifar-jax --mode=evaluate on {workdir} first')
  with open(path) as f:
    evaluation = json.load(f)
  rows = {row['model']: row for row in evaluation['table']}
  curves = evaluation.get('nll_by_models', {})
  fig, (reliability, nll) = plt.subplots(1, 2, figsize=(11, 4.5))
  reliability.plot([0, 1], [0, 1], color='gray', linestyle=':', label='perfectly calibrated')
  for name, row in rows.items():
    bins = row['bins']
    points = [(c, a) for c, a in zip(bins['confidence'], bins['accuracy']) if c is not None]
    reliability.plot(*zip(*points), marker='o', markersize=3, label=f"{name} (ECE {row['ece']:.3f})")
  reliability.set(xlabel='confidence (top-1 probability)', ylabel='accuracy', xlim=(0, 1), ylim=(0, 1),
                  title='Reliability (15 equal-width bins)')
  reliability.legend(fontsize=7)
  for family in FAMILIES:
    present = [rows[name] for name in family if name in rows]
    curve = next((curves[name] for name in family[::-1] if name in curves), None)
    points = curve or present
    if points:
      nll.plot([r['models'] for r in points], [r['nll'] for r in points], marker='o', markersize=3,
               label=' -> '.join(r['model'] for r in present))
  nll.set(xscale='log', xlabel='models averaged', ylabel='NLL', title='NLL against number of models')
  nll.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
  nll.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
  nll.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(out, dpi=120)
  plt.close(fig)
  return out


def plot_shift(workdir: str, out: str) -> str | None:
  """Writes the shift figure (accuracy and ECE box plots per severity, NLL against severity), or returns
  None when evaluation.json holds no evaluation under shift."""
  with open(os.path.join(workdir, EVALUATION_FILE)) as f:
    evaluation = json.load(f)
  shift = evaluation.get('shift')
  if not shift:
    return None
  clean = {row['model']: row for row in evaluation['table']}
  models = list(dict.fromkeys(row['model'] for row in shift['rows']))
  severities = shift['severities']
  names = shift['summary_corruptions']
  fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
  colors = plt.rcParams['axes.prop_cycle'].by_key()['color']
  width = 0.8 / len(models)
  for ax, key, label in ((axes[0], 'accuracy', 'accuracy'), (axes[1], 'ece', 'ECE (15 bins)')):
    for m, model in enumerate(models):
      color = colors[m % len(colors)]
      data = [[row[key] for row in shift['rows'] if row['model'] == model and row['severity'] == s
               and row['corruption'] in names] for s in severities]
      positions = [i + 1 + (m - (len(models) - 1) / 2) * width for i in range(len(severities))]
      ax.boxplot(data, positions=positions, widths=width * 0.9, patch_artist=True, showfliers=True,
                 boxprops=dict(facecolor=color, alpha=0.6), medianprops=dict(color='black'),
                 flierprops=dict(markersize=2))
      if model in clean:
        ax.plot([(m - (len(models) - 1) / 2) * width], [clean[model][key]], marker='D', color=color,
                linestyle='none', markersize=4)
      ax.plot([], [], color=color, linewidth=6, alpha=0.6, label=model)
    ax.set_xticks(range(len(severities) + 1), ['clean'] + [str(s) for s in severities])
    ax.set(xlabel='severity', ylabel=label,
           title=f'{label} over {len(names)} corruptions (box: quartiles, whiskers 1.5 IQR)')
    ax.legend(fontsize=7)
  summary = {(row['model'], row['severity']): row for row in shift['summary']}
  for m, model in enumerate(models):
    points = ([clean[model]['nll']] if model in clean else [float('nan')])
    points += [summary[model, s]['nll'] for s in severities]
    axes[2].plot(range(len(severities) + 1), points, marker='o', markersize=3, label=model,
                 color=colors[m % len(colors)])
  axes[2].set_xticks(range(len(severities) + 1), ['clean'] + [str(s) for s in severities])
  axes[2].set(xlabel='severity', ylabel='NLL', title=f'NLL, mean over {len(names)} corruptions')
  axes[2].legend(fontsize=7)
  fig.suptitle(f"{workdir}: {shift['source']}", fontsize=9)
  fig.tight_layout()
  fig.savefig(out, dpi=120)
  plt.close(fig)
  return out


def plot_ood(workdir: str, out: str) -> str | None:
  """Writes the OOD figure (per row of the table and score, the histograms of the in-distribution
  scores and of each OOD set's, as fractions of their sets), or returns None when evaluation.json holds
  no OOD detection."""
  with open(os.path.join(workdir, EVALUATION_FILE)) as f:
    result = json.load(f).get('ood')
  if not result:
    return None
  histograms = result['histograms']
  models = list(histograms)
  scores = list(dict.fromkeys(score for sets in histograms.values() for h in sets.values() for score in h))
  fig, axes = plt.subplots(len(models), len(scores), figsize=(4.2 * len(scores), 2.4 * len(models)),
                           squeeze=False)
  auroc = {(r['model'], r['set'], r['score']): r['auroc'] for r in result['rows']}
  for i, model in enumerate(models):
    for j, score in enumerate(scores):
      ax = axes[i][j]
      first = True
      for name, per_score in histograms[model].items():
        if score not in per_score:
          continue
        h = per_score[score]
        if first:
          ax.stairs(np.asarray(h['in']) / max(sum(h['in']), 1), h['edges'], label='in-distribution',
                    color='black')
          first = False
        ax.stairs(np.asarray(h['ood']) / max(sum(h['ood']), 1), h['edges'],
                  label=f"{name} (AUROC {auroc[model, name, score]:.3f})")
      if first:
        ax.set_axis_off()
        continue
      ax.set(xlabel=OOD_SCORE_LABELS.get(score, score), ylabel='fraction', title=model)
      ax.legend(fontsize=6)
  fig.suptitle(f"{workdir}: OOD scores (in-distribution: {result['in_distribution']})", fontsize=9)
  fig.tight_layout()
  fig.savefig(out, dpi=120)
  plt.close(fig)
  return out


# lr_find -------------------------------------------------------------------------------------------------


def plot_lr_find(workdir: str, out: str) -> str:
  """Redraws lr_find.png from the range test's lr_find.json (the trainer's own plot)."""
  from cifar_jax import lr_find  # pylint: disable=g-import-not-at-top  (JAX: only this figure needs it)

  path = os.path.join(workdir, lr_find.JSON_FILE)
  if not os.path.exists(path):
    raise SystemExit(f'{path}: not found; run cifar-jax --mode=lr_find --workdir={workdir} first')
  with open(path) as f:
    lr_find.plot(json.load(f), out)
  return out


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  figures = parser.add_subparsers(dest='figure', required=True, metavar='FIGURE')
  history = figures.add_parser('history', help="a run's loss, accuracy and lr per epoch")
  history.add_argument('workdirs', nargs='+')
  history.add_argument('--out', default=None, help='PNG path (default: WORKDIR/history.png)')
  schedule = figures.add_parser('schedules', help="the blog's lr and momentum schedules")
  schedule.add_argument('--out', default='docs/schedules', help='output folder')
  calibration = figures.add_parser('calibration', help='reliability diagrams and NLL against models averaged')
  calibration.add_argument('workdir')
  calibration.add_argument('--out', help='the PNG (default: WORKDIR/calibration.png)')
  calibration.add_argument('--shift_out', help='the shift figure (default: WORKDIR/shift.png)')
  calibration.add_argument('--ood_out', help='the OOD figure (default: WORKDIR/ood.png)')
  shift = figures.add_parser('shift', help='accuracy, ECE and NLL under shift (CIFAR-10-C)')
  shift.add_argument('workdir')
  shift.add_argument('--out', help='the PNG (default: WORKDIR/shift.png)')
  ood = figures.add_parser('ood', help='the OOD scores of every row: in-distribution against each OOD set')
  ood.add_argument('workdir')
  ood.add_argument('--out', help='the PNG (default: WORKDIR/ood.png)')
  lr = figures.add_parser('lr_find', help="the LR range test's curves and suggestions")
  lr.add_argument('workdir')
  lr.add_argument('--out', help='the PNG (default: WORKDIR/lr_find.png)')
  args = parser.parse_args(argv)
  if args.figure == 'history':
    print(plot_history(args.workdirs, args.out or os.path.join(args.workdirs[0], 'history.png')))
  elif args.figure == 'schedules':
    print(plot_schedules(args.out))
  elif args.figure == 'calibration':
    print(plot_calibration(args.workdir, args.out or os.path.join(args.workdir, 'calibration.png')))
    shift_png = plot_shift(args.workdir, args.shift_out or os.path.join(args.workdir, 'shift.png'))
    if shift_png:
      print(shift_png)
    ood_png = plot_ood(args.workdir, args.ood_out or os.path.join(args.workdir, 'ood.png'))
    if ood_png:
      print(ood_png)
  elif args.figure == 'shift':
    out = plot_shift(args.workdir, args.out or os.path.join(args.workdir, 'shift.png'))
    if not out:
      raise SystemExit(f'{os.path.join(args.workdir, EVALUATION_FILE)}: no evaluation under shift '
                       '(--config.evaluation.shift=all)')
    print(out)
  elif args.figure == 'ood':
    out = plot_ood(args.workdir, args.out or os.path.join(args.workdir, 'ood.png'))
    if not out:
      raise SystemExit(f'{os.path.join(args.workdir, EVALUATION_FILE)}: no OOD detection '
                       '(--config.evaluation.ood=...)')
    print(out)
  else:
    print(plot_lr_find(args.workdir, args.out or os.path.join(args.workdir, 'lr_find.png')))


if __name__ == '__main__':
  main()
