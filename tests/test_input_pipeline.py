"""Data sources on small files the tests write, and the on-device augmentation."""

import hashlib
import io
import json
import os
import pickle
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image
import pytest

from cifar_jax import input_pipeline as ip


def _data_config(**kwargs):
  config = ml_collections.ConfigDict(dict(
      source='npz', data_dir='', path='', validation_size=0, drop_remainder=False, augment=True,
      synthetic_train_size=64, synthetic_eval_size=16))
  config.update(kwargs)
  return config


def _images(n, seed=0):
  rng = np.random.default_rng(seed)
  return rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, n)


def test_steps_per_epoch_like_torch_drop_last_false():
  assert ip.steps_per_epoch(50000, 128) == 391  # the blog's 391 steps, last batch of 80
  assert ip.steps_per_epoch(50000, 128, drop_remainder=True) == 390
  assert ip.steps_per_epoch(256, 128) == 2


def test_npz_source_and_validation_split(tmp_path):
  x, y = _images(30)
  xt, yt = _images(10, seed=1)
  path = tmp_path / 'd.npz'
  np.savez(path, x_train=x, y_train=y.astype(np.uint8), x_test=xt, y_test=yt)
  data = ip.load_dataset(_data_config(path=str(path)))
  assert data.eval_split == 'test' and data.num_train == 30 and data.num_eval == 10
  np.testing.assert_array_equal(data.train_images, x)
  assert data.train_labels.dtype == np.int32
  data = ip.load_dataset(_data_config(path=str(path), validation_size=5))
  assert data.eval_split == 'validation' and data.num_train == 25
  np.testing.assert_array_equal(data.eval_images, x[-5:])
  np.testing.assert_array_equal(data.eval_labels, y[-5:])


def test_npz_without_test_set_needs_validation_split(tmp_path):
  x, y = _images(20)
  path = tmp_path / 'train_only.npz'
  np.savez(path, x_train=x, y_train=y)
  with pytest.raises(ip.DataError, match='validation_size'):
    ip.load_dataset(_data_config(path=str(path)))
  assert ip.load_dataset(_data_config(path=str(path), validation_size=4)).num_eval == 4


@pytest.mark.parametrize('arrays, message', [
    (dict(x=1), 'lacks'),
    (dict(x_train=np.zeros((4, 32, 32, 3), np.float32), y_train=np.zeros(4, int)), 'uint8'),
    (dict(x_train=np.zeros((4, 28, 28, 3), np.uint8), y_train=np.zeros(4, int)), 'shape'),
    (dict(x_train=np.zeros((4, 32, 32, 3), np.uint8), y_train=np.full(4, 10)), '0..9'),
])
def test_npz_errors_name_the_problem(tmp_path, arrays, message):
  path = tmp_path / 'bad.npz'
  np.savez(path, **arrays)
  with pytest.raises(ip.DataError, match=message):
    ip.load_npz(str(path))
  with pytest.raises(ip.DataError, match='no such file'):
    ip.load_npz(str(tmp_path / 'missing.npz'))


def test_cifar10_python_pickles(tmp_path):
  folder = tmp_path / 'cifar-10-batches-py'
  folder.mkdir()
  expected = []
  for i, name in enumerate([f'data_batch_{k}' for k in range(1, 6)] + ['test_batch']):
    x, y = _images(4, seed=i)
    expected.append((x, y))
    chw = x.transpose(0, 3, 1, 2).reshape(4, -1)  # torchvision's layout: rows of CHW bytes
    batch = {b'batch_label': f'{name} of 5'.encode(), b'labels': list(map(int, y)), b'data': chw,
             b'filenames': [f'{k}.png'.encode() for k in range(4)]}
    if i % 2:  # a Python 3 pickle (protocol 5: numpy 2's _frombuffer)
      blob = pickle.dumps(batch)
    else:  # as the files from the CIFAR site: protocol 2, numpy 1's names (bytes via _codecs here)
      blob = pickle.dumps(batch, protocol=2).replace(b'numpy._core.multiarray', b'numpy.core.multiarray')
    (folder / name).write_bytes(blob)
  data = ip.load_dataset(_data_config(source='cifar10_python', path=str(folder)))
  np.testing.assert_array_equal(data.train_images, np.concatenate([e[0] for e in expected[:5]]))
  np.testing.assert_array_equal(data.train_labels, np.concatenate([e[1] for e in expected[:5]]))
  np.testing.assert_array_equal(data.eval_images, expected[5][0])
  os.remove(folder / 'data_batch_3')
  with pytest.raises(ip.DataError, match='data_batch_3'):
    ip.load_cifar10_python(str(folder))


