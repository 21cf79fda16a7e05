"""Pure device code: the TrainState, losses and metrics, the one batch-drawing function, and the train,
eval and BatchNorm-recalibration steps over on-device data.

Steps are module-level pure functions with hyperparameters bound by `functools.partial`; `program.Program`
wraps them for the devices and seeds of a run and compiles them. Several seeds (`num_seeds` > 1) are trees
with a leading seed axis (`per_seed`), one seed is the tree itself.
"""

import functools
import statistics
from typing import Any

from flax.training import train_state
import jax
import jax.numpy as jnp
import numpy as np
import optax

from cifar_jax import augmentations
from cifar_jax import calibration
from cifar_jax import ema as ema_lib
from cifar_jax import input_pipeline
from cifar_jax import swa
from cifar_jax import tta as tta_lib

# Folded into the data key for the SWA BatchNorm pass, so its order differs from every training epoch's.
RECALIBRATION_SALT = 0x5BA
# Folded into a batch's key for the Shake-Shake / ShakeDrop gates of the step that trains on it.
SHAKE_SALT = 0x5AE
# Folded into a batch's key for its mixup draws (the mixing weight and the partner permutation).
MIXUP_SALT = 0x313
METRIC_KEYS = ('loss_sum', 'correct', 'count')


class TrainState(train_state.TrainState):
  """Params, optimizer state, BatchNorm statistics and the SWA average: everything a checkpoint holds."""

  batch_stats: Any
  swa_params: Any = None  # the running average of params (None when SWA is off)
  swa_batch_stats: Any = None  # the average's BatchNorm statistics (recalibrated at the end)
  swa_count: Any = None  # how many snapshots the average holds
  swag_sq_mean: Any = None  # SWAG's second moment of the params (None when SWAG is off; swag.py)
  swag_deviations: Any = None  # SWAG's last K deviations, (K, ...) per parameter (None: off or diag_only)
  ema_params: Any = None  # the exponential moving average of params (None when config.ema is off; ema.py)
  ema_batch_stats: Any = None  # its BatchNorm statistics (averaged or copied: ema.batch_stats)


def stack_seeds(trees):
  """One tree of numpy arrays with a leading seed axis from k trees of the same structure."""
  leaves = [jax.tree.leaves(t) for t in trees]
  return jax.tree.unflatten(jax.tree.structure(trees[0]),
                            [np.stack([np.asarray(x) for x in xs]) for xs in zip(*leaves)])


def unstack_seed(tree, index: int):
  """Seed `index`'s tree out of a tree with a leading seed axis."""
  return jax.tree.map(lambda x: x[index], tree)


def per_seed(trees: list):
  """The trees of a run's seeds as the run holds them: one seed's tree itself, several stacked."""
  return trees[0] if len(trees) == 1 else stack_seeds(trees)


