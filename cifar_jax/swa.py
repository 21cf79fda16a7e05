"""Stochastic Weight Averaging: torch's AveragedModel, and the step of update_bn (`recalibration_step`).

The average lives in the TrainState (`swa_params`, `swa_batch_stats`, `swa_count`), so it is checkpointed
and resumed with everything else. Semantics (torch.optim.swa_utils, torch 2.13):
- The first update copies the params; later ones form the equal-weight mean avg + (p - avg) / (n + 1)
  (or, with `decay` > 0, an exponential moving average decay * avg + (1 - decay) * p).
- The average's BatchNorm buffers are copied from the running model at each update (use_buffers=False),
  then recomputed by one pass over the training data (`program.recalibration_pass`, its steps
  `recalibration_step`): running mean and variance become the plain average
  of the per-batch means and per-batch unbiased variances, each batch weighted equally.
"""

import jax
import jax.numpy as jnp
import numpy as np


def init_swa(state):
  """Empty SWA fields for `state`: zeros and a count of 0."""
  return state.replace(
      swa_params=jax.tree.map(jnp.zeros_like, state.params),
      swa_batch_stats=jax.tree.map(jnp.zeros_like, state.batch_stats),
      swa_count=jnp.zeros((), jnp.int32))


def update_swa(state, decay: float = 0.0):
  """Folds the current params into the average (AveragedModel.update_parameters)."""
  n = state.swa_count

  def average(avg, p):
    if decay > 0.0:
      new = decay * avg + (1.0 - decay) * p
    else:
      new = avg + (p - avg) / (n + 1).astype(p.dtype)
    return jnp.where(n == 0, p, new)

  return state.replace(
      swa_params=jax.tree.map(average, state.swa_params, state.params),
      swa_batch_stats=state.batch_stats,
      swa_count=n + 1)


def reset_batch_stats(batch_stats):
  """torch's reset_running_stats: means 0, variances 1 (host arrays of the shapes of `batch_stats`'s
  arrays, or of its `jax.ShapeDtypeStruct`s)."""
  return {k: reset_batch_stats(v) if isinstance(v, dict) else
          (np.zeros if k == 'mean' else np.ones)(v.shape, v.dtype)
          for k, v in batch_stats.items()}


def recalibration_step(model, params, running, num_batches, images, rngs=None):
  """Folds one batch's statistics into the running averages with torch's factor 1 / num_batches_tracked.

  `model` must be built with bn_momentum=1.0, so that its updated statistics are the batch's own mean and
  unbiased variance. `rngs`: the training-mode forward pass's gates (Shake-Shake, ShakeDrop), drawn as
  torch's update_bn draws them in model.train().
  """
  _, updates = model.apply({'params': params, 'batch_stats': running}, images, train=True,
                           mutable=['batch_stats'], rngs=rngs)
  factor = 1.0 / (num_batches + 1).astype(jnp.float32)
  return jax.tree.map(lambda r, s: factor * s + (1.0 - factor) * r, running, updates['batch_stats'])
