"""User errors end with exit status 2 and one line on stderr naming the field or file and what is valid.

Most cases run the command line in-process (`main.parse_flags` then `main.main` on fresh flags); a few run
`python -m cifar_jax.main` to show the same from a shell.
"""

import errno
import logging as pylogging
import os
import pickle
import socket
import subprocess
import sys

from absl import flags
from absl import logging
import jax
import numpy as np
import pytest

from cifar_jax import config_lib
from cifar_jax import errors
from cifar_jax import main
from cifar_jax import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(ROOT, 'configs', 'smoke.py')


@pytest.fixture
def cli(monkeypatch, capsys, tmp_path):
  """Runs the command line in-process on configs/smoke.py; returns (exit status, stderr)."""
  verbosity = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)  # absl logs to stderr before its flags are parsed

  def run(*args, config=SMOKE, workdir=str(tmp_path / 'run')):
    argv = ['cifar-jax']
    argv += [f'--config={config}'] if config else []
    argv += [f'--workdir={workdir}'] if workdir else []
    argv += list(args)
    flag_values = flags.FlagValues()
    main.define_flags(flag_values)
    monkeypatch.setattr(sys, 'argv', argv)  # config_flags reads the overrides from sys.argv
    with pytest.raises(SystemExit) as exit_info:
      main.main(main.parse_flags(argv, flag_values), flag_values)
    return exit_info.value.code, capsys.readouterr().err

  yield run
  logging.set_verbosity(verbosity)


def assert_user_error(result, *fragments, status=2):
  """Status 2 (or `status`), exactly one non-empty line on stderr, no traceback, and every fragment in
  that line."""
  code, stderr = result
  lines = [line for line in stderr.splitlines() if line.strip()]
  assert code == status, stderr
  assert len(lines) == 1 and lines[0].startswith('cifar-jax: error: '), stderr
  assert 'Traceback' not in stderr
  for fragment in fragments:
    assert fragment in lines[0], (fragment, lines[0])
  return lines[0]


# Config values ----------------------------------------------------------------------------------------


@pytest.mark.parametrize('override, fragments', [
    ('--config.model.name=resnet50', ('model.name', "'resnet18'", "'resnet9'", "'resnet50'")),
    ('--config.model.norm=layer', ('model.norm', "'batch'", "'group_ws'")),
    ('--config.schedule.name=linear', ('schedule.name', "'one_cycle'", "'linear'")),
    ('--config.data.source=imagenet', ('data.source', "'synthetic'", "'npz'")),
    ('--config.optimizer.lr=0', ('optimizer.lr', 'positive number', 'got 0')),
    ('--config.optimizer.lr=-0.1', ('optimizer.lr', 'positive number', '-0.1')),
    ('--config.batch_size=0', ('batch_size', 'positive integer', 'got 0')),
    ('--config.num_epochs=-1', ('num_epochs', 'positive integer', '-1')),
    ('--config.schedule.milestones=(3,1)', ('schedule.milestones', 'increasing order', '(3, 1)')),
    ('--config.schedule.warmup_epochs=-2', ('schedule.warmup_epochs', '>= 0')),
])
def test_bad_config_values(cli, override, fragments):
  assert_user_error(cli(override), *fragments)


def test_bad_parallelism(cli, tmp_path):
  # A config that has the field whether or not configs/default.py defines it yet.
  config = tmp_path / 'parallel.py'
  config.write_text('from configs import smoke\n\n\ndef get_config():\n  config = smoke.get_config()\n'
                    "  config.parallelism = 'jit'\n  return config\n")
  assert_user_error(cli('--config.parallelism=vmap', config=str(config)),
                    'parallelism', "'jit'", "'pmap'", "'vmap'")


def test_swa_starting_after_the_end(cli):
  assert_user_error(cli('--config.swa.enabled=True', '--config.swa.start_epoch=5'),
                    'swa.start_epoch', '1..1', 'num_epochs=2', 'got 5')


@pytest.mark.parametrize('override, fragments', [
    ('--config.ema.decay=-0.1', ('ema.decay', '[0, 1)', '-0.1')),
    ('--config.ema.decay=1.5', ('ema.decay', '[0, 1)', '1.5')),
    ('--config.ema.decay=1', ('ema.decay', '[0, 1)', '1')),
    ('--config.ema.every_steps=0', ('ema.every_steps', '>= 1', 'got 0')),
    ('--config.ema.batch_stats=recalibrate', ('ema.batch_stats', "'average'", "'copy'", "'recalibrate'")),
])
def test_bad_ema_values(cli, override, fragments):
  assert_user_error(cli('--config.ema.enabled=True', override), *fragments)


