"""scripts/gpu_check.sh at tiny sizes on the CPU (GPU_CHECK_SMOKE=1): every step runs and the table prints."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_gpu_check_smoke_prints_its_table(tmp_path):
  pytest.importorskip('torch')
  env = dict(os.environ, GPU_CHECK_SMOKE='1', OUT=str(tmp_path), PYTHON=sys.executable,
             JAX_PLATFORMS=os.environ.get('JAX_PLATFORMS', 'cpu'))
  proc = subprocess.run(['bash', os.path.join(ROOT, 'scripts', 'gpu_check.sh')], env=env, cwd=ROOT,
                        capture_output=True, text=True, timeout=900, check=False)
  out = proc.stdout
  assert proc.returncode == 0, out[-3000:] + proc.stderr[-3000:]
  assert 'failed or ran past' not in out, out[-3000:]
  table = out[out.index('## gpu_check results'):]
  assert '| float32 | 16 | jax |' in table and '| float32 | 16 | torch |' in table
  assert '| cifar-jax epoch |' in table and '\n| 2 |' in table
