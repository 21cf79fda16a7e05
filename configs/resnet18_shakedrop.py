"""The blog's best run, one-cycle ResNet18 (configs/one_cycle.py: max_lr 0.1, 50 epochs, 94.65 % in Part 2),
with ShakeDrop on its eight residual branches: p_l falling linearly to p_L = 0.5 at the last block (the
ShakeDrop paper's rule), gates per image. The blog did not run it; the ShakeDrop paper trains for
hundreds of epochs (300 for its ResNet rows), so 50 is the blog's budget, not the paper's.

  cifar-jax --config=configs/resnet18_shakedrop.py --workdir=runs/resnet18_shakedrop
"""

from configs import one_cycle


def get_config():
  config = one_cycle.get_config()
  config.model.shakedrop.p_last = 0.5
  config.model.shakedrop.level = 'image'
  return config