def test_one_cycle_total_steps_shorter_than_the_run(cli):
  # 256 images in batches of 64: 4 steps an epoch, 8 in the run.
  line = assert_user_error(cli('--config.data.synthetic_train_size=256', '--config.schedule.name=one_cycle',
                               '--config.schedule.total_steps=5'),
                           'schedule.total_steps=5', '8 steps', '-1')
  assert 'shorter than the run' in line


def test_milestones_beyond_the_run_only_warn(monkeypatch):
  """Issue 2 runs the 50-epoch default (milestones 25, 40) with --config.num_epochs=2: a warning."""
  from configs import default  # pylint: disable=g-import-not-at-top

  config = default.get_config()
  config.num_epochs = 2
  warnings = []
  monkeypatch.setattr(config_lib.logging, 'warning', lambda *args: warnings.append(args))
  config_lib.validate(config)
  config_lib.validate_against_run(config, steps_per_epoch=391)
  assert len(warnings) == 1 and warnings[0][1] == (25, 40)


def test_batch_not_divisible_by_the_devices(cli, monkeypatch):
  monkeypatch.setattr(jax, 'device_count', lambda: 3)
  assert_user_error(cli(), 'batch_size=64', 'does not split evenly over the 3 devices', '63 or 66')
  from configs import smoke  # pylint: disable=g-import-not-at-top

  config = smoke.get_config()
  config_lib.validate_devices(config, 1)
  config_lib.validate_devices(config, 8)
  config.batch_size = 2
  with pytest.raises(config_lib.ConfigError, match='such as 4,'):
    config_lib.validate_devices(config, 4)


# The command line -------------------------------------------------------------------------------------


def test_unknown_field_suggests_the_nearest(cli):
  assert_user_error(cli('--config.optimizer.lrr=0.1'),
                    '--config.optimizer.lrr', 'no such config field', 'did you mean --config.optimizer.lr?')
  assert_user_error(cli('--config.optimiser.momentum=0.8'), 'did you mean --config.optimizer.momentum?')
  assert_user_error(cli('--config.optimizer.xyz=1'),
                    "optimizer has ['clip_grad_norm', 'lr', 'micro_batches', 'momentum'")


def test_wrong_type(cli):
  assert_user_error(cli('--config.num_epochs=abc'), '--config.num_epochs=abc', 'must be an int like 2')
  assert_user_error(cli('--config.optimizer.lr=fast'), 'optimizer.lr must be a float like 0.1')


def test_missing_flags_and_config_file(cli, tmp_path):
  assert_user_error(cli(config=None), '--config is required', 'configs/default.py')
  assert_user_error(cli(workdir=None), '--workdir is required')
  assert_user_error(cli(config=str(tmp_path / 'nope.py')), 'nope.py', 'no such file', 'configs/default.py')
  broken = tmp_path / 'broken.py'
  broken.write_text('def get_config(:\n')
  assert_user_error(cli(config=str(broken)), 'broken.py', 'cannot load it', 'SyntaxError')
  assert_user_error(cli('--workdirr=x'), "'workdirr'", 'workdir')
  assert_user_error(cli('--mode=training'), '--mode', 'train|evaluate|export')
  assert_user_error(cli('stray'), "unexpected arguments ['stray']")


def test_debug_shows_the_traceback(cli):
  with pytest.raises(config_lib.ConfigError, match='lrr'):
    cli('--config.optimizer.lrr=0.1', '--debug')
  with pytest.raises(config_lib.ConfigError, match='model.name'):
    cli('--config.model.name=resnet50', '--debug')


# Data -------------------------------------------------------------------------------------------------


def _npz(path, n=4, **changes):
  arrays = dict(x_train=np.zeros((n, 32, 32, 3), np.uint8), y_train=np.zeros(n, np.int64))
  arrays.update(changes)
  np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
  return str(path)


