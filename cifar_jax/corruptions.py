"""CIFAR-10-C: the 19 corruptions of Hendrycks & Dietterich (2019) at the CIFAR constants, and their sets.

Each corruption follows `ImageNet-C/create_c/make_cifar_c.py` (hendrycks/robustness) with its CIFAR
constants (not ImageNet-C's, which the `imagecorruptions` package uses), written for today's numpy, scipy,
scikit-image and OpenCV, in two parts: `draw` takes an image's random draws, in the order and with the
calls the script makes (numpy's normal, uniform, poisson, integers in place of the script's global
RandomState; scikit-image's `random_noise` draws for impulse noise), and `apply` applies them to a batch
at once. An image's draws come from its own generator, seeded with (seed, corruption, severity, image
index), so a set is the same in any batch split, process or order. tests/test_corruptions.py replays the
script's draws (RandomState(seed)) and compares with the script's output on real images.

Where the script differs from this module:
- glass blur's "swap" `x[h, w], x[h', w'] = x[h', w'], x[h, w]` of numpy views copies (h', w') into
  (h, w) and leaves (h', w') as it was; with offsets in {-1, 0} every pixel reads one the loop has not
  reached yet, so one pass is one gather over the whole batch (no per-pixel loop), as the released files
  were made.
- motion blur and snow call ImageMagick's MotionBlurImage (through Wand); `motion_blur_kernel` and
  `_motion_blur` are its algorithm in numpy (ImageMagick 6, Q16: the 8-bit image scaled to 16 bits, a
  one-sided Gaussian of width 2 ceil(radius) + 1 along the angle, edge pixels repeated, rounded to 16
  bits, then truncated to 8 bits as its PNG writer does).
- frost reads the script's frost images (frost1..5; the script draws one of the first five): the same
  files as the `imagecorruptions` package ships (Apache-2.0), resized by 0.2 as the script does
  (OpenCV, bilinear), are stored in `frost_textures.npz` (scripts/maintainers/frost_textures.py writes it).

Sets: `corrupted_set` caches each generated (corruption, severity) set as a uint8 .npz keyed by the
source images' hash; `ReleasedSets` reads the released CIFAR-10-C .npy files (the authors' own, the
preferred source when a user has them).

CIFAR-100-C is made the same way from CIFAR-100's test images: the authors made it with the same script,
whose constants are for 32 px images and whose frost crops come from the same textures whatever the dataset
(docs/cifar100.md); the released CIFAR-100-C files have CIFAR-10-C's layout.
"""

import dataclasses
import hashlib
import io
import math
import os

import numpy as np
from PIL import Image

from cifar_jax.errors import DataError

# OpenCV, scipy.ndimage and scikit-image are imported in the functions that use them: a training run,
# which imports this module through train.py, does not pay for them (0.7 s of imports, measured).

# In make_cifar_c.py's order: the 15 of the benchmark, then the 4 extra ones.
CORRUPTIONS = ('gaussian_noise', 'shot_noise', 'impulse_noise', 'defocus_blur', 'glass_blur', 'motion_blur',
               'zoom_blur', 'snow', 'frost', 'fog', 'brightness', 'contrast', 'elastic_transform',
               'pixelate', 'jpeg_compression', 'speckle_noise', 'gaussian_blur', 'spatter', 'saturate')
BENCHMARK = CORRUPTIONS[:15]  # the mean corruption error / accuracy is over these
SEVERITIES = (1, 2, 3, 4, 5)
IMAGE_SIZE = 32
CHUNK = 500  # images per call of a corruption's function in `apply`
# Bump when a corruption's output changes: cached sets of another version are not reused.
CACHE_VERSION = 1
FROST_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'frost_textures.npz')
FROST_IMAGES = 5  # the script draws np.random.randint(5): frost1 .. frost5
RELEASED_LABELS = 'labels.npy'

