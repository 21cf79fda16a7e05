"""oneDNN's training-mode BatchNorm (`onednn_conv.batch_norm_train`, `model.batch_norm`) equals XLA's
(`layers.batch_norm_train`): output, statistics and the three gradients, float32 and bfloat16, with and
without the fused ReLU, under vmap, in the ResNets, and as `builders.bn_impl` picks it."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from cifar_jax import builders
from cifar_jax import checkpointing
from cifar_jax import config_lib
from cifar_jax import models
from cifar_jax import onednn_conv
from cifar_jax.models import layers

requires_onednn = pytest.mark.skipif(
    not onednn_conv.available(), reason=f'oneDNN unavailable: {onednn_conv._state["error"]}')  # pylint: disable=protected-access
requires_bfloat16 = pytest.mark.skipif(
    not onednn_conv.available() or not onednn_conv.bfloat16_flag(),
    reason=f'no oneDNN bfloat16 here (needs one of {onednn_conv.BFLOAT16_FLAGS})')

# (shape, epsilon): ResNet18's four stages at width 0.25 (batch cut to 8), an odd size and channel count,
# a rank-2 activation (a BatchNorm1d), EfficientNet's epsilon.
SHAPES = [((8, 32, 32, 16), 1e-5), ((8, 16, 16, 32), 1e-5), ((8, 8, 8, 64), 1e-5), ((8, 4, 4, 128), 1e-5),
          ((3, 7, 5, 24), 1e-5), ((40, 20), 1e-5), ((4, 9, 9, 40), 1e-3)]


def _inputs(shape, dtype, seed=0):
  rng = np.random.default_rng(seed)
  channels = shape[-1]
  # A mean and spread per channel, so that a slip in the statistics or their broadcast shows.
  x = rng.normal(size=shape) * rng.uniform(0.5, 3, channels) + rng.normal(size=channels)
  cotangent = rng.normal(size=shape)
  scale = rng.uniform(0.5, 1.5, channels)
  bias = rng.normal(size=channels)
  return (jnp.asarray(x, dtype), jnp.asarray(scale, jnp.float32), jnp.asarray(bias, jnp.float32),
          jnp.asarray(cotangent, dtype))


def _xla(x, scale, bias, epsilon, relu):
  y, mean, var = layers.batch_norm_train(x, scale, bias, epsilon, None)
  y = y.astype(x.dtype)
  return (jax.nn.relu(y) if relu else y), mean, var


def _onednn(x, scale, bias, epsilon, relu):
  return onednn_conv.batch_norm_train(x, scale, bias, epsilon, relu)


def _forward_and_grads(norm, x, scale, bias, cotangent, epsilon, relu):
  def f(x, scale, bias):
    y, mean, var = norm(x, scale, bias, epsilon, relu)
    return y, (mean, var)
  y, vjp, (mean, var) = jax.vjp(f, x, scale, bias, has_aux=True)
  return (y, mean, var, *vjp(cotangent))


def _assert_close(got, want, rtol, atol, name):
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  scale = max(1.0, float(np.abs(want).max()))
  np.testing.assert_allclose(got, want, rtol=rtol, atol=atol * scale, err_msg=name)


def _assert_equals_xla(dtype, shape, epsilon, relu, rounded_tolerance):
  """oneDNN's (y, mean, var, dx, dscale, dbias) against XLA's: each with XLA's shape and dtype, within
  float32 rounding; y and dx (in `dtype`) within `rounded_tolerance`."""
  args = _inputs(shape, dtype)
  want = jax.jit(lambda *a: _forward_and_grads(_xla, *a, epsilon, relu))(*args)
  got = jax.jit(lambda *a: _forward_and_grads(_onednn, *a, epsilon, relu))(*args)
  for name, g, w in zip(('y', 'mean', 'var', 'dx', 'dscale', 'dbias'), got, want):
    assert g.shape == w.shape and g.dtype == w.dtype, name
    tolerance = rounded_tolerance if name in ('y', 'dx') else (1e-4, 1e-5)
    _assert_close(g, w, *tolerance, name)


@requires_onednn
@pytest.mark.parametrize('relu', [False, True])
@pytest.mark.parametrize('shape,epsilon', SHAPES)
def test_float32_equals_xla(shape, epsilon, relu):
  _assert_equals_xla(jnp.float32, shape, epsilon, relu, (1e-4, 1e-5))


@requires_bfloat16
@pytest.mark.parametrize('relu', [False, True])
@pytest.mark.parametrize('shape,epsilon', SHAPES[:4] + SHAPES[5:6])
def test_bfloat16_equals_xla_within_its_rounding(shape, epsilon, relu):
  # Both accumulate in float32 from the same bfloat16 input; y and dx are rounded once to bfloat16 (a
  # relative step of 2^-8), so they may differ by one unit there.
  _assert_equals_xla(jnp.bfloat16, shape, epsilon, relu, (1e-2, 1e-2))


@requires_onednn
def test_relu_gradient_is_zero_where_the_output_is_clipped():
  x, scale, bias, cotangent = _inputs((8, 6, 6, 16), jnp.float32, seed=3)
  y, vjp = jax.vjp(lambda x: _onednn(x, scale, bias, 1e-5, True)[0], x)
  (dx,) = vjp(jnp.ones_like(x))
  assert float(jnp.min(y)) == 0.0 and float(jnp.mean(y == 0)) > 0.2
  # Through the fused ReLU, the gradient is BatchNorm's backward pass of the masked cotangent.
  _, vjp_plain = jax.vjp(lambda x: _onednn(x, scale, bias, 1e-5, False)[0], x)
  (dx_masked,) = vjp_plain(jnp.where(y > 0, 1.0, 0.0))
  np.testing.assert_allclose(dx, dx_masked, rtol=1e-5, atol=1e-6)
  del cotangent


@requires_onednn
@pytest.mark.parametrize('relu', [False, True])
def test_under_vmap_over_seeds_each_seed_equals_its_own_call(relu):
  """k seeds in one run: the handler loops over the vmap-ed elements, each its own normalisation."""
  args = [_inputs((6, 8, 8, 16), jnp.float32, seed=s) for s in range(3)]
  x, scale, bias, cotangent = (jnp.stack(a) for a in zip(*args))
  shared_bias = args[0][2]  # an unbatched operand, as 'broadcast_all' sees it

  def grads(x, scale, cotangent):
    return _forward_and_grads(_onednn, x, scale, shared_bias, cotangent, 1e-5, relu)

  batched = jax.jit(jax.vmap(grads))(x, scale, cotangent)
  for s in range(3):
    one = jax.jit(grads)(x[s], scale[s], cotangent[s])
    for got, want in zip(batched, one):
      np.testing.assert_array_equal(got[s], want)
  hlo = jax.jit(jax.vmap(grads)).lower(x, scale, cotangent).as_text()
  assert hlo.count('onednn_conv_batch_norm_forward') == 1  # one call for every seed


def _resnet_step(bn_impl, dtype):
  """(loss, new BatchNorm statistics, gradients) of resnet9 at width 1/8 with oneDNN's convolutions."""
  x = jnp.asarray(np.random.default_rng(1).normal(size=(16, 32, 32, 3)), jnp.float32)
  labels = jnp.arange(16) % 10
  model = models.create_model('resnet9', width_multiplier=0.125, conv_impl='onednn', bn_impl=bn_impl,
                              dtype=dtype)
  variables = model.init(jax.random.key(0), x[:1], train=False)

  def loss(params):
    logits, new = model.apply({**variables, 'params': params}, x, train=True, mutable=['batch_stats'])
    logits = logits.astype(jnp.float32)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1)), new

  value_and_grad = jax.jit(jax.value_and_grad(loss, has_aux=True))
  hlo = value_and_grad.lower(variables['params']).as_text()
  assert ('onednn_conv_batch_norm_forward' in hlo) == (bn_impl == 'onednn')
  assert ('onednn_conv_batch_norm_backward' in hlo) == (bn_impl == 'onednn')
  (value, stats), grads = value_and_grad(variables['params'])
  return value, stats, grads


