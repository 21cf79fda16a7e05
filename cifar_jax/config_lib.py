"""Config checks that run before anything is compiled (the saved config.json: cifar_jax/checkpointing.py)."""

import difflib
import math
import os
import shutil

from absl import logging
import ml_collections

from cifar_jax import builders
from cifar_jax import corruptions
from cifar_jax import ema as ema_lib
from cifar_jax import input_pipeline
from cifar_jax import lr_curves
from cifar_jax import models
from cifar_jax import ood
from cifar_jax import parallel
from cifar_jax import pretrained
from cifar_jax import schedules
from cifar_jax import steps
from cifar_jax import swag
from cifar_jax import tta
from cifar_jax.errors import ConfigError

# The free space a run needs on its workdir's filesystem before it starts (checkpoints, metrics), in MB.
MIN_FREE_DISK_MB = 100


def _require(ok: bool, message: str) -> None:
  if not ok:
    raise ConfigError(message)


def _choice(value, field: str, choices) -> None:
  _require(value in choices, f'{field} must be one of {list(choices)}, got {value!r}')


def _positive(value, field: str, integer: bool = False) -> None:
  kind = int if integer else (int, float)
  ok = isinstance(value, kind) and not isinstance(value, bool) and value > 0
  _require(ok, f'{field} must be a positive {"integer" if integer else "number"}, got {value!r}')


def _int_at_least(value, field: str, low: int, note: str = '') -> None:
  ok = isinstance(value, int) and not isinstance(value, bool) and value >= low
  _require(ok, f'{field} must be an integer >= {low}{note}, got {value!r}')


def field_names(config: ml_collections.ConfigDict, prefix: str = '') -> list[str]:
  """Every field of `config` as a dotted path, sub-configs included ('optimizer', 'optimizer.lr', ...)."""
  names = []
  for key, value in config.items():
    names.append(prefix + key)
    if isinstance(value, ml_collections.ConfigDict):
      names.extend(field_names(value, prefix + key + '.'))
  return names


def check_field_names(names, config: ml_collections.ConfigDict, flag: str = '--config') -> None:
  """Raises ConfigError for the first of `names` (dotted paths) that is not a field of `config`."""
  known = field_names(config)
  for name in names:
    if name in known:
      continue
    parent, _, leaf = name.rpartition('.')
    siblings = field_value(config, parent) if parent in known else config if not parent else None
    if isinstance(siblings, ml_collections.ConfigDict):  # a typo in the last part: match its siblings
      close = difflib.get_close_matches(leaf, list(siblings.keys()), n=1, cutoff=0.6)
      close = [f'{parent}.{close[0]}' if parent else close[0]] if close else []
      fields = f'{parent or "the config"} has {sorted(siblings.keys())}'
    else:
      close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
      fields = f'the top-level fields are {sorted(config.keys())}'
    hint = f'did you mean {flag}.{close[0]}?' if close else fields
    raise ConfigError(f'{flag}.{name}: no such config field; {hint}')


def field_value(config: ml_collections.ConfigDict, name: str):
  """The value of the dotted field `name` ('optimizer.lr')."""
  for key in name.split('.'):
    config = config[key]
  return config