# make_cifar_c.py's CIFAR constants, per severity 1..5.
CONSTANTS = {
    'gaussian_noise': (0.04, 0.06, .08, .09, .10),
    'shot_noise': (500, 250, 100, 75, 50),
    'impulse_noise': (.01, .02, .03, .05, .07),
    'speckle_noise': (.06, .1, .12, .16, .2),
    'gaussian_blur': (.4, .6, 0.7, .8, 1),
    'glass_blur': ((0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)),  # sigma, delta, its
    'defocus_blur': ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)),  # radius, alias blur
    'motion_blur': ((6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)),  # radius, sigma
    'zoom_blur': tuple(np.arange(1, top, 0.01) for top in (1.06, 1.11, 1.16, 1.21, 1.26)),
    'fog': ((.2, 3), (.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)),  # strength, wibble decay
    'frost': ((1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45)),  # image, frost weights
    'snow': ((0.1, 0.2, 1, 0.6, 8, 3, 0.95), (0.1, 0.2, 1, 0.5, 10, 4, 0.9),
             (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9), (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85),
             (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8)),
    'spatter': ((0.62, 0.1, 0.7, 0.7, 0.5, 0), (0.65, 0.1, 0.8, 0.7, 0.5, 0), (0.65, 0.3, 1, 0.69, 0.5, 0),
                (0.65, 0.1, 0.7, 0.69, 0.6, 1), (0.65, 0.1, 0.5, 0.68, 0.6, 1)),
    'contrast': (.75, .5, .4, .3, 0.15),
    'brightness': (.05, .1, .15, .2, .3),
    'saturate': ((0.3, 0), (0.1, 0), (1.5, 0), (2, 0.1), (2.5, 0.2)),
    'jpeg_compression': (80, 65, 58, 50, 40),  # quality
    'pixelate': (0.95, 0.9, 0.85, 0.75, 0.65),
    # alpha, sigma, affine jitter, each times the image size
    'elastic_transform': tuple(tuple(IMAGE_SIZE * v for v in c) for c in (
        (0, 0, 0.08), (0.05, 0.2, 0.07), (0.08, 0.06, 0.06), (0.1, 0.04, 0.05), (0.1, 0.03, 0.03))),
}


def _constant(name: str, severity: int):
  return CONSTANTS[name][severity - 1]


# Helpers ---------------------------------------------------------------------------------------------------


def _gaussian(x: np.ndarray, sigma: float, *, image_axes: tuple[int, ...] = (1, 2), mode: str = 'nearest',
              truncate: float = 4.0) -> np.ndarray:
  """scikit-image's `filters.gaussian` (float input, no range change) over `image_axes` of a batch."""
  import scipy.ndimage  # pylint: disable=g-import-not-at-top
  sigmas = [sigma if axis in image_axes else 0 for axis in range(x.ndim)]
  return scipy.ndimage.gaussian_filter(x, sigmas, mode=mode, truncate=truncate)


def _clipped_zoom(x: np.ndarray, factor: float) -> np.ndarray:
  """The script's clipped_zoom over a batch (N, H, W, C): the centre ceil(H / factor) zoomed by `factor`
  (bilinear, scipy's zoom), its centre H x W kept. The images and channels are stacked on the last axis
  (one 3-D zoom; bitwise the per-image zoom, and 2.5x faster than a 4-D zoom's 16-point interpolation)."""
  import scipy.ndimage  # pylint: disable=g-import-not-at-top
  n, h = x.shape[0], x.shape[1]
  crop = int(np.ceil(h / factor))
  top = (h - crop) // 2
  stacked = np.moveaxis(x[:, top:top + crop, top:top + crop], 0, 2).reshape(crop, crop, -1)
  x = scipy.ndimage.zoom(stacked, (factor, factor, 1), order=1)
  x = np.moveaxis(x.reshape(x.shape[0], x.shape[1], n, -1), 2, 0)
  trim = (x.shape[1] - h) // 2
  return x[:, trim:trim + h, trim:trim + h]


def plasma_fractal(uniform, mapsize: int = IMAGE_SIZE, wibbledecay: float = 3) -> np.ndarray:
  """A (mapsize, mapsize) diamond-square height map in [0, 1] (the script's fog), drawing its noise
  with `uniform(low, high, shape)`."""
  assert mapsize & (mapsize - 1) == 0
  grid = np.empty((mapsize, mapsize), dtype=np.float64)
  grid[0, 0] = 0
  step, wibble = mapsize, 100

  def mean_plus_noise(total):
    return total / 4 + wibble * uniform(-wibble, wibble, total.shape)

  while step >= 2:
    half = step // 2
    corners = grid[0:mapsize:step, 0:mapsize:step]  # squares: centre = mean of the 4 corners
    total = corners + np.roll(corners, shift=-1, axis=0)
    total += np.roll(total, shift=-1, axis=1)
    grid[half:mapsize:step, half:mapsize:step] = mean_plus_noise(total)
    centres = grid[half:mapsize:step, half:mapsize:step]  # diamonds: the 2 centres and 2 corners around
    corners = grid[0:mapsize:step, 0:mapsize:step]
    total = (centres + np.roll(centres, 1, axis=0)) + (corners + np.roll(corners, -1, axis=1))
    grid[0:mapsize:step, half:mapsize:step] = mean_plus_noise(total)
    total = (centres + np.roll(centres, 1, axis=1)) + (corners + np.roll(corners, -1, axis=0))
    grid[half:mapsize:step, 0:mapsize:step] = mean_plus_noise(total)
    step //= 2
    wibble /= wibbledecay
  grid -= grid.min()
  return grid / grid.max()


