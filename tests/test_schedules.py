"""cifar_jax.schedules against a real torch.optim.SGD driven by torch's own schedulers.

Every comparison is EXACT float32 equality (np.testing.assert_array_equal): the lr (and momentum)
torch's optimizer holds when each optimizer step runs, cast with np.float32, against our schedule at
counts 0..n-1, through the concrete path, the table, a jitted pure_callback call and a jitted
horizon table. Schedulers are stepped after every batch or once per epoch of `steps_per_epoch`
batches. Most tests also check the host float64 values against torch's python floats, bitwise.
"""

import copy
import math
import pickle
import warnings

import numpy as np
import pytest

torch = pytest.importorskip('torch')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from torch.optim import lr_scheduler as tls  # noqa: E402
from torch.optim import swa_utils  # noqa: E402

from cifar_jax import schedules as S  # noqa: E402

NUM_RANDOM_DRAWS = 200


def make_optimizer(lr):
  """SGD(momentum=0.9) on one parameter that always has a gradient."""
  p = torch.nn.Parameter(torch.zeros(2))
  p.grad = torch.ones(2)
  return torch.optim.SGD([p], lr=lr, momentum=0.9)


def torch_run(make, n, lr=0.1, steps_per_epoch=None, step=None):
  """The (lr, momentum) each of n optimizer steps uses, as Runs; make(opt) builds the scheduler."""
  opt = make_optimizer(lr)
  sched = make(opt)
  lrs, moms = [], []
  for c in range(n):
    group = opt.param_groups[0]
    lrs.append(group['lr'])
    moms.append(group['momentum'])
    opt.step()
    if c == n - 1:
      break
    if steps_per_epoch is None or (c + 1) % steps_per_epoch == 0:
      if step is None:
        sched.step()
      else:
        step(sched, c)
  return Run(lrs), Run(moms)


class Run(np.ndarray):
  """torch's values cast with np.float32 (the target); .f64 keeps torch's python floats."""

  def __new__(cls, values):
    out = np.array([np.float32(v) for v in values], np.float32).view(cls)
    out.f64 = np.array(values, np.float64)
    return out

  def __array_finalize__(self, obj):
    self.f64 = getattr(obj, 'f64', None)


def assert_exact(sched, expected, jit=True):
  """Our schedule equals `expected` at counts 0..n-1 on every call path (and float64 bitwise)."""
  n = len(expected)
  target = np.asarray(expected).view(np.ndarray)
  last = sched(n - 1)  # a scalar first, on a fresh schedule: the replay must start from 0
  assert last.dtype == jnp.float32 and last.shape == ()
  assert np.float32(last) == target[-1]
  np.testing.assert_array_equal(np.asarray(sched(np.arange(n))), target)
  np.testing.assert_array_equal(np.asarray(sched(jnp.arange(n))), target)
  np.testing.assert_array_equal(sched.table(n), target)
  if getattr(expected, 'f64', None) is not None and len(expected.f64) == n:
    # Stronger than the float32 contract: the host replay reproduces torch's python floats bitwise.
    np.testing.assert_array_equal(sched.values_f64(np.arange(n)), expected.f64)
  if jit:
    traced = jax.jit(lambda c: sched(c))(jnp.arange(n))
    np.testing.assert_array_equal(np.asarray(traced), target)
    horizon = sched.with_horizon(n)
    tabled = jax.jit(lambda c: horizon(c))(jnp.arange(n))
    np.testing.assert_array_equal(np.asarray(tabled), target)


# -------------------------------------------------------------------------------------------------
# StepLR, MultiStepLR


@pytest.mark.parametrize('spe', [None, 3])
@pytest.mark.parametrize('lr,step_size,gamma,n', [
    (0.1, 1, 0.1, 30), (0.1, 3, 0.5, 60), (0.05, 7, 0.9, 150), (0.3, 30, 0.1, 100),
    (0.1, 2, 0.7, 100), (1.0, 4, 0.3, 50),
])
def test_step_lr(lr, step_size, gamma, n, spe):
  n = n * (spe or 1)
  expected, _ = torch_run(lambda o: tls.StepLR(o, step_size, gamma), n, lr, spe)
  assert_exact(S.step_lr(lr, step_size, gamma, steps_per_epoch=spe), expected)


@pytest.mark.parametrize('lr,milestones,gamma,epochs,spe', [
    (0.05, [25, 40], 0.1, 50, 3),  # the blog's baseline, per epoch
    (0.05, [25, 40], 0.1, 50, None),
    (0.1, [3, 3, 8], 0.5, 20, None),  # a repeated milestone counts twice
    (0.1, [8, 3], 0.3, 20, 2),  # unsorted
    (0.1, [0, 5], 0.5, 12, None),  # a milestone at 0 applies at construction
    (0.2, [10, 20, 30], 0.1, 35, 4),
    (0.3, [1, 2, 3, 4, 5, 6, 7], 0.7, 12, None),
])
def test_multistep_lr(lr, milestones, gamma, epochs, spe):
  n = epochs * (spe or 1)
  expected, _ = torch_run(lambda o: tls.MultiStepLR(o, milestones, gamma), n, lr, spe)
  assert_exact(S.multistep_lr(lr, milestones, gamma, steps_per_epoch=spe), expected)


