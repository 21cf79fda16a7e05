"""Starting a run from pretrained weights (`config.init_from`) and writing a model back in its source layout.

A file is read as a flat {key: array} (`read_tensors`: a torch state dict `.pt` / `.pth` / `.bin`, read with
`torch.load(weights_only=True)`, so a file that holds code is refused; `.safetensors`; this trainer's
`--mode=export` `.npz` or a workdir for the layout `cifar_jax`). The layout names how the keys spell the
model's variables (`flax_to_key`): torchvision's and timm's ResNets are `layer1.0.downsample.1.running_var`,
the `efficientnet-lite-pytorch` package's `_blocks.3._bn1.weight`. Every key of the model must be in the file
and every key of the file in the model, with the model's shape, or the run stops with one line
(`errors.ConfigError`, exit status 2) before anything is written to the workdir. The classification head
is the one exception: with another class count it is replaced by zeros (BiT, big_vision). BatchNorm's
running statistics come along; `num_batches_tracked` is read and dropped (`to_state_dict` writes 0).
"""

import functools
import os
import pickle
from typing import Any
import zipfile

from absl import logging
import jax
import ml_collections
import numpy as np
import safetensors
import safetensors.numpy

from cifar_jax import builders
from cifar_jax import checkpointing
from cifar_jax import ema as ema_lib
from cifar_jax import models
from cifar_jax.errors import ConfigError

# layout -> the models (config.model.name) its files fit.
LAYOUTS = {
    'torchvision_resnet': models.PRETRAINED_FAMILIES[:3],
    'timm_resnet': models.PRETRAINED_FAMILIES[:3],  # timm's resnet18/34/50 keys are torchvision's
    'efficientnet_lite': ('efficientnet_lite0',),
    'cifar_jax': tuple(models.MODELS),
}
# The model family's layout when a run exports in the source layout (`--mode=export --export_path=*.pt`).
SOURCE_LAYOUT = {**{name: 'torchvision_resnet' for name in models.PRETRAINED_FAMILIES[:3]},
                 'efficientnet_lite0': 'efficientnet_lite'}
TORCH_SUFFIXES = ('.pt', '.pth', '.bin')
HEAD = 'fc'  # the classification head's top-level module in every family
IGNORED_KEYS = ('num_batches_tracked',)  # BatchNorm's step counter: no Flax twin
# Flax leaf -> torch parameter / buffer name, by collection.
LEAF_NAMES = {('params', 'kernel'): 'weight', ('params', 'scale'): 'weight', ('params', 'bias'): 'bias',
              ('batch_stats', 'mean'): 'running_mean', ('batch_stats', 'var'): 'running_var'}
MAX_LISTED = 4  # keys named per kind of mismatch in the one-line error


def _module_key(name: str, underscore: bool) -> str:
  """A Flax module name as torch's attribute path: 'layer1_0' -> 'layer1.0', 'blocks_3' -> '_blocks.3'."""
  base, _, index = name.rpartition('_')
  parts = [base, index] if base and index.isdigit() else [name]
  if underscore:
    parts[0] = '_' + parts[0]
  return '.'.join(parts)


def flax_to_key(layout: str, collection: str, path: tuple[str, ...]) -> str:
  """The file's key of the variable `path` (module names, then the leaf) of `collection`."""
  if layout == 'cifar_jax':
    return '/'.join((collection,) + path)
  modules = [_module_key(m, layout == 'efficientnet_lite') for m in path[:-1]]
  return '.'.join(modules + [LEAF_NAMES[(collection, path[-1])]])


def to_torch_layout(value: np.ndarray, layout: str) -> np.ndarray:
  """A Flax array as torch holds it: conv kernels HWIO -> OIHW, dense kernels (in, out) -> (out, in)."""
  if layout == 'cifar_jax':
    return value
  if value.ndim == 4:
    return np.transpose(value, (3, 2, 0, 1))
  return value.T if value.ndim == 2 else value


def from_torch_layout(value: np.ndarray, layout: str) -> np.ndarray:
  """`to_torch_layout` undone."""
  if layout == 'cifar_jax':
    return value
  if value.ndim == 4:
    return np.transpose(value, (2, 3, 1, 0))
  return value.T if value.ndim == 2 else value


