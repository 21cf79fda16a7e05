"""torch.optim.lr_scheduler (and swa_utils.SWALR) as optax schedules, equal to torch's float32 lr.

Every schedule is a callable `count -> lr` (float32), where `count` is the number of optimizer
updates already applied (0 for the first update), as optax.inject_hyperparams calls it.
`steps_per_epoch=None` means torch's scheduler is stepped after every batch; `steps_per_epoch=k`
means it is stepped once per epoch of k batches, so the lr at `count` is torch's value after
`count // k` scheduler steps.

Exactness: values are computed on the host in float64 Python by replaying what torch's `step()`
computes (its recursive `get_lr` formulas, branch order and operation order, math.cos/math.log),
then cast to float32, so they equal `np.float32(optimizer.param_groups[0]['lr'])` at every count,
including past T_max, at restarts and at one-cycle's phase ends (the float64 values are torch's,
bit for bit). Recursions are memoised as a growing prefix.

Calling a schedule:
  * concrete count (python/numpy int or array, concrete jax array): exact values for any count;
  * traced count (inside jax.jit): a `jax.pure_callback` to the same host computation (exact);
  * `schedule.with_horizon(num_steps)`: a schedule whose traced call indexes a float32 device
    table for counts 0..num_steps-1 (later counts hold the last value, concrete calls do the
    same). A jitted train step should use this. `schedule.table(num_steps)` is that table.

ReduceLROnPlateau depends on metrics, so it is a host-side controller (`PlateauController`).
"""

import bisect
import collections
import math
import numbers
import threading
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

ANNEAL_STRATEGIES = ('cos', 'linear')
CYCLIC_MODES = ('triangular', 'triangular2', 'exp_range')
CYCLIC_SCALE_MODES = ('cycle', 'iterations')
MIN_MEMO_GROWTH = 1024  # recursions are replayed at least this far ahead, then doubled


def _is_int(x) -> bool:
  """True for python/numpy integers, False for bools."""
  return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _check_steps_per_epoch(steps_per_epoch):
  """Validates steps_per_epoch (None or a positive int)."""
  if steps_per_epoch is not None and (not _is_int(steps_per_epoch) or steps_per_epoch <= 0):
    raise ValueError(f'steps_per_epoch must be None or a positive int, got {steps_per_epoch!r}')
  return None if steps_per_epoch is None else int(steps_per_epoch)


def _check_lr(name: str, lr) -> float:
  """Validates an optimizer lr the way torch.optim.SGD does (lr >= 0)."""
  if not isinstance(lr, numbers.Real) or isinstance(lr, bool) or not lr >= 0.0:
    raise ValueError(f'Invalid {name}: {lr!r} (torch.optim.SGD requires lr >= 0.0)')
  return float(lr)


def _as_counts(count) -> np.ndarray:
  """A concrete count (scalar or array) as a non-negative int64 numpy array."""
  counts = np.asarray(count)
  if not np.issubdtype(counts.dtype, np.integer):
    if not (np.issubdtype(counts.dtype, np.floating) and np.all(counts == np.floor(counts))):
      raise ValueError(f'count must be integer-valued, got dtype {counts.dtype}')
  counts = counts.astype(np.int64)
  if counts.size and counts.min() < 0:
    raise ValueError(f'count must be >= 0, got {counts.min()}')
  return counts


def _anneal_cos(start: float, end: float, pct: float) -> float:
  """torch OneCycleLR._annealing_cos."""
  cos_out = math.cos(math.pi * pct) + 1
  return end + (start - end) / 2.0 * cos_out


def _anneal_linear(start: float, end: float, pct: float) -> float:
  """torch OneCycleLR._annealing_linear."""
  return (end - start) * pct + start