# -------------------------------------------------------------------------------------------------
# CosineAnnealingLR (the recursion, including past T_max where it rises again)


@pytest.mark.parametrize('eta_min', [0.0, 0.001, 0.05])
@pytest.mark.parametrize('T_max', [1, 2, 7, 10, 50])
def test_cosine_per_batch(T_max, eta_min):
  n = 5 * T_max + 3
  expected, _ = torch_run(lambda o: tls.CosineAnnealingLR(o, T_max, eta_min), n, 0.1)
  assert_exact(S.cosine_annealing_lr(0.1, T_max, eta_min), expected)


@pytest.mark.parametrize('lr,T_max,eta_min,epochs,spe', [
    (0.2, 50, 0.0, 50, 3),  # the blog's cosine, per epoch
    (0.2, 50, 0.0, 120, 2),  # past T_max
    (0.1, 7, 0.01, 40, 5),
    (0.1, 7.5, 0.0, 40, 2),  # float T_max: never the special branch
    (0.1, 10, 0.2, 40, 3),  # eta_min above the base lr
])
def test_cosine_per_epoch(lr, T_max, eta_min, epochs, spe):
  n = epochs * spe
  expected, _ = torch_run(lambda o: tls.CosineAnnealingLR(o, T_max, eta_min), n, lr, spe)
  assert_exact(S.cosine_annealing_lr(lr, T_max, eta_min, steps_per_epoch=spe), expected)


# -------------------------------------------------------------------------------------------------
# CosineAnnealingWarmRestarts


@pytest.mark.parametrize('eta_min', [0.0, 0.01])
@pytest.mark.parametrize('T_mult', [1, 2, 3])
@pytest.mark.parametrize('T_0', [1, 3, 10])
def test_warm_restarts_per_batch(T_0, T_mult, eta_min):
  n = 150
  expected, _ = torch_run(
      lambda o: tls.CosineAnnealingWarmRestarts(o, T_0, T_mult, eta_min), n, 0.1)
  assert_exact(S.cosine_annealing_warm_restarts(0.1, T_0, T_mult, eta_min), expected)


@pytest.mark.parametrize('lr,T_0,T_mult,epochs,spe', [
    (0.2, 20, 2, 60, 3),  # the blog's warm restarts, per epoch
    (0.1, 5, 1, 23, 4),
    (0.1, 2, 3, 30, 2),
])
def test_warm_restarts_per_epoch(lr, T_0, T_mult, epochs, spe):
  n = epochs * spe
  expected, _ = torch_run(lambda o: tls.CosineAnnealingWarmRestarts(o, T_0, T_mult), n, lr, spe)
  assert_exact(S.cosine_annealing_warm_restarts(lr, T_0, T_mult, steps_per_epoch=spe), expected)