def _number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _validate_regularizers(config: ml_collections.ConfigDict) -> None:
  """loss.label_smoothing, data.cutout, data.cutmix (cifar_jax/augmentations.py)."""
  loss = config.get('loss')
  eps = 0.0 if loss is None else loss.get('label_smoothing', 0.0)
  _require(_number(eps) and 0.0 <= eps < 1.0,
           f'loss.label_smoothing must be in [0, 1) (0: off; timm: 0.1, airbench: 0.2), got {eps!r}')
  cutout = config.data.get('cutout')
  if cutout is not None and cutout.enabled:
    size = input_pipeline.IMAGE_SIZE
    _require(isinstance(cutout.size, int) and not isinstance(cutout.size, bool) and 1 <= cutout.size <= size,
             f'data.cutout.size must be an integer from 1 to the image size {size} (DeVries & Taylor: 16 '
             f'for CIFAR-10), got {cutout.size!r}')
    _int_at_least(cutout.count, 'data.cutout.count', 1)
  cutmix = config.data.get('cutmix')
  if cutmix is not None and cutmix.enabled:
    _require(_number(cutmix.alpha) and cutmix.alpha > 0,
             f'data.cutmix.alpha must be > 0 (Yun et al.: 1.0), got {cutmix.alpha!r}')
    for name in ('prob', 'switch_prob'):
      value = cutmix[name]
      _require(_number(value) and 0.0 <= value <= 1.0,
               f'data.cutmix.{name} must be a probability in [0, 1], got {value!r}')


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks every field whose validity does not depend on the data; raises ConfigError."""
  _validate_model(config.model)
  _choice(config.data.source, 'data.source', input_pipeline.SOURCES)
  if config.data.source in ('npz', 'cifar10_python', 'cifar100_python', 'images'):
    what = {'npz': 'an .npz file with x_train, y_train', 'cifar10_python': 'the cifar-10-batches-py folder',
            'cifar100_python': 'the cifar-100-python folder',
            'images': 'the folder scripts/gpu/gpu_bundle.py writes (.gpu_data)'}[config.data.source]
    _require(bool(config.data.path), f'data.path must be set for data.source={config.data.source}: {what}')
  _require(config.data.validation_size >= 0,
           f'data.validation_size must be >= 0, got {config.data.validation_size}')
  mixup = config.data.get('mixup', 0.0)
  _require(isinstance(mixup, (int, float)) and math.isfinite(mixup) and mixup >= 0,
           f'data.mixup must be >= 0 (0: off; BiT: 0.1), got {mixup!r}')
  _validate_regularizers(config)
  if config.data.source == 'synthetic':
    _positive(config.data.synthetic_train_size, 'data.synthetic_train_size', integer=True)
    _positive(config.data.synthetic_eval_size, 'data.synthetic_eval_size', integer=True)
    classes = config.data.get('synthetic_num_classes', input_pipeline.NUM_CLASSES)
    _require(isinstance(classes, int) and classes >= 2,
             f'data.synthetic_num_classes must be an integer >= 2, got {classes!r}')
  _choice(config.data.get('normalization', 'cifar10'), 'data.normalization',
          tuple(input_pipeline.NORMALIZATIONS))
  normalization = config.data.get('normalization', 'cifar10')
  _require(normalization == 'cifar10' or config.model.name not in models.PRETRAINED_FAMILIES,
           f'data.normalization={normalization!r}: {config.model.name} normalises its input as its '
           "pretrained weights expect (model.normalization); keep data.normalization='cifar10'")
  if config.data.source == 'tfds':
    _choice(config.data.get('tfds_name', 'cifar10'), 'data.tfds_name', tuple(input_pipeline.TFDS_DATASETS))
  _positive(config.num_epochs, 'num_epochs', integer=True)
  _validate_seeds(config)
  _positive(config.batch_size, 'batch_size', integer=True)
  _positive(config.eval_batch_size, 'eval_batch_size', integer=True)
  _choice(config.get('parallelism', 'jit'), 'parallelism', parallel.MODES)
  _require(config.get('cpu_devices', 0) >= 0,
           f"cpu_devices must be 0 (one per core) or a device count, got {config.get('cpu_devices')}")
  _positive(config.optimizer.lr, 'optimizer.lr')
  _require(0.0 <= config.optimizer.momentum < 1.0,
           f'optimizer.momentum must be in [0, 1), got {config.optimizer.momentum}')
  _require(config.optimizer.weight_decay >= 0.0,
           f'optimizer.weight_decay must be >= 0, got {config.optimizer.weight_decay}')
  _validate_micro_batches(config)
  _validate_schedule(config.schedule)
  if 'init_from' in config:
    _validate_finetuning(config)
  if config.swa.enabled:
    _validate_swa(config)
  if config.get('swag') is not None and config.swag.enabled:
    _validate_swag(config)
  if config.get('ema') is not None and config.ema.enabled:
    _validate_ema(config.ema)
  if 'lr_find' in config:
    _validate_lr_find(config.lr_find)
  if 'evaluation' in config:
    _validate_evaluation(config)
  _int_at_least(config.checkpoint_every_steps, 'checkpoint_every_steps', 0, ' (0 = every epoch)')
  _int_at_least(config.keep_checkpoints, 'keep_checkpoints', 1)
  _int_at_least(config.log_every_steps, 'log_every_steps', 0, ' (0 = never)')
  _int_at_least(config.get('steps_per_dispatch', 0), 'steps_per_dispatch', 0, ' (0 = auto)')
  _require(isinstance(config.get('compilation_cache', ''), str),
           "compilation_cache must be 'auto', a folder, or '' (off), got "
           f"{config.get('compilation_cache')!r}")


def _validate_micro_batches(config: ml_collections.ConfigDict) -> None:
  """optimizer.micro_batches: a whole number of examples in each micro-batch of a full batch."""
  n = config.optimizer.get('micro_batches', 1)
  _int_at_least(n, 'optimizer.micro_batches', 1, ' (1 = no gradient accumulation)')
  b = config.batch_size
  if b % n:
    options = [d for d in range(1, b + 1) if b % d == 0]
    nearest = sorted(options, key=lambda d: (abs(d - n), d))[:2]
    raise ConfigError(
        f'optimizer.micro_batches={n} does not divide batch_size={b} into equal micro-batches; use a '
        f'divisor of {b} such as {" or ".join(map(str, sorted(nearest)))}, or a batch_size that is a '
        f'multiple of {n}')


def check_micro_batch_split(config: ml_collections.ConfigDict, mode: str, data_devices: int,
                            num_examples: int | None = None) -> None:
  """Each micro-batch must split evenly over the devices; under pmap the last partial batch's too
  (`steps.micro_batch_sizes`; jit runs a micro-batch the devices do not divide unsharded)."""
  n = config.optimizer.get('micro_batches', 1)
  if n <= 1 or data_devices <= 1:
    return
  micro = config.batch_size // n
  if micro % data_devices:
    fits = [m for m in range(n, 0, -1) if config.batch_size % m == 0
            and (config.batch_size // m) % data_devices == 0]
    raise ConfigError(
        f'optimizer.micro_batches={n} makes micro-batches of {micro} examples, which do not split over '
        f'the {data_devices} devices (parallelism={mode}); use optimizer.micro_batches='
        f'{fits[0] if fits else 1} or a batch_size that is a multiple of {n * data_devices}')
  last = num_examples % config.batch_size if num_examples is not None else 0
  if mode == 'pmap' and last and not config.data.drop_remainder:
    sizes = steps.micro_batch_sizes(last, n)
    if any(size % data_devices for size in sizes):
      raise ConfigError(
          f'the last batch of each epoch has {last} examples, whose micro-batches {sizes} '
          f'(optimizer.micro_batches={n}) do not split over the {data_devices} devices under '
          'parallelism=pmap; set data.drop_remainder=True, or parallelism=jit')


def _validate_model(m: ml_collections.ConfigDict) -> None:
  """The model's name, dtype and convolutions, and the fields of its family."""
  _choice(m.name, 'model.name', sorted(models.MODELS))
  _choice(m.dtype, 'model.dtype', tuple(builders.DTYPES))
  _choice(m.get('conv', 'auto'), 'model.conv', ('auto', 'xla', 'onednn'))
  if m.name in models.RESNETS:
    _choice(m.norm, 'model.norm', models.resnet.NORMS)
    _require(not (m.get('frozen_bn', False) and m.norm != 'batch'),
             f"model.frozen_bn=True needs model.norm='batch', got {m.norm!r}")
    _positive(m.width_multiplier, 'model.width_multiplier')
    if m.norm == 'group_ws':
      widths = models.ResNet(stage_sizes=(), width_multiplier=m.width_multiplier).widths()
      _require(all(w % models.GROUP_SIZE == 0 for w in widths),
               f'model.width_multiplier={m.width_multiplier} gives widths {widths}; '
               f'group_ws needs multiples of {models.GROUP_SIZE}')
  elif m.name == 'shake_shake':
    _model_rule(models.shake_shake.blocks_per_stage, m.depth)
    _require(isinstance(m.base_width, int) and m.base_width >= 2 and m.base_width % 2 == 0,
             f'model.base_width={m.base_width} must be an even integer >= 2 (each shortcut path has half)')
    _choice(m.shake.forward, 'model.shake.forward', models.shake.FORWARD_MODES)
    _choice(m.shake.backward, 'model.shake.backward', models.shake.BACKWARD_MODES)
    _choice(m.shake.level, 'model.shake.level', models.shake.LEVELS)
  else:
    _choice(m.block, 'model.block', sorted(models.pyramidnet.BLOCKS))
    _model_rule(models.pyramidnet.blocks_per_stage, m.depth, m.block)
    _positive(m.pyramid_alpha, 'model.pyramid_alpha')
  if m.name in models.PRETRAINED_FAMILIES:
    _int_at_least(m.image_size, 'model.image_size', 0, ' (0 = the data\'s 32 px)')
    _int_at_least(m.resize_size, 'model.resize_size', 0, ' (0 = no random crop)')
    _choice(m.normalization, 'model.normalization', ('auto',) + tuple(models.layers.NORMALIZATIONS))
    if m.name == 'efficientnet_lite0':
      _require(0.0 <= m.dropout_rate < 1.0, f'model.dropout_rate must be in [0, 1), got {m.dropout_rate}')
      _require(0.0 <= m.drop_connect_rate < 1.0,
               f'model.drop_connect_rate must be in [0, 1), got {m.drop_connect_rate}')
    return
  _require(not m.get('frozen_bn', False) or m.name in models.STAGES,
           f'model.frozen_bn=True: model.name={m.name} has no frozen BatchNorm; use one of '
           f'{sorted(models.STAGES)}')
  if m.name != 'shake_shake':
    p_last = m.shakedrop.p_last
    _require(0.0 < p_last <= 1.0,
             f'model.shakedrop.p_last={p_last} must be in (0, 1] (the last block\'s keep probability; '
             '1 = no ShakeDrop)')
    _choice(m.shakedrop.level, 'model.shakedrop.level', models.shake.LEVELS)


