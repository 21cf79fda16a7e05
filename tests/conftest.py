"""Shared fixtures: tiny configs on synthetic data, and the repo root importable for `configs`."""

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)


@pytest.fixture
def tiny_config():
  """configs/smoke.py shrunk further: a ResNet9 of width 1/8 on 256 synthetic images."""
  from configs import smoke  # pylint: disable=g-import-not-at-top

  config = smoke.get_config()
  config.model.width_multiplier = 0.125
  config.data.synthetic_train_size = 200
  config.data.synthetic_eval_size = 64
  config.batch_size = 64
  config.eval_batch_size = 48
  config.progress_bar = False
  return config
