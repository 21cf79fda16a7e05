"""Data parallelism: one device, `jit` over 4 and `pmap` over 4 train the same model; checkpoints move
between device counts; two processes (jax.distributed) train what one process does.

The device count is fixed when JAX starts, so every run happens in a subprocess of this file
(`python tests/test_parallel.py SPEC.json`) with 1 or 4 virtual CPU devices
(--xla_force_host_platform_device_count). The subprocesses share a persistent compilation cache, so a run
that repeats another's programs (a resumed run, a stopped one) does not compile again.

Tolerances: the runs draw the same global batches (order, crops, flips) and differ only in how float32
sums are split over devices: BatchNorm means and variances, the mean loss and so the gradients are reduced
per shard and then across shards. Measured after 12 SGD steps (with SWA) the largest differences are
1.2e-7 on params and 8e-7 on BatchNorm variances; the checks allow rtol 1e-5 + atol 1e-5, while a real
error (per-device BatchNorm statistics, unaveraged gradients, another batch) moves values by 1e-3 or more.
"""

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from cifar_jax import config_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from cifar_jax import metrics_writer  # pylint: disable=g-import-not-at-top,wrong-import-position
from cifar_jax import parallel  # pylint: disable=g-import-not-at-top,wrong-import-position

SUBPROCESS_TIMEOUT_S = 420
TOLERANCE = dict(rtol=1e-5, atol=1e-5)
STOP_AT_STEP = 6  # mid epoch 2 of 4-step epochs (a checkpoint every 3 steps)


def make_config(parallelism: str = 'jit', num_train: int = 200, swa: bool = False):
  """tests/conftest.py's tiny_config: ResNet9 at width 1/8, batch 64, on synthetic images, XLA's BatchNorm.

  200 images: 4 steps an epoch, the last of 8 (2 per device on 4). 202: a last batch of 10, which 4
  devices do not divide (jit runs it unsharded; pmap refuses it). With `swa`, 3 epochs whose last two
  average, then recalibrate BatchNorm and evaluate the average; and beside it the weights' moving average
  (config.ema), updated every step and evaluated every epoch.
  """
  from configs import smoke  # pylint: disable=g-import-not-at-top

  config = smoke.get_config()
  config.model.width_multiplier = 0.125
  config.data.synthetic_train_size = num_train
  config.data.synthetic_eval_size = 64
  config.batch_size = 64
  config.eval_batch_size = 48
  config.progress_bar = False
  config.checkpoint_every_steps = 3
  config.parallelism = parallelism
  # XLA's BatchNorm on one device too, as every multi-device run has it (a oneDNN call is one device's):
  # the comparisons here are of the parallelism, and oneDNN's BatchNorm, equal to float32 rounding, moves a
  # 3-epoch run's momentum by ~1e-4 (tests/test_onednn_batch_norm.py compares the two directly).
  config.model.batch_norm = 'xla'
  if swa:
    config.num_epochs = 3
    config.swa.enabled = True
    config.swa.start_epoch = 1
    config.ema.enabled, config.ema.decay = True, 0.8
  return config


# The subprocess ------------------------------------------------------------------------------------------


class _Stop(Exception):
  """Ends a run right after its checkpoint at STOP_AT_STEP, as a preempted job would end."""


# XLA compilations in this process (cache hits included): (the run's phase, the function's name). The
# Program's background compiles (its threads, named 'cifar_jax_compile...') are the phase 'background'.
_COMPILES = {'phase': 'setup', 'log': []}


def _count_compiles(event, *unused_args, fun_name='', **unused_kwargs):
  if event == '/jax/core/compile/backend_compile_duration':
    background = threading.current_thread().name.startswith('cifar_jax_compile')
    _COMPILES['log'].append(('background' if background else _COMPILES['phase'], fun_name))


def _run_actions(run_spec: dict) -> list:
  """An action that watches a run: training begins (phase 'first_save': the first checkpoint is yet to
  be written), each checkpoint is written (phase 'after_first_save'), and the optional stop."""
  from cifar_jax import loop  # pylint: disable=g-import-not-at-top

  class Watch(loop.Action):
    program = None

    def start(self, run):
      self.program = run.program
      _COMPILES['phase'] = 'first_save'

    def due(self, step):  # where the run checkpoints (make_config: every 3 steps and every epoch)
      return step % 3 == 0 or step % self.program.steps_per_epoch == 0

    def __call__(self, run):  # after the checkpoint of this step (the default actions run first)
      _COMPILES['phase'] = 'after_first_save'
      if run_spec.get('stop') and run.step == STOP_AT_STEP:
        raise _Stop()

  return [Watch()]