def _validate_finetuning(config: ml_collections.ConfigDict) -> None:
  """init_from (the file itself is read before the run starts: `pretrained.load`), config.finetune and
  optimizer.clip_grad_norm."""
  init, name = config.init_from, config.model.name
  if init.path:
    _choice(init.layout, 'init_from.layout', sorted(pretrained.LAYOUTS))
    _require(name in pretrained.LAYOUTS[init.layout],
             f'init_from.layout={init.layout} holds the weights of {list(pretrained.LAYOUTS[init.layout])}, '
             f'not model.name={name}')
  _require(isinstance(init.strict, bool), f'init_from.strict must be True or False, got {init.strict!r}')
  _require(config.optimizer.clip_grad_norm >= 0.0,
           f'optimizer.clip_grad_norm must be >= 0 (0 = off), got {config.optimizer.clip_grad_norm}')
  f = config.finetune
  if not (f.frozen or f.lr_multipliers or f.no_weight_decay):
    return
  _require(name in models.STAGES, f'config.finetune needs a model with stages ({sorted(models.STAGES)}), '
                                  f'got model.name={name}')
  stages = models.STAGES[name][0]
  named = builders.stage_names(f.no_weight_decay) + list(builders.stage_values(f.lr_multipliers))
  if f.frozen != 'backbone':
    named += builders.stage_names(f.frozen)
  unknown = [s for s in named if s not in stages]
  _require(not unknown, f'config.finetune names {unknown}: model.name={name} has the stages {list(stages)} '
                        "(finetune.frozen='backbone': all but head)")
  _require(all(v >= 0 for v in builders.stage_values(f.lr_multipliers).values()),
           f'finetune.lr_multipliers must be >= 0, got {f.lr_multipliers!r}')


