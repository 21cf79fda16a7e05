"""Command line: `cifar-jax --config=configs/default.py --workdir=runs/default [--config.FIELD=VALUE]`.

Loads the config, logs the devices, and calls `train.train_and_evaluate` (or, with --mode, evaluates or
exports a checkpoint, or runs the LR range test: `lr_find.range_test`). A user error (a bad flag or
config field, a missing or bad data file, an unusable workdir or one another run holds) ends with one line
on stderr and exit status 2; `--debug` shows its traceback instead. A non-finite training loss ends with
exit status 3, a failed write of a checkpoint or the metrics (a full or failing disk) with exit status 4.
"""

import errno
import importlib.util
import json
import logging as pylogging
import os
import re
import sys

from absl import app
from absl import flags
from absl import logging
import jax
import ml_collections
from ml_collections import config_flags
import numpy as np

from cifar_jax import config_lib
from cifar_jax import cpu_backend
from cifar_jax import errors
from cifar_jax import lr_find
from cifar_jax import parallel
from cifar_jax import preemption
from cifar_jax import pretrained
from cifar_jax import torch_reference
from cifar_jax import train
from cifar_jax import uncertainty
from cifar_jax.errors import ConfigError
from cifar_jax.errors import DataError
from cifar_jax.errors import NonFiniteLossError
from cifar_jax.errors import WriteError

FLAGS = flags.FLAGS
USER_ERROR_STATUS = 2
NONFINITE_LOSS_STATUS = 3
WRITE_FAILURE_STATUS = 4
# absl's own help flags: with one of them the command line is not checked, absl prints the help.
HELP_FLAGS = ('-h', '-?', '--help', '-help', '--helpshort', '-helpshort', '--helpfull', '-helpfull',
              '--helpxml', '-helpxml')
CONFIG_EXAMPLE = 'a config file such as configs/default.py'
# Writing to the workdir failed (space, permission, the disk): the run stops, its last checkpoint kept.
DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EIO)
EVALUATION_FILE = 'evaluation.json'


def define_flags(flag_values: flags.FlagValues = FLAGS) -> None:
  """The command line's flags, on `flag_values` (a fresh FlagValues in tests)."""
  flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and TensorBoard events.',
                      flag_values=flag_values)
  flags.DEFINE_bool('debug', False, 'Show the full traceback of user errors.', flag_values=flag_values)
  flags.DEFINE_enum('mode', 'train', ['train', 'evaluate', 'export', 'lr_find'],
                    'train (resumes from the latest checkpoint); evaluate: print the table of the latest '
                    'checkpoint\'s models (single, SWA, SWAG, ensembles) and write evaluation.json; '
                    'export: write its weights; lr_find: the LR range test of the config (config.lr_find), '
                    'writing lr_find.json and lr_find.png to the workdir and printing the suggested '
                    "--config.schedule.max_lr (the workdir's checkpoints and metrics are not touched).",
                    flag_values=flag_values)
  flags.DEFINE_string('export_path', None,
                      'export: an .npz of flat "params/..." and "batch_stats/..." arrays, or a .pt torch '
                      'state_dict for cifar_jax.torch_reference (needs the torch extra).',
                      flag_values=flag_values)
  flags.DEFINE_enum('export_model', 'auto', ['auto', 'running', 'swa', 'ema'],
                    'export: which weights; auto = the SWA model when the checkpoint has one; ema: the '
                    'weights\' moving average (config.ema).',
                    flag_values=flag_values)
  config_flags.DEFINE_config_file('config', None, 'Training configuration file.', lock_config=True,
                                  flag_values=flag_values)
  flags.mark_flags_as_required(['config', 'workdir'], flag_values=flag_values)


define_flags()


def _config_root_on_path(argv) -> None:
  """Lets experiment configs `from configs import default`: puts the folder above configs/ on sys.path."""
  for arg in argv:
    if arg.startswith('--config='):
      config_dir = os.path.dirname(os.path.abspath(arg.split('=', 1)[1].split(':')[0]))
      sys.path.insert(0, os.path.dirname(config_dir))
  sys.path.insert(0, os.getcwd())


class _QuietLibraries(pylogging.Filter):
  """Drops the INFO chatter of orbax and TFDS; their warnings and errors still show. A failed write that
  orbax's threads (or asyncio, under them) log shows without its traceback: the run reports that failure in
  one line (WriteError), and `--debug` shows the tracebacks."""

  def __init__(self, tracebacks: bool = False):
    super().__init__()
    self.tracebacks = tracebacks

  def filter(self, record):
    if record.exc_info and not self.tracebacks and errors.os_error(record.exc_info[1]) is not None:
      record.exc_info, record.exc_text = None, None
    return record.levelno >= pylogging.WARNING or not any(
        lib in record.pathname for lib in ('/orbax/', '/tensorflow_datasets/', '/etils/'))


