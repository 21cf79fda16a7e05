"""The torch twin's models, one file per family, and `TORCH_MODELS`, the table that picks one by name
(the names of `cifar_jax.models.MODELS`). Every file imports torch (the torch extra)."""

import functools

from cifar_jax.torch_models import efficientnet_lite
from cifar_jax.torch_models import torchvision_resnet

TORCH_MODELS = {
    'torchvision_resnet18': functools.partial(torchvision_resnet.ResNet, 'resnet18'),
    'torchvision_resnet34': functools.partial(torchvision_resnet.ResNet, 'resnet34'),
    'torchvision_resnet50': functools.partial(torchvision_resnet.ResNet, 'resnet50'),
    'efficientnet_lite0': efficientnet_lite.efficientnet_lite0,
}
