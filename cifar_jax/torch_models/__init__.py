"""The torch twin's models, one file per family beside `cifar_jax/models/`'s, and `TORCH_MODELS`, the table
by `config.model.name` (the names of `cifar_jax.models.MODELS`). Module names equal the Flax models' for the
CIFAR families (`torch_reference.torch_to_flax` maps them) and torchvision's / the package's for the
pretrained ones (`pretrained.py` maps those). Importing this package imports torch: `torch_reference`
imports it where it is used.
"""

import functools

from cifar_jax.models import resnet as flax_resnet
from cifar_jax.torch_models import efficientnet_lite
from cifar_jax.torch_models import pyramidnet
from cifar_jax.torch_models import resnet
from cifar_jax.torch_models import shake_shake
from cifar_jax.torch_models import torchvision_resnet

TORCH_MODELS = {
    'resnet18': functools.partial(resnet.TorchResNet, stage_sizes=flax_resnet.STAGE_SIZES['resnet18']),
    'resnet9': functools.partial(resnet.TorchResNet, stage_sizes=flax_resnet.STAGE_SIZES['resnet9']),
    'shake_shake': shake_shake.TorchShakeShake,
    'pyramidnet': pyramidnet.TorchPyramidNet,
    'torchvision_resnet18': functools.partial(torchvision_resnet.ResNet, 'resnet18'),
    'torchvision_resnet34': functools.partial(torchvision_resnet.ResNet, 'resnet34'),
    'torchvision_resnet50': functools.partial(torchvision_resnet.ResNet, 'resnet50'),
    'efficientnet_lite0': efficientnet_lite.efficientnet_lite0,
}


def create_torch_model(name: str, **kwargs):
  """The torch model `name` (a key of `TORCH_MODELS`) with the given arguments."""
  if name not in TORCH_MODELS:
    raise ValueError(f'model.name must be one of {sorted(TORCH_MODELS)}, got {name!r}')
  return TORCH_MODELS[name](**kwargs)
