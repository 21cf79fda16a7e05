"""CIFAR-10-C corruptions (cifar_jax/corruptions.py) against make_cifar_c.py's output on real images, their
determinism, severity ordering, the cache of generated sets and the reader of the released files."""

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cifar_jax import corruptions
from cifar_jax.errors import DataError

# scripts/maintainers/corruption_fixture.py: the reference script's output for each (corruption, severity)
# on one of 6 CIFAR-10 training images, numpy's global RandomState seeded with the case's seed.
FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures', 'cifar10_c_reference.npz')
# Their mean distance to the clean image does not grow with every severity step: by the script's CIFAR
# constants (saturate desaturates at 1-2 and saturates at 3-5; elastic's largest affine jitter is at 1;
# frost and spatter trade the image's weight against the texture's; glass blur's sigma falls from 3 to 4
# while its passes double). Their severity 5 is still farther than severity 1, except elastic_transform.
NOT_MONOTONE = ('glass_blur', 'frost', 'elastic_transform', 'spatter', 'saturate')


class LegacyDraws:
  """numpy's legacy RandomState under the Generator's names: the reference script's draws."""

  def __init__(self, seed: int):
    self.state = np.random.RandomState(seed)

  def normal(self, *args, **kwargs):
    return self.state.normal(*args, **kwargs)

  def uniform(self, *args, **kwargs):
    return self.state.uniform(*args, **kwargs)

  def poisson(self, *args, **kwargs):
    return self.state.poisson(*args, **kwargs)

  def integers(self, *args, **kwargs):
    return self.state.randint(*args, **kwargs)


@pytest.fixture(scope='module')
def reference():
  with np.load(FIXTURE, allow_pickle=False) as f:
    return {key: f[key] for key in f.files}


@pytest.mark.parametrize('name', corruptions.CORRUPTIONS)
def test_each_corruption_equals_the_reference_script(reference, name):
  c = list(reference['names']).index(name)
  for severity in corruptions.SEVERITIES:
    seed = int(reference['seeds'][c, severity - 1])
    image = reference['images'][reference['image_index'][c, severity - 1]]
    # impulse noise: scikit-image's random_noise(rng=seed) draws from default_rng(seed)
    rng = np.random.default_rng(seed) if name == 'impulse_noise' else LegacyDraws(seed)
    out = corruptions.apply(name, image[None], severity, [corruptions.draw(name, rng, severity, image)])
    np.testing.assert_array_equal(out[0], reference['outputs'][c, severity - 1],
                                  err_msg=f'{name} severity {severity}')


def test_batches_give_the_images_one_at_a_time_give(reference, monkeypatch):
  """Any split of the images, by the caller or by `apply`'s chunks (CHUNK), gives the same images."""
  images = reference['images']
  for name in corruptions.CORRUPTIONS:
    whole = corruptions.corrupt(images, name, 3, seed=7)
    parts = np.concatenate([corruptions.corrupt(images[:2], name, 3, seed=7),
                            corruptions.corrupt(images[2:], name, 3, seed=7, first_index=2)])
    np.testing.assert_array_equal(whole, parts, err_msg=name)
    with monkeypatch.context() as m:
      m.setattr(corruptions, 'CHUNK', 4)
      np.testing.assert_array_equal(corruptions.corrupt(images, name, 3, seed=7), whole, err_msg=name)


def test_deterministic_uint8_and_in_range(reference):
  images = reference['images'][:3]
  random = ('gaussian_noise', 'glass_blur', 'snow', 'frost', 'fog', 'elastic_transform', 'spatter')
  for name in corruptions.CORRUPTIONS:
    a = corruptions.corrupt(images, name, 2, seed=1)
    assert a.dtype == np.uint8 and a.shape == images.shape, name
    np.testing.assert_array_equal(a, corruptions.corrupt(images, name, 2, seed=1), err_msg=name)
    if name in random:
      assert not np.array_equal(a, corruptions.corrupt(images, name, 2, seed=2)), name


def test_severity_ordering(reference):
  images = reference['images']
  for name in corruptions.CORRUPTIONS:
    distance = [np.mean(np.abs(corruptions.corrupt(images, name, s).astype(float) - images))
                for s in corruptions.SEVERITIES]
    assert distance[0] > 0, name
    if name in NOT_MONOTONE:
      if name != 'elastic_transform':
        assert distance[-1] > distance[0], (name, distance)
    else:
      assert all(np.diff(distance) > 0), (name, distance)


def test_unknown_names_and_shapes():
  images = np.zeros((2, 32, 32, 3), np.uint8)
  with pytest.raises(ValueError, match='unknown corruption'):
    corruptions.corrupt(images, 'rain', 1)
  with pytest.raises(ValueError, match='severity'):
    corruptions.corrupt(images, 'fog', 6)
  with pytest.raises(ValueError, match=r'\(N, 32, 32, 3\)'):
    corruptions.corrupt(np.zeros((2, 28, 28, 3), np.uint8), 'fog', 1)


def test_the_cache_is_reused_and_a_new_source_makes_a_new_set(reference, tmp_path, monkeypatch):
  images = reference['images'][:2]
  first = corruptions.corrupted_set(images, 'fog', 2, seed=0, cache_dir=str(tmp_path))
  files = sorted(os.listdir(tmp_path))
  assert len(files) == 1 and files[0].endswith('.npz')
  calls = []
  original = corruptions.corrupt
  monkeypatch.setattr(corruptions, 'corrupt', lambda *a, **k: calls.append(a) or original(*a, **k))
  np.testing.assert_array_equal(corruptions.corrupted_set(images, 'fog', 2, cache_dir=str(tmp_path)), first)
  assert not calls  # read back
  other = images.copy()
  other[0, 0, 0, 0] ^= 1
  corruptions.corrupted_set(other, 'fog', 2, cache_dir=str(tmp_path))
  assert len(calls) == 1 and len(os.listdir(tmp_path)) == 2  # another source: generated, its own file
  corruptions.corrupted_set(images, 'fog', 3, cache_dir=str(tmp_path))
  assert len(calls) == 2  # another severity
  with open(os.path.join(tmp_path, files[0]), 'wb') as f:  # a damaged file is made again
    f.write(b'not an npz')
  np.testing.assert_array_equal(corruptions.corrupted_set(images, 'fog', 2, cache_dir=str(tmp_path)), first)
  assert len(calls) == 3


def test_released_files_are_read_by_severity_and_checked(tmp_path):
  n = 4
  images = np.arange(5 * n * 32 * 32 * 3, dtype=np.int64).reshape(5 * n, 32, 32, 3).astype(np.uint8)
  labels = np.array([3, 1, 4, 1])
  np.save(tmp_path / 'fog.npy', images)
  np.save(tmp_path / 'labels.npy', np.tile(labels, 5).astype(np.uint8))
  released = corruptions.ReleasedSets(str(tmp_path), n)
  released.check_labels(labels)
  np.testing.assert_array_equal(released.images('fog', 3), images[2 * n:3 * n])
  with pytest.raises(DataError, match='not the evaluation set'):
    released.check_labels(np.array([0, 0, 0, 0]))
  with pytest.raises(DataError, match='not found'):
    released.images('snow', 1)
  np.save(tmp_path / 'snow.npy', images[:n])
  with pytest.raises(DataError, match=r'expected uint8 images of shape \(20, 32, 32, 3\)'):
    released.images('snow', 1)
  (tmp_path / 'frost.npy').write_bytes(b'\x93NUMPY garbage')
  with pytest.raises(DataError, match='not a readable .npy file'):
    released.images('frost', 1)
