"""Config -> objects: the run's keys, model, optimizer, schedules (one registry), plateau controllers and
the initial train state of every seed.

Nothing here is compiled; `program.Program` compiles the steps over what these build.
"""

import dataclasses
import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

from cifar_jax import ema as ema_lib
from cifar_jax import models
from cifar_jax import onednn_conv
from cifar_jax import schedules
from cifar_jax import steps
from cifar_jax import swa
from cifar_jax import swag
from cifar_jax.errors import ConfigError
from cifar_jax.models import layers

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def run_keys(seed: int) -> tuple[jax.Array, jax.Array]:
  """(init_key, data_key) of a run: the params' initialisation, and every batch's order and augmentation."""
  init_key, data_key = jax.random.split(jax.random.PRNGKey(seed))
  return init_key, data_key


def seed_data_keys(config: ml_collections.ConfigDict) -> tuple[Any, Any]:
  """(data_key, recalibration_key) of each seed, per seed (`steps.per_seed`): seed i uses seed + i."""
  data_keys = [run_keys(config.seed + i)[1] for i in range(config.num_seeds)]
  return (steps.per_seed(data_keys),
          steps.per_seed([jax.random.fold_in(k, steps.RECALIBRATION_SALT) for k in data_keys]))


# The model ----------------------------------------------------------------------------------------------


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
      raise ConfigError(
          "model.conv='onednn' runs on one device under jit (or under pmap); set cpu_devices=1 or "
          "model.conv='auto'")
    try:
      onednn_conv.load()
    except RuntimeError as e:
      raise ConfigError(f"model.conv='onednn': {e}; use model.conv='auto' or 'xla'") from e
    return 'onednn'
  return 'onednn' if num_devices == 1 and onednn_conv.available() else 'xla'


def bn_impl(model_config: ml_collections.ConfigDict, conv: str) -> str:
  """The training-mode BatchNorm `model_config.batch_norm` asks for, 'xla' or 'onednn', beside `conv`
  (`conv_impl`'s choice).

  'auto' takes oneDNN's batch normalisation (`onednn_conv.batch_norm_train`, the ReLU after it fused)
  wherever the convolutions are oneDNN's (one CPU device, the library built), except for the pretrained
  families in float32, and XLA's elsewhere. Measured (BENCHMARKS.md, "BatchNorm through oneDNN"): ResNet18
  at width 0.25 1.30x as fast in bfloat16 and 1.21x in float32; EfficientNet-Lite0 1.12x in bfloat16, but
  no faster in float32, with 0.4 GB more memory, so float32 fine-tuning keeps XLA's. 'xla' keeps XLA's (the
  bits of runs before 2026-12-07); 'onednn' insists, on one device. Layers whose statistics are shared
  over devices or whose dtype oneDNN does not take here stay XLA's either way (`layers.TorchBatchNorm`).
  """
  choice = model_config.get('batch_norm', 'auto')
  if choice not in ('auto',) + layers.BATCH_NORM_IMPLS:
    raise ConfigError(f"model.batch_norm must be 'auto', 'xla' or 'onednn', got {choice!r}")
  if choice == 'xla':
    return 'xla'
  if choice == 'onednn':
    if conv != 'onednn':
      raise ConfigError("model.batch_norm='onednn' needs oneDNN's convolutions' conditions (one CPU "
                        "device, the library built); use model.batch_norm='auto' or 'xla'")
    return 'onednn'
  if model_config.name in models.PRETRAINED_FAMILIES and model_config.get('dtype', 'float32') == 'float32':
    return 'xla'
  return 'onednn' if conv == 'onednn' else 'xla'