def _model_rule(blocks_per_stage, depth: int, *args) -> None:
  """The model family's own depth rule (a ValueError there) as one line naming model.depth."""
  try:
    blocks_per_stage(depth, *args)
  except ValueError as e:
    raise ConfigError(f'model.depth={depth}: {e}') from None


def _validate_seeds(config: ml_collections.ConfigDict) -> None:
  """num_seeds > 1 runs under jit in one process; plateau and every other schedule work per seed."""
  num_seeds = config.get('num_seeds', 1)
  _positive(num_seeds, 'num_seeds', integer=True)
  _int_at_least(config.get('seed_devices', 0), 'seed_devices', 0, ' (0 = automatic)')
  if num_seeds > 1:
    _require(config.get('parallelism', 'jit') == 'jit',
             f'num_seeds={num_seeds} needs parallelism=jit (a 2-D mesh of seeds and batch shards); '
             f"parallelism={config.parallelism} trains one seed a run")
    _require(config.distributed.num_processes <= 1,
             f'num_seeds={num_seeds} runs in one process; set distributed.num_processes=0 or num_seeds=1')


def _validate_schedule(s: ml_collections.ConfigDict) -> None:
  """The schedule's fields, with the checks torch's scheduler constructors would make."""
  _choice(s.name, 'schedule.name', builders.SCHEDULE_NAMES)
  _choice(s.step_every, 'schedule.step_every', ('', 'epoch', 'batch'))
  if s.name == 'multistep':
    milestones = list(s.milestones)
    _require(all(isinstance(m, int) and not isinstance(m, bool) and m >= 0 for m in milestones),
             f'schedule.milestones must be integers >= 0, got {tuple(milestones)}')
    _require(milestones == sorted(milestones),
             f'schedule.milestones must be in increasing order, got {tuple(milestones)}')
  if s.name == 'step':
    _positive(s.step_size, 'schedule.step_size', integer=True)
  if s.name == 'warm_restarts':
    _positive(s.T_0, 'schedule.T_0', integer=True)
    _int_at_least(s.T_mult, 'schedule.T_mult', 1)
  if s.name in ('one_cycle', 'cyclic'):
    _positive(s.max_lr, 'schedule.max_lr')
    _require(s.step_every in ('', 'batch'),
             f"schedule.step_every must be 'batch' for {s.name} (torch steps it every batch), "
             f'got {s.step_every!r}')
  if s.name == 'cyclic':
    _choice(s.mode, 'schedule.mode', ('triangular', 'triangular2', 'exp_range'))
    _int_at_least(s.step_size_up_epochs, 'schedule.step_size_up_epochs', 0, ' (0 = use step_size_up)')
    if s.step_size_up_epochs == 0:
      _positive(s.step_size_up, 'schedule.step_size_up', integer=True)
  if s.name == 'one_cycle':
    _choice(s.anneal_strategy, 'schedule.anneal_strategy', ('cos', 'linear'))
    _require(0.0 <= s.pct_start <= 1.0, f'schedule.pct_start must be in [0, 1], got {s.pct_start}')
    _positive(s.div_factor, 'schedule.div_factor')
    _positive(s.final_div_factor, 'schedule.final_div_factor')
  if s.name == 'plateau':
    _require(0.0 < s.factor < 1.0, f'schedule.factor must be in (0, 1), got {s.factor}')
    _choice(s.plateau_mode, 'schedule.plateau_mode', ('min', 'max'))
    _choice(s.threshold_mode, 'schedule.threshold_mode', ('rel', 'abs'))
    _int_at_least(s.patience, 'schedule.patience', 0)
    _int_at_least(s.cooldown, 'schedule.cooldown', 0)
  if s.name == 'warmup_cosine':
    _int_at_least(s.warmup_steps, 'schedule.warmup_steps', 0)
  if s.name == 'bit_hyperrule':
    _positive(s.dataset_size, 'schedule.dataset_size', integer=True)
  if s.name in ('warmup_cosine', 'bit_hyperrule'):
    _require(s.step_every in ('', 'batch'), f"schedule.step_every must be 'batch' for {s.name}, got "
                                            f'{s.step_every!r}')
  _int_at_least(s.warmup_epochs, 'schedule.warmup_epochs', 0, ' (0 = no warm-up)')
  if s.warmup_epochs > 0:
    _require(0.0 < s.warmup_start_factor <= 1.0,
             f'schedule.warmup_start_factor must be in (0, 1], got {s.warmup_start_factor}')


