"""SWA (blog Part 2): OneCycleLR over 20 epochs, then 10 epochs of SGD at a constant lr of 0.01, averaging
the weights at the end of every epoch, then update_bn. Blog: 94.14 % after 20 + 10 epochs.

  cifar-jax --config=configs/swa.py --workdir=runs/swa

One-cycle is the blog's (max_lr 0.1, torch defaults, stepped per batch) with total_steps = 20 epochs; the
SWA phase keeps the optimizer (momentum buffer included) and sets lr 0.01, momentum 0.9. The blog's
notebook averaged a different model than the one it trained (a leftover 30-epoch one-cycle model, see
blog.md); this config is the experiment as the text describes it: one-cycle for 20 epochs, then SWA
from that model. The LR-scheduler notebook runs without zero_init_residual.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.num_epochs = 30
  config.model.zero_init_residual = False
  config.schedule.name = 'one_cycle'
  config.schedule.max_lr = 0.1
  config.swa.enabled = True
  config.swa.start_epoch = 20
  config.swa.lr = 0.01
  config.swa.schedule = 'constant'
  return config