def cross_entropy_loss(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
  """The batch's mean cross-entropy; with `label_smoothing` eps > 0 against torch's smoothed target
  (`CrossEntropyLoss(label_smoothing=eps)`: (1 - eps) one-hot + eps / K), i.e. (1 - eps) NLL + eps times
  the mean over the K classes of -log p."""
  if not label_smoothing:
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  log_probs = jax.nn.log_softmax(logits)
  nll = -jnp.take_along_axis(log_probs, labels[:, None], axis=-1)[:, 0]
  return ((1.0 - label_smoothing) * nll - label_smoothing * log_probs.mean(-1)).mean()


def batch_metrics(logits, labels, loss) -> dict[str, jax.Array]:
  """Sums over the batch, so that epochs with a partial batch average per example."""
  n = labels.shape[0]
  return {'loss_sum': loss * n,
          'correct': jnp.sum(jnp.argmax(logits, -1) == labels).astype(jnp.float32),
          'count': jnp.asarray(n, jnp.float32)}


def shake_rngs(data_key, epoch, index) -> dict[str, jax.Array]:
  """The rngs of batch `index` of epoch `epoch`'s forward pass in training mode: the Shake-Shake and
  ShakeDrop gates' stream (`models.shake`), from the batch's key with a salt (so independent of its crop
  and flip), hence the same for a seed in a k-seed run, after a resume, and on any number of devices."""
  return {'shake': jax.random.fold_in(input_pipeline.batch_key(data_key, epoch, index), SHAKE_SALT)}


def mixup(images, labels, key, alpha: float):
  """BiT's mixup (big_transfer `bit_pytorch/train.py`: `mixup_data`): one weight lam ~ Beta(alpha, alpha)
  for the batch, each image mixed with the image a random permutation pairs it with,
  lam * x + (1 - lam) * x[perm]. Returns (mixed images, labels, the partners' labels, lam per row): a
  batch `train_step` takes, whose rows any sharding splits."""
  lam_key, perm_key = jax.random.split(key)
  lam = jax.random.beta(lam_key, alpha, alpha)
  perm = jax.random.permutation(perm_key, images.shape[0])
  mixed = lam * images + (1.0 - lam) * images[perm]
  return mixed, labels, labels[perm], jnp.full(labels.shape, lam, jnp.float32)


def mixup_loss(logits, labels, partner_labels, lam, label_smoothing: float = 0.0) -> jax.Array:
  """`mixup_criterion`: lam * CE(labels) + (1 - lam) * CE(partners' labels), each the batch mean (and
  smoothed as `cross_entropy_loss`; timm's mixed smoothed targets make the same loss)."""
  return (lam[0] * cross_entropy_loss(logits, labels, label_smoothing)
          + (1.0 - lam[0]) * cross_entropy_loss(logits, partner_labels, label_smoothing))


def loss_and_grads(state: TrainState, params, batch_stats, batch, rngs=None, label_smoothing: float = 0.0):
  """((loss, (new model state, logits)), gradients) of `batch` under `params` and `batch_stats`, the model
  in training mode: the forward and backward pass of a step or of one of its micro-batches. The loss is
  smoothed by `label_smoothing` (config.loss.label_smoothing; training only)."""
  images, labels = batch[:2]

  def loss_fn(p):
    logits, new_model_state = state.apply_fn(
        {'params': p, 'batch_stats': batch_stats}, images, train=True, mutable=['batch_stats'], rngs=rngs)
    loss = (cross_entropy_loss(logits, labels, label_smoothing) if len(batch) == 2
            else mixup_loss(logits, *batch[1:], label_smoothing=label_smoothing))
    return loss, (new_model_state, logits)

  return jax.value_and_grad(loss_fn, has_aux=True)(params)


def apply_step(state: TrainState, grads, batch_stats, metrics, axis_name: str | None = None):
  """The update of a step: gradients averaged (and metric sums added) over `axis_name`, the optimizer's
  update, and whether the new params are finite."""
  if axis_name is not None:
    grads = jax.lax.pmean(grads, axis_name)
    metrics = jax.lax.psum(metrics, axis_name)
  new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  # The loss can still be finite on the step whose update overflows the params.
  params_finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(p)) for p in jax.tree.leaves(new_state.params)]))
  metrics['params_finite'] = params_finite.astype(jnp.float32)
  return new_state, metrics


def train_step(state: TrainState, batch, axis_name: str | None = None, rngs=None,
               label_smoothing: float = 0.0):
  """One SGD step on a normalised batch (images NHWC float32, labels int); returns state and sums.

  `batch`: (images, labels), or `mixup`'s (images, labels, partner labels, lam); accuracy counts `labels`.
  `rngs`: the forward pass's random streams (`shake_rngs`), for models with gates.
  """
  (loss, (new_model_state, logits)), grads = loss_and_grads(state, state.params, state.batch_stats, batch,
                                                            rngs, label_smoothing)
  metrics = batch_metrics(logits, batch[1], loss)
  return apply_step(state, grads, new_model_state.get('batch_stats', state.batch_stats), metrics, axis_name)


def init_train_metrics() -> dict[str, jax.Array]:
  """Running sums of an epoch, kept on device; `nonfinite_step` is the first step with a bad loss."""
  return {'loss_sum': jnp.zeros((), jnp.float32), 'correct': jnp.zeros((), jnp.float32),
          'count': jnp.zeros((), jnp.float32), 'nonfinite_step': jnp.full((), -1, jnp.int32)}