class TorchSchedule:
  """Base class: a torch scheduler replayed on the host in float64; an optax schedule."""

  recursive = False  # True: values[t] = _next(values[t - 1], t), memoised as a prefix
  _max_step = None  # last scheduler step torch can compute (None: unbounded)

  def __init__(self, steps_per_epoch=None):
    self.steps_per_epoch = _check_steps_per_epoch(steps_per_epoch)
    self._epoch_len = self.steps_per_epoch  # counts per scheduler step (None: one)
    self._memo = {}  # seq_start -> (float64 buffer, filled length)
    self._points = {}  # pointwise cache: scheduler step -> float
    self._lock = threading.RLock()

  def __getstate__(self):
    state = self.__dict__.copy()
    state.pop('_lock', None)
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.RLock()

  def _first(self, seq_start: bool) -> float:
    """Recursive: the lr after construction (seq_start: after SequentialLR's _update_lr(0))."""
    raise NotImplementedError

  def _next(self, lr: float, t: int) -> float:
    """Recursive schedules: the lr after scheduler step t, given the group lr before it."""
    raise NotImplementedError

  def _at(self, t: int) -> float:
    """Pointwise schedules: the lr after t scheduler steps."""
    raise NotImplementedError

  @property
  def max_count(self) -> int | None:
    """Largest count torch can produce an lr for (None: unbounded)."""
    if self._max_step is None:
      return None
    return self._max_step if self._epoch_len is None else (self._max_step + 1) * self._epoch_len - 1

  def _step_values(self, steps: np.ndarray, seq_start: bool = False) -> np.ndarray:
    """Float64 lr after `steps` scheduler steps (an int array)."""
    if steps.size == 0:
      return np.zeros(steps.shape, np.float64)
    if self.recursive:
      return self._prefix(int(steps.max()) + 1, seq_start)[steps]
    with self._lock:
      uniq, inverse = np.unique(steps, return_inverse=True)
      vals = np.empty(uniq.shape, np.float64)
      for i, t in enumerate(uniq.tolist()):
        v = self._points.get(t)
        if v is None:
          v = self._points[t] = float(self._at(t))
        vals[i] = v
    return vals[inverse].reshape(steps.shape)

  def _prefix(self, n: int, seq_start: bool) -> np.ndarray:
    """The memoised recursion for scheduler steps 0..n-1 (at least), replayed literally from 0."""
    with self._lock:
      buf, size = self._memo.get(seq_start, (np.empty(0, np.float64), 0))
      if size < n:
        target = max(n, 2 * size, MIN_MEMO_GROWTH)
        new = np.empty(target, np.float64)
        new[:size] = buf[:size]
        lr = float(buf[size - 1]) if size else None
        t = size
        try:
          while t < target:
            lr = float(self._first(seq_start)) if t == 0 else float(self._next(lr, t))
            new[t] = lr
            t += 1
        except (ZeroDivisionError, OverflowError):
          if t < n:
            raise
        buf, size = new, t
        self._memo[seq_start] = (buf, size)
      return buf

  def _values(self, counts: np.ndarray, seq_start: bool = False) -> np.ndarray:
    """Float64 lrs at optimizer-update counts (validated int array)."""
    limit = self.max_count
    if limit is not None and counts.size and counts.max() > limit:
      raise ValueError(
          f'{type(self).__name__}: count {counts.max()} is past the last count torch allows '
          f'({limit}); torch raises on the scheduler.step() that would get there')
    steps = counts if self._epoch_len is None else counts // self._epoch_len
    return self._step_values(steps, seq_start)

  def values_f64(self, counts) -> np.ndarray:
    """Torch's float64 lr at each optimizer-update count (any shape)."""
    return self._values(_as_counts(counts))

  def table(self, num_steps: int) -> np.ndarray:
    """Float32 lrs for counts 0..num_steps-1."""
    if not _is_int(num_steps) or num_steps <= 0:
      raise ValueError(f'num_steps must be a positive int, got {num_steps!r}')
    return self._values(np.arange(num_steps, dtype=np.int64)).astype(np.float32)

  def with_horizon(self, num_steps: int) -> 'HorizonSchedule':
    """This schedule as a device table for counts 0..num_steps-1 (use inside jax.jit)."""
    return HorizonSchedule(self, num_steps)

  def _host_f32(self, count) -> np.ndarray:
    """Host side of a call: float32 lrs, same shape as count."""
    return self._values(_as_counts(count)).astype(np.float32)

  def __call__(self, count):
    """The lr (float32) at count; traced counts go through jax.pure_callback."""
    if isinstance(count, jax.core.Tracer):
      shape = jax.ShapeDtypeStruct(jnp.shape(count), jnp.float32)
      return jax.pure_callback(self._host_f32, shape, count, vmap_method='broadcast_all')
    return jnp.asarray(self._host_f32(count))

  def _check_start(self):
    """Evaluates the first value so construction raises where torch's constructor does."""
    try:
      self._values(np.zeros(1, np.int64))
    except (ZeroDivisionError, OverflowError) as e:
      raise ValueError(f'{type(self).__name__}: torch fails at its first step ({e!r})') from e


class HorizonSchedule:
  """A schedule's float32 table for counts 0..num_steps-1; later counts hold the last value."""

  def __init__(self, schedule: TorchSchedule, num_steps: int):
    limit = getattr(schedule, 'max_count', None)
    if limit is not None and _is_int(num_steps) and num_steps - 1 > limit:
      raise ValueError(
          f'{type(schedule).__name__}: horizon of {num_steps} counts needs count {num_steps - 1}, '
          f'past the last count torch allows ({limit})')
    self.schedule = schedule
    self.num_steps = int(num_steps)
    self._table = schedule.table(num_steps)

  def table(self, num_steps: int | None = None) -> np.ndarray:
    """The float32 table (optionally a prefix of it)."""
    return self._table if num_steps is None else self._table[:num_steps]

  def __call__(self, count):
    """table[clip(count, 0, num_steps - 1)], traced or concrete."""
    if isinstance(count, jax.core.Tracer):
      return jnp.asarray(self._table)[jnp.clip(count, 0, self.num_steps - 1)]
    counts = np.clip(_as_counts(count), 0, self.num_steps - 1)
    return jnp.asarray(self._table[counts])


