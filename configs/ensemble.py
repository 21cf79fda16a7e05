"""Deep ensemble (Lakshminarayanan et al. 2017) of the blog's one-cycle model: k = 4 seeds trained in one
vmap-ed run, their probabilities averaged. The blog's last section names it as the next experiment.

  cifar-jax --config=configs/ensemble.py --workdir=runs/ensemble
  cifar-jax --config=configs/ensemble.py --workdir=runs/ensemble --mode=evaluate

Every epoch's record holds each seed's eval metrics (eval_*_per_seed, mean, std: the "single model" row)
and the ensemble's (ensemble_eval_accuracy, _nll, _ece, _brier, _member_nll, _disagreement). Seed i is the
run configs/one_cycle.py with seed i would be. uncertainty-baselines reports (as issue 17 quotes them)
for WRN-28-10, a larger model trained longer: 96.0 % / NLL 0.159 / ECE 0.023 for one model and
96.6 % / 0.114 / 0.010 for an ensemble of 4.
"""

from configs import one_cycle


def get_config():
  config = one_cycle.get_config()
  config.num_seeds = 4
  return config
