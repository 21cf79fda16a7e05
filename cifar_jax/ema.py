"""An exponential moving average of the weights (`config.ema`): timm's ModelEmaV2 / ModelEmaV3.

The average lives in the TrainState (`ema_params`, `ema_batch_stats`; None when off), so it is on the
device, per seed, checkpointed and resumed with everything else, and it is updated inside the compiled
train step (`steps.train_step_on_device_data`), right after the optimizer's update. Semantics (timm
`timm/utils/model_ema.py`):
- The average starts as a copy of the initial model (timm copies the model when it builds the EMA).
- After every `every_steps`-th optimizer step: ema = d * ema + (1 - d) * params (ModelEmaV2's `update`).
- d is `decay`, or with `warmup` min(decay, (1 + t) / (10 + t)), t the updates done before this one
  (0 for the first): the warm-up the issue names, TensorFlow's ExponentialMovingAverage(num_updates=t)
  rule; timm ModelEmaV3's own `use_warmup` is another curve, 1 - (1 + t / gamma)^-power, not offered.
- BatchNorm statistics: `average`d with the same d (ModelEmaV2, and ModelEmaV3's default: every floating
  buffer is interpolated) or `copy`d from the running model at each update (ModelEmaV3's
  exclude_buffers=True).
"""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections

BATCH_STATS = ('average', 'copy')
# The evaluation table's rows of the average: each seed's, and with several seeds their ensemble's.
NAMES = ('EMA', 'EMA ensemble')


@dataclasses.dataclass(frozen=True)
class Ema:
  """`config.ema` as the compiled step takes it (hashable: bound with functools.partial)."""

  decay: float
  warmup: bool = False
  every_steps: int = 1
  batch_stats: str = 'average'


def from_config(config: ml_collections.ConfigDict) -> Ema | None:
  """The run's `Ema`, or None when `config.ema` is off (or absent)."""
  e = config.get('ema')
  if e is None or not e.enabled:
    return None
  return Ema(decay=float(e.decay), warmup=bool(e.warmup), every_steps=int(e.every_steps),
             batch_stats=str(e.batch_stats))


def enabled(config: ml_collections.ConfigDict) -> bool:
  return from_config(config) is not None


def init_ema(state):
  """The EMA fields of `state`: copies of its params and BatchNorm statistics."""
  return state.replace(ema_params=jax.tree.map(jnp.array, state.params),
                       ema_batch_stats=jax.tree.map(jnp.array, state.batch_stats))


def decay_at(ema: Ema, t):
  """The decay of update number `t` (0 for the first): `decay`, or min(decay, (1 + t) / (10 + t))."""
  if not ema.warmup:
    return jnp.float32(ema.decay)
  t = jnp.asarray(t, jnp.float32)
  return jnp.minimum(jnp.float32(ema.decay), (1.0 + t) / (10.0 + t))


def update_ema(state, ema: Ema):
  """Folds `state`'s params (and statistics) into its average when `state.step` (the steps done, this one
  included) is a multiple of `ema.every_steps`; otherwise `state` as it is."""
  step = state.step
  due = step % ema.every_steps == 0
  d = decay_at(ema, step // ema.every_steps - 1)

  def average(e, p):
    new = d * e + (1.0 - d) * p
    return new if ema.every_steps == 1 else jnp.where(due, new, e)

  params = jax.tree.map(average, state.ema_params, state.params)
  if ema.batch_stats == 'average':
    batch_stats = jax.tree.map(average, state.ema_batch_stats, state.batch_stats)
  else:
    batch_stats = jax.tree.map(lambda e, b: b if ema.every_steps == 1 else jnp.where(due, b, e),
                               state.ema_batch_stats, state.batch_stats)
  return state.replace(ema_params=params, ema_batch_stats=batch_stats)
