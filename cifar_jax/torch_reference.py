"""The blog's PyTorch training, driven by the same config: the reference the JAX trainer is checked against.

`TorchResNet` is the blog's edited torchvision ResNet; `torch_to_flax` / `flax_to_torch` port weights
between it and `models.ResNet`; `torch_batches` yields either exactly the JAX trainer's batches
('identical') or batches drawn the torch way ('native'); `train_and_evaluate_torch` runs the blog's loop
(SGD with coupled weight decay, a `torch.optim.lr_scheduler`, eval every epoch) and writes the same
`metrics.jsonl` as the JAX trainer. torch is imported only when one of these is used, so importing
`cifar_jax` never needs it.
"""

import contextlib
import copy
import functools
import importlib
import itertools
import json
import math
import os
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from cifar_jax import augmentations
from cifar_jax import builders
from cifar_jax import calibration
from cifar_jax import checkpointing
from cifar_jax import config_lib
from cifar_jax import ema as ema_lib
from cifar_jax import input_pipeline
from cifar_jax import metrics_writer
from cifar_jax import models
from cifar_jax import schedules
from cifar_jax import steps
from cifar_jax import tta as tta_lib

DATA_MODES = ('identical', 'native')
SCHEDULES = builders.SCHEDULE_NAMES

# Flax leaf name -> torch leaf name, by collection; conv and dense kernels are transposed on the way.
_PARAM_TO_TORCH = {'kernel': 'weight', 'scale': 'weight', 'bias': 'bias'}
_STAT_TO_TORCH = {'mean': 'running_mean', 'var': 'running_var'}
_TORCH_TO_STAT = {v: k for k, v in _STAT_TO_TORCH.items()}
_DOWNSAMPLE = {'0': 'downsample_conv', '1': 'downsample_bn'}
_DOWNSAMPLE_INV = {v: k for k, v in _DOWNSAMPLE.items()}


def _torch():
  import torch  # pylint: disable=g-import-not-at-top
  return torch


def _finetune():
  """`cifar_jax.torch_models.finetune` (it imports torch, so only when a pretrained family is used)."""
  return importlib.import_module('cifar_jax.torch_models.finetune')


# The torch model -----------------------------------------------------------------------------------------

_TORCH_MODEL_CLASSES = ('TorchResNet', 'BasicBlock', 'WSConv2d', 'stage_widths')


