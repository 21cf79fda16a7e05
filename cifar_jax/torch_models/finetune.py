"""The torch twin's fine-tuning, as the JAX trainer does it: a pretrained family behind the same input
transform (`PretrainedInput`), `config.init_from` read by `pretrained.py` (the same file, every key, the head
zeroed), the stage groups of `builders.param_groups` as SGD param groups (frozen stages without gradients),
frozen BatchNorm, and torch's `clip_grad_norm_` (`torch_reference.train_and_evaluate_torch` calls these)."""

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

from cifar_jax import builders
from cifar_jax import models
from cifar_jax import pretrained
from cifar_jax.errors import ConfigError
from cifar_jax.models import layers
from cifar_jax.torch_models import TORCH_MODELS


class PretrainedInput(nn.Module):
  """`model` after `layers.pretrained_input`'s transform: CIFAR-normalised NCHW in, resized (BiT's random
  crop in training when resize_size > image_size), normalised as the weights expect."""

  def __init__(self, model: nn.Module, image_size: int, resize_size: int, normalization: str):
    super().__init__()
    self.model = model
    self.image_size, self.resize_size, self.normalization = image_size, resize_size, normalization
    mean, std = layers.NORMALIZATIONS[normalization]
    self.register_buffer('cifar_mean', torch.tensor(layers.CIFAR_MEAN_RGB).view(1, 3, 1, 1), persistent=False)
    self.register_buffer('cifar_std', torch.tensor(layers.CIFAR_STD_RGB).view(1, 3, 1, 1), persistent=False)
    self.register_buffer('mean', torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
    self.register_buffer('std', torch.tensor(std).view(1, 3, 1, 1), persistent=False)

  def forward(self, x):
    x = x * self.cifar_std + self.cifar_mean
    size = self.image_size or x.shape[-1]
    if self.training and self.resize_size > size:
      x = F.interpolate(x, size=(self.resize_size,) * 2, mode='bilinear', align_corners=False)
      offsets = torch.randint(0, self.resize_size - size + 1, (x.shape[0], 2))
      x = torch.stack([im[:, i:i + size, j:j + size] for im, (i, j) in zip(x, offsets.tolist())])
    elif size != x.shape[-1]:
      x = F.interpolate(x, size=(size, size), mode='bilinear', align_corners=False)
    return self.model((x - self.mean) / self.std)


def pretrained_input(x: torch.Tensor, image_size: int, normalization: str) -> torch.Tensor:
  """`PretrainedInput`'s eval transform alone (CIFAR-normalised NCHW in)."""
  return PretrainedInput(nn.Identity(), image_size, 0, normalization).eval()(x)


def create_model(model_config, num_classes: int) -> PretrainedInput:
  """The torch twin of `builders.create_model` for a pretrained family."""
  kwargs = {}
  if model_config.name == 'efficientnet_lite0':
    kwargs = dict(dropout_rate=model_config.dropout_rate, drop_connect_rate=model_config.drop_connect_rate)
  model = TORCH_MODELS[model_config.name](num_classes=num_classes, **kwargs)
  return PretrainedInput(model, model_config.image_size, model_config.resize_size,
                         builders.normalization(model_config))


def load_init_from(model: PretrainedInput, config, num_classes: int = 10) -> None:
  """`config.init_from` into `model.model`, mapped (and checked) exactly as the JAX trainer maps it."""
  layout = config.init_from.layout
  if layout == 'cifar_jax':
    raise ConfigError('init_from.layout=cifar_jax: the torch twin reads torchvision_resnet, timm_resnet or '
                      'efficientnet_lite files')
  loaded, zeroed = pretrained.load(config, num_classes)
  state_dict = {}
  for (collection, path), value in loaded.items():
    state_dict[pretrained.flax_to_key(layout, collection, path)] = torch.from_numpy(
        np.ascontiguousarray(pretrained.to_torch_layout(value, layout)))
  own = model.model.state_dict()
  for collection, path in zeroed:
    key = pretrained.flax_to_key(layout, collection, path)
    state_dict[key] = torch.zeros_like(own[key])
  missing, unexpected = model.model.load_state_dict(state_dict, strict=False)
  assert not unexpected and all(k.endswith('num_batches_tracked') for k in missing), (missing, unexpected)


def stage_of_key(model_name: str, key: str) -> str:
  """The fine-tuning stage of a torch parameter (`layer2.0.conv1.weight`, `_blocks.3._bn1.bias`)."""
  parts = key.split('.')
  top = parts[0].lstrip('_')
  if parts[1].isdigit():
    top = f'{top}_{parts[1]}'
  return models.STAGES[model_name][1](top)


def create_optimizer(model: nn.Module, config) -> torch.optim.SGD:
  """SGD with a param group per stage of `builders.param_groups` (lr times its multiplier, weight decay on
  or off); the frozen stages' parameters get no gradient."""
  opt = config.optimizer
  _, groups = builders.param_groups(config)
  inner = model.model if isinstance(model, PretrainedInput) else model
  by_stage = {}
  for key, param in inner.named_parameters():
    stage = stage_of_key(config.model.name, key) if config.model.name in models.STAGES else 'all'
    if stage not in groups:
      param.requires_grad_(False)
      continue
    by_stage.setdefault(stage, []).append(param)
  param_groups = [{'params': params, 'lr': opt.lr * groups[stage][0],
                   'weight_decay': opt.weight_decay if groups[stage][1] else 0.0}
                  for stage, params in by_stage.items()]
  return torch.optim.SGD(param_groups, lr=opt.lr, momentum=opt.momentum, nesterov=opt.nesterov)


def set_train_mode(model: nn.Module, frozen_bn: bool) -> None:
  """model.train(), with every BatchNorm in eval mode (running statistics used and kept) when frozen."""
  model.train()
  if frozen_bn:
    for module in model.modules():
      if isinstance(module, nn.modules.batchnorm._BatchNorm):
        module.eval()


def clip_gradients(model: nn.Module, max_norm: float) -> None:
  """torch's clip_grad_norm_ over the trained parameters (0: off)."""
  if max_norm > 0:
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], max_norm)
