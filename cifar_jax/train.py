"""Training and evaluation: a pure jitted train step over on-device data, orbax checkpoints, metrics.

`train_and_evaluate(config, workdir)` is the whole run. The step functions are module-level and pure, with
hyperparameters bound by `functools.partial`, so tests and notebooks can call them directly.
"""

import functools
import os
import statistics
import time
from typing import Any

from absl import logging
from flax.training import train_state
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp

from cifar_jax import config_lib
from cifar_jax import input_pipeline
from cifar_jax import metrics_writer
from cifar_jax import models
from cifar_jax import onednn_conv
from cifar_jax import parallel
from cifar_jax import preemption
from cifar_jax import schedules
from cifar_jax import swa

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
# Folded into the data key for the SWA BatchNorm pass, so its order differs from every training epoch's.
RECALIBRATION_SALT = 0x5BA
METRIC_KEYS = ('loss_sum', 'correct', 'count')
# Auto `steps_per_dispatch` on the CPU (scripts/bench_dispatch.py, BENCHMARKS.md).
CPU_STEPS_PER_DISPATCH = 8


class TrainState(train_state.TrainState):
  """Params, optimizer state, BatchNorm statistics and the SWA average: everything a checkpoint holds."""

  batch_stats: Any
  swa_params: Any = None  # the running average of params (None when SWA is off)
  swa_batch_stats: Any = None  # the average's BatchNorm statistics (recalibrated at the end)
  swa_count: Any = None  # how many snapshots the average holds


class NonFiniteLossError(RuntimeError):
  """The training loss became NaN or infinite."""


def run_keys(seed: int) -> tuple[jax.Array, jax.Array]:
  """(init_key, data_key) of a run: the params' initialisation, and every batch's order and augmentation."""
  init_key, data_key = jax.random.split(jax.random.PRNGKey(seed))
  return init_key, data_key


def conv_impl(model_config: ml_collections.ConfigDict, num_devices: int = 1, mode: str = 'jit') -> str:
  """The convolutions `model_config.conv` asks for, 'xla' or 'onednn', in a run over `num_devices`.

  'auto' takes oneDNN's (`onednn_conv`, faster than XLA:CPU's own: BENCHMARKS.md) on a one-device CPU
  run where they build, and XLA's on GPUs, over several devices (every oneDNN call already uses all the
  cores) and where oneDNN or a compiler is missing. 'onednn' insists, and says why it cannot: jit cannot
  split a oneDNN call over several devices (pmap runs one per device).
  """
  choice = model_config.get('conv', 'auto')
  if choice == 'xla':
    return 'xla'
  if choice == 'onednn':
    if mode == 'jit' and num_devices > 1:
      raise config_lib.ConfigError(
          "model.conv='onednn' runs on one device under jit (or under pmap); set cpu_devices=1 or "
          "model.conv='auto'")
    try:
      onednn_conv.load()
    except RuntimeError as e:
      raise config_lib.ConfigError(f"model.conv='onednn': {e}; use model.conv='auto' or 'xla'") from e
    return 'onednn'
  return 'onednn' if num_devices == 1 and onednn_conv.available() else 'xla'


def create_model(model_config: ml_collections.ConfigDict, num_devices: int = 1, mode: str = 'jit',
                 **kwargs) -> models.ResNet:
  """The ResNet that `config.model` describes, for a run over `num_devices` (see `conv_impl`)."""
  return models.create_model(
      model_config.name, width_multiplier=model_config.width_multiplier, norm=model_config.norm,
      zero_init_residual=model_config.zero_init_residual, dtype=DTYPES[model_config.dtype],
      conv_impl=conv_impl(model_config, num_devices, mode), **kwargs)


def initialized(key: jax.Array, model: models.ResNet) -> tuple[Any, Any]:
  """Initial params and batch stats ({} for GroupNorm models)."""
  variables = model.init(key, jnp.ones((1, 32, 32, 3), jnp.float32), train=False)
  return variables['params'], variables.get('batch_stats', {})


def sgd(learning_rate, momentum, weight_decay, nesterov=False) -> optax.GradientTransformation:
  """torch.optim.SGD: weight decay added to the gradient, then momentum, then the learning rate."""
  return optax.chain(
      optax.add_decayed_weights(weight_decay),
      optax.trace(decay=momentum, nesterov=nesterov),
      optax.scale_by_learning_rate(learning_rate))


def create_optimizer(config: ml_collections.ConfigDict, learning_rate_fn,
                     momentum_fn=None) -> optax.GradientTransformation:
  """SGD whose lr and momentum (floats or schedules of the step) are logged in the optimizer state."""
  opt = config.optimizer
  return optax.inject_hyperparams(sgd, static_args=('nesterov',))(
      learning_rate=learning_rate_fn,
      momentum=opt.momentum if momentum_fn is None else momentum_fn,
      weight_decay=opt.weight_decay, nesterov=opt.nesterov)


def create_train_state(key: jax.Array, config: ml_collections.ConfigDict, model: models.ResNet,
                       learning_rate_fn, momentum_fn=None) -> TrainState:
  """A fresh TrainState for `model`."""
  params, batch_stats = initialized(key, model)
  tx = create_optimizer(config, learning_rate_fn, momentum_fn)
  state = TrainState.create(apply_fn=model.apply, params=params, tx=tx, batch_stats=batch_stats)
  if config.swa.enabled:
    state = swa.init_swa(state)
  return state