def motion_blur_kernel(radius: float, sigma: float, angle: float) -> tuple[np.ndarray, np.ndarray]:
  """ImageMagick 6's MotionBlurImage kernel: (weights (width,), (row, column) offsets (width, 2))."""
  width = int(2 * math.ceil(radius) + 1)
  sigma = max(abs(sigma), 1e-12)  # MagickEpsilon
  i = np.arange(width, dtype=np.float64)
  weights = np.exp(-(i * i) / (2.0 * sigma * sigma)) / (math.sqrt(2 * math.pi) * sigma)
  weights /= np.sum(weights)
  x = width * math.sin(math.radians(angle))
  y = width * math.cos(math.radians(angle))
  norm = math.hypot(x, y)
  offsets = np.stack([np.ceil(i * x / norm - 0.5), np.ceil(i * y / norm - 0.5)], axis=1).astype(np.int64)
  return weights, offsets


def _motion_blur(images: np.ndarray, radius: float, sigma: float, angles: np.ndarray) -> np.ndarray:
  """ImageMagick's motion blur of uint8 images (N, H, W, C) each at its angle, in degrees: uint8."""
  n, h, w = images.shape[:3]
  quantum = images.astype(np.float64) * 257.0  # ScaleCharToQuantum (Q16)
  rows, cols = np.arange(h)[:, None], np.arange(w)[None, :]
  out = np.empty(images.shape, np.uint8)
  for k in range(n):
    weights, offsets = motion_blur_kernel(radius, sigma, float(angles[k]))
    total = np.zeros(images.shape[1:], np.float64)
    for weight, (dy, dx) in zip(weights, offsets):  # the edge pixel outside the image
      total += weight * quantum[k, np.clip(rows + dy, 0, h - 1), np.clip(cols + dx, 0, w - 1)]
    q = np.where(total <= 0, 0, np.where(total >= 65535, 65535, np.floor(total + 0.5))).astype(np.int64)
    out[k] = q // 257  # its PNG writer's 16 -> 8 bits (truncating: measured on ImageMagick 6.9.11 Q16)
  return out


def _disk(radius: float, alias_blur: float) -> np.ndarray:
  """The script's defocus kernel: an aliased disk, normalised, smoothed by OpenCV's GaussianBlur."""
  import cv2  # pylint: disable=g-import-not-at-top
  if radius <= 8:
    coords, ksize = np.arange(-8, 8 + 1), (3, 3)
  else:
    coords, ksize = np.arange(-radius, radius + 1), (5, 5)
  x, y = np.meshgrid(coords, coords)
  disk = np.array((x ** 2 + y ** 2) <= radius ** 2, dtype=np.float32)
  disk /= np.sum(disk)
  return cv2.GaussianBlur(disk, ksize=ksize, sigmaX=alias_blur)


_FROST = None


def frost_textures() -> list[np.ndarray]:
  """The five frost images (RGB uint8) as the script uses them, resized by 0.2."""
  global _FROST
  if _FROST is None:
    with np.load(FROST_FILE, allow_pickle=False) as f:
      _FROST = [f[f'frost{i}'] for i in range(1, FROST_IMAGES + 1)]
  return _FROST


# Draws: one image's random numbers, with make_cifar_c.py's calls in its order ------------------------------


def _no_draws(rng, severity, image):
  del rng, severity, image
  return {}


def _draw_gaussian_noise(rng, severity, image):
  return {'noise': rng.normal(size=image.shape, scale=_constant('gaussian_noise', severity))}


def _draw_speckle_noise(rng, severity, image):
  return {'noise': rng.normal(size=image.shape, scale=_constant('speckle_noise', severity))}


def _draw_shot_noise(rng, severity, image):
  return {'counts': rng.poisson(np.asarray(image) / 255. * _constant('shot_noise', severity))}


def _draw_impulse_noise(rng, severity, image):
  # scikit-image's random_noise(mode='s&p'): Bernoulli(amount) flips, then Bernoulli(0.5) salt.
  return {'flipped': rng.random(image.shape) <= _constant('impulse_noise', severity),
          'salted': rng.random(image.shape) <= 0.5}


