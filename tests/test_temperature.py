"""Temperature scaling (evaluation.temperature, cifar_jax/temperature.py): the fitted T minimises the
held-out NLL, T = 1 changes nothing, and a run without a held-out split is refused."""

import numpy as np
import pytest

from cifar_jax import calibration
from cifar_jax import config_lib
from cifar_jax import temperature
from cifar_jax import uncertainty
from cifar_jax.errors import ConfigError
from tests import conftest


def _overconfident(n=300, classes=10, seed=0, leading=()):
  """Logits whose labels are drawn from softmax(logits / 2.5): the best T is near 2.5. With `leading`
  axes (seeds), each seed's logits are those plus a little noise of its own."""
  rng = np.random.default_rng(seed)
  base = rng.normal(0.0, 4.0, (n, classes))
  probs = np.exp(temperature.scale(base, 2.5))
  labels = np.asarray([rng.choice(classes, p=p / p.sum()) for p in probs])
  return base + rng.normal(0.0, 0.3, leading + (n, classes)), labels


@pytest.mark.parametrize('leading', [(), (3,)])  # one model; a seed's row: 3 seeds sharing one T
def test_fitted_temperature_minimises_the_nll(leading):
  logits, labels = _overconfident(leading=leading)
  t = temperature.fit(logits, labels)
  assert 1.5 < t < 4.0
  best = temperature.nll(logits, labels, t)
  for factor in np.exp(np.linspace(-0.05, 0.05, 41)):  # a grid around T, steps of 0.25 %
    assert best <= temperature.nll(logits, labels, t * factor) + 1e-12
  for other in (0.5, 1.0, 2.0, 3.0, 10.0):
    assert best < temperature.nll(logits, labels, other)
  # NLL of T computed independently: -mean log softmax(z / T)[y].
  z = logits.reshape(-1, 10) / t
  y = np.broadcast_to(labels, logits.shape[:-1]).reshape(-1)
  direct = -np.mean(z[np.arange(z.shape[0]), y] - np.log(np.sum(np.exp(z), axis=1)))
  np.testing.assert_allclose(best, direct, rtol=1e-12)


def test_a_minimum_beyond_the_range_stops_at_its_end():
  logits = np.tile(np.asarray([[5.0, 0.0]]), (10, 1))
  assert temperature.fit(logits, np.zeros(10, np.int64)) == pytest.approx(temperature.T_MIN)  # all right
  assert temperature.fit(logits, np.ones(10, np.int64)) == pytest.approx(temperature.T_MAX)  # all wrong


def test_temperature_one_leaves_every_row_as_it_is(monkeypatch):
  """With T forced to 1 the rows after scaling are the rows before: each seed's metrics and the
  ensemble's (probabilities averaged over the seeds)."""
  logits, labels = _overconfident(n=200, leading=(3,))
  log_probs = temperature.scale(logits, 1.0).astype(np.float32)
  np.testing.assert_allclose(temperature.scale(logits, 1.0),
                             logits - np.log(np.sum(np.exp(logits), -1, keepdims=True)), atol=1e-12)
  mask = np.ones(labels.shape, np.float32)
  monkeypatch.setattr(temperature, 'fit', lambda *a: 1.0)
  rows = uncertainty.temperature_rows({'single model': [uncertainty.Members(log_probs)]}, labels, 3)
  assert [r['model'] for r in rows] == ['single model', 'deep ensemble'] and rows[0]['temperature'] == 1.0
  before = [calibration.summarize(calibration.calibration_sums(lp, labels, mask)) for lp in log_probs]
  ensemble = calibration.summarize(calibration.calibration_sums(
      np.asarray(calibration.mean_log_probs(log_probs)), labels, mask))
  for key in ('accuracy', 'nll', 'ece', 'brier'):
    np.testing.assert_allclose(rows[0][key], np.mean([b[key] for b in before]), rtol=1e-6)
    np.testing.assert_allclose(rows[0][f'{key}_std'], np.std([b[key] for b in before], ddof=1), rtol=1e-4,
                               atol=1e-7)
    np.testing.assert_allclose(rows[1][key], ensemble[key], rtol=1e-5)


def test_fitting_keeps_the_accuracy_and_lowers_the_nll():
  logits, labels = _overconfident(n=200, leading=(2,))
  log_probs = temperature.scale(logits, 1.0).astype(np.float32)
  rows = uncertainty.temperature_rows({'SWA': [uncertainty.Members(log_probs)]}, labels, 2)
  mask = np.ones(labels.shape, np.float32)
  for row, lp in zip(rows, (log_probs, np.asarray(calibration.mean_log_probs(log_probs)))):
    before = [calibration.summarize(calibration.calibration_sums(x, labels, mask))
              for x in (lp if lp.ndim == 3 else lp[None])]
    assert row['accuracy'] == pytest.approx(np.mean([b['accuracy'] for b in before]))
    assert row['nll'] < np.mean([b['nll'] for b in before])
  assert [r['model'] for r in rows] == ['SWA', 'MultiSWA']


def test_without_a_held_out_split_it_is_refused():
  config = conftest.make_tiny_config()
  config.evaluation.temperature = True
  with pytest.raises(ConfigError, match='evaluation.temperature fits T on a held-out split') as e:
    config_lib.validate(config)
  assert '\n' not in str(e.value)
  config.data.validation_size = 40
  config_lib.validate(config)
  config.parallelism = 'pmap'
  with pytest.raises(ConfigError, match='set parallelism=jit'):
    config_lib.validate(config)
