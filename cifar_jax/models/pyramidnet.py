"""PyramidNet (Han et al. 2017) with ShakeDrop (Yamada et al. 2018), as `dyhan0920/PyramidNet-PyTorch` and
Google's `flax_models/cifar` (copied into `google-research/sam`) build it.

A 3x3 stem of 16 channels and BatchNorm, three stages of n blocks (basic: depth = 6n + 2; bottleneck:
9n + 2) whose width grows by alpha / 3n a block (rounded, as both references do), a final BN-ReLU, global
average pool and fc (bias zeroed). Basic block: BN-conv3x3-BN-ReLU-conv3x3-BN; bottleneck:
BN-conv1x1-BN-ReLU-conv3x3-BN-ReLU-conv1x1(x4)-BN; ShakeDrop on the branch with p_l falling linearly from
block 1 to p_last at block L (`shake.shakedrop_probability`); the shortcut is a 2x2 average pool when the
block strides, then zero channels padded on.
"""

import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from cifar_jax.models import layers
from cifar_jax.models import shake

STEM_WIDTH = 16
BLOCKS = {'basic': (6, 1), 'bottleneck': (9, 4)}  # block -> (layers per block x 3 stages, expansion)

ModuleDef = Any


def blocks_per_stage(depth: int, block: str) -> int:
  """n of a PyramidNet of `depth` with `block`s; a ValueError when that depth cannot be built."""
  if block not in BLOCKS:
    raise ValueError(f"PyramidNet block must be one of {sorted(BLOCKS)}, got {block!r}")
  per = BLOCKS[block][0]
  if depth < per + 2 or (depth - 2) % per:
    raise ValueError(f'a {block} PyramidNet needs depth = {per}n + 2 (n >= 1), got {depth}')
  return (depth - 2) // per


class PyramidBlock(nn.Module):
  """A basic or bottleneck pyramidal block with ShakeDrop on its branch."""

  features: int  # the branch's width (the output has features * expansion channels)
  strides: int
  block: str
  conv: ModuleDef
  norm: ModuleDef
  shakedrop: ModuleDef | None  # None: the plain PyramidNet (p_last = 1)

  @nn.compact
  def __call__(self, x, train: bool):
    expansion = BLOCKS[self.block][1]
    y = self.norm(name='bn1')(x)
    if self.block == 'basic':
      y = layers.conv3x3(self.conv, self.features, self.strides, 'conv1')(y)
      y = nn.relu(self.norm(name='bn2')(y))
      y = layers.conv3x3(self.conv, self.features, 1, 'conv2')(y)
      y = self.norm(name='bn3')(y)
    else:
      no_pad = ((0, 0), (0, 0))
      y = self.conv(self.features, (1, 1), padding=no_pad, name='conv1')(y)
      y = nn.relu(self.norm(name='bn2')(y))
      y = layers.conv3x3(self.conv, self.features, self.strides, 'conv2')(y)
      y = nn.relu(self.norm(name='bn3')(y))
      y = self.conv(self.features * expansion, (1, 1), padding=no_pad, name='conv3')(y)
      y = self.norm(name='bn4')(y)
    if self.shakedrop is not None:
      y = self.shakedrop(name='shakedrop')(y, train)
    if self.strides != 1:
      x = nn.avg_pool(x, (2, 2), (2, 2))
    pad = y.shape[-1] - x.shape[-1]
    if pad:
      x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, pad)))
    return x + y


class PyramidNet(nn.Module):
  """PyramidNet-`depth` (alpha `alpha`) with `block`s and ShakeDrop (p_L = `shakedrop_p_last`; 1: none)."""

  depth: int = 110
  alpha: float = 270.0
  block: str = 'basic'
  num_classes: int = 10
  shakedrop_p_last: float = 0.5
  shakedrop_level: str = 'image'
  dtype: Any = jnp.float32
  bn_momentum: float = layers.BN_MOMENTUM
  axis_name: str | None = None
  conv_impl: str = 'xla'
  bn_impl: str = 'xla'

  def widths(self) -> list[int]:
    """Each block's branch width, in order: 16 + l * alpha / 3n, l = 1..3n, rounded."""
    total = 3 * blocks_per_stage(self.depth, self.block)
    widths, width = [], float(STEM_WIDTH)
    for _ in range(total):
      width += self.alpha / total  # summed in floats, as both references do, then rounded
      widths.append(int(round(width)))
    return widths

  @nn.compact
  def __call__(self, x, train: bool = True):
    n = blocks_per_stage(self.depth, self.block)
    conv = layers.conv_module(self.conv_impl, self.dtype)
    norm = layers.batch_norm(train, self.dtype, self.bn_momentum, self.axis_name, self.bn_impl)
    x = x.astype(self.dtype)
    x = norm(name='bn1')(layers.conv3x3(conv, STEM_WIDTH, 1, 'conv1')(x))
    widths = self.widths()
    for i, features in enumerate(widths):
      stage, block = divmod(i, n)
      shakedrop = None
      if self.shakedrop_p_last < 1.0:
        shakedrop = functools.partial(
            shake.ShakeDrop, p=shake.shakedrop_probability(i + 1, len(widths), self.shakedrop_p_last),
            level=self.shakedrop_level, axis_name=self.axis_name)
      x = PyramidBlock(features, 2 if stage > 0 and block == 0 else 1, self.block, conv, norm, shakedrop,
                       name=f'stage{stage + 1}_{block}')(x, train)
    x = nn.relu(norm(name='bn_final')(x))
    x = jnp.mean(x, axis=(1, 2))
    x = layers.torch_linear(self.num_classes, x.shape[-1], self.dtype, zero_bias=True)(x)
    return x.astype(jnp.float32)
