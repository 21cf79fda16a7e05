"""What a GPU machine without network needs beside the tree: wheels (.whl/) and real images (.gpu_data/).

  python scripts/gpu/gpu_bundle.py                       # both, from ../shared/data/cifar10/cifar10_train.npz
  python scripts/gpu/gpu_bundle.py --no_wheels --synthetic=256 --data_dir=/tmp/tiny   # a tiny one, no network

Wheels: `pip download --no-deps --only-binary=:all:` for CPython 3.12 on manylinux x86-64 of the packages
the GPU image lacks (ml_collections, pinned to the version installed here; tensorflow-datasets is not
needed with data.source=images, and without tensorboardX the trainer writes metrics.jsonl only).

Data: the first training images of CIFAR-10, in their original order, as many as fit with the wheels
in --budget_mib, stored as lossless WebP strips of 256 images stacked vertically (8192 x 32 pixels;
quality=100, method=5, exact=True): about 1,650 bytes an image, against 3,072 raw, 2,270 as PNG and
1,780 as one WebP an image (measured on the first 2,048). Every strip is decoded again and compared bit
for bit; a strip WebP would not give back exactly is stored as PNG (the manifest says which). The
manifest (input_pipeline.IMAGES_FORMAT) holds each strip's sha256, count and labels and the sha256 of all
the images; `cifar-jax --config.data.source=images --config.data.path=.gpu_data` reads it and checks
the decoded images against that hash. Finally the whole bundle is read back through that loader and
compared with the source, and what travels (tracked tree, .whl, .gpu_data) is checked against
--limit_mib (64 MiB by default; 0: no check), for copies to the GPU node that cap their size.
"""

import argparse
import glob
import hashlib
import importlib.metadata
import io
import json
import multiprocessing
import os
import shutil
import subprocess
import sys

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from cifar_jax import input_pipeline  # noqa: E402

MIB = 2**20
DEFAULT_NPZ = os.path.join(os.path.dirname(ROOT), 'shared', 'data', 'cifar10', 'cifar10_train.npz')
CARRY_LIMIT_MIB = 64  # --limit_mib's default: the tree and the two folders, as copied to the GPU node
STRIP = 256  # images a strip: 8192 x 32 pixels (WebP allows 16383 a side)
WEBP = dict(format='WEBP', lossless=True, quality=100, method=5, exact=True)
PNG = dict(format='PNG', optimize=True)
FORMATS = (('webp', WEBP), ('png', PNG))
# The manifest's share of the budget: a label digit an image, and about this much for each strip's entry.
STRIP_ENTRY_BYTES = 300
PLATFORMS = ('manylinux_2_28_x86_64', 'manylinux_2_17_x86_64', 'manylinux2014_x86_64', 'manylinux1_x86_64')


def _encode(pixels: np.ndarray, options: dict) -> bytes:
  out = io.BytesIO()
  Image.fromarray(pixels).save(out, **options)
  return out.getvalue()


def _decode(data: bytes) -> np.ndarray:
  with Image.open(io.BytesIO(data)) as image:
    return np.asarray(image.convert('RGB'))


def encode_strip(images: np.ndarray) -> tuple[bytes, str]:
  """(bytes, 'webp' or 'png'): the images stacked vertically, in the first format that decodes exactly."""
  pixels = np.ascontiguousarray(images).reshape(-1, images.shape[2], 3)
  for name, options in FORMATS:
    data = _encode(pixels, options)
    if np.array_equal(_decode(data), pixels):
      return data, name
  raise RuntimeError('neither lossless WebP nor PNG gave the images back exactly')


def _encode_job(images: np.ndarray) -> tuple[bytes, str]:
  return encode_strip(images)


