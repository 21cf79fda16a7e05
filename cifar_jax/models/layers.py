"""Layers every model family shares: torch-semantics BatchNorm, weight standardisation, torch's initialisers.

Module names mirror torch's so weights port one to one (`torch_reference.torch_to_flax`).
"""

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from cifar_jax import onednn_conv

BN_MOMENTUM = 0.1  # torch convention: running = (1 - m) * running + m * batch_stat.
NORM_EPSILON = 1e-5  # torch's default for BatchNorm and GroupNorm.
WS_EPSILON = 1e-5  # added to the unbiased std, as in the blog's (and Qiao's) weight standardisation.
GROUP_SIZE = 4  # nn.GroupNorm(C // 4, C): four channels per group.
BATCH_NORM_IMPLS = ('xla', 'onednn')

ModuleDef = Any

# torch's kaiming_normal_(mode='fan_out', nonlinearity='relu'): untruncated normal, std sqrt(2 / fan_out).
conv_kernel_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')
# torch's nn.Linear default: weight and bias uniform in +-1/sqrt(fan_in).
dense_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')


def dense_bias_init(fan_in: int) -> Callable:
  """torch's nn.Linear bias init, uniform in +-1/sqrt(fan_in)."""
  bound = 1.0 / fan_in**0.5

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


