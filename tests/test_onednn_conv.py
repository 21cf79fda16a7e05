"""cifar_jax/onednn_conv.py: oneDNN's convolutions equal lax's, forward and backward, in the model too."""

import os
import platform
import subprocess
import sys

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import pytest

from cifar_jax import builders
from cifar_jax import config_lib
from cifar_jax import models
from cifar_jax import onednn_conv
from configs import default

NHWC = ('NHWC', 'HWIO', 'NHWC')
# (batch, size, in, out, kernel, stride, padding): the ResNets' 3x3 and strided 1x1 convolutions, the
# 3-channel stem, an odd size with asymmetric padding.
CASES = [(4, 32, 3, 8, 3, 1, ((1, 1), (1, 1))), (4, 16, 8, 8, 3, 1, ((1, 1), (1, 1))),
         (4, 16, 8, 16, 3, 2, ((1, 1), (1, 1))), (4, 16, 8, 16, 1, 2, ((0, 0), (0, 0))),
         (3, 9, 5, 7, 3, 2, ((0, 1), (2, 1)))]


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _conv_loss(conv, x, w, stride, padding):
  y = conv(x, w, (stride, stride), padding, dimension_numbers=NHWC)
  return jnp.sum(jnp.sin(y)), y


requires_onednn = pytest.mark.skipif(
    not onednn_conv.available(), reason=f'oneDNN convolutions unavailable: {onednn_conv._state["error"]}')  # pylint: disable=protected-access


def test_builds_on_this_platform():
  # The default path on Linux x86-64, where pyproject.toml installs oneDNN: it must build, not fall back.
  if platform.system() == 'Linux' and platform.machine() == 'x86_64':
    assert onednn_conv.missing_build_requirement() is None
    assert onednn_conv.available()