def accumulate(acc, metrics, step):
  out = {k: acc[k] + metrics[k] for k in METRIC_KEYS}
  bad = ~jnp.isfinite(metrics['loss_sum']) | (metrics['params_finite'] < 1)
  out['nonfinite_step'] = jnp.where((acc['nonfinite_step'] < 0) & bad, step, acc['nonfinite_step'])
  return out


def whole_batch(batch):
  """One device: the step sees the whole global batch."""
  return batch


def micro_batch_sizes(size: int, micro_batches: int) -> list[int]:
  """The sizes a batch of `size` splits into (`torch.tensor_split(x, micro_batches)`): as even as possible,
  the first `size % micro_batches` one larger; never an empty one (a batch smaller than `micro_batches`
  splits into micro-batches of 1)."""
  n = min(micro_batches, size)
  q, r = divmod(size, n)
  return [q + 1] * r + [q] * (n - r)


def _stacked_rows(x, *, start: int, count: int, size: int):
  """Rows [start, start + count * size) of `x` as (count, size, ...): `count` micro-batches of `size`."""
  return x[start:start + count * size].reshape((count, size) + x.shape[1:])


def train_step_micro_batches(state: TrainState, batch, micro_batches: int, axis_name: str | None = None,
                             rngs=None, shard_batch=whole_batch, label_smoothing: float = 0.0):
  """`train_step` on the global `batch` split into `micro_batches` (`micro_batch_sizes`), one after the
  other in a `lax.scan` (the activations of one micro-batch at a time), then one update: torch's
  accumulation loop (`torch_reference.train_epoch(micro_batches=...)`).

  Each micro-batch runs forward in training mode and folds its statistics into the BatchNorm running
  statistics, in order, as torch's does; its loss (the micro-batch's mean) is weighted by its share of the
  batch, so the gradients add up to the whole batch's mean loss and, for a model without BatchNorm, to
  its update. `shard_batch` keeps this device's part of each micro-batch. The gates' random streams
  (`rngs`) are folded with the micro-batch's index.
  """
  size = batch[0].shape[0]
  sizes = micro_batch_sizes(size, micro_batches)

  def body(weight, carry, xs):
    grads, batch_stats, sums = carry
    index, micro = xs
    micro = shard_batch(micro)
    micro_rngs = None if rngs is None else {k: jax.random.fold_in(v, index) for k, v in rngs.items()}
    (loss, (new_model_state, logits)), g = loss_and_grads(state, state.params, batch_stats, micro, micro_rngs,
                                                          label_smoothing)
    grads = jax.tree.map(lambda a, b: a + weight * b, grads, g)
    metrics = batch_metrics(logits, micro[1], loss)
    sums = {k: sums[k] + metrics[k] for k in METRIC_KEYS}
    return (grads, new_model_state.get('batch_stats', batch_stats), sums), None

  carry = (jax.tree.map(jnp.zeros_like, state.params), state.batch_stats,
           {k: jnp.zeros((), jnp.float32) for k in METRIC_KEYS})
  start = 0
  for micro_size in dict.fromkeys(sizes):  # the micro-batches of one size (consecutive): one scan
    first, count = sizes.index(micro_size), sizes.count(micro_size)
    rows = jax.tree.map(functools.partial(_stacked_rows, start=start, count=count, size=micro_size), batch)
    # The micro-batch's share of the batch (of the global batch: under pmap the device's rows of each
    # micro-batch are averaged over the devices by the pmean below).
    weight = jnp.float32(micro_size / size)
    carry, _ = jax.lax.scan(functools.partial(body, weight), carry,
                            (jnp.arange(first, first + count, dtype=jnp.uint32), rows))
    start += count * micro_size
  grads, batch_stats, metrics = carry
  return apply_step(state, grads, batch_stats, metrics, axis_name)


