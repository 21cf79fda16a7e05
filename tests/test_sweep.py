"""scripts/sweep.py: two configs with two seeds each on tiny synthetic data; the table, plot and resume."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'scripts'))
import sweep  # pylint: disable=g-import-not-at-top,wrong-import-position

COSINE = '''"""Smoke with a cosine schedule. Blog: 93.91 % (not this run's figure: a test value)."""
from configs import smoke


def get_config():
  config = smoke.get_config()
  config.schedule.name = 'cosine'
  return config
'''


def _sweep(tmp_path, *extra):
  cmd = [sys.executable, 'scripts/sweep.py', f'--configs=configs/smoke.py,{tmp_path / "cosine.py"}',
         '--seeds=2', f'--workdir={tmp_path / "sweep"}', '--set=num_epochs=2',
         '--set=model.width_multiplier=0.125', '--set=data.synthetic_train_size=128',
         '--set=data.synthetic_eval_size=64', '--set=progress_bar=False', *extra]
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow  # default suite under 15 minutes: `make test-slow`
def test_sweep_tables_two_configs_and_resumes(tmp_path):
  (tmp_path / 'cosine.py').write_text(COSINE)
  result = _sweep(tmp_path)
  assert result.returncode == 0, result.stderr[-3000:]
  table = (tmp_path / 'sweep' / 'sweep.md').read_text()
  rows = [line for line in table.splitlines() if line.startswith('| smoke') or line.startswith('| cosine')]
  assert len(rows) == 2, table
  cells = rows[1].split(' | ')
  assert cells[2:4] == ['2', '2'] and ' ± ' in cells[4] and cells[5].startswith('[')
  assert cells[7] == '93.91 (2 epochs)'  # the docstring's figure, at the config's own length
  summary = sweep.summarize_run(str(tmp_path / 'sweep' / 'cosine'))
  mean, std, lo, hi = sweep.mean_std_interval(summary['final'])
  assert f'{mean:.2f} ± {std:.2f}' == cells[4] and f'[{lo:.2f}, {hi:.2f}]' == cells[5]
  assert (tmp_path / 'sweep' / 'sweep.png').stat().st_size > 0
  # Resumable: a second call keeps both finished runs.
  result = _sweep(tmp_path)
  assert result.returncode == 0 and result.stdout.count('finished, kept') == 2, result.stdout


def test_interval_and_overrides():
  mean, std, lo, hi = sweep.mean_std_interval([90.0, 92.0, 91.0])
  assert (mean, std) == (91.0, 1.0)
  half = 4.3026527 / 3 ** 0.5  # t(0.975, 2) = 4.3026527 (tables)
  assert lo == pytest.approx(91.0 - half, rel=1e-8) and hi == pytest.approx(91.0 + half, rel=1e-8)
  assert sweep.parse_override('schedule.milestones=(1, 2)') == ('schedule.milestones', (1, 2))
  assert sweep.parse_override('data.source=npz') == ('data.source', 'npz')
  assert sweep.blog_figure('Blog figure: 93.42 % test accuracy') == 93.42
  names = [os.path.basename(p) for p in sweep.blog_configs()]
  assert 'smoke.py' not in names and 'tiny.py' not in names
  assert 'one_cycle.py' in names and 'default.py' in names
