"""configs/multiswag.py on CIFAR-100, the second dataset of Maddox et al. (2019) and Wilson & Izmailov
(2020): k = 3 seeds of the blog's SWA run (one-cycle for 20 epochs, then 10 SWA epochs at lr 0.01), SWAG
(K = 20, scale 0.5, 30 samples per seed), on TFDS's cifar100 with the standard CIFAR-100 normalisation.

  cifar-jax --config=configs/cifar100_multiswag.py --workdir=runs/cifar100_multiswag
  cifar-jax --config=configs/cifar100_multiswag.py --workdir=runs/cifar100_multiswag --mode=evaluate \
      --config.evaluation.shift=all

--mode=evaluate prints the six rows (single model, deep ensemble, SWA, MultiSWA, SWAG, MultiSWAG); with
evaluation.shift, the same on CIFAR-100-C, generated from CIFAR-100's test images or read from the released
files (data.corruptions_path). Not measured here (no CIFAR-100 on this machine): docs/cifar100.md.
"""

from configs import cifar100_one_cycle
from configs import multiswag


def get_config():
  return cifar100_one_cycle.use_cifar100(multiswag.get_config())
