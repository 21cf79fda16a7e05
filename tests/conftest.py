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


def assert_k_seeds_train_as_singles_and_resume(config, tmp_path) -> list:
  """Seed i of a k = 2 run of `config` (its seeds sharing the synthetic images) trains as the single run of
  seed i within float32 rounding, and the single run killed after step 3 resumes to seed 0's end bitwise;
  returns the single runs' final states."""
  import chex  # pylint: disable=g-import-not-at-top

  from cifar_jax import steps  # pylint: disable=g-import-not-at-top
  from cifar_jax import train  # pylint: disable=g-import-not-at-top

  config = config.copy_and_resolve_references()
  config.data.synthetic_train_size = 128
  config.data.synthetic_seed = 0
  k_config = config.copy_and_resolve_references()
  k_config.num_seeds = 2
  k_state = train.train_and_evaluate(k_config, str(tmp_path / 'k2'))
  singles = []
  for i in range(2):
    single_config = config.copy_and_resolve_references()
    single_config.seed = i
    singles.append(train.train_and_evaluate(single_config, str(tmp_path / f'seed_{i}')))
    got = steps.unstack_seed((k_state.params, k_state.batch_stats, k_state.ema_params,
                              k_state.ema_batch_stats), i)  # the EMA's: None (nothing) when it is off
    chex.assert_trees_all_close(got, (singles[i].params, singles[i].batch_stats, singles[i].ema_params,
                                      singles[i].ema_batch_stats), rtol=1e-5, atol=1e-5)
  workdir = str(tmp_path / 'crashed')
  with pytest.raises(Crash):
    train.train_and_evaluate(config, workdir, actions=[StopAfter(3)])
  resumed = train.train_and_evaluate(config, workdir)
  chex.assert_trees_all_equal(
      (resumed.params, resumed.batch_stats, resumed.opt_state, resumed.ema_params, resumed.ema_batch_stats),
      (singles[0].params, singles[0].batch_stats, singles[0].opt_state, singles[0].ema_params,
       singles[0].ema_batch_stats))
  return singles
