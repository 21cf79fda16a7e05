"""Checkpoints and the saved config: orbax save (in the background) and restore (with the damaged-checkpoint
fallback), the host-side state saved beside the arrays, `config.json` and the comparison a resumed run
makes with it.

A checkpoint holds the TrainState and the epoch's running metric sums as one pytree replicated over the
devices (`parallel.Parallel.to_checkpoint_layout`), so it restores on any device count, and a JSON of host
state (elapsed seconds, the plateau controllers).
"""

import contextlib
import dataclasses
import json
import os
import time

from absl import logging
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from cifar_jax import builders
from cifar_jax import errors
from cifar_jax import input_pipeline
from cifar_jax import steps
from cifar_jax.errors import ConfigError

CONFIG_FILE = 'config.json'
CHECKPOINTS = 'checkpoints'


def scalar(x) -> int:
  """An integer from a host value or a (replicated, possibly multi-process) array; seeds: seed 0's."""
  if isinstance(x, jax.Array):
    x = x.addressable_shards[0].data
  return int(np.asarray(x).reshape(-1)[0])


def checkpoint_manager(workdir: str, config: ml_collections.ConfigDict,
                       read_only: bool = False) -> ocp.CheckpointManager:
  """orbax's manager of `workdir/checkpoints`: a training run's (which holds the workdir's lock, so it may
  clear the temporary folders of a save that a kill cut short), or a reader's (evaluate, export)."""
  if read_only:
    options = ocp.CheckpointManagerOptions(read_only=True)
  else:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=config.keep_checkpoints, create=True, cleanup_tmp_directories=True,
        enable_async_checkpointing=config.get('async_checkpoints', True))
  return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, CHECKPOINTS)), options=options)


class CheckpointWriter:
  """A run's checkpoint saves: in the background (orbax's async checkpointing), failures as WriteError.

  `save` returns once the arrays are copied to the host, and the next steps run while orbax writes them
  into a temporary folder that it renames when complete: a checkpoint counts (is listed, is restored)
  only once committed, so a kill during a write leaves the one before it. Each save first waits for the
  previous one, and `close` (at the end of a run, however it ends) for the last.
  """

  def __init__(self, manager: ocp.CheckpointManager):
    self.manager = manager
    self.pending = None  # the step being written in the background

  def save(self, state: steps.TrainState, acc, extra: dict) -> None:
    """Saves the state, the epoch's running metric sums and host-side state (JSON) at `state.step`."""
    self.wait()
    self.pending = scalar(state.step)
    with self._disk_failures():
      self.manager.save(self.pending, args=ocp.args.Composite(
          state=ocp.args.StandardSave({'state': state, 'train_metrics': acc}),
          extra=ocp.args.JsonSave(extra)), force=True)

  def wait(self) -> None:
    """Blocks until the save in progress is committed (WriteError if the disk refused it)."""
    if self.pending is not None:
      with self._disk_failures():
        self.manager.wait_until_finished()
      self.pending = None

  def close(self) -> None:
    self.wait()
    self.manager.close()

  @contextlib.contextmanager
  def _disk_failures(self):
    """A save that the disk refused, as one WriteError naming the step and the last complete checkpoint
    (any other failure, a bug, propagates as it is)."""
    try:
      yield
    except Exception as e:  # pylint: disable=broad-except
      step, self.pending = self.pending, None
      complete = [s for s in self.manager.all_steps() if s != step]
      last = f'the last complete checkpoint is step {max(complete)}' if complete else 'no complete checkpoint'
      then = f'{last}: free space or fix the disk, then run the same command to resume'
      failure = errors.write_error(f'the checkpoint of step {step}', self.manager.directory, e, then)
      if failure is None:
        raise
      raise failure from e


def restore_checkpoint(manager: ocp.CheckpointManager, state: steps.TrainState, acc,
                       move_damaged: bool = True):
  """The newest readable checkpoint restored into the structure of (state, acc), or None if none exists.

  orbax writes into a temporary folder and renames it when complete, so a checkpoint cut short by a kill
  is never listed. One that is listed but damaged is skipped with a warning for the one before it (and
  moved aside when `move_damaged`: a training run's, which holds the workdir; a reader changes nothing).
  """
  steps = sorted(manager.all_steps(), reverse=True)
  if not steps:
    return None
  failures, damaged = [], []
  for step in steps:
    try:
      target = jax.tree.map(ocp.utils.to_shape_dtype_struct,
                            {'state': _state_fields(manager, step, state), 'train_metrics': acc})
      restored = manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target), extra=ocp.args.JsonRestore()))
    except Exception as e:  # pylint: disable=broad-except
      logging.warning('Checkpoint at step %d is unreadable (%s: %s); trying an older one.', step,
                      type(e).__name__, str(e).splitlines()[0][:200] if str(e) else '')
      failures.append(f'step {step}: {type(e).__name__}')
      damaged.append(step)
      continue
    if failures and move_damaged:
      _set_aside(manager, damaged)
      logging.warning('Resumed from step %d; moved unreadable checkpoints %s to %s_damaged/', step,
                      damaged, manager.directory)
    return (state.replace(**restored['state']['state']), restored['state']['train_metrics'],
            dict(restored['extra'] or {}))
  raise ConfigError(
      f'{manager.directory}: no readable checkpoint ({", ".join(failures)}); move the folder away to '
      'start afresh')


