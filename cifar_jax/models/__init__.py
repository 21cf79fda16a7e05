"""The model zoo: one file per family, and `MODELS`, the one table that picks a model by `config.model.name`.

- `resnet.py`: the blog's ResNet18 / ResNet9 (BatchNorm or GroupNorm + WS, optional ShakeDrop);
- `shake_shake.py`: Shake-Shake-26 2xNd (Gastaldi 2017);
- `pyramidnet.py`: PyramidNet with ShakeDrop (Han et al. 2017, Yamada et al. 2018);
- `shake.py`: the Shake-Shake and ShakeDrop gates; `layers.py`: what the families share.
"""

import functools

from cifar_jax.models import layers
from cifar_jax.models import pyramidnet
from cifar_jax.models import resnet
from cifar_jax.models import shake  # noqa: F401 (public: models.shake)
from cifar_jax.models import shake_shake

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
}
RESNETS = tuple(resnet.STAGE_SIZES)  # the names `config.model.width_multiplier`, `norm` apply to


def create_model(name: str, **kwargs):
  """The model `name` (a key of `MODELS`) with the given attributes."""
  if name not in MODELS:
    raise ValueError(f'model.name must be one of {sorted(MODELS)}, got {name!r}')
  return MODELS[name](**kwargs)
