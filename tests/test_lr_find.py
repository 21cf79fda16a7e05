"""The LR range test: its ramp, smoothing, stopping rule and suggestions equal fastai's and torch-lr-finder's
on recorded loss arrays (the references below follow their source), and a tiny run through the command line
falls, diverges, suggests an lr between, and leaves the workdir's training state alone."""

import hashlib
import json
import math
import os
import re
import sys

from absl import flags
from absl import logging
import numpy as np
import pytest

from cifar_jax import config_lib
from cifar_jax import lr_curves
from cifar_jax import lr_find
from cifar_jax import main
from cifar_jax import schedules
from cifar_jax.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, 'configs', 'tiny.py')

# References --------------------------------------------------------------------------------------------
#
# fastai 2: `Learner.lr_find` (fastai/callback/schedule.py) fits with the LRFinder callback: before each
# batch the lr is SchedExp(start, end) at pos = train_iter / num_it (num_it at least 6); after it, in
# callback order, TrainEvalCallback (order -10) counts the batch, the Recorder (order 50) feeds the loss to
# AvgSmoothLoss (fastai/learner.py: count += 1; val = torch.lerp(loss, val, beta); value =
# val / (1 - beta ** count), beta 0.98) and records lr and smoothed loss, and LRFinder (order 60) keeps the
# best smoothed loss, stops when the smoothed loss exceeds 4x it (stop_div) or when train_iter reaches
# num_it. lr_find then suggests from recorder.lrs / losses [num_it // 10 : -5], cut at the first NaN.


def torch_lerp(start, end, weight):
  """torch.lerp as its documentation defines it: start + weight * (end - start)."""
  return start + weight * (end - start)


def fastai_record(raw_losses, start_lr=1e-7, end_lr=10.0, num_it=100, stop_div=True):
  """(lrs, smoothed losses) fastai's Recorder holds after lr_find on batches with these losses."""
  num_it = max(num_it, 6)
  recorded_lrs, recorded_losses = [], []
  train_iter, best = 0, float('inf')
  count, val = 0, 0.0
  for loss in raw_losses:
    lr = start_lr * (end_lr / start_lr) ** (train_iter / num_it)
    train_iter += 1
    count += 1
    val = torch_lerp(loss, val, 0.98)
    smooth_loss = val / (1 - 0.98 ** count)
    recorded_lrs.append(lr)
    recorded_losses.append(smooth_loss)
    if smooth_loss < best:
      best = smooth_loss
    if smooth_loss > 4 * best and stop_div:
      break
    if train_iter >= num_it:
      break
  return np.array(recorded_lrs), np.array(recorded_losses)


