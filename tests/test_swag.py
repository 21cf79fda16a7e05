"""SWAG (cifar_jax/swag.py): moments and deviations against numpy, samples, and SWAG in the trainer.

Tolerances: the moments are float32 running averages of the same snapshots as numpy's float64 ones
(rtol 1e-5). The sample covariance of n = 100k Gaussian draws has a standard error of at most
sqrt(2 C_ii C_jj / n) = 0.45 % of sqrt(C_ii C_jj) per entry: entries within 2 % of it (over 4 sigma).
"""

import functools

import chex
import conftest
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cifar_jax import calibration
from cifar_jax import config_lib
from cifar_jax import metrics_writer
from cifar_jax import steps
from cifar_jax import swa
from cifar_jax import swag
from cifar_jax import train
from cifar_jax.errors import ConfigError

RANK = 3


def _state(params, diag_only=False):
  state = steps.TrainState(step=0, apply_fn=None, params=params, tx=None, opt_state=None, batch_stats={})
  return swag.init_swag(swa.init_swa(state), RANK, diag_only)


def _collect(snapshots, diag_only=False):
  state = _state({'w': jnp.zeros_like(snapshots[0])}, diag_only)
  update = jax.jit(functools.partial(swag.update_swa_and_swag, swa_update=swa.update_swa))
  for theta in snapshots:
    state = update(state.replace(params={'w': jnp.asarray(theta)}))
  return state


def _numpy_swag(snapshots):
  """The reference's formulas in float64: mean, second moment, the last K deviations (oldest first)."""
  mean, sq, devs = np.zeros_like(snapshots[0]), np.zeros_like(snapshots[0]), []
  for n, theta in enumerate(snapshots):
    mean = mean * n / (n + 1) + theta / (n + 1)
    sq = sq * n / (n + 1) + theta ** 2 / (n + 1)
    devs = (devs + [theta - mean])[-RANK:]
  return mean, sq, np.stack(devs)


