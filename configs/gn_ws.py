"""ResNet18 with GroupNorm (4 channels per group) + Weight Standardization, batch 32 (blog Part 1).
Blog: 93.27 % after 50 epochs (best 93.45 %), MultiStepLR([25, 40]), lr 0.05.

  cifar-jax --config=configs/gn_ws.py --workdir=runs/gn_ws
"""

from configs import default


def get_config():
  config = default.get_config()
  config.model.norm = 'group_ws'
  config.batch_size = 32
  return config