def _run_one(run: dict) -> dict:
  """Trains one run of a spec; returns its errors, compilation count and final state file."""
  import jax  # pylint: disable=g-import-not-at-top

  from cifar_jax import train  # pylint: disable=g-import-not-at-top

  config = make_config(**run['config'])
  for field, value in run.get('distributed', {}).items():
    setattr(config.distributed, field, value)
  if run.get('resume_from'):
    shutil.copytree(run['resume_from'], run['workdir'])
  _COMPILES.update(phase='setup', log=[])
  actions = _run_actions(run)
  result = {'error': None, 'stopped': False}
  try:
    state = train.train_and_evaluate(config, run['workdir'], actions=actions)
  except config_lib.ConfigError as e:
    result['error'] = str(e)
    return result
  except _Stop:
    result['stopped'] = True
    return result
  program = actions[0].program
  # Orbax's first save of arrays replicated over several devices compiles its slicing ('jit(slice)',
  # once per array shape); nothing else may compile once training runs, and nothing after that save.
  first = [name for phase, name in _COMPILES['log'] if phase == 'first_save']
  later = [name for phase, name in _COMPILES['log'] if phase == 'after_first_save']
  result['compiles_while_training'] = sum(name != 'jit(slice)' for name in first) + len(later)
  result['compiles_in_later_saves'] = len(later)
  result['compiled_while_training'] = sorted(set(first + later))
  program.wait_compiled()
  result['compiled_in_background'] = sorted(name for phase, name in _COMPILES['log'] if phase == 'background')
  if program.par.mode == 'jit':
    # The batch sizes the stem convolution (8 channels at 32 x 32) sees on each device.
    result['conv_batches'] = {
        size: sorted({int(b) for b in re.findall(r'f32\[(\d+),32,32,8\]', compiled.as_text())})
        for size, compiled in program.train.items()}
  result['traces'] = dict(program.traces)
  arrays = {'params': state.params, 'batch_stats': state.batch_stats, 'swa_params': state.swa_params,
            'swa_batch_stats': state.swa_batch_stats, 'momentum': state.opt_state.inner_state[1].trace,
            'ema_params': state.ema_params, 'ema_batch_stats': state.ema_batch_stats}
  host = jax.tree.map(lambda x: np.asarray(x.addressable_shards[0].data), arrays)
  flat = {jax.tree_util.keystr(path): value for path, value in jax.tree_util.tree_leaves_with_path(host)}
  result['final'] = os.path.join(run['workdir'], f'final_{jax.process_index()}.npz')
  np.savez(result['final'], **flat)
  return result


def _worker(spec_path: str) -> None:
  import jax  # pylint: disable=g-import-not-at-top

  jax.monitoring.register_event_duration_secs_listener(_count_compiles)
  with open(spec_path) as f:
    spec = json.load(f)
  results = {run['name']: _run_one(run) for run in spec['runs']}
  with open(spec['out'], 'w') as f:
    json.dump(results, f)


# The test process ----------------------------------------------------------------------------------------


def _env(num_devices: int, cache_dir: str) -> dict:
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS=f'--xla_force_host_platform_device_count={num_devices}',
             JAX_COMPILATION_CACHE_DIR=cache_dir, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')
  for name in (parallel.ENV_COORDINATOR_ADDRESS, parallel.ENV_NUM_PROCESSES, parallel.ENV_PROCESS_ID):
    env.pop(name, None)
  return env


def _spawn(runs: list, num_devices: int, tmp, cache_dir: str, tag: str):
  spec = {'runs': runs, 'out': str(tmp / f'{tag}.json')}
  with open(tmp / f'{tag}_spec.json', 'w') as f:
    json.dump(spec, f)
  log = open(tmp / f'{tag}.log', 'w')
  proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), str(tmp / f'{tag}_spec.json')],
                          cwd=ROOT, env=_env(num_devices, cache_dir), stdout=log,
                          stderr=subprocess.STDOUT)
  return proc, spec['out'], tmp / f'{tag}.log'


