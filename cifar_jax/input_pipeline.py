"""CIFAR-10 and CIFAR-100 from TFDS, an npz file, torchvision's pickles, lossless image strips or a synthetic
generator; batches made on device.

The dataset is held on the accelerator as uint8 once. Every batch (order, crop offsets, flips) is a pure
function of (seed, epoch, step), so any step's batch can be regenerated after a resume, and the augmentation
runs inside the jitted train step.

The class count comes from the data (`Dataset.num_classes`), and the model's head and every metric follow
it: TFDS's ClassLabel, the pickles' `meta` (`cifar-100-python`: 100 fine labels), an npz's `num_classes`
array (10 when it has none: a stray label must not silently widen the head), `data.synthetic_num_classes`.
Labels outside 0..num_classes - 1 are a DataError.
"""

import dataclasses
import hashlib
import io
import json
import os
import pickle
import socket

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from cifar_jax.errors import DataError

# Normalisation constants of the blog's transforms (on images scaled to [0, 1]).
MEAN_RGB = (0.4914, 0.4822, 0.4465)
STD_RGB = (0.2023, 0.1994, 0.2010)
# data.normalization -> (mean, std): the blog's CIFAR-10 constants, and the standard CIFAR-100 ones (the
# per-channel mean and standard deviation of CIFAR-100's 50,000 training images' pixels, as the CIFAR-100
# training code in common use writes them, e.g. weiaicunzai/pytorch-cifar100).
NORMALIZATIONS = {
    'cifar10': (MEAN_RGB, STD_RGB),
    'cifar100': ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
IMAGE_SIZE = 32
PAD = 4  # RandomCrop(32, padding=4), zero padding.
NUM_CLASSES = 10  # CIFAR-10's; what a source that does not state its class count holds
SOURCES = ('tfds', 'npz', 'cifar10_python', 'cifar100_python', 'images', 'synthetic')
# data.tfds_name: the TFDS datasets read, their label feature, and the official binary archive TFDS's
# builder downloads (its checksum is registered in tensorflow-datasets): the label bytes before each
# image's 3072 (CIFAR-100: coarse, fine) and which of them is the label.
TFDS_DATASETS = {
    'cifar10': dict(url='https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz', label_bytes=1,
                    label_byte=0, num_classes=10,
                    train_files=tuple(f'data_batch_{i}.bin' for i in range(1, 6)),
                    test_files=('test_batch.bin',)),
    'cifar100': dict(url='https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz', label_bytes=2,
                     label_byte=1, num_classes=100, train_files=('train.bin',), test_files=('test.bin',)),
}
# data.source=images: a folder of lossless image strips and this manifest (scripts/gpu/gpu_bundle.py).
IMAGES_MANIFEST = 'manifest.json'
IMAGES_FORMAT = 'cifar_jax.image_strips.v1'
# The other sources, and how to choose one, for the errors of a source that cannot load.
OTHER_SOURCES = ('--config.data.source=npz --config.data.path=FILE.npz (x_train, y_train), '
                 '--config.data.source=cifar10_python --config.data.path=cifar-10-batches-py, '
                 '--config.data.source=cifar100_python --config.data.path=cifar-100-python, '
                 '--config.data.source=images --config.data.path=FOLDER (scripts/gpu/gpu_bundle.py) or '
                 '--config.data.source=synthetic')

# The archive TFDS's cifar10 builder downloads (its checksum is registered in tensorflow-datasets).
CIFAR10_BINARY_URL = 'https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz'
NETWORK_PROBE_TIMEOUT_S = 5.0


@dataclasses.dataclass
class Dataset:
  """Host arrays: uint8 NHWC images and int32 labels for training and evaluation."""

  train_images: np.ndarray
  train_labels: np.ndarray
  eval_images: np.ndarray
  eval_labels: np.ndarray
  eval_split: str  # 'test' or 'validation'
  num_classes: int = NUM_CLASSES  # the labels lie in 0..num_classes - 1; the model's head has this many

  @property
  def num_train(self) -> int:
    return int(self.train_labels.shape[0])

  @property
  def num_eval(self) -> int:
    return int(self.eval_labels.shape[0])


def steps_per_epoch(num_examples: int, batch_size: int, drop_remainder: bool = False) -> int:
  """Steps in an epoch: ceil(N / batch), like torch's drop_last=False, or floor with drop_remainder."""
  if drop_remainder:
    return num_examples // batch_size
  return -(-num_examples // batch_size)


def _check_arrays(images, labels, what: str,
                  num_classes: int = NUM_CLASSES) -> tuple[np.ndarray, np.ndarray]:
  images = np.asarray(images)
  labels = np.asarray(labels)
  if images.ndim == 4 and images.shape[0] == 0:
    raise DataError(f'{what}: has no examples (images of shape (N, 32, 32, 3) with N >= 1)')
  if images.dtype != np.uint8:
    raise DataError(f'{what}: images must be uint8, got {images.dtype}')
  if images.ndim != 4 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE, 3):
    raise DataError(f'{what}: images must have shape (N, 32, 32, 3), got {images.shape}')
  if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
    raise DataError(f'{what}: labels must have shape ({images.shape[0]},), got {labels.shape}')
  if not np.issubdtype(labels.dtype, np.integer):
    raise DataError(f'{what}: labels must be integers, got {labels.dtype}')
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    more = (' (an npz of more classes states its count: np.savez(..., num_classes=100))'
            if num_classes == NUM_CLASSES else '')
    raise DataError(f'{what}: labels must lie in 0..{num_classes - 1} ({num_classes} classes), got '
                    f'{labels.min()}..{labels.max()}{more}')
  return images, labels.astype(np.int32)


def load_npz(path: str) -> dict[str, np.ndarray]:
  """An npz with x_train, y_train and optionally x_test, y_test (uint8 NHWC, integer labels) and
  num_classes (a scalar integer; absent: 10, CIFAR-10's)."""
  if not path:
    raise DataError('data.path: set it to an .npz file with x_train, y_train (and optionally x_test, y_test)')
  if os.path.isdir(path):
    raise DataError(f'data.path: {path!r} is a folder; data.source=npz needs an .npz file with x_train, '
                    'y_train (data.source=cifar10_python reads the cifar-10-batches-py folder)')
  if not os.path.isfile(path):
    raise DataError(f'data.path: no such file {path!r} (an .npz with x_train, y_train)')
  try:  # no pickles: an object array would run code when loaded
    with np.load(path, allow_pickle=False) as f:
      arrays = {k: f[k] for k in f.files}
  except Exception as e:  # a truncated or corrupt zip, a pickled object array, a text file
    raise DataError(f'data.path: cannot read {path!r} as an .npz file of arrays ({type(e).__name__}: '
                    f'{e})') from e
  missing = {'x_train', 'y_train'} - set(arrays)
  if missing:
    raise DataError(f'data.path: {path!r} lacks {sorted(missing)}; it has {sorted(arrays)} '
                    '(expected x_train, y_train and optionally x_test, y_test)')
  num_classes = NUM_CLASSES
  if 'num_classes' in arrays:
    stated = arrays['num_classes']
    if stated.shape != () or not np.issubdtype(stated.dtype, np.integer) or int(stated) < 2:
      raise DataError(f'data.path: {path!r} num_classes must be one integer >= 2 (np.savez(..., '
                      f'num_classes=100)), got {stated.dtype} {stated.shape} {stated.ravel()[:3]}')
    num_classes = int(stated)
  out = {'num_classes': num_classes}
  out['x_train'], out['y_train'] = _check_arrays(arrays['x_train'], arrays['y_train'],
                                                 f'data.path: {path!r} x_train, y_train', num_classes)
  if 'x_test' in arrays or 'y_test' in arrays:
    if not {'x_test', 'y_test'} <= set(arrays):
      raise DataError(f'data.path: {path!r} has only one of x_test, y_test')
    out['x_test'], out['y_test'] = _check_arrays(arrays['x_test'], arrays['y_test'],
                                                 f'data.path: {path!r} x_test, y_test', num_classes)
  return out


class _RefusedGlobal(pickle.UnpicklingError):
  """A pickle names a global that a CIFAR batch never holds."""


class _CifarBatchUnpickler(pickle.Unpickler):
  """Unpickles what a CIFAR batch holds and nothing else.

  `pickle.load` calls whatever a file names (os.system, open, ...), so a crafted file runs code when it
  is read; torchvision reads these files so. A batch is a dict of bytes, str, lists, ints and one numpy
  array: dicts, lists, bytes, str and ints need no global, and the array only these (Python 2 and 3
  pickles, numpy 1 and 2 names). Any other global is refused before it is looked up.
  """

  ALLOWED_GLOBALS = frozenset({
      ('numpy', 'ndarray'), ('numpy', 'dtype'),
      ('numpy.core.multiarray', '_reconstruct'), ('numpy._core.multiarray', '_reconstruct'),
      ('numpy.core.numeric', '_frombuffer'), ('numpy._core.numeric', '_frombuffer'),
      ('_codecs', 'encode'),  # bytes in a protocol-2 pickle written by Python 3
  })

  def find_class(self, module, name):
    if (module, name) not in self.ALLOWED_GLOBALS:
      raise _RefusedGlobal(f'{module}.{name}')
    return super().find_class(module, name)


def _unpickle(path: str) -> dict:
  with open(path, 'rb') as f:
    return _CifarBatchUnpickler(f, encoding='bytes').load()


def _unpickle_checked(path: str) -> dict:
  try:
    return _unpickle(path)
  except _RefusedGlobal as e:
    raise DataError(f'data.path: {path!r} asks to run {e} when unpickled, which a CIFAR batch never does; '
                    'refused (a crafted or foreign file: get the CIFAR folder afresh)') from e
  except Exception as e:
    raise DataError(f'data.path: cannot unpickle {path!r} ({e})') from e


def _pickle_batch(path: str, label_key: bytes = b'labels',
                  num_classes: int = NUM_CLASSES) -> tuple[np.ndarray, np.ndarray]:
  d = _unpickle_checked(path)
  if not isinstance(d, dict) or b'data' not in d or label_key not in d:
    keys = sorted(d) if isinstance(d, dict) else type(d).__name__
    raise DataError(f"data.path: {path!r} must be a dict with b'data' and {label_key!r}, got {keys}")
  data = np.asarray(d[b'data'])
  if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * IMAGE_SIZE * IMAGE_SIZE:
    raise DataError(f"data.path: {path!r} b'data' must be uint8 (N, 3072), got {data.dtype} {data.shape}")
  images = data.reshape(-1, 3, IMAGE_SIZE, IMAGE_SIZE).transpose(0, 2, 3, 1)
  return _check_arrays(np.ascontiguousarray(images), np.asarray(d[label_key]), f'data.path: {path!r}',
                       num_classes)


def load_cifar10_python(path: str) -> dict[str, np.ndarray]:
  """torchvision's `cifar-10-batches-py` folder: pickled data_batch_1..5 and test_batch."""
  if not path or not os.path.isdir(path):
    raise DataError(f'data.path: {path!r} is not a folder; cifar10_python needs the cifar-10-batches-py '
                    'folder (data_batch_1..5, test_batch)')
  names = [f'data_batch_{i}' for i in range(1, 6)]
  missing = [n for n in names + ['test_batch'] if not os.path.isfile(os.path.join(path, n))]
  if missing:
    raise DataError(f'data.path: {path!r} lacks {missing} (expected data_batch_1..5 and test_batch)')
  parts = [_pickle_batch(os.path.join(path, n)) for n in names]
  x_test, y_test = _pickle_batch(os.path.join(path, 'test_batch'))
  return {'x_train': np.concatenate([p[0] for p in parts]),
          'y_train': np.concatenate([p[1] for p in parts]),
          'x_test': x_test, 'y_test': y_test}


CIFAR100_FILES = ('train', 'test')  # cifar-100-python: the pickles; `meta` names the classes
CIFAR100_NUM_CLASSES = 100  # the fine labels


def load_cifar100_python(path: str) -> dict[str, np.ndarray]:
  """The `cifar-100-python` folder: pickled train and test with b'fine_labels' (the 100 classes the
  papers report), b'coarse_labels' and b'data' (rows of 3072 CHW bytes); the class count is the number
  of b'fine_label_names' in `meta` (100 without it)."""
  if not path or not os.path.isdir(path):
    raise DataError(f'data.path: {path!r} is not a folder; cifar100_python needs the cifar-100-python '
                    'folder (train, test, meta)')
  missing = [n for n in CIFAR100_FILES if not os.path.isfile(os.path.join(path, n))]
  if missing:
    raise DataError(f'data.path: {path!r} lacks {missing} (expected train, test and meta)')
  num_classes = CIFAR100_NUM_CLASSES
  meta = os.path.join(path, 'meta')
  if os.path.isfile(meta):
    names = _unpickle_checked(meta)
    if not isinstance(names, dict) or not isinstance(names.get(b'fine_label_names'), list):
      raise DataError(f"data.path: {meta!r} must be a dict with b'fine_label_names' (a list)")
    num_classes = len(names[b'fine_label_names'])
  x_train, y_train = _pickle_batch(os.path.join(path, 'train'), b'fine_labels', num_classes)
  x_test, y_test = _pickle_batch(os.path.join(path, 'test'), b'fine_labels', num_classes)
  return {'x_train': x_train, 'y_train': y_train, 'x_test': x_test, 'y_test': y_test,
          'num_classes': num_classes}


def load_images(path: str) -> dict[str, np.ndarray]:
  """x_train, y_train from a folder of lossless image strips and its manifest (scripts/gpu/gpu_bundle.py).

  Each strip is `count` images stacked vertically (count * 32 x 32 RGB, lossless WebP or PNG); the
  manifest gives each strip's file, sha256, count and labels (one digit an image), and the sha256 of all
  the decoded images, which is checked: what loads is bit for bit what was bundled.
  """
  manifest_path = os.path.join(path, IMAGES_MANIFEST) if path and os.path.isdir(path) else path
  if not manifest_path or not os.path.isfile(manifest_path):
    raise DataError(f'data.path: {path!r} is not a folder with {IMAGES_MANIFEST}; data.source=images reads '
                    'the folder scripts/gpu/gpu_bundle.py writes (.gpu_data)')
  try:
    with open(manifest_path) as f:
      manifest = json.load(f)
  except (OSError, ValueError) as e:
    raise DataError(f'data.path: cannot read {manifest_path!r} as JSON ({e})') from e
  if not isinstance(manifest, dict) or manifest.get('format') != IMAGES_FORMAT:
    raise DataError(f'data.path: {manifest_path!r} is not a {IMAGES_FORMAT} manifest')
  folder = os.path.dirname(manifest_path)
  images, labels = [], []
  for strip in manifest.get('strips', []):
    file = os.path.join(folder, strip['file'])
    try:
      with open(file, 'rb') as f:
        data = f.read()
    except OSError as e:
      raise DataError(f'data.path: cannot read {file!r} ({e})') from e
    if hashlib.sha256(data).hexdigest() != strip['sha256']:
      raise DataError(f'data.path: {file!r} differs from its sha256 in the manifest (a partial copy?)')
    try:
      with Image.open(io.BytesIO(data)) as image:
        pixels = np.asarray(image.convert('RGB'))
    except Exception as e:  # Pillow without WebP, a truncated file
      raise DataError(f'data.path: Pillow cannot decode {file!r} ({e})') from e
    count = int(strip['count'])
    if pixels.shape != (count * IMAGE_SIZE, IMAGE_SIZE, 3) or len(strip['labels']) != count:
      raise DataError(f'data.path: {file!r} holds {pixels.shape} pixels and {len(strip["labels"])} labels, '
                      f'the manifest says {count} images of 32x32')
    images.append(pixels.reshape(count, IMAGE_SIZE, IMAGE_SIZE, 3))
    labels.append(np.frombuffer(strip['labels'].encode('ascii'), np.uint8) - ord('0'))
  if not images:
    raise DataError(f'data.path: {manifest_path!r} lists no image strips')
  x_train, y_train = _check_arrays(np.concatenate(images), np.concatenate(labels), f'data.path: {path!r}')
  if hashlib.sha256(x_train.tobytes()).hexdigest() != manifest.get('images_sha256'):
    raise DataError(f'data.path: the images decoded from {path!r} differ from the bundled ones '
                    '(images_sha256 in the manifest)')
  return {'x_train': x_train, 'y_train': y_train}


def make_synthetic(num_train: int, num_eval: int, seed: int = 0,
                   num_classes: int = NUM_CLASSES) -> dict[str, np.ndarray]:
  """Images whose label is learnable: a smooth per-class colour pattern plus noise."""
  rng = np.random.default_rng(seed)
  coarse = rng.uniform(0.0, 1.0, (num_classes, 4, 4, 3))
  templates = np.repeat(np.repeat(coarse, 8, axis=1), 8, axis=2)  # (classes, 32, 32, 3)

  def draw(n):
    labels = rng.integers(0, num_classes, n)
    noise = rng.uniform(0.0, 1.0, (n, IMAGE_SIZE, IMAGE_SIZE, 3))
    images = 0.7 * templates[labels] + 0.3 * noise
    return (images * 255).round().astype(np.uint8), labels.astype(np.int32)

  x_train, y_train = draw(num_train)
  x_test, y_test = draw(num_eval)
  return {'x_train': x_train, 'y_train': y_train, 'x_test': x_test, 'y_test': y_test,
          'num_classes': num_classes}


def _read_cifar10_binary(folder: str, name: str = 'cifar10') -> dict[str, np.ndarray]:
  """Parses the official binary files (`cifar-10-batches-bin`, `cifar-100-binary`): records of the label
  bytes (CIFAR-100: coarse, fine) + 3072 CHW bytes (`TFDS_DATASETS[name]`)."""
  info = TFDS_DATASETS[name]
  size = info['label_bytes'] + 3 * IMAGE_SIZE * IMAGE_SIZE

  def read(names):
    records = []
    for file in names:
      raw = np.fromfile(os.path.join(folder, file), dtype=np.uint8)
      if raw.size % size:
        raise DataError(f'{folder}/{file}: size {raw.size} is not a multiple of {size}-byte records')
      records.append(raw.reshape(-1, size))
    records = np.concatenate(records)
    images = records[:, info['label_bytes']:].reshape(-1, 3, IMAGE_SIZE, IMAGE_SIZE).transpose(0, 2, 3, 1)
    return _check_arrays(np.ascontiguousarray(images), records[:, info['label_byte']].astype(np.int32),
                         folder, info['num_classes'])

  x_train, y_train = read(info['train_files'])
  x_test, y_test = read(info['test_files'])
  return {'x_train': x_train, 'y_train': y_train, 'x_test': x_test, 'y_test': y_test,
          'num_classes': info['num_classes']}


def _default_tfds_dir(data_dir: str) -> str:
  if data_dir:
    return os.path.expanduser(data_dir)
  return os.path.expanduser(os.environ.get('TFDS_DATA_DIR', '~/tensorflow_datasets'))


def _probe_network(url: str, root: str, timeout: float = NETWORK_PROBE_TIMEOUT_S,
                   name: str = 'cifar10') -> None:
  """Fails within seconds when the archive's host cannot be reached (TFDS would retry for minutes)."""
  host = url.split('/')[2]
  try:
    socket.create_connection((host, 443), timeout=timeout).close()
  except OSError as e:
    raise DataError(
        f'data.source=tfds: {name} is not prepared in {root} and {host} cannot be reached '
        f'({e}). Offline, choose another source: {OTHER_SOURCES}.') from e


def _import_tfds():
  """tensorflow_datasets, or a DataError naming the sources that do without it."""
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise DataError('data.source=tfds needs tensorflow_datasets, which is not installed '
                    f'(pip install tensorflow-datasets); or choose another source: {OTHER_SOURCES}') from e
  return tfds


def _download_archive(data_dir: str, url: str) -> str:
  """Downloads and extracts the official binary archive through TFDS's download manager."""
  tfds = _import_tfds()
  manager = tfds.download.DownloadManager(download_dir=os.path.join(data_dir, 'downloads'))
  return os.fspath(manager.download_and_extract(url))


def _find_binary_folder(root: str, name: str = 'cifar10') -> str | None:
  info = TFDS_DATASETS[name]
  for dirpath, _, files in os.walk(root):
    if info['train_files'][0] in files and info['test_files'][0] in files:
      return dirpath
  return None


def _archive_url(name: str) -> str:
  return CIFAR10_BINARY_URL if name == 'cifar10' else TFDS_DATASETS[name]['url']


def load_tfds(data_dir: str, name: str = 'cifar10') -> dict[str, np.ndarray]:
  """TFDS's `name` (cifar10, cifar100): a prepared TFDS copy if present, else the official archive via
  TFDS's downloader.

  `tfds.load` needs TensorFlow, which this project does not install. A dataset already prepared as
  array_record is read through `tfds.data_source`; otherwise the archive the cifar10 builder uses is fetched
  with TFDS's download manager (checksum-verified), parsed with numpy, and cached as an npz in `data_dir`.
  The class count is the `label` ClassLabel's (CIFAR-100: the 100 fine labels).
  """
  if name not in TFDS_DATASETS:
    raise DataError(f'data.tfds_name must be one of {sorted(TFDS_DATASETS)}, got {name!r}')
  root = _default_tfds_dir(data_dir)
  cache = os.path.join(root, f'{name}_jax', f'{name}.npz')
  if os.path.isfile(cache):
    try:
      return load_npz(cache)
    except DataError as e:
      raise DataError(f'data.source=tfds: the cached copy {cache} is unusable ({e}); delete it to '
                      'prepare it again') from e
  tfds = _import_tfds()
  try:
    sources = {split: tfds.data_source(name, split=split, data_dir=root, download=False)
               for split in ('train', 'test')}
  except Exception:  # not prepared (or not as array_record): fetch the archive below
    sources = None
  if sources is not None:
    num_classes = int(sources['train'].dataset_info.features['label'].num_classes)
    out = {'num_classes': num_classes}
    for split, source in sources.items():
      examples = [source[i] for i in range(len(source))]
      images = np.stack([np.asarray(ex['image']) for ex in examples]).astype(np.uint8)
      labels = np.asarray([int(ex['label']) for ex in examples], np.int32)
      out[f'x_{split}'], out[f'y_{split}'] = _check_arrays(images, labels, f'tfds {name} {split}',
                                                           num_classes)
    return out

  url = _archive_url(name)
  _probe_network(url, root, name=name)
  extracted = _download_archive(root, url)
  folder = _find_binary_folder(extracted, name)
  if folder is None:
    raise DataError(f'data.source=tfds: no {name} binary files ({TFDS_DATASETS[name]["train_files"][0]}) '
                    f'under {extracted!r}')
  arrays = _read_cifar10_binary(folder, name)
  os.makedirs(os.path.dirname(cache), exist_ok=True)
  tmp = cache + '.tmp.npz'
  np.savez(tmp, **arrays)  # num_classes stated in the file
  os.replace(tmp, cache)
  return arrays


def load_dataset(data_config, seed: int = 0) -> Dataset:
  """Loads `data_config.source` and splits off `validation_size` examples from the end of train."""
  source = data_config.source
  if source == 'npz':
    arrays = load_npz(data_config.path)
  elif source == 'cifar10_python':
    arrays = load_cifar10_python(data_config.path)
  elif source == 'cifar100_python':
    arrays = load_cifar100_python(data_config.path)
  elif source == 'images':
    arrays = load_images(data_config.path)
  elif source == 'tfds':
    arrays = load_tfds(data_config.data_dir, data_config.get('tfds_name', 'cifar10'))
  elif source == 'synthetic':
    synthetic_seed = data_config.get('synthetic_seed', -1)
    arrays = make_synthetic(data_config.synthetic_train_size, data_config.synthetic_eval_size,
                            seed if synthetic_seed < 0 else synthetic_seed,
                            data_config.get('synthetic_num_classes', NUM_CLASSES))
  else:
    raise DataError(f'data.source must be one of {list(SOURCES)}, got {source!r}')

  x_train, y_train = arrays['x_train'], arrays['y_train']
  num_classes = int(arrays.get('num_classes', NUM_CLASSES))
  n_val = int(data_config.validation_size)
  if n_val > 0:
    if n_val >= x_train.shape[0]:
      raise DataError(f'data.validation_size={n_val} must be below the training set size {x_train.shape[0]}')
    return Dataset(x_train[:-n_val], y_train[:-n_val], x_train[-n_val:], y_train[-n_val:], 'validation',
                   num_classes)
  if 'x_test' not in arrays:
    raise DataError(f'data.source={source}: the data has no test set (x_test, y_test); '
                    'set data.validation_size > 0 to hold out a validation split from the training set')
  return Dataset(x_train, y_train, arrays['x_test'], arrays['y_test'], 'test', num_classes)


# On-device batching and augmentation -------------------------------------------------------------------


def epoch_permutation(key: jax.Array, epoch, num_examples: int) -> jax.Array:
  """The shuffled order of an epoch, a function of the data key and the epoch."""
  return jax.random.permutation(jax.random.fold_in(key, epoch), num_examples)


def batch_key(key: jax.Array, epoch, step_in_epoch) -> jax.Array:
  """The augmentation key of one batch, a function of the data key, epoch and step."""
  return jax.random.fold_in(jax.random.fold_in(key, epoch), step_in_epoch)


def random_crop_flip(images: jax.Array, key: jax.Array) -> jax.Array:
  """RandomCrop(32, padding=4) with zero padding, then RandomHorizontalFlip(0.5), on uint8 NHWC."""
  crop_key, flip_key = jax.random.split(key)
  n = images.shape[0]
  padded = jnp.pad(images, ((0, 0), (PAD, PAD), (PAD, PAD), (0, 0)))
  offsets = jax.random.randint(crop_key, (n, 2), 0, 2 * PAD + 1)
  crop = lambda img, o: jax.lax.dynamic_slice(img, (o[0], o[1], 0), (IMAGE_SIZE, IMAGE_SIZE, 3))
  images = jax.vmap(crop)(padded, offsets)
  flip = jax.random.bernoulli(flip_key, 0.5, (n,))
  return jnp.where(flip[:, None, None, None], images[:, :, ::-1, :], images)


def normalize(images: jax.Array, normalization: str = 'cifar10') -> jax.Array:
  """ToTensor + Normalize(mean, std) of `NORMALIZATIONS[normalization]`, in float32, NHWC."""
  mean, std = NORMALIZATIONS[normalization]
  x = images.astype(jnp.float32) / 255.0
  return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def get_train_batch(images, labels, perm, start, size: int, key, augment: bool = True,
                    normalization: str = 'cifar10'):
  """The batch at positions [start, start + size) of the epoch's order, augmented and normalised."""
  idx = jax.lax.dynamic_slice_in_dim(perm, start, size)
  x = jnp.take(images, idx, axis=0)
  y = jnp.take(labels, idx, axis=0)
  if augment:
    x = random_crop_flip(x, key)
  return normalize(x, normalization), y