def model_attributes(model_config: ml_collections.ConfigDict) -> dict:
  """The attributes of `models.MODELS[model_config.name]` that `config.model` sets (its family's fields)."""
  m = model_config
  if m.name in models.RESNETS:
    return dict(width_multiplier=m.width_multiplier, norm=m.norm, zero_init_residual=m.zero_init_residual,
                shakedrop_p_last=m.shakedrop.p_last, shakedrop_level=m.shakedrop.level,
                frozen_bn=m.get('frozen_bn', False))
  if m.name in models.PRETRAINED_FAMILIES:
    attributes = dict(frozen_bn=m.get('frozen_bn', False), image_size=m.get('image_size', 0),
                      resize_size=m.get('resize_size', 0), normalization=normalization(m))
    if m.name == 'efficientnet_lite0':
      attributes.update(dropout_rate=m.dropout_rate, drop_connect_rate=m.drop_connect_rate)
    return attributes
  if m.name == 'shake_shake':
    return dict(depth=m.depth, base_width=m.base_width, shake_forward=m.shake.forward,
                shake_backward=m.shake.backward, shake_level=m.shake.level)
  return dict(depth=m.depth, alpha=m.pyramid_alpha, block=m.block, shakedrop_p_last=m.shakedrop.p_last,
              shakedrop_level=m.shakedrop.level)


def normalization(model_config: ml_collections.ConfigDict) -> str:
  """The input normalisation of a pretrained family: `model.normalization`, 'auto' = its weights'."""
  choice = model_config.get('normalization', 'auto')
  if choice != 'auto':
    return choice
  return 'inception' if model_config.name == 'efficientnet_lite0' else 'imagenet'


def create_model(model_config: ml_collections.ConfigDict, num_devices: int = 1, mode: str = 'jit',
                 **kwargs):
  """The model that `config.model` describes, for a run over `num_devices` (see `conv_impl`)."""
  conv = conv_impl(model_config, num_devices, mode)
  bn = bn_impl(model_config, conv)
  if conv == 'onednn':  # one OpenMP team where few XLA ops separate oneDNN's calls: its BatchNorm too
    onednn_conv.set_one_thread(bn == 'onednn')
  return models.create_model(model_config.name, **model_attributes(model_config),
                             dtype=DTYPES[model_config.dtype], conv_impl=conv, bn_impl=bn, **kwargs)


def parameter_count(params) -> int:
  """How many numbers `params` (arrays or their shapes, one seed's) holds."""
  return sum(int(math.prod(x.shape)) for x in jax.tree.leaves(params))


# XLA's optimisation level for the initial state (the model's initialisers, the optimizer's zeros): the
# program runs once per seed, so the time an optimised compile of its random-number kernels takes would
# not pay back.
INIT_COMPILER_OPTIONS = {'xla_backend_optimization_level': 0, 'xla_llvm_disable_expensive_passes': True}
INPUT_SHAPE = (1, 32, 32, 3)  # what `lazy_init` traces the forward pass with (for the shapes only)


def _variables(key: jax.Array, model) -> tuple[Any, Any]:
  """The model's initial params and batch stats ({} for GroupNorm models) for `key`."""
  variables = model.lazy_init(key, jax.ShapeDtypeStruct(INPUT_SHAPE, jnp.float32), train=False)
  return variables['params'], variables.get('batch_stats', {})


@functools.lru_cache(maxsize=8)
def _compiled_init(model):
  """`_variables` jitted once per model (every call reuses it), as `create_train_state` compiles it."""
  return jax.jit(functools.partial(_variables, model=model), compiler_options=INIT_COMPILER_OPTIONS)


def initialized(key: jax.Array, model) -> tuple[Any, Any]:
  """Initial params and batch stats ({} for GroupNorm models), as the initial TrainState holds them.

  Compiled as one program the initialisers' values differ from an op-by-op `model.init` by float32
  rounding (within four float32 epsilons of each tensor's largest value, tests/test_models.py); before
  2026-11-30 the trainer initialised op by op.
  """
  return _compiled_init(model)(key)


# The optimizer and the initial state ---------------------------------------------------------------------


