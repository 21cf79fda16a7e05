"""MultiSWAG (Wilson & Izmailov 2020): configs/swag.py for k = 3 seeds in one vmap-ed run, the
probabilities averaged over all 3 x 30 samples (the paper: 3 x 20). Also gives MultiSWA (the 3 SWA
models averaged) and the deep ensemble of the 3 running models.

  cifar-jax --config=configs/multiswag.py --workdir=runs/multiswag
  cifar-jax --config=configs/multiswag.py --workdir=runs/multiswag --mode=evaluate

The last record holds multiswag_eval_*, swa_ensemble_eval_* and ensemble_eval_*; --mode=evaluate prints
the table of all six models. Seed i's SWAG is configs/swag.py's with seed i.
"""

from configs import swag


def get_config():
  config = swag.get_config()
  config.num_seeds = 3
  return config