def _validate_swa(config: ml_collections.ConfigDict) -> None:
  swa_config, num_epochs = config.swa, config.num_epochs
  start = swa_config.start_epoch
  _require(num_epochs >= 2, f'swa.enabled needs num_epochs >= 2 (an epoch before swa.start_epoch and '
                            f'one after it), got num_epochs={num_epochs}')
  _require(isinstance(start, int) and 1 <= start < num_epochs,
           f'swa.start_epoch must be in 1..{num_epochs - 1} (SWA needs at least one epoch before and '
           f'one after it; num_epochs={num_epochs}), got {start}')
  _positive(swa_config.lr, 'swa.lr')
  _choice(swa_config.schedule, 'swa.schedule', ('constant', 'swa_lr'))
  _choice(swa_config.anneal_strategy, 'swa.anneal_strategy', ('cos', 'linear'))
  _int_at_least(swa_config.anneal_epochs, 'swa.anneal_epochs', 0)
  _require(0.0 <= swa_config.decay < 1.0, f'swa.decay must be in [0, 1), got {swa_config.decay}')
  _int_at_least(swa_config.update_every_steps, 'swa.update_every_steps', 0, ' (0 = every epoch)')
  _require(config.schedule.name != 'plateau',
           'swa.enabled does not combine with schedule.name=plateau; use another schedule.name')


def _validate_ema(e: ml_collections.ConfigDict) -> None:
  _require(isinstance(e.decay, (int, float)) and 0.0 <= e.decay < 1.0,
           f'ema.decay must be in [0, 1) (timm: 0.9998; 0 = a copy of the weights), got {e.decay!r}')
  _require(isinstance(e.warmup, bool), f'ema.warmup must be True or False, got {e.warmup!r}')
  _int_at_least(e.every_steps, 'ema.every_steps', 1, ' (1 = after every step)')
  _choice(e.batch_stats, 'ema.batch_stats', ema_lib.BATCH_STATS)


