"""PyramidNet-272 (alpha 200, bottleneck) with ShakeDrop (Yamada et al. 2018, "ShakeDrop Regularization
for Deep Residual Learning"; the recipe of `google-research/sam`'s README, "baseline" column): 1800
epochs, batch 256, SGD lr 0.1, Nesterov momentum 0.9, weight decay 5e-4 (BatchNorm's too), cosine per
batch, crop and flip, p_L = 0.5 with the linear rule, gates per image. sam README: 2.4 % CIFAR-10 error
(mean of 5 runs; their BatchNorm statistics per device of 8). PyramidNet-110 alpha 270 (basic blocks, 28.5 M
parameters): `--config.model.depth=110 --config.model.block=basic --config.model.pyramid_alpha=270`.

  cifar-jax --config=configs/pyramidnet_shakedrop.py --workdir=runs/pyramidnet_shakedrop

sam also clips the gradient norm at 5; this trainer has no clipping (yet), so that one step of the
recipe is left out. A GPU config: 26.2 M parameters, 272 layers.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.num_epochs = 1800
  config.batch_size = 256
  config.model.name = 'pyramidnet'
  config.model.depth = 272
  config.model.pyramid_alpha = 200.0
  config.model.block = 'bottleneck'
  config.model.shakedrop.p_last = 0.5
  config.model.shakedrop.level = 'image'
  config.optimizer.lr = 0.1
  config.optimizer.momentum = 0.9
  config.optimizer.nesterov = True
  config.optimizer.weight_decay = 5e-4
  config.schedule.name = 'cosine'
  config.schedule.step_every = 'batch'
  config.schedule.T_max = -1
  config.schedule.eta_min = 0.0
  return config
