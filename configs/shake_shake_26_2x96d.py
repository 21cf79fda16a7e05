"""Shake-Shake-26 2x96d, Shake-Shake-Image (Gastaldi 2017, Table 2's best CIFAR-10 row): configs/
shake_shake_26_2x32d.py with N = 96. Paper: 26.2 M parameters, 2.86 % test error (mean of 5 runs) after
1800 epochs.

  cifar-jax --config=configs/shake_shake_26_2x96d.py --workdir=runs/shake_shake_26_2x96d

A GPU config: on this project's 2-core CPU one epoch would take hours.
"""

from configs import shake_shake_26_2x32d


def get_config():
  config = shake_shake_26_2x32d.get_config()
  config.model.base_width = 96
  return config
