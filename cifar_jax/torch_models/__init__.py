"""The torch twin's models, one file per family beside `cifar_jax/models/`'s, and `TORCH_MODELS`, the table
by `config.model.name`. Module names equal the Flax models' (`torch_reference.torch_to_flax` maps them).
Importing this package imports torch: `torch_reference` imports it where it is used.
"""

import functools

from cifar_jax.models import resnet as flax_resnet
from cifar_jax.torch_models import pyramidnet
from cifar_jax.torch_models import resnet
from cifar_jax.torch_models import shake_shake

TORCH_MODELS = {
    'resnet18': functools.partial(resnet.TorchResNet, stage_sizes=flax_resnet.STAGE_SIZES['resnet18']),
    'resnet9': functools.partial(resnet.TorchResNet, stage_sizes=flax_resnet.STAGE_SIZES['resnet9']),
    'shake_shake': shake_shake.TorchShakeShake,
    'pyramidnet': pyramidnet.TorchPyramidNet,
}


def create_torch_model(name: str, **kwargs):
  """The torch model `name` (a key of `TORCH_MODELS`) with the given arguments."""
  if name not in TORCH_MODELS:
    raise ValueError(f'model.name must be one of {sorted(TORCH_MODELS)}, got {name!r}')
  return TORCH_MODELS[name](**kwargs)
