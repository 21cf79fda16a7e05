"""A tiny ResNet9 on synthetic data: 2 epochs on a laptop CPU in well under a minute.

  cifar-jax --config=configs/smoke.py --workdir=runs/smoke

Synthetic images have learnable labels, so accuracy should rise well above 10 % within the two epochs.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.num_epochs = 2
  config.batch_size = 64
  config.eval_batch_size = 256
  config.model.name = 'resnet9'
  config.model.width_multiplier = 0.125
  config.data.source = 'synthetic'
  config.data.synthetic_train_size = 1024
  config.data.synthetic_eval_size = 256
  config.schedule.milestones = (1,)
  config.log_every_steps = 4
  return config
