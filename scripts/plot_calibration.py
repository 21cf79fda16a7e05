"""Plots the evaluation table of `--mode=evaluate` (evaluation.json): reliability diagrams (accuracy
against confidence in the 15 ECE bins, each model of the table) and NLL against the number of models
averaged (single model -> deep ensemble, SWA -> MultiSWA, SWAG -> MultiSWAG), as the papers show them;
with an evaluation under shift (`--config.evaluation.shift=all`), also Ovadia et al.'s (2019) box plots
of accuracy and ECE over the corruptions at each severity, one box per model (clean: the test point),
and MultiSWAG's paper's NLL against severity (the mean over the corruptions).

  cifar-jax --config=configs/multiswag.py --workdir=runs/multiswag --mode=evaluate
  python scripts/plot_calibration.py runs/multiswag        # writes runs/multiswag/calibration.png
  # and, when evaluation.json holds a shift, runs/multiswag/shift.png

The NLL lines show every ensemble size evaluate wrote (`nll_by_models` in evaluation.json): the deep
ensemble and MultiSWA of the first 1, .., k seeds; SWAG of seed 0 after each call of its samples
(swag.samples_per_call, 2 c, .., S), then MultiSWAG of the first 2, .., k seeds' S samples each. An older
evaluation.json without it gives the table's points only (1 and k seeds; S and k S samples).
"""

import argparse
import json
import os

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position

EVALUATION_FILE = 'evaluation.json'
FAMILIES = (('single model', 'deep ensemble'), ('SWA', 'MultiSWA'), ('SWAG', 'MultiSWAG'))


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


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('workdir')
  parser.add_argument('--out', help='the PNG (default: WORKDIR/calibration.png)')
  parser.add_argument('--shift_out', help='the shift figure (default: WORKDIR/shift.png)')
  args = parser.parse_args()
  print(plot_calibration(args.workdir, args.out or os.path.join(args.workdir, 'calibration.png')))
  shift = plot_shift(args.workdir, args.shift_out or os.path.join(args.workdir, 'shift.png'))
  if shift:
    print(shift)


if __name__ == '__main__':
  main()
