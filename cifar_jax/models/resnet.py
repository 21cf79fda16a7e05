"""The blog's CIFAR ResNets in Flax: ResNet18/ResNet9 with BatchNorm (torch semantics) or GroupNorm + WS,
optionally with ShakeDrop on each residual branch.

Layout follows the blog's edited copy of torchvision's `resnet.py` (blog.md, "Model"): a 3x3 stride-1 stem
without max-pool, BasicBlocks with a 1x1 conv + norm shortcut on a shape change, global average pool, fc.
Module names mirror torch's (`conv1`, `bn1`, `layer2_0/downsample_conv`, `fc`) so weights port one to one.
"""

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from cifar_jax.models import layers
from cifar_jax.models import shake

STAGE_WIDTHS = (64, 128, 256, 512)
STAGE_SIZES = {'resnet18': (2, 2, 2, 2), 'resnet9': (1, 1, 1, 1)}
NORMS = ('batch', 'group_ws')
STAGES = ('stem', 'layer1', 'layer2', 'layer3', 'layer4', 'head')

ModuleDef = Any


def stage_of(top_name: str) -> str:
  """The fine-tuning stage of a top-level module: stem, layer1..layer4, head."""
  if top_name in ('conv1', 'bn1'):
    return 'stem'
  return 'head' if top_name == 'fc' else top_name.split('_')[0]


class BasicBlock(nn.Module):
  """torchvision's BasicBlock: two 3x3 convs, identity or 1x1 conv + norm shortcut; with `shakedrop_p`
  below 1, ShakeDrop scales the branch before the sum."""

  features: int
  strides: int
  conv: ModuleDef
  norm: ModuleDef
  zero_init_residual: bool = False
  shakedrop: ModuleDef | None = None  # a `shake.ShakeDrop` with its p bound, or None

  @nn.compact
  def __call__(self, x, train: bool = True):
    y = layers.conv3x3(self.conv, self.features, self.strides, 'conv1')(x)
    y = self.norm(name='bn1', relu=True)(y)
    y = layers.conv3x3(self.conv, self.features, 1, 'conv2')(y)
    last_scale = nn.initializers.zeros if self.zero_init_residual else nn.initializers.ones
    y = self.norm(scale_init=last_scale, name='bn2')(y)
    if self.shakedrop is not None:
      y = self.shakedrop(name='shakedrop')(y, train)
    residual = x
    if x.shape[-1] != self.features or self.strides != 1:
      residual = self.conv(self.features, (1, 1), (self.strides, self.strides),
                           padding=((0, 0), (0, 0)), name='downsample_conv')(x)
      residual = self.norm(name='downsample_bn')(residual)
    return nn.relu(residual + y)


class ResNet(nn.Module):
  """CIFAR ResNet; `norm` is 'batch' (BatchNorm, torch semantics) or 'group_ws' (GroupNorm + WS).

  `shakedrop_p_last` < 1 adds ShakeDrop to every block's branch, p_l falling linearly to it
  (`shake.shakedrop_probability`); 1.0 (the default) leaves the blocks as the blog's.
  """

  stage_sizes: Sequence[int]
  num_classes: int = 10
  width_multiplier: float = 1.0
  norm: str = 'batch'
  zero_init_residual: bool = False
  dtype: Any = jnp.float32
  bn_momentum: float = layers.BN_MOMENTUM
  axis_name: str | None = None
  # 'xla' (lax.conv_general_dilated) or 'onednn' (onednn_conv, XLA:CPU only); same params, same math.
  conv_impl: str = 'xla'
  # 'xla' (layers.batch_norm_train) or 'onednn' (onednn_conv.batch_norm_train, XLA:CPU only).
  bn_impl: str = 'xla'
  shakedrop_p_last: float = 1.0
  shakedrop_level: str = 'image'
  frozen_bn: bool = False  # BatchNorm normalises with and keeps its running statistics, in training too

  def widths(self) -> tuple[int, ...]:
    return tuple(max(1, int(round(w * self.width_multiplier))) for w in STAGE_WIDTHS)

  @nn.compact
  def __call__(self, x, train: bool = True):
    if self.norm == 'batch':
      conv_cls = nn.Conv
      norm = layers.batch_norm(train and not self.frozen_bn, self.dtype, self.bn_momentum, self.axis_name,
                              self.bn_impl)
    elif self.norm == 'group_ws':
      conv_cls = layers.StdConv
      # torch's nn.GroupNorm(C // 4, C): biased two-pass variance, eps 1e-5.
      norm = functools.partial(layers.with_relu, functools.partial(
          nn.GroupNorm, num_groups=None, group_size=layers.GROUP_SIZE, epsilon=layers.NORM_EPSILON,
          use_fast_variance=False, dtype=self.dtype))
    else:
      raise ValueError(f"model.norm must be 'batch' or 'group_ws', got {self.norm!r}")
    conv = layers.conv_module(self.conv_impl, self.dtype, conv_cls)

    widths = self.widths()
    num_blocks, block_index = sum(self.stage_sizes), 0
    x = x.astype(self.dtype)
    x = layers.conv3x3(conv, widths[0], 1, 'conv1')(x)
    x = norm(name='bn1', relu=True)(x)
    for stage, (stage_blocks, features) in enumerate(zip(self.stage_sizes, widths)):
      for block in range(stage_blocks):
        block_index += 1
        strides = 2 if stage > 0 and block == 0 else 1
        shakedrop = None
        if self.shakedrop_p_last < 1.0:
          shakedrop = functools.partial(
              shake.ShakeDrop, p=shake.shakedrop_probability(block_index, num_blocks, self.shakedrop_p_last),
              level=self.shakedrop_level, axis_name=self.axis_name)
        x = BasicBlock(features, strides, conv=conv, norm=norm, zero_init_residual=self.zero_init_residual,
                       shakedrop=shakedrop, name=f'layer{stage + 1}_{block}')(x, train)
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=layers.dense_kernel_init,
                 bias_init=layers.dense_bias_init(widths[-1]), name='fc')(x)
    return x.astype(jnp.float32)
