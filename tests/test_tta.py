"""Test-time augmentation (evaluation.tta, cifar_jax/tta.py): airbench's views pixel for pixel, the views'
average in the compiled eval (seeds, SWAG), and the torch twin's TTA against JAX's."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cifar_jax import config_lib
from cifar_jax import input_pipeline
from cifar_jax import steps
from cifar_jax import tta
from cifar_jax.errors import ConfigError
from tests import conftest

torch = pytest.importorskip('torch')

from cifar_jax import torch_reference  # pylint: disable=g-import-not-at-top,wrong-import-position
from tests import test_torch_parity as parity  # pylint: disable=g-import-not-at-top,wrong-import-position


def _images(n=4, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def test_views_and_weights_are_airbenchs():
  assert [tta.num_views(level) for level in tta.LEVELS] == [1, 2, 6]
  for level in tta.LEVELS:
    assert sum(w for *_, w in tta.VIEWS[level]) == 1.0
  x = _images()
  views = np.asarray(tta.views(jnp.asarray(x), 'flip_translate'))
  # airbench94.py's infer_mirror_translate, on NCHW: the mirror, and crops of the reflect-padded image.
  t = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
  padded = torch.nn.functional.pad(t.float(), (1, 1, 1, 1), mode='reflect')
  up_left, down_right = padded[:, :, 0:32, 0:32], padded[:, :, 2:34, 2:34]
  want = [t.float(), t.float().flip(-1), up_left, up_left.flip(-1), down_right, down_right.flip(-1)]
  for got, w in zip(views, want):
    np.testing.assert_array_equal(got, w.numpy().transpose(0, 2, 3, 1).astype(np.uint8))
  # The stated shifts, pixel by pixel: view (dy, dx) holds input (i + dy, j + dx), the border reflected
  # (index -1 is row 1, index 32 is row 30); the mirror reverses the columns after the shift.
  reflect = lambda i: 1 if i < 0 else (30 if i > 31 else i)
  for view, (dy, dx, mirrored, _) in zip(views, tta.VIEWS['flip_translate']):
    for i, j in ((0, 0), (0, 31), (31, 0), (31, 31), (5, 17), (1, 30)):
      jj = 31 - j if mirrored else j
      np.testing.assert_array_equal(view[:, i, jj], x[:, reflect(i + dy), reflect(j + dx)])
  # airbench's up-left crop moves the image down and right
  np.testing.assert_array_equal(views[2][:, 1:, 1:], x[:, :-1, :-1])
  np.testing.assert_array_equal(views[4][:, :-1, :-1], x[:, 1:, 1:])


class _SmallNet(nn.Module):
  """A convolution, ReLU, global mean and a dense head: sees the mirror differently, compiles in a blink."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    x = nn.relu(nn.Conv(4, (3, 3))(x))
    return nn.Dense(10)(jnp.mean(x, axis=(1, 2)))


def _small_net(seed=0):
  model = _SmallNet()
  variables = model.init(jax.random.key(seed), jnp.zeros((1, 32, 32, 3)))
  return model, {'params': variables['params'], 'batch_stats': {}}


def _eval_arrays(x, batch=4):
  labels = np.arange(x.shape[0], dtype=np.int32) % 10
  return steps.batched_eval_arrays(x, labels, batch)


def _reference_log_probs(apply, x, level):
  """The views one by one, their softmax probabilities averaged with airbench's weights (numpy)."""
  total = 0.0
  for view, (*_, w) in zip(np.asarray(tta.views(jnp.asarray(x), level)), tta.VIEWS[level]):
    total = total + w * np.asarray(jax.nn.softmax(apply(view)), np.float64)
  return np.log(total)


