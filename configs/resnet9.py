"""ResNet9 (BasicBlock x [1, 1, 1, 1]), BatchNorm, otherwise the Part-1 baseline.
Blog: 93.01 % after 50 epochs.

  cifar-jax --config=configs/resnet9.py --workdir=runs/resnet9
"""

from configs import default


def get_config():
  config = default.get_config()
  config.model.name = 'resnet9'
  return config
