"""configs/one_cycle.py on CIFAR-100: the blog's OneCycleLR (max_lr 0.1, torch defaults, stepped per batch,
50 epochs) and ResNet18, with TFDS's cifar100 (100 fine labels: the model's head has 100 outputs) and the
standard CIFAR-100 normalisation constants (data.normalization='cifar100', input_pipeline.NORMALIZATIONS).

  cifar-jax --config=configs/cifar100_one_cycle.py --workdir=runs/cifar100_one_cycle
  cifar-jax --config=configs/cifar100_one_cycle.py --workdir=runs/cifar100_one_cycle \
      --config.data.source=cifar100_python --config.data.path=cifar-100-python

Its accuracy has not been measured here (this machine has no CIFAR-100); docs/cifar100.md says how to run
it and what the papers report. max_lr is CIFAR-10's: `--mode=lr_find` checks it (docs/lr-range-test.md).
"""

from configs import one_cycle


def use_cifar100(config):
  """`config` on CIFAR-100: TFDS's cifar100 and its normalisation constants."""
  config.data.source = 'tfds'
  config.data.tfds_name = 'cifar100'
  config.data.normalization = 'cifar100'
  return config


def get_config():
  return use_cifar100(one_cycle.get_config())
