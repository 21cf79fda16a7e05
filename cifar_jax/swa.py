"""Stochastic Weight Averaging: torch's AveragedModel, and update_bn as `recalibrate_batch_stats`.

The average lives in the TrainState (`swa_params`, `swa_batch_stats`, `swa_count`), so it is checkpointed
and resumed with everything else. Semantics (torch.optim.swa_utils, torch 2.13):
- The first update copies the params; later ones form the equal-weight mean avg + (p - avg) / (n + 1)
  (or, with `decay` > 0, an exponential moving average decay * avg + (1 - decay) * p).
- The average's BatchNorm buffers are copied from the running model at each update (use_buffers=False),
  then recomputed by one pass over the training data: running mean and variance become the plain average
  of the per-batch means and per-batch unbiased variances, each batch weighted equally.
"""

import functools

import jax
import jax.numpy as jnp

from cifar_jax import input_pipeline


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
  """torch's reset_running_stats: means 0, variances 1."""
  return {k: reset_batch_stats(v) if isinstance(v, dict) else
          (jnp.zeros_like(v) if k == 'mean' else jnp.ones_like(v))
          for k, v in batch_stats.items()}


def recalibration_step(model, params, running, num_batches, images):
  """Folds one batch's statistics into the running averages with torch's factor 1 / num_batches_tracked.

  `model` must be built with bn_momentum=1.0, so that its updated statistics are the batch's own mean and
  unbiased variance.
  """
  _, updates = model.apply({'params': params, 'batch_stats': running}, images, train=True,
                           mutable=['batch_stats'])
  factor = 1.0 / (num_batches + 1).astype(jnp.float32)
  return jax.tree.map(lambda r, s: factor * s + (1.0 - factor) * r, running, updates['batch_stats'])


def _recalibrate_on_device_data(params, running, num_batches, images, labels, perm, key, start, *,
                                model, size, augment):
  x, _ = input_pipeline.get_train_batch(images, labels, perm, start, size, key, augment)
  return recalibration_step(model, params, running, num_batches, x)


def recalibrate_batch_stats(model, params, batch_stats, images, labels, data_key, *, epoch: int,
                            batch_size: int, drop_remainder: bool = False, augment: bool = True):
  """torch's update_bn: new BatchNorm statistics for `params` from one pass over the training data.

  The pass sees the batches the training loader would give in epoch `epoch` (order, crops, flips), each
  batch weighted equally, the last partial batch included unless `drop_remainder`. A model without
  BatchNorm (empty `batch_stats`) is returned unchanged.

  Args:
    model: the ResNet; it is cloned with bn_momentum=1.0 for the pass.
    params: the (averaged) params.
    batch_stats: a tree of the model's statistics (only its structure is used).
    images: device uint8 training images, NHWC.
    labels: device training labels.
    data_key: the run's data key.
    epoch: whose order and augmentation to use.
    batch_size: the training batch size.
    drop_remainder: skip the last partial batch, as the loader would.
    augment: crop and flip as in training (torch's update_bn iterates the training loader).

  Returns:
    The recalibrated batch statistics.
  """
  if not jax.tree.leaves(batch_stats):
    return batch_stats
  n = labels.shape[0]
  steps = input_pipeline.steps_per_epoch(n, batch_size, drop_remainder)
  perm = jax.jit(input_pipeline.epoch_permutation, static_argnums=2)(data_key, epoch, n)
  pass_model = model.clone(bn_momentum=1.0)
  running = reset_batch_stats(batch_stats)
  compiled = {}
  for i in range(steps):
    size = min(batch_size, n - i * batch_size)
    if size not in compiled:
      compiled[size] = jax.jit(functools.partial(
          _recalibrate_on_device_data, model=pass_model, size=size, augment=augment))
    key = input_pipeline.batch_key(data_key, epoch, i)
    running = compiled[size](params, running, jnp.int32(i), images, labels, perm, key,
                             jnp.int32(i * batch_size))
  return running