def __getattr__(name):
  """`TorchResNet`, `BasicBlock`, `WSConv2d` (torch_models/resnet.py) import torch on first access."""
  if name in _TORCH_MODEL_CLASSES:
    from cifar_jax.torch_models import resnet  # pylint: disable=g-import-not-at-top
    return getattr(resnet, name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def create_torch_model(model_config, num_classes: int = input_pipeline.NUM_CLASSES):
  """The torch twin of `builders.create_model` for `config.model` (float32; bfloat16 runs it under
  `autocast`)."""
  if model_config.name in models.PRETRAINED_FAMILIES:
    return _finetune().create_model(model_config, num_classes)
  from cifar_jax import torch_models  # pylint: disable=g-import-not-at-top
  if model_config.name not in torch_models.TORCH_MODELS:
    raise ValueError(f'model.name must be one of {sorted(torch_models.TORCH_MODELS)}, '
                     f'got {model_config.name!r}')
  attributes = builders.model_attributes(model_config)
  attributes.pop('frozen_bn', None)  # torch: the train loop keeps frozen BatchNorm in eval mode
  return torch_models.create_torch_model(model_config.name, num_classes=num_classes, **attributes)


# Weight porting ------------------------------------------------------------------------------------------


def _to_numpy(t) -> np.ndarray:
  return t.detach().cpu().numpy()


def _flax_module_path(torch_parts: list[str]) -> tuple[str, ...]:
  """['layer2', '0', 'downsample', '1'] -> ('layer2_0', 'downsample_bn')."""
  path, i = [], 0
  while i < len(torch_parts):
    part = torch_parts[i]
    if part.startswith('layer') and i + 1 < len(torch_parts):
      path.append(f'{part}_{torch_parts[i + 1]}')
      i += 2
    elif part == 'downsample':
      path.append(_DOWNSAMPLE[torch_parts[i + 1]])
      i += 2
    else:
      path.append(part)
      i += 1
  return tuple(path)


def _torch_module_path(flax_path: tuple[str, ...]) -> list[str]:
  """('layer2_0', 'downsample_bn') -> ['layer2', '0', 'downsample', '1']."""
  parts = []
  for name in flax_path:
    if name.startswith('layer') and '_' in name:
      parts.extend(name.split('_', 1))
    elif name in _DOWNSAMPLE_INV:
      parts.extend(['downsample', _DOWNSAMPLE_INV[name]])
    else:
      parts.append(name)
  return parts


def _set(tree: dict, path: tuple[str, ...], value) -> None:
  for name in path[:-1]:
    tree = tree.setdefault(name, {})
  tree[path[-1]] = value


def torch_to_flax(state_dict) -> dict:
  """A `TorchResNet` state_dict as flax variables {'params', 'batch_stats' (BatchNorm only)}.

  Conv weights OIHW -> HWIO, fc weight (out, in) -> (in, out), norm weight -> scale, running_mean/var ->
  batch_stats mean/var; num_batches_tracked is dropped. Values are copied bit for bit.
  """
  params, batch_stats = {}, {}
  for key, tensor in state_dict.items():
    *module, leaf = key.split('.')
    path = _flax_module_path(module)
    value = _to_numpy(tensor)
    if leaf == 'num_batches_tracked':
      continue
    if leaf in _TORCH_TO_STAT:
      _set(batch_stats, path + (_TORCH_TO_STAT[leaf],), jnp.asarray(value))
    elif leaf == 'weight' and value.ndim == 4:
      _set(params, path + ('kernel',), jnp.asarray(value.transpose(2, 3, 1, 0)))
    elif leaf == 'weight' and value.ndim == 2:
      _set(params, path + ('kernel',), jnp.asarray(value.T))
    elif leaf == 'weight' and value.ndim == 1:
      _set(params, path + ('scale',), jnp.asarray(value))
    elif leaf == 'bias':
      _set(params, path + ('bias',), jnp.asarray(value))
    else:
      raise ValueError(f'torch_to_flax: unexpected state_dict entry {key!r} with shape {value.shape}')
  variables = {'params': params}
  if batch_stats:
    variables['batch_stats'] = batch_stats
  return variables


def _flatten(tree, prefix=()):
  for name, value in tree.items():
    if isinstance(value, dict) or hasattr(value, 'items'):
      yield from _flatten(value, prefix + (name,))
    else:
      yield prefix + (name,), value


def flax_to_torch(variables, num_batches_tracked: int = 0) -> dict:
  """Flax variables as a `TorchResNet` state_dict (the inverse of `torch_to_flax`).

  Every BatchNorm gets `num_batches_tracked` (only read by torch when its momentum is None).
  """
  torch = _torch()
  state = {}
  for path, value in _flatten(variables['params']):
    value = np.asarray(value)
    if path[-1] == 'kernel' and value.ndim == 4:
      value = value.transpose(3, 2, 0, 1)
    elif path[-1] == 'kernel' and value.ndim == 2:
      value = value.T
    key = '.'.join(_torch_module_path(path[:-1]) + [_PARAM_TO_TORCH[path[-1]]])
    state[key] = torch.from_numpy(np.array(value, order='C'))
  for path, value in _flatten(variables.get('batch_stats', {})):
    module = '.'.join(_torch_module_path(path[:-1]))
    state[f'{module}.{_STAT_TO_TORCH[path[-1]]}'] = torch.from_numpy(np.array(value, order='C'))
    state[f'{module}.num_batches_tracked'] = torch.tensor(num_batches_tracked, dtype=torch.long)
  return state


# Data ----------------------------------------------------------------------------------------------------


def jax_data_key(seed: int) -> jax.Array:
  """The data key `train.train_and_evaluate` derives from `config.seed` (batch order and augmentation)."""
  return builders.run_keys(seed)[1]


def native_generator_seed(seed: int, epoch: int) -> int:
  """A 64-bit torch.Generator seed that is a function of (seed, epoch)."""
  return int(np.random.SeedSequence((seed, epoch)).generate_state(1, np.uint64)[0])


def _nchw_tensors(images, labels):
  torch = _torch()
  x = np.ascontiguousarray(np.asarray(images, np.float32).transpose(0, 3, 1, 2))
  return torch.from_numpy(x), torch.from_numpy(np.asarray(labels, np.int64))


def _torch_normalize(images_nhwc_uint8, normalization: str = 'cifar10'):
  """ToTensor + Normalize(mean, std) of `input_pipeline.NORMALIZATIONS[normalization]`: uint8 NHWC tensor
  -> float32 NCHW."""
  torch = _torch()
  x = images_nhwc_uint8.permute(0, 3, 1, 2).float() / 255.0
  mean_rgb, std_rgb = input_pipeline.NORMALIZATIONS[normalization]
  mean = torch.tensor(mean_rgb, dtype=torch.float32).view(1, 3, 1, 1)
  std = torch.tensor(std_rgb, dtype=torch.float32).view(1, 3, 1, 1)
  return ((x - mean) / std).contiguous()


def torch_crop_flip(images, generator):
  """RandomCrop(32, padding=4) with zero padding and RandomHorizontalFlip(0.5) per image, uint8 NHWC."""
  torch = _torch()
  n, size, pad = images.shape[0], input_pipeline.IMAGE_SIZE, input_pipeline.PAD
  padded = torch.nn.functional.pad(images, (0, 0, pad, pad, pad, pad))
  offsets = torch.randint(0, 2 * pad + 1, (n, 2), generator=generator)
  flip = torch.rand(n, generator=generator) < 0.5
  ar = torch.arange(size)
  rows = offsets[:, :1] + ar
  cols = torch.where(flip[:, None], offsets[:, 1:] + size - 1 - ar, offsets[:, 1:] + ar)
  return padded[torch.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]


def torch_cutout(x, rng: np.random.Generator, size: int, count: int):
  """DeVries & Taylor's `Cutout` on each normalised NCHW image: `count` squares at centres
  rng.integers(h), rng.integers(w), [c - size // 2, c + size // 2) clipped, multiplied by zero."""
  torch = _torch()
  n, _, h, w = x.shape
  mask = np.ones((n, 1, h, w), np.float32)
  for i in range(n):
    for _ in range(count):
      cy, cx = int(rng.integers(h)), int(rng.integers(w))
      mask[i, 0, max(cy - size // 2, 0):min(cy + size // 2, h),
           max(cx - size // 2, 0):min(cx + size // 2, w)] = 0.0
  return x * torch.from_numpy(mask)


def torch_cutmix(x, y, rng: np.random.Generator, generator, cutmix, mixup_alpha: float = 0.0):
  """timm `Mixup`'s batch mode with CutMix (Yun et al.'s `rand_bbox`, the partners a `torch.randperm`):
  (images, labels, partners' labels, lam), lam 1 for a batch left unmixed (chance 1 - cutmix.prob)."""
  torch = _torch()
  n, _, h, w = x.shape
  if rng.random() >= cutmix.prob:
    return x, y, y, 1.0
  use_cutmix = mixup_alpha <= 0 or rng.random() < cutmix.switch_prob
  lam = float(rng.beta(cutmix.alpha, cutmix.alpha) if use_cutmix else rng.beta(mixup_alpha, mixup_alpha))
  partners = torch.randperm(n, generator=generator)
  if not use_cutmix:
    return lam * x + (1 - lam) * x[partners], y, y[partners], lam
  cut_h, cut_w = int(h * math.sqrt(1 - lam)), int(w * math.sqrt(1 - lam))
  cy, cx = int(rng.integers(h)), int(rng.integers(w))
  y1, y2 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, h)
  x1, x2 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, w)
  x = x.clone()
  x[:, :, y1:y2, x1:x2] = x[partners][:, :, y1:y2, x1:x2]
  return x, y, y[partners], 1 - (y2 - y1) * (x2 - x1) / (h * w)


def _batch_bounds(num_examples: int, batch_size: int, drop_remainder: bool):
  for step in range(input_pipeline.steps_per_epoch(num_examples, batch_size, drop_remainder)):
    start = step * batch_size
    yield step, start, min(batch_size, num_examples - start)


def torch_batches(dataset, config, epoch: int, mode: str = 'native', data_key=None,
                  mixup_alpha: float = 0.0, cutout=None, cutmix=None):
  """Yields one epoch of training batches as (float32 NCHW images, int64 labels) CPU tensors; with
  `mixup_alpha` > 0 mixed as BiT's `mixup_data` mixes them, (images, labels, partner labels, lam).

  Args:
    dataset: an `input_pipeline.Dataset`.
    config: the full config (seed, batch_size, data.augment, data.drop_remainder).
    epoch: the epoch, 0-based as in the JAX trainer.
    mode: 'identical' gives the JAX trainer's batches: its permutation, crop offsets and flips exactly,
      from `steps.draw_batch` run eagerly on the CPU (the trainer's jitted step may round
      the normalisation differently, by at most one float32 ULP); 'native' shuffles and augments in
      torch with a torch.Generator seeded from (seed, epoch), like the blog's DataLoader.
    data_key: 'identical' only; the JAX trainer's data key (default `jax_data_key(config.seed)`).
    mixup_alpha: 'identical': the JAX trainer's draws (`steps.mixup`); 'native': lam from a numpy
      generator of (seed, epoch), the partners from the torch generator.
    cutout, cutmix: `augmentations.batch_options` (None: off). 'identical': the JAX trainer's squares,
      boxes, lambdas and partners (`steps.draw_batch`); 'native': `torch_cutout` and `torch_cutmix`, the
      squares from a numpy generator of (seed, epoch, CUTOUT_SALT), CutMix's draws from mixup's.
  """
  images, labels = dataset.train_images, dataset.train_labels
  n, batch_size = dataset.num_train, config.batch_size
  augment, drop = bool(config.data.augment), bool(config.data.drop_remainder)
  normalization = config.data.get('normalization', 'cifar10')
  if mode == 'identical':
    with jax.default_device(jax.devices('cpu')[0]):
      key = jax_data_key(config.seed) if data_key is None else data_key
      jax_images, jax_labels = jnp.asarray(images), jnp.asarray(labels)
      perm = input_pipeline.epoch_permutation(key, epoch, n)
      for step, _, size in _batch_bounds(n, batch_size, drop):
        # Eager, not jitted: XLA's fusion of the normalisation moves ~30 % of values by one float32
        # ULP, so only the eager call is reproducible here; order, crops and flips are exact either way.
        batch = steps.draw_batch(jax_images, jax_labels, perm, key, epoch, step, batch_size=batch_size,
                                 size=size, augment=augment, mixup_alpha=mixup_alpha,
                                 normalization=normalization, cutout=cutout,
                                 cutmix=cutmix)
        x, y = _nchw_tensors(*batch[:2])
        yield (x, y) if len(batch) == 2 else (x, y, _torch().from_numpy(np.asarray(batch[2], np.int64)),
                                              float(batch[3][0]))
  elif mode == 'native':
    torch = _torch()
    generator = torch.Generator().manual_seed(native_generator_seed(config.seed, epoch))
    perm = torch.randperm(n, generator=generator)
    images_t, labels_t = torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))
    mixing = np.random.default_rng([config.seed, epoch, steps.MIXUP_SALT])
    cutting = np.random.default_rng([config.seed, epoch, augmentations.CUTOUT_SALT])
    for _, start, size in _batch_bounds(n, batch_size, drop):
      idx = perm[start:start + size]
      x = images_t[idx]
      if augment:
        x = torch_crop_flip(x, generator)
      x, y = _torch_normalize(x, normalization), labels_t[idx]
      if cutout is not None:
        x = torch_cutout(x, cutting, cutout.size, cutout.count)
      if cutmix is not None:
        yield torch_cutmix(x, y, mixing, generator, cutmix, mixup_alpha)
      elif mixup_alpha > 0:  # bit_pytorch/train.py: mixup_data
        lam = float(mixing.beta(mixup_alpha, mixup_alpha))
        partners = torch.randperm(size, generator=generator)
        yield lam * x + (1 - lam) * x[partners], y, y[partners], lam
      else:
        yield x, y
  else:
    raise ValueError(f'data mode must be one of {list(DATA_MODES)}, got {mode!r}')


