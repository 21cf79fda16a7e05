"""scripts/compare_frameworks.py: its statistics, and a tiny end-to-end comparison (slow)."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'scripts'))
from cifar_jax import metrics_writer  # pylint: disable=g-import-not-at-top,wrong-import-position
from cifar_jax import stats  # pylint: disable=g-import-not-at-top,wrong-import-position


def test_welch_interval_against_a_hand_computation():
  a, b = [0.90, 0.92, 0.91], [0.88, 0.89, 0.87]
  diff, lo, hi = stats.welch_interval(a, b)
  # Equal variances (1e-4 each) and n = 3: se = sqrt(2e-4 / 3), df = 4, t = 2.7764451 (tables).
  se = (2e-4 / 3) ** 0.5
  assert diff == pytest.approx(0.03)
  assert lo == pytest.approx(0.03 - 2.7764451 * se) and hi == pytest.approx(0.03 + 2.7764451 * se)
  assert stats.welch_interval([0.9], [0.8])[1] != stats.welch_interval(
      [0.9], [0.8])[1]  # nan with one run each


def test_t_quantile_is_exact_for_fractional_degrees_of_freedom():
  """Welch's degrees of freedom are fractional: t(0.975, 4.5) lies strictly between t(4) and t(5)."""
  assert stats.t_quantile(1) == pytest.approx(12.7062047, rel=1e-7)
  assert stats.t_quantile(30) == pytest.approx(2.0422725, rel=1e-7)
  assert stats.t_quantile(1e6) == pytest.approx(1.959966, rel=1e-6)
  assert stats.t_quantile(5) < stats.t_quantile(4.5) < stats.t_quantile(4)
  a, b = [0.90, 0.95, 0.91, 0.93], [0.88, 0.885, 0.882]
  unequal = stats.welch_interval(a, b)
  va, vb = 0.001475 / 3 / 4, 6.333333333333333e-06 / 3  # sample variance / n
  df = (va + vb) ** 2 / (va ** 2 / 3 + vb ** 2 / 2)  # Welch-Satterthwaite: 3.05..., not an integer
  assert 3 < df < 3.2
  assert unequal[2] - unequal[0] == pytest.approx(stats.t_quantile(df) * (va + vb) ** 0.5)


