"""Shake-Shake-26 2x32d, Shake-Shake-Image (Gastaldi 2017, "Shake-Shake regularization", Table 1 and the
CIFAR-10 rows of Table 2; `xgastaldi/shake-shake`): 1800 epochs, batch 128, SGD lr 0.2 with Nesterov
momentum 0.9 and weight decay 1e-4, cosine annealing without restarts stepped per batch, standard crop and
flip. Paper: 2.9 M parameters, 3.55 % test error (mean of 3 runs).

  cifar-jax --config=configs/shake_shake_26_2x32d.py --workdir=runs/shake_shake_26_2x32d

1800 epochs is a GPU budget (README, "Shake-Shake and ShakeDrop" says what a CPU can do). The lua code
steps its cosine from batch 1 (T_cur = 1 at the first update) where torch's CosineAnnealingLR starts at 0:
one step of 703,800 apart.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.num_epochs = 1800
  config.batch_size = 128
  config.model.name = 'shake_shake'
  config.model.depth = 26
  config.model.base_width = 32
  config.model.shake.forward = 'shake'
  config.model.shake.backward = 'shake'
  config.model.shake.level = 'image'
  config.optimizer.lr = 0.2
  config.optimizer.momentum = 0.9
  config.optimizer.nesterov = True
  config.optimizer.weight_decay = 1e-4
  config.schedule.name = 'cosine'
  config.schedule.step_every = 'batch'
  config.schedule.T_max = -1  # = the run's length in batches
  config.schedule.eta_min = 0.0
  return config