@requires_onednn
def test_float32_resnet_with_onednn_batch_norm_equals_xla_batch_norm():
  value_ref, stats_ref, grads_ref = _resnet_step('xla', jnp.float32)
  value, stats, grads = _resnet_step('onednn', jnp.float32)
  np.testing.assert_allclose(value, value_ref, rtol=1e-5)
  for got, want in zip(jax.tree.leaves(stats), jax.tree.leaves(stats_ref)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref)):
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-3 * float(jnp.abs(want).max()))


@requires_bfloat16
def test_bfloat16_resnet_with_onednn_batch_norm_is_as_close_to_float32_as_with_xla():
  """As with the convolutions (tests/test_onednn_conv.py): the two bfloat16 steps differ from each other
  by bfloat16 rounding, which BatchNorm's backward pass amplifies in a model this small, so each is
  compared with the float32 step, XLA's error the yardstick."""
  value_32, stats_32, grads_32 = _resnet_step('xla', jnp.float32)
  value_xla, _, grads_xla = _resnet_step('xla', jnp.bfloat16)
  value_onednn, stats_onednn, grads_onednn = _resnet_step('onednn', jnp.bfloat16)
  np.testing.assert_allclose(value_xla, value_32, rtol=4e-3)
  np.testing.assert_allclose(value_onednn, value_32, rtol=4e-3)
  flat = lambda tree: jnp.concatenate([g.ravel() for g in jax.tree.leaves(tree)])  # pylint: disable=g-long-lambda
  error = lambda g: float(jnp.linalg.norm(flat(g) - flat(grads_32)) / jnp.linalg.norm(flat(grads_32)))  # pylint: disable=g-long-lambda
  assert error(grads_onednn) < 1.5 * error(grads_xla), (error(grads_onednn), error(grads_xla))
  # The running statistics come from float32 sums of the same bfloat16 activations.
  assert all(s.dtype == jnp.float32 for s in jax.tree.leaves(stats_onednn))
  np.testing.assert_allclose(flat(stats_onednn), flat(stats_32), rtol=0.05, atol=0.02)