def _draw_glass_blur(rng, severity, image):
  del image
  _, delta, iterations = _constant('glass_blur', severity)
  inner = IMAGE_SIZE - 2 * delta
  # (dx, dy) for h, then w, from IMAGE_SIZE - delta down to delta + 1, as the script's loops.
  return {'offsets': rng.integers(-delta, delta, size=(iterations, inner, inner, 2))}


def _draw_motion_blur(rng, severity, image):
  del severity, image
  return {'angle': np.float64(rng.uniform(-45, 45))}


def _draw_snow(rng, severity, image):
  del image
  c = _constant('snow', severity)
  layer = rng.normal(size=(IMAGE_SIZE, IMAGE_SIZE), loc=c[0], scale=c[1])
  return {'layer': layer, 'angle': np.float64(rng.uniform(-135, -45))}


def _draw_frost(rng, severity, image):
  del severity, image
  index = int(rng.integers(FROST_IMAGES))
  texture = frost_textures()[index]
  top = int(rng.integers(0, texture.shape[0] - IMAGE_SIZE))
  left = int(rng.integers(0, texture.shape[1] - IMAGE_SIZE))
  return {'frost': texture[top:top + IMAGE_SIZE, left:left + IMAGE_SIZE]}


def _draw_fog(rng, severity, image):
  del image
  return {'plasma': plasma_fractal(rng.uniform, wibbledecay=_constant('fog', severity)[1])}


def _draw_elastic_transform(rng, severity, image):
  del image
  c = _constant('elastic_transform', severity)
  shape = (IMAGE_SIZE, IMAGE_SIZE)
  return {'affine': rng.uniform(-c[2], c[2], size=(3, 2)).astype(np.float32),
          'dx': rng.uniform(-1, 1, size=shape), 'dy': rng.uniform(-1, 1, size=shape)}


def _draw_spatter(rng, severity, image):
  del image
  c = _constant('spatter', severity)
  return {'liquid': rng.normal(size=(IMAGE_SIZE, IMAGE_SIZE), loc=c[0], scale=c[1])}


# Applying them to a batch: float images in [0, 255] (or uint8), N x 32 x 32 x 3 ------------------------


def _gaussian_noise(x, severity, d):
  del severity
  return np.clip(x / 255. + d['noise'], 0, 1) * 255


def _speckle_noise(x, severity, d):
  del severity
  x = x / 255.
  return np.clip(x + x * d['noise'], 0, 1) * 255


def _shot_noise(x, severity, d):
  del x
  c = _constant('shot_noise', severity)
  return np.clip(d['counts'] / c, 0, 1) * 255


def _impulse_noise(x, severity, d):
  del severity
  x = x / 255.
  x[d['flipped'] & d['salted']] = 1
  x[d['flipped'] & ~d['salted']] = 0
  return np.clip(x, 0, 1) * 255


def _gaussian_blur(x, severity, d):
  del d
  return np.clip(_gaussian(x / 255., _constant('gaussian_blur', severity)), 0, 1) * 255


def _glass_blur(x, severity, d):
  sigma, delta, iterations = _constant('glass_blur', severity)
  x = np.uint8(_gaussian(x / 255., sigma) * 255)
  inner = IMAGE_SIZE - 2 * delta
  # The script's loops visit h (and w) from IMAGE_SIZE - delta down to delta + 1: flip to increasing.
  offsets = d['offsets'][:, :, ::-1, ::-1]
  pixels = np.arange(delta + 1, IMAGE_SIZE - delta + 1)[:inner]
  batch = np.arange(x.shape[0])[:, None, None]
  for i in range(iterations):
    dx, dy = offsets[:, i, ..., 0], offsets[:, i, ..., 1]
    rows, cols = pixels[None, :, None] + dy, pixels[None, None, :] + dx
    gathered = x[batch, rows, cols]
    x = x.copy()
    x[:, pixels[0]:pixels[-1] + 1, pixels[0]:pixels[-1] + 1] = gathered
  return np.clip(_gaussian(x / 255., sigma), 0, 1) * 255


def _defocus_blur(x, severity, d):
  import cv2  # pylint: disable=g-import-not-at-top
  del d
  radius, alias_blur = _constant('defocus_blur', severity)
  kernel = _disk(radius, alias_blur)
  x = x / 255.
  out = np.empty_like(x)
  for k in range(x.shape[0]):
    for channel in range(3):
      out[k, ..., channel] = cv2.filter2D(x[k, ..., channel], -1, kernel)
  return np.clip(out, 0, 1) * 255