@pytest.mark.parametrize('T_0,T_mult,eta_min,iters,epochs', [
    (1, 3, 0.0, 2, 124),  # math.log bug at epoch 121 * T_0
    (1, 10, 0.001, 1, 113),  # math.log bug at epoch 111 * T_0
    (2, 2, 0.0, 7, 30),
    (3, 1, 0.01, 5, 20),
    (5, 2, 0.0, 13, 40),
])
def test_warm_restarts_fractional(T_0, T_mult, eta_min, iters, epochs):
  n = iters * epochs

  def step(sched, c):
    with warnings.catch_warnings():
      warnings.simplefilter('ignore', UserWarning)  # the epoch argument is deprecated
      sched.step(c // iters + (c % iters) / iters)

  expected, _ = torch_run(
      lambda o: tls.CosineAnnealingWarmRestarts(o, T_0, T_mult, eta_min), n, 0.1, step=step)
  sched = S.cosine_annealing_warm_restarts(0.1, T_0, T_mult, eta_min, steps_per_epoch=iters,
                                           fractional=True)
  assert_exact(sched, expected)
  assert expected[0] == expected[1] == np.float32(0.1)  # batches 0 and 1 both use the base lr
  if T_mult in (3, 10):  # the restart epoch where n comes out one too small: lr = eta_min, not base
    bug_epoch = {3: 121, 10: 111}[T_mult] * T_0
    assert expected[bug_epoch * iters + 1] == np.float32(eta_min)


# -------------------------------------------------------------------------------------------------
# CyclicLR (lr and momentum)


CYCLIC_CASES = [
    dict(mode='triangular', step_size_up=5),
    dict(mode='triangular', step_size_up=4, step_size_down=7),
    dict(mode='triangular', step_size_up=10, step_size_down=3),
    dict(mode='triangular', step_size_up=1, step_size_down=1),
    dict(mode='triangular', step_size_up=2.5),
    dict(mode='triangular2', step_size_up=5),
    dict(mode='triangular2', step_size_up=6, step_size_down=2),
    dict(mode='triangular2', step_size_up=3, step_size_down=11),
    dict(mode='exp_range', step_size_up=5, gamma=0.99),
    dict(mode='exp_range', step_size_up=7, step_size_down=4, gamma=0.9),
    dict(mode='exp_range', step_size_up=4, gamma=0.999),
    dict(mode='triangular', step_size_up=5, scale_fn=lambda x: 0.5 ** x, scale_mode='cycle'),
    dict(mode='triangular', step_size_up=5, scale_fn=lambda x: 1 / (1 + 0.1 * x),
         scale_mode='iterations'),
    dict(mode='triangular', step_size_up=5, base_momentum=0.85, max_momentum=0.95),
]


@pytest.mark.parametrize('kwargs', CYCLIC_CASES)
@pytest.mark.parametrize('base_lr,max_lr', [(0.001, 0.1), (0.01, 0.05)])
def test_cyclic(base_lr, max_lr, kwargs):
  n = 80
  lrs, moms = torch_run(lambda o: tls.CyclicLR(o, base_lr, max_lr, **kwargs), n, 0.5)
  lr_kwargs = {k: v for k, v in kwargs.items() if 'momentum' not in k}
  assert_exact(S.cyclic_lr(base_lr, max_lr, **lr_kwargs), lrs)
  assert_exact(S.cyclic_momentum(base_lr, max_lr, **kwargs), moms, jit=False)


# -------------------------------------------------------------------------------------------------
# OneCycleLR (lr and momentum), counts 0..total_steps inclusive


@pytest.mark.parametrize('three_phase', [False, True])
@pytest.mark.parametrize('anneal_strategy', ['cos', 'linear'])
@pytest.mark.parametrize('total_steps,pct_start', [
    (100, 0.3), (97, 0.3), (97, 0.25), (50, 0.45), (40, 0.7), (7, 0.3), (2, 0.3), (100, 0.0),
])
def test_one_cycle(total_steps, pct_start, anneal_strategy, three_phase):
  kw = dict(total_steps=total_steps, pct_start=pct_start, anneal_strategy=anneal_strategy,
            three_phase=three_phase)
  n = total_steps + 1  # torch computes an lr for step_num == total_steps too
  lrs, moms = torch_run(lambda o: tls.OneCycleLR(o, 0.1, **kw), n, 0.5)
  assert_exact(S.one_cycle_lr(0.1, **kw), lrs)
  assert_exact(S.one_cycle_momentum(0.1, **kw), moms, jit=False)


@pytest.mark.parametrize('kw', [
    dict(div_factor=10.0, final_div_factor=100.0),
    dict(div_factor=25.0, final_div_factor=1e4, base_momentum=0.8, max_momentum=0.9),
    dict(three_phase=True, div_factor=4.0, final_div_factor=1e3, base_momentum=0.7),
])
def test_one_cycle_factors(kw):
  total = 391 * 2
  n = total + 1
  lrs, moms = torch_run(lambda o: tls.OneCycleLR(o, 0.2, total_steps=total, **kw), n)
  lr_kw = {k: v for k, v in kw.items() if 'momentum' not in k}
  assert_exact(S.one_cycle_lr(0.2, total, **lr_kw), lrs)
  assert_exact(S.one_cycle_momentum(0.2, total, **kw), moms)


def test_one_cycle_raise():
  total = 20
  opt = make_optimizer(0.1)
  sched = tls.OneCycleLR(opt, 0.1, total_steps=total)
  for _ in range(total):
    opt.step()
    sched.step()  # step_num == total_steps is allowed
  last = opt.param_groups[0]['lr']
  opt.step()
  with pytest.raises(ValueError):
    sched.step()
  ours = S.one_cycle_lr(0.1, total)
  assert ours.max_count == total
  assert np.float32(ours(total)) == np.float32(last)
  with pytest.raises(ValueError, match='past the last count'):
    ours(total + 1)
  with pytest.raises(ValueError, match='past the last count'):
    ours(np.arange(total + 2))
  with pytest.raises(ValueError, match='past the last count'):
    ours.with_horizon(total + 2)
  ours.with_horizon(total + 1)


def test_one_cycle_pct_start_one():
  """pct_start=1.0: torch divides by zero on the step to total_steps: the last count is one less."""
  total = 10
  lrs, moms = torch_run(lambda o: tls.OneCycleLR(o, 0.1, total_steps=total, pct_start=1.0), total)
  ours = S.one_cycle_lr(0.1, total, pct_start=1.0)
  assert ours.max_count == total - 1
  assert_exact(ours, lrs)
  assert_exact(S.one_cycle_momentum(0.1, total, pct_start=1.0), moms, jit=False)
  opt = make_optimizer(0.1)
  sched = tls.OneCycleLR(opt, 0.1, total_steps=total, pct_start=1.0)
  for _ in range(total - 1):
    opt.step()
    sched.step()
  opt.step()
  with pytest.raises(ZeroDivisionError):
    sched.step()
  with pytest.raises(ValueError):
    ours(total)


# -------------------------------------------------------------------------------------------------
# LinearLR, LambdaLR, constant


@pytest.mark.parametrize('spe', [None, 4])
@pytest.mark.parametrize('start_factor,end_factor,total_iters', [
    (1.0 / 3, 1.0, 5), (0.1, 1.0, 10), (1.0, 0.1, 7), (0.5, 0.5, 3), (0.25, 1.0, 0),
    (0.001, 1.0, 100), (0.3, 0.0, 9),
])
def test_linear_lr(start_factor, end_factor, total_iters, spe):
  n = (total_iters + 10) * (spe or 1)
  expected, _ = torch_run(
      lambda o: tls.LinearLR(o, start_factor, end_factor, total_iters), n, 0.1, spe)
  assert_exact(S.linear_lr(0.1, start_factor, end_factor, total_iters, steps_per_epoch=spe),
               expected)


@pytest.mark.parametrize('spe', [None, 3])
@pytest.mark.parametrize('fn', [lambda t: 0.95**t, lambda t: 1 / (1 + t), lambda t: t // 3 + 1],
                         ids=['exp', 'inv', 'int'])
def test_lambda_lr(fn, spe):
  n = 40 * (spe or 1)
  expected, _ = torch_run(lambda o: tls.LambdaLR(o, fn), n, 0.07, spe)
  assert_exact(S.lambda_lr(0.07, fn, steps_per_epoch=spe), expected)


def test_constant_lr():
  expected, _ = torch_run(lambda o: None, 5, 0.01, step=lambda s, c: None)
  assert_exact(S.constant_lr(0.01), expected)


# -------------------------------------------------------------------------------------------------
# SequentialLR


def _seq_children(kind, lr, spe):
  """(torch factory, our schedule) for one SequentialLR child."""
  table = {
      'linear5': (lambda o: tls.LinearLR(o, 0.1, 1.0, 5), S.linear_lr(lr, 0.1, 1.0, 5, spe)),
      'cos45': (lambda o: tls.CosineAnnealingLR(o, 45), S.cosine_annealing_lr(lr, 45, 0.0, spe)),
      'cos20_eta': (lambda o: tls.CosineAnnealingLR(o, 20, 0.1),
                    S.cosine_annealing_lr(lr, 20, 0.1, spe)),
      'cos20_odd': (lambda o: tls.CosineAnnealingLR(o, 20, 0.0429),
                    S.cosine_annealing_lr(lr, 20, 0.0429, spe)),
      'step4': (lambda o: tls.StepLR(o, 4, 0.5), S.step_lr(lr, 4, 0.5, spe)),
      'multi': (lambda o: tls.MultiStepLR(o, [-1, 3], 0.5), S.multistep_lr(lr, [-1, 3], 0.5, spe)),
      'lambda': (lambda o: tls.LambdaLR(o, lambda t: 0.9**t),
                 S.lambda_lr(lr, lambda t: 0.9**t, spe)),
      'wr': (lambda o: tls.CosineAnnealingWarmRestarts(o, 4, 2),
             S.cosine_annealing_warm_restarts(lr, 4, 2, steps_per_epoch=spe)),
  }
  return table[kind]


@pytest.mark.parametrize('spe', [None, 3])
@pytest.mark.parametrize('lr,kinds,milestones,epochs', [
    (0.1, ['linear5', 'cos45'], [5], 50),  # LinearLR warm-up then cosine
    (0.3, ['linear5', 'cos20_eta'], [5], 50),
    # the cosine restarts from its closed form at 0: 0.0429 + (0.11 - 0.0429) != 0.11 in float64
    (0.11, ['linear5', 'cos20_odd'], [5], 40),
    (0.1, ['linear5', 'step4', 'cos45'], [5, 15], 40),
    (0.1, ['step4', 'cos45'], [0], 20),  # milestone 0: the second child gets the initial step
    (0.1, ['linear5', 'step4', 'cos20_eta'], [6, 6], 30),  # a repeated milestone skips a child
    (0.1, ['cos20_eta', 'multi', 'lambda', 'wr'], [7, 12, 20], 40),
])
def test_sequential(lr, kinds, milestones, epochs, spe):
  k = spe or 1
  pairs = [_seq_children(kind, lr, spe) for kind in kinds]

  def make(opt):
    return tls.SequentialLR(opt, [mk(opt) for mk, _ in pairs], milestones)

  expected, _ = torch_run(make, epochs * k, lr, spe)
  ours = S.sequential_lr([s for _, s in pairs], [m * k for m in milestones])
  assert_exact(ours, expected)


# -------------------------------------------------------------------------------------------------
# SWALR


@pytest.mark.parametrize('anneal_strategy', ['cos', 'linear'])
@pytest.mark.parametrize('anneal_epochs', [0, 1, 5, 10])
def test_swalr_alone(anneal_epochs, anneal_strategy):
  n = 30
  expected, _ = torch_run(
      lambda o: swa_utils.SWALR(o, 0.05, anneal_epochs, anneal_strategy), n, 0.1)
  assert_exact(S.swa_lr(0.05, anneal_epochs, anneal_strategy, start_lr=0.1), expected)


def torch_swa_run(lr, T_max, swa_lr, anneal_epochs, anneal_strategy, swa_start, epochs, spe):
  """torch's documented SWA loop: cosine until epoch swa_start, then SWALR.step() at epoch ends."""
  opt = make_optimizer(lr)
  sched = tls.CosineAnnealingLR(opt, T_max)
  swa = None
  if anneal_epochs > 0:  # built up front, as in torch's docs (anneal_epochs=0 would set the lr now)
    swa = swa_utils.SWALR(opt, swa_lr, anneal_epochs, anneal_strategy)
  lrs = []
  for epoch in range(epochs):
    for _ in range(spe):
      lrs.append(opt.param_groups[0]['lr'])
      opt.step()
    if epoch > swa_start:
      if swa is None:
        swa = swa_utils.SWALR(opt, swa_lr, anneal_epochs, anneal_strategy)
      swa.step()
    else:
      sched.step()
  return Run(lrs)


@pytest.mark.parametrize('anneal_strategy', ['cos', 'linear'])
@pytest.mark.parametrize('anneal_epochs', [0, 1, 4])
def test_swalr_handover_from_cosine(anneal_epochs, anneal_strategy):
  spe, epochs, swa_start = 3, 30, 12
  expected = torch_swa_run(0.1, 20, 0.05, anneal_epochs, anneal_strategy, swa_start, epochs, spe)
  cosine = S.cosine_annealing_lr(0.1, 20, steps_per_epoch=spe)
  ours = S.swa_lr(0.05, anneal_epochs, anneal_strategy, start_lr=cosine,
                  start_count=(swa_start + 2) * spe, steps_per_epoch=spe)
  assert_exact(ours, expected)


def test_swalr_handover_per_batch():
  n, start = 80, 37
  opt = make_optimizer(0.1)
  sched = tls.CosineAnnealingLR(opt, 50)
  swa = swa_utils.SWALR(opt, 0.02, 10, 'cos')
  lrs = []
  for c in range(n):
    lrs.append(opt.param_groups[0]['lr'])
    opt.step()
    (swa if c + 1 >= start else sched).step()
  ours = S.swa_lr(0.02, 10, 'cos', start_lr=S.cosine_annealing_lr(0.1, 50), start_count=start)
  assert_exact(ours, Run(lrs))


# -------------------------------------------------------------------------------------------------
# ReduceLROnPlateau


def _metrics(seed, n=120):
  """A noisy decreasing loss with long plateaus."""
  rng = np.random.default_rng(seed)
  base = np.repeat(np.linspace(2.0, 0.5, 8), n // 8)
  return (base + 0.02 * rng.standard_normal(base.shape)).tolist()


@pytest.mark.parametrize('kw', [
    dict(),
    dict(patience=0),
    dict(patience=2, factor=0.5, cooldown=3),
    dict(patience=3, threshold=0.01, threshold_mode='abs'),
    dict(patience=1, min_lr=1e-3, factor=0.3),
    dict(mode='max', patience=2),
    dict(mode='max', patience=1, threshold=0.05, threshold_mode='abs', cooldown=1),
    dict(patience=0, factor=0.5, eps=0.01),
])
@pytest.mark.parametrize('seed', [0, 1])
def test_plateau(kw, seed):
  metrics = _metrics(seed)
  if kw.get('mode') == 'max':
    metrics = [-m for m in metrics]
  opt = make_optimizer(0.1)
  sched = tls.ReduceLROnPlateau(opt, **kw)
  ctrl = S.PlateauController(0.1, **kw)
  half = len(metrics) // 2
  for i, m in enumerate(metrics):
    sched.step(m)
    assert ctrl.step(m) == opt.param_groups[0]['lr']
    if i == half:  # checkpoint round trip through plain python numbers
      state = ctrl.state_dict()
      assert all(type(v) in (int, float) for v in state.values())
      ctrl = S.PlateauController(0.1, **kw)
      ctrl.load_state_dict(dict(state))
  assert ctrl.lr < 0.1


# -------------------------------------------------------------------------------------------------
# Errors: where torch raises (at construction or later in the run), we raise ValueError up front.


@pytest.mark.parametrize('ours,theirs', [
    (lambda: S.one_cycle_lr(0.1, 10, pct_start=0.1),  # pct_start * total_steps == 1: 0 / 0
     lambda o: tls.OneCycleLR(o, 0.1, total_steps=10, pct_start=0.1)),
    (lambda: S.one_cycle_lr(0.1, 10, pct_start=1.5),
     lambda o: tls.OneCycleLR(o, 0.1, total_steps=10, pct_start=1.5)),
    (lambda: S.one_cycle_lr(0.1, 10, pct_start=1),  # torch insists on a float
     lambda o: tls.OneCycleLR(o, 0.1, total_steps=10, pct_start=1)),
    (lambda: S.one_cycle_lr(0.1, 0), lambda o: tls.OneCycleLR(o, 0.1, total_steps=0)),
    (lambda: S.one_cycle_lr(0.1, 10, anneal_strategy='exp'),
     lambda o: tls.OneCycleLR(o, 0.1, total_steps=10, anneal_strategy='exp')),
    (lambda: S.cyclic_lr(0.01, 0.1, step_size_up=0), lambda o: tls.CyclicLR(o, 0.01, 0.1, 0)),
    (lambda: S.cyclic_lr(0.01, 0.1, mode='tri'), lambda o: tls.CyclicLR(o, 0.01, 0.1, mode='tri')),
    (lambda: S.cosine_annealing_warm_restarts(0.1, 0),
     lambda o: tls.CosineAnnealingWarmRestarts(o, 0)),
    (lambda: S.cosine_annealing_warm_restarts(0.1, 5, T_mult=0),
     lambda o: tls.CosineAnnealingWarmRestarts(o, 5, 0)),
    (lambda: S.cosine_annealing_warm_restarts(0.1, 5, eta_min='0'),
     lambda o: tls.CosineAnnealingWarmRestarts(o, 5, eta_min='0')),
    (lambda: S.linear_lr(0.1, start_factor=0.0), lambda o: tls.LinearLR(o, 0.0)),
    (lambda: S.linear_lr(0.1, end_factor=1.5), lambda o: tls.LinearLR(o, 0.5, 1.5)),
    (lambda: S.swa_lr(0.05, -1, start_lr=0.1), lambda o: swa_utils.SWALR(o, 0.05, -1)),
    (lambda: S.swa_lr(0.05, 5, 'exp', start_lr=0.1), lambda o: swa_utils.SWALR(o, 0.05, 5, 'exp')),
    (lambda: S.PlateauController(0.1, factor=1.0), lambda o: tls.ReduceLROnPlateau(o, factor=1.0)),
    (lambda: S.PlateauController(0.1, mode='mid'), lambda o: tls.ReduceLROnPlateau(o, mode='mid')),
    (lambda: S.PlateauController(0.1, threshold_mode='x'),
     lambda o: tls.ReduceLROnPlateau(o, threshold_mode='x')),
    (lambda: S.step_lr(-0.1, 3), lambda o: torch.optim.SGD([torch.zeros(1)], lr=-0.1)),
])
def test_construction_errors_match_torch(ours, theirs):
  with pytest.raises((ValueError, ZeroDivisionError)):
    theirs(make_optimizer(0.1))
  with pytest.raises(ValueError):
    ours()


@pytest.mark.parametrize('ours,theirs,steps', [
    (lambda: S.cosine_annealing_lr(0.1, 0), lambda o: tls.CosineAnnealingLR(o, 0), 1),
    (lambda: S.step_lr(0.1, 0), lambda o: tls.StepLR(o, 0), 1),
])
def test_errors_later_in_torch(ours, theirs, steps):
  opt = make_optimizer(0.1)
  sched = theirs(opt)
  with pytest.raises(ZeroDivisionError):
    for _ in range(steps):
      opt.step()
      sched.step()
  with pytest.raises(ValueError):
    ours()


def test_other_errors():
  with pytest.raises(ValueError):
    S.sequential_lr([S.constant_lr(0.1), S.constant_lr(0.2)], [])
  with pytest.raises(ValueError):  # unsorted milestones
    S.sequential_lr([S.constant_lr(0.1), S.constant_lr(0.2), S.constant_lr(0.3)], [5, 3])
  with pytest.raises(ValueError):
    S.cosine_annealing_warm_restarts(0.1, 5, fractional=True)
  with pytest.raises(ValueError):
    S.swa_lr(0.05, start_lr=S.constant_lr(0.1))
  with pytest.raises(ValueError):
    S.swa_lr(0.05, start_lr=0.1, start_count=10, steps_per_epoch=3)
  with pytest.raises(ValueError):
    S.step_lr(0.1, 3, steps_per_epoch=0)
  with pytest.raises(ValueError):  # a one-cycle child would be stepped past total_steps
    S.sequential_lr([S.one_cycle_lr(0.1, 10), S.constant_lr(0.2)], [12])
  S.sequential_lr([S.one_cycle_lr(0.1, 10), S.constant_lr(0.2)], [11])
  with pytest.raises(ValueError):
    S.constant_lr(0.1)(-1)
  with pytest.raises(ValueError):
    S.constant_lr(0.1)(np.array([0.5]))


# -------------------------------------------------------------------------------------------------
# Call paths, memoisation, optax integration


def test_horizon_holds_last_value_and_memo_is_consistent():
  sched = S.cosine_annealing_lr(0.1, 10, 0.001, steps_per_epoch=7)
  far = np.asarray(sched(np.array([5000, 3, 70 * 7])))  # a far count first, then near ones
  full = sched.table(5001)
  np.testing.assert_array_equal(far, full[[5000, 3, 490]])
  horizon = sched.with_horizon(100)
  np.testing.assert_array_equal(np.asarray(horizon(np.array([0, 99, 100, 10**6]))),
                                full[[0, 99, 99, 99]])
  jitted = jax.jit(lambda c: horizon(c))(jnp.array([0, 99, 100, 10**6]))
  np.testing.assert_array_equal(np.asarray(jitted), full[[0, 99, 99, 99]])
  grid = np.asarray(sched(np.arange(12).reshape(3, 4)))
  assert grid.shape == (3, 4) and grid.dtype == np.float32
  vm = jax.jit(jax.vmap(lambda c: sched(c)))(jnp.arange(12))
  np.testing.assert_array_equal(np.asarray(vm), full[:12])


def test_copy_and_pickle():
  sched = S.sequential_lr([S.linear_lr(0.1, 0.1, 1.0, 5), S.cosine_annealing_lr(0.1, 20)], [5])
  before = sched.table(50)
  for clone in (copy.deepcopy(sched), pickle.loads(pickle.dumps(sched))):
    np.testing.assert_array_equal(clone.table(60)[:50], before)


@pytest.mark.parametrize('use_horizon', [False, True])
def test_optax_inject_hyperparams(use_horizon):
  """optax.inject_hyperparams in a jitted step applies torch's lr and momentum at each update."""
  total = 30
  lrs, moms = torch_run(lambda o: tls.OneCycleLR(o, 0.1, total_steps=total), total)
  lr_s, mom_s = S.one_cycle_lr(0.1, total), S.one_cycle_momentum(0.1, total)
  if use_horizon:
    lr_s, mom_s = lr_s.with_horizon(total), mom_s.with_horizon(total)
  tx = optax.inject_hyperparams(optax.sgd)(learning_rate=lr_s, momentum=mom_s)
  params = jnp.zeros(2)
  state = tx.init(params)

  @jax.jit
  def update(state, params):
    updates, state = tx.update(jnp.ones(2), state, params)
    return state, optax.apply_updates(params, updates)

  got_lr, got_mom = [], []
  for _ in range(total):
    state, params = update(state, params)
    got_lr.append(np.float32(state.hyperparams['learning_rate']))
    got_mom.append(np.float32(state.hyperparams['momentum']))
  np.testing.assert_array_equal(np.array(got_lr), lrs)
  np.testing.assert_array_equal(np.array(got_mom), moms)


# -------------------------------------------------------------------------------------------------
# The blog's budgets at batch 128 (391 steps per epoch), full length


BLOG = 391


@pytest.mark.parametrize('name,make,ours,lr,n,spe', [
    pytest.param(*case, id=case[0]) for case in [
    ('multistep', lambda o: tls.MultiStepLR(o, [25, 40]), S.multistep_lr(0.05, [25, 40], 0.1, BLOG),
     0.05, 50 * BLOG, BLOG),
    ('cosine_batch', lambda o: tls.CosineAnnealingLR(o, 50 * BLOG),
     S.cosine_annealing_lr(0.2, 50 * BLOG), 0.2, 50 * BLOG, None),
    ('cosine_batch_past', lambda o: tls.CosineAnnealingLR(o, 30 * BLOG, 1e-4),
     S.cosine_annealing_lr(0.2, 30 * BLOG, 1e-4), 0.2, 50 * BLOG, None),
    ('warm_restarts', lambda o: tls.CosineAnnealingWarmRestarts(o, 20, 2),
     S.cosine_annealing_warm_restarts(0.2, 20, 2, steps_per_epoch=BLOG), 0.2, 60 * BLOG, BLOG),
    ('cyclic', lambda o: tls.CyclicLR(o, 0.001, 0.1, 4 * BLOG, mode='triangular2'),
     S.cyclic_lr(0.001, 0.1, 4 * BLOG, mode='triangular2'), 0.1, 40 * BLOG, None),
    ('one_cycle_50', lambda o: tls.OneCycleLR(o, 0.1, total_steps=50 * BLOG),
     S.one_cycle_lr(0.1, 50 * BLOG), 0.1, 50 * BLOG + 1, None),
    ]
])
def test_blog_budgets(name, make, ours, lr, n, spe):
  expected, _ = torch_run(make, n, lr, spe)
  assert_exact(ours, expected)


def test_blog_warm_restarts_fractional():
  iters = BLOG

  def step(sched, c):
    with warnings.catch_warnings():
      warnings.simplefilter('ignore', UserWarning)
      sched.step(c // iters + (c % iters) / iters)

  expected, _ = torch_run(lambda o: tls.CosineAnnealingWarmRestarts(o, 20, 2), 60 * iters, 0.2,
                          step=step)
  ours = S.cosine_annealing_warm_restarts(0.2, 20, 2, steps_per_epoch=iters, fractional=True)
  assert_exact(ours, expected, jit=False)


# -------------------------------------------------------------------------------------------------
# Randomized arguments


def _random_case(rng):
  """(name, torch factory, our lr schedule, our momentum schedule or None, lr, n, spe)."""
  family = rng.choice(['one_cycle', 'cyclic', 'cosine', 'warm_restarts', 'step', 'multistep'])
  lr = float(10 ** rng.uniform(-3, 0))
  spe = None if rng.random() < 0.6 else int(rng.integers(1, 6))
  if family == 'one_cycle':
    total = int(rng.integers(3, 250))
    kw = dict(total_steps=total, pct_start=float(rng.uniform(0.05, 0.95)),
              anneal_strategy=str(rng.choice(['cos', 'linear'])),
              three_phase=bool(rng.random() < 0.5),
              div_factor=float(rng.uniform(2, 50)), final_div_factor=float(10 ** rng.uniform(1, 5)))
    mom = dict(base_momentum=float(rng.uniform(0.5, 0.85)),
               max_momentum=float(rng.uniform(0.86, 0.99)))
    if kw['pct_start'] * total <= 1.0 + 1e-9 and kw['pct_start'] * total >= 1.0 - 1e-9:
      kw['pct_start'] = 0.5
    return (family, lambda o: tls.OneCycleLR(o, lr, **kw, **mom), S.one_cycle_lr(lr, **kw),
            S.one_cycle_momentum(lr, **kw, **mom), lr, total + 1, None)
  if family == 'cyclic':
    up = int(rng.integers(1, 30))
    down = None if rng.random() < 0.4 else int(rng.integers(1, 30))
    mode = str(rng.choice(['triangular', 'triangular2', 'exp_range']))
    base_lr = lr / float(rng.uniform(2, 100))
    kw = dict(step_size_up=up, step_size_down=down, mode=mode, gamma=float(rng.uniform(0.9, 1.0)))
    mom = dict(base_momentum=float(rng.uniform(0.5, 0.85)),
               max_momentum=float(rng.uniform(0.86, 0.99)))
    return (family, lambda o: tls.CyclicLR(o, base_lr, lr, **kw, **mom),
            S.cyclic_lr(base_lr, lr, **kw), S.cyclic_momentum(base_lr, lr, **kw, **mom), lr,
            int(rng.integers(2, 250)), None)
  k = spe or 1
  epochs = int(rng.integers(2, 250 // k + 3))
  if family == 'cosine':
    T_max = int(rng.integers(1, 60))
    eta = 0.0 if rng.random() < 0.4 else lr * float(rng.uniform(0, 0.5))
    return (family, lambda o: tls.CosineAnnealingLR(o, T_max, eta),
            S.cosine_annealing_lr(lr, T_max, eta, spe), None, lr, epochs * k, spe)
  if family == 'warm_restarts':
    T_0, T_mult = int(rng.integers(1, 20)), int(rng.integers(1, 4))
    eta = 0.0 if rng.random() < 0.4 else lr * float(rng.uniform(0, 0.5))
    return (family, lambda o: tls.CosineAnnealingWarmRestarts(o, T_0, T_mult, eta),
            S.cosine_annealing_warm_restarts(lr, T_0, T_mult, eta, spe), None, lr, epochs * k, spe)
  gamma = float(rng.uniform(0.05, 0.99))
  if family == 'step':
    step_size = int(rng.integers(1, 30))
    return (family, lambda o: tls.StepLR(o, step_size, gamma), S.step_lr(lr, step_size, gamma, spe),
            None, lr, epochs * k, spe)
  milestones = sorted(rng.integers(0, 80, size=int(rng.integers(1, 6))).tolist())
  return (family, lambda o: tls.MultiStepLR(o, milestones, gamma),
          S.multistep_lr(lr, milestones, gamma, spe), None, lr, epochs * k, spe)


def test_randomized():
  rng = np.random.default_rng(20240607)
  for i in range(NUM_RANDOM_DRAWS):
    name, make, ours, ours_mom, lr, n, spe = _random_case(rng)
    lrs, moms = torch_run(make, n, lr, spe)
    msg = f'draw {i}: {name}'
    np.testing.assert_array_equal(np.asarray(ours(np.arange(n))), np.asarray(lrs), err_msg=msg)
    np.testing.assert_array_equal(ours.values_f64(np.arange(n)), lrs.f64, err_msg=msg)
    if ours_mom is not None:
      np.testing.assert_array_equal(np.asarray(ours_mom(np.arange(n))), np.asarray(moms),
                                    err_msg=msg + ' momentum')
      np.testing.assert_array_equal(ours_mom.values_f64(np.arange(n)), moms.f64, err_msg=msg)


# Fine-tuning schedules (README, "Fine-tuning pretrained weights") ---------------------------------------


def bit_get_lr(step, dataset_size, base_lr=0.003):
  """big_transfer/bit_hyperrule.py's get_lr, as BiT's torch loop calls it before every step."""
  supports = (100, 200, 300, 400, 500) if dataset_size < 20_000 else (
      (500, 3000, 6000, 9000, 10_000) if dataset_size < 500_000 else (500, 6000, 12_000, 18_000, 20_000))
  if step < supports[0]:
    return base_lr * step / supports[0]
  elif step >= supports[-1]:
    return None
  else:
    for s in supports[1:]:
      if s < step:
        base_lr /= 10
    return base_lr


@pytest.mark.parametrize('dataset_size, base_lr', [(5_000, 0.003), (50_000, 0.003), (1_000_000, 0.01)])
def test_bit_hyperrule(dataset_size, base_lr):
  """The lr BiT's loop writes into torch's param group before each step (`bit_train.py`)."""
  n = S.bit_supports(dataset_size)[-1]

  def set_lr(opt, c):
    opt.param_groups[0]['lr'] = bit_get_lr(c + 1, dataset_size, base_lr)

  expected, _ = torch_run(lambda o: o, n, 0.0, step=set_lr)
  assert_exact(S.bit_hyperrule(base_lr, dataset_size), expected)


def big_vision_warmup_cosine(warmup_steps, total_steps):
  """big_vision utils.create_learning_rate_schedule('cosine', warmup_steps=...) as a factor of the step."""
  def factor(step):
    progress = min(max((step - warmup_steps) / float(total_steps - warmup_steps), 0.0), 1.0)
    lr = 0.5 * (1.0 + math.cos(math.pi * progress))
    return lr * min(1.0, step / warmup_steps) if warmup_steps else lr
  return factor


@pytest.mark.parametrize('warmup_steps, total_steps, lr', [(500, 10_000, 0.003), (5, 40, 0.01), (0, 30, 0.1)])
def test_warmup_cosine(warmup_steps, total_steps, lr):
  expected, _ = torch_run(lambda o: tls.LambdaLR(o, big_vision_warmup_cosine(warmup_steps, total_steps)),
                          total_steps + 5, lr)
  assert_exact(S.warmup_cosine(lr, warmup_steps, total_steps), expected)
