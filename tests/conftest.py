"""Shared fixtures: tiny configs on synthetic data, and the repo root importable for `configs`."""

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

# The in-process tests run XLA:CPU with the convolution setting `cifar-jax` uses (cifar_jax/cpu_backend.py),
# so the torch parity checks cover it; the device count stays JAX's default (one CPU device).
from cifar_jax import cpu_backend  # pylint: disable=g-import-not-at-top,wrong-import-position

if cpu_backend.YNN_FLAG not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = f"{os.environ.get('XLA_FLAGS', '')} {cpu_backend.EIGEN_CONVOLUTIONS}".strip()


def make_tiny_config():
  """configs/smoke.py shrunk further: a ResNet9 of width 1/8 on 200 synthetic images."""
  from configs import smoke  # pylint: disable=g-import-not-at-top

  config = smoke.get_config()
  config.model.width_multiplier = 0.125
  config.data.synthetic_train_size = 200
  config.data.synthetic_eval_size = 64
  config.batch_size = 64
  config.eval_batch_size = 48
  config.progress_bar = False
  return config


@pytest.fixture
def tiny_config():
  """A fresh `make_tiny_config()` for each test."""
  return make_tiny_config()