def _validate_swag(config: ml_collections.ConfigDict) -> None:
  s = config.swag
  _require(config.swa.enabled, 'swag.enabled needs swa.enabled=True (SWAG collects when SWA averages)')
  _require(config.swa.decay == 0.0, f'swag.enabled needs the equal-weight SWA mean (swa.decay=0), got '
                                    f'swa.decay={config.swa.decay}')
  _require(config.get('parallelism', 'jit') == 'jit', 'swag.enabled needs parallelism=jit')
  _int_at_least(s.rank, 'swag.rank', 2)
  _require(s.scale >= 0.0, f'swag.scale must be >= 0 (0 = the SWA model), got {s.scale}')
  _positive(s.num_samples, 'swag.num_samples', integer=True)
  _require(s.var_clamp >= 0.0, f'swag.var_clamp must be >= 0, got {s.var_clamp}')
  _require(0.0 < s.bn_update_fraction <= 1.0,
           f'swag.bn_update_fraction must be in (0, 1], got {s.bn_update_fraction}')
  _int_at_least(s.samples_per_call, 'swag.samples_per_call', 0, ' (0 = auto)')
  chunk = swag.samples_per_call(s)
  _require(s.num_samples % chunk == 0,
           f'swag.num_samples={s.num_samples} must be a multiple of swag.samples_per_call={chunk}; '
           f'use swag.samples_per_call=0 (auto) or a divisor of {s.num_samples}')


def _validate_lr_find(lf: ml_collections.ConfigDict) -> None:
  """The LR range test's fields (`--mode=lr_find`, cifar_jax/lr_find.py)."""
  _positive(lf.start_lr, 'lr_find.start_lr')
  _positive(lf.end_lr, 'lr_find.end_lr')
  _require(lf.end_lr > lf.start_lr,
           f'lr_find.end_lr must exceed lr_find.start_lr, got {lf.end_lr} <= {lf.start_lr}')
  _int_at_least(lf.num_steps, 'lr_find.num_steps', lr_curves.MIN_STEPS,
                ' (the fewest points torch-lr-finder suggests from)')
  _choice(lf.smoothing, 'lr_find.smoothing', lr_curves.SMOOTHINGS)
  factor = lf.diverge_factor
  _require(isinstance(factor, (int, float)) and not isinstance(factor, bool) and (factor == 0 or factor > 1),
           f"lr_find.diverge_factor must be 0 (the smoothing's anchor's) or above 1, got {factor!r}")
  _choice(lf.suggestion, 'lr_find.suggestion', tuple(lr_curves.SUGGESTIONS))


def _validate_evaluation(config: ml_collections.ConfigDict) -> None:
  """--mode=evaluate's evaluation.shift (cifar_jax/corruptions.py)."""
  ev = config.evaluation
  _require(isinstance(ev.shift, str), f"evaluation.shift must be '', 'all' or corruption names separated by "
                                      f'commas, got {ev.shift!r}')
  try:
    names = corruptions.selected(ev.shift)
  except ValueError as e:
    raise ConfigError(f'evaluation.shift={ev.shift!r}: {e}') from e
  severities = tuple(ev.severities) if isinstance(ev.severities, (tuple, list)) else (ev.severities,)
  known = all(s in corruptions.SEVERITIES and not isinstance(s, bool) for s in severities)
  _require(bool(severities) and known and len(set(severities)) == len(severities),
           f'evaluation.severities must be distinct severities among {corruptions.SEVERITIES}, got '
           f'{ev.severities!r}')
  _int_at_least(ev.shift_seed, 'evaluation.shift_seed', 0)
  _require(isinstance(ev.shift_cache, str),
           f"evaluation.shift_cache must be 'auto', a folder, or '' (none), got {ev.shift_cache!r}")
  path = config.data.get('corruptions_path', '')
  if names and path:
    _require(os.path.isdir(path), f'data.corruptions_path={path}: no such folder; give the folder of the '
                                  "released CIFAR-10-C .npy files, or '' to generate the corruptions")
    _require(config.data.validation_size == 0,
             f'data.corruptions_path={path} holds corruptions of the test set, but '
             f'data.validation_size={config.data.validation_size} evaluates held-out training images; set '
             "data.corruptions_path='' to generate them from those images")
  _choice(ev.get('tta', 'none'), 'evaluation.tta', tta.LEVELS)
  _require(isinstance(ev.get('temperature', False), bool),
           f"evaluation.temperature must be True or False, got {ev.get('temperature')!r}")
  _require(isinstance(ev.get('ood', ''), str),
           f"evaluation.ood must be OOD sets separated by commas, got {ev.get('ood')!r}")
  try:
    ood_sets = ood.parse(ev.get('ood', ''))
  except ValueError as e:
    raise ConfigError(f'evaluation.ood: {e}') from e
  if ev.get('temperature', False):
    _require(config.data.validation_size > 0,
             'evaluation.temperature fits T on a held-out split, and data.validation_size=0 holds none out; '
             'set data.validation_size > 0 (e.g. 5000), or evaluation.temperature=False')
  if ev.get('temperature', False) or ood_sets:
    _require(config.parallelism == 'jit', "evaluation.temperature and evaluation.ood need each example's log "
             f'probabilities, which parallelism={config.parallelism} does not return; set parallelism=jit')