def torch_eval_batches(dataset, batch_size: int, normalization: str = 'cifar10'):
  """Yields the eval split in order, unaugmented and normalised, as (NCHW float32, int64) tensors."""
  torch = _torch()
  images_t = torch.from_numpy(dataset.eval_images)
  labels_t = torch.from_numpy(dataset.eval_labels.astype(np.int64))
  for _, start, size in _batch_bounds(dataset.num_eval, batch_size, False):
    yield _torch_normalize(images_t[start:start + size], normalization), labels_t[start:start + size]


# Optimiser and schedule ----------------------------------------------------------------------------------


def schedule_step_every(schedule_config) -> str:
  """'epoch' or 'batch': the config's `step_every`, or where the blog stepped this scheduler."""

  name = schedule_config.name
  if name not in SCHEDULES:
    raise config_lib.ConfigError(f'schedule.name must be one of {list(SCHEDULES)}, got {name!r}')
  every = builders.step_every(schedule_config)
  if every not in ('epoch', 'batch'):
    raise config_lib.ConfigError(f"schedule.step_every must be 'epoch', 'batch' or '', got {every!r}")
  if name == 'plateau' and every != 'epoch':
    raise config_lib.ConfigError(
        "schedule.step_every: plateau is stepped per epoch on eval_loss; use 'epoch' or ''")
  return every


def create_torch_optimizer(params, optimizer_config):
  """torch.optim.SGD with coupled weight decay, as the blog."""
  return _torch().optim.SGD(params, lr=optimizer_config.lr, momentum=optimizer_config.momentum,
                            nesterov=optimizer_config.nesterov,
                            weight_decay=optimizer_config.weight_decay)