def sgd(learning_rate, momentum, weight_decay, nesterov=False) -> optax.GradientTransformation:
  """torch.optim.SGD: weight decay added to the gradient, then momentum, then the learning rate."""
  return optax.chain(
      optax.add_decayed_weights(weight_decay),
      optax.trace(decay=momentum, nesterov=nesterov),
      optax.scale_by_learning_rate(learning_rate))


FROZEN = 'frozen'  # the label of the parameters `config.finetune.frozen` keeps as they are


def clip_grad_norm(max_norm: float, trainable: Callable) -> optax.GradientTransformation:
  """torch's clip_grad_norm_ over the gradients `trainable(grads)` marks: the norm of the tensors' norms,
  every gradient times min(max_norm / (norm + 1e-6), 1)."""
  def update_fn(updates, state, params=None):
    del params
    marked = [u for u, m in zip(jax.tree.leaves(updates), jax.tree.leaves(trainable(updates))) if m]
    total = jnp.linalg.norm(jnp.stack([jnp.linalg.norm(u.ravel()) for u in marked]))
    coef = jnp.minimum(max_norm / (total + 1e-6), 1.0)
    return jax.tree.map(lambda u: u * coef, updates), state
  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def stage_values(text: str) -> dict[str, float]:
  """'layer1=0.1,layer2=0.3' -> {'layer1': 0.1, 'layer2': 0.3} (`config.finetune.lr_multipliers`)."""
  pairs = [item.split('=') for item in text.split(',') if item.strip()]
  if any(len(p) != 2 for p in pairs):
    raise ConfigError(f"finetune.lr_multipliers must read 'stage=multiplier,...', got {text!r}")
  try:
    return {k.strip(): float(v) for k, v in pairs}
  except ValueError as e:
    raise ConfigError(f"finetune.lr_multipliers must read 'stage=multiplier,...', got {text!r}") from e


def stage_names(text: str) -> list[str]:
  return [name.strip() for name in text.split(',') if name.strip()]


def finetuning(config: ml_collections.ConfigDict) -> bool:
  """Whether `config` trains its parameters in groups (config.finetune) or clips its gradients."""
  f = config.get('finetune')
  grouped = f is not None and bool(f.frozen or f.lr_multipliers or f.no_weight_decay)
  return grouped or config.optimizer.get('clip_grad_norm', 0.0) > 0


def param_groups(config: ml_collections.ConfigDict) -> tuple[Callable, dict[str, tuple[float, bool]]]:
  """(params -> a tree of group labels, {label: (lr multiplier, weight decay on)}): one group per stage of
  the model (`models.STAGES`; 'all' for a model without stages), FROZEN for the frozen stages."""
  f = config.finetune
  stages, stage_of = models.STAGES.get(config.model.name, (('all',), lambda name: 'all'))
  frozen = set(stages[:-1] if f.frozen == 'backbone' else stage_names(f.frozen))
  multipliers = stage_values(f.lr_multipliers)
  no_decay = set(stage_names(f.no_weight_decay))
  groups = {s: (multipliers.get(s, 1.0), s not in no_decay) for s in stages if s not in frozen}

  def label(name: str) -> str:
    stage = stage_of(name)
    return FROZEN if stage in frozen else stage

  def labels(params):
    return {name: _filled(sub, label(name)) for name, sub in params.items()}
  return labels, groups


def _filled(tree, value):
  """`tree` with every leaf `value`."""
  return jax.tree.map(lambda _: value, tree)


def finetune_sgd(learning_rate, momentum, weight_decay, nesterov=False, *, labels, groups,
                 clip: float) -> optax.GradientTransformation:
  """`sgd` per group (`param_groups`: lr times the group's multiplier, weight decay on or off), the frozen
  parameters' updates zero, after torch's gradient clipping of the trained ones (clip > 0)."""
  transforms = {FROZEN: optax.set_to_zero()}
  for label, (multiplier, decay) in groups.items():
    transforms[label] = sgd(learning_rate * multiplier, momentum, weight_decay if decay else 0.0, nesterov)
  tx = optax.multi_transform(transforms, labels)
  if clip > 0:
    trainable = lambda tree: jax.tree.map(lambda label: label != FROZEN, labels(tree))
    tx = optax.chain(clip_grad_norm(clip, trainable), tx)
  return tx


