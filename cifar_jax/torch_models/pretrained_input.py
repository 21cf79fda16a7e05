"""The torch twin of `models.layers.pretrained_input`: CIFAR-normalised NCHW images -> resized, normalised
as the pretrained weights expect."""

import torch
import torch.nn.functional as F

from cifar_jax.models import layers


def pretrained_input(x: torch.Tensor, image_size: int, normalization: str) -> torch.Tensor:
  """Eval mode's transform (and training's without BiT's random crop): bilinear resize to `image_size`."""
  mean = torch.tensor(layers.CIFAR_MEAN_RGB).view(1, 3, 1, 1)
  std = torch.tensor(layers.CIFAR_STD_RGB).view(1, 3, 1, 1)
  x = x * std + mean
  if image_size and image_size != x.shape[-1]:
    x = F.interpolate(x, size=(image_size, image_size), mode='bilinear', align_corners=False,
                      antialias=False)
  new_mean, new_std = (torch.tensor(v).view(1, 3, 1, 1) for v in layers.NORMALIZATIONS[normalization])
  return (x - new_mean) / new_std