def create_torch_scheduler(optimizer, schedule_config, num_epochs: int, steps_per_epoch: int):
  """The torch.optim.lr_scheduler for `config.schedule`; its step() is called per `step_every` unit.

  Lengths <= 0 (T_max, total_steps) mean the run's length in scheduler steps, warm-up included, and
  step_size_down <= 0 means step_size_up, as in `builders.create_schedules`.
  """
  sched = _torch().optim.lr_scheduler
  c = schedule_config
  name, every = c.name, schedule_step_every(c)
  units_per_epoch = steps_per_epoch if every == 'batch' else 1
  warmup = int(round(c.warmup_epochs * units_per_epoch))
  run_length = num_epochs * units_per_epoch
  if warmup and (name == 'plateau' or (name == 'warm_restarts' and c.fractional)):
    raise config_lib.ConfigError(f'schedule.warmup_epochs: not supported with {name}'
                                 f'{" (fractional)" if c.fractional else ""}; set it to 0')
  if name == 'multistep':
    main = sched.MultiStepLR(optimizer, milestones=list(c.milestones), gamma=c.gamma)
  elif name == 'step':
    main = sched.StepLR(optimizer, step_size=c.step_size, gamma=c.gamma)
  elif name == 'cosine':
    t_max = c.T_max if c.T_max > 0 else run_length
    main = sched.CosineAnnealingLR(optimizer, T_max=t_max, eta_min=c.eta_min)
  elif name == 'warm_restarts':
    main = sched.CosineAnnealingWarmRestarts(optimizer, T_0=c.T_0, T_mult=c.T_mult, eta_min=c.eta_min)
  elif name == 'cyclic':
    main = sched.CyclicLR(
        optimizer, base_lr=optimizer.defaults['lr'], max_lr=c.max_lr,
        step_size_up=(c.step_size_up_epochs * steps_per_epoch if c.get('step_size_up_epochs', 0) > 0
                      else c.step_size_up),
        step_size_down=c.step_size_down if c.step_size_down > 0 else None, mode=c.mode,
        gamma=c.gamma, cycle_momentum=c.cycle_momentum, base_momentum=c.base_momentum,
        max_momentum=c.max_momentum)
  elif name == 'one_cycle':
    main = sched.OneCycleLR(
        optimizer, max_lr=c.max_lr, total_steps=c.total_steps if c.total_steps > 0 else run_length,
        pct_start=c.pct_start, anneal_strategy=c.anneal_strategy, cycle_momentum=c.cycle_momentum,
        base_momentum=c.base_momentum, max_momentum=c.max_momentum, div_factor=c.div_factor,
        final_div_factor=c.final_div_factor, three_phase=c.three_phase)
  elif name == 'constant':
    main = sched.LambdaLR(optimizer, lambda _: 1.0)
  elif name == 'warmup_cosine':
    main = sched.LambdaLR(optimizer, schedules.warmup_cosine_lambda(c.warmup_steps, run_length))
  elif name == 'bit_hyperrule':
    rule = schedules.bit_hyperrule(1.0, c.dataset_size)  # BiT's lr at base 1: the factor of each group's
    main = sched.LambdaLR(optimizer, lambda t: float(rule.values_f64(t)))
  else:  # plateau
    main = sched.ReduceLROnPlateau(
        optimizer, mode=c.plateau_mode, factor=c.factor, patience=c.patience, threshold=c.threshold,
        threshold_mode=c.threshold_mode, cooldown=c.cooldown, min_lr=c.min_lr)
  if not warmup:
    return main
  linear = sched.LinearLR(optimizer, start_factor=c.warmup_start_factor, end_factor=1.0,
                          total_iters=warmup)
  return sched.SequentialLR(optimizer, [linear, main], milestones=[warmup])


def scheduler_hooks(scheduler, schedule_config, steps_per_epoch: int):
  """(after_batch(epoch, i), after_epoch(eval_loss)): where the blog's loop calls `scheduler.step`."""
  c = schedule_config
  every = schedule_step_every(c)

  def after_batch(epoch, i):
    if c.name == 'warm_restarts' and c.fractional:  # torch's documented step(epoch + i / iters) loop
      with warnings.catch_warnings():  # passing the epoch to step() is deprecated in torch
        warnings.simplefilter('ignore', UserWarning)
        scheduler.step(epoch + i / steps_per_epoch)
    elif every == 'batch':
      scheduler.step()

  def after_epoch(eval_loss):
    if c.name == 'plateau':
      scheduler.step(eval_loss)
    elif every == 'epoch' and not (c.name == 'warm_restarts' and c.fractional):
      scheduler.step()

  return after_batch, after_epoch


def torch_schedule_table(config, steps_per_epoch: int) -> tuple[np.ndarray, np.ndarray]:
  """The lr and momentum torch's SGD uses at each of the run's optimizer steps (float64; no plateau)."""
  torch = _torch()
  if config.schedule.name == 'plateau':
    raise ValueError('schedule.name=plateau depends on eval losses; it has no fixed table')
  optimizer = create_torch_optimizer([torch.nn.Parameter(torch.zeros(()))], config.optimizer)
  scheduler = create_torch_scheduler(optimizer, config.schedule, builders.main_schedule_epochs(config),
                                     steps_per_epoch)
  after_batch, after_epoch = scheduler_hooks(scheduler, config.schedule, steps_per_epoch)
  lrs, momenta = [], []
  swa_started, swa_scheduler = False, None
  for epoch in range(config.num_epochs):
    in_swa = config.swa.enabled and epoch >= config.swa.start_epoch
    if in_swa and not swa_started:
      swa_scheduler, swa_started = _start_swa_lr(optimizer, config), True
    if swa_scheduler is not None:
      swa_scheduler.step()
    for i in range(steps_per_epoch):
      lrs.append(optimizer.param_groups[0]['lr'])
      momenta.append(optimizer.param_groups[0]['momentum'])
      optimizer.step()
      if not in_swa:
        after_batch(epoch, i)
    if not in_swa:
      after_epoch(None)
  return np.asarray(lrs, np.float64), np.asarray(momenta, np.float64)


# Training ------------------------------------------------------------------------------------------------


def default_device() -> str:
  """'cuda' when torch sees a GPU, else 'cpu'."""
  return 'cuda' if _torch().cuda.is_available() else 'cpu'


def autocast(dtype: str, device):
  """The forward pass's context for `model.dtype`: torch.autocast(bfloat16) on `device`'s type for
  'bfloat16' (the JAX model's mixed precision: docs/architecture.md, "Mixed precision"), none for float32."""
  torch = _torch()
  if dtype == 'bfloat16':
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
  return contextlib.nullcontext()


def micro_batches_of(batch, micro_batches: int) -> list:
  """`batch` ((x, y) or mixup's (x, y, partner labels, lam)) as its micro-batches: each tensor split as
  `torch.tensor_split` splits it (`steps.micro_batch_sizes`: as evenly as possible, none empty), lam kept."""
  sizes = steps.micro_batch_sizes(batch[1].shape[0], micro_batches)
  parts = [t.split(sizes) if hasattr(t, 'split') else [t] * len(sizes) for t in batch]
  return list(zip(*parts))


