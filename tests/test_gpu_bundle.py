"""scripts/gpu/gpu_bundle.py: lossless image strips that the trainer's `images` source reads back bit for
bit."""

import json
import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from cifar_jax import input_pipeline as ip

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'scripts', 'gpu'))
import gpu_bundle  # pylint: disable=g-import-not-at-top,wrong-import-position

NPZ = gpu_bundle.DEFAULT_NPZ


def _hard_images(n: int) -> tuple[np.ndarray, np.ndarray]:
  """Noise, flat images (black, white, one colour), gradients and CIFAR-like synthetic ones."""
  rng = np.random.default_rng(0)
  parts = [rng.integers(0, 256, (n // 4, 32, 32, 3), dtype=np.uint8),
           np.zeros((2, 32, 32, 3), np.uint8), np.full((2, 32, 32, 3), 255, np.uint8),
           np.broadcast_to(np.array([12, 200, 77], np.uint8), (2, 32, 32, 3)),
           np.broadcast_to(np.arange(32, dtype=np.uint8)[None, :, None, None] * 8, (4, 32, 32, 3))]
  rest = n - sum(len(p) for p in parts)
  parts.append(ip.make_synthetic(rest, 1)['x_train'])
  images = np.ascontiguousarray(np.concatenate(parts))
  return images, rng.integers(0, 10, n).astype(np.uint8)


def _round_trip(images, labels, out, budget=10**8, **kwargs):
  manifest = gpu_bundle.write_images(images, labels, str(out), budget, {'test': True}, workers=1, **kwargs)
  arrays = ip.load_images(str(out))
  n = manifest['count']
  np.testing.assert_array_equal(arrays['x_train'], images[:n])
  np.testing.assert_array_equal(arrays['y_train'], labels[:n])
  return manifest


def test_made_images_round_trip_bit_exactly(tmp_path):
  images, labels = _hard_images(300)
  manifest = _round_trip(images, labels, tmp_path / 'data', strip=128)
  assert manifest['count'] == 300 and [s['count'] for s in manifest['strips']] == [128, 128, 44]
  assert {s['format'] for s in manifest['strips']} == {'webp'}  # lossless WebP was exact for every strip


def test_labels_of_more_than_ten_classes_are_refused(tmp_path):
  """The manifest holds one digit a label: a CIFAR-100 npz is refused, not written wrong."""
  images, labels = _hard_images(40)
  labels[3] = 57
  with pytest.raises(SystemExit, match='labels 0..57: a bundle holds CIFAR-10'):
    gpu_bundle.write_images(images, labels, str(tmp_path / 'data'), 10**8, {'test': True}, workers=1)


@pytest.mark.skipif(not os.path.isfile(NPZ), reason=f'no {NPZ}')
def test_cifar10_images_round_trip_bit_exactly(tmp_path):
  with np.load(NPZ, allow_pickle=False) as f:
    images, labels = f['x_train'][:300], f['y_train'][:300]
  manifest = _round_trip(images, labels, tmp_path / 'data')
  assert manifest['count'] == 300
  assert sum(s['bytes'] for s in manifest['strips']) < 300 * 1800  # about 1,650 bytes an image


def test_the_budget_keeps_the_first_images_that_fit(tmp_path):
  images, labels = _hard_images(200)
  budget = 120_000  # noise takes about 3 kB an image: not all 200 fit
  manifest = _round_trip(images, labels, tmp_path / 'data', budget=budget, strip=64)
  assert 0 < manifest['count'] < 200
  files = os.listdir(tmp_path / 'data')
  assert sum(os.path.getsize(tmp_path / 'data' / f) for f in files) <= budget
  assert len(files) == len(manifest['strips']) + 1  # the strips and manifest.json


def test_a_strip_webp_would_change_is_stored_as_png(tmp_path, monkeypatch):
  lossy = dict(format='WEBP', lossless=False, quality=50)
  monkeypatch.setattr(gpu_bundle, 'FORMATS', (('webp', lossy), ('png', gpu_bundle.PNG)))
  images, labels = _hard_images(40)
  manifest = _round_trip(images, labels, tmp_path / 'data')
  assert [s['format'] for s in manifest['strips']] == ['png']


def test_the_command_line_writes_a_bundle_the_trainer_reads(tmp_path):
  out = tmp_path / 'gpu_data'
  proc = subprocess.run([sys.executable, os.path.join(ROOT, 'scripts', 'gpu', 'gpu_bundle.py'), '--no_wheels',
                         '--synthetic=300', f'--data_dir={out}', f'--wheel_dir={tmp_path / "whl"}',
                         '--budget_mib=2'],
                        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert 'round trip bit-exact' in proc.stdout and 'carry:' in proc.stdout
  manifest = json.loads((out / ip.IMAGES_MANIFEST).read_text())
  assert manifest['count'] == 300 and manifest['source'] == {'synthetic': 300, 'seed': 0}
  config = ml_collections.ConfigDict(dict(source='images', path=str(out), data_dir='', validation_size=50,
                                          drop_remainder=False, augment=True))
  data = ip.load_dataset(config)
  assert (data.num_train, data.num_eval, data.eval_split) == (250, 50, 'validation')
