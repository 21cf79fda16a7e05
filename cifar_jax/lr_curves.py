"""The LR range test's curves, the two anchors' formulas: the lr ramp, the smoothed loss, the stopping rule
and the suggestions, equal to the anchors' on recorded loss arrays (tests/test_lr_find.py computes them the
anchors' way). `lr_find.py` runs the test.

- fastai (`fastai/callback/schedule.py`: LRFinder, valley, steep, minimum, slide; the Recorder's
  AvgSmoothLoss): lr_i = start * (end / start) ** (i / n), a debiased exponential moving average of the loss
  (beta 0.98), stop once it exceeds 4x the best, suggestions on the points [n // 10 : -5] up to the first NaN.
- torch-lr-finder (davidtvs, `torch_lr_finder/lr_finder.py`): lr_i = start * (end / start) ** (i / (n - 1)),
  0.05 * loss + 0.95 * previous (not debiased), stop above 5x the best, and the steepest point of
  np.gradient (against the step, so against log lr) on the points [10 : -5].
Both record the step that crossed the threshold. Computed in float64 (fastai keeps float32 tensors).
`lr_find.smoothing` names the anchor whose ramp, smoothing and stop factor a run uses; every suggestion is
computed on that curve, each in its own anchor's window.
"""

import math
import statistics

import ml_collections
import numpy as np

FASTAI, TORCH_LR_FINDER = 'fastai', 'torch_lr_finder'
SMOOTHINGS = (FASTAI, TORCH_LR_FINDER)
FASTAI_BETA = 0.98  # fastai's Recorder: AvgSmoothLoss(beta=0.98)
TORCH_SMOOTH_F = 0.05  # torch-lr-finder: range_test(smooth_f=0.05)
DIVERGE_FACTORS = {FASTAI: 4.0, TORCH_LR_FINDER: 5.0}  # lr_find.diverge_factor = 0 takes these
SKIP_END = 5  # both drop the last 5 points before suggesting (fastai [n//10:-5], torch plot(skip_end=5))
TORCH_SKIP_START = 10  # torch-lr-finder plot(skip_start=10)
MIN_STEPS = TORCH_SKIP_START + SKIP_END + 2  # torch-lr-finder's fewest points to suggest from
SLIDE_LR_DIFF, SLIDE_THRESH, SLIDE_ADJUST = 15, 0.005, 1.0  # fastai slide()'s defaults
# Which anchor each suggestion comes from (its window of the record).
SUGGESTIONS = {'valley': FASTAI, 'steep': FASTAI, 'minimum': FASTAI, 'slide': FASTAI,
               'steepest': TORCH_LR_FINDER}


# The anchors' formulas ----------------------------------------------------------------------------------


def ramp_denominator(num_steps: int, anchor: str) -> int:
  """lr_i = start * (end / start) ** (i / this): fastai's pos = i / n, torch-lr-finder's r = i / (n - 1)."""
  return num_steps if anchor == FASTAI else num_steps - 1


def lr_ramp(start_lr: float, end_lr: float, num_steps: int, anchor: str = FASTAI) -> np.ndarray:
  """The lr of each step (float64), as the anchor computes it."""
  denominator, ratio = ramp_denominator(num_steps, anchor), end_lr / start_lr
  return np.array([start_lr * ratio ** (i / denominator) for i in range(num_steps)], np.float64)


def smooth(raw_losses, anchor: str = FASTAI) -> np.ndarray:
  """The smoothed loss after each step: fastai's debiased EMA or torch-lr-finder's plain one."""
  out = np.empty(len(raw_losses), np.float64)
  ema = 0.0
  for i, loss in enumerate(np.asarray(raw_losses, np.float64).tolist()):
    if anchor == FASTAI:
      ema = loss + FASTAI_BETA * (ema - loss)  # torch.lerp(loss, ema, beta)
      out[i] = ema / (1 - FASTAI_BETA ** (i + 1))
    else:
      ema = loss if i == 0 else TORCH_SMOOTH_F * loss + (1 - TORCH_SMOOTH_F) * ema
      out[i] = ema
  return out


def divergence(smoothed, diverge_factor: float) -> int | None:
  """The first step whose smoothed loss exceeds diverge_factor times the best one so far (itself included),
  where both anchors stop after recording it; None if none. A NaN never compares, so it stops nothing."""
  best = math.inf
  for i, loss in enumerate(np.asarray(smoothed, np.float64).tolist()):
    best = min(best, loss) if loss == loss else best
    if loss > diverge_factor * best:
      return i
  return None


def recorded_length(smoothed, diverge_factor: float) -> int:
  """How many points the anchors record: up to and including the divergence, else all."""
  i = divergence(smoothed, diverge_factor)
  return len(smoothed) if i is None else i + 1


