"""scripts/benchmark.py end to end at a tiny size: the JSON it writes and its throughputs."""

import json
import math
import os
import subprocess
import sys

import pytest

from cifar_jax import cpu_backend

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bench_config():
  from configs import default  # pylint: disable=g-import-not-at-top
  config = default.get_config()
  config.batch_size = 16
  return config


@pytest.mark.slow  # 48 s: a development tool's smoke test, kept out of the default run's ~10 minutes
def test_benchmark_writes_finite_positive_throughputs(tmp_path):
  pytest.importorskip('torch')
  out = tmp_path / 'bench.json'
  env = dict(os.environ, JAX_PLATFORMS=os.environ.get('JAX_PLATFORMS', 'cpu'))
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'scripts', 'benchmark.py'), '--model=resnet9', '--width=0.125',
       '--batch=16', '--windows=2', '--steps=2', '--torch_modes=eager', '--jax_settings=default,plain',
       '--end_to_end=2', '--end_to_end_steps=4', f'--json={out}'],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert 'train img/s' in proc.stdout
  result = json.loads(out.read_text())
  assert {'jax', 'torch', 'torch_channels_last', 'torch_compile', 'machine', 'config',
          'jax_over_torch_eager_train'} <= set(result)
  assert result['torch_channels_last'] is None and result['torch_compile'] is None  # not asked for
  for variant in ('jax', 'jax_plain', 'torch'):
    r = result[variant]
    for key in ('train_images_per_second', 'eval_images_per_second', 'compile_seconds', 'peak_memory_mb'):
      assert isinstance(r[key], float) and math.isfinite(r[key]) and r[key] > 0, (variant, key, r[key])
    assert len(r['eval_windows']) == 2
    assert len(r['train_windows']) == (4 if variant == 'jax' else 2)  # jax: again after the end-to-end run
    assert all(math.isfinite(x) and x > 0 for x in r['train_windows'] + r['eval_windows'])
  # the trainer's default splits the CPU into one device per core (batch 16 divides); plain XLA keeps one
  assert len(result['jax']['devices']) == cpu_backend.auto_device_count(_bench_config(), os.cpu_count())
  assert len(result['jax_plain']['devices']) == 1
  e2e = result['end_to_end']
  assert e2e['epochs'] == 2 and len(e2e['epoch_images_per_second']) == 2
  assert e2e['train_images_per_second'] > 0 and math.isfinite(e2e['over_bare_step'])
  assert 'cifar_jax.main' in e2e['command']
  ratio = result['jax_over_torch_eager_train']
  assert math.isfinite(ratio) and ratio > 0
  assert result['machine']['cpu_count'] == os.cpu_count()
  assert result['config'] == {**result['config'], 'model': 'resnet9', 'batch': 16, 'windows': 2, 'steps': 2,
                              'torch_modes': ['eager'],
                              'jax_settings': ['default', 'plain']}


@pytest.mark.slow  # ~80 s on 2 cores: four workers compile
def test_benchmark_runs_both_dtypes_in_the_same_windows(tmp_path):
  pytest.importorskip('torch')
  out = tmp_path / 'bench.json'
  env = dict(os.environ, JAX_PLATFORMS=os.environ.get('JAX_PLATFORMS', 'cpu'))
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'scripts', 'benchmark.py'), '--model=resnet9', '--width=0.125',
       '--batch=16', '--windows=2', '--steps=1', '--torch_modes=eager', '--dtype=float32,bfloat16',
       f'--json={out}'],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  result = json.loads(out.read_text())
  for variant in ('jax_float32', 'jax_bfloat16', 'torch_float32', 'torch_bfloat16'):
    assert len(result[variant]['train_windows']) == 2 and result[variant]['train_images_per_second'] > 0
  assert set(result['bfloat16_over_float32_train']) == {'jax', 'torch'}
  assert result['jax'] is None and result['jax_over_torch_eager_train'] is None
  bad = subprocess.run([sys.executable, os.path.join(ROOT, 'scripts', 'benchmark.py'), '--dtype=float16'],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False)
  assert bad.returncode == 2 and '--dtype' in bad.stderr