def _state_fields(manager: ocp.CheckpointManager, step: int, state: steps.TrainState) -> dict:
  """The TrainState's arrays by field, as checkpoint `step` holds them: a field the checkpoint predates
  (SWAG's, added 2026-11-30) is left out when this run does not use it (None)."""
  path = manager.directory / str(step) / 'state'  # an epath.Path
  on_disk = ocp.StandardCheckpointHandler().metadata(path).tree['state']
  fields = (f.name for f in dataclasses.fields(state) if f.metadata.get('pytree_node', True))
  return {name: getattr(state, name) for name in fields
          if name in on_disk or getattr(state, name) is not None}


HEAD = 'fc'  # the classification head's module in every model family (pretrained.HEAD)


def checkpoint_num_classes(manager: ocp.CheckpointManager) -> int | None:
  """The class count of the newest checkpoint's model (its head's outputs), None without a readable one."""
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      path = manager.directory / str(step) / 'state'
      head = ocp.StandardCheckpointHandler().metadata(path).tree['state']['params'][HEAD]
      return int(head['bias'].shape[-1])
    except Exception:  # pylint: disable=broad-except  # damaged or foreign: restore_checkpoint says so
      continue
  return None


def check_num_classes(manager: ocp.CheckpointManager, workdir: str, num_classes: int) -> None:
  """One ConfigError line when the newest checkpoint's model has another class count than the data."""
  saved = checkpoint_num_classes(manager)
  if saved is not None and saved != num_classes:
    raise ConfigError(
        f'--workdir={workdir} holds a checkpoint of a {saved}-class model, but the data has {num_classes} '
        'classes (data.source, data.tfds_name, data.path); use the data it was trained on, or a new workdir')


def _set_aside(manager: ocp.CheckpointManager, steps: list[int]) -> None:
  """Moves damaged checkpoints out of the way (kept for inspection), so the run can save those steps."""
  if jax.process_index() == 0:
    aside = f'{manager.directory}_damaged'
    os.makedirs(aside, exist_ok=True)
    for step in steps:
      os.replace(os.path.join(manager.directory, str(step)),
                 os.path.join(aside, f'{step}_{int(time.time())}'))
  manager.reload()


def host_extra(plateaus, elapsed_seconds: float) -> dict:
  """The host-side state a checkpoint keeps: the run's elapsed time and each plateau controller's state."""
  extra = {'elapsed_seconds': elapsed_seconds}
  if plateaus is not None:  # one seed: its controller's state; several: the list
    states = [p.state_dict() for p in plateaus]
    extra['plateau'] = states[0] if len(states) == 1 else states
  return extra


def load_plateaus(plateaus, extra: dict) -> None:
  """Restores the plateau controllers saved by `host_extra`."""
  if plateaus is not None and 'plateau' in extra:
    saved = extra['plateau'] if len(plateaus) > 1 else [extra['plateau']]
    for plateau, state_dict in zip(plateaus, saved):
      plateau.load_state_dict(state_dict)


def restore_state(config: ml_collections.ConfigDict, workdir: str,
                  steps_per_epoch: int) -> steps.TrainState:
  """The latest checkpoint of `workdir` as a TrainState for `config` (several seeds: stacked); reads only,
  so it may run beside the training run that writes the workdir. The model has the checkpoint's class
  count."""
  if not os.path.isdir(os.path.join(workdir, CHECKPOINTS)):
    raise ConfigError(f'--workdir={workdir}: no checkpoint under {workdir}/{CHECKPOINTS}')
  manager = checkpoint_manager(workdir, config, read_only=True)
  model = builders.create_model(config.model,
                                num_classes=checkpoint_num_classes(manager) or input_pipeline.NUM_CLASSES)
  state, acc = builders.create_initial_state(
      config, model, builders.create_run_schedules(config, steps_per_epoch))
  restored = restore_checkpoint(manager, state, acc, move_damaged=False)
  if restored is None:
    raise ConfigError(f'--workdir={workdir}: no checkpoint under {workdir}/checkpoints')
  return restored[0]