def write_images(images: np.ndarray, labels: np.ndarray, out: str, budget_bytes: int, source: dict,
                 strip: int = STRIP, workers: int = 0) -> dict:
  """Writes as many of `images` (in order) as fit in `budget_bytes` to `out`; returns the manifest."""
  if os.path.exists(out):
    if os.listdir(out) and not os.path.isfile(os.path.join(out, input_pipeline.IMAGES_MANIFEST)):
      sys.exit(f'gpu_bundle: {out} exists and is not a bundle; choose another --data_dir')
    shutil.rmtree(out)
  os.makedirs(out)
  labels = np.asarray(labels)
  if labels.size and (labels.min() < 0 or labels.max() > 9):  # the manifest holds one digit a label
    sys.exit(f'gpu_bundle: labels {labels.min()}..{labels.max()}: a bundle holds CIFAR-10\'s labels 0..9 '
             '(one digit each); copy a CIFAR-100 npz as it is and use data.source=npz')
  starts = range(0, len(images), strip)
  jobs = (images[i:i + strip] for i in starts)
  strips, used = [], 2 * STRIP_ENTRY_BYTES  # the manifest's own fields
  workers = workers or os.cpu_count() or 1

  def add(data, fmt, start, count):
    name = f'train_{len(strips):04d}.{fmt}'
    with open(os.path.join(out, name), 'wb') as f:
      f.write(data)
    strips.append({'file': name, 'format': fmt, 'count': count, 'bytes': len(data),
                   'sha256': hashlib.sha256(data).hexdigest(),
                   'labels': ''.join(str(int(v)) for v in labels[start:start + count])})

  with multiprocessing.Pool(workers) as pool:
    for start, (data, fmt) in zip(starts, pool.imap(_encode_job, jobs)):
      count = min(strip, len(images) - start)
      cost = len(data) + count + STRIP_ENTRY_BYTES
      if used + cost <= budget_bytes:
        add(data, fmt, start, count)
        used += cost
        continue
      # The last strip: as many of its images as still fit, fewer until they do.
      while count > 1:
        count = min(count - 1, int(count * (budget_bytes - used - STRIP_ENTRY_BYTES) / cost))
        if count < 1:
          break
        data, fmt = encode_strip(images[start:start + count])
        cost = len(data) + count + STRIP_ENTRY_BYTES
        if used + cost <= budget_bytes:
          add(data, fmt, start, count)
          used += cost
          break
      pool.terminate()
      break
  n = sum(s['count'] for s in strips)
  kept = np.ascontiguousarray(images[:n])
  manifest = {
      'format': input_pipeline.IMAGES_FORMAT, 'count': n, 'image_shape': list(images.shape[1:]),
      'strip_images': strip, 'encoder': {'webp': WEBP, 'png': PNG, 'pillow': Image.__version__},
      'images_sha256': hashlib.sha256(kept.tobytes()).hexdigest(),
      'label_counts': np.bincount(labels[:n].astype(np.int64), minlength=10).tolist(),
      'source': source, 'strips': strips}
  with open(os.path.join(out, input_pipeline.IMAGES_MANIFEST), 'w') as f:
    json.dump(manifest, f, indent=1)
  return manifest


def check_round_trip(out: str, images: np.ndarray, labels: np.ndarray) -> int:
  """Reads `out` through the trainer's loader; exits unless it gives the first images and labels exactly."""
  arrays = input_pipeline.load_images(out)
  n = len(arrays['x_train'])
  if not (np.array_equal(arrays['x_train'], images[:n]) and np.array_equal(arrays['y_train'], labels[:n])):
    sys.exit(f'gpu_bundle: {out} does not give back the source images exactly')
  return n


def download_wheels(folder: str, packages: list[str]) -> list[str]:
  """pip download of `packages` (no dependencies, wheels only) for CPython 3.12 on manylinux x86-64."""
  os.makedirs(folder, exist_ok=True)
  for package in packages:  # one version of each: two would stop the install
    name = package.split('=')[0].strip().replace('-', '_').lower()
    for old in glob.glob(os.path.join(folder, '*.whl')):
      if os.path.basename(old).lower().startswith(name + '-'):
        os.remove(old)
  cmd = [sys.executable, '-m', 'pip', 'download', '--no-deps', '--only-binary=:all:', '--python-version',
         '3.12', '--implementation', 'cp', '-d', folder, '-q']
  for platform in PLATFORMS:
    cmd += ['--platform', platform]
  subprocess.run(cmd + packages, check=True)
  return sorted(glob.glob(os.path.join(folder, '*.whl')))


def folder_bytes(folder: str) -> int:
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(folder) for f in files)


def tree_bytes() -> int:
  """The tree that travels: tracked files and untracked ones git does not ignore."""
  names = subprocess.run(['git', 'ls-files', '-z', '-c', '-o', '--exclude-standard'], cwd=ROOT,
                         capture_output=True, check=True).stdout.split(b'\0')
  paths = [os.path.join(ROOT, n.decode()) for n in names if n]
  return sum(os.path.getsize(p) for p in paths if os.path.isfile(p))