def suggestion_window(lrs, losses, num_steps: int, anchor: str) -> tuple[np.ndarray, np.ndarray]:
  """The recorded points an anchor suggests from: fastai's [num_steps // 10 : -5] up to the first NaN,
  torch-lr-finder's [10 : -5] (empty when the record is shorter than it allows)."""
  lrs, losses = np.asarray(lrs, np.float64), np.asarray(losses, np.float64)
  if anchor == FASTAI:
    lrs, losses = lrs[num_steps // 10:-SKIP_END], losses[num_steps // 10:-SKIP_END]
    nan = np.flatnonzero(np.isnan(losses))
    end = nan[0] if nan.size else len(losses)
    return lrs[:end], losses[:end]
  if len(lrs) < MIN_STEPS:
    return lrs[:0], losses[:0]
  return lrs[TORCH_SKIP_START:-SKIP_END], losses[TORCH_SKIP_START:-SKIP_END]


def _longest_fall(losses: np.ndarray) -> tuple[int, int]:
  """fastai valley's (start, end): `end` is the first point that ends a longest strictly decreasing
  subsequence of the losses, `start` is `end` minus that subsequence's length (fastai's index arithmetic,
  as if the subsequence were a contiguous run); (0, 0) when nothing decreases (fastai's initial values)."""
  length = np.ones(len(losses), np.int64)  # the longest decreasing subsequence ending at each point
  for i in range(1, len(losses)):
    length[i] = max(1, np.max(length[:i] + 1, initial=1, where=losses[i] < losses[:i]))
  end = int(np.argmax(length))
  return (end - int(length[end]), end) if end else (0, 0)


def valley(lrs: np.ndarray, losses: np.ndarray) -> float | None:
  """fastai's default: the point a third and a sixth into the longest fall of the loss."""
  if len(losses) == 0:
    return None
  start, end = _longest_fall(losses)
  third = (end - start) / 3
  return float(lrs[start + int(third) + int(third / 2)])


def steep(lrs: np.ndarray, losses: np.ndarray) -> float | None:
  """fastai: the left point of the steepest descent of the loss against log lr."""
  if len(losses) < 2:
    return None
  slopes = np.diff(losses) / np.diff(np.log(lrs))
  return float(lrs[np.argmin(slopes)])


def minimum(lrs: np.ndarray, losses: np.ndarray) -> float | None:
  """fastai: a tenth of the lr at the lowest loss."""
  if len(losses) == 0:
    return None
  return float(lrs[np.argmin(losses)]) / 10


def slide(lrs: np.ndarray, losses: np.ndarray) -> float | None:
  """fastai's interval slide rule: from the end, pairs of points 15 apart slide left while their
  np.gradient values differ by more than 0.005; the lr is the left point of the last pair that did."""
  n = len(losses)
  if n <= SLIDE_LR_DIFF:
    return None
  grad = np.gradient(losses)
  apart = np.abs(grad[SLIDE_LR_DIFF:] - grad[:-SLIDE_LR_DIFF])[::-1] > SLIDE_THRESH  # from the end
  slid = int(np.argmin(apart)) if not apart.all() else len(apart)  # pairs that slid
  return float(lrs[n - 1 - SLIDE_LR_DIFF - max(slid - 1, 0)]) * SLIDE_ADJUST


def steepest(lrs: np.ndarray, losses: np.ndarray) -> float | None:
  """torch-lr-finder: the lr where np.gradient of the loss (against the step) is lowest."""
  if len(losses) < 2:
    return None
  return float(lrs[np.argmin(np.gradient(losses))])


SUGGESTION_FNS = {'valley': valley, 'steep': steep, 'minimum': minimum, 'slide': slide,
                  'steepest': steepest}


def suggest(lrs, smoothed, num_steps: int) -> dict[str, float | None]:
  """Every suggestion of one recorded curve (None where its window holds too few points)."""
  return {name: SUGGESTION_FNS[name](*suggestion_window(lrs, smoothed, num_steps, anchor))
          for name, anchor in SUGGESTIONS.items()}


def diverge_factor(lr_find_config: ml_collections.ConfigDict) -> float:
  """lr_find.diverge_factor, or (0) the smoothing's anchor's: 4 (fastai), 5 (torch-lr-finder)."""
  return lr_find_config.diverge_factor or DIVERGE_FACTORS[lr_find_config.smoothing]


def curve(raw_losses, lrs, lr_find_config: ml_collections.ConfigDict) -> dict:
  """One seed's record as the anchor records it (lr, raw and smoothed loss per step) and its suggestions.

  `raw_losses` may stop early: after a non-finite loss every later one is NaN, as the anchors (which run
  on) would record up to num_steps.
  """
  lf = lr_find_config
  raw = np.asarray(raw_losses, np.float64)
  if raw.size < lf.num_steps and not np.all(np.isfinite(raw)):
    raw = np.concatenate([raw, np.full(lf.num_steps - raw.size, np.nan)])
  smoothed = smooth(raw, lf.smoothing)
  diverged = divergence(smoothed, diverge_factor(lf))
  n = len(smoothed) if diverged is None else diverged + 1
  record = {'lr': np.asarray(lrs[:n], np.float64), 'raw_loss': raw[:n], 'smoothed_loss': smoothed[:n],
            'diverged_at_step': diverged}
  record['suggestions'] = suggest(record['lr'], record['smoothed_loss'], lf.num_steps)
  return record


def stopped(raw_losses, lr_find_config: ml_collections.ConfigDict) -> bool:
  """Whether a seed's curve is over: it diverged by the rule, or its loss is no longer finite."""
  raw = np.asarray(raw_losses, np.float64)
  if not np.all(np.isfinite(raw)):
    return True
  return divergence(smooth(raw, lr_find_config.smoothing), diverge_factor(lr_find_config)) is not None


def spread(values: list) -> dict:
  """A suggestion over the seeds: per seed, median, min, max, and the sample std of log10 (ddof=1)."""
  have = [v for v in values if v is not None]
  out = {'per_seed': values, 'median': statistics.median(have) if have else None,
         'min': min(have) if have else None, 'max': max(have) if have else None}
  if len(have) > 1:
    out['log10_std'] = statistics.stdev(math.log10(v) for v in have)
  return out
