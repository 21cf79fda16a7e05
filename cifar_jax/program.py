"""A run's Program: every compiled function of a run, built in one place, and the BatchNorm pass.

`Program.compile` wraps the pure steps of `steps.py` for the run's seeds (`jax.vmap`) and devices (jit over
a mesh, or pmap; `parallel.Parallel`) and compiles each one ahead of time: the train call for each batch
size of an epoch, eval, the SWA update and eval, the BatchNorm recalibration step, and the epoch
permutation. Only what the first step needs (the permutation and the train call of its batch size) is
compiled before `compile` returns; the others compile in background threads while training runs
(`Compiling`), and a call waits for its function only if it comes first. No call compiles anything
(tests/test_parallel.py counts it). Each argument of a compiled function is named with its kind
(`ARG_KINDS`), from which the seed and device axes follow.
"""

import collections
import concurrent.futures
import dataclasses
import functools
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cifar_jax import augmentations
from cifar_jax import calibration
from cifar_jax import ema as ema_lib
from cifar_jax import input_pipeline
from cifar_jax import memory
from cifar_jax import parallel
from cifar_jax import steps
from cifar_jax import swa
from cifar_jax import swag
from cifar_jax import tta as tta_lib

# Auto `steps_per_dispatch` on the CPU (BENCHMARKS.md; scripts/bench_dispatch.py measured it: see git).
CPU_STEPS_PER_DISPATCH = 8
# Compiled functions are named FUNCTION_PREFIX + their ARG_KINDS name (in XLA's logs and compile events).
FUNCTION_PREFIX = 'cifar_jax_'

# The kinds of a compiled function's arguments: a tree of every seed (a leading seed axis when
# num_seeds > 1, mapped by vmap), a device array the seeds share (the dataset, the eval set), or a host
# scalar (under pmap not split over the devices either). SEEDS: every seed's tree, which the function
# reduces over (an ensemble over the seeds: not vmap-ed; its outputs have no seed axis).
SEED, SHARED, HOST, SEEDS = 'seed', 'shared', 'host', 'seeds'
ARG_KINDS = {
    'train': dict(state=SEED, acc=SEED, images=SHARED, labels=SHARED, perm=SEED, data_key=SEED,
                  num_steps=HOST),
    'eval': dict(state=SEED, images=SHARED, labels=SHARED, mask=SHARED),
    'swa_update': dict(state=SEED),
    'recalibrate': dict(params=SEED, running=SEED, images=SHARED, labels=SHARED, perm=SEED,
                        data_key=SEED, epoch=HOST, index=HOST),
    'permutation': dict(data_key=SEED, epoch=HOST),
    'ensemble': dict(log_probs=SEEDS, labels=SHARED, mask=SHARED),
    'calibrate': dict(log_probs=SEED, labels=SHARED, mask=SHARED),
    'swag_sample': dict(state=SEED, sample_key=SEED, first=HOST),
    'swag_recalibrate': dict(params=SEED, running=SEED, images=SHARED, labels=SHARED, perm=SEED,
                             data_key=SEED, epoch=HOST, index=HOST),
    'swag_predict': dict(params=SEED, batch_stats=SEED, acc=SEED, images=SHARED, labels=SHARED,
                         mask=SHARED),
    'swag_predict_entropy': dict(params=SEED, batch_stats=SEED, acc=SEED, entropy_acc=SEED, images=SHARED,
                                 labels=SHARED, mask=SHARED),
}


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
  return steps.train_steps_on_device_data if max_steps_per_call > 1 else steps.one_step_on_device_data


def steps_in_call(step: int, limit: int, max_steps: int, host_acts_after: Callable[[int], bool]) -> int:
  """The steps of the call that starts after `step` steps: at most `max_steps`; it stops at step `limit`
  or at the first step `j` with `host_acts_after(j)` (an action is due there: a log, a checkpoint...)."""
  k = 1
  while k < max_steps and step + k < limit and not host_acts_after(step + k):
    k += 1
  return k


def batch_sizes(num_examples: int, batch_size: int, steps_per_epoch: int) -> list[int]:
  """The size of each batch of an epoch (the last one may be partial)."""
  return [min(batch_size, num_examples - i * batch_size) for i in range(steps_per_epoch)]


