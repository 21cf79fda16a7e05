"""--mode=evaluate under shift (config.evaluation.shift): every row of the evaluation table on each corruption
and severity, from generated sets or the released CIFAR-10-C files, and its one-line errors."""

import json
import os
import sys

from absl import flags
from absl import logging
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cifar_jax import config_lib
from cifar_jax import corruptions
from cifar_jax import main
from cifar_jax import train
from cifar_jax.errors import ConfigError
from tests import conftest

SMOKE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs', 'smoke.py')
MODELS = ['single model', 'deep ensemble', 'SWA', 'MultiSWA', 'SWAG', 'MultiSWAG']


def _multiswag_config(tiny_config, tmp_path):
  config = tiny_config
  config.num_epochs = 2
  config.num_seeds = 2
  config.schedule.name = 'one_cycle'
  config.swa.update(enabled=True, start_epoch=1, lr=0.01)
  config.swag.update(enabled=True, rank=2, num_samples=2, samples_per_call=2)
  config.evaluation.update(shift='fog,impulse_noise', severities=(1, 5),
                           shift_cache=str(tmp_path / 'cache'))
  return config


def test_evaluation_under_shift_of_one_model(tiny_config, tmp_path):
  """The default suite's check: a 1-epoch run, one corruption at one severity (the slow test below
  covers every row)."""
  tiny_config.num_epochs = 1
  tiny_config.evaluation.update(shift='fog', severities=(3,), shift_cache='')
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(tiny_config, workdir)
  out = train.evaluate_checkpoint(tiny_config, workdir)
  rows = out['shift']['rows']
  assert [(r['corruption'], r['severity'], r['model']) for r in rows] == [('fog', 3, 'single model')]
  assert rows[0]['nll'] != out['table'][0]['nll']
  assert [(r['model'], r['severity']) for r in out['shift']['summary']] == [('single model', 3),
                                                                             ('single model', 'all')]


@pytest.mark.slow
def test_evaluation_under_shift_writes_every_row_corruption_and_severity(tiny_config, tmp_path):
  config = _multiswag_config(tiny_config, tmp_path)
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(config, workdir)
  out = train.evaluate_checkpoint(config, workdir)
  shift = out['shift']
  assert [row['model'] for row in out['table']] == MODELS
  cells = {(row['corruption'], row['severity'], row['model']) for row in shift['rows']}
  assert cells == {(c, s, m) for c in ('fog', 'impulse_noise') for s in (1, 5) for m in MODELS}
  assert len(shift['rows']) == len(cells)
  for row in shift['rows']:
    assert 0 <= row['accuracy'] <= 1 and row['nll'] > 0 and 0 <= row['ece'] <= 1 and 0 <= row['brier'] <= 2
  assert {(row['model'], row['severity']) for row in shift['summary']} == {
      (m, s) for m in MODELS for s in (1, 5, 'all')}
  fog5 = [row for row in shift['rows'] if row['corruption'] == 'fog' and row['severity'] == 5]
  assert fog5[0]['nll'] != out['table'][0]['nll']  # another set than the clean one
  assert len(os.listdir(tmp_path / 'cache')) == 4  # the generated sets, cached
  text = train.format_shift_summary(shift, out['table'])
  assert 'MultiSWAG' in text and 'Under shift: mean over 2 corruptions' in text
  # The same sets from "released" files give the same rows (the reader, labels checked).
  released = tmp_path / 'released'
  released.mkdir()
  from cifar_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  dataset = input_pipeline.load_dataset(config.data, config.seed)
  for name in ('fog', 'impulse_noise'):
    np.save(released / f'{name}.npy', np.concatenate([
        corruptions.corrupt(dataset.eval_images, name, s, seed=0) for s in corruptions.SEVERITIES]))
  np.save(released / 'labels.npy', np.tile(dataset.eval_labels, 5).astype(np.uint8))
  config.data.corruptions_path = str(released)
  again = train.evaluate_checkpoint(config, workdir)['shift']
  assert again['source'].startswith('released files in')
  for a, b in zip(shift['rows'], again['rows']):
    assert a == b


def test_config_checks():
  config = conftest.make_tiny_config()
  config.evaluation.shift = 'fog,rain'
  with pytest.raises(ConfigError, match="unknown corruption 'rain'"):
    config_lib.validate(config)
  config.evaluation.shift = 'all'
  config.evaluation.severities = (0, 2)
  with pytest.raises(ConfigError, match='evaluation.severities must be distinct'):
    config_lib.validate(config)
  config.evaluation.severities = (2,)
  config.data.corruptions_path = '/no/such/folder'
  with pytest.raises(ConfigError, match='no such folder'):
    config_lib.validate(config)
  config.data.corruptions_path = '/'
  config.data.validation_size = 10
  with pytest.raises(ConfigError, match='holds corruptions of the test set'):
    config_lib.validate(config)
  assert corruptions.selected('all') == corruptions.CORRUPTIONS and corruptions.selected('') == ()


