"""Small statistics for comparing runs across seeds: Student's t quantiles and Welch intervals."""

import math
import statistics

from scipy import stats as scipy_stats

CONFIDENCE = 0.95  # two-sided


def t_quantile(df: float) -> float:
  """The 97.5 % quantile of Student's t with `df` (possibly fractional: Welch) degrees of freedom."""
  if not df or df <= 0 or math.isnan(df):
    return float('nan')
  return float(scipy_stats.t.ppf(0.5 + CONFIDENCE / 2, df))


def welch_interval(a: list[float], b: list[float]) -> tuple[float, float, float]:
  """mean(a) - mean(b) and its 95 % Welch interval (nan bounds with fewer than 2 runs each)."""
  diff = statistics.fmean(a) - statistics.fmean(b)
  if len(a) < 2 or len(b) < 2:
    return diff, float('nan'), float('nan')
  va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
  se = math.sqrt(va + vb)
  if se == 0:
    return diff, diff, diff
  df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
  half = t_quantile(df) * se
  return diff, diff - half, diff + half