def stack_seeds(trees):
  """One tree of numpy arrays with a leading seed axis from k trees of the same structure."""
  leaves = [jax.tree.leaves(t) for t in trees]
  return jax.tree.unflatten(jax.tree.structure(trees[0]),
                            [np.stack([np.asarray(x) for x in xs]) for xs in zip(*leaves)])


def unstack_seed(tree, index: int):
  """Seed `index`'s tree out of a tree with a leading seed axis."""
  return jax.tree.map(lambda x: x[index], tree)


def create_seed_states(config: ml_collections.ConfigDict, model: models.ResNet, learning_rate_fn,
                       momentum_fn=None) -> TrainState:
  """The fresh TrainState of each of `config.num_seeds` seeds, stacked (seed i: `run_keys(seed + i)`).

  Each seed is initialised exactly as its single-seed run is (eagerly, from its own key), then stacked.
  """
  return stack_seeds([
      create_train_state(run_keys(config.seed + i)[0], config, model, learning_rate_fn, momentum_fn)
      for i in range(config.num_seeds)])


# Schedules --------------------------------------------------------------------------------------------

# Per epoch for MultiStep, Step, cosine and warm restarts, per batch for cyclic and one-cycle (the blog).
DEFAULT_STEP_EVERY = {
    'multistep': 'epoch', 'step': 'epoch', 'cosine': 'epoch', 'warm_restarts': 'epoch',
    'cyclic': 'batch', 'one_cycle': 'batch', 'constant': 'epoch', 'plateau': 'epoch',
}


def step_every(schedule_config) -> str:
  """'epoch' or 'batch': how often torch's scheduler would be stepped."""
  return schedule_config.step_every or DEFAULT_STEP_EVERY[schedule_config.name]


def create_schedules(config: ml_collections.ConfigDict, steps_per_epoch: int):
  """The lr schedule and the momentum schedule (None: constant momentum) of `config`, torch-exact.

  Both are functions of the optimizer update count with a device table over the run, so a jitted step
  evaluates them without a host round trip.
  """
  s = config.schedule
  lr = config.optimizer.lr
  num_steps = config.num_epochs * steps_per_epoch
  main_epochs = main_schedule_epochs(config)
  per_epoch = step_every(s) == 'epoch'
  spe = steps_per_epoch if per_epoch else None
  run_length = main_epochs if per_epoch else main_epochs * steps_per_epoch  # in scheduler steps
  momentum_fn = None
  if s.name == 'multistep':
    lr_fn = schedules.multistep_lr(lr, list(s.milestones), s.gamma, steps_per_epoch=spe)
  elif s.name == 'step':
    lr_fn = schedules.step_lr(lr, s.step_size, s.gamma, steps_per_epoch=spe)
  elif s.name == 'cosine':
    t_max = s.T_max if s.T_max > 0 else run_length
    lr_fn = schedules.cosine_annealing_lr(lr, t_max, s.eta_min, steps_per_epoch=spe)
  elif s.name == 'warm_restarts':
    lr_fn = schedules.cosine_annealing_warm_restarts(
        lr, s.T_0, s.T_mult, s.eta_min, steps_per_epoch=spe, fractional=s.fractional)
  elif s.name == 'cyclic':
    up = s.step_size_up_epochs * steps_per_epoch if s.step_size_up_epochs > 0 else s.step_size_up
    kwargs = dict(step_size_up=up,
                  step_size_down=s.step_size_down if s.step_size_down > 0 else None,
                  mode=s.mode, gamma=s.gamma)
    lr_fn = schedules.cyclic_lr(lr, s.max_lr, **kwargs)
    if s.cycle_momentum:
      momentum_fn = schedules.cyclic_momentum(lr, s.max_lr, **kwargs, base_momentum=s.base_momentum,
                                              max_momentum=s.max_momentum)
  elif s.name == 'one_cycle':
    kwargs = dict(total_steps=s.total_steps if s.total_steps > 0 else run_length,
                  pct_start=s.pct_start, anneal_strategy=s.anneal_strategy, div_factor=s.div_factor,
                  final_div_factor=s.final_div_factor, three_phase=s.three_phase)
    lr_fn = schedules.one_cycle_lr(s.max_lr, **kwargs)
    if s.cycle_momentum:
      momentum_fn = schedules.one_cycle_momentum(s.max_lr, **kwargs, base_momentum=s.base_momentum,
                                                 max_momentum=s.max_momentum)
  elif s.name in ('constant', 'plateau'):
    lr_fn = schedules.constant_lr(lr)
  else:
    raise config_lib.ConfigError(
        f'schedule.name must be one of {sorted(DEFAULT_STEP_EVERY)}, got {s.name!r}')
  if s.warmup_epochs > 0:
    warmup = s.warmup_epochs if per_epoch else s.warmup_epochs * steps_per_epoch
    lr_fn = schedules.sequential_lr(
        [schedules.linear_lr(lr, s.warmup_start_factor, 1.0, warmup, steps_per_epoch=spe), lr_fn],
        [s.warmup_epochs * steps_per_epoch])
  if config.swa.enabled:
    lr_fn, momentum_fn = _with_swa_phase(config, lr_fn, momentum_fn, steps_per_epoch)
  lr_fn = lr_fn.with_horizon(num_steps)
  momentum_fn = momentum_fn and momentum_fn.with_horizon(num_steps)
  return lr_fn, momentum_fn