@pytest.fixture
def cli(monkeypatch, capsys):
  verbosity = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)

  def run(*args, workdir):
    argv = ['cifar-jax', f'--config={SMOKE}', f'--workdir={workdir}', '--mode=evaluate', *args]
    flag_values = flags.FlagValues()
    main.define_flags(flag_values)
    monkeypatch.setattr(sys, 'argv', argv)
    with pytest.raises(SystemExit) as exit_info:
      main.main(main.parse_flags(argv, flag_values), flag_values)
    return exit_info.value.code, capsys.readouterr().err

  yield run
  logging.set_verbosity(verbosity)


@pytest.mark.parametrize('damage,message', [
    ('short', 'expected uint8 images of shape'), ('garbage', 'not a readable .npy file'),
    ('missing', 'not found')])
def test_a_bad_released_file_is_one_line_and_status_2(cli, tmp_path, damage, message):
  released = tmp_path / 'released'
  released.mkdir()
  if damage == 'short':
    np.save(released / 'fog.npy', np.zeros((3, 32, 32, 3), np.uint8))
  elif damage == 'garbage':
    (released / 'fog.npy').write_bytes(b'\x93NUMPY\x01\x00 not a header')
  workdir = tmp_path / 'run'
  workdir.mkdir()
  code, stderr = cli('--config.evaluation.shift=fog', f'--config.data.corruptions_path={released}',
                     workdir=str(workdir))
  lines = [line for line in stderr.splitlines() if line.strip()]
  assert code == 2 and len(lines) == 1 and 'Traceback' not in stderr, stderr
  assert message in lines[0] and 'fog.npy' in lines[0]


def test_evaluation_json_holds_the_shift(tmp_path):
  """main._evaluate writes what evaluate_checkpoint returns, the shift included (json-serialisable)."""
  shift = {'source': 'generated', 'corruptions': ['fog'], 'severities': [1], 'summary_corruptions': ['fog'],
           'rows': [{'corruption': 'fog', 'severity': 1, 'model': 'single model', 'models': 1, 'seeds': 1,
                     'accuracy': 0.5, 'nll': 1.0, 'ece': 0.1, 'brier': 0.6}]}
  shift['summary'] = train.shift_summary(shift['rows'], ['fog'], [1])
  json.dumps(shift)
  table = [{'model': 'single model', 'models': 1, 'seeds': 1, 'accuracy': 0.6, 'nll': 0.9, 'ece': 0.05,
            'brier': 0.5}]
  text = train.format_shift_summary(shift, table)
  assert '0.6000' in text and '0.5000' in text


def test_plot_shift_draws_the_box_plots(tmp_path):
  """scripts/plot.py's shift figure from an evaluation.json with a shift; none without one."""
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'scripts'))
  import plot  # pylint: disable=g-import-not-at-top

  models = ('single model', 'deep ensemble')
  table = [{'model': m, 'models': 1, 'seeds': 2, 'accuracy': 0.9, 'nll': 0.4, 'ece': 0.05, 'brier': 0.2}
           for m in models]
  rows = [{'corruption': c, 'severity': s, 'model': m, 'models': 1, 'seeds': 2, 'accuracy': 0.9 - 0.1 * s,
           'nll': 0.4 + 0.2 * s + 0.01 * i, 'ece': 0.05 * s, 'brier': 0.2 + 0.1 * s}
          for i, c in enumerate(('fog', 'snow', 'frost')) for s in (1, 2, 3) for m in models]
  shift = {'source': 'generated', 'corruptions': ['fog', 'snow', 'frost'], 'severities': [1, 2, 3],
           'summary_corruptions': ['fog', 'snow', 'frost'], 'rows': rows,
           'summary': train.shift_summary(rows, ['fog', 'snow', 'frost'], [1, 2, 3])}
  (tmp_path / 'evaluation.json').write_text(json.dumps({'table': table, 'shift': shift}))
  out = plot.plot_shift(str(tmp_path), str(tmp_path / 'shift.png'))
  assert os.path.getsize(out) > 10_000
  (tmp_path / 'evaluation.json').write_text(json.dumps({'table': table}))
  assert plot.plot_shift(str(tmp_path), str(tmp_path / 'none.png')) is None