def test_cifar10_binary_archive_parser(tmp_path):
  """The format of the official archive that the tfds source downloads."""
  expected = {}
  for i, name in enumerate([f'data_batch_{k}.bin' for k in range(1, 6)] + ['test_batch.bin']):
    x, y = _images(3, seed=i)
    expected[name] = (x, y)
    records = np.concatenate([y[:, None].astype(np.uint8), x.transpose(0, 3, 1, 2).reshape(3, -1)], 1)
    records.tofile(tmp_path / name)
  arrays = ip._read_cifar10_binary(str(tmp_path))
  np.testing.assert_array_equal(arrays['x_test'], expected['test_batch.bin'][0])
  np.testing.assert_array_equal(arrays['y_train'][:3], expected['data_batch_1.bin'][1])
  assert arrays['x_train'].shape == (15, 32, 32, 3)


def test_tfds_source_with_mock_data(tmp_path):
  tfds = pytest.importorskip('tensorflow_datasets')
  with tfds.testing.mock_data(num_examples=12):
    data = ip.load_dataset(_data_config(source='tfds', data_dir=str(tmp_path)))
  assert data.train_images.shape == (12, 32, 32, 3) and data.train_images.dtype == np.uint8
  assert data.eval_split == 'test' and data.num_eval == 12
  assert data.train_labels.min() >= 0 and data.train_labels.max() <= 9


def test_tfds_offline_fails_fast(tmp_path, monkeypatch):
  pytest.importorskip('tensorflow_datasets')
  # An address that never resolves stands for "offline"; the real host is never contacted.
  monkeypatch.setattr(ip, 'CIFAR10_BINARY_URL', 'https://cifar.invalid/cifar-10-binary.tar.gz')
  start = time.time()
  with pytest.raises(ip.DataError, match='data.source=npz'):
    ip.load_dataset(_data_config(source='tfds', data_dir=str(tmp_path)))
  assert time.time() - start < 15


def test_tfds_missing_names_the_other_sources(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, 'tensorflow_datasets', None)  # `import tensorflow_datasets` fails
  with pytest.raises(ip.DataError) as e:
    ip.load_dataset(_data_config(source='tfds', data_dir=str(tmp_path)))
  message = str(e.value)
  assert 'tensorflow_datasets' in message and '\n' not in message
  for source in ('npz', 'cifar10_python', 'images', 'synthetic'):
    assert f'--config.data.source={source}' in message
  # A copy TFDS prepared before (the cached npz) still loads without it.
  x, y = _images(12)
  os.makedirs(tmp_path / 'cifar10_jax')
  np.savez(tmp_path / 'cifar10_jax' / 'cifar10.npz', x_train=x, y_train=y, x_test=x[:4], y_test=y[:4])
  assert ip.load_dataset(_data_config(source='tfds', data_dir=str(tmp_path))).num_train == 12


def test_default_config_without_tfds_fails_with_one_line(tmp_path):
  blocker = tmp_path / 'blocker'
  blocker.mkdir()
  (blocker / 'tensorflow_datasets.py').write_text("raise ImportError('no tensorflow_datasets here')\n")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             PYTHONPATH=os.pathsep.join([str(blocker), root, os.environ.get('PYTHONPATH', '')]))
  proc = subprocess.run(
      [sys.executable, '-m', 'cifar_jax.main', f'--config={root}/configs/default.py',
       f'--workdir={tmp_path / "run"}', f'--config.data.data_dir={tmp_path / "tfds"}'],
      cwd=root, env=env, capture_output=True, text=True, timeout=120, check=False)
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert 'Traceback' not in proc.stderr
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith('cifar-jax: error: data.source=tfds needs tensorflow_datasets'), last
  assert '--config.data.source=images' in last and '--config.data.source=synthetic' in last