@pytest.mark.parametrize('changes, fragments', [
    (dict(x_train=None, images=np.zeros((4, 32, 32, 3), np.uint8)),
     ("lacks ['x_train']", 'x_train, y_train')),
    (dict(x_train=np.zeros((4, 3, 32, 32), np.uint8)), ('(N, 32, 32, 3)', '(4, 3, 32, 32)')),
    (dict(x_train=np.zeros((4, 32, 32, 3), np.float32)), ('must be uint8', 'float32')),
    (dict(y_train=np.full(4, 10)), ('labels must lie in 0..9', '0..10')),
    (dict(y_train=np.zeros(3, np.int64)), ('labels must have shape (4,)',)),
    (dict(y_train=np.zeros(4, np.float32)), ('labels must be integers',)),
    (dict(x_train=np.zeros((0, 32, 32, 3), np.uint8), y_train=np.zeros(0, np.int64)), ('has no examples',)),
    (dict(x_test=np.zeros((0, 32, 32, 3), np.uint8), y_test=np.zeros(0, np.int64)),
     ('x_test, y_test', 'has no examples')),
    (dict(x_train=np.zeros((4, 32, 32), np.uint8)), ('(N, 32, 32, 3)', '(4, 32, 32)')),
])
def test_npz_with_wrong_contents(cli, tmp_path, changes, fragments):
  path = _npz(tmp_path / 'bad.npz', **changes)
  assert_user_error(cli('--config.data.source=npz', f'--config.data.path={path}'),
                    'data.path', 'bad.npz', *fragments)


def test_npz_missing_or_unreadable(cli, tmp_path):
  source = '--config.data.source=npz'
  assert_user_error(cli(source), 'data.path must be set', 'data.source=npz', '.npz file')
  assert_user_error(cli(source, f'--config.data.path={tmp_path / "missing.npz"}'),
                    'data.path', 'no such file', 'missing.npz')
  assert_user_error(cli(source, f'--config.data.path={tmp_path}'), 'data.path', 'is a folder', '.npz file')
  corrupt = tmp_path / 'corrupt.npz'
  corrupt.write_bytes(b'PK\x03\x04 not really a zip')
  assert_user_error(cli(source, f'--config.data.path={corrupt}'), 'data.path', 'cannot read', 'corrupt.npz')