@requires_onednn
@pytest.mark.parametrize('n,size,cin,cout,k,stride,padding', CASES)
def test_forward_and_gradients_equal_lax(n, size, cin, cout, k, stride, padding):
  rng = np.random.default_rng(size * cin + cout)
  x = jnp.asarray(rng.normal(size=(n, size, size, cin)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(k, k, cin, cout)) / np.sqrt(k * k * cin), jnp.float32)
  grad = lambda conv: jax.jit(jax.value_and_grad(  # pylint: disable=g-long-lambda
      lambda x, w: _conv_loss(conv, x, w, stride, padding), argnums=(0, 1), has_aux=True))
  (loss_ref, y_ref), (dx_ref, dw_ref) = grad(lax.conv_general_dilated)(x, w)
  (loss, y), (dx, dw) = grad(onednn_conv.conv_general_dilated)(x, w)
  assert y.shape == y_ref.shape
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(loss, loss_ref, rtol=1e-5)
  np.testing.assert_allclose(dx, dx_ref, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(dw, dw_ref, rtol=1e-4, atol=1e-4)


# EfficientNet-Lite0's depthwise convolutions at 128 px (size, channels, kernel, stride), with TensorFlow's
# 'SAME' padding as the model pads (`efficientnet_lite.same_padding`): stride 1 pads (k - 1) / 2 each side,
# stride 2 pads k / 2 - 1 before and k / 2 after.
LITE0_DEPTHWISE = [(64, 32, 3, 1), (64, 96, 3, 2), (32, 144, 3, 1), (32, 144, 5, 2), (16, 240, 5, 1),
                   (16, 240, 3, 2), (8, 480, 3, 1), (8, 480, 5, 1), (8, 672, 5, 1), (8, 672, 5, 2),
                   (4, 1152, 5, 1), (4, 1152, 3, 1)]


def _same_padding(k, stride):
  total = k - 1 if stride == 1 else k - 2
  return ((total // 2, total - total // 2),) * 2


def _grouped_grads(conv, x, w, stride, padding, groups):
  loss = lambda x, w: _grouped_loss(conv, x, w, stride, padding, groups)
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(x, w)


def _grouped_loss(conv, x, w, stride, padding, groups):
  y = conv(x, w, (stride, stride), padding, dimension_numbers=NHWC, feature_group_count=groups)
  return jnp.sum(jnp.sin(y)), y


def _depthwise_operands(size, channels, k, dtype, n=2, multiplier=1):
  rng = np.random.default_rng(size * channels + k)
  x = jnp.asarray(rng.normal(size=(n, size, size, channels)), dtype)
  w = jnp.asarray(rng.normal(size=(k, k, 1, channels * multiplier)) / k, dtype)
  return x, w


@requires_onednn
@pytest.mark.parametrize('size,channels,k,stride', LITE0_DEPTHWISE)
def test_depthwise_forward_and_gradients_equal_lax(size, channels, k, stride):
  x, w = _depthwise_operands(size, channels, k, jnp.float32)
  padding = _same_padding(k, stride)
  (loss_ref, y_ref), (dx_ref, dw_ref) = _grouped_grads(lax.conv_general_dilated, x, w, stride, padding,
                                                       channels)
  (loss, y), (dx, dw) = _grouped_grads(onednn_conv.conv_general_dilated, x, w, stride, padding, channels)
  hlo = jax.jit(lambda x, w: onednn_conv.conv_general_dilated(
      x, w, (stride, stride), padding, dimension_numbers=NHWC, feature_group_count=channels)).lower(
          x, w).as_text()
  assert 'cifar_jax_onednn_conv_forward' in hlo and 'convolution(' not in hlo
  assert y.shape == y_ref.shape
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(loss, loss_ref, rtol=1e-5)
  np.testing.assert_allclose(dx, dx_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dw, dw_ref, rtol=1e-4, atol=1e-4)


@requires_onednn
@pytest.mark.parametrize('channels,groups,multiplier', [(8, 2, 1), (6, 6, 2)])
def test_grouped_convolutions_equal_lax(channels, groups, multiplier):
  """Groups of several channels, and a depthwise convolution with two outputs per channel."""
  rng = np.random.default_rng(channels * groups)
  x = jnp.asarray(rng.normal(size=(3, 9, 9, channels)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(3, 3, channels // groups, channels * multiplier)), jnp.float32)
  (_, y_ref), (dx_ref, dw_ref) = _grouped_grads(lax.conv_general_dilated, x, w, 2, ((0, 1), (1, 1)),
                                                groups)
  (_, y), (dx, dw) = _grouped_grads(onednn_conv.conv_general_dilated, x, w, 2, ((0, 1), (1, 1)), groups)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dx, dx_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dw, dw_ref, rtol=1e-4, atol=1e-4)


@requires_onednn
def test_depthwise_under_vmap_over_seeds_equals_lax():
  """k seeds' kernels (the vmap-ed k-seed step) on a shared input: one call, each seed as lax."""
  x, _ = _depthwise_operands(16, 24, 5, jnp.float32)
  w = jnp.asarray(np.random.default_rng(1).normal(size=(3, 5, 5, 1, 24)) / 5, jnp.float32)
  padding = _same_padding(5, 2)

  def f(conv):
    return jax.jit(jax.vmap(lambda w: _grouped_grads(conv, x, w, 2, padding, 24)))(w)

  (_, y_ref), (dx_ref, dw_ref) = f(lax.conv_general_dilated)
  (_, y), (dx, dw) = f(onednn_conv.conv_general_dilated)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dx, dx_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dw, dw_ref, rtol=1e-4, atol=1e-4)


@requires_onednn
def test_string_padding_and_vmap_over_kernels():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 8, 8, 4)), jnp.float32)
  ws = jnp.asarray(rng.normal(size=(3, 3, 3, 4, 6)), jnp.float32)  # three kernels, as under num_seeds=3
  for conv_fn in (onednn_conv.conv_general_dilated, lax.conv_general_dilated):
    assert conv_fn(x, ws[0], (2, 2), 'SAME', dimension_numbers=NHWC).shape == (2, 4, 4, 6)
  f = lambda conv: jax.vmap(lambda w: conv(x, w, (1, 1), 'SAME', dimension_numbers=NHWC))(ws)  # pylint: disable=g-long-lambda
  np.testing.assert_allclose(f(onednn_conv.conv_general_dilated), f(lax.conv_general_dilated),
                             rtol=1e-5, atol=1e-5)


@requires_onednn
@pytest.mark.parametrize('n,size,cin,cout,k,stride,padding', [CASES[1], CASES[4]])
def test_nested_vmap_is_one_call_per_convolution_and_equals_lax(n, size, cin, cout, k, stride,
                                                                padding):
  """vmap over 2 samples of 3 seeds' kernels (as SWAG's per-seed samples), the input shared by the
  samples: one batched custom call per convolution kind, each element's values and gradients lax's."""
  rng = np.random.default_rng(7)
  x = jnp.asarray(rng.normal(size=(3, n, size, size, cin)), jnp.float32)  # per seed
  ws = jnp.asarray(rng.normal(size=(2, 3, k, k, cin, cout)) / np.sqrt(k * k * cin), jnp.float32)

  def batched(conv):
    per_element = jax.value_and_grad(lambda x, w: _conv_loss(conv, x, w, stride, padding),
                                     argnums=(0, 1), has_aux=True)
    over_seeds = jax.vmap(per_element)  # x and w batched
    return jax.jit(jax.vmap(over_seeds, in_axes=(None, 0)))  # the samples share x

  (loss_ref, y_ref), (dx_ref, dw_ref) = batched(lax.conv_general_dilated)(x, ws)
  (loss, y), (dx, dw) = batched(onednn_conv.conv_general_dilated)(x, ws)
  assert y.shape == y_ref.shape == (2, 3) + y_ref.shape[2:] and dx.shape == (2,) + x.shape
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(loss, loss_ref, rtol=1e-5)
  np.testing.assert_allclose(dx, dx_ref, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(dw, dw_ref, rtol=1e-4, atol=1e-4)
  hlo = batched(onednn_conv.conv_general_dilated).lower(x, ws).as_text()
  for target in ('forward', 'backward_data', 'backward_weights'):
    assert hlo.count(f'cifar_jax_onednn_conv_{target}_') == 1, target
  assert 'while' not in hlo  # no loop over the elements


@requires_onednn
def test_other_convolutions_fall_back_to_lax(monkeypatch):
  x = jnp.ones((2, 8, 8, 4), jnp.bfloat16)
  w = jnp.ones((3, 3, 4, 4), jnp.bfloat16)
  args = ((1, 1), ((1, 1), (1, 1)))
  assert onednn_conv.supports(x, w, *args, None, None, NHWC, 1, 1) == bool(onednn_conv.bfloat16_flag())
  assert not onednn_conv.supports(x, w.astype(jnp.float32), *args, None, None, NHWC, 1, 1)  # mixed
  assert not onednn_conv.supports(x.astype(jnp.float16), w.astype(jnp.float16), *args, None, None, NHWC,
                                  1, 1)
  with monkeypatch.context() as m:  # a CPU without bfloat16 instructions: XLA's bfloat16 convolution
    m.setattr(onednn_conv, 'bfloat16_flag', lambda: None)
    assert not onednn_conv.supports(x, w, *args, None, None, NHWC, 1, 1)
    hlo = jax.jit(lambda x, w: onednn_conv.conv_general_dilated(x, w, *args, dimension_numbers=NHWC)
                  ).lower(x, w).as_text()
    assert 'custom_call' not in hlo and 'convolution' in hlo
  x32, w32 = x.astype(jnp.float32), w.astype(jnp.float32)
  assert onednn_conv.supports(x32, w32, *args, None, None, NHWC, 1, 1)
  assert not onednn_conv.supports(x32, w32, *args, None, (2, 2), NHWC, 1, 1)  # dilation
  assert not onednn_conv.supports(x32, w32, (1, 1), ((-1, 0), (0, 0)), None, None, NHWC, 1, 1)
  hlo = jax.jit(lambda x, w: onednn_conv.conv_general_dilated(x, w, *args, dimension_numbers=NHWC)
                ).lower(x32, w32).as_text()
  assert 'cifar_jax_onednn_conv_forward' in hlo


@requires_onednn
@pytest.mark.parametrize('norm', ['batch', 'group_ws'])
def test_resnet_with_onednn_equals_resnet_with_xla(norm):
  x = jnp.asarray(np.random.default_rng(1).normal(size=(8, 32, 32, 3)), jnp.float32)
  y = jnp.arange(8) % 10
  kwargs = dict(width_multiplier=0.125, norm=norm)
  ref_model = models.create_model('resnet9', conv_impl='xla', **kwargs)
  model = models.create_model('resnet9', conv_impl='onednn', **kwargs)
  variables = ref_model.init(jax.random.key(0), x[:1], train=False)

  def loss(m, params):
    logits, _ = m.apply({**variables, 'params': params}, x, train=True, mutable=['batch_stats'])
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))

  loss_ref, grads_ref = jax.jit(jax.value_and_grad(lambda p: loss(ref_model, p)))(variables['params'])
  value, grads = jax.jit(jax.value_and_grad(lambda p: loss(model, p)))(variables['params'])
  np.testing.assert_allclose(value, loss_ref, rtol=1e-5)
  for g, g_ref in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref)):
    np.testing.assert_allclose(g, g_ref, rtol=2e-3, atol=2e-5)
  # The same params either way: checkpoints move freely between the two.
  assert jax.tree.structure(model.init(jax.random.key(0), x[:1], train=False)) == \
      jax.tree.structure(variables)