def create_optimizer(config: ml_collections.ConfigDict, learning_rate_fn,
                     momentum_fn=None) -> optax.GradientTransformation:
  """SGD whose lr and momentum (floats or schedules of the step) are logged in the optimizer state; by
  group (`finetune_sgd`) when `config.finetune` or `optimizer.clip_grad_norm` asks."""
  opt = config.optimizer
  factory = sgd
  if finetuning(config):
    labels, groups = param_groups(config)
    clip = opt.get('clip_grad_norm', 0.0)

    def factory(learning_rate, momentum, weight_decay, nesterov=False):
      # A closure, not a partial: inject_hyperparams would take a partial's callables for schedules.
      return finetune_sgd(learning_rate, momentum, weight_decay, nesterov, labels=labels, groups=groups,
                          clip=clip)
  return optax.inject_hyperparams(factory, static_args=('nesterov',))(
      learning_rate=learning_rate_fn,
      momentum=opt.momentum if momentum_fn is None else momentum_fn,
      weight_decay=opt.weight_decay, nesterov=opt.nesterov)


def _fresh_state(key: jax.Array, *, model, tx: optax.GradientTransformation,
                 swa_config: ml_collections.ConfigDict, swag_config: ml_collections.ConfigDict,
                 ema_on: bool = False) -> steps.TrainState:
  params, batch_stats = _variables(key, model)
  state = steps.TrainState.create(apply_fn=model.apply, params=params, tx=tx, batch_stats=batch_stats)
  if swa_config.enabled:
    state = swa.init_swa(state)
    if swag_config.enabled:
      state = swag.init_swag(state, swag_config.rank, swag_config.diag_only)
  if ema_on:
    state = ema_lib.init_ema(state)
  return state


def state_initializer(config: ml_collections.ConfigDict, model, learning_rate_fn,
                      momentum_fn=None) -> Callable[[jax.Array], steps.TrainState]:
  """key -> a fresh TrainState for `model`: the initialisers, the optimizer's state and the SWA fields in
  one program, traced and compiled once for every seed (at `INIT_COMPILER_OPTIONS`; op by op, each
  distinct shape's zeros would compile a program of its own)."""
  tx = create_optimizer(config, learning_rate_fn, momentum_fn)
  return jax.jit(functools.partial(_fresh_state, model=model, tx=tx, swa_config=config.swa,
                                   swag_config=config.swag, ema_on=ema_lib.enabled(config)),
                 compiler_options=INIT_COMPILER_OPTIONS)


def create_train_state(key: jax.Array, config: ml_collections.ConfigDict, model,
                       learning_rate_fn, momentum_fn=None) -> steps.TrainState:
  """A fresh TrainState for `model`."""
  return state_initializer(config, model, learning_rate_fn, momentum_fn)(key)


def create_seed_states(config: ml_collections.ConfigDict, model, learning_rate_fn,
                       momentum_fn=None) -> steps.TrainState:
  """The fresh TrainState of each of `config.num_seeds` seeds (seed i: `run_keys(seed + i)`), per seed.

  Each seed is initialised exactly as its single-seed run is (from its own key), then stacked
  (`steps.per_seed`: one seed is the state itself).
  """
  return InitialState(config, state_initializer(config, model, learning_rate_fn, momentum_fn)).compute()[0]


def create_initial_state(config: ml_collections.ConfigDict, model,
                         run_schedules: 'RunSchedules'):
  """(state, metric sums) of every seed at step 0, per seed."""
  return initial_state_fn(config, model, run_schedules).compute()


