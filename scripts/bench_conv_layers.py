"""One 3x3 convolution layer of the CIFAR ResNets: forward, input gradient and weight gradient times.

  JAX_PLATFORMS=cpu python scripts/bench_conv_layers.py --layers=16x32,32x16,64x8,128x4

Each layer (channels x spatial size, batch --batch, stride 1, padding 1, NHWC) is timed in a subprocess per
XLA:CPU setting, since XLA reads its flags once: 'eigen' is what cifar-jax sets (cifar_jax/cpu_backend.py:
convolutions through XLA's Eigen path), 'ynn' XLA's default (convolutions through YNNPACK), and 'torch'
the same layer in PyTorch (NCHW and channels_last; forward, and forward plus backward together since torch
computes both gradients in one call). Medians of --repeats calls, in milliseconds. Prints a markdown table.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _time(fn, repeats: int) -> float:
  fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times) * 1e3


def _jax_worker(args) -> None:
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  out = {}
  for layer in args.layers.split(','):
    c, s = (int(v) for v in layer.split('x'))
    rng = np.random.default_rng(0)
    x = jax.numpy.asarray(rng.standard_normal((args.batch, s, s, c)), args.dtype)
    w = jax.numpy.asarray(rng.standard_normal((3, 3, c, c)) * 0.05, args.dtype)
    dy = jax.numpy.asarray(rng.standard_normal((args.batch, s, s, c)), args.dtype)

    def conv(x, w):
      return jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                                          dimension_numbers=('NHWC', 'HWIO', 'NHWC'))

    fwd = jax.jit(conv)
    dx = jax.jit(lambda x, w, dy: jax.vjp(conv, x, w)[1](dy)[0])
    dw = jax.jit(lambda x, w, dy: jax.vjp(conv, x, w)[1](dy)[1])
    out[layer] = {
        'forward': _time(lambda: fwd(x, w).block_until_ready(), args.repeats),
        'input_grad': _time(lambda: dx(x, w, dy).block_until_ready(), args.repeats),
        'weight_grad': _time(lambda: dw(x, w, dy).block_until_ready(), args.repeats),
    }
  print(json.dumps(out))


def _torch_worker(args) -> None:
  import torch  # pylint: disable=g-import-not-at-top

  torch.set_num_threads(args.torch_threads)
  out = {}
  for layer in args.layers.split(','):
    c, s = (int(v) for v in layer.split('x'))
    for channels_last in (False, True):
      x = torch.randn(args.batch, c, s, s)
      if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
      x.requires_grad_()
      w = torch.randn(c, c, 3, 3, requires_grad=True)
      dy = torch.randn(args.batch, c, s, s)

      def forward():
        with torch.no_grad():
          torch.nn.functional.conv2d(x, w, padding=1)

      def forward_backward():
        torch.nn.functional.conv2d(x, w, padding=1).backward(dy)

      key = 'torch_channels_last' if channels_last else 'torch'
      out.setdefault(layer, {})[key] = {'forward': _time(forward, args.repeats),
                                        'forward_backward': _time(forward_backward, args.repeats)}
  print(json.dumps(out))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--layers', default='16x32,32x16,64x8,128x4,64x32',
                      help='comma-separated CHANNELSxSIZE (ResNet18 width 0.25 stages, then width 1)')
  parser.add_argument('--batch', type=int, default=128)
  parser.add_argument('--repeats', type=int, default=7)
  parser.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'),
                      help='the JAX layers\' dtype (torch stays float32)')
  parser.add_argument('--torch_threads', type=int, default=os.cpu_count())
  parser.add_argument('--worker', default='', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker == 'torch':
    return _torch_worker(args)
  if args.worker:
    return _jax_worker(args)

  sys.path.insert(0, ROOT)
  from cifar_jax import cpu_backend  # pylint: disable=g-import-not-at-top
  common = [f'--layers={args.layers}', f'--batch={args.batch}', f'--repeats={args.repeats}',
            f'--dtype={args.dtype}',
            f'--torch_threads={args.torch_threads}']
  base = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  flags = {'eigen': cpu_backend.EIGEN_CONVOLUTIONS, 'ynn': ''}
  results = {}
  for name in ('eigen', 'ynn', 'torch'):
    env = dict(base, XLA_FLAGS=flags.get(name, ''), JAX_PLATFORMS=base.get('JAX_PLATFORMS', 'cpu'))
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), f'--worker={name}'] + common,
                          env=env, capture_output=True, text=True, check=True)
    results[name] = json.loads(proc.stdout.strip().splitlines()[-1])

  print(f'batch {args.batch}, JAX {args.dtype}, torch float32, ms per call (median of {args.repeats}); '
        f'{os.cpu_count()} CPUs\n')
  print('| layer (C x HxW) | XLA Eigen fwd / dx / dw | XLA YNNPACK fwd / dx / dw | torch fwd / fwd+bwd '
        '| torch channels_last fwd / fwd+bwd |')
  print('| --- | --- | --- | --- | --- |')
  for layer in args.layers.split(','):
    e, y, t = results['eigen'][layer], results['ynn'][layer], results['torch'][layer]
    jax_cell = lambda r: f"{r['forward']:.1f} / {r['input_grad']:.1f} / {r['weight_grad']:.1f}"
    torch_cell = lambda r: f"{r['forward']:.1f} / {r['forward_backward']:.1f}"
    c, s = layer.split('x')
    print(f'| {c} x {s}x{s} | {jax_cell(e)} | {jax_cell(y)} | {torch_cell(t["torch"])} | '
          f'{torch_cell(t["torch_channels_last"])} |')


if __name__ == '__main__':
  main()
