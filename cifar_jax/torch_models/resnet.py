"""The blog's CIFAR ResNet in PyTorch (its edited torchvision ResNet), with optional ShakeDrop: the twin of
`models.resnet`."""

import torch
from torch import nn
import torch.nn.functional as F  # noqa: N812 (torch's own name)

from cifar_jax.models import layers
from cifar_jax.models import resnet
from cifar_jax.models import shake
from cifar_jax.torch_models import gates


def stage_widths(width_multiplier: float) -> tuple[int, ...]:
  """The stage widths, rounded exactly as `models.ResNet.widths`."""
  return tuple(max(1, int(round(w * width_multiplier))) for w in resnet.STAGE_WIDTHS)


class WSConv2d(nn.Conv2d):
  """Conv2d whose weight is standardised per output channel on every call (Qiao's PyTorch code)."""

  def forward(self, x):
    w = self.weight
    w = w - w.mean(dim=(1, 2, 3), keepdim=True)
    w = w / (w.std(dim=(1, 2, 3), keepdim=True) + layers.WS_EPSILON)
    return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class BasicBlock(nn.Module):
  """torchvision's BasicBlock; `shakedrop` (a `gates.ShakeDrop`) scales the branch when given."""

  def __init__(self, inplanes, planes, stride, conv, norm, shakedrop=None):
    super().__init__()
    self.conv1 = conv(inplanes, planes, 3, stride, 1, bias=False)
    self.bn1 = norm(planes)
    self.relu = nn.ReLU(inplace=True)
    self.conv2 = conv(planes, planes, 3, 1, 1, bias=False)
    self.bn2 = norm(planes)
    self.shakedrop = shakedrop
    self.downsample = None
    if stride != 1 or inplanes != planes:
      self.downsample = nn.Sequential(conv(inplanes, planes, 1, stride, 0, bias=False), norm(planes))

  def forward(self, x):
    identity = x if self.downsample is None else self.downsample(x)
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    if self.shakedrop is not None:
      out = self.shakedrop(out)
    return self.relu(out + identity)


class TorchResNet(nn.Module):
  """The blog's CIFAR ResNet: torchvision's layout, 3x3 stride-1 stem, no max-pool."""

  def __init__(self, stage_sizes=(2, 2, 2, 2), num_classes=10, width_multiplier=1.0, norm='batch',
               zero_init_residual=False, shakedrop_p_last=1.0, shakedrop_level='image'):
    super().__init__()
    if norm == 'batch':
      conv, norm_layer = nn.Conv2d, nn.BatchNorm2d
    elif norm == 'group_ws':
      conv = WSConv2d
      norm_layer = lambda c: nn.GroupNorm(c // layers.GROUP_SIZE, c, eps=layers.NORM_EPSILON)
    else:
      raise ValueError(f"model.norm must be 'batch' or 'group_ws', got {norm!r}")
    widths = stage_widths(width_multiplier)
    self.conv1 = conv(3, widths[0], 3, 1, 1, bias=False)
    self.bn1 = norm_layer(widths[0])
    self.relu = nn.ReLU(inplace=True)
    inplanes, num_blocks, index = widths[0], sum(stage_sizes), 0
    for stage, (stage_blocks, planes) in enumerate(zip(stage_sizes, widths)):
      blocks = []
      for block in range(stage_blocks):
        index += 1
        stride = 2 if stage > 0 and block == 0 else 1
        shakedrop = None
        if shakedrop_p_last < 1.0:
          shakedrop = gates.ShakeDrop(shake.shakedrop_probability(index, num_blocks, shakedrop_p_last),
                                      shakedrop_level)
        blocks.append(BasicBlock(inplanes, planes, stride, conv, norm_layer, shakedrop))
        inplanes = planes
      setattr(self, f'layer{stage + 1}', nn.Sequential(*blocks))
    self.num_stages = len(stage_sizes)
    self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
    self.fc = nn.Linear(widths[-1], num_classes)

    for m in self.modules():
      if isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
      elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
        nn.init.constant_(m.weight, 1)
        nn.init.constant_(m.bias, 0)
    if zero_init_residual:
      for m in self.modules():
        if isinstance(m, BasicBlock):
          nn.init.constant_(m.bn2.weight, 0)

  def forward(self, x):
    x = self.relu(self.bn1(self.conv1(x)))
    for stage in range(self.num_stages):
      x = getattr(self, f'layer{stage + 1}')(x)
    return self.fc(torch.flatten(self.avgpool(x), 1))