def default_wheels() -> list[str]:
  try:
    return [f'ml_collections=={importlib.metadata.version("ml_collections")}']
  except importlib.metadata.PackageNotFoundError:
    return ['ml_collections']


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--npz', default=DEFAULT_NPZ, help='x_train, y_train (uint8 NHWC): the source images')
  parser.add_argument('--synthetic', type=int, default=0,
                      help='> 0: this many synthetic images instead of --npz (tests, the smoke run)')
  parser.add_argument('--data_dir', default=os.path.join(ROOT, '.gpu_data'))
  parser.add_argument('--wheel_dir', default=os.path.join(ROOT, '.whl'))
  parser.add_argument('--wheels', nargs='*', default=None,
                      help='packages to download (default: the ml_collections installed here)')
  parser.add_argument('--no_wheels', action='store_true', help='keep --wheel_dir as it is')
  parser.add_argument('--budget_mib', type=float, default=60.0, help='wheels and data together')
  parser.add_argument('--limit_mib', type=float, default=CARRY_LIMIT_MIB,
                      help='the tree, wheels and data together, where the copy to the GPU node has a size '
                           'limit (0: none)')
  parser.add_argument('--max_images', type=int, default=0, help='> 0: at most this many images')
  parser.add_argument('--workers', type=int, default=0, help='encoding processes (0: one per core)')
  args = parser.parse_args()

  if not args.no_wheels:
    wheels = download_wheels(args.wheel_dir, args.wheels if args.wheels is not None else default_wheels())
    print('wheels: ' + ', '.join(f'{os.path.basename(w)} ({os.path.getsize(w)} B)' for w in wheels))
  wheel_bytes = folder_bytes(args.wheel_dir) if os.path.isdir(args.wheel_dir) else 0

  if args.synthetic:
    arrays = input_pipeline.make_synthetic(args.synthetic, 1, seed=0)
    images, labels = arrays['x_train'], arrays['y_train']
    source = {'synthetic': args.synthetic, 'seed': 0}
  else:
    if not os.path.isfile(args.npz):
      sys.exit(f'gpu_bundle: no {args.npz}; give --npz=FILE (x_train, y_train) or --synthetic=N')
    with np.load(args.npz, allow_pickle=False) as f:
      images, labels = f['x_train'], f['y_train']
    source = {'file': os.path.basename(args.npz),
              'x_train_sha256': hashlib.sha256(images.tobytes()).hexdigest(),
              'order': 'the first images of x_train, in order'}
  if args.max_images:
    images, labels = images[:args.max_images], labels[:args.max_images]
  budget = int(args.budget_mib * MIB) - wheel_bytes
  manifest = write_images(images, labels, args.data_dir, budget, source, workers=args.workers)
  n = check_round_trip(args.data_dir, images, labels)
  data_bytes, tree = folder_bytes(args.data_dir), tree_bytes()
  total = data_bytes + wheel_bytes + tree
  webp = sum(s['format'] == 'webp' for s in manifest['strips'])
  print(f'data: {n} images of {len(images)} in {len(manifest["strips"])} strips ({webp} WebP, '
        f'{len(manifest["strips"]) - webp} PNG), {data_bytes} B ({data_bytes / MIB:.2f} MiB, '
        f'{data_bytes / max(n, 1):.0f} B an image), labels {manifest["label_counts"]}; '
        'round trip bit-exact')
  print(f'carry: .whl {wheel_bytes / MIB:.2f} MiB + .gpu_data {data_bytes / MIB:.2f} MiB + tree '
        f'{tree / MIB:.2f} MiB = {total / MIB:.2f} MiB (limit {args.limit_mib or "none"} MiB)')
  if data_bytes + wheel_bytes > args.budget_mib * MIB:
    sys.exit(f'gpu_bundle: wheels and data take {(data_bytes + wheel_bytes) / MIB:.2f} MiB, over '
             f'--budget_mib={args.budget_mib}')
  if args.limit_mib and total >= args.limit_mib * MIB:
    sys.exit(f'gpu_bundle: the tree, wheels and data take {total / MIB:.2f} MiB, over '
             f'--limit_mib={args.limit_mib}; lower --budget_mib')


if __name__ == '__main__':
  main()