@requires_onednn
def test_eval_mode_and_the_choice_of_implementation(tiny_config):
  model_config = tiny_config.model
  assert model_config.batch_norm == 'auto'
  assert builders.bn_impl(model_config, 'onednn') == 'onednn'
  assert builders.bn_impl(model_config, 'xla') == 'xla'  # a GPU, several devices, no oneDNN
  pretrained = model_config.copy_and_resolve_references()
  pretrained.name = 'efficientnet_lite0'
  assert builders.bn_impl(pretrained, 'onednn') == 'xla'  # float32 fine-tuning: no faster, more memory
  pretrained.dtype = 'bfloat16'
  assert builders.bn_impl(pretrained, 'onednn') == 'onednn'
  model_config.batch_norm = 'xla'
  assert builders.bn_impl(model_config, 'onednn') == 'xla'
  model_config.batch_norm = 'onednn'
  assert builders.bn_impl(model_config, 'onednn') == 'onednn'
  with pytest.raises(config_lib.ConfigError, match='batch_norm'):
    builders.bn_impl(model_config, 'xla')
  model_config.batch_norm = 'cudnn'
  with pytest.raises(config_lib.ConfigError, match='batch_norm'):
    builders.bn_impl(model_config, 'onednn')
  # Eval mode (running statistics) is the same module either way; the fused ReLU applies there too.
  x = jnp.asarray(np.random.default_rng(2).normal(size=(4, 32, 32, 3)), jnp.float32)
  model = models.create_model('resnet9', width_multiplier=0.125, conv_impl='onednn', bn_impl='onednn')
  ref = model.clone(bn_impl='xla')
  variables = model.init(jax.random.key(0), x[:1], train=False)
  np.testing.assert_array_equal(model.apply(variables, x, train=False), ref.apply(variables, x, train=False))


def test_checkpoints_without_the_field_ran_xla_batch_norm():
  """A run saved before `model.batch_norm` existed ran XLA's: resuming it under 'auto' says so."""
  saved = {'model': {'name': 'resnet18', 'conv': 'auto'}}
  config = ml_collections.ConfigDict({'model': {'name': 'resnet18', 'conv': 'auto', 'batch_norm': 'auto'}})
  structural, announced = checkpointing.compare_with_saved(config, saved)
  assert not structural
  assert announced == ["model.batch_norm: 'xla' -> 'auto'"]