def _motion_blur_images(x, severity, d):
  radius, sigma = _constant('motion_blur', severity)
  return _motion_blur(np.asarray(x, np.uint8), radius, sigma, d['angle'])


def _zoom_blur(x, severity, d):
  del d
  x = (x / 255.).astype(np.float32)
  out = np.zeros_like(x)
  for factor in _constant('zoom_blur', severity):
    out += _clipped_zoom(x, factor)
  x = (x + out) / (len(_constant('zoom_blur', severity)) + 1)
  return np.clip(x, 0, 1) * 255


def _snow(x, severity, d):
  import cv2  # pylint: disable=g-import-not-at-top
  c = _constant('snow', severity)
  n = x.shape[0]
  x = np.asarray(x, np.float32) / 255.
  layer = _clipped_zoom(d['layer'][..., None], c[2])
  layer[layer < c[3]] = 0
  layer = (np.clip(layer, 0, 1) * 255).astype(np.uint8)
  layer = _motion_blur(layer, c[4], c[5], d['angle']) / 255.
  gray = cv2.cvtColor(x.reshape(n * IMAGE_SIZE, IMAGE_SIZE, 3), cv2.COLOR_RGB2GRAY)
  gray = gray.reshape(n, IMAGE_SIZE, IMAGE_SIZE, 1)
  x = c[6] * x + (1 - c[6]) * np.maximum(x, gray * 1.5 + 0.5)
  return np.clip(x + layer + np.rot90(layer, k=2, axes=(1, 2)), 0, 1) * 255


def _frost(x, severity, d):
  c = _constant('frost', severity)
  return np.clip(c[0] * np.asarray(x) + c[1] * d['frost'], 0, 255)


def _fog(x, severity, d):
  c = _constant('fog', severity)
  x = x / 255.
  max_val = x.max(axis=(1, 2, 3), keepdims=True)
  x += c[0] * d['plasma'][:, :IMAGE_SIZE, :IMAGE_SIZE, None]
  return np.clip(x * max_val / (max_val + c[0]), 0, 1) * 255


def _brightness(x, severity, d):
  import skimage.color  # pylint: disable=g-import-not-at-top
  del d
  x = skimage.color.rgb2hsv(x / 255.)
  x[..., 2] = np.clip(x[..., 2] + _constant('brightness', severity), 0, 1)
  return np.clip(skimage.color.hsv2rgb(x), 0, 1) * 255


def _saturate(x, severity, d):
  import skimage.color  # pylint: disable=g-import-not-at-top
  del d
  c = _constant('saturate', severity)
  x = skimage.color.rgb2hsv(x / 255.)
  x[..., 1] = np.clip(x[..., 1] * c[0] + c[1], 0, 1)
  return np.clip(skimage.color.hsv2rgb(x), 0, 1) * 255


def _contrast(x, severity, d):
  del d
  x = x / 255.
  means = np.mean(x, axis=(1, 2), keepdims=True)
  return np.clip((x - means) * _constant('contrast', severity) + means, 0, 1) * 255


def _jpeg_compression(x, severity, d):
  del d
  out = np.empty(x.shape, np.uint8)
  for k, image in enumerate(np.asarray(x, np.uint8)):
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, 'JPEG', quality=_constant('jpeg_compression', severity))
    out[k] = np.asarray(Image.open(buffer))
  return out


def _pixelate(x, severity, d):
  del d
  size = int(IMAGE_SIZE * _constant('pixelate', severity))
  out = np.empty(x.shape, np.uint8)
  for k, image in enumerate(np.asarray(x, np.uint8)):
    small = Image.fromarray(image).resize((size, size), Image.BOX)
    out[k] = np.asarray(small.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BOX))
  return out