def _wait(*procs) -> list:
  """Waits for (proc, out, log) triples, all within SUBPROCESS_TIMEOUT_S; returns their results."""
  deadline = time.monotonic() + SUBPROCESS_TIMEOUT_S
  results = []
  for proc, out, log in procs:
    try:
      proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      for other, _, _ in procs:
        other.kill()
      pytest.fail(f'subprocess timed out after {SUBPROCESS_TIMEOUT_S} s; log: {log}')
    if proc.returncode != 0:
      pytest.fail(f'subprocess failed ({proc.returncode}):\n{open(log).read()[-4000:]}')
    with open(out) as f:
      results.append(json.load(f))
  return results


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """Every single-process run the tests compare, keyed by name, each with its workdir."""
  tmp = tmp_path_factory.mktemp('parallel')
  cache = str(tmp / 'jax_cache')
  wd = lambda name: str(tmp / name)
  swa = lambda mode: {'parallelism': mode, 'swa': True}
  uneven = {'num_train': 202}
  # Two rounds of two concurrent processes; the second round resumes the first round's checkpoints.
  one, four = _wait(
      _spawn([
          {'name': 'one', 'workdir': wd('one'), 'config': swa('jit')},
          {'name': 'one_202', 'workdir': wd('one_202'), 'config': uneven},
          {'name': 'one_202_stopped', 'workdir': wd('one_202_stopped'), 'config': uneven,
           'stop': True},
      ], 1, tmp, cache, 'one_device'),
      _spawn([
          {'name': 'jit', 'workdir': wd('jit'), 'config': swa('jit')},
          {'name': 'pmap', 'workdir': wd('pmap'), 'config': swa('pmap')},
          {'name': 'pmap_stopped', 'workdir': wd('pmap_stopped'), 'config': swa('pmap'),
           'stop': True},
          {'name': 'pmap_202', 'workdir': wd('pmap_202'), 'config': dict(uneven, parallelism='pmap')},
      ], 4, tmp, cache, 'four_devices'))
  back, forth = _wait(
      _spawn([{'name': 'pmap_resumed_on_one', 'workdir': wd('pmap_resumed_on_one'),
               'config': swa('jit'), 'resume_from': wd('pmap_stopped')}], 1, tmp, cache, 'on_one'),
      _spawn([{'name': 'jit_202_resumed', 'workdir': wd('jit_202_resumed'), 'config': uneven,
               'resume_from': wd('one_202_stopped')}], 4, tmp, cache, 'on_four'))
  results = {**one, **four, **back, **forth}
  for name, result in results.items():
    result['workdir'] = wd(name)
  return results


def _final(result) -> dict:
  """The final state's arrays by key path."""
  with np.load(result['final'], allow_pickle=False) as f:
    return dict(f)


def _assert_states_close(actual, expected):
  assert sorted(actual) == sorted(expected)
  for key in expected:
    np.testing.assert_allclose(actual[key], expected[key], err_msg=key, **TOLERANCE)


def _metrics(result, *keys):
  records = metrics_writer.read_metrics(result['workdir'])
  return [{k: r[k] for k in keys if k in r} for r in records]


def test_jit_and_pmap_on_4_devices_match_one_device(runs):
  """Params, BatchNorm statistics, momentum, the SWA average and its recalibrated statistics, the EMA."""
  one = _final(runs['one'])
  assert any('swa_batch_stats' in k for k in one) and any('ema_batch_stats' in k for k in one)
  for mode in ('jit', 'pmap'):
    _assert_states_close(_final(runs[mode]), one)
    # The same images were classified right (exact counts); losses agree to float rounding.
    accuracies = ('train_accuracy', 'eval_accuracy', 'swa_eval_accuracy', 'ema_eval_accuracy')
    assert _metrics(runs[mode], *accuracies) == _metrics(runs['one'], *accuracies)
    losses = ('train_loss', 'eval_loss', 'swa_eval_loss', 'ema_eval_loss')
    for got, want in zip(_metrics(runs[mode], *losses), _metrics(runs['one'], *losses)):
      assert got.keys() == want.keys()
      for key in want:
        assert got[key] == pytest.approx(want[key], rel=1e-5), key


def test_jit_splits_each_batch_over_the_devices(runs):
  """The compiled jit step convolves 64 / 4 = 16 images per device; a 10-image batch runs whole.

  (Shapes are the stem convolution's f32[batch, 32, 32, 8] activations in the per-device program.)
  """
  one, jit, uneven = (runs[name]['conv_batches'] for name in ('one', 'jit', 'jit_202_resumed'))
  assert 64 in one['64'] and 8 in one['8']
  assert jit['64'] == [16] and jit['8'] == [2]
  assert uneven['64'] == [16] and uneven['10'] == [10]


