"""The torch twin resumes after its last finished epoch as if it had never stopped (compare_frameworks's
long runs span sessions)."""

import numpy as np
import pytest

torch = pytest.importorskip('torch')

from cifar_jax import config_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from cifar_jax import metrics_writer  # pylint: disable=g-import-not-at-top,wrong-import-position
from cifar_jax import torch_reference  # pylint: disable=g-import-not-at-top,wrong-import-position

TIMING = ('elapsed_seconds', 'images_per_second')


class Killed(Exception):
  pass


def _config(tiny_config, swag: bool):
  """3 epochs with the state the twin carries between epochs: one-cycle, SWA (SWALR) from the second
  epoch, the EMA, and (`swag`) SWAG."""
  config = tiny_config
  config.num_epochs = 3
  config.schedule.name = 'one_cycle'
  config.swa.enabled, config.swa.start_epoch, config.swa.schedule = True, 1, 'swa_lr'
  config.swa.anneal_epochs = 2
  config.swag.enabled, config.swag.num_samples = swag, 2
  config.ema.enabled, config.ema.decay = True, 0.9
  return config


def _without_timing(records):
  return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


@pytest.mark.parametrize('swag', [False, pytest.param(True, marks=pytest.mark.slow)])
def test_a_run_killed_mid_epoch_resumes_bitwise(tiny_config, tmp_path, monkeypatch, swag):
  config = _config(tiny_config, swag)
  config_lib.validate(config)
  straight, last = torch_reference.train_and_evaluate_torch(config, str(tmp_path / 'straight'), 'native',
                                                            'cpu', resume=True)
  train_epoch, calls = torch_reference.train_epoch, []

  def dies_in_the_third_epoch(*args, **kwargs):
    calls.append(1)
    if len(calls) == 3:  # in the SWA phase's second epoch: the SWA objects, SWAG and the EMA have state
      raise Killed()
    return train_epoch(*args, **kwargs)

  monkeypatch.setattr(torch_reference, 'train_epoch', dies_in_the_third_epoch)
  workdir = str(tmp_path / 'resumed')
  with pytest.raises(Killed):
    torch_reference.train_and_evaluate_torch(config, workdir, 'native', 'cpu', resume=True)
  assert [r['epoch'] for r in metrics_writer.read_metrics(workdir)] == [1, 2]
  monkeypatch.setattr(torch_reference, 'train_epoch', train_epoch)
  resumed, resumed_last = torch_reference.train_and_evaluate_torch(config, workdir, 'native', 'cpu',
                                                                   resume=True)
  for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
    np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=name)
  assert _without_timing(metrics_writer.read_metrics(workdir)) == _without_timing(
      metrics_writer.read_metrics(str(tmp_path / 'straight')))
  assert resumed_last['ema_eval_accuracy'] == last['ema_eval_accuracy']
  assert resumed_last['swa_eval_loss'] == last['swa_eval_loss']
  assert ('swag_eval_nll' in resumed_last) == swag
  if swag:
    assert resumed_last['swag_eval_nll'] == last['swag_eval_nll']
  # Finished: a further call trains nothing and returns the last record.
  monkeypatch.setattr(torch_reference, 'train_epoch', dies_in_the_third_epoch)
  _, again = torch_reference.train_and_evaluate_torch(config, workdir, 'native', 'cpu', resume=True)
  assert again['eval_accuracy'] == resumed_last['eval_accuracy'] and len(calls) == 3


def test_a_checkpoint_of_another_config_is_refused(tiny_config, tmp_path):
  config = tiny_config
  config.num_epochs = 1
  torch_reference.train_and_evaluate_torch(config, str(tmp_path), 'native', 'cpu', resume=True)
  config.optimizer.lr = config.optimizer.lr * 2
  changed = r'torch_checkpoint.pt holds a torch run of another config \(optimizer.lr: 0.1 -> 0.2\)'
  with pytest.raises(config_lib.ConfigError, match=changed):
    torch_reference.train_and_evaluate_torch(config, str(tmp_path), 'native', 'cpu', resume=True)