# The saved config -----------------------------------------------------------------------------------------


def save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Writes the config used to `workdir/config.json`."""
  path = os.path.join(workdir, CONFIG_FILE)
  try:
    with open(path + '.tmp', 'w') as f:
      f.write(config.to_json_best_effort(indent=2))
    os.replace(path + '.tmp', path)
  except OSError as e:
    raise errors.write_error(CONFIG_FILE, workdir, e, 'free space or fix the disk, then run the same '
                             'command') from e


# Fields whose change makes a checkpoint unusable (its arrays would not fit), and fields whose change a
# resumed run should announce (it continues, but no longer as the run that was started).
STRUCTURAL_FIELDS = ('model.name', 'model.norm', 'model.width_multiplier', 'swa.enabled', 'num_seeds',
                     'swag.enabled', 'swag.rank', 'swag.diag_only', 'ema.enabled')
# Fields added after runs were saved without them: their value then, for the comparison.
ABSENT_DEFAULTS = {'num_seeds': 1, 'seed_devices': 0, 'data.synthetic_seed': -1,
                   'cpu_devices': 0, 'model.conv': 'auto', 'model.batch_norm': 'xla', 'steps_per_dispatch': 0,
                   'compilation_cache': 'auto', 'swag.enabled': False, 'swag.rank': 20, 'swag.scale': 0.5,
                   'swag.num_samples': 30, 'swag.diag_only': False, 'swag.var_clamp': 1e-30,
                   'swag.bn_update_fraction': 1.0, 'swag.samples_per_call': 0, 'data.corruptions_path': '',
                   'optimizer.micro_batches': 1,
                   'loss.label_smoothing': 0.0, 'data.cutout.enabled': False, 'data.cutout.size': 16,
                   'data.cutout.count': 1, 'data.cutmix.enabled': False, 'data.cutmix.alpha': 1.0,
                   'data.cutmix.prob': 1.0, 'data.cutmix.switch_prob': 0.5, 'data.tfds_name': 'cifar10',
                   'data.synthetic_num_classes': 10, 'data.normalization': 'cifar10',
                   'ema.enabled': False, 'ema.decay': 0.999, 'ema.warmup': False, 'ema.every_steps': 1,
                   'ema.batch_stats': 'average'}
ANNOUNCED_PREFIXES = ('seed', 'num_epochs', 'batch_size', 'model.', 'data.', 'optimizer.', 'schedule.',
                      'swa.', 'swag.', 'parallelism', 'loss.', 'ema.')


def _flatten(d: dict, prefix: str = '') -> dict:
  out = {}
  for key, value in d.items():
    name = f'{prefix}{key}'
    if isinstance(value, dict):
      out.update(_flatten(value, name + '.'))
    else:
      out[name] = tuple(value) if isinstance(value, list) else value
  return out


def saved_config(workdir: str) -> dict | None:
  """The config a run in `workdir` was started with (config.json), or None."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def compare_with_saved(config: ml_collections.ConfigDict, saved: dict) -> tuple[list[str], list[str]]:
  """(structural differences, other differences that matter) between `config` and a saved config."""
  new = {**ABSENT_DEFAULTS, **_flatten(json.loads(config.to_json_best_effort()))}
  old = {**ABSENT_DEFAULTS, **_flatten(saved)}
  structural, announced = [], []
  for name in sorted(set(new) | set(old)):
    if new.get(name) == old.get(name):
      continue
    change = f'{name}: {old.get(name, "(absent)")!r} -> {new.get(name, "(absent)")!r}'
    if name in STRUCTURAL_FIELDS:
      structural.append(change)
    elif name.startswith(ANNOUNCED_PREFIXES):
      announced.append(change)
  return structural, announced


def check_resume(config: ml_collections.ConfigDict, workdir: str, has_checkpoint: bool) -> list[str]:
  """Refuses a checkpoint of an incompatible config; returns the other changed fields to announce."""
  saved = saved_config(workdir)
  if saved is None or not has_checkpoint:
    return []
  structural, announced = compare_with_saved(config, saved)
  if structural:
    raise ConfigError(
        f'--workdir={workdir} holds a checkpoint of another model ({"; ".join(structural)}); use a new '
        'workdir, or the config it was trained with')
  return announced