def main_schedule_epochs(config: ml_collections.ConfigDict) -> int:
  """Epochs the main schedule spans: the whole run, or the epochs before SWA starts."""
  return config.swa.start_epoch if config.swa.enabled else config.num_epochs


def _with_swa_phase(config, lr_fn, momentum_fn, steps_per_epoch: int):
  """From swa.start_epoch on: swa.lr (constant, or SWALR annealed from the main schedule's last lr).

  This is torch's loop `for epoch: (if epoch >= start: swalr.step()); train; (if epoch < start:
  scheduler.step())`: the main scheduler's last step happens before SWALR takes over, so SWALR anneals
  from the main schedule's value at count start, and the first SWA epoch already runs at SWALR's first
  step. Momentum returns to optimizer.momentum when the main schedule cycled it.
  """
  swa_config = config.swa
  start = swa_config.start_epoch * steps_per_epoch
  if swa_config.schedule == 'constant':
    lr_fn = schedules.sequential_lr([lr_fn, schedules.constant_lr(swa_config.lr)], [start])
  else:
    lr_fn = schedules.swa_lr(swa_config.lr, swa_config.anneal_epochs, swa_config.anneal_strategy,
                             start_lr=lr_fn, start_count=start, steps_per_epoch=steps_per_epoch,
                             handover_count=start)
  if momentum_fn is not None:
    momentum_fn = schedules.sequential_lr(
        [momentum_fn, schedules.constant_lr(config.optimizer.momentum)], [start])
  return lr_fn, momentum_fn


# Steps ------------------------------------------------------------------------------------------------


def cross_entropy_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def batch_metrics(logits, labels, loss) -> dict[str, jax.Array]:
  """Sums over the batch, so that epochs with a partial batch average per example."""
  n = labels.shape[0]
  return {'loss_sum': loss * n,
          'correct': jnp.sum(jnp.argmax(logits, -1) == labels).astype(jnp.float32),
          'count': jnp.asarray(n, jnp.float32)}


def train_step(state: TrainState, batch, axis_name: str | None = None):
  """One SGD step on a normalised batch (images NHWC float32, labels int); returns state and sums."""
  images, labels = batch

  def loss_fn(params):
    logits, new_model_state = state.apply_fn(
        {'params': params, 'batch_stats': state.batch_stats}, images, train=True,
        mutable=['batch_stats'])
    return cross_entropy_loss(logits, labels), (new_model_state, logits)

  (loss, (new_model_state, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  metrics = batch_metrics(logits, labels, loss)
  if axis_name is not None:
    grads = jax.lax.pmean(grads, axis_name)
    metrics = jax.lax.psum(metrics, axis_name)
  new_state = state.apply_gradients(
      grads=grads, batch_stats=new_model_state.get('batch_stats', state.batch_stats))
  # The loss can still be finite on the step whose update overflows the params.
  params_finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(p)) for p in jax.tree.leaves(new_state.params)]))
  metrics['params_finite'] = params_finite.astype(jnp.float32)
  return new_state, metrics


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


def train_step_on_device_data(state: TrainState, acc, images, labels, perm, data_key, *,
                              steps_per_epoch: int, batch_size: int, size: int, augment: bool,
                              axis_name: str | None = None, shard_batch=whole_batch):
  """The next global batch of the epoch, drawn on device from (data_key, epoch, step), then a step.

  `shard_batch` keeps this device's part of the global batch and `axis_name` names the pmap axis
  (parallel.Parallel supplies both); the batch drawn is the same on any number of devices.
  """
  step = state.step
  epoch, step_in_epoch = step // steps_per_epoch, step % steps_per_epoch
  key = input_pipeline.batch_key(data_key, epoch, step_in_epoch)
  batch = input_pipeline.get_train_batch(images, labels, perm, step_in_epoch * batch_size, size, key,
                                         augment)
  state, metrics = train_step(state, shard_batch(batch), axis_name=axis_name)
  return state, accumulate(acc, metrics, step)


def train_steps_on_device_data(state: TrainState, acc, images, labels, perm, data_key, num_steps, *,
                               steps_per_epoch: int, batch_size: int, size: int, augment: bool,
                               axis_name: str | None = None, shard_batch=whole_batch):
  """`num_steps` (traced: one compilation for any count) `train_step_on_device_data` steps in one call.

  XLA:CPU allocates a call's temporary buffers afresh on every call and the kernel zero-fills their pages
  (hundreds of MB a step for ResNet18); the steps of one call share them (`config.steps_per_dispatch`,
  BENCHMARKS.md). The steps are the same as one call each: the loop body is the step.
  """
  def body(_, carry):
    return train_step_on_device_data(
        *carry, images, labels, perm, data_key, steps_per_epoch=steps_per_epoch, batch_size=batch_size,
        size=size, augment=augment, axis_name=axis_name, shard_batch=shard_batch)

  return jax.lax.fori_loop(0, num_steps, body, (state, acc))


def one_step_on_device_data(state: TrainState, acc, images, labels, perm, data_key, num_steps, **kwargs):
  """`train_step_on_device_data` with `train_steps_on_device_data`'s arguments (`num_steps` is 1)."""
  del num_steps
  return train_step_on_device_data(state, acc, images, labels, perm, data_key, **kwargs)