def _expected_traces(swa_enabled: bool) -> dict:
  """Traced once per batch size (64 and the last), eval once (and the SWA and EMA evals), nothing more."""
  traces = {'permutation': 1, 'train': 2, 'eval': 1 + 2 * swa_enabled}
  if swa_enabled:
    traces.update(swa_update=1, recalibrate=2)
  return traces


def test_no_compilation_once_training_runs(runs):
  """Every step (each batch size, eval, SWA) is compiled by the Program, before the first step or in its
  background threads; no call compiles anything.

  (Orbax compiles its own slicing at the first checkpoint of arrays replicated over several devices;
  those are counted apart and must not recur.)
  """
  for name in ('one', 'jit', 'pmap', 'one_202', 'jit_202_resumed', 'pmap_resumed_on_one'):
    assert runs[name]['compiles_while_training'] == 0, name
    background = runs[name]['compiled_in_background']
    assert background, name  # under pmap XLA names them 'jit(_fun)'
    assert 'pmap' in name or all('cifar_jax_' in fn for fn in background), (name, background)
    assert runs[name]['compiles_in_later_saves'] == 0, name
    swa_enabled = name in ('one', 'jit', 'pmap', 'pmap_resumed_on_one')
    assert runs[name]['traces'] == _expected_traces(swa_enabled), name


def test_checkpoint_from_4_devices_continues_on_1(runs):
  """pmap on 4 stops mid-epoch (mid SWA); one device resumes it and ends where one device ends."""
  assert runs['pmap_stopped']['stopped']
  _assert_states_close(_final(runs['pmap_resumed_on_one']), _final(runs['one']))
  assert [r['step'] for r in metrics_writer.read_metrics(runs['pmap_resumed_on_one']['workdir'])] == [
      4, 8, 12]


def test_checkpoint_from_1_device_continues_on_4(runs):
  """One device stops mid-epoch; jit on 4 resumes it, its 10-image last batch running unsharded."""
  assert runs['one_202_stopped']['stopped']
  _assert_states_close(_final(runs['jit_202_resumed']), _final(runs['one_202']))
  accuracies = ('train_accuracy', 'eval_accuracy')
  assert _metrics(runs['jit_202_resumed'], *accuracies) == _metrics(runs['one_202'], *accuracies)


def test_pmap_refuses_a_last_batch_the_devices_do_not_divide(runs):
  error = runs['pmap_202']['error']
  assert error and 'data.drop_remainder=True' in error and '202 % 64 = 10' in error
  assert '4 devices' in error


def test_check_batch_sizes_names_the_field_and_the_count():
  with pytest.raises(config_lib.ConfigError, match=r'batch_size=100 .* 8 devices .* 96 or 104'):
    parallel.check_batch_sizes('jit', 8, 100, 50_000, False)
  with pytest.raises(config_lib.ConfigError, match=r'batch_size=4 .* 8 devices .* such as 8,'):
    parallel.check_batch_sizes('pmap', 8, 4, 50_000, False)
  parallel.check_batch_sizes('jit', 8, 128, 50_000, False)  # last batch 80: unsharded under jit
  parallel.check_batch_sizes('pmap', 8, 128, 50_000, False)  # 80 = 8 x 10
  parallel.check_batch_sizes('pmap', 3, 129, 50_000, True)  # the partial batch is dropped
  with pytest.raises(config_lib.ConfigError, match='drop_remainder'):
    parallel.check_batch_sizes('pmap', 3, 129, 50_000, False)  # 50_000 % 129 = 77
  with pytest.raises(config_lib.ConfigError, match='parallelism must be one of'):
    parallel.create('pjit')


@pytest.mark.parametrize('mode,num_seeds', [('jit', 1), ('jit', 2), ('pmap', 1)])
def test_abstract_per_seed_is_what_place_per_seed_gives(mode, num_seeds):
  """The shapes the first train call compiles for (before the state exists) are the placed state's:
  shape, dtype (a Python int and int64 canonicalised) and sharding, leaf by leaf."""
  import jax  # pylint: disable=g-import-not-at-top

  from cifar_jax import steps  # pylint: disable=g-import-not-at-top

  par = parallel.create(mode, num_seeds=num_seeds)
  one = {'w': np.ones((3, 2), np.float32), 'count': np.zeros((), np.int64), 'step': 0}
  placed = par.place_per_seed(steps.per_seed([one] * num_seeds))
  abstract = par.abstract_per_seed(jax.eval_shape(lambda: one))
  describe = lambda x: (x.shape, x.dtype, x.sharding)
  assert jax.tree.map(describe, abstract) == jax.tree.map(describe, placed)


