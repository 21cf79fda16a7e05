"""scripts/benchmark.py evaluation (scripts/bench/evaluation.py): the eval at each TTA level and the host's
OOD scoring and temperature fit, end to end at a tiny size: its table and JSON."""

import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARK = os.path.join(ROOT, 'scripts', 'benchmark.py')


@pytest.mark.slow  # a process compiling the eval three times: 110 s on the shared, loaded 2-core machine
def test_evaluation_benchmark_times_every_tta_level_and_the_ood_scoring(tmp_path):
  out = tmp_path / 'bench.json'
  env = dict(os.environ, JAX_PLATFORMS=os.environ.get('JAX_PLATFORMS', 'cpu'))
  proc = subprocess.run(
      [sys.executable, BENCHMARK, 'evaluation', '--model=resnet9', '--width=0.125', '--num_images=24',
       '--batch=12', '--ood_images=30', '--windows=2', f'--json={out}'],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert '| flip_translate | 6 |' in proc.stdout and 'OOD scoring' in proc.stdout
  result = json.loads(out.read_text())
  assert [result['tta'][level]['views'] for level in ('none', 'flip', 'flip_translate')] == [1, 2, 6]
  for r in result['tta'].values():
    assert len(r['windows']) == 2 and all(math.isfinite(x) and x > 0 for x in r['windows'])
    assert r['images_per_second'] > 0 and r['compile_seconds'] > 0
  assert result['ood_scoring_seconds'] > 0 and result['temperature_fit_seconds'] > 0
  assert result['args']['num_images'] == 24 and 'cpu_model' in result['fingerprint']
  bad = subprocess.run([sys.executable, BENCHMARK, 'evaluation', '--levels=none,mirror'],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False)
  assert bad.returncode == 2 and 'mirror' in bad.stderr