def validate_devices(config: ml_collections.ConfigDict, device_count: int) -> None:
  """Checks, before the data loads, that the batch splits evenly over `device_count` devices.

  With num_seeds > 1 the batch splits over the mesh's 'data' axis only. The last batch of an epoch is
  checked once the data is loaded (`parallel.check_batch_sizes`).
  """
  n = device_count
  if config.get('num_seeds', 1) > 1:
    n = parallel.seed_mesh_shape(config.num_seeds, config.get('seed_devices', 0), device_count)[1]
  parallel.check_batch_split(config.batch_size, n, config.get('parallelism', 'jit'))
  check_micro_batch_split(config, config.get('parallelism', 'jit'), n)


def check_workdir(workdir: str, min_free_mb: float = MIN_FREE_DISK_MB) -> None:
  """Creates `workdir` and fails before training when it cannot hold a run (a file, no space)."""
  _require(bool(workdir), '--workdir must name a folder for checkpoints, metrics and config.json')
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ConfigError(f'--workdir={workdir} is a file; give a folder (it is created if missing)')
  ancestor = os.path.abspath(workdir)
  while not os.path.exists(ancestor):
    ancestor = os.path.dirname(ancestor)
  _require(os.path.isdir(ancestor),
           f'--workdir={workdir}: {ancestor} is a file, not a folder; give a path under a folder')
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise ConfigError(f'--workdir={workdir}: cannot create it ({e.strerror}); give a writable folder') from e
  _require(os.access(workdir, os.W_OK | os.X_OK),
           f'--workdir={workdir}: not writable; give a folder you can write to')
  free_mb = shutil.disk_usage(workdir).free / 2**20
  _require(free_mb >= min_free_mb,
           f'--workdir={workdir}: only {free_mb:.0f} MB free on its disk; a run needs at least '
           f'{min_free_mb:.0f} MB for checkpoints and metrics')


def validate_against_run(config: ml_collections.ConfigDict, steps_per_epoch: int) -> None:
  """Checks the fields that depend on the run's length (known once the data is loaded)."""
  s = config.schedule
  per_epoch = builders.step_every(s) == 'epoch'
  unit = 'epochs' if per_epoch else 'steps'
  epochs = builders.main_schedule_epochs(config)
  length = epochs if per_epoch else epochs * steps_per_epoch
  if s.name == 'multistep':
    # A warning, not an error: `--config.num_epochs=2` on a 50-epoch config is a common quick check.
    beyond = [m for m in s.milestones if m >= length]
    if beyond:
      logging.warning('schedule.milestones %s lie at or beyond the run (%d %s) and never take effect',
                      tuple(beyond), length, unit)
  if s.name == 'one_cycle' and s.total_steps > 0:
    _require(s.total_steps >= length,
             f'schedule.total_steps={s.total_steps} is shorter than the run ({length} {unit}); torch '
             'would raise when stepped past it (use -1 for the run length)')
  for message in schedule_warnings(config, steps_per_epoch):
    logging.warning('%s', message)


# The share of a run a shortened warm-up takes: big_vision's transfer recipe warms up 500 of 10k steps.
WARMUP_SHARE = 0.05


