"""Calibration and ensemble metrics (cifar_jax/calibration.py) against hand-computed arrays and numpy."""

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from cifar_jax import calibration
from cifar_jax import steps


def _log(probs):
  return jnp.log(jnp.asarray(probs, jnp.float32))


def test_bin_edges():
  """Bin b holds [b/15, (b+1)/15); 0 is in the first bin, 1 in the last."""
  edge = np.float32(2.0) / np.float32(15.0)  # float32's 2/15 times 15 rounds to exactly 2
  values = np.array([0.0, np.nextafter(edge, 0, dtype=np.float32), edge, 0.5, 14 / 15 + 1e-6, 1.0],
                    np.float32)
  np.testing.assert_array_equal(calibration.bin_index(jnp.asarray(values)), [0, 1, 2, 7, 14, 14])


def test_sums_against_hand_computed_values():
  # Confidences 0.9 (correct), 0.6 (wrong), 0.7 (correct), 0.55 (correct), and one masked example.
  probs = [[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.55, 0.45], [0.5, 0.5]]
  labels = jnp.array([0, 1, 1, 0, 1])
  mask = jnp.array([1, 1, 1, 1, 0], jnp.float32)
  m = calibration.summarize(calibration.calibration_sums(_log(probs), labels, mask))
  assert m['accuracy'] == 0.75
  np.testing.assert_allclose(m['nll'], -(np.log(0.9) + np.log(0.4) + np.log(0.7) + np.log(0.55)) / 4,
                             rtol=1e-6)
  brier = [(0.1 ** 2) * 2, 0.6 ** 2 * 2, 0.3 ** 2 * 2, 0.45 ** 2 * 2]
  np.testing.assert_allclose(m['brier'], np.mean(brier), rtol=1e-5)
  # Bins: 0.9 -> 13, 0.6 -> 9, 0.7 -> 10, 0.55 -> 8; one example each, |acc - conf| each.
  np.testing.assert_allclose(m['ece'], (0.1 + 0.6 + 0.3 + 0.45) / 4, rtol=1e-5)
  bins = calibration.reliability(calibration.calibration_sums(_log(probs), labels, mask))
  assert [i for i, c in enumerate(bins['count']) if c] == [8, 9, 10, 13]
  assert bins['accuracy'][9] == 0.0 and bins['accuracy'][0] is None
  np.testing.assert_allclose(bins['confidence'][13], 0.9, rtol=1e-6)


def test_shared_bin_averages_before_the_gap():
  """Two examples in one bin: |mean accuracy - mean confidence|, not the mean of the gaps."""
  probs = [[0.95, 0.05], [0.96, 0.04]]
  m = calibration.summarize(calibration.calibration_sums(_log(probs), jnp.array([0, 1]), jnp.ones(2)))
  np.testing.assert_allclose(m['ece'], abs(0.5 - 0.955), rtol=1e-5)


def _numpy_metrics(probs, labels):
  conf, pred = probs.max(-1), probs.argmax(-1)
  correct = (pred == labels).astype(np.float64)
  bins = np.minimum(np.floor(conf * 15).astype(int), 14)
  ece = sum(abs(correct[bins == b].sum() - conf[bins == b].sum()) for b in range(15)) / len(labels)
  onehot = np.eye(probs.shape[-1])[labels]
  return {'accuracy': correct.mean(), 'nll': -np.log(probs[np.arange(len(labels)), labels]).mean(),
          'ece': ece, 'brier': ((probs - onehot) ** 2).sum(-1).mean()}