def draw_batch(images, labels, perm, data_key, epoch, index, *, batch_size: int, size: int,
               augment: bool, mixup_alpha: float = 0.0, normalization: str = 'cifar10', cutout=None,
               cutmix=None):
  """Batch `index` of epoch `epoch`: positions [index * batch_size, + size) of the epoch's order `perm`,
  cropped and flipped with the key of (data_key, epoch, index), normalised; with `mixup_alpha` > 0 mixed
  (`mixup`, its draws from the same key with a salt). Every pass over the training data (training, the
  SWA BatchNorm pass) draws its batches here. `cutout` (augmentations.Cutout) masks squares after the
  normalisation; `cutmix` (augmentations.CutMix) mixes by CutMix, or by mixup as timm's switch picks;
  each from the same key with its own salt."""
  key = input_pipeline.batch_key(data_key, epoch, index)
  batch = input_pipeline.get_train_batch(images, labels, perm, index * batch_size, size, key, augment,
                                         normalization)
  if cutout is not None:
    batch = (augmentations.cutout(batch[0], jax.random.fold_in(key, augmentations.CUTOUT_SALT), cutout.size,
                                  cutout.count), batch[1])
  if cutmix is not None:
    return augmentations.cutmix(*batch, jax.random.fold_in(key, augmentations.CUTMIX_SALT), cutmix,
                                mixup_alpha)
  if mixup_alpha > 0:
    return mixup(*batch, jax.random.fold_in(key, MIXUP_SALT), mixup_alpha)
  return batch


def train_step_on_device_data(state: TrainState, acc, images, labels, perm, data_key, *,
                              steps_per_epoch: int, batch_size: int, size: int, augment: bool,
                              axis_name: str | None = None, shard_batch=whole_batch,
                              mixup_alpha: float = 0.0, micro_batches: int = 1,
                              normalization: str = 'cifar10', cutout=None, cutmix=None,
                              label_smoothing: float = 0.0, ema: ema_lib.Ema | None = None):
  """The next global batch of the epoch, drawn on device from (data_key, epoch, step), then a step.

  `shard_batch` keeps this device's part of the global batch and `axis_name` names the pmap axis
  (parallel.Parallel supplies both); the batch drawn is the same on any number of devices and any
  `micro_batches` (> 1: `train_step_micro_batches` splits the drawn batch). `ema`: the weights' moving
  average is updated after the step (`ema.update_ema`).
  """
  step = state.step
  epoch, index = step // steps_per_epoch, step % steps_per_epoch
  batch = draw_batch(images, labels, perm, data_key, epoch, index, batch_size=batch_size, size=size,
                     augment=augment, mixup_alpha=mixup_alpha, normalization=normalization,
                     cutout=cutout, cutmix=cutmix)
  if micro_batches > 1:
    state, metrics = train_step_micro_batches(state, batch, micro_batches, axis_name=axis_name,
                                              rngs=shake_rngs(data_key, epoch, index),
                                              shard_batch=shard_batch, label_smoothing=label_smoothing)
  else:
    state, metrics = train_step(state, shard_batch(batch), axis_name=axis_name,
                                rngs=shake_rngs(data_key, epoch, index), label_smoothing=label_smoothing)
  if ema is not None:
    state = ema_lib.update_ema(state, ema)
  return state, accumulate(acc, metrics, step)


def train_steps_on_device_data(state: TrainState, acc, images, labels, perm, data_key, num_steps, *,
                               steps_per_epoch: int, batch_size: int, size: int, augment: bool,
                               axis_name: str | None = None, shard_batch=whole_batch,
                               mixup_alpha: float = 0.0, micro_batches: int = 1,
                               normalization: str = 'cifar10', cutout=None, cutmix=None,
                               label_smoothing: float = 0.0, ema: ema_lib.Ema | None = None):
  """`num_steps` (traced: one compilation for any count) `train_step_on_device_data` steps in one call.

  XLA:CPU allocates a call's temporary buffers afresh on every call and the kernel zero-fills their pages
  (hundreds of MB a step for ResNet18); the steps of one call share them (`config.steps_per_dispatch`,
  BENCHMARKS.md). The steps are the same as one call each: the loop body is the step.
  """
  def body(_, carry):
    return train_step_on_device_data(
        *carry, images, labels, perm, data_key, steps_per_epoch=steps_per_epoch, batch_size=batch_size,
        size=size, augment=augment, axis_name=axis_name, shard_batch=shard_batch,
        mixup_alpha=mixup_alpha, micro_batches=micro_batches, normalization=normalization,
        cutout=cutout, cutmix=cutmix,
        label_smoothing=label_smoothing, ema=ema)

  return jax.lax.fori_loop(0, num_steps, body, (state, acc))