class TorchBatchNorm(nn.Module):
  """BatchNorm with torch's semantics: unbiased running variance, momentum in torch's convention.

  `flax.linen.BatchNorm` feeds the biased batch variance to its running average; torch feeds the unbiased
  one (n / (n - 1)). Normalisation uses the biased variance in both. Statistics are computed in float32.
  With `momentum=1.0` the running statistics become the batch's own (used to recalibrate SWA models).

  `impl` picks the training-mode pass: 'xla' (`batch_norm_train`, XLA's ops) or 'onednn' (oneDNN's batch
  normalisation primitives, `onednn_conv.batch_norm_train`), the same math to float32 rounding. oneDNN's
  reads a bfloat16 activation without widening it to float32 first: ResNet18's step at width 0.25 runs
  1.30x (bfloat16) and 1.21x (float32) as fast with it (BENCHMARKS.md, "BatchNorm through oneDNN"). With
  `relu` oneDNN applies the ReLU in the same passes. XLA's is kept where oneDNN's cannot run: statistics
  shared over devices (`axis_name`), an output dtype other than the input's, or a dtype
  `onednn_conv.dtypes()` lacks.
  """

  use_running_average: bool | None = None
  momentum: float = BN_MOMENTUM
  epsilon: float = NORM_EPSILON
  dtype: Any = jnp.float32
  scale_init: Callable = nn.initializers.ones
  axis_name: str | None = None
  impl: str = 'xla'
  relu: bool = False  # ReLU(BatchNorm(x)): one layer, fused into oneDNN's passes where impl='onednn'

  @nn.compact
  def __call__(self, x, use_running_average: bool | None = None):
    use_running_average = nn.merge_param(
        'use_running_average', self.use_running_average, use_running_average)
    features = x.shape[-1]
    ra_mean = self.variable('batch_stats', 'mean', lambda: jnp.zeros((features,), jnp.float32))
    ra_var = self.variable('batch_stats', 'var', lambda: jnp.ones((features,), jnp.float32))
    scale = self.param('scale', self.scale_init, (features,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (features,), jnp.float32)

    x32 = x.astype(jnp.float32)
    if use_running_average:
      mean, var = ra_mean.value, ra_var.value
      y = (x32 - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias
      return self._activation(y.astype(self.dtype))
    if self.impl not in BATCH_NORM_IMPLS:
      raise ValueError(f"impl must be one of {BATCH_NORM_IMPLS}, got {self.impl!r}")
    if (self.impl == 'onednn' and self.axis_name is None and jnp.dtype(x.dtype) == jnp.dtype(self.dtype)
        and jnp.dtype(x.dtype) in onednn_conv.dtypes()):
      y, mean, var = onednn_conv.batch_norm_train(x, scale, bias, self.epsilon, self.relu)
      mean, var = jax.lax.stop_gradient(mean), jax.lax.stop_gradient(var)
    else:
      y, mean, var = batch_norm_train(x, scale, bias, self.epsilon, self.axis_name)
      y = self._activation(y.astype(self.dtype))
    if not self.is_initializing():
      count = x.size // features
      if self.axis_name is not None:
        count *= jax.lax.psum(1, self.axis_name)
      unbiased = var * (count / max(count - 1, 1))
      ra_mean.value = (1.0 - self.momentum) * ra_mean.value + self.momentum * mean
      ra_var.value = (1.0 - self.momentum) * ra_var.value + self.momentum * unbiased
    return y

  def _activation(self, y):
    return nn.relu(y) if self.relu else y


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def batch_norm_train(x, scale, bias, epsilon: float, axis_name: str | None):
  """Training-mode BatchNorm over all axes but the last: (y, batch mean, biased batch variance).

  The statistics are averaged over `axis_name` (pmap) when given. The backward pass is the closed form
  torch's native_batch_norm_backward uses (two reductions, one elementwise pass) instead of autodiff's
  longer chain through the two-pass variance: ResNet18 width 0.25 on one CPU core, 651 -> 600 ms
  of XLA ops a gradient step (BENCHMARKS.md, "What was tried").
  """
  return _batch_norm_train_fwd(x, scale, bias, epsilon, axis_name)[0]


def _batch_norm_train_fwd(x_in, scale, bias, epsilon, axis_name):
  # Statistics and output in float32; the backward pass keeps the input in its own dtype (a bfloat16
  # activation stays half the size) and widens it again.
  x = x_in.astype(jnp.float32)
  axes = tuple(range(x.ndim - 1))
  mean = jnp.mean(x, axes)
  if axis_name is not None:
    mean = jax.lax.pmean(mean, axis_name)
  # Two-pass variance, as torch computes it (no E[x^2] - E[x]^2 cancellation).
  var = jnp.mean(jnp.square(x - mean), axes)
  if axis_name is not None:
    var = jax.lax.pmean(var, axis_name)
  inv_std = jax.lax.rsqrt(var + epsilon)
  y = (x - mean) * inv_std * scale + bias
  # The statistics only feed the running averages, which no loss depends on.
  stats = (jax.lax.stop_gradient(mean), jax.lax.stop_gradient(var))
  return (y, *stats), (x_in, mean, inv_std, scale)


def _batch_norm_train_bwd(epsilon, axis_name, residuals, cotangents):
  del epsilon
  x_in, mean, inv_std, scale = residuals
  x = x_in.astype(jnp.float32)
  g = cotangents[0]
  axes = tuple(range(x.ndim - 1))
  count = x.size // x.shape[-1]
  x_hat = (x - mean) * inv_std
  # Gradients of this device's loss: its own sums for scale and bias (the step averages them over
  # devices), the all-device sums for x since the statistics are shared.
  grad_bias = jnp.sum(g, axes)
  grad_scale = jnp.sum(g * x_hat, axes)
  sum_g, sum_g_x_hat = grad_bias, grad_scale
  if axis_name is not None:
    sum_g, sum_g_x_hat = jax.lax.psum((sum_g, sum_g_x_hat), axis_name)
    count *= jax.lax.psum(1, axis_name)
  grad_x = (scale * inv_std) * (g - sum_g / count - x_hat * (sum_g_x_hat / count))
  return grad_x.astype(x_in.dtype), grad_scale, grad_bias


batch_norm_train.defvjp(_batch_norm_train_fwd, _batch_norm_train_bwd)


def with_relu(norm: ModuleDef, relu: bool = False, **kwargs) -> Callable:
  """`norm(**kwargs)`, followed by a ReLU if `relu`: the `relu` argument `TorchBatchNorm` takes, for a norm
  layer without one (GroupNorm), so that a model can ask every norm layer for ReLU(norm(x)) alike."""
  module = norm(**kwargs)
  return (lambda x: nn.relu(module(x))) if relu else module


def standardize_weight(kernel: jax.Array, eps: float = WS_EPSILON) -> jax.Array:
  """The blog's weight standardisation: (w - mean) / (unbiased std + eps) per output channel (HWIO)."""
  axes = tuple(range(kernel.ndim - 1))
  w = kernel.astype(jnp.float32)
  w = w - jnp.mean(w, axis=axes, keepdims=True)
  std = jnp.std(w, axis=axes, keepdims=True, ddof=1)
  return (w / (std + eps)).astype(kernel.dtype)


class StdConv(nn.Conv):
  """A convolution whose kernel is weight-standardised on every call."""

  def param(self, name, *args, **kwargs):
    param = super().param(name, *args, **kwargs)
    if name == 'kernel':
      param = standardize_weight(param)
    return param


def conv3x3(conv: ModuleDef, features: int, strides: int, name: str) -> nn.Module:
  # Explicit torch padding=1: flax 'SAME' pads (0, 1) at stride 2, which shifts the sampling grid.
  return conv(features, (3, 3), (strides, strides), padding=((1, 1), (1, 1)), name=name)




CONV_IMPLS = ('xla', 'onednn')


def conv_module(conv_impl: str, dtype: Any, conv_cls: ModuleDef = nn.Conv) -> ModuleDef:
  """The models' convolution: no bias, torch's kaiming fan-out init, XLA's or oneDNN's kernels.

  'xla' is lax.conv_general_dilated, 'onednn' `onednn_conv` (XLA:CPU only); same params, same math.
  """
  if conv_impl not in CONV_IMPLS:
    raise ValueError(f"conv_impl must be 'xla' or 'onednn', got {conv_impl!r}")
  return functools.partial(conv_cls, use_bias=False, dtype=dtype, kernel_init=conv_kernel_init,
                           conv_general_dilated=(onednn_conv.conv_general_dilated
                                                 if conv_impl == 'onednn' else None))


def batch_norm(train: bool, dtype: Any, momentum: float = BN_MOMENTUM,
               axis_name: str | None = None, impl: str = 'xla') -> ModuleDef:
  """`TorchBatchNorm` in training (batch statistics) or eval mode (running statistics)."""
  return functools.partial(TorchBatchNorm, use_running_average=not train, momentum=momentum, dtype=dtype,
                           axis_name=axis_name, impl=impl)


def torch_linear(num_classes: int, fan_in: int, dtype: Any, zero_bias: bool = False,
                 name: str = 'fc') -> nn.Dense:
  """torch's nn.Linear with its default init (bias zeroed, as Shake-Shake and PyramidNet do, if asked)."""
  return nn.Dense(num_classes, dtype=dtype, kernel_init=dense_kernel_init,
                  bias_init=nn.initializers.zeros if zero_bias else dense_bias_init(fan_in), name=name)


# The input of the families that start from ImageNet weights (`torchvision_resnet`, `efficientnet_lite`): the
# batch arrives normalised with CIFAR's mean and std (`input_pipeline.normalize`); these undo that, resize
# on the device and normalise as the pretrained weights expect.
CIFAR_MEAN_RGB = (0.4914, 0.4822, 0.4465)  # input_pipeline.MEAN_RGB
CIFAR_STD_RGB = (0.2023, 0.1994, 0.2010)  # input_pipeline.STD_RGB
# name -> (mean, std) of [0, 1] pixels: torchvision's ImageNet statistics, and the TF Lite models' [-1, 1].
NORMALIZATIONS = {
    'imagenet': ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    'inception': ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}


def pretrained_input(x: jax.Array, *, train: bool, image_size: int, resize_size: int, normalization: str,
                     crop_key: Callable[[], jax.Array] | None = None) -> jax.Array:
  """CIFAR-normalised NHWC images -> `image_size` px (bilinear, torch's `interpolate(align_corners=False,
  antialias=False)`), normalised with `NORMALIZATIONS[normalization]`.

  BiT's recipe: in training resize to `resize_size` and crop `image_size` at a random place per image
  (`crop_key()` draws the key); in eval resize straight to `image_size`. 0 keeps the size it is given.
  """
  x = x.astype(jnp.float32) * jnp.asarray(CIFAR_STD_RGB, jnp.float32) + jnp.asarray(CIFAR_MEAN_RGB,
                                                                                    jnp.float32)
  n, h, _, c = x.shape
  size = image_size or h
  if train and resize_size > size:
    x = jax.image.resize(x, (n, resize_size, resize_size, c), 'bilinear', antialias=False)
    offsets = jax.random.randint(crop_key(), (n, 2), 0, resize_size - size + 1)
    x = jax.vmap(lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1], 0), (size, size, c)))(x, offsets)
  elif size != h:
    x = jax.image.resize(x, (n, size, size, c), 'bilinear', antialias=False)
  mean, std = NORMALIZATIONS[normalization]
  return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