def train_epoch(model, optimizer, batches, device, after_step=None, halt_on_nan: bool = True,
                clip_grad_norm: float = 0.0, frozen_bn: bool = False, dtype: str = 'float32',
                micro_batches: int = 1, label_smoothing: float = 0.0) -> dict:
  """One pass of SGD over `batches`; `after_step(i)` runs after the i-th optimizer step. Fine-tuning:
  gradients clipped (torch's clip_grad_norm_, > 0), BatchNorm kept in eval mode (`frozen_bn`). With
  dtype='bfloat16' the forward pass and the loss run under `autocast` (the backward pass follows it).

  `micro_batches` > 1: the accumulation loop. Each batch splits (`micro_batches_of`); each micro-batch
  runs forward in train mode (its BatchNorm statistics folded into the running ones, in order) and
  backward with its loss times its share of the batch, the gradients adding up; then one clip and step.
  `label_smoothing`: torch's `cross_entropy(label_smoothing=...)` (config.loss.label_smoothing).
  """
  torch = _torch()
  model.train()
  if frozen_bn or clip_grad_norm > 0:
    _finetune().set_train_mode(model, frozen_bn)
  loss_sum = torch.zeros((), dtype=torch.float64, device=device)
  correct = torch.zeros((), dtype=torch.int64, device=device)
  count, steps_taken = 0, 0
  lr, momentum = optimizer.param_groups[0]['lr'], optimizer.param_groups[0]['momentum']
  for i, batch in enumerate(batches):
    optimizer.zero_grad(set_to_none=True)
    n = batch[1].shape[0]
    for micro in micro_batches_of(batch, micro_batches):
      x, y = micro[0].to(device, non_blocking=True), micro[1].to(device, non_blocking=True)
      with autocast(dtype, device):
        logits = model(x)
        # float32: autocast's list
        loss = torch.nn.functional.cross_entropy(logits, y, label_smoothing=label_smoothing)
        if len(micro) == 4:  # mixup: bit_pytorch/train.py's mixup_criterion
          lam = micro[3]
          loss = lam * loss + (1 - lam) * torch.nn.functional.cross_entropy(
              logits, micro[2].to(device), label_smoothing=label_smoothing)
      (loss if micro_batches == 1 else loss * (y.shape[0] / n)).backward()
      loss_sum += loss.detach().double() * y.shape[0]
      correct += (logits.detach().argmax(1) == y).sum()
      count += y.shape[0]
    if clip_grad_norm > 0:
      _finetune().clip_gradients(model, clip_grad_norm)
    lr, momentum = optimizer.param_groups[0]['lr'], optimizer.param_groups[0]['momentum']
    optimizer.step()
    if after_step is not None:
      after_step(i)
    steps_taken += 1
  train_loss = loss_sum.item() / max(count, 1)
  if halt_on_nan and not math.isfinite(train_loss):
    raise FloatingPointError(f'non-finite training loss ({train_loss}); lower optimizer.lr or set '
                             'halt_on_nan=False')
  return {'train_loss': train_loss, 'train_accuracy': correct.item() / max(count, 1),
          'learning_rate': lr, 'momentum': momentum, 'num_steps': steps_taken, 'num_images': count}


def tta_log_probs_torch(model, x, tta: str):
  """airbench's `infer` views of the normalised NCHW batch `x` (`tta.VIEWS`: F.pad(..., 'reflect') and a
  crop, then the mirror), through `model` at once; the log of their weighted mean softmax probabilities."""
  torch = _torch()
  h, w = x.shape[2:]
  padded = torch.nn.functional.pad(x, (1, 1, 1, 1), mode='reflect')
  views, log_weights = [], []
  for dy, dx, mirrored, weight in tta_lib.VIEWS[tta]:
    view = x if dy == dx == 0 else padded[:, :, 1 + dy:1 + dy + h, 1 + dx:1 + dx + w]
    views.append(view.flip(-1) if mirrored else view)
    log_weights.append(math.log(weight))
  log_probs = torch.log_softmax(model(torch.cat(views)).float(), dim=1).reshape(len(views), x.shape[0], -1)
  return torch.logsumexp(log_probs + torch.tensor(log_weights, device=x.device)[:, None, None], dim=0)


def evaluate_torch(model, dataset, batch_size: int, device, dtype: str = 'float32',
                   tta: str = 'none', normalization: str = 'cifar10') -> dict:
  """Mean cross-entropy and accuracy of `model` (eval mode, under `autocast(dtype)`) on the eval split;
  `tta`: of the test-time augmentation's averaged views (`tta_log_probs_torch`)."""
  torch = _torch()
  model.eval()
  loss_sum, correct = 0.0, 0
  with torch.no_grad(), autocast(dtype, device):
    for x, y in torch_eval_batches(dataset, batch_size, normalization):
      x, y = x.to(device), y.to(device)
      logits = model(x) if tta == 'none' else tta_log_probs_torch(model, x, tta)
      loss_sum += torch.nn.functional.cross_entropy(logits.float(), y, reduction='sum').item()
      correct += (logits.argmax(1) == y).sum().item()
  n = max(dataset.num_eval, 1)
  return {'eval_loss': loss_sum / n, 'eval_accuracy': correct / n}


def _start_swa_lr(optimizer, config):
  """Enters the SWA phase's lr: swa.lr now (returns None), or a SWALR to step at each SWA epoch's start."""
  from torch.optim import swa_utils  # pylint: disable=g-import-not-at-top

  swa_config = config.swa
  for group in optimizer.param_groups:
    if 'betas' not in group:
      group['momentum'] = config.optimizer.momentum  # one-cycle and cyclic had been cycling it
  swa_scheduler = None
  if swa_config.schedule == 'constant':
    for group in optimizer.param_groups:
      group['lr'] = swa_config.lr
  else:
    swa_scheduler = swa_utils.SWALR(optimizer, swa_lr=swa_config.lr,
                                    anneal_epochs=swa_config.anneal_epochs,
                                    anneal_strategy=swa_config.anneal_strategy)
  return swa_scheduler


def _swa_step_hook(swa_model, model, steps_before: int, every: int, swag, i: int) -> None:
  """With swa.update_every_steps: average (and collect SWAG) after every `every`-th step of the SWA phase."""
  if every and (steps_before + i + 1) % every == 0:
    swa_model.update_parameters(model)
    if swag is not None:
      swag.collect(model)


def _with_ema(hook, torch_ema: 'TorchEma', model, i: int) -> None:
  """After the i-th optimizer step: the epoch's own hook (the scheduler's, SWA's), then the EMA's."""
  hook(i)
  torch_ema.after_step(model)


def _update_bn(loader, swa_model, device, dtype: str = 'float32') -> None:
  from torch.optim import swa_utils  # pylint: disable=g-import-not-at-top

  with autocast(dtype, device):  # the statistics stay float32, of bfloat16 activations as in training
    swa_utils.update_bn(((x.to(device), y) for x, y in loader), swa_model, device=None)


