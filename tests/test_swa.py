"""SWA against torch.optim.swa_utils: AveragedModel, update_bn, SWALR in the trainer, exact resume.

Tolerances: averaging the same snapshots is elementwise float32 arithmetic in both frameworks, equal up to
rounding (rtol 1e-6). Recalibrated statistics come from forward passes whose convolutions sum in a different
order in XLA and oneDNN: relative 1e-4 on means and variances. With SGD steps in between, each framework's
own float32 rounding of the updates (torch's FMA vs XLA's, torch_semantics.md section 4) accumulates:
absolute 2e-5 on the averaged params after 6 steps.
"""

import functools
import warnings

import chex
import conftest
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cifar_jax import input_pipeline
from cifar_jax import metrics_writer
from cifar_jax import program
from cifar_jax import swa
from cifar_jax import train

torch = pytest.importorskip('torch')
from torch.optim import swa_utils  # pylint: disable=g-import-not-at-top,wrong-import-position

from cifar_jax import builders  # pylint: disable=g-import-not-at-top,wrong-import-position
from cifar_jax import steps  # pylint: disable=g-import-not-at-top,wrong-import-position
from cifar_jax import torch_reference  # pylint: disable=g-import-not-at-top,wrong-import-position


def _models(tiny_config, seed=0):
  torch.manual_seed(seed)
  torch_model = torch_reference.create_torch_model(tiny_config.model)
  variables = torch_reference.torch_to_flax(torch_model.state_dict())
  return torch_model, builders.create_model(tiny_config.model), variables


def _batches(n, size=8, seed=0):
  rng = np.random.default_rng(seed)
  return [(rng.normal(size=(size, 32, 32, 3)).astype(np.float32), rng.integers(0, 10, size))
          for _ in range(n)]


def _nchw(x):
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _assert_params_close(flax_params, torch_state, **tol):
  ported = torch_reference.torch_to_flax(torch_state)['params']
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **tol), flax_params, ported)


def test_average_of_snapshots_equals_averaged_model(tiny_config):
  torch_model, _, variables = _models(tiny_config)
  averaged = swa_utils.AveragedModel(torch_model)
  state = swa.init_swa(train.TrainState(
      step=0, apply_fn=None, params=variables['params'], tx=None, opt_state=None,
      batch_stats=variables['batch_stats']))
  rng = np.random.default_rng(0)
  for _ in range(4):
    with torch.no_grad():
      for p in torch_model.parameters():
        p.add_(torch.from_numpy(rng.normal(size=tuple(p.shape)).astype(np.float32)))
    averaged.update_parameters(torch_model)
    state = swa.update_swa(state.replace(params=torch_reference.torch_to_flax(
        torch_model.state_dict())['params']))
  assert int(state.swa_count) == int(averaged.n_averaged) == 4
  _assert_params_close(state.swa_params, averaged.module.state_dict(), rtol=1e-6, atol=1e-7)


def test_ema_decay():
  state = swa.init_swa(train.TrainState(step=0, apply_fn=None, params={'w': jnp.ones(2)}, tx=None,
                                        opt_state=None, batch_stats={}))
  state = swa.update_swa(state, decay=0.9)  # the first update copies
  state = swa.update_swa(state.replace(params={'w': jnp.full(2, 3.0)}), decay=0.9)
  np.testing.assert_allclose(state.swa_params['w'], 0.9 * 1 + 0.1 * 3, rtol=1e-6)


def test_recalibration_equals_update_bn(tiny_config):
  torch_model, model, variables = _models(tiny_config)
  batches = _batches(3) + _batches(1, size=3, seed=9)  # equal weight per batch, partial one included
  torch_model.train()
  swa_utils.update_bn([(_nchw(x), torch.from_numpy(y)) for x, y in batches], torch_model)
  expected = torch_reference.torch_to_flax(torch_model.state_dict())['batch_stats']

  pass_model = model.clone(bn_momentum=1.0)
  running = swa.reset_batch_stats(variables['batch_stats'])
  step = jax.jit(functools.partial(swa.recalibration_step, pass_model))
  for i, (x, _) in enumerate(batches):
    running = step(variables['params'], running, jnp.int32(i), jnp.asarray(x))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), running, expected)


def test_recalibrate_batch_stats_over_training_batches(tiny_config):
  """The jitted pass over the on-device data equals update_bn over the same (identical) batches."""
  torch_model, model, variables = _models(tiny_config)
  data = input_pipeline.load_dataset(tiny_config.data, 0)
  key = jax.random.PRNGKey(3)
  stats = program.recalibrate_batch_stats(
      model, variables['params'], variables['batch_stats'], jnp.asarray(data.train_images),
      jnp.asarray(data.train_labels), key, epoch=5, batch_size=64)
  # The same batches, made with the same functions on the host side.
  perm = input_pipeline.epoch_permutation(key, 5, data.num_train)
  loader = []
  for i in range(input_pipeline.steps_per_epoch(data.num_train, 64)):
    size = min(64, data.num_train - 64 * i)
    x, y = input_pipeline.get_train_batch(jnp.asarray(data.train_images), jnp.asarray(data.train_labels),
                                          perm, 64 * i, size, input_pipeline.batch_key(key, 5, i))
    loader.append((_nchw(np.asarray(x)), torch.from_numpy(np.array(y))))
  assert loader[-1][0].shape[0] == 200 - 3 * 64
  swa_utils.update_bn(loader, torch_model)
  expected = torch_reference.torch_to_flax(torch_model.state_dict())['batch_stats']
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), stats, expected)
  # GroupNorm models have nothing to recalibrate.
  assert program.recalibrate_batch_stats(model, variables['params'], {}, None, jnp.zeros(4), key,
                                     epoch=0, batch_size=2) == {}


