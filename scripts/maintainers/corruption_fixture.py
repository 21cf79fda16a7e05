"""Writes tests/fixtures/cifar10_c_reference.npz: the reference CIFAR-10-C script's output on a few real
images, with the seed of its random draws, for tests/test_corruptions.py.

The reference is `ImageNet-C/create_c/make_cifar_c.py` of hendrycks/robustness, kept outside this
repository (its code is not copied in) and patched for today's libraries only where it no longer runs:
`multichannel=True` -> `channel_axis=-1` (scikit-image >= 0.19), `np.float_` -> `np.float64` and
`np.fromstring` -> `np.frombuffer` (numpy 2), `scipy.ndimage.interpolation` -> `scipy.ndimage`, the frost
files read from a folder given here, and the data loading and saving at its end removed. It needs
opencv-python-headless, scikit-image, Wand and ImageMagick (Debian: libmagickwand-dev).

Each (corruption, severity) runs on one of the images with numpy's global RandomState seeded with the
case's seed (the script's draws: np.random.normal, uniform, randint, poisson), and scikit-image's
`random_noise` (impulse noise) given `rng=seed`; the test replays the same draws from the seed.

  python scripts/maintainers/corruption_fixture.py --reference /tmp/ref/ref_patched.py \
      --frost_dir /tmp/ref/ic/imagecorruptions/frost --data ../shared/data/cifar10/cifar10_train.npz
"""

import argparse
import functools
import importlib.util
import os
import sys

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from cifar_jax import corruptions  # noqa: E402

IMAGES = (0, 1, 2, 3, 4, 5)  # of the training set
OUT = os.path.join(ROOT, 'tests', 'fixtures', 'cifar10_c_reference.npz')


def case_seed(corruption: int, severity: int) -> int:
  return 1000 + 10 * corruption + severity


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--reference', required=True, help='the patched make_cifar_c.py')
  parser.add_argument('--frost_dir', required=True, help='the folder of frost1.png .. frost6.jpg')
  parser.add_argument('--data', required=True, help='an .npz with x_train (N, 32, 32, 3) uint8')
  parser.add_argument('--out', default=OUT)
  args = parser.parse_args()
  spec = importlib.util.spec_from_file_location('make_cifar_c_reference', args.reference)
  ref = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(ref)
  ref.FROST_DIR = args.frost_dir
  import skimage.util  # pylint: disable=g-import-not-at-top
  random_noise = skimage.util.random_noise
  images = np.load(args.data, allow_pickle=False)['x_train'][list(IMAGES)]
  names = corruptions.CORRUPTIONS
  seeds = np.zeros((len(names), 5), np.int64)
  index = np.zeros((len(names), 5), np.int64)
  outputs = np.zeros((len(names), 5, 32, 32, 3), np.uint8)
  for c, name in enumerate(names):
    for severity in range(1, 6):
      seed, i = case_seed(c, severity), (5 * c + severity - 1) % len(IMAGES)
      np.random.seed(seed)
      skimage.util.random_noise = functools.partial(random_noise, rng=seed)
      out = getattr(ref, name)(Image.fromarray(images[i]), severity)
      seeds[c, severity - 1], index[c, severity - 1] = seed, i
      outputs[c, severity - 1] = np.uint8(out)  # as the script saves them
  skimage.util.random_noise = random_noise
  np.savez_compressed(args.out, images=images, names=np.array(names), seeds=seeds, image_index=index,
                      outputs=outputs)
  print(f'{args.out}: {os.path.getsize(args.out) / 1024:.0f} KB')


if __name__ == '__main__':
  main()
