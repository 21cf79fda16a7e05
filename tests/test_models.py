"""The Flax ResNets: parameter counts, torch-semantics BatchNorm and the blog's weight standardisation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cifar_jax import builders
from cifar_jax import models

EPS32 = float(np.finfo(np.float32).eps)


def _count(tree):
  return sum(x.size for x in jax.tree.leaves(tree))


@pytest.mark.parametrize('name, norm, expected', [
    ('resnet18', 'batch', 11_173_962),  # the kuangliu / blog ResNet18
    ('resnet18', 'group_ws', 11_173_962),
    ('resnet9', 'batch', 4_903_242),
])
def test_parameter_count(name, norm, expected):
  model = models.create_model(name, norm=norm)
  variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))))
  assert _count(variables['params']) == expected
  assert ('batch_stats' in variables) == (norm == 'batch')


def test_forward_shapes_and_widths():
  model = models.create_model('resnet9', width_multiplier=0.25)
  assert model.widths() == (16, 32, 64, 128)
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((2, 32, 32, 3)), train=False)
  assert variables['params']['conv1']['kernel'].shape == (3, 3, 3, 16)
  assert variables['params']['layer2_0']['downsample_conv']['kernel'].shape == (1, 1, 16, 32)
  assert variables['params']['fc']['kernel'].shape == (128, 10)
  logits = model.apply(variables, jnp.ones((2, 32, 32, 3)), train=False)
  assert logits.shape == (2, 10) and logits.dtype == jnp.float32


def test_init_statistics_match_torch_kaiming_fan_out():
  model = models.create_model('resnet18')
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False)['params']
  kernel = np.asarray(params['layer4_1']['conv2']['kernel'])  # 3x3, 512 -> 512
  np.testing.assert_allclose(kernel.std(), np.sqrt(2.0 / (9 * 512)), rtol=0.01)
  fc = np.asarray(params['fc']['kernel'])
  bound = 1 / np.sqrt(512)
  assert np.abs(fc).max() <= bound and np.abs(fc).max() > 0.95 * bound
  assert np.abs(np.asarray(params['fc']['bias'])).max() <= bound


def test_zero_init_residual():
  model = models.create_model('resnet9', width_multiplier=0.125, zero_init_residual=True)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False)['params']
  assert np.all(np.asarray(params['layer1_0']['bn2']['scale']) == 0)
  assert np.all(np.asarray(params['layer1_0']['bn1']['scale']) == 1)


def test_batchnorm_torch_semantics():
  x = np.random.default_rng(0).normal(2.0, 3.0, (4, 5, 5, 3)).astype(np.float32)
  bn = models.TorchBatchNorm(use_running_average=False)
  variables = bn.init(jax.random.PRNGKey(0), x)
  y, updates = bn.apply(variables, x, mutable=['batch_stats'])
  flat = x.reshape(-1, 3).astype(np.float64)
  n = flat.shape[0]
  mean, var_biased = flat.mean(0), flat.var(0)
  np.testing.assert_allclose(updates['batch_stats']['mean'], 0.1 * mean, rtol=1e-5)
  # torch keeps the unbiased variance: (1 - m) * 1 + m * var * n / (n - 1).
  np.testing.assert_allclose(updates['batch_stats']['var'], 0.9 + 0.1 * var_biased * n / (n - 1),
                             rtol=1e-5)
  np.testing.assert_allclose(y, ((flat - mean) / np.sqrt(var_biased + 1e-5)).reshape(x.shape),
                             rtol=1e-4, atol=1e-5)
  # Eval mode normalises with the running statistics.
  stats = {'mean': np.full(3, 0.5, np.float32), 'var': np.full(3, 4.0, np.float32)}
  y_eval = models.TorchBatchNorm(use_running_average=True).apply(
      {'params': variables['params'], 'batch_stats': stats}, x)
  np.testing.assert_allclose(y_eval, (x - 0.5) / np.sqrt(4.0 + 1e-5), rtol=1e-5)


def test_weight_standardisation_formula():
  w = np.random.default_rng(1).normal(0.3, 2.0, (3, 3, 4, 6)).astype(np.float32)
  flat = w.reshape(-1, 6).astype(np.float64)
  expected = (flat - flat.mean(0)) / (flat.std(0, ddof=1) + 1e-5)
  np.testing.assert_allclose(models.standardize_weight(jnp.asarray(w)), expected.reshape(w.shape),
                             rtol=1e-5, atol=1e-6)


def test_group_ws_model_standardises_every_conv():
  model = models.create_model('resnet9', width_multiplier=0.125, norm='group_ws')
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False)
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 32, 32, 3))
  # Scaling a raw kernel leaves a standardised conv's output unchanged (up to the eps in the std).
  scaled = jax.tree.map(lambda p: p, variables['params'])
  scaled['layer2_0']['downsample_conv']['kernel'] = scaled['layer2_0']['downsample_conv']['kernel'] * 7.0
  out = model.apply(variables, x, train=False)
  out_scaled = model.apply({'params': scaled}, x, train=False)
  np.testing.assert_allclose(out, out_scaled, rtol=1e-4, atol=1e-5)


def test_bfloat16_compute():
  model = models.create_model('resnet9', width_multiplier=0.125, dtype=jnp.bfloat16)
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables['params']))
  logits, updates = model.apply(variables, jnp.ones((2, 32, 32, 3)), train=True, mutable=['batch_stats'])
  assert logits.dtype == jnp.float32
  assert all(s.dtype == jnp.float32 for s in jax.tree.leaves(updates))


@pytest.mark.parametrize('norm', ['batch', 'group_ws'])
def test_compiled_initialisation_is_model_init(norm):
  """builders.initialized (the initialisers alone, compiled once) gives `model.init`'s values up to float32
  rounding where XLA fuses the normal sampling differently (within four float32 epsilons of each tensor's
  largest value); the same values for every call with a key."""
  model = models.create_model('resnet9', width_multiplier=0.125, norm=norm)
  key = jax.random.PRNGKey(3)
  params, batch_stats = builders.initialized(key, model)
  reference = model.init(key, jnp.ones((1, 32, 32, 3)), train=False)
  assert jax.tree.structure(params) == jax.tree.structure(reference['params'])
  scale = lambda b: float(np.max(np.abs(b))) or 1.0
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=4 * EPS32 * scale(b)), params,
               reference['params'])
  jax.tree.map(np.testing.assert_array_equal, batch_stats, reference.get('batch_stats', {}))
  again, _ = builders.initialized(key, model)
  jax.tree.map(np.testing.assert_array_equal, again, params)
  other, _ = builders.initialized(jax.random.PRNGKey(4), model)
  assert not np.array_equal(other['conv1']['kernel'], params['conv1']['kernel'])