def _leaves(tree) -> dict[tuple[str, ...], Any]:
  return {tuple(str(k.key) for k in path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


# Reading a file --------------------------------------------------------------------------------------------


def read_tensors(path: str, layout: str) -> dict[str, np.ndarray]:
  """The file's {key: float32 or integer numpy array}; one ConfigError line when it cannot be read."""
  where = f'init_from.path={path}'
  if not path:
    raise ConfigError('init_from.path is empty; give a .pt / .pth / .safetensors file')
  if layout == 'cifar_jax' and os.path.isdir(path):
    return _read_workdir(path)
  if not os.path.isfile(path):
    raise ConfigError(f'{where}: no such file')
  if path.endswith('.safetensors'):
    try:
      return safetensors.numpy.load_file(path)
    except (safetensors.SafetensorError, OSError, ValueError) as e:
      raise ConfigError(f'{where}: not a readable .safetensors file ({_first_line(e)})') from e
  if path.endswith('.npz'):
    try:
      with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
      raise ConfigError(f'{where}: not a readable .npz file ({_first_line(e)})') from e
  if path.endswith(TORCH_SUFFIXES):
    return _read_torch(path)
  raise ConfigError(f'{where}: unknown file type; give a torch state dict ({", ".join(TORCH_SUFFIXES)}), '
                    'a .safetensors file, or (init_from.layout=cifar_jax) an exported .npz or a workdir')


def _first_line(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  return f'{type(e).__name__}: {text[0]}' if text else type(e).__name__


def _read_torch(path: str) -> dict[str, np.ndarray]:
  import torch  # pylint: disable=g-import-not-at-top (the torch extra; only torch files need it)
  where = f'init_from.path={path}'
  try:
    loaded = torch.load(path, map_location='cpu', weights_only=True)
  except pickle.UnpicklingError as e:
    # weights_only=True refuses any pickled object that is not a tensor or a plain container.
    raise ConfigError(f'{where}: the file holds pickled objects other than tensors (code), refused '
                      '(torch.load(weights_only=True)); save model.state_dict() instead') from e
  except (RuntimeError, OSError, EOFError, ValueError, zipfile.BadZipFile) as e:
    raise ConfigError(f'{where}: not a readable torch file ({_first_line(e)})') from e
  # Training checkpoints wrap the state dict (timm: 'state_dict', others 'model').
  for wrapper in ('state_dict', 'model'):
    if isinstance(loaded, dict) and isinstance(loaded.get(wrapper), dict):
      loaded = loaded[wrapper]
  if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
    raise ConfigError(f'{where}: not a state dict of tensors (found {type(loaded).__name__}); save '
                      'model.state_dict()')
  return {k: v.detach().cpu().numpy() for k, v in loaded.items()}


def _read_workdir(path: str) -> dict[str, np.ndarray]:
  """The latest checkpoint of a run of this trainer, as `--mode=export`'s .npz keys."""
  saved = checkpointing.saved_config(path)
  if saved is None:
    raise ConfigError(f'init_from.path={path}: no {checkpointing.CONFIG_FILE}; not a workdir of this trainer')
  config = ml_collections.ConfigDict(saved)
  state = checkpointing.restore_state(config, path, steps_per_epoch=1)
  variables = jax.device_get({'params': state.params, 'batch_stats': state.batch_stats})
  return {flax_to_key('cifar_jax', c, p): np.asarray(v) for c in variables
          for p, v in _leaves(variables[c]).items()}


# Mapping onto the model ------------------------------------------------------------------------------------


def model_shapes(model_config: ml_collections.ConfigDict, num_classes: int = 10):
  """(params, batch_stats) shapes of `config.model` with `num_classes` outputs (no values computed)."""
  model = builders.create_model(model_config, num_classes=num_classes)
  variables = jax.eval_shape(functools.partial(model.init, train=False), jax.random.PRNGKey(0),
                             jax.ShapeDtypeStruct(builders.INPUT_SHAPE, np.float32))
  return variables['params'], variables.get('batch_stats', {})


def map_tensors(tensors: dict[str, np.ndarray], shapes, layout: str, strict: bool = True, *,
                where: str = 'init_from') -> tuple[dict, dict, list[str]]:
  """{key: array} -> ({(collection, path): Flax array}, {(collection, path): 'zeros'}, notes).

  The first holds what the file gives; the second the head variables replaced by zeros (another class
  count). Strict: anything missing, unexpected or of another shape is one ConfigError line; not strict,
  those keep the model's initial values and are named in `notes`.
  """
  expected = {}
  for collection, tree in zip(('params', 'batch_stats'), shapes):
    for path, leaf in _leaves(tree).items():
      expected[flax_to_key(layout, collection, path)] = (collection, path, tuple(leaf.shape))
  given = {k: v for k, v in tensors.items() if k.rsplit('.', 1)[-1] not in IGNORED_KEYS}
  missing = [k for k in expected if k not in given]
  unexpected = [k for k in given if k not in expected]
  loaded, zeroed, wrong = {}, {}, []
  for key, (collection, path, shape) in expected.items():
    if key not in given:
      continue
    value = from_torch_layout(np.asarray(given[key]), layout)
    if value.shape == shape:
      loaded[(collection, path)] = value.astype(np.float32)
    elif path[0] == HEAD:
      zeroed[(collection, path)] = 'zeros'
    else:
      model_shape = to_torch_layout(np.zeros(shape), layout).shape
      wrong.append(f'{key} {tuple(np.shape(given[key]))} vs model {tuple(model_shape)}')
  kinds = (('missing', missing), ('unexpected', unexpected), ('of the wrong shape', wrong))
  problems = [f'{len(keys)} {what} ({", ".join(keys[:MAX_LISTED])}{", ..." * (len(keys) > MAX_LISTED)})'
              for what, keys in kinds if keys]
  if problems and strict:
    raise ConfigError(f'{where}: the file does not fit the model (layout {layout}): {"; ".join(problems)}; '
                      'check model.name and init_from.layout, or set init_from.strict=False to load '
                      'what fits')
  return loaded, zeroed, problems


def apply_to_variables(params, batch_stats, loaded: dict, zeroed: dict):
  """`params`, `batch_stats` (numpy or jax trees) with the loaded and zeroed leaves replaced."""
  def replace(collection, tree):
    def leaf(path, value):
      key = (collection, tuple(str(k.key) for k in path))
      if key in loaded:
        return loaded[key]
      if key in zeroed:
        return np.zeros(value.shape, np.float32)
      return value
    return jax.tree_util.tree_map_with_path(leaf, tree)
  return replace('params', params), replace('batch_stats', batch_stats)


def load(config: ml_collections.ConfigDict, num_classes: int = 10) -> tuple[dict, dict] | None:
  """`config.init_from` read and mapped onto `config.model` with a head of `num_classes` (the data's):
  (loaded, zeroed) as `map_tensors` gives them, or None when `init_from.path` is ''. Reads only; one
  ConfigError line for any problem."""
  init = config.init_from
  if not init.path:
    return None
  tensors = read_tensors(init.path, init.layout)
  loaded, zeroed, problems = map_tensors(tensors, model_shapes(config.model, num_classes), init.layout,
                                         init.strict, where=f'init_from.path={init.path}')
  if problems:
    logging.warning('init_from.strict=False: %s keep their initial values', '; '.join(problems))
  logging.info('init_from: %d arrays from %s (layout %s)%s', len(loaded), init.path, init.layout,
               f'; head {sorted("/".join(p) for _, p in zeroed)} set to zeros' if zeroed else '')
  return loaded, zeroed


def initialize(initial: tuple, init: tuple[dict, dict] | None, num_seeds: int = 1) -> tuple:
  """The initial (state, metric sums) of every seed with `load`'s arrays in place (every seed the same;
  several seeds: stacked; the EMA's copy of them too) and the SWA average's fields (zeros) untouched."""
  if init is None:
    return initial
  state, acc = initial
  loaded, zeroed = init
  if num_seeds > 1:
    loaded = {k: np.broadcast_to(v, (num_seeds,) + v.shape) for k, v in loaded.items()}
  params, batch_stats = apply_to_variables(state.params, state.batch_stats, loaded, zeroed)
  params, batch_stats = jax.tree.map(jax.numpy.asarray, (params, batch_stats))
  state = state.replace(params=params, batch_stats=batch_stats)
  if state.ema_params is not None:  # the weights' moving average starts from the loaded weights too
    state = ema_lib.init_ema(state)
  return state, acc


def has_checkpoint(workdir: str) -> bool:
  """Whether `workdir` holds checkpoints: a resumed run takes its state from them, not from init_from."""
  folder = os.path.join(workdir, checkpointing.CHECKPOINTS)
  return os.path.isdir(folder) and bool(os.listdir(folder))


# Writing the source layout ---------------------------------------------------------------------------------


def to_state_dict(variables: dict, layout: str) -> dict[str, np.ndarray]:
  """{'params', 'batch_stats'} -> the source layout's {key: array}, with BatchNorm's `num_batches_tracked`
  (0) so torch's `load_state_dict(strict=True)` takes it."""
  out = {}
  for collection in ('params', 'batch_stats'):
    for path, value in _leaves(variables.get(collection, {})).items():
      out[flax_to_key(layout, collection, path)] = np.ascontiguousarray(
          to_torch_layout(np.asarray(value, np.float32), layout))
      if collection == 'batch_stats' and path[-1] == 'mean' and layout != 'cifar_jax':
        out[flax_to_key(layout, collection, path).rsplit('.', 1)[0] + '.num_batches_tracked'] = np.zeros(
            (), np.int64)
  return out


def save_state_dict(state_dict: dict[str, np.ndarray], path: str) -> None:
  """Writes a `to_state_dict` as a torch file (.pt / .pth) or .safetensors."""
  if path.endswith('.safetensors'):
    safetensors.numpy.save_file(state_dict, path)
    return
  import torch  # pylint: disable=g-import-not-at-top (the torch extra)
  torch.save({k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()}, path)
