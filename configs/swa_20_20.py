"""SWA for 20 + 20 epochs (blog Part 2): one-cycle over 20 epochs, then 20 SWA epochs at lr 0.01.
Blog: 94.45 % after 40 epochs (same notebook quirk as configs/swa.py, whose docstring explains it).

  cifar-jax --config=configs/swa_20_20.py --workdir=runs/swa_20_20
"""

from configs import swa


def get_config():
  config = swa.get_config()
  config.num_epochs = 40
  return config