@requires_onednn
def test_conv_impl_choice(tiny_config):
  model_config = tiny_config.model
  assert model_config.conv == 'auto'
  assert builders.conv_impl(model_config) == 'onednn'  # one CPU device, oneDNN built
  assert builders.conv_impl(model_config, 2, 'jit') == 'xla'  # several devices
  assert builders.conv_impl(model_config, 2, 'pmap') == 'xla'
  model_config.conv = 'xla'
  assert builders.conv_impl(model_config) == 'xla'
  model_config.conv = 'onednn'
  assert builders.conv_impl(model_config) == 'onednn'
  assert builders.conv_impl(model_config, 2, 'pmap') == 'onednn'  # one call per device
  with pytest.raises(config_lib.ConfigError, match='one device'):
    builders.conv_impl(model_config, 2, 'jit')
  with pytest.raises(ValueError, match='conv_impl'):
    models.create_model('resnet9', conv_impl='cudnn').init(jax.random.key(0), jnp.ones((1, 32, 32, 3)))


# bfloat16 ------------------------------------------------------------------------------------------------

requires_bfloat16 = pytest.mark.skipif(
    not onednn_conv.available() or not onednn_conv.bfloat16_flag(),
    reason=f'no oneDNN bfloat16 convolutions here (needs one of {onednn_conv.BFLOAT16_FLAGS})')


