"""The model zoo: one file per family, and `MODELS`, the one table that picks a model by `config.model.name`.

- `resnet.py`: the blog's ResNet18 / ResNet9 (BatchNorm or GroupNorm + WS, optional ShakeDrop);
- `shake_shake.py`: Shake-Shake-26 2xNd (Gastaldi 2017);
- `pyramidnet.py`: PyramidNet with ShakeDrop (Han et al. 2017, Yamada et al. 2018);
- `torchvision_resnet.py`: torchvision's ImageNet ResNet18 / 34 / 50, named as its state dicts are;
- `efficientnet_lite.py`: EfficientNet-Lite0 as the `efficientnet-lite-pytorch` package defines it;
- `shake.py`: the Shake-Shake and ShakeDrop gates; `layers.py`: what the families share.
"""

import functools

from cifar_jax.models import efficientnet_lite
from cifar_jax.models import layers
from cifar_jax.models import pyramidnet
from cifar_jax.models import resnet
from cifar_jax.models import shake  # noqa: F401 (public: models.shake)
from cifar_jax.models import shake_shake
from cifar_jax.models import torchvision_resnet

# The names other modules use, where they have always been.
BN_MOMENTUM = layers.BN_MOMENTUM
NORM_EPSILON = layers.NORM_EPSILON
WS_EPSILON = layers.WS_EPSILON
GROUP_SIZE = layers.GROUP_SIZE
TorchBatchNorm = layers.TorchBatchNorm
standardize_weight = layers.standardize_weight
ResNet = resnet.ResNet
STAGE_SIZES = resnet.STAGE_SIZES
STAGE_WIDTHS = resnet.STAGE_WIDTHS

MODELS = {
    'resnet18': functools.partial(resnet.ResNet, stage_sizes=resnet.STAGE_SIZES['resnet18']),
    'resnet9': functools.partial(resnet.ResNet, stage_sizes=resnet.STAGE_SIZES['resnet9']),
    'shake_shake': shake_shake.ShakeShakeNet,
    'pyramidnet': pyramidnet.PyramidNet,
    'torchvision_resnet18': functools.partial(torchvision_resnet.TorchvisionResNet, arch='resnet18'),
    'torchvision_resnet34': functools.partial(torchvision_resnet.TorchvisionResNet, arch='resnet34'),
    'torchvision_resnet50': functools.partial(torchvision_resnet.TorchvisionResNet, arch='resnet50'),
    'efficientnet_lite0': efficientnet_lite.EfficientNetLite0,
}
RESNETS = tuple(resnet.STAGE_SIZES)  # the names `config.model.width_multiplier`, `norm` apply to
# The families that start from ImageNet weights: resize and normalise on the device, frozen BatchNorm.
PRETRAINED_FAMILIES = ('torchvision_resnet18', 'torchvision_resnet34', 'torchvision_resnet50',
                       'efficientnet_lite0')
# The fine-tuning stages (config.finetune) of the models that have them: (stage names, top-level module
# name -> its stage).
STAGES = {
    **{name: (resnet.STAGES, resnet.stage_of) for name in RESNETS},
    **{name: (torchvision_resnet.STAGES, torchvision_resnet.stage_of) for name in PRETRAINED_FAMILIES[:3]},
    'efficientnet_lite0': (efficientnet_lite.STAGES, efficientnet_lite.stage_of),
}


def create_model(name: str, **kwargs):
  """The model `name` (a key of `MODELS`) with the given attributes."""
  if name not in MODELS:
    raise ValueError(f'model.name must be one of {sorted(MODELS)}, got {name!r}')
  return MODELS[name](**kwargs)