def test_npz_truncated_or_corrupt(cli, tmp_path):
  """A copy cut short, bytes flipped inside an array, a pickled object array: one line each."""
  source = '--config.data.source=npz'
  good = open(_npz(tmp_path / 'good.npz', n=64), 'rb').read()
  (tmp_path / 'truncated.npz').write_bytes(good[:len(good) // 2])
  assert_user_error(cli(source, f'--config.data.path={tmp_path / "truncated.npz"}'), 'cannot read',
                    'truncated.npz', 'BadZipFile')
  middle = len(good) // 3  # inside x_train's bytes: the zip's CRC check fails on reading it
  (tmp_path / 'corrupt.npz').write_bytes(good[:middle] + bytes(b ^ 0xFF for b in good[middle:middle + 64]) +
                                         good[middle + 64:])
  assert_user_error(cli(source, f'--config.data.path={tmp_path / "corrupt.npz"}'), 'cannot read',
                    'corrupt.npz', 'CRC')


class _CreatesAFile:
  """Unpickled by plain `pickle.load`, this creates `path`: what a crafted data file can do."""

  def __init__(self, path):
    self.path = path

  def __reduce__(self):
    return (open, (self.path, 'w'))


def test_npz_with_a_pickled_object_array_is_refused(cli, tmp_path):
  victim = tmp_path / 'created_by_the_npz'
  np.savez(tmp_path / 'crafted.npz', x_train=np.array([_CreatesAFile(str(victim))], dtype=object),
           y_train=np.zeros(1, np.int64))
  assert_user_error(cli('--config.data.source=npz', f'--config.data.path={tmp_path / "crafted.npz"}'),
                    'cannot read', 'crafted.npz', 'allow_pickle=False')
  assert not victim.exists()


def test_validation_size_larger_than_the_data(cli, tmp_path):
  assert_user_error(cli('--config.data.synthetic_train_size=100', '--config.data.validation_size=100'),
                    'data.validation_size=100 must be below the training set size 100')
  path = _npz(tmp_path / 'four.npz')
  assert_user_error(cli('--config.data.source=npz', f'--config.data.path={path}',
                        '--config.data.validation_size=7'),
                    'data.validation_size=7 must be below the training set size 4')


def _cifar10_python(folder, bad_batch=None):
  folder.mkdir()
  for name in [f'data_batch_{i}' for i in range(1, 6)] + ['test_batch']:
    batch = {b'data': np.zeros((2, 3072), np.uint8), b'labels': [0, 9]}
    with open(folder / name, 'wb') as f:
      pickle.dump(bad_batch if bad_batch is not None and name == 'data_batch_3' else batch, f)
  return str(folder)


@pytest.mark.parametrize('bad_batch, fragments', [
    ({b'data': np.zeros((2, 3072), np.uint8)}, ("b'data' and b'labels'",)),
    ({b'data': np.zeros((2, 1024), np.uint8), b'labels': [0, 1]}, ('uint8 (N, 3072)', '(2, 1024)')),
    ({b'data': np.zeros((2, 3072), np.float64), b'labels': [0, 1]}, ('uint8 (N, 3072)', 'float64')),
    ({b'data': np.zeros((2, 3072), np.uint8), b'labels': [0, 12]}, ('labels must lie in 0..9', '0..12')),
    ([1, 2, 3], ("b'data' and b'labels'", 'list')),
    ({b'data': np.zeros((2, 3072), np.uint8), b'labels': [0]}, ('labels must have shape (2,)', '(1,)')),
    ({b'data': np.zeros((0, 3072), np.uint8), b'labels': []}, ('has no examples',)),
])
def test_cifar10_python_with_wrong_contents(cli, tmp_path, bad_batch, fragments):
  folder = _cifar10_python(tmp_path / 'cifar-10-batches-py', bad_batch)
  assert_user_error(cli('--config.data.source=cifar10_python', f'--config.data.path={folder}'),
                    'data.path', 'data_batch_3', *fragments)


def test_cifar10_python_crafted_pickle_is_refused_before_it_runs(cli, tmp_path):
  """A batch file that creates a file when `pickle.load` reads it (as torchvision does): the restricted
  unpickler refuses the global it names, so the file is never created."""
  demo = pickle.loads(pickle.dumps(_CreatesAFile(str(tmp_path / 'plain_pickle_victim'))))
  demo.close()
  assert (tmp_path / 'plain_pickle_victim').exists()  # plain pickle runs it
  victim = tmp_path / 'created_by_the_batch'
  folder = _cifar10_python(tmp_path / 'cifar-10-batches-py',
                           bad_batch={b'data': _CreatesAFile(str(victim)), b'labels': [0, 9]})
  line = assert_user_error(cli('--config.data.source=cifar10_python', f'--config.data.path={folder}'),
                           'data_batch_3', 'asks to run', 'open', 'refused')
  assert 'which a CIFAR batch never does' in line
  assert not victim.exists()


def test_cifar10_python_missing_or_unreadable(cli, tmp_path):
  source = '--config.data.source=cifar10_python'
  folder = tmp_path / 'cifar-10-batches-py'
  _cifar10_python(folder)
  os.remove(folder / 'data_batch_2')
  assert_user_error(cli(source, f'--config.data.path={folder}'), "lacks ['data_batch_2']",
                    'data_batch_1..5 and test_batch')
  (folder / 'data_batch_2').write_bytes(b'\x80\x04 truncated')
  assert_user_error(cli(source, f'--config.data.path={folder}'), 'cannot unpickle', 'data_batch_2')
  assert_user_error(cli(source, f'--config.data.path={folder / "test_batch"}'), 'is not a folder',
                    'cifar-10-batches-py')


# The workdir ------------------------------------------------------------------------------------------


def test_workdir_that_cannot_hold_a_run(cli, tmp_path, monkeypatch):
  a_file = tmp_path / 'a_file'
  a_file.write_text('')
  assert_user_error(cli(workdir=str(a_file)), f'--workdir={a_file} is a file', 'give a folder')
  assert_user_error(cli(workdir=str(a_file / 'run')), 'a_file is a file, not a folder')
  assert_user_error(cli('--mode=evaluate', workdir=str(tmp_path / 'never_trained')), 'no such folder',
                    'workdir of a training run')

  class Usage:
    free = 10 * 2**20

  monkeypatch.setattr(config_lib.shutil, 'disk_usage', lambda path: Usage)
  assert_user_error(cli(), 'only 10 MB free', f'at least {config_lib.MIN_FREE_DISK_MB} MB')


def test_disk_full_during_training(cli, monkeypatch):
  """Exit status 4 for a failed write, whether the trainer named it (WriteError) or not (an OSError)."""
  def full(config, workdir):
    raise OSError(errno.ENOSPC, 'No space left on device', os.path.join(workdir, 'checkpoints'))

  monkeypatch.setattr(train, 'train_and_evaluate', full)
  assert_user_error(cli(), 'No space left on device', '--workdir=', status=4)

  def checkpoint_failed(config, workdir):
    raise errors.write_error('the checkpoint of step 6', os.path.join(workdir, 'checkpoints'),
                             ValueError("Failed to write 4096 bytes: ... [os_error_code='30']"), 'then')

  monkeypatch.setattr(train, 'train_and_evaluate', checkpoint_failed)
  assert_user_error(cli(), 'writing the checkpoint of step 6', '(Read-only file system); then', status=4)


def _logged(error, pathname):
  """The log record of a library's `logging.exception` while `error` is raised, from `pathname`."""
  try:
    raise error
  except Exception:  # pylint: disable=broad-except
    return pylogging.LogRecord('asyncio', pylogging.ERROR, pathname, 1, 'Task exception was never retrieved',
                               None, sys.exc_info())


def test_failed_writes_logged_by_libraries_show_without_a_traceback():
  """orbax's threads and asyncio log each failed write of a checkpoint with its traceback before the run
  reports it in one line: the log keeps their message; `--debug` keeps the traceback too."""
  disk = ValueError("RESOURCE_EXHAUSTED: Failed to write 5557 bytes: No space left on device "
                    "[os_error_code='28']")
  bug = KeyError('not a disk')
  quiet = main._QuietLibraries()  # pylint: disable=protected-access
  debug = main._QuietLibraries(tracebacks=True)  # pylint: disable=protected-access
  for pathname in ('/usr/lib/python3.11/asyncio/base_events.py', '/x/orbax/checkpoint/future.py'):
    record = _logged(disk, pathname)
    assert quiet.filter(record) and record.exc_info is None
    record = _logged(disk, pathname)
    assert debug.filter(record) and record.exc_info[1] is disk
    record = _logged(bug, pathname)
    assert quiet.filter(record) and record.exc_info[1] is bug


# The real command line --------------------------------------------------------------------------------


def _cli(*args):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  return subprocess.run([sys.executable, '-m', 'cifar_jax.main', *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize('args, fragments', [
    (['--config=configs/smoke.py', '--config.optimizer.lrr=0.1'], ('did you mean --config.optimizer.lr?',)),
    (['--config=configs/smoke.py', '--config.num_epochs=abc'], ('num_epochs must be an int',)),
    (['--config=configs/missing.py'], ('--config=configs/missing.py: no such file',)),
    (['--config=configs/smoke.py', '--config.swa.enabled=True', '--config.swa.start_epoch=9'],
     ('swa.start_epoch must be in 1..1',)),
    (['--config=configs/smoke.py', '--workdir='], ('--workdir is required',)),
])
def test_command_line_user_errors(tmp_path, args, fragments):
  """Errors found before training: stderr holds the error line and nothing else."""
  result = _cli(f'--workdir={tmp_path / "run"}', *args)
  assert_user_error((result.returncode, result.stderr), *fragments)


def _host_resolves(host: str) -> bool:
  try:
    socket.getaddrinfo(host, 443)
    return True
  except OSError:
    return False


@pytest.mark.skipif(_host_resolves('www.cs.toronto.edu'), reason='online: TFDS would download CIFAR-10')
def test_tfds_offline_fails_fast_on_the_command_line(tmp_path):
  result = _cli('--config=configs/smoke.py', f'--workdir={tmp_path / "run"}', '--config.data.source=tfds',
                f'--config.data.data_dir={tmp_path / "tfds"}')
  # The device line and TFDS's warnings are logged before the data loads; the error is one line.
  errors = [line for line in result.stderr.splitlines() if line.startswith('cifar-jax: error: ')]
  assert result.returncode == 2 and 'Traceback' not in result.stderr, result.stderr
  assert len(errors) == 1 and 'data.source=tfds' in errors[0] and 'cannot be reached' in errors[0]
  assert 'data.source=synthetic' in errors[0]