def assert_within_bfloat16_rounding(actual, expected, ulps: float = 2.0):
  """Each element within `ulps` bfloat16 ulps of the reference, measured at the tensor's scale.

  oneDNN and XLA both accumulate in float32 and round once to bfloat16, but in different orders, so
  an element may land one ulp apart; the ulp is taken at the tensor's largest magnitude, since sums of
  terms of both signs lose their relative precision near zero (as in any float32 accumulation).
  """
  actual, expected = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
  assert actual.dtype == expected.dtype and actual.shape == expected.shape
  ulp = 2.0 ** (np.floor(np.log2(np.max(np.abs(expected)))) - 7)  # bfloat16: 8 significant bits
  np.testing.assert_array_less(np.abs(actual - expected), ulps * ulp + 1e-30)


def test_bfloat16_flag_reads_cpuinfo(tmp_path, monkeypatch):
  cpuinfo = tmp_path / 'cpuinfo'
  monkeypatch.setattr(onednn_conv, 'CPUINFO', str(cpuinfo))
  for flags, expected in [('fpu avx512f avx512_vnni', None), ('fpu avx512f avx512_bf16 sse', 'avx512_bf16'),
                          ('amx_bf16 amx_tile avx512_bf16', 'amx_bf16')]:
    cpuinfo.write_text(f'processor\t: 0\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n')
    onednn_conv.bfloat16_flag.cache_clear()
    assert onednn_conv.bfloat16_flag() == expected
    assert (jnp.bfloat16 in onednn_conv.dtypes()) == (expected is not None)
    assert onednn_conv.describe('onednn', jnp.bfloat16).startswith(
        "oneDNN's" if expected else "XLA's")
  monkeypatch.setattr(onednn_conv, 'CPUINFO', str(tmp_path / 'missing'))
  onednn_conv.bfloat16_flag.cache_clear()
  assert onednn_conv.bfloat16_flag() is None
  monkeypatch.undo()
  onednn_conv.bfloat16_flag.cache_clear()
  assert onednn_conv.describe('onednn', jnp.float32) == "oneDNN's, float32"
  assert onednn_conv.describe('xla', jnp.bfloat16) == "XLA's, bfloat16"