def one_step_on_device_data(state: TrainState, acc, images, labels, perm, data_key, num_steps, **kwargs):
  """`train_step_on_device_data` with `train_steps_on_device_data`'s arguments (`num_steps` is 1)."""
  del num_steps
  return train_step_on_device_data(state, acc, images, labels, perm, data_key, **kwargs)


def recalibration_step_on_device_data(params, running, images, labels, perm, data_key, epoch, index, *,
                                      model, batch_size: int, size: int, augment: bool,
                                      shard_batch=whole_batch, normalization: str = 'cifar10'):
  """Batch `index` of the BatchNorm pass (`program.recalibration_pass`): drawn like a training batch
  (`draw_batch`), sharded, its statistics folded into `running` (swa.recalibration_step)."""
  batch = draw_batch(images, labels, perm, data_key, epoch, index, batch_size=batch_size, size=size,
                     augment=augment, normalization=normalization)
  images, _ = shard_batch(batch)
  return swa.recalibration_step(model, params, running, index, images,
                                rngs=shake_rngs(data_key, epoch, index))


def eval_step(state: TrainState, batch):
  """Summed loss and correct predictions of a batch, in eval mode; masked examples count for nothing.

  Also the calibration sums (`calibration.calibration_sums`: Brier, ECE bins; `nll_sum` is `loss_sum`) and
  the batch's log probabilities (for ensembles).
  """
  images, labels, mask = batch
  logits = state.apply_fn({'params': state.params, 'batch_stats': state.batch_stats}, images,
                          train=False)
  return eval_sums(logits, labels, mask)


def eval_sums(logits, labels, mask):
  """`eval_step`'s sums and log probabilities from a batch's logits."""
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  correct = (jnp.argmax(logits, -1) == labels)
  log_probs = jax.nn.log_softmax(logits)
  sums = calibration.calibration_sums(log_probs, labels, mask)
  sums.update(loss_sum=jnp.sum(losses * mask), correct=jnp.sum(correct * mask), count=jnp.sum(mask))
  sums['nll_sum'] = sums['loss_sum']
  return sums, log_probs


def eval_zeros() -> dict[str, jax.Array]:
  """The eval sums' starting values (`eval_step`'s keys)."""
  shapes = jax.eval_shape(lambda: calibration.calibration_sums(
      jnp.zeros((1, 2)), jnp.zeros((1,), jnp.int32), jnp.ones((1,))))
  zeros = {k: jnp.zeros(v.shape, jnp.float32) for k, v in shapes.items()}
  zeros['loss_sum'] = jnp.zeros((), jnp.float32)
  return zeros


def evaluate_on_device_data(state: TrainState, images, labels, mask, use_swa: bool = False,
                           axis_name: str | None = None, with_log_probs: bool = False, tta: str = 'none',
                           normalization: str = 'cifar10', use_ema: bool = False):
  """The eval set, pre-split into (num_batches, batch, ...) on device, in one dispatch.

  Under pmap (`axis_name`) each device holds a slice of every batch and the sums are added over devices.
  `with_log_probs`: also the (num_batches, batch, classes) log probabilities (jit only), for an ensemble
  over the seeds (`calibration.ensemble_sums`). `tta`: the test-time augmentation's views (`tta.VIEWS`),
  their probabilities averaged. `use_ema`: the weights' moving average (`ema.py`).
  """
  if use_swa:
    state = state.replace(params=state.swa_params, batch_stats=state.swa_batch_stats)
  if use_ema:
    state = state.replace(params=state.ema_params, batch_stats=state.ema_batch_stats)
  return evaluate_variables(state.apply_fn, state.params, state.batch_stats, images, labels, mask,
                            axis_name=axis_name, with_log_probs=with_log_probs, tta=tta,
                            normalization=normalization)