def _exit_with_error(error: BaseException, status: int) -> None:
  """Prints `error` as one line on stderr and exits with `status`."""
  message = ' '.join(str(error).split())
  print(f'cifar-jax: error: {message}', file=sys.stderr)
  sys.exit(status)


def _flag_value(argv, name: str) -> str | None:
  """The last value given for --name on the command line (`--name=V` or `--name V`), else None."""
  value = None
  for i, arg in enumerate(argv[1:], start=1):
    key, eq, rest = arg.partition('=')
    if key in (f'--{name}', f'-{name}'):
      value = rest if eq else (argv[i + 1] if i + 1 < len(argv) else '')
  return value


def _debug_requested(argv) -> bool:
  """Whether --debug is on, read before absl parses the flags (a flag error may stop that)."""
  debug = False
  for arg in argv[1:]:
    key, eq, value = arg.partition('=')
    if key in ('--debug', '-debug'):
      debug = not eq or value.lower() in ('true', 't', '1', 'yes')
    elif key in ('--nodebug', '-nodebug'):
      debug = False
  return debug


def _load_config(arg: str) -> ml_collections.ConfigDict:
  """The config that `--config=arg` names, or ConfigError saying why it cannot be loaded."""
  if not arg:
    raise ConfigError(f'--config is required: {CONFIG_EXAMPLE}')
  path = arg.split(':', 1)[0]
  if not os.path.isfile(path):
    raise ConfigError(f'--config={arg}: no such file; give {CONFIG_EXAMPLE}')
  try:  # what config_flags does with the file, here so that a failure can be one line
    spec = importlib.util.spec_from_file_location('cifar_jax_checked_config', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(*arg.split(':', 1)[1:])
  except Exception as e:  # pylint: disable=broad-except
    raise ConfigError(f'--config={arg}: cannot load it ({type(e).__name__}: {e})') from e
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f'--config={arg}: get_config() returned a {type(config).__name__}, '
                                 'not an ml_collections.ConfigDict')
  return config


def _check_command_line(argv) -> ml_collections.ConfigDict:
  """Loads the config and checks the --config.FIELD names before absl does (its errors are tracebacks)."""
  argv = flags.FLAGS.read_flags_from_files(argv, force_gnu=False)  # expands --flagfile=FILE
  config = _load_config(_flag_value(argv, 'config'))
  overrides = [m.group(2) for m in (re.match(r'-{1,2}(no)?config\.([^=\[]+)', a) for a in argv[1:]) if m]
  config_lib.check_field_names(overrides, config)
  if not _flag_value(argv, 'workdir'):
    raise ConfigError('--workdir is required: the folder for checkpoints, metrics and '
                                 'config.json (created if missing)')
  return config


def _flag_error_message(error: flags.Error, config) -> str:
  """absl's flag error, with the type and current value of a config field it failed to parse."""
  message = str(error)
  m = re.match(r'flag --config\.([\w.]+)=(.*?): (.*)', message, re.S)
  if m is None or config is None:
    return message
  field, value, reason = m.groups()
  try:
    current = config_lib.field_value(config, field)
  except KeyError:
    return message
  kind = type(current).__name__
  article = 'an' if kind[0] in 'aeiou' else 'a'
  return f'--config.{field}={value}: {field} must be {article} {kind} like {current!r} ({reason})'


def parse_flags(argv, flag_values: flags.FlagValues = FLAGS) -> list[str]:
  """absl's flags parser for `app.run`, with command-line mistakes as one line and exit status 2."""
  debug = _debug_requested(argv)
  config = None
  try:
    if not any(arg.split('=', 1)[0] in HELP_FLAGS for arg in argv[1:]):
      config = _check_command_line(argv)
    return flag_values(argv)
  except ConfigError as e:
    if debug:
      raise
    _exit_with_error(e, USER_ERROR_STATUS)
  except flags.Error as e:
    if debug:
      raise
    _exit_with_error(_flag_error_message(e, config), USER_ERROR_STATUS)