def recalibration_pass(step_by_size, params, running, images, labels, perm, data_key, *, epoch: int,
                       sizes: list[int]):
  """torch's update_bn: `running` (reset statistics) folded over the batches of epoch `epoch` in order.

  `step_by_size[size]` is `steps.recalibration_step_on_device_data` for batches of `size`, compiled; each
  batch is weighted equally, the last partial batch included.
  """
  for index, size in enumerate(sizes):
    running = step_by_size[size](params, running, images, labels, perm, data_key, epoch, index)
  return running


def recalibrate_batch_stats(model, params, batch_stats, images, labels, data_key, *, epoch: int,
                            batch_size: int, drop_remainder: bool = False, augment: bool = True,
                            normalization: str = 'cifar10'):
  """torch's update_bn on one device: new BatchNorm statistics for `params` from one pass over the data.

  The pass sees the batches the training loader would give in epoch `epoch` (order, crops, flips) of a run
  whose data key is `data_key`, through `recalibration_pass`, as the trainer's does. A model without
  BatchNorm (empty `batch_stats`) is returned unchanged.

  Args:
    model: the ResNet; it is cloned with bn_momentum=1.0 for the pass.
    params: the (averaged) params.
    batch_stats: a tree of the model's statistics (only its structure is used).
    images: device uint8 training images, NHWC.
    labels: device training labels.
    data_key: the key the pass draws its order and augmentation from.
    epoch: whose order and augmentation to use.
    batch_size: the training batch size.
    drop_remainder: skip the last partial batch, as the loader would.
    augment: crop and flip as in training (torch's update_bn iterates the training loader).
    normalization: the data's (`input_pipeline.NORMALIZATIONS`).

  Returns:
    The recalibrated batch statistics.
  """
  if not jax.tree.leaves(batch_stats):
    return batch_stats
  n = labels.shape[0]
  sizes = batch_sizes(n, batch_size, input_pipeline.steps_per_epoch(n, batch_size, drop_remainder))
  perm = jax.jit(input_pipeline.epoch_permutation, static_argnums=2)(data_key, epoch, n)
  step_by_size = {size: jax.jit(functools.partial(
      steps.recalibration_step_on_device_data, model=model.clone(bn_momentum=1.0),
      batch_size=batch_size, size=size, augment=augment, normalization=normalization))
                  for size in set(sizes)}
  return recalibration_pass(step_by_size, params, swa.reset_batch_stats(batch_stats), images, labels,
                            perm, data_key, epoch=epoch, sizes=sizes)


class _Pending:
  """A function of the Program not traced yet: `compile()` traces, lowers and compiles it."""

  def __init__(self, compile_fn: Callable[[], Any]):
    self.compile = compile_fn


class Compiling:
  """A function being compiled in a background thread (`Program.compile`): its first use waits for it.

  Calls and attributes (`as_text()`, ...) go to the compiled function. A compile error is raised at the
  first use.
  """

  def __init__(self, future: concurrent.futures.Future):
    self._future = future

  def result(self):
    return self._future.result()

  def __call__(self, *args, **kwargs):
    return self._future.result()(*args, **kwargs)

  def __getattr__(self, name: str):
    return getattr(self._future.result(), name)


