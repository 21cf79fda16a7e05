"""A narrow ResNet9 on synthetic data: 2 epochs on a 2-core CPU in about half a minute.

  cifar-jax --config=configs/smoke.py --workdir=runs/smoke

Synthetic images have learnable labels: eval accuracy reaches about 0.85-0.9 after the two epochs
(measured 0.875 on a 2-core CPU, 36 s including start-up and compilation).
"""

from configs import default


def get_config():
  config = default.get_config()
  config.num_epochs = 2
  config.batch_size = 64
  config.eval_batch_size = 256
  config.model.name = 'resnet9'
  config.model.width_multiplier = 0.25
  config.data.source = 'synthetic'
  config.data.synthetic_train_size = 2048
  config.data.synthetic_eval_size = 256
  config.optimizer.lr = 0.1
  config.schedule.milestones = (1,)
  config.log_every_steps = 8
  return config
