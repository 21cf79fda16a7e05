"""The blog's CIFAR ResNets in Flax: ResNet18/ResNet9 with BatchNorm (torch semantics) or GroupNorm + WS.

Layout follows the blog's edited copy of torchvision's `resnet.py` (blog.md, "Model"): a 3x3 stride-1 stem
without max-pool, BasicBlocks with a 1x1 conv + norm shortcut on a shape change, global average pool, fc.
Module names mirror torch's (`conv1`, `bn1`, `layer2_0/downsample_conv`, `fc`) so weights port one to one.
"""

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from cifar_jax import onednn_conv

BN_MOMENTUM = 0.1  # torch convention: running = (1 - m) * running + m * batch_stat.
NORM_EPSILON = 1e-5  # torch's default for BatchNorm and GroupNorm.
WS_EPSILON = 1e-5  # added to the unbiased std, as in the blog's (and Qiao's) weight standardisation.
GROUP_SIZE = 4  # nn.GroupNorm(C // 4, C): four channels per group.
STAGE_WIDTHS = (64, 128, 256, 512)

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
  """

  use_running_average: bool | None = None
  momentum: float = BN_MOMENTUM
  epsilon: float = NORM_EPSILON
  dtype: Any = jnp.float32
  scale_init: Callable = nn.initializers.ones
  axis_name: str | None = None

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
      return y.astype(self.dtype)
    y, mean, var = batch_norm_train(x32, scale, bias, self.epsilon, self.axis_name)
    if not self.is_initializing():
      count = x.size // features
      if self.axis_name is not None:
        count *= jax.lax.psum(1, self.axis_name)
      unbiased = var * (count / max(count - 1, 1))
      ra_mean.value = (1.0 - self.momentum) * ra_mean.value + self.momentum * mean
      ra_var.value = (1.0 - self.momentum) * ra_var.value + self.momentum * unbiased
    return y.astype(self.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def batch_norm_train(x, scale, bias, epsilon: float, axis_name: str | None):
  """Training-mode BatchNorm over all axes but the last: (y, batch mean, biased batch variance).

  The statistics are averaged over `axis_name` (pmap) when given. The backward pass is the closed form
  torch's native_batch_norm_backward uses (two reductions, one elementwise pass) instead of autodiff's
  longer chain through the two-pass variance: ResNet18 width 0.25 on one CPU core, 651 -> 600 ms
  of XLA ops a gradient step (BENCHMARKS.md, "What was tried").
  """
  return _batch_norm_train_fwd(x, scale, bias, epsilon, axis_name)[0]


def _batch_norm_train_fwd(x, scale, bias, epsilon, axis_name):
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
  return (y, *stats), (x, mean, inv_std, scale)


def _batch_norm_train_bwd(epsilon, axis_name, residuals, cotangents):
  del epsilon
  x, mean, inv_std, scale = residuals
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
  return grad_x, grad_scale, grad_bias


batch_norm_train.defvjp(_batch_norm_train_fwd, _batch_norm_train_bwd)


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


def _conv3x3(conv: ModuleDef, features: int, strides: int, name: str) -> nn.Module:
  # Explicit torch padding=1: flax 'SAME' pads (0, 1) at stride 2, which shifts the sampling grid.
  return conv(features, (3, 3), (strides, strides), padding=((1, 1), (1, 1)), name=name)


class BasicBlock(nn.Module):
  """torchvision's BasicBlock: two 3x3 convs, identity or 1x1 conv + norm shortcut."""

  features: int
  strides: int
  conv: ModuleDef
  norm: ModuleDef
  zero_init_residual: bool = False

  @nn.compact
  def __call__(self, x):
    y = _conv3x3(self.conv, self.features, self.strides, 'conv1')(x)
    y = nn.relu(self.norm(name='bn1')(y))
    y = _conv3x3(self.conv, self.features, 1, 'conv2')(y)
    last_scale = nn.initializers.zeros if self.zero_init_residual else nn.initializers.ones
    y = self.norm(scale_init=last_scale, name='bn2')(y)
    residual = x
    if x.shape[-1] != self.features or self.strides != 1:
      residual = self.conv(self.features, (1, 1), (self.strides, self.strides),
                           padding=((0, 0), (0, 0)), name='downsample_conv')(x)
      residual = self.norm(name='downsample_bn')(residual)
    return nn.relu(residual + y)


class ResNet(nn.Module):
  """CIFAR ResNet; `norm` is 'batch' (BatchNorm, torch semantics) or 'group_ws' (GroupNorm + WS)."""

  stage_sizes: Sequence[int]
  num_classes: int = 10
  width_multiplier: float = 1.0
  norm: str = 'batch'
  zero_init_residual: bool = False
  dtype: Any = jnp.float32
  bn_momentum: float = BN_MOMENTUM
  axis_name: str | None = None
  # 'xla' (lax.conv_general_dilated) or 'onednn' (onednn_conv, XLA:CPU only); same params, same math.
  conv_impl: str = 'xla'

  def widths(self) -> tuple[int, ...]:
    return tuple(max(1, int(round(w * self.width_multiplier))) for w in STAGE_WIDTHS)

  @nn.compact
  def __call__(self, x, train: bool = True):
    if self.norm == 'batch':
      conv_cls = nn.Conv
      norm = functools.partial(TorchBatchNorm, use_running_average=not train,
                               momentum=self.bn_momentum, dtype=self.dtype, axis_name=self.axis_name)
    elif self.norm == 'group_ws':
      conv_cls = StdConv
      # torch's nn.GroupNorm(C // 4, C): biased two-pass variance, eps 1e-5.
      norm = functools.partial(nn.GroupNorm, num_groups=None, group_size=GROUP_SIZE,
                               epsilon=NORM_EPSILON, use_fast_variance=False, dtype=self.dtype)
    else:
      raise ValueError(f"model.norm must be 'batch' or 'group_ws', got {self.norm!r}")
    if self.conv_impl not in ('xla', 'onednn'):
      raise ValueError(f"conv_impl must be 'xla' or 'onednn', got {self.conv_impl!r}")
    conv = functools.partial(conv_cls, use_bias=False, dtype=self.dtype, kernel_init=conv_kernel_init,
                             conv_general_dilated=(onednn_conv.conv_general_dilated
                                                   if self.conv_impl == 'onednn' else None))

    widths = self.widths()
    x = x.astype(self.dtype)
    x = _conv3x3(conv, widths[0], 1, 'conv1')(x)
    x = nn.relu(norm(name='bn1')(x))
    for stage, (num_blocks, features) in enumerate(zip(self.stage_sizes, widths)):
      for block in range(num_blocks):
        strides = 2 if stage > 0 and block == 0 else 1
        x = BasicBlock(features, strides, conv=conv, norm=norm,
                       zero_init_residual=self.zero_init_residual,
                       name=f'layer{stage + 1}_{block}')(x)
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=dense_kernel_init,
                 bias_init=dense_bias_init(widths[-1]), name='fc')(x)
    return x.astype(jnp.float32)


STAGE_SIZES = {'resnet18': (2, 2, 2, 2), 'resnet9': (1, 1, 1, 1)}


def create_model(name: str, **kwargs) -> ResNet:
  """Builds `resnet18` or `resnet9` with the given ResNet attributes."""
  if name not in STAGE_SIZES:
    raise ValueError(f'model.name must be one of {sorted(STAGE_SIZES)}, got {name!r}')
  return ResNet(stage_sizes=STAGE_SIZES[name], **kwargs)