@dataclasses.dataclass(frozen=True)
class InitialState:
  """A run's initial (state, metric sums): `shapes()` of one seed without computing them, `compute()` of
  every seed (per seed). Both use one jitted initialiser, so its trace is made once."""

  config: ml_collections.ConfigDict
  init: Any  # `state_initializer`'s jitted function of a key

  def shapes(self):
    return (self.init.eval_shape(run_keys(self.config.seed)[0]),
            jax.eval_shape(steps.init_train_metrics))

  def compute(self):
    k = self.config.num_seeds
    return (steps.per_seed([self.init(run_keys(self.config.seed + i)[0]) for i in range(k)]),
            steps.per_seed([steps.init_train_metrics()] * k))


def initial_state_fn(config: ml_collections.ConfigDict, model,
                     run_schedules: 'RunSchedules') -> InitialState:
  """The run's `InitialState` (see `create_initial_state`)."""
  return InitialState(config, state_initializer(config, model, run_schedules.learning_rate,
                                                run_schedules.momentum))


# Schedules ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ScheduleSpec:
  """How `schedule.name` is built: `build(s, lr, steps_per_epoch, run_length, spe)` -> (lr, momentum).

  `spe` is steps_per_epoch when the schedule steps per epoch, else None; `run_length` is the main
  schedule's length in scheduler steps. `step_every` is how often the blog stepped torch's scheduler.
  """

  build: Callable
  step_every: str


def _multistep(s, lr, steps_per_epoch, run_length, spe):
  del steps_per_epoch, run_length
  return schedules.multistep_lr(lr, list(s.milestones), s.gamma, steps_per_epoch=spe), None


def _step(s, lr, steps_per_epoch, run_length, spe):
  del steps_per_epoch, run_length
  return schedules.step_lr(lr, s.step_size, s.gamma, steps_per_epoch=spe), None


def _cosine(s, lr, steps_per_epoch, run_length, spe):
  del steps_per_epoch
  t_max = s.T_max if s.T_max > 0 else run_length
  return schedules.cosine_annealing_lr(lr, t_max, s.eta_min, steps_per_epoch=spe), None


def _warm_restarts(s, lr, steps_per_epoch, run_length, spe):
  del steps_per_epoch, run_length
  return schedules.cosine_annealing_warm_restarts(
      lr, s.T_0, s.T_mult, s.eta_min, steps_per_epoch=spe, fractional=s.fractional), None


def _cyclic(s, lr, steps_per_epoch, run_length, spe):
  del run_length, spe
  up = s.step_size_up_epochs * steps_per_epoch if s.step_size_up_epochs > 0 else s.step_size_up
  kwargs = dict(step_size_up=up, step_size_down=s.step_size_down if s.step_size_down > 0 else None,
                mode=s.mode, gamma=s.gamma)
  momentum_fn = None
  if s.cycle_momentum:
    momentum_fn = schedules.cyclic_momentum(lr, s.max_lr, **kwargs, base_momentum=s.base_momentum,
                                            max_momentum=s.max_momentum)
  return schedules.cyclic_lr(lr, s.max_lr, **kwargs), momentum_fn


def _one_cycle(s, lr, steps_per_epoch, run_length, spe):
  del lr, steps_per_epoch, spe
  kwargs = dict(total_steps=s.total_steps if s.total_steps > 0 else run_length,
                pct_start=s.pct_start, anneal_strategy=s.anneal_strategy, div_factor=s.div_factor,
                final_div_factor=s.final_div_factor, three_phase=s.three_phase)
  momentum_fn = None
  if s.cycle_momentum:
    momentum_fn = schedules.one_cycle_momentum(s.max_lr, **kwargs, base_momentum=s.base_momentum,
                                               max_momentum=s.max_momentum)
  return schedules.one_cycle_lr(s.max_lr, **kwargs), momentum_fn


def _constant(s, lr, steps_per_epoch, run_length, spe):
  del s, steps_per_epoch, run_length, spe
  return schedules.constant_lr(lr), None


