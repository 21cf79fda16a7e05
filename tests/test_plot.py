"""scripts/plot.py: each figure from the files a run writes (calibration and shift: test_calibration.py and
test_shift.py)."""

import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'scripts'))
import plot  # pylint: disable=g-import-not-at-top,wrong-import-position  # noqa: I001


def _metrics(workdir, epochs: int = 3) -> None:
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'metrics.jsonl'), 'w') as f:
    for epoch in range(1, epochs + 1):
      f.write(json.dumps({'epoch': epoch, 'train_loss': 2.0 / epoch, 'eval_loss': 2.1 / epoch,
                          'train_accuracy': 0.3 * epoch, 'eval_accuracy': 0.25 * epoch,
                          'learning_rate': 0.1 / epoch, 'momentum': 0.9}) + '\n')


def test_history_of_one_run_and_of_two(tmp_path, capsys):
  for name in ('a', 'b'):
    _metrics(str(tmp_path / name))
  plot.main(['history', str(tmp_path / 'a')])
  assert (tmp_path / 'a' / 'history.png').stat().st_size > 0
  plot.main(['history', str(tmp_path / 'a'), str(tmp_path / 'b'), f'--out={tmp_path / "both.png"}'])
  assert (tmp_path / 'both.png').stat().st_size > 0
  assert str(tmp_path / 'both.png') in capsys.readouterr().out


def test_lr_find_redraws_the_range_test_and_says_what_is_missing(tmp_path):
  lrs = [1e-4 * 10 ** (i / 4) for i in range(16)]
  result = {'num_seeds': 1, 'seeds': [0], 'max_lr': 0.05, 'suggestion': 'valley',
            'lr_find': {'smoothing': 'ema', 'start_lr': 1e-4, 'end_lr': 10.0, 'num_steps': 16},
            'per_seed': [{'lr': lrs, 'smoothed_loss': [2.3 - 0.05 * i for i in range(16)]}],
            'suggestions': {'valley': {'median': 0.05, 'min': 0.04, 'max': 0.06, 'per_seed': [0.05]}}}
  (tmp_path / 'lr_find.json').write_text(json.dumps(result))
  plot.main(['lr_find', str(tmp_path)])
  assert (tmp_path / 'lr_find.png').stat().st_size > 0
  with pytest.raises(SystemExit, match='lr_find.json: not found'):
    plot.main(['lr_find', str(tmp_path / 'nothing')])


def test_shift_without_an_evaluation_under_shift_is_one_line(tmp_path):
  (tmp_path / 'evaluation.json').write_text(json.dumps({'table': []}))
  with pytest.raises(SystemExit, match='no evaluation under shift'):
    plot.main(['shift', str(tmp_path)])


def test_schedules_writes_every_figure(tmp_path, capsys):
  plot.main(['schedules', f'--out={tmp_path}'])
  names = {spec['name'] for spec in plot.blog_schedules()}
  assert {p.stem for p in tmp_path.glob('*.png')} == names | {'schedules'}
  assert f'wrote {len(names) + 1} figures' in capsys.readouterr().out