def schedule_warnings(config: ml_collections.ConfigDict, steps_per_epoch: int) -> list[str]:
  """One line for each part of the schedule (a warm-up, a decay, a period, a cycle) that lies at or beyond
  the run's last step, so that the lr never gets there, with the numbers and the field that would fix it
  (multistep's milestones: `validate_against_run`'s own warning)."""
  s = config.schedule
  per_epoch = builders.step_every(s) == 'epoch'
  unit = 'epochs' if per_epoch else 'steps'
  epochs = builders.main_schedule_epochs(config)
  length = epochs if per_epoch else epochs * steps_per_epoch
  run = f'the run ({length} {unit}{" before SWA" if config.swa.enabled else ""})'
  short = max(1, int(length * WARMUP_SHARE))
  out = []
  if s.warmup_epochs > 0 and s.warmup_epochs >= epochs:
    out.append(f'schedule {s.name}: the linear warm-up of {s.warmup_epochs} epochs is as long as {run} '
               f'or longer: the learning rate never leaves the warm-up; shorten it with '
               f'--config.schedule.warmup_epochs={max(1, int(epochs * WARMUP_SHARE))}')
  if s.name == 'warmup_cosine' and s.warmup_steps >= length:
    out.append(f'schedule warmup_cosine: warm-up of {s.warmup_steps} steps is longer than {run}: the '
               f'learning rate never leaves the warm-up; shorten it with '
               f'--config.schedule.warmup_steps={short} ({WARMUP_SHARE:.0%} of the run)')
  if s.name == 'bit_hyperrule':
    supports = schedules.bit_supports(s.dataset_size)
    small = schedules.bit_supports(0)  # the rule for under 20,000 examples
    if supports[0] >= length:
      fix = (f'the rule for under 20,000 examples warms up for {small[0]} steps and ends at {small[-1]}: '
             '--config.schedule.dataset_size=10000' if small[0] < length else
             f'BiT warms up for {small[0]} steps at least: use --config.schedule.name=warmup_cosine '
             f'--config.schedule.warmup_steps={short}')
      out.append(f'schedule bit_hyperrule: warm-up of {supports[0]} steps (schedule.dataset_size='
                 f'{s.dataset_size}) is longer than {run}: the learning rate never leaves the warm-up; '
                 + fix)
    elif [t for t in supports[1:-1] if t >= length]:
      missed = tuple(t for t in supports[1:-1] if t >= length)
      out.append(f'schedule bit_hyperrule: its decays at steps {missed} (schedule.dataset_size='
                 f'{s.dataset_size}) lie beyond {run}; BiT runs to its end at step {supports[-1]}: '
                 f'--config.num_epochs={-(-supports[-1] // steps_per_epoch)}')
  if s.name == 'step' and s.step_size >= length:
    out.append(f'schedule step: the first decay after step_size={s.step_size} {unit} lies beyond {run}: '
               'the learning rate never decays; shorten it with '
               f'--config.schedule.step_size={max(1, length // 2)}')
  if s.name == 'cosine' and s.T_max > length:
    out.append(f'schedule cosine: T_max={s.T_max} {unit} is longer than {run}: the learning rate stops '
               f'before eta_min; use --config.schedule.T_max=-1 (the run)')
  if s.name == 'warm_restarts' and s.T_0 >= length:
    out.append(f'schedule warm_restarts: the first period T_0={s.T_0} {unit} is as long as {run} or '
               f'longer: the learning rate never restarts; shorten it with '
               f'--config.schedule.T_0={max(1, length // 2)}')
  if s.name == 'one_cycle':
    if s.total_steps > length:
      out.append(f'schedule one_cycle: the cycle of total_steps={s.total_steps} steps is longer than {run}: '
                 'the learning rate never anneals to its end'
                 + (' nor reaches its peak' if s.pct_start * s.total_steps - 1 >= length else '')
                 + '; use --config.schedule.total_steps=-1 (the run)')
  if s.name == 'cyclic':
    up = s.step_size_up_epochs * steps_per_epoch if s.step_size_up_epochs > 0 else s.step_size_up
    if up >= length:
      out.append(f'schedule cyclic: the rise of step_size_up={up} steps is as long as {run} or longer: '
                 f'the learning rate never reaches max_lr; shorten it with '
                 f'--config.schedule.step_size_up={max(1, length // 2)}')
  if s.name == 'plateau' and s.patience >= config.num_epochs:
    out.append(f'schedule plateau: patience={s.patience} epochs is as long as the run ({config.num_epochs} '
               'epochs) or longer: the learning rate is never reduced')
  if config.swa.enabled and config.swa.schedule == 'swa_lr':
    swa_epochs = config.num_epochs - config.swa.start_epoch
    if config.swa.anneal_epochs > swa_epochs:
      out.append(f'swa.schedule=swa_lr: the anneal of swa.anneal_epochs={config.swa.anneal_epochs} epochs '
                 f'is longer than the SWA phase ({swa_epochs} epochs): the learning rate never reaches '
                 f'swa.lr; shorten it with --config.swa.anneal_epochs={swa_epochs}')
  return out


def steps_per_epoch(config: ml_collections.ConfigDict, par: parallel.Parallel, num_train: int) -> int:
  """The steps of an epoch of `num_train` examples, after checking that the batches fit the data and the
  devices (one ConfigError line otherwise)."""
  spe = input_pipeline.steps_per_epoch(num_train, config.batch_size, config.data.drop_remainder)
  if spe == 0:
    raise ConfigError(f'batch_size={config.batch_size} exceeds the {num_train} training '
                      'examples with data.drop_remainder=True')
  parallel.check_batch_sizes(par.mode, par.data_devices, config.batch_size, num_train,
                             config.data.drop_remainder)
  check_micro_batch_split(config, par.mode, par.data_devices, num_train)
  return spe
