"""Command line: `cifar-jax --config=configs/default.py --workdir=runs/default [--config.FIELD=VALUE]`.

Loads the config, logs the devices, and calls `train.train_and_evaluate`. A user error (a bad config
field, a missing data file) ends with one line on stderr and exit status 2.
"""

import json
import logging as pylogging
import os
import sys

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags
import numpy as np

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and TensorBoard events.')
flags.DEFINE_bool('debug', False, 'Show the full traceback of user errors.')
flags.DEFINE_enum('mode', 'train', ['train', 'evaluate', 'export'],
                  'train (resumes from the latest checkpoint); evaluate: print the eval metrics of the '
                  'latest checkpoint (running and SWA model) as JSON; export: write its weights.')
flags.DEFINE_string('export_path', None,
                    'export: an .npz of flat "params/..." and "batch_stats/..." arrays, or a .pt torch '
                    'state_dict for cifar_jax.torch_reference (needs the torch extra).')
flags.DEFINE_enum('export_model', 'auto', ['auto', 'running', 'swa'],
                  'export: which weights; auto = the SWA model when the checkpoint has one.')
config_flags.DEFINE_config_file('config', None, 'Training configuration file.', lock_config=True)
flags.mark_flags_as_required(['config', 'workdir'])


def _config_root_on_path(argv) -> None:
  """Lets experiment configs `from configs import default`: puts the folder above configs/ on sys.path."""
  for arg in argv:
    if arg.startswith('--config='):
      config_dir = os.path.dirname(os.path.abspath(arg.split('=', 1)[1].split(':')[0]))
      sys.path.insert(0, os.path.dirname(config_dir))
  sys.path.insert(0, os.getcwd())


class _QuietLibraries(pylogging.Filter):
  """Drops the INFO chatter of orbax and TFDS; their warnings and errors still show."""

  def filter(self, record):
    return record.levelno >= pylogging.WARNING or not any(
        lib in record.pathname for lib in ('/orbax/', '/tensorflow_datasets/', '/etils/'))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  from cifar_jax import config_lib, input_pipeline, train  # pylint: disable=g-import-not-at-top

  logging.get_absl_handler().addFilter(_QuietLibraries())
  logging.info('JAX %s, process %d/%d, devices: %s', jax.__version__, jax.process_index(),
               jax.process_count(), jax.devices())
  try:
    if FLAGS.mode == 'train':
      train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    elif FLAGS.mode == 'evaluate':
      print(json.dumps(train.evaluate_checkpoint(FLAGS.config, FLAGS.workdir)))
    else:
      _export(FLAGS.config, FLAGS.workdir, FLAGS.export_path, FLAGS.export_model)
  except (config_lib.ConfigError, input_pipeline.DataError, train.NonFiniteLossError) as e:
    if FLAGS.debug:
      raise
    print(f'cifar-jax: error: {e}', file=sys.stderr)
    sys.exit(2 if not isinstance(e, train.NonFiniteLossError) else 3)


def _export(config, workdir: str, path: str | None, which: str) -> None:
  """Writes the latest checkpoint's weights to `path` (.npz, or .pt for torch)."""
  from cifar_jax import config_lib, train  # pylint: disable=g-import-not-at-top

  if not path or not path.endswith(('.npz', '.pt')):
    raise config_lib.ConfigError(f'--export_path must end in .npz or .pt, got {path!r}')
  if which == 'auto':
    try:
      variables = train.export_variables(config, workdir, use_swa=True)
      which = 'swa'
    except config_lib.ConfigError:
      variables, which = train.export_variables(config, workdir, use_swa=False), 'running'
  else:
    variables = train.export_variables(config, workdir, use_swa=which == 'swa')
  if path.endswith('.pt'):
    import torch  # pylint: disable=g-import-not-at-top
    from cifar_jax import torch_reference  # pylint: disable=g-import-not-at-top
    torch.save(torch_reference.flax_to_torch(variables), path)
  else:
    flat = {'/'.join(str(getattr(k, 'key', k)) for k in key_path): value
            for key_path, value in jax.tree_util.tree_leaves_with_path(variables)}
    np.savez(path, **flat)
  print(f'Exported the {which} model of {workdir} to {path}')


def run():
  """Console-script entry point."""
  _config_root_on_path(sys.argv)
  app.run(main)


if __name__ == '__main__':
  run()
