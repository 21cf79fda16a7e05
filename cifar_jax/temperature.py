"""Temperature scaling (Guo et al. 2017; `evaluation.temperature`): one scalar T per row of the evaluation
table, fitted by minimising the held-out split's NLL of softmax(logits / T), applied to the row's logits.

A row's logits are its log predictive probabilities (a single model's log_softmax, an ensemble's or SWAG's
log mean probabilities), as swa_gaussian's temp_scaling.py scales the averaged predictions. Dividing them
by T keeps every argmax, so accuracy is unchanged; NLL, ECE and Brier change.

The fit: golden-section search on log T over [log T_MIN, log T_MAX], in float64 on the host. The NLL is
convex in 1/T (a log-sum-exp of functions linear in 1/T, less one linear in it), so it is unimodal in
log T and the search finds its minimum to GOLDEN_STEPS' precision (0.618^80 of the interval, below float64's
resolution) without a gradient or a starting point; a minimum beyond the interval stops at its end (T_MIN
for a set classified right and separably, where the NLL falls as T -> 0).
"""

import numpy as np

T_MIN, T_MAX = 1e-2, 1e2
GOLDEN_STEPS = 80
_INV_PHI = (np.sqrt(5.0) - 1.0) / 2.0


def _log_softmax(z: np.ndarray) -> np.ndarray:
  z = z - np.max(z, axis=-1, keepdims=True)
  return z - np.log(np.sum(np.exp(z), axis=-1, keepdims=True))


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
  """Mean NLL of softmax(logits / temperature) at `labels`; logits (..., n, classes), labels (n,)."""
  z = np.asarray(logits, np.float64).reshape(-1, np.shape(logits)[-1]) / temperature
  y = np.broadcast_to(labels, np.shape(logits)[:-1]).reshape(-1)
  return float(-np.mean(np.take_along_axis(_log_softmax(z), y[:, None], axis=-1)))


def fit(logits: np.ndarray, labels: np.ndarray) -> float:
  """The T in [T_MIN, T_MAX] minimising `nll(logits, labels, T)`: golden-section search on log T.

  Args:
    logits: (..., n, classes): every leading axis (a row's seeds) shares the one T.
    labels: (n,) integer labels.
  """
  lo, hi = np.log(T_MIN), np.log(T_MAX)
  f = lambda u: nll(logits, labels, float(np.exp(u)))
  a, b = hi - _INV_PHI * (hi - lo), lo + _INV_PHI * (hi - lo)
  fa, fb = f(a), f(b)
  for _ in range(GOLDEN_STEPS):
    if fa <= fb:
      hi, b, fb = b, a, fa
      a = hi - _INV_PHI * (hi - lo)
      fa = f(a)
    else:
      lo, a, fa = a, b, fb
      b = lo + _INV_PHI * (hi - lo)
      fb = f(b)
  candidates = [(f(lo), lo), (fa, a), (fb, b), (f(hi), hi)]  # the ends too: a minimum at the boundary
  return float(np.exp(min(candidates)[1]))


def scale(logits: np.ndarray, temperature: float) -> np.ndarray:
  """log_softmax(logits / temperature), in float64: the calibrated log probabilities."""
  return _log_softmax(np.asarray(logits, np.float64) / temperature)