def steps_per_dispatch(config: ml_collections.ConfigDict, num_devices: int = 1) -> int:
  """`config.steps_per_dispatch`, or (0, auto) 8 on a one-device CPU run and 1 otherwise.

  Several devices keep one step per call: under jit over 2 virtual CPU devices the loop measured 40x
  slower than the plain step (BENCHMARKS.md); on accelerators it is not measured.
  """
  if config.get('steps_per_dispatch', 0) > 0:
    return config.steps_per_dispatch
  return CPU_STEPS_PER_DISPATCH if jax.default_backend() == 'cpu' and num_devices == 1 else 1


def dispatch_fn(max_steps_per_call: int):
  """The compiled call's function: the loop of `train_steps_on_device_data`, or one plain step."""
  return train_steps_on_device_data if max_steps_per_call > 1 else one_step_on_device_data


def steps_in_call(done: int, limit: int, max_steps: int, host_acts_after) -> int:
  """The steps of the call that follows `done` steps of the epoch: at most `max_steps`, and it stops at
  `limit` steps done or at the first count `j` with `host_acts_after(j)` (a log, checkpoint, SWA update)."""
  k = 1
  while k < max_steps and done + k < limit and not host_acts_after(done + k):
    k += 1
  return k


def recalibration_step_on_device_data(params, running, images, labels, perm, data_key, epoch, index, *,
                                      model, batch_size: int, size: int, augment: bool,
                                      shard_batch=whole_batch):
  """Batch `index` of swa.recalibrate_batch_stats's pass, drawn like a training batch and sharded."""
  key = input_pipeline.batch_key(data_key, epoch, index)
  batch = input_pipeline.get_train_batch(images, labels, perm, index * batch_size, size, key, augment)
  images, _ = shard_batch(batch)
  return swa.recalibration_step(model, params, running, index, images)


def eval_step(state: TrainState, batch):
  """Summed loss and correct predictions of a batch, in eval mode; masked examples count for nothing."""
  images, labels, mask = batch
  logits = state.apply_fn({'params': state.params, 'batch_stats': state.batch_stats}, images,
                          train=False)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  correct = (jnp.argmax(logits, -1) == labels)
  return {'loss_sum': jnp.sum(losses * mask), 'correct': jnp.sum(correct * mask),
          'count': jnp.sum(mask)}


def evaluate_on_device_data(state: TrainState, images, labels, mask, use_swa: bool = False,
                            axis_name: str | None = None):
  """The eval set, pre-split into (num_batches, batch, ...) on device, in one dispatch.

  Under pmap (`axis_name`) each device holds a slice of every batch and the sums are added over devices.
  """
  if use_swa:
    state = state.replace(params=state.swa_params, batch_stats=state.swa_batch_stats)

  def body(totals, batch):
    x, y, m = batch
    metrics = eval_step(state, (input_pipeline.normalize(x), y, m))
    return jax.tree.map(jnp.add, totals, metrics), None

  zeros = {k: jnp.zeros((), jnp.float32) for k in METRIC_KEYS}
  totals, _ = jax.lax.scan(body, zeros, (images, labels, mask))
  if axis_name is not None:
    totals = jax.lax.psum(totals, axis_name)
  return totals


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


# Checkpoints ------------------------------------------------------------------------------------------


def checkpoint_manager(workdir: str, config: ml_collections.ConfigDict) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints, create=True,
                                         enable_async_checkpointing=False)
  return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, 'checkpoints')), options=options)


def save_checkpoint(manager: ocp.CheckpointManager, state: TrainState, acc, extra: dict) -> None:
  """Saves the state, the epoch's running metric sums and host-side state (JSON) at `state.step`."""
  step = _scalar(state.step)
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave({'state': state, 'train_metrics': acc}),
      extra=ocp.args.JsonSave(extra)), force=True)
  manager.wait_until_finished()


def restore_checkpoint(manager: ocp.CheckpointManager, state: TrainState, acc):
  """The newest readable checkpoint restored into the structure of (state, acc), or None if none exists.

  orbax writes into a temporary folder and renames it when complete, so a checkpoint cut short by a kill
  is never listed. One that is listed but damaged is skipped with a warning for the one before it.
  """
  steps = sorted(manager.all_steps(), reverse=True)
  if not steps:
    return None
  target = jax.tree.map(ocp.utils.to_shape_dtype_struct, {'state': state, 'train_metrics': acc})
  errors, damaged = [], []
  for step in steps:
    try:
      restored = manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target), extra=ocp.args.JsonRestore()))
    except Exception as e:  # pylint: disable=broad-except
      logging.warning('Checkpoint at step %d is unreadable (%s: %s); trying an older one.', step,
                      type(e).__name__, str(e).splitlines()[0][:200] if str(e) else '')
      errors.append(f'step {step}: {type(e).__name__}')
      damaged.append(step)
      continue
    if errors:
      _set_aside(manager, damaged)
      logging.warning('Resumed from step %d; moved unreadable checkpoints %s to %s_damaged/', step,
                      damaged, manager.directory)
    return (restored['state']['state'], restored['state']['train_metrics'],
            dict(restored['extra'] or {}))
  raise config_lib.ConfigError(
      f'{manager.directory}: no readable checkpoint ({", ".join(errors)}); move the folder away to '
      'start afresh')


