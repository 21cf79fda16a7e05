"""PyramidNet with ShakeDrop in PyTorch: the twin of `models.pyramidnet` (module names equal to the Flax
ones)."""

from torch import nn
import torch.nn.functional as F  # noqa: N812 (torch's own name)

from cifar_jax.models import pyramidnet
from cifar_jax.models import shake
from cifar_jax.torch_models import gates
from cifar_jax.torch_models import shake_shake


class PyramidBlock(nn.Module):
  def __init__(self, inplanes, planes, stride, block, shakedrop):
    super().__init__()
    self.block, self.stride = block, stride
    expansion = pyramidnet.BLOCKS[block][1]
    self.bn1 = nn.BatchNorm2d(inplanes)
    if block == 'basic':
      self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
      self.bn2 = nn.BatchNorm2d(planes)
      self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
      self.bn3 = nn.BatchNorm2d(planes)
    else:
      self.conv1 = nn.Conv2d(inplanes, planes, 1, 1, 0, bias=False)
      self.bn2 = nn.BatchNorm2d(planes)
      self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
      self.bn3 = nn.BatchNorm2d(planes)
      self.conv3 = nn.Conv2d(planes, planes * expansion, 1, 1, 0, bias=False)
      self.bn4 = nn.BatchNorm2d(planes * expansion)
    self.shakedrop = shakedrop

  def forward(self, x):
    y = self.conv1(self.bn1(x))
    y = self.conv2(F.relu(self.bn2(y)))
    y = self.bn3(y)
    if self.block == 'bottleneck':
      y = self.bn4(self.conv3(F.relu(y)))
    if self.shakedrop is not None:
      y = self.shakedrop(y)
    if self.stride != 1:
      x = F.avg_pool2d(x, 2, 2)
    pad = y.shape[1] - x.shape[1]
    if pad:
      x = F.pad(x, (0, 0, 0, 0, 0, pad))
    return x + y


class TorchPyramidNet(nn.Module):
  """PyramidNet-`depth` (alpha) with `block`s and ShakeDrop (p_L = `shakedrop_p_last`)."""

  def __init__(self, depth=110, alpha=270.0, block='basic', num_classes=10, shakedrop_p_last=0.5,
               shakedrop_level='image'):
    super().__init__()
    spec = pyramidnet.PyramidNet(depth=depth, alpha=alpha, block=block)
    n, widths = pyramidnet.blocks_per_stage(depth, block), spec.widths()
    expansion = pyramidnet.BLOCKS[block][1]
    self.conv1 = nn.Conv2d(3, pyramidnet.STEM_WIDTH, 3, 1, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(pyramidnet.STEM_WIDTH)
    self.block_names = []
    inplanes = pyramidnet.STEM_WIDTH
    for i, planes in enumerate(widths):
      stage, index = divmod(i, n)
      name = f'stage{stage + 1}_{index}'
      shakedrop = None
      if shakedrop_p_last < 1.0:
        shakedrop = gates.ShakeDrop(shake.shakedrop_probability(i + 1, len(widths), shakedrop_p_last),
                                    shakedrop_level)
      setattr(self, name, PyramidBlock(inplanes, planes, 2 if stage > 0 and index == 0 else 1, block,
                                       shakedrop))
      self.block_names.append(name)
      inplanes = planes * expansion
    self.bn_final = nn.BatchNorm2d(inplanes)
    self.fc = nn.Linear(inplanes, num_classes)
    shake_shake.init_weights(self)

  def forward(self, x):
    x = self.bn1(self.conv1(x))
    for name in self.block_names:
      x = getattr(self, name)(x)
    return self.fc(F.relu(self.bn_final(x)).mean(dim=(2, 3)))
