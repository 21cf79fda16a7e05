"""Shake-Shake-26 2xNd in PyTorch: the twin of `models.shake_shake` (module names equal to the Flax ones, so
`torch_reference.torch_to_flax` ports the weights)."""

import torch
from torch import nn
import torch.nn.functional as F  # noqa: N812 (torch's own name)

from cifar_jax.models import shake_shake
from cifar_jax.torch_models import gates


def init_weights(model: nn.Module) -> None:
  """The lua code's init: convs normal(0, sqrt(2 / (k*k*out))), BN 1 / 0, the Linear's bias 0."""
  for m in model.modules():
    if isinstance(m, nn.Conv2d):
      nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
    elif isinstance(m, nn.BatchNorm2d):
      nn.init.constant_(m.weight, 1)
      nn.init.constant_(m.bias, 0)
    elif isinstance(m, nn.Linear):
      nn.init.constant_(m.bias, 0)


class Branch(nn.Module):
  def __init__(self, inplanes, planes, stride):
    super().__init__()
    self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)

  def forward(self, x):
    y = F.relu(self.bn1(self.conv1(F.relu(x))))
    return self.bn2(self.conv2(y))


class ShakeShakeBlock(nn.Module):
  def __init__(self, inplanes, planes, stride, forward='shake', backward='shake', level='image'):
    super().__init__()
    self.branch1 = Branch(inplanes, planes, stride)
    self.branch2 = Branch(inplanes, planes, stride)
    self.shake = gates.ShakeShake(forward, backward, level)
    self.stride = stride
    self.has_shortcut = inplanes != planes
    if self.has_shortcut:
      self.shortcut_conv1 = nn.Conv2d(inplanes, planes // 2, 1, 1, 0, bias=False)
      self.shortcut_conv2 = nn.Conv2d(inplanes, planes // 2, 1, 1, 0, bias=False)
      self.shortcut_bn = nn.BatchNorm2d(planes)

  def forward(self, x):
    b1, b2 = self.branch1(x), self.branch2(x)
    skip = x
    if self.has_shortcut:
      s = self.stride
      x = F.relu(x)
      shifted = F.pad(x, (1, -1, 1, -1))  # lua's SpatialZeroPadding(1, -1, 1, -1): right and down
      skip = self.shortcut_bn(torch.cat([self.shortcut_conv1(x[:, :, ::s, ::s]),
                                         self.shortcut_conv2(shifted[:, :, ::s, ::s])], dim=1))
    return skip + self.shake(b1, b2)


class TorchShakeShake(nn.Module):
  """Shake-Shake-`depth` 2x`base_width`d."""

  def __init__(self, depth=26, base_width=32, num_classes=10, shake_forward='shake', shake_backward='shake',
               shake_level='image'):
    super().__init__()
    n = shake_shake.blocks_per_stage(depth)
    self.conv1 = nn.Conv2d(3, shake_shake.STEM_WIDTH, 3, 1, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(shake_shake.STEM_WIDTH)
    self.block_names = []
    inplanes = shake_shake.STEM_WIDTH
    for stage, planes in enumerate((base_width, 2 * base_width, 4 * base_width)):
      for block in range(n):
        name = f'stage{stage + 1}_{block}'
        setattr(self, name, ShakeShakeBlock(inplanes, planes, 2 if stage > 0 and block == 0 else 1,
                                            shake_forward, shake_backward, shake_level))
        self.block_names.append(name)
        inplanes = planes
    self.fc = nn.Linear(inplanes, num_classes)
    init_weights(self)

  def forward(self, x):
    x = self.bn1(self.conv1(x))
    for name in self.block_names:
      x = getattr(self, name)(x)
    return self.fc(F.relu(x).mean(dim=(2, 3)))
