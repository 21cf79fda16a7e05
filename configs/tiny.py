"""configs/smoke.py shrunk further: a ResNet9 of width 1/8 on 200 synthetic images (4 steps an epoch, the
last a partial batch of 8). The tests' config (tests/conftest.py) and scripts/maintainers/golden_outputs.py's.

  cifar-jax --config=configs/tiny.py --workdir=runs/tiny

Seconds on a 2-core CPU; its accuracy means nothing (200 images, 2 epochs).
"""

from configs import smoke


def get_config():
  config = smoke.get_config()
  config.model.width_multiplier = 0.125
  config.data.synthetic_train_size = 200
  config.data.synthetic_eval_size = 64
  config.batch_size = 64
  config.eval_batch_size = 48
  config.progress_bar = False
  return config
