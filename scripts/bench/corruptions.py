"""Times CIFAR-10-C generation: every corruption at every severity of N images (cifar_jax/corruptions.py),
and, with --reference, make_cifar_c.py's own functions on a few images per set, extrapolated to N.

  python scripts/benchmark.py corruptions --data=../shared/data/cifar10/cifar10_train.npz --num_images=10000
  python scripts/benchmark.py corruptions ... --reference=/tmp/ref/ref_patched.py --frost_dir=DIR \
      --reference_images=20

The reference (scripts/maintainers/corruption_fixture.py says how it is patched to run) loops over images one
at a time, as its own main loop does; its time per image times N is its estimate. No cache: every set is
made.
"""

import importlib.util
import time

import numpy as np
from PIL import Image

from bench import harness


def add_flags(parser) -> None:
  parser.add_argument('--data', required=True, help='an .npz with x_train (N, 32, 32, 3) uint8')
  parser.add_argument('--num_images', type=int, default=10000)
  parser.add_argument('--corruptions', default='all')
  parser.add_argument('--reference', help='the patched make_cifar_c.py, to time it too')
  parser.add_argument('--frost_dir', help="the reference's frost images")
  parser.add_argument('--reference_images', type=int, default=20, help='images per set for the reference')
  parser.add_argument('--json', help='write the times here')


def main(args) -> None:
  from cifar_jax import corruptions  # pylint: disable=g-import-not-at-top

  with np.load(args.data, allow_pickle=False) as f:
    images = f['x_train'][:args.num_images]
  names = corruptions.selected(args.corruptions)
  ref = None
  if args.reference:
    spec = importlib.util.spec_from_file_location('make_cifar_c_reference', args.reference)
    ref = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ref)
    ref.FROST_DIR = args.frost_dir
  times = {}
  total = total_ref = 0.0
  print(f'{len(images)} images; seconds per corruption (5 severities)'
        + ('; the reference per image x N' if ref else ''))
  for name in names:
    start = time.perf_counter()
    for severity in corruptions.SEVERITIES:
      corruptions.corrupt(images, name, severity, seed=0)
    seconds = time.perf_counter() - start
    times[name] = {'seconds': seconds}
    total += seconds
    line = f'{name:<18} {seconds:8.1f} s'
    if ref is not None:
      sample = images[:args.reference_images]
      start = time.perf_counter()
      for severity in corruptions.SEVERITIES:
        for image in sample:
          np.uint8(getattr(ref, name)(Image.fromarray(image), severity))
      per_image = (time.perf_counter() - start) / len(sample)
      times[name]['reference_seconds_estimate'] = per_image * len(images)
      total_ref += per_image * len(images)
      line += f'   reference ~{per_image * len(images):8.1f} s ({len(sample)} images per severity timed)'
    print(line, flush=True)
  print(f'all {len(names)} x 5: {total:.1f} s' + (f'; reference ~{total_ref:.0f} s' if ref else ''))
  if args.json:
    harness.write_json(args.json, {'num_images': len(images), 'total_seconds': total,
                                   'reference_total_seconds_estimate': total_ref if ref else None,
                                   'per_corruption': times})
