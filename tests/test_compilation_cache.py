"""JAX's persistent compilation cache (cifar_jax/compilation_cache.py): a second process running the same
config compiles nothing, trains the same bits as a run without the cache, and a changed model misses it.
The runs use oneDNN's convolutions (one CPU device), so their custom calls load from the cache too."""

import json
import os
import subprocess
import sys

import chex
import jax
import pytest

from cifar_jax import compilation_cache
from cifar_jax import metrics_writer
from cifar_jax import train
from configs import tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ['--config=configs/tiny.py', '--config.num_epochs=1', '--config.cpu_devices=1']
# A warm start loads its programs instead of compiling them: it must take under half the cold compile time.
WARM_COMPILE_FRACTION = 0.5


def _entries(cache: str) -> set[str]:
  return set(os.listdir(cache)) if os.path.isdir(cache) else set()


def _run(workdir: str, cache: str, width: float = 0.125) -> dict:
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env.pop(compilation_cache.ENV_CACHE_DIR, None)
  result = subprocess.run(
      [sys.executable, '-m', 'cifar_jax.main', f'--workdir={workdir}', *ARGS,
       f'--config.model.width_multiplier={width}', f'--config.compilation_cache={cache}'],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  config = tiny.get_config()
  config.model.width_multiplier = width
  state = train.restore_state(config, workdir, steps_per_epoch=1)
  record = metrics_writer.read_metrics(workdir)[0]
  return {'log': result.stderr, 'record': record, 'state': jax.device_get(state),
          'bits': {k: v for k, v in record.items() if k not in metrics_writer.TIMING_KEYS}}


@pytest.mark.slow  # default suite under 15 minutes: `make test-slow`
def test_second_run_loads_every_program_from_the_cache(tmp_path):
  cache = str(tmp_path / 'cache')
  cold = _run(str(tmp_path / 'cold'), cache)
  assert "Convolutions: oneDNN's" in cold['log']  # its custom calls, loaded from the cache below
  written = _entries(cache)
  assert written  # every program of the run, however fast it compiled
  warm = _run(str(tmp_path / 'warm'), cache)
  assert _entries(cache) == written  # a miss would have written an entry: nothing compiled again
  assert "Convolutions: oneDNN's" in warm['log']
  assert warm['record']['compile_seconds'] < WARM_COMPILE_FRACTION * cold['record']['compile_seconds']
  assert warm['record']['startup_seconds'] < cold['record']['startup_seconds']
  uncached = _run(str(tmp_path / 'uncached'), '')
  assert 'compilation cache: off' in uncached['log']
  for run in (warm, uncached):
    assert run['bits'] == cold['bits']
    for field in ('params', 'batch_stats', 'opt_state'):
      chex.assert_trees_all_equal(getattr(run['state'], field), getattr(cold['state'], field))
  wider = _run(str(tmp_path / 'wider'), cache, width=0.25)
  assert len(_entries(cache) - written) >= 2  # the train and eval programs of another model
  assert json.dumps(wider['bits']) != json.dumps(cold['bits'])


@pytest.mark.parametrize('setting, expected', [
    ('', None), ('/tmp/x', '/tmp/x'), ('~/c', os.path.expanduser('~/c'))])
def test_cache_dir(setting, expected):
  assert compilation_cache.cache_dir(setting) == expected


def test_auto_is_under_the_user_cache_or_the_environment(monkeypatch):
  monkeypatch.delenv(compilation_cache.ENV_CACHE_DIR, raising=False)
  monkeypatch.setenv('XDG_CACHE_HOME', '/somewhere')
  assert compilation_cache.cache_dir('auto') == '/somewhere/cifar_jax/jax'
  monkeypatch.setenv(compilation_cache.ENV_CACHE_DIR, '/elsewhere')
  assert compilation_cache.cache_dir('auto') == '/elsewhere'
