"""CyclicLR, 'triangular2', between lr 0.001 and 0.1, 4-epoch half cycles, 40 epochs, momentum cycled
0.9 -> 0.8 (torch's defaults). The blog describes CyclicLR but ran no experiment with it.

  cifar-jax --config=configs/cyclic.py --workdir=runs/cyclic

Why these values: max_lr 0.1 is the peak that worked for one-cycle in the blog; base_lr 0.001 is its
initial lr rounded (0.1 / 25 = 0.004 in one-cycle; Smith's LR range test puts the base an order or two
below the peak). step_size_up = 4 epochs (1564 batches at batch 128) is inside Smith's recommended 2-10
epochs per half cycle, and 40 epochs = 5 full cycles; 'triangular2' halves the amplitude every cycle, so
the last cycle ends near base_lr and the final epochs fine-tune, as a decaying schedule would.
"""

from configs import multistep


def get_config():
  config = multistep.get_config()
  config.num_epochs = 40
  config.optimizer.lr = 0.001  # CyclicLR's base_lr
  config.schedule.name = 'cyclic'
  config.schedule.max_lr = 0.1
  config.schedule.step_size_up_epochs = 4  # = 4 * steps_per_epoch batches
  config.schedule.step_size_down = -1  # = step_size_up
  config.schedule.mode = 'triangular2'
  config.schedule.base_momentum = 0.8
  config.schedule.max_momentum = 0.9
  return config