class TorchSwag:
  """SWAG with the reference's formulas (`wjmaddox/swa_gaussian` swag/posteriors/swag.py, SWAG with
  no_cov_mat=False): per collected model the mean and second moment m <- m n / (n + 1) + theta / (n + 1),
  q <- q n / (n + 1) + theta^2 / (n + 1), the deviation theta - m appended to D, the oldest dropped beyond
  K; a sample m + sqrt(s) (sqrt(clamp(q - m^2)) z1 + D^T z2 / sqrt(c - 1)). One change, as cifar_jax/swag.py:
  c = min(n, K) deviations held (the reference divides by sqrt(K - 1) even before K are collected).
  Here D is kept per parameter (the reference's sample_fullrank concatenates the same rows).
  """

  def __init__(self, model, rank: int, var_clamp: float = 1e-30):
    torch = _torch()
    self.rank, self.var_clamp, self.n = rank, var_clamp, 0
    self.names = [name for name, _ in model.named_parameters()]
    self.mean = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    self.sq_mean = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    self.deviations = {n: [] for n in self.names}

  def collect(self, model) -> None:
    n = self.n
    with _torch().no_grad():
      for name, p in model.named_parameters():
        self.mean[name] = self.mean[name] * n / (n + 1.0) + p.data / (n + 1.0)
        self.sq_mean[name] = self.sq_mean[name] * n / (n + 1.0) + p.data ** 2 / (n + 1.0)
        self.deviations[name] = (self.deviations[name] + [p.data - self.mean[name]])[-self.rank:]
    self.n += 1

  def sample(self, scale: float, z1: dict, z2) -> dict:
    """{name: sampled parameter} for the noises z1 {name: tensor} and z2 (the held deviations' own, oldest
    first; the JAX side's z2 for its last min(n, K) columns)."""
    torch = _torch()
    held = min(self.n, self.rank)
    out = {}
    for name in self.names:
      var = torch.clamp(self.sq_mean[name] - self.mean[name] ** 2, self.var_clamp)
      noise = var.sqrt() * z1[name]
      if held:
        d = torch.stack(self.deviations[name])  # (held, ...)
        noise = noise + torch.tensordot(z2[-held:], d, dims=1) / max(held - 1, 1) ** 0.5
      out[name] = self.mean[name] + scale ** 0.5 * noise
    return out

  def load_sample(self, model, sample: dict) -> None:
    with _torch().no_grad():
      for name, p in model.named_parameters():
        p.copy_(sample[name])