def test_sgd_with_averaging_matches_torch(tiny_config):
  torch_model, model, variables = _models(tiny_config, seed=1)
  opt = torch.optim.SGD(torch_model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
  averaged = swa_utils.AveragedModel(torch_model)
  state = swa.init_swa(train.TrainState.create(
      apply_fn=model.apply, params=variables['params'], batch_stats=variables['batch_stats'],
      tx=builders.sgd(0.05, 0.9, 5e-4)))
  step = jax.jit(steps.train_step)
  torch_model.train()
  for i, (x, y) in enumerate(_batches(6, seed=2)):
    opt.zero_grad()
    loss = torch.nn.functional.cross_entropy(torch_model(_nchw(x)), torch.from_numpy(y))
    loss.backward()
    opt.step()
    state, _ = step(state, (jnp.asarray(x), jnp.asarray(y)))
    if i % 2 == 1:
      averaged.update_parameters(torch_model)
      state = swa.update_swa(state)
  assert int(state.swa_count) == 3
  _assert_params_close(state.swa_params, averaged.module.state_dict(), rtol=0, atol=2e-5)


@pytest.mark.parametrize('main', ['cosine', 'one_cycle'])
def test_trainer_swa_lr_equals_torch_swalr(tiny_config, main):
  """The main schedule for 3 epochs, then SWALR (anneal 2 epochs, cos) stepped at each SWA epoch's start.

  torch loop: for epoch: (if epoch >= start: swalr.step()); train (one-cycle stepped every batch);
  (if epoch < start and per epoch: scheduler.step()). Exact float32 equality.
  """
  spe, epochs, start = 4, 6, 3
  tiny_config.num_epochs = epochs
  tiny_config.schedule.name = main
  tiny_config.swa.update(enabled=True, start_epoch=start, schedule='swa_lr', lr=0.01, anneal_epochs=2)
  lr_fn, _ = builders.create_schedules(tiny_config, spe)
  param = torch.nn.Parameter(torch.zeros(1))
  opt = torch.optim.SGD([param], lr=tiny_config.optimizer.lr, momentum=0.9)
  if main == 'cosine':
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=start)
  else:
    scheduler = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=tiny_config.schedule.max_lr,
                                                    total_steps=start * spe)
  swalr = swa_utils.SWALR(opt, swa_lr=0.01, anneal_epochs=2, anneal_strategy='cos')
  expected = []
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')  # scheduler.step() without optimizer.step()
    for epoch in range(epochs):
      if epoch >= start:
        swalr.step()
      for _ in range(spe):
        expected.append(opt.param_groups[0]['lr'])
        if epoch < start and main == 'one_cycle':
          scheduler.step()
      if epoch < start and main == 'cosine':
        scheduler.step()
  np.testing.assert_array_equal(np.asarray(lr_fn(np.arange(epochs * spe))),
                                np.asarray(expected, np.float32))


def _swa_config(tiny_config):
  tiny_config.num_epochs = 4
  tiny_config.schedule.name = 'one_cycle'
  tiny_config.swa.update(enabled=True, start_epoch=2, lr=0.01, eval_every_epoch=True)
  return tiny_config


@pytest.mark.slow  # default suite under 15 minutes: `make test-slow`
def test_swa_run_resumes_mid_swa_exactly(tiny_config, tmp_path):
  config = _swa_config(tiny_config)
  config.checkpoint_every_steps = 3
  straight = train.train_and_evaluate(config, str(tmp_path / 'straight'))
  records = metrics_writer.read_metrics(str(tmp_path / 'straight'))
  assert [r.get('swa_count') for r in records] == [None, None, 1, 2]
  assert all('swa_eval_accuracy' in r for r in records[2:])
  assert int(straight.swa_count) == 2
  # The final checkpoint holds the recalibrated SWA model.
  evaluated = train.evaluate_checkpoint(config, str(tmp_path / 'straight'))
  assert evaluated['swa_eval_accuracy'] == records[-1]['swa_eval_accuracy']
  assert evaluated['swa_eval_loss'] == records[-1]['swa_eval_loss']

  with pytest.raises(conftest.Crash):  # mid epoch 4 (4 steps per epoch), after one SWA update
    train.train_and_evaluate(config, str(tmp_path / 'crashed'), actions=[conftest.StopAfter(15)])
  resumed = train.train_and_evaluate(config, str(tmp_path / 'crashed'))
  for field in ('params', 'swa_params', 'swa_batch_stats', 'swa_count', 'opt_state'):
    chex.assert_trees_all_equal(getattr(resumed, field), getattr(straight, field))
