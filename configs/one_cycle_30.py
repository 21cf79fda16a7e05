"""OneCycleLR as configs/one_cycle.py over 30 epochs. Blog: 93.77 %.

  cifar-jax --config=configs/one_cycle_30.py --workdir=runs/one_cycle_30
"""

from configs import one_cycle


def get_config():
  config = one_cycle.get_config()
  config.num_epochs = 30
  return config