class TorchEma:
  """timm's ModelEmaV2 / V3 by hand, as cifar_jax/ema.py runs `ema` (`ema.from_config(config)`): a copy
  of the model taken now, and after every `every_steps`-th optimizer step (`after_step`) each parameter
  becomes d * ema + (1 - d) * param (d: `decay`, or with `warmup` min(decay, (1 + t) / (10 + t)) for update
  t = 0, 1, ...); BatchNorm's running statistics the same (batch_stats='average') or copied ('copy');
  num_batches_tracked copied."""

  def __init__(self, model, ema: ema_lib.Ema):
    self.config = ema
    self.module = copy.deepcopy(model)
    for p in self.module.parameters():
      p.requires_grad_(False)
    self.steps = 0

  def after_step(self, model) -> None:
    """Counts an optimizer step of `model`; folds it into the average when one is due."""
    torch = _torch()
    e = self.config
    self.steps += 1
    if self.steps % e.every_steps:
      return
    d = float(ema_lib.decay_at(e, self.steps // e.every_steps - 1))
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    with torch.no_grad():
      for name, p in self.module.named_parameters():
        p.mul_(d).add_(params[name], alpha=1.0 - d)
      for name, b in self.module.named_buffers():
        if b.is_floating_point() and e.batch_stats == 'average':
          b.mul_(d).add_(buffers[name], alpha=1.0 - d)
        else:
          b.copy_(buffers[name])


def ema_record_torch(torch_ema: TorchEma, dataset, batch_size: int, device, dtype: str = 'float32',
                     tta: str = 'none', normalization: str = 'cifar10') -> dict:
  """The JAX trainer's ema_eval_* keys (loss, accuracy, ece, brier) of the average."""
  log_probs, labels = eval_log_probs_torch(torch_ema.module, dataset, batch_size, device, dtype, tta,
                                           normalization)
  summary = calibration.summarize(jax.device_get(calibration.calibration_sums(
      jnp.asarray(log_probs), jnp.asarray(labels), jnp.ones(labels.shape, jnp.float32))))
  return {'ema_eval_loss': summary['nll'], 'ema_eval_accuracy': summary['accuracy'],
          'ema_eval_ece': summary['ece'], 'ema_eval_brier': summary['brier']}


def eval_log_probs_torch(model, dataset, batch_size: int, device, dtype: str = 'float32', tta: str = 'none',
                         normalization: str = 'cifar10'):
  """(log_softmax of `model`'s logits (eval mode) on the eval split, labels), as numpy float32 / int;
  `tta`: the views' averaged log probabilities (`tta_log_probs_torch`)."""
  torch = _torch()
  model.eval()
  out, labels = [], []
  with torch.no_grad(), autocast(dtype, device):
    for x, y in torch_eval_batches(dataset, batch_size, normalization):
      x = x.to(device)
      logits = model(x) if tta == 'none' else tta_log_probs_torch(model, x, tta)
      out.append(torch.log_softmax(logits.float(), dim=1).cpu().numpy())
      labels.append(y.numpy())
  return np.concatenate(out), np.concatenate(labels)


def swag_evaluate_torch(swag: 'TorchSwag', model, config, dataset, recalibration_batches,
                        steps_per_epoch: int, device) -> dict:
  """The SWAG Bayesian model average as the reference computes it: swag.num_samples samples (torch's own
  noise, seeded from config.seed), each loaded into a copy of `model`, torch's update_bn over the first
  ceil(bn_update_fraction * steps_per_epoch) batches of `recalibration_batches()`, its eval softmax
  probabilities averaged over the samples. Returns `calibration.calibration_sums` of the average."""
  torch = _torch()
  s = config.swag
  sample_model = copy.deepcopy(model)
  generator = torch.Generator().manual_seed(config.seed)
  held = min(swag.n, s.rank)
  num_batches = max(1, math.ceil(s.bn_update_fraction * steps_per_epoch))
  log_probs = []
  for _ in range(s.num_samples):
    z1 = {n: torch.randn(swag.mean[n].shape, generator=generator).to(device) for n in swag.names}
    z2 = torch.randn(held, generator=generator).to(device)
    if s.diag_only:
      z2 = torch.zeros_like(z2)
    swag.load_sample(sample_model, swag.sample(s.scale, z1, z2))
    _update_bn(itertools.islice(recalibration_batches(), num_batches), sample_model, device,
               config.model.dtype)
    sample_log_probs, labels = eval_log_probs_torch(sample_model, dataset, config.eval_batch_size, device,
                                                    config.model.dtype, tta_lib.level(config),
                                                    config.data.get('normalization', 'cifar10'))
    log_probs.append(sample_log_probs)
  mean_log_probs = calibration.mean_log_probs(jnp.asarray(np.stack(log_probs)))
  return calibration.calibration_sums(mean_log_probs, jnp.asarray(labels), jnp.ones(labels.shape))


def _swa_epoch_record(config, dataset, data_mode: str, epoch: int, model, swa_model, swag, device,
                      steps_per_epoch: int) -> dict:
  """The end of an SWA epoch: the epoch's average (and SWAG snapshot) unless taken per step, then the SWA
  model's evaluation after update_bn (swa.eval_every_epoch, or the last epoch) and SWAG's on the last."""
  swa_config = config.swa
  if not swa_config.update_every_steps:
    swa_model.update_parameters(model)
    if swag is not None:
      swag.collect(model)
  recal_config = config.copy_and_resolve_references()
  recal_config.data.augment = swa_config.recalibration_augment
  recal_key = jax.random.fold_in(jax_data_key(config.seed), steps.RECALIBRATION_SALT)

  def recalibration_batches():
    return torch_batches(dataset, recal_config, epoch if data_mode == 'identical' else
                         config.num_epochs + epoch, data_mode, data_key=recal_key)

  record = {}
  if swa_config.eval_every_epoch or epoch + 1 == config.num_epochs:
    _update_bn(recalibration_batches(), swa_model, device, config.model.dtype)
    swa_evals = evaluate_torch(swa_model, dataset, config.eval_batch_size, device, config.model.dtype,
                               tta_lib.level(config), config.data.get('normalization', 'cifar10'))
    record = {'swa_eval_loss': swa_evals['eval_loss'], 'swa_eval_accuracy': swa_evals['eval_accuracy']}
  record['swa_count'] = int(swa_model.n_averaged)
  if swag is not None and epoch + 1 == config.num_epochs:
    swag_sums = swag_evaluate_torch(swag, model, config, dataset, recalibration_batches, steps_per_epoch,
                                    device)
    record.update({f'swag_eval_{k}': v for k, v in calibration.summarize(swag_sums).items()})
  return record


def train_and_evaluate_torch(config, workdir: str, data_mode: str = 'native', device=None, dataset=None,
                             resume: bool = False):
  """Trains the blog's torch model with `config`, evaluating every epoch.

  Args:
    config: the config the JAX trainer takes (validated the same way; model.dtype='bfloat16' runs the
      forward passes under torch.autocast(bfloat16), params and optimizer state float32). With swa.enabled,
      the SWA phase is torch.optim.swa_utils as the JAX trainer runs it: from swa.start_epoch on, lr
      swa.lr (or SWALR stepped at each SWA epoch's start), AveragedModel updated after every epoch
      (or every swa.update_every_steps steps), update_bn before each SWA evaluation. With ema.enabled,
      `TorchEma` (timm's formula by hand) after each optimizer step, ema_eval_* logged every epoch.
    workdir: where `metrics.jsonl` is written, one record per epoch with the JAX trainer's keys.
    data_mode: 'native' (torch shuffling and augmentation) or 'identical' (the JAX trainer's batches).
    device: a torch device; default 'cuda' when available, else 'cpu'.
    dataset: an `input_pipeline.Dataset`; default `load_dataset(config.data, config.seed)`.
    resume: save `workdir/torch_checkpoint.pt` after each epoch (model, optimizer, schedulers, SWA,
      SWAG, EMA, torch's RNG) and continue from it when it is there: the resumed run's weights and
      records equal an uninterrupted run's (bitwise on the CPU). A checkpoint of another config or data
      mode is refused. Off: every run starts afresh and `metrics.jsonl` is rewritten.

  Returns:
    (the trained model, the last epoch's record).
  """
  torch = _torch()
  config_lib.validate(config)
  if data_mode not in DATA_MODES:
    raise ValueError(f'data_mode must be one of {list(DATA_MODES)}, got {data_mode!r}')
  device = torch.device(device or default_device())
  if dataset is None:
    dataset = input_pipeline.load_dataset(config.data, config.seed)
  steps_per_epoch = input_pipeline.steps_per_epoch(dataset.num_train, config.batch_size,
                                                   config.data.drop_remainder)
  if steps_per_epoch == 0:
    raise config_lib.ConfigError(
        f'batch_size={config.batch_size} exceeds the {dataset.num_train} training examples with '
        'data.drop_remainder=True')
  config_lib.validate_against_run(config, steps_per_epoch)

  torch.manual_seed(config.seed)
  model = create_torch_model(config.model, num_classes=dataset.num_classes)
  if config.init_from.path:
    _finetune().load_init_from(model, config, dataset.num_classes)
  model = model.to(device)
  if builders.finetuning(config):
    optimizer = _finetune().create_optimizer(model, config)
  else:
    optimizer = create_torch_optimizer(model.parameters(), config.optimizer)
  main_epochs = builders.main_schedule_epochs(config)
  scheduler = create_torch_scheduler(optimizer, config.schedule, main_epochs, steps_per_epoch)
  after_batch, after_epoch = scheduler_hooks(scheduler, config.schedule, steps_per_epoch)
  swa_config = config.swa
  swa_model = swa_scheduler = swag = None
  torch_ema = TorchEma(model, ema_lib.from_config(config)) if ema_lib.enabled(config) else None
  os.makedirs(workdir, exist_ok=True)
  saved = _read_checkpoint(workdir, config, data_mode) if resume else None
  start_epoch, elapsed_before, record = 0, 0.0, {}
  if saved is not None:
    start_epoch, elapsed_before, record = saved['epoch'], saved['elapsed_seconds'], saved['record']
  writer = metrics_writer.MetricsWriter(workdir, truncate_after_step=start_epoch * steps_per_epoch,
                                        tensorboard=False)
  start_time = time.perf_counter() - elapsed_before
  for epoch in range(config.num_epochs):
    in_swa = swa_config.enabled and epoch >= swa_config.start_epoch
    if saved is not None and epoch == start_epoch:  # every state as the checkpoint holds it
      _restore(saved, model, optimizer, scheduler, swa_model, swa_scheduler, swag, torch_ema)
      saved = None
    if in_swa and swa_model is None:
      from torch.optim import swa_utils  # pylint: disable=g-import-not-at-top
      swa_model = swa_utils.AveragedModel(model)
      swa_scheduler = _start_swa_lr(optimizer, config)
      if config.swag.enabled:
        swag = TorchSwag(model, config.swag.rank, config.swag.var_clamp)
    if epoch < start_epoch:
      continue  # done before the checkpoint: only the objects it holds are built, as the run built them
    if swa_scheduler is not None:
      swa_scheduler.step()
    if in_swa:
      hook = functools.partial(_swa_step_hook, swa_model, model,
                               (epoch - swa_config.start_epoch) * steps_per_epoch,
                               swa_config.update_every_steps, swag)
    else:
      hook = functools.partial(after_batch, epoch)
    if torch_ema is not None:
      hook = functools.partial(_with_ema, hook, torch_ema, model)
    epoch_start = time.perf_counter()
    batches = torch_batches(dataset, config, epoch, data_mode, mixup_alpha=config.data.get('mixup', 0.0),
                            **augmentations.batch_options(config))
    train = train_epoch(model, optimizer, batches, device,
                        hook, config.halt_on_nan, config.optimizer.clip_grad_norm, config.model.frozen_bn,
                        config.model.dtype, config.optimizer.get('micro_batches', 1),
                        label_smoothing=augmentations.label_smoothing(config))
    if device.type == 'cuda':
      torch.cuda.synchronize(device)
    train_seconds = time.perf_counter() - epoch_start
    swa_record = (_swa_epoch_record(config, dataset, data_mode, epoch, model, swa_model, swag, device,
                                    steps_per_epoch) if in_swa else {})
    evals = evaluate_torch(model, dataset, config.eval_batch_size, device, config.model.dtype,
                           tta_lib.level(config),
                           config.data.get('normalization', 'cifar10'))
    record = {'epoch': epoch + 1, 'step': (epoch + 1) * steps_per_epoch,
              'train_loss': train['train_loss'], 'train_accuracy': train['train_accuracy'],
              'eval_loss': evals['eval_loss'], 'eval_accuracy': evals['eval_accuracy'],
              'learning_rate': train['learning_rate'], 'momentum': train['momentum'],
              'images_per_second': train['num_images'] / max(train_seconds, 1e-9),
              'elapsed_seconds': time.perf_counter() - start_time}
    if torch_ema is not None:
      record.update(ema_record_torch(torch_ema, dataset, config.eval_batch_size, device, config.model.dtype,
                                     tta_lib.level(config), config.data.get('normalization', 'cifar10')))
    record.update(swa_record)
    writer.write(record)
    if not in_swa:
      after_epoch(evals['eval_loss'])
    if resume:
      _write_checkpoint(workdir, config, data_mode, epoch + 1, time.perf_counter() - start_time, record,
                        model, optimizer, scheduler, swa_model, swa_scheduler, swag, torch_ema)
  writer.close()
  if start_epoch == config.num_epochs:
    print(f'{workdir}: the torch run had finished at epoch {start_epoch}; nothing to do.')
  return model, record


# Resuming the twin: one file, written after each epoch's record ------------------------------------------

CHECKPOINT_FILE = 'torch_checkpoint.pt'


def _state(obj):
  return None if obj is None else obj.state_dict()


def _write_checkpoint(workdir, config, data_mode, epoch, elapsed, record, model, optimizer, scheduler,
                      swa_model, swa_scheduler, swag, torch_ema) -> None:
  """Saves everything the next epoch reads (atomically: a kill leaves the previous file)."""
  torch = _torch()
  state = {
      'epoch': epoch, 'elapsed_seconds': elapsed, 'record': record,
      'config': json.loads(config.to_json_best_effort()), 'data_mode': data_mode,
      'model': model.state_dict(), 'optimizer': optimizer.state_dict(), 'scheduler': scheduler.state_dict(),
      'swa_model': _state(swa_model), 'swa_scheduler': _state(swa_scheduler),
      'swag': None if swag is None else {'n': swag.n, 'mean': swag.mean, 'sq_mean': swag.sq_mean,
                                         'deviations': swag.deviations},
      'ema': None if torch_ema is None else {'module': torch_ema.module.state_dict(),
                                             'steps': torch_ema.steps},
      'rng': torch.get_rng_state(),
      'cuda_rng': torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
  }
  path = os.path.join(workdir, CHECKPOINT_FILE)
  torch.save(state, path + '.tmp')
  os.replace(path + '.tmp', path)


def _read_checkpoint(workdir, config, data_mode):
  """The saved state of an unfinished run in `workdir`, or None. A run is a comparison's: any change the
  JAX trainer would refuse or announce on its resume (`checkpointing.compare_with_saved`) is refused."""
  path = os.path.join(workdir, CHECKPOINT_FILE)
  if not os.path.exists(path):
    return None
  saved = _torch().load(path, map_location='cpu', weights_only=False)
  structural, announced = checkpointing.compare_with_saved(config, saved['config'])
  changed = structural + announced + ([f'data mode: {saved["data_mode"]!r} -> {data_mode!r}']
                                      if saved['data_mode'] != data_mode else [])
  if changed:
    raise config_lib.ConfigError(
        f'{path} holds a torch run of another config ({"; ".join(changed)}); give another workdir, or delete '
        'the file to start again')
  print(f'{workdir}: resuming the torch run after epoch {saved["epoch"]}', flush=True)
  return saved


def _restore(saved, model, optimizer, scheduler, swa_model, swa_scheduler, swag, torch_ema) -> None:
  torch = _torch()
  model.load_state_dict(saved['model'])
  optimizer.load_state_dict(saved['optimizer'])
  scheduler.load_state_dict(saved['scheduler'])
  if swa_model is not None:
    swa_model.load_state_dict(saved['swa_model'])
  if swa_scheduler is not None:
    swa_scheduler.load_state_dict(saved['swa_scheduler'])
  if swag is not None:
    swag.n, swag.mean, swag.sq_mean = saved['swag']['n'], saved['swag']['mean'], saved['swag']['sq_mean']
    swag.deviations = saved['swag']['deviations']
  if torch_ema is not None:
    torch_ema.module.load_state_dict(saved['ema']['module'])
    torch_ema.steps = saved['ema']['steps']
  torch.set_rng_state(saved['rng'])
  if saved['cuda_rng'] is not None and torch.cuda.is_available():
    torch.cuda.set_rng_state_all(saved['cuda_rng'])