def _elastic_transform(x, severity, d):
  import cv2  # pylint: disable=g-import-not-at-top
  import scipy.ndimage  # pylint: disable=g-import-not-at-top
  c = _constant('elastic_transform', severity)
  images = np.asarray(x, dtype=np.float32) / 255.
  n = images.shape[0]
  centre = np.float32((IMAGE_SIZE, IMAGE_SIZE)) // 2
  third = IMAGE_SIZE // 3
  corners = np.float32([centre + third, [centre[0] + third, centre[1] - third], centre - third])
  warped = np.empty_like(images)
  for k in range(n):
    matrix = cv2.getAffineTransform(corners, corners + d['affine'][k])
    warped[k] = cv2.warpAffine(images[k], matrix, (IMAGE_SIZE, IMAGE_SIZE),
                               borderMode=cv2.BORDER_REFLECT_101)
  dx = (_gaussian(d['dx'], c[1], mode='reflect', truncate=3) * c[0]).astype(np.float32)[..., None]
  dy = (_gaussian(d['dy'], c[1], mode='reflect', truncate=3) * c[0]).astype(np.float32)[..., None]
  cols, rows, channels = np.meshgrid(np.arange(IMAGE_SIZE), np.arange(IMAGE_SIZE), np.arange(3))
  out = np.empty(images.shape, np.float64)
  for k in range(n):  # per image: map_coordinates over the batch would hold 4 x N x 3072 coordinates
    coords = (np.reshape(rows + dy[k], (-1, 1)), np.reshape(cols + dx[k], (-1, 1)),
              np.reshape(channels, (-1, 1)))
    out[k] = scipy.ndimage.map_coordinates(warped[k], coords, order=1, mode='reflect').reshape(
        images.shape[1:])
  return np.clip(out, 0, 1) * 255


def _spatter(x, severity, d):
  import cv2  # pylint: disable=g-import-not-at-top
  c = _constant('spatter', severity)
  x = np.asarray(x, dtype=np.float32) / 255.
  liquid = _gaussian(d['liquid'], c[2])
  liquid[liquid < c[3]] = 0
  if c[5] == 0:  # water: the liquid's edges, pale turquoise
    out = np.empty(x.shape, np.float32)
    liquid = (liquid * 255).astype(np.uint8)
    kernel = np.array([[-2, -1, 0], [-1, 1, 1], [0, 1, 2]])
    color = cv2.cvtColor(np.concatenate([np.full((IMAGE_SIZE, IMAGE_SIZE, 1), v / 255., np.float32)
                                         for v in (175, 238, 238)], axis=2), cv2.COLOR_BGR2BGRA)
    for k in range(x.shape[0]):
      dist = 255 - cv2.Canny(liquid[k], 50, 150)
      dist = cv2.distanceTransform(dist, cv2.DIST_L2, 5)
      _, dist = cv2.threshold(dist, 20, 20, cv2.THRESH_TRUNC)
      dist = cv2.equalizeHist(cv2.blur(dist, (3, 3)).astype(np.uint8))
      dist = cv2.blur(cv2.filter2D(dist, cv2.CV_8U, kernel), (3, 3)).astype(np.float32)
      m = cv2.cvtColor(liquid[k] * dist, cv2.COLOR_GRAY2BGRA)
      m /= np.max(m, axis=(0, 1))
      m *= c[4]
      image = cv2.cvtColor(x[k], cv2.COLOR_BGR2BGRA)
      out[k] = cv2.cvtColor(np.clip(image + m * color, 0, 1), cv2.COLOR_BGRA2BGR)
    return out * 255
  m = np.where(liquid > c[3], 1, 0)  # mud: brown blots
  m = _gaussian(m.astype(np.float32), c[4])
  m[m < 0.8] = 0
  color = np.array([63 / 255., 42 / 255., 20 / 255.], np.float32) * m[..., None]
  x *= 1 - m[..., None]
  return np.clip(x + color, 0, 1) * 255


DRAWS = {
    'gaussian_noise': _draw_gaussian_noise, 'shot_noise': _draw_shot_noise,
    'impulse_noise': _draw_impulse_noise, 'defocus_blur': _no_draws, 'glass_blur': _draw_glass_blur,
    'motion_blur': _draw_motion_blur, 'zoom_blur': _no_draws, 'snow': _draw_snow, 'frost': _draw_frost,
    'fog': _draw_fog, 'brightness': _no_draws, 'contrast': _no_draws,
    'elastic_transform': _draw_elastic_transform, 'pixelate': _no_draws, 'jpeg_compression': _no_draws,
    'speckle_noise': _draw_speckle_noise, 'gaussian_blur': _no_draws, 'spatter': _draw_spatter,
    'saturate': _no_draws,
}
APPLY = {
    'gaussian_noise': _gaussian_noise, 'shot_noise': _shot_noise, 'impulse_noise': _impulse_noise,
    'defocus_blur': _defocus_blur, 'glass_blur': _glass_blur, 'motion_blur': _motion_blur_images,
    'zoom_blur': _zoom_blur, 'snow': _snow, 'frost': _frost, 'fog': _fog, 'brightness': _brightness,
    'contrast': _contrast, 'elastic_transform': _elastic_transform, 'pixelate': _pixelate,
    'jpeg_compression': _jpeg_compression, 'speckle_noise': _speckle_noise, 'gaussian_blur': _gaussian_blur,
    'spatter': _spatter, 'saturate': _saturate,
}


