"""Plots the evaluation table of `--mode=evaluate` (evaluation.json): reliability diagrams (accuracy
against confidence in the 15 ECE bins, each model of the table) and NLL against the number of models
averaged (single model -> deep ensemble, SWA -> MultiSWA, SWAG -> MultiSWAG), as the papers show them.

  cifar-jax --config=configs/multiswag.py --workdir=runs/multiswag --mode=evaluate
  python scripts/plot_calibration.py runs/multiswag        # writes runs/multiswag/calibration.png

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


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('workdir')
  parser.add_argument('--out', help='the PNG (default: WORKDIR/calibration.png)')
  args = parser.parse_args()
  print(plot_calibration(args.workdir, args.out or os.path.join(args.workdir, 'calibration.png')))


if __name__ == '__main__':
  main()
