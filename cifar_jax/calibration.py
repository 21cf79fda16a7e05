"""Calibration and ensemble metrics as sums over examples, on the device: NLL, accuracy, ECE, Brier score.

Conventions of google `uncertainty-baselines` on CIFAR (after Guo et al. 2017):
- NLL is the cross-entropy of the predictive probabilities; an ensemble's (or a Bayesian model average's)
  probabilities are the mean of its members' softmax probabilities, averaged in log space
  (`mean_log_probs`: logsumexp - log n), so a confident member cannot underflow the average.
- ECE: the top-1 probability (confidence) binned into NUM_BINS equal-width bins; bin b holds confidences in
  [b / NUM_BINS, (b + 1) / NUM_BINS), a confidence of 1 the last bin (tf.histogram_fixed_width_bins, which
  tfp.stats.expected_calibration_error uses); ECE = sum_b n_b / N * |accuracy_b - mean confidence_b|.
- Brier score: sum over classes of (p_c - onehot_c)^2, averaged over examples (in [0, 2]).
- Disagreement of an ensemble: the fraction of examples on which two different members' top-1 predictions
  differ, averaged over the ordered pairs of members.

Every function returns sums over the (masked) examples, so batches, devices and epochs add up; `summarize`
turns sums into the metrics on the host.
"""

import jax
import jax.numpy as jnp
import numpy as np

NUM_BINS = 15
SUM_KEYS = ('nll_sum', 'correct', 'count', 'brier_sum', 'bin_count', 'bin_confidence', 'bin_correct')


def bin_index(confidence: jax.Array, num_bins: int = NUM_BINS) -> jax.Array:
  """The equal-width bin of each confidence in [0, 1]: floor(c * num_bins), 1.0 in the last bin."""
  return jnp.clip(jnp.floor(confidence * num_bins).astype(jnp.int32), 0, num_bins - 1)


def calibration_sums(log_probs: jax.Array, labels: jax.Array, mask: jax.Array,
                     num_bins: int = NUM_BINS) -> dict[str, jax.Array]:
  """Sums of NLL, correct, count and Brier, and per-bin counts, confidences and corrects.

  Args:
    log_probs: (..., num_classes) log predictive probabilities (log_softmax of logits, or `mean_log_probs`).
    labels: (...) integer labels.
    mask: (...) 1 for a real example, 0 for padding.
    num_bins: ECE bins.
  """
  log_probs = log_probs.reshape(-1, log_probs.shape[-1])
  labels, mask = labels.reshape(-1), mask.reshape(-1).astype(jnp.float32)
  probs = jnp.exp(log_probs)
  label_log_prob = jnp.take_along_axis(log_probs, labels[:, None], axis=-1)[:, 0]
  confidence = jnp.max(probs, axis=-1)
  correct = (jnp.argmax(log_probs, axis=-1) == labels).astype(jnp.float32)
  label_prob = jnp.exp(label_log_prob)
  brier = jnp.sum(probs * probs, axis=-1) - 2.0 * label_prob + 1.0
  bins = jax.nn.one_hot(bin_index(confidence, num_bins), num_bins, dtype=jnp.float32) * mask[:, None]
  return {'nll_sum': -jnp.sum(label_log_prob * mask), 'correct': jnp.sum(correct * mask),
          'count': jnp.sum(mask), 'brier_sum': jnp.sum(brier * mask),
          'bin_count': jnp.sum(bins, axis=0), 'bin_confidence': confidence @ bins,
          'bin_correct': correct @ bins}


def mean_log_probs(log_probs: jax.Array, axis: int = 0) -> jax.Array:
  """log of the mean over `axis` of the probabilities exp(log_probs): the ensemble's log probabilities."""
  return jax.nn.logsumexp(log_probs, axis=axis) - jnp.log(jnp.asarray(log_probs.shape[axis], log_probs.dtype))


def disagreement_sum(member_log_probs: jax.Array, mask: jax.Array) -> jax.Array:
  """Sum over examples of the fraction of ordered member pairs whose top-1 predictions differ.

  `member_log_probs` is (members, ..., num_classes); one member disagrees with nobody (0).
  """
  k, num_classes = member_log_probs.shape[0], member_log_probs.shape[-1]
  if k < 2:
    return jnp.zeros((), jnp.float32)
  votes = jax.nn.one_hot(jnp.argmax(member_log_probs, axis=-1), num_classes).sum(axis=0)  # (..., C)
  agreeing_pairs = jnp.sum(votes * (votes - 1.0), axis=-1)
  return jnp.sum((1.0 - agreeing_pairs / (k * (k - 1))) * mask)


def ensemble_sums(member_log_probs: jax.Array, labels: jax.Array, mask: jax.Array) -> dict[str, jax.Array]:
  """`calibration_sums` of the members' mean probabilities, their `disagreement_sum`, and the sum over
  examples of the members' mean NLL (`member_nll_sum`)."""
  sums = calibration_sums(mean_log_probs(member_log_probs), labels, mask)
  label_log_probs = jnp.take_along_axis(member_log_probs, labels[None, ..., None], axis=-1)[..., 0]
  sums['member_nll_sum'] = -jnp.sum(jnp.mean(label_log_probs, axis=0) * mask)
  sums['disagreement_sum'] = disagreement_sum(member_log_probs, mask)
  return sums


def summarize(sums) -> dict[str, float]:
  """Host metrics from sums: accuracy, nll, ece, brier (and member_nll, disagreement for an ensemble)."""
  sums = jax.tree.map(lambda x: np.asarray(x, np.float64), jax.device_get(sums))
  n = max(float(sums['count']), 1.0)
  gaps = np.abs(sums['bin_correct'] - sums['bin_confidence'])  # n_b * |acc_b - conf_b|
  out = {'accuracy': float(sums['correct']) / n, 'nll': float(sums['nll_sum']) / n,
         'ece': float(np.sum(gaps)) / n, 'brier': float(sums['brier_sum']) / n}
  for key in ('member_nll', 'disagreement'):
    if f'{key}_sum' in sums:
      out[key] = float(sums[f'{key}_sum']) / n
  return out


def reliability(sums) -> dict[str, list[float]]:
  """Per-bin count, mean confidence and accuracy (None for an empty bin): a reliability diagram's bars."""
  sums = jax.tree.map(lambda x: np.asarray(x, np.float64), jax.device_get(sums))
  count = sums['bin_count']

  def mean(total):
    return [float(t / c) if c else None for t, c in zip(total, count)]

  return {'count': count.tolist(), 'confidence': mean(sums['bin_confidence']),
          'accuracy': mean(sums['bin_correct'])}