@pytest.mark.slow
def test_compare_frameworks_end_to_end(tmp_path):
  pytest.importorskip('torch')
  cmd = [sys.executable, 'scripts/compare_frameworks.py', '--config=configs/smoke.py', '--seeds=2',
         f'--workdir={tmp_path}', '--config.num_epochs=1', '--config.model.width_multiplier=0.125',
         '--config.data.synthetic_train_size=128', '--config.progress_bar=False']
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-2000:]
  table = (tmp_path / 'comparison.md').read_text()
  assert '| jax | 2 |' in table and '| torch | 2 |' in table and 'Welch' in table
  assert table.count('Mean ± sample standard deviation') == 1
  assert (tmp_path / 'comparison.png').stat().st_size > 0
  # A second call keeps the finished runs, and the device their training process recorded.
  (tmp_path / 'torch' / 'device.txt').write_text('torch, as the training process recorded it')
  result = subprocess.run(cmd + ['--only=torch'], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
  assert result.returncode == 0 and result.stdout.count('finished, kept') == 2
  assert (tmp_path / 'torch' / 'device.txt').read_text() == 'torch, as the training process recorded it'
  assert 'torch, as the training process recorded it' in (tmp_path / 'comparison.md').read_text()


def test_swag_rows_from_each_frameworks_last_record(tmp_path):
  """The SWAG table reads swag_eval_* of each framework's last record: mean ± std, and JAX − torch."""
  for framework, seed, acc, nll in (('jax', 0, 0.5, 1.25), ('jax', 1, 0.6, 1.0), ('torch', 0, 0.55, 1.5)):
    path = str(tmp_path / framework / f'seed_{seed}')  # compare_frameworks.run_dir's layout
    os.makedirs(path)
    writer = metrics_writer.MetricsWriter(path, tensorboard=False)
    for epoch in (1, 2):
      writer.write({'epoch': epoch, 'eval_accuracy': acc, 'elapsed_seconds': 1.0, 'images_per_second': 2.0,
                    'swa_eval_accuracy': acc, 'swag_eval_accuracy': acc, 'swag_eval_nll': nll,
                    'swag_eval_ece': 0.05, 'swag_eval_brier': 0.5})
    writer.close()
  # compare_frameworks.py defines absl flags at import (as cifar_jax.main does): checked in its own process.
  script = (
      'import json, sys; sys.path.insert(0, "scripts"); import compare_frameworks\n'
      'from configs import swag\n'
      'summary = compare_frameworks.summarize(sys.argv[1], [0, 1], 2)\n'
      'none = compare_frameworks.summarize(sys.argv[2], [0], 2)\n'
      'print(json.dumps({"nll": [summary["jax"]["swag"]["nll"], summary["torch"]["swag"]["nll"]],\n'
      '                  "lines": compare_frameworks.swag_lines(summary, swag.get_config()),\n'
      '                  "none": compare_frameworks.swag_lines(none, swag.get_config())}))\n')
  result = subprocess.run([sys.executable, '-c', script, str(tmp_path), str(tmp_path / 'none')], cwd=ROOT,
                          capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stderr[-2000:]
  out = json.loads(result.stdout.splitlines()[-1])
  assert out['nll'] == [[1.25, 1.0], [1.5]]
  lines = out['lines']
  assert '| jax | 2 | 55.00 ± 7.07 | 1.1250 ± 0.1768 | 0.0500 ± 0.0000 | 0.5000 ± 0.0000 |' in lines
  assert '| torch | 1 | 55.00 ± nan | 1.5000 ± nan | 0.0500 ± nan | 0.5000 ± nan |' in lines
  assert lines[0].startswith('SWAG, the final models: 30 samples at scale 0.5, rank 20')
  assert out['none'] == []


def test_ema_rows_from_each_frameworks_last_record(tmp_path):
  """The EMA table reads ema_eval_* of each framework's last record (its NLL is ema_eval_loss)."""
  for framework, seed, acc, nll in (('jax', 0, 0.5, 1.25), ('jax', 1, 0.6, 1.0), ('torch', 0, 0.55, 1.5),
                                    ('torch', 1, 0.45, 1.0)):
    path = str(tmp_path / framework / f'seed_{seed}')
    os.makedirs(path)
    writer = metrics_writer.MetricsWriter(path, tensorboard=False)
    for epoch in (1, 2):
      writer.write({'epoch': epoch, 'eval_accuracy': acc, 'elapsed_seconds': 1.0, 'images_per_second': 2.0,
                    'ema_eval_accuracy': acc + epoch / 100, 'ema_eval_loss': nll, 'ema_eval_ece': 0.05,
                    'ema_eval_brier': 0.5})
    writer.close()
  script = (
      'import json, sys; sys.path.insert(0, "scripts"); import compare_frameworks\n'
      'from configs import default\n'
      'config = default.get_config(); config.ema.enabled = True\n'
      'summary = compare_frameworks.summarize(sys.argv[1], [0, 1], 2)\n'
      'none = compare_frameworks.summarize(sys.argv[2], [0], 2)\n'
      'print(json.dumps({"lines": compare_frameworks.ema_lines(summary, config),\n'
      '                  "swag": compare_frameworks.swag_lines(summary, config),\n'
      '                  "none": compare_frameworks.ema_lines(none, config)}))\n')
  result = subprocess.run([sys.executable, '-c', script, str(tmp_path), str(tmp_path / 'none')], cwd=ROOT,
                          capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stderr[-2000:]
  out = json.loads(result.stdout.splitlines()[-1])
  lines = out['lines']
  assert lines[0].startswith('EMA of the weights, the final models: decay 0.999')
  assert '| jax | 2 | 57.00 ± 7.07 | 1.1250 ± 0.1768 | 0.0500 ± 0.0000 | 0.5000 ± 0.0000 |' in lines
  assert '| torch | 2 | 52.00 ± 7.07 | 1.2500 ± 0.3536 | 0.0500 ± 0.0000 | 0.5000 ± 0.0000 |' in lines
  assert any(line.startswith('JAX − torch, EMA accuracy (%): +5 points') for line in lines), lines
  assert out['swag'] == [] and out['none'] == []