def draw(corruption: str, rng, severity: int, image: np.ndarray) -> dict:
  """One image's random draws for `corruption` at `severity`, taken from `rng` (a numpy Generator, or an
  object with the same methods) with make_cifar_c.py's calls in its order."""
  return DRAWS[corruption](rng, severity, image)


def apply(corruption: str, images: np.ndarray, severity: int, draws: list[dict]) -> np.ndarray:
  """`corruption` at `severity` of uint8 images (N, 32, 32, 3), each with its draws: uint8, truncated as
  the script saves its sets (np.uint8 of its float output)."""
  _check(corruption, severity)
  images = np.asarray(images, np.uint8)
  out = np.empty(images.shape, np.uint8)
  # Every corruption is per image: chunks keep the float64 temporaries in cache (brightness's HSV round trip
  # of 5,000 images ran 3.2x faster in chunks of 500, bitwise the same).
  for start in range(0, len(images), CHUNK):
    chunk, chunk_draws = images[start:start + CHUNK], draws[start:start + CHUNK]
    stacked = {key: np.stack([d[key] for d in chunk_draws])
               for key in (chunk_draws[0] if chunk_draws else {})}
    result = APPLY[corruption](chunk.astype(np.float64) if corruption not in (
        'motion_blur', 'jpeg_compression', 'pixelate') else chunk, severity, stacked)
    out[start:start + CHUNK] = np.asarray(result).astype(np.uint8)
  return out


def image_rng(seed: int, corruption: str, severity: int, index: int) -> np.random.Generator:
  """The generator of image `index`'s draws for (corruption, severity) in the set of `seed`."""
  return np.random.default_rng([seed, CORRUPTIONS.index(corruption), severity, index])


def corrupt(images: np.ndarray, corruption: str, severity: int, seed: int = 0,
            first_index: int = 0) -> np.ndarray:
  """`corruption` at `severity` of uint8 images (N, 32, 32, 3), image i with the draws of index
  first_index + i (`image_rng`): uint8 (N, 32, 32, 3), the same for the same arguments in any split."""
  _check(corruption, severity)
  images = np.asarray(images, np.uint8)
  if images.ndim != 4 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE, 3):
    raise ValueError(f'images must be (N, {IMAGE_SIZE}, {IMAGE_SIZE}, 3), got {images.shape}')
  if DRAWS[corruption] is _no_draws:  # no generator to seed
    draws = [{}] * len(images)
  else:
    draws = [draw(corruption, image_rng(seed, corruption, severity, first_index + i), severity, image)
             for i, image in enumerate(images)]
  return apply(corruption, images, severity, draws)


def _check(corruption: str, severity: int) -> None:
  if corruption not in APPLY:
    raise ValueError(f'unknown corruption {corruption!r}; one of {list(CORRUPTIONS)}')
  if severity not in SEVERITIES:
    raise ValueError(f'severity must be one of {SEVERITIES}, got {severity!r}')


# Sets: generated (cached) or released ----------------------------------------------------------------------


def selected(spec: str) -> tuple[str, ...]:
  """The corruptions `evaluation.shift` names: '' none, 'all' the 19, or names separated by commas."""
  spec = spec.strip()
  if not spec:
    return ()
  if spec == 'all':
    return CORRUPTIONS
  names = tuple(name.strip() for name in spec.split(','))
  unknown = [name for name in names if name not in CORRUPTIONS]
  if unknown:
    raise ValueError(f"unknown corruption {unknown[0]!r}; give 'all' or names among {list(CORRUPTIONS)}")
  return tuple(dict.fromkeys(names))


def cache_dir(setting: str) -> str:
  """The folder of cached generated sets: `setting`, or for 'auto' $XDG_CACHE_HOME (~/.cache)/cifar_jax/
  cifar10_c; '' (no cache) stays ''."""
  if setting != 'auto':
    return setting
  root = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return os.path.join(root, 'cifar_jax', 'cifar10_c')