def test_ensemble_against_numpy_and_jensen():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 2, 50, 10)).astype(np.float32) * 3  # 3 members, 2 batches of 50
  labels = rng.integers(0, 10, size=(2, 50))
  log_probs = jax.nn.log_softmax(jnp.asarray(logits))
  sums = calibration.ensemble_sums(log_probs, jnp.asarray(labels), jnp.ones((2, 50)))
  m = calibration.summarize(sums)
  probs = np.asarray(jax.nn.softmax(logits.astype(np.float64)), np.float64)
  expected = _numpy_metrics(probs.mean(0).reshape(100, 10), labels.reshape(100))
  for key, value in expected.items():
    np.testing.assert_allclose(m[key], value, rtol=1e-5, atol=1e-6, err_msg=key)
  members = [_numpy_metrics(p.reshape(100, 10), labels.reshape(100)) for p in probs]
  np.testing.assert_allclose(m['member_nll'], np.mean([e['nll'] for e in members]), rtol=1e-5)
  assert m['nll'] <= m['member_nll']
  preds = probs.argmax(-1).reshape(3, 100)
  pairs = [(i, j) for i in range(3) for j in range(3) if i != j]
  np.testing.assert_allclose(m['disagreement'], np.mean([(preds[i] != preds[j]).mean() for i, j in pairs]),
                             rtol=1e-6)


def test_disagreement_by_hand():
  # Two members agree on example 0 and disagree on example 1: 0.5.
  log_probs = _log([[[0.9, 0.1], [0.9, 0.1]], [[0.8, 0.2], [0.2, 0.8]]])
  assert float(calibration.disagreement_sum(log_probs, jnp.ones(2))) == 1.0
  assert float(calibration.disagreement_sum(log_probs[:1], jnp.ones(2))) == 0.0


def test_mean_log_probs_does_not_underflow():
  log_probs = jnp.array([[0.0, -200.0], [-300.0, 0.0]])  # exp(-300) is 0 in float32
  np.testing.assert_allclose(calibration.mean_log_probs(log_probs[:, None])[0],
                             [np.log(0.5), np.log(0.5)], rtol=1e-6)


def test_eval_step_sums_keep_the_loss_and_add_calibration():
  rng = np.random.default_rng(1)
  logits = jnp.asarray(rng.normal(size=(6, 10)).astype(np.float32))
  labels, mask = jnp.asarray(rng.integers(0, 10, 6)), jnp.array([1, 1, 1, 1, 1, 0], jnp.float32)
  sums, log_probs = steps.eval_sums(logits, labels, mask)
  assert sums['nll_sum'] == sums['loss_sum'] and float(sums['count']) == 5
  np.testing.assert_allclose(log_probs, jax.nn.log_softmax(logits))
  expected = _numpy_metrics(np.asarray(jax.nn.softmax(logits), np.float64)[:5], np.asarray(labels)[:5])
  m = calibration.summarize(sums)
  for key, value in expected.items():
    np.testing.assert_allclose(m[key], value, rtol=1e-5, err_msg=key)


def test_plot_calibration_draws_every_ensemble_size(tmp_path):
  """scripts/plot.py calibration: one PNG from evaluation.json; the NLL lines take `nll_by_models` (every
  ensemble size) when evaluate wrote it, else the table's two points per family."""
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'scripts'))
  import plot  # pylint: disable=g-import-not-at-top

  bins = {'count': [0] * 13 + [3, 5], 'confidence': [None] * 13 + [0.88, 0.97],
          'accuracy': [None] * 13 + [0.67, 1.0]}
  table = [{'model': m, 'models': n, 'seeds': 2, 'accuracy': 0.9, 'nll': nll, 'ece': 0.05, 'brier': 0.2,
            'bins': bins} for m, n, nll in (('single model', 1, 0.5), ('deep ensemble', 2, 0.4),
                                            ('SWAG', 4, 0.45), ('MultiSWAG', 8, 0.35))]
  curves = {'deep ensemble': [{'models': 1, 'nll': 0.5}, {'models': 2, 'nll': 0.4}],
            'MultiSWAG': [{'models': 2, 'nll': 0.48}, {'models': 4, 'nll': 0.45}, {'models': 8, 'nll': 0.35}]}
  for name, evaluation in (('curves', {'table': table, 'nll_by_models': curves}),
                           ('table', {'table': table})):
    workdir = tmp_path / name
    workdir.mkdir()
    (workdir / 'evaluation.json').write_text(json.dumps(evaluation))
    out = plot.plot_calibration(str(workdir), str(workdir / 'calibration.png'))
    assert os.path.getsize(out) > 10_000
