"""Part 2's MultiStepLR baseline: lr 0.05, milestones [25, 40], gamma 0.1, stepped per epoch, 50 epochs.
Blog: 93.76 % (best 93.94 %); the figure "Multi Step LR" of Part 2.

  cifar-jax --config=configs/multistep.py --workdir=runs/multistep

The LR-scheduler notebook trains without zero_init_residual.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.model.zero_init_residual = False
  config.schedule.name = 'multistep'
  config.schedule.milestones = (25, 40)
  config.schedule.gamma = 0.1
  return config