@dataclasses.dataclass
class Program:
  """The compiled functions of a run and the device data they read; see the module docstring.

  `train[size]`, `eval`, `swa_update`, `swa_eval`, `recalibrate[size]` and `permutation` are compiled
  (under jit, ahead-of-time executables with `as_text()`), or `Compiling` while a background thread
  compiles them; `traces` counts how often each was traced (once per batch size: a second trace would be a
  second compilation). With num_seeds > 1 `eval` and `swa_eval` also return every eval example's log
  probabilities and `ensemble` averages them over the seeds; with SWAG, `swag_sample`,
  `swag_recalibrate[size]`, `swag_predict` and `calibrate` sample, recalibrate and evaluate `swag_chunk`
  samples per seed in one call (`swag_evaluate`).
  """

  par: parallel.Parallel
  steps_per_epoch: int
  sizes: list[int]  # the size of each batch of an epoch
  full_batches: int  # the batches of batch_size (a last partial batch runs in a call of its own)
  max_steps_per_call: int
  data: dict[str, Any]  # images, labels (every device holds them), eval_arrays, data_key, recalibration_key
  train: dict[int, Any]
  eval: Any
  permutation: Any
  swa_update: Any = None
  swa_eval: Any = None
  ema_eval: Any = None  # the eval of the weights' moving average (config.ema; ema.py)
  recalibrate: dict[int, Any] = dataclasses.field(default_factory=dict)
  reset_batch_stats: Any = None
  ensemble: Any = None
  calibrate: Any = None
  swag_sample: Any = None
  swag_recalibrate: dict[int, Any] = dataclasses.field(default_factory=dict)
  swag_predict: Any = None
  swag_predict_entropy: Any = None
  swag_chunk: int = 0
  swag_batches: int = 0  # the batches of each SWAG sample's BatchNorm pass
  traces: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  calls: list[int] = dataclasses.field(default_factory=list)  # the steps of each train call so far
  compile_seconds: float = 0.0  # before `compile` returned (the first step's functions)
  background: list = dataclasses.field(default_factory=list)  # the futures of the background compiles
  train_memory: memory.StepMemory | None = None  # the first train call's memory plan (jit only)

  @classmethod
  def compile(cls, config: ml_collections.ConfigDict, model, par: parallel.Parallel,
              dataset: input_pipeline.Dataset, state: steps.TrainState, acc, data_key,
              recalibration_key, first_step: int = 0, background: bool = True,
              training: bool = True, evaluate: bool = True, check_memory: bool = True,
              log_probs: bool = False, member_entropy: bool = False) -> 'Program':
    """Places the data on the devices and compiles every function of a run of `config` for `state`.

    `state` and `acc` may be arrays or their shapes (`Parallel.abstract_per_seed`): only their shapes,
    dtypes and shardings are read.

    The permutation and the train call of step `first_step` (the first the run takes) are compiled before
    this returns; the rest in background threads when `background`, else before it returns too.
    `training=False` (`train.evaluate_checkpoint`): no train calls and no SWA update, the evaluation's
    functions only.
    `evaluate=False` (the LR range test) leaves out the eval set and the eval functions.
    `check_memory`: the first train call's memory plan is logged and, when it cannot fit the memory
    available, a ConfigError stops the run before anything else compiles (`memory.check`).
    `log_probs`: `eval` and `swa_eval` return the eval log probabilities with one seed too (temperature
    scaling, OOD scores: `uncertainty.py`). `member_entropy`: with SWAG, also `swag_predict_entropy`.
    The eval functions average `evaluation.tta`'s views (`tta.py`).
    """
    # Every device holds the whole dataset (uint8) and draws the global batch; `shard_batch` splits it.
    images, labels = par.replicate(dataset.train_images), par.replicate(dataset.train_labels)
    eval_arrays = par.shard_eval_arrays(steps.batched_eval_arrays(
        dataset.eval_images, dataset.eval_labels, config.eval_batch_size,
        par.eval_batch_multiple)) if evaluate else None
    data_key, recalibration_key = par.place_per_seed((data_key, recalibration_key))
    n = dataset.num_train
    spe = input_pipeline.steps_per_epoch(n, config.batch_size, config.data.drop_remainder)
    traces = collections.Counter()

    def build(name, fn, *args, donate=()):
      kinds = list(ARG_KINDS[name].values())

      def traced(*a):
        traces[name] += 1
        return fn(*a)

      traced.__name__ = traced.__qualname__ = FUNCTION_PREFIX + name

      if SEEDS in kinds:  # over every seed at once
        return _Pending(lambda: par.lower(traced, *args, out_replicated=True)())
      seeded = par.seeded(traced, in_axes=tuple(0 if k == SEED else None for k in kinds))
      return _Pending(lambda: par.lower(seeded, *args, donate_argnums=donate,
                                        in_axes=tuple(None if k == HOST else 0 for k in kinds))())

    start = time.perf_counter()
    sizes = batch_sizes(n, config.batch_size, spe)
    permutation = build('permutation', functools.partial(input_pipeline.epoch_permutation,
                                                         num_examples=n), data_key, 0).compile()
    first_perm = permutation(data_key, 0)
    normalization = config.data.get('normalization', 'cifar10')  # input_pipeline.NORMALIZATIONS
    max_steps_per_call = steps_per_dispatch(config, par.num_devices)
    ensemble = par.num_seeds > 1  # the seeds' eval log probabilities, averaged by `ensemble`
    with_log_probs = ensemble or log_probs
    tta_views = tta_lib.level(config)
    step_fn = functools.partial(dispatch_fn(max_steps_per_call), steps_per_epoch=spe,
                                batch_size=config.batch_size, augment=config.data.augment,
                                axis_name=par.axis_name, shard_batch=par.shard_batch,
                                mixup_alpha=config.data.get('mixup', 0.0),
                                micro_batches=config.optimizer.get('micro_batches', 1),
                                label_smoothing=augmentations.label_smoothing(config),
                                normalization=normalization, ema=ema_lib.from_config(config),
                                **augmentations.batch_options(config))
    program = cls(
        par=par, steps_per_epoch=spe, sizes=sizes, full_batches=n // config.batch_size,
        max_steps_per_call=max_steps_per_call,
        data=dict(images=images, labels=labels, eval_arrays=eval_arrays, data_key=data_key,
                  recalibration_key=recalibration_key),
        train={size: build('train', functools.partial(step_fn, size=size), state, acc, images, labels,
                           first_perm, data_key, np.int32(1), donate=(0, 1))
               for size in sorted(set(sizes)) if training},
        eval=build('eval', functools.partial(steps.evaluate_on_device_data, axis_name=par.axis_name,
                                             with_log_probs=with_log_probs, tta=tta_views,
                                             normalization=normalization),
                   state, *eval_arrays) if evaluate else None,
        permutation=permutation, traces=traces)
    if evaluate and ema_lib.enabled(config):
      program.ema_eval = build('eval', functools.partial(
          steps.evaluate_on_device_data, use_ema=True, axis_name=par.axis_name, with_log_probs=with_log_probs,
          tta=tta_views, normalization=normalization), state, *eval_arrays)
    swa_config = config.swa
    if swa_config.enabled:
      swa_update_fn = functools.partial(swa.update_swa, decay=swa_config.decay)
      if config.swag.enabled:
        swa_update_fn = functools.partial(swag.update_swa_and_swag, swa_update=swa_update_fn)
      if training:
        program.swa_update = build('swa_update', swa_update_fn, state, donate=0)
      program.swa_eval = build('eval', functools.partial(
          steps.evaluate_on_device_data, use_swa=True, axis_name=par.axis_name, with_log_probs=with_log_probs,
          tta=tta_views,
          normalization=normalization),
          state, *eval_arrays)
      if jax.tree.leaves(state.batch_stats):  # a model with BatchNorm
        pass_model = model.clone(bn_momentum=1.0)  # the batch's own statistics
        program.recalibrate = {
            size: build('recalibrate', functools.partial(
                steps.recalibration_step_on_device_data, model=pass_model, batch_size=config.batch_size,
                size=size, augment=swa_config.recalibration_augment, shard_batch=par.shard_batch,
                normalization=normalization),
                        state.swa_params, state.batch_stats, images, labels, first_perm,
                        recalibration_key, 0, 0)
            for size in sorted(set(sizes))}
        program.reset_batch_stats = par.place_per_seed(swa.reset_batch_stats(jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(par.host_shape(x), x.dtype), state.batch_stats)))
    if evaluate and (ensemble or config.swag.enabled):
      program.build_ensemble_functions(config, model, build, state, first_perm, member_entropy)
    del first_perm
    first_size = sizes[first_step % spe]
    if training:
      program.train[first_size] = program.train[first_size].compile()
      # Said (and refused if it cannot fit) before anything else compiles and before the first step.
      program.train_memory = memory.step_memory(program.train[first_size])
      if check_memory:
        memory.check(program.train_memory, batch_size=config.batch_size,
                     micro_batches=config.optimizer.get('micro_batches', 1), data_devices=par.data_devices,
                     resident=memory.resident_bytes((images, labels)),
                     params_bytes=memory.shard_bytes(state.params))
    program.compile_seconds = time.perf_counter() - start
    program.compile_rest(background)
    if not background:
      program.compile_seconds = time.perf_counter() - start
    return program

  def build_ensemble_functions(self, config, model, build, state, first_perm,
                               member_entropy: bool = False) -> None:
    """`ensemble` and `calibrate` over eval log probabilities, and with SWAG its sampling, per-sample
    BatchNorm pass and prediction, each over `swag_chunk` samples of every seed at once."""
    par, eval_arrays = self.par, self.data['eval_arrays']
    _, labels, mask = eval_arrays
    normalization = config.data.get('normalization', 'cifar10')
    tta_views = tta_lib.level(config)
    per_seed_eval = par.seeded(functools.partial(steps.evaluate_on_device_data, with_log_probs=True,
                                                 tta=tta_views,
                                                 normalization=normalization),
                               in_axes=(0, None, None, None))
    shape = jax.eval_shape(per_seed_eval, state, *eval_arrays)[1]
    log_probs = jax.ShapeDtypeStruct(shape.shape, shape.dtype, sharding=first_perm.sharding)
    if par.num_seeds > 1:
      self.ensemble = build('ensemble', calibration.ensemble_sums, log_probs, labels, mask)
    self.calibrate = build('calibrate', calibration.calibration_sums, log_probs, labels, mask)
    if not config.swag.enabled:
      return
    s = config.swag
    chunk = self.swag_chunk = swag.samples_per_call(s)
    self.data['swag_keys'] = par.place_per_seed(swag.sample_keys(config.seed, par.num_seeds))

    def sample_chunk(st, key, first):
      params = swag.sample_chunk(st, key, first, chunk=chunk, rank=s.rank, scale=s.scale,
                                 var_clamp=s.var_clamp)
      running = jax.tree.map(lambda x: jnp.broadcast_to(x, (chunk,) + x.shape),
                             swa.reset_batch_stats(st.batch_stats))
      return params, running

    self.swag_sample = build('swag_sample', sample_chunk, state, self.data['swag_keys'], np.int32(0))
    params, running = jax.eval_shape(par.seeded(sample_chunk, in_axes=(0, 0, None)), state,
                                     self.data['swag_keys'], np.int32(0))
    seed_sharding = first_perm.sharding
    params, running = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=seed_sharding),
                                   (params, running))
    self.swag_batches = max(1, int(np.ceil(s.bn_update_fraction * self.steps_per_epoch)))
    if jax.tree.leaves(state.batch_stats):
      pass_model = model.clone(bn_momentum=1.0)
      self.swag_recalibrate = {
          size: build('swag_recalibrate', jax.vmap(functools.partial(
              steps.recalibration_step_on_device_data, model=pass_model, batch_size=config.batch_size,
              size=size, augment=config.swa.recalibration_augment, shard_batch=par.shard_batch,
              normalization=normalization),
              in_axes=(0, 0) + (None,) * 6), params, running, self.data['images'], self.data['labels'],
                      first_perm, self.data['recalibration_key'], 0, 0)
          for size in sorted(set(self.sizes[:self.swag_batches]))}

    def chunk_log_probs(params, batch_stats, images, labels, mask):
      member = functools.partial(steps.evaluate_variables, state.apply_fn, with_log_probs=True, tta=tta_views)
      return jax.vmap(member, in_axes=(0, 0, None, None, None))(params, batch_stats, images, labels, mask)[1]

    def predict(params, batch_stats, acc, images, labels, mask):
      return jnp.logaddexp(acc, jax.nn.logsumexp(chunk_log_probs(params, batch_stats, images, labels, mask),
                                                 axis=0))

    self.swag_predict = build('swag_predict', predict, params, running, log_probs, *eval_arrays)
    if member_entropy:  # also the sum over samples of each sample's predictive entropy (mutual information)
      def predict_entropy(params, batch_stats, acc, entropy_acc, images, labels, mask):
        samples = chunk_log_probs(params, batch_stats, images, labels, mask)
        entropy = -jnp.sum(jnp.exp(samples) * samples, axis=-1)
        return (jnp.logaddexp(acc, jax.nn.logsumexp(samples, axis=0)), entropy_acc + jnp.sum(entropy, axis=0))

      entropy_shape = jax.ShapeDtypeStruct(log_probs.shape[:-1], log_probs.dtype, sharding=seed_sharding)
      self.swag_predict_entropy = build('swag_predict_entropy', predict_entropy, params, running, log_probs,
                                        entropy_shape, *eval_arrays)
      self.data['swag_entropy_acc'] = jax.device_put(jnp.zeros(entropy_shape.shape, log_probs.dtype),
                                                     seed_sharding)
    self.data['swag_acc'] = jax.device_put(
        jnp.full(log_probs.shape, -jnp.inf, log_probs.dtype), seed_sharding)

  def compile_rest(self, background: bool) -> None:
    """Traces, lowers and compiles the functions not compiled yet (`_Pending`) in threads at once:
    XLA compiles each on a core of its own (a run's other batch sizes, eval, the SWA functions), or loads
    it from the compilation cache. In the `background` each becomes `Compiling` until it is done; otherwise
    this waits for them."""
    pending = {}
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      if isinstance(value, _Pending):
        pending[field.name, None] = value
      elif isinstance(value, dict):  # by batch size
        pending.update({(field.name, key): v for key, v in value.items() if isinstance(v, _Pending)})
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1,
                                                 thread_name_prefix='cifar_jax_compile')
    futures = {slot: pool.submit(unbuilt.compile) for slot, unbuilt in pending.items()}
    pool.shutdown(wait=False)
    self.background = list(futures.values())
    for (name, key), future in futures.items():
      compiled = Compiling(future) if background else future.result()
      if key is None:
        setattr(self, name, compiled)
      else:
        getattr(self, name)[key] = compiled

  def wait_compiled(self) -> None:
    """Waits for the background compiles (raising the first error of any)."""
    for future in self.background:
      future.result()

  # The calls the host loop makes ---------------------------------------------------------------------

  def epoch_permutation(self, epoch: int):
    return self.permutation(self.data['data_key'], epoch)

  def train_call(self, state, acc, perm, step: int, host_acts_after: Callable[[int], bool]):
    """The steps after `step` up to the next one where the host acts (at most max_steps_per_call).

    Returns (state, acc, steps taken). An epoch's last partial batch runs in a call of its own.
    """
    spe = self.steps_per_epoch
    epoch, done = divmod(step, spe)
    size = self.sizes[done]
    full = self.full_batches
    k = 1 if done >= full else steps_in_call(step, epoch * spe + full, self.max_steps_per_call,
                                             host_acts_after)
    state, acc = self.train[size](state, acc, self.data['images'], self.data['labels'], perm,
                                  self.data['data_key'], np.int32(k))
    self.calls.append(k)
    return state, acc, k

  def evaluate(self, state, use_swa: bool = False):
    """The eval sums (loss_sum, correct, count, the calibration sums) of the running model, or of the
    SWA model."""
    return self.evaluate_members(state, use_swa)[0]

  def evaluate_members(self, state, use_swa: bool = False, eval_arrays=None, use_ema: bool = False):
    """(each seed's eval sums, the ensemble's over the seeds, each seed's eval log probabilities (seeds,
    batches, batch, classes)); the last two None with one seed. `eval_arrays`: another set of the eval
    set's shapes (a corrupted one), else the eval set. `use_swa` / `use_ema`: the SWA model / the
    weights' moving average instead of the running model."""
    eval_arrays = self.data['eval_arrays'] if eval_arrays is None else eval_arrays
    out = (self.ema_eval if use_ema else self.swa_eval if use_swa else self.eval)(state, *eval_arrays)
    if self.ensemble is None:
      return (out[0], None, out[1]) if isinstance(out, tuple) else (out, None, None)
    sums, log_probs = out
    return sums, self.ensemble(log_probs, *eval_arrays[1:]), log_probs

  def swag_log_probs(self, state, epoch: int, num_samples: int) -> list:
    """Each seed's SWAG log probabilities after each call: [(samples so far, the log of their mean
    probabilities)], `num_samples` samples per seed in all (`swag_evaluate`)."""
    return self.swag_log_probs_sets(state, epoch, num_samples, [self.data['eval_arrays']])[0]

  def swag_log_probs_sets(self, state, epoch: int, num_samples: int, eval_sets: list,
                          every_call: bool = True, with_entropy: bool = False) -> list:
    """`swag_log_probs` of each of `eval_sets` (eval arrays of the eval set's shapes), each sample drawn
    and recalibrated once for all of them; `every_call=False` keeps only the last entry of each list.
    `with_entropy` (`compile(member_entropy=True)`): each entry also holds the samples' mean predictive
    entropy per example, (samples, log probabilities, mean entropy)."""
    if num_samples % self.swag_chunk:
      raise ValueError(f'{num_samples} samples in calls of {self.swag_chunk}')
    key = self.data['recalibration_key']
    perm = self.permutation(key, epoch)
    accs, outs = [self.data['swag_acc']] * len(eval_sets), [[] for _ in eval_sets]
    entropies = [self.data.get('swag_entropy_acc')] * len(eval_sets)
    for first in range(0, num_samples, self.swag_chunk):
      params, running = self.swag_sample(state, self.data['swag_keys'], np.int32(first))
      if self.swag_recalibrate:
        running = recalibration_pass(self.swag_recalibrate, params, running, self.data['images'],
                                     self.data['labels'], perm, key, epoch=epoch,
                                     sizes=self.sizes[:self.swag_batches])
      done = first + self.swag_chunk
      for i, eval_arrays in enumerate(eval_sets):
        if with_entropy:
          accs[i], entropies[i] = self.swag_predict_entropy(params, running, accs[i], entropies[i],
                                                            *eval_arrays)
        else:
          accs[i] = self.swag_predict(params, running, accs[i], *eval_arrays)
        if every_call or done == num_samples:
          outs[i].append((done, accs[i] - np.float32(np.log(done)))
                         + ((entropies[i] / np.float32(done),) if with_entropy else ()))
    return outs

  def swag_evaluate(self, state, epoch: int, num_samples: int):
    """(each seed's SWAG sums, MultiSWAG's over the seeds or None, `swag_log_probs`'s list):
    `num_samples` samples per seed, each with its BatchNorm statistics recomputed over the first
    `swag_batches` batches of epoch `epoch` (as SWA's, `recalibration_pass`), their probabilities averaged
    (Bayesian model average)."""
    _, labels, mask = self.data['eval_arrays']
    partial = self.swag_log_probs(state, epoch, num_samples)
    log_probs = partial[-1][1]
    sums = self.calibrate(log_probs, labels, mask)
    return sums, (None if self.ensemble is None else self.ensemble(log_probs, labels, mask)), partial

  def swag_evaluate_sets(self, state, epoch: int, num_samples: int, eval_sets: list) -> list:
    """`swag_evaluate`'s (sums, MultiSWAG's sums or None) of each of `eval_sets`, the same samples for
    all."""
    out = []
    for eval_arrays, partial in zip(eval_sets, self.swag_log_probs_sets(state, epoch, num_samples, eval_sets,
                                                                        every_call=False)):
      _, labels, mask = eval_arrays
      log_probs = partial[-1][1]
      out.append((self.calibrate(log_probs, labels, mask),
                  None if self.ensemble is None else self.ensemble(log_probs, labels, mask)))
    return out

  def recalibrate_swa(self, state, epoch: int) -> steps.TrainState:
    """The SWA model's BatchNorm statistics recomputed over epoch `epoch`'s batches (torch's update_bn)."""
    if not self.recalibrate:  # a model without BatchNorm
      return state
    key = self.data['recalibration_key']
    running = recalibration_pass(self.recalibrate, state.swa_params, self.reset_batch_stats,
                                 self.data['images'], self.data['labels'],
                                 self.permutation(key, epoch), key, epoch=epoch, sizes=self.sizes)
    return state.replace(swa_batch_stats=running)

