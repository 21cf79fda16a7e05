"""Every blog config trains a few steps on synthetic data, and the lr and momentum it logs equal torch's."""

import importlib

import numpy as np
import pytest

from cifar_jax import input_pipeline
from cifar_jax import metrics_writer
from cifar_jax import train

torch = pytest.importorskip('torch')
from cifar_jax import builders  # pylint: disable=g-import-not-at-top,wrong-import-position
from cifar_jax import torch_reference  # pylint: disable=g-import-not-at-top,wrong-import-position

# The default run trains the four that cover every code path (BN and GN, per-epoch and per-batch
# schedules, momentum cycling, SWA); the rest run with `make test-slow`.
FAST_CONFIGS = ('gn_ws', 'cyclic', 'one_cycle', 'swa')
SLOW_CONFIGS = ('default', 'resnet9', 'multistep', 'cosine', 'warm_restarts', 'one_cycle_30', 'swa_20_20',
                'ensemble', 'swag', 'multiswag', 'modern_recipe',
                'cifar100_one_cycle', 'cifar100_multiswag')
BLOG_CONFIGS = [*FAST_CONFIGS, *(pytest.param(n, marks=pytest.mark.slow) for n in SLOW_CONFIGS)]


def _tiny(name):
  config = importlib.import_module(f'configs.{name}').get_config()
  config.num_epochs = 2
  config.batch_size = 32
  config.eval_batch_size = 64
  config.model.width_multiplier = 0.125
  config.data.source = 'synthetic'
  config.data.synthetic_train_size = 96  # 3 steps per epoch
  config.data.synthetic_eval_size = 64
  config.progress_bar = False
  if config.swa.enabled:
    config.swa.start_epoch = 1
  if config.data.get('tfds_name') == 'cifar100':  # the CIFAR-100 configs: 100 synthetic classes
    config.data.synthetic_num_classes = 100
  return config


@pytest.mark.parametrize('name', BLOG_CONFIGS)
def test_blog_config_runs_and_logs_torch_lr(name, tmp_path):
  config = _tiny(name)
  train.train_and_evaluate(config, str(tmp_path))
  records = metrics_writer.read_metrics(str(tmp_path))
  assert [r['epoch'] for r in records] == [1, 2]
  spe = input_pipeline.steps_per_epoch(96, 32)
  lrs, momenta = torch_reference.torch_schedule_table(config, spe)
  # Exact: the logged value is the float32 lr / momentum the optimizer applied at each epoch's last step.
  assert [r['learning_rate'] for r in records] == [float(np.float32(lrs[r['step'] - 1])) for r in records]
  assert [r['momentum'] for r in records] == [float(np.float32(momenta[r['step'] - 1])) for r in records]
  if config.swa.enabled:
    assert 'swa_eval_accuracy' in records[-1]


@pytest.mark.parametrize('name', ['one_cycle', 'cyclic', 'swa', 'warm_restarts', 'cosine', 'multistep'])
def test_every_step_uses_torch_lr_and_momentum(name):
  """The lr and momentum inside the jitted train step, step by step, equal torch's (float32)."""
  config = _tiny(name)
  config.num_epochs = 3
  if config.swa.enabled:
    config.swa.start_epoch = 2
  spe = 3
  lr_fn, momentum_fn = builders.create_schedules(config, spe)
  lrs, momenta = torch_reference.torch_schedule_table(config, spe)
  np.testing.assert_array_equal(np.asarray(lr_fn(np.arange(3 * spe))), lrs.astype(np.float32))
  if momentum_fn is not None:
    np.testing.assert_array_equal(np.asarray(momentum_fn(np.arange(3 * spe))),
                                  momenta.astype(np.float32))


def test_plateau_follows_torch_on_the_runs_eval_losses(tmp_path):
  """ReduceLROnPlateau on eval_loss, stepped after each epoch's evaluation, equals torch's on those losses."""
  config = _tiny('multistep')
  config.num_epochs = 4
  config.schedule.update(name='plateau', patience=0, factor=0.5, threshold=0.5)  # reduce almost always
  train.train_and_evaluate(config, str(tmp_path))
  records = metrics_writer.read_metrics(str(tmp_path))
  param = torch.nn.Parameter(torch.zeros(1))
  opt = torch.optim.SGD([param], lr=config.optimizer.lr, momentum=0.9)
  plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode='min', factor=0.5, patience=0,
                                                       threshold=0.5)
  expected = []
  for r in records:
    expected.append(float(np.float32(opt.param_groups[0]['lr'])))
    plateau.step(r['eval_loss'])
  assert [r['learning_rate'] for r in records] == expected
  assert len(set(expected)) > 1  # the lr was actually reduced