def shifted_sets(images: np.ndarray, labels: np.ndarray, names, severities, *, corruptions_path: str = '',
                 seed: int = 0, cache: str = ''):
  """[(corruption, severity, uint8 images)] of the evaluation images: the released files in
  `corruptions_path` (every file checked before any is used: DataError) or the generated sets (cached
  in `cache`)."""
  if corruptions_path:
    released = ReleasedSets(corruptions_path, int(labels.shape[0]))
    released.check_labels(labels)
    for name in names:
      released.images(name, severities[0])
    return [(name, s, released.images(name, s)) for name in names for s in severities]
  source_hash = images_hash(images)
  return [(name, s, corrupted_set(images, name, s, seed, cache, source_hash))
          for name in names for s in severities]


def images_hash(images: np.ndarray) -> str:
  """The sha256 of uint8 images' shape and bytes: what a cached set was made from."""
  images = np.ascontiguousarray(images, np.uint8)
  digest = hashlib.sha256(repr(images.shape).encode())
  digest.update(images.tobytes())
  return digest.hexdigest()


def cache_path(cache_dir: str, source_hash: str, corruption: str, severity: int, seed: int) -> str:
  """The cached set's file: its corruption, severity, seed, CACHE_VERSION and source images' hash."""
  name = f'{corruption}_{severity}_seed{seed}_v{CACHE_VERSION}_{source_hash[:20]}.npz'
  return os.path.join(cache_dir, name)


def corrupted_set(images: np.ndarray, corruption: str, severity: int, seed: int = 0,
                  cache_dir: str = '', source_hash: str | None = None) -> np.ndarray:
  """`corrupt` of the whole set, read from `cache_dir` when a set of the same source images (hash),
  corruption, severity and seed was saved there, else generated and saved (uint8 .npz)."""
  if not cache_dir:
    return corrupt(images, corruption, severity, seed)
  source_hash = source_hash or images_hash(images)
  path = cache_path(cache_dir, source_hash, corruption, severity, seed)
  if os.path.exists(path):
    try:
      with np.load(path, allow_pickle=False) as f:
        if str(f['source_hash']) == source_hash and f['images'].shape == images.shape:
          return f['images']
    except (OSError, ValueError, KeyError):  # a damaged cache file: made again
      pass
  out = corrupt(images, corruption, severity, seed)
  os.makedirs(cache_dir, exist_ok=True)
  tmp = path + '.tmp.npz'
  np.savez(tmp, images=out, source_hash=np.array(source_hash))
  os.replace(tmp, path)
  return out


@dataclasses.dataclass
class ReleasedSets:
  """The released CIFAR-10-C files: `<corruption>.npy` (5 x N uint8 images, severities 1..5 in order)
  and labels.npy, in `path`; their images must be the evaluation's (the CIFAR-10 test set)."""

  path: str
  num_images: int
  labels: np.ndarray | None = None

  def images(self, corruption: str, severity: int) -> np.ndarray:
    """The set's images (N, 32, 32, 3) uint8; DataError (one line) for a missing, corrupt or mis-shaped
    file."""
    file = os.path.join(self.path, f'{corruption}.npy')
    array = _load_npy(file)
    n = self.num_images
    if array.dtype != np.uint8 or array.shape != (5 * n, IMAGE_SIZE, IMAGE_SIZE, 3):
      raise DataError(f'{file}: expected uint8 images of shape ({5 * n}, {IMAGE_SIZE}, {IMAGE_SIZE}, 3) '
                      f'(5 severities of the {n} evaluation images), got {array.dtype} {array.shape}')
    return np.asarray(array[(severity - 1) * n:severity * n])

  def check_labels(self, labels: np.ndarray) -> None:
    """DataError unless labels.npy (when present) holds the evaluation's labels 5 times."""
    file = os.path.join(self.path, RELEASED_LABELS)
    if not os.path.exists(file):
      return
    released = _load_npy(file)
    expected = np.tile(np.asarray(labels), 5)
    if released.shape != expected.shape or not np.array_equal(released.astype(np.int64), expected):
      raise DataError(f'{file}: its labels are not the evaluation set\'s (shape {released.shape}, '
                      f'expected {expected.shape}); data.corruptions_path must hold CIFAR-10-C (or '
                      'CIFAR-100-C) of the images evaluated (the test set)')


def _load_npy(file: str) -> np.ndarray:
  if not os.path.exists(file):
    raise DataError(f'{file}: not found; data.corruptions_path must hold the released CIFAR-10-C (or '
                    'CIFAR-100-C) .npy files (or set it to \'\' to generate the corruptions)')
  try:
    return np.load(file, mmap_mode='r', allow_pickle=False)
  except (OSError, ValueError, EOFError) as e:
    raise DataError(f'{file}: not a readable .npy file ({type(e).__name__}: {e})') from e