@requires_bfloat16
@pytest.mark.parametrize('n,size,cin,cout,k,stride,padding', CASES)
def test_bfloat16_forward_and_gradients_equal_lax(n, size, cin, cout, k, stride, padding):
  rng = np.random.default_rng(size * cin + cout)
  x = jnp.asarray(rng.normal(size=(n, size, size, cin)), jnp.bfloat16)
  w = jnp.asarray(rng.normal(size=(k, k, cin, cout)) / np.sqrt(k * k * cin), jnp.bfloat16)
  grad = lambda conv: jax.jit(jax.value_and_grad(  # pylint: disable=g-long-lambda
      lambda x, w: _conv_loss(conv, x, w, stride, padding), argnums=(0, 1), has_aux=True))
  (_, y_ref), (dx_ref, dw_ref) = grad(lax.conv_general_dilated)(x, w)
  (_, y), (dx, dw) = grad(onednn_conv.conv_general_dilated)(x, w)
  assert y.dtype == dx.dtype == dw.dtype == jnp.bfloat16
  assert 'cifar_jax_onednn_conv_backward_weights' in grad(onednn_conv.conv_general_dilated).lower(
      x, w).as_text()
  assert_within_bfloat16_rounding(y, y_ref)
  assert_within_bfloat16_rounding(dx, dx_ref)
  assert_within_bfloat16_rounding(dw, dw_ref)


@requires_bfloat16
@pytest.mark.parametrize('size,channels,k,stride', LITE0_DEPTHWISE)
def test_bfloat16_depthwise_forward_and_gradients_equal_lax(size, channels, k, stride):
  x, w = _depthwise_operands(size, channels, k, jnp.bfloat16)
  padding = _same_padding(k, stride)
  (_, y_ref), (dx_ref, dw_ref) = _grouped_grads(lax.conv_general_dilated, x, w, stride, padding, channels)
  (_, y), (dx, dw) = _grouped_grads(onednn_conv.conv_general_dilated, x, w, stride, padding, channels)
  assert y.dtype == dx.dtype == dw.dtype == jnp.bfloat16
  assert_within_bfloat16_rounding(y, y_ref)
  assert_within_bfloat16_rounding(dx, dx_ref)
  assert_within_bfloat16_rounding(dw, dw_ref)