def test_initialize_distributed_reads_config_then_environment(monkeypatch):
  import jax  # pylint: disable=g-import-not-at-top

  calls = []
  monkeypatch.setattr(jax.distributed, 'is_initialized', lambda: False)
  monkeypatch.setattr(jax.distributed, 'initialize', lambda **kwargs: calls.append(kwargs))
  config = make_config().distributed
  for name in (parallel.ENV_COORDINATOR_ADDRESS, parallel.ENV_NUM_PROCESSES, parallel.ENV_PROCESS_ID):
    monkeypatch.delenv(name, raising=False)
  assert not parallel.initialize_distributed(config) and not calls  # nothing set: one process

  monkeypatch.setenv(parallel.ENV_COORDINATOR_ADDRESS, '10.0.0.1:1234')
  monkeypatch.setenv(parallel.ENV_NUM_PROCESSES, '2')
  monkeypatch.setenv(parallel.ENV_PROCESS_ID, '1')
  assert parallel.initialize_distributed(config)
  config.process_id = 0  # a config field wins over its variable
  assert parallel.initialize_distributed(config)
  assert calls == [dict(coordinator_address='10.0.0.1:1234', num_processes=2, process_id=1),
                   dict(coordinator_address='10.0.0.1:1234', num_processes=2, process_id=0)]

  config.process_id = 2
  with pytest.raises(config_lib.ConfigError, match=r'distributed.process_id=2 must be in 0..1'):
    parallel.initialize_distributed(config)
  monkeypatch.setenv(parallel.ENV_NUM_PROCESSES, 'two')
  with pytest.raises(config_lib.ConfigError, match='JAX_NUM_PROCESSES'):
    parallel.initialize_distributed(make_config().distributed)


def _free_port() -> int:
  with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@pytest.mark.parametrize('config, reference', [
    ({'num_train': 202}, 'one_202'),
    pytest.param({'parallelism': 'pmap', 'swa': True}, 'one', marks=pytest.mark.slow),
], ids=['jit', 'pmap_swa'])
def test_two_processes_match_one_process(runs, tmp_path, config, reference):
  """2 processes x 2 devices (gloo collectives on 127.0.0.1) train what one device does.

  One workdir, written by both: metrics and config.json once (process 0), one orbax checkpoint of the
  global state. Under jit the last batch (10 images) does not split over the 4 devices and runs
  unsharded; under pmap (slow) the run averages and recalibrates SWA too.
  """
  cache = str(tmp_path / 'jax_cache')
  address = f'127.0.0.1:{_free_port()}'
  workdir = str(tmp_path / 'two_processes')
  procs = []
  for process_id in (0, 1):
    run = {'name': 'two_processes', 'workdir': workdir, 'config': config,
           'distributed': {'coordinator_address': address, 'num_processes': 2,
                           'process_id': process_id}}
    procs.append(_spawn([run], 2, tmp_path, cache, f'process_{process_id}'))
  results = [r['two_processes'] for r in _wait(*procs)]
  one = _final(runs[reference])
  for result in results:
    _assert_states_close(_final(result), one)
  keys = ('step', 'train_accuracy', 'eval_accuracy', 'swa_eval_accuracy')
  assert _metrics({'workdir': workdir}, *keys) == _metrics(runs[reference], *keys)
  checkpoints = lambda d: sorted(os.listdir(os.path.join(d, 'checkpoints')), key=int)
  assert checkpoints(workdir) == checkpoints(runs[reference]['workdir'])
  swa_enabled = config.get('swa', False)
  for result in results:
    assert result['traces'] == _expected_traces(swa_enabled)
    assert result['compiles_in_later_saves'] == 0
    # Across processes pmap cannot lower ahead: each function compiles at its first call, once.
    if config.get('parallelism') != 'pmap':
      assert result['compiles_while_training'] == 0


if __name__ == '__main__':
  _worker(sys.argv[1])
