"""OneCycleLR(max_lr=0.1, total_steps = epochs * 391), torch defaults (pct_start 0.3, cos, div_factor
25, final_div_factor 1e4, momentum cycled 0.95 -> 0.85 -> 0.95), stepped per batch, 50 epochs
(blog Part 2, "One Cycle LR"). Blog: 94.65 %, the best result of the series.

  cifar-jax --config=configs/one_cycle.py --workdir=runs/one_cycle

max_lr for another model, width or batch size: the LR range test, `--mode=lr_find` (README, "Picking max_lr").
"""

from configs import multistep


def get_config():
  config = multistep.get_config()
  config.schedule.name = 'one_cycle'
  config.schedule.max_lr = 0.1
  config.schedule.total_steps = -1  # = num_epochs * steps_per_epoch
  config.schedule.pct_start = 0.3
  config.schedule.anneal_strategy = 'cos'
  config.schedule.div_factor = 25.0
  config.schedule.final_div_factor = 1e4
  config.schedule.base_momentum = 0.85
  config.schedule.max_momentum = 0.95
  return config