def test_flip_of_a_flip_invariant_model_equals_none():
  model, variables = _small_net()
  invariant = lambda v, x, train: model.apply(v, x, train=train) + model.apply(v, x[:, :, ::-1], train=train)
  plain = lambda v, x, train: model.apply(v, x, train=train)
  arrays = _eval_arrays(_images(8))
  run = lambda fn, level: jax.jit(functools.partial(
      steps.evaluate_variables, fn, variables['params'], variables['batch_stats'], with_log_probs=True,
      tta=level))(*arrays)
  for fn, invariant_model in ((invariant, True), (plain, False)):
    (none, none_lp), (flip, flip_lp) = run(fn, 'none'), run(fn, 'flip')
    if invariant_model:
      np.testing.assert_allclose(flip_lp, none_lp, rtol=1e-5, atol=1e-6)
      np.testing.assert_allclose(flip['loss_sum'], none['loss_sum'], rtol=1e-5)
      assert flip['correct'] == none['correct']
    else:  # the check can fail: a model that sees the mirror differently
      assert np.max(np.abs(np.asarray(flip_lp) - np.asarray(none_lp))) > 1e-3


def test_seeds_get_the_same_views_as_one_model():
  """The compiled eval over k = 2 stacked seeds (vmap, as Program.eval) with flip_translate: each seed's
  log probabilities are its own model's views averaged, as the numpy reference computes them."""
  model, v0 = _small_net(0)
  v1 = _small_net(1)[1]
  stacked = jax.tree.map(lambda a, b: jnp.stack([a, b]), v0, v1)
  x = _images(8, seed=1)
  arrays = _eval_arrays(x)
  per_seed = jax.jit(jax.vmap(functools.partial(steps.evaluate_variables, model.apply, with_log_probs=True,
                                                tta='flip_translate'),
                              in_axes=(0, 0, None, None, None)))
  sums, log_probs = per_seed(stacked['params'], stacked['batch_stats'], *arrays)
  for seed, v in enumerate((v0, v1)):
    apply = lambda views, v=v: model.apply(v, input_pipeline.normalize(views), train=False)
    want = _reference_log_probs(apply, x, 'flip_translate')
    np.testing.assert_allclose(np.asarray(log_probs[seed]).reshape(8, 10), want, rtol=2e-5, atol=2e-5)
    labels = arrays[1].reshape(-1)
    np.testing.assert_allclose(sums['loss_sum'][seed], -want[np.arange(8), labels].sum(), rtol=1e-5)


@pytest.mark.parametrize('level', [pytest.param('flip', marks=pytest.mark.slow), 'flip_translate'])
def test_the_twins_tta_equals_jaxs(level):
  config = parity.model_config('resnet9', 'batch')
  model, variables = parity.flax_model(config), parity.perturbed_flax_variables(config)
  torch_model = torch_reference.create_torch_model(config)
  torch_model.load_state_dict(torch_reference.flax_to_torch(variables), strict=True)
  x = _images(12, seed=2)
  labels = np.arange(12, dtype=np.int32) % 10
  dataset = input_pipeline.Dataset(x, labels, x, labels, 'test')
  sums, log_probs = jax.jit(functools.partial(
      steps.evaluate_variables, model.apply, variables['params'], variables['batch_stats'],
      with_log_probs=True, tta=level))(*steps.batched_eval_arrays(x, labels, 8))
  got, _ = torch_reference.eval_log_probs_torch(torch_model, dataset, 8, 'cpu', tta=level)
  want = np.asarray(log_probs).reshape(-1, 10)[:12]
  assert parity.rel_err(got, want) < 1e-5
  untransformed, _ = torch_reference.eval_log_probs_torch(torch_model, dataset, 8, 'cpu')
  assert parity.rel_err(untransformed, want) > 1e-3  # the views change the prediction: the check can fail
  evals = torch_reference.evaluate_torch(torch_model, dataset, 8, torch.device('cpu'), tta=level)
  np.testing.assert_allclose(evals['eval_loss'], float(sums['loss_sum']) / 12, rtol=1e-5)
  assert evals['eval_accuracy'] == float(sums['correct']) / 12


def test_config_check():
  config = conftest.make_tiny_config()
  config_lib.validate(config)
  config.evaluation.tta = 'mirror'
  with pytest.raises(ConfigError, match=r"evaluation.tta must be one of \['none', 'flip', 'flip_transl"):
    config_lib.validate(config)