def _write_strip(folder, images, labels, **changes):
  """A one-strip bundle written by hand (scripts/gpu/gpu_bundle.py writes real ones)."""
  buffer = io.BytesIO()
  Image.fromarray(images.reshape(-1, 32, 3)).save(buffer, format='PNG')
  data = buffer.getvalue()
  (folder / 'train_0000.png').write_bytes(data)
  strip = {'file': 'train_0000.png', 'count': len(images), 'sha256': hashlib.sha256(data).hexdigest(),
           'labels': ''.join(map(str, labels))}
  manifest = {'format': ip.IMAGES_FORMAT, 'images_sha256': hashlib.sha256(images.tobytes()).hexdigest(),
              'strips': [strip], **changes}
  (folder / ip.IMAGES_MANIFEST).write_text(json.dumps(manifest))


def test_images_source_reads_a_bundle_and_checks_it(tmp_path):
  x, y = _images(20)
  _write_strip(tmp_path, x, y)
  data = ip.load_dataset(_data_config(source='images', path=str(tmp_path), validation_size=5))
  np.testing.assert_array_equal(data.train_images, x[:15])
  np.testing.assert_array_equal(data.eval_labels, y[15:])
  assert data.eval_split == 'validation' and data.train_labels.dtype == np.int32
  with pytest.raises(ip.DataError, match='validation_size'):  # a bundle has no test set
    ip.load_dataset(_data_config(source='images', path=str(tmp_path)))
  _write_strip(tmp_path, x, y, images_sha256='0' * 64)
  with pytest.raises(ip.DataError, match='differ from the bundled'):
    ip.load_images(str(tmp_path))
  _write_strip(tmp_path, x, y)
  (tmp_path / 'train_0000.png').write_bytes(b'truncated')
  with pytest.raises(ip.DataError, match='sha256'):
    ip.load_images(str(tmp_path))
  with pytest.raises(ip.DataError, match='manifest.json'):
    ip.load_images(str(tmp_path / 'nowhere'))


def test_synthetic_is_deterministic():
  a = ip.load_dataset(_data_config(source='synthetic'), seed=3)
  b = ip.load_dataset(_data_config(source='synthetic'), seed=3)
  np.testing.assert_array_equal(a.train_images, b.train_images)
  assert a.num_train == 64 and a.num_eval == 16


def test_random_crop_stays_in_bounds_and_flip():
  x, _ = _images(64)
  out = np.asarray(ip.random_crop_flip(jnp.asarray(x), jax.random.PRNGKey(0)))
  padded = np.pad(x, ((0, 0), (4, 4), (4, 4), (0, 0)))
  flips = 0
  for i in range(64):
    windows = [(padded[i, r:r + 32, c:c + 32], f) for r in range(9) for c in range(9)
               for f in (False, True)]
    match = [f for w, f in windows if np.array_equal(out[i], w[:, ::-1] if f else w)]
    assert match, f'image {i} is not a padded 32x32 crop (flipped or not)'
    flips += match[0]
  assert 10 < flips < 54  # p = 0.5


def test_batch_regenerated_from_seed_epoch_step():
  x, y = _images(100)
  key = jax.random.PRNGKey(7)
  perm = ip.epoch_permutation(key, 3, 100)
  np.testing.assert_array_equal(np.sort(np.asarray(perm)), np.arange(100))
  assert not np.array_equal(perm, ip.epoch_permutation(key, 4, 100))
  batch = lambda epoch, step: ip.get_train_batch(jnp.asarray(x), jnp.asarray(y), perm, 32 * step, 32,
                                                 ip.batch_key(key, epoch, step))
  a, b, c = batch(3, 1), batch(3, 1), batch(3, 2)
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_array_equal(a[1], y[np.asarray(perm[32:64])])
  assert not np.array_equal(a[0], c[0])


def test_normalize_matches_torch_transforms():
  x = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
  expected = (x / 255.0 - np.array(ip.MEAN_RGB)) / np.array(ip.STD_RGB)
  np.testing.assert_allclose(ip.normalize(jnp.asarray(x)), expected, rtol=1e-5, atol=1e-6)