def _warmup_cosine(s, lr, steps_per_epoch, run_length, spe):
  del steps_per_epoch, spe
  return schedules.warmup_cosine(lr, s.warmup_steps, run_length), None


def _bit_hyperrule(s, lr, steps_per_epoch, run_length, spe):
  del steps_per_epoch, run_length, spe
  return schedules.bit_hyperrule(lr, s.dataset_size), None


# Per epoch for MultiStep, Step, cosine and warm restarts, per batch for cyclic and one-cycle (the blog).
SCHEDULES = {
    'multistep': ScheduleSpec(_multistep, 'epoch'),
    'step': ScheduleSpec(_step, 'epoch'),
    'cosine': ScheduleSpec(_cosine, 'epoch'),
    'warm_restarts': ScheduleSpec(_warm_restarts, 'epoch'),
    'cyclic': ScheduleSpec(_cyclic, 'batch'),
    'one_cycle': ScheduleSpec(_one_cycle, 'batch'),
    'constant': ScheduleSpec(_constant, 'epoch'),
    'plateau': ScheduleSpec(_constant, 'epoch'),  # the host rewrites the lr (`create_plateaus`)
    'warmup_cosine': ScheduleSpec(_warmup_cosine, 'batch'),
    'bit_hyperrule': ScheduleSpec(_bit_hyperrule, 'batch'),
}
SCHEDULE_NAMES = tuple(SCHEDULES)


def step_every(schedule_config) -> str:
  """'epoch' or 'batch': how often torch's scheduler would be stepped."""
  return schedule_config.step_every or SCHEDULES[schedule_config.name].step_every


def main_schedule_epochs(config: ml_collections.ConfigDict) -> int:
  """Epochs the main schedule spans: the whole run, or the epochs before SWA starts."""
  return config.swa.start_epoch if config.swa.enabled else config.num_epochs


def create_schedules(config: ml_collections.ConfigDict, steps_per_epoch: int):
  """The lr schedule and the momentum schedule (None: constant momentum) of `config`, torch-exact.

  Both are functions of the optimizer update count with a device table over the run, so a jitted step
  evaluates them without a host round trip.
  """
  s = config.schedule
  if s.name not in SCHEDULES:
    raise ConfigError(f'schedule.name must be one of {sorted(SCHEDULES)}, got {s.name!r}')
  lr = config.optimizer.lr
  num_steps = config.num_epochs * steps_per_epoch
  main_epochs = main_schedule_epochs(config)
  per_epoch = step_every(s) == 'epoch'
  spe = steps_per_epoch if per_epoch else None
  run_length = main_epochs if per_epoch else main_epochs * steps_per_epoch  # in scheduler steps
  lr_fn, momentum_fn = SCHEDULES[s.name].build(s, lr, steps_per_epoch, run_length, spe)
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


@dataclasses.dataclass
class RunSchedules:
  """What the optimizer reads: the lr (a schedule, or a float the host rewrites under ReduceLROnPlateau),
  the momentum schedule (None: constant), and one plateau controller per seed (None: no plateau)."""

  learning_rate: Any
  momentum: Any
  plateaus: list | None


def create_run_schedules(config: ml_collections.ConfigDict, steps_per_epoch: int) -> RunSchedules:
  """`create_schedules`, and for schedule.name='plateau' torch's controller for each seed."""
  lr_fn, momentum_fn = create_schedules(config, steps_per_epoch)
  if config.schedule.name != 'plateau':
    return RunSchedules(lr_fn, momentum_fn, None)
  s = config.schedule
  plateaus = [schedules.PlateauController(
      config.optimizer.lr, mode=s.plateau_mode, factor=s.factor, patience=s.patience,
      threshold=s.threshold, threshold_mode=s.threshold_mode, cooldown=s.cooldown, min_lr=s.min_lr)
              for _ in range(config.num_seeds)]
  return RunSchedules(config.optimizer.lr, momentum_fn, plateaus)