@pytest.mark.parametrize('count', [2, 5])  # fewer than K, and more (the oldest dropped)
def test_moments_and_deviations_equal_numpy(count):
  snapshots = np.random.default_rng(0).normal(size=(count, 4, 3))
  state = _collect(snapshots.astype(np.float32))
  mean, sq, devs = _numpy_swag(snapshots)
  assert int(state.swa_count) == count
  np.testing.assert_allclose(state.swa_params['w'], mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(state.swag_sq_mean['w'], sq, rtol=1e-5, atol=1e-6)
  held = min(count, RANK)
  np.testing.assert_allclose(state.swag_deviations['w'][RANK - held:], devs, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(state.swag_deviations['w'][:RANK - held], 0.0)


def test_scale_zero_is_swa_exactly():
  state = _collect(np.random.default_rng(1).normal(size=(4, 5)).astype(np.float32))
  params = swag.sample_chunk(state, jax.random.PRNGKey(0), 0, chunk=3, rank=RANK, scale=0.0,
                             var_clamp=1e-30)
  for i in range(3):
    np.testing.assert_array_equal(params['w'][i], state.swa_params['w'])


def _sample_covariance(state, n, scale):
  params = jax.jit(functools.partial(swag.sample_chunk, chunk=n, rank=RANK, scale=scale, var_clamp=1e-30))(
      state, jax.random.PRNGKey(7), 0)['w']
  return np.cov(np.asarray(params, np.float64), rowvar=False)


def _assert_covariance_close(actual, expected):
  scale = np.sqrt(np.outer(np.diag(expected), np.diag(expected)))
  assert np.all(np.abs(actual - expected) <= 0.02 * scale), np.max(np.abs(actual - expected) / scale)


@pytest.mark.parametrize('diag_only', [False, True])
def test_sample_covariance(diag_only):
  """cov = s (diag(q - m^2) + D D^T / (K - 1)); diag_only: the diagonal only."""
  snapshots = np.random.default_rng(2).normal(size=(5, 6)).astype(np.float32)
  state = _collect(snapshots, diag_only)
  mean, sq, devs = _numpy_swag(snapshots.astype(np.float64))
  expected = np.diag(sq - mean ** 2) + (0 if diag_only else devs.T @ devs / (RANK - 1))
  _assert_covariance_close(_sample_covariance(state, 100_000, 0.5), 0.5 * expected)


def test_fewer_than_rank_divides_by_collected_minus_one():
  snapshots = np.random.default_rng(3).normal(size=(2, 6)).astype(np.float32)  # 2 of K = 3
  mean, sq, devs = _numpy_swag(snapshots.astype(np.float64))
  expected = np.diag(sq - mean ** 2) + devs.T @ devs / (2 - 1)
  _assert_covariance_close(_sample_covariance(_collect(snapshots), 100_000, 1.0), expected)


def test_config_validation(tiny_config):
  tiny_config.swag.enabled = True
  with pytest.raises(ConfigError, match='swa.enabled'):
    config_lib.validate(tiny_config)
  tiny_config.swa.update(enabled=True, start_epoch=1)
  tiny_config.num_epochs = 2
  tiny_config.swag.update(num_samples=6, samples_per_call=4)
  with pytest.raises(ConfigError, match='multiple of swag.samples_per_call=4'):
    config_lib.validate(tiny_config)
  tiny_config.swag.samples_per_call = 0
  config_lib.validate(tiny_config)
  assert swag.samples_per_call(tiny_config.swag) == 3


def _swag_config(tiny_config, num_seeds=1):
  tiny_config.num_epochs = 4
  tiny_config.num_seeds = num_seeds
  tiny_config.schedule.name = 'one_cycle'
  tiny_config.swa.update(enabled=True, start_epoch=1, lr=0.01)
  tiny_config.swag.update(enabled=True, rank=2, num_samples=4, samples_per_call=2)
  return tiny_config


SWAG_FIELDS = ('params', 'swa_params', 'swa_count', 'swag_sq_mean', 'swag_deviations', 'opt_state')


@pytest.mark.slow
def test_swag_run_resumes_mid_collection_bitwise(tiny_config, tmp_path):
  config = _swag_config(tiny_config)
  config.checkpoint_every_steps = 3
  straight = train.train_and_evaluate(config, str(tmp_path / 'straight'))
  records = metrics_writer.read_metrics(str(tmp_path / 'straight'))
  assert [r.get('swa_count') for r in records] == [None, 1, 2, 3]
  assert 'swag_eval_nll' in records[-1] and 'swag_eval_nll' not in records[-2]
  # 3 collected of K = 2: the deviations of the last two snapshots.
  assert jax.tree.leaves(straight.swag_deviations)[0].shape[0] == 2
  with pytest.raises(conftest.Crash):  # mid epoch 3, after two collections
    train.train_and_evaluate(config, str(tmp_path / 'crashed'), actions=[conftest.StopAfter(10)])
  resumed = train.train_and_evaluate(config, str(tmp_path / 'crashed'))
  for field in SWAG_FIELDS:
    chex.assert_trees_all_equal(getattr(resumed, field), getattr(straight, field))
  assert metrics_writer.read_metrics(str(tmp_path / 'crashed'))[-1]['swag_eval_nll'] == \
      records[-1]['swag_eval_nll']


@pytest.mark.slow
def test_multiswag_equals_single_swag_runs(tiny_config, tmp_path):
  """k = 3 seeds in one run: each seed's SWAG state and SWAG metrics are its single run's; MultiSWAG's
  metrics are those of the average over all 3 * S samples."""
  # XLA's convolutions: oneDNN's run a k-seed run's seeds on one thread each and a single run over
  # both threads, and 4 epochs at this learning rate grow that rounding to 1e-4 on params of 1
  # (measured; seeds 0-2 moved 3e-5, 3e-7 and 1e-4). With XLA's the largest difference is 5e-6 on
  # params and 3e-6 on deviations of 1.5e-2. tests/test_onednn_conv.py checks the batched oneDNN call.
  config = _swag_config(tiny_config, num_seeds=3)
  config.model.conv = 'xla'
  multi = train.train_and_evaluate(config, str(tmp_path / 'multi'))
  record = metrics_writer.read_metrics(str(tmp_path / 'multi'))[-1]
  for i in range(3):
    single_config = _swag_config(conftest.make_tiny_config())
    single_config.model.conv = 'xla'
    single_config.seed = i
    single_config.data.synthetic_seed = 0  # the k-seed run's images (-1 would draw seed i's)
    single = train.train_and_evaluate(single_config, str(tmp_path / f'single_{i}'))
    single_record = metrics_writer.read_metrics(str(tmp_path / f'single_{i}'))[-1]
    for field in SWAG_FIELDS[1:-1]:
      jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
                   steps.unstack_seed(getattr(multi, field), i), getattr(single, field))
    np.testing.assert_allclose(record['swag_eval_nll_per_seed'][i], single_record['swag_eval_nll'],
                               rtol=1e-4)
  assert record['multiswag_eval_nll'] <= record['multiswag_eval_member_nll']


@pytest.mark.slow
def test_evaluation_table(tiny_config, tmp_path):
  """--mode=evaluate's table of a k = 2 SWAG run: every row, the training run's final numbers, and
  swag.num_samples overridden at evaluation."""
  config = _swag_config(tiny_config, num_seeds=2)
  config.num_epochs = 3
  train.train_and_evaluate(config, str(tmp_path))
  record = metrics_writer.read_metrics(str(tmp_path))[-1]
  out = train.evaluate_checkpoint(config, str(tmp_path))
  rows = {row['model']: row for row in out['table']}
  assert list(rows) == ['single model', 'deep ensemble', 'SWA', 'MultiSWA', 'SWAG', 'MultiSWAG']
  assert [rows[m]['models'] for m in rows] == [1, 2, 1, 2, 4, 8]
  assert rows['deep ensemble']['nll'] == record['ensemble_eval_nll']
  assert rows['MultiSWA']['ece'] == record['swa_ensemble_eval_ece']
  assert rows['MultiSWAG']['brier'] == record['multiswag_eval_brier']
  np.testing.assert_allclose(rows['SWAG']['nll'], record['swag_eval_nll'], rtol=1e-6)
  assert sum(rows['SWAG']['bins']['count']) == 2 * 64
  assert 'MultiSWAG' in train.format_table(out['table'])
  # NLL against models averaged: every ensemble size, each curve ending at its table row.
  curves = out['nll_by_models']
  assert [c['models'] for c in curves['deep ensemble']] == [1, 2]
  assert [c['models'] for c in curves['MultiSWAG']] == [2, 4, 8]  # seed 0's 2 and 4 samples, then 2 x 4
  for name in ('deep ensemble', 'MultiSWA', 'MultiSWAG'):
    np.testing.assert_allclose(curves[name][-1]['nll'], rows[name]['nll'], rtol=1e-5)
  config.swag.num_samples = 2
  rows = {row['model']: row for row in train.evaluate_checkpoint(config, str(tmp_path))['table']}
  assert rows['MultiSWAG']['models'] == 4 and rows['MultiSWAG']['nll'] != record['multiswag_eval_nll']


@pytest.mark.parametrize('name,seeds,swag_on', [('ensemble', 4, False), ('swag', 1, True),
                                                ('multiswag', 3, True)])
def test_experiment_configs(name, seeds, swag_on):
  config = __import__(f'configs.{name}', fromlist=['get_config']).get_config()
  config_lib.validate(config)
  assert (config.num_seeds, config.swag.enabled, config.schedule.name) == (seeds, swag_on, 'one_cycle')
  if swag_on:
    assert (config.swag.rank, config.swag.scale, config.swag.num_samples) == (20, 0.5, 30)
    assert (config.swa.start_epoch, config.num_epochs) == (20, 30)


@pytest.mark.slow
def test_torch_reference_swag_agrees(tiny_config):
  """The same snapshots and the same z: the torch twin's SWAG sample (the reference's formulas) equals
  the JAX one within float32 rounding; so do the sample's update_bn statistics (relative 1e-4 or 1e-5, as
  tests/test_swa.py: convolutions sum in another order) and the two samples' averaged probabilities."""
  torch = pytest.importorskip('torch')
  from torch.optim import swa_utils  # pylint: disable=g-import-not-at-top

  from cifar_jax import builders  # pylint: disable=g-import-not-at-top
  from cifar_jax import torch_reference  # pylint: disable=g-import-not-at-top

  torch.manual_seed(0)
  torch_model = torch_reference.create_torch_model(tiny_config.model)
  model = builders.create_model(tiny_config.model)
  variables = torch_reference.torch_to_flax(torch_model.state_dict())
  reference = torch_reference.TorchSwag(torch_model, rank=RANK)
  state = _state(variables['params']).replace(batch_stats=variables['batch_stats'])
  update = jax.jit(functools.partial(swag.update_swa_and_swag, swa_update=swa.update_swa))
  rng = np.random.default_rng(0)
  for _ in range(4):  # beyond K = 3
    with torch.no_grad():
      for p in torch_model.parameters():
        p.add_(torch.from_numpy(0.05 * rng.normal(size=tuple(p.shape)).astype(np.float32)))
    reference.collect(torch_model)
    state = update(state.replace(params=torch_reference.torch_to_flax(torch_model.state_dict())['params']))

  images = rng.normal(size=(2, 16, 32, 32, 3)).astype(np.float32)
  eval_images = torch.from_numpy(rng.normal(size=(8, 3, 32, 32)).astype(np.float32))
  jax_probs, torch_probs = [], []
  for i in range(2):
    z1, z2 = swag.draw_noise(jax.random.PRNGKey(i), state.params, RANK)
    sampled = swag.sample(state.swa_params, state.swag_sq_mean, state.swag_deviations, state.swa_count,
                          z1, z2, scale=0.5, var_clamp=1e-30)
    z1_torch = torch_reference.flax_to_torch({'params': z1})
    sample = reference.sample(0.5, z1_torch, torch.from_numpy(np.array(z2)))
    reference.load_sample(torch_model, sample)
    ported = torch_reference.torch_to_flax(torch_model.state_dict())
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), sampled,
                 ported['params'])
    # Each sample's BatchNorm statistics over the same two batches.
    torch_model.train()
    swa_utils.update_bn([(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), None) for x in images],
                        torch_model)
    running = swa.reset_batch_stats(state.batch_stats)
    step = jax.jit(functools.partial(swa.recalibration_step, model.clone(bn_momentum=1.0)))
    for j, x in enumerate(images):
      running = step(sampled, running, jnp.int32(j), jnp.asarray(x))
    expected = torch_reference.torch_to_flax(torch_model.state_dict())['batch_stats']
    # atol 1e-5: a channel's mean can be near 0 (2e-3) as a sum of O(1) activations, whose rounding
    # (2e-6 measured) is then large relative to it.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), running, expected)
    torch_model.eval()
    with torch.no_grad():
      torch_probs.append(torch.softmax(torch_model(eval_images), -1).numpy())
    logits = model.apply({'params': sampled, 'batch_stats': running},
                         jnp.asarray(eval_images.numpy().transpose(0, 2, 3, 1)), train=False)
    jax_probs.append(jax.nn.log_softmax(logits))
  np.testing.assert_allclose(np.exp(calibration.mean_log_probs(jnp.stack(jax_probs))),
                             np.mean(torch_probs, axis=0), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_torch_twin_collects_swag_and_scale_zero_is_swa(tiny_config, tmp_path):
  """train_and_evaluate_torch with swag.enabled collects at the SWA updates and writes swag_eval_*; at
  scale 0 every sample is the SWA mean and, with the JAX trainer's batches ('identical') and a full
  BatchNorm pass, the SWAG average is the SWA model (NLL = swa_eval_loss up to the two averaging formulas'
  float32 rounding)."""
  pytest.importorskip('torch')
  from cifar_jax import torch_reference  # pylint: disable=g-import-not-at-top

  config = _swag_config(tiny_config)
  config.num_epochs = 3
  config.swag.update(scale=0.0, num_samples=2)
  _, record = torch_reference.train_and_evaluate_torch(config, str(tmp_path), data_mode='identical',
                                                       device='cpu')
  assert record['swa_count'] == 2
  assert record['swag_eval_accuracy'] == record['swa_eval_accuracy']
  np.testing.assert_allclose(record['swag_eval_nll'], record['swa_eval_loss'], rtol=1e-4)
  assert 0.0 <= record['swag_eval_ece'] <= 1.0 and 0.0 <= record['swag_eval_brier'] <= 2.0