class StepLR(TorchSchedule):
  """torch StepLR: lr *= gamma every step_size scheduler steps (recursive product)."""

  recursive = True

  def __init__(self, base_lr, step_size, gamma=0.1, steps_per_epoch=None):
    super().__init__(steps_per_epoch)
    if not isinstance(step_size, numbers.Real) or step_size == 0:
      raise ValueError(f'step_size must be a nonzero number, got {step_size!r} (torch: x % 0)')
    self.base_lr, self.step_size, self.gamma = _check_lr('base_lr', base_lr), step_size, gamma
    self._check_start()

  def _first(self, seq_start):
    if seq_start:  # _get_closed_form_lr at last_epoch 0
      return self.base_lr * self.gamma ** (0 // self.step_size)
    return self.base_lr

  def _next(self, lr, t):
    if t == 0 or t % self.step_size != 0:
      return lr
    return lr * self.gamma


class MultiStepLR(TorchSchedule):
  """torch MultiStepLR: lr *= gamma**(times t is listed) at each milestone t (recursive product)."""

  recursive = True

  def __init__(self, base_lr, milestones, gamma=0.1, steps_per_epoch=None):
    super().__init__(steps_per_epoch)
    self.base_lr, self.gamma = _check_lr('base_lr', base_lr), gamma
    self.milestones = collections.Counter(milestones)
    self._check_start()

  def _first(self, seq_start):
    if seq_start:  # _get_closed_form_lr at last_epoch 0
      return self.base_lr * self.gamma ** bisect.bisect_right(sorted(self.milestones.elements()), 0)
    return self._next(self.base_lr, 0)

  def _next(self, lr, t):
    if t not in self.milestones:
      return lr
    return lr * self.gamma ** self.milestones[t]


class CosineAnnealingLR(TorchSchedule):
  """torch CosineAnnealingLR as step() computes it: the recursion, which rises again after T_max."""

  recursive = True

  def __init__(self, base_lr, T_max, eta_min=0.0, steps_per_epoch=None):
    super().__init__(steps_per_epoch)
    if not isinstance(T_max, numbers.Real) or T_max == 0:
      raise ValueError(f'T_max must be a nonzero number, got {T_max!r} (torch: division by zero)')
    self.base_lr, self.T_max, self.eta_min = _check_lr('base_lr', base_lr), T_max, eta_min
    self._check_start()

  def _first(self, seq_start):
    if seq_start:  # _get_closed_form_lr at 0: not always bitwise base_lr when eta_min != 0
      return (self.eta_min + (self.base_lr - self.eta_min)
              * (1 + math.cos(math.pi * 0 / self.T_max)) / 2)
    return self.base_lr

  def _next(self, lr, t):
    T, eta = self.T_max, self.eta_min
    if (t - 1 - T) % (2 * T) == 0:
      return lr + (self.base_lr - eta) * (1 - math.cos(math.pi / T)) / 2
    return ((1 + math.cos(math.pi * t / T)) / (1 + math.cos(math.pi * (t - 1) / T)) * (lr - eta)
            + eta)


class CosineAnnealingWarmRestarts(TorchSchedule):
  """torch CosineAnnealingWarmRestarts: step() per batch/epoch, or step(epoch + i / iters)."""

  def __init__(self, base_lr, T_0, T_mult=1, eta_min=0.0, steps_per_epoch=None, fractional=False):
    super().__init__(steps_per_epoch)
    if not _is_int(T_0) or T_0 <= 0:
      raise ValueError(f'Expected positive integer T_0, but got {T_0}')
    if not _is_int(T_mult) or T_mult < 1:
      raise ValueError(f'Expected integer T_mult >= 1, but got {T_mult}')
    if not isinstance(eta_min, (float, int)) or isinstance(eta_min, bool):
      raise ValueError(f'Expected float or int eta_min, but got {eta_min} of type {type(eta_min)}')
    if fractional and self.steps_per_epoch is None:
      raise ValueError('fractional=True needs steps_per_epoch (the loop\'s iters)')
    self.base_lr, self.eta_min = _check_lr('base_lr', base_lr), eta_min
    self.T_0, self.T_mult, self.fractional = int(T_0), int(T_mult), bool(fractional)
    if self.fractional:
      self._epoch_len = None  # stepped every batch with a fractional epoch
    self._check_start()

  def _lr(self, T_cur, T_i) -> float:
    """get_lr for the current T_cur, T_i."""
    return self.eta_min + (self.base_lr - self.eta_min) * (1 + math.cos(math.pi * T_cur / T_i)) / 2

  def _at(self, t):
    if self.fractional:
      return self._at_fractional(t)
    T_cur, T_i = t, self.T_0  # step(): T_cur += 1; if T_cur >= T_i: T_cur %= T_i, T_i *= T_mult
    if self.T_mult == 1:
      T_cur = t % self.T_0
    else:
      while T_cur >= T_i:
        T_cur -= T_i
        T_i *= self.T_mult
    return self._lr(T_cur, T_i)

  def _at_fractional(self, g):
    """Batch g of `optimizer.step(); scheduler.step(epoch + i / iters)`: step(e) of batch g-1."""
    if g == 0:
      epoch = 0
    else:
      iters = self.steps_per_epoch
      epoch = (g - 1) // iters + ((g - 1) % iters) / iters
    T_0, T_mult, T_i = self.T_0, self.T_mult, self.T_0
    if epoch >= T_0:
      if T_mult == 1:
        T_cur = epoch % T_0
      else:  # torch's math.log rounding makes n one too small at some restart epochs: kept.
        n = int(math.log((epoch / T_0 * (T_mult - 1) + 1), T_mult))
        T_cur = epoch - T_0 * (T_mult**n - 1) / (T_mult - 1)
        T_i = T_0 * T_mult**n
    else:
      T_cur = epoch
    return self._lr(T_cur, T_i)


class CyclicLR(TorchSchedule):
  """torch CyclicLR (stepped every batch): the lr, or with quantity='momentum' the momentum."""

  def __init__(self, base_lr, max_lr, step_size_up=2000, step_size_down=None, mode='triangular',
               gamma=1.0, scale_fn=None, scale_mode='cycle', base_momentum=0.8, max_momentum=0.9,
               quantity='lr'):
    super().__init__(None)
    if mode not in CYCLIC_MODES and scale_fn is None:
      raise ValueError('mode is invalid and scale_fn is None')
    if scale_fn is not None and scale_mode not in CYCLIC_SCALE_MODES:
      raise ValueError(f'scale_mode must be one of {CYCLIC_SCALE_MODES}, got {scale_mode!r}')
    if quantity not in ('lr', 'momentum'):
      raise ValueError(f"quantity must be 'lr' or 'momentum', got {quantity!r}")
    step_size_up = float(step_size_up)
    step_size_down = float(step_size_down) if step_size_down is not None else step_size_up
    self.total_size = step_size_up + step_size_down
    if self.total_size == 0 or step_size_up == 0:
      raise ValueError(f'step_size_up must be nonzero, got {step_size_up} (torch: x / 0)')
    self.step_ratio = step_size_up / self.total_size
    self.base_lr, self.max_lr = float(base_lr), float(max_lr)
    self.base_momentum, self.max_momentum = float(base_momentum), float(max_momentum)
    self.mode, self.gamma, self.scale_fn, self.quantity = mode, gamma, scale_fn, quantity
    if scale_fn is None:  # torch's _init_scale_fn forces the scale mode of the built-in modes
      scale_mode = 'iterations' if mode == 'exp_range' else 'cycle'
    self.scale_mode = scale_mode
    self._check_start()

  def _scale(self, x) -> float:
    """torch CyclicLR.scale_fn."""
    if self.scale_fn is not None:
      return self.scale_fn(x)
    if self.mode == 'triangular':
      return 1.0
    if self.mode == 'triangular2':
      return 1 / (2.0 ** (x - 1))
    return self.gamma**x

  def _at(self, t):
    cycle = math.floor(1 + t / self.total_size)
    x = 1.0 + t / self.total_size - cycle
    if x <= self.step_ratio:
      scale_factor = x / self.step_ratio
    else:
      scale_factor = (x - 1) / (self.step_ratio - 1)
    scale = self._scale(cycle if self.scale_mode == 'cycle' else t)
    if self.quantity == 'lr':
      base_height = (self.max_lr - self.base_lr) * scale_factor
      return self.base_lr + base_height * scale
    base_height = (self.max_momentum - self.base_momentum) * scale_factor
    return self.max_momentum - base_height * scale


class OneCycleLR(TorchSchedule):
  """torch OneCycleLR (stepped every batch): the lr, or with quantity='momentum' the momentum."""

  def __init__(self, max_lr, total_steps, pct_start=0.3, anneal_strategy='cos', div_factor=25.0,
               final_div_factor=1e4, three_phase=False, base_momentum=0.85, max_momentum=0.95,
               quantity='lr'):
    super().__init__(None)
    if not _is_int(total_steps) or total_steps <= 0:
      raise ValueError(f'Expected positive integer total_steps, but got {total_steps}')
    if not isinstance(pct_start, float) or pct_start < 0 or pct_start > 1:
      raise ValueError(f'Expected float between 0 and 1 pct_start, but got {pct_start}')
    if anneal_strategy not in ANNEAL_STRATEGIES:
      raise ValueError(
          f"anneal_strategy must be one of 'cos' or 'linear', instead got {anneal_strategy}")
    if quantity not in ('lr', 'momentum'):
      raise ValueError(f"quantity must be 'lr' or 'momentum', got {quantity!r}")
    n = self.total_steps = int(total_steps)
    self.max_lr = float(max_lr)
    self.initial_lr = self.max_lr / div_factor
    self.min_lr = self.initial_lr / final_div_factor
    self.max_momentum, self.base_momentum = float(max_momentum), float(base_momentum)
    self.quantity = quantity
    self._anneal = _anneal_cos if anneal_strategy == 'cos' else _anneal_linear
    lo, peak, floor = self.initial_lr, self.max_lr, self.min_lr
    m_hi, m_lo = self.max_momentum, self.base_momentum
    # (end_step, start_lr, end_lr, start_momentum, end_momentum), as torch builds them
    if three_phase:
      self._phases = [(float(pct_start * n) - 1, lo, peak, m_hi, m_lo),
                      (float(2 * pct_start * n) - 2, peak, lo, m_lo, m_hi),
                      (n - 1, lo, floor, m_hi, m_hi)]
    else:
      self._phases = [(float(pct_start * n) - 1, lo, peak, m_hi, m_lo),
                      (n - 1, peak, floor, m_lo, m_hi)]
    self._check_start()  # pct_start * total_steps == 1 divides 0 by 0 at step 0, as in torch
    try:  # torch allows step_num == total_steps, unless that step divides by zero (pct_start 1.0)
      self._at(n)
      self._max_step = n
    except ZeroDivisionError:
      self._max_step = n - 1

  def _at(self, t):
    if t > self.total_steps:
      raise ValueError(
          f'Tried to step {t} times. The specified number of total steps is {self.total_steps}')
    start_step = 0.0
    last = len(self._phases) - 1
    for i, (end_step, lr0, lr1, m0, m1) in enumerate(self._phases):
      if t <= end_step or i == last:
        pct = (t - start_step) / (end_step - start_step)
        if self.quantity == 'lr':
          return self._anneal(lr0, lr1, pct)
        return self._anneal(m0, m1, pct)
      start_step = end_step
    raise AssertionError('unreachable')


class LinearLR(TorchSchedule):
  """torch LinearLR: factor start_factor -> end_factor over total_iters steps (recursive)."""

  recursive = True

  def __init__(self, base_lr, start_factor=1.0 / 3, end_factor=1.0, total_iters=5,
               steps_per_epoch=None):
    super().__init__(steps_per_epoch)
    if start_factor > 1.0 or start_factor <= 0:
      raise ValueError(
          'Starting multiplicative factor expected to be greater than 0 and less or equal to 1.')
    if end_factor > 1.0 or end_factor < 0:
      raise ValueError('Ending multiplicative factor expected to be between 0 and 1.')
    self.base_lr = _check_lr('base_lr', base_lr)
    self.start_factor, self.end_factor, self.total_iters = start_factor, end_factor, total_iters
    self._check_start()

  def _first(self, seq_start):
    s, e, n = self.start_factor, self.end_factor, self.total_iters
    if seq_start:  # _get_closed_form_lr at last_epoch 0
      return self.base_lr * (s + (e - s) * min(n, 0) / n)
    return self.base_lr * s

  def _next(self, lr, t):
    s, e, n = self.start_factor, self.end_factor, self.total_iters
    if t > n:
      return lr
    return lr * (1.0 + (e - s) / (n * s + (t - 1) * (e - s)))


class LambdaLR(TorchSchedule):
  """torch LambdaLR: base_lr * lr_lambda(t), t the scheduler step (lr_lambda runs on the host)."""

  def __init__(self, base_lr, lr_lambda, steps_per_epoch=None):
    super().__init__(steps_per_epoch)
    if not callable(lr_lambda):
      raise ValueError(f'lr_lambda should be a function, but got {type(lr_lambda).__name__}')
    self.base_lr, self.lr_lambda = _check_lr('base_lr', base_lr), lr_lambda
    self._check_start()

  def _at(self, t):
    return self.base_lr * self.lr_lambda(t)


class BitHyperRule(TorchSchedule):
  """BiT's HyperRule (big_transfer/bit_hyperrule.py `get_lr`), which BiT's torch loop writes into the
  optimizer's param group before each step: base_lr * t / warm-up, then base_lr divided by 10 once per
  support point passed. Past the last support point BiT stops; here the last lr holds."""

  def __init__(self, base_lr, dataset_size):
    super().__init__(None)
    self.base_lr = _check_lr('base_lr', base_lr)
    self.supports = bit_supports(dataset_size)

  def _at(self, t):
    supports, base_lr = self.supports, self.base_lr
    t = min(t, supports[-1] - 1)
    if t < supports[0]:
      return base_lr * t / supports[0]
    for s in supports[1:]:
      if s < t:
        base_lr /= 10
    return base_lr


def bit_supports(dataset_size: int) -> tuple[int, ...]:
  """BiT's `get_schedule`: warm-up end, the three decays, the end (in steps) for a dataset's size."""
  if dataset_size < 20_000:
    return (100, 200, 300, 400, 500)
  if dataset_size < 500_000:
    return (500, 3000, 6000, 9000, 10_000)
  return (500, 6000, 12_000, 18_000, 20_000)


class ConstantSchedule(TorchSchedule):
  """A plain constant lr (no scheduler); NOT torch's ConstantLR (factor for total_iters)."""

  def __init__(self, base_lr):
    super().__init__(None)
    self.base_lr = _check_lr('base_lr', base_lr)

  def _at(self, t):
    return self.base_lr


class SequentialLR(TorchSchedule):
  """torch SequentialLR over our schedules; milestones are optimizer-update counts."""

  def __init__(self, schedules: Sequence[TorchSchedule], milestones: Sequence[int]):
    super().__init__(None)
    schedules, milestones = list(schedules), list(milestones)
    if len(schedules) < 1:
      raise ValueError('SequentialLR expects at least one scheduler, but got no scheduler.')
    for i, s in enumerate(schedules):
      if not isinstance(s, TorchSchedule):
        raise ValueError(f'schedule {i} is a {type(s).__name__}, not a TorchSchedule')
      if isinstance(s, SWALR):
        raise ValueError('SWALR cannot be a SequentialLR child here; use swa_lr(start_lr=...)')
    if len(milestones) != len(schedules) - 1:
      raise ValueError(
          'Sequential Schedulers expects number of schedulers provided to be one more than the '
          f'number of milestone points, but got number of schedulers {len(schedules)} and the '
          f'number of milestones to be equal to {len(milestones)}')
    if any(not _is_int(m) or m < 0 for m in milestones) or milestones != sorted(milestones):
      raise ValueError(f'milestones must be non-negative, non-decreasing ints, got {milestones}')
    self.schedules, self.milestones = schedules, [int(m) for m in milestones]
    self._initial_idx = bisect.bisect_right(self.milestones, 0)  # gets _initial_step(); the others
    self._check_start()  # start from _update_lr(0) at their milestone
    for i, s in enumerate(schedules[:-1]):
      span = self.milestones[i] - (self.milestones[i - 1] if i > 0 else 0)
      if s.max_count is not None and span > 0 and span - 1 > s.max_count:
        raise ValueError(f'schedule {i} ({type(s).__name__}) runs for {span} counts, past the last '
                         f'count torch allows ({s.max_count})')
    for i, s in enumerate(schedules):
      if i != self._initial_idx:
        try:
          s._values(np.zeros(1, np.int64), seq_start=True)
        except (ZeroDivisionError, OverflowError) as e:
          raise ValueError(f'schedule {i}: torch fails at its milestone ({e!r})') from e

  @property
  def max_count(self):
    last = self.schedules[-1].max_count
    return None if last is None else last + (self.milestones[-1] if self.milestones else 0)

  def _values(self, counts, seq_start=False):
    idx = np.searchsorted(np.asarray(self.milestones, np.int64), counts, side='right')
    out = np.empty(counts.shape, np.float64)
    for i in np.unique(idx).tolist():
      mask = idx == i
      offset = self.milestones[i - 1] if i > 0 else 0
      out[mask] = self.schedules[i]._values(counts[mask] - offset, seq_start=i != self._initial_idx)
    return out


class SWALR(TorchSchedule):
  """torch swa_utils.SWALR, replayed literally (it re-derives its start lr from the group lr)."""

  recursive = True

  def __init__(self, swa_lr, anneal_epochs=10, anneal_strategy='cos', *, start_lr,
               start_count=None, steps_per_epoch=None, handover_count=None):
    super().__init__(steps_per_epoch)
    if anneal_strategy not in ANNEAL_STRATEGIES:
      raise ValueError(
          f"anneal_strategy must be one of 'cos' or 'linear', instead got {anneal_strategy}")
    if not _is_int(anneal_epochs) or anneal_epochs < 0:
      raise ValueError(f'anneal_epochs must be equal or greater than 0, got {anneal_epochs}')
    if callable(start_lr) and start_count is None:
      raise ValueError('start_lr is a schedule: give the start_count at which SWALR takes over')
    if not callable(start_lr):
      start_lr = _check_lr('start_lr', start_lr)
    if start_count is not None:
      if not _is_int(start_count) or start_count < 1:
        raise ValueError(f'start_count must be an int >= 1, got {start_count!r}')
      if self.steps_per_epoch is not None and start_count % self.steps_per_epoch:
        raise ValueError(f'start_count {start_count} is not a multiple of steps_per_epoch '
                         f'{self.steps_per_epoch} (SWALR is stepped at epoch ends)')
      start_count = int(start_count)
    self.swa_lr, self.anneal_epochs = float(swa_lr), anneal_epochs
    self.anneal_strategy = anneal_strategy
    if handover_count is not None and (start_count is None or not _is_int(handover_count)
                                       or handover_count < 0):
      raise ValueError(f'handover_count needs start_count and must be an int >= 0, got {handover_count!r}')
    self.start_lr, self.start_count = start_lr, start_count
    # The count of start_lr whose lr SWALR anneals from (default: the last count before start_count).
    self.handover_count = None if start_count is None else (
        start_count - 1 if handover_count is None else int(handover_count))
    self._check_start()

  def _anneal(self, t):
    """SWALR's anneal_func."""
    if self.anneal_strategy == 'cos':
      return (1 - math.cos(math.pi * t)) / 2
    return t

  def _step(self, lr, step):
    """SWALR.get_lr with _step_count - 1 == step and group lr == lr."""
    a = self.anneal_epochs
    if a == 0:
      step = max(1, step)
    prev_t = max(0, min(1, (step - 1) / max(1, a)))
    prev_alpha = self._anneal(prev_t)
    prev_lr = self.swa_lr if prev_alpha == 1 else (lr - prev_alpha * self.swa_lr) / (1 - prev_alpha)
    t = max(0, min(1, step / max(1, a)))
    alpha = self._anneal(t)
    return self.swa_lr * alpha + prev_lr * (1 - alpha)

  def _before(self, counts: np.ndarray) -> np.ndarray:
    """Float64 lr of the schedule SWALR takes over from."""
    prev = self.start_lr
    if isinstance(prev, TorchSchedule):
      return prev._values(counts)
    if isinstance(prev, HorizonSchedule):
      return prev.table()[np.clip(counts, 0, prev.num_steps - 1)].astype(np.float64)
    if callable(prev):
      return np.asarray(prev(counts), np.float64).reshape(counts.shape)
    return np.full(counts.shape, prev, np.float64)

  def _first(self, seq_start):
    if self.start_count is None:  # constructed on a group whose lr is start_lr
      return self._step(self.start_lr, 0)
    return float(self._before(np.asarray([self.handover_count], np.int64))[0])

  def _next(self, lr, t):
    return self._step(lr, t)

  def _values(self, counts, seq_start=False):
    if self.start_count is None:
      return super()._values(counts)
    out = np.empty(counts.shape, np.float64)
    before = counts < self.start_count
    out[before] = self._before(counts[before])
    after = counts[~before] - self.start_count
    k = 1 + (after if self._epoch_len is None else after // self._epoch_len)
    out[~before] = self._step_values(k)
    return out


class PlateauController:
  """torch ReduceLROnPlateau on the host: step(metric) -> the next epoch's lr (python float)."""

  def __init__(self, lr, mode='min', factor=0.1, patience=10, threshold=1e-4, threshold_mode='rel',
               cooldown=0, min_lr=0.0, eps=1e-8):
    if factor >= 1.0:
      raise ValueError('Factor should be < 1.0.')
    if mode not in ('min', 'max'):
      raise ValueError(f'mode {mode} is unknown!')
    if threshold_mode not in ('rel', 'abs'):
      raise ValueError(f'threshold mode {threshold_mode} is unknown!')
    self.lr = _check_lr('lr', lr)
    self.mode, self.factor, self.patience, self.threshold = mode, factor, patience, threshold
    self.threshold_mode, self.cooldown = threshold_mode, cooldown
    self.min_lr, self.eps = min_lr, eps
    self.best = math.inf if mode == 'min' else -math.inf
    self.num_bad_epochs = 0
    self.cooldown_counter = 0
    self.last_epoch = 0

  def _is_better(self, a: float, best: float) -> bool:
    """ReduceLROnPlateau._is_better."""
    if self.mode == 'min' and self.threshold_mode == 'rel':
      return a < best * (1.0 - self.threshold)
    if self.mode == 'min':
      return a < best - self.threshold
    if self.threshold_mode == 'rel':
      return a > best * (self.threshold + 1.0)
    return a > best + self.threshold

  def step(self, metric) -> float:
    """One epoch's metric; returns the (possibly reduced) lr."""
    current = float(metric)
    self.last_epoch += 1
    if self._is_better(current, self.best):
      self.best = current
      self.num_bad_epochs = 0
    else:
      self.num_bad_epochs += 1
    if self.cooldown_counter > 0:
      self.cooldown_counter -= 1
      self.num_bad_epochs = 0
    if self.num_bad_epochs > self.patience:
      old_lr = float(self.lr)
      new_lr = max(old_lr * self.factor, self.min_lr)
      if old_lr - new_lr > self.eps:
        self.lr = new_lr
      self.cooldown_counter = self.cooldown
      self.num_bad_epochs = 0
    return float(self.lr)

  def state_dict(self) -> dict[str, Any]:
    """Plain python numbers for a checkpoint."""
    return {'lr': float(self.lr), 'best': float(self.best),
            'num_bad_epochs': int(self.num_bad_epochs),
            'cooldown_counter': int(self.cooldown_counter), 'last_epoch': int(self.last_epoch)}

  def load_state_dict(self, state: dict[str, Any]) -> None:
    """Restores what state_dict returned."""
    self.lr, self.best = float(state['lr']), float(state['best'])
    self.num_bad_epochs = int(state['num_bad_epochs'])
    self.cooldown_counter = int(state['cooldown_counter'])
    self.last_epoch = int(state['last_epoch'])


def step_lr(base_lr, step_size, gamma=0.1, steps_per_epoch=None) -> StepLR:
  """torch StepLR."""
  return StepLR(base_lr, step_size, gamma, steps_per_epoch)


def multistep_lr(base_lr, milestones, gamma=0.1, steps_per_epoch=None) -> MultiStepLR:
  """torch MultiStepLR (milestones in scheduler steps: epochs when steps_per_epoch is set)."""
  return MultiStepLR(base_lr, milestones, gamma, steps_per_epoch)


def cosine_annealing_lr(base_lr, T_max, eta_min=0.0, steps_per_epoch=None) -> CosineAnnealingLR:
  """torch CosineAnnealingLR (rises again after T_max, as torch does)."""
  return CosineAnnealingLR(base_lr, T_max, eta_min, steps_per_epoch)


def cosine_annealing_warm_restarts(base_lr, T_0, T_mult=1, eta_min=0.0, steps_per_epoch=None,
                                   fractional=False) -> CosineAnnealingWarmRestarts:
  """torch CosineAnnealingWarmRestarts; fractional=True: the step(epoch + i / iters) loop."""
  return CosineAnnealingWarmRestarts(base_lr, T_0, T_mult, eta_min, steps_per_epoch, fractional)


def cyclic_lr(base_lr, max_lr, step_size_up=2000, step_size_down=None, mode='triangular', gamma=1.0,
              scale_fn=None, scale_mode='cycle') -> CyclicLR:
  """torch CyclicLR's lr (stepped every batch)."""
  return CyclicLR(base_lr, max_lr, step_size_up, step_size_down, mode, gamma, scale_fn, scale_mode)


def cyclic_momentum(base_lr, max_lr, step_size_up=2000, step_size_down=None, mode='triangular',
                    gamma=1.0, scale_fn=None, scale_mode='cycle', base_momentum=0.8,
                    max_momentum=0.9) -> CyclicLR:
  """torch CyclicLR's momentum (what it writes into the SGD group)."""
  return CyclicLR(base_lr, max_lr, step_size_up, step_size_down, mode, gamma, scale_fn, scale_mode,
                  base_momentum, max_momentum, quantity='momentum')


def one_cycle_lr(max_lr, total_steps, pct_start=0.3, anneal_strategy='cos', div_factor=25.0,
                 final_div_factor=1e4, three_phase=False) -> OneCycleLR:
  """torch OneCycleLR's lr; defined for counts 0..total_steps (see OneCycleLR.max_count)."""
  return OneCycleLR(max_lr, total_steps, pct_start, anneal_strategy, div_factor, final_div_factor,
                    three_phase)


def one_cycle_momentum(max_lr, total_steps, pct_start=0.3, anneal_strategy='cos', div_factor=25.0,
                       final_div_factor=1e4, three_phase=False, base_momentum=0.85,
                       max_momentum=0.95) -> OneCycleLR:
  """torch OneCycleLR's momentum."""
  return OneCycleLR(max_lr, total_steps, pct_start, anneal_strategy, div_factor, final_div_factor,
                    three_phase, base_momentum, max_momentum, quantity='momentum')


def linear_lr(base_lr, start_factor=1.0 / 3, end_factor=1.0, total_iters=5,
              steps_per_epoch=None) -> LinearLR:
  """torch LinearLR."""
  return LinearLR(base_lr, start_factor, end_factor, total_iters, steps_per_epoch)


def sequential_lr(schedules: Sequence[TorchSchedule], milestones: Sequence[int]) -> SequentialLR:
  """torch SequentialLR; milestones in optimizer-update counts (epoch * steps_per_epoch)."""
  return SequentialLR(schedules, milestones)


def lambda_lr(base_lr, lr_lambda: Callable[[int], float], steps_per_epoch=None) -> LambdaLR:
  """torch LambdaLR."""
  return LambdaLR(base_lr, lr_lambda, steps_per_epoch)


def bit_hyperrule(base_lr, dataset_size) -> BitHyperRule:
  """BiT's HyperRule lr schedule, per batch."""
  return BitHyperRule(base_lr, dataset_size)


def warmup_cosine_lambda(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
  """big_vision's 'linear warm-up then cosine' (utils.create_learning_rate_schedule, warmup and cosine
  decay to 0) as a LambdaLR factor of the step."""
  def factor(t: int) -> float:
    if t < warmup_steps:
      return t / warmup_steps
    progress = min(max((t - warmup_steps) / max(total_steps - warmup_steps, 1), 0.0), 1.0)
    return 0.5 * (1.0 + math.cos(math.pi * progress))
  return factor


def warmup_cosine(base_lr, warmup_steps: int, total_steps: int) -> LambdaLR:
  """big_vision's warm-up + cosine as torch's LambdaLR (per batch)."""
  return LambdaLR(base_lr, warmup_cosine_lambda(warmup_steps, total_steps))


def constant_lr(base_lr) -> ConstantSchedule:
  """A plain constant lr (no scheduler); not torch's ConstantLR."""
  return ConstantSchedule(base_lr)


def swa_lr(swa_lr, anneal_epochs=10, anneal_strategy='cos', *, start_lr, start_count=None,
           steps_per_epoch=None, handover_count=None) -> SWALR:
  """torch SWALR, alone (start_lr a float) or taking over from a schedule at start_count.

  It anneals from start_lr's value at `handover_count` (default start_count - 1, the last lr used
  before it; start_count when the preceding scheduler was stepped once more before the handover).
  """
  return SWALR(swa_lr, anneal_epochs, anneal_strategy, start_lr=start_lr, start_count=start_count,
               steps_per_epoch=steps_per_epoch, handover_count=handover_count)
