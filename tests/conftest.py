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
  """configs/tiny.py: a ResNet9 of width 1/8 on 200 synthetic images."""
  from configs import tiny  # pylint: disable=g-import-not-at-top

  return tiny.get_config()


@pytest.fixture
def tiny_config():
  """A fresh `make_tiny_config()` for each test."""
  return make_tiny_config()


# Hooks into a run through train_and_evaluate(..., actions=[...]) ----------------------------------------

from cifar_jax import loop  # pylint: disable=g-import-not-at-top,wrong-import-position


class Crash(Exception):
  """A run stopped by `StopAfter`."""


class StopAfter(loop.Action):
  """Ends a run with Crash once the actions of step `step` have run (its checkpoint written), as a kill
  right after that checkpoint would."""

  def __init__(self, step: int):
    self.step = step

  def due(self, step: int) -> bool:
    return step == self.step

  def __call__(self, run) -> None:
    raise Crash(run.step)


class KeepProgram(loop.Action):
  """Keeps the run's Program (its compiled functions, trace counts and call sizes) for the test."""

  program = None

  def start(self, run) -> None:
    self.program = run.program

  def due(self, step: int) -> bool:
    return False
