"""SWAG (Maddox et al. 2019) on the blog's SWA experiment (configs/swa.py: one-cycle for 20 epochs, then
10 epochs at a constant lr of 0.01): the moments and the last K = 20 deviations are collected when SWA
averages (the end of each SWA epoch, 10 snapshots: fewer than K, so the low-rank term divides by
sqrt(10 - 1)); at the end S = 30 samples at scale 0.5, each with its own BatchNorm pass, are averaged.

  cifar-jax --config=configs/swag.py --workdir=runs/swag
  cifar-jax --config=configs/swag.py --workdir=runs/swag --mode=evaluate --config.swag.num_samples=30

The last record holds swa_eval_* and swag_eval_* (accuracy, nll, ece, brier). The paper trains far longer
(300 epochs of larger models, SWAG collected over the last ~140) with the same K, scale and S; this is the
blog's 30-epoch budget, so expect SWAG's gain over SWA in NLL and ECE rather than in accuracy.
"""

from configs import swa


def get_config():
  config = swa.get_config()
  config.swag.enabled = True
  config.swag.rank = 20
  config.swag.scale = 0.5
  config.swag.num_samples = 30
  return config
