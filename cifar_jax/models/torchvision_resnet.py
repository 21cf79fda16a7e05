"""torchvision's ImageNet ResNet18 / 34 / 50 in Flax, named so torchvision's and timm's state-dict keys map
one to one (`pretrained.py`): `layer2.0.downsample.1.running_mean` is `layer2_0/downsample_1`'s `mean`.

ImageNet stem (7x7 stride-2 conv, BatchNorm, ReLU, 3x3 stride-2 max-pool), BasicBlock (18, 34) or
torchvision's Bottleneck (50: the stride on the 3x3 conv, "ResNet v1.5"), global average pool, `fc`.
Parameter counts with the 1000-class head: 11,689,512 / 21,797,672 / 25,557,032 (tests/test_pretrained.py).
The input goes through `layers.pretrained_input` (resize, ImageNet normalisation) first.
"""

import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from cifar_jax.models import layers

STAGE_WIDTHS = (64, 128, 256, 512)
# name -> (blocks per stage, bottleneck)
ARCHS = {'resnet18': ((2, 2, 2, 2), False), 'resnet34': ((3, 4, 6, 3), False),
         'resnet50': ((3, 4, 6, 3), True)}
EXPANSION = 4  # Bottleneck's output width over its 3x3 conv's

ModuleDef = Any


def stage_of(top_name: str) -> str:
  """The fine-tuning stage of a top-level module: stem, layer1..layer4, head."""
  if top_name in ('conv1', 'bn1'):
    return 'stem'
  return 'head' if top_name == 'fc' else top_name.split('_')[0]


STAGES = ('stem', 'layer1', 'layer2', 'layer3', 'layer4', 'head')


class BasicBlock(nn.Module):
  """torchvision's BasicBlock."""

  features: int
  strides: int
  conv: ModuleDef
  norm: ModuleDef

  @nn.compact
  def __call__(self, x):
    y = layers.conv3x3(self.conv, self.features, self.strides, 'conv1')(x)
    y = self.norm(name='bn1', relu=True)(y)
    y = layers.conv3x3(self.conv, self.features, 1, 'conv2')(y)
    y = self.norm(name='bn2')(y)
    return nn.relu(_shortcut(self, x, self.features) + y)


class Bottleneck(nn.Module):
  """torchvision's Bottleneck: 1x1, 3x3 (strided), 1x1 to 4x the width."""

  features: int
  strides: int
  conv: ModuleDef
  norm: ModuleDef

  @nn.compact
  def __call__(self, x):
    y = self.conv(self.features, (1, 1), padding=((0, 0), (0, 0)), name='conv1')(x)
    y = self.norm(name='bn1', relu=True)(y)
    y = layers.conv3x3(self.conv, self.features, self.strides, 'conv2')(y)
    y = self.norm(name='bn2', relu=True)(y)
    y = self.conv(self.features * EXPANSION, (1, 1), padding=((0, 0), (0, 0)), name='conv3')(y)
    y = self.norm(name='bn3')(y)
    return nn.relu(_shortcut(self, x, self.features * EXPANSION) + y)


def _shortcut(block: nn.Module, x, features: int):
  """Identity, or torchvision's `downsample` (1x1 strided conv, BatchNorm) on a shape change."""
  if x.shape[-1] == features and block.strides == 1:
    return x
  y = block.conv(features, (1, 1), (block.strides, block.strides), padding=((0, 0), (0, 0)),
                 name='downsample_0')(x)
  return block.norm(name='downsample_1')(y)


class TorchvisionResNet(nn.Module):
  """torchvision.models.resnet18 / 34 / 50 (`arch`); `frozen_bn`: every BatchNorm uses and keeps its running
  statistics, also in training (a frozen backbone's)."""

  arch: str = 'resnet50'
  num_classes: int = 10
  dtype: Any = jnp.float32
  axis_name: str | None = None
  conv_impl: str = 'xla'
  bn_impl: str = 'xla'
  frozen_bn: bool = False
  image_size: int = 0  # 0: as the data comes (32 px)
  resize_size: int = 0  # > image_size: training resizes to this and crops image_size (BiT)
  normalization: str = 'imagenet'

  @nn.compact
  def __call__(self, x, train: bool = True):
    stage_sizes, bottleneck = ARCHS[self.arch]
    conv = layers.conv_module(self.conv_impl, self.dtype)
    norm = layers.batch_norm(train and not self.frozen_bn, self.dtype, axis_name=self.axis_name,
                             impl=self.bn_impl)
    block_cls = Bottleneck if bottleneck else BasicBlock
    x = layers.pretrained_input(x, train=train, image_size=self.image_size, resize_size=self.resize_size,
                                normalization=self.normalization,
                                crop_key=functools.partial(self.make_rng, 'shake'))
    x = x.astype(self.dtype)
    x = conv(STAGE_WIDTHS[0], (7, 7), (2, 2), padding=((3, 3), (3, 3)), name='conv1')(x)
    x = norm(name='bn1', relu=True)(x)
    x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
    for stage, (blocks, features) in enumerate(zip(stage_sizes, STAGE_WIDTHS)):
      for block in range(blocks):
        strides = 2 if stage > 0 and block == 0 else 1
        x = block_cls(features, strides, conv=conv, norm=norm, name=f'layer{stage + 1}_{block}')(x)
    x = jnp.mean(x, axis=(1, 2))
    fan_in = STAGE_WIDTHS[-1] * (EXPANSION if bottleneck else 1)
    x = layers.torch_linear(self.num_classes, fan_in, self.dtype, name='fc')(x)
    return x.astype(jnp.float32)