def _set_aside(manager: ocp.CheckpointManager, steps: list[int]) -> None:
  """Moves damaged checkpoints out of the way (kept for inspection), so the run can save those steps."""
  if jax.process_index() == 0:
    aside = f'{manager.directory}_damaged'
    os.makedirs(aside, exist_ok=True)
    for step in steps:
      os.replace(os.path.join(manager.directory, str(step)),
                 os.path.join(aside, f'{step}_{int(time.time())}'))
  manager.reload()


# The run ----------------------------------------------------------------------------------------------


def _set_learning_rate(state: TrainState, lr) -> TrainState:
  """Writes a host-chosen lr (ReduceLROnPlateau) into the injected hyperparameters."""
  hyperparams = dict(state.opt_state.hyperparams)
  hyperparams['learning_rate'] = jnp.asarray(lr, jnp.float32)
  return state.replace(opt_state=state.opt_state._replace(hyperparams=hyperparams))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
  """Trains `config` into `workdir`, resuming from its latest checkpoint; returns the final state.

  Runs data-parallel over all devices (of all processes, when `config.distributed` or the JAX_*
  variables configure several) as `config.parallelism` says; see cifar_jax/parallel.py.

  Args:
    config: a config as in configs/default.py.
    workdir: where checkpoints, metrics.jsonl, TensorBoard events and config.json go.

  Returns:
    The final TrainState, its arrays replicated over the devices (under pmap too: no device axis).
  """
  config_lib.validate(config)
  parallel.initialize_distributed(config.distributed)
  num_seeds = config.num_seeds
  par = parallel.create(config.parallelism, num_seeds=num_seeds, seed_devices=config.seed_devices)
  logging.info('parallelism=%s: batch %d over %d devices (%d processes)', par.mode,
               config.batch_size, par.data_devices, jax.process_count())
  if num_seeds > 1:
    logging.info('%d seeds (%d..%d) in one vmap-ed step, mesh %s', num_seeds, config.seed,
                 config.seed + num_seeds - 1, dict(par.mesh.shape))
  os.makedirs(workdir, exist_ok=True)
  dataset = input_pipeline.load_dataset(config.data, config.seed)
  logging.info('Data: %d train, %d %s examples', dataset.num_train, dataset.num_eval, dataset.eval_split)
  spe = input_pipeline.steps_per_epoch(dataset.num_train, config.batch_size, config.data.drop_remainder)
  if spe == 0:
    raise config_lib.ConfigError(
        f'batch_size={config.batch_size} exceeds the {dataset.num_train} training examples with '
        'data.drop_remainder=True')
  parallel.check_batch_sizes(par.mode, par.data_devices, config.batch_size, dataset.num_train,
                             config.data.drop_remainder)
  num_steps = config.num_epochs * spe
  config_lib.validate_against_run(config, spe)

  lr_fn, momentum_fn = create_schedules(config, spe)
  plateaus = None  # one controller per seed
  if config.schedule.name == 'plateau':
    s = config.schedule
    plateaus = [schedules.PlateauController(
        config.optimizer.lr, mode=s.plateau_mode, factor=s.factor, patience=s.patience,
        threshold=s.threshold, threshold_mode=s.threshold_mode, cooldown=s.cooldown, min_lr=s.min_lr)
                for _ in range(num_seeds)]
    lr_fn = config.optimizer.lr  # a plain hyperparameter the host rewrites each epoch

  model = create_model(config.model, par.num_devices, par.mode, axis_name=par.axis_name)
  # Checkpoints hold the state replicated over the devices, whatever their number: restoring onto this
  # run's devices is restoring into that layout; the steps then take it in theirs. With several seeds
  # every per-seed tree (state, metric sums, keys) has a leading seed axis, split over the mesh's 'seeds'.
  if num_seeds == 1:
    init_key, data_key = run_keys(config.seed)
    per_seed = par.replicate
    state = per_seed(create_train_state(init_key, config, model, lr_fn, momentum_fn))
    fresh_metrics = init_train_metrics
    recalibration_key = jax.random.fold_in(data_key, RECALIBRATION_SALT)
  else:
    data_keys = [run_keys(config.seed + i)[1] for i in range(num_seeds)]
    per_seed = par.place_seeds
    state = per_seed(create_seed_states(config, model, lr_fn, momentum_fn))
    fresh_metrics = lambda: stack_seeds([init_train_metrics()] * num_seeds)
    data_key = stack_seeds(data_keys)
    recalibration_key = stack_seeds([jax.random.fold_in(k, RECALIBRATION_SALT) for k in data_keys])
  acc = per_seed(fresh_metrics())
  manager = checkpoint_manager(workdir, config)
  changed = config_lib.check_resume(config, workdir, bool(manager.all_steps()))
  if changed and par.is_main_process:
    logging.warning('Resuming %s with a config that differs from the one it started with: %s',
                    workdir, '; '.join(changed))
  restored = restore_checkpoint(manager, par.to_checkpoint_layout(state),
                                par.to_checkpoint_layout(acc))
  extra = {}
  if restored is not None:
    state, acc, extra = restored
    state, acc = par.to_step_layout(state), par.to_step_layout(acc)
    if plateaus is not None and 'plateau' in extra:
      saved = extra['plateau'] if num_seeds > 1 else [extra['plateau']]
      for plateau, state_dict in zip(plateaus, saved):
        plateau.load_state_dict(state_dict)
  start_step = _scalar(par.host(state.step))
  writer = None
  if par.is_main_process:
    writer = metrics_writer.MetricsWriter(workdir, truncate_after_step=start_step)
    config_lib.save_config(config, workdir)
  if start_step >= num_steps:
    logging.info('Run in %s already finished (step %d of %d); nothing to do.', workdir, start_step,
                 num_steps)
    if par.is_main_process:
      print(f'{workdir}: training already finished at step {start_step}/{num_steps}; nothing to do.')
      writer.close()
    return _returned(par, state, config)
  if start_step:
    logging.info('Resuming from step %d (epoch %d).', start_step, start_step // spe)

  # Every device holds the whole dataset (uint8) and draws the global batch; `shard_batch` splits it.
  train_images = par.replicate(dataset.train_images)
  train_labels = par.replicate(dataset.train_labels)
  eval_arrays = par.shard_eval_arrays(batched_eval_arrays(
      dataset.eval_images, dataset.eval_labels, config.eval_batch_size, par.eval_batch_multiple))
  data_key, recalibration_key = per_seed((data_key, recalibration_key))
  n = dataset.num_train
  compile_start = time.perf_counter()
  sizes = sorted({min(config.batch_size, n - i * config.batch_size) for i in range(spe)})
  # Under several seeds each step is vmap-ed: per-seed arguments on axis 0, shared ones (None) not.
  perm_fn = par.compile(par.seeded(functools.partial(input_pipeline.epoch_permutation, num_examples=n),
                                   in_axes=(0, None)),
                        data_key, 0, in_axes=(0, None))
  first_perm = perm_fn(data_key, 0)
  max_steps_per_call = steps_per_dispatch(config, par.num_devices)
  logging.info('Convolutions: %s (model.conv=%s); up to %d train steps per call.', model.conv_impl,
               config.model.get('conv', 'auto'), max_steps_per_call)
  step_fn = functools.partial(dispatch_fn(max_steps_per_call), steps_per_epoch=spe,
                              batch_size=config.batch_size, augment=config.data.augment,
                              axis_name=par.axis_name, shard_batch=par.shard_batch)
  p_train = {size: par.compile(par.seeded(functools.partial(step_fn, size=size),
                                          in_axes=(0, 0, None, None, 0, 0, None)),
                               state, acc, train_images, train_labels, first_perm, data_key,
                               np.int32(1), donate_argnums=(0, 1), in_axes=(0,) * 6 + (None,))
             for size in sizes}
  eval_axes = (0, None, None, None)
  p_eval = par.compile(par.seeded(functools.partial(evaluate_on_device_data, axis_name=par.axis_name),
                                  in_axes=eval_axes),
                       state, *eval_arrays)
  swa_config = config.swa
  if swa_config.enabled:
    swa_start_step = swa_config.start_epoch * spe
    p_swa_update = par.compile(par.seeded(functools.partial(swa.update_swa, decay=swa_config.decay)),
                               state, donate_argnums=0)
    p_swa_eval = par.compile(par.seeded(
        functools.partial(evaluate_on_device_data, use_swa=True, axis_name=par.axis_name),
        in_axes=eval_axes), state, *eval_arrays)
    # torch's update_bn: the batches of a training epoch (spe of them), each weighted equally.
    p_recalibrate = {
        size: par.compile(
            par.seeded(functools.partial(
                recalibration_step_on_device_data, model=model.clone(bn_momentum=1.0),
                batch_size=config.batch_size, size=size, augment=swa_config.recalibration_augment,
                shard_batch=par.shard_batch), in_axes=(0, 0, None, None, 0, 0, None, None)),
            state.swa_params, state.batch_stats, train_images, train_labels, first_perm,
            recalibration_key, 0, 0, in_axes=(0,) * 6 + (None, None))
        for size in (sizes if jax.tree.leaves(state.batch_stats) else ())}
    reset_batch_stats = per_seed(swa.reset_batch_stats(par.host(state.batch_stats)))
  del first_perm
  compile_seconds = time.perf_counter() - compile_start
  logging.info('Compiled in %.1f s (batch sizes %s).', compile_seconds, sizes)

  # After which steps the host acts (a call of several steps ends there).
  def swa_update_due(step):
    return bool(swa_config.enabled and swa_config.update_every_steps and step > swa_start_step
                and (step - swa_start_step) % swa_config.update_every_steps == 0)

  def log_due(done_in_epoch):
    return bool(config.log_every_steps and done_in_epoch % config.log_every_steps == 0)

  def checkpoint_due(step):
    return bool(config.checkpoint_every_steps and step % config.checkpoint_every_steps == 0)

  stop = preemption.StopRequest()
  with stop:
    run_start = time.perf_counter() - float(extra.get('elapsed_seconds', 0.0))
    for epoch in range(start_step // spe, config.num_epochs):
      perm = perm_fn(data_key, epoch)
      first = start_step - epoch * spe if epoch == start_step // spe else 0
      count_before = float(np.sum(par.host(acc['count'])))  # every seed's images
      epoch_start = time.perf_counter()
      bar = metrics_writer.ProgressBar(spe, first, epoch, config.num_epochs,
                                       config.batch_size * num_seeds,
                                       config.progress_bar and par.is_main_process)
      full_batches = n // config.batch_size  # a last partial batch runs in a call of its own
      done = first  # steps of this epoch done
      while done < spe:
        size = min(config.batch_size, n - done * config.batch_size)
        k = 1 if done >= full_batches else steps_in_call(
            done, full_batches, max_steps_per_call,
            lambda j, epoch=epoch: bool(swa_update_due(epoch * spe + j) or log_due(j)
                                        or checkpoint_due(epoch * spe + j)))
        state, acc = p_train[size](state, acc, train_images, train_labels, perm, data_key, np.int32(k))
        done += k
        step = epoch * spe + done
        if stop.signum is not None and done < spe:  # at an epoch's end, the epoch finishes first
          _check_finite(par.host(acc), config, spe)
          save_checkpoint(manager, par.to_checkpoint_layout(state), par.to_checkpoint_layout(acc),
                          _extra(plateaus, run_start))
          raise preemption.Preempted(stop.signum, step, workdir)
        if swa_update_due(step):
          state = p_swa_update(state)
        if log_due(done) and done < spe:
          _check_finite(par.host(acc), config, spe)
          bar.update(_summary(par.host(acc), num_seeds), done, time.perf_counter() - epoch_start)
        if checkpoint_due(step) and step % spe != 0:
          _check_finite(par.host(acc), config, spe)
          save_checkpoint(manager, par.to_checkpoint_layout(state), par.to_checkpoint_layout(acc),
                          _extra(plateaus, run_start))
      host_acc = par.host(acc)
      train = _per_seed_summaries(host_acc, num_seeds)
      _check_finite(host_acc, config, spe)
      train_seconds = time.perf_counter() - epoch_start
      # The global batches, all devices and all seeds together.
      images_seen = float(np.sum(host_acc['count'])) - count_before
      bar.update(mean_summary(train), spe, train_seconds)
      bar.close()

      swa_record = {}
      if swa_config.enabled and epoch >= swa_config.start_epoch:
        if not swa_config.update_every_steps:
          state = p_swa_update(state)
        if swa_config.eval_every_epoch or epoch + 1 == config.num_epochs:
          if p_recalibrate:  # a model with BatchNorm
            state = state.replace(swa_batch_stats=_recalibrate(
                p_recalibrate, state.swa_params, reset_batch_stats, train_images, train_labels,
                perm_fn(recalibration_key, epoch), recalibration_key, epoch=epoch,
                batch_size=config.batch_size, num_examples=n, num_batches=spe))
          swa_ev = _per_seed_summaries(par.host(p_swa_eval(state, *eval_arrays)), num_seeds)
          swa_record = {**seed_metrics('swa_eval_loss', [e['loss'] for e in swa_ev]),
                        **seed_metrics('swa_eval_accuracy', [e['accuracy'] for e in swa_ev])}
        swa_record['swa_count'] = _scalar(par.host(state.swa_count))

      ev = _per_seed_summaries(par.host(p_eval(state, *eval_arrays)), num_seeds)
      hyper = par.host(state.opt_state.hyperparams)
      lrs = np.asarray(hyper['learning_rate'], np.float64).reshape(-1).tolist()
      record = {
          'epoch': epoch + 1, 'step': epoch * spe + spe,
          **seed_metrics('train_loss', [t['loss'] for t in train]),
          **seed_metrics('train_accuracy', [t['accuracy'] for t in train]),
          **seed_metrics('eval_loss', [e['loss'] for e in ev]),
          **seed_metrics('eval_accuracy', [e['accuracy'] for e in ev]),
          'learning_rate': lrs[0],  # the same for every seed unless ReduceLROnPlateau
          'momentum': float(np.asarray(hyper['momentum']).reshape(-1)[0]),
          'images_per_second': images_seen / train_seconds,
          'elapsed_seconds': time.perf_counter() - run_start,
      }
      if plateaus is not None and num_seeds > 1:
        record['learning_rate_per_seed'] = lrs
      record.update(swa_record)
      if epoch == start_step // spe:
        record['compile_seconds'] = compile_seconds
      if writer is not None:
        writer.write(record)
      if plateaus is not None:
        lr = np.asarray([p.step(e['loss']) for p, e in zip(plateaus, ev)], np.float32)
        state = _set_learning_rate(state, per_seed(lr[0] if num_seeds == 1 else lr))
      acc = per_seed(fresh_metrics())
      save_checkpoint(manager, par.to_checkpoint_layout(state), par.to_checkpoint_layout(acc),
                      _extra(plateaus, run_start))
      if stop.signum is not None and epoch + 1 < config.num_epochs:
        raise preemption.Preempted(stop.signum, (epoch + 1) * spe, workdir)
    if writer is not None:
      writer.close()
  manager.close()
  return _returned(par, state, config)


def _returned(par: parallel.Parallel, state: TrainState, config) -> TrainState:
  """The state without pmap's device axis, applying a model without pmap's collective axis."""
  return par.to_checkpoint_layout(state).replace(apply_fn=create_model(config.model).apply)


def _recalibrate(p_recalibrate, params, reset_batch_stats, images, labels, perm, key, *, epoch: int,
                 batch_size: int, num_examples: int, num_batches: int):
  """swa.recalibrate_batch_stats with the compiled (sharded) steps: a pass over epoch `epoch`'s batches."""
  running = reset_batch_stats
  for i in range(num_batches):
    size = min(batch_size, num_examples - i * batch_size)
    running = p_recalibrate[size](params, running, images, labels, perm, key, epoch, i)
  return running


def _extra(plateaus, run_start: float) -> dict:
  extra = {'elapsed_seconds': time.perf_counter() - run_start}
  if plateaus is not None:  # one seed: its controller's state; several: the list
    states = [p.state_dict() for p in plateaus]
    extra['plateau'] = states[0] if len(states) == 1 else states
  return extra


def _per_seed_summaries(sums, num_seeds: int) -> list[dict[str, float]]:
  return [summarize(sums)] if num_seeds == 1 else summarize_seeds(sums)


def _summary(sums, num_seeds: int) -> dict[str, float]:
  return mean_summary(_per_seed_summaries(sums, num_seeds))


def _scalar(x) -> int:
  """An integer from a host value or a (replicated, possibly multi-process) array; seeds: seed 0's."""
  if isinstance(x, jax.Array):
    x = x.addressable_shards[0].data
  return int(np.asarray(x).reshape(-1)[0])


def _check_finite(acc, config: ml_collections.ConfigDict, steps_per_epoch: int) -> None:
  bad_steps = np.asarray(jax.device_get(acc['nonfinite_step'])).reshape(-1)
  if np.any(bad_steps >= 0) and config.halt_on_nan:
    index = int(np.argmax(bad_steps >= 0))
    bad = int(bad_steps[index])
    which = f' in seed {config.seed + index}' if bad_steps.size > 1 else ''
    raise NonFiniteLossError(
        f'non-finite training loss or parameters at step {bad + 1} '
        f'(epoch {bad // steps_per_epoch + 1}){which}; the last '
        'good checkpoint is kept. Lower optimizer.lr or set halt_on_nan=False to continue anyway.')


# Using a finished (or partial) run -------------------------------------------------------------------


def restore_state(config: ml_collections.ConfigDict, workdir: str,
                  steps_per_epoch: int) -> TrainState:
  """The latest checkpoint of `workdir` as a TrainState for `config` (several seeds: stacked)."""
  lr_fn, momentum_fn = create_schedules(config, steps_per_epoch)
  if config.schedule.name == 'plateau':
    lr_fn = config.optimizer.lr
  model = create_model(config.model)
  if config.num_seeds == 1:
    state = create_train_state(run_keys(config.seed)[0], config, model, lr_fn, momentum_fn)
    acc = init_train_metrics()
  else:
    state = create_seed_states(config, model, lr_fn, momentum_fn)
    acc = stack_seeds([init_train_metrics()] * config.num_seeds)
  restored = restore_checkpoint(checkpoint_manager(workdir, config), state, acc)
  if restored is None:
    raise config_lib.ConfigError(f'--workdir={workdir}: no checkpoint under {workdir}/checkpoints')
  return restored[0]


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Eval loss and accuracy of the running model and, when present, the (recalibrated) SWA model."""
  config_lib.validate(config)
  dataset = input_pipeline.load_dataset(config.data, config.seed)
  spe = input_pipeline.steps_per_epoch(dataset.num_train, config.batch_size, config.data.drop_remainder)
  state = restore_state(config, workdir, spe)
  arrays = jax.device_put(batched_eval_arrays(dataset.eval_images, dataset.eval_labels,
                                              config.eval_batch_size))
  k = config.num_seeds
  over_seeds = (lambda fn: fn) if k == 1 else (lambda fn: jax.vmap(fn, in_axes=(0, None, None, None)))
  ev = _per_seed_summaries(jax.jit(over_seeds(evaluate_on_device_data))(state, *arrays), k)
  out = {'step': _scalar(state.step), 'split': dataset.eval_split,
         **seed_metrics('eval_loss', [e['loss'] for e in ev]),
         **seed_metrics('eval_accuracy', [e['accuracy'] for e in ev])}
  if state.swa_count is not None and _scalar(state.swa_count) > 0:
    swa_ev = _per_seed_summaries(jax.jit(over_seeds(functools.partial(
        evaluate_on_device_data, use_swa=True)))(state, *arrays), k)
    out.update(**seed_metrics('swa_eval_loss', [e['loss'] for e in swa_ev]),
               **seed_metrics('swa_eval_accuracy', [e['accuracy'] for e in swa_ev]),
               swa_count=_scalar(state.swa_count))
  return out


def export_variables(config: ml_collections.ConfigDict, workdir: str, use_swa: bool) -> dict:
  """{'params': ..., 'batch_stats': ...} of the latest checkpoint's running or SWA model, as numpy."""
  if config.num_seeds > 1:
    raise config_lib.ConfigError(
        f'--workdir={workdir} holds num_seeds={config.num_seeds} models; export one with '
        'train.unstack_seed(train.restore_state(config, workdir, 1), i) in Python')
  state = restore_state(config, workdir, steps_per_epoch=1)
  if use_swa:
    if state.swa_count is None or int(state.swa_count) == 0:
      raise config_lib.ConfigError(f'--workdir={workdir}: the checkpoint holds no SWA model')
    variables = {'params': state.swa_params, 'batch_stats': state.swa_batch_stats}
  else:
    variables = {'params': state.params, 'batch_stats': state.batch_stats}
  return jax.device_get(variables)