def fastai_window(lrs, losses, num_it):
  lrs, losses = np.asarray(lrs)[num_it // 10:-5], np.asarray(losses)[num_it // 10:-5]
  nan = [i for i, x in enumerate(losses) if math.isnan(x)]
  if nan:
    lrs, losses = lrs[:min(nan)], losses[:min(nan)]
  return lrs, losses


def fastai_valley(lrs, losses):
  """Longest decreasing run (a subsequence: lds[i] over every earlier j), its end and start updated
  inside the loop over j; the suggestion a third and a sixth into it."""
  n = len(losses)
  best_start, best_end = 0, 0
  lds = [1] * n
  for i in range(1, n):
    for j in range(0, i):
      if losses[i] < losses[j] and lds[i] < lds[j] + 1:
        lds[i] = lds[j] + 1
      if lds[best_end] < lds[i]:
        best_end = i
        best_start = best_end - lds[best_end]
  sections = (best_end - best_start) / 3
  return float(lrs[best_start + int(sections) + int(sections / 2)])


def fastai_slide(lrs, losses, lr_diff=15, thresh=0.005, adjust_value=1.0):
  grad = np.gradient(np.asarray(losses))
  right = -1
  left = right - lr_diff
  local_min_lr = lrs[left]
  while left >= -len(losses) and abs(grad[right] - grad[left]) > thresh:
    local_min_lr = lrs[left]
    right -= 1
    left -= 1
  return float(local_min_lr) * adjust_value


def fastai_minimum(lrs, losses):
  return float(lrs[int(np.argmin(losses))]) / 10


def fastai_steep(lrs, losses):
  lrs, losses = np.asarray(lrs), np.asarray(losses)
  grads = (losses[1:] - losses[:-1]) / (np.log(lrs[1:]) - np.log(lrs[:-1]))
  return float(lrs[int(np.argmin(grads))])


# torch-lr-finder (torch_lr_finder/lr_finder.py): range_test steps ExponentialLR, whose get_lr at
# last_epoch = iteration is base_lr * (end_lr / base_lr) ** (iteration / (num_iter - 1)); the loss is
# smoothed as smooth_f * loss + (1 - smooth_f) * history[-1] after the first iteration (which sets
# best_loss), appended, and the test breaks once it exceeds diverge_th * best_loss. plot(suggest_lr=True)
# drops skip_start=10 and skip_end=5 points (needing 17) and takes the argmin of np.gradient.


def torch_lr_finder_record(raw_losses, start_lr, end_lr=10.0, num_iter=100, smooth_f=0.05, diverge_th=5):
  history_lr, history_loss = [], []
  best_loss = None
  for iteration in range(num_iter):
    loss = raw_losses[iteration]
    history_lr.append(start_lr * (end_lr / start_lr) ** (iteration / (num_iter - 1)))
    if iteration == 0:
      best_loss = loss
    else:
      if smooth_f > 0:
        loss = smooth_f * loss + (1 - smooth_f) * history_loss[-1]
      if loss < best_loss:
        best_loss = loss
    history_loss.append(loss)
    if loss > diverge_th * best_loss:
      break
  return np.array(history_lr), np.array(history_loss)


def torch_lr_finder_suggestion(lrs, losses, skip_start=10, skip_end=5):
  if len(lrs) < skip_start + skip_end + 2:
    return None  # torch-lr-finder raises RuntimeError
  lrs, losses = lrs[skip_start:-skip_end], losses[skip_start:-skip_end]
  return float(lrs[int(np.argmin(np.gradient(np.array(losses))))])


# Recorded loss arrays ------------------------------------------------------------------------------------


def range_test_losses(seed, n=100, noise=0.05, flat=40, low=80):
  """A range test's batch losses: flat, then falling, then diverging, with noise."""
  rng = np.random.default_rng(seed)
  i = np.arange(n)
  base = np.where(i < flat, 2.3, np.where(i < low, 2.3 - 1.3 * (i - flat) / (low - flat),
                                          1.0 + 0.5 * np.maximum(i - low, 0) ** 1.5))
  return base + rng.normal(0.0, noise, n)


def recorded_arrays():
  """Loss arrays as runs record them: synthetic curves, one that turns NaN before it diverges, one that
  never diverges, pure noise, and the narrow ResNet18's three seeds on CIFAR-10 (RESULTS.md)."""
  arrays = {f'curve{s}': range_test_losses(s, noise=0.02 + 0.03 * s) for s in range(4)}
  nan = range_test_losses(7)
  nan[70:] = np.nan
  arrays['nan_at_70'] = nan
  arrays['no_divergence'] = range_test_losses(8, low=200)
  arrays['noise'] = 2.3 + np.random.default_rng(9).normal(0.0, 0.3, 100)
  with open(os.path.join(ROOT, 'tests', 'fixtures', 'lr_find_resnet18_w025.json')) as f:
    for seed, raw in enumerate(json.load(f)['raw_loss']):
      arrays[f'resnet18_seed{seed}'] = np.array([np.nan if x is None else x for x in raw])
  return arrays


RECORDED = recorded_arrays()


def default_config():
  from configs import default  # pylint: disable=g-import-not-at-top

  return default.get_config()


def lr_find_config(smoothing, start_lr=1e-7, end_lr=10.0, num_steps=100, diverge_factor=0.0):
  config = default_config().lr_find
  config.update(start_lr=start_lr, end_lr=end_lr, num_steps=num_steps, smoothing=smoothing,
                diverge_factor=diverge_factor)
  return config


# The formulas ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize('num_steps', [17, 100, 301])
def test_lr_ramp_is_fastais_and_torch_lr_finders(num_steps):
  raw = np.full(num_steps, 2.0)  # never diverges: every lr is recorded
  fastai_lrs, _ = fastai_record(raw, 1e-7, 10.0, num_steps)
  torch_lrs, _ = torch_lr_finder_record(raw, 1e-5, 3.0, num_steps)
  np.testing.assert_array_equal(lr_curves.lr_ramp(1e-7, 10.0, num_steps, 'fastai'), fastai_lrs)
  np.testing.assert_array_equal(lr_curves.lr_ramp(1e-5, 3.0, num_steps, 'torch_lr_finder'), torch_lrs)
  assert torch_lrs[-1] == pytest.approx(3.0, rel=1e-12) and fastai_lrs[-1] < 10.0


@pytest.mark.parametrize('smoothing', ['fastai', 'torch_lr_finder'])
def test_the_device_ramp_is_the_host_ramp_in_float32(smoothing):
  """range_test's optimizer reads lambda_lr's table: float32 of lr_ramp, the same float64 operations."""
  lf = lr_find_config(smoothing, 1e-6, 3.0, 50)
  ratio, denominator = lf.end_lr / lf.start_lr, lr_curves.ramp_denominator(lf.num_steps, smoothing)
  lr_fn = schedules.lambda_lr(lf.start_lr, lambda t: ratio ** (t / denominator)).with_horizon(lf.num_steps)
  ramp = lr_curves.lr_ramp(lf.start_lr, lf.end_lr, lf.num_steps, smoothing)
  np.testing.assert_array_equal(lr_fn.schedule.values_f64(np.arange(lf.num_steps)), ramp)
  np.testing.assert_array_equal(lr_fn.table(), ramp.astype(np.float32))


@pytest.mark.parametrize('name', sorted(RECORDED))
def test_smoothing_stop_and_suggestions_equal_fastais(name):
  raw = RECORDED[name]
  lrs, smoothed = fastai_record(raw, num_it=100)
  lf = lr_find_config('fastai')
  record = lr_curves.curve(raw[:len(lrs)], lr_curves.lr_ramp(1e-7, 10.0, 100), lf)
  np.testing.assert_array_equal(record['lr'], lrs)
  np.testing.assert_array_equal(record['smoothed_loss'], smoothed)
  window = fastai_window(lrs, smoothed, 100)
  expected = {'valley': fastai_valley(*window), 'steep': fastai_steep(*window),
              'minimum': fastai_minimum(*window), 'slide': fastai_slide(*window)}
  assert {k: record['suggestions'][k] for k in expected} == expected


@pytest.mark.parametrize('name', sorted(RECORDED))
def test_smoothing_stop_and_suggestion_equal_torch_lr_finders(name):
  raw = RECORDED[name]
  lrs, smoothed = torch_lr_finder_record(raw, 1e-5, 10.0, 100)
  lf = lr_find_config('torch_lr_finder', start_lr=1e-5)
  record = lr_curves.curve(raw[:len(lrs)], lr_curves.lr_ramp(1e-5, 10.0, 100, 'torch_lr_finder'), lf)
  np.testing.assert_array_equal(record['lr'], lrs)
  np.testing.assert_array_equal(record['smoothed_loss'], smoothed)
  assert record['suggestions']['steepest'] == torch_lr_finder_suggestion(lrs, smoothed)


@pytest.mark.parametrize('diverge_factor', [1.5, 3.0])
def test_diverge_factor_is_the_anchors_threshold(diverge_factor):
  raw = RECORDED['curve1']
  lrs, smoothed = torch_lr_finder_record(raw, 1e-7, 10.0, 100, diverge_th=diverge_factor)
  record = lr_curves.curve(raw, lr_curves.lr_ramp(1e-7, 10.0, 100, 'torch_lr_finder'),
                           lr_find_config('torch_lr_finder', diverge_factor=diverge_factor))
  assert len(record['lr']) == len(lrs) < 100
  assert record['diverged_at_step'] == len(lrs) - 1


def test_a_run_stops_once_every_curve_is_over():
  lf = lr_find_config('fastai')
  lrs, _ = fastai_record(RECORDED['curve0'])
  stop = len(lrs)  # the step fastai stops after, counted from 1
  assert not lr_curves.stopped(RECORDED['curve0'][:stop - 1], lf)
  assert lr_curves.stopped(RECORDED['curve0'][:stop], lf)
  assert lr_curves.stopped(RECORDED['nan_at_70'][:71], lf)  # no longer finite: nothing more to record
  # A run that stopped at a NaN records NaN to the end, as fastai (which runs on) would.
  record = lr_curves.curve(RECORDED['nan_at_70'][:71], lr_curves.lr_ramp(1e-7, 10.0, 100), lf)
  assert len(record['smoothed_loss']) == 100 and np.isnan(record['smoothed_loss'][-1])


@pytest.mark.parametrize('seed', range(8))
def test_suggestions_on_short_and_tied_arrays_equal_fastais(seed):
  """Random walks of 1 to 60 points, rounded to one decimal so that losses tie (valley's strict
  comparisons), and two that never fall (fastai's valley then stays at its first point)."""
  rng = np.random.default_rng(seed)
  for n in [1, 2, 3, 16, 17, *rng.integers(4, 60, 6)]:
    walk = np.round(np.cumsum(rng.normal(0.0, 0.1, n)) + rng.normal(0.0, 1.0, n), 1)
    for losses in (walk, np.sort(walk), np.full(n, 2.3)):
      lrs = lr_curves.lr_ramp(1e-7, 10.0, 100)[:n]
      assert lr_curves.valley(lrs, losses) == fastai_valley(lrs, losses)
      assert lr_curves.minimum(lrs, losses) == fastai_minimum(lrs, losses)
      if n >= 2:
        assert lr_curves.steep(lrs, losses) == fastai_steep(lrs, losses)
      if n >= 16:
        assert lr_curves.slide(lrs, losses) == fastai_slide(lrs, losses)


@pytest.mark.parametrize('spike_at', [2, 8, 12, 20])
def test_an_early_spike_does_not_fool_valley(spike_at):
  """One batch's loss jumps to 15 early on: the smoothed curve carries a decaying bump. valley still
  suggests an lr where the loss falls (steps 40-80 of the curve); steep, the steepest descent, is fooled
  by the bump's decay on the flat part. Over 3 seeds, one spiking, the median of steep is not."""
  raw = range_test_losses(0)
  raw[spike_at] = 15.0
  lrs, smoothed = fastai_record(raw)
  lf = lr_find_config('fastai')
  record = lr_curves.curve(raw, lr_curves.lr_ramp(1e-7, 10.0, 100), lf)
  falling = (lrs[40], lrs[80])
  assert falling[0] <= record['suggestions']['valley'] <= falling[1]
  assert record['suggestions']['valley'] == fastai_valley(*fastai_window(lrs, smoothed, 100))
  assert record['suggestions']['steep'] < falling[0]
  others = [lr_curves.curve(range_test_losses(s), lr_curves.lr_ramp(1e-7, 10.0, 100), lf) for s in (1, 2)]
  median = lr_curves.spread([c['suggestions']['steep'] for c in [record, *others]])['median']
  assert falling[0] <= median <= falling[1]


def test_suggestions_need_enough_points():
  lrs = lr_curves.lr_ramp(1e-7, 10.0, 100)[:8]
  losses = np.linspace(2.3, 1.0, 8)
  assert lr_curves.suggest(lrs, losses, 100) == dict.fromkeys(lr_curves.SUGGESTIONS)


def test_spread_over_seeds():
  s = lr_curves.spread([0.1, 0.01, None, 0.03])
  assert (s['median'], s['min'], s['max']) == (0.03, 0.01, 0.1)
  assert s['log10_std'] == pytest.approx(np.std(np.log10([0.1, 0.01, 0.03]), ddof=1))
  assert lr_curves.spread([None]) == {'per_seed': [None], 'median': None, 'min': None, 'max': None}


@pytest.mark.parametrize('field, value, fragment', [
    ('smoothing', 'ema', "lr_find.smoothing must be one of ['fastai', 'torch_lr_finder']"),
    ('num_steps', 10, 'lr_find.num_steps must be an integer >= 17'),
    ('end_lr', 1e-8, 'lr_find.end_lr must exceed lr_find.start_lr'),
    ('diverge_factor', 0.5, 'lr_find.diverge_factor must be 0'),
    ('suggestion', 'median', 'lr_find.suggestion must be one of'),
])
def test_bad_lr_find_fields(field, value, fragment):
  config = default_config()
  config.lr_find[field] = value
  with pytest.raises(ConfigError, match=re.escape(fragment)):
    config_lib.validate(config)


# A tiny run ----------------------------------------------------------------------------------------------


def _snapshot(folder):
  """Every file under `folder`: its bytes' hash and modification time."""
  out = {}
  for root, _, files in os.walk(folder):
    for name in files:
      path = os.path.join(root, name)
      with open(path, 'rb') as f:
        out[os.path.relpath(path, folder)] = (hashlib.sha256(f.read()).hexdigest(), os.stat(path).st_mtime_ns)
  return out


def test_tiny_run_falls_diverges_and_leaves_the_training_state(tmp_path, monkeypatch, capsys):
  """`cifar-jax --mode=lr_find` on configs/tiny.py with 2 seeds, in a workdir holding a training run's
  files: each curve falls then diverges, the suggestion lies between, and only lr_find.* are added."""
  workdir = tmp_path / 'run'
  (workdir / 'checkpoints' / '4').mkdir(parents=True)
  (workdir / 'checkpoints' / '4' / 'state').write_bytes(b'\x00checkpoint')
  (workdir / 'metrics.jsonl').write_text('{"epoch": 1, "step": 4}\n')
  (workdir / 'config.json').write_text('{"model": {"name": "resnet50"}}')  # a run would refuse it
  before = _snapshot(workdir)
  argv = ['cifar-jax', f'--config={TINY}', f'--workdir={workdir}', '--mode=lr_find',
          '--config.num_seeds=2', '--config.data.synthetic_train_size=256', '--config.lr_find.start_lr=1e-3',
          '--config.lr_find.end_lr=1e3', '--config.lr_find.num_steps=60']
  flag_values = flags.FlagValues()
  main.define_flags(flag_values)
  monkeypatch.setattr(sys, 'argv', argv)
  verbosity = logging.get_verbosity()
  try:
    main.main(main.parse_flags(argv, flag_values), flag_values)
  finally:
    logging.set_verbosity(verbosity)
  out = capsys.readouterr().out

  after = _snapshot(workdir)
  assert sorted(set(after) - set(before)) == sorted([lr_find.JSON_FILE, lr_find.PLOT_FILE])
  assert {k: after[k] for k in before} == before
  with open(workdir / lr_find.JSON_FILE) as f:
    result = json.load(f)
  assert result['num_seeds'] == 2 and result['seeds'] == [0, 1]
  np.testing.assert_array_equal(result['lr'], lr_curves.lr_ramp(1e-3, 1e3, 60))
  for c in result['per_seed']:
    raw = np.array([np.nan if x is None else x for x in c['raw_loss']])
    lrs, smoothed = fastai_record(raw, 1e-3, 1e3, 60)  # the record is fastai's on these losses
    np.testing.assert_array_equal(c['smoothed_loss'], smoothed)
    assert c['diverged_at_step'] is not None and c['diverged_at_step'] < 59  # it diverged
    lowest = int(np.argmin(smoothed))
    assert smoothed[lowest] < smoothed[0] - 0.05  # it fell first
    for name in ('valley', result['suggestion']):
      lr = c['suggestions'][name]
      assert lrs[0] < lr < lrs[c['diverged_at_step']], name
      assert smoothed[int(np.argmin(np.abs(lrs - lr)))] < smoothed[0], name  # on the falling part
  chosen = [c['suggestions'][result['suggestion']] for c in result['per_seed']]
  assert result['suggestion'] == 'steep'  # the default (configs/default.py)
  assert result['max_lr'] == result['suggestions']['steep']['median'] == pytest.approx(np.median(chosen))
  assert f'--config.schedule.max_lr={result["max_lr"]:.3g}' in out.splitlines()[-1]
