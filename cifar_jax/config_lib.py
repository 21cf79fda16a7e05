"""Config checks that run before anything is compiled, and the config saved beside a run."""

import os

from absl import logging
import ml_collections

from cifar_jax import input_pipeline
from cifar_jax import models

DTYPE_NAMES = ('float32', 'bfloat16')
SCHEDULE_NAMES = ('multistep', 'step', 'cosine', 'warm_restarts', 'cyclic', 'one_cycle', 'constant',
                  'plateau')
CONFIG_FILE = 'config.json'


class ConfigError(ValueError):
  """A config field with an invalid value; the message names the field and what would be valid."""


def _require(ok: bool, message: str) -> None:
  if not ok:
    raise ConfigError(message)


def _choice(value, field: str, choices) -> None:
  _require(value in choices, f'{field} must be one of {list(choices)}, got {value!r}')


def _positive(value, field: str, integer: bool = False) -> None:
  kind = int if integer else (int, float)
  ok = isinstance(value, kind) and not isinstance(value, bool) and value > 0
  _require(ok, f'{field} must be a positive {"integer" if integer else "number"}, got {value!r}')


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks every field whose validity does not depend on the data; raises ConfigError."""
  _choice(config.model.name, 'model.name', sorted(models.STAGE_SIZES))
  _choice(config.model.norm, 'model.norm', ('batch', 'group_ws'))
  _choice(config.model.dtype, 'model.dtype', DTYPE_NAMES)
  _positive(config.model.width_multiplier, 'model.width_multiplier')
  if config.model.norm == 'group_ws':
    widths = models.ResNet(stage_sizes=(), width_multiplier=config.model.width_multiplier).widths()
    _require(all(w % models.GROUP_SIZE == 0 for w in widths),
             f'model.width_multiplier={config.model.width_multiplier} gives widths {widths}; '
             f'group_ws needs multiples of {models.GROUP_SIZE}')
  _choice(config.data.source, 'data.source', input_pipeline.SOURCES)
  if config.data.source in ('npz', 'cifar10_python'):
    _require(bool(config.data.path), f'data.path must be set for data.source={config.data.source}')
  _require(config.data.validation_size >= 0,
           f'data.validation_size must be >= 0, got {config.data.validation_size}')
  _positive(config.num_epochs, 'num_epochs', integer=True)
  _positive(config.batch_size, 'batch_size', integer=True)
  _positive(config.eval_batch_size, 'eval_batch_size', integer=True)
  _positive(config.optimizer.lr, 'optimizer.lr')
  _require(0.0 <= config.optimizer.momentum < 1.0,
           f'optimizer.momentum must be in [0, 1), got {config.optimizer.momentum}')
  _require(config.optimizer.weight_decay >= 0.0,
           f'optimizer.weight_decay must be >= 0, got {config.optimizer.weight_decay}')
  s = config.schedule
  _choice(s.name, 'schedule.name', SCHEDULE_NAMES)
  _choice(s.step_every, 'schedule.step_every', ('', 'epoch', 'batch'))
  if s.name == 'multistep':
    milestones = list(s.milestones)
    _require(milestones == sorted(milestones),
             f'schedule.milestones must be in increasing order, got {tuple(milestones)}')
  if s.name in ('one_cycle', 'cyclic'):
    _positive(s.max_lr, 'schedule.max_lr')
  if s.name in ('one_cycle', 'cyclic'):
    _require(s.step_every in ('', 'batch'),
             f"schedule.step_every must be 'batch' for {s.name} (torch steps it every batch), "
             f'got {s.step_every!r}')
  if s.name == 'cyclic':
    _choice(s.mode, 'schedule.mode', ('triangular', 'triangular2', 'exp_range'))
  if s.name == 'one_cycle':
    _choice(s.anneal_strategy, 'schedule.anneal_strategy', ('cos', 'linear'))
  if config.swa.enabled:
    _require(isinstance(config.swa.start_epoch, int) and 1 <= config.swa.start_epoch < config.num_epochs,
             f'swa.start_epoch must be in 1..{config.num_epochs - 1} (SWA needs at least one epoch '
             f'before and one after it), got {config.swa.start_epoch}')
    _positive(config.swa.lr, 'swa.lr')
    _choice(config.swa.schedule, 'swa.schedule', ('constant', 'swa_lr'))
    _choice(config.swa.anneal_strategy, 'swa.anneal_strategy', ('cos', 'linear'))
    _require(0.0 <= config.swa.decay < 1.0, f'swa.decay must be in [0, 1), got {config.swa.decay}')
    _require(config.swa.update_every_steps >= 0,
             f'swa.update_every_steps must be >= 0, got {config.swa.update_every_steps}')
    _require(s.name != 'plateau', 'swa.enabled does not combine with schedule.name=plateau')
  _require(config.checkpoint_every_steps >= 0,
           f'checkpoint_every_steps must be >= 0, got {config.checkpoint_every_steps}')


def validate_against_run(config: ml_collections.ConfigDict, steps_per_epoch: int) -> None:
  """Checks the fields that depend on the run's length (known once the data is loaded)."""
  from cifar_jax import train  # pylint: disable=g-import-not-at-top

  s = config.schedule
  per_epoch = train.step_every(s) == 'epoch'
  unit = 'epochs' if per_epoch else 'steps'
  epochs = train.main_schedule_epochs(config)
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


def save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Writes the config used to `workdir/config.json`."""
  path = os.path.join(workdir, CONFIG_FILE)
  with open(path + '.tmp', 'w') as f:
    f.write(config.to_json_best_effort(indent=2))
  os.replace(path + '.tmp', path)