def evaluate_variables(apply_fn, params, batch_stats, images, labels, mask, *, axis_name=None,
                       with_log_probs: bool = False, tta: str = 'none', normalization: str = 'cifar10'):
  """`evaluate_on_device_data` of the model `apply_fn` with `params` and `batch_stats`."""

  def logits_fn(x):
    variables = {'params': params, 'batch_stats': batch_stats}
    return apply_fn(variables, input_pipeline.normalize(x, normalization), train=False)

  def body(totals, batch):
    x, y, m = batch
    if tta == 'none':
      logits = logits_fn(x)
    else:  # the views' averaged log probabilities, whose log_softmax they are
      logits = tta_lib.log_probs(logits_fn, x, tta)
    sums, log_probs = eval_sums(logits, y, m)
    return jax.tree.map(jnp.add, totals, sums), (log_probs if with_log_probs else None)

  totals, log_probs = jax.lax.scan(body, eval_zeros(), (images, labels, mask))
  if axis_name is not None:
    totals = jax.lax.psum(totals, axis_name)
  return (totals, log_probs) if with_log_probs else totals


def batched_eval_arrays(images: np.ndarray, labels: np.ndarray, batch_size: int, multiple_of: int = 1):
  """Pads the eval set to whole batches and reshapes to (num_batches, batch, ...), with a mask.

  The batch is rounded up to a multiple of `multiple_of` (the device count); padding is masked out.
  """
  n = labels.shape[0]
  batch_size = -(-min(batch_size, n) // multiple_of) * multiple_of
  num_batches = -(-n // batch_size)
  pad = num_batches * batch_size - n
  images = np.concatenate([images, np.zeros((pad,) + images.shape[1:], images.dtype)])
  labels = np.concatenate([labels, np.zeros((pad,), labels.dtype)])
  mask = np.concatenate([np.ones((n,), np.float32), np.zeros((pad,), np.float32)])
  shape = (num_batches, batch_size)
  return (images.reshape(shape + images.shape[1:]), labels.reshape(shape), mask.reshape(shape))


def seed_summaries(sums, num_seeds: int) -> list[dict[str, float]]:
  """`summarize` of each seed's sums (one seed: a list of one)."""
  return [summarize(sums)] if num_seeds == 1 else summarize_seeds(sums)


def seed_calibration(sums, num_seeds: int) -> list[dict[str, float]]:
  """`calibration.summarize` (accuracy, nll, ece, brier) of each seed's eval sums."""
  sums = jax.device_get(sums)
  if num_seeds == 1:
    return [calibration.summarize(sums)]
  return [calibration.summarize(unstack_seed(sums, i)) for i in range(num_seeds)]


def summarize(sums) -> dict[str, float]:
  sums = jax.device_get(sums)
  count = float(sums['count'])
  return {'loss': float(sums['loss_sum']) / max(count, 1.0),
          'accuracy': float(sums['correct']) / max(count, 1.0)}


def summarize_seeds(sums) -> list[dict[str, float]]:
  """`summarize` of each seed of sums with a leading seed axis."""
  sums = jax.device_get(sums)
  return [summarize(unstack_seed(sums, i)) for i in range(np.shape(sums['count'])[0])]


def seed_metrics(name: str, values: list[float]) -> dict:
  """{name: v} for one seed; for several, the per-seed list, mean, sample std (ddof=1), and name = mean."""
  if len(values) == 1:
    return {name: values[0]}
  mean = statistics.fmean(values)
  return {name: mean, f'{name}_mean': mean, f'{name}_std': statistics.stdev(values),
          f'{name}_per_seed': list(values)}


def mean_summary(summaries: list[dict[str, float]]) -> dict[str, float]:
  """The seeds' mean loss and accuracy (what the progress bar shows)."""
  return {key: statistics.fmean(s[key] for s in summaries) for key in ('loss', 'accuracy')}