@requires_bfloat16
def test_bfloat16_nested_vmap_is_one_call_per_convolution_and_equals_lax():
  """The float32 nested-vmap test in bfloat16: 2 samples of 3 seeds' kernels, the input shared."""
  n, size, cin, cout, k, stride, padding = CASES[4]
  rng = np.random.default_rng(7)
  x = jnp.asarray(rng.normal(size=(3, n, size, size, cin)), jnp.bfloat16)
  ws = jnp.asarray(rng.normal(size=(2, 3, k, k, cin, cout)) / np.sqrt(k * k * cin), jnp.bfloat16)

  def batched(conv):
    per_element = jax.value_and_grad(lambda x, w: _conv_loss(conv, x, w, stride, padding),
                                     argnums=(0, 1), has_aux=True)
    return jax.jit(jax.vmap(jax.vmap(per_element), in_axes=(None, 0)))

  (_, y_ref), (dx_ref, dw_ref) = batched(lax.conv_general_dilated)(x, ws)
  (_, y), (dx, dw) = batched(onednn_conv.conv_general_dilated)(x, ws)
  assert y.shape == y_ref.shape and dx.shape == (2,) + x.shape and dw.dtype == jnp.bfloat16
  for sample in range(2):
    for seed in range(3):
      assert_within_bfloat16_rounding(y[sample, seed], y_ref[sample, seed])
      assert_within_bfloat16_rounding(dx[sample, seed], dx_ref[sample, seed])
      assert_within_bfloat16_rounding(dw[sample, seed], dw_ref[sample, seed])
  hlo = batched(onednn_conv.conv_general_dilated).lower(x, ws).as_text()
  for target in ('forward', 'backward_data', 'backward_weights'):
    assert hlo.count(f'cifar_jax_onednn_conv_{target}_') == 1, target
  assert 'while' not in hlo


@requires_bfloat16
def test_bfloat16_resnet_with_onednn_is_as_close_to_float32_as_with_xla():
  """Mixed precision through the model (float32 params, bfloat16 convolutions): oneDNN's bfloat16 step
  is as far from the float32 step as XLA's bfloat16 step is, no further.

  The two bfloat16 steps differ from each other by bfloat16 rounding, which this tiny model (batch 8,
  width 0.125, BatchNorm's backward subtracting near-equal bfloat16 values) amplifies to ~20% of each
  gradient; the loss agrees to ~1e-3. So the check is against float32, with XLA's error as the yardstick.
  """
  x = jnp.asarray(np.random.default_rng(1).normal(size=(8, 16, 16, 3)), jnp.float32)
  y = jnp.arange(8) % 10

  def step(conv_impl, dtype):
    model = models.create_model('resnet9', conv_impl=conv_impl, width_multiplier=0.125, dtype=dtype)
    variables = model.init(jax.random.key(0), x[:1], train=False)

    def loss(params):
      logits, _ = model.apply({**variables, 'params': params}, x, train=True, mutable=['batch_stats'])
      return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))

    value_and_grad = jax.jit(jax.value_and_grad(loss))
    hlo = value_and_grad.lower(variables['params']).as_text()
    assert ('cifar_jax_onednn_conv_backward_weights' in hlo) == (conv_impl == 'onednn')
    value, grads = value_and_grad(variables['params'])
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))  # the params' dtype
    return value, jnp.concatenate([g.ravel() for g in jax.tree.leaves(grads)])

  loss_32, grads_32 = step('xla', jnp.float32)
  loss_xla, grads_xla = step('xla', jnp.bfloat16)
  loss_onednn, grads_onednn = step('onednn', jnp.bfloat16)
  np.testing.assert_allclose(loss_onednn, loss_32, rtol=4e-3)
  np.testing.assert_allclose(loss_xla, loss_32, rtol=4e-3)
  error = lambda g: float(jnp.linalg.norm(g - grads_32) / jnp.linalg.norm(grads_32))  # pylint: disable=g-long-lambda
  assert error(grads_onednn) < 1.5 * error(grads_xla), (error(grads_onednn), error(grads_xla))


