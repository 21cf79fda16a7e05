"""Small statistics for comparing runs across seeds: Student's t quantiles and Welch intervals."""

import math
import statistics

# Two-sided 95 % quantiles of Student's t by degrees of freedom (1..30); 1.96 beyond.
T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
         2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
         2.052, 2.048, 2.045, 2.042)


def t_quantile(df: float) -> float:
  """The 97.5 % quantile of Student's t (the nearest lower tabulated degrees of freedom)."""
  if not df or df < 1 or math.isnan(df):
    return float('nan')
  return T_975[int(df) - 1] if df < 31 else 1.96


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
