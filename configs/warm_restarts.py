"""CosineAnnealingWarmRestarts(T_0=20, T_mult=2), lr 0.2, stepped per epoch, 60 epochs (blog Part 2,
"Cosine Annealing with Warm Restarts"): restarts after epochs 20 and 60. Blog: 93.70 % (best 93.75 %).

  cifar-jax --config=configs/warm_restarts.py --workdir=runs/warm_restarts
"""

from configs import multistep


def get_config():
  config = multistep.get_config()
  config.num_epochs = 60
  config.optimizer.lr = 0.2
  config.schedule.name = 'warm_restarts'
  config.schedule.T_0 = 20
  config.schedule.T_mult = 2
  config.schedule.eta_min = 0.0
  return config
