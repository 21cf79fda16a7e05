"""Shake-Shake-26 2xNd (Gastaldi 2017), as `xgastaldi/shake-shake`'s `shakeshake.lua` builds it.

A 3x3 stem of 16 channels and BatchNorm (no ReLU: each branch starts with one), three stages of
(depth - 2) / 6 blocks of widths N, 2N, 4N, ReLU, global average pool, fc (bias zeroed). A block is
`skip + a*branch1 + (1-a)*branch2` (`shake.ShakeShake`), each branch ReLU-conv3x3-BN-ReLU-conv3x3-BN; when
the width changes the skip is ReLU, then two 1x1 convolutions of N/2 channels each, one on the input
subsampled by the stride and one on the input shifted one pixel right and down (lua's
`SpatialZeroPadding(1, -1, 1, -1)`) and subsampled, concatenated, then BatchNorm.
"""

import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from cifar_jax.models import layers
from cifar_jax.models import shake

STEM_WIDTH = 16

ModuleDef = Any


def blocks_per_stage(depth: int) -> int:
  """n of Shake-Shake-`depth` (depth = 6n + 2); a ValueError when that depth cannot be built."""
  if depth < 8 or (depth - 2) % 6:
    raise ValueError(f'Shake-Shake needs depth = 6n + 2 (8, 14, 20, 26, ...), got {depth}')
  return (depth - 2) // 6


class Branch(nn.Module):
  """ReLU-conv3x3-BN-ReLU-conv3x3-BN."""

  features: int
  strides: int
  conv: ModuleDef
  norm: ModuleDef

  @nn.compact
  def __call__(self, x):
    y = layers.conv3x3(self.conv, self.features, self.strides, 'conv1')(nn.relu(x))
    y = nn.relu(self.norm(name='bn1')(y))
    y = layers.conv3x3(self.conv, self.features, 1, 'conv2')(y)
    return self.norm(name='bn2')(y)


class ShakeShakeBlock(nn.Module):
  """Two branches mixed by `shake.ShakeShake`, plus the identity or the two-path shortcut."""

  features: int
  strides: int
  conv: ModuleDef
  norm: ModuleDef
  mix: ModuleDef  # shake.ShakeShake with its modes bound

  @nn.compact
  def __call__(self, x, train: bool):
    b1 = Branch(self.features, self.strides, self.conv, self.norm, name='branch1')(x)
    b2 = Branch(self.features, self.strides, self.conv, self.norm, name='branch2')(x)
    skip = x
    if x.shape[-1] != self.features:
      s = self.strides
      x = nn.relu(x)
      # Path 2 sees the pixels path 1 skips: the input moved one pixel right and down, zeros entering.
      shifted = jnp.pad(x, ((0, 0), (1, 0), (1, 0), (0, 0)))[:, :-1, :-1, :]
      one_by_one = lambda name: self.conv(self.features // 2, (1, 1), padding=((0, 0), (0, 0)), name=name)
      path1 = one_by_one('shortcut_conv1')(x[:, ::s, ::s, :])
      path2 = one_by_one('shortcut_conv2')(shifted[:, ::s, ::s, :])
      skip = self.norm(name='shortcut_bn')(jnp.concatenate([path1, path2], axis=-1))
    return skip + self.mix(name='shake')(b1, b2, train)


class ShakeShakeNet(nn.Module):
  """Shake-Shake-`depth` 2x`base_width`d for CIFAR; `shake_*` are `shake.ShakeShake`'s modes."""

  depth: int = 26
  base_width: int = 32
  num_classes: int = 10
  shake_forward: str = 'shake'
  shake_backward: str = 'shake'
  shake_level: str = 'image'
  dtype: Any = jnp.float32
  bn_momentum: float = layers.BN_MOMENTUM
  axis_name: str | None = None
  conv_impl: str = 'xla'
  bn_impl: str = 'xla'

  @nn.compact
  def __call__(self, x, train: bool = True):
    n = blocks_per_stage(self.depth)
    conv = layers.conv_module(self.conv_impl, self.dtype)
    norm = layers.batch_norm(train, self.dtype, self.bn_momentum, self.axis_name, self.bn_impl)
    mix = functools.partial(shake.ShakeShake, forward=self.shake_forward, backward=self.shake_backward,
                            level=self.shake_level, axis_name=self.axis_name)
    x = x.astype(self.dtype)
    x = norm(name='bn1')(layers.conv3x3(conv, STEM_WIDTH, 1, 'conv1')(x))
    widths = (self.base_width, 2 * self.base_width, 4 * self.base_width)
    for stage, features in enumerate(widths):
      for block in range(n):
        strides = 2 if stage > 0 and block == 0 else 1
        x = ShakeShakeBlock(
            features, strides, conv, norm,
            mix=mix,
            name=f'stage{stage + 1}_{block}')(x, train)
    x = jnp.mean(nn.relu(x), axis=(1, 2))
    x = layers.torch_linear(self.num_classes, widths[-1], self.dtype, zero_bias=True)(x)
    return x.astype(jnp.float32)