# Every oneDNN call runs on the library's one thread ('onednn'), whichever thread asks: one OpenMP team in
# the process (that thread and its workers, which take its name), and callers at once each get their own
# result. Compiled beforehand, so that only the calls start threads.
ONE_THREAD_PROBE = """
import os, sys, threading
sys.path.insert(0, {root!r})
import jax, jax.numpy as jnp, numpy as np
from jax import lax
from cifar_jax import onednn_conv
onednn_conv.load()
onednn_conv.set_one_thread({one_thread})
NHWC = ('NHWC', 'HWIO', 'NHWC')
def loss(conv, x, w):
  return jnp.sum(jnp.sin(conv(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=NHWC)))
rng = np.random.default_rng(0)
inputs = [(jnp.asarray(rng.normal(size=(8, 16, 16, c)), jnp.float32),
           jnp.asarray(rng.normal(size=(3, 3, c, 16)) / np.sqrt(9 * c), jnp.float32)) for c in (8, 16, 24)]
def grad(conv, x, w):
  return jax.jit(jax.grad(lambda x, w: loss(conv, x, w), argnums=(0, 1))).lower(x, w).compile()
expected = [grad(lax.conv_general_dilated, x, w)(x, w) for x, w in inputs]
compiled = [grad(onednn_conv.conv_general_dilated, x, w) for x, w in inputs]
jax.block_until_ready(expected)
def names():
  return {{t: open(f'/proc/self/task/{{t}}/comm').read().strip() for t in os.listdir('/proc/self/task')}}
before = names()
results = [None] * len(inputs)
def work(i):
  for _ in range(20):
    results[i] = jax.block_until_ready(compiled[i](*inputs[i]))
callers = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
for t in callers: t.start()
for t in callers: t.join()
for got, want in zip(results, expected):
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
print('NEW_THREADS', sorted(name for t, name in names().items() if t not in before))
"""


@requires_onednn
@pytest.mark.parametrize('one_thread', [True, False])
def test_calls_from_several_threads_run_on_one_openmp_team(one_thread):
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': '--xla_force_host_platform_device_count=1'}
  env.pop('OMP_NUM_THREADS', None)
  out = subprocess.run([sys.executable, '-c', ONE_THREAD_PROBE.format(root=ROOT, one_thread=one_thread)],
                       env=env, capture_output=True, text=True, timeout=300, check=True).stdout
  new_threads = eval(out.split('NEW_THREADS')[1])  # pylint: disable=eval-used
  if one_thread:  # the default
    # The library's thread and the workers of its team (OpenMP's default: one thread per core), however
    # many XLA and Python threads called; no other thread started a team of its own.
    assert new_threads == ['onednn'] * len(os.sched_getaffinity(0)), out
  else:  # each call on the thread that makes it, as where XLA's BatchNorm runs between them
    assert 'onednn' not in new_threads, out


def test_the_openmp_spin_count_is_set_only_while_the_library_loads(monkeypatch):
  monkeypatch.delenv('GOMP_SPINCOUNT', raising=False)
  monkeypatch.delenv('OMP_WAIT_POLICY', raising=False)
  with onednn_conv._openmp_spin():  # pylint: disable=protected-access
    assert os.environ['GOMP_SPINCOUNT'] == onednn_conv.OPENMP_SPIN_COUNT
  assert 'GOMP_SPINCOUNT' not in os.environ  # the process's environment (and its children's) as it was
  for name, value in (('GOMP_SPINCOUNT', '5'), ('OMP_WAIT_POLICY', 'PASSIVE')):  # the user's choice stays
    monkeypatch.setenv(name, value)
    with onednn_conv._openmp_spin():  # pylint: disable=protected-access
      assert os.environ.get('GOMP_SPINCOUNT') == ('5' if name == 'GOMP_SPINCOUNT' else None)
    monkeypatch.delenv(name)


@requires_onednn
def test_the_model_picks_one_thread_where_its_batch_norm_is_onednns(monkeypatch):
  picked = []
  monkeypatch.setattr(onednn_conv, 'set_one_thread', picked.append)
  model_config = default.get_config().model
  model_config.width_multiplier = 0.125
  builders.create_model(model_config)  # ResNet18: oneDNN's BatchNorm
  model_config.batch_norm = 'xla'
  builders.create_model(model_config)
  model_config.conv = 'xla'
  builders.create_model(model_config)  # no oneDNN call: nothing to choose
  assert picked == [True, False]