def main(argv, flag_values: flags.FlagValues = FLAGS):
  config, workdir, mode = flag_values.config, flag_values.workdir, flag_values.mode
  try:
    if len(argv) > 1:
      raise ConfigError(f'unexpected arguments {argv[1:]}; every option is --flag=value')
    # Everything checkable without the data is checked before anything is logged or compiled.
    config_lib.validate(config)
    cpu_flags = cpu_backend.configure(config)  # before anything touches a device
    parallel.initialize_distributed(config.distributed)
    if mode in ('train', 'lr_find'):
      config_lib.validate_devices(config, jax.device_count())
      config_lib.check_workdir(workdir)
    elif not os.path.isdir(workdir):
      raise ConfigError(f'--workdir={workdir}: no such folder; --mode={mode} needs the '
                        'workdir of a training run')
    logging.get_absl_handler().addFilter(_QuietLibraries(tracebacks=flag_values.debug))
    logging.info('JAX %s, process %d/%d, devices: %s (XLA:CPU settings added: %s)', jax.__version__,
                 jax.process_index(), jax.process_count(), jax.devices(), cpu_flags or 'none')
    if mode == 'train':
      train.train_and_evaluate(config, workdir)
    elif mode == 'evaluate':
      _evaluate(config, workdir)
    elif mode == 'lr_find':
      print(lr_find.report(lr_find.range_test(config, workdir)))
    else:
      _export(config, workdir, flag_values.export_path, flag_values.export_model)
  except (ConfigError, DataError) as e:
    if flag_values.debug:
      raise
    _exit_with_error(e, USER_ERROR_STATUS)
  except NonFiniteLossError as e:
    if flag_values.debug:
      raise
    _exit_with_error(e, NONFINITE_LOSS_STATUS)
  except WriteError as e:
    if flag_values.debug:
      raise
    _exit_with_error(e, WRITE_FAILURE_STATUS)
  except preemption.Preempted as e:
    print(f'cifar-jax: {e}', file=sys.stderr)
    sys.exit(128 + e.signum)  # the shell's status for a process ended by that signal
  except OSError as e:
    if flag_values.debug or e.errno not in DISK_ERRNOS:
      raise
    _exit_with_error(f'writing to --workdir={workdir} failed: {e}; free space or fix the disk, then run '
                     'the same command (training resumes from the last checkpoint)', WRITE_FAILURE_STATUS)


def _evaluate(config, workdir: str) -> None:
  """Prints the evaluation table of the latest checkpoint and writes it, with the metrics, to
  `workdir/evaluation.json`."""
  out = train.evaluate_checkpoint(config, workdir)
  path = os.path.join(workdir, EVALUATION_FILE)
  with open(path, 'w') as f:
    json.dump(out, f, indent=1)
  print(f"{workdir} at step {out['step']} ({out['split']}):")
  print(train.format_table(out['table']))
  if 'shift' in out:
    print(train.format_shift_summary(out['shift'], out['table']))
  if 'temperature' in out:
    print(uncertainty.format_temperature(out['temperature'], out['table']))
  if 'ood' in out:
    print(uncertainty.format_ood(out['ood']))
  print(f'Written to {path}')


def _export(config, workdir: str, path: str | None, which: str) -> None:
  """Writes the latest checkpoint's weights to `path` (.npz, or .pt for torch; a pretrained family's
  .pt / .pth / .safetensors in its source layout, `pretrained.SOURCE_LAYOUT`)."""
  source_layout = pretrained.SOURCE_LAYOUT.get(config.model.name)
  suffixes = ('.npz', '.pt') + (('.pth', '.safetensors') if source_layout else ())
  if not path or not path.endswith(suffixes):
    raise ConfigError(f'--export_path must end in {" or ".join(suffixes)}, got {path!r}')
  if which == 'auto':
    try:
      variables = train.export_variables(config, workdir, use_swa=True)
      which = 'swa'
    except ConfigError:
      variables, which = train.export_variables(config, workdir, use_swa=False), 'running'
  else:
    variables = train.export_variables(config, workdir, use_swa=which == 'swa', use_ema=which == 'ema')
  if source_layout and not path.endswith('.npz'):
    pretrained.save_state_dict(pretrained.to_state_dict(variables, source_layout), path)
  elif path.endswith('.pt'):
    import torch  # pylint: disable=g-import-not-at-top
    torch.save(torch_reference.flax_to_torch(variables), path)
  else:
    flat = {'/'.join(str(getattr(k, 'key', k)) for k in key_path): value
            for key_path, value in jax.tree_util.tree_leaves_with_path(variables)}
    np.savez(path, **flat)
  print(f'Exported the {which} model of {workdir} to {path}')


def run():
  """Console-script entry point."""
  _config_root_on_path(sys.argv)
  app.run(main, flags_parser=parse_flags)


if __name__ == '__main__':
  run()
